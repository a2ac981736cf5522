//! The agent's half of a backup through the server (docs/design.md, "The relay data path"):
//! an engine [`Destination`] whose chunks go to the server. The agent computes no chunk id
//! (it has no vault key): for a chunk its VM's tracking bitmap says is unchanged it claims the
//! base point's id at the same position, an all-zero chunk it names as zero, and every other
//! chunk it sends, compressed with the vault's zstd level, for the server to name and seal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver};
use vmvault_api::agent::{
    base_path, disk_path, job_path, put_frame, Accepted, BeginAnswer, BeginDisk, BeginRequest,
    CommitAnswer, CommitRequest, ReuseAnswer, ReuseRequest, ZeroRequest, MAX_FRAMES, RAW, ZSTD,
};
use vmvault_disk::DiskReader;
use vmvault_engine::{
    Begun, Changes, Destination, DiskToWrite, EngineError, KnownPoint, PointFacts, Progress,
};
use vmvault_format::{is_zero, PointId};

use crate::client::Client;
use crate::AgentError;

/// Chunks a request carries at most (also bounded by [`MAX_FRAMES`]).
const BATCH_BYTES: usize = 16 << 20;
/// Claims or zero runs per request.
const CLAIMS_PER_REQUEST: usize = 8192;

pub struct RelayDestination<'a> {
    client: &'a Client,
    job: i64,
    lease: String,
    /// Threads that compress and upload.
    workers: usize,
    begun: Option<BeginAnswer>,
    disks: Vec<DiskToWrite>,
}

fn engine(e: AgentError) -> EngineError {
    EngineError::Input(e.to_string())
}

impl<'a> RelayDestination<'a> {
    pub fn new(client: &'a Client, job: i64, lease: &str) -> Self {
        RelayDestination {
            client,
            job,
            lease: lease.to_string(),
            workers: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .clamp(1, 4),
            begun: None,
            disks: Vec::new(),
        }
    }

    fn lease(&self) -> Option<&str> {
        Some(&self.lease)
    }
}

