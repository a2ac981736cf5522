//! `/metrics` in the Prometheus text format. Open like Prometheus' own targets usually are:
//! it shows counts and times, no names of secrets; put it behind the firewall you scrape from.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::app::App;
use crate::{catalog, Result};

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(app: &App) -> Result<String> {
    let mut out = String::new();
    let v = escape(&app.vault_name);
    let by_state: Vec<(String, i64)> = {
        let conn = app.db.conn();
        let mut stmt = conn.prepare("SELECT state, count(*) FROM jobs GROUP BY state")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let _ = writeln!(
        out,
        "# HELP vmvault_jobs Jobs by state.\n# TYPE vmvault_jobs gauge"
    );
    for s in crate::jobs::JobState::KNOWN {
        let n = by_state
            .iter()
            .find(|(k, _)| k == s.as_str())
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "vmvault_jobs{{state=\"{s}\"}} {n}");
    }
    let stats = app.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let _ = writeln!(out, "# HELP vmvault_backup_bytes_total Bytes backed up (logical, and newly stored) since the server started.\n# TYPE vmvault_backup_bytes_total counter");
    for (vm, s) in &stats {
        let vm = escape(vm);
        let _ = writeln!(
            out,
            "vmvault_backup_bytes_total{{vm=\"{vm}\",kind=\"logical\"}} {}",
            s.bytes_logical
        );
        let _ = writeln!(
            out,
            "vmvault_backup_bytes_total{{vm=\"{vm}\",kind=\"stored\"}} {}",
            s.bytes_stored
        );
    }
    let _ = writeln!(out, "# HELP vmvault_last_success_timestamp_seconds When each VM's last backup succeeded.\n# TYPE vmvault_last_success_timestamp_seconds gauge");
    for (vm, s) in &stats {
        if let Some(t) = s.last_success {
            let _ = writeln!(
                out,
                "vmvault_last_success_timestamp_seconds{{vm=\"{}\"}} {}",
                escape(vm),
                t.timestamp()
            );
        }
    }
    hosts(app, &mut out)?;
    let (points, bytes) = catalog::count(&app.db, &app.vault_name)?;
    let _ = writeln!(out, "# HELP vmvault_recovery_points Recovery points in the vault (soft-deleted ones included).\n# TYPE vmvault_recovery_points gauge");
    let _ = writeln!(out, "vmvault_recovery_points{{vault=\"{v}\"}} {points}");
    let _ = writeln!(out, "# HELP vmvault_vault_bytes Bytes the vault's recovery points added to it.\n# TYPE vmvault_vault_bytes gauge");
    let _ = writeln!(out, "vmvault_vault_bytes{{vault=\"{v}\"}} {bytes}");
    let _ = writeln!(
        out,
        "# HELP vmvault_jobs_running Jobs running now.\n# TYPE vmvault_jobs_running gauge"
    );
    let _ = writeln!(out, "vmvault_jobs_running {}", app.runner.running_count());
    if let Some(r) = app.vault.replication() {
        let (queued, overflowed) = r.backlog();
        let _ = writeln!(out, "# HELP vmvault_replication_lag_objects Objects not yet copied to the secondary region.\n# TYPE vmvault_replication_lag_objects gauge");
        let _ = writeln!(
            out,
            "vmvault_replication_lag_objects{{vault=\"{v}\"}} {queued}"
        );
        let _ = writeln!(
            out,
            "vmvault_replication_overflowed{{vault=\"{v}\"}} {}",
            u8::from(overflowed)
        );
    }
    Ok(out)
}

pub async fn metrics(State(app): State<Arc<App>>) -> Result<impl IntoResponse> {
    let text = render(&app)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

/// Per host: its agent's version and state, its last heartbeat, its jobs by state.
fn hosts(app: &App, out: &mut String) -> Result<()> {
    let hosts = app.hosts()?;
    let _ = writeln!(out, "# HELP vmvault_host_info A host, its agent's version and state.\n# TYPE vmvault_host_info gauge");
    for h in &hosts {
        let _ = writeln!(
            out,
            "vmvault_host_info{{host=\"{}\",version=\"{}\",state=\"{}\",silent=\"{}\"}} 1",
            escape(&h.name),
            escape(h.agent_version.as_deref().unwrap_or("")),
            h.state,
            h.silent
        );
    }
    let _ = writeln!(out, "# HELP vmvault_host_last_heartbeat_timestamp_seconds When each host's agent was last heard from.\n# TYPE vmvault_host_last_heartbeat_timestamp_seconds gauge");
    for h in &hosts {
        if let Some(t) = h.last_heartbeat.as_deref().and_then(crate::db::parse_ts) {
            let _ = writeln!(
                out,
                "vmvault_host_last_heartbeat_timestamp_seconds{{host=\"{}\"}} {}",
                escape(&h.name),
                t.timestamp()
            );
        }
    }
    let by_host: Vec<(String, String, i64)> = {
        let conn = app.db.conn();
        let mut stmt = conn.prepare(
            "SELECT host, state, count(*) FROM jobs WHERE host IS NOT NULL GROUP BY host, state",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    let _ = writeln!(out, "# HELP vmvault_host_jobs Jobs of each host's agent by state.\n# TYPE vmvault_host_jobs gauge");
    for (host, state, n) in by_host {
        let _ = writeln!(
            out,
            "vmvault_host_jobs{{host=\"{}\",state=\"{}\"}} {n}",
            escape(&host),
            escape(&state)
        );
    }
    Ok(())
}
