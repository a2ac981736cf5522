//! A vault opened for use: its config, its codec, and typed access to its objects.

use std::sync::Arc;

use vmvault_format::{
    Codec, Digest, DiskIndex, FormatError, KdfParams, KeyFile, Keys, Manifest, ObjectKind, Opener,
    PointId, VaultConfig, MAX_MANIFEST_LEN,
};

use crate::backend::{Kind, WriteBackend};
use crate::{Result, StoreError};

const CONFIG_NAME: &str = "config";
const KEY_NAME: &str = "default";

/// How a new vault is made.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub chunk_size: u32,
    /// `None` makes an unencrypted vault.
    pub passphrase: Option<Vec<u8>>,
    pub kdf: KdfParams,
    pub zstd_level: i32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            chunk_size: vmvault_format::DEFAULT_CHUNK_SIZE,
            passphrase: None,
            kdf: KdfParams::default(),
            zstd_level: 1,
        }
    }
}

/// A recovery point whose manifest could not be read, and why.
pub type Unreadable = (PointId, StoreError);

pub struct Vault {
    backend: Arc<dyn WriteBackend>,
    config: VaultConfig,
    keys: Option<Keys>,
    codec: Codec,
}

impl Vault {
    /// Makes a new vault in an empty region. The config is written last: a vault exists once
    /// its config does, so an interrupted create leaves no half vault that opens.
    pub fn create(backend: Arc<dyn WriteBackend>, opts: CreateOptions) -> Result<Vault> {
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
        backend.create()?;
        let keys = match &opts.passphrase {
            Some(pass) => {
                let keys = Keys::generate();
                let file = KeyFile::wrap(&keys, pass, opts.kdf)
                    .map_err(|e| StoreError::format("wrapping the vault key", e))?;
                backend.write(Kind::Key, KEY_NAME, &file.encode())?;
                Some(keys)
            }
            None => None,
        };
        backend.write(Kind::Config, CONFIG_NAME, &config.encode())?;
        backend.sync()?;
        Ok(Self::assemble(backend, config, keys))
    }

    /// Opens a vault; `passphrase` is asked only when the vault is encrypted.
    pub fn open(
        backend: Arc<dyn WriteBackend>,
        passphrase: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
    ) -> Result<Vault> {
        let config = Self::read_config(&*backend)?;
        let keys = if config.encrypted {
            let file = Self::read_key_file(&*backend)?;
            let pass = passphrase().map_err(StoreError::Passphrase)?;
            match file.unwrap_keys(&pass) {
                Ok(keys) => Some(keys),
                Err(FormatError::WrongPassphrase) => {
                    return Err(StoreError::WrongPassphrase {
                        location: backend.location(),
                    })
                }
                Err(e) => return Err(StoreError::format("the vault's key file", e)),
            }
        } else {
            None
        };
        Ok(Self::assemble(backend, config, keys))
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

    fn assemble(backend: Arc<dyn WriteBackend>, config: VaultConfig, keys: Option<Keys>) -> Vault {
        let codec = match &keys {
            Some(k) => Codec::encrypted(k, config.zstd_level),
            None => Codec::plain(config.zstd_level),
        };
        Vault {
            backend,
            config,
            keys,
            codec,
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

    /// Whether the vault has the chunk, refreshing its time so that a concurrent garbage
    /// collection spares it (see the crate doc).
    pub fn touch_chunk(&self, digest: &Digest) -> Result<bool> {
        self.backend.touch(Kind::Chunk, &digest.to_hex())
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
    pub fn load_index(&self, digest: &Digest, disk_size: u64) -> Result<DiskIndex> {
        let bytes = self.backend.read(Kind::Index, &digest.to_hex())?;
        let context = || format!("disk index {digest}");
        let count = DiskIndex::chunk_count(disk_size, self.config.chunk_size);
        let payload = self
            .codec
            .open(ObjectKind::Index, &bytes, DiskIndex::encoded_len(count))
            .map_err(|e| StoreError::format(context(), e))?;
        if self.codec.digest(&payload) != *digest {
            return Err(StoreError::format(
                context(),
                FormatError::Checksum { what: "disk index" },
            ));
        }
        let index = DiskIndex::decode(&payload).map_err(|e| StoreError::format(context(), e))?;
        if index.disk_size != disk_size || index.chunk_size != self.config.chunk_size {
            return Err(StoreError::format(
                context(),
                FormatError::Invalid {
                    what: "disk index",
                    detail: "disk or chunk size differs from the manifest".into(),
                },
            ));
        }
        Ok(index)
    }

    pub fn save_manifest(&self, manifest: &Manifest) -> Result<()> {
        let sealed = self.codec.seal(ObjectKind::Manifest, &manifest.encode());
        self.backend
            .write(Kind::Point, &manifest.id.to_hex(), &sealed)
    }

    pub fn load_manifest(&self, id: &PointId) -> Result<Manifest> {
        let bytes = self.backend.read(Kind::Point, &id.to_hex())?;
        let context = || format!("recovery point {id}");
        let payload = self
            .codec
            .open(ObjectKind::Manifest, &bytes, MAX_MANIFEST_LEN)
            .map_err(|e| StoreError::format(context(), e))?;
        let m = Manifest::decode(&payload).map_err(|e| StoreError::format(context(), e))?;
        if m.id != *id {
            return Err(StoreError::format(
                context(),
                FormatError::Invalid {
                    what: "recovery point manifest",
                    detail: format!("it names itself {}", m.id),
                },
            ));
        }
        Ok(m)
    }

    pub fn remove_manifest(&self, id: &PointId) -> Result<()> {
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

    /// Every recovery point, oldest first, and the ones that could not be read.
    pub fn points(&self) -> Result<(Vec<Manifest>, Vec<Unreadable>)> {
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

/// Reads chunks for one thread: fetched into a reused buffer, opened in place, checked.
pub struct ChunkReader<'a> {
    vault: &'a Vault,
    opener: Opener<'a>,
    buf: Vec<u8>,
}

impl ChunkReader<'_> {
    /// Reads, opens and checks one chunk; `len` is its length as the disk index implies.
    pub fn read(&mut self, digest: &Digest, len: usize) -> Result<&[u8]> {
        let vault = self.vault;
        vault
            .backend
            .read_into(Kind::Chunk, &digest.to_hex(), &mut self.buf)?;
        let context = || format!("chunk {digest}");
        let plain = self
            .opener
            .open(ObjectKind::Chunk, &mut self.buf, len as u64)
            .map_err(|e| StoreError::format(context(), e))?;
        if plain.len() != len || vault.codec.digest(plain) != *digest {
            return Err(StoreError::format(
                context(),
                FormatError::Checksum { what: "chunk" },
            ));
        }
        Ok(plain)
    }
}
