//! The envelope every stored object of kind chunk, disk index, manifest, vault rules, deletion
//! marker and regions record is written in.
//!
//! ```text
//! offset size field
//!  0     8    magic, one per object kind (never changes)
//!  8     1    version = 1
//!  9     1    compression: 0 none, 1 zstd
//! 10     1    encryption: 0 none, 1 AES-256-GCM
//! 11     1    reserved, 0
//! 12     4    reserved, 0
//! 16     8    plain length: payload bytes before compression (u64 LE)
//! 24    12    nonce (AES-GCM; zeros when not encrypted)
//! 36     4    reserved, 0
//! 40     n    body: the (compressed) payload, encrypted when encryption = 1
//! 40+n  16    trailer: the AES-GCM tag over the body with bytes 0..40 as associated data,
//!             or, unencrypted, the first 16 bytes of BLAKE3(bytes 0..40+n)
//! ```

use crate::error::{invalid, FormatError};

pub const HEADER_LEN: usize = 40;
pub const TRAILER_LEN: usize = 16;
const VERSION: u8 = 1;

/// The kinds of enveloped object. Each has its own magic so that one is never read as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    Chunk,
    Index,
    Manifest,
    /// The vault's rules: lock and soft-delete window.
    Rules,
    /// A soft-deleted point's marker.
    Deletion,
    /// The regions record: where the vault's primary and secondary regions are.
    Regions,
}

impl ObjectKind {
    pub const fn magic(self) -> [u8; 8] {
        match self {
            ObjectKind::Chunk => *b"VMVCHUNK",
            ObjectKind::Index => *b"VMVINDEX",
            ObjectKind::Manifest => *b"VMVPOINT",
            ObjectKind::Rules => *b"VMVRULES",
            ObjectKind::Deletion => *b"VMVDELPT",
            ObjectKind::Regions => *b"VMVREGNS",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Index => "disk index",
            ObjectKind::Manifest => "recovery point manifest",
            ObjectKind::Rules => "vault rules",
            ObjectKind::Deletion => "deletion marker",
            ObjectKind::Regions => "regions record",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None = 0,
    Aes256Gcm = 1,
}

/// The decoded fixed header of an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: ObjectKind,
    pub compression: Compression,
    pub encryption: Encryption,
    pub plain_len: u64,
    pub nonce: [u8; 12],
}

const _: () = assert!(HEADER_LEN == 8 + 1 + 1 + 1 + 1 + 4 + 8 + 12 + 4);

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&self.kind.magic());
        h[8] = VERSION;
        h[9] = self.compression as u8;
        h[10] = self.encryption as u8;
        h[16..24].copy_from_slice(&self.plain_len.to_le_bytes());
        h[24..36].copy_from_slice(&self.nonce);
        h
    }

    /// Parses the header of an object expected to be of `kind`.
    pub fn decode(kind: ObjectKind, bytes: &[u8]) -> Result<Header, FormatError> {
        let what = kind.name();
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(FormatError::BadLength {
                what,
                len: bytes.len(),
            });
        }
        if bytes[0..8] != kind.magic() {
            return Err(FormatError::BadMagic { what });
        }
        if bytes[8] != VERSION {
            return Err(FormatError::UnsupportedVersion {
                what,
                found: bytes[8].into(),
                supported: VERSION.into(),
            });
        }
        let compression = match bytes[9] {
            0 => Compression::None,
            1 => Compression::Zstd,
            c => return Err(invalid(what, format!("unknown compression {c}"))),
        };
        let encryption = match bytes[10] {
            0 => Encryption::None,
            1 => Encryption::Aes256Gcm,
            e => return Err(invalid(what, format!("unknown encryption {e}"))),
        };
        if bytes[11..16].iter().any(|&b| b != 0) || bytes[36..40].iter().any(|&b| b != 0) {
            return Err(invalid(what, "reserved header bytes are not zero"));
        }
        let plain_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        let nonce: [u8; 12] = bytes[24..36].try_into().unwrap();
        Ok(Header {
            kind,
            compression,
            encryption,
            plain_len,
            nonce,
        })
    }
}
