//! One disk of a recovery point, read lazily: what the NBD export and file restore both read
//! through, so that a disk of many gigabytes costs only the chunks a client actually touches.
//!
//! A read fetches, opens and checks only the chunks it touches and keeps the most recently
//! used ones decoded in a cache bounded in bytes; zero chunks read as zeros without a fetch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmvault_format::{DiskIndex, DiskRecord};

use crate::{Result, StoreError, Vault};

/// Bytes of decoded chunks a [`PointDisk`] keeps unless told otherwise: a filesystem walk
/// keeps going back to the same metadata (inode tables, the MFT, the FAT), which should not
/// be fetched again each time.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A disk of a recovery point, readable at any offset from several threads at once.
pub struct PointDisk {
    vault: Arc<Vault>,
    name: String,
    index: DiskIndex,
    cache: Mutex<Lru>,
    fetched: AtomicU64,
    /// The last fetch that failed, kept because a filesystem parser that meets it reports
    /// only "I/O error": this tells a vault problem from a damaged guest filesystem.
    last_error: Mutex<Option<String>>,
}

impl PointDisk {
    /// Loads the disk's index (checked against its digest); fetches no chunk.
    pub fn open(vault: Arc<Vault>, disk: &DiskRecord) -> Result<PointDisk> {
        let index = vault.load_index(&disk.index, disk.size)?;
        Ok(Self::with_cache(vault, disk, index, DEFAULT_CACHE_BYTES))
    }

    /// As `open`, with the index already loaded and about `cache_bytes` of cache. The cache
    /// holds at least two chunks, so that a read across a chunk boundary repeated does not
    /// fetch again whatever the budget.
    pub fn with_cache(
        vault: Arc<Vault>,
        disk: &DiskRecord,
        index: DiskIndex,
        cache_bytes: usize,
    ) -> PointDisk {
        let capacity = (cache_bytes / (index.chunk_size as usize).max(1)).max(2);
        PointDisk {
            vault,
            name: disk.name.clone(),
            index,
            cache: Mutex::new(Lru {
                capacity,
                tick: 0,
                chunks: HashMap::new(),
            }),
            fetched: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.index.disk_size
    }

    pub fn index(&self) -> &DiskIndex {
        &self.index
    }

    /// The disk's chunk count, zero chunks included.
    pub fn chunk_count(&self) -> u64 {
        self.index.chunks.len() as u64
    }

    /// Chunks fetched from the vault so far (cache hits and zero chunks do not count).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The message of the last fetch that failed, taken, so that the next failure is not
    /// blamed on an old one.
    pub fn take_error(&self) -> Option<String> {
        lock(&self.last_error).take()
    }

    /// Reads all of `buf` from `offset`, or fails. Never short: a read that would end past
    /// the disk's end is refused whole ([`StoreError::Invalid`]), because NBD answers it with
    /// an error and the filesystem parsers would take a short read for damage; `Ok` is always
    /// `buf.len()`. A chunk that cannot be fetched fails the read, names the chunk and disk,
    /// and is kept for [`PointDisk::take_error`].
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let size = self.size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(StoreError::Invalid(format!(
                "read of {} bytes at {offset} is past the end of disk {} ({size} bytes)",
                buf.len(),
                self.name
            )));
        }
        let chunk_size = u64::from(self.index.chunk_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
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
        Ok(done)
    }

    /// Chunk `i`, decoded: from the cache, or fetched and checked.
    fn chunk(&self, i: usize) -> Result<Arc<[u8]>> {
        if let Some(data) = lock(&self.cache).get(i) {
            return Ok(data);
        }
        // The vault is read without the cache's lock held, so that clients reading different
        // chunks do not wait on each other. Two that miss the same chunk at once both fetch
        // it: a fetch too many, never a wrong byte.
        let (_, len) = self.index.chunk_range(i);
        let fetched = self
            .vault
            .chunk_reader()
            .read(&self.index.chunks[i], len)
            .map(Arc::<[u8]>::from);
        let data = match fetched {
            Ok(data) => data,
            Err(e) => {
                let e = within(e, &format!("chunk {i} of disk {}", self.name));
                *lock(&self.last_error) = Some(e.to_string());
                return Err(e);
            }
        };
        self.fetched.fetch_add(1, Ordering::Relaxed);
        lock(&self.cache).put(i, data.clone());
        Ok(data)
    }
}

