//! Random access to a disk: the lazy reader over a recovery point ([`PointDisk`], the
//! store's), plain in-memory and file disks (tests, fuzzing), and [`Part`], a window onto a
//! range of a disk that the filesystem crates read through `Read + Seek`.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The lazy reader lives with the vault, which the NBD export shares it with; re-exported so
/// that callers keep naming it from here.
pub use vmvault_store::{PointDisk, DEFAULT_CACHE_BYTES};

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

/// The filesystem parsers read a recovery point's disk through this.
impl ReadAt for PointDisk {
    fn size(&self) -> u64 {
        PointDisk::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // Checked here as well, so that a read past the end fails with the same kind as on
        // every other disk, not as a vault error.
        check_range(offset, buf.len(), PointDisk::size(self))?;
        PointDisk::read_at(self, buf, offset)
            .map(drop)
            .map_err(io::Error::other)
    }

    fn take_error(&self) -> Option<String> {
        PointDisk::take_error(self)
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
