//! Alerts: a failed backup (after its retries), missed schedules, and a VM with no
//! successful backup within its policy's period. Each is logged, kept in the audit log,
//! and POSTed as JSON to every configured webhook (on its own thread: a slow receiver never
//! holds up a job).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::app::App;
use crate::schedule::Schedule;

#[derive(Serialize, Clone)]
pub struct Alert {
    /// backup_failed, missed_schedule or overdue.
    pub kind: String,
    pub vault: String,
    pub item: String,
    pub message: String,
    pub time: String,
}

fn send_mail(m: &crate::config::SmtpAlerts, a: &Alert) -> Result<(), String> {
    use lettre::Transport;
    let mut msg = lettre::Message::builder()
        .from(m.from.parse().map_err(|e| format!("{e}"))?)
        .subject(format!("vmvault: {} {} ({})", a.kind, a.item, a.vault));
    for to in &m.to {
        msg = msg.to(to.parse().map_err(|e| format!("{e}"))?);
    }
    let msg = msg
        .body(format!(
            "{}\n\nvault: {}\nitem: {}\nkind: {}\ntime: {}\n",
            a.message, a.vault, a.item, a.kind, a.time
        ))
        .map_err(|e| e.to_string())?;
    lettre::SmtpTransport::builder_dangerous(&m.host)
        .port(m.port)
        .timeout(Some(Duration::from_secs(20)))
        .build()
        .send(&msg)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Overdue VMs already alerted, so an overdue VM is reported once until it recovers.
#[derive(Default)]
pub struct Overdue(Mutex<HashSet<String>>);

impl App {
    pub fn alert(&self, kind: &str, item: &str, message: &str) {
        let a = Alert {
            kind: kind.into(),
            vault: self.vault_name.clone(),
            item: item.into(),
            message: message.into(),
            time: crate::db::ts(self.now()),
        };
        eprintln!("vmvault server: ALERT {kind} {item}: {message}");
        crate::auth::audit(&self.db, "server", &format!("alert.{kind}"), item, message);
        if let Some(m) = self.cfg.alert_smtp.clone() {
            let body = a.clone();
            let _ = std::thread::Builder::new()
                .name("alert-mail".into())
                .spawn(move || {
                    if let Err(e) = send_mail(&m, &body) {
                        eprintln!("vmvault server: alert mail via {}:{}: {e}", m.host, m.port);
                    }
                });
        }
        for url in &self.cfg.alert_webhooks {
            let url = url.clone();
            let body = a.clone();
            let _ = std::thread::Builder::new()
                .name("webhook".into())
                .spawn(move || {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(10))
                        .build();
                    if let Err(e) = agent.post(&url).send_json(&body) {
                        eprintln!("vmvault server: webhook {url}: {e}");
                    }
                });
        }
    }

    pub(crate) fn alert_job_failed(&self, id: i64, kind: &str, error: &str) {
        let item: Option<String> = self
            .db
            .conn()
            .query_row("SELECT item FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .unwrap_or(None);
        self.alert(
            &format!("{kind}_failed"),
            item.as_deref().unwrap_or("-"),
            &format!("job {id} failed: {error}"),
        );
    }

    /// Alerts once when a VM's last success is older than its policy's period plus an hour.
    pub(crate) fn check_overdue(&self, item: &str, sched: &Schedule, now: DateTime<Utc>) {
        let last = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(item)
            .and_then(|s| s.last_success);
        let since: Option<String> = self
            .db
            .conn()
            .query_row(
                "SELECT created FROM protected_items WHERE name = ?1",
                [item],
                |r| r.get(0),
            )
            .ok();
        let Some(since) = last.or_else(|| since.as_deref().and_then(crate::db::parse_ts)) else {
            return;
        };
        let limit = sched.period() + chrono::Duration::hours(1);
        let mut seen = self.overdue.0.lock().unwrap_or_else(|e| e.into_inner());
        if now - since > limit {
            if seen.insert(item.to_string()) {
                drop(seen);
                self.alert(
                    "overdue",
                    item,
                    &format!(
                        "no successful backup since {} (the policy's period is {} h)",
                        crate::db::ts(since),
                        sched.period().num_hours()
                    ),
                );
            }
        } else {
            seen.remove(item);
        }
    }
}
