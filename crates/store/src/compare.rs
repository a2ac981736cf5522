//! Comparing two regions object by object: how far the secondary lags, and the full
//! replication that copies whatever it lacks (`vault replicate`).
//!
//! The comparison is the truth the replication queue only approximates: it finds what a
//! queue that overflowed, a journal lost with its machine, or a crash between a write and its
//! journal line left behind. It is resumable by nature: a second run copies what the first
//! did not.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::backend::{Kind, ObjectInfo};
use crate::replicated::Region;
use crate::Result;

/// The kinds a secondary holds, in the order a copy must go: a manifest last, once what it
/// references is there.
pub const REPLICATED: [Kind; 5] = [
    Kind::Config,
    Kind::Key,
    Kind::Chunk,
    Kind::Index,
    Kind::Point,
];

/// One region's contents.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionSize {
    pub objects: u64,
    pub bytes: u64,
}

/// What the secondary lacks of the primary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Lag {
    pub objects: u64,
    pub bytes: u64,
    /// Age in seconds of the oldest object the secondary lacks.
    pub oldest_seconds: Option<u64>,
    /// Recovery points the secondary has and the primary does not (pruned while the
    /// secondary was unreachable, or lost from the primary: `verify --repair` tells which).
    pub points_only_in_secondary: u64,
}

/// The objects of `kind` in `from` that `to` lacks, and both regions' sizes.
fn missing(
    from: &Region,
    to: &Region,
    kind: Kind,
) -> Result<(Vec<ObjectInfo>, Vec<ObjectInfo>, Vec<ObjectInfo>)> {
    let a = from.backend.list(kind)?;
    let b = to.backend.list(kind)?;
    let have: HashSet<&str> = b.iter().map(|o| o.name.as_str()).collect();
    let lacking = a
        .iter()
        .filter(|o| !have.contains(o.name.as_str()))
        .cloned()
        .collect();
    Ok((lacking, a, b))
}

/// Sizes of both regions and the secondary's lag, from their listings.
pub fn lag(primary: &Region, secondary: &Region) -> Result<(RegionSize, RegionSize, Lag)> {
    let (mut p, mut s, mut lag) = (RegionSize::default(), RegionSize::default(), Lag::default());
    let now = SystemTime::now();
    for kind in REPLICATED {
        let (lacking, a, b) = missing(primary, secondary, kind)?;
        for (size, list) in [(&mut p, &a), (&mut s, &b)] {
            size.objects += list.len() as u64;
            size.bytes += list.iter().map(|o| o.size).sum::<u64>();
        }
        for o in &lacking {
            lag.objects += 1;
            lag.bytes += o.size;
            let age = now.duration_since(o.modified).unwrap_or_default().as_secs();
            lag.oldest_seconds = Some(lag.oldest_seconds.map_or(age, |x| x.max(age)));
        }
        if kind == Kind::Point {
            let (only, _, _) = missing(secondary, primary, kind)?;
            lag.points_only_in_secondary = only.len() as u64;
        }
    }
    Ok((p, s, lag))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub objects: u64,
    pub bytes: u64,
    /// Objects that could not be copied, with why (the first few).
    pub failed: u64,
    pub failures: Vec<String>,
    /// Whether recovery points were held back because something they may need failed.
    pub points_held_back: bool,
}

/// Copies everything `to` lacks from `from` with `threads` at once, manifests last (and not at
/// all if anything else failed, so `to` never holds a point it cannot restore). `progress`
/// is told the bytes to copy once, then each object's bytes as it lands.
pub fn copy_missing(
    from: &Region,
    to: &Region,
    threads: usize,
    progress: &(dyn Fn(Option<u64>, u64) + Sync),
) -> Result<CopyReport> {
    let mut work: Vec<(Kind, ObjectInfo)> = Vec::new();
    let mut points = Vec::new();
    for kind in REPLICATED {
        let (lacking, _, _) = missing(from, to, kind)?;
        let list = if kind == Kind::Point {
            &mut points
        } else {
            &mut work
        };
        list.extend(lacking.into_iter().map(|o| (kind, o)));
    }
    let total: u64 = work.iter().chain(&points).map(|(_, o)| o.size).sum();
    progress(Some(total), 0);
    let report = Mutex::new(CopyReport::default());
    let run = |batch: &[(Kind, ObjectInfo)]| {
        let next = AtomicUsize::new(0);
        let failed = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((kind, obj)) = batch.get(i) else {
                        return;
                    };
                    let copied = from.backend.read(*kind, &obj.name).and_then(|bytes| {
                        to.backend
                            .write(*kind, &obj.name, &bytes)
                            .map(|_| bytes.len())
                    });
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    match copied {
                        Ok(n) => {
                            r.objects += 1;
                            r.bytes += n as u64;
                            drop(r);
                            progress(None, n as u64);
                        }
                        // Removed from the source since the listing: nothing to copy.
                        Err(crate::StoreError::NotFound(_)) => {}
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            r.failed += 1;
                            if r.failures.len() < 10 {
                                r.failures.push(e.to_string());
                            }
                        }
                    }
                });
            }
        });
        failed.load(Ordering::Relaxed)
    };
    let failed = run(&work);
    if failed == 0 {
        to.backend.sync()?;
        run(&points);
        to.backend.sync()?;
    } else {
        report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .points_held_back = !points.is_empty();
    }
    Ok(report.into_inner().unwrap_or_else(|e| e.into_inner()))
}
