//! Hosted sparse extents (`KDMV`): monolithicSparse files, the extents of twoGbMaxExtentSparse
//! disks, and stream-optimized files with deflate-compressed grains.
//!
//! The grain directory is read whole at open (it is bounded by the file's size); every grain
//! table is read once at open to check that it points inside the file and to count allocated
//! grains, and then only on demand, through a small cache, so that memory stays bounded
//! whatever the disk's size.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flate2::{Decompress, FlushDecompress, Status};

use super::header::*;
use super::{data_error, FORMAT, MAX_DESCRIPTOR, MAX_DISK_BYTES};
use crate::{read_exact_at, DiskError};

/// Grains of up to 1 MiB: VMware and qemu write 64 KiB; a larger grain would let a small file
/// ask for large decompression buffers.
const MAX_GRAIN_SECTORS: u64 = 2048;
/// The technote's minimum grain (4 KiB); smaller ones only multiply the table work.
const MIN_GRAIN_SECTORS: u64 = 8;
/// The technote fixes 512 entries per grain table; allow some room, bounded.
const MAX_GTES: u32 = 4096;
/// Grain tables kept in memory: 1024 tables of 512 entries cover 32 GiB of 64 KiB grains.
const GT_CACHE: usize = 1024;
/// Size of a compressed grain's header: the grain's LBA (u64) and the compressed size (u32).
const GRAIN_HEADER: usize = 12;

/// What one grain table entry says of its grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grain {
    /// Not in this extent: read from the parent, or zeros.
    Unallocated,
    /// The zeroed-grain entry (1, with the header's flag): zeros, hiding any parent.
    Zero,
    /// Data at this byte offset of the file (a compressed grain's header, when compressed).
    Data(u64),
}

#[derive(Clone, Copy, Default)]
struct GtSummary {
    has_data: bool,
    has_unallocated: bool,
}

struct GtCache {
    tables: HashMap<u32, Arc<[u32]>>,
    order: VecDeque<u32>,
}

pub(super) struct SparseExtent {
    pub header: SparseHeader,
    /// The embedded descriptor's text, if the extent has one.
    pub descriptor: Option<String>,
    path: PathBuf,
    file_len: u64,
    /// Bytes of virtual disk this extent provides (the descriptor's count, or the capacity).
    pub len: u64,
    grain: u64,
    gtes: u64,
    gd: Vec<u32>,
    summaries: Vec<GtSummary>,
    zero_grain: bool,
    pub compressed: bool,
    pub allocated: u64,
    cache: Mutex<GtCache>,
    /// Buffers and inflaters of compressed reads, kept for the next reads.
    inflaters: Mutex<Vec<Inflater>>,
}

/// The table offsets named by more than one directory entry, sorted.
fn shared_tables(gd: &[u32]) -> Vec<u32> {
    let mut sorted: Vec<u32> = gd.iter().copied().filter(|&e| e != 0).collect();
    sorted.sort_unstable();
    let mut shared: Vec<u32> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    shared.dedup();
    shared
}

