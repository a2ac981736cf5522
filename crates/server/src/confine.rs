//! Where the server reads VM disks from and writes restores to: only below the folders (and,
//! for disks, the device patterns) its config names, after symlinks are resolved, and never
//! in its own state. A contributor names a VM's disk paths and an operator a restore's target;
//! without this the two together could back up any file the server can read (its admin
//! token, /etc/shadow) and restore it where they like.
//!
//! Each check returns the resolved path, and jobs use that path: a symlink planted after the
//! check then changes nothing it would have allowed. Jobs check again when they start.

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use crate::config::ServerConfig;
use crate::{Error, Result};

fn is_pattern(p: &Path) -> bool {
    p.to_string_lossy().contains(['*', '?'])
}

/// A root as the config may give it: absolute, no `..`, wildcards (for patterns) only in its
/// last component.
pub fn check_root(root: &Path, key: &str, patterns: bool) -> Result<()> {
    let bad = |why: &str| Err(Error::Config(format!("{key}: '{}' {why}", root.display())));
    if !root.is_absolute() {
        return bad("is not an absolute path");
    }
    if root.components().any(|c| c == Component::ParentDir) {
        return bad("contains '..'");
    }
    if is_pattern(root) {
        if !patterns {
            return bad("is a pattern: give folders");
        }
        if root.parent().is_some_and(is_pattern) {
            return bad("has a '*' or '?' before its last component");
        }
    }
    Ok(())
}

