//! Reading fixed, dynamic and differencing VHDs (see the module doc for what is read).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::{DiskError, DiskReader};

use super::header::{
    bitmap_size, DynHeader, Footer, DYN_HEADER_LEN, FOOTER_COOKIE, FOOTER_LEN, SECTOR,
    TYPE_DIFFERENCING, TYPE_FIXED, UNALLOCATED,
};
use super::FORMAT;

/// Far beyond any VHD a hypervisor makes (Hyper-V stops at 2040 GiB, Azure at a few TiB): a
/// size past this is a damaged field, not a disk.
const MAX_VIRTUAL_SIZE: u64 = 1 << 48;
/// 256 MiB of BAT in memory; a 2 TiB disk in 2 MiB blocks needs 1 million entries (4 MiB).
const MAX_BAT_ENTRIES: u64 = 1 << 26;
/// Sector bitmaps of differencing disks kept in memory: sequential reads need one at a time,
/// scattered ones a few hundred.
const BITMAP_CACHE_BYTES: usize = 8 << 20;

pub struct VhdReader {
    path: PathBuf,
    file: File,
    size: u64,
    layout: Layout,
}

enum Layout {
    Fixed {
        /// Whether SEEK_DATA answers for this file; block devices and some filesystems do not.
        seek_data: bool,
    },
    Sparse(Sparse),
}

/// A dynamic or differencing disk.
struct Sparse {
    /// Whether SEEK_DATA answers for this file: the unwritten parts of allocated blocks are
    /// often holes in the file (QEMU and vmvault leave them so), and read as zeros.
    seek_data: bool,
    block_size: u64,
    bitmap_size: u64,
    /// Only the entries that cover the virtual size.
    bat: Vec<u32>,
    /// Differencing disks only: where unallocated blocks and clear bitmap bits read from.
    parent: Option<Box<dyn DiskReader>>,
    bitmaps: Mutex<BitmapCache>,
}

#[derive(Default)]
struct BitmapCache {
    map: HashMap<u64, Arc<[u8]>>,
    bytes: usize,
}

impl VhdReader {
    /// Opens a VHD; a differencing disk's parent is opened through [`crate::open_in_chain`].
    pub fn open(path: &Path, chain: &mut crate::Chain) -> Result<VhdReader, DiskError> {
        chain.begin(path)?;
        let (file, len, is_file) = open_image(path)?;
        let footer = find_footer(&file, len, path)?;
        if footer.disk_type == TYPE_FIXED {
            let room = len - FOOTER_LEN as u64;
            if footer.current_size > room {
                return Err(DiskError::invalid(
                    path,
                    FORMAT,
                    format!(
                        "truncated: the footer says the disk holds {} bytes, the file has {room} \
                         before its footer",
                        footer.current_size
                    ),
                ));
            }
            return Ok(VhdReader {
                path: path.to_path_buf(),
                file,
                size: footer.current_size,
                layout: Layout::Fixed { seek_data: is_file },
            });
        }
        let mut sparse = open_sparse(path, &file, len, &footer, chain)?;
        sparse.seek_data = is_file;
        Ok(VhdReader {
            path: path.to_path_buf(),
            file,
            size: footer.current_size,
            layout: Layout::Sparse(sparse),
        })
    }
}

