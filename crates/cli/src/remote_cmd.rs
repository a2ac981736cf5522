//! The commands that work against a vault server (`--server URL` or `VMVAULT_SERVER`):
//! policies, protect/unprotect, on-demand backups, jobs, points, soft delete, restores, and
//! the vault's admin settings. Output matches the local commands where both exist.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::exit::InputError;
use crate::output::{print_json, table};
use crate::remote::Client;
use crate::remote_show::{
    cell, follow_job, points, policy, print_job, print_jobs, urlencode, vault,
};

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
        /// The VM's description (TOML); its disks are on the server's host.
        description: PathBuf,
        /// The policy whose schedule and retention apply.
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
        /// Follow the job (progress, log lines) and exit with its outcome: 0, or the code
        /// the same failure has locally.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs running now.
        #[arg(long, conflicts_with = "failed")]
        running: bool,
        /// Only jobs that failed.
        #[arg(long)]
        failed: bool,
        /// At most this many.
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
    /// Restore a point (VM@latest, VM@ID, VM@TIME, VM) on the server's host: the whole VM
    /// into a new folder, or with --disk one disk into a new image file.
    Restore {
        point: String,
        /// Where on the server's host (a new folder; with --disk, a new file).
        #[arg(long, visible_alias = "target", value_name = "PATH")]
        to: String,
        /// One disk only, by its name in the VM description.
        #[arg(long, value_name = "NAME")]
        disk: Option<String>,
        /// The image format to write (raw, qcow2, vhd, vhdx, vmdk); default: each disk's own.
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// Write over what exists (admins only).
        #[arg(long)]
        force: bool,
        /// Follow the job (progress, log lines) and exit with its outcome.
        #[arg(long)]
        wait: bool,
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
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    Create(PolicyArgs),
    /// Change a policy's schedule or retention (shortening may need approval).
    /// Change only the fields given; the others keep their values.
    Update(PolicyUpdateArgs),
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Args)]
pub struct PolicyArgs {
    pub name: String,
    /// `hourly`, `every N hours`, `daily HH:MM[,HH:MM]`, `weekly mon,thu HH:MM`.
    #[arg(long)]
    pub schedule: String,
    /// An IANA time zone (Europe/Berlin) for the schedule and the retention's periods.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// Keep the newest N scheduled points.
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest point of each of the last N hours.
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest point of each of the last N days.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest point of each of the last N weeks.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest point of each of the last N months.
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest point of each of the last N years.
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: u32,
}

