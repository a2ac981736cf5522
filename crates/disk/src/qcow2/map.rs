//! The map from the virtual disk to the image file: the L1 table (in memory), L2 tables (read
//! once and cached), and the walk that turns them into extents of data, zeros, unallocated
//! (backing) ranges and compressed clusters.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::header::{self, Header};
use super::reader::{lock, to_io, Qcow2Reader};
use super::FORMAT;
use crate::DiskError;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_COMPRESSED: u64 = 1 << 62;
const L2E_ZERO: u64 = 1;
/// 32 subclusters per cluster.
const SUBCLUSTER_BITS: u32 = 5;
/// Enough for every L2 table of a 256 GiB disk with 64 KiB clusters (512 MiB each); smaller
/// clusters or larger disks evict the oldest tables, which a sequential backup never needs
/// again.
const TABLE_CACHE_BYTES: usize = 32 << 20;

#[derive(Default)]
pub(super) struct TableCache {
    tables: HashMap<u64, Arc<L2Table>>,
    order: VecDeque<u64>,
    bytes: usize,
}

pub(super) struct L2Table {
    entries: Vec<u64>,
    /// Whether some entry maps data (standard or compressed): tables without any let
    /// `may_have_data` skip their whole range at once.
    has_data: bool,
    all_unallocated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Host offset of the extent's first byte.
    Data(u64),
    /// The cluster's L2 entry.
    Compressed(u64),
    Zero,
    Unallocated,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Extent {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) kind: Kind,
}

impl Qcow2Reader {
    fn l1_span_bits(&self) -> u32 {
        self.cluster_bits + header::l2_entries(self.cluster_bits, self.extended_l2).trailing_zeros()
    }

    fn l1_span(&self) -> u64 {
        1 << self.l1_span_bits()
    }

    fn table(&self, offset: u64) -> io::Result<Arc<L2Table>> {
        if let Some(t) = lock(&self.tables).tables.get(&offset) {
            return Ok(t.clone());
        }
        // Read outside the lock: other threads keep using cached tables meanwhile.
        let cs = self.cluster_size() as usize;
        let mut raw = vec![0u8; cs];
        crate::read_exact_at(&self.file, &mut raw, offset, &self.path, FORMAT).map_err(to_io)?;
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let table = Arc::new(self.summarize(entries));
        let mut cache = lock(&self.tables);
        while cache.bytes + cs > TABLE_CACHE_BYTES {
            match cache.order.pop_front() {
                Some(old) => {
                    cache.tables.remove(&old);
                    cache.bytes -= cs;
                }
                None => break,
            }
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.tables.entry(offset) {
            slot.insert(table.clone());
            cache.order.push_back(offset);
            cache.bytes += cs;
        }
        Ok(table)
    }

    fn summarize(&self, entries: Vec<u64>) -> L2Table {
        let mut has_data = false;
        let mut all_unallocated = true;
        if self.extended_l2 {
            for pair in entries.chunks_exact(2) {
                let (e, bitmap) = (pair[0], pair[1]);
                if e & L2E_COMPRESSED != 0 || bitmap as u32 != 0 {
                    has_data = true;
                }
                if e & L2E_COMPRESSED != 0 || bitmap != 0 {
                    all_unallocated = false;
                }
            }
        } else {
            for &e in &entries {
                if e & L2E_COMPRESSED != 0 || (e & L2E_ZERO == 0 && e & OFFSET_MASK != 0) {
                    has_data = true;
                }
                if e & L2E_COMPRESSED != 0 || e & L2E_ZERO != 0 || e & OFFSET_MASK != 0 {
                    all_unallocated = false;
                }
            }
        }
        L2Table {
            entries,
            has_data,
            all_unallocated,
        }
    }

    /// Calls `f` with the extents of `[offset, offset + len)` in order, merging neighbours of
    /// the same kind (and host-contiguous data) so that a run of clusters is one pread; stops
    /// when `f` returns false. With `dataless_as_zero`, a table mapping no data at all is one
    /// zero extent, so that scanning a huge sparse disk touches each table once.
    pub(super) fn walk(
        &self,
        offset: u64,
        len: u64,
        dataless_as_zero: bool,
        f: &mut dyn FnMut(&Extent) -> io::Result<bool>,
    ) -> io::Result<()> {
        let end = offset + len;
        // Everything is a power of two: shifts and masks, no divisions, in this hot loop.
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let span_bits = self.l1_span_bits();
        let index_mask = (1u64 << (span_bits - cb)) - 1;
        let mut out = Merger { pending: None, f };
        let mut pos = offset;
        while pos < end {
            let l1i = pos >> span_bits;
            let span_end = end.min((l1i + 1) << span_bits);
            let l2_offset = self.l1[l1i as usize];
            if l2_offset == 0 {
                if !out.push(pos, span_end - pos, Kind::Unallocated)? {
                    return Ok(());
                }
                pos = span_end;
                continue;
            }
            let table = self.table(l2_offset)?;
            if table.all_unallocated || (dataless_as_zero && !table.has_data) {
                let kind = if table.all_unallocated {
                    Kind::Unallocated
                } else {
                    Kind::Zero
                };
                if !out.push(pos, span_end - pos, kind)? {
                    return Ok(());
                }
                pos = span_end;
                continue;
            }
            while pos < span_end {
                let cluster = pos >> cb;
                let index = (cluster & index_mask) as usize;
                let cluster_start = cluster << cb;
                let cluster_end = span_end.min(cluster_start + cs);
                let (entry, bitmap) = if self.extended_l2 {
                    (table.entries[2 * index], Some(table.entries[2 * index + 1]))
                } else {
                    (table.entries[index], None)
                };
                if entry & L2E_COMPRESSED != 0 {
                    if !out.push(pos, cluster_end - pos, Kind::Compressed(entry))? {
                        return Ok(());
                    }
                    pos = cluster_end;
                    continue;
                }
                let host = entry & OFFSET_MASK;
                if host & (cs - 1) != 0 {
                    return Err(self.invalid(format!(
                        "L2 entry of cluster {cluster} points to unaligned offset {host}"
                    )));
                }
                let Some(bitmap) = bitmap else {
                    let kind = if entry & L2E_ZERO != 0 {
                        Kind::Zero
                    } else if host == 0 {
                        Kind::Unallocated
                    } else {
                        Kind::Data(host + (pos - cluster_start))
                    };
                    if !out.push(pos, cluster_end - pos, kind)? {
                        return Ok(());
                    }
                    pos = cluster_end;
                    continue;
                };
                let alloc = bitmap as u32;
                let zero = (bitmap >> 32) as u32;
                if alloc & zero != 0 {
                    return Err(self.invalid(format!(
                        "subclusters of cluster {cluster} both allocated and zero \
                         (bitmap {bitmap:#018x})"
                    )));
                }
                if host == 0 && alloc != 0 {
                    return Err(self.invalid(format!(
                        "cluster {cluster} has allocated subclusters but no host offset"
                    )));
                }
                let sub_bits = cb - SUBCLUSTER_BITS;
                while pos < cluster_end {
                    let i = (pos - cluster_start) >> sub_bits;
                    let sub_end = cluster_end.min(cluster_start + ((i + 1) << sub_bits));
                    let kind = if alloc & (1 << i) != 0 {
                        Kind::Data(host + (pos - cluster_start))
                    } else if zero & (1 << i) != 0 {
                        Kind::Zero
                    } else {
                        Kind::Unallocated
                    };
                    if !out.push(pos, sub_end - pos, kind)? {
                        return Ok(());
                    }
                    pos = sub_end;
                }
            }
        }
        out.flush()?;
        Ok(())
    }

    /// The bytes of the virtual disk held by this image's clusters and subclusters, compressed
    /// ones counted at their uncompressed size; zero clusters hold none.
    pub(super) fn count_allocated(&self) -> io::Result<u64> {
        let span = self.l1_span();
        let mut total = 0u64;
        // Damaged images may point many L1 entries at one table: count each table once.
        let mut seen: HashMap<u64, u64> = HashMap::new();
        for (i, &l2_offset) in self.l1.iter().enumerate() {
            if l2_offset == 0 {
                continue;
            }
            let start = i as u64 * span;
            let len = span.min(self.size - start);
            if len == span {
                if let Some(n) = seen.get(&l2_offset) {
                    total += n;
                    continue;
                }
            }
            let mut n = 0;
            self.walk(start, len, true, &mut |e| {
                if matches!(e.kind, Kind::Data(_) | Kind::Compressed(_)) {
                    n += e.len;
                }
                Ok(true)
            })?;
            if len == span {
                seen.insert(l2_offset, n);
            }
            total += n;
        }
        Ok(total)
    }
}

struct Merger<'a> {
    pending: Option<Extent>,
    f: &'a mut dyn FnMut(&Extent) -> io::Result<bool>,
}

