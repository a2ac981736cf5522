//! Reading a VHDX image: opening (headers, region table, metadata, BAT, parent) and random
//! access through the BAT held in memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::format::*;
use super::layout::{open_parent, read_metadata, read_region_table};
use crate::{DiskError, DiskReader};

/// How many sector bitmap blocks (1 MiB each) a differencing reader keeps: a sequential read
/// walks one chunk (4 GiB or more of the disk) at a time, so a few are plenty.
const BITMAP_CACHE: usize = 4;

/// What one block's bytes come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The payload block at this file offset.
    File(u64),
    Zero,
    /// The parent disk (differencing images only).
    Parent,
    /// Sector by sector, the payload block at this file offset or the parent, as the chunk's
    /// sector bitmap says.
    Partial(u64),
}

pub struct VhdxReader {
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u64,
    logical_sector_size: u64,
    chunk_ratio: u64,
    subformat: &'static str,
    /// Payload BAT entries, by block number.
    blocks: Vec<u64>,
    /// Sector bitmap BAT entries, by chunk number (differencing images only).
    bitmaps: Vec<u64>,
    parent: Option<Box<dyn DiskReader>>,
    bitmap_cache: Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

impl VhdxReader {
    /// Opens `path`; for a differencing image, its parent is opened through
    /// [`crate::open_in_chain`] with `chain`.
    pub fn open(path: &Path, chain: &mut crate::Chain) -> Result<VhdxReader, DiskError> {
        chain.begin(path)?;
        let invalid = |detail: String| DiskError::invalid(path, FORMAT, detail);
        let file = File::open(path).map_err(|e| DiskError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();

        let header = read_current_header(&file, path)?;
        if !header.log_guid.is_zero() {
            return Err(DiskError::unsupported(
                path,
                FORMAT,
                format!(
                    "its log holds updates not yet written to the image (log GUID {}): it was \
                     not closed cleanly. Replay the log first, by opening the image once in \
                     Hyper-V (or mounting it in Windows) or with `qemu-img check -r all -f vhdx`",
                    header.log_guid
                ),
            ));
        }

        let (bat_region, metadata_region) = read_region_table(&file, path, file_len)?;
        let meta = read_metadata(&file, path, &metadata_region)?;

        let block_size = meta.block_size as u64;
        let sector = meta.logical_sector_size as u64;
        let size = meta.virtual_size;
        let differencing = meta.flags & HAS_PARENT != 0;
        // Both are powers of two, block_size <= 256 MiB and sector >= 512: the ratio is a power
        // of two of at least 16.
        let chunk_ratio = SECTORS_PER_CHUNK * sector / block_size;
        let data_blocks = size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        // [MS-VHDX] 2.5: a differencing BAT ends with the last chunk's sector bitmap entry, the
        // others with the last payload entry.
        let entries = if differencing {
            bitmap_blocks * (chunk_ratio + 1)
        } else if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        if entries * 8 > bat_region.length as u64 {
            return Err(invalid(format!(
                "the BAT region ({} bytes) is too small for the {entries} entries a {size}-byte \
                 disk of {block_size}-byte blocks needs",
                bat_region.length
            )));
        }
        // Checked before anything is allocated for the BAT: its size is then bounded by the
        // file's.
        if bat_region.offset + entries * 8 > file_len {
            return Err(invalid(format!(
                "truncated: the BAT at {} ({} bytes) ends past the end of the file ({file_len} \
                 bytes)",
                bat_region.offset,
                entries * 8
            )));
        }

        let mut blocks = Vec::with_capacity(data_blocks as usize);
        let mut bitmaps = Vec::with_capacity(if differencing {
            bitmap_blocks as usize
        } else {
            0
        });
        let mut buf = vec![0u8; MIB.min(entries * 8) as usize];
        let mut index = 0u64;
        while index < entries {
            let n = (entries - index).min(buf.len() as u64 / 8);
            let piece = &mut buf[..n as usize * 8];
            crate::read_exact_at(&file, piece, bat_region.offset + index * 8, path, FORMAT)?;
            for raw in piece.chunks_exact(8) {
                let entry = u64::from_le_bytes(raw.try_into().expect("8 bytes"));
                if index % (chunk_ratio + 1) == chunk_ratio {
                    if differencing {
                        bitmaps.push(entry);
                    }
                } else if (blocks.len() as u64) < data_blocks {
                    blocks.push(entry);
                }
                index += 1;
            }
        }

        let reserved = [
            (0, HEADER_SECTION, "the header section"),
            (
                bat_region.offset,
                bat_region.offset + bat_region.length as u64,
                "the BAT",
            ),
            (
                metadata_region.offset,
                metadata_region.offset + metadata_region.length as u64,
                "the metadata region",
            ),
        ];
        let check_place = |what: String, offset: u64, len: u64| -> Result<(), DiskError> {
            let end = offset
                .checked_add(len)
                .ok_or_else(|| invalid(format!("{what} at offset {offset} overflows")))?;
            if end > file_len {
                return Err(invalid(format!(
                    "truncated: {what} at offset {offset} ({len} bytes) ends past the end of the \
                     file ({file_len} bytes)"
                )));
            }
            for (start, stop, name) in reserved {
                if offset < stop && start < end {
                    return Err(invalid(format!(
                        "{what} at offset {offset} overlaps {name}"
                    )));
                }
            }
            Ok(())
        };
        for (i, &entry) in bitmaps.iter().enumerate() {
            match entry & BAT_STATE_MASK {
                SB_NOT_PRESENT => {}
                SB_PRESENT => check_place(
                    format!("sector bitmap block {i}"),
                    entry & BAT_OFFSET_MASK,
                    SECTOR_BITMAP_SIZE,
                )?,
                s => {
                    return Err(invalid(format!(
                        "sector bitmap block {i} has the reserved state {s}"
                    )))
                }
            }
        }
        for (i, &entry) in blocks.iter().enumerate() {
            let i = i as u64;
            match entry & BAT_STATE_MASK {
                PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_V095 => {}
                state @ (PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) => {
                    if state == PAYLOAD_PARTIALLY_PRESENT {
                        if !differencing {
                            return Err(invalid(format!(
                                "block {i} is partially present, a state only differencing \
                                 images may use"
                            )));
                        }
                        if bitmaps[(i / chunk_ratio) as usize] & BAT_STATE_MASK != SB_PRESENT {
                            return Err(invalid(format!(
                                "block {i} is partially present but its chunk has no sector \
                                 bitmap"
                            )));
                        }
                    }
                    // The last block holds only the disk's tail; QEMU, too, accepts a file that
                    // ends right after it.
                    let len = block_size.min(size - i * block_size);
                    check_place(format!("block {i}"), entry & BAT_OFFSET_MASK, len)?;
                }
                s => return Err(invalid(format!("block {i} has the reserved state {s}"))),
            }
        }

        let parent = match &meta.parent_locator {
            Some(locator) => Some(open_parent(path, locator, chain)?),
            None => None,
        };
        let subformat = if differencing {
            "differencing"
        } else if meta.flags & LEAVE_BLOCKS_ALLOCATED != 0 {
            "fixed"
        } else {
            "dynamic"
        };
        Ok(VhdxReader {
            path: path.to_path_buf(),
            file,
            size,
            block_size,
            logical_sector_size: sector,
            chunk_ratio,
            subformat,
            blocks,
            bitmaps,
            parent,
            bitmap_cache: Mutex::new(Vec::new()),
        })
    }

    /// The disk's block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    fn source(&self, block: u64) -> Source {
        let entry = self.blocks[block as usize];
        let differencing = self.parent.is_some();
        match entry & BAT_STATE_MASK {
            PAYLOAD_FULLY_PRESENT => Source::File(entry & BAT_OFFSET_MASK),
            PAYLOAD_PARTIALLY_PRESENT => Source::Partial(entry & BAT_OFFSET_MASK),
            // ZERO says the block reads as zeros, in a differencing image too: it hides the
            // parent's data.
            PAYLOAD_ZERO => Source::Zero,
            // NOT_PRESENT, UNDEFINED, UNMAPPED: not in this file. [MS-VHDX] 2.5.1.1 lets a
            // reader return zeros for them; a differencing image's parent holds their data.
            _ if differencing => Source::Parent,
            _ => Source::Zero,
        }
    }

