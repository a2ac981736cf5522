//! Backup: disk → fixed-size chunks → zero test → keyed digest → dedup → zstd → AES-GCM → vault.
//!
//! Per disk, one reader thread reads chunks in disk order into a fixed pool of buffers, and one
//! worker per core tests, hashes, seals and writes them; the calling thread collects digests
//! into the index and reports progress. Memory is the buffer pool (a few chunks per worker),
//! whatever the disk's size. Holes the source reports are never read.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver, Sender};
use vmvault_disk::DiskReader;
use vmvault_format::{
    is_zero, max_disk_size, Consistency, Digest, DiskIndex, DiskRecord, Manifest, ObjectKind,
    PointId, PointRetention, TransferStats, MANIFEST_VERSION, MAX_DISK_CHUNKS,
};
use vmvault_store::{locks::hostname, Vault};

use crate::{EngineError, Progress, Result, VmDescription};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Threads that hash, compress, encrypt and write; one per core by default.
    pub workers: usize,
    /// The retention the point records (its manifest's `retention`).
    pub retention: PointRetention,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            workers: crate::worker_count(),
            retention: PointRetention::None,
        }
    }
}

/// Backs up an offline VM from its disk image files; returns the new point's manifest.
pub fn backup_image_vm(
    vault: &Vault,
    desc: &VmDescription,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let reason = "offline VM: backed up from its disk image files";
    backup_image_vm_as(vault, desc, opts, progress, "image", reason)
}

/// [`backup_image_vm`], with the source and the consistency's reason the point records.
pub(crate) fn backup_image_vm_as(
    vault: &Vault,
    desc: &VmDescription,
    opts: &BackupOptions,
    progress: &dyn Progress,
    source: &str,
    reason: &str,
) -> Result<Manifest> {
    // Every disk is opened before anything is written, so a missing one fails cleanly.
    let mut readers = Vec::new();
    for d in &desc.disks {
        let reader = vmvault_disk::open_allowing(&d.path, &d.format, &d.allow_backing)?;
        check_size(vault, &d.name, reader.size())?;
        readers.push(reader);
    }
    let lock = vault.lock_backup(&desc.name, &mut |msg| progress.message(msg))?;
    let time = chrono::Utc::now();

    let mut disks = Vec::new();
    let mut total = TransferStats::default();
    for (d, reader) in desc.disks.iter().zip(&readers) {
        progress.start(&format!("{} disk {}", desc.name, d.name), reader.size());
        let (index, stats) = back_up_disk(vault, &**reader, opts, None, progress)?;
        progress.finish();
        let digest = vault.save_index(&index)?;
        total.add(&stats);
        disks.push(DiskRecord {
            name: d.name.clone(),
            format: reader.format().to_string(),
            size: reader.size(),
            index: digest,
            stats,
        });
    }
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: PointId::generate(),
        vm: desc.name.clone(),
        time: time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        source: source.into(),
        consistency: Consistency::Crash,
        consistency_reason: reason.into(),
        host: hostname(),
        program: format!("vmvault {}", env!("CARGO_PKG_VERSION")),
        chunk_size: vault.config().chunk_size,
        vm_config: desc.to_config(),
        disks,
        stats: total,
        retention: opts.retention.clone(),
    };
    vault.commit_point(&lock, &manifest)?;
    Ok(manifest)
}

/// Refuses a disk larger than the vault's chunk size allows ([`max_disk_size`]): its index
/// would not fit in the memory the backup and every later reader may take for it.
pub(crate) fn check_size(vault: &Vault, disk: &str, size: u64) -> Result<()> {
    let chunk_size = vault.config().chunk_size;
    let max = max_disk_size(chunk_size);
    if size <= max {
        return Ok(());
    }
    Err(EngineError::Input(format!(
        "disk {disk} is {size} bytes ({}), larger than the {} a vault with {} chunks backs up \
         (at most {MAX_DISK_CHUNKS} chunks a disk)",
        exact_size(size),
        exact_size(max),
        exact_size(chunk_size as u64)
    )))
}

/// `n` in the largest binary unit that divides it exactly ("1 PiB", "64 KiB"), or to one
/// decimal where none does: a limit reads as the power of two it is.
fn exact_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut u = 0;
    while u + 1 < UNITS.len() && n > 0 && n.is_multiple_of(1u64 << (10 * (u + 1))) {
        u += 1;
    }
    if u > 0 || n < 1024 {
        return format!("{} {}", n >> (10 * u), UNITS[u]);
    }
    let mut v = n as f64;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// How many stored bytes between background syncs.
