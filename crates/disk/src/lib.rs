//! Disk images as vmvault reads and writes them.
//!
//! A [`DiskReader`] gives random access to a disk's bytes and says which ranges hold no data,
//! so that holes and unallocated clusters are never read and are stored as nothing. A
//! [`DiskWriter`] writes a restored disk, leaving zero ranges unallocated.
//!
//! Formats: raw (regular files, sparse or not, and block devices); others are added one module
//! each, named after the format, with the format's specification named in the module doc.
//! Every header parser here reads untrusted bytes: a bad image is a [`DiskError::Invalid`],
//! never a panic, a hang or an allocation the image's size does not justify.

mod detect;
mod qcow2;
mod raw;
mod vhd;
mod vhdx;
mod vmdk;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

pub use detect::detect;
pub use qcow2::{Qcow2Reader, Qcow2Writer};
pub use raw::{RawReader, RawWriter};
use thiserror::Error;
pub use vhd::{VhdReader, VhdWriter};
pub use vhdx::{VhdxReader, VhdxWriter};
pub use vmdk::{VmdkReader, VmdkWriter};

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk image format {0:?} is not supported yet")]
    UnsupportedFormat(String),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: String },
    #[error("{path} is not a regular file or block device")]
    NotADisk { path: String },
    /// The image's bytes are not a valid image of its format (truncated, tables pointing past
    /// the end, absurd sizes, a backing chain that loops...).
    #[error("{path}: not a valid {format} image: {detail}")]
    Invalid {
        path: String,
        format: &'static str,
        detail: String,
    },
    /// A valid image using a feature vmvault does not handle (said plainly, never guessed at).
    #[error("{path}: {format} feature not supported: {detail}")]
    Unsupported {
        path: String,
        format: &'static str,
        detail: String,
    },
}

