//! Writing a qcow2 v3 image for a restore: data clusters appended in the order they arrive,
//! all-zero and never-written clusters left unallocated, and the tables (L2, L1, refcounts)
//! laid out after the data by `finish`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::header::MAGIC;
use super::FORMAT;
use crate::{DiskError, DiskWriter};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
const L1_SPAN: u64 = CLUSTER * L2_ENTRIES;
/// 16-bit refcounts, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
const HEADER_LEN: usize = 112;
/// The refcount is exactly one for everything this writer lays out.
const COPIED: u64 = 1 << 63;
/// QEMU's 32 MiB L1 table limit at 64 KiB clusters.
const MAX_SIZE: u64 = ((32 << 20) / 8) * L1_SPAN;

/// Writes a qcow2 v3 image: 64 KiB clusters, no backing file, no compression.
///
/// The L2 tables stay in memory until `finish`, as one 32-bit host cluster number per written
/// cluster (4 bytes per 64 KiB written, 64 MiB for a full 1 TiB disk).
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    size: u64,
    state: Mutex<State>,
}

struct State {
    /// The next free host cluster; cluster 0 is the header.
    next: u64,
    /// L1 index -> host cluster of each of its guest clusters (0: unallocated).
    tables: BTreeMap<u64, Box<[u32]>>,
    finished: bool,
    /// A write failed part-way: the tables may name clusters never written.
    failed: bool,
}

impl State {
    fn host(&self, cluster: u64) -> Option<u64> {
        let t = self.tables.get(&(cluster / L2_ENTRIES))?;
        match t[(cluster % L2_ENTRIES) as usize] {
            0 => None,
            h => Some(h as u64),
        }
    }