impl SparseExtent {
    /// Opens the sparse extent in `file`; `sectors` is what a descriptor says it holds (for a
    /// monolithic file, its header's capacity is used).
    pub fn open(file: &File, path: &Path, sectors: Option<u64>) -> Result<SparseExtent, DiskError> {
        let invalid = |d: String| DiskError::invalid(path, FORMAT, d);
        let unsupported = |d: String| DiskError::unsupported(path, FORMAT, d);
        let file_len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();
        let mut sector = [0u8; 512];
        read_exact_at(file, &mut sector, 0, path, FORMAT)?;
        if &sector[0..4] == COWD_MAGIC {
            return Err(unsupported(
                "a COWD sparse extent (ESX 2.x or vmfsSparse snapshot), which vmvault does not read"
                    .into(),
            ));
        }
        let Some(primary) = SparseHeader::parse(&sector) else {
            return Err(invalid("no KDMV magic: not a hosted sparse extent".into()));
        };
        check_version(&primary, path)?;
        if primary.flags & FLAG_NEWLINE_TEST != 0 && !primary.newline_bytes_ok {
            return Err(invalid(
                "the header's newline-detection bytes are damaged (a transfer in text mode?)"
                    .into(),
            ));
        }
        let descriptor = read_descriptor(file, path, &primary, file_len)?;
        let h = if primary.gd_offset == GD_AT_END {
            read_footer(file, path, file_len)?
        } else {
            primary
        };
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() {
            return Err(invalid(format!(
                "the grain size of {} sectors is not a power of two",
                h.grain_size
            )));
        }
        if !(MIN_GRAIN_SECTORS..=MAX_GRAIN_SECTORS).contains(&h.grain_size) {
            return Err(unsupported(format!(
                "a grain of {} sectors (vmvault reads grains of {MIN_GRAIN_SECTORS} to \
                 {MAX_GRAIN_SECTORS} sectors)",
                h.grain_size
            )));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES {
            return Err(invalid(format!(
                "{} entries per grain table (the format uses 512)",
                h.gtes_per_gt
            )));
        }
        let capacity = h
            .capacity
            .checked_mul(SECTOR)
            .filter(|&c| c <= MAX_DISK_BYTES)
            .ok_or_else(|| {
                invalid(format!(
                    "an absurd capacity of {} sectors (more than {} bytes)",
                    h.capacity, MAX_DISK_BYTES
                ))
            })?;
        let len = match sectors {
            None => capacity,
            Some(s) if s <= h.capacity => s * SECTOR,
            Some(s) => {
                return Err(invalid(format!(
                    "the descriptor gives this extent {s} sectors, but its header holds only {}",
                    h.capacity
                )))
            }
        };
        let compressed = match h.compress_algorithm {
            COMPRESS_NONE => false,
            COMPRESS_DEFLATE => true,
            other => return Err(unsupported(format!("compression algorithm {other}"))),
        };
        if compressed && h.flags & FLAG_MARKERS == 0 {
            return Err(unsupported(
                "compressed grains without markers (no known tool writes them)".into(),
            ));
        }
        let grain = h.grain_size * SECTOR;
        let gtes = u64::from(h.gtes_per_gt);
        let gt_cover = h.grain_size * gtes * SECTOR;
        let gd_count = capacity.div_ceil(gt_cover);
        let gd_bytes = gd_count * 4;
        let gd_start = h.gd_offset.checked_mul(SECTOR);
        let gd_in_file = gd_start
            .and_then(|s| s.checked_add(gd_bytes))
            .is_some_and(|end| end <= file_len);
        if gd_count > 0 && (h.gd_offset == 0 || !gd_in_file) {
            return Err(invalid(format!(
                "the grain directory ({gd_count} entries at sector {}) lies outside the file \
                 ({file_len} bytes)",
                h.gd_offset
            )));
        }
        let mut raw = vec![0u8; gd_bytes as usize];
        if gd_count > 0 {
            read_exact_at(file, &mut raw, gd_start.unwrap_or(0), path, FORMAT)?;
        }
        let gd: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        drop(raw);
        let mut extent = SparseExtent {
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            header: h,
            descriptor,
            path: path.to_path_buf(),
            file_len,
            len,
            grain,
            gtes,
            summaries: vec![GtSummary::default(); gd.len()],
            gd,
            compressed,
            allocated: 0,
            cache: Mutex::new(GtCache {
                tables: HashMap::new(),
                order: VecDeque::new(),
            }),
            inflaters: Mutex::new(Vec::new()),
        };
        extent.scan(file)?;
        Ok(extent)
    }

    fn gt_cover(&self) -> u64 {
        self.grain * self.gtes
    }

    fn gt_bytes(&self) -> usize {
        self.gtes as usize * 4
    }

    fn classify(&self, entry: u32) -> Grain {
        match entry {
            0 => Grain::Unallocated,
            1 if self.zero_grain => Grain::Zero,
            e => Grain::Data(u64::from(e) * SECTOR),
        }
    }

    /// Reads every grain table once: checks that its grains lie inside the file, counts the
    /// allocated bytes and notes which tables hold data or holes. Tables shared by several
    /// directory entries are read and checked once, so the work is bounded by the file's size.
    fn scan(&mut self, file: &File) -> Result<(), DiskError> {
        let path = self.path.clone();
        let gt_bytes = self.gt_bytes();
        let mut raw = vec![0u8; gt_bytes];
        // Per table offset: (summary, allocated bytes) for a table lying wholly inside `len`,
        // kept only for tables more than one entry names: a map of every table would take
        // ~100 MiB for the 2^21 tables of a valid 64 TiB image.
        let shared = shared_tables(&self.gd);
        let mut seen: HashMap<u32, (GtSummary, u64)> = HashMap::new();
        let mut allocated = 0u64;
        for i in 0..self.gd.len() {
            let e = self.gd[i];
            let start = i as u64 * self.gt_cover();
            if e == 0 || start >= self.len {
                self.summaries[i] = GtSummary {
                    has_data: false,
                    has_unallocated: start < self.len,
                };
                continue;
            }
            let whole = start + self.gt_cover() <= self.len;
            if whole {
                if let Some(&(summary, bytes)) = seen.get(&e) {
                    self.summaries[i] = summary;
                    allocated += bytes;
                    continue;
                }
            }
            let at = u64::from(e) * SECTOR;
            if at + gt_bytes as u64 > self.file_len {
                return Err(DiskError::invalid(
                    &path,
                    FORMAT,
                    format!("grain table {i} (at sector {e}) lies past the end of the file"),
                ));
            }
            read_exact_at(file, &mut raw, at, &path, FORMAT)?;
            let mut summary = GtSummary::default();
            let mut bytes = 0u64;
            for (j, c) in raw.chunks_exact(4).enumerate() {
                let gstart = start + j as u64 * self.grain;
                if gstart >= self.len {
                    break;
                }
                let in_disk = self.grain.min(self.len - gstart);
                match self.classify(u32::from_le_bytes([c[0], c[1], c[2], c[3]])) {
                    Grain::Unallocated => summary.has_unallocated = true,
                    Grain::Zero => {}
                    Grain::Data(o) => {
                        let need = if self.compressed {
                            GRAIN_HEADER as u64
                        } else {
                            in_disk
                        };
                        if o + need > self.file_len {
                            return Err(DiskError::invalid(
                                &path,
                                FORMAT,
                                format!(
                                    "grain table {i} entry {j} points past the end of the file \
                                     (sector {})",
                                    o / SECTOR
                                ),
                            ));
                        }
                        summary.has_data = true;
                        bytes += in_disk;
                    }
                }
            }
            if whole && shared.binary_search(&e).is_ok() {
                seen.insert(e, (summary, bytes));
            }
            self.summaries[i] = summary;
            allocated += bytes;
        }
        self.allocated = allocated;
        Ok(())
    }

    /// The grain table of directory entry `i`, or `None` when the directory has none.
    fn table(&self, file: &File, i: u64) -> io::Result<Option<Arc<[u32]>>> {
        let Some(&e) = self.gd.get(i as usize) else {
            return Ok(None);
        };
        if e == 0 {
            return Ok(None);
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.tables.get(&e) {
            return Ok(Some(t.clone()));
        }
        let mut raw = vec![0u8; self.gt_bytes()];
        file.read_exact_at(&mut raw, u64::from(e) * SECTOR)
            .map_err(|err| self.io_error(err, "a grain table"))?;
        let table: Arc<[u32]> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if cache.order.len() >= GT_CACHE {
            if let Some(old) = cache.order.pop_front() {
                cache.tables.remove(&old);
            }
        }
        cache.order.push_back(e);
        cache.tables.insert(e, table.clone());
        Ok(Some(table))
    }

    fn io_error(&self, err: io::Error, what: &str) -> io::Error {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            data_error(
                &self.path,
                format!("{what} lies past the end of the file (truncated?)"),
            )
        } else {
            err
        }
    }

    /// Fills `buf` from byte `offset` of this extent; `parent` fills unallocated ranges (given
    /// extent-relative offsets).
    pub fn read(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
        parent: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut inflater = if self.compressed {
            let pooled = self
                .inflaters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            pooled.unwrap_or_default()
        } else {
            Inflater::default()
        };
        let result = self.read_with(file, buf, offset, parent, &mut inflater);
        if self.compressed {
            inflater.span_at = u64::MAX;
            let mut pool = self.inflaters.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < 8 {
                pool.push(inflater);
            }
        }
        result
    }

    fn read_with(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
        parent: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
        inflater: &mut Inflater,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = pos / self.gt_cover();
            let table_end = (i + 1) * self.gt_cover();
            let n = (buf.len() - done).min((table_end - pos) as usize);
            let piece = &mut buf[done..done + n];
            match self.table(file, i)? {
                None => parent(piece, pos)?,
                Some(t) => self.read_in_table(file, &t, piece, pos, parent, inflater)?,
            }
            done += n;
        }
        Ok(())
    }

