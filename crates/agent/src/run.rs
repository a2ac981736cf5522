//! `vmvault agent run`: heartbeats with the VMs found, and the jobs the server leases to this
//! host, one at a time. Every request goes out to the server; nothing listens here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmvault_api::agent::{
    job_path, AgentJob, AgentJobKind, FailReport, FoundVm, Heartbeat, HeartbeatAnswer, LogReport,
    ProgressReport, HEARTBEAT, NEXT_JOB,
};
use vmvault_engine::{DiskDescription, Progress, Quiesce, RunningVm};
use vmvault_qemu::Scripts;

use crate::client::Client;
use crate::discover::{discover, DiscoverConfig};
use crate::relay::RelayDestination;
use crate::state::AgentState;
use crate::upgrade::{RunEnd, Upgrades};
use crate::{AgentError, Result};

/// Makes the guest agent's quiesce for a job: its socket and the VM's scripts. The CLI gives
/// its own (a helper process holds the freeze, so the guest thaws even if the agent dies).
pub type QuiesceMaker = dyn Fn(PathBuf, Option<Scripts>) -> Box<dyn Quiesce> + Send + Sync;

pub struct AgentOptions {
    pub discover: DiscoverConfig,
    pub quiesce: Option<Box<QuiesceMaker>>,
    /// Set to stop: the loop ends after the job it runs, if any.
    pub stop: Arc<AtomicBool>,
    /// How long one poll for a job waits at the server.
    pub poll_wait_secs: u64,
    /// Folders restores may write into; none: this host takes no restore.
    pub restore_roots: Vec<PathBuf>,
    /// How long a new version has to report in healthy before it is rolled back.
    pub health_deadline_secs: u64,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            discover: DiscoverConfig::default(),
            quiesce: None,
            stop: Arc::new(AtomicBool::new(false)),
            // A poll is answered at once when a job is queued; between polls the agent
            // applies an upgrade it was offered, so the wait bounds how long that takes.
            poll_wait_secs: 10,
            restore_roots: Vec::new(),
            health_deadline_secs: vmvault_release::DEFAULT_HEALTH_DEADLINE_SECS,
        }
    }
}

/// What the agent knows of its VMs: the last discovery, and VMs seen earlier in this run
/// (a VM that stops is backed up from the images QEMU had open).
struct Known {
    now: Vec<FoundVm>,
    seen: HashMap<String, FoundVm>,
    path: PathBuf,
}

impl Known {
    /// Written (to a temporary, then renamed) when what was seen changed.
    fn save(&self) {
        let Ok(text) = serde_json::to_vec(&self.seen) else {
            return;
        };
        let tmp = self.path.with_extension("json.new");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &self.path);
        }
    }
}

