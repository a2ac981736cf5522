//! A vault opened for use: its config, its codec, and typed access to its objects.

use std::path::PathBuf;
use std::sync::Arc;

use vmvault_format::{
    Codec, Digest, DiskIndex, FormatError, KdfParams, KeyFile, Keys, Manifest, ObjectKind, Opener,
    PointId, VaultConfig, MAX_MANIFEST_LEN,
};

use crate::backend::{Kind, WriteBackend};
use crate::clock::Clock;
use crate::gc::LockTiming;
use crate::journal::Journal;
use crate::locks::LockGuard;
use crate::replicated::{self, Notify, Region, Replicated};
use crate::verified::{VaultVerifier, Verified};
use crate::{Result, StoreError};

pub(crate) const CONFIG_NAME: &str = "config";
const KEY_NAME: &str = "default";

/// How a new vault is made.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub chunk_size: u32,
    /// `None` makes an unencrypted vault.
    pub passphrase: Option<Vec<u8>>,
    pub kdf: KdfParams,
    pub zstd_level: i32,
    /// How long deleted points stay restorable; 0 = deletions are immediate.
    pub soft_delete_days: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: vmvault_format::DEFAULT_CHUNK_SIZE,
            passphrase: None,
            kdf: KdfParams::default(),
            zstd_level: 1,
            soft_delete_days: vmvault_format::DEFAULT_SOFT_DELETE_DAYS,
        }
    }
}

/// How the secondary region is kept current.
#[derive(Debug, Clone)]
pub enum Replication {
    /// A write returns once both regions hold it.
    Sync,
    /// A write returns once the primary holds it; a queue journaled under `state_dir` (at
    /// most `capacity` entries) feeds the secondary in the background.
    Async { state_dir: PathBuf, capacity: usize },
}

/// The regions a vault is opened or created in: the primary, and a secondary it replicates to.
pub struct Regions {
    pub primary: Arc<dyn WriteBackend>,
    pub secondary: Option<Arc<dyn WriteBackend>>,
    pub replication: Replication,
    /// Told of every read that fell back to the other region and of replication trouble.
    pub notify: Notify,
}

impl Regions {
    pub fn single(backend: Arc<dyn WriteBackend>) -> Regions {
        Regions {
            primary: backend,
            secondary: None,
            replication: Replication::Sync,
            notify: Arc::new(|_: &str| {}),
        }
    }
}

impl From<Arc<dyn WriteBackend>> for Regions {
    fn from(backend: Arc<dyn WriteBackend>) -> Regions {
        Regions::single(backend)
    }
}

/// A recovery point whose manifest could not be read, and why.
pub type Unreadable = (PointId, StoreError);

pub struct Vault {
    /// Every read and write of the vault: verified regions, replicated when there are two.
    backend: Arc<dyn WriteBackend>,
    /// The regions one by one (verified), primary first: for collection, repair and status.
    regions: Vec<Region>,
    replicated: Option<Arc<Replicated>>,
    failed_over: bool,
    config: VaultConfig,
    keys: Option<Keys>,
    codec: Arc<Codec>,
    /// What the vault's rules read the time from (lock ages, waits).
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) lock_timing: LockTiming,
    /// The storage hold the regions were last given (see `hold`).
    pub(crate) applied_hold: crate::hold::AppliedHold,
}

impl Vault {
    /// Makes a new vault in empty regions. The config is written last: a vault exists once
    /// its config does, so an interrupted create leaves no half vault that opens.
    pub fn create(regions: impl Into<Regions>, opts: CreateOptions) -> Result<Vault> {
        let regions = regions.into();
        let mut vault_id = [0u8; 16];
        vmvault_format::random_bytes(&mut vault_id);
        let config = VaultConfig {
            encrypted: opts.passphrase.is_some(),
            chunk_size: opts.chunk_size,
            vault_id,
            created: chrono::Utc::now().timestamp(),
            zstd_level: opts.zstd_level,
        };
        config
            .validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let keys = opts
            .passphrase
            .as_ref()
            .map(|pass| (Keys::generate(), pass));
        let key_file = match &keys {
            Some((k, pass)) => Some(
                KeyFile::wrap(k, pass, opts.kdf)
                    .map_err(|e| StoreError::format("wrapping the vault key", e))?,
            ),
            None => None,
        };
        // Both regions are checked empty before anything is written to either.
        let mut all = vec![regions.primary.clone()];
        all.extend(regions.secondary.clone());
        for b in &all {
            b.create()?;
        }
        for b in &all {
            if let Some(file) = &key_file {
                b.write(Kind::Key, KEY_NAME, &file.encode())?;
            }
            b.sync()?;
        }
        for b in &all {
            b.write(Kind::Config, CONFIG_NAME, &config.encode())?;
            b.sync()?;
        }
        let vault = Self::assemble(regions, config, keys.map(|(k, _)| k))?;
        // After the config: a create interrupted here leaves the default rules, the safe side.
        if opts.soft_delete_days != vmvault_format::DEFAULT_SOFT_DELETE_DAYS {
            vault.set_soft_delete_days(opts.soft_delete_days)?;
        }
        Ok(vault)
    }

