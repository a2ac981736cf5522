//! One interface for every guest filesystem: list a folder, stat, read a file (any range),
//! read a symlink. Paths are given as components from the filesystem's root (`[]` is the root).

use std::io::{Read, Seek};

use serde::Serialize;

use crate::disk::Part;
use crate::error::{FilesError, Result};

/// At most this many entries are read from one folder: a hostile folder cannot make a listing
/// allocate without bound.
pub const MAX_DIR_ENTRIES: usize = 1_000_000;

/// The most entries a filesystem of `bytes` can hold when each takes at least `per_entry`
/// bytes on it (at least 1,024, at most [`crate::MAX_ENTRIES`]). No folder and no walk lists
/// more: past it, folders loop or the filesystem is damaged.
pub fn entry_limit(bytes: u64, per_entry: u64) -> usize {
    (bytes / per_entry).clamp(1024, crate::walk::MAX_ENTRIES) as usize
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// Devices, FIFOs, sockets, NTFS reparse points: listed, never extracted.
    Other,
}

/// An alternate data stream of an NTFS file (listed, not extracted).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Stream {
    pub name: String,
    pub size: u64,
}

/// What a filesystem says about one of its files or folders.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits (`0o7777`), where the filesystem has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Modification time: seconds since the Unix epoch, and nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtime: Option<i64>,
    #[serde(skip)]
    pub mtime_nanos: u32,
    /// The file's identity within its filesystem (an NTFS file record), where known: names
    /// sharing one are hard links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// How many names the file has, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub links: Option<u32>,
    /// A symlink's target, as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<Stream>,
}

impl Entry {
    pub fn new(name: impl Into<String>, kind: Kind, size: u64) -> Entry {
        Entry {
            name: name.into(),
            kind,
            size,
            mode: None,
            uid: None,
            gid: None,
            mtime: None,
            mtime_nanos: 0,
            id: None,
            links: None,
            target: None,
            streams: Vec::new(),
        }
    }
}

pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// One listed entry, reached without a second lookup: a file's content, a folder's entries.
pub trait Opener {
    fn open(&self) -> Result<Box<dyn ReadSeek + '_>>;
    /// As [`Filesystem::list_with`], for this folder.
    fn list_with(&self, f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>) -> Result<()>;
}

/// Opens a file by its path: what `list_with` offers unless a filesystem does better.
struct ByPath<'a, F: ?Sized> {
    fs: &'a F,
    path: Vec<String>,
}

impl<F: Filesystem + ?Sized> Opener for ByPath<'_, F> {
    fn open(&self) -> Result<Box<dyn ReadSeek + '_>> {
        self.fs.open(&self.path)
    }

    fn list_with(&self, f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>) -> Result<()> {
        self.fs.list_with(&self.path, f)
    }
}

/// A guest filesystem, read-only.
pub trait Filesystem {
    /// `ext4` (also ext2 and ext3), `fat`, `ntfs`.
    fn kind(&self) -> &'static str;
    fn label(&self) -> Option<String>;
    /// The entry a path names; symlinks are not followed in the last component.
    fn stat(&self, path: &[String]) -> Result<Entry>;
    /// A folder's entries, without `.` and `..`, in the filesystem's order.
    fn list(&self, path: &[String]) -> Result<Vec<Entry>>;
    /// A symlink's target.
    fn read_link(&self, path: &[String]) -> Result<String>;
    /// A regular file's content, with random access.
    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>>;
    /// A folder's entries, each handed to `f` with a way to open it, in the filesystem's
    /// order. A filesystem that finds files by scanning folders (FAT) opens them from the
    /// listing itself, so that extracting a folder of n files costs n, not n², lookups.
    fn list_with(
        &self,
        path: &[String],
        f: &mut dyn FnMut(&Entry, &dyn Opener) -> Result<()>,
    ) -> Result<()> {
        for e in self.list(path)? {
            let mut child = path.to_vec();
            child.push(e.name.clone());
            f(
                &e,
                &ByPath {
                    fs: self,
                    path: child,
                },
            )?;
        }
        Ok(())
    }

