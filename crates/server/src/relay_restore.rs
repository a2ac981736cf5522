//! The server's half of a restore on a host (docs/design.md, "The relay data path"): the
//! agent, which has no vault key, asks for the job's point's chunks by disk and position; the
//! server opens each (tag, decompression, digest: as any restore does) and sends it, zstd
//! compressed for the wire. Only the job's point, only while the job runs, only the job's
//! host with the job's current lease.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmvault_api::agent::{put_frame, RestorePlan, RAW, ZERO, ZSTD};
use vmvault_format::{DiskIndex, Manifest};
use vmvault_store::Vault;

use crate::app::App;
use crate::jobs::{Live, Params};
use crate::relay::Caller;
use crate::{Error, Result};

pub struct RestoreRelay {
    pub job: i64,
    pub host_id: i64,
    pub host: String,
    lease: String,
    live: Arc<Live>,
    vault: Vault,
    manifest: Manifest,
    params: Params,
    indexes: Mutex<HashMap<usize, Arc<DiskIndex>>>,
    /// When the agent took the job (the server's clock).
    taken: chrono::DateTime<chrono::Utc>,
    state: Mutex<(Instant, Option<std::result::Result<(), String>>)>,
    changed: Condvar,
}

/// The restore relays of the agent jobs running now, by job id.
pub type RestoreRelays = Mutex<HashMap<i64, Arc<RestoreRelay>>>;

impl RestoreRelay {
    fn end(&self, outcome: std::result::Result<(), String>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1.get_or_insert(outcome);
        drop(st);
        self.changed.notify_all();
    }

    fn touch(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = Instant::now();
    }
}

