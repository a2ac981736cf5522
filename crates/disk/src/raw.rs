//! Raw images: the disk's bytes as they are, in a regular file (often sparse) or a block device.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::{DiskError, DiskReader, DiskWriter};

pub struct RawReader {
    path: PathBuf,
    file: File,
    size: u64,
    /// Whether SEEK_DATA answers for this file; block devices and some filesystems do not.
    seek_data: bool,
}

impl RawReader {
    pub fn open(path: &Path) -> Result<RawReader, DiskError> {
        let mut file = File::open(path).map_err(|e| DiskError::io(path, e))?;
        let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
        let ft = meta.file_type();
        let size = if ft.is_file() {
            meta.len()
        } else if ft.is_block_device() {
            file.seek(SeekFrom::End(0))
                .map_err(|e| DiskError::io(path, e))?
        } else {
            return Err(DiskError::NotADisk {
                path: path.display().to_string(),
            });
        };
        Ok(RawReader {
            path: path.to_path_buf(),
            file,
            size,
            seek_data: ft.is_file(),
        })
    }

    /// The file's (or device's) size in bytes: for raw, the disk's size.
    pub fn size_of_file(&self) -> u64 {
        self.size
    }
}

impl DiskReader for RawReader {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.seek_data || len == 0 {
            return Ok(len != 0);
        }
        // The fd's position moves, but every read is positioned (pread), so nothing depends on it.
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) => Ok(data < offset + len),
            Err(rustix::io::Errno::NXIO) => Ok(false),
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn format(&self) -> &'static str {
        "raw"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        if !self.seek_data {
            return Ok(self.size);
        }
        Ok((self.file.metadata()?.blocks() * 512).min(self.size))
    }
}

/// Writes a raw image: a new sparse file of the disk's size, or an existing block device.
pub struct RawWriter {
    file: File,
    sparse: bool,
}

impl RawWriter {
    /// Creates `path` (refusing an existing file unless `overwrite`, never following a symlink)
    /// as a sparse file of `size` bytes.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<RawWriter, DiskError> {
        let file = crate::create_file(path, overwrite)?;
        file.set_len(size).map_err(|e| DiskError::io(path, e))?;
        Ok(RawWriter { file, sparse: true })
    }

    /// Writes onto a block device opened for writing: zeros are written, not skipped.
    pub(crate) fn onto_device(file: File) -> RawWriter {
        RawWriter {
            file,
            sparse: false,
        }
    }
}

impl DiskWriter for RawWriter {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.sparse {
            // A new file truncated to size reads as zeros wherever nothing was written.
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// A block device is flushed: it is usually a VM's disk about to be used. An image file is
    /// left to the page cache, as cp, qemu-img, restic and borg leave what they write: an fsync
    /// here held restores to this machine's disk write speed (docs/design.md, "Restore").
    fn finish(&self) -> io::Result<()> {
        if self.sparse {
            Ok(())
        } else {
            self.file.sync_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_are_reported_and_data_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        drop(f);
        let r = RawReader::open(&path).unwrap();
        assert_eq!(r.size(), 8 << 20);
        assert!(!r.may_have_data(0, 1 << 20).unwrap(), "leading hole");
        assert!(r.may_have_data(4 << 20, 1 << 20).unwrap());
        assert!(r.may_have_data(3 << 20, 2 << 20).unwrap());
        assert!(!r.may_have_data(5 << 20, 3 << 20).unwrap(), "trailing hole");
        let mut buf = [0u8; 8];
        r.read_at(&mut buf, (4 << 20) + 10).unwrap();
        assert_eq!(buf, [7u8; 8]);
        assert!(r.read_at(&mut buf, (8 << 20) - 4).is_err());
    }

    #[test]
    fn writer_refuses_existing_files_and_leaves_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let w = RawWriter::create(&path, 16 << 20, false).unwrap();
        w.write_at(&[1u8; 4096], 1 << 20).unwrap();
        w.write_zeros(2 << 20, 4 << 20).unwrap();
        w.finish().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.len(), 16 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "sparse");
        assert!(matches!(
            RawWriter::create(&path, 1, false),
            Err(DiskError::Exists { .. })
        ));
        assert!(RawWriter::create(&path, 1, true).is_ok());
    }
}