const FLUSH_EVERY: u64 = 64 << 20;

enum Outcome {
    Zero,
    Reused(Digest),
    New(Digest, u64),
    /// A chunk of the previous point the vault no longer has (or cannot read).
    Missing,
}

struct Done {
    i: usize,
    len: usize,
    /// Bytes read from the source for this chunk.
    read: u64,
    outcome: Result<Outcome>,
}

/// What changed since a previous point of the same disk, per chunk: the changed ranges
/// (offset in the chunk, length), sorted; none for an unchanged chunk.
pub(crate) struct Unchanged<'a> {
    pub previous: &'a DiskIndex,
    pub dirty: Vec<Vec<(u32, u32)>>,
}

/// What to do with one chunk.
#[derive(Clone)]
enum Action {
    Read,
    /// Unchanged since the previous point: keep its digest (touched, so GC keeps it).
    Keep(Digest),
    /// A little of it changed: read those ranges from the source and the rest from the
    /// previous point's chunk, so that the source is read about as much as it was written.
    Patch(Digest, Vec<(u32, u32)>),
    /// Already settled in an earlier pass.
    Skip,
}

/// Backs up one disk; returns its index and what was moved. With `unchanged`, only changed
/// chunks are read; a kept chunk the vault has lost is read after all, in a second pass.
pub(crate) fn back_up_disk(
    vault: &Vault,
    reader: &dyn DiskReader,
    opts: &BackupOptions,
    unchanged: Option<Unchanged<'_>>,
    progress: &dyn Progress,
) -> Result<(DiskIndex, TransferStats)> {
    let chunk_size = vault.config().chunk_size;
    let size = reader.size();
    let count = DiskIndex::chunk_count(size, chunk_size) as usize;
    let mut index = DiskIndex {
        disk_size: size,
        chunk_size,
        chunks: vec![Digest::ZERO_CHUNK; count],
    };
    let actions = match unchanged {
        Some(u) if u.previous.chunks.len() == count && u.dirty.len() == count => Plan::Each(
            u.dirty
                .into_iter()
                .zip(&u.previous.chunks)
                .map(|(ranges, &d)| {
                    let dirty: u64 = ranges.iter().map(|r| r.1 as u64).sum();
                    if ranges.is_empty() {
                        Action::Keep(d)
                    } else if dirty * 2 < chunk_size as u64 {
                        Action::Patch(d, ranges)
                    } else {
                        Action::Read
                    }
                })
                .collect(),
        ),
        _ => Plan::All(Action::Read),
    };
    let mut stats = TransferStats::default();
    let missing = run_pipeline(
        vault, reader, opts, &actions, &mut index, &mut stats, progress,
    )?;
    if !missing.is_empty() {
        progress.message(&format!(
            "{} chunks of the previous point are missing from the vault or unreadable: \
             reading them whole from the disk",
            missing.len()
        ));
        let mut again = vec![Action::Skip; count];
        for i in missing {
            again[i] = Action::Read;
        }
        let again = Plan::Each(again);
        let left = run_pipeline(
            vault, reader, opts, &again, &mut index, &mut stats, progress,
        )?;
        debug_assert!(left.is_empty(), "a read chunk is never missing");
    }
    Ok((index, stats))
}

