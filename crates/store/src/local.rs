//! The local-directory backend, the embedded default.
//!
//! ```text
//! VAULT/config                 the vault config
//! VAULT/keys/NAME              key files
//! VAULT/chunks/XX/DIGEST       chunks, fanned out by the first two hex digits
//! VAULT/indexes/DIGEST         disk indexes
//! VAULT/points/ID              recovery-point manifests
//! VAULT/locks/ID               lock objects
//! ```
//! A write goes to `.tmp-RANDOM` in the target's directory and is renamed over the name, so it
//! is atomic; names starting with a dot are never listed. Writes are not fsynced one by one:
//! [`WriteBackend::sync`] calls `syncfs` once, which the engine does before it writes a manifest
//! (one syscall instead of an fsync per chunk, which cost seconds per GiB here).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rustix::fs::Timespec;
use rustix::fs::{AtFlags, Timestamps, CWD, UTIME_NOW};

use crate::backend::{check_name, Kind, ObjectInfo, ReadBackend, WriteBackend};
use crate::{Result, StoreError};

const TMP_PREFIX: &str = ".tmp-";
/// Where garbage collection puts an object aside while it decides (see `remove_unless_touched`).
const ASIDE_PREFIX: &str = ".tmp-gc-";

pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> LocalBackend {
        LocalBackend { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        match kind {
            Kind::Config => self.root.clone(),
            Kind::Key => self.root.join("keys"),
            Kind::Chunk => self.root.join("chunks"),
            Kind::Index => self.root.join("indexes"),
            Kind::Point => self.root.join("points"),
            Kind::Lock => self.root.join("locks"),
        }
    }

    fn path(&self, kind: Kind, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        let dir = self.dir(kind);
        Ok(match kind {
            Kind::Chunk if name.len() >= 2 => dir.join(&name[..2]).join(name),
            _ => dir.join(name),
        })
    }

    fn io_error(&self, what: &str, path: &Path, e: io::Error) -> StoreError {
        // ENOSPC and EDQUOT: the vault stays valid, and the user needs to know it is space.
        if matches!(e.raw_os_error(), Some(28) | Some(122)) {
            return StoreError::Full {
                location: self.location(),
                source: e,
            };
        }
        StoreError::io(format!("{what} {}", path.display()), e)
    }

    fn info(name: String, meta: &fs::Metadata) -> ObjectInfo {
        ObjectInfo {
            name,
            size: meta.len(),
            modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    fn list_dir(&self, dir: &Path, out: &mut Vec<ObjectInfo>, tmp: bool) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io_error("listing", dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.io_error("listing", dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) != tmp || (!tmp && name.starts_with('.')) {
                continue;
            }
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Removed between listing and stat (GC): not there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io_error("reading", &entry.path(), e)),
            };
            if meta.is_file() {
                out.push(Self::info(name, &meta));
            }
        }
        Ok(())
    }

    fn chunk_dirs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        (0..=255u8).map(|i| self.dir(Kind::Chunk).join(hex::encode([i])))
    }
}

impl ReadBackend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let path = self.path(kind, name)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(format!("{} {name}", kind.name())),
            _ => self.io_error("reading", &path, e),
        })
    }

    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        use std::io::Read;
        let path = self.path(kind, name)?;
        let not_found = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound(format!("{} {name}", kind.name())),
            _ => self.io_error("reading", &path, e),
        };
        let mut f = fs::File::open(&path).map_err(not_found)?;
        buf.clear();
        f.read_to_end(buf)
            .map_err(|e| self.io_error("reading", &path, e))?;
        Ok(())
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(kind, name)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(Self::info(name.to_string(), &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_error("reading", &path, e)),
        }
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        match kind {
            Kind::Chunk => {
                for dir in self.chunk_dirs() {
                    self.list_dir(&dir, &mut out, false)?;
                }
            }
            Kind::Config => {
                if let Some(info) = self.stat(Kind::Config, "config")? {
                    out.push(info);
                }
            }
            _ => self.list_dir(&self.dir(kind), &mut out, false)?,
        }
        Ok(out)
    }
}

