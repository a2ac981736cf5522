//! The commands that work against a vault server (`--server URL` or `VMVAULT_SERVER`):
//! policies, protect/unprotect, on-demand backups, jobs, points, soft delete, restores,
//! hosts and their VMs (crates/cli/src/hosts_cmd.rs), and the vault's admin settings. Output
//! matches the local commands where both exist.

use std::path::PathBuf;

use anyhow::Result;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use vmvault_api::{
    approvals, audit, items, jobs, points as api_points, users, Approval, AuditEntry, AuditQuery,
    BackupRequest, Cancelled, Decision, Deleted, Job, JobDetail, JobQuery, JobRef, JobState,
    NewToken, NewUser, PointRow, RestoreRequest, Role, User,
};

use crate::exit::InputError;
use crate::hosts_cmd::{self, HostCommand};
use crate::output::{print_json, table};
use crate::remote::{route, ApiError, Client};
use crate::remote_show::{
    cell, emit, find_point, follow_job, points, policy, print_job, print_jobs, vault,
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
    /// Put a VM under a policy: HOST/VM, a VM a host's agent found (`vms` lists them), or
    /// a VM description file (TOML) whose disks are on the server's host. An existing file,
    /// or a name ending in .toml, is read as a description; `--host HOST VM` names a found VM
    /// whatever files there are.
    Protect {
        /// HOST/VM, or a VM description file; with --host, the VM's name.
        #[arg(value_name = "HOST/VM|FILE")]
        target: String,
        /// The host whose agent found the VM: the argument is then the VM's name.
        #[arg(long)]
        host: Option<String>,
        /// The policy whose schedule and retention apply.
        #[arg(long)]
        policy: String,
        /// A found VM's pre/post scripts file (TOML), kept by the server and sent to the
        /// agent with each job.
        #[arg(long, value_name = "FILE")]
        scripts: Option<PathBuf>,
    },
    /// Stop backing a VM up (its recovery points stay).
    Unprotect { name: String },
    /// Back a protected VM up now; prints the job id.
    Backup {
        /// The protected VM's name, or HOST/VM (checked to be that host's VM).
        #[arg(value_name = "NAME|HOST/VM")]
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
        /// Where on the server's host, or with --to-host on that host (a new folder; with
        /// --disk, a new file).
        #[arg(long, visible_alias = "target", value_name = "PATH")]
        to: String,
        /// Restore on this enrolled host, by its agent (under its restore_roots).
        #[arg(long, value_name = "HOST")]
        to_host: Option<String>,
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
    /// Hosts: add one (a one-time enrollment code) or remove one (its key revoked).
    #[command(subcommand)]
    Host(HostCommand),
    /// The hosts, their agents' versions and last heartbeats.
    Hosts,
    /// Agent releases: add one (signed by the server, or with an offline key's signature).
    #[command(subcommand)]
    Release(crate::release_cmd::ReleaseCommand),
    /// The agent releases the server keeps.
    Releases,
    /// The VMs the hosts' agents found: running or stopped, protected or not.
    Vms {
        /// Only this host's.
        #[arg(long)]
        host: Option<String>,
    },
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
    /// shortened. Cannot be undone. On a bucket with S3 Object Lock the storage holds every
    /// object too; run again with a longer --hold-days to lengthen that hold.
    Lock {
        #[arg(long)]
        yes_i_understand_this_is_irreversible: bool,
        /// How long the storage holds each object after it is written or renewed (S3 Object
        /// Lock, compliance mode; 30 when not given); can be made longer later, never shorter.
        #[arg(long, value_name = "DAYS",
              value_parser = clap::value_parser!(u32).range(1..=vmvault_format::MAX_HOLD_DAYS as i64))]
        hold_days: Option<u32>,
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
        #[arg(long, value_parser = role_parser())]
        role: Role,
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

/// The roles by name, listed in `--help` and in the refusal of any other word.
fn role_parser() -> impl TypedValueParser<Value = Role> {
    PossibleValuesParser::new(Role::ALL.map(Role::as_str))
        .map(|s| s.parse::<Role>().expect("a role the parser lists"))
}

/// Whether this command line is meant for a server: `--server` given, or VMVAULT_SERVER
/// set and the command not one that only exists locally.
pub fn wanted(args: &[String]) -> bool {
    let rest = &args[1.min(args.len())..];
    // The agent's commands run on a host and take --trust-fingerprint of their own.
    if rest
        .iter()
        .find(|a| !a.starts_with('-'))
        .is_some_and(|c| c == "agent")
    {
        return false;
    }
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
        "host",
        "hosts",
        "vms",
    ];
    rest.iter()
        .find(|a| !a.starts_with('-'))
        .is_some_and(|c| REMOTE.contains(&c.as_str()))
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
        let file = std::path::Path::new(name.as_str()).is_file();
        if name.ends_with(".toml") || (file && hosts_cmd::host_vm(name).is_none()) {
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
    match cli.command {
        RemoteCommand::Policy(p) => policy(&c, json, p)?,
        RemoteCommand::Protect {
            target,
            host,
            policy,
            scripts,
        } => hosts_cmd::protect(&c, json, &target, host.as_deref(), policy, scripts)?,
        RemoteCommand::Unprotect { name } => {
            let () = c.delete(&route(items::item_path(&name))?)?;
            eprintln!("{name} is no longer protected; its recovery points stay");
        }
        RemoteCommand::Backup {
            name,
            keep_until,
            wait,
        } => {
            let name = hosts_cmd::backup_item(&c, &name)?;
            let path = route(items::backup_path(&name))?;
            let r: JobRef = c.send("POST", &path, &BackupRequest { keep_until })?;
            if wait {
                // As a local backup does: the new point's id.
                emit(json, &follow_job(&c, r.job)?, |d| {
                    outln!("{}", cell(&d.job.point));
                });
            } else {
                emit(json, &r, |r| {
                    outln!("{}", r.job);
                    eprintln!(
                        "backup job {} queued; `vmvault job show {}` follows it",
                        r.job, r.job
                    );
                });
            }
        }
        RemoteCommand::Jobs {
            running,
            failed,
            limit,
        } => {
            let state = if running {
                Some(JobState::Running)
            } else if failed {
                Some(JobState::Failed)
            } else {
                None
            };
            let q = JobQuery {
                state,
                limit: Some(limit),
                before: None,
            };
            let list: Vec<Job> = c.get(&route(jobs::list_path(&q))?)?;
            emit(json, &list, |l| print_jobs(l));
        }
        RemoteCommand::Job(JobCommand::Show { id }) => {
            let d: JobDetail = c.get(&jobs::job_path(id))?;
            emit(json, &d, print_job);
        }
        RemoteCommand::Job(JobCommand::Cancel { id }) => {
            let r: Cancelled = c.post(&jobs::cancel_path(id))?;
            emit(json, &r, |r| outln!("job {}: {}", r.id, r.state));
        }
        RemoteCommand::Points { vm, deleted } => points(&c, json, vm.as_deref(), deleted)?,
        RemoteCommand::Point(PointCommand::Delete { point }) => {
            let p = find_point(&c, &point)?;
            let d: Deleted = c.delete(&route(api_points::point_path(&p.id))?)?;
            emit(json, &d, |d| {
                outln!(
                    "{}@{} deleted; restorable and undeletable until {}",
                    p.vm,
                    short(&p.id),
                    d.purge_after
                );
            });
        }
        RemoteCommand::Point(PointCommand::Undelete { point }) => {
            // A deleted point is named by its id (VM@ID or the id alone).
            let id = point.split_once('@').map_or(point.as_str(), |(_, id)| id);
            let row: PointRow = c.post(&route(api_points::undelete_path(id))?)?;
            emit(json, &row, |r| outln!("{}@{} is back", r.vm, short(&r.id)));
        }
        RemoteCommand::Restore {
            point,
            to,
            to_host,
            disk,
            format,
            force,
            wait,
        } => {
            // `HOST/VM@...` names the VM as `vms` lists it; its points are the VM's.
            let point = match point.split_once('/') {
                Some((_, rest)) if !rest.is_empty() => rest.to_string(),
                _ => point,
            };
            let req = RestoreRequest {
                point,
                target: to,
                overwrite: force,
                disk,
                format,
                host: to_host,
            };
            let r: JobRef = c.send("POST", api_points::RESTORES, &req)?;
            if wait {
                let d = follow_job(&c, r.job)?;
                if json {
                    print_json(&d);
                }
            } else {
                emit(json, &r, |r| outln!("{}", r.job));
            }
        }
        RemoteCommand::Vault(cmd) => vault(&c, json, cmd)?,
        RemoteCommand::Approval(ApprovalCommand::List) => {
            let list: Vec<Approval> = c.get(approvals::COLLECTION)?;
            emit(json, &list, |l| approval_table(l));
        }
        RemoteCommand::Approval(ApprovalCommand::Approve { id }) => {
            let a: Approval = c.send(
                "POST",
                &approvals::approval_path(id),
                &Decision { approve: true },
            )?;
            print_json(&a);
        }
        RemoteCommand::Approval(ApprovalCommand::Reject { id }) => {
            let a: Approval = c.send(
                "POST",
                &approvals::approval_path(id),
                &Decision { approve: false },
            )?;
            print_json(&a);
        }
        RemoteCommand::User(UserCommand::Create { name, role }) => {
            let req = NewUser {
                name: name.clone(),
                role,
            };
            let t: NewToken = c
                .send("POST", users::COLLECTION, &req)
                .inspect_err(|e| pending_token(e, json, &name))?;
            emit(json, &t, |t| {
                outln!("{}", t.token);
                eprintln!("the token of {name} ({role}): shown this once");
            });
        }
        RemoteCommand::User(UserCommand::Token { name }) => {
            let t: NewToken = c
                .post(&route(users::tokens_path(&name))?)
                .inspect_err(|e| pending_token(e, json, &name))?;
            // As `user create` prints it: with --json the server's answer, user and token.
            emit(json, &t, |t| outln!("{}", t.token));
        }
        RemoteCommand::User(UserCommand::Revoke { name }) => {
            let () = c.delete(&route(users::tokens_path(&name))?)?;
            eprintln!("every token of {name} is revoked");
        }
        RemoteCommand::User(UserCommand::List) => {
            let list: Vec<User> = c.get(users::COLLECTION)?;
            emit(json, &list, |l| {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|u| {
                        let roles: Vec<String> = u
                            .roles
                            .iter()
                            .map(|(vault, role)| format!("{role} on {vault}"))
                            .collect();
                        vec![u.name.clone(), roles.join(", ")]
                    })
                    .collect();
                table(&["USER", "ROLES"], &rows);
            });
        }
        RemoteCommand::Host(cmd) => hosts_cmd::host(&c, &cli.server, json, cmd)?,
        RemoteCommand::Hosts => hosts_cmd::hosts(&c, json)?,
        RemoteCommand::Release(cmd) => crate::release_cmd::remote(&c, json, cmd)?,
        RemoteCommand::Releases => crate::release_cmd::list(&c, json)?,
        RemoteCommand::Vms { host } => hosts_cmd::vms(&c, json, host.as_deref())?,
        RemoteCommand::Audit { limit } => {
            let q = AuditQuery {
                limit: Some(limit),
                before: None,
            };
            let list: Vec<AuditEntry> = c.get(&route(audit::list_path(&q))?)?;
            emit(json, &list, |l| {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|a| {
                        vec![
                            a.time.clone(),
                            a.user.clone(),
                            a.action.clone(),
                            a.target.clone(),
                            a.outcome.clone(),
                        ]
                    })
                    .collect();
                table(&["TIME", "USER", "ACTION", "TARGET", "OUTCOME"], &rows);
            });
        }
    }
    Ok(())
}

/// A point's id as the local commands show it: its first 8 digits.
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// A token minted by a request that waits for a second admin comes only in the 202 answer,
/// and works once approved: print it now, or it is lost. With --json it is the object a
/// minted token prints as (`{"user": ..., "token": ...}`), not a bare line.
fn pending_token(e: &anyhow::Error, json: bool, user: &str) {
    if let Some(t) = e.downcast_ref::<ApiError>().and_then(|a| a.token.as_ref()) {
        let minted = NewToken {
            user: user.to_string(),
            token: t.clone(),
        };
        emit(json, &minted, |m| outln!("{}", m.token));
        eprintln!("vmvault: the token above works once the request is approved; shown this once");
    }
}

fn approval_table(list: &[Approval]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                a.state.to_string(),
                a.action.clone(),
                a.target.clone(),
                a.requested_by.clone(),
                a.requested_at.clone(),
                cell(&a.decided_by),
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "ACTION", "TARGET", "BY", "AT", "DECIDED BY"],
        &rows,
    );
}
