//! Verify: every point's manifest and indexes read back, every chunk they name exists, and with
//! `read_data` every chunk decrypts and hashes to its name.
//!
//! A vault in two regions is verified region by region, each on its own (no fallback hides a
//! bad copy), against the union of their recovery points. With `repair`, a copy missing or
//! damaged in one region is rewritten from the other region's good copy: chunks and indexes
//! first, manifests last.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use vmvault_format::{Digest, Manifest, PointId};
use vmvault_store::{Kind, StoreError, Vault};

use crate::{Progress, Result};

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    pub read_data: bool,
    /// Rewrite a missing or damaged copy from the other region.
    pub repair: bool,
}

/// One thing found wrong, named down to the recovery point and disk it damages.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The region it is in, when the vault has more than one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    pub detail: String,
    /// The objects at fault, which a repair rewrites from another region.
    #[serde(skip)]
    pub objects: Vec<(Kind, String)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub points: usize,
    pub disks: usize,
    pub chunks_referenced: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    /// Objects rewritten from the other region's copy (with `repair`).
    pub repaired: u64,
    /// Problems a repair mended (they are no longer in `problems`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mended: Vec<Problem>,
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
    if vault.regions().len() == 1 {
        return verify_region(vault, None, &[], opts, progress);
    }
    let mut report = verify_regions(vault, opts, progress)?;
    if !opts.repair {
        return Ok(report);
    }
    // What one round cannot see (the chunks behind an index missing from a region) shows once
    // the index is back: verify again after every round that mended something.
    repair(vault, &mut report)?;
    let mut repaired = report.repaired;
    for _ in 0..MAX_REPAIR_ROUNDS {
        if report.repaired == 0 {
            break;
        }
        let mended = std::mem::take(&mut report.mended);
        report = verify_regions(vault, opts, progress)?;
        repair(vault, &mut report)?;
        repaired += report.repaired;
        report.mended.splice(0..0, mended);
    }
    report.repaired = repaired;
    Ok(report)
}

/// Verify passes after the first repair, at most: each can only uncover what the previous one
/// put back an index for.
const MAX_REPAIR_ROUNDS: usize = 3;

/// Every region on its own, against the union of their recovery points.
fn verify_regions(
    vault: &Vault,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut all: Vec<HashSet<PointId>> = Vec::new();
    for i in 0..vault.regions().len() {
        all.push(vault.region_view(i).point_ids()?.into_iter().collect());
    }
    let union: HashSet<PointId> = all.iter().flatten().copied().collect();
    let mut total = VerifyReport::default();
    for (i, region) in vault.regions().iter().enumerate() {
        // Points only another region has: their manifests come from there (through the whole
        // vault), and their indexes and chunks are looked for in this region too.
        let missing: Vec<Manifest> = union
            .difference(&all[i])
            .filter_map(|id| vault.load_manifest(id).ok())
            .collect();
        let view = vault.region_view(i);
        let r = verify_region(&view, Some(&region.name), &missing, opts, progress)?;
        total.points = total.points.max(r.points);
        total.disks = total.disks.max(r.disks);
        total.chunks_referenced = total.chunks_referenced.max(r.chunks_referenced);
        total.chunks_read += r.chunks_read;
        total.bytes_read += r.bytes_read;
        total.problems.extend(r.problems);
    }
    Ok(total)
}

/// Rewrites each problem's objects from a region that holds them whole; a problem whose
/// objects were all rewritten moves to `mended`.
fn repair(vault: &Vault, report: &mut VerifyReport) -> Result<()> {
    let regions = vault.regions();
    let mut problems = std::mem::take(&mut report.problems);
    // Manifests last: a point is put back only after what it references.
    problems.sort_by_key(|p| p.objects.iter().any(|(k, _)| *k == Kind::Point));
    for p in problems {
        let Some(i) = regions
            .iter()
            .position(|r| Some(&r.name) == p.region.as_ref())
        else {
            report.problems.push(p);
            continue;
        };
        let mut whole = !p.objects.is_empty();
        for (kind, name) in &p.objects {
            // A verified read: the other region's copy is judged before it is spread.
            let good = (0..regions.len())
                .filter(|&j| j != i)
                .find_map(|j| regions[j].backend.read(*kind, name).ok());
            match good {
                Some(bytes) => {
                    regions[i].backend.write(*kind, name, &bytes)?;
                    report.repaired += 1;
                }
                None => whole = false,
            }
        }
        regions[i].backend.sync()?;
        if whole {
            report.mended.push(p);
        } else {
            report.problems.push(p);
        }
    }
    Ok(())
}

