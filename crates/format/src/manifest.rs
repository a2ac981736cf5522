//! The recovery-point manifest: the one object whose presence makes a recovery point exist.
//!
//! Its payload is a JSON document (schema in docs/format.md, "Manifest payload"), sealed in an envelope
//! of kind `Manifest`. It is JSON rather than fixed-width because it is small (a few hundred
//! bytes), read rarely, and gains fields as sources and consistency levels are added; the bulk
//! data (chunks) and the large tables (disk indexes) are fixed-width binary.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, FormatError};
use crate::index::MAX_DISK_CHUNKS;
use crate::rules::PointRetention;
use crate::{Digest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// The version this build writes. Version 1 (no `retention`) is still read.
pub const MANIFEST_VERSION: u32 = 2;
/// A manifest larger than this is refused unread.
pub const MAX_MANIFEST_LEN: u64 = 16 * 1024 * 1024;
/// Disks one recovery point may hold: far more than any hypervisor attaches to one VM, and
/// few enough that a forged manifest cannot make a restore or `verify` walk without end.
pub const MAX_DISKS: usize = 1024;

/// What a VM or disk name may be, said where one is refused.
pub const NAME_RULE: &str =
    "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit";

/// Whether `name` may name a VM or a disk. Names become file names at a restore's target
/// (`NAME.raw`, `VM.toml`) and appear in listings, so nothing that could leave a folder
/// (`/`, `..`, `.`), hide (a leading `.`) or read as an option (a leading `-`) passes. One rule
/// for the VM description and for manifests read back from a vault.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A recovery point's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(pub [u8; 16]);

impl PointId {
    pub fn generate() -> PointId {
        let mut b = [0u8; 16];
        crate::random_bytes(&mut b);
        PointId(b)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as listings show it.
    pub fn short(&self) -> String {
        self.to_hex()[..8].to_string()
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PointId({})", self.to_hex())
    }
}

impl FromStr for PointId {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b)
            .map_err(|_| invalid("recovery point id", format!("{s:?} is not 32 hex digits")))?;
        Ok(PointId(b))
    }
}

impl Serialize for PointId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PointId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How consistent a recovery point's disks are with each other and with the guest's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Application,
    Filesystem,
    Crash,
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Consistency::Application => "application",
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
        })
    }
}

/// The VM's configuration as it was backed up (the VM description, with disks by name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: String,
    pub disks: Vec<VmDisk>,
    #[serde(default)]
    pub nics: Vec<VmNic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub name: String,
    /// The path the disk was read from, as the description gave it.
    pub path: String,
    pub format: String,
    pub bus: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// What one backup moved: bytes read from the source, bytes of chunks the vault lacked, and
/// bytes those chunks take in the vault after compression and encryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStats {
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub chunks_zero: u64,
}

impl TransferStats {
    pub fn add(&mut self, o: &TransferStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_new += o.bytes_new;
        self.bytes_stored += o.bytes_stored;
        self.chunks_new += o.chunks_new;
        self.chunks_reused += o.chunks_reused;
        self.chunks_zero += o.chunks_zero;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub name: String,
    /// The format of the source disk; a restore writes this format unless told otherwise.
    pub format: String,
    pub size: u64,
    /// The digest naming this disk's index object.
    pub index: Digest,
    pub stats: TransferStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub id: PointId,
    pub vm: String,
    /// RFC 3339, UTC, nanoseconds: when the point-in-time was taken.
    pub time: String,
    pub source: String,
    pub consistency: Consistency,
    /// Why the consistency is what it is (always said when it is below `application`).
    pub consistency_reason: String,
    pub host: String,
    pub program: String,
    pub chunk_size: u32,
    pub vm_config: VmConfig,
    pub disks: Vec<DiskRecord>,
    pub stats: TransferStats,
    /// The retention the point was taken under (version 2; a version 1 manifest has none).
    #[serde(default)]
    pub retention: PointRetention,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialises")
    }

    /// Decodes and checks a manifest read from a vault. Everything a backup never writes is
    /// refused here, once, so that no reader has to distrust it: a name that is not a
    /// [`valid_name`] (a forged `../../x` would put a restore's files outside its target), a
    /// disk named twice, more than [`MAX_DISKS`] disks, a chunk size a vault cannot have, and a
    /// disk larger than [`MAX_DISK_CHUNKS`] chunks (its index would be too large to load).
    pub fn decode(b: &[u8]) -> Result<Manifest, FormatError> {
        let m: Manifest = serde_json::from_slice(b).map_err(|e| invalid(WHAT, e.to_string()))?;
        if m.version == 1 && m.retention != PointRetention::None {
            return Err(invalid(WHAT, "a version 1 manifest has no retention"));
        }
        if !(1..=MANIFEST_VERSION).contains(&m.version) {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                found: m.version,
                supported: MANIFEST_VERSION,
            });
        }
        m.check()?;
        Ok(m)
    }

    /// The rules [`Manifest::decode`] enforces; a writer may check a manifest with them
    /// before storing it.
    pub fn check(&self) -> Result<(), FormatError> {
        crate::rules::check_retention(&self.retention).map_err(|e| invalid(WHAT, e))?;
        for (what, name) in [("VM name", &self.vm), ("VM name", &self.vm_config.name)] {
            if !valid_name(name) {
                return Err(invalid(WHAT, format!("{what} {name:?} is not {NAME_RULE}")));
            }
        }
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return Err(invalid(WHAT, format!("chunk size {c} is not a vault's")));
        }
        if self.disks.len() > MAX_DISKS || self.vm_config.disks.len() > MAX_DISKS {
            return Err(invalid(
                WHAT,
                format!("more than {MAX_DISKS} disks in one recovery point"),
            ));
        }
        let names = self
            .disks
            .iter()
            .map(|d| &d.name)
            .chain(self.vm_config.disks.iter().map(|d| &d.name));
        for name in names {
            if !valid_name(name) {
                return Err(invalid(
                    WHAT,
                    format!("disk name {name:?} is not {NAME_RULE}"),
                ));
            }
        }
        let limit = crate::index::max_disk_size(c);
        for (i, d) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|e| e.name == d.name) {
                return Err(invalid(WHAT, format!("disk {:?} is listed twice", d.name)));
            }
            if d.size > limit {
                return Err(invalid(
                    WHAT,
                    format!(
                        "disk {:?} of {} bytes is larger than the {limit} bytes ({MAX_DISK_CHUNKS} \
                         chunks of {c}) a disk may have",
                        d.name, d.size
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn logical_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
}

const WHAT: &str = "recovery point manifest";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let m = Manifest {
            version: 1,
            id: PointId::generate(),
            vm: "web01".into(),
            time: "2026-11-25T10:00:00.123456789Z".into(),
            source: "image".into(),
            consistency: Consistency::Crash,
            consistency_reason: "offline VM".into(),
            host: "h".into(),
            program: "vmvault 0.1.0".into(),
            chunk_size: 1 << 20,
            vm_config: VmConfig {
                name: "web01".into(),
                cpus: 2,
                memory_mib: 2048,
                firmware: "bios".into(),
                disks: vec![VmDisk {
                    name: "os".into(),
                    path: "os.raw".into(),
                    format: "raw".into(),
                    bus: "virtio".into(),
                }],
                nics: vec![],
            },
            disks: vec![DiskRecord {
                name: "os".into(),
                format: "raw".into(),
                size: 10,
                index: Digest([3; 32]),
                stats: TransferStats::default(),
            }],
            stats: TransferStats::default(),
            retention: Default::default(),
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Manifest::decode(&bytes);
        }
    }
}
