//! Writing a dynamic VHDX image for a restore.
//!
//! Layout, as QEMU and Hyper-V lay out theirs: file identifier, two headers and two region
//! tables in the first megabyte; a 1 MiB log (empty: the log GUID is zero) at 1 MiB; the
//! metadata region at 2 MiB; the BAT at 3 MiB; payload blocks after it, appended in the order
//! they are first written. The headers, region tables, metadata and BAT are written by
//! `finish`, the file identifier last, so an interrupted restore leaves no file that passes for
//! a valid image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::format::*;
use crate::{DiskError, DiskWriter};

/// 1 MiB blocks, not Hyper-V's default 32 MiB: a restored disk is often copied to a Hyper-V
/// host, where the unwritten part of every allocated block stops being a hole and takes space;
/// with 1 MiB blocks (the size Microsoft advises for Linux guests) that waste stays small, and
/// the BAT of even a 64 TiB disk is a reasonable 512 MiB.
pub const BLOCK_SIZE: u64 = MIB;
const LOGICAL_SECTOR: u64 = 512;
/// Hyper-V's default for new VHDX files; guests only use it as an alignment hint.
const PHYSICAL_SECTOR: u32 = 4096;
const CHUNK_RATIO: u64 = SECTORS_PER_CHUNK * LOGICAL_SECTOR / BLOCK_SIZE;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u32 = MIB as u32;
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u32 = MIB as u32;
const BAT_OFFSET: u64 = 3 * MIB;
/// Block locations are kept in pages of this many blocks, allocated when first written: memory
/// follows the data written, not the disk's size.
const PAGE: usize = 4096;

/// Writes a dynamic VHDX of 1 MiB blocks; see the module doc for the layout.
pub struct VhdxWriter {
    path: PathBuf,
    file: File,
    /// The virtual size: the size asked for, rounded up to a whole 512-byte sector as the
    /// format requires.
    size: u64,
    bat_length: u64,
    state: Mutex<State>,
}

struct State {
    /// File offset of each written block, in MiB (0: never written).
    pages: Vec<Option<Box<[u32; PAGE]>>>,
    /// Where the next block goes, in MiB.
    next_mb: u64,
    finished: bool,
}

impl State {
    fn get(&self, block: u64) -> u32 {
        match &self.pages[block as usize / PAGE] {
            Some(p) => p[block as usize % PAGE],
            None => 0,
        }
    }

    fn set(&mut self, block: u64, mb: u32) {
        self.pages[block as usize / PAGE].get_or_insert_with(|| Box::new([0; PAGE]))
            [block as usize % PAGE] = mb;
    }
}

fn bat_entries(size: u64) -> u64 {
    let blocks = size.div_ceil(BLOCK_SIZE);
    if blocks == 0 {
        0
    } else {
        blocks + (blocks - 1) / CHUNK_RATIO
    }
}