    fn allocate(&mut self, cluster: u64) -> io::Result<u64> {
        let host = self.next;
        let Ok(h) = u32::try_from(host) else {
            return Err(io::Error::other(
                "qcow2 image grew past 256 TiB, the writer's limit",
            ));
        };
        self.next += 1;
        let t = self
            .tables
            .entry(cluster / L2_ENTRIES)
            .or_insert_with(|| vec![0u32; L2_ENTRIES as usize].into_boxed_slice());
        t[(cluster % L2_ENTRIES) as usize] = h;
        Ok(host)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_zero(b: &[u8]) -> bool {
    // Chunked so that a data cluster is told apart after its first few bytes, while a zero
    // one is scanned by the vectorised fold.
    b.chunks(512)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

impl Qcow2Writer {
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<Qcow2Writer, DiskError> {
        if size > MAX_SIZE {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                format!("virtual size {size} above {MAX_SIZE}, QEMU's limit at 64 KiB clusters"),
            ));
        }
        let file = crate::create_file(path, overwrite)?;
        Ok(Qcow2Writer {
            path: path.to_path_buf(),
            file,
            size,
            state: Mutex::new(State {
                next: 1,
                tables: BTreeMap::new(),
                finished: false,
                failed: false,
            }),
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len);
        if offset & (CLUSTER - 1) != 0
            || end.is_none_or(|e| e > self.size)
            || (len & (CLUSTER - 1) != 0 && end != Some(self.size))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: write of {len} bytes at {offset}: not 64 KiB pieces within the disk's \
                     {} bytes",
                    self.path.display(),
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn usable<'a>(&self, state: &'a mut MutexGuard<'_, State>) -> io::Result<&'a mut State> {
        if state.finished || state.failed {
            return Err(io::Error::other(format!(
                "{}: the qcow2 writer is {}",
                self.path.display(),
                if state.finished {
                    "finished"
                } else {
                    "broken by an earlier error"
                }
            )));
        }
        Ok(&mut **state)
    }

    fn write_clusters(&self, st: &mut State, buf: &[u8], offset: u64) -> io::Result<()> {
        // A run of new clusters lands in consecutive host clusters: one pwrite for all of it.
        let mut run: Option<(usize, u64)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let end = buf.len().min(pos + CLUSTER as usize);
            let cluster = (offset + pos as u64) / CLUSTER;
            let chunk = &buf[pos..end];
            match st.host(cluster) {
                // Written twice, against the contract: overwrite in place rather than leak.
                Some(host) => {
                    self.flush_run(&mut run, buf, pos)?;
                    self.file.write_all_at(chunk, host * CLUSTER)?;
                }
                None if is_zero(chunk) => self.flush_run(&mut run, buf, pos)?,
                None => {
                    let host = st.allocate(cluster)?;
                    match run {
                        Some((start, first))
                            if first + ((pos - start) as u64 / CLUSTER) == host => {}
                        _ => {
                            self.flush_run(&mut run, buf, pos)?;
                            run = Some((pos, host));
                        }
                    }
                }
            }
            pos = end;
        }
        self.flush_run(&mut run, buf, buf.len())
    }

    fn flush_run(&self, run: &mut Option<(usize, u64)>, buf: &[u8], end: usize) -> io::Result<()> {
        if let Some((start, host)) = run.take() {
            self.file.write_all_at(&buf[start..end], host * CLUSTER)?;
        }
        Ok(())
    }

    fn write_metadata(&self, st: &State) -> io::Result<()> {
        let l1_entries = self.size.div_ceil(L1_SPAN);
        // An empty disk has no L1 table at all (offset 0, as QEMU writes it): a cluster for
        // it would be counted but never referenced, a leak to `qemu-img check`.
        let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
        let l2_start = st.next;
        let l1_start = l2_start + st.tables.len() as u64;
        let refcount_table_start = l1_start + l1_clusters;
        let used = refcount_table_start;
        // The refcount blocks count themselves and the refcount table: grow both until the
        // blocks cover every cluster, these included.
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + table_clusters + blocks;
            let b = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let t = (b * 8).div_ceil(CLUSTER).max(1);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let blocks_start = refcount_table_start + table_clusters;
        let total = blocks_start + blocks;

        let mut l1 = vec![0u8; (l1_clusters * CLUSTER) as usize];
        let mut table = vec![0u8; CLUSTER as usize];
        for (i, (&l1_index, entries)) in st.tables.iter().enumerate() {
            for (slot, &host) in table.chunks_exact_mut(8).zip(entries.iter()) {
                let e = if host == 0 {
                    0
                } else {
                    (host as u64) << CLUSTER_BITS | COPIED
                };
                slot.copy_from_slice(&e.to_be_bytes());
            }
            let at = l2_start + i as u64;
            self.file.write_all_at(&table, at * CLUSTER)?;
            let e = at << CLUSTER_BITS | COPIED;
            l1[(l1_index * 8) as usize..][..8].copy_from_slice(&e.to_be_bytes());
        }
        let l1_offset = if l1_entries == 0 {
            0
        } else {
            l1_start * CLUSTER
        };
        self.file.write_all_at(&l1, l1_offset)?;

        let mut refcount_table = vec![0u8; (table_clusters * CLUSTER) as usize];
        for (i, slot) in refcount_table
            .chunks_exact_mut(8)
            .take(blocks as usize)
            .enumerate()
        {
            slot.copy_from_slice(&((blocks_start + i as u64) << CLUSTER_BITS).to_be_bytes());
        }
        self.file
            .write_all_at(&refcount_table, refcount_table_start * CLUSTER)?;
        let mut block = vec![0u8; CLUSTER as usize];
        for b in 0..blocks {
            let first = b * REFCOUNTS_PER_BLOCK;
            let n = total.saturating_sub(first).min(REFCOUNTS_PER_BLOCK) as usize;
            block.fill(0);
            for slot in block.chunks_exact_mut(2).take(n) {
                slot.copy_from_slice(&1u16.to_be_bytes());
            }
            self.file
                .write_all_at(&block, (blocks_start + b) * CLUSTER)?;
        }

        // Written last: until here the file has no magic and is no image at all.
        let mut header = [0u8; HEADER_LEN + 8];
        header[0..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        header[24..32].copy_from_slice(&self.size.to_be_bytes());
        header[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
        header[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        header[48..56].copy_from_slice(&(refcount_table_start * CLUSTER).to_be_bytes());
        header[56..60].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        header[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        header[100..104].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        // Bytes 104..112 (zlib compression type, padding) and the end-of-extensions marker
        // after them stay zero.
        self.file.write_all_at(&header, 0)?;
        self.file.set_len(total * CLUSTER)
    }
}

impl DiskWriter for Qcow2Writer {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut guard = lock(&self.state);
        let st = self.usable(&mut guard)?;
        let r = self.write_clusters(st, buf, offset);
        st.failed |= r.is_err();
        r
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut guard = lock(&self.state);
        let st = self.usable(&mut guard)?;
        // Unallocated clusters read as zeros already; only clusters written before (against
        // the contract) need zeroing.
        let end = offset + len;
        let first = offset / CLUSTER;
        let last = end.div_ceil(CLUSTER);
        let zeros = vec![0u8; CLUSTER as usize];
        let tables: Vec<u64> = st
            .tables
            .range(first / L2_ENTRIES..=(last.saturating_sub(1)) / L2_ENTRIES)
            .map(|(&k, _)| k)
            .collect();
        for t in tables {
            let from = first.max(t * L2_ENTRIES);
            let to = last.min((t + 1) * L2_ENTRIES);
            for cluster in from..to {
                if let Some(host) = st.host(cluster) {
                    let n = (end - cluster * CLUSTER).min(CLUSTER) as usize;
                    if let Err(e) = self.file.write_all_at(&zeros[..n], host * CLUSTER) {
                        st.failed = true;
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Lays out the tables and the header. Like the raw writer, does not fsync (see
    /// `RawWriter::finish`).
    fn finish(&self) -> io::Result<()> {
        let mut guard = lock(&self.state);
        if guard.finished {
            return Ok(());
        }
        let st = self.usable(&mut guard)?;
        let r = self.write_metadata(st);
        match r {
            Ok(()) => st.finished = true,
            Err(_) => st.failed = true,
        }
        r
    }
}