impl Destination for RelayDestination<'_> {
    fn begin(
        &mut self,
        _vm: &str,
        disks: &[DiskToWrite],
        _progress: &dyn Progress,
    ) -> vmvault_engine::Result<Begun> {
        let req = BeginRequest {
            disks: disks
                .iter()
                .map(|d| BeginDisk {
                    name: d.name.clone(),
                    size: d.size,
                    format: d.format.to_string(),
                })
                .collect(),
        };
        let answer: BeginAnswer = self
            .client
            .post(&job_path(self.job, "begin"), self.lease(), &req)
            .map_err(engine)?;
        let point: PointId = answer
            .point
            .parse()
            .map_err(|_| EngineError::Input("the server named the point oddly".into()))?;
        let mut vault_id = [0u8; 16];
        hex::decode_to_slice(&answer.vault_id, &mut vault_id)
            .map_err(|_| EngineError::Input("the server's vault id is not 16 bytes".into()))?;
        let history = match &answer.base {
            Some(b) => vec![KnownPoint {
                id: b.id.parse().map_err(|_| {
                    EngineError::Input("the server named the base point oddly".into())
                })?,
                time: b.time.clone(),
                disks: b.disks.iter().map(|d| (d.name.clone(), d.size)).collect(),
            }],
            None => Vec::new(),
        };
        let begun = Begun {
            point,
            vault_id,
            chunk_size: answer.chunk_size,
            history,
        };
        self.disks = disks.to_vec();
        self.begun = Some(answer);
        Ok(begun)
    }

    fn write_disk(
        &mut self,
        disk: usize,
        source: &dyn DiskReader,
        changes: Option<Changes>,
        progress: &dyn Progress,
    ) -> vmvault_engine::Result<()> {
        let begun = self
            .begun
            .as_ref()
            .ok_or_else(|| EngineError::Input("write_disk before begin".into()))?;
        let chunk_size = begun.chunk_size as u64;
        let level = begun.zstd_level;
        let size = source.size();
        let count = size.div_ceil(chunk_size) as usize;
        let range = |i: usize| {
            let offset = i as u64 * chunk_size;
            (offset, (size - offset).min(chunk_size) as usize)
        };
        // The base point's ids, to claim unchanged chunks by.
        let base: Option<(Vec<[u8; 32]>, Changes)> = match changes {
            Some(c) => {
                let raw = self
                    .client
                    .get_raw(&base_path(self.job, disk), self.lease())
                    .map_err(engine)?
                    .unwrap_or_default();
                if raw.len() != count * 32 || c.dirty.len() != count {
                    progress
                        .message("the base point's index does not fit this disk: reading it whole");
                    None
                } else {
                    let ids = raw
                        .chunks_exact(32)
                        .map(|c| c.try_into().expect("32 bytes"))
                        .collect();
                    Some((ids, c))
                }
            }
            None => None,
        };
        let mut zeros = Vec::new();
        let mut claims = Vec::new();
        let mut to_read = Vec::new();
        for i in 0..count {
            match &base {
                Some((ids, c)) if c.dirty[i].is_empty() => {
                    if ids[i] == [0u8; 32] {
                        zeros.push(i as u64);
                    } else {
                        claims.push((i as u64, hex::encode(ids[i])));
                    }
                }
                _ => to_read.push(i),
            }
        }
        // Claims first: what the vault lacks is read and sent with the changed chunks.
        for batch in claims.chunks(CLAIMS_PER_REQUEST) {
            let answer: ReuseAnswer = self
                .client
                .post(
                    &disk_path(self.job, disk, "reuse"),
                    self.lease(),
                    &ReuseRequest {
                        claims: batch.to_vec(),
                    },
                )
                .map_err(engine)?;
            let missing: std::collections::HashSet<u64> = answer.missing.iter().copied().collect();
            for (pos, _) in batch {
                if missing.contains(pos) {
                    to_read.push(*pos as usize);
                } else {
                    progress.advance(range(*pos as usize).1 as u64);
                }
            }
        }
        to_read.sort_unstable();
        let zero_list = Mutex::new(zeros);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<EngineError>> = Mutex::new(None);
        let fail = |e: EngineError| {
            stop.store(true, Ordering::Relaxed);
            first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        };
        let (tx, rx) = bounded::<(u64, Vec<u8>)>(2 * self.workers + 2);
        std::thread::scope(|s| {
            for _ in 0..self.workers {
                let rx = rx.clone();
                let (stop, fail, zero_list) = (&stop, &fail, &zero_list);
                let (client, job, lease) = (self.client, self.job, self.lease.as_str());
                s.spawn(move || {
                    if let Err(e) = upload(
                        client, job, lease, disk, level, rx, stop, zero_list, progress,
                    ) {
                        fail(e);
                    }
                });
            }
            drop(rx);
            for &i in &to_read {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (offset, len) = range(i);
                match source.may_have_data(offset, len as u64) {
                    Ok(false) => {
                        zero_list
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(i as u64);
                        progress.advance(len as u64);
                        continue;
                    }
                    Ok(true) => {}
                    Err(e) => {
                        fail(EngineError::io(format!("reading disk at {offset}"), e));
                        break;
                    }
                }
                let mut buf = vec![0u8; len];
                if let Err(e) = source.read_at(&mut buf, offset) {
                    fail(EngineError::io(format!("reading disk at {offset}"), e));
                    break;
                }
                if tx.send((i as u64, buf)).is_err() {
                    break;
                }
            }
            drop(tx);
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut zeros = zero_list.into_inner().unwrap_or_else(|p| p.into_inner());
        zeros.sort_unstable();
        let runs = runs(&zeros);
        for batch in runs.chunks(CLAIMS_PER_REQUEST) {
            let _: Accepted = self
                .client
                .post(
                    &disk_path(self.job, disk, "zero"),
                    self.lease(),
                    &ZeroRequest {
                        runs: batch.to_vec(),
                    },
                )
                .map_err(engine)?;
        }
        Ok(())
    }

    fn commit(&mut self, facts: PointFacts) -> vmvault_engine::Result<PointId> {
        let config = toml::to_string(&facts.config)
            .map_err(|e| EngineError::Input(format!("the VM's configuration: {e}")))?;
        let req = CommitRequest {
            time: facts
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            source: facts.source,
            consistency: facts.consistency.to_string(),
            consistency_reason: facts.reason,
            vm_config: config,
        };
        let answer: CommitAnswer = self
            .client
            .post(&job_path(self.job, "commit"), self.lease(), &req)
            .map_err(engine)?;
        answer
            .point
            .parse()
            .map_err(|_| EngineError::Input("the server named the point oddly".into()))
    }
}

/// Compresses chunks and sends them in batches; all-zero ones join the zero list instead.
#[allow(clippy::too_many_arguments)]
fn upload(
    client: &Client,
    job: i64,
    lease: &str,
    disk: usize,
    level: i32,
    rx: Receiver<(u64, Vec<u8>)>,
    stop: &AtomicBool,
    zeros: &Mutex<Vec<u64>>,
    progress: &dyn Progress,
) -> vmvault_engine::Result<()> {
    let mut compressor =
        zstd::bulk::Compressor::new(level).map_err(|e| EngineError::io("starting zstd", e))?;
    let mut body = Vec::with_capacity(BATCH_BYTES + (1 << 20));
    let mut frames = 0;
    let mut pending = 0u64;
    let send =
        |body: &mut Vec<u8>, frames: &mut usize, pending: &mut u64| -> vmvault_engine::Result<()> {
            if *frames == 0 {
                return Ok(());
            }
            let _: Accepted = client
                .post_bytes(&disk_path(job, disk, "chunks"), Some(lease), body)
                .map_err(engine)?;
            progress.advance(*pending);
            body.clear();
            *frames = 0;
            *pending = 0;
            Ok(())
        };
    for (pos, buf) in rx.iter() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if is_zero(&buf) {
            zeros.lock().unwrap_or_else(|p| p.into_inner()).push(pos);
            progress.advance(buf.len() as u64);
            continue;
        }
        let packed = compressor
            .compress(&buf)
            .map_err(|e| EngineError::io("compressing a chunk", e))?;
        if packed.len() < buf.len() {
            put_frame(&mut body, pos, ZSTD, buf.len() as u32, &packed);
        } else {
            put_frame(&mut body, pos, RAW, buf.len() as u32, &buf);
        }
        frames += 1;
        pending += buf.len() as u64;
        if frames >= MAX_FRAMES || body.len() >= BATCH_BYTES {
            send(&mut body, &mut frames, &mut pending)?;
        }
    }
    if !stop.load(Ordering::Relaxed) {
        send(&mut body, &mut frames, &mut pending)?;
    }
    Ok(())
}

/// Sorted positions as `(first, count)` runs.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in sorted {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn positions_make_runs() {
        assert_eq!(
            super::runs(&[0, 1, 2, 5, 7, 8]),
            vec![(0, 3), (5, 1), (7, 2)]
        );
        assert!(super::runs(&[]).is_empty());
    }
}
