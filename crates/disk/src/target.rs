//! Where a restore writes, and how it gets there.
//!
//! A restore's target folder may be writable by others, who can plant a symlink where the
//! restore is about to write (`os.raw -> /root/.bashrc`), so no path is ever opened in a way
//! that follows one. Each image is written into a new file beside its target, made with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 (a disk holds everything its VM held), and is
//! renamed onto the target once it is whole: without `--force` with `RENAME_NOREPLACE`, so
//! whatever appeared there meanwhile is kept; with it, over the target, which replaces a
//! symlink itself rather than what it points at. A failed restore therefore never leaves a
//! half-written image under the target's name, and never touched a file it was to replace.
//!
//! A block device is the one target written in place: named by the caller (directly, or by a
//! link under `/dev` such as `/dev/disk/by-id/...`), it is opened for writing and nothing is
//! created or removed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::{
    DiskError, DiskWriter, Qcow2Writer, RawWriter, VhdWriter, VhdxWriter, VmdkWriter, WRITE_FORMATS,
};

/// How [`create_with`] treats what is at the target already.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Replace a file (or symlink) at the target; without it, anything there is refused.
    pub overwrite: bool,
    /// Write onto a block device at the target (raw only).
    pub block_devices: bool,
}

/// Creates an image of `size` bytes to restore into at `path` (a file, or a block device for
/// raw); see the module doc.
pub fn create(path: &Path, format: &str, size: u64, overwrite: bool) -> Result<NewDisk, DiskError> {
    let opts = CreateOptions {
        overwrite,
        block_devices: true,
    };
    create_with(path, format, size, &opts)
}

/// [`create`], with what may be at the target said in `opts`.
pub fn create_with(
    path: &Path,
    format: &str,
    size: u64,
    opts: &CreateOptions,
) -> Result<NewDisk, DiskError> {
    if !WRITE_FORMATS.contains(&format) {
        return Err(DiskError::UnsupportedFormat(format.to_string()));
    }
    match existing(path, opts)? {
        Existing::Device => {
            if format != "raw" {
                return Err(refused(path, "a block device takes raw images only"));
            }
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::CLOEXEC.bits() as i32)
                .open(path)
                .map_err(|e| DiskError::io(path, e))?;
            Ok(NewDisk {
                writer: Box::new(RawWriter::onto_device(file)),
                target: Target::Device(path.to_path_buf()),
            })
        }
        Existing::Nothing | Existing::Replace => {
            let replace = opts.overwrite;
            let (temp, writer) = beside(path, |temp| writer(temp, format, size))?;
            Ok(NewDisk {
                writer,
                target: Target::File(NewFile::new(temp, path, replace)),
            })
        }
    }
}

fn writer(path: &Path, format: &str, size: u64) -> Result<Box<dyn DiskWriter>, DiskError> {
    Ok(match format {
        "raw" => Box::new(RawWriter::create(path, size, false)?),
        "vhd" => Box::new(VhdWriter::create_dynamic(path, size, false)?),
        "vhd-fixed" => Box::new(VhdWriter::create_fixed(path, size, false)?),
        "vhdx" => Box::new(VhdxWriter::create(path, size, false)?),
        "vmdk" => Box::new(VmdkWriter::create(path, size, false)?),
        "qcow2" => Box::new(Qcow2Writer::create(path, size, false)?),
        other => return Err(DiskError::UnsupportedFormat(other.to_string())),
    })
}

enum Existing {
    Nothing,
    Replace,
    Device,
}

fn refused(path: &Path, reason: &str) -> DiskError {
    DiskError::Target {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// What is at `path`, judged without following a symlink except to see that it names a
/// block device.
fn existing(path: &Path, opts: &CreateOptions) -> Result<Existing, DiskError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(DiskError::io(path, e)),
    };
    let link = meta.file_type().is_symlink();
    let resolved = if link {
        std::fs::metadata(path).ok().map(|m| m.file_type())
    } else {
        Some(meta.file_type())
    };
    if resolved.is_some_and(|t| t.is_block_device()) {
        if !opts.block_devices {
            return Err(refused(
                path,
                "is a block device; a VM restore writes image files into a folder",
            ));
        }
        // udev's names (/dev/disk/by-id/...) are links; one planted elsewhere is not followed.
        if link && !path.starts_with("/dev") {
            return Err(refused(
                path,
                "is a symlink to a block device outside /dev; name the device itself",
            ));
        }
        return Ok(Existing::Device);
    }
    if resolved.is_some_and(|t| t.is_char_device() || t.is_fifo() || t.is_socket()) {
        return Err(DiskError::NotADisk {
            path: path.display().to_string(),
        });
    }
    if meta.is_dir() {
        return Err(refused(path, "is a folder"));
    }
    if !opts.overwrite {
        return Err(DiskError::Exists {
            path: path.display().to_string(),
        });
    }
    Ok(Existing::Replace)
}

