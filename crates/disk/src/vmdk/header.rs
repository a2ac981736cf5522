//! The hosted sparse extent header (`SparseExtentHeader`, one 512-byte sector, little-endian)
//! and the stream-optimized markers, as the Virtual Disk Format 5.0 technote lays them out.

pub(super) const SECTOR: u64 = 512;
pub(super) const MAGIC: &[u8; 4] = b"KDMV";
/// ESX Server 2.x / vmfsSparse extents ("COWD"), a different header vmvault does not read.
pub(super) const COWD_MAGIC: &[u8; 4] = b"COWD";
/// `gdOffset` value saying the grain directory is found through the footer at the file's end.
pub(super) const GD_AT_END: u64 = u64::MAX;

pub(super) const FLAG_NEWLINE_TEST: u32 = 1;
pub(super) const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub(super) const FLAG_COMPRESSED: u32 = 1 << 16;
pub(super) const FLAG_MARKERS: u32 = 1 << 17;
pub(super) const COMPRESS_NONE: u16 = 0;
pub(super) const COMPRESS_DEFLATE: u16 = 1;

pub(super) const MARKER_EOS: u32 = 0;
pub(super) const MARKER_GT: u32 = 1;
pub(super) const MARKER_GD: u32 = 2;
pub(super) const MARKER_FOOTER: u32 = 3;

/// The bytes the header carries to detect a file mangled by a text-mode transfer.
const NEWLINE_BYTES: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Sectors of virtual disk this extent holds.
    pub capacity: u64,
    /// Sectors per grain.
    pub grain_size: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean_shutdown: bool,
    /// Whether the newline-detection bytes are intact (always true for encoded headers).
    pub newline_bytes_ok: bool,
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseHeader {
    /// Parses a header sector; `None` when the magic number is not `KDMV`.
    pub fn parse(b: &[u8; 512]) -> Option<SparseHeader> {
        if &b[0..4] != MAGIC {
            return None;
        }
        Some(SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            newline_bytes_ok: b[73..77] == NEWLINE_BYTES,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        })
    }

    pub fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(&NEWLINE_BYTES);
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// A metadata marker sector of a stream-optimized extent: `val` (sectors of metadata that
/// follow, or 0), a zero size (which tells it from a grain marker) and the marker's type.
pub(super) fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&val.to_le_bytes());
    b[12..16].copy_from_slice(&kind.to_le_bytes());
    b
}

/// Parses a metadata marker: `(val, size, type)`.
pub(super) fn parse_marker(b: &[u8]) -> (u64, u32, u32) {
    (u64_at(b, 0), u32_at(b, 8), u32_at(b, 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SparseHeader {
            version: 3,
            flags: FLAG_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: 123456,
            grain_size: 128,
            descriptor_offset: 1,
            descriptor_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead: 128,
            unclean_shutdown: false,
            newline_bytes_ok: true,
            compress_algorithm: COMPRESS_DEFLATE,
        };
        assert_eq!(SparseHeader::parse(&h.encode()), Some(h));
        assert_eq!(SparseHeader::parse(&[0u8; 512]), None);
        let m = marker(4, MARKER_GT);
        assert_eq!(parse_marker(&m), (4, 0, MARKER_GT));
    }
}
