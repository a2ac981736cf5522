//! The files one image pulls in besides itself (qcow2 backing files, VHD and VHDX parents,
//! VMDK extents and parents), and where they may be.
//!
//! Their names come from the image's bytes, and whoever wrote the image chose them: a tenant
//! uploading an image, or a guest that plants a qcow2 header on a disk read as `auto`. A reader
//! that followed `/etc/shadow` or `../../../root/.ssh/id_rsa` would copy that host file into the
//! vault (the class of CVE-2022-47951). So every such file must lie in the folder of the image
//! the chain starts from, or below it, after symlinks are resolved, or in a folder the caller
//! allows by name (the VM description's `allow_backing`, `disk info --allow-backing`).

use std::path::{Path, PathBuf};

use crate::{DiskError, MAX_CHAIN};

/// The images of one backing chain opened so far, and the folders its files may come from.
#[derive(Debug, Default)]
pub struct Chain {
    /// Canonical paths of the images opened, the first one the chain's top.
    opened: Vec<PathBuf>,
    /// The canonical folder of the top image, once known.
    home: Option<PathBuf>,
    /// The top image is a block device: its folder (`/dev`, where a device resolves to) holds
    /// every other disk of the host and `/dev/shm`, so it lends no files; only `allowed` does.
    device_top: bool,
    /// Canonical folders allowed besides `home`.
    allowed: Vec<PathBuf>,
}

impl Chain {
    /// A chain whose files may also come from `dirs` (each a folder that exists).
    pub fn allowing(dirs: &[PathBuf]) -> Result<Chain, DiskError> {
        let mut allowed = Vec::new();
        for d in dirs {
            let c = d.canonicalize().map_err(|e| DiskError::Allowance {
                dir: d.display().to_string(),
                reason: e.to_string(),
            })?;
            if !c.is_dir() {
                return Err(DiskError::Allowance {
                    dir: d.display().to_string(),
                    reason: "not a folder".into(),
                });
            }
            allowed.push(c);
        }
        Ok(Chain {
            allowed,
            ..Chain::default()
        })
    }

    /// Makes `image` the chain's top when nothing is open yet: its folder is the one files
    /// may come from. Readers call this first, so that one opened on its own is confined too.
    pub(crate) fn begin(&mut self, image: &Path) -> Result<(), DiskError> {
        if self.home.is_none() {
            let canonical = image.canonicalize().map_err(|e| DiskError::io(image, e))?;
            self.device_top = std::fs::metadata(&canonical)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
            self.home = Some(canonical.parent().unwrap_or(Path::new("/")).to_path_buf());
        }
        Ok(())
    }

    /// Adds `image` as the next link, refusing a loop, a chain too deep, and (past the top) a
    /// file outside the allowed folders.
    pub(crate) fn enter(&mut self, image: &Path) -> Result<(), DiskError> {
        let canonical = image.canonicalize().map_err(|e| DiskError::io(image, e))?;
        if self.opened.contains(&canonical) {
            return Err(DiskError::invalid(
                image,
                "backing chain",
                format!("the chain loops back to {}", canonical.display()),
            ));
        }
        if self.opened.len() >= MAX_CHAIN {
            return Err(DiskError::invalid(
                image,
                "backing chain",
                format!("more than {MAX_CHAIN} images deep"),
            ));
        }
        if let Some(child) = self.opened.last() {
            let child = child.clone();
            self.admit(&child, image, "backing file")?;
        } else {
            self.begin(image)?;
        }
        self.opened.push(canonical);
        Ok(())
    }

    /// The canonical path of `file`, which `image` names as its `what`, if it may be read.
    pub(crate) fn admit(
        &self,
        image: &Path,
        file: &Path,
        what: &'static str,
    ) -> Result<PathBuf, DiskError> {
        let canonical = file.canonicalize().map_err(|e| DiskError::io(file, e))?;
        let home = match &self.home {
            Some(h) => h.clone(),
            None => image
                .canonicalize()
                .map_err(|e| DiskError::io(image, e))?
                .parent()
                .unwrap_or(Path::new("/"))
                .to_path_buf(),
        };
        let at_home = !self.device_top && canonical.starts_with(&home);
        if at_home || self.allowed.iter().any(|a| canonical.starts_with(a)) {
            return Ok(canonical);
        }
        let dir = canonical
            .parent()
            .unwrap_or(Path::new("/"))
            .display()
            .to_string();
        Err(DiskError::Confined {
            image: image.display().to_string(),
            what,
            file: canonical.display().to_string(),
            folder: home.display().to_string(),
            dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_below_the_home_folder_or_an_allowed_one_pass() {
        let home = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join("sub")).unwrap();
        for p in ["top", "sub/base"] {
            std::fs::write(home.path().join(p), b"x").unwrap();
        }
        std::fs::write(other.path().join("base"), b"x").unwrap();
        let top = home.path().join("top");
        let mut chain = Chain::default();
        chain.enter(&top).unwrap();
        chain
            .admit(&top, &home.path().join("sub/base"), "x")
            .unwrap();
        // `..` back into the folder is fine; out of it is not.
        chain
            .admit(&top, &home.path().join("sub/../top"), "x")
            .unwrap();
        let outside = other.path().join("base");
        let err = chain.admit(&top, &outside, "backing file").unwrap_err();
        assert!(matches!(err, DiskError::Confined { .. }), "{err}");
        let mut chain = Chain::allowing(&[other.path().to_path_buf()]).unwrap();
        chain.enter(&top).unwrap();
        chain.admit(&top, &outside, "x").unwrap();
        assert!(matches!(
            Chain::allowing(&[home.path().join("missing")]),
            Err(DiskError::Allowance { .. })
        ));
    }
}
