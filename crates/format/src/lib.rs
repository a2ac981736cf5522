//! vmvault's byte formats, written down byte by byte in `docs/format.md`.
//!
//! Everything a vault stores passes through this crate: the vault config, the key file, and the
//! enveloped object kinds (chunk, disk index, recovery-point manifest, vault rules, deletion
//! marker, regions record). The crate does no
//! I/O and knows nothing of where bytes live; the store crate decides that.
//!
//! Rules kept by every format here:
//! - little-endian, fixed-width headers whose sizes are checked at compile time;
//! - magic numbers that never change; a version field that a reader checks before anything else;
//! - every parser takes untrusted bytes: it returns [`FormatError`], never panics, and never
//!   allocates more than the caller's stated limit.

mod codec;
mod config;
mod digest;
mod envelope;
mod error;
mod index;
mod keyfile;
mod manifest;
mod rules;
mod zero;

pub use codec::{Codec, Keys, Opener, Sealer};
pub use config::{VaultConfig, CONFIG_LEN, CONFIG_MAGIC};
pub use digest::Digest;
pub use envelope::{Compression, Encryption, Header, ObjectKind, HEADER_LEN, TRAILER_LEN};
pub use error::FormatError;
pub use index::{max_disk_size, DiskIndex, INDEX_HEADER_LEN, MAX_DISK_CHUNKS};
pub use keyfile::{KdfParams, KeyFile, KEYFILE_LEN, KEYFILE_MAGIC};
pub use manifest::{
    valid_name, Consistency, DiskRecord, Manifest, PointId, TransferStats, VmConfig, VmDisk, VmNic,
    MANIFEST_VERSION, MAX_DISKS, MAX_MANIFEST_LEN, NAME_RULE,
};
pub use rules::{
    Deletion, Keep, Locked, PointRetention, VaultRules, DEFAULT_HOLD_DAYS,
    DEFAULT_SOFT_DELETE_DAYS, DELETION_VERSION, MAX_HOLD_DAYS, MAX_RULES_LEN, MAX_SOFT_DELETE_DAYS,
    RULES_VERSION,
};
pub use zero::is_zero;

/// Smallest and largest chunk sizes a vault may be created with. Both are powers of two.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// The chunk size of a new vault unless told otherwise; chosen by measurement (docs/design.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// The regions record (a few hundred bytes of JSON) is refused unread above this.
pub const MAX_REGIONS_LEN: u64 = 64 * 1024;

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    // The OS generator failing is not a condition a backup can recover from or work around.
    getrandom::getrandom(buf).expect("the operating system's random generator failed");
}
