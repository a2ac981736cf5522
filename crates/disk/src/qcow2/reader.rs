//! Reading a qcow2 image: opening it and its backing chain, and serving reads from the map
//! of extents (`map.rs`): data runs with one pread each, zeros, the backing file, compressed
//! clusters (`compressed.rs`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::compressed::Decoder;
use super::header::{self, Compression};
use super::map::{read_l1, Kind, TableCache};
use super::FORMAT;
use crate::{DiskError, DiskReader};

/// Reads a qcow2 image (v2 or v3) as one disk with its backing chain; safe to share between
/// threads (positioned reads, caches behind mutexes). See the module doc for what is read.
pub struct Qcow2Reader {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) file_len: u64,
    pub(super) version: u32,
    pub(super) cluster_bits: u32,
    pub(super) size: u64,
    pub(super) extended_l2: bool,
    pub(super) compression: Compression,
    /// L2 table offsets of the L1 entries that map the virtual disk; 0: none.
    pub(super) l1: Vec<u64>,
    pub(super) backing: Option<Box<dyn DiskReader>>,
    pub(super) tables: Mutex<TableCache>,
    /// The last decompressed cluster, for reads smaller than a cluster.
    pub(super) last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    pub(super) decoders: Mutex<Vec<Decoder>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn to_io(e: DiskError) -> io::Error {
    let kind = match &e {
        DiskError::Io { source, .. } => source.kind(),
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

impl Qcow2Reader {
    /// Opens `path` as one link of a backing chain (see [`crate::open_in_chain`]).
    pub fn open(path: &Path, chain: &mut crate::Chain) -> Result<Qcow2Reader, DiskError> {
        chain.begin(path)?;
        let mut file = File::open(path).map_err(|e| DiskError::io(path, e))?;
        let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
        let file_len = if meta.is_file() {
            meta.len()
        } else if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| DiskError::io(path, e))?
        } else {
            return Err(DiskError::NotADisk {
                path: path.display().to_string(),
            });
        };
        let h = header::parse(&file, path, file_len)?;
        let l1 = read_l1(&file, path, file_len, &h)?;
        let backing = match &h.backing_file {
            Some(name) => Some(open_backing(
                path,
                name,
                h.backing_format.as_deref(),
                chain,
            )?),
            None => None,
        };
        Ok(Qcow2Reader {
            path: path.to_path_buf(),
            file,
            file_len,
            version: h.version,
            cluster_bits: h.cluster_bits,
            size: h.size,
            extended_l2: h.extended_l2,
            compression: h.compression,
            l1,
            backing,
            tables: Mutex::new(TableCache::default()),
            last_compressed: Mutex::new(None),
            decoders: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub(super) fn invalid(&self, detail: String) -> io::Error {
        to_io(DiskError::invalid(&self.path, FORMAT, detail))
    }

    /// Reads data clusters at `host`. A run reaching past the end of the file reads zeros
    /// there, as QEMU does (the final cluster may be short); one starting past it is damage.
    fn read_data(&self, dst: &mut [u8], host: u64) -> io::Result<()> {
        if host >= self.file_len {
            return Err(self.invalid(format!(
                "data cluster at {host} lies past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        let n = (dst.len() as u64).min(self.file_len - host) as usize;
        self.file.read_exact_at(&mut dst[..n], host)?;
        dst[n..].fill(0);
        Ok(())
    }

    fn read_backing(&self, dst: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(backing) = &self.backing else {
            dst.fill(0);
            return Ok(());
        };
        // A backing file smaller than this image reads as zeros past its end.
        let n = (dst.len() as u64).min(backing.size().saturating_sub(offset)) as usize;
        if n > 0 {
            backing.read_at(&mut dst[..n], offset)?;
        }
        dst[n..].fill(0);
        Ok(())
    }
}

fn open_backing(
    path: &Path,
    name: &[u8],
    format: Option<&str>,
    chain: &mut crate::Chain,
) -> Result<Box<dyn DiskReader>, DiskError> {
    let shown = String::from_utf8_lossy(name);
    if shown.starts_with("json:") || shown.contains("://") {
        return Err(DiskError::unsupported(
            path,
            FORMAT,
            format!("backing file {shown:?} is not a file name (a protocol or json: spec)"),
        ));
    }
    let name = Path::new(OsStr::from_bytes(name));
    // QEMU resolves a relative backing file name against the image's folder.
    let full = if name.is_absolute() {
        name.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new("")).join(name)
    };
    if !full.try_exists().map_err(|e| DiskError::io(&full, e))? {
        return Err(DiskError::MissingBacking {
            image: path.display().to_string(),
            file: full.display().to_string(),
        });
    }
    let format = match format {
        None => "auto",
        // QEMU's name for VHD.
        Some("vpc") => "vhd",
        Some(f) => f,
    };
    chain.admit(path, &full, "backing file")?;
    crate::open_in_chain(&full, format, chain)
}

impl DiskReader for Qcow2Reader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: read of {len} bytes at {offset} past the disk's end ({})",
                    self.path.display(),
                    self.size
                ),
            ));
        }
        let mut extents = Vec::new();
        self.walk(offset, len, false, &mut |e| {
            extents.push(*e);
            Ok(true)
        })?;
        let mut compressed = Vec::new();
        for e in &extents {
            let dst = &mut buf[(e.offset - offset) as usize..][..e.len as usize];
            match e.kind {
                Kind::Data(host) => self.read_data(dst, host)?,
                Kind::Zero => dst.fill(0),
                Kind::Unallocated => self.read_backing(dst, e.offset)?,
                Kind::Compressed(_) => compressed.push(*e),
            }
        }
        if !compressed.is_empty() {
            self.read_compressed(&compressed, buf, offset)?;
        }
        Ok(())
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(false);
        }
        let backing = self.backing.as_deref();
        let mut found = false;
        self.walk(offset, end - offset, backing.is_none(), &mut |e| {
            found = match e.kind {
                Kind::Data(_) | Kind::Compressed(_) => true,
                Kind::Zero => false,
                Kind::Unallocated => match backing {
                    Some(b) if e.offset < b.size() => {
                        b.may_have_data(e.offset, e.len.min(b.size() - e.offset))?
                    }
                    _ => false,
                },
            };
            Ok(!found)
        })?;
        Ok(found)
    }

    fn format(&self) -> &'static str {
        FORMAT
    }

    fn subformat(&self) -> Option<String> {
        Some(format!("v{}", self.version))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing(&self) -> Option<&dyn DiskReader> {
        self.backing.as_deref()
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        self.count_allocated()
    }
}