    fn read_in_table(
        &self,
        file: &File,
        table: &[u32],
        buf: &mut [u8],
        offset: u64,
        parent: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>,
        inflater: &mut Inflater,
    ) -> io::Result<()> {
        let entry = |pos: u64| self.classify(table[((pos / self.grain) % self.gtes) as usize]);
        let mut i = 0usize;
        while i < buf.len() {
            let pos = offset + i as u64;
            let first = entry(pos);
            let mut end = i + ((self.grain - pos % self.grain) as usize).min(buf.len() - i);
            // Extend the run while the next grains continue it: the same kind of hole, or (for
            // uncompressed data) the next grain right after this one in the file.
            while end < buf.len() {
                let continues = match (first, entry(offset + end as u64)) {
                    (Grain::Data(a), Grain::Data(b)) => {
                        !self.compressed && b == a + (end - i) as u64 + pos % self.grain
                    }
                    (Grain::Data(_), _) | (_, Grain::Data(_)) => false,
                    (a, b) => a == b,
                };
                if !continues {
                    break;
                }
                end += (self.grain as usize).min(buf.len() - end);
            }
            let rest = (buf.len() - i) as u64;
            let run = &mut buf[i..end];
            match first {
                Grain::Unallocated => parent(run, pos)?,
                Grain::Zero => run.fill(0),
                Grain::Data(at) if !self.compressed => file
                    .read_exact_at(run, at + pos % self.grain)
                    .map_err(|e| self.io_error(e, "a grain"))?,
                Grain::Data(at) => self.read_compressed(file, at, pos, run, rest, inflater)?,
            }
            i = end;
        }
        Ok(())
    }