impl WriteBackend for LocalBackend {
    fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.root).map_err(|e| self.io_error("creating", &self.root, e))?;
        let mut entries =
            fs::read_dir(&self.root).map_err(|e| self.io_error("reading", &self.root, e))?;
        if entries.next().is_some() {
            return Err(StoreError::NotEmpty {
                location: self.location(),
            });
        }
        let dirs = [Kind::Key, Kind::Index, Kind::Point, Kind::Lock]
            .into_iter()
            .map(|k| self.dir(k))
            .chain(self.chunk_dirs());
        for dir in dirs {
            fs::create_dir_all(&dir).map_err(|e| self.io_error("creating", &dir, e))?;
        }
        Ok(())
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(kind, name)?;
        let dir = path.parent().expect("object paths have a parent");
        let mut suffix = [0u8; 8];
        vmvault_format::random_bytes(&mut suffix);
        let tmp = dir.join(format!("{TMP_PREFIX}{}", hex::encode(suffix)));
        let result = (|| {
            let mut f = match fs::File::create(&tmp) {
                // A folder of the layout was removed (by hand, or a region being repaired):
                // made again, as `create` would have.
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.root.is_dir() => {
                    fs::create_dir_all(dir)?;
                    fs::File::create(&tmp)?
                }
                other => other?,
            };
            f.write_all(data)?;
            // Mutable objects (key, config, locks) are few and small: make them durable now.
            if matches!(kind, Kind::Key | Kind::Config) {
                f.sync_all()?;
            }
            drop(f);
            fs::rename(&tmp, &path)?;
            // The rename itself is durable only once its directory is: without this a crash
            // could bring back the old key after `key passwd` said it was done.
            if matches!(kind, Kind::Key | Kind::Config) {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_error("writing", &path, e));
        }
        Ok(())
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        let path = self.path(kind, name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error("removing", &path, e)),
        }
    }

    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        let path = self.path(kind, name)?;
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        };
        let times = Timestamps {
            last_access: now,
            last_modification: now,
        };
        match rustix::fs::utimensat(CWD, &path, &times, AtFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.io_error("touching", &path, e.into())),
        }
        // Set aside by a collection since the touch: absent, and the caller writes it anew.
        match rustix::fs::stat(&path) {
            Ok(st) => Ok(Some(st.st_size as u64)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.io_error("reading", &path, e.into())),
        }
    }

    /// Renames the object aside, then judges its time: a `touch` that came before the rename
    /// shows in the time (same inode), and one that comes after it finds no object and the
    /// backup writes the chunk anew. A touched object is renamed back.
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        let path = self.path(kind, name)?;
        let aside = path.with_file_name(format!("{ASIDE_PREFIX}{name}"));
        match fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(self.io_error("removing", &path, e)),
        }
        let modified = fs::metadata(&aside)
            .and_then(|m| m.modified())
            .map_err(|e| self.io_error("reading", &aside, e))?;
        if modified >= cutoff {
            fs::rename(&aside, &path).map_err(|e| self.io_error("restoring", &path, e))?;
            return Ok(false);
        }
        fs::remove_file(&aside).map_err(|e| self.io_error("removing", &aside, e))?;
        Ok(true)
    }

    fn sync(&self) -> Result<()> {
        let dir =
            fs::File::open(&self.root).map_err(|e| self.io_error("opening", &self.root, e))?;
        rustix::fs::syncfs(&dir).map_err(|e| self.io_error("syncing", &self.root, e.into()))
    }

    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        let mut dirs: Vec<PathBuf> = [
            Kind::Config,
            Kind::Key,
            Kind::Index,
            Kind::Point,
            Kind::Lock,
        ]
        .into_iter()
        .map(|k| self.dir(k))
        .collect();
        dirs.extend(self.chunk_dirs());
        let mut removed = 0;
        for dir in dirs {
            let mut tmps = Vec::new();
            self.list_dir(&dir, &mut tmps, true)?;
            for t in tmps.into_iter().filter(|t| t.modified < older_than) {
                let path = dir.join(&t.name);
                // An object a collection set aside and did not finish judging (it was killed)
                // goes back: a later collection decides again.
                if let Some(name) = t.name.strip_prefix(ASIDE_PREFIX) {
                    let original = dir.join(name);
                    if !original.exists() {
                        fs::rename(&path, &original)
                            .map_err(|e| self.io_error("restoring", &original, e))?;
                        continue;
                    }
                }
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io_error("removing", &path, e)),
                }
            }
        }
        Ok(removed)
    }
}
