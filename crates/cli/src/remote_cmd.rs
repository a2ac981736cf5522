//! The commands that work against a vault server (`--server URL` or `VMVAULT_SERVER`):
//! policies, protect/unprotect, on-demand backups, jobs, points, soft delete, restores, and
//! the vault's admin settings. Output matches the local commands where both exist.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use vmvault_format::Manifest;

use crate::exit::InputError;
use crate::output::{bytes, print_json, table};
use crate::remote::Client;

#[derive(Parser)]
#[command(name = "vmvault", version, about = "vmvault against a vault server")]
pub struct RemoteCli {
    /// The server: https://HOST:PORT.
    #[arg(long, env = "VMVAULT_SERVER", value_name = "URL")]
    server: String,
    /// An API token (vmv_...), or @FILE to read it from a file.
    #[arg(long, env = "VMVAULT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Trust the server's certificate with this SHA-256 fingerprint (first use; then pinned).
    #[arg(long, global = true, value_name = "SHA256")]
    trust_fingerprint: Option<String>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Subcommand)]
enum RemoteCommand {
    /// Schedules and retention.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Put a VM (its description, TOML) under a policy.
    Protect {
        description: PathBuf,
        #[arg(long)]
        policy: String,
    },
    /// Stop backing a VM up (its recovery points stay).
    Unprotect { name: String },
    /// Back a protected VM up now; prints the job id.
    Backup {
        name: String,
        /// Keep this point at least until then (YYYY-MM-DD).
        #[arg(long, value_name = "DATE")]
        keep_until: Option<String>,
        /// Wait for the job to end and say how it ended.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, newest first.
    Jobs {
        #[arg(long, conflicts_with = "failed")]
        running: bool,
        #[arg(long)]
        failed: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Show or cancel a job.
    #[command(subcommand)]
    Job(JobCommand),
    /// List recovery points (as the local `points` does).
    Points {
        vm: Option<String>,
        /// Soft-deleted points instead.
        #[arg(long)]
        deleted: bool,
    },
    /// Delete (soft) or undelete a recovery point: NAME@ID.
    #[command(subcommand)]
    Point(PointCommand),
    /// Restore NAME@ID into a folder on the server's host.
    Restore {
        point: String,
        #[arg(long)]
        target: String,
        #[arg(long)]
        force: bool,
    },
    /// The vault: show, settings, lock (irreversible).
    #[command(subcommand, name = "vault")]
    Vault(VaultCommand),
    /// Requests waiting for a second administrator.
    #[command(subcommand)]
    Approval(ApprovalCommand),
    /// Users and their tokens.
    #[command(subcommand)]
    User(UserCommand),
    /// The audit log, newest first (admins).
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    Create(PolicyArgs),
    /// Change a policy's schedule or retention (shortening may need approval).
    Update(PolicyArgs),
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Args)]
struct PolicyArgs {
    name: String,
    /// `hourly`, `every N hours`, `daily HH:MM[,HH:MM]`, `weekly mon,thu HH:MM`.
    #[arg(long)]
    schedule: String,
    #[arg(long, default_value = "UTC")]
    timezone: String,
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
}

#[derive(Subcommand)]
enum JobCommand {
    Show { id: i64 },
    Cancel { id: i64 },
}

#[derive(Subcommand)]
enum PointCommand {
    Delete { point: String },
    Undelete { point: String },
}

#[derive(Subcommand)]
enum VaultCommand {
    Show,
    /// Change soft delete days (1-180) or require a second admin for destructive actions.
    Set {
        #[arg(long)]
        soft_delete_days: Option<u32>,
        #[arg(long)]
        require_approval: Option<bool>,
    },
    /// Make the vault immutable: no point deleted before its retention ends, no retention
    /// shortened. Cannot be undone.
    Lock {
        #[arg(long)]
        yes_i_understand_this_is_irreversible: bool,
    },
}

#[derive(Subcommand)]
enum ApprovalCommand {
    List,
    Approve { id: i64 },
    Reject { id: i64 },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Make a user with a role; prints their token (shown once).
    Create {
        name: String,
        #[arg(long)]
        role: String,
    },
    List,
}

/// Whether this command line is meant for a server: `--server` given, or VMVAULT_SERVER
/// set and the command not one that only exists locally.
pub fn wanted(args: &[String]) -> bool {
    let rest = &args[1.min(args.len())..];
    const FLAGS: &[&str] = &["--server", "--token", "--trust-fingerprint"];
    let is_flag = |a: &str| {
        FLAGS
            .iter()
            .any(|f| a == *f || a.starts_with(&format!("{f}=")))
    };
    if rest.iter().any(|a| is_flag(a)) {
        return true;
    }
    if std::env::var_os("VMVAULT_SERVER").is_none() {
        return false;
    }
    const REMOTE: &[&str] = &[
        "policy",
        "protect",
        "unprotect",
        "backup",
        "jobs",
        "job",
        "points",
        "point",
        "restore",
        "approval",
        "user",
        "audit",
    ];
    rest.iter()
        .find(|a| !a.starts_with('-'))
        .is_some_and(|c| REMOTE.contains(&c.as_str()))
}

/// `NAME@ID` (or a bare id) to (VM, id).
fn split_point(spec: &str) -> (Option<&str>, &str) {
    match spec.split_once('@') {
        Some((vm, id)) => (Some(vm), id),
        None => (None, spec),
    }
}

fn find_point(c: &Client, spec: &str) -> Result<Value> {
    let (vm, id) = split_point(spec);
    let p: Value = c.get(&format!("/recovery-points/{id}"))?;
    if let Some(vm) = vm {
        if p["vm"] != vm {
            return Err(InputError(format!("recovery point {id} is not one of {vm}'s")).into());
        }
    }
    Ok(p)
}

pub fn run(cli: RemoteCli) -> Result<()> {
    match run_command(cli) {
        // A request a second admin must approve was made: that is the expected outcome.
        Err(e)
            if e.downcast_ref::<crate::remote::ApiError>()
                .is_some_and(|a| a.code == "approval_required") =>
        {
            eprintln!(
                "vmvault: {}",
                e.downcast_ref::<crate::remote::ApiError>()
                    .map(|a| a.message.as_str())
                    .unwrap_or("")
            );
            Ok(())
        }
        other => other,
    }
}

fn run_command(cli: RemoteCli) -> Result<()> {
    let c = Client::connect(
        &cli.server,
        cli.token.clone(),
        cli.trust_fingerprint.as_deref(),
    )?;
    let json = cli.json;
    let show = |v: &Value| print_json(v);
    match cli.command {
        RemoteCommand::Policy(p) => policy(&c, json, p)?,
        RemoteCommand::Protect {
            description,
            policy,
        } => {
            let desc = vmvault_engine::VmDescription::load(&description)?;
            // Paths go to the server absolute: it reads the disks on its own host.
            let mut desc = desc;
            for d in &mut desc.disks {
                d.path = std::path::absolute(&d.path)
                    .with_context(|| format!("resolving {}", d.path.display()))?;
            }
            let v: Value = c.send(
                "POST",
                "/protected-items",
                &json!({"description": desc.to_toml(), "policy": policy}),
            )?;
            if json {
                show(&v);
            } else {
                println!(
                    "{} is protected by policy {}",
                    v["name"].as_str().unwrap_or(""),
                    policy
                );
            }
        }
        RemoteCommand::Unprotect { name } => {
            let _: Value = c.delete(&format!("/protected-items/{name}"))?;
            eprintln!("{name} is no longer protected; its recovery points stay");
        }
        RemoteCommand::Backup {
            name,
            keep_until,
            wait,
        } => {
            let v: Value = c.send(
                "POST",
                &format!("/protected-items/{name}/backup"),
                &json!({"keep_until": keep_until}),
            )?;
            let id = v["job"].as_i64().unwrap_or(0);
            if wait {
                let j = wait_job(&c, id)?;
                if json {
                    show(&j);
                } else {
                    println!("{id}");
                }
                if j["state"] != "succeeded" {
                    anyhow::bail!(
                        "job {id} ended {}: {}",
                        j["state"].as_str().unwrap_or("?"),
                        j["error"].as_str().unwrap_or("")
                    );
                }
            } else if json {
                show(&v);
            } else {
                println!("{id}");
                eprintln!("backup job {id} queued; `vmvault job show {id}` follows it");
            }
        }
        RemoteCommand::Jobs {
            running,
            failed,
            limit,
        } => {
            let state = if running {
                "&state=running"
            } else if failed {
                "&state=failed"
            } else {
                ""
            };
            let v: Value = c.get(&format!("/jobs?limit={limit}{state}"))?;
            if json {
                show(&v);
            } else {
                print_jobs(&v);
            }
        }
        RemoteCommand::Job(JobCommand::Show { id }) => {
            let v: Value = c.get(&format!("/jobs/{id}"))?;
            if json {
                show(&v);
            } else {
                print_job(&v);
            }
        }
        RemoteCommand::Job(JobCommand::Cancel { id }) => {
            let v: Value = c.send("POST", &format!("/jobs/{id}/cancel"), &json!({}))?;
            if json {
                show(&v);
            } else {
                println!("job {id}: {}", v["state"].as_str().unwrap_or(""));
            }
        }
        RemoteCommand::Points { vm, deleted } => points(&c, json, vm.as_deref(), deleted)?,
        RemoteCommand::Point(PointCommand::Delete { point }) => {
            let p = find_point(&c, &point)?;
            let id = p["id"].as_str().unwrap_or("");
            let v: Value = c.delete(&format!("/recovery-points/{id}"))?;
            if json {
                show(&v);
            } else {
                println!(
                    "{}@{} deleted; restorable and undeletable until {}",
                    p["vm"].as_str().unwrap_or(""),
                    &id[..id.len().min(8)],
                    v["purge_after"].as_str().unwrap_or("?")
                );
            }
        }
        RemoteCommand::Point(PointCommand::Undelete { point }) => {
            let (_, id) = split_point(&point);
            let v: Value = c.send(
                "POST",
                &format!("/recovery-points/{id}/undelete"),
                &json!({}),
            )?;
            if json {
                show(&v);
            } else {
                println!(
                    "{}@{} is back",
                    v["vm"].as_str().unwrap_or(""),
                    &id[..id.len().min(8)]
                );
            }
        }
        RemoteCommand::Restore {
            point,
            target,
            force,
        } => {
            let p = find_point(&c, &point)?;
            let v: Value = c.send(
                "POST",
                "/restores",
                &json!({"point": p["id"], "target": target, "overwrite": force}),
            )?;
            if json {
                show(&v);
            } else {
                println!("{}", v["job"]);
            }
        }
        RemoteCommand::Vault(cmd) => vault(&c, json, cmd)?,
        RemoteCommand::Approval(cmd) => {
            let v: Value = match cmd {
                ApprovalCommand::List => c.get("/approvals")?,
                ApprovalCommand::Approve { id } => c.send(
                    "POST",
                    &format!("/approvals/{id}"),
                    &json!({"approve": true}),
                )?,
                ApprovalCommand::Reject { id } => c.send(
                    "POST",
                    &format!("/approvals/{id}"),
                    &json!({"approve": false}),
                )?,
            };
            if json || !v.is_array() {
                show(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        [
                            "id",
                            "state",
                            "action",
                            "target",
                            "requested_by",
                            "requested_at",
                            "decided_by",
                        ]
                        .iter()
                        .map(|k| cell(&a[*k]))
                        .collect()
                    })
                    .collect();
                table(
                    &["ID", "STATE", "ACTION", "TARGET", "BY", "AT", "DECIDED BY"],
                    &rows,
                );
            }
        }
        RemoteCommand::User(UserCommand::Create { name, role }) => {
            let v: Value = c.send("POST", "/users", &json!({"name": name, "role": role}))?;
            if json {
                show(&v);
            } else {
                println!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!("the token of {name} ({role}): shown this once");
            }
        }
        RemoteCommand::User(UserCommand::List) => show(&c.get::<Value>("/users")?),
        RemoteCommand::Audit { limit } => {
            let v: Value = c.get(&format!("/audit?limit={limit}"))?;
            if json {
                show(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        ["time", "user", "action", "target", "outcome"]
                            .iter()
                            .map(|k| cell(&a[*k]))
                            .collect()
                    })
                    .collect();
                table(&["TIME", "USER", "ACTION", "TARGET", "OUTCOME"], &rows);
            }
        }
    }
    Ok(())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn policy(c: &Client, json: bool, cmd: PolicyCommand) -> Result<()> {
    let body = |a: &PolicyArgs| {
        json!({"name": a.name, "schedule": a.schedule, "timezone": a.timezone,
            "keep_last": a.keep_last, "keep_hourly": a.keep_hourly, "keep_daily": a.keep_daily,
            "keep_weekly": a.keep_weekly, "keep_monthly": a.keep_monthly, "keep_yearly": a.keep_yearly})
    };
    let v: Value = match &cmd {
        PolicyCommand::Create(a) => c.send("POST", "/policies", &body(a))?,
        PolicyCommand::Update(a) => c.send("PUT", &format!("/policies/{}", a.name), &body(a))?,
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

fn print_jobs(v: &Value) {
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

fn print_job(j: &Value) {
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
            println!("{k:<13}{}", cell(&j[k]));
        }
    }
    println!("{:<13}{}", "progress", progress(j));
    for l in j["log"].as_array().into_iter().flatten() {
        println!("  {} {}", cell(&l["time"]), cell(&l["line"]));
    }
}

fn wait_job(c: &Client, id: i64) -> Result<Value> {
    loop {
        let j: Value = c.get(&format!("/jobs/{id}"))?;
        if matches!(
            j["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(j);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

fn points(c: &Client, json: bool, vm: Option<&str>, deleted: bool) -> Result<()> {
    let vaults: Value = c.get("/vaults")?;
    let location = vaults[0]["location"].as_str().unwrap_or("").to_string();
    let encrypted = vaults[0]["encrypted"].as_bool().unwrap_or(true);
    let mut manifests: Vec<Manifest> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = format!("/recovery-points?limit=1000&deleted={deleted}");
        if let Some(vm) = vm {
            q.push_str(&format!("&item={vm}"));
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

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn vault(c: &Client, json: bool, cmd: VaultCommand) -> Result<()> {
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
            c.send("POST", &format!("/vaults/{name}/lock"), &json!({}))?
        }
    };
    if json {
        print_json(&v);
    } else if let Some(o) = v.as_object() {
        for (k, val) in o {
            println!("{k:<18}{}", cell(val));
        }
    }
    Ok(())
}