    /// Opens a vault; `passphrase` is asked only when the vault is encrypted. The config and
    /// key come from the primary, or from the secondary when the primary cannot give them.
    pub fn open(
        regions: impl Into<Regions>,
        passphrase: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Vault> {
        let mut regions = regions.into();
        let mut failed_over = false;
        let source = match (Self::read_config(&*regions.primary), &regions.secondary) {
            (Ok(c), _) => Ok((c, regions.primary.clone())),
            // A primary that cannot give its config is not used at all: the vault works from
            // the secondary alone, and says so.
            (Err(e), Some(secondary)) => match Self::read_config(&**secondary) {
                Ok(c) => {
                    (regions.notify)(&format!(
                        "working from the secondary region ({}) alone: the primary failed: {e}",
                        secondary.location()
                    ));
                    failed_over = true;
                    Ok((c, secondary.clone()))
                }
                Err(_) => Err(e),
            },
            (Err(e), None) => Err(e),
        };
        let (config, source) = source?;
        if failed_over {
            regions.primary = source.clone();
            regions.secondary = None;
        }
        let keys = if config.encrypted {
            let file = Self::read_key_file(&*source)?;
            let pass = passphrase().map_err(StoreError::Passphrase)?;
            match file.unwrap_keys(&pass) {
                Ok(keys) => Some(keys),
                Err(FormatError::WrongPassphrase) => {
                    return Err(StoreError::WrongPassphrase {
                        location: regions.primary.location(),
                    })
                }
                Err(e) => return Err(StoreError::format("the vault's key file", e)),
            }
        } else {
            None
        };
        let mut vault = Self::assemble(regions, config, keys)?;
        if failed_over {
            vault.regions[0].name = "secondary".into();
            vault.failed_over = true;
        }
        // Before anything is written: a locked vault's storage holds it from the first object.
        vault.apply_hold_unless_damaged()?;
        Ok(vault)
    }

    /// Whether the primary failed when the vault was opened and it works from the secondary
    /// region alone.
    pub fn failed_over(&self) -> bool {
        self.failed_over
    }

    /// Reads a vault's config without its key: what `vault info` shows before a passphrase.
    pub fn read_config(backend: &dyn WriteBackend) -> Result<VaultConfig> {
        let bytes = match backend.read(Kind::Config, CONFIG_NAME) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                return Err(StoreError::NotAVault {
                    location: backend.location(),
                })
            }
            Err(e) => return Err(e),
        };
        VaultConfig::decode(&bytes).map_err(|e| match e {
            FormatError::BadMagic { .. } => StoreError::NotAVault {
                location: backend.location(),
            },
            e => StoreError::format(format!("vault config of {}", backend.location()), e),
        })
    }

    fn read_key_file(backend: &dyn WriteBackend) -> Result<KeyFile> {
        let bytes = backend.read(Kind::Key, KEY_NAME)?;
        KeyFile::decode(&bytes).map_err(|e| StoreError::format("the vault's key file", e))
    }

    fn assemble(regions: Regions, config: VaultConfig, keys: Option<Keys>) -> Result<Vault> {
        let codec = Arc::new(match &keys {
            Some(k) => Codec::encrypted(k, config.zstd_level),
            None => Codec::plain(config.zstd_level),
        });
        let verifier = Arc::new(VaultVerifier::new(codec.clone(), config.chunk_size));
        let verified = |name: &str, b: Arc<dyn WriteBackend>| Region {
            name: name.to_string(),
            backend: Arc::new(Verified::new(b, verifier.clone())),
        };
        let primary = verified("primary", regions.primary);
        let (backend, region_list, replicated): (Arc<dyn WriteBackend>, _, _) =
            match regions.secondary {
                None => (primary.backend.clone(), vec![primary], None),
                Some(s) => {
                    let secondary = verified("secondary", s);
                    let mode = match regions.replication {
                        Replication::Sync => replicated::Mode::Sync,
                        Replication::Async {
                            state_dir,
                            capacity,
                        } => {
                            let dir = state_dir
                                .join("replication")
                                .join(hex::encode(config.vault_id));
                            replicated::Mode::Async {
                                journal: Arc::new(Journal::open(&dir, capacity)?),
                            }
                        }
                    };
                    let r = Arc::new(Replicated::new(
                        primary.clone(),
                        secondary.clone(),
                        mode,
                        regions.notify,
                    ));
                    (r.clone(), vec![primary, secondary], Some(r))
                }
            };
        Ok(Vault {
            backend,
            regions: region_list,
            replicated,
            failed_over: false,
            config,
            keys,
            codec,
            clock: crate::clock::system(),
            lock_timing: LockTiming::default(),
            applied_hold: Default::default(),
        })
    }

    /// The same vault (its config and keys as opened) in other regions: a vault opened in its
    /// primary alone is given the secondary its regions record names, or is seen through that
    /// secondary alone, without its passphrase asked (and its key derived) again. Every region
    /// whose config can be read must hold this vault (the same vault id), and the first must
    /// be readable: a record naming another vault's region is refused. A secondary that holds
    /// no vault yet, or cannot be reached now, is taken: replication fills it, and its lag
    /// shows in `vault status`.
    pub fn with_regions(self, regions: impl Into<Regions>) -> Result<Vault> {
        self.view_with(regions)
    }

    /// [`Vault::with_regions`] leaving this vault as it is: another view of the same vault on
    /// fresh backends (a server's job wraps them for its cancellation), with the keys this one
    /// derived, so that no job pays for the passphrase's key derivation again.
    pub fn view_with(&self, regions: impl Into<Regions>) -> Result<Vault> {
        let regions = regions.into();
        if self.config.encrypted && self.keys.is_none() {
            return Err(StoreError::Invalid(
                "a view of one region of a vault cannot be given other regions".into(),
            ));
        }
        let is_this_vault = |b: &dyn WriteBackend, must_read: bool| -> Result<()> {
            match Self::read_config(b) {
                Ok(c) if c.vault_id == self.config.vault_id => Ok(()),
                Ok(_) => Err(StoreError::Invalid(format!(
                    "{} holds another vault (its vault id is not {}'s): it is not a region \
                     of this vault",
                    b.location(),
                    self.location()
                ))),
                Err(e) if must_read => Err(e),
                Err(_) => Ok(()),
            }
        };
        is_this_vault(&*regions.primary, true)?;
        if let Some(s) = &regions.secondary {
            is_this_vault(&**s, false)?;
        }
        let mut vault = Self::assemble(regions, self.config.clone(), self.keys.clone())?;
        vault.clock = self.clock.clone();
        vault.lock_timing = self.lock_timing.clone();
        // New backends: a locked vault's storage holds them from the first object too.
        vault.apply_hold_unless_damaged()?;
        Ok(vault)
    }

    /// The vault with its rules reading the time from `clock` (tests: skewed or jumping).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Vault {
        self.clock = clock;
        self
    }

    /// The vault with other lock polling and collection waiting times.
    pub fn with_lock_timing(mut self, timing: LockTiming) -> Vault {
        self.lock_timing = timing;
        self
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The regions one by one, primary first, each verified on read.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The replication between the regions, when there are two.
    pub fn replication(&self) -> Option<&Arc<Replicated>> {
        self.replicated.as_ref()
    }

    /// The same vault seen through one region only (for verifying and collecting per region).
    pub fn region_view(&self, i: usize) -> Vault {
        let region = self.regions[i].clone();
        Vault {
            backend: region.backend.clone(),
            regions: vec![region],
            replicated: None,
            failed_over: self.failed_over,
            config: self.config.clone(),
            keys: None,
            codec: self.codec.clone(),
            clock: self.clock.clone(),
            lock_timing: self.lock_timing.clone(),
            // Its own: the backends keep the hold they were given; this records one region.
            applied_hold: Default::default(),
        }
    }

    /// Rewraps the vault's keys under a new passphrase; no data is rewritten.
    pub fn change_passphrase(&self, new: &[u8]) -> Result<()> {
        let keys = self.keys.as_ref().ok_or_else(|| {
            StoreError::Invalid("this vault is not encrypted: it has no passphrase".into())
        })?;
        let old = Self::read_key_file(&*self.backend)?;
        let file = KeyFile::wrap(keys, new, old.kdf)
            .map_err(|e| StoreError::format("wrapping the vault key", e))?;
        self.backend.write(Kind::Key, KEY_NAME, &file.encode())?;
        self.backend.sync()
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    pub fn backend(&self) -> &Arc<dyn WriteBackend> {
        &self.backend
    }

    pub fn location(&self) -> String {
        self.backend.location()
    }

    pub fn write_chunk(&self, digest: &Digest, sealed: &[u8]) -> Result<()> {
        self.backend.write(Kind::Chunk, &digest.to_hex(), sealed)
    }

    /// Whether the vault has the chunk of `len` plain bytes, refreshing its time so that a
    /// concurrent garbage collection spares it (see the crate doc). A stored copy whose size no
    /// sealed chunk of that length can have (emptied or cut short by storage) counts as
    /// absent, so the caller stores the chunk anew instead of pointing a new recovery point at
    /// damage; checking more than the size would mean reading every reused chunk.
    pub fn touch_chunk(&self, digest: &Digest, len: usize) -> Result<bool> {
        Ok(self
            .backend
            .touch(Kind::Chunk, &digest.to_hex())?
            .is_some_and(|size| plausible_chunk_size(size, len)))
    }

    /// A reader of chunks for one thread, reusing its buffers from chunk to chunk.
    pub fn chunk_reader(&self) -> ChunkReader<'_> {
        ChunkReader {
            vault: self,
            opener: self.codec.opener(),
            buf: Vec::new(),
        }
    }

    pub fn save_index(&self, index: &DiskIndex) -> Result<Digest> {
        let payload = index.encode();
        let digest = self.codec.digest(&payload);
        let sealed = self.codec.seal(ObjectKind::Index, &payload);
        self.backend.write(Kind::Index, &digest.to_hex(), &sealed)?;
        Ok(digest)
    }

    /// Loads the index of a disk of `disk_size` bytes, checking it is the one `digest` names.
    /// A copy that fails the check is read from the other region, if there is one.
    pub fn load_index(&self, digest: &Digest, disk_size: u64) -> Result<DiskIndex> {
        let count = DiskIndex::chunk_count(disk_size, self.config.chunk_size);
        let mut opener = self.codec.opener();
        let mut buf = Vec::new();
        let mut range = 0..0;
        self.backend.read_checked(
            Kind::Index,
            &digest.to_hex(),
            &mut buf,
            &mut |b: &mut Vec<u8>| {
                range = opener
                    .open_vec(ObjectKind::Index, b, DiskIndex::encoded_len(count))
                    .map_err(|e| e.to_string())?;
                if self.codec.digest(&b[range.clone()]) != *digest {
                    return Err(FormatError::Checksum { what: "disk index" }.to_string());
                }
                let index = DiskIndex::decode(&b[range.clone()]).map_err(|e| e.to_string())?;
                if index.disk_size != disk_size || index.chunk_size != self.config.chunk_size {
                    return Err("disk or chunk size differs from the manifest".into());
                }
                Ok(())
            },
        )?;
        DiskIndex::decode(&buf[range])
            .map_err(|e| StoreError::format(format!("disk index {digest}"), e))
    }

    /// Makes a backup's recovery point exist: everything it references durable first, then
    /// the manifest, then durable again. The backup's lock must be trusted before the manifest
    /// is written and still after (see [`crate::locks`]): a backup whose lock a collection may
    /// have judged dead may reference chunks that collection deleted, so its manifest is not
    /// written, or is taken back, and the backup fails with [`StoreError::LockLost`].
    pub fn commit_point(&self, lock: &LockGuard, manifest: &Manifest) -> Result<()> {
        self.backend.sync()?;
        lock.check_held().map_err(|e| not_committed(e, manifest))?;
        self.save_manifest(manifest)?;
        self.backend.sync()?;
        if let Err(e) = lock.check_held() {
            let _ = self.remove_manifest(&manifest.id);
            let _ = self.backend.sync();
            return Err(not_committed(e, manifest));
        }
        Ok(())
    }

    pub fn save_manifest(&self, manifest: &Manifest) -> Result<()> {
        let sealed = self.codec.seal(ObjectKind::Manifest, &manifest.encode());
        self.backend
            .write(Kind::Point, &manifest.id.to_hex(), &sealed)
    }

    pub fn load_manifest(&self, id: &PointId) -> Result<Manifest> {
        let mut opener = self.codec.opener();
        let mut buf = Vec::new();
        let mut manifest = None;
        self.backend
            .read_checked(Kind::Point, &id.to_hex(), &mut buf, &mut |b: &mut Vec<
                u8,
            >| {
                let range = opener
                    .open_vec(ObjectKind::Manifest, b, MAX_MANIFEST_LEN)
                    .map_err(|e| e.to_string())?;
                let m = Manifest::decode(&b[range]).map_err(|e| e.to_string())?;
                if m.id != *id {
                    return Err(format!("it names itself {}", m.id));
                }
                manifest = Some(m);
                Ok(())
            })?;
        manifest.ok_or_else(|| StoreError::Invalid(format!("recovery point {id} was not read")))
    }

    /// When storage says a point's manifest was written (its object's time), if it has one.
    pub fn point_written(&self, id: &PointId) -> Result<Option<std::time::SystemTime>> {
        Ok(self
            .backend
            .stat(Kind::Point, &id.to_hex())?
            .map(|o| o.modified))
    }

    /// Only the vault's rules remove a point ([`Vault::delete_point`], gc's purge), and a
    /// backup takes back its own manifest when its lock was lost.
    pub(crate) fn remove_manifest(&self, id: &PointId) -> Result<()> {
        self.backend.remove(Kind::Point, &id.to_hex())
    }

    /// Every recovery point's id; names that are not ids are ignored.
    pub fn point_ids(&self) -> Result<Vec<PointId>> {
        Ok(self
            .backend
            .list(Kind::Point)?
            .into_iter()
            .filter_map(|o| o.name.parse().ok())
            .collect())
    }

    /// The recovery points that are not deleted, oldest first, and those whose manifest or
    /// deletion marker could not be read. What listings, restores and prune see.
    pub fn points(&self) -> Result<(Vec<Manifest>, Vec<Unreadable>)> {
        let list = self.list_points()?;
        Ok((list.live, list.unreadable))
    }

    /// Every recovery point whose manifest is stored, soft-deleted ones included, oldest
    /// first, and the ones that could not be read: what garbage collection and verify walk.
    pub fn all_points(&self) -> Result<(Vec<Manifest>, Vec<Unreadable>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for id in self.point_ids()? {
            match self.load_manifest(&id) {
                Ok(m) => good.push(m),
                // Removed by a prune since the listing: not a point any more.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => bad.push((id, e)),
            }
        }
        good.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok((good, bad))
    }
}