    /// Fills `out` (part of one grain, from extent offset `pos`) from the compressed grain at
    /// byte `at`; `rest` is how much of the request remains, to read ahead the grains that
    /// usually follow this one in the file with the same `pread`.
    fn read_compressed(
        &self,
        file: &File,
        at: u64,
        pos: u64,
        out: &mut [u8],
        rest: u64,
        inflater: &mut Inflater,
    ) -> io::Result<()> {
        let max_compressed = self.grain * 2 + 4096;
        let (size, data_at) = {
            let header = inflater.bytes(self, file, at, rest)?;
            if header.len() < GRAIN_HEADER {
                return Err(data_error(
                    &self.path,
                    "a compressed grain lies past the end of the file",
                ));
            }
            let lba = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
            let size = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
            let want = pos / self.grain * self.header.grain_size;
            if lba != want {
                return Err(data_error(
                    &self.path,
                    format!(
                        "the compressed grain at byte {at} says it holds sector {lba}, not {want}"
                    ),
                ));
            }
            if size == 0 || u64::from(size) > max_compressed {
                return Err(data_error(
                    &self.path,
                    format!("the compressed grain at byte {at} claims {size} bytes"),
                ));
            }
            (size as usize, at + GRAIN_HEADER as u64)
        };
        let grain = self.grain as usize;
        let in_grain = (pos % self.grain) as usize;
        let Inflater {
            ref mut span,
            ref mut span_at,
            ref mut decompress,
            ref mut scratch,
        } = *inflater;
        // The read-ahead normally holds the whole grain; re-read it alone when it does not.
        let have = data_at
            .checked_sub(*span_at)
            .map(|rel| rel as usize)
            .filter(|&rel| rel.checked_add(size).is_some_and(|end| end <= span.len()));
        let rel = match have {
            Some(rel) => rel,
            None => {
                span.resize(size, 0);
                file.read_exact_at(span, data_at)
                    .map_err(|e| self.io_error(e, "a compressed grain"))?;
                *span_at = data_at;
                0
            }
        };
        let input = &span[rel..rel + size];
        let zlib = input.len() >= 2
            && input[0] & 0x0f == 8
            && (u16::from(input[0]) << 8 | u16::from(input[1])) % 31 == 0;
        let d = decompress.get_or_insert_with(|| Decompress::new(zlib));
        d.reset(zlib);
        let whole = in_grain == 0 && out.len() == grain;
        let target: &mut [u8] = if whole {
            out
        } else {
            scratch.resize(grain, 0);
            &mut scratch[..]
        };
        let status = d
            .decompress(input, target, FlushDecompress::Finish)
            .map_err(|e| {
                data_error(
                    &self.path,
                    format!("grain at byte {at}: bad deflate data: {e}"),
                )
            })?;
        let produced = d.total_out() as usize;
        if status != Status::StreamEnd {
            let why = if produced == grain {
                "decompresses to more than a grain"
            } else {
                "ends before its deflate stream does"
            };
            return Err(data_error(
                &self.path,
                format!("the compressed grain at byte {at} {why}"),
            ));
        }
        if whole {
            if produced < grain {
                return Err(data_error(
                    &self.path,
                    format!(
                        "the compressed grain at byte {at} decompresses to only {produced} bytes"
                    ),
                ));
            }
            return Ok(());
        }
        if in_grain + out.len() > produced {
            return Err(data_error(
                &self.path,
                format!("the compressed grain at byte {at} decompresses to only {produced} bytes"),
            ));
        }
        out.copy_from_slice(&scratch[in_grain..in_grain + out.len()]);
        Ok(())
    }

