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

mod chain;
mod detect;
mod qcow2;
mod raw;
mod target;
mod vhd;
mod vhdx;
mod vmdk;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub use chain::Chain;
pub use detect::detect;
pub use qcow2::{Qcow2Reader, Qcow2Writer};
pub use raw::{RawReader, RawWriter};
pub use target::{create, create_file, create_with, CreateOptions, NewDisk, NewFile};
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
    /// An image names a file outside the folders it may read from (see [`Chain`]).
    #[error(
        "{image}: its {what} {file} is outside the image's folder {folder}; vmvault reads such \
         files only from folders allowed by name: add allow_backing = [\"{dir}\"] to the \
         disk's [[disks]] entry in the VM description (disk info: --allow-backing {dir})"
    )]
    Confined {
        image: String,
        what: &'static str,
        file: String,
        folder: String,
        dir: String,
    },
    /// An image names a backing file that is not there.
    #[error("{image}: its backing file {file} does not exist")]
    MissingBacking { image: String, file: String },
    /// What is at a restore's target cannot be written to (a folder, a device not named).
    #[error("{path} {reason}")]
    Target { path: String, reason: String },
    /// A folder given to allow backing files from cannot be used.
    #[error("allow_backing folder {dir}: {reason}")]
    Allowance { dir: String, reason: String },
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
    /// The files besides [`DiskReader::path`] this image reads its own data from (a VMDK's
    /// extents), not its backing chain.
    fn extent_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Every file `reader` reads, canonical, in the order met: the image, its extents, then the
/// same for each image of its backing chain.
pub fn files(reader: &dyn DiskReader) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut level = Some(reader);
    while let Some(r) = level {
        for f in std::iter::once(r.path().to_path_buf()).chain(r.extent_files()) {
            let f = f.canonicalize().unwrap_or(f);
            if !out.contains(&f) {
                out.push(f);
            }
        }
        level = r.backing();
    }
    out
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

/// Opens a disk image for reading; `format` may be "auto". The files it pulls in must lie in
/// its own folder (see [`Chain`]).
pub fn open(path: &Path, format: &str) -> Result<Box<dyn DiskReader>, DiskError> {
    open_in_chain(path, format, &mut Chain::default())
}

/// [`open`], also letting the image pull in files from the folders `allow`.
pub fn open_allowing(
    path: &Path,
    format: &str,
    allow: &[PathBuf],
) -> Result<Box<dyn DiskReader>, DiskError> {
    open_in_chain(path, format, &mut Chain::allowing(allow)?)
}

/// Opens an image as one link of a backing chain: `chain` holds the images opened so far, so
/// that a chain that loops back is refused instead of followed forever, and knows the folders
/// its files may come from.
pub fn open_in_chain(
    path: &Path,
    format: &str,
    chain: &mut Chain,
) -> Result<Box<dyn DiskReader>, DiskError> {
    chain.enter(path)?;
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

impl vmvault_class::Classify for DiskError {
    fn class(&self) -> vmvault_class::Class {
        use vmvault_class::Class;
        match self {
            DiskError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                Class::NotFound
            }
            DiskError::Io { .. } => Class::Failure,
            DiskError::Exists { .. } => Class::Conflict,
            DiskError::MissingBacking { .. } => Class::NotFound,
            // An image that cannot be opened as its format is bad input to whatever reads it.
            _ => Class::Input,
        }
    }
}