#[derive(Args)]
pub struct PolicyUpdateArgs {
    pub name: String,
    /// `hourly`, `every N hours`, `daily HH:MM[,HH:MM]`, `weekly mon,thu HH:MM`.
    #[arg(long)]
    pub schedule: Option<String>,
    /// An IANA time zone (Europe/Berlin) for the schedule and the retention's periods.
    #[arg(long)]
    pub timezone: Option<String>,
    /// Keep the newest N scheduled points.
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N hours.
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the last N days.
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N weeks.
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months.
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the last N years.
    #[arg(long)]
    pub keep_yearly: Option<u32>,
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
pub enum VaultCommand {
    Show,
    /// Change soft delete days (1-180) or require a second admin for destructive actions.
    Set {
        /// Days a deleted point stays restorable (1-180; a locked vault's only grows).
        #[arg(long)]
        soft_delete_days: Option<u32>,
        /// Destructive and privilege changes wait for a second admin (true or false).
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
        /// What the user may do; each role includes the ones before it.
        #[arg(long, value_parser = ["reader", "operator", "contributor", "admin"])]
        role: String,
    },
    List,
    /// A new token for a user (shown once).
    Token {
        name: String,
    },
    /// Revoke every token of a user.
    Revoke {
        name: String,
    },
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

/// The point a name means, as the server resolves it (the local grammar: VM@latest, VM@ID,
/// VM@TIME, VM, or an id).
fn find_point(c: &Client, spec: &str) -> Result<Value> {
    c.get(&format!("/recovery-points/{}", urlencode(spec)))
}

/// Runs a command against the server. A request that a second admin must approve ends as
/// an error of class `Pending` (exit 7): not a failure, but not done either.
pub fn run(cli: RemoteCli) -> Result<()> {
    run_command(cli)
}

fn run_command(cli: RemoteCli) -> Result<()> {
    if let RemoteCommand::Backup { name, .. } = &cli.command {
        // The same word must not mean "back up this file" here and "the item named so"
        // there: a description file is refused, saying which form the server takes.
        if name.ends_with(".toml") || std::path::Path::new(name.as_str()).is_file() {
            return Err(InputError(format!(
                "{name} is a VM description file, but a backup through the server ({}) \
                 takes the name of a protected VM: protect it first (`vmvault protect \
                 {name} --policy NAME`) and back it up by its name, or leave out \
                 --server/VMVAULT_SERVER to back it up here",
                cli.server
            ))
            .into());
        }
    }
    let c = Client::connect(
        &cli.server,
        cli.token.clone(),
        cli.trust_fingerprint.as_deref(),
    )?;
    let json = cli.json;
    let show = |v: &Value| print_json(v);
    // `--json` prints the server's answer as it is; otherwise `human` says it in words.
    let emit = |v: &Value, human: &dyn Fn(&Value)| {
        if json {
            print_json(v)
        } else {
            human(v)
        }
    };
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
            emit(&v, &|v| {
                outln!(
                    "{} is protected by policy {}",
                    v["name"].as_str().unwrap_or(""),
                    policy
                );
            });
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
                let j = follow_job(&c, id)?;
                if json {
                    show(&j);
                } else {
                    // As a local backup does: the new point's id.
                    outln!("{}", cell(&j["point"]));
                }
            } else if json {
                show(&v);
            } else {
                outln!("{id}");
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
            emit(&v, &print_jobs);
        }
        RemoteCommand::Job(JobCommand::Show { id }) => {
            let v: Value = c.get(&format!("/jobs/{id}"))?;
            emit(&v, &print_job);
        }
        RemoteCommand::Job(JobCommand::Cancel { id }) => {
            let v: Value = c.send("POST", &format!("/jobs/{id}/cancel"), &json!({}))?;
            emit(&v, &|v| {
                outln!("job {id}: {}", v["state"].as_str().unwrap_or(""));
            });
        }
        RemoteCommand::Points { vm, deleted } => points(&c, json, vm.as_deref(), deleted)?,
        RemoteCommand::Point(PointCommand::Delete { point }) => {
            let p = find_point(&c, &point)?;
            let id = p["id"].as_str().unwrap_or("");
            let v: Value = c.delete(&format!("/recovery-points/{id}"))?;
            if json {
                show(&v);
            } else {
                outln!(
                    "{}@{} deleted; restorable and undeletable until {}",
                    p["vm"].as_str().unwrap_or(""),
                    &id[..id.len().min(8)],
                    v["purge_after"].as_str().unwrap_or("?")
                );
            }
        }
        RemoteCommand::Point(PointCommand::Undelete { point }) => {
            // A deleted point is named by its id (VM@ID or the id alone).
            let id = point.split_once('@').map_or(point.as_str(), |(_, id)| id);
            let v: Value = c.send(
                "POST",
                &format!("/recovery-points/{}/undelete", urlencode(id)),
                &json!({}),
            )?;
            emit(&v, &|v| {
                outln!(
                    "{}@{} is back",
                    v["vm"].as_str().unwrap_or(""),
                    &id[..id.len().min(8)]
                );
            });
        }
        RemoteCommand::Restore {
            point,
            to,
            disk,
            format,
            force,
            wait,
        } => {
            let v: Value = c.send(
                "POST",
                "/restores",
                &json!({"point": point, "target": to, "overwrite": force,
                        "disk": disk, "format": format}),
            )?;
            let id = v["job"].as_i64().unwrap_or(0);
            if wait {
                let j = follow_job(&c, id)?;
                if json {
                    show(&j);
                }
            } else {
                emit(&v, &|v| {
                    outln!("{}", v["job"]);
                });
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
            emit(&v, &|v| {
                outln!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!("the token of {name} ({role}): shown this once");
            });
        }
        RemoteCommand::User(UserCommand::Token { name }) => {
            let v: Value = c.send("POST", &format!("/users/{name}/tokens"), &json!({}))?;
            outln!("{}", v["token"].as_str().unwrap_or(""));
        }
        RemoteCommand::User(UserCommand::Revoke { name }) => {
            let _: Value = c.delete(&format!("/users/{name}/tokens"))?;
            eprintln!("every token of {name} is revoked");
        }
        RemoteCommand::User(UserCommand::List) => {
            let v: Value = c.get("/users")?;
            emit(&v, &|v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| {
                        let roles: Vec<String> = u["roles"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|r| format!("{} on {}", cell(&r[1]), cell(&r[0])))
                            .collect();
                        vec![cell(&u["name"]), roles.join(", ")]
                    })
                    .collect();
                table(&["USER", "ROLES"], &rows);
            });
        }
        RemoteCommand::Audit { limit } => {
            let v: Value = c.get(&format!("/audit?limit={limit}"))?;
            emit(&v, &|v| {
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
            });
        }
    }
    Ok(())
}