/// Verifies one region (`vault` seen through it alone, or the whole vault); `missing_points`
/// are points another region has and this one lacks.
fn verify_region(
    vault: &Vault,
    region: Option<&str>,
    missing_points: &[Manifest],
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let region = region.map(str::to_string);
    let problem = |point: Option<&Manifest>,
                   disk: Option<&str>,
                   detail: String,
                   objects: Vec<(Kind, String)>| Problem {
        region: region.clone(),
        point: point.map(|m| m.id.to_hex()),
        vm: point.map(|m| m.vm.clone()),
        disk: disk.map(str::to_string),
        detail,
        objects,
    };
    let present: HashSet<String> = vault
        .backend()
        .list(Kind::Chunk)?
        .into_iter()
        .map(|o| o.name)
        .collect();
    let (mut points, bad) = vault.all_points()?;
    for (id, e) in bad {
        report.problems.push(Problem {
            point: Some(id.to_hex()),
            ..problem(None, None, e.to_string(), vec![(Kind::Point, id.to_hex())])
        });
    }
    for m in missing_points {
        report.problems.push(problem(
            Some(m),
            None,
            "recovery point missing from this region".into(),
            vec![(Kind::Point, m.id.to_hex())],
        ));
    }
    points.extend(missing_points.iter().cloned());
    report.points = points.len();
    // Each distinct chunk once, with its expected length (only a disk's last chunk is short).
    let mut wanted: HashMap<Digest, usize> = HashMap::new();
    // Which disks to name if a chunk turns out damaged; their indexes are re-read only then.
    let mut disks: Vec<(&Manifest, String, Digest, u64)> = Vec::new();
    for m in &points {
        for disk in &m.disks {
            report.disks += 1;
            let index = match vault.load_index(&disk.index, disk.size) {
                Ok(i) => i,
                Err(e) => {
                    let objects = vec![(Kind::Index, disk.index.to_hex())];
                    report.problems.push(problem(
                        Some(m),
                        Some(&disk.name),
                        e.to_string(),
                        objects,
                    ));
                    continue;
                }
            };
            let missing: Vec<(Kind, String)> = index
                .chunks
                .iter()
                .filter(|d| !d.is_zero_chunk() && !present.contains(&d.to_hex()))
                .map(|d| (Kind::Chunk, d.to_hex()))
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            if !missing.is_empty() {
                let detail = format!("{} chunk(s) missing from the vault", missing.len());
                report
                    .problems
                    .push(problem(Some(m), Some(&disk.name), detail, missing));
            }
            for (i, d) in index.chunks.iter().enumerate() {
                if !d.is_zero_chunk() && present.contains(&d.to_hex()) {
                    wanted.entry(*d).or_insert(index.chunk_range(i).1);
                }
            }
            disks.push((m, disk.name.clone(), disk.index, disk.size));
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
    for (m, disk, index_digest, size) in &disks {
        let Ok(index) = vault.load_index(index_digest, *size) else {
            continue;
        };
        let bad: HashSet<&Digest> = index
            .chunks
            .iter()
            .filter(|d| damaged.contains_key(d))
            .collect();
        if let Some(first) = bad.iter().next() {
            let detail = format!("{} damaged chunk(s), first: {}", bad.len(), damaged[first]);
            let objects = bad.iter().map(|d| (Kind::Chunk, d.to_hex())).collect();
            report
                .problems
                .push(problem(Some(m), Some(disk), detail, objects));
        }
    }
    Ok(report)
}