/// `*` (any run of characters) and `?` (one character), within one file name.
fn glob(pattern: &[char], name: &[char]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some(('*', rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some(('?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
    }
}

/// The block devices a pattern's matches resolve to.
fn pattern_devices(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let pat: Vec<char> = name.to_string_lossy().chars().collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n: Vec<char> = e.file_name().to_string_lossy().chars().collect();
            glob(&pat, &n)
        })
        .filter_map(|e| e.path().canonicalize().ok())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
        .collect()
}

/// The server's own files, resolved: never a disk, never a restore target.
fn own_files(cfg: &ServerConfig) -> Vec<PathBuf> {
    cfg.local_paths()
        .into_iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect()
}

fn refuse_own(cfg: &ServerConfig, given: &Path, resolved: &Path, key: &str) -> Result<()> {
    if let Some(own) = own_files(cfg).iter().find(|o| resolved.starts_with(o)) {
        return Err(Error::Forbidden(format!(
            "{} ({}) is in the server's own files ({}): never allowed, whatever {key} says",
            given.display(),
            resolved.display(),
            own.display()
        )));
    }
    Ok(())
}

fn listed<T: AsRef<Path>>(roots: &[T]) -> String {
    roots
        .iter()
        .map(|r| r.as_ref().display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a disk path of a VM to protect or back up; returns it resolved.
pub fn disk_path(cfg: &ServerConfig, disk: &Path) -> Result<PathBuf> {
    if cfg.disk_roots.is_empty() {
        return Err(Error::Forbidden(format!(
            "{}: the server's config allows no disk paths yet: an admin names the folders (and \
             device patterns) VMs' disks may be in as disk_roots in server.toml, --disk-root or \
             VMVAULT_SERVER_DISK_ROOTS",
            disk.display()
        )));
    }
    let resolved = disk.canonicalize().map_err(|e| {
        // Nothing there, in a folder the roots allow, is a mistake in the description; said
        // only there, so that the answer tells nobody what exists elsewhere (the state dir).
        let in_roots = e.kind() == std::io::ErrorKind::NotFound
            && disk
                .parent()
                .and_then(|p| p.canonicalize().ok())
                .is_some_and(|p| {
                    own_files(cfg).iter().all(|o| !p.starts_with(o))
                        && cfg.disk_roots.iter().map(Path::new).any(|root| {
                            !is_pattern(root)
                                && root.canonicalize().is_ok_and(|r| p.starts_with(&r))
                        })
                });
        if in_roots {
            return Error::Input(format!("disk {} does not exist", disk.display()));
        }
        Error::Forbidden(format!(
            "disk {} cannot be resolved ({e}): a disk must exist in disk_roots ({})",
            disk.display(),
            listed(&cfg.disk_roots)
        ))
    })?;
    refuse_own(cfg, disk, &resolved, "disk_roots")?;
    let allowed = cfg.disk_roots.iter().map(Path::new).any(|root| {
        if is_pattern(root) {
            pattern_devices(root).contains(&resolved)
        } else {
            root.canonicalize()
                .is_ok_and(|r| resolved.starts_with(&r) && resolved != r)
        }
    });
    if !allowed {
        return Err(Error::Forbidden(format!(
            "disk {} ({}) is not in the disk_roots the server's config allows ({}); a pattern \
             allows block devices only",
            disk.display(),
            resolved.display(),
            listed(&cfg.disk_roots)
        )));
    }
    Ok(resolved)
}

/// Checks a folder a VM description allows backing files from (`allow_backing`); returns it
/// resolved. It must be a folder inside a folder of `disk_roots`: otherwise a contributor could
/// allow `/` and have a planted qcow2 header pull any host file into the vault.
pub fn backing_dir(cfg: &ServerConfig, dir: &Path) -> Result<PathBuf> {
    let resolved = dir.canonicalize().map_err(|e| {
        Error::Forbidden(format!(
            "allow_backing folder {} cannot be resolved ({e})",
            dir.display()
        ))
    })?;
    refuse_own(cfg, dir, &resolved, "disk_roots")?;
    let inside = cfg
        .disk_roots
        .iter()
        .map(Path::new)
        .filter(|r| !is_pattern(r))
        .any(|root| root.canonicalize().is_ok_and(|r| resolved.starts_with(&r)));
    if !inside || !resolved.is_dir() {
        return Err(Error::Forbidden(format!(
            "allow_backing folder {} ({}) is not a folder inside the disk_roots the server's \
             config allows ({})",
            dir.display(),
            resolved.display(),
            listed(&cfg.disk_roots)
        )));
    }
    Ok(resolved)
}

/// Checks every path of a VM's disk as a job will read it, resolved in place: the image and
/// the folders it may take backing files from.
pub fn disk(cfg: &ServerConfig, disk: &mut vmvault_engine::DiskDescription) -> Result<()> {
    disk.path = disk_path(cfg, &disk.path)?;
    for a in &mut disk.allow_backing {
        *a = backing_dir(cfg, a)?;
    }
    Ok(())
}

/// Checks a restore's target folder; returns it resolved (its existing part canonical). A
/// target that exists (even a dangling symlink) is refused unless `overwrite`, and then it
/// must be a folder: outside the roots as forbidden, below them as bad input.
pub fn restore_target(cfg: &ServerConfig, target: &Path, overwrite: bool) -> Result<PathBuf> {
    if !target.is_absolute() {
        return Err(Error::Input(format!(
            "target '{}' must be an absolute path on the server's host",
            target.display()
        )));
    }
    let refuse = |why: String| {
        Err(Error::Forbidden(format!(
            "target {}: {why}",
            target.display()
        )))
    };
    if target.components().any(|c| c == Component::ParentDir) {
        return refuse("a restore target must not contain '..'".into());
    }
    if cfg.restore_roots.is_empty() {
        return refuse(
            "the server's config allows no restore targets yet: an admin names the folders \
             restores may write into as restore_roots in server.toml, --restore-root or \
             VMVAULT_SERVER_RESTORE_ROOTS"
                .into(),
        );
    }
    let exists = target.symlink_metadata().is_ok();
    let resolved = if exists {
        match target.canonicalize() {
            Ok(p) if p.is_dir() || !overwrite => p,
            _ if overwrite => return refuse("it is not a folder".into()),
            _ => return refuse(format!("{} cannot be resolved", target.display())),
        }
    } else {
        // The deepest part that exists, resolved; what is below it is made by the restore.
        let mut base = target.to_path_buf();
        let mut rest = Vec::new();
        while base.symlink_metadata().is_err() {
            let Some(name) = base.file_name() else { break };
            rest.push(name.to_os_string());
            base.pop();
        }
        let Ok(mut p) = base.canonicalize() else {
            return refuse(format!("{} cannot be resolved", base.display()));
        };
        if !p.is_dir() {
            return refuse(format!("{} is not a folder", base.display()));
        }
        for name in rest.iter().rev() {
            p.push(name);
        }
        p
    };
    refuse_own(cfg, target, &resolved, "restore_roots")?;
    let inside = cfg
        .restore_roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| resolved.starts_with(r));
    if !inside {
        return refuse(format!(
            "{} is not below the restore_roots the server's config allows ({})",
            resolved.display(),
            listed(&cfg.restore_roots)
        ));
    }
    // Only below the roots does a target that exists get this answer: what lies outside them
    // is refused above without saying whether it exists. Bad input, as a local restore onto
    // an existing target is.
    if exists && !overwrite {
        return Err(Error::Input(format!(
            "target {}: it exists: a restore writes a new folder (an admin may restore over an \
             existing folder with overwrite)",
            target.display()
        )));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::glob;

    fn m(p: &str, n: &str) -> bool {
        glob(
            &p.chars().collect::<Vec<_>>(),
            &n.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn globs_match_within_a_name() {
        assert!(m("vg0-*", "vg0-data"));
        assert!(m("sd?", "sda"));
        assert!(!m("sd?", "sda1"));
        assert!(m("*", ""));
        assert!(!m("vg0-*", "vg1-data"));
        assert!(m("nvme-*-part?", "nvme-SAMSUNG_X-part3"));
    }
}
