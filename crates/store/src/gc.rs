//! Taking the backup and gc locks, and garbage collection (mark and sweep).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use vmvault_format::Digest;

use crate::backend::Kind;
use crate::locks::{self, LiveLock, LockGuard, LockKind};
use crate::{Result, StoreError, Vault};

/// How far before the oldest running writer's start an object must be to be swept: covers the
/// coarse clock that stamps file times (they can lag the clock a backup reads by a tick).
pub const SAFETY_MARGIN: Duration = Duration::from_secs(1);
/// How many times a backup steps back for a rival of the same VM before it gives up.
const MAX_STEPS_BACK: u32 = 4;
/// How often a collection sweeping a vault checks that its lock is still trusted: well inside
/// the time between [`locks::LOST_AFTER`] and the age at which others may presume it dead.
const RECHECK_EVERY: Duration = Duration::from_secs(20);

/// How long lock waits poll and how long a collection waits for writers.
#[derive(Debug, Clone)]
pub struct LockTiming {
    pub poll: Duration,
    pub gc_wait_limit: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        LockTiming {
            poll: Duration::from_millis(500),
            gc_wait_limit: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub points: usize,
    /// Soft-deleted points whose window was over, removed for good by this collection.
    pub points_purged: usize,
    pub chunks_total: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_spared: u64,
    pub indexes_removed: u64,
    pub temporaries_removed: u64,
    /// The regions swept, primary first.
    pub regions: Vec<String>,
    /// Objects whose storage hold was renewed (a locked vault on storage that holds objects).
    pub holds_renewed: u64,
}

impl Vault {
    /// Registers a backup of `vm`. Refuses when another backup of the same VM is running, and
    /// waits (telling `on_wait` once) while a garbage collection runs.
    pub fn lock_backup(&self, vm: &str, on_wait: &mut dyn FnMut(&str)) -> Result<LockGuard> {
        self.lock_writer(LockKind::Backup, Some(vm), on_wait)
    }

    /// Registers a copy to the secondary region; waits (telling `on_wait` once) while a
    /// garbage collection runs, as a backup does.
    pub fn lock_replicate(&self, on_wait: &mut dyn FnMut(&str)) -> Result<LockGuard> {
        self.lock_writer(LockKind::Replicate, None, on_wait)
    }