/// A poisoned lock is taken as is: every change under these locks is one call that leaves
/// the value whole, so a panic elsewhere cannot have left it half changed.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `e` saying which chunk of which disk it is about, keeping its variant (and so its class:
/// transient, damage, not found) for the caller to act on.
fn within(e: StoreError, what: &str) -> StoreError {
    match e {
        StoreError::NotFound(s) => StoreError::NotFound(format!("{what}: {s}")),
        StoreError::Damaged {
            location,
            object,
            reason,
        } => StoreError::Damaged {
            location,
            object: format!("{what} ({object})"),
            reason,
        },
        StoreError::Io { context, source } => StoreError::Io {
            context: format!("{what}: {context}"),
            source,
        },
        StoreError::Format { context, source } => StoreError::Format {
            context: format!("{what}: {context}"),
            source,
        },
        StoreError::Remote {
            location,
            detail,
            transient,
        } => StoreError::Remote {
            location,
            detail: format!("{what}: {detail}"),
            transient,
        },
        other => other,
    }
}

/// Decoded chunks by number, each with when it was last used. A hit is a hash lookup; only a
/// put into a full cache scans for the least recently used, and a put follows a fetch, which
/// costs far more than the scan.
struct Lru {
    capacity: usize,
    tick: u64,
    chunks: HashMap<usize, (Arc<[u8]>, u64)>,
}

impl Lru {
    fn get(&mut self, i: usize) -> Option<Arc<[u8]>> {
        self.tick += 1;
        let (data, used) = self.chunks.get_mut(&i)?;
        *used = self.tick;
        Some(data.clone())
    }

