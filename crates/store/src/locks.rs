//! Lock objects: who is backing up or collecting garbage in a vault right now.
//!
//! A lock is a small JSON object under `locks/`, named `STARTNS-RANDOM` so that names sort by
//! start time. A holder refreshes it every minute. A lock is live while its process is (same
//! host: the pid and the process's start time still match) or, from another host, while it was
//! refreshed within the last ten minutes; dead locks are removed by whoever finds them, so a
//! `kill -9` never leaves a vault locked.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{Kind, WriteBackend};
use crate::{Result, StoreError};

const REFRESH_EVERY: Duration = Duration::from_secs(60);
const STALE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Backup,
    Gc,
    /// Copying objects to the secondary region: a writer there, as a backup is.
    Replicate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub host: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    pub started_ns: u64,
    pub refreshed_ns: u64,
}

impl LockInfo {
    pub fn started(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.started_ns)
    }

    pub fn describe(&self) -> String {
        let since = chrono::DateTime::<chrono::Utc>::from(self.started());
        format!(
            "pid {} on {} since {}",
            self.pid,
            self.host,
            since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }

    fn is_live(&self, host: &str, now: SystemTime) -> bool {
        if self.host == host {
            return process_start(self.pid).is_some_and(|s| self.pid_start.is_none_or(|p| p == s));
        }
        let refreshed = UNIX_EPOCH + Duration::from_nanos(self.refreshed_ns);
        now.duration_since(refreshed).unwrap_or_default() < STALE_AFTER
    }
}

pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), which
/// tells a live process from a later one that reused its pid.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // A zombie (killed, not yet reaped) holds its pid but is no longer running anything.
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// A held lock: refreshed in the background, removed when dropped.
pub struct LockGuard {
    backend: Arc<dyn WriteBackend>,
    name: String,
    info: LockInfo,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
}

impl LockGuard {
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let (flag, cv) = &*self.stop;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.backend.remove(Kind::Lock, &self.name);
    }
}

/// Writes a new lock object and starts refreshing it.
pub(crate) fn acquire(
    backend: &Arc<dyn WriteBackend>,
    kind: LockKind,
    vm: Option<&str>,
) -> Result<LockGuard> {
    let pid = std::process::id();
    let started_ns = now_ns();
    let info = LockInfo {
        kind,
        vm: vm.map(str::to_string),
        host: hostname(),
        pid,
        pid_start: process_start(pid),
        started_ns,
        refreshed_ns: started_ns,
    };
    let mut rnd = [0u8; 4];
    vmvault_format::random_bytes(&mut rnd);
    let name = format!("{started_ns:020}-{}", hex::encode(rnd));
    let encode = |i: &LockInfo| serde_json::to_vec(i).expect("lock serialises");
    backend.write(Kind::Lock, &name, &encode(&info))?;
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let refresher = {
        let (backend, name, stop, mut info) =
            (backend.clone(), name.clone(), stop.clone(), info.clone());
        std::thread::spawn(move || {
            let (flag, cv) = &*stop;
            let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
            // The flag is checked before every wait: a drop may come before the first one.
            while !*stopped {
                let (guard, timeout) = cv
                    .wait_timeout(stopped, REFRESH_EVERY)
                    .unwrap_or_else(|e| e.into_inner());
                stopped = guard;
                if !*stopped && timeout.timed_out() {
                    info.refreshed_ns = now_ns();
                    let _ = backend.write(Kind::Lock, &name, &encode(&info));
                }
            }
        })
    };
    Ok(LockGuard {
        backend: backend.clone(),
        name,
        info,
        stop,
        refresher: Some(refresher),
    })
}

/// The live locks of a vault, oldest first; dead ones are removed on the way.
pub(crate) fn live_locks(backend: &dyn WriteBackend) -> Result<Vec<(String, LockInfo)>> {
    let host = hostname();
    let now = SystemTime::now();
    let mut live = Vec::new();
    for obj in backend.list(Kind::Lock)? {
        let info: LockInfo = match backend.read(Kind::Lock, &obj.name) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(i) => i,
                // An unreadable lock cannot be judged dead: keep honouring it until it is stale
                // by age, then remove it.
                Err(_) if now.duration_since(obj.modified).unwrap_or_default() > STALE_AFTER => {
                    backend.remove(Kind::Lock, &obj.name)?;
                    continue;
                }
                Err(_) => {
                    return Err(StoreError::Busy(format!(
                        "lock {} in the vault cannot be read; if no vmvault is running, remove it",
                        obj.name
                    )))
                }
            },
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        if info.is_live(&host, now) {
            live.push((obj.name, info));
        } else {
            backend.remove(Kind::Lock, &obj.name)?;
        }
    }
    live.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(live)
}
