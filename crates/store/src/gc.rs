//! Taking the backup and gc locks, and garbage collection (mark and sweep).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use vmvault_format::Digest;

use crate::backend::Kind;
use crate::locks::{self, LockGuard, LockKind};
use crate::{Result, StoreError, Vault};

/// How far before the oldest running writer's start an object must be to be swept: covers the
/// coarse clock that stamps file times (they can lag the clock a backup reads by a tick).
pub const SAFETY_MARGIN: Duration = Duration::from_secs(1);
const WAIT_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub points: usize,
    pub chunks_total: u64,
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_spared: u64,
    pub indexes_removed: u64,
    pub temporaries_removed: u64,
    /// The regions swept, primary first.
    pub regions: Vec<String>,
}

impl Vault {
    /// Registers a backup of `vm`. Refuses when an older backup of the same VM is running,
    /// and waits (telling `on_wait` once) while a garbage collection runs.
    pub fn lock_backup(&self, vm: &str, on_wait: &mut dyn FnMut(&str)) -> Result<LockGuard> {
        let guard = locks::acquire(self.backend(), LockKind::Backup, Some(vm))?;
        let live = locks::live_locks(&**self.backend())?;
        // Names sort by start: only an older backup of the same VM wins over this one, so
        // of two that start together exactly one goes on.
        if let Some((_, other)) = live.iter().find(|(name, i)| {
            i.kind == LockKind::Backup
                && i.vm.as_deref() == Some(vm)
                && name.as_str() < guard.name()
        }) {
            return Err(StoreError::Busy(format!(
                "VM {vm} is already being backed up ({}); try again when it has finished",
                other.describe()
            )));
        }
        self.wait_for_gc(on_wait)?;
        Ok(guard)
    }

    /// Waits while a garbage collection runs, telling `on_wait` once. Called with this
    /// writer's lock already written: a collection that starts later sees it (see the crate
    /// doc).
    fn wait_for_gc(&self, on_wait: &mut dyn FnMut(&str)) -> Result<()> {
        let mut told = false;
        loop {
            let live = locks::live_locks(&**self.backend())?;
            match live.iter().find(|(_, i)| i.kind == LockKind::Gc) {
                Some((_, gc)) => {
                    if !told {
                        on_wait(&format!(
                            "waiting for garbage collection ({}) to finish",
                            gc.describe()
                        ));
                        told = true;
                    }
                    std::thread::sleep(WAIT_POLL);
                }
                None => return Ok(()),
            }
        }
    }

    /// Registers a copy to the secondary region; waits (telling `on_wait` once) while a
    /// garbage collection runs, as a backup does.
    pub fn lock_replicate(&self, on_wait: &mut dyn FnMut(&str)) -> Result<LockGuard> {
        let guard = locks::acquire(self.backend(), LockKind::Replicate, None)?;
        self.wait_for_gc(on_wait)?;
        Ok(guard)
    }

    /// Registers a garbage collection; refuses when another one runs. Returns the lock and the
    /// cutoff: objects modified at or after it are spared (see the crate doc).
    ///
    /// Where a region cannot make `touch` and the conditional remove atomic (object stores),
    /// the collection first waits, telling `on_wait` once, until no writer runs: new writers
    /// wait for it in turn, so nothing touches what it judges.
    pub fn lock_gc(&self, on_wait: &mut dyn FnMut(&str)) -> Result<(LockGuard, SystemTime)> {
        let guard = locks::acquire(self.backend(), LockKind::Gc, None)?;
        let exclusive = !self.regions().iter().all(|r| r.backend.atomic_touch());
        let mut told = false;
        let live = loop {
            let live = locks::live_locks(&**self.backend())?;
            if let Some((_, other)) = live
                .iter()
                .find(|(n, i)| i.kind == LockKind::Gc && n != guard.name())
            {
                return Err(StoreError::Busy(format!(
                    "garbage collection is already running ({})",
                    other.describe()
                )));
            }
            let writers = live.iter().filter(|(_, i)| i.kind != LockKind::Gc).count();
            if !exclusive || writers == 0 {
                break live;
            }
            if !told {
                on_wait(&format!(
                    "waiting for {writers} running backup(s) or replication(s) to finish: \
                     this vault's object storage cannot spare what they touch otherwise"
                ));
                told = true;
            }
            std::thread::sleep(WAIT_POLL);
        };
        let oldest_writer = live
            .iter()
            .filter(|(_, i)| i.kind != LockKind::Gc)
            .map(|(_, i)| i.started())
            .min();
        let start = guard.info().started();
        let cutoff = oldest_writer.map_or(start, |w| w.min(start)) - SAFETY_MARGIN;
        Ok((guard, cutoff))
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
        let mut chunks: HashSet<Digest> = HashSet::new();
        let mut indexes: HashSet<Digest> = HashSet::new();
        let (mut points, bad) = self.points()?;
        let stop = |what: String| {
            StoreError::Invalid(format!(
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

        // Sweep, region by region.
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
                // The listing's time is only a first look; the backend judges again.
                if obj.modified < cutoff
                    && backend.remove_unless_touched(Kind::Chunk, &obj.name, cutoff)?
                {
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
                if !keep
                    && obj.modified < cutoff
                    && backend.remove_unless_touched(Kind::Index, &obj.name, cutoff)?
                {
                    report.indexes_removed += 1;
                }
            }
            report.temporaries_removed += backend.remove_temporaries(cutoff)?;
            backend.sync()?;
        }
        drop(guard);
        Ok(report)
    }
}
