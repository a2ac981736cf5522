//! An agent backup's data routes: `begin` (the lock, the point's id, the base point), the base
//! index, claims of the base's chunks, zero runs, uploads, and `commit`. Each position of each
//! disk is filled once, by exactly one of them; only a commit with all filled writes a point.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vmvault_api::agent::{
    BasePoint, BeginAnswer, BeginDisk, BeginRequest, CommitRequest, ReuseAnswer, MAX_FRAMES, RAW,
    ZSTD,
};
use vmvault_format::{
    is_zero, max_disk_size, Consistency, Digest, DiskIndex, DiskRecord, Manifest, ObjectKind,
    PointId, TransferStats, VmConfig, MANIFEST_VERSION, MAX_DISK_CHUNKS,
};

use super::{Begun, Caller, DiskFill, Fill, Phase, Relay};
use crate::app::App;
use crate::{Error, Result};

impl App {
    /// `begin`: the VM's backup lock, the new point's id, and the base point.
    pub fn agent_begin(
        &self,
        job: i64,
        caller: &Caller<'_>,
        req: &BeginRequest,
    ) -> Result<BeginAnswer> {
        let relay = self.relay_for(job, caller)?;
        if !matches!(relay.state().phase, Phase::Leased) {
            return Err(Error::Conflict(format!("job {job} has begun already")));
        }
        let vault = &relay.vault;
        let chunk_size = vault.config().chunk_size;
        if req.disks.is_empty() || req.disks.len() > 64 {
            return Err(relay.fail("a backup names 1 to 64 disks".into()));
        }
        let mut names = std::collections::HashSet::new();
        for d in &req.disks {
            if crate::api::check_name(&d.name, "disk").is_err() || !names.insert(&d.name) {
                return Err(relay.fail(format!(
                    "disk name {:?} is not valid or is repeated",
                    d.name
                )));
            }
            if d.size == 0 || d.size > max_disk_size(chunk_size) {
                return Err(
                    relay.fail(format!("disk {} has a size this vault cannot hold", d.name))
                );
            }
            if !matches!(d.format.as_str(), "raw" | "qcow2" | "vmdk" | "vhd" | "vhdx") {
                return Err(relay.fail(format!(
                    "disk {} has an unknown format {:?}",
                    d.name, d.format
                )));
            }
        }
        // The job's indexes are in memory until its commit, so its disks hold at most as
        // many chunks in all as the largest disk may: one begin must not make the server
        // reserve more (64 disks of the largest size would be 33 GiB at 1 MiB chunks).
        let chunks: u64 = req
            .disks
            .iter()
            .map(|d| DiskIndex::chunk_count(d.size, chunk_size))
            .sum();
        if chunks > MAX_DISK_CHUNKS {
            return Err(relay.fail(format!(
                "the disks hold {chunks} chunks in all, more than the {MAX_DISK_CHUNKS} of the \
                 largest disk a backup through the agent may have"
            )));
        }
        let lock = vault.lock_backup(&relay.item, &mut |m| self.job_log(job, m))?;
        let (points, _) = vault.points()?;
        // Only this host's points: a VM name protected again on another host must not let
        // that host claim the first host's chunks.
        let base = points
            .into_iter()
            .filter(|m| m.vm == relay.item && m.host == relay.host)
            .max_by(|a, b| a.time.cmp(&b.time));
        let point = PointId::generate();
        let disks = req
            .disks
            .iter()
            .map(|d| {
                let count = DiskIndex::chunk_count(d.size, chunk_size) as usize;
                DiskFill {
                    name: d.name.clone(),
                    format: d.format.clone(),
                    index: DiskIndex {
                        disk_size: d.size,
                        chunk_size,
                        chunks: vec![Digest::ZERO_CHUNK; count],
                    },
                    fill: vec![Fill::Empty; count],
                    base: None,
                    base_record: base.as_ref().and_then(|b| {
                        b.disks
                            .iter()
                            .find(|r| r.name == d.name && r.size == d.size)
                            .cloned()
                    }),
                    stats: TransferStats::default(),
                }
            })
            .collect();
        let total: u64 = req.disks.iter().map(|d| d.size).sum();
        relay.live.total.store(total, Ordering::Relaxed);
        self.job_log(
            job,
            &format!(
                "backing up {} on host '{}' ({} disk(s)) as point {}",
                relay.item,
                relay.host,
                req.disks.len(),
                point.short()
            ),
        );
        let answer = BeginAnswer {
            point: point.to_hex(),
            vault_id: hex::encode(vault.config().vault_id),
            chunk_size,
            zstd_level: vault.config().zstd_level,
            base: base.as_ref().map(|b| BasePoint {
                id: b.id.to_hex(),
                time: b.time.clone(),
                disks: b
                    .disks
                    .iter()
                    .map(|r| BeginDisk {
                        name: r.name.clone(),
                        size: r.size,
                        format: r.format.clone(),
                    })
                    .collect(),
            }),
        };
        relay.state().phase = Phase::Begun(Box::new(Begun {
            lock,
            point,
            began: self.now(),
            disks,
        }));
        Ok(answer)
    }