    /// The filesystem's size in bytes. A file claiming more is sparse or damaged: reading it
    /// whole could take forever, so extraction leaves it out and says so.
    fn capacity(&self) -> u64 {
        u64::MAX
    }

    /// The most entries this filesystem can hold (see [`entry_limit`]): a folder or a walk
    /// listing more is cut.
    fn max_entries(&self) -> usize {
        MAX_DIR_ENTRIES
    }

    /// Up to `buf.len()` bytes of a file from `offset`; fewer only at its end.
    fn read_range(&self, path: &[String], offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut f = self.open(path)?;
        let what = || display_path(path);
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| FilesError::damaged(what(), e))?;
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(FilesError::damaged(what(), e)),
            }
        }
        Ok(n)
    }
}

/// `/a/b` for components `[a, b]`.
pub fn display_path(path: &[String]) -> String {
    format!("/{}", path.join("/"))
}

/// The filesystem a partition holds, judged by its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Fat,
    Ntfs,
}

/// Looks at a partition's first sectors for a filesystem vmvault reads.
pub fn probe(part: &Part) -> Option<FsType> {
    let mut head = [0u8; 2048];
    if part.len() < head.len() as u64 || part.read_exact_at(0, &mut head).is_err() {
        return None;
    }
    if head[1080..1082] == [0x53, 0xEF] {
        return Some(FsType::Ext4);
    }
    if &head[3..11] == b"NTFS    " {
        return Some(FsType::Ntfs);
    }
    let bytes_per_sector = u16::from_le_bytes([head[11], head[12]]);
    let per_cluster = head[13];
    let fats = head[16];
    let fat_name = &head[54..57] == b"FAT" || &head[82..87] == b"FAT32";
    if head[510..512] == [0x55, 0xAA]
        && matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        && per_cluster.is_power_of_two()
        && (1..=2).contains(&fats)
        && fat_name
    {
        return Some(FsType::Fat);
    }
    None
}

/// Opens the filesystem of type `ty` on `part`.
fn needs_lite(part: &Part) -> bool {
    let mut b = [0u8; 4];
    if part.read_exact_at(1024 + 96, &mut b).is_err() {
        return false;
    }
    let incompat = u32::from_le_bytes(b);
    incompat & (0x8000 | 0x4000) != 0 || incompat & 0x2 == 0
}

/// Every call into it is guarded: a panic in a filesystem crate becomes a `Damaged` error.
pub fn open(ty: FsType, part: Part) -> Result<Box<dyn Filesystem>> {
    let what = format!("{ty:?} filesystem").to_lowercase();
    let fs: Box<dyn Filesystem> = crate::guard::guarded(&what, || {
        let fs: Box<dyn Filesystem> = match ty {
            // What ext4-view refuses (inline data, largedir, no file types in folder
            // entries) goes to our own small reader.
            FsType::Ext4 if needs_lite(&part) => Box::new(crate::ext4lite::Ext4Lite::open(part)?),
            FsType::Ext4 => Box::new(crate::ext4::Ext4Fs::open(part)?),
            FsType::Fat => Box::new(crate::fat::FatFs::open(part)?),
            FsType::Ntfs => Box::new(crate::ntfs::NtfsFs::open(part)?),
        };
        Ok(fs)
    })?;
    Ok(Box::new(crate::guard::Guarded(fs)))
}

/// Where a seek lands in a stream of `len` bytes now at `pos`; seeking before the start is an
/// error, past the end is allowed (reads there return nothing).
pub(crate) fn seek_target(pos: u64, len: u64, to: std::io::SeekFrom) -> std::io::Result<u64> {
    let new = match to {
        std::io::SeekFrom::Start(n) => Some(n),
        std::io::SeekFrom::End(d) => len.checked_add_signed(d),
        std::io::SeekFrom::Current(d) => pos.checked_add_signed(d),
    };
    new.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
    })
}
