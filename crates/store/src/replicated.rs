//! Replication: one vault in two regions, the primary first, then the secondary.
//!
//! - Writes go to the primary; the secondary gets them synchronously ([`Mode::Sync`]: a write
//!   returns once both regions have it) or from a queue that survives a restart
//!   ([`Mode::Async`], the default; see [`crate::journal`]) worked by background threads.
//!   The vault config and key are always written to both at once: a secondary must open
//!   alone. Locks stay in the primary, which is where backups and collections meet.
//! - A reused object is *touched* in the primary at once and queued for the secondary, where
//!   the queue's worker touches it or, if the secondary lacks it, copies it: the secondary
//!   never ends up with a manifest whose chunks it lacks, even ones a backup only reused.
//! - Reads go to the primary and fall back to the secondary when the primary's copy is
//!   missing, fails its check, or the primary cannot be reached; each fallback is told through
//!   the [`Notify`] callback, naming object and region.
//! - Removes reach both regions (prune's manifests). Garbage collection does not go through
//!   here: it sweeps each region on its own (see [`crate::gc`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::backend::{Check, Kind, ObjectInfo, ReadBackend, WriteBackend};
use crate::journal::{Entry, Journal, Op};
use crate::{Result, StoreError};

/// Where messages about fallbacks and replication trouble go (the CLI prints them).
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

pub enum Mode {
    /// Both regions before a write returns.
    Sync,
    /// The secondary from a journal in this directory, by background workers.
    Async { journal: Arc<Journal> },
}

/// A region's name and backend.
#[derive(Clone)]
pub struct Region {
    pub name: String,
    pub backend: Arc<dyn WriteBackend>,
}

/// The replication workers' counters, for progress and `vault status`.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    pub copied: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

pub struct Replicated {
    primary: Region,
    secondary: Region,
    journal: Option<Arc<Journal>>,
    notify: Notify,
    stats: Arc<ReplicationStats>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    fallbacks: AtomicU64,
}

/// Fallbacks told one by one; past that, one line says more happened (a primary that is gone
/// would otherwise give a line per chunk).
const FALLBACKS_TOLD: u64 = 5;

fn falls_back(e: &StoreError) -> bool {
    matches!(e, StoreError::NotFound(_) | StoreError::Damaged { .. }) || e.is_transient()
}

impl Replicated {
    pub fn new(primary: Region, secondary: Region, mode: Mode, notify: Notify) -> Replicated {
        let stats = Arc::new(ReplicationStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        let journal = match mode {
            Mode::Sync => None,
            Mode::Async { journal } => {
                for _ in 0..secondary.backend.concurrency().clamp(1, 16) {
                    let worker = Worker {
                        primary: primary.clone(),
                        secondary: secondary.clone(),
                        journal: journal.clone(),
                        stats: stats.clone(),
                        stop: stop.clone(),
                        notify: notify.clone(),
                    };
                    workers.push(std::thread::spawn(move || worker.run()));
                }
                Some(journal)
            }
        };
        Replicated {
            primary,
            secondary,
            journal,
            notify,
            stats,
            stop,
            workers,
            fallbacks: AtomicU64::new(0),
        }
    }

    /// How many reads were served by the secondary because the primary failed them.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    pub fn primary(&self) -> &Region {
        &self.primary
    }

    pub fn secondary(&self) -> &Region {
        &self.secondary
    }

    pub fn stats(&self) -> &Arc<ReplicationStats> {
        &self.stats
    }

    /// Entries still queued for the secondary, and whether the queue overflowed (only a full
    /// `vault replicate` finds what it dropped). `(0, false)` in sync mode.
    pub fn backlog(&self) -> (usize, bool) {
        self.journal.as_ref().map_or((0, false), |j| j.backlog())
    }

    /// Waits for the queue to empty, at most `timeout`; returns what is left.
    pub fn drain(&self, timeout: Duration) -> Result<usize> {
        let Some(j) = &self.journal else {
            return Ok(0);
        };
        j.flush()?;
        Ok(j.wait_empty(timeout))
    }

    /// The journal, for a full comparison to clear its overflow.
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    fn to_secondary(&self, op: Op, kind: Kind, name: &str, data: Option<&[u8]>) -> Result<()> {
        match (&self.journal, kind) {
            (_, Kind::Lock) => Ok(()),
            // Small, rare and needed to open the secondary alone: always at once.
            (None, _) | (_, Kind::Config | Kind::Key) => match (op, data) {
                (Op::Remove, _) => self.secondary.backend.remove(kind, name),
                (Op::Copy, Some(d)) => self.secondary.backend.write(kind, name, d),
                (Op::Copy, None) => {
                    copy_unless_present(&self.primary, &self.secondary, kind, name).map(|_| ())
                }
            },
            (Some(j), _) => j.push(op, kind, name),
        }
    }