    /// The bytes of block `block` (this many, at most) the disk holds: the last block is cut
    /// short by the disk's size.
    fn block_len(&self, block: u64) -> u64 {
        self.block_size.min(self.size - block * self.block_size)
    }

    /// Reads `buf.len()` bytes at `offset` of the parent, as zeros past the parent's end (a
    /// differencing disk may be larger than its parent).
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(parent) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let have = parent.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if have > 0 {
            parent.read_at(&mut buf[..have], offset)?;
        }
        buf[have..].fill(0);
        Ok(())
    }

    fn parent_may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let Some(parent) = &self.parent else {
            return Ok(false);
        };
        let len = parent.size().saturating_sub(offset).min(len);
        if len == 0 {
            return Ok(false);
        }
        parent.may_have_data(offset, len)
    }

    /// The sector bitmap block of chunk `chunk`, read once and kept while in use.
    fn sector_bitmap(&self, chunk: u64) -> io::Result<Arc<Vec<u8>>> {
        {
            let mut cache = self.bitmap_cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|(c, _)| *c == chunk) {
                let hit = cache.remove(i);
                let bitmap = hit.1.clone();
                cache.insert(0, hit);
                return Ok(bitmap);
            }
        }
        let offset = self.bitmaps[chunk as usize] & BAT_OFFSET_MASK;
        let mut bitmap = vec![0u8; SECTOR_BITMAP_SIZE as usize];
        self.file.read_exact_at(&mut bitmap, offset)?;
        let bitmap = Arc::new(bitmap);
        let mut cache = self.bitmap_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(0, (chunk, bitmap.clone()));
        cache.truncate(BITMAP_CACHE);
        Ok(bitmap)
    }

    /// Reads `[within, within + buf.len())` of partially present block `block`, stored at
    /// `file_offset`: each run of sectors from this file or the parent, as the bitmap says.
    fn read_partial(
        &self,
        block: u64,
        file_offset: u64,
        within: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let bitmap = self.sector_bitmap(block / self.chunk_ratio)?;
        let sectors_per_block = self.block_size / self.logical_sector_size;
        let first_sector = (block % self.chunk_ratio) * sectors_per_block;
        let bit = |byte_in_block: u64| {
            let s = first_sector + byte_in_block / self.logical_sector_size;
            bitmap[(s / 8) as usize] >> (s % 8) & 1 != 0
        };
        let end = within + buf.len() as u64;
        let mut at = within;
        while at < end {
            let present = bit(at);
            let mut run_end = (at / self.logical_sector_size + 1) * self.logical_sector_size;
            while run_end < end && bit(run_end) == present {
                run_end += self.logical_sector_size;
            }
            let run_end = run_end.min(end);
            let piece = &mut buf[(at - within) as usize..(run_end - within) as usize];
            if present {
                self.file.read_exact_at(piece, file_offset + at)?;
            } else {
                self.read_parent(piece, block * self.block_size + at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    /// How many bytes of partially present block `block` this file holds.
    fn partial_bytes(&self, block: u64) -> io::Result<u64> {
        let bitmap = self.sector_bitmap(block / self.chunk_ratio)?;
        let sectors_per_block = self.block_size / self.logical_sector_size;
        let sectors_in_disk = self.block_len(block).div_ceil(self.logical_sector_size);
        let first = (block % self.chunk_ratio) * sectors_per_block;
        let set = (first..first + sectors_in_disk)
            .filter(|s| bitmap[(s / 8) as usize] >> (s % 8) & 1 != 0)
            .count() as u64;
        Ok((set * self.logical_sector_size).min(self.block_len(block)))
    }
}

fn out_of_range(offset: u64, len: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{len} bytes at {offset} are past the end of the {size}-byte disk"),
    )
}

impl DiskReader for VhdxReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => return Err(out_of_range(offset, len, self.size)),
        }
        let bs = self.block_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let block = at / bs;
            let within = at % bs;
            let first = (bs - within).min((buf.len() - pos) as u64) as usize;
            let source = self.source(block);
            // Neighbouring blocks read alike (stored back to back, zeros, or the parent) are
            // read in one go: one pread per run rather than per block.
            let mut run = first;
            let mut next = block + 1;
            while pos + run < buf.len() {
                let same = match (source, self.source(next)) {
                    (Source::File(a), Source::File(b)) => b == a + within + run as u64,
                    (Source::Zero, Source::Zero) | (Source::Parent, Source::Parent) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
                run += bs.min((buf.len() - pos - run) as u64) as usize;
                next += 1;
            }
            let piece = &mut buf[pos..pos + run];
            match source {
                Source::File(file_offset) => {
                    self.file.read_exact_at(piece, file_offset + within)?
                }
                Source::Zero => piece.fill(0),
                Source::Parent => self.read_parent(piece, at)?,
                Source::Partial(file_offset) => {
                    self.read_partial(block, file_offset, within, piece)?
                }
            }
            pos += run;
        }
        Ok(())
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.size);
        let mut at = offset;
        while at < end {
            let block = at / self.block_size;
            match self.source(block) {
                Source::File(_) | Source::Partial(_) => return Ok(true),
                Source::Zero => at = (block + 1) * self.block_size,
                Source::Parent => {
                    let mut next = block + 1;
                    while next * self.block_size < end && self.source(next) == Source::Parent {
                        next += 1;
                    }
                    let stop = (next * self.block_size).min(end);
                    if self.parent_may_have_data(at, stop - at)? {
                        return Ok(true);
                    }
                    at = stop;
                }
            }
        }
        Ok(false)
    }

    fn format(&self) -> &'static str {
        "vhdx"
    }

    fn subformat(&self) -> Option<String> {
        Some(self.subformat.to_string())
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing(&self) -> Option<&dyn DiskReader> {
        self.parent.as_deref()
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for block in 0..self.blocks.len() as u64 {
            total += match self.source(block) {
                Source::File(_) => self.block_len(block),
                Source::Partial(_) => self.partial_bytes(block)?,
                Source::Zero | Source::Parent => 0,
            };
        }
        Ok(total)
    }
}
