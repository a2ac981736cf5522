//! The server's half of a host agent's backup (docs/design.md, "The relay data path").
//!
//! A job for a host's VM runs on a server thread like any other job: it holds the VM's
//! backup lock, the new point's indexes and the vault's keys, and it waits while the agent
//! sends what it read. The agent names no object and no point: it claims the base point's
//! chunk at the same position (checked against the base index), sends a chunk's content (the
//! server computes its id with the vault's key), or says a run of chunks is zero. Each
//! position is filled once. Only a commit with every position filled writes a manifest; a
//! job that fails, is cancelled or whose agent goes silent writes none, and what it stored
//! is chunks nothing references, which a later backup reuses or gc removes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use vmvault_api::agent::{AgentJob, AgentJobKind, ProgressReport};
use vmvault_format::{DiskIndex, DiskRecord, Manifest, PointId, PointRetention, TransferStats};
use vmvault_store::{LockGuard, Vault};

use crate::app::App;
use crate::db::ts;
use crate::hosts::HostRow;
use crate::jobs::{Live, Params};
use crate::{Error, Result};

mod data;

/// How long an agent's job may run, on the server's clock, however alive its agent is
/// (docs/design.md: `agent_job_timeout`, 24 h): past it the job fails and its lock goes, so a
/// hostile or stuck agent cannot hold a VM's backups off by sending progress forever.
pub(crate) const AGENT_JOB_HOURS: i64 = 24;

/// How a position of a disk was filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Empty,
    Reused,
    Sent,
    Zero,
}

struct DiskFill {
    name: String,
    format: String,
    index: DiskIndex,
    fill: Vec<Fill>,
    /// The base point's index of the disk of the same name and size, once asked for.
    base: Option<Arc<DiskIndex>>,
    base_record: Option<DiskRecord>,
    stats: TransferStats,
}

struct Begun {
    lock: LockGuard,
    point: PointId,
    began: DateTime<Utc>,
    disks: Vec<DiskFill>,
}

enum Phase {
    Leased,
    Begun(Box<Begun>),
    Committed(Box<Manifest>),
    Failed(String),
}

struct State {
    last_contact: Instant,
    phase: Phase,
}

/// One agent job's server side, shared by its job thread and the agent's requests.
pub struct Relay {
    pub job: i64,
    pub host_id: i64,
    pub host: String,
    pub item: String,
    lease: String,
    live: Arc<Live>,
    vault: Vault,
    retention: PointRetention,
    /// When the agent took the job (the server's clock): the job's time limit counts from it.
    taken: DateTime<Utc>,
    state: Mutex<State>,
    changed: Condvar,
}

/// What a request to a job route must carry.
pub struct Caller<'a> {
    pub host: &'a HostRow,
    pub lease: Option<&'a str>,
}

impl Relay {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the job as failed (a protocol violation, the agent's own failure); what it stored
    /// stays unreferenced.
    fn fail(&self, why: String) -> Error {
        let mut st = self.state();
        if !matches!(st.phase, Phase::Committed(_)) {
            st.phase = Phase::Failed(why.clone());
        }
        drop(st);
        self.changed.notify_all();
        Error::Forbidden(why)
    }

    fn with_begun<T>(&self, f: impl FnOnce(&mut Begun) -> Result<T>) -> Result<T> {
        let mut st = self.state();
        st.last_contact = Instant::now();
        match &mut st.phase {
            Phase::Begun(b) => f(b),
            Phase::Leased => Err(Error::Conflict(
                "the job has not begun (`begin` first)".into(),
            )),
            Phase::Committed(_) => Err(Error::Conflict("the job's point is committed".into())),
            Phase::Failed(why) => Err(Error::Conflict(format!("the job failed: {why}"))),
        }
    }
}

impl App {
    /// A job route's first check, for every kind of job and whether it runs or not: the job
    /// is this host's. Anything else (another host's job, a server job, no job) is 403, the
    /// same for each so that an id says nothing of other hosts' jobs, and audited. The
    /// middleware makes it for every `/agent/jobs/{id}/...` path before routing.
    pub(crate) fn check_job_host(&self, job: i64, host: &HostRow) -> Result<()> {
        let owner: Option<String> = self
            .db
            .conn()
            .query_row("SELECT host FROM jobs WHERE id = ?1", [job], |r| r.get(0))
            .optional()?
            .flatten();
        if owner.as_deref() == Some(host.name.as_str()) {
            return Ok(());
        }
        crate::auth::audit(
            &self.db,
            &format!("host:{}", host.name),
            "agent.job",
            &job.to_string(),
            "denied: not this host's job",
        );
        Err(Error::Forbidden(format!(
            "job {job} is not for host '{}'",
            host.name
        )))
    }