    /// The base point's index of disk `disk` (32 bytes a chunk): what reuse claims are
    /// checked against.
    pub fn agent_base(&self, job: i64, caller: &Caller<'_>, disk: usize) -> Result<Vec<u8>> {
        let relay = self.relay_for(job, caller)?;
        let index = self.base_index(&relay, disk)?;
        let mut out = Vec::with_capacity(index.chunks.len() * 32);
        for d in &index.chunks {
            out.extend_from_slice(&d.0);
        }
        Ok(out)
    }

    fn base_index(&self, relay: &Relay, disk: usize) -> Result<Arc<DiskIndex>> {
        let record = relay.with_begun(|b| {
            let d = b
                .disks
                .get(disk)
                .ok_or_else(|| Error::NotFound(format!("no disk {disk}")))?;
            if let Some(i) = &d.base {
                return Ok(Err(i.clone()));
            }
            d.base_record.clone().map(Ok).ok_or_else(|| {
                Error::NotFound(format!("disk {} has no base point to build on", d.name))
            })
        })?;
        let record = match record {
            Err(loaded) => return Ok(loaded),
            Ok(r) => r,
        };
        let index = Arc::new(relay.vault.load_index(&record.index, record.size)?);
        relay.with_begun(|b| {
            b.disks[disk].base = Some(index.clone());
            Ok(())
        })?;
        Ok(index)
    }

    /// Claims of the base point's chunks at the same positions; answers the positions whose
    /// chunk the vault lacks. A claim of anything else fails the job.
    pub fn agent_reuse(
        &self,
        job: i64,
        caller: &Caller<'_>,
        disk: usize,
        claims: &[(u64, String)],
    ) -> Result<ReuseAnswer> {
        let relay = self.relay_for(job, caller)?;
        let base = self.base_index(&relay, disk)?;
        let mut checked = Vec::with_capacity(claims.len());
        for (pos, id) in claims {
            let claimed = id.parse::<Digest>().ok();
            let at = base.chunks.get(*pos as usize);
            match (claimed, at) {
                (Some(c), Some(b)) if c == *b => checked.push((*pos as usize, c)),
                _ => {
                    let why = format!(
                        "host '{}' claimed a chunk at position {pos} of disk {disk} that is not the \
                         base point's there",
                        relay.host
                    );
                    crate::auth::audit(
                        &self.db,
                        &format!("host:{}", relay.host),
                        "agent.reuse",
                        &job.to_string(),
                        &format!("denied: {why}"),
                    );
                    return Err(relay.fail(why));
                }
            }
        }
        let mut missing = Vec::new();
        for (pos, digest) in checked {
            let len = base.chunk_range(pos).1;
            let fill = if digest == Digest::ZERO_CHUNK {
                Some(Fill::Zero)
            } else if relay.vault.touch_chunk(&digest, len)? {
                Some(Fill::Reused)
            } else {
                None
            };
            match fill {
                Some(f) => self.fill(&relay, disk, pos, digest, f, len as u64, 0)?,
                None => missing.push(pos as u64),
            }
        }
        Ok(ReuseAnswer { missing })
    }