fn not_committed(e: StoreError, m: &Manifest) -> StoreError {
    match e {
        StoreError::LockLost(why) => StoreError::LockLost(format!(
            "the backup of {} lost its lock in the vault ({why}): a garbage collection may have \
             removed what it stored, so recovery point {} was not written; run the backup again",
            m.vm,
            m.id.short()
        )),
        other => other,
    }
}

/// Whether a sealed chunk of `len` plain bytes can be `size` bytes long: an envelope holds a
/// non-empty body no longer than the payload (it is kept raw where compression does not
/// shrink it) between its header and trailer.
pub fn plausible_chunk_size(size: u64, len: usize) -> bool {
    let frame = (vmvault_format::HEADER_LEN + vmvault_format::TRAILER_LEN) as u64;
    size > frame && size <= frame + len as u64
}

/// Reads chunks for one thread: fetched into a reused buffer, opened in place, checked.
pub struct ChunkReader<'a> {
    vault: &'a Vault,
    opener: Opener<'a>,
    buf: Vec<u8>,
}

impl ChunkReader<'_> {
    /// Reads, opens and checks one chunk; `len` is its length as the disk index implies. A
    /// copy that fails the check is read from the other region, if there is one.
    pub fn read(&mut self, digest: &Digest, len: usize) -> Result<&[u8]> {
        let vault = self.vault;
        let opener = &mut self.opener;
        let mut range = 0..0;
        vault.backend.read_checked(
            Kind::Chunk,
            &digest.to_hex(),
            &mut self.buf,
            &mut |b: &mut Vec<u8>| {
                range = opener
                    .open_vec(ObjectKind::Chunk, b, len as u64)
                    .map_err(|e| e.to_string())?;
                let plain = &b[range.clone()];
                if plain.len() != len || vault.codec.digest(plain) != *digest {
                    return Err(FormatError::Checksum { what: "chunk" }.to_string());
                }
                Ok(())
            },
        )?;
        Ok(&self.buf[range])
    }
}