    /// The relay of a running job, if `caller` may work on it: its host, its current lease.
    fn relay_for(&self, job: i64, caller: &Caller<'_>) -> Result<Arc<Relay>> {
        let relay = self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .cloned();
        self.check_job_host(job, caller.host)?;
        let relay = relay
            .filter(|r| r.host_id == caller.host.id)
            .ok_or_else(|| Error::Conflict(format!("job {job} is not running")))?;
        // Compared as BLAKE3 hashes, which compare in constant time.
        let lease_ok = caller
            .lease
            .is_some_and(|l| blake3::hash(l.as_bytes()) == blake3::hash(relay.lease.as_bytes()));
        if !lease_ok {
            return Err(Error::Conflict(format!(
                "job {job}: this lease is not the job's current one (the job was retried or \
                 taken by another agent process)"
            )));
        }
        relay.state().last_contact = Instant::now();
        Ok(relay)
    }

    /// The host's next job whose time has come, leased to the caller; `None` if there is none.
    pub fn take_agent_job(self: &Arc<App>, host: &HostRow) -> Result<Option<AgentJob>> {
        let now = ts(self.now());
        let next: Option<(i64, String, String)> = self
            .db
            .conn()
            .query_row(
                "SELECT id, kind, item FROM jobs j WHERE host = ?1 AND state = 'queued'
                 AND not_before <= ?2 AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.item = j.item
                 AND r.state = 'running') ORDER BY id LIMIT 1",
                params![host.name, now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((id, kind, item)) = next else {
            return Ok(None);
        };
        let job_kind = AgentJobKind::from(kind.as_str());
        if !job_kind.is_known() {
            return Err(Error::Input(format!(
                "job {id} is a {kind} job, which agents do not run"
            )));
        }
        let params: Params = {
            let text: String =
                self.db
                    .conn()
                    .query_row("SELECT params FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
            serde_json::from_str(&text).map_err(|e| Error::Input(e.to_string()))?
        };
        let (retention, scripts) = if job_kind == AgentJobKind::Backup {
            let (policy, scripts): (String, Option<String>) = self.db.conn().query_row(
                "SELECT policy, scripts FROM protected_items WHERE name = ?1",
                [&item],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            (self.point_retention(&params, &policy)?, scripts)
        } else {
            (PointRetention::None, None)
        };
        let took = self.db.conn().execute(
            "UPDATE jobs SET state = 'running', started = ?2, ended = NULL, error = NULL
             WHERE id = ?1 AND state = 'queued'",
            params![id, now],
        )?;
        if took == 0 {
            return Ok(None);
        }
        let live = self.runner.register(id);
        let mut lease = [0u8; 16];
        vmvault_format::random_bytes(&mut lease);
        let lease = hex::encode(lease);
        let leased = self.job_vault(&live).and_then(|vault| match job_kind {
            AgentJobKind::Restore => {
                self.lease_restore(id, host, params, lease.clone(), live.clone(), vault)
            }
            _ => {
                self.lease_backup(
                    id,
                    host,
                    &item,
                    lease.clone(),
                    live.clone(),
                    vault,
                    retention,
                );
                Ok(())
            }
        });
        if let Err(e) = leased {
            // No thread runs the job: it ends here, as a job that could not start.
            self.runner.unregister(id);
            self.job_log(id, &format!("failed: {e}"));
            self.db.conn().execute(
                "UPDATE jobs SET state = 'failed', ended = ?2, error = ?3 WHERE id = ?1",
                params![id, ts(self.now()), e.to_string()],
            )?;
            return Ok(None);
        }
        self.job_log(id, &format!("taken by the agent on host '{}'", host.name));
        let app = self.clone();
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || app.run_job(id, &kind, live))
            .map_err(|e| Error::io("starting a job thread", e))?;
        Ok(Some(AgentJob {
            id,
            kind: job_kind,
            lease,
            vm: item,
            scripts,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    fn lease_backup(
        &self,
        id: i64,
        host: &HostRow,
        item: &str,
        lease: String,
        live: Arc<Live>,
        vault: Vault,
        retention: PointRetention,
    ) {
        let relay = Arc::new(Relay {
            job: id,
            host_id: host.id,
            host: host.name.clone(),
            item: item.to_string(),
            lease,
            live,
            vault,
            retention,
            taken: self.now(),
            state: Mutex::new(State {
                last_contact: Instant::now(),
                phase: Phase::Leased,
            }),
            changed: Condvar::new(),
        });
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, relay);
    }

    /// The job thread of an agent's backup: waits for the commit, a failure, a cancel or the
    /// agent's silence; returns the point.
    pub(crate) fn run_agent_backup(&self, id: i64) -> Result<String> {
        let relay = self
            .relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Input(format!("job {id} was not taken by an agent")))?;
        let result = self.wait_for_agent(&relay);
        // The lock (in a begun phase) goes with the relay: nothing more is written for it.
        let phase = std::mem::replace(&mut relay.state().phase, Phase::Failed("ended".into()));
        self.relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        drop(phase);
        let m = result?;
        self.record_success(&relay.item, m.logical_bytes(), m.stats.bytes_stored);
        self.after_backup(id, &relay.item, &m);
        Ok(m.id.to_hex())
    }

    fn wait_for_agent(&self, relay: &Relay) -> Result<Manifest> {
        let silence = Duration::from_secs(self.cfg.agent_job_silence_secs);
        let mut st = relay.state();
        loop {
            match &st.phase {
                Phase::Committed(m) => return Ok((**m).clone()),
                Phase::Failed(why) => return Err(Error::Agent(why.clone())),
                _ => {}
            }
            if relay.live.cancel.load(Ordering::Relaxed) {
                return Err(Error::Agent("the job was cancelled".into()));
            }
            if st.last_contact.elapsed() > silence {
                let why = format!(
                    "the agent on host '{}' was silent for {} s during the job",
                    relay.host,
                    silence.as_secs()
                );
                st.phase = Phase::Failed(why.clone());
                return Err(Error::Agent(why));
            }
            if self.now() - relay.taken > chrono::Duration::hours(AGENT_JOB_HOURS) {
                let why = format!(
                    "the job ran past the {AGENT_JOB_HOURS} h a job on host '{}' may take",
                    relay.host
                );
                st.phase = Phase::Failed(why.clone());
                return Err(Error::Agent(why));
            }
            st = relay
                .changed
                .wait_timeout(st, Duration::from_millis(250))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn agent_progress(&self, job: i64, caller: &Caller<'_>, p: &ProgressReport) -> Result<()> {
        let relay = self.relay_for(job, caller)?;
        let _ = p;
        relay.changed.notify_all();
        Ok(())
    }

    pub fn agent_log(&self, job: i64, caller: &Caller<'_>, line: &str) -> Result<()> {
        let relay = self.relay_for(job, caller)?;
        let line: String = line
            .chars()
            .take(2000)
            .filter(|c| !c.is_control())
            .collect();
        self.job_log(relay.job, &format!("agent: {line}"));
        Ok(())
    }

    pub fn agent_fail(&self, job: i64, caller: &Caller<'_>, error: &str) -> Result<()> {
        let relay = self.relay_for(job, caller)?;
        let error: String = error
            .chars()
            .take(2000)
            .filter(|c| !c.is_control())
            .collect();
        relay.fail(format!(
            "the agent on host '{}' failed: {error}",
            relay.host
        ));
        Ok(())
    }
}

/// The relays of the agent jobs running now, by job id.
pub type Relays = Mutex<HashMap<i64, Arc<Relay>>>;