    /// Whether `[offset, offset + len)` of this extent may hold non-zero bytes; `parent` answers
    /// for unallocated ranges.
    pub fn may_have_data(
        &self,
        file: &File,
        offset: u64,
        len: u64,
        parent: &mut dyn FnMut(u64, u64) -> io::Result<bool>,
    ) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.len);
        let mut pos = offset;
        while pos < end {
            let i = pos / self.gt_cover();
            let piece_end = ((i + 1) * self.gt_cover()).min(end);
            let summary = self
                .summaries
                .get(i as usize)
                .copied()
                .unwrap_or(GtSummary {
                    has_data: false,
                    has_unallocated: true,
                });
            if !summary.has_data {
                if summary.has_unallocated && parent(pos, piece_end - pos)? {
                    return Ok(true);
                }
            } else if let Some(table) = self.table(file, i)? {
                let mut p = pos;
                while p < piece_end {
                    let g_end = ((p / self.grain + 1) * self.grain).min(piece_end);
                    match self.classify(table[((p / self.grain) % self.gtes) as usize]) {
                        Grain::Data(_) => return Ok(true),
                        Grain::Zero => {}
                        Grain::Unallocated => {
                            if parent(p, g_end - p)? {
                                return Ok(true);
                            }
                        }
                    }
                    p = g_end;
                }
            } else if parent(pos, piece_end - pos)? {
                return Ok(true);
            }
            pos = piece_end;
        }
        Ok(false)
    }
}

/// Per-read state for compressed grains: the read-ahead span (the file's bytes from `span_at`),
/// the inflater and a grain buffer for grains read in part.
struct Inflater {
    span: Vec<u8>,
    span_at: u64,
    decompress: Option<Decompress>,
    scratch: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater {
            span: Vec::new(),
            span_at: u64::MAX,
            decompress: None,
            scratch: Vec::new(),
        }
    }
}