/// One pass of the pipeline over `actions`; returns the kept chunks the vault lacked.
fn run_pipeline(
    vault: &Vault,
    reader: &dyn DiskReader,
    opts: &BackupOptions,
    actions: &Plan,
    index: &mut DiskIndex,
    stats: &mut TransferStats,
    progress: &dyn Progress,
) -> Result<Vec<usize>> {
    let chunk_size = index.chunk_size;
    // An object store's latency, not the CPU, bounds one upload: more requests in flight.
    let workers = opts.workers.max(vault.backend().concurrency()).max(1);
    let pool = 2 * workers + 2;
    let (free_tx, free_rx) = bounded::<Vec<u8>>(pool);
    for _ in 0..pool {
        free_tx
            .send(Vec::with_capacity(chunk_size as usize))
            .expect("pool channel has room");
    }
    let (work_tx, work_rx) = bounded::<Work>(pool);
    // Bounded: the reader reports a hole without reading it, far faster than this thread
    // takes reports in, and an unbounded queue of a 16 TiB disk's holes took a GiB. This
    // thread waits on nothing else, so a full queue only slows the senders.
    let (done_tx, done_rx) = bounded::<Done>(16 * pool);
    let stop = AtomicBool::new(false);
    // Chunks this backup has already stored or touched: a repeated chunk costs one lookup.
    let seen = Mutex::new(HashSet::<Digest>::new());

    let mut first_error = None;
    let mut missing = Vec::new();
    std::thread::scope(|s| {
        {
            let layout = DiskIndex {
                chunks: Vec::new(),
                ..*index
            };
            let (done_tx, stop) = (done_tx.clone(), &stop);
            s.spawn(move || read_chunks(reader, &layout, actions, free_rx, work_tx, done_tx, stop));
        }
        for _ in 0..workers {
            let (work_rx, free_tx, done_tx) = (work_rx.clone(), free_tx.clone(), done_tx.clone());
            let (seen, stop) = (&seen, &stop);
            s.spawn(move || store_chunks(vault, work_rx, free_tx, done_tx, seen, stop));
        }
        drop(done_tx);
        // Writeback of stored chunks starts while the backup goes on: the sync before the
        // manifest then waits only for the last few, not for the whole disk's worth.
        let (flush_tx, flush_rx) = bounded::<()>(1);
        s.spawn(move || {
            for () in flush_rx.iter() {
                let _ = vault.backend().sync();
            }
        });
        let mut stored_at_last_flush = 0;
        for done in done_rx.iter() {
            let len = done.len as u64;
            stats.bytes_read += done.read;
            match done.outcome {
                Ok(Outcome::Zero) => stats.chunks_zero += 1,
                Ok(Outcome::Missing) => missing.push(done.i),
                Ok(Outcome::Reused(d)) => {
                    stats.chunks_reused += 1;
                    index.chunks[done.i] = d;
                }
                Ok(Outcome::New(d, stored)) => {
                    stats.chunks_new += 1;
                    stats.bytes_new += len;
                    stats.bytes_stored += stored;
                    index.chunks[done.i] = d;
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
            progress.advance(len);
            if stats.bytes_stored - stored_at_last_flush >= FLUSH_EVERY {
                stored_at_last_flush = stats.bytes_stored;
                // A flush already pending covers this one too.
                let _ = flush_tx.try_send(());
            }
        }
        drop(flush_tx);
    });
    match first_error {
        Some(e) => Err(e),
        None => Ok(missing),
    }
}

/// What to do with each chunk of a pass: the same for all, or one action a chunk. A full
/// backup needs no list: at 64 bytes an action, one for each of a 16 TiB disk's 2^24 chunks
/// would take 1 GiB besides the index.
enum Plan {
    All(Action),
    Each(Vec<Action>),
}

impl Plan {
    fn get(&self, i: usize) -> &Action {
        match self {
            Plan::All(a) => a,
            Plan::Each(v) => v.get(i).unwrap_or(&Action::Skip),
        }
    }
}

enum Work {
    Data(usize, Vec<u8>),
    Keep(usize, Digest, usize),
    /// The chunk's changed ranges are in the buffer; the rest comes from the old chunk.
    Patch(usize, Vec<u8>, Digest, Vec<(u32, u32)>),
}

fn read_chunks(
    reader: &dyn DiskReader,
    layout: &DiskIndex,
    actions: &Plan,
    free: Receiver<Vec<u8>>,
    work: Sender<Work>,
    done: Sender<Done>,
    stop: &AtomicBool,
) {
    let count = DiskIndex::chunk_count(layout.disk_size, layout.chunk_size) as usize;
    for i in 0..count {
        let action = actions.get(i);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let (offset, len) = layout.chunk_range(i);
        let send = |read, outcome| {
            let _ = done.send(Done {
                i,
                len,
                read,
                outcome,
            });
        };
        let failed = |e| Err(EngineError::io(format!("reading disk at {offset}"), e));
        match action {
            Action::Skip => continue,
            Action::Keep(d) if *d == Digest::ZERO_CHUNK => {
                send(0, Ok(Outcome::Zero));
                continue;
            }
            Action::Keep(d) => {
                if work.send(Work::Keep(i, *d, len)).is_err() {
                    return;
                }
                continue;
            }
            Action::Patch(d, ranges) => {
                let Ok(mut buf) = free.recv() else { return };
                buf.resize(len, 0);
                let mut read = 0;
                for &(at, n) in ranges {
                    let (at, n) = (at as usize, (n as usize).min(len - at as usize));
                    if let Err(e) = reader.read_at(&mut buf[at..at + n], offset + at as u64) {
                        return send(read, failed(e));
                    }
                    read += n as u64;
                }
                if work.send(Work::Patch(i, buf, *d, ranges.clone())).is_err() {
                    return;
                }
                continue;
            }
            Action::Read => {}
        }
        match reader.may_have_data(offset, len as u64) {
            Ok(true) => {}
            Ok(false) => {
                send(0, Ok(Outcome::Zero));
                continue;
            }
            Err(e) => return send(0, failed(e)),
        }
        let Ok(mut buf) = free.recv() else { return };
        buf.resize(len, 0);
        if let Err(e) = reader.read_at(&mut buf, offset) {
            return send(0, failed(e));
        }
        if work.send(Work::Data(i, buf)).is_err() {
            return;
        }
    }
}

/// What a zero chunk holds (chunks are at most 16 MiB).
static ZEROS: [u8; vmvault_format::MAX_CHUNK_SIZE as usize] =
    [0; vmvault_format::MAX_CHUNK_SIZE as usize];

/// Fills `buf` outside `ranges` from the chunk `old`; `false` when the vault cannot give it.
fn patch(
    reader: &mut vmvault_store::ChunkReader<'_>,
    buf: &mut [u8],
    old: &Digest,
    ranges: &[(u32, u32)],
) -> bool {
    let len = buf.len();
    let mut fill = |from: &[u8]| {
        let mut at = 0;
        for &(start, n) in ranges.iter().chain(std::iter::once(&(len as u32, 0))) {
            let start = (start as usize).min(len);
            if start > at {
                buf[at..start].copy_from_slice(&from[at..start]);
            }
            at = at.max(start + n as usize).min(len);
        }
    };
    if *old == Digest::ZERO_CHUNK {
        fill(&ZEROS[..len]);
        return true;
    }
    match reader.read(old, len) {
        Ok(from) => {
            fill(from);
            true
        }
        Err(_) => false,
    }
}

fn store_chunks(
    vault: &Vault,
    work: Receiver<Work>,
    free: Sender<Vec<u8>>,
    done: Sender<Done>,
    seen: &Mutex<HashSet<Digest>>,
    stop: &AtomicBool,
) {
    let codec = vault.codec();
    let mut sealer = codec.sealer();
    let mut sealed = Vec::new();
    let mut old_chunks = vault.chunk_reader();
    for item in work.iter() {
        let (i, buf, read) = match item {
            Work::Data(i, buf) => {
                let read = buf.len() as u64;
                (i, buf, read)
            }
            Work::Patch(i, mut buf, old, ranges) => {
                let read: u64 = ranges.iter().map(|r| r.1 as u64).sum();
                let len = buf.len();
                let patched =
                    stop.load(Ordering::Relaxed) || patch(&mut old_chunks, &mut buf, &old, &ranges);
                if patched {
                    (i, buf, read)
                } else {
                    let _ = free.send(buf);
                    let missing = Done {
                        i,
                        len,
                        read,
                        outcome: Ok(Outcome::Missing),
                    };
                    if done.send(missing).is_err() {
                        return;
                    }
                    continue;
                }
            }
            Work::Keep(i, digest, len) => {
                let outcome = if stop.load(Ordering::Relaxed) {
                    Ok(Outcome::Zero)
                } else {
                    match vault.touch_chunk(&digest, len) {
                        Ok(true) => Ok(Outcome::Reused(digest)),
                        Ok(false) => Ok(Outcome::Missing),
                        Err(e) => Err(e.into()),
                    }
                };
                let done_item = Done {
                    i,
                    len,
                    read: 0,
                    outcome,
                };
                if done.send(done_item).is_err() {
                    return;
                }
                continue;
            }
        };
        let len = buf.len();
        // After a failure elsewhere, chunks are drained unprocessed: the backup is abandoned.
        let outcome = if stop.load(Ordering::Relaxed) || is_zero(&buf) {
            Ok(Outcome::Zero)
        } else {
            let digest = codec.digest(&buf);
            let first = seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(digest);
            if !first {
                Ok(Outcome::Reused(digest))
            } else {
                match vault.touch_chunk(&digest, len) {
                    Ok(true) => Ok(Outcome::Reused(digest)),
                    Ok(false) => {
                        sealer.seal(ObjectKind::Chunk, &buf, &mut sealed);
                        vault
                            .write_chunk(&digest, &sealed)
                            .map(|()| Outcome::New(digest, sealed.len() as u64))
                            .map_err(EngineError::from)
                    }
                    Err(e) => Err(e.into()),
                }
            }
        };
        let _ = free.send(buf);
        if done
            .send(Done {
                i,
                len,
                read,
                outcome,
            })
            .is_err()
        {
            return;
        }
    }
}
