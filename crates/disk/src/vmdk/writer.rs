//! Writes stream-optimized VMDK files, the kind OVF/OVA packages carry and VMware and VirtualBox
//! import: a header whose `gdOffset` says "at end", the embedded descriptor, deflate-compressed
//! grains each behind its grain marker in increasing LBA order, every grain table (with its
//! marker) after the grains it maps, then the grain directory, the footer and the end-of-stream
//! marker.
//!
//! Streaming importers read grains in file order and expect increasing LBAs, but a restore
//! writes pieces in any order. Compressed grains wait in memory (up to [`WINDOW`] bytes) until
//! every grain before them is written or known to be zero; a grain that arrives after a later
//! one was already written out makes `finish` rewrite the file in order (into a temporary file
//! beside it, renamed over it).

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flate2::{Compress, Compression, FlushCompress, Status};

use super::header::*;
use super::{FORMAT, MAX_DISK_BYTES};
use crate::{DiskError, DiskWriter};

const GRAIN: u64 = 64 * 1024;
const GRAIN_SECTORS: u64 = GRAIN / SECTOR;
const GTES: u64 = 512;
const GT_SECTORS: u64 = GTES * 4 / SECTOR;
const DESCRIPTOR_SECTORS: u64 = 20;
/// Grains start 64 KiB into the file, after the header and the descriptor.
const OVERHEAD_SECTORS: u64 = 128;
/// Compressed grains held back, waiting for the grains before them.
const WINDOW: usize = 64 << 20;
/// Runs of written grains tracked while waiting; past that the order is given up.
const MAX_RUNS: usize = 1 << 20;