/// Opens an image file, refusing what is neither a regular file nor a block device before
/// opening it (opening a FIFO would block).
pub(super) fn open_image(path: &Path) -> Result<(File, u64, bool), DiskError> {
    let not_a_disk = || DiskError::NotADisk {
        path: path.display().to_string(),
    };
    let meta = std::fs::metadata(path).map_err(|e| DiskError::io(path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(not_a_disk());
    }
    let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
    let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
    let ft = meta.file_type();
    if ft.is_file() {
        Ok((file, meta.len(), true))
    } else if ft.is_block_device() {
        let len = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
            .map_err(|e| DiskError::io(path, e.into()))?;
        Ok((file, len, false))
    } else {
        Err(not_a_disk())
    }
}

/// The footer that describes the image: a fixed disk's is in its last 512 bytes; a dynamic or
/// differencing disk's is read from its copy at offset 0 (as QEMU does), or from the end when
/// that copy is missing.
pub(super) fn find_footer(file: &File, len: u64, path: &Path) -> Result<Footer, DiskError> {
    if len < FOOTER_LEN as u64 {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            format!("truncated: {len} bytes, less than a 512-byte footer"),
        ));
    }
    let tail_at = len - FOOTER_LEN as u64;
    let mut head = [0u8; FOOTER_LEN];
    crate::read_exact_at(file, &mut head, 0, path, FORMAT)?;
    let mut tail = [0u8; FOOTER_LEN];
    crate::read_exact_at(file, &mut tail, tail_at, path, FORMAT)?;
    let tail = (&tail[..8] == FOOTER_COOKIE).then(|| Footer::parse(&tail, path, tail_at));
    // Checked first: a fixed disk's data may itself begin with a VHD (a nested image).
    if let Some(Ok(f)) = &tail {
        if f.disk_type == TYPE_FIXED {
            return Ok(f.clone());
        }
    }
    if &head[..8] == FOOTER_COOKIE {
        let f = Footer::parse(&head, path, 0)?;
        if f.disk_type != TYPE_FIXED {
            return Ok(f);
        }
        return match tail {
            Some(Err(e)) => Err(e),
            _ => Err(DiskError::invalid(
                path,
                FORMAT,
                "a fixed disk footer at offset 0, but no fixed disk footer at the end",
            )),
        };
    }
    match tail {
        Some(result) => result,
        None => Err(DiskError::invalid(
            path,
            FORMAT,
            "no footer: no \"conectix\" cookie at offset 0 or in the last 512 bytes",
        )),
    }
}

fn open_sparse(
    path: &Path,
    file: &File,
    len: u64,
    footer: &Footer,
    chain: &mut crate::Chain,
) -> Result<Sparse, DiskError> {
    let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
    let header_at = footer.data_offset;
    let header_end = header_at
        .checked_add(DYN_HEADER_LEN as u64)
        .filter(|end| *end <= len)
        .ok_or_else(|| {
            invalid(format!(
                "dynamic disk header at offset {header_at} is past the end of the file ({len} \
                 bytes)"
            ))
        })?;
    let mut buf = [0u8; DYN_HEADER_LEN];
    crate::read_exact_at(file, &mut buf, header_at, path, FORMAT)?;
    let header = DynHeader::parse(&buf, path, header_at)?;

    let size = footer.current_size;
    if size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "virtual size {size} is absurd (more than 256 TiB)"
        )));
    }
    let block_size = u64::from(header.block_size);
    let blocks = size.div_ceil(block_size);
    if blocks > u64::from(header.max_table_entries) {
        return Err(invalid(format!(
            "the block allocation table has {} entries, too few for {size} bytes in blocks of \
             {block_size}",
            header.max_table_entries
        )));
    }
    if blocks > MAX_BAT_ENTRIES {
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("{blocks} blocks of {block_size} bytes: more than vmvault keeps in memory"),
        ));
    }
    let table_at = header.table_offset;
    let table_len = blocks * 4;
    let table_end = table_at
        .checked_add(table_len)
        .filter(|end| *end <= len)
        .ok_or_else(|| {
            invalid(format!(
                "block allocation table at offset {table_at} ({table_len} bytes) is past the end \
                 of the file ({len} bytes)"
            ))
        })?;
    // Bounded by the file's length (checked just above) and by MAX_BAT_ENTRIES.
    let mut raw = vec![0u8; table_len as usize];
    crate::read_exact_at(file, &mut raw, table_at, path, FORMAT)?;
    let bat: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(raw);

    let bitmap_size = bitmap_size(header.block_size);
    let metadata = [
        (0, FOOTER_LEN as u64),
        (header_at, header_end),
        (table_at, table_end),
    ];
    for (i, &entry) in bat.iter().enumerate() {
        if entry == UNALLOCATED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        let used = block_size.min(size - i as u64 * block_size);
        // No overflow: start < 2^41, bitmap_size <= 2^19, used <= 2^31.
        let end = start + bitmap_size + used;
        if end > len {
            return Err(invalid(format!(
                "truncated: block {i} at offset {start} ends at {end}, past the end of the file \
                 ({len} bytes)"
            )));
        }
        if metadata.iter().any(|&(s, e)| start < e && s < end) {
            return Err(invalid(format!(
                "block {i} at offset {start} overlaps the footer, the dynamic disk header or the \
                 block allocation table"
            )));
        }
    }

    let parent = if footer.disk_type == TYPE_DIFFERENCING {
        Some(super::parent::open_parent(path, file, len, &header, chain)?)
    } else {
        None
    };
    Ok(Sparse {
        seek_data: false,
        block_size,
        bitmap_size,
        bat,
        parent,
        bitmaps: Mutex::new(BitmapCache::default()),
    })
}