/// Runs `make` on a fresh name beside `dest` until one is free; returns the name and what
/// `make` made there.
fn beside<T>(
    dest: &Path,
    mut make: impl FnMut(&Path) -> Result<T, DiskError>,
) -> Result<(PathBuf, T), DiskError> {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = dest
        .file_name()
        .ok_or_else(|| refused(dest, "names no file"))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for _ in 0..16 {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let temp = dest.with_file_name(format!(
            ".{name}.vmvault-{}-{nanos:08x}-{n}",
            std::process::id()
        ));
        match make(&temp) {
            Err(DiskError::Exists { .. }) => continue,
            // Named by the target the user gave: the temporary name means nothing to them.
            Err(DiskError::Io { source, .. }) => {
                return Err(DiskError::Io {
                    path: dest.display().to_string(),
                    source,
                })
            }
            r => return r.map(|t| (temp, t)),
        }
    }
    Err(refused(dest, "no free name for a file beside it"))
}

/// Creates a new file at `path`, readable by its owner only, never through a symlink: an
/// existing file (or symlink) is refused, or with `overwrite` removed first (the link itself,
/// not what it points at).
pub fn create_file(path: &Path, overwrite: bool) -> Result<File, DiskError> {
    if overwrite {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() || m.file_type().is_block_device() => {
                return Err(DiskError::NotADisk {
                    path: path.display().to_string(),
                })
            }
            Ok(_) => std::fs::remove_file(path).map_err(|e| DiskError::io(path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(DiskError::io(path, e)),
        }
    }
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DiskError::Exists {
                path: path.display().to_string(),
            },
            _ => DiskError::io(path, e),
        })
}

/// A restored image on its way to its target.
pub struct NewDisk {
    writer: Box<dyn DiskWriter>,
    target: Target,
}

enum Target {
    File(NewFile),
    Device(PathBuf),
}

impl NewDisk {
    /// Where the image goes.
    pub fn path(&self) -> &Path {
        match &self.target {
            Target::File(f) => f.dest(),
            Target::Device(p) => p,
        }
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writer.write_at(buf, offset)
    }

    pub fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writer.write_zeros(offset, len)
    }

    /// Ends the write (the format's tables and footers) without putting the image in place.
    pub fn seal(&self) -> io::Result<()> {
        self.writer.finish()
    }

    /// Puts a sealed image at its target.
    pub fn place(&self) -> Result<(), DiskError> {
        match &self.target {
            Target::File(f) => f.place(),
            Target::Device(_) => Ok(()),
        }
    }

    /// [`NewDisk::seal`], then [`NewDisk::place`].
    pub fn finish(&self) -> io::Result<()> {
        self.seal()?;
        self.place().map_err(io::Error::other)
    }

    /// Removes what this restore made (see [`NewFile::discard`]); a block device stays as it
    /// is, and is named as what is left.
    pub fn discard(&self) -> Option<String> {
        match &self.target {
            Target::File(f) => f.discard(),
            Target::Device(p) => Some(format!("{} holds a partial restore", p.display())),
        }
    }
}

impl DiskWriter for NewDisk {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        NewDisk::write_at(self, buf, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        NewDisk::write_zeros(self, offset, len)
    }

    fn finish(&self) -> io::Result<()> {
        NewDisk::finish(self)
    }
}

/// A file written beside its target and put there by [`NewFile::place`]; removed when dropped
/// unplaced.
pub struct NewFile {
    temp: PathBuf,
    dest: PathBuf,
    replace: bool,
    state: Mutex<State>,
}

enum State {
    Written,
    /// At its target, with the (device, inode) it had there.
    Placed(u64, u64),
    Gone,
}

impl NewFile {
    fn new(temp: PathBuf, dest: &Path, replace: bool) -> NewFile {
        NewFile {
            temp,
            dest: dest.to_path_buf(),
            replace,
            state: Mutex::new(State::Written),
        }
    }

