//! Disk images as vmvault reads and writes them.
//!
//! A [`DiskReader`] gives random access to a disk's bytes and says which ranges hold no data,
//! so that holes are never read and are stored as nothing. A [`DiskWriter`] writes a restored
//! disk, leaving zero ranges unallocated. This crate reads and writes raw images (regular files,
//! sparse or not, and block devices); other formats are refused by name until they are added.

mod raw;

use std::io;
use std::path::Path;

pub use raw::{RawReader, RawWriter};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("disk image format {0:?} is not supported yet (this vmvault reads raw images)")]
    UnsupportedFormat(String),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: String },
    #[error("{path} is not a regular file or block device")]
    NotADisk { path: String },
}

impl DiskError {
    pub(crate) fn io(path: &Path, source: io::Error) -> DiskError {
        DiskError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Random access to one disk's bytes.
pub trait DiskReader: Send + Sync {
    /// The disk's virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range lies within the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `false` when `[offset, offset + len)` is certainly all zeros and need not be read.
    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// The format's name, as VM descriptions spell it.
    fn format(&self) -> &'static str;
}

/// Writes one restored disk.
pub trait DiskWriter: Send + Sync {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros (a hole where the target allows it).
    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Ends the write (see each writer for what it makes durable).
    fn finish(&self) -> io::Result<()>;
}

/// The formats a VM description may name.
pub const FORMATS: &[&str] = &["raw", "qcow2", "vhd", "vhdx", "vmdk"];

/// Opens a disk image for reading.
pub fn open(path: &Path, format: &str) -> Result<Box<dyn DiskReader>, DiskError> {
    match format {
        "raw" => Ok(Box::new(RawReader::open(path)?)),
        other => Err(DiskError::UnsupportedFormat(other.to_string())),
    }
}
