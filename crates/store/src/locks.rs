//! Lock objects: who is backing up, replicating or collecting garbage in a vault right now.
//!
//! A lock is a small JSON object under `locks/`, named `STARTNS-RANDOM` so that names sort by
//! start time. Its holder rewrites it every [`REFRESH_EVERY`]. The rules, and why they hold
//! whatever the clocks and the process namespaces (docs/design.md, "Garbage collection"):
//!
//! - **Comparable locks are judged by their process.** A lock names the kernel it runs on (the
//!   boot id) and its PID namespace. Only a lock of the same boot and namespace as the judge
//!   (whose own `/proc` shows its own namespace) is judged by its PID and the process's start
//!   time: that process has ended, or it has not. A backup in a container, another host, or an
//!   older vmvault that wrote neither field is never judged by a PID it does not share.
//! - **Other locks are judged by age alone, with a margin.** Such a lock is presumed dead only
//!   when both the storage's time of its last write and its own refresh stamp are older than
//!   [`STALE_AFTER`] plus [`STALE_MARGIN`]: a writer whose clock lags makes the stamp look old,
//!   but not the storage's time; a stamp from the future is read as the storage's time. A lock
//!   younger than that is never removed.
//! - **Whoever removes a lock it judged dead first leaves a tombstone** (`NAME.dead`). A
//!   holder that was only paused, or whose clock misled the judge, finds the tombstone (or its
//!   lock gone) and stops trusting its lock: it never writes it again, and
//!   [`LockGuard::check_held`] fails from then on.
//! - **A holder distrusts its own lock** once its last successful refresh is older than
//!   [`LOST_AFTER`] by its clock or by the monotonic clock (a stopped process, failing writes):
//!   well inside the age at which anyone else may presume it dead. A backup checks before and
//!   after it writes its manifest; a collection before it deletes and while it does.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{Kind, WriteBackend};
use crate::clock::Clock;
use crate::{Result, StoreError};

pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// How soon a refresh that failed is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);
/// A holder stops trusting a lock it has not refreshed for this long.
pub const LOST_AFTER: Duration = Duration::from_secs(300);
/// A lock not refreshed for this long (plus [`STALE_MARGIN`]) may be presumed dead by anyone.
pub const STALE_AFTER: Duration = Duration::from_secs(600);
/// Added to [`STALE_AFTER`] for locks judged by age: covers clock skew between the judge and
/// the storage, and a refresh that was slow to land.
pub const STALE_MARGIN: Duration = Duration::from_secs(120);
/// Tombstones outlive the lock they bury by this much: a holder paused longer finds its lock
/// gone anyway.
const TOMBSTONE_KEEP: Duration = Duration::from_secs(24 * 3600);
const TOMBSTONE_SUFFIX: &str = ".dead";

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
    /// The kernel's boot id: PIDs are comparable only within one boot of one kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The inode of the holder's PID namespace: PIDs are comparable only within one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    /// By the holder's clock.
    pub started_ns: u64,
    pub refreshed_ns: u64,
    /// The storage's time of the lock's first write, once the holder has read it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_started_ns: Option<u64>,
    /// A garbage collection waiting for running writers: new writers need not wait for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

fn at(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

impl LockInfo {
    pub fn started(&self) -> SystemTime {
        at(self.started_ns)
    }

    /// The earliest the lock's holder can have started, by any clock the lock carries.
    pub fn earliest_start(&self, first_seen: SystemTime) -> SystemTime {
        let storage = self.storage_started_ns.map_or(first_seen, at);
        self.started().min(storage)
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

    /// Whether this lock's PID can be looked up in this process's `/proc`.
    fn comparable(&self) -> bool {
        let me = identity();
        me.proc_is_own
            && me.boot_id.is_some()
            && me.pid_ns.is_some()
            && self.boot_id == me.boot_id
            && self.pid_ns == me.pid_ns
    }

    /// `None` while the lock may be live; else why it is dead. `written` is the storage's
    /// time of its last write.
    fn verdict(&self, written: SystemTime, now: SystemTime) -> Option<String> {
        if self.comparable() {
            let alive =
                process_start(self.pid).is_some_and(|s| self.pid_start.is_none_or(|p| p == s));
            return (!alive).then(|| format!("its process {} has ended", self.pid));
        }
        let limit = STALE_AFTER + STALE_MARGIN;
        let storage_age = now.duration_since(written).unwrap_or_default();
        let stamp_age = now
            .duration_since(at(self.refreshed_ns))
            .unwrap_or(storage_age);
        (storage_age > limit && stamp_age > limit).then(|| {
            format!(
                "not refreshed for {} s (storage) and {} s (its own stamp)",
                storage_age.as_secs(),
                stamp_age.as_secs()
            )
        })
    }
}

/// What makes this process's PIDs comparable with a lock's.
struct Identity {
    host: String,
    boot_id: Option<String>,
    pid_ns: Option<u64>,
    /// Whether `/proc` shows this process's own PID namespace (it does not in a namespace
    /// made without remounting `/proc`): PIDs looked up there must be ours.
    proc_is_own: bool,
}

fn identity() -> &'static Identity {
    static ME: OnceLock<Identity> = OnceLock::new();
    ME.get_or_init(|| {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok().and_then(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
        });
        let proc_is_own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            == Some(std::process::id());
        Identity {
            host: hostname(),
            boot_id,
            pid_ns,
            proc_is_own,
        }
    })
}

pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
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

fn encode(info: &LockInfo) -> Vec<u8> {
    serde_json::to_vec(info).expect("lock serialises")
}

fn tombstone(name: &str) -> String {
    format!("{name}{TOMBSTONE_SUFFIX}")
}

/// What the holder knows of its own lock.
struct State {
    info: LockInfo,
    last_ok: SystemTime,
    last_ok_mono: Instant,
    /// Why the lock is no longer trusted, once it is not: never trusted again.
    lost: Option<String>,
}

struct Shared {
    backend: Arc<dyn WriteBackend>,
    clock: Arc<dyn Clock>,
    name: String,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the lock is still ours: recent enough by both clocks, not buried, still there.
    /// Marks it lost otherwise.
    fn confirm(&self, st: &mut State) -> Result<()> {
        if let Some(why) = &st.lost {
            return Err(StoreError::LockLost(why.clone()));
        }
        let wall = self
            .clock
            .now()
            .duration_since(st.last_ok)
            .unwrap_or_default();
        let since = wall.max(st.last_ok_mono.elapsed());
        let why = if since > LOST_AFTER {
            Some(format!(
                "it was last refreshed {} s ago, longer than the {} s a lock is trusted",
                since.as_secs(),
                LOST_AFTER.as_secs()
            ))
        } else if self
            .backend
            .stat(Kind::Lock, &tombstone(&self.name))?
            .is_some()
        {
            Some("another vmvault judged it dead and removed it".to_string())
        } else if self.backend.stat(Kind::Lock, &self.name)?.is_none() {
            Some("it was removed from the vault".to_string())
        } else {
            None
        };
        match why {
            Some(why) => {
                st.lost = Some(why.clone());
                Err(StoreError::LockLost(why))
            }
            None => Ok(()),
        }
    }

    /// One refresh; `false` when it failed and should be tried again soon.
    fn refresh(&self) -> bool {
        let mut st = self.state();
        if st.lost.is_some() {
            return true;
        }
        match self.confirm(&mut st) {
            Ok(()) => {}
            Err(StoreError::LockLost(_)) => return true,
            Err(_) => return false,
        }
        let now = self.clock.now();
        st.info.refreshed_ns = ns(now);
        if self
            .backend
            .write(Kind::Lock, &self.name, &encode(&st.info))
            .is_err()
        {
            return false;
        }
        st.last_ok = now;
        st.last_ok_mono = Instant::now();
        true
    }
}

/// A held lock: refreshed in the background, removed when dropped.
pub struct LockGuard {
    shared: Arc<Shared>,
    info: LockInfo,
    stop: Arc<(Mutex<bool>, Condvar)>,
    refresher: Option<JoinHandle<()>>,
}

impl LockGuard {
    /// The lock as it was first written.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Fails with [`StoreError::LockLost`] unless this lock is still trusted (see the module
    /// doc); once it fails it always does.
    pub fn check_held(&self) -> Result<()> {
        let mut st = self.shared.state();
        self.shared.confirm(&mut st)
    }

    /// Whether others may take this lock for a collection that waits (see [`LockInfo::waiting`]).
    pub fn waiting(&self) -> bool {
        self.shared.state().info.waiting
    }

    /// Says, in the lock object, whether this collection is waiting for writers.
    pub(crate) fn set_waiting(&self, waiting: bool) -> Result<()> {
        let mut st = self.shared.state();
        self.shared.confirm(&mut st)?;
        st.info.waiting = waiting;
        self.shared
            .backend
            .write(Kind::Lock, &self.shared.name, &encode(&st.info))
    }

    /// The storage's time of the lock's first write, when the storage told it.
    pub fn storage_started(&self) -> Option<SystemTime> {
        self.shared.state().info.storage_started_ns.map(at)
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
        let backend = &self.shared.backend;
        let _ = backend.remove(Kind::Lock, &self.shared.name);
        let _ = backend.remove(Kind::Lock, &tombstone(&self.shared.name));
    }
}