impl Sparse {
    fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let n = (self.block_size - in_block).min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + n];
            let entry = self.bat[block as usize];
            if entry == UNALLOCATED {
                self.read_parent(piece, pos)?;
            } else {
                let data_at = u64::from(entry) * SECTOR + self.bitmap_size;
                if self.parent.is_none() {
                    file.read_exact_at(piece, data_at + in_block)?;
                } else {
                    let bitmap = self.bitmap(file, block, entry)?;
                    for (start, end, here) in runs(&bitmap, in_block, in_block + n as u64) {
                        let part =
                            &mut piece[(start - in_block) as usize..(end - in_block) as usize];
                        if here {
                            file.read_exact_at(part, data_at + start)?;
                        } else {
                            self.read_parent(part, block * self.block_size + start)?;
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn read_parent(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        // A parent smaller than its child reads as zeros past its end.
        let from_parent = parent.size().saturating_sub(pos).min(buf.len() as u64) as usize;
        if from_parent > 0 {
            parent.read_at(&mut buf[..from_parent], pos)?;
        }
        buf[from_parent..].fill(0);
        Ok(())
    }

    fn parent_may_have_data(&self, pos: u64, len: u64) -> io::Result<bool> {
        let Some(parent) = &self.parent else {
            return Ok(false);
        };
        let len = parent.size().saturating_sub(pos).min(len);
        if len == 0 {
            return Ok(false);
        }
        parent.may_have_data(pos, len)
    }

    fn bitmap(&self, file: &File, block: u64, entry: u32) -> io::Result<Arc<[u8]>> {
        if let Some(b) = self.cache().map.get(&block) {
            return Ok(b.clone());
        }
        // Bounded: the bitmap lies within the file (checked at open).
        let mut b = vec![0u8; self.bitmap_size as usize];
        file.read_exact_at(&mut b, u64::from(entry) * SECTOR)?;
        let b: Arc<[u8]> = b.into();
        let mut cache = self.cache();
        if cache.bytes + b.len() > BITMAP_CACHE_BYTES {
            cache.map.clear();
            cache.bytes = 0;
        }
        cache.bytes += b.len();
        cache.map.insert(block, b.clone());
        Ok(b)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BitmapCache> {
        self.bitmaps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn may_have_data(&self, file: &File, offset: u64, end: u64) -> io::Result<bool> {
        let mut pos = offset;
        while pos < end {
            let block = pos / self.block_size;
            let in_block = pos % self.block_size;
            let n = (self.block_size - in_block).min(end - pos);
            let entry = self.bat[block as usize];
            if entry == UNALLOCATED {
                if self.parent_may_have_data(pos, n)? {
                    return Ok(true);
                }
            } else {
                let data_at = u64::from(entry) * SECTOR + self.bitmap_size;
                if self.parent.is_none() {
                    if file_has_data(file, self.seek_data, data_at + in_block, n)? {
                        return Ok(true);
                    }
                } else {
                    let bitmap = self.bitmap(file, block, entry)?;
                    for (start, stop, here) in runs(&bitmap, in_block, in_block + n) {
                        let has = if here {
                            file_has_data(file, self.seek_data, data_at + start, stop - start)?
                        } else {
                            self.parent_may_have_data(
                                block * self.block_size + start,
                                stop - start,
                            )?
                        };
                        if has {
                            return Ok(true);
                        }
                    }
                }
            }
            pos += n;
        }
        Ok(false)
    }

    fn allocated_bytes(&self, file: &File, size: u64) -> io::Result<u64> {
        let mut total = 0u64;
        let mut bitmap = vec![
            0u8;
            if self.parent.is_some() {
                self.bitmap_size as usize
            } else {
                0
            }
        ];
        for (i, &entry) in self.bat.iter().enumerate() {
            if entry == UNALLOCATED {
                continue;
            }
            let used = self.block_size.min(size - i as u64 * self.block_size);
            if self.parent.is_none() {
                total += used;
                continue;
            }
            // Not through the cache: this pass would only evict what reads are using.
            file.read_exact_at(&mut bitmap, u64::from(entry) * SECTOR)?;
            total += runs(&bitmap, 0, used)
                .filter(|r| r.2)
                .map(|(s, e, _)| e - s)
                .sum::<u64>();
        }
        Ok(total)
    }
}

/// Splits `[start, end)` (byte offsets within a block) into runs of sectors whose bitmap bits
/// are equal: `(start, end, bit set)`. Bits are most significant first within each byte.
fn runs(bitmap: &[u8], start: u64, end: u64) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
    let bit = move |sector: u64| bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0;
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let first = pos / SECTOR;
        let value = bit(first);
        let same = if value { 0xff } else { 0x00 };
        let mut next = first + 1;
        let last = (end - 1) / SECTOR;
        while next <= last {
            // Whole bytes at once: a bitmap is mostly all ones or all zeros.
            if next & 7 == 0 && next + 8 <= last + 1 && bitmap[(next / 8) as usize] == same {
                next += 8;
            } else if bit(next) == value {
                next += 1;
            } else {
                break;
            }
        }
        let run_end = (next * SECTOR).min(end);
        let run = (pos, run_end, value);
        pos = run_end;
        Some(run)
    })
}

impl DiskReader for VhdReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: read of {} bytes at {offset} is past the end of the disk ({} bytes)",
                    self.path.display(),
                    buf.len(),
                    self.size
                ),
            ));
        }
        match &self.layout {
            Layout::Fixed { .. } => self.file.read_exact_at(buf, offset),
            Layout::Sparse(s) => s.read(&self.file, buf, offset),
        }
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(false);
        }
        match &self.layout {
            Layout::Fixed { seek_data } => {
                file_has_data(&self.file, *seek_data, offset, end - offset)
            }
            Layout::Sparse(s) => s.may_have_data(&self.file, offset, end),
        }
    }

    fn format(&self) -> &'static str {
        FORMAT
    }

    fn subformat(&self) -> Option<String> {
        Some(
            match &self.layout {
                Layout::Fixed { .. } => "fixed",
                Layout::Sparse(s) if s.parent.is_some() => "differencing",
                Layout::Sparse(_) => "dynamic",
            }
            .to_string(),
        )
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing(&self) -> Option<&dyn DiskReader> {
        match &self.layout {
            Layout::Sparse(s) => s.parent.as_deref(),
            Layout::Fixed { .. } => None,
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        match &self.layout {
            Layout::Fixed { seek_data: false } => Ok(self.size),
            Layout::Fixed { seek_data: true } => fixed_data_bytes(&self.file, self.size),
            Layout::Sparse(s) => s.allocated_bytes(&self.file, self.size),
        }
    }
}

/// Whether `[offset, offset + len)` of the image file may hold data: false for holes.
fn file_has_data(file: &File, seek_data: bool, offset: u64, len: u64) -> io::Result<bool> {
    if !seek_data {
        return Ok(true);
    }
    // The fd's position moves, but every read is positioned, so nothing depends on it.
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(data) => Ok(data < offset + len),
        Err(rustix::io::Errno::NXIO) => Ok(false),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Bytes of a fixed disk's data area the file holds (not holes), from SEEK_DATA/SEEK_HOLE.
fn fixed_data_bytes(file: &File, size: u64) -> io::Result<u64> {
    use rustix::fs::{seek, SeekFrom};
    let mut total = 0;
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                return Ok(total + (size - pos));
            }
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(e) => return Err(e.into()),
        };
        total += hole.saturating_sub(data);
        pos = hole.max(data + 1);
    }
    Ok(total)
}