fn invalid_input(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// The file being written, grain after grain, with the tables that map them.
struct Stream {
    file: File,
    path: PathBuf,
    /// Next free byte, on a sector boundary.
    pos: u64,
    /// Entries (sector of each grain's marker) of the grain tables not yet written out, or
    /// loaded back for a rewrite.
    tables: Vec<Option<Box<[u32]>>>,
    /// Sector of each grain table written (0: not yet).
    gd: Vec<u32>,
    /// Grain tables below this one are written.
    next_table: u64,
    last_grain: Option<u64>,
}

impl Stream {
    fn new(file: File, path: &Path, header: &SparseHeader, descriptor: &str) -> io::Result<Stream> {
        let mut head = vec![0u8; (OVERHEAD_SECTORS * SECTOR) as usize];
        head[..512].copy_from_slice(&header.encode());
        head[512..512 + descriptor.len()].copy_from_slice(descriptor.as_bytes());
        file.write_all_at(&head, 0)?;
        let tables = header.capacity.div_ceil(GRAIN_SECTORS * GTES) as usize;
        Ok(Stream {
            file,
            path: path.to_path_buf(),
            pos: OVERHEAD_SECTORS * SECTOR,
            tables: (0..tables).map(|_| None).collect(),
            gd: vec![0; tables],
            next_table: 0,
            last_grain: None,
        })
    }

    fn sector(&self) -> io::Result<u32> {
        u32::try_from(self.pos / SECTOR).map_err(|_| {
            io::Error::other(format!(
                "{}: the image passes 2 TiB, past what the grain tables' 32-bit sector numbers \
                 address",
                self.path.display()
            ))
        })
    }

    /// Writes the next grain of the stream (`g` above every grain written before), after the
    /// tables of the grains before it.
    fn grain(&mut self, g: u64, data: &[u8]) -> io::Result<()> {
        while self.next_table < g / GTES {
            self.write_table(self.next_table)?;
            self.next_table += 1;
        }
        self.put(g, data)
    }

    /// Writes grain `g` at the end of the file, in whatever order.
    fn put(&mut self, g: u64, data: &[u8]) -> io::Result<()> {
        let sector = self.sector()?;
        self.file.write_all_at(data, self.pos)?;
        self.pos += data.len() as u64;
        let t = (g / GTES) as usize;
        if self.tables[t].is_none() {
            self.tables[t] = Some(self.load_table(t)?);
        }
        if let Some(table) = &mut self.tables[t] {
            table[(g % GTES) as usize] = sector;
        }
        self.last_grain = Some(self.last_grain.map_or(g, |l| l.max(g)));
        Ok(())
    }

    /// The entries of grain table `t`: zeros, or what was written of it.
    fn load_table(&self, t: usize) -> io::Result<Box<[u32]>> {
        let mut table = vec![0u32; GTES as usize].into_boxed_slice();
        if self.gd[t] != 0 {
            let mut raw = vec![0u8; (GTES * 4) as usize];
            self.file
                .read_exact_at(&mut raw, u64::from(self.gd[t]) * SECTOR)?;
            for (e, c) in table.iter_mut().zip(raw.chunks_exact(4)) {
                *e = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(table)
    }

    /// Writes grain table `t` (its marker, then its entries), even an empty one: the format
    /// wants every grain directory entry to point to a table.
    fn write_table(&mut self, t: u64) -> io::Result<()> {
        let mut buf = vec![0u8; ((1 + GT_SECTORS) * SECTOR) as usize];
        buf[..512].copy_from_slice(&marker(GT_SECTORS, MARKER_GT));
        if let Some(table) = self.tables[t as usize].take() {
            for (c, e) in buf[512..].chunks_exact_mut(4).zip(table.iter()) {
                c.copy_from_slice(&e.to_le_bytes());
            }
        }
        let sector = self.sector()?;
        self.gd[t as usize] = sector + 1;
        self.file.write_all_at(&buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Writes the tables left, the grain directory, the footer and the end-of-stream marker.
    fn finish(&mut self, header: &SparseHeader) -> io::Result<()> {
        while (self.next_table as usize) < self.gd.len() {
            self.write_table(self.next_table)?;
            self.next_table += 1;
        }
        let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(SECTOR);
        let mut buf = vec![0u8; ((gd_sectors + 4) * SECTOR) as usize];
        buf[..512].copy_from_slice(&marker(gd_sectors, MARKER_GD));
        for (c, e) in buf[512..].chunks_exact_mut(4).zip(self.gd.iter()) {
            c.copy_from_slice(&e.to_le_bytes());
        }
        let mut footer = header.clone();
        footer.gd_offset = u64::from(self.sector()?) + 1;
        let at = ((1 + gd_sectors) * SECTOR) as usize;
        buf[at..at + 512].copy_from_slice(&marker(1, MARKER_FOOTER));
        buf[at + 512..at + 1024].copy_from_slice(&footer.encode());
        buf[at + 1024..at + 1536].copy_from_slice(&marker(0, MARKER_EOS));
        self.file.write_all_at(&buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// The grain `g` as written: its marker and compressed bytes, padded to a sector.
    fn read_grain(&self, g: u64) -> io::Result<Option<Vec<u8>>> {
        let t = (g / GTES) as usize;
        let sector = match &self.tables[t] {
            Some(table) => table[(g % GTES) as usize],
            None => return Ok(None),
        };
        if sector == 0 {
            return Ok(None);
        }
        let at = u64::from(sector) * SECTOR;
        let mut head = [0u8; 12];
        self.file.read_exact_at(&mut head, at)?;
        let size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64;
        let mut data = vec![0u8; (12 + size).div_ceil(SECTOR) as usize * SECTOR as usize];
        self.file.read_exact_at(&mut data, at)?;
        Ok(Some(data))
    }
}

struct State {
    stream: Stream,
    /// Compressed grains waiting for the grains before them, by grain number.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    /// Runs of grains written or known to be zero: start -> end.
    settled: BTreeMap<u64, u64>,
    /// Whether every grain went out in increasing order so far.
    in_order: bool,
    finished: bool,
}

impl State {
    /// The number of grains from the disk's start that are all written or zero.
    fn frontier(&self) -> u64 {
        self.settled.get(&0).copied().unwrap_or(0)
    }

    fn settle(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.settled.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.settled.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.settled.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.settled.remove(&s);
        }
        self.settled.insert(start, end);
    }

    /// Takes grain `g` (`None`: all zeros).
    fn add(&mut self, g: u64, data: Option<Vec<u8>>) -> io::Result<()> {
        let Some(data) = data else { return Ok(()) };
        if self.in_order && self.stream.last_grain.is_some_and(|l| g <= l) {
            self.give_up_order()?;
        }
        if !self.in_order {
            return self.stream.put(g, &data);
        }
        self.pending_bytes += data.len();
        self.pending.insert(g, data);
        Ok(())
    }

    /// Writes out the waiting grains that can go: those whose predecessors are all settled,
    /// and the lowest ones while too much waits.
    fn drain(&mut self) -> io::Result<()> {
        if !self.in_order {
            return Ok(());
        }
        if self.settled.len() > MAX_RUNS {
            return self.give_up_order();
        }
        let frontier = self.frontier();
        while let Some(entry) = self.pending.first_entry() {
            let g = *entry.key();
            if g >= frontier && self.pending_bytes <= WINDOW {
                break;
            }
            let data = entry.remove();
            self.pending_bytes -= data.len();
            self.stream.grain(g, &data)?;
        }
        Ok(())
    }

    fn give_up_order(&mut self) -> io::Result<()> {
        self.in_order = false;
        self.settled.clear();
        for (g, data) in std::mem::take(&mut self.pending) {
            self.stream.put(g, &data)?;
        }
        self.pending_bytes = 0;
        Ok(())
    }
}

/// Writes a stream-optimized VMDK (see the module doc for the layout and the ordering).
pub struct VmdkWriter {
    path: PathBuf,
    size: u64,
    header: SparseHeader,
    descriptor: String,
    threads: usize,
    deflaters: Mutex<Vec<Deflaters>>,
    state: Mutex<State>,
}

/// A CID for a new disk: random, as VMware's are; a disk's children record it.
fn new_cid() -> u32 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    let cid = h.finish() as u32;
    if cid >= 0xffff_fffe {
        1
    } else {
        cid
    }
}

fn descriptor(path: &Path, capacity: u64) -> String {
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .take(255)
        .collect();
    let cylinders = (capacity / (16 * 63)).min(16383);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\n# Extent description\nRW {capacity} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\nddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n\
         ddb.toolsVersion = \"2147483647\"\n",
        new_cid()
    )
}

/// A worker's deflate streams: level 1, and level 0 (stored blocks) for incompressible grains.
struct Deflaters {
    fast: Compress,
    stored: Compress,
}

impl Deflaters {
    fn new() -> Deflaters {
        Deflaters {
            fast: Compress::new(Compression::fast(), true),
            stored: Compress::new(Compression::none(), true),
        }
    }
}

/// Bytes of a grain compressed first to tell whether the grain is worth compressing.
const SAMPLE: usize = 4096;

fn deflate(c: &mut Compress, input: &[u8], out: &mut [u8]) -> io::Result<usize> {
    c.reset();
    let status = c
        .compress(input, out, FlushCompress::Finish)
        .map_err(io::Error::other)?;
    if status != Status::StreamEnd {
        return Err(io::Error::other("deflate did not finish a grain"));
    }
    Ok(c.total_out() as usize)
}

/// Compresses one grain (zero-padded to a whole grain, so that it decompresses whole) behind
/// its grain marker, padded to a sector; `None` for a grain of zeros, left unallocated.
///
/// Level 1 rather than zlib's default 6: with the deflate implementation used here, level 6
/// writes text-like data six times slower for a third less size, and a restore waits on it.
/// A grain whose first 4 KiB do not compress (encrypted or already compressed data) is stored
/// in plain deflate blocks, which costs a copy instead of a futile search.
fn compress_grain(d: &mut Deflaters, g: u64, data: &[u8]) -> io::Result<Option<Vec<u8>>> {
    if data.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let padded;
    let input = if data.len() as u64 == GRAIN {
        data
    } else {
        let mut p = vec![0u8; GRAIN as usize];
        p[..data.len()].copy_from_slice(data);
        padded = p;
        &padded[..]
    };
    let mut out = vec![0u8; 12 + GRAIN as usize + GRAIN as usize / 8 + 1024];
    let sample = deflate(&mut d.fast, &input[..SAMPLE], &mut out[12..])?;
    let n = if sample >= SAMPLE - SAMPLE / 32 {
        deflate(&mut d.stored, input, &mut out[12..])?
    } else {
        deflate(&mut d.fast, input, &mut out[12..])?
    };
    out[0..8].copy_from_slice(&(g * GRAIN_SECTORS).to_le_bytes());
    out[8..12].copy_from_slice(&(n as u32).to_le_bytes());
    let len = (12 + n).div_ceil(SECTOR as usize) * SECTOR as usize;
    out[12 + n..len].fill(0);
    out.truncate(len);
    Ok(Some(out))
}

impl VmdkWriter {
    /// Creates `path` (refusing an existing file unless `overwrite`) for a disk of `size`
    /// bytes (rounded up to whole sectors, which the format counts in).
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<VmdkWriter, DiskError> {
        if size > MAX_DISK_BYTES {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                format!(
                    "a disk of {size} bytes (vmvault writes VMDK disks up to {MAX_DISK_BYTES})"
                ),
            ));
        }
        let file = crate::create_file(path, overwrite)?;
        let capacity = size.div_ceil(SECTOR);
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity,
            grain_size: GRAIN_SECTORS,
            descriptor_offset: 1,
            descriptor_size: DESCRIPTOR_SECTORS,
            gtes_per_gt: GTES as u32,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: OVERHEAD_SECTORS,
            unclean_shutdown: false,
            newline_bytes_ok: true,
            compress_algorithm: COMPRESS_DEFLATE,
        };
        let descriptor = descriptor(path, capacity);
        let stream =
            Stream::new(file, path, &header, &descriptor).map_err(|e| DiskError::io(path, e))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Ok(VmdkWriter {
            path: path.to_path_buf(),
            size,
            header,
            descriptor,
            threads,
            deflaters: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                stream,
                pending: BTreeMap::new(),
                pending_bytes: 0,
                settled: BTreeMap::new(),
                in_order: true,
                finished: false,
            }),
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                invalid_input(format!(
                    "{}: write past the end of the disk",
                    self.path.display()
                ))
            })?;
        if offset & (GRAIN - 1) != 0 || (len & (GRAIN - 1) != 0 && end != self.size) {
            return Err(invalid_input(format!(
                "{}: stream-optimized VMDK writes whole 64 KiB grains (offset {offset}, length {len})",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn deflaters(&self) -> Deflaters {
        let pooled = self
            .deflaters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        pooled.unwrap_or_else(Deflaters::new)
    }

    fn give_back(&self, d: Deflaters) {
        self.deflaters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
    }

    /// Compresses the grains of `buf` (from grain `first`), on several threads when there are
    /// several grains.
    fn compress_all(&self, first: u64, buf: &[u8]) -> io::Result<Vec<Option<Vec<u8>>>> {
        let grains: Vec<&[u8]> = buf.chunks(GRAIN as usize).collect();
        let threads = self.threads.min(grains.len()).max(1);
        let run = |part: &[&[u8]], start: u64| -> io::Result<Vec<Option<Vec<u8>>>> {
            let mut c = self.deflaters();
            let out = part
                .iter()
                .enumerate()
                .map(|(k, data)| compress_grain(&mut c, start + k as u64, data))
                .collect();
            self.give_back(c);
            out
        };
        if threads == 1 {
            return run(&grains, first);
        }
        let per = grains.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = grains
                .chunks(per)
                .enumerate()
                .map(|(k, part)| {
                    let run = &run;
                    std::thread::Builder::new()
                        .spawn_scoped(s, move || run(part, first + (k * per) as u64))
                })
                .collect::<io::Result<_>>()?;
            let mut out = Vec::with_capacity(grains.len());
            for h in handles {
                out.extend(
                    h.join()
                        .map_err(|_| io::Error::other("a compression thread panicked"))??,
                );
            }
            Ok(out)
        })
    }

    fn state(&self) -> io::Result<std::sync::MutexGuard<'_, State>> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.finished {
            return Err(io::Error::other(format!(
                "{}: already finished",
                self.path.display()
            )));
        }
        Ok(st)
    }

    /// Writes the stream again into a new file, grains in increasing order, and puts it in
    /// place of the first.
    fn rewrite(&self, st: &mut State) -> io::Result<()> {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".vmvault-tmp");
        let tmp = self.path.with_file_name(name);
        let file = crate::create_file(&tmp, true).map_err(|e| io::Error::other(e.to_string()))?;
        let mut fresh = Stream::new(file, &self.path, &self.header, &self.descriptor)?;
        let old = &mut st.stream;
        let result = (|| {
            for t in 0..old.tables.len() {
                if old.tables[t].is_none() {
                    old.tables[t] = Some(old.load_table(t)?);
                }
                for k in 0..GTES {
                    let g = t as u64 * GTES + k;
                    if let Some(data) = old.read_grain(g)? {
                        fresh.grain(g, &data)?;
                    }
                }
                old.tables[t] = None;
            }
            fresh.finish(&self.header)?;
            std::fs::rename(&tmp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        st.stream = fresh;
        Ok(())
    }
}

impl DiskWriter for VmdkWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let first = offset / GRAIN;
        let grains = self.compress_all(first, buf)?;
        let mut st = self.state()?;
        let count = grains.len() as u64;
        for (k, data) in grains.into_iter().enumerate() {
            st.add(first + k as u64, data)?;
        }
        if st.in_order {
            st.settle(first, first + count);
        }
        st.drain()
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut st = self.state()?;
        if st.in_order {
            st.settle(offset / GRAIN, (offset + len).div_ceil(GRAIN));
        }
        st.drain()
    }

    /// Writes the waiting grains, the tables, the footer and the end-of-stream marker (and
    /// first puts the grains in order if they went out of order). Not synced to disk.
    fn finish(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.finished {
            return Ok(());
        }
        if st.in_order {
            for (g, data) in std::mem::take(&mut st.pending) {
                st.stream.grain(g, &data)?;
            }
            st.pending_bytes = 0;
            st.stream.finish(&self.header)?;
        } else {
            self.rewrite(&mut st)?;
        }
        st.finished = true;
        Ok(())
    }
}
