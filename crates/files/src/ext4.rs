//! ext2, ext3 and ext4 through the `ext4-view` crate (read-only, no `unsafe`, built not to
//! panic or loop on corrupt input): extents and block maps, htree folders, 64-bit, journal
//! replay. It refuses filesystems with inline data and `largedir`; vmvault says so.

use ext4_view::{Ext4, Ext4Error, FileType, Metadata};

use crate::disk::Part;
use crate::error::{FilesError, Result};
use crate::fs::{display_path, Entry, Filesystem, Kind, ReadSeek, MAX_DIR_ENTRIES};

pub struct Ext4Fs {
    fs: Ext4,
    /// An entry takes at least 12 bytes (a folder entry with a name of up to 4 bytes).
    limit: usize,
    capacity: u64,
}

fn error(path: &[String], e: Ext4Error) -> FilesError {
    let p = display_path(path);
    match e {
        Ext4Error::NotFound => FilesError::NotFound(p),
        Ext4Error::NotADirectory => FilesError::NotADirectory(p),
        Ext4Error::Incompatible(i) => FilesError::Unsupported(format!("ext4 filesystem: {i}")),
        Ext4Error::Encrypted => FilesError::Unsupported(format!("{p}: encrypted (fscrypt)")),
        Ext4Error::Io(e) => FilesError::Disk(e.to_string()),
        Ext4Error::IsADirectory => FilesError::BadPath(format!("{p}: is a folder")),
        Ext4Error::IsASpecialFile => FilesError::BadPath(format!("{p}: is a special file")),
        Ext4Error::MalformedPath | Ext4Error::PathTooLong | Ext4Error::NotAbsolute => {
            FilesError::BadPath(format!("{p}: not a valid ext4 path"))
        }
        e => FilesError::damaged("ext4 filesystem", format!("{p}: {e}")),
    }
}

fn ext_path(path: &[String]) -> String {
    display_path(path)
}

fn entry(name: String, m: &Metadata) -> Entry {
    let ft = m.file_type();
    let kind = if ft.is_regular_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    };
    let mut e = Entry::new(name, kind, m.len());
    e.mode = Some(u32::from(m.mode()) & 0o7777);
    e.uid = Some(m.uid());
    e.gid = Some(m.gid());
    let t = m.modified();
    e.mtime = Some(t.seconds());
    e.mtime_nanos = t.nanoseconds().min(999_999_999);
    e
}

/// What ext4-view trusts and should not: it allocates one descriptor per block group as the
/// superblock counts them (fuzzing found 12 GiB asked for). A filesystem larger than its
/// partition, or with groups smaller than 256 blocks, is refused first, which bounds that.
fn check_geometry(part: &Part) -> Result<()> {
    let mut sb = [0u8; 1024];
    part.read_exact_at(1024, &mut sb)
        .map_err(|e| FilesError::damaged("ext4 filesystem", e))?;
    let word = |at: usize| u64::from(u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()));
    let log = word(24);
    if log > 6 {
        return Err(FilesError::damaged("ext4 filesystem", "block size"));
    }
    let block = 1024u64 << log;
    let hi = if word(96) & 0x80 != 0 { word(0x150) } else { 0 };
    let blocks = hi << 32 | word(4);
    let per_group = word(32);
    if blocks.saturating_mul(block) > part.len() {
        return Err(FilesError::damaged(
            "ext4 filesystem",
            format!("{blocks} blocks of {block} bytes: larger than its partition"),
        ));
    }
    if !(256..=8 * block).contains(&per_group) {
        return Err(FilesError::damaged(
            "ext4 filesystem",
            format!("{per_group} blocks per group"),
        ));
    }
    Ok(())
}

impl Ext4Fs {
    pub fn open(part: Part) -> Result<Ext4Fs> {
        check_geometry(&part)?;
        let limit = crate::fs::entry_limit(part.len(), 12).min(MAX_DIR_ENTRIES);
        let capacity = part.len();
        let fs = Ext4::load(Box::new(part)).map_err(|e| error(&[], e))?;
        Ok(Ext4Fs {
            fs,
            limit,
            capacity,
        })
    }

    fn with_target(&self, path: &[String], mut e: Entry) -> Result<Entry> {
        if e.kind == Kind::Symlink {
            e.target = Some(self.read_link(path)?);
        }
        Ok(e)
    }
}

impl Filesystem for Ext4Fs {
    fn kind(&self) -> &'static str {
        "ext4"
    }

    fn label(&self) -> Option<String> {
        let l = self.fs.label().to_str().ok()?.trim().to_string();
        (!l.is_empty()).then_some(l)
    }

    fn stat(&self, path: &[String]) -> Result<Entry> {
        let m = self
            .fs
            .symlink_metadata(ext_path(path).as_str())
            .map_err(|e| error(path, e))?;
        let name = path.last().cloned().unwrap_or_default();
        self.with_target(path, entry(name, &m))
    }

    fn list(&self, path: &[String]) -> Result<Vec<Entry>> {
        let dir = self
            .fs
            .read_dir(ext_path(path).as_str())
            .map_err(|e| error(path, e))?;
        let mut out = Vec::new();
        for item in dir {
            let item = item.map_err(|e| error(path, e))?;
            let name = String::from_utf8_lossy(item.file_name().as_ref()).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= self.limit {
                return Err(FilesError::Limit(format!(
                    "{}: more than {} entries",
                    display_path(path),
                    self.limit
                )));
            }
            let m = item.metadata().map_err(|e| error(path, e))?;
            let mut child = path.to_vec();
            child.push(name.clone());
            let mut e = entry(name, &m);
            if e.kind == Kind::Symlink {
                // Looked up by path, a name listed twice finds its first entry: no target then.
                e.target = self.read_link(&child).ok();
            }
            out.push(e);
        }
        Ok(out)
    }

    fn max_entries(&self) -> usize {
        self.limit
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_link(&self, path: &[String]) -> Result<String> {
        let t = self
            .fs
            .read_link(ext_path(path).as_str())
            .map_err(|e| error(path, e))?;
        Ok(String::from_utf8_lossy(t.as_ref()).into_owned())
    }

    fn open(&self, path: &[String]) -> Result<Box<dyn ReadSeek + '_>> {
        let m = self
            .fs
            .symlink_metadata(ext_path(path).as_str())
            .map_err(|e| error(path, e))?;
        if m.file_type() != FileType::Regular {
            return Err(FilesError::BadPath(format!(
                "{}: not a regular file",
                display_path(path)
            )));
        }
        let f = self
            .fs
            .open(ext_path(path).as_str())
            .map_err(|e| error(path, e))?;
        Ok(Box::new(f))
    }
}