/// Runs until `opts.stop` is set, or until an upgrade (or a rollback) asks to be restarted
/// in another binary: the caller then starts it with the same arguments.
pub fn run(state: &AgentState, opts: &AgentOptions, say: &(dyn Fn(&str) + Sync)) -> Result<RunEnd> {
    let pins = state.pins()?.ok_or_else(|| {
        AgentError::Input(
            "this host is not enrolled: run `vmvault agent enroll URL --code CODE` first".into(),
        )
    })?;
    let identity = state.identity()?;
    let client = Client::new(&pins.server, &identity, Some(pins.fingerprint.clone()))?;
    let (upgrades, restart) = Upgrades::start(state, &pins.release_key, opts.health_deadline_secs)?;
    if let Some(bin) = restart {
        say(&format!("restarting in {}", bin.display()));
        return Ok(RunEnd::Restart(bin));
    }
    // Set by either thread; ends both.
    let restart: Mutex<Option<PathBuf>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let stopping = || stop.load(Ordering::Relaxed) || opts.stop.load(Ordering::Relaxed);
    let mut instance = [0u8; 16];
    vmvault_format::random_bytes(&mut instance);
    let instance = hex::encode(instance);
    // What this host's QEMUs had open, kept across restarts: a VM that is off when the agent
    // starts is still backed up from its images (and only those).
    let seen_path = state.dir.join("seen-vms.json");
    let seen = std::fs::read(&seen_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let known = Mutex::new(Known {
        now: Vec::new(),
        seen,
        path: seen_path,
    });
    say(&format!(
        "vmvault agent {} for host '{}' at {}",
        upgrades.running, pins.host, pins.server
    ));
    let ending = |bin: PathBuf| {
        *restart.lock().unwrap_or_else(|e| e.into_inner()) = Some(bin);
        stop.store(true, Ordering::Relaxed);
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            heartbeats(
                &client, &instance, opts, &known, &upgrades, &stopping, &ending, say,
            )
        });
        while !stopping() {
            // Between jobs only: an upgrade never cuts a backup short.
            if let Some(bin) = upgrades.apply(&client, say) {
                ending(bin);
                break;
            }
            let path = format!("{NEXT_JOB}?wait={}", opts.poll_wait_secs);
            match client.get::<AgentJob>(&path, None) {
                Ok(Some(job)) => run_job(&client, state, opts, &known, &job, say),
                Ok(None) => {}
                Err(e) => {
                    say(&format!("asking for jobs: {e}"));
                    pause(&stopping, Duration::from_secs(5));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(
        match restart.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(bin) => RunEnd::Restart(bin),
            None => RunEnd::Stopped,
        },
    )
}

fn pause(stop: &dyn Fn() -> bool, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[allow(clippy::too_many_arguments)]
fn heartbeats(
    client: &Client,
    instance: &str,
    opts: &AgentOptions,
    known: &Mutex<Known>,
    upgrades: &Upgrades,
    stopping: &dyn Fn() -> bool,
    ending: &dyn Fn(PathBuf),
    say: &(dyn Fn(&str) + Sync),
) {
    let mut told = std::collections::HashSet::new();
    while !stopping() {
        let found = discover(&opts.discover);
        for (what, why) in &found.skipped {
            if told.insert(what.clone()) {
                say(&format!("not reported: {what}: {why}"));
            }
        }
        {
            let mut k = known.lock().unwrap_or_else(|e| e.into_inner());
            let mut changed = false;
            for vm in &found.vms {
                // Its disks as they are now; its run state says nothing of its images.
                let mut vm = vm.clone();
                vm.state = "stopped".into();
                changed |= k.seen.insert(vm.name.clone(), vm.clone()).as_ref() != Some(&vm);
            }
            if changed {
                k.save();
            }
            k.now = found.vms.clone();
        }
        let mut vms = found.vms;
        vms.truncate(vmvault_api::agent::MAX_VMS);
        let rolled_back = upgrades.report();
        let hb = Heartbeat {
            version: upgrades.running.to_string(),
            target: vmvault_release::this_target(),
            rolled_back: rolled_back.clone(),
            instance: instance.to_string(),
            vms,
        };
        let every = match client.post::<HeartbeatAnswer>(HEARTBEAT, None, &hb) {
            Ok(a) => {
                if let Err(e) = upgrades.heartbeat_answered(rolled_back.is_some(), a.upgrade) {
                    say(&format!("upgrade: {e}"));
                }
                a.every_secs.clamp(1, 3600)
            }
            Err(e) => {
                say(&format!("heartbeat: {e}"));
                match upgrades.heartbeat_failed() {
                    Ok(Some(bin)) => {
                        say("this version could not reach the server in time: rolled back");
                        ending(bin);
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => say(&format!("rollback: {e}")),
                }
                5
            }
        };
        pause(stopping, Duration::from_secs(every));
    }
}

/// Sends the engine's messages to the job's log, and its figures with the keep-alive.
struct JobProgress<'a> {
    client: &'a Client,
    job: i64,
    lease: &'a str,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress for JobProgress<'_> {
    fn start(&self, what: &str, total: u64) {
        self.total.fetch_add(total, Ordering::Relaxed);
        self.message(what);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finish(&self) {}
    fn message(&self, text: &str) {
        let _ = self.client.tell(
            &job_path(self.job, "log"),
            Some(self.lease),
            &LogReport {
                line: text.to_string(),
            },
        );
    }
}

fn run_job(
    client: &Client,
    state: &AgentState,
    opts: &AgentOptions,
    known: &Mutex<Known>,
    job: &AgentJob,
    say: &(dyn Fn(&str) + Sync),
) {
    say(&format!("job {}: {} of {}", job.id, job.kind, job.vm));
    let progress = JobProgress {
        client,
        job: job.id,
        lease: &job.lease,
        done: AtomicU64::new(0),
        total: AtomicU64::new(0),
    };
    let ended = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        // A request at least every 10 s, even while a quiesce waits: a silent agent's job
        // fails at the server.
        s.spawn(|| {
            while !ended.load(Ordering::Relaxed) {
                pause(&|| ended.load(Ordering::Relaxed), Duration::from_secs(10));
                if ended.load(Ordering::Relaxed) {
                    break;
                }
                let p = ProgressReport {
                    stage: "running".into(),
                    done: progress.done.load(Ordering::Relaxed),
                    total: progress.total.load(Ordering::Relaxed),
                };
                let _ = client.tell(&job_path(job.id, "progress"), Some(&job.lease), &p);
            }
        });
        let r = match job.kind {
            AgentJobKind::Backup => backup(client, state, opts, known, job, &progress),
            AgentJobKind::Restore => {
                crate::restore::restore(client, job.id, &job.lease, &opts.restore_roots, &progress)
                    .map(|files| files.join(", "))
            }
            AgentJobKind::Unknown(ref k) => Err(AgentError::Input(format!(
                "a job of kind '{k}', which this agent does not know"
            ))),
        };
        ended.store(true, Ordering::Relaxed);
        r
    });
    match result {
        Ok(what) => say(&format!("job {}: done: {what}", job.id)),
        Err(e) => {
            say(&format!("job {}: failed: {e}", job.id));
            // A job the server ended (cancelled, retried, host removed) needs no report.
            if e.status() != Some(409) && e.status() != Some(401) {
                let _ = client.tell(
                    &job_path(job.id, "fail"),
                    Some(&job.lease),
                    &FailReport {
                        error: e.to_string(),
                    },
                );
            }
        }
    }
}

fn backup(
    client: &Client,
    state: &AgentState,
    opts: &AgentOptions,
    known: &Mutex<Known>,
    job: &AgentJob,
    progress: &JobProgress<'_>,
) -> Result<String> {
    let (now, seen) = {
        let k = known.lock().unwrap_or_else(|e| e.into_inner());
        (
            k.now.iter().find(|v| v.name == job.vm).cloned(),
            k.seen.get(&job.vm).cloned(),
        )
    };
    let scratch = state.scratch();
    std::fs::create_dir_all(&scratch)
        .map_err(|e| AgentError::io(format!("making {}", scratch.display()), e))?;
    let mut dest = RelayDestination::new(client, job.id, &job.lease);
    let running = now
        .as_ref()
        .and_then(|v| v.qmp.clone().map(|q| (q, v.qga.clone())));
    let point = match running {
        Some((qmp, qga)) => {
            let scripts = match &job.scripts {
                Some(text) => Some(
                    Scripts::parse(text)
                        .map_err(|e| AgentError::Input(format!("the VM's scripts file: {e}")))?,
                ),
                None => None,
            };
            let mut quiesce = match (&opts.quiesce, qga) {
                (Some(make), Some(qga)) => Some(make(PathBuf::from(qga), scripts)),
                _ => None,
            };
            let vm = RunningVm {
                qmp: PathBuf::from(qmp),
                name: Some(job.vm.clone()),
                scratch,
                quiesce: quiesce.as_mut().map(|q| q.as_mut() as &mut dyn Quiesce),
            };
            vmvault_engine::backup_running_vm_to(&mut dest, vm, progress)?
        }
        None => {
            // Only images QEMU had open for this VM: a job cannot make the agent read any
            // other file as a disk.
            let seen = seen.ok_or_else(|| {
                AgentError::Input(format!(
                    "VM '{}' is not running and this agent has not seen it run since it started, \
                     so it does not know its images",
                    job.vm
                ))
            })?;
            let disks: Vec<DiskDescription> = seen
                .disks
                .iter()
                .filter_map(|d| {
                    d.file.as_ref().map(|f| DiskDescription {
                        name: d.name.clone(),
                        path: PathBuf::from(f),
                        format: d.format.clone(),
                        bus: "virtio".into(),
                        allow_backing: Vec::new(),
                    })
                })
                .collect();
            vmvault_engine::backup_stopped_vm_to(&mut dest, &job.vm, &disks, &scratch, progress)?
        }
    };
    Ok(point.to_hex())
}