impl Merger<'_> {
    /// Returns false once the callback asked to stop.
    fn push(&mut self, offset: u64, len: u64, kind: Kind) -> io::Result<bool> {
        if let Some(p) = &mut self.pending {
            let joins = match (p.kind, kind) {
                (Kind::Data(a), Kind::Data(b)) => a + p.len == b,
                (Kind::Zero, Kind::Zero) | (Kind::Unallocated, Kind::Unallocated) => true,
                _ => false,
            };
            if joins {
                p.len += len;
                return Ok(true);
            }
        }
        let done = self.pending.replace(Extent { offset, len, kind });
        match done {
            Some(e) => (self.f)(&e),
            None => Ok(true),
        }
    }

    fn flush(&mut self) -> io::Result<bool> {
        match self.pending.take() {
            Some(e) => (self.f)(&e),
            None => Ok(true),
        }
    }
}

pub(super) fn read_l1(
    file: &File,
    path: &Path,
    file_len: u64,
    h: &Header,
) -> Result<Vec<u64>, DiskError> {
    // Bounded by the header checks: at most 4 Mi entries, all inside the file.
    let mut raw = vec![0u8; (h.l1_used * 8) as usize];
    crate::read_exact_at(file, &mut raw, h.l1_offset, path, FORMAT)?;
    let cs = h.cluster_size();
    raw.chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let offset = u64::from_be_bytes(b.try_into().unwrap_or_default()) & OFFSET_MASK;
            if offset & (cs - 1) != 0 {
                return Err(DiskError::invalid(
                    path,
                    FORMAT,
                    format!("L1 entry {i} points to unaligned L2 table offset {offset}"),
                ));
            }
            if offset != 0 && offset.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(DiskError::invalid(
                    path,
                    FORMAT,
                    format!(
                        "L1 entry {i} points to an L2 table at {offset}, past the end of the \
                         file ({file_len} bytes)"
                    ),
                ));
            }
            Ok(offset)
        })
        .collect()
}
