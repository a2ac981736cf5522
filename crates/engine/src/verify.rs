//! Verify: every point's manifest and indexes read back, every chunk they name exists, and with
//! `read_data` every chunk decrypts and hashes to its name.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use vmvault_format::{Digest, PointId};
use vmvault_store::{Kind, StoreError, Vault};

use crate::{Progress, Result};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub read_data: bool,
}

/// One thing found wrong, named down to the recovery point and disk it damages.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub points: usize,
    pub disks: usize,
    pub chunks_referenced: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn verify(
    vault: &Vault,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let present: HashSet<String> = vault
        .backend()
        .list(Kind::Chunk)?
        .into_iter()
        .map(|o| o.name)
        .collect();
    let (points, bad) = vault.points()?;
    for (id, e) in bad {
        report.problems.push(Problem {
            point: Some(id.to_hex()),
            vm: None,
            disk: None,
            detail: e.to_string(),
        });
    }
    report.points = points.len();
    // Each distinct chunk once, with its expected length (only a disk's last chunk is short).
    let mut wanted: HashMap<Digest, usize> = HashMap::new();
    // Which disks to name if a chunk turns out damaged; their indexes are re-read only then.
    let mut disks: Vec<(PointId, String, String, Digest, u64)> = Vec::new();
    for m in &points {
        for disk in &m.disks {
            report.disks += 1;
            let problem = |detail: String| Problem {
                point: Some(m.id.to_hex()),
                vm: Some(m.vm.clone()),
                disk: Some(disk.name.clone()),
                detail,
            };
            let index = match vault.load_index(&disk.index, disk.size) {
                Ok(i) => i,
                Err(e) => {
                    report.problems.push(problem(e.to_string()));
                    continue;
                }
            };
            let missing = index
                .chunks
                .iter()
                .filter(|d| !d.is_zero_chunk() && !present.contains(&d.to_hex()))
                .count();
            if missing > 0 {
                report.problems.push(problem(format!(
                    "{missing} chunk(s) missing from the vault"
                )));
            }
            for (i, d) in index.chunks.iter().enumerate() {
                if !d.is_zero_chunk() && present.contains(&d.to_hex()) {
                    wanted.entry(*d).or_insert(index.chunk_range(i).1);
                }
            }
            disks.push((m.id, m.vm.clone(), disk.name.clone(), disk.index, disk.size));
        }
    }
    report.chunks_referenced = wanted.len() as u64;
    if !opts.read_data {
        return Ok(report);
    }

    let total: u64 = wanted.values().map(|&l| l as u64).sum();
    progress.start("reading every chunk", total);
    let work: Vec<(Digest, usize)> = wanted.into_iter().collect();
    let next = AtomicUsize::new(0);
    let damaged = Mutex::new(HashMap::<Digest, String>::new());
    std::thread::scope(|s| {
        for _ in 0..crate::worker_count().max(vault.backend().concurrency()) {
            s.spawn(|| {
                let mut reader = vault.chunk_reader();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, len)) = work.get(i) else {
                        return;
                    };
                    match reader.read(digest, *len) {
                        Ok(_) => {}
                        // A chunk removed since the listing was reported missing above or is gone
                        // with its (pruned) point.
                        Err(StoreError::NotFound(_)) => {}
                        Err(e) => {
                            damaged
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(*digest, e.to_string());
                        }
                    }
                    progress.advance(*len as u64);
                }
            });
        }
    });
    progress.finish();
    report.chunks_read = work.len() as u64;
    report.bytes_read = total;
    let damaged = damaged.into_inner().unwrap_or_else(|e| e.into_inner());
    if damaged.is_empty() {
        return Ok(report);
    }
    for (id, vm, disk, index_digest, size) in &disks {
        let Ok(index) = vault.load_index(index_digest, *size) else {
            continue;
        };
        let bad: Vec<&Digest> = index
            .chunks
            .iter()
            .filter(|d| damaged.contains_key(d))
            .collect();
        if let Some(first) = bad.first() {
            report.problems.push(Problem {
                point: Some(id.to_hex()),
                vm: Some(vm.clone()),
                disk: Some(disk.clone()),
                detail: format!("{} damaged chunk(s), first: {}", bad.len(), damaged[first]),
            });
        }
    }
    Ok(report)
}
