//! What the server commands print: tables like the local commands', JSON with `--json`.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use vmvault_format::Manifest;

use crate::exit::InputError;
use crate::output::{bytes, print_json, table};
use crate::remote::Client;
use crate::remote_cmd::{PolicyArgs, PolicyCommand, VaultCommand};

pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn policy(c: &Client, json: bool, cmd: PolicyCommand) -> Result<()> {
    let body = |a: &PolicyArgs| {
        json!({"name": a.name, "schedule": a.schedule, "timezone": a.timezone,
            "keep_last": a.keep_last, "keep_hourly": a.keep_hourly, "keep_daily": a.keep_daily,
            "keep_weekly": a.keep_weekly, "keep_monthly": a.keep_monthly, "keep_yearly": a.keep_yearly})
    };
    let v: Value = match &cmd {
        PolicyCommand::Create(a) => c.send("POST", "/policies", &body(a))?,
        PolicyCommand::Update(a) => {
            // The server's PUT replaces the policy: start from what it is now.
            let path = format!("/policies/{}", a.name);
            let mut current: Value = c.get(&path)?;
            let text = [("schedule", &a.schedule), ("timezone", &a.timezone)];
            for (k, v) in text {
                if let Some(v) = v {
                    current[k] = json!(v);
                }
            }
            let counts = [
                ("keep_last", a.keep_last),
                ("keep_hourly", a.keep_hourly),
                ("keep_daily", a.keep_daily),
                ("keep_weekly", a.keep_weekly),
                ("keep_monthly", a.keep_monthly),
                ("keep_yearly", a.keep_yearly),
            ];
            for (k, v) in counts {
                if let Some(v) = v {
                    current[k] = json!(v);
                }
            }
            let body = json!({"name": a.name, "schedule": current["schedule"],
                "timezone": current["timezone"], "keep_last": current["keep_last"],
                "keep_hourly": current["keep_hourly"], "keep_daily": current["keep_daily"],
                "keep_weekly": current["keep_weekly"], "keep_monthly": current["keep_monthly"],
                "keep_yearly": current["keep_yearly"]});
            c.send("PUT", &path, &body)?
        }
        PolicyCommand::List => c.get("/policies")?,
        PolicyCommand::Show { name } => c.get(&format!("/policies/{name}"))?,
        PolicyCommand::Delete { name } => {
            let _: Value = c.delete(&format!("/policies/{name}"))?;
            eprintln!("policy {name} deleted");
            return Ok(());
        }
    };
    if json {
        print_json(&v);
        return Ok(());
    }
    let list = if v.is_array() {
        v.as_array().cloned().unwrap_or_default()
    } else {
        vec![v]
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let keep: Vec<String> = ["last", "hourly", "daily", "weekly", "monthly", "yearly"]
                .iter()
                .filter(|k| p[format!("keep_{k}")].as_u64().unwrap_or(0) > 0)
                .map(|k| format!("{k}={}", p[format!("keep_{k}")]))
                .collect();
            vec![
                cell(&p["name"]),
                cell(&p["schedule"]),
                cell(&p["timezone"]),
                keep.join(" "),
            ]
        })
        .collect();
    table(&["NAME", "SCHEDULE", "TIMEZONE", "KEEP"], &rows);
    Ok(())
}

pub fn print_jobs(v: &Value) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| {
            vec![
                cell(&j["id"]),
                cell(&j["kind"]),
                cell(&j["item"]),
                cell(&j["state"]),
                cell(&j["started"]),
                cell(&j["ended"]),
                progress(j),
            ]
        })
        .collect();
    table(
        &[
            "ID", "KIND", "ITEM", "STATE", "STARTED", "ENDED", "PROGRESS",
        ],
        &rows,
    );
}

fn progress(j: &Value) -> String {
    let done = j["bytes_done"].as_u64().unwrap_or(0);
    let total = j["bytes_total"].as_u64().unwrap_or(0);
    let mut s = format!("{}/{}", bytes(done), bytes(total));
    if let Some(r) = j["rate"].as_f64() {
        s.push_str(&format!(" {}/s", bytes(r as u64)));
    }
    if let Some(e) = j["eta_secs"].as_f64() {
        s.push_str(&format!(" ETA {}s", e.round()));
    }
    s
}

pub fn print_job(j: &Value) {
    for k in [
        "id",
        "kind",
        "item",
        "state",
        "attempt",
        "requested_by",
        "created",
        "started",
        "ended",
        "point",
        "error",
    ] {
        if !j[k].is_null() {
            outln!("{k:<13}{}", cell(&j[k]));
        }
    }
    outln!("{:<13}{}", "progress", progress(j));
    for l in j["log"].as_array().into_iter().flatten() {
        outln!("  {} {}", cell(&l["time"]), cell(&l["line"]));
    }
}

