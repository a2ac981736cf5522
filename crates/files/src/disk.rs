//! Random access to a disk: the lazy reader over a recovery point ([`PointDisk`]), plain
//! in-memory and file disks (tests, fuzzing), and [`Part`], a window onto a range of a disk
//! that the filesystem crates read through `Read + Seek`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmvault_format::{DiskIndex, DiskRecord};
use vmvault_store::Vault;

/// Positioned reads of a disk. `read_at` fills `buf` whole or fails; reading past the end is
/// an error, never a short read.
pub trait ReadAt: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The last read that failed because the disk itself could not be read (as opposed to a
    /// read out of range), taken: tells a vault problem from a damaged guest filesystem.
    fn take_error(&self) -> Option<String> {
        None
    }
}

fn past_end(offset: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at {offset} past the disk's end ({size})"),
    )
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(past_end(offset, len, size)),
    }
}

/// A disk held in memory.
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

/// A raw disk image file.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    pub fn open(path: &std::path::Path) -> io::Result<FileDisk> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileDisk { file, size })
    }
}

impl ReadAt for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset)
    }
}

/// The chunks kept decoded, least recently used first out.
struct Lru {
    capacity: usize,
    tick: u64,
    chunks: HashMap<usize, (Arc<Vec<u8>>, u64)>,
}

impl Lru {
    fn get(&mut self, i: usize) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        self.chunks.get_mut(&i).map(|(c, t)| {
            *t = tick;
            c.clone()
        })
    }

    fn put(&mut self, i: usize, chunk: Arc<Vec<u8>>) {
        if self.chunks.len() >= self.capacity {
            if let Some(oldest) = self
                .chunks
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k)
            {
                self.chunks.remove(&oldest);
            }
        }
        self.tick += 1;
        self.chunks.insert(i, (chunk, self.tick));
    }
}

/// Bytes of decoded chunks a [`PointDisk`] keeps by default.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// One disk of a recovery point, read lazily: a read fetches, opens and checks only the chunks
/// it touches, keeps the last few in a small LRU cache, and reads zero chunks as zeros without
/// fetching anything. [`PointDisk::fetched`] counts the chunks fetched from the vault.
pub struct PointDisk {
    vault: Arc<Vault>,
    name: String,
    index: DiskIndex,
    cache: Mutex<Lru>,
    fetched: AtomicU64,
    /// The last fetch that failed: tells a vault problem from a damaged guest filesystem when
    /// a filesystem crate reports only "I/O error".
    last_error: Mutex<Option<String>>,
}

impl PointDisk {
    /// Loads the disk's index (checked against its digest); fetches no chunk.
    pub fn open(vault: Arc<Vault>, disk: &DiskRecord) -> vmvault_store::Result<PointDisk> {
        let index = vault.load_index(&disk.index, disk.size)?;
        Ok(Self::with_cache(vault, disk, index, DEFAULT_CACHE_BYTES))
    }

    /// As `open`, with an index already loaded and a cache of about `cache_bytes`.
    pub fn with_cache(
        vault: Arc<Vault>,
        disk: &DiskRecord,
        index: DiskIndex,
        cache_bytes: usize,
    ) -> PointDisk {
        let capacity = (cache_bytes / index.chunk_size.max(1) as usize).max(4);
        PointDisk {
            vault,
            name: disk.name.clone(),
            index,
            cache: Mutex::new(Lru {
                capacity,
                tick: 0,
                chunks: HashMap::new(),
            }),
            fetched: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Chunks fetched from the vault so far (cache hits and zero chunks do not count).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The disk's chunk count, zero chunks included.
    pub fn chunk_count(&self) -> u64 {
        self.index.chunks.len() as u64
    }

    fn chunk(&self, i: usize) -> io::Result<Arc<Vec<u8>>> {
        if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(i) {
            return Ok(c);
        }
        let (_, len) = self.index.chunk_range(i);
        let mut reader = self.vault.chunk_reader();
        let data = match reader.read(&self.index.chunks[i], len) {
            Ok(d) => Arc::new(d.to_vec()),
            Err(e) => {
                let msg = format!("chunk {i} of disk {}: {e}", self.name);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
                return Err(io::Error::other(msg));
            }
        };
        self.fetched.fetch_add(1, Ordering::Relaxed);
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(i, data.clone());
        Ok(data)
    }
}

impl ReadAt for PointDisk {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn take_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let cs = self.index.chunk_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = (pos / cs) as usize;
            let within = (pos % cs) as usize;
            let (_, len) = self.index.chunk_range(i);
            let n = (len - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if self.index.chunks[i].is_zero_chunk() {
                out.fill(0);
            } else {
                out.copy_from_slice(&self.chunk(i)?[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }
}

/// A window onto bytes `[start, start + len)` of a disk, with a cursor: what the filesystem
/// crates read through. Cheap to clone. Writes fail: nothing here writes to a disk.
///
/// With a budget, reads stop with an error once that many bytes were read through this
/// window (and its clones): partition-table parsers get a small one, so that no table can make
/// them walk a disk sector by sector.
#[derive(Clone)]
pub struct Part {
    disk: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    pos: u64,
    budget: Option<Arc<AtomicU64>>,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Part({}+{})", self.start, self.len)
    }
}

impl Part {
    /// A window clamped to the disk.
    pub fn new(disk: Arc<dyn ReadAt>, start: u64, len: u64) -> Part {
        let size = disk.size();
        let start = start.min(size);
        let len = len.min(size - start);
        Part {
            disk,
            start,
            len,
            pos: 0,
            budget: None,
        }
    }

    pub fn whole(disk: Arc<dyn ReadAt>) -> Part {
        let len = disk.size();
        Part::new(disk, 0, len)
    }

    pub fn with_budget(mut self, bytes: u64) -> Part {
        self.budget = Some(Arc::new(AtomicU64::new(bytes)));
        self
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    /// Reads exactly `buf.len()` bytes at `offset` within the window.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        if let Some(b) = &self.budget {
            let n = buf.len() as u64;
            if b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(n)
            })
            .is_err()
            {
                return Err(io::Error::other("read budget exhausted: refusing to go on"));
            }
        }
        self.disk.read_at(self.start + offset, buf)
    }
}

impl Read for Part {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.read_exact_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Part {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::fs::seek_target(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

impl Write for Part {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "guest disks are read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Part {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(start_byte, dst).map_err(|e| e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_reads_within_its_window_only() {
        let disk: Arc<dyn ReadAt> = Arc::new(MemDisk((0..=255u8).cycle().take(4096).collect()));
        let mut p = Part::new(disk, 1000, 100);
        let mut buf = [0u8; 10];
        p.seek(SeekFrom::Start(95)).unwrap();
        assert_eq!(p.read(&mut buf).unwrap(), 5);
        assert_eq!(buf[0], ((1000 + 95) % 256) as u8);
        assert_eq!(p.read(&mut buf).unwrap(), 0);
        assert!(p.read_exact_at(95, &mut buf).is_err());
        assert!(p.write(b"x").is_err());
    }

    #[test]
    fn budget_stops_reads() {
        let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(vec![0; 4096]));
        let p = Part::whole(disk).with_budget(1024);
        let mut buf = [0u8; 512];
        p.read_exact_at(0, &mut buf).unwrap();
        p.clone().read_exact_at(512, &mut buf).unwrap();
        assert!(p.read_exact_at(0, &mut buf).is_err());
    }
}