    /// Sets one position; the same fill again is a retried request, another one fails the job.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        relay: &Relay,
        disk: usize,
        pos: usize,
        digest: Digest,
        how: Fill,
        len: u64,
        stored: u64,
    ) -> Result<()> {
        let r = relay.with_begun(|b| {
            let d = b
                .disks
                .get_mut(disk)
                .ok_or_else(|| Error::NotFound(format!("no disk {disk}")))?;
            match d.fill.get(pos) {
                None => {
                    return Ok(Some(format!(
                        "position {pos} is past the end of disk {}",
                        d.name
                    )))
                }
                Some(Fill::Empty) => {}
                Some(_) if d.index.chunks[pos] == digest => return Ok(None),
                Some(_) => {
                    return Ok(Some(format!(
                        "position {pos} of disk {} was filled twice, differently",
                        d.name
                    )))
                }
            }
            d.fill[pos] = how;
            d.index.chunks[pos] = digest;
            match how {
                Fill::Zero => d.stats.chunks_zero += 1,
                Fill::Reused => d.stats.chunks_reused += 1,
                Fill::Sent if stored > 0 => {
                    d.stats.chunks_new += 1;
                    d.stats.bytes_new += len;
                    d.stats.bytes_stored += stored;
                }
                Fill::Sent => d.stats.chunks_reused += 1,
                Fill::Empty => {}
            }
            if how == Fill::Sent {
                d.stats.bytes_read += len;
            }
            Ok(None)
        })?;
        match r {
            Some(why) => Err(relay.fail(why)),
            None => {
                relay.live.done.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Runs of all-zero chunks.
    pub fn agent_zero(
        &self,
        job: i64,
        caller: &Caller<'_>,
        disk: usize,
        runs: &[(u64, u64)],
    ) -> Result<u64> {
        let relay = self.relay_for(job, caller)?;
        let (count, layout) = relay.with_begun(|b| {
            let d = b
                .disks
                .get(disk)
                .ok_or_else(|| Error::NotFound(format!("no disk {disk}")))?;
            Ok((
                d.fill.len() as u64,
                DiskIndex {
                    chunks: Vec::new(),
                    ..d.index
                },
            ))
        })?;
        // All runs checked first. Together they cover at most the disk once: runs that
        // overlap, each position again and again, would make one small request loop for hours.
        let mut total = 0u64;
        for &(first, len) in runs {
            if first.checked_add(len).is_none_or(|e| e > count) {
                return Err(relay.fail(format!(
                    "zero run {first}+{len} is past the end of disk {disk}"
                )));
            }
            total += len;
            if total > count {
                return Err(relay.fail(format!(
                    "the zero runs of one request cover more than the {count} positions of disk \
                     {disk}"
                )));
            }
        }
        let mut n = 0;
        for &(first, len) in runs {
            for pos in first..first + len {
                let l = layout.chunk_range(pos as usize).1 as u64;
                self.fill(
                    &relay,
                    disk,
                    pos as usize,
                    Digest::ZERO_CHUNK,
                    Fill::Zero,
                    l,
                    0,
                )?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Uploaded chunks: each frame checked, decompressed into exactly its position's length,
    /// named with the vault's id key, and stored only if the vault lacks it.
    pub fn agent_chunks(
        &self,
        job: i64,
        caller: &Caller<'_>,
        disk: usize,
        body: &[u8],
    ) -> Result<u64> {
        let relay = self.relay_for(job, caller)?;
        let Some(frames) = vmvault_api::agent::frames(body) else {
            return Err(relay.fail("an upload's frames are cut short or malformed".into()));
        };
        if frames.len() > MAX_FRAMES {
            return Err(relay.fail(format!("an upload carries at most {MAX_FRAMES} chunks")));
        }
        let layout = relay.with_begun(|b| {
            let d = b
                .disks
                .get(disk)
                .ok_or_else(|| Error::NotFound(format!("no disk {disk}")))?;
            Ok(DiskIndex {
                chunks: Vec::new(),
                ..d.index
            })
        })?;
        let count = DiskIndex::chunk_count(layout.disk_size, layout.chunk_size);
        let codec = relay.vault.codec();
        let mut sealer = codec.sealer();
        let mut sealed = Vec::new();
        let mut plain = Vec::new();
        let mut decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| Error::io("starting zstd", e))?;
        for (pos, compression, plain_len, body) in frames {
            if pos >= count {
                return Err(relay.fail(format!(
                    "a chunk at position {pos}, past the end of disk {disk}"
                )));
            }
            let len = layout.chunk_range(pos as usize).1;
            if plain_len as usize != len {
                return Err(relay.fail(format!(
                    "the chunk at position {pos} says {plain_len} bytes; that position holds {len}"
                )));
            }
            plain.clear();
            match compression {
                RAW if body.len() == len => plain.extend_from_slice(body),
                ZSTD => {
                    let one_frame = zstd::zstd_safe::find_frame_compressed_size(body)
                        .is_ok_and(|n| n == body.len());
                    plain.resize(len, 0);
                    let got = if one_frame {
                        decompressor.decompress_to_buffer(body, &mut plain[..]).ok()
                    } else {
                        None
                    };
                    if got != Some(len) {
                        return Err(relay.fail(format!(
                            "the chunk at position {pos} is not one zstd frame of exactly {len} bytes"
                        )));
                    }
                }
                _ => {
                    return Err(relay.fail(format!(
                        "the chunk at position {pos} has an unknown encoding or a wrong length"
                    )))
                }
            }
            if is_zero(&plain) {
                self.fill(
                    &relay,
                    disk,
                    pos as usize,
                    Digest::ZERO_CHUNK,
                    Fill::Zero,
                    len as u64,
                    0,
                )?;
                continue;
            }
            let digest = codec.digest(&plain);
            let stored = if relay.vault.touch_chunk(&digest, len)? {
                0
            } else {
                sealer.seal(ObjectKind::Chunk, &plain, &mut sealed);
                relay.vault.write_chunk(&digest, &sealed)?;
                sealed.len() as u64
            };
            self.fill(
                &relay,
                disk,
                pos as usize,
                digest,
                Fill::Sent,
                len as u64,
                stored,
            )?;
        }
        Ok(body.len() as u64)
    }

    /// `commit`: every position filled; the indexes, then the manifest, which the server
    /// writes: the point's id, VM, host, stats and retention are its own.
    pub fn agent_commit(
        &self,
        job: i64,
        caller: &Caller<'_>,
        req: &CommitRequest,
    ) -> Result<String> {
        let relay = self.relay_for(job, caller)?;
        let consistency: Consistency = serde_json::from_value(serde_json::json!(req.consistency))
            .map_err(|_| {
            relay.fail(format!(
                "consistency {:?} is not application, filesystem or crash",
                req.consistency
            ))
        })?;
        if !matches!(req.source.as_str(), "qemu" | "image") {
            return Err(relay.fail(format!("source {:?} is not qemu or image", req.source)));
        }
        if req.consistency_reason.len() > 4096 || req.vm_config.len() > 1 << 20 {
            return Err(relay.fail("a commit's reason or VM configuration is too long".into()));
        }
        let mut config: VmConfig = toml::from_str(&req.vm_config)
            .map_err(|e| relay.fail(format!("the VM configuration: {e}")))?;
        config.name = relay.item.clone();
        let agent_time = crate::db::parse_ts(&req.time)
            .ok_or_else(|| relay.fail(format!("time {:?} is not RFC 3339", req.time)))?;
        let begun = {
            let mut st = relay.state();
            st.last_contact = Instant::now();
            match std::mem::replace(&mut st.phase, Phase::Leased) {
                Phase::Begun(b) => b,
                other => {
                    st.phase = other;
                    return Err(Error::Conflict(format!("job {job} is not begun")));
                }
            }
        };
        let unfilled = begun.disks.iter().find_map(|d| {
            d.fill
                .iter()
                .position(|f| *f == Fill::Empty)
                .map(|p| (d.name.clone(), p))
        });
        if let Some((disk, pos)) = unfilled {
            relay.state().phase = Phase::Begun(begun);
            return Err(Error::Input(format!(
                "disk {disk}: position {pos} was never sent, claimed or zeroed"
            )));
        }
        let now = self.now();
        let time = agent_time.clamp(begun.began, now);
        let mut records = Vec::new();
        let mut total = TransferStats::default();
        for d in &begun.disks {
            let digest = relay.vault.save_index(&d.index)?;
            total.add(&d.stats);
            records.push(DiskRecord {
                name: d.name.clone(),
                format: d.format.clone(),
                size: d.index.disk_size,
                index: digest,
                stats: d.stats,
            });
        }
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id: begun.point,
            vm: relay.item.clone(),
            time: time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            source: req.source.clone(),
            consistency,
            consistency_reason: if consistency == Consistency::Application {
                String::new()
            } else {
                req.consistency_reason.clone()
            },
            host: relay.host.clone(),
            program: format!(
                "vmvault {} (through the host agent)",
                env!("CARGO_PKG_VERSION")
            ),
            chunk_size: relay.vault.config().chunk_size,
            vm_config: config,
            disks: records,
            stats: total,
            retention: relay.retention.clone(),
        };
        if let Err(e) = relay.vault.commit_point(&begun.lock, &manifest) {
            let why = format!("committing the point: {e}");
            relay.state().phase = Phase::Failed(why);
            relay.changed.notify_all();
            return Err(e.into());
        }
        drop(begun);
        crate::catalog::add(&self.db, &self.vault_name, &manifest)?;
        let id = manifest.id.to_hex();
        relay.state().phase = Phase::Committed(Box::new(manifest));
        relay.changed.notify_all();
        Ok(id)
    }
}