impl VhdxWriter {
    /// Creates `path` (refusing an existing file unless `overwrite`) for a disk of `size`
    /// bytes, rounded up to a multiple of 512.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<VhdxWriter, DiskError> {
        let size = size
            .checked_next_multiple_of(LOGICAL_SECTOR)
            .filter(|&s| s <= MAX_VIRTUAL_SIZE)
            .ok_or_else(|| {
                DiskError::unsupported(
                    path,
                    FORMAT,
                    format!("a {size}-byte disk is larger than the format's 64 TiB"),
                )
            })?;
        let file = crate::create_file(path, overwrite)?;
        let bat_length = (bat_entries(size) * 8).next_multiple_of(MIB).max(MIB);
        let blocks = size.div_ceil(BLOCK_SIZE) as usize;
        Ok(VhdxWriter {
            path: path.to_path_buf(),
            file,
            size,
            bat_length,
            state: Mutex::new(State {
                pages: (0..blocks.div_ceil(PAGE)).map(|_| None).collect(),
                next_mb: (BAT_OFFSET + bat_length) / MIB,
                finished: false,
            }),
        })
    }

    /// The path being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: u64, state: &State) -> io::Result<()> {
        if state.finished {
            return Err(io::Error::other("VHDX writer used after finish"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of the {}-byte disk",
                    self.size
                ),
            )),
        }
    }

    fn write_metadata(&self, state: &State) -> io::Result<()> {
        // The BAT, 1 MiB at a time. Blocks never written are ZERO rather than NOT_PRESENT:
        // [MS-VHDX] 2.5.1.1 leaves NOT_PRESENT blocks of a dynamic disk undefined, ZERO reads
        // as zeros in every reader (QEMU marks unwritten blocks the same way).
        let entries = bat_entries(self.size);
        let mut buf = vec![0u8; MIB as usize];
        let mut index = 0u64;
        while index < entries {
            let n = (entries - index).min(MIB / 8);
            for (slot, i) in buf.chunks_exact_mut(8).zip(index..index + n) {
                let entry = if i % (CHUNK_RATIO + 1) == CHUNK_RATIO {
                    SB_NOT_PRESENT
                } else {
                    let block = i - i / (CHUNK_RATIO + 1);
                    match state.get(block) {
                        0 => PAYLOAD_ZERO,
                        mb => ((mb as u64) << 20) | PAYLOAD_FULLY_PRESENT,
                    }
                };
                slot.copy_from_slice(&entry.to_le_bytes());
            }
            self.file
                .write_all_at(&buf[..n as usize * 8], BAT_OFFSET + index * 8)?;
            index += n;
        }

        let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
        let mut params = Vec::with_capacity(8);
        params.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        params.extend_from_slice(&0u32.to_le_bytes());
        items.push((FILE_PARAMETERS, params, META_IS_REQUIRED));
        let disk = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
        items.push((VIRTUAL_DISK_SIZE, self.size.to_le_bytes().to_vec(), disk));
        items.push((PAGE_83_DATA, Guid::random().0.to_vec(), disk));
        items.push((
            LOGICAL_SECTOR_SIZE,
            (LOGICAL_SECTOR as u32).to_le_bytes().to_vec(),
            disk,
        ));
        items.push((
            PHYSICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR.to_le_bytes().to_vec(),
            disk,
        ));
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (item, bytes, flags) in items {
            entries.push(MetadataEntry {
                item,
                offset: (METADATA_TABLE_SIZE + data.len()) as u32,
                length: bytes.len() as u32,
                flags,
            });
            data.extend_from_slice(&bytes);
        }
        self.file
            .write_all_at(&encode_metadata_table(&entries), METADATA_OFFSET)?;
        self.file
            .write_all_at(&data, METADATA_OFFSET + METADATA_TABLE_SIZE as u64)?;

        let regions = [
            Region {
                guid: BAT_REGION,
                offset: BAT_OFFSET,
                length: self.bat_length as u32,
                required: true,
            },
            Region {
                guid: METADATA_REGION,
                offset: METADATA_OFFSET,
                length: METADATA_LENGTH,
                required: true,
            },
        ];
        let table = encode_region_table(&regions);
        for at in REGION_TABLE_OFFSETS {
            self.file.write_all_at(&table, at)?;
        }

        let mut header = Header {
            sequence: 1,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH,
            log_offset: LOG_OFFSET,
        };
        for at in HEADER_OFFSETS {
            self.file.write_all_at(&header.encode(), at)?;
            header.sequence += 1;
        }

        let mut identifier = vec![0u8; 8 + 512];
        identifier[..8].copy_from_slice(FILE_SIGNATURE);
        let creator = format!("vmvault {}", env!("CARGO_PKG_VERSION"));
        for (i, u) in creator.encode_utf16().take(256).enumerate() {
            identifier[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        self.file.write_all_at(&identifier, 0)
    }
}

/// Whether `buf` is all zeros, a word at a time.
fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(64);
    for w in words.by_ref() {
        let mut acc = 0u64;
        for q in w.chunks_exact(8) {
            acc |= u64::from_ne_bytes(q.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

impl DiskWriter for VhdxWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.check(offset, buf.len() as u64, &state)?;
        // Pieces of consecutive blocks stored back to back go out in one pwrite.
        let mut pending: Option<(u64, usize, usize)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / BLOCK_SIZE;
            let within = at % BLOCK_SIZE;
            let n = (BLOCK_SIZE - within).min((buf.len() - pos) as u64) as usize;
            let piece = &buf[pos..pos + n];
            // Zeros need no writing: a block never written reads as zeros, and so does any
            // part of an allocated block not written yet (a hole in the new file); the restore
            // writes each range at most once.
            if !is_zero(piece) {
                let mut mb = state.get(block);
                if mb == 0 {
                    mb = state.next_mb as u32;
                    state.next_mb += BLOCK_SIZE / MIB;
                    state.set(block, mb);
                }
                let file_at = ((mb as u64) << 20) + within;
                pending = match pending {
                    Some((start, from, len))
                        if start + len as u64 == file_at && from + len == pos =>
                    {
                        Some((start, from, len + n))
                    }
                    Some((start, from, len)) => {
                        self.file.write_all_at(&buf[from..from + len], start)?;
                        Some((file_at, pos, n))
                    }
                    None => Some((file_at, pos, n)),
                };
            }
            pos += n;
        }
        if let Some((start, from, len)) = pending {
            self.file.write_all_at(&buf[from..from + len], start)?;
        }
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        // Nothing to write: see write_at.
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.check(offset, len, &state)
    }

    /// Writes the BAT, metadata, region tables, headers and file identifier. Like the raw
    /// writer, leaves the data to the page cache (no fsync).
    fn finish(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.finished {
            return Ok(());
        }
        // Every allocated block lies wholly inside the file, its unwritten tail a hole: QEMU's
        // check refuses a block that ends past the end of the file.
        self.file.set_len(state.next_mb * MIB)?;
        self.write_metadata(&state)?;
        state.finished = true;
        Ok(())
    }
}
