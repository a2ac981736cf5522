//! What the server commands print: tables like the local commands', JSON with `--json`.
//!
//! `--json` prints the API type the answer was read into, written back: the fields, names
//! and order the server sent (crates/api holds both sides' definition).

use anyhow::{Context, Result};
use serde::Serialize;
use vmvault_api::{
    jobs, points as api_points, policies, vaults, Job, JobDetail, JobState, PointPage, PointQuery,
    PointRow, Policy, VaultInfo, VaultSettings,
};
use vmvault_format::Manifest;

use crate::exit::InputError;
use crate::output::{bytes, print_json, table};
use crate::remote::{route, Client};
use crate::remote_cmd::{PolicyArgs, PolicyCommand, VaultCommand};

/// A value that may be absent, as a table cell: `-` for none.
pub fn cell<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), T::to_string)
}

/// The answer as JSON with `--json`, else said in words by `human`.
pub fn emit<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) {
    if json {
        print_json(v)
    } else {
        human(v)
    }
}

fn new_policy(a: &PolicyArgs) -> Policy {
    Policy {
        name: a.name.clone(),
        schedule: a.schedule.clone(),
        timezone: a.timezone.clone(),
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
    }
}

pub fn policy(c: &Client, json: bool, cmd: PolicyCommand) -> Result<()> {
    let one: Policy = match &cmd {
        PolicyCommand::Create(a) => c.send("POST", policies::COLLECTION, &new_policy(a))?,
        PolicyCommand::Update(a) => {
            // The server's PUT replaces the policy: start from what it is now.
            let path = route(policies::policy_path(&a.name))?;
            let mut p: Policy = c.get(&path)?;
            let text = [
                (&mut p.schedule, &a.schedule),
                (&mut p.timezone, &a.timezone),
            ];
            for (field, given) in text {
                if let Some(v) = given {
                    field.clone_from(v);
                }
            }
            let counts = [
                (&mut p.keep_last, a.keep_last),
                (&mut p.keep_hourly, a.keep_hourly),
                (&mut p.keep_daily, a.keep_daily),
                (&mut p.keep_weekly, a.keep_weekly),
                (&mut p.keep_monthly, a.keep_monthly),
                (&mut p.keep_yearly, a.keep_yearly),
            ];
            for (field, given) in counts {
                if let Some(v) = given {
                    *field = v;
                }
            }
            p.name.clone_from(&a.name);
            c.send("PUT", &path, &p)?
        }
        PolicyCommand::List => {
            let all: Vec<Policy> = c.get(policies::COLLECTION)?;
            emit(json, &all, |all| policy_table(all));
            return Ok(());
        }
        PolicyCommand::Show { name } => c.get(&route(policies::policy_path(name))?)?,
        PolicyCommand::Delete { name } => {
            let () = c.delete(&route(policies::policy_path(name))?)?;
            eprintln!("policy {name} deleted");
            return Ok(());
        }
    };
    emit(json, &one, |p| policy_table(std::slice::from_ref(p)));
    Ok(())
}

fn policy_table(list: &[Policy]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let counts = [
                ("last", p.keep_last),
                ("hourly", p.keep_hourly),
                ("daily", p.keep_daily),
                ("weekly", p.keep_weekly),
                ("monthly", p.keep_monthly),
                ("yearly", p.keep_yearly),
            ];
            let keep: Vec<String> = counts
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            vec![
                p.name.clone(),
                p.schedule.clone(),
                p.timezone.clone(),
                keep.join(" "),
            ]
        })
        .collect();
    table(&["NAME", "SCHEDULE", "TIMEZONE", "KEEP"], &rows);
}

pub fn print_jobs(list: &[Job]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                cell(&j.item),
                j.state.to_string(),
                cell(&j.started),
                cell(&j.ended),
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

fn progress(j: &Job) -> String {
    let mut s = format!("{}/{}", bytes(j.bytes_done), bytes(j.bytes_total));
    if let Some(r) = j.rate {
        s.push_str(&format!(" {}/s", bytes(r as u64)));
    }
    if let Some(e) = j.eta_secs {
        s.push_str(&format!(" ETA {}s", e.round()));
    }
    s
}

pub fn print_job(d: &JobDetail) {
    let j = &d.job;
    let fields = [
        ("id", Some(j.id.to_string())),
        ("kind", Some(j.kind.clone())),
        ("item", j.item.clone()),
        ("state", Some(j.state.to_string())),
        ("attempt", Some(j.attempt.to_string())),
        ("requested_by", Some(j.requested_by.clone())),
        ("created", Some(j.created.clone())),
        ("started", j.started.clone()),
        ("ended", j.ended.clone()),
        ("point", j.point.clone()),
        ("error", j.error.clone()),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            outln!("{k:<13}{v}");
        }
    }
    outln!("{:<13}{}", "progress", progress(j));
    for l in &d.log {
        outln!("  {} {}", l.time, l.line);
    }
}

