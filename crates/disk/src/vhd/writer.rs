//! Writing dynamic and fixed VHDs for restores.
//!
//! Dynamic ("vhd"): footer copy at 0, dynamic header at 512, BAT at 1536, then 2 MiB blocks
//! in the order the restore first writes to them, each a 512-byte sector bitmap of all ones
//! and the block's data; the footer follows the last block. Blocks never written (or written
//! only with zeros) stay unallocated; the unwritten parts of an allocated block are holes in
//! the file, so they read as zeros and take no space. The BAT, headers and footers are written
//! by `finish`. The virtual size is the disk's size rounded up to whole sectors.
//!
//! Fixed ("vhd-fixed"): the disk's bytes, then the footer. Azure accepts only fixed VHDs whose
//! virtual size is a whole number of MiB, so the size is rounded up to a multiple of 1 MiB; the
//! added tail reads as zeros. Ranges never written stay holes in the file.
//!
//! Both: at most 2040 GiB (the limit of Hyper-V and QEMU), a CHS geometry computed as the
//! specification's appendix says, and the creator application "qem2". Older QEMU releases
//! (QEMU 10 no longer does) size images from unknown creators by their CHS geometry, which
//! rounds down and would cut the end of the disk off; "qem2" is what QEMU itself writes
//! (`force_size`) for images whose size is the footer's current size, the size Hyper-V and
//! Azure read too.

use std::collections::hash_map::RandomState;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{DiskError, DiskWriter};

use super::header::{
    bitmap_size, DynHeader, Footer, Geometry, Locator, DYN_HEADER_LEN, FOOTER_LEN, SECTOR,
    TYPE_DYNAMIC, TYPE_FIXED, UNALLOCATED, VHD_EPOCH,
};
use super::FORMAT;

/// The largest disk Hyper-V and QEMU open as VHD.
pub(crate) const MAX_WRITE_SIZE: u64 = 2040 << 30;
const BLOCK_SIZE: u32 = 2 << 20;
const HEADER_AT: u64 = FOOTER_LEN as u64;
const TABLE_AT: u64 = HEADER_AT + DYN_HEADER_LEN as u64;
const MIB: u64 = 1 << 20;

pub struct VhdWriter {
    path: PathBuf,
    file: File,
    /// The virtual size the footer records (rounded up from the disk's size).
    size: u64,
    footer: Footer,
    dynamic: Option<Mutex<Dynamic>>,
}

struct Dynamic {
    bat: Vec<u32>,
    /// Where the next block (its bitmap) goes; after the last block, where the footer goes.
    next_block_at: u64,
}

impl VhdWriter {
    /// A dynamic VHD of `size` bytes (rounded up to whole sectors) in 2 MiB blocks.
    pub fn create_dynamic(path: &Path, size: u64, overwrite: bool) -> Result<VhdWriter, DiskError> {
        let size = checked_size(path, size, SECTOR)?;
        let blocks = size.div_ceil(u64::from(BLOCK_SIZE));
        let table_len = (blocks * 4).next_multiple_of(SECTOR);
        let file = crate::create_file(path, overwrite)?;
        Ok(VhdWriter {
            path: path.to_path_buf(),
            file,
            size,
            footer: footer(size, TYPE_DYNAMIC, HEADER_AT, path),
            dynamic: Some(Mutex::new(Dynamic {
                // Bounded: at most 2040 GiB / 2 MiB entries (4 MiB).
                bat: vec![UNALLOCATED; blocks as usize],
                next_block_at: TABLE_AT + table_len,
            })),
        })
    }

    /// A fixed VHD of `size` bytes rounded up to a whole number of MiB (as Azure requires).
    pub fn create_fixed(path: &Path, size: u64, overwrite: bool) -> Result<VhdWriter, DiskError> {
        let size = checked_size(path, size, MIB)?;
        let file = crate::create_file(path, overwrite)?;
        file.set_len(size + FOOTER_LEN as u64)
            .map_err(|e| DiskError::io(path, e))?;
        Ok(VhdWriter {
            path: path.to_path_buf(),
            file,
            size,
            footer: footer(size, TYPE_FIXED, u64::MAX, path),
            dynamic: None,
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: write of {len} bytes at {offset} is past the end of the disk ({} bytes)",
                    self.path.display(),
                    self.size
                ),
            )),
        }
    }
}

/// `size` rounded up to a multiple of `unit`, refused past [`MAX_WRITE_SIZE`].
fn checked_size(path: &Path, size: u64, unit: u64) -> Result<u64, DiskError> {
    match size.checked_next_multiple_of(unit) {
        Some(s) if s <= MAX_WRITE_SIZE => Ok(s),
        _ => Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("a disk of {size} bytes: VHD disks hold at most 2040 GiB"),
        )),
    }
}