impl App {
    /// Leases a queued restore job to its host's agent (`take_agent_job` found it).
    pub(crate) fn lease_restore(
        self: &Arc<App>,
        id: i64,
        host: &crate::hosts::HostRow,
        params: Params,
        lease: String,
        live: Arc<Live>,
        vault: Vault,
    ) -> Result<()> {
        let point = params
            .point
            .as_deref()
            .ok_or_else(|| Error::Input("a restore names no point".into()))?;
        let pid = point
            .parse()
            .map_err(|_| Error::Input(format!("'{point}' is not a point id")))?;
        let manifest = vault.load_manifest(&pid)?;
        let total: u64 = manifest.disks.iter().map(|d| d.size).sum();
        live.total.store(total, Ordering::Relaxed);
        let relay = Arc::new(RestoreRelay {
            job: id,
            host_id: host.id,
            host: host.name.clone(),
            lease,
            live,
            vault,
            manifest,
            params,
            indexes: Mutex::new(HashMap::new()),
            taken: self.now(),
            state: Mutex::new((Instant::now(), None)),
            changed: Condvar::new(),
        });
        self.restore_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, relay);
        Ok(())
    }

    pub(crate) fn is_restore_relay(&self, job: i64) -> bool {
        self.restore_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&job)
    }

    fn restore_relay_for(&self, job: i64, caller: &Caller<'_>) -> Result<Arc<RestoreRelay>> {
        let relay = self
            .restore_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .cloned();
        let Some(relay) = relay else {
            return Err(Error::Conflict(format!("job {job} is not running")));
        };
        if relay.host_id != caller.host.id {
            crate::auth::audit(
                &self.db,
                &format!("host:{}", caller.host.name),
                "agent.job",
                &job.to_string(),
                "denied: not this host's job",
            );
            return Err(Error::Forbidden(format!(
                "job {job} is not for host '{}'",
                caller.host.name
            )));
        }
        let lease_ok = caller
            .lease
            .is_some_and(|l| blake3::hash(l.as_bytes()) == blake3::hash(relay.lease.as_bytes()));
        if !lease_ok {
            return Err(Error::Conflict(format!(
                "job {job}: this lease is not the job's current one"
            )));
        }
        relay.touch();
        Ok(relay)
    }

    pub fn agent_restore_plan(&self, job: i64, caller: &Caller<'_>) -> Result<RestorePlan> {
        let relay = self.restore_relay_for(job, caller)?;
        let manifest =
            serde_json::to_value(&relay.manifest).map_err(|e| Error::Input(e.to_string()))?;
        Ok(RestorePlan {
            manifest,
            target: relay.params.target.clone().unwrap_or_default(),
            disk: relay.params.disk.clone(),
            format: relay.params.format.clone(),
            overwrite: relay.params.overwrite,
        })
    }

    /// One chunk of the job's point, as one frame.
    pub fn agent_restore_chunk(
        &self,
        job: i64,
        caller: &Caller<'_>,
        disk: usize,
        position: u64,
    ) -> Result<Vec<u8>> {
        let relay = self.restore_relay_for(job, caller)?;
        let record = relay
            .manifest
            .disks
            .get(disk)
            .ok_or_else(|| Error::NotFound(format!("the point has no disk {disk}")))?;
        let cached = relay
            .indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&disk)
            .cloned();
        let index = match cached {
            Some(i) => i,
            None => {
                let i = Arc::new(relay.vault.load_index(&record.index, record.size)?);
                relay
                    .indexes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(disk, i.clone());
                i
            }
        };
        let digest = index
            .chunks
            .get(position as usize)
            .ok_or_else(|| Error::NotFound(format!("disk {disk} has no chunk {position}")))?;
        let len = index.chunk_range(position as usize).1;
        let mut out = Vec::new();
        if digest.is_zero_chunk() {
            put_frame(&mut out, position, ZERO, len as u32, &[]);
        } else {
            let mut reader = relay.vault.chunk_reader();
            let data = reader.read(digest, len)?;
            // Level 1: the wire's compression must cost less than the bytes it saves.
            let packed = zstd::bulk::compress(data, 1).map_err(|e| Error::io("compressing", e))?;
            if packed.len() < data.len() {
                put_frame(&mut out, position, ZSTD, len as u32, &packed);
            } else {
                put_frame(&mut out, position, RAW, len as u32, data);
            }
        }
        relay.live.done.fetch_add(len as u64, Ordering::Relaxed);
        Ok(out)
    }

    pub fn agent_restore_done(
        &self,
        job: i64,
        caller: &Caller<'_>,
        wrote: &[String],
    ) -> Result<()> {
        let relay = self.restore_relay_for(job, caller)?;
        for w in wrote.iter().take(64) {
            let w: String = w.chars().take(4096).filter(|c| !c.is_control()).collect();
            self.job_log(job, &format!("wrote {w} on host '{}'", relay.host));
        }
        relay.end(Ok(()));
        Ok(())
    }

    /// A log line, a keep-alive or a failure of a restore job; false if `job` is no restore.
    pub(crate) fn restore_report(
        &self,
        job: i64,
        caller: &Caller<'_>,
        report: RestoreReport<'_>,
    ) -> Result<bool> {
        if !self.is_restore_relay(job) {
            return Ok(false);
        }
        let relay = self.restore_relay_for(job, caller)?;
        match report {
            RestoreReport::Alive => {}
            RestoreReport::Log(line) => {
                let line: String = line
                    .chars()
                    .take(2000)
                    .filter(|c| !c.is_control())
                    .collect();
                self.job_log(job, &format!("agent: {line}"));
            }
            RestoreReport::Failed(e) => {
                let e: String = e.chars().take(2000).filter(|c| !c.is_control()).collect();
                relay.end(Err(format!(
                    "the agent on host '{}' failed: {e}",
                    relay.host
                )));
            }
        }
        Ok(true)
    }

    /// The job thread of a restore on a host: waits for the agent's end, a cancel or its
    /// silence.
    pub(crate) fn run_agent_restore(&self, id: i64) -> Result<()> {
        let relay = self
            .restore_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Input(format!("job {id} was not taken by an agent")))?;
        let silence = Duration::from_secs(self.cfg.agent_job_silence_secs);
        let result = {
            let mut st = relay.state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(outcome) = st.1.clone() {
                    break outcome.map_err(Error::Agent);
                }
                if relay.live.cancel.load(Ordering::Relaxed) {
                    break Err(Error::Agent("the job was cancelled".into()));
                }
                // As for backups: however alive its agent is, a job ends within its limit.
                if self.now() - relay.taken > chrono::Duration::hours(crate::relay::AGENT_JOB_HOURS)
                {
                    break Err(Error::Agent(format!(
                        "the restore ran past the {} h a job on host '{}' may take",
                        crate::relay::AGENT_JOB_HOURS,
                        relay.host
                    )));
                }
                if st.0.elapsed() > silence {
                    break Err(Error::Agent(format!(
                        "the agent on host '{}' was silent for {} s during the restore",
                        relay.host,
                        silence.as_secs()
                    )));
                }
                st = relay
                    .changed
                    .wait_timeout(st, Duration::from_millis(250))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        self.restore_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        result
    }
}

pub(crate) enum RestoreReport<'a> {
    Alive,
    Log(&'a str),
    Failed(&'a str),
}