    /// A file holding `contents`, to be put at `dest` (a regular file only; an existing one
    /// is refused unless `overwrite`).
    pub fn write(dest: &Path, contents: &[u8], overwrite: bool) -> Result<NewFile, DiskError> {
        let opts = CreateOptions {
            overwrite,
            block_devices: false,
        };
        existing(dest, &opts)?;
        let (temp, mut file) = beside(dest, |temp| create_file(temp, false))?;
        let new = NewFile::new(temp, dest, overwrite);
        io::Write::write_all(&mut file, contents).map_err(|e| DiskError::io(&new.temp, e))?;
        Ok(new)
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renames the file onto its target: over what is there when replacing, else only if
    /// nothing is there (something that appeared since the restore began is kept).
    pub fn place(&self) -> Result<(), DiskError> {
        let mut state = self.state();
        if !matches!(*state, State::Written) {
            return Ok(());
        }
        let meta =
            std::fs::symlink_metadata(&self.temp).map_err(|e| DiskError::io(&self.temp, e))?;
        if self.replace {
            std::fs::rename(&self.temp, &self.dest).map_err(|e| DiskError::io(&self.dest, e))?;
        } else {
            rename_noreplace(&self.temp, &self.dest)?;
        }
        *state = State::Placed(meta.dev(), meta.ino());
        Ok(())
    }

    /// Removes what this restore made: the file beside the target, or the one it put at the
    /// target when nothing was there before. Returns what is left, if anything: a file it
    /// could not remove, or one that replaced a file that is gone now.
    pub fn discard(&self) -> Option<String> {
        let mut state = self.state();
        let left = match *state {
            State::Gone => None,
            State::Written => std::fs::remove_file(&self.temp)
                .err()
                .filter(|e| e.kind() != io::ErrorKind::NotFound)
                .map(|e| format!("{} is left behind ({e})", self.temp.display())),
            State::Placed(..) if self.replace => Some(format!(
                "{} was already replaced by the restored file",
                self.dest.display()
            )),
            State::Placed(dev, ino) => match std::fs::symlink_metadata(&self.dest) {
                Ok(m) if m.dev() == dev && m.ino() == ino => std::fs::remove_file(&self.dest)
                    .err()
                    .map(|e| format!("{} is left behind ({e})", self.dest.display())),
                // Replaced by someone else since: not ours to remove.
                _ => None,
            },
        };
        *state = State::Gone;
        left
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if matches!(*self.state(), State::Written) {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Renames `from` to `to` unless `to` exists (a symlink included).
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), DiskError> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let exists = || DiskError::Exists {
        path: to.display().to_string(),
    };
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(exists()),
        // Filesystems without RENAME_NOREPLACE: a hard link also refuses an existing name.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP) => {
            match std::fs::hard_link(from, to) {
                Ok(()) => std::fs::remove_file(from).map_err(|e| DiskError::io(from, e)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(exists()),
                Err(e) => Err(DiskError::io(to, e)),
            }
        }
        Err(e) => Err(DiskError::io(to, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn nothing_is_written_through_a_symlink_and_nothing_is_left_by_a_discard() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        let link = dir.path().join("os.raw");
        symlink(&victim, &link).unwrap();
        assert!(matches!(
            create(&link, "raw", 1 << 20, false),
            Err(DiskError::Exists { .. })
        ));
        let d = create(&link, "raw", 1 << 20, true).unwrap();
        d.write_at(&[1; 4096], 0).unwrap();
        assert!(d.discard().is_none());
        assert!(!victim.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the link is left");
        let d = create(&link, "raw", 1 << 20, true).unwrap();
        d.finish().unwrap();
        assert!(!victim.exists());
        let meta = std::fs::symlink_metadata(&link).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_name_taken_while_writing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("d.toml");
        let f = NewFile::write(&dest, b"restored", false).unwrap();
        std::fs::write(&dest, b"someone else's").unwrap();
        assert!(matches!(f.place(), Err(DiskError::Exists { .. })));
        assert!(f.discard().is_none());
        assert_eq!(std::fs::read(&dest).unwrap(), b"someone else's");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Placed where nothing was, then discarded: removed again.
        let other = dir.path().join("e.toml");
        let f = NewFile::write(&other, b"x", false).unwrap();
        f.place().unwrap();
        assert!(f.discard().is_none());
        assert!(!other.exists());
    }
}