fn footer(size: u64, disk_type: u32, data_offset: u64, path: &Path) -> Footer {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let version = |v: &str| v.parse::<u32>().unwrap_or(0) & 0xffff;
    Footer {
        // Bit 1 is reserved and always set.
        features: 2,
        data_offset,
        timestamp: now.as_secs().saturating_sub(VHD_EPOCH) as u32,
        creator_app: *b"qem2",
        creator_version: version(env!("CARGO_PKG_VERSION_MAJOR")) << 16
            | version(env!("CARGO_PKG_VERSION_MINOR")),
        // The specification names only Windows and Macintosh hosts; QEMU writes this one too.
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: Geometry::for_size(size),
        disk_type,
        unique_id: unique_id(now.as_nanos(), path),
        saved_state: 0,
    }
}

/// A random (version 4) UUID: std's hasher keys are random per process, mixed with the time
/// and the path so that two images made by one process differ too.
fn unique_id(nanos: u128, path: &Path) -> [u8; 16] {
    let state = RandomState::new();
    let mut id = [0u8; 16];
    for (i, half) in id.chunks_exact_mut(8).enumerate() {
        let mut h = state.build_hasher();
        h.write_u128(nanos);
        h.write(path.as_os_str().as_encoded_bytes());
        h.write_u32(std::process::id());
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

impl DiskWriter for VhdWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let Some(dynamic) = &self.dynamic else {
            // Each range is written at most once, so zeros need not be: a hole reads as zeros.
            if buf.iter().any(|b| *b != 0) {
                self.file.write_all_at(buf, offset)?;
            }
            return Ok(());
        };
        let mut d = dynamic.lock().unwrap_or_else(|e| e.into_inner());
        let block_size = u64::from(BLOCK_SIZE);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = (pos / block_size) as usize;
            let in_block = pos % block_size;
            let n = (block_size - in_block).min((buf.len() - done) as u64) as usize;
            let piece = &buf[done..done + n];
            done += n;
            if piece.iter().all(|b| *b == 0) {
                continue;
            }
            if d.bat[block] == UNALLOCATED {
                let at = d.next_block_at;
                let sector = u32::try_from(at / SECTOR)
                    .ok()
                    .filter(|s| *s != UNALLOCATED)
                    .ok_or_else(|| {
                        io::Error::other(format!(
                            "{}: a block at offset {at} is past what a VHD can address",
                            self.path.display()
                        ))
                    })?;
                // All ones: every sector of the block is this image's (zeros included).
                let bitmap = vec![0xffu8; bitmap_size(BLOCK_SIZE) as usize];
                self.file.write_all_at(&bitmap, at)?;
                d.bat[block] = sector;
                d.next_block_at = at + bitmap.len() as u64 + block_size;
            }
            let data_at = u64::from(d.bat[block]) * SECTOR + bitmap_size(BLOCK_SIZE) + in_block;
            self.file.write_all_at(piece, data_at)?;
        }
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        // Never written, the range is unallocated (dynamic) or a hole (fixed): zeros already.
        self.check_range(offset, len)
    }

    /// Writes the BAT, the headers and the footers; like raw images, leaves durability to the
    /// page cache.
    fn finish(&self) -> io::Result<()> {
        let footer = self.footer.encode();
        let Some(dynamic) = &self.dynamic else {
            return self.file.write_all_at(&footer, self.size);
        };
        let d = dynamic.lock().unwrap_or_else(|e| e.into_inner());
        let table_len = (d.bat.len() as u64 * 4).next_multiple_of(SECTOR) as usize;
        // Padding entries read as unallocated too.
        let mut table = vec![0xffu8; table_len];
        for (slot, entry) in table.chunks_exact_mut(4).zip(&d.bat) {
            slot.copy_from_slice(&entry.to_be_bytes());
        }
        let header = DynHeader {
            table_offset: TABLE_AT,
            max_table_entries: d.bat.len() as u32,
            block_size: BLOCK_SIZE,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; 512],
            locators: [Locator::default(); 8],
        };
        self.file.write_all_at(&table, TABLE_AT)?;
        self.file.write_all_at(&header.encode(), HEADER_AT)?;
        self.file.write_all_at(&footer, 0)?;
        // Also extends the file over the last block's unwritten tail.
        self.file.write_all_at(&footer, d.next_block_at)?;
        self.file.set_len(d.next_block_at + FOOTER_LEN as u64)
    }
}
