//! One disk of a recovery point as an NBD export: reads fetch, open and check only the chunks
//! they touch, keeping the last few decoded in a small LRU; zero chunks are holes and are never
//! fetched.
//!
//! The `files` work has a similar lazy reader; the two are to be unified.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmvault_format::{DiskIndex, DiskRecord, Manifest};
use vmvault_nbd::Export;
use vmvault_store::Vault;

use crate::Result;

/// Decoded chunks kept, in bytes (at least two chunks).
const CACHE_BYTES: usize = 32 << 20;

/// A disk of a recovery point, readable at any offset.
pub struct PointExport {
    vault: Arc<Vault>,
    disk: DiskRecord,
    index: DiskIndex,
    cache: Mutex<Lru>,
    fetches: AtomicU64,
}

/// The most recently used chunks first, as (chunk number, bytes).
struct Lru {
    entries: VecDeque<(usize, Arc<Vec<u8>>)>,
    capacity: usize,
}

impl Lru {
    fn get(&mut self, i: usize) -> Option<Arc<Vec<u8>>> {
        let at = self.entries.iter().position(|(n, _)| *n == i)?;
        let entry = self.entries.remove(at)?;
        let data = entry.1.clone();
        self.entries.push_front(entry);
        Some(data)
    }

    fn put(&mut self, i: usize, data: Arc<Vec<u8>>) {
        if self.entries.iter().any(|(n, _)| *n == i) {
            return;
        }
        self.entries.push_front((i, data));
        self.entries.truncate(self.capacity);
    }
}

impl PointExport {
    /// Opens disk `disk` of recovery point `manifest`, loading (and checking) its index.
    pub fn open(vault: Arc<Vault>, manifest: &Manifest, disk: &str) -> Result<PointExport> {
        let record = crate::select_disk(manifest, disk)?.clone();
        let index = vault.load_index(&record.index, record.size)?;
        let capacity = (CACHE_BYTES / index.chunk_size as usize).max(2);
        Ok(PointExport {
            vault,
            disk: record,
            index,
            cache: Mutex::new(Lru {
                entries: VecDeque::with_capacity(capacity),
                capacity,
            }),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn disk(&self) -> &DiskRecord {
        &self.disk
    }

    /// How many chunks have been fetched from the vault so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Chunk `i`, decoded: from the cache, or fetched and checked. The vault is read without
    /// holding the cache's lock, so that clients reading different chunks do not wait on
    /// each other.
    fn chunk(&self, i: usize) -> io::Result<Arc<Vec<u8>>> {
        if let Some(data) = self.lock().get(i) {
            return Ok(data);
        }
        let (_, len) = self.index.chunk_range(i);
        let mut reader = self.vault.chunk_reader();
        let data = reader
            .read(&self.index.chunks[i], len)
            .map_err(|e| io::Error::other(format!("chunk {i} of disk {}: {e}", self.disk.name)))?;
        let data = Arc::new(data.to_vec());
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.lock().put(i, data.clone());
        Ok(data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic elsewhere cannot leave the cache inconsistent: every change is one call.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

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
        let chunk_size = self.index.chunk_size as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let i = (pos / chunk_size) as usize;
            let (start, len) = self.index.chunk_range(i);
            let within = (pos - start) as usize;
            let n = (len - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            if self.index.chunks[i].is_zero_chunk() {
                dst.fill(0);
            } else {
                dst.copy_from_slice(&self.chunk(i)?[within..within + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        self.check(off, len)?;
        let chunk_size = self.index.chunk_size as u64;
        let end = off + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let i = (pos / chunk_size) as usize;
            let (start, n) = self.index.chunk_range(i);
            let next = (start + n as u64).min(end);
            let data = !self.index.chunks[i].is_zero_chunk();
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

    #[test]
    fn reads_fetch_only_the_chunks_they_touch() {
        let (_dir, vault, m, disk) = point();
        let e = PointExport::open(vault, &m, "os").unwrap();
        assert_eq!(e.size(), disk.len() as u64);
        // A hole: nothing fetched.
        let mut b = vec![1u8; 4096];
        e.read_at(3 * 65536, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(e.fetches(), 0);
        // Across chunks 0 and 1: two fetches; again: none (cached).
        let mut b = vec![0u8; 1000];
        e.read_at(65536 - 500, &mut b).unwrap();
        assert_eq!(b, disk[65536 - 500..65536 + 500]);
        assert_eq!(e.fetches(), 2);
        e.read_at(65536 - 500, &mut b).unwrap();
        assert_eq!(e.fetches(), 2);
        // The whole disk in small unaligned pieces: each data chunk fetched once (chunk 9 is
        // chunk 1's bytes but its own entry in the index), the last chunk short.
        let mut all = vec![0xeeu8; disk.len()];
        for (k, piece) in all.chunks_mut(3000).enumerate() {
            e.read_at(k as u64 * 3000, piece).unwrap();
        }
        assert!(all == disk);
        assert_eq!(e.fetches(), 5);
        assert!(e.read_at(disk.len() as u64 - 1, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn a_damaged_chunk_fails_its_reads_only() {
        let (dir, vault, m, disk) = point();
        let e = PointExport::open(vault, &m, "os").unwrap();
        let index = &e.index;
        let digest = index.chunks[5].to_hex();
        let path = dir.path().join("v/chunks").join(&digest[..2]).join(&digest);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = e.read_at(5 * 65536, &mut [0u8; 10]).unwrap_err();
        assert!(err.to_string().contains("chunk 5 of disk os"), "{err}");
        let mut b = vec![0u8; 100];
        e.read_at(0, &mut b).unwrap();
        assert_eq!(b, disk[..100]);
    }

    #[test]
    fn zero_chunks_are_holes() {
        let (_dir, vault, m, disk) = point();
        let e = PointExport::open(vault, &m, "os").unwrap();
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
            PointExport::open(e.vault.clone(), &m, "data"),
            Err(crate::EngineError::Input(_))
        ));
    }
}