    fn put(&mut self, i: usize, data: Arc<[u8]>) {
        self.tick += 1;
        // Two readers that fetched the same chunk at once both put it: the second must not
        // evict another chunk to make room for one already there.
        if let Some((_, used)) = self.chunks.get_mut(&i) {
            *used = self.tick;
            return;
        }
        if self.chunks.len() >= self.capacity {
            let oldest = self
                .chunks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(n, _)| *n);
            if let Some(oldest) = oldest {
                self.chunks.remove(&oldest);
            }
        }
        self.chunks.insert(i, (data, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Condvar;
    use std::time::{Duration, SystemTime};

    use vmvault_format::{is_zero, Digest, ObjectKind, TransferStats};

    use crate::{CreateOptions, Kind, LocalBackend, ObjectInfo, ReadBackend, WriteBackend};

    const C: usize = 65536;

    /// 1 MiB + 100 bytes in 64 KiB chunks: data in chunks 0, 1 and 5, the same bytes in chunk
    /// 9 as in 1, a short last chunk (16) with one byte set.
    fn bytes() -> Vec<u8> {
        let mut disk = vec![0u8; (1 << 20) + 100];
        for (i, b) in disk[..2 * C].iter_mut().enumerate() {
            *b = (i * 7 % 253) as u8 + 1;
        }
        disk[5 * C + 3] = 9;
        let copy = disk[C..2 * C].to_vec();
        disk[9 * C..10 * C].copy_from_slice(&copy);
        disk[(1 << 20) + 50] = 1;
        disk
    }

    /// `disk` stored in a new vault on `backend` as a backup stores it: zero chunks as the
    /// zero digest, the others sealed, then the index.
    fn store(backend: Arc<dyn WriteBackend>, disk: &[u8]) -> (Arc<Vault>, DiskRecord) {
        let opts = CreateOptions {
            chunk_size: C as u32,
            ..CreateOptions::default()
        };
        let vault = Vault::create(backend, opts).unwrap();
        let chunks = disk
            .chunks(C)
            .map(|c| {
                if is_zero(c) {
                    return Digest::ZERO_CHUNK;
                }
                let digest = vault.codec().digest(c);
                let sealed = vault.codec().seal(ObjectKind::Chunk, c);
                vault.write_chunk(&digest, &sealed).unwrap();
                digest
            })
            .collect();
        let index = DiskIndex {
            disk_size: disk.len() as u64,
            chunk_size: C as u32,
            chunks,
        };
        let record = DiskRecord {
            name: "os".into(),
            format: "raw".into(),
            size: disk.len() as u64,
            index: vault.save_index(&index).unwrap(),
            stats: TransferStats::default(),
        };
        (Arc::new(vault), record)
    }

    fn local(dir: &tempfile::TempDir) -> Arc<dyn WriteBackend> {
        Arc::new(LocalBackend::new(dir.path().join("v")))
    }

    #[test]
    fn reads_fetch_only_the_chunks_they_touch() {
        let dir = tempfile::tempdir().unwrap();
        let disk = bytes();
        let (vault, record) = store(local(&dir), &disk);
        let d = PointDisk::open(vault, &record).unwrap();
        assert_eq!(d.size(), disk.len() as u64);
        assert_eq!(d.chunk_count(), 17);
        // A zero chunk: nothing fetched.
        let mut b = vec![1u8; 4096];
        assert_eq!(d.read_at(&mut b, 3 * C as u64).unwrap(), 4096);
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(d.fetched(), 0);
        // Across chunks 0 and 1: two fetches; again: none (cached).
        let mut b = vec![0u8; 1000];
        d.read_at(&mut b, C as u64 - 500).unwrap();
        assert_eq!(b, disk[C - 500..C + 500]);
        assert_eq!(d.fetched(), 2);
        d.read_at(&mut b, C as u64 - 500).unwrap();
        assert_eq!(d.fetched(), 2);
        // The whole disk in small unaligned pieces: each data chunk fetched once (chunk 9 is
        // chunk 1's bytes but its own entry in the index), the last chunk short.
        let mut all = vec![0xeeu8; disk.len()];
        for (k, piece) in all.chunks_mut(3000).enumerate() {
            assert_eq!(d.read_at(piece, k as u64 * 3000).unwrap(), piece.len());
        }
        assert!(all == disk);
        assert_eq!(d.fetched(), 5);
        assert_eq!(d.take_error(), None);
    }

    #[test]
    fn reads_past_the_end_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let disk = bytes();
        let (vault, record) = store(local(&dir), &disk);
        let d = PointDisk::open(vault, &record).unwrap();
        let end = disk.len() as u64;
        let err = d.read_at(&mut [0u8; 2], end - 1).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
        assert!(d.read_at(&mut [0u8; 1], u64::MAX).is_err());
        assert!(d.read_at(&mut [], end + 1).is_err());
        assert_eq!(d.fetched(), 0);
        assert_eq!(d.read_at(&mut [], end).unwrap(), 0);
        let mut last = [0u8; 51];
        assert_eq!(d.read_at(&mut last, end - 51).unwrap(), 51);
        assert_eq!(last[..], disk[disk.len() - 51..]);
        // Refusals are the caller's mistake, not the vault's: nothing to blame a parser on.
        assert_eq!(d.take_error(), None);
    }

    #[test]
    fn a_chunk_that_cannot_be_fetched_fails_its_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let backend = local(&dir);
        let disk = bytes();
        let (vault, record) = store(backend.clone(), &disk);
        let d = PointDisk::open(vault, &record).unwrap();
        let name = d.index().chunks[5].to_hex();
        let mut sealed = backend.read(Kind::Chunk, &name).unwrap();
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        backend.write(Kind::Chunk, &name, &sealed).unwrap();
        backend
            .remove(Kind::Chunk, &d.index().chunks[16].to_hex())
            .unwrap();

        let err = d.read_at(&mut [0u8; 10], 5 * C as u64).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err:?}");
        assert!(err.to_string().contains("chunk 5 of disk os"), "{err}");
        let noted = d.take_error().unwrap();
        assert!(noted.contains("chunk 5 of disk os"), "{noted}");
        assert_eq!(d.take_error(), None);
        // Not cached: the next read tries again, and fails again.
        assert!(d.read_at(&mut [0u8; 10], 5 * C as u64).is_err());
        let err = d.read_at(&mut [0u8; 10], 16 * C as u64).unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains("chunk 16 of disk os"), "{err}");
        assert!(d.take_error().unwrap().contains("chunk 16 of disk os"));

        let mut b = vec![0u8; 100];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, disk[..100]);
        assert_eq!(d.fetched(), 1);
    }

    #[test]
    fn the_cache_drops_the_least_recently_used_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = bytes();
        let (vault, record) = store(local(&dir), &disk);
        let index = vault.load_index(&record.index, record.size).unwrap();
        // Two chunks' worth: 0 and 1 fill it, 0 is used again, so 5 pushes out 1, not 0.
        let d = PointDisk::with_cache(vault.clone(), &record, index.clone(), 2 * C);
        let mut b = [0u8; 1];
        for (chunk, fetched) in [(0, 1), (1, 2), (0, 2), (5, 3), (0, 3), (1, 4)] {
            d.read_at(&mut b, chunk * C as u64).unwrap();
            assert_eq!(b[0], disk[chunk as usize * C]);
            assert_eq!(d.fetched(), fetched, "after chunk {chunk}");
        }
        // No budget still keeps two chunks: a read across a boundary, repeated, is cached.
        let d = PointDisk::with_cache(vault, &record, index, 0);
        let mut b = vec![0u8; 1000];
        d.read_at(&mut b, C as u64 - 500).unwrap();
        d.read_at(&mut b, C as u64 - 500).unwrap();
        assert_eq!(b, disk[C - 500..C + 500]);
        assert_eq!(d.fetched(), 2);
    }

    #[test]
    fn two_threads_read_different_chunks_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Rendezvous::new(local(&dir)));
        let disk = bytes();
        let (vault, record) = store(gate.clone(), &disk);
        let d = PointDisk::open(vault, &record).unwrap();
        gate.armed.store(true, Ordering::SeqCst);
        let read = |chunk: usize| {
            let mut b = vec![0u8; C];
            d.read_at(&mut b, (chunk * C) as u64).unwrap();
            b
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| read(0));
            let b = s.spawn(|| read(5));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(a == disk[..C]);
        assert!(b == disk[5 * C..6 * C]);
        assert_eq!(d.fetched(), 2);
        assert!(
            !gate.alone.load(Ordering::SeqCst),
            "one fetch waited for the other instead of running beside it"
        );
    }

    /// A region whose chunk reads, once armed, each wait for another to be under way (for a
    /// few seconds at most): a fetch made behind the cache's lock would wait out the deadline
    /// and be noted as alone.
    struct Rendezvous {
        inner: Arc<dyn WriteBackend>,
        armed: AtomicBool,
        arrived: Mutex<usize>,
        met: Condvar,
        alone: AtomicBool,
    }

    impl Rendezvous {
        fn new(inner: Arc<dyn WriteBackend>) -> Rendezvous {
            Rendezvous {
                inner,
                armed: AtomicBool::new(false),
                arrived: Mutex::new(0),
                met: Condvar::new(),
                alone: AtomicBool::new(false),
            }
        }

        fn meet(&self, kind: Kind) {
            if kind != Kind::Chunk || !self.armed.load(Ordering::SeqCst) {
                return;
            }
            let mut arrived = lock(&self.arrived);
            *arrived += 1;
            self.met.notify_all();
            let (arrived, wait) = self
                .met
                .wait_timeout_while(arrived, Duration::from_secs(10), |n| *n < 2)
                .unwrap_or_else(|e| e.into_inner());
            drop(arrived);
            if wait.timed_out() {
                self.alone.store(true, Ordering::SeqCst);
            }
        }
    }

    impl ReadBackend for Rendezvous {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
            self.meet(kind);
            self.inner.read(kind, name)
        }
        fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
            self.meet(kind);
            self.inner.read_into(kind, name, buf)
        }
        fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
            self.inner.stat(kind, name)
        }
        fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
            self.inner.list(kind)
        }
    }

    impl WriteBackend for Rendezvous {
        fn create(&self) -> Result<()> {
            self.inner.create()
        }
        fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
            self.inner.write(kind, name, data)
        }
        fn remove(&self, kind: Kind, name: &str) -> Result<()> {
            self.inner.remove(kind, name)
        }
        fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
            self.inner.touch(kind, name)
        }
        fn remove_unless_touched(
            &self,
            kind: Kind,
            name: &str,
            cutoff: SystemTime,
        ) -> Result<bool> {
            self.inner.remove_unless_touched(kind, name, cutoff)
        }
        fn sync(&self) -> Result<()> {
            self.inner.sync()
        }
        fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
            self.inner.remove_temporaries(older_than)
        }
    }
}
