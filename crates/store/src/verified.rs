//! Verify-on-read: a region whose every read is judged before anyone uses the bytes.
//!
//! The judge is the vault's own decoding ([`VaultVerifier`]: envelope tag or checksum, then the
//! digest the object is named by), so a flipped bit, a truncated upload or an object put under
//! the wrong name is [`StoreError::Damaged`], naming the region, instead of bad data handed on.
//! A caller that decodes the object anyway passes its decoding as the check
//! ([`ReadBackend::read_checked`]) and it replaces the verifier's: nothing is decrypted twice.

use std::sync::Arc;
use std::time::SystemTime;

use vmvault_format::{
    Codec, Digest, DiskIndex, KeyFile, Manifest, ObjectKind, VaultConfig, MAX_MANIFEST_LEN,
};

use crate::backend::{Check, Kind, ObjectInfo, ReadBackend, WriteBackend};
use crate::Result;

/// Judges an object's stored bytes; `Err` says why they are damaged.
pub trait Verify: Send + Sync {
    fn verify(&self, kind: Kind, name: &str, bytes: &[u8]) -> std::result::Result<(), String>;
}

/// The vault's judgement of its objects, with its keys.
pub struct VaultVerifier {
    codec: Arc<Codec>,
    chunk_size: u32,
}

impl VaultVerifier {
    pub fn new(codec: Arc<Codec>, chunk_size: u32) -> VaultVerifier {
        VaultVerifier { codec, chunk_size }
    }

    fn named_by_digest(
        &self,
        kind: ObjectKind,
        name: &str,
        bytes: &[u8],
        max: u64,
    ) -> std::result::Result<(), String> {
        let want: Digest = name
            .parse()
            .map_err(|_| format!("{name:?} is not a digest"))?;
        let payload = self
            .codec
            .open(kind, bytes, max)
            .map_err(|e| e.to_string())?;
        if self.codec.digest(&payload) != want {
            return Err("its content does not hash to its name".into());
        }
        Ok(())
    }
}

impl Verify for VaultVerifier {
    fn verify(&self, kind: Kind, name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
        match kind {
            Kind::Chunk => {
                self.named_by_digest(ObjectKind::Chunk, name, bytes, self.chunk_size as u64)
            }
            // The disk's size is in the manifest, not here: bound by the index of the largest
            // disk vmvault takes (256 TiB); the manifest's size bounds it again when it is used.
            Kind::Index => {
                let max = DiskIndex::encoded_len(DiskIndex::chunk_count(1 << 48, self.chunk_size));
                self.named_by_digest(ObjectKind::Index, name, bytes, max)
            }
            Kind::Point if crate::rules::marked_point(name).is_some() => {
                let id = crate::rules::marked_point(name).expect("checked by the guard");
                let payload = self
                    .codec
                    .open(ObjectKind::Deletion, bytes, vmvault_format::MAX_RULES_LEN)
                    .map_err(|e| e.to_string())?;
                vmvault_format::Deletion::decode(&payload, &id)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Kind::Point => {
                let payload = self
                    .codec
                    .open(ObjectKind::Manifest, bytes, MAX_MANIFEST_LEN)
                    .map_err(|e| e.to_string())?;
                let m = Manifest::decode(&payload).map_err(|e| e.to_string())?;
                if m.id.to_hex() != name {
                    return Err(format!("it names itself {}", m.id));
                }
                Ok(())
            }
            Kind::Config if name == crate::vault::CONFIG_NAME => VaultConfig::decode(bytes)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Config if name == crate::rules::RULES_NAME => self
                .codec
                .open(ObjectKind::Rules, bytes, vmvault_format::MAX_RULES_LEN)
                .and_then(|p| vmvault_format::VaultRules::decode(&p))
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Config if name == crate::REGIONS_RECORD => {
                crate::regions_record::judge(bytes, Some(&self.codec)).map(|_| ())
            }
            Kind::Key => KeyFile::decode(bytes)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Config => serde_json::from_slice::<serde_json::Value>(bytes)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Lock => Ok(()),
        }
    }
}

/// A region whose reads are verified.
pub struct Verified {
    inner: Arc<dyn WriteBackend>,
    verifier: Arc<dyn Verify>,
}

impl Verified {
    pub fn new(inner: Arc<dyn WriteBackend>, verifier: Arc<dyn Verify>) -> Verified {
        Verified { inner, verifier }
    }
}

impl ReadBackend for Verified {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(kind, name, &mut buf)?;
        Ok(buf)
    }

    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        let verifier = &self.verifier;
        self.inner
            .read_checked(kind, name, buf, &mut |b: &mut Vec<u8>| {
                verifier.verify(kind, name, b)
            })
    }

    fn read_checked(
        &self,
        kind: Kind,
        name: &str,
        buf: &mut Vec<u8>,
        check: Check<'_>,
    ) -> Result<()> {
        self.inner.read_checked(kind, name, buf, check)
    }

    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        self.inner.stat(kind, name)
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }

    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
}

impl WriteBackend for Verified {
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
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        self.inner.remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        self.inner.remove_temporaries(older_than)
    }
    fn atomic_touch(&self) -> bool {
        self.inner.atomic_touch()
    }
    fn set_hold(&self, hold: Option<crate::Hold>) -> Result<crate::HoldState> {
        self.inner.set_hold(hold)
    }
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        self.inner.extend_hold(kind, name)
    }
}