    /// A writer's lock. Each attempt writes the lock, then lists: whoever lists second sees
    /// the other (see the crate doc).
    ///
    /// Two backups of one VM: a backup that sees an older one refuses; one that sees only
    /// younger ones cannot know whether they saw it, so it steps back (removes its lock) and
    /// looks again with a newer name. Of backups that race, at most one goes on, and the
    /// dirty bitmaps they share are never used twice.
    ///
    /// A collection that is not waiting for writers: step back while it runs, so that it never
    /// waits for a writer that waits for it.
    fn lock_writer(
        &self,
        kind: LockKind,
        vm: Option<&str>,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<LockGuard> {
        let mut told = false;
        let mut steps_back = 0;
        // A vault locked by another process since this one opened it is held from now on.
        self.apply_hold_unless_damaged()?;
        loop {
            let guard = locks::acquire(self.backend(), &self.clock, kind, vm, false)?;
            let live = locks::live_locks(&**self.backend(), &*self.clock)?;
            let rivals: Vec<&LiveLock> = live
                .iter()
                .filter(|l| {
                    vm.is_some()
                        && l.name != guard.name()
                        && l.info.kind == LockKind::Backup
                        && l.info.vm.as_deref() == vm
                })
                .collect();
            if let Some(first) = rivals.first() {
                let older = rivals.iter().find(|l| l.name.as_str() < guard.name());
                drop(guard);
                steps_back += 1;
                if older.is_some() || steps_back >= MAX_STEPS_BACK {
                    let other = older.unwrap_or(first);
                    return Err(StoreError::Busy(format!(
                        "VM {} is already being backed up ({}); try again when it has finished",
                        vm.unwrap_or_default(),
                        other.info.describe()
                    )));
                }
                let mut jitter = [0u8; 1];
                vmvault_format::random_bytes(&mut jitter);
                std::thread::sleep(Duration::from_millis(20 + jitter[0] as u64));
                continue;
            }
            match live
                .iter()
                .find(|l| l.info.kind == LockKind::Gc && !l.info.waiting)
            {
                Some(gc) => {
                    drop(guard);
                    if !told {
                        on_wait(&format!(
                            "waiting for garbage collection ({}) to finish",
                            gc.info.describe()
                        ));
                        told = true;
                    }
                    std::thread::sleep(self.lock_timing.poll);
                }
                None => return Ok(guard),
            }
        }
    }

    /// Registers a garbage collection; refuses when another one runs. Returns the lock and the
    /// cutoff: objects modified at or after it are spared (see the crate doc).
    ///
    /// Where a region cannot make `touch` and the conditional remove atomic (object stores),
    /// the collection first waits, telling `on_wait` once, until no writer runs. While it
    /// waits, its lock says so and new writers go ahead of it; once none runs it says it is
    /// collecting, looks again, and writers that come later wait for it. It gives up after
    /// [`LockTiming::gc_wait_limit`] rather than wait without bound.
    pub fn lock_gc(&self, on_wait: &mut dyn FnMut(&str)) -> Result<(LockGuard, SystemTime)> {
        let exclusive = !self.regions().iter().all(|r| r.backend.atomic_touch());
        let guard = locks::acquire(self.backend(), &self.clock, LockKind::Gc, None, exclusive)?;
        let began = self.clock.now();
        let mut told = false;
        loop {
            let live = locks::live_locks(&**self.backend(), &*self.clock)?;
            if let Some(other) = live
                .iter()
                .find(|l| l.info.kind == LockKind::Gc && l.name != guard.name())
            {
                return Err(StoreError::Busy(format!(
                    "garbage collection is already running ({})",
                    other.info.describe()
                )));
            }
            let writers: Vec<&LiveLock> = live
                .iter()
                .filter(|l| l.info.kind != LockKind::Gc)
                .collect();
            if !exclusive || writers.is_empty() {
                if guard.waiting() {
                    // A writer that looked while this one waited may have gone ahead: look
                    // again now that new writers will wait.
                    guard.set_waiting(false)?;
                    continue;
                }
                let mut cutoff = guard.info().started();
                if let Some(t) = guard.storage_started() {
                    cutoff = cutoff.min(t);
                }
                for w in &writers {
                    cutoff = cutoff.min(w.info.earliest_start(w.written));
                }
                return Ok((guard, cutoff - SAFETY_MARGIN));
            }
            if !guard.waiting() {
                guard.set_waiting(true)?;
            }
            let waited = self.clock.now().duration_since(began).unwrap_or_default();
            if waited > self.lock_timing.gc_wait_limit {
                return Err(StoreError::Busy(format!(
                    "garbage collection gave up after waiting {} s for {} running backup(s) or \
                     replication(s) (the oldest: {}); nothing was deleted: run it again when \
                     they have finished",
                    waited.as_secs(),
                    writers.len(),
                    writers[0].info.describe()
                )));
            }
            if !told {
                on_wait(&format!(
                    "waiting for {} running backup(s) or replication(s) to finish: this vault's \
                     object storage cannot spare what they touch otherwise",
                    writers.len()
                ));
                told = true;
            }
            std::thread::sleep(self.lock_timing.poll);
        }
    }

    /// Removes chunks and indexes that no recovery point references, in every region.
    ///
    /// The rule that keeps it from racing a backup is in the crate doc. What is marked is the
    /// union of every region's recovery points, so the secondary never loses what the primary
    /// still references, nor the primary what only the secondary still has.
    pub fn gc(&self, on_wait: &mut dyn FnMut(&str)) -> Result<GcReport> {
        let (guard, cutoff) = self.lock_gc(on_wait)?;

        // Mark. Anything unreadable stops the collection before it deletes anything: a point
        // that cannot be read may reference chunks that nothing else does.
        let mut report = GcReport::default();
        // Points whose soft-delete window is over go first, so that what only they held is
        // collected now. The storage's time now is its time of this collection's lock.
        let storage_now = self
            .backend()
            .stat(Kind::Lock, guard.name())?
            .map(|o| o.modified);
        report.points_purged = self.purge_expired(storage_now)?.len();
        let mut chunks: HashSet<Digest> = HashSet::new();
        let mut indexes: HashSet<Digest> = HashSet::new();
        let (mut points, bad) = self.all_points()?;
        let stop = |what: String| {
            StoreError::DamageStopped(format!(
                "garbage collection stopped before deleting anything: {what}; run `vmvault verify`"
            ))
        };
        if let Some((id, e)) = bad.first() {
            return Err(stop(format!("recovery point {id} cannot be read ({e})")));
        }
        let mut seen: HashSet<_> = points.iter().map(|m| m.id).collect();
        for i in 1..self.regions().len() {
            let view = self.region_view(i);
            for id in view.point_ids()? {
                if seen.insert(id) {
                    match view.load_manifest(&id) {
                        Ok(m) => points.push(m),
                        Err(StoreError::NotFound(_)) => {}
                        Err(e) => {
                            return Err(stop(format!(
                                "recovery point {id} cannot be read in the {} region ({e})",
                                self.regions()[i].name
                            )))
                        }
                    }
                }
            }
        }
        report.points = points.len();
        for m in &points {
            for disk in &m.disks {
                let index = match self.load_index(&disk.index, disk.size) {
                    Ok(i) => i,
                    Err(StoreError::NotFound(_)) => continue,
                    Err(e) => {
                        return Err(stop(format!(
                            "disk {} of recovery point {} cannot be read ({e})",
                            disk.name, m.id
                        )))
                    }
                };
                indexes.insert(disk.index);
                chunks.extend(index.chunks.iter().filter(|d| !d.is_zero_chunk()));
            }
        }

        // Sweep, region by region, only while this collection's lock is trusted: a collection
        // that was paused until others judged it dead must not delete what writers that then
        // went ahead have touched (see the crate doc).
        guard.check_held()?;
        let mut checked = std::time::Instant::now();
        let mut still_held = || -> Result<()> {
            if checked.elapsed() >= RECHECK_EVERY {
                guard.check_held()?;
                checked = std::time::Instant::now();
            }
            Ok(())
        };
        for region in self.regions() {
            report.regions.push(region.name.clone());
            let backend = &region.backend;
            for obj in backend.list(Kind::Chunk)? {
                report.chunks_total += 1;
                let Ok(digest) = obj.name.parse::<Digest>() else {
                    continue;
                };
                if chunks.contains(&digest) {
                    continue;
                }
                if obj.modified >= cutoff {
                    report.chunks_spared += 1;
                    continue;
                }
                still_held()?;
                // The listing's time is only a first look; the backend judges again.
                if backend.remove_unless_touched(Kind::Chunk, &obj.name, cutoff)? {
                    report.chunks_removed += 1;
                    report.bytes_removed += obj.size;
                } else {
                    report.chunks_spared += 1;
                }
            }
            for obj in backend.list(Kind::Index)? {
                let keep = obj
                    .name
                    .parse::<Digest>()
                    .map_or(true, |d| indexes.contains(&d));
                if keep || obj.modified >= cutoff {
                    continue;
                }
                still_held()?;
                if backend.remove_unless_touched(Kind::Index, &obj.name, cutoff)? {
                    report.indexes_removed += 1;
                }
            }
            still_held()?;
            report.temporaries_removed += backend.remove_temporaries(cutoff)?;
            backend.sync()?;
        }
        // What the points still need stays held at least `hold_days` after every collection,
        // however long ago it was written (see `hold`).
        report.holds_renewed = self.renew_holds(&|_| {})?;
        drop(guard);
        Ok(report)
    }
}
