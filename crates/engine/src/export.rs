//! One disk of a recovery point as an NBD export. The reading is the store's [`PointDisk`]
//! (the one lazy reader, shared with file restore); what is NBD's is here: finding the disk
//! by name, the protocol's errors, and extents, which tell a client where the holes (zero
//! chunks) are without fetching anything.

use std::io;
use std::sync::Arc;

use vmvault_format::{DiskRecord, Manifest};
use vmvault_nbd::Export;
use vmvault_store::{PointDisk, Vault};

use crate::Result;

/// Decoded chunks kept, in bytes: less than file restore keeps, because an NBD client has its
/// own cache (the guest's page cache, QEMU's) and mostly reads a chunk once, where the
/// filesystem parsers go back to the same metadata.
const CACHE_BYTES: usize = 32 << 20;

/// A disk of a recovery point, readable at any offset.
pub struct PointExport {
    disk: DiskRecord,
    inner: PointDisk,
}

impl PointExport {
    /// Opens disk `disk` of recovery point `manifest`, loading (and checking) its index.
    pub fn open(vault: Arc<Vault>, manifest: &Manifest, disk: &str) -> Result<PointExport> {
        let record = crate::select_disk(manifest, disk)?.clone();
        let index = vault.load_index(&record.index, record.size)?;
        let inner = PointDisk::with_cache(vault, &record, index, CACHE_BYTES);
        Ok(PointExport {
            disk: record,
            inner,
        })
    }

    pub fn disk(&self) -> &DiskRecord {
        &self.disk
    }

    /// How many chunks have been fetched from the vault so far.
    pub fn fetches(&self) -> u64 {
        self.inner.fetched()
    }

    /// NBD wants a request past the end refused as invalid (EINVAL), not failed as I/O.
    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        if off.checked_add(len).is_none_or(|end| end > self.disk.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {off} are past the end of the disk"),
            ));
        }
        Ok(())
    }
}

impl Export for PointExport {
    fn size(&self) -> u64 {
        self.disk.size
    }

    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len() as u64)?;
        self.inner
            .read_at(buf, off)
            .map(drop)
            .map_err(io::Error::other)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.check(off, len)?;
        let index = self.inner.index();
        let chunk_size = index.chunk_size as u64;
        let end = off + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let i = (pos / chunk_size) as usize;
            let (start, n) = index.chunk_range(i);
            let next = (start + n as u64).min(end);
            let data = !index.chunks[i].is_zero_chunk();
            match out.last_mut() {
                Some((m, d)) if *d == data => *m += next - pos,
                _ => out.push((next - pos, data)),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backup_image_vm, BackupOptions, NoProgress, VmDescription};
    use vmvault_store::{CreateOptions, LocalBackend, WriteBackend};

    /// A vault with 64 KiB chunks holding one backup of a 1 MiB + 100 byte disk: data in
    /// chunks 0, 1 and 5, the same bytes in chunk 9 as in 1, a short last chunk.
    fn point() -> (tempfile::TempDir, Arc<Vault>, Manifest, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(dir.path().join("v")));
        let opts = CreateOptions {
            chunk_size: 65536,
            ..CreateOptions::default()
        };
        let vault = Arc::new(Vault::create(backend, opts).unwrap());
        let mut disk = vec![0u8; (1 << 20) + 100];
        for (i, b) in disk[..2 * 65536].iter_mut().enumerate() {
            *b = (i * 7 % 253) as u8 + 1;
        }
        disk[5 * 65536 + 3] = 9;
        let copy = disk[65536..2 * 65536].to_vec();
        disk[9 * 65536..10 * 65536].copy_from_slice(&copy);
        disk[(1 << 20) + 50] = 1;
        let img = dir.path().join("os.raw");
        std::fs::write(&img, &disk).unwrap();
        let toml = dir.path().join("vm.toml");
        std::fs::write(
            &toml,
            "name = \"vm\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"os.raw\"\n",
        )
        .unwrap();
        let desc = VmDescription::load(&toml).unwrap();
        let m = backup_image_vm(&vault, &desc, &BackupOptions::default(), &NoProgress).unwrap();
        (dir, vault, m, disk)
    }

    /// The reading itself is tested with the store's `PointDisk`; this is the export passing
    /// its bytes and errors on, and refusing out-of-range requests as NBD wants.
    #[test]
    fn reads_go_through_the_point_disk() {
        let (dir, vault, m, disk) = point();
        let e = PointExport::open(vault.clone(), &m, "os").unwrap();
        let mut b = vec![0u8; 1000];
        e.read_at(65536 - 500, &mut b).unwrap();
        assert_eq!(b, disk[65536 - 500..65536 + 500]);
        assert_eq!(e.fetches(), 2);
        let err = e.read_at(disk.len() as u64 - 1, &mut [0u8; 2]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");

        let index = vault
            .load_index(&m.disks[0].index, m.disks[0].size)
            .unwrap();
        let digest = index.chunks[5].to_hex();
        let path = dir.path().join("v/chunks").join(&digest[..2]).join(&digest);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = e.read_at(5 * 65536, &mut [0u8; 10]).unwrap_err();
        assert!(err.to_string().contains("chunk 5 of disk os"), "{err}");
    }

    #[test]
    fn zero_chunks_are_holes() {
        let (_dir, vault, m, disk) = point();
        let e = PointExport::open(vault.clone(), &m, "os").unwrap();
        let c = 65536u64;
        assert_eq!(
            e.extents(0, disk.len() as u64).unwrap(),
            vec![
                (2 * c, true),
                (3 * c, false),
                (c, true),
                (3 * c, false),
                (c, true),
                (6 * c, false),
                (100, true)
            ]
        );
        assert_eq!(e.extents(c + 5, 10).unwrap(), vec![(10, true)]);
        assert_eq!(e.extents(2 * c + 1, c).unwrap(), vec![(c, false)]);
        assert!(e.extents(0, disk.len() as u64 + 1).is_err());
        assert_eq!(e.fetches(), 0);
        assert!(matches!(
            PointExport::open(vault, &m, "data"),
            Err(crate::EngineError::Input(_))
        ));
    }
}