impl Inflater {
    /// The bytes of the file from `at` on that the read-ahead holds (at least a grain header),
    /// reading ahead about `rest` bytes of compressed grains when it does not.
    fn bytes(
        &mut self,
        extent: &SparseExtent,
        file: &File,
        at: u64,
        rest: u64,
    ) -> io::Result<&[u8]> {
        let held =
            at >= self.span_at && at - self.span_at + GRAIN_HEADER as u64 <= self.span.len() as u64;
        if !held {
            let grains = rest.div_ceil(extent.grain).max(1);
            let want = grains
                .saturating_mul(extent.grain + extent.grain / 16 + 1024)
                .min(extent.file_len.saturating_sub(at));
            self.span.resize(want as usize, 0);
            file.read_exact_at(&mut self.span, at)
                .map_err(|e| extent.io_error(e, "a compressed grain"))?;
            self.span_at = at;
        }
        Ok(&self.span[(at - self.span_at) as usize..])
    }
}

fn check_version(h: &SparseHeader, path: &Path) -> Result<(), DiskError> {
    match h.version {
        1..=3 => Ok(()),
        0 => Err(DiskError::invalid(path, FORMAT, "sparse extent version 0")),
        v => Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("sparse extent version {v} (vmvault reads versions 1 to 3)"),
        )),
    }
}

/// The embedded descriptor, read up to [`MAX_DESCRIPTOR`] bytes (the rest is padding).
pub(super) fn read_descriptor(
    file: &File,
    path: &Path,
    h: &SparseHeader,
    file_len: u64,
) -> Result<Option<String>, DiskError> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let start = h.descriptor_offset.checked_mul(SECTOR);
    let len = h.descriptor_size.checked_mul(SECTOR);
    let (Some(start), Some(len)) = (start, len) else {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            "the embedded descriptor's place overflows",
        ));
    };
    if start.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            format!(
                "the embedded descriptor ({} sectors at sector {}) lies past the end of the file",
                h.descriptor_size, h.descriptor_offset
            ),
        ));
    }
    let mut raw = vec![0u8; len.min(MAX_DESCRIPTOR) as usize];
    read_exact_at(file, &mut raw, start, path, FORMAT)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(Some(String::from_utf8_lossy(&raw[..end]).into_owned()))
}

/// Zero sectors tolerated after the end-of-stream marker (copies padded to a block size).
const MAX_TAIL_PADDING: u64 = 64 * 1024;

/// The header copy a stream-optimized extent keeps in its footer, just before the final
/// end-of-stream marker, when the first header's `gdOffset` says "at end". The end-of-stream
/// marker is a zero sector, so zero padding after it is skipped (up to 64 KiB).
fn read_footer(file: &File, path: &Path, file_len: u64) -> Result<SparseHeader, DiskError> {
    let invalid = |d: &str| DiskError::invalid(path, FORMAT, d.to_string());
    let end = file_len / SECTOR * SECTOR;
    if end < 4 * SECTOR {
        return Err(invalid(
            "gdOffset says the grain directory is in the footer, but the file is too short \
             to hold one",
        ));
    }
    let start = end.saturating_sub(MAX_TAIL_PADDING + 1536).max(SECTOR);
    let mut tail = vec![0u8; (end - start) as usize];
    read_exact_at(file, &mut tail, start, path, FORMAT)?;
    let mut at = tail.len();
    while at >= 1536 {
        let b = &tail[at - 1536..at];
        let (_, size, kind) = parse_marker(&b[0..512]);
        let (eos_val, eos_size, eos_kind) = parse_marker(&b[1024..1536]);
        let ok_markers = size == 0
            && kind == MARKER_FOOTER
            && eos_val == 0
            && eos_size == 0
            && eos_kind == MARKER_EOS;
        let footer = <&[u8; 512]>::try_from(&b[512..1024])
            .ok()
            .and_then(SparseHeader::parse);
        if let Some(h) = footer.filter(|_| ok_markers) {
            check_version(&h, path)?;
            if h.gd_offset == GD_AT_END {
                return Err(invalid("the footer's gdOffset also says \"at end\""));
            }
            return Ok(h);
        }
        // Only zero sectors (more end-of-stream markers, or padding) may follow the footer.
        if tail[at - 512..at].iter().any(|&x| x != 0) {
            break;
        }
        at -= 512;
    }
    Err(invalid(
        "gdOffset says the grain directory is in the footer, but the file does not end with \
         a footer and an end-of-stream marker (an unfinished stream?)",
    ))
}