    fn fallback<T>(
        &self,
        kind: Kind,
        name: &str,
        mut call: impl FnMut(&dyn WriteBackend) -> Result<T>,
    ) -> Result<T> {
        match call(&*self.primary.backend) {
            // Locks live in the primary only.
            Err(e) if falls_back(&e) && kind != Kind::Lock => {
                match call(&*self.secondary.backend) {
                    Ok(v) => {
                        let n = self.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
                        if n <= FALLBACKS_TOLD {
                            (self.notify)(&format!(
                                "{} {name}: read from the {} region ({}) because the {} \
                                 region failed: {e}",
                                kind.name(),
                                self.secondary.name,
                                self.secondary.backend.location(),
                                self.primary.name
                            ));
                        } else if n == FALLBACKS_TOLD + 1 {
                            (self.notify)(&format!(
                                "more reads fell back to the {} region; not told one by one",
                                self.secondary.name
                            ));
                        }
                        Ok(v)
                    }
                    // Both failed: the primary's reason is the one to fix first.
                    Err(_) => Err(e),
                }
            }
            other => other,
        }
    }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = &self.journal {
            j.close();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Makes `to` hold the object `from` has: a touch when it already does (mutable objects are
/// copied regardless), else a verified read and a write. Returns the bytes copied.
fn copy_unless_present(from: &Region, to: &Region, kind: Kind, name: &str) -> Result<u64> {
    let mutable = matches!(kind, Kind::Config | Kind::Key);
    if !mutable && to.backend.touch(kind, name)?.is_some() {
        return Ok(0);
    }
    let bytes = from.backend.read(kind, name)?;
    to.backend.write(kind, name, &bytes)?;
    Ok(bytes.len() as u64)
}

struct Worker {
    primary: Region,
    secondary: Region,
    journal: Arc<Journal>,
    stats: Arc<ReplicationStats>,
    stop: Arc<AtomicBool>,
    notify: Notify,
}

impl Worker {
    fn run(self) {
        let mut backoff = Duration::from_millis(200);
        while !self.stop.load(Ordering::Relaxed) {
            let Some(entry) = self.journal.take(Duration::from_millis(500)) else {
                continue;
            };
            match self.apply(&entry) {
                Ok(bytes) => {
                    self.stats.copied.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                    let _ = self.journal.finish(&entry, true);
                    backoff = Duration::from_millis(200);
                }
                // Gone from the primary since (collected, pruned): nothing to copy.
                Err(StoreError::NotFound(_)) => {
                    let _ = self.journal.finish(&entry, true);
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let first = {
                        let mut last = self
                            .stats
                            .last_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        let first = last.is_none();
                        *last = Some(e.to_string());
                        first
                    };
                    if first {
                        (self.notify)(&format!(
                            "replication to the {} region is failing, will retry: {e}",
                            self.secondary.name
                        ));
                    }
                    let damaged = matches!(e, StoreError::Damaged { .. });
                    // A damaged primary copy is not spread; `verify --repair` mends it.
                    let _ = self.journal.finish(&entry, damaged);
                    // In small steps: a process that ends must not wait out a long backoff.
                    let until = std::time::Instant::now() + backoff;
                    while std::time::Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    fn apply(&self, e: &Entry) -> Result<u64> {
        match e.op {
            Op::Remove => self.secondary.backend.remove(e.kind, &e.name).map(|_| 0),
            Op::Copy => copy_unless_present(&self.primary, &self.secondary, e.kind, &e.name),
        }
    }
}

impl ReadBackend for Replicated {
    fn location(&self) -> String {
        self.primary.backend.location()
    }
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.fallback(kind, name, |b| b.read(kind, name))
    }
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.fallback(kind, name, |b| b.read_into(kind, name, buf))
    }
    fn read_checked(
        &self,
        kind: Kind,
        name: &str,
        buf: &mut Vec<u8>,
        check: Check<'_>,
    ) -> Result<()> {
        self.fallback(kind, name, |b| b.read_checked(kind, name, buf, &mut *check))
    }
    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        match self.primary.backend.stat(kind, name) {
            Err(e) if e.is_transient() => self.secondary.backend.stat(kind, name),
            other => other,
        }
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        match self.primary.backend.list(kind) {
            Err(e) if e.is_transient() && kind != Kind::Lock => {
                (self.notify)(&format!(
                    "listing {} objects from the {} region: the {} region failed: {e}",
                    kind.name(),
                    self.secondary.name,
                    self.primary.name
                ));
                self.secondary.backend.list(kind)
            }
            other => other,
        }
    }
    fn concurrency(&self) -> usize {
        self.primary.backend.concurrency()
    }
}

impl WriteBackend for Replicated {
    fn create(&self) -> Result<()> {
        self.primary.backend.create()?;
        self.secondary.backend.create()
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        if let (Some(j), Kind::Point) = (&self.journal, kind) {
            return j.push_ahead(Op::Copy, kind, name, || {
                self.primary.backend.write(kind, name, data)
            });
        }
        self.primary.backend.write(kind, name, data)?;
        self.to_secondary(Op::Copy, kind, name, Some(data))
    }
    fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        if let (Some(j), Kind::Point) = (&self.journal, kind) {
            return j.push_ahead(Op::Remove, kind, name, || {
                self.primary.backend.remove(kind, name)
            });
        }
        self.primary.backend.remove(kind, name)?;
        self.to_secondary(Op::Remove, kind, name, None)
    }
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        let present = self.primary.backend.touch(kind, name)?;
        if present.is_some() {
            self.to_secondary(Op::Copy, kind, name, None)?;
        }
        Ok(present)
    }
    /// The primary's only: garbage collection judges each region on its own.
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        self.primary
            .backend
            .remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> Result<()> {
        self.primary.backend.sync()?;
        match &self.journal {
            Some(j) => j.flush(),
            None => self.secondary.backend.sync(),
        }
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        Ok(self.primary.backend.remove_temporaries(older_than)?
            + self.secondary.backend.remove_temporaries(older_than)?)
    }
    fn atomic_touch(&self) -> bool {
        self.primary.backend.atomic_touch() && self.secondary.backend.atomic_touch()
    }
    /// Each region holds what it is given; enforced only when both do.
    fn set_hold(&self, hold: Option<crate::Hold>) -> Result<crate::HoldState> {
        let primary = self.primary.backend.set_hold(hold.clone())?;
        let secondary = self.secondary.backend.set_hold(hold)?;
        Ok(match (primary, secondary) {
            (crate::HoldState::Enforced, s) => s,
            (p, _) => p,
        })
    }
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        self.primary.backend.extend_hold(kind, name)?;
        self.secondary.backend.extend_hold(kind, name)
    }
}
