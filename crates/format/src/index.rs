//! The disk index: one disk of one recovery point as the list of its chunk digests.
//!
//! Stored as the payload of an envelope of kind `Index` and named by the (keyed) digest of that
//! payload, so that a manifest pins its indexes and two identical disks share one index.
//!
//! ```text
//! offset size field
//!  0     8    disk size in bytes (u64 LE)
//!  8     4    chunk size in bytes (u32 LE)
//! 12     4    reserved, 0
//! 16     8    chunk count (u64 LE) = ceil(disk size / chunk size)
//! 24    32×n  one digest per chunk in disk order; 32 zero bytes = an all-zero chunk, not stored
//! ```
//! Chunk i covers disk bytes [i × chunk size, min((i+1) × chunk size, disk size)); the last chunk
//! may be short, and its digest is over its short length.

use crate::error::{invalid, FormatError};
use crate::Digest;

pub const INDEX_HEADER_LEN: usize = 24;
const WHAT: &str = "disk index";

/// The most chunks one disk may have: 2^24, 16 TiB at the default 1 MiB chunks. A backup holds
/// its disk's index in memory (32 bytes a chunk: 512 MiB at this limit), as does every reader
/// of a point, so a larger disk is refused where it is opened for backup and a manifest or
/// index claiming one is refused where it is decoded. Measured in docs/design.md ("Disk size
/// limit").
pub const MAX_DISK_CHUNKS: u64 = 1 << 24;

/// The largest disk a vault with chunks of `chunk_size` bytes backs up.
pub fn max_disk_size(chunk_size: u32) -> u64 {
    MAX_DISK_CHUNKS * chunk_size as u64
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    pub disk_size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<Digest>,
}

impl DiskIndex {
    pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
        disk_size.div_ceil(chunk_size as u64)
    }

    /// The byte range of disk chunk `i`.
    pub fn chunk_range(&self, i: usize) -> (u64, usize) {
        let start = i as u64 * self.chunk_size as u64;
        let len = (self.disk_size - start).min(self.chunk_size as u64) as usize;
        (start, len)
    }

    /// The payload length an index of this many chunks occupies: the bound for opening one.
    /// Never more than the largest index a disk may have ([`MAX_DISK_CHUNKS`]): the count
    /// often comes from a manifest an attacker may have forged, and a reader reserves this
    /// much before it knows the object is genuine. (No real index has more chunks, so the cap
    /// never refuses one; `decode` refuses a count past it.)
    pub fn encoded_len(chunk_count: u64) -> u64 {
        chunk_count.min(MAX_DISK_CHUNKS) * 32 + INDEX_HEADER_LEN as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::encoded_len(self.chunks.len() as u64) as usize);
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for d in &self.chunks {
            b.extend_from_slice(&d.0);
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<DiskIndex, FormatError> {
        if b.len() < INDEX_HEADER_LEN {
            return Err(FormatError::BadLength {
                what: WHAT,
                len: b.len(),
            });
        }
        let disk_size = u64::from_le_bytes(b[0..8].try_into().unwrap());
        let chunk_size = u32::from_le_bytes(b[8..12].try_into().unwrap());
        let count = u64::from_le_bytes(b[16..24].try_into().unwrap());
        if b[12..16] != [0; 4] {
            return Err(invalid(WHAT, "reserved bytes set"));
        }
        if chunk_size == 0 || !chunk_size.is_power_of_two() {
            return Err(invalid(WHAT, format!("chunk size {chunk_size}")));
        }
        if count > MAX_DISK_CHUNKS {
            return Err(invalid(
                WHAT,
                format!("{count} chunks, more than the {MAX_DISK_CHUNKS} a disk may have"),
            ));
        }
        if count != Self::chunk_count(disk_size, chunk_size) {
            return Err(invalid(
                WHAT,
                "chunk count does not match disk and chunk size",
            ));
        }
        if b.len() as u64 != Self::encoded_len(count) {
            return Err(FormatError::BadLength {
                what: WHAT,
                len: b.len(),
            });
        }
        let chunks = b[INDEX_HEADER_LEN..]
            .chunks_exact(32)
            .map(|c| Digest(c.try_into().unwrap()))
            .collect();
        Ok(DiskIndex {
            disk_size,
            chunk_size,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(disk_size in 0u64..(1 << 26), shift in 16u32..22, seed in any::<u8>()) {
            let chunk_size = 1u32 << shift;
            let n = DiskIndex::chunk_count(disk_size, chunk_size) as usize;
            let chunks = (0..n).map(|i| if i % 3 == 0 { Digest::ZERO_CHUNK } else { Digest([seed ^ i as u8; 32]) }).collect();
            let index = DiskIndex { disk_size, chunk_size, chunks };
            prop_assert_eq!(DiskIndex::decode(&index.encode()).unwrap(), index);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = DiskIndex::decode(&bytes);
        }
    }

    #[test]
    fn absurd_counts_are_refused_not_overflowed() {
        let mut b = Vec::new();
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        assert!(DiskIndex::decode(&b).is_err());
    }

    #[test]
    fn last_chunk_is_short() {
        let index = DiskIndex {
            disk_size: 2 * 65536 + 100,
            chunk_size: 65536,
            chunks: vec![Digest::ZERO_CHUNK; 3],
        };
        assert_eq!(index.chunk_range(2), (131072, 100));
        assert_eq!(index.chunk_range(0), (0, 65536));
    }
}
