//! The few file operations everything here is built from. Each one either happens completely
//! or not at all across a crash: a reader (or the next start after a power cut) sees the old
//! file or the new one, never half of one.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ReleaseError;

/// fsync a directory, so that the renames and links made in it survive a power cut (a
/// rename is only durable once its directory is).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ReleaseError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ReleaseError::io(format!("syncing {}", dir.display())))
}

/// Write `tmp` from `data` with `mode` and fsync it, leaving it ready to be renamed or
/// linked into place. A stale `tmp` (from a crash) is replaced.
fn write_tmp(tmp: &Path, data: &mut dyn Read, mode: u32) -> Result<(), ReleaseError> {
    let what = || format!("writing {}", tmp.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(ReleaseError::io(what()))?;
    // The mode given to open() is filtered through the umask and not applied at all to a
    // stale file: set it for sure, before any byte is in it.
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| io::copy(data, &mut file).map(drop))
        .and_then(|()| file.flush())
        .and_then(|()| file.sync_all())
        .map_err(ReleaseError::io(what()))
}

/// Put `data` at `path` (replacing what is there) by way of `tmp` in the same directory.
pub(crate) fn replace(
    path: &Path,
    tmp: &Path,
    data: &mut dyn Read,
    mode: u32,
) -> Result<(), ReleaseError> {
    write_tmp(tmp, data, mode)?;
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(ReleaseError::io(format!(
            "renaming {} into place",
            tmp.display()
        ))(e));
    }
    sync_dir(parent(path))
}

/// Put `data` at `path` only if nothing is there: `Ok(false)` (and nothing written) when
/// something is. A link, unlike a rename, refuses to replace, so a second process racing to
/// make the same file loses cleanly instead of overwriting the first one's key.
pub(crate) fn create_new(
    path: &Path,
    tmp: &Path,
    data: &mut dyn Read,
    mode: u32,
) -> Result<bool, ReleaseError> {
    write_tmp(tmp, data, mode)?;
    let linked = fs::hard_link(tmp, path);
    let _ = fs::remove_file(tmp);
    match linked {
        Ok(()) => {
            sync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(ReleaseError::io(format!("creating {}", path.display()))(e)),
    }
}

/// Point the symlink `link` at `target` by making `tmp` and renaming it over `link`: rename
/// replaces the link itself, never what it points at, and readers see the old target or the
/// new one. The caller syncs the directory (once, after all its swaps).
pub(crate) fn point(link: &Path, tmp: &Path, target: &str) -> Result<(), ReleaseError> {
    remove_if_exists(tmp)?;
    std::os::unix::fs::symlink(target, tmp).map_err(ReleaseError::io(format!(
        "making the link {}",
        tmp.display()
    )))?;
    fs::rename(tmp, link).map_err(|e| {
        let _ = fs::remove_file(tmp);
        ReleaseError::io(format!("swapping {}", link.display()))(e)
    })
}

/// Remove a file; `Ok(false)` if it was not there.
pub(crate) fn remove_if_exists(path: &Path) -> Result<bool, ReleaseError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ReleaseError::io(format!("removing {}", path.display()))(e)),
    }
}

/// A file's bytes, or `None` if it is not there.
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, ReleaseError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReleaseError::io(format!("reading {}", path.display()))(e)),
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