/// A server job that did not succeed, with the class of its error as the server gave it:
/// the CLI exits as the same failure would locally.
#[derive(Debug)]
pub struct JobEnded {
    pub id: i64,
    pub state: String,
    pub error: String,
    pub code: Option<String>,
}

impl std::fmt::Display for JobEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {} {}", self.id, self.state)?;
        if !self.error.is_empty() {
            write!(f, ": {}", self.error)?;
        }
        Ok(())
    }
}

impl std::error::Error for JobEnded {}

impl JobEnded {
    pub fn class(&self) -> vmvault_class::Class {
        if self.state == "cancelled" {
            return vmvault_class::Class::Cancelled;
        }
        self.code
            .as_deref()
            .and_then(vmvault_class::Class::from_api_code)
            .unwrap_or(vmvault_class::Class::Failure)
    }
}

/// Follows a job to its end: its log lines on stderr as they come, its bytes as a progress bar
/// on a terminal. The job as it ended when it succeeded; [`JobEnded`] otherwise.
pub fn follow_job(c: &Client, id: i64) -> Result<Value> {
    use vmvault_engine::Progress;
    let bar = crate::output::Bar::new();
    let (mut said, mut total) = (0usize, 0u64);
    let mut done = 0u64;
    loop {
        let j: Value = c.get(&format!("/jobs/{id}"))?;
        let log = j["log"].as_array().cloned().unwrap_or_default();
        for l in log.iter().skip(said) {
            bar.message(&format!("job {id}: {}", cell(&l["line"])));
        }
        said = said.max(log.len());
        let (now_done, now_total) = (
            j["bytes_done"].as_u64().unwrap_or(0),
            j["bytes_total"].as_u64().unwrap_or(0),
        );
        if now_total != total && now_total > 0 {
            bar.start("job", now_total);
            bar.advance(now_done);
            total = now_total;
        } else if now_done > done {
            bar.advance(now_done - done);
        }
        done = now_done;
        let state = j["state"].as_str().unwrap_or("").to_string();
        if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
            bar.finish();
            if state == "succeeded" {
                return Ok(j);
            }
            return Err(JobEnded {
                id,
                state,
                error: cell(&j["error"]),
                code: j["error_code"].as_str().map(str::to_string),
            }
            .into());
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

pub fn points(c: &Client, json: bool, vm: Option<&str>, deleted: bool) -> Result<()> {
    let vaults: Value = c.get("/vaults")?;
    let location = vaults[0]["location"].as_str().unwrap_or("").to_string();
    let encrypted = vaults[0]["encrypted"].as_bool().unwrap_or(true);
    let mut manifests: Vec<Manifest> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("/recovery-points?limit=1000&deleted={deleted}");
        if let Some(vm) = vm {
            q.push_str(&format!("&item={}", urlencode(vm)));
        }
        if let Some(cur) = &cursor {
            q.push_str(&format!("&cursor={}", urlencode(cur)));
        }
        let page: Value = c.get(&q)?;
        for p in page["items"].as_array().into_iter().flatten() {
            manifests.push(
                serde_json::from_value(p["manifest"].clone())
                    .context("a manifest from the server")?,
            );
        }
        match page["next_cursor"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => break,
        }
    }
    crate::points::show(json, location, encrypted, manifests.iter().collect(), &[]);
    Ok(())
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn vault(c: &Client, json: bool, cmd: VaultCommand) -> Result<()> {
    let vaults: Value = c.get("/vaults")?;
    let name = vaults[0]["name"].as_str().unwrap_or("default").to_string();
    let v: Value = match cmd {
        VaultCommand::Show => vaults[0].clone(),
        VaultCommand::Set {
            soft_delete_days,
            require_approval,
        } => c.send(
            "PATCH",
            &format!("/vaults/{name}"),
            &json!({"soft_delete_days": soft_delete_days, "require_approval": require_approval}),
        )?,
        VaultCommand::Lock {
            yes_i_understand_this_is_irreversible,
        } => {
            if !yes_i_understand_this_is_irreversible {
                return Err(InputError(
                    "locking a vault cannot be undone: pass --yes-i-understand-this-is-irreversible".into(),
                )
                .into());
            }
            c.send(
                "POST",
                &format!("/vaults/{}/lock", urlencode(&name)),
                &json!({}),
            )?
        }
    };
    if json {
        print_json(&v);
    } else if let Some(o) = v.as_object() {
        for (k, val) in o {
            outln!("{k:<18}{}", cell(val));
        }
    }
    Ok(())
}