/// Writes a new lock object and starts refreshing it.
pub(crate) fn acquire(
    backend: &Arc<dyn WriteBackend>,
    clock: &Arc<dyn Clock>,
    kind: LockKind,
    vm: Option<&str>,
    waiting: bool,
) -> Result<LockGuard> {
    let me = identity();
    let pid = std::process::id();
    let now = clock.now();
    let mut info = LockInfo {
        kind,
        vm: vm.map(str::to_string),
        host: me.host.clone(),
        pid,
        pid_start: process_start(pid),
        boot_id: me.boot_id.clone(),
        pid_ns: me.pid_ns,
        started_ns: ns(now),
        refreshed_ns: ns(now),
        storage_started_ns: None,
        waiting,
    };
    let mut rnd = [0u8; 4];
    vmvault_format::random_bytes(&mut rnd);
    let name = format!("{:020}-{}", info.started_ns, hex::encode(rnd));
    backend.write(Kind::Lock, &name, &encode(&info))?;
    // Kept for the next refresh: until then the object's own time says the same.
    info.storage_started_ns = backend.stat(Kind::Lock, &name)?.map(|o| ns(o.modified));
    let shared = Arc::new(Shared {
        backend: backend.clone(),
        clock: clock.clone(),
        name,
        state: Mutex::new(State {
            info: info.clone(),
            last_ok: now,
            last_ok_mono: Instant::now(),
            lost: None,
        }),
    });
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let refresher = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let (flag, cv) = &*stop;
            let mut stopped = flag.lock().unwrap_or_else(|e| e.into_inner());
            let mut wait = REFRESH_EVERY;
            // The flag is checked before every wait: a drop may come before the first one.
            while !*stopped {
                let (guard, timeout) = cv
                    .wait_timeout(stopped, wait)
                    .unwrap_or_else(|e| e.into_inner());
                stopped = guard;
                if !*stopped && timeout.timed_out() {
                    wait = if shared.refresh() {
                        REFRESH_EVERY
                    } else {
                        RETRY_EVERY
                    };
                }
            }
        })
    };
    Ok(LockGuard {
        shared,
        info,
        stop,
        refresher: Some(refresher),
    })
}

/// A lock judged live.
#[derive(Debug, Clone)]
pub struct LiveLock {
    pub name: String,
    pub info: LockInfo,
    /// The storage's time of its last write.
    pub written: SystemTime,
}

/// Removes a lock judged dead, tombstone first (see the module doc).
fn bury(backend: &dyn WriteBackend, name: &str, why: &str, now: SystemTime) -> Result<()> {
    let me = identity();
    let note = serde_json::json!({
        "by": format!("pid {} on {}", std::process::id(), me.host),
        "at_ns": ns(now),
        "why": why,
    });
    backend.write(Kind::Lock, &tombstone(name), note.to_string().as_bytes())?;
    backend.remove(Kind::Lock, name)
}

/// The live locks of a vault, oldest first; dead ones are buried on the way.
pub(crate) fn live_locks(backend: &dyn WriteBackend, clock: &dyn Clock) -> Result<Vec<LiveLock>> {
    let now = clock.now();
    let mut live = Vec::new();
    for obj in backend.list(Kind::Lock)? {
        if obj.name.ends_with(TOMBSTONE_SUFFIX) {
            if now.duration_since(obj.modified).unwrap_or_default() > TOMBSTONE_KEEP {
                backend.remove(Kind::Lock, &obj.name)?;
            }
            continue;
        }
        let info: LockInfo = match backend.read(Kind::Lock, &obj.name) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(i) => i,
                // An unreadable lock cannot be judged by its holder: only by age.
                Err(_) => {
                    let age = now.duration_since(obj.modified).unwrap_or_default();
                    if age > STALE_AFTER + STALE_MARGIN {
                        bury(backend, &obj.name, "unreadable and old", now)?;
                        continue;
                    }
                    return Err(StoreError::Busy(format!(
                        "lock {} in the vault cannot be read; it is ignored once it is {} minutes \
                         old (if no vmvault is running, remove it)",
                        obj.name,
                        (STALE_AFTER + STALE_MARGIN).as_secs() / 60
                    )));
                }
            },
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match info.verdict(obj.modified, now) {
            None => live.push(LiveLock {
                name: obj.name,
                info,
                written: obj.modified,
            }),
            Some(why) => bury(backend, &obj.name, &why, now)?,
        }
    }
    live.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(live)
}