/// A server job that did not succeed, with the class of its error as the server gave it:
/// the CLI exits as the same failure would locally.
#[derive(Debug)]
pub struct JobEnded {
    pub id: i64,
    pub state: JobState,
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
        if self.state == JobState::Cancelled {
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
pub fn follow_job(c: &Client, id: i64) -> Result<JobDetail> {
    use vmvault_engine::Progress;
    let bar = crate::output::Bar::new();
    let (mut said, mut total) = (0usize, 0u64);
    let mut done = 0u64;
    loop {
        let d: JobDetail = c.get(&jobs::job_path(id))?;
        for l in d.log.iter().skip(said) {
            bar.message(&format!("job {id}: {}", l.line));
        }
        said = said.max(d.log.len());
        let j = &d.job;
        if j.bytes_total != total && j.bytes_total > 0 {
            bar.start("job", j.bytes_total);
            bar.advance(j.bytes_done);
            total = j.bytes_total;
        } else if j.bytes_done > done {
            bar.advance(j.bytes_done - done);
        }
        done = j.bytes_done;
        if j.ended() {
            bar.finish();
            if j.state == JobState::Succeeded {
                return Ok(d);
            }
            return Err(JobEnded {
                id,
                state: j.state.clone(),
                error: j.error.clone().unwrap_or_default(),
                code: j.error_code.clone(),
            }
            .into());
        }
        // Often enough that a script waiting on a job loses little time after it ends; one
        // small indexed read on the server each time.
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The one vault a server keeps.
fn the_vault(c: &Client) -> Result<VaultInfo> {
    let all: Vec<VaultInfo> = c.get(vaults::COLLECTION)?;
    all.into_iter().next().context("the server lists no vault")
}

pub fn points(c: &Client, json: bool, vm: Option<&str>, deleted: bool) -> Result<()> {
    let v = the_vault(c)?;
    let manifests = all_points(c, vm, deleted)?;
    // A VM the vault has no point of, live or deleted, is most likely a typo: said as the local
    // `points` says it, not shown as an empty table.
    if let Some(vm) = vm {
        if manifests.is_empty() && all_points(c, Some(vm), !deleted)?.is_empty() {
            let mut known: Vec<String> = all_points(c, None, false)?
                .into_iter()
                .chain(all_points(c, None, true)?)
                .map(|m| m.vm)
                .collect();
            known.sort_unstable();
            known.dedup();
            return Err(InputError(format!(
                "no recovery point of VM {vm:?} in {}{}",
                v.location,
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (its VMs: {})", known.join(", "))
                }
            ))
            .into());
        }
    }
    crate::points::show(
        json,
        v.location,
        v.encrypted,
        manifests.iter().collect(),
        &[],
    );
    Ok(())
}

/// Every point the server lists (of `vm`, live or soft-deleted), page by page.
fn all_points(c: &Client, vm: Option<&str>, deleted: bool) -> Result<Vec<Manifest>> {
    let mut manifests = Vec::new();
    let mut q = PointQuery {
        item: vm.map(str::to_string),
        limit: Some(1000),
        cursor: None,
        deleted,
    };
    loop {
        let page: PointPage = c.get(&route(api_points::list_path(&q))?)?;
        for p in &page.items {
            manifests.push(p.read_manifest().context("a manifest from the server")?);
        }
        match page.next_cursor {
            Some(n) => q.cursor = Some(n),
            None => return Ok(manifests),
        }
    }
}

/// The point a name means, as the server resolves it (the local grammar: VM@latest, VM@ID,
/// VM@TIME, VM, or an id).
pub fn find_point(c: &Client, spec: &str) -> Result<PointRow> {
    c.get(&route(api_points::point_path(spec))?)
}

pub fn vault(c: &Client, json: bool, cmd: VaultCommand) -> Result<()> {
    let current = the_vault(c)?;
    let v: VaultInfo = match cmd {
        VaultCommand::Show => current,
        VaultCommand::Set {
            soft_delete_days,
            require_approval,
        } => c.send(
            "PATCH",
            &route(vaults::vault_path(&current.name))?,
            &VaultSettings {
                soft_delete_days,
                require_approval,
            },
        )?,
        VaultCommand::Lock {
            yes_i_understand_this_is_irreversible,
            hold_days,
        } => {
            if !yes_i_understand_this_is_irreversible {
                return Err(InputError(
                    "locking a vault cannot be undone: pass --yes-i-understand-this-is-irreversible".into(),
                )
                .into());
            }
            c.send(
                "POST",
                &route(vaults::lock_path(&current.name))?,
                &vaults::LockRequest { hold_days },
            )?
        }
    };
    emit(json, &v, print_vault);
    Ok(())
}

fn print_vault(v: &VaultInfo) {
    // By name, as `vault show` has always listed them.
    let fields = [
        ("bytes_stored", v.bytes_stored.to_string()),
        ("chunk_size", v.chunk_size.to_string()),
        ("encrypted", v.encrypted.to_string()),
        ("location", v.location.clone()),
        ("locked_at", cell(&v.locked_at)),
        ("name", v.name.clone()),
        ("recovery_points", v.recovery_points.to_string()),
        ("require_approval", v.require_approval.to_string()),
        ("schema_version", v.schema_version.to_string()),
        ("soft_delete_days", v.soft_delete_days.to_string()),
        ("storage_lock", v.storage_lock.clone()),
    ];
    for (k, val) in fields {
        outln!("{k:<18}{val}");
    }
}