impl DiskError {
    pub(crate) fn io(path: &Path, source: io::Error) -> DiskError {
        DiskError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub fn invalid(path: &Path, format: &'static str, detail: impl Into<String>) -> DiskError {
        DiskError::Invalid {
            path: path.display().to_string(),
            format,
            detail: detail.into(),
        }
    }

    pub fn unsupported(path: &Path, format: &'static str, detail: impl Into<String>) -> DiskError {
        DiskError::Unsupported {
            path: path.display().to_string(),
            format,
            detail: detail.into(),
        }
    }
}

/// Random access to one disk's bytes.
pub trait DiskReader: Send + Sync {
    /// The disk's virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range lies within the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `false` when `[offset, offset + len)` is certainly all zeros and need not be read
    /// (unallocated in this image and in its whole backing chain, or a zero cluster).
    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// The format's name, as VM descriptions spell it.
    fn format(&self) -> &'static str;
    /// A finer name where a format has several kinds ("v3", "dynamic", "streamOptimized").
    fn subformat(&self) -> Option<String> {
        None
    }
    /// The file this reader reads.
    fn path(&self) -> &Path;
    /// The image unallocated ranges are read from (a backing file or parent), if any.
    fn backing(&self) -> Option<&dyn DiskReader> {
        None
    }
    /// Bytes of the virtual disk this image itself holds data for (not its backing chain).
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// Writes one restored disk.
///
/// The restore calls `write_at` and `write_zeros` from one thread at a time, in any order, with
/// offsets and lengths that are multiples of 64 KiB (except a piece ending at the disk's size),
/// each range at most once; a range never written reads as zeros. `finish` writes whatever
/// metadata the format keeps (tables, footers) and leaves an image `qemu-img check` accepts.
pub trait DiskWriter: Send + Sync {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (unallocated where the format allows it).
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Ends the write (see each writer for what it makes durable).
    fn finish(&self) -> io::Result<()>;
}

/// The formats a VM description may name for reading ("auto": detected from the image).
pub const FORMATS: &[&str] = &["auto", "raw", "qcow2", "vhd", "vhdx", "vmdk"];
/// The formats a restore can write.
pub const WRITE_FORMATS: &[&str] = &["raw", "qcow2", "vhd", "vhd-fixed", "vhdx", "vmdk"];
/// How long a backing chain may be before it is taken for a loop vmvault failed to see.
pub const MAX_CHAIN: usize = 64;

/// Opens a disk image for reading; `format` may be "auto".
pub fn open(path: &Path, format: &str) -> Result<Box<dyn DiskReader>, DiskError> {
    open_in_chain(path, format, &mut Vec::new())
}

/// Opens an image as one link of a backing chain: `chain` holds the images opened so far (as
/// canonical paths), so that a chain that loops back is refused instead of followed forever.
pub fn open_in_chain(
    path: &Path,
    format: &str,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskReader>, DiskError> {
    let canonical = path.canonicalize().map_err(|e| DiskError::io(path, e))?;
    if chain.contains(&canonical) {
        return Err(DiskError::invalid(
            path,
            "backing chain",
            format!("the chain loops back to {}", canonical.display()),
        ));
    }
    if chain.len() >= MAX_CHAIN {
        return Err(DiskError::invalid(
            path,
            "backing chain",
            format!("more than {MAX_CHAIN} images deep"),
        ));
    }
    chain.push(canonical);
    let format = match format {
        "auto" => detect(path)?,
        f => f,
    };
    match format {
        "raw" => Ok(Box::new(RawReader::open(path)?)),
        "vhd" => Ok(Box::new(VhdReader::open(path, chain)?)),
        "vhdx" => Ok(Box::new(VhdxReader::open(path, chain)?)),
        "vmdk" => Ok(Box::new(VmdkReader::open(path, chain)?)),
        "qcow2" => Ok(Box::new(Qcow2Reader::open(path, chain)?)),
        other => Err(DiskError::UnsupportedFormat(other.to_string())),
    }
}

/// Creates a disk image of `size` bytes to restore into; `format` is one of [`WRITE_FORMATS`].
pub fn create(
    path: &Path,
    format: &str,
    size: u64,
    overwrite: bool,
) -> Result<Box<dyn DiskWriter>, DiskError> {
    match format {
        "raw" => Ok(Box::new(RawWriter::create(path, size, overwrite)?)),
        "vhd" => Ok(Box::new(VhdWriter::create_dynamic(path, size, overwrite)?)),
        "vhd-fixed" => Ok(Box::new(VhdWriter::create_fixed(path, size, overwrite)?)),
        "vhdx" => Ok(Box::new(VhdxWriter::create(path, size, overwrite)?)),
        "vmdk" => Ok(Box::new(VmdkWriter::create(path, size, overwrite)?)),
        "qcow2" => Ok(Box::new(Qcow2Writer::create(path, size, overwrite)?)),
        other => Err(DiskError::UnsupportedFormat(other.to_string())),
    }
}

/// The file extension a restored disk of `format` gets.
pub fn extension(format: &str) -> &'static str {
    match format {
        "qcow2" => "qcow2",
        "vhd" | "vhd-fixed" => "vhd",
        "vhdx" => "vhdx",
        "vmdk" => "vmdk",
        _ => "raw",
    }
}

/// Creates a new image file for a writer: refuses an existing file unless `overwrite`.
pub fn create_file(path: &Path, overwrite: bool) -> Result<File, DiskError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.file_type().is_block_device() {
            return Err(DiskError::NotADisk {
                path: path.display().to_string(),
            });
        }
        if !overwrite {
            return Err(DiskError::Exists {
                path: path.display().to_string(),
            });
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| DiskError::io(path, e))
}

/// Reads exactly `buf.len()` bytes at `offset` of an image file, saying "truncated" (an invalid
/// image, not an I/O failure) when the file ends first.
pub fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
    format: &'static str,
) -> Result<(), DiskError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            DiskError::invalid(
                path,
                format,
                format!(
                    "truncated: {} bytes at {offset} are past the end",
                    buf.len()
                ),
            )
        } else {
            DiskError::io(path, e)
        }
    })
}
