//! The on-disk structures of VHDX ([MS-VHDX] sections 2.1 to 2.6): GUIDs, CRC-32C, the two
//! headers, the region table, the metadata table and items, and the parent locator.
//!
//! Parsers take bytes already read and bounded by the caller; they report what is wrong as a
//! plain sentence, which the reader wraps in a `DiskError` naming the file.

use std::fmt;
use std::fs::File;
use std::path::Path;

use crate::DiskError;

pub(super) const FORMAT: &str = "vhdx";

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;

pub(super) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub(super) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(super) const HEADER_SIZE: usize = 4096;
pub(super) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(super) const REGION_TABLE_SIZE: usize = 64 * 1024;
/// The first megabyte holds the file identifier, headers and region tables; nothing the
/// region table or the BAT points at may lie in it.
pub(super) const HEADER_SECTION: u64 = MIB;
/// The metadata table's reserved space at the start of the metadata region.
pub(super) const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// [MS-VHDX] 2.2.3 and 2.6.1 cap both tables at 2047 entries.
pub(super) const MAX_TABLE_ENTRIES: usize = 2047;
/// [MS-VHDX] 2.6.1.2: a metadata item is at most 1 MB.
pub(super) const MAX_METADATA_ITEM: u32 = MIB as u32;
/// [MS-VHDX] 2.6.2.2: the largest virtual disk the format describes.
pub(super) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub(super) const MIN_BLOCK_SIZE: u32 = MIB as u32;
pub(super) const MAX_BLOCK_SIZE: u32 = 256 * MIB as u32;
/// Sectors one sector bitmap block (1 MB of bits) describes: the "chunk".
pub(super) const SECTORS_PER_CHUNK: u64 = 1 << 23;
pub(super) const SECTOR_BITMAP_SIZE: u64 = MIB;

// BAT entry fields ([MS-VHDX] 2.5.1): state in bits 0-2, FileOffsetMB in bits 20-63.
pub(super) const BAT_STATE_MASK: u64 = 0x7;
pub(super) const BAT_OFFSET_MASK: u64 = !(MIB - 1);
pub(super) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(super) const PAYLOAD_UNDEFINED: u64 = 1;
pub(super) const PAYLOAD_ZERO: u64 = 2;
pub(super) const PAYLOAD_UNMAPPED: u64 = 3;
/// UNMAPPED's value in the 0.95 draft of the format, which Windows 8 previews wrote; QEMU
/// reads it as UNMAPPED too.
pub(super) const PAYLOAD_UNMAPPED_V095: u64 = 5;
pub(super) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(super) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub(super) const SB_NOT_PRESENT: u64 = 0;
pub(super) const SB_PRESENT: u64 = 6;

// File parameters flags ([MS-VHDX] 2.6.2.1).
pub(super) const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub(super) const HAS_PARENT: u32 = 2;

// Metadata table entry flags ([MS-VHDX] 2.6.1.2).
pub(super) const META_IS_VIRTUAL_DISK: u32 = 2;
pub(super) const META_IS_REQUIRED: u32 = 4;

/// A GUID as VHDX stores it: Data1, Data2, Data3 little-endian, then Data4's 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    const fn new(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    pub fn from_slice(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses the text form parent locators use, `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`
    /// (braces optional, any case).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5
            || parts
                .iter()
                .zip(lens)
                .any(|(p, n)| p.len() != n || !p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let tail = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Guid::new(d1, d2, d3, d4))
    }

    /// A new random (version 4) GUID. The standard library's `RandomState` is seeded from the
    /// operating system's random source, which is all a GUID needs here; mixing in the time and
    /// a counter keeps two GUIDs made in one process apart.
    pub fn random() -> Guid {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut g = [0u8; 16];
        for (half, out) in g.chunks_exact_mut(8).enumerate() {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            h.write_u64(n);
            h.write_usize(half);
            out.copy_from_slice(&h.finish().to_le_bytes());
        }
        g[7] = (g[7] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Guid(g)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

pub(super) const BAT_REGION: Guid = Guid::new(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub(super) const METADATA_REGION: Guid = Guid::new(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub(super) const FILE_PARAMETERS: Guid = Guid::new(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub(super) const VIRTUAL_DISK_SIZE: Guid = Guid::new(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub(super) const PAGE_83_DATA: Guid = Guid::new(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub(super) const LOGICAL_SECTOR_SIZE: Guid = Guid::new(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub(super) const PHYSICAL_SECTOR_SIZE: Guid = Guid::new(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub(super) const PARENT_LOCATOR: Guid = Guid::new(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// The one parent locator type [MS-VHDX] 2.6.2.6 defines: a VHDX parent.
pub(super) const PARENT_LOCATOR_VHDX: Guid = Guid::new(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as [MS-VHDX] 2.2.2 uses over the
/// headers and region tables. A table is plenty: only a few 64 KiB structures are checksummed.
pub(super) fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum of a structure whose own checksum field is at bytes 4..8, computed with that
/// field taken as zero.
pub(super) fn checksum_with_field_zeroed(buf: &[u8]) -> u32 {
    let mut copy = buf.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy)
}

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One of the two headers ([MS-VHDX] 2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub sequence: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a 4 KiB header, checking its signature, checksum and version.
    pub fn parse(buf: &[u8]) -> Result<Header, String> {
        if buf.len() < HEADER_SIZE {
            return Err("short header".into());
        }
        let buf = &buf[..HEADER_SIZE];
        if &buf[0..4] != b"head" {
            return Err("no \"head\" signature".into());
        }
        let stored = le32(buf, 4);
        let computed = checksum_with_field_zeroed(buf);
        if stored != computed {
            return Err(format!(
                "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let h = Header {
            sequence: le64(buf, 8),
            file_write_guid: Guid::from_slice(&buf[16..32]),
            data_write_guid: Guid::from_slice(&buf[32..48]),
            log_guid: Guid::from_slice(&buf[48..64]),
            log_version: le16(buf, 64),
            version: le16(buf, 66),
            log_length: le32(buf, 68),
            log_offset: le64(buf, 72),
        };
        if h.version != 1 {
            return Err(format!("version {} (only version 1 is defined)", h.version));
        }
        Ok(h)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let crc = crc32c(&b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Checks the file identifier and returns the current header: of the two valid headers, the
/// one with the greater sequence number ([MS-VHDX] 2.2.2.1).
pub(super) fn read_current_header(file: &File, path: &Path) -> Result<Header, DiskError> {
    let mut sig = [0u8; 8];
    crate::read_exact_at(file, &mut sig, 0, path, FORMAT)?;
    if &sig != FILE_SIGNATURE {
        return Err(DiskError::invalid(
            path,
            FORMAT,
            "no \"vhdxfile\" file type identifier at offset 0",
        ));
    }
    let mut buf = vec![0u8; HEADER_SIZE];
    let mut parsed = Vec::with_capacity(2);
    for at in HEADER_OFFSETS {
        crate::read_exact_at(file, &mut buf, at, path, FORMAT)?;
        parsed.push(Header::parse(&buf));
    }
    let h2 = parsed.pop().expect("two headers");
    let h1 = parsed.pop().expect("two headers");
    match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                Ok(a)
            } else if b.sequence > a.sequence {
                Ok(b)
            } else if a == b {
                // Disk2vhd writes two identical headers; nothing tells them apart, nor needs to.
                Ok(a)
            } else {
                Err(DiskError::invalid(
                    path,
                    FORMAT,
                    format!(
                        "both headers have sequence number {} but differ: the current one is \
                         ambiguous",
                        a.sequence
                    ),
                ))
            }
        }
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(e1), Err(e2)) => Err(DiskError::invalid(
            path,
            FORMAT,
            format!("no valid header: header 1 at 64 KiB: {e1}; header 2 at 128 KiB: {e2}"),
        )),
    }
}

/// One region table entry ([MS-VHDX] 2.2.3.2).
#[derive(Clone, Copy, Debug)]
pub(super) struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a 64 KiB region table, checking signature, checksum and entry count.
pub(super) fn parse_region_table(buf: &[u8]) -> Result<Vec<Region>, String> {
    if buf.len() < REGION_TABLE_SIZE {
        return Err("short region table".into());
    }
    let buf = &buf[..REGION_TABLE_SIZE];
    if &buf[0..4] != b"regi" {
        return Err("no \"regi\" signature".into());
    }
    let stored = le32(buf, 4);
    let computed = checksum_with_field_zeroed(buf);
    if stored != computed {
        return Err(format!(
            "CRC-32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let count = le32(buf, 8) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(format!(
            "{count} entries (at most {MAX_TABLE_ENTRIES} allowed)"
        ));
    }
    Ok((0..count)
        .map(|i| {
            let e = &buf[16 + 32 * i..16 + 32 * (i + 1)];
            Region {
                guid: Guid::from_slice(&e[0..16]),
                offset: le64(e, 16),
                length: le32(e, 24),
                required: le32(e, 28) & 1 != 0,
            }
        })
        .collect())
}

pub(super) fn encode_region_table(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let e = &mut b[16 + 32 * i..16 + 32 * (i + 1)];
        e[0..16].copy_from_slice(&r.guid.0);
        e[16..24].copy_from_slice(&r.offset.to_le_bytes());
        e[24..28].copy_from_slice(&r.length.to_le_bytes());
        e[28..32].copy_from_slice(&(r.required as u32).to_le_bytes());
    }
    let crc = crc32c(&b);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// One metadata table entry ([MS-VHDX] 2.6.1.2); `offset` is relative to the metadata region.
#[derive(Clone, Copy, Debug)]
pub(super) struct MetadataEntry {
    pub item: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

/// Parses the metadata table at the start of a metadata region of `region_length` bytes,
/// checking that every item lies inside the region, past the table, and is at most 1 MB.
pub(super) fn parse_metadata_table(
    buf: &[u8],
    region_length: u64,
) -> Result<Vec<MetadataEntry>, String> {
    if buf.len() < METADATA_TABLE_SIZE {
        return Err("short metadata table".into());
    }
    if &buf[0..8] != b"metadata" {
        return Err("no \"metadata\" signature in the metadata region".into());
    }
    let count = le16(buf, 10) as usize;
    if count > MAX_TABLE_ENTRIES {
        return Err(format!(
            "metadata table has {count} entries (at most {MAX_TABLE_ENTRIES} allowed)"
        ));
    }
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let e = &buf[32 + 32 * i..32 + 32 * (i + 1)];
        let entry = MetadataEntry {
            item: Guid::from_slice(&e[0..16]),
            offset: le32(e, 16),
            length: le32(e, 20),
            flags: le32(e, 24),
        };
        if entry.length > MAX_METADATA_ITEM {
            return Err(format!(
                "metadata item {} is {} bytes (at most 1 MiB allowed)",
                entry.item, entry.length
            ));
        }
        if entry.length > 0
            && ((entry.offset as usize) < METADATA_TABLE_SIZE
                || entry.offset as u64 + entry.length as u64 > region_length)
        {
            return Err(format!(
                "metadata item {} at offset {} ({} bytes) lies outside the metadata region \
                 (64 KiB to {region_length})",
                entry.item, entry.offset, entry.length
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

pub(super) fn encode_metadata_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    b[0..8].copy_from_slice(b"metadata");
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, m) in entries.iter().enumerate() {
        let e = &mut b[32 + 32 * i..32 + 32 * (i + 1)];
        e[0..16].copy_from_slice(&m.item.0);
        e[16..20].copy_from_slice(&m.offset.to_le_bytes());
        e[20..24].copy_from_slice(&m.length.to_le_bytes());
        e[24..28].copy_from_slice(&m.flags.to_le_bytes());
    }
    b
}

/// Parses a parent locator item ([MS-VHDX] 2.6.2.6) into its key/value pairs.
pub(super) fn parse_parent_locator(item: &[u8]) -> Result<(Guid, Vec<(String, String)>), String> {
    if item.len() < 20 {
        return Err(format!(
            "parent locator is {} bytes, shorter than its 20-byte header",
            item.len()
        ));
    }
    let kind = Guid::from_slice(&item[0..16]);
    let count = le16(item, 18) as usize;
    if 20 + 12 * count > item.len() {
        return Err(format!(
            "parent locator claims {count} entries, more than its {} bytes hold",
            item.len()
        ));
    }
    let text = |offset: u32, length: u16, what: &str| -> Result<String, String> {
        let start = offset as usize;
        let end = start + length as usize;
        if end > item.len() || !length.is_multiple_of(2) {
            return Err(format!(
                "parent locator {what} at {start}..{end} lies outside its {} bytes or is not \
                 UTF-16",
                item.len()
            ));
        }
        let units: Vec<u16> = item[start..end]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| format!("parent locator {what} is not UTF-16"))
    };
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let e = &item[20 + 12 * i..20 + 12 * (i + 1)];
        let key = text(le32(e, 0), le16(e, 8), "key")?;
        let value = text(le32(e, 4), le16(e, 10), "value")?;
        pairs.push((key, value));
    }
    Ok((kind, pairs))
}

/// Builds a parent locator item (only tests make differencing images: the writer does not).
#[cfg(test)]
pub(super) fn encode_parent_locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * pairs.len()];
    b[0..16].copy_from_slice(&PARENT_LOCATOR_VHDX.0);
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let mut put = |s: &str| -> (u32, u16) {
            let at = b.len() as u32;
            for u in s.encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            (at, (b.len() as u32 - at) as u16)
        };
        let (ko, kl) = put(k);
        let (vo, vl) = put(v);
        let e = &mut b[20 + 12 * i..20 + 12 * (i + 1)];
        e[0..4].copy_from_slice(&ko.to_le_bytes());
        e[4..8].copy_from_slice(&vo.to_le_bytes());
        e[8..10].copy_from_slice(&kl.to_le_bytes());
        e[10..12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        // RFC 3720, B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn guid_text_round_trip() {
        let text = "{2DC27766-F623-4200-9D64-115E9BFD4A08}";
        let g = Guid::parse(text).unwrap();
        assert_eq!(g, BAT_REGION);
        assert_eq!(g.to_string(), text.to_lowercase());
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(g));
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A0}"), None);
        assert_eq!(Guid::parse("{2DC27766+F623-4200-9D64-115E9BFD4A08}"), None);
        assert_ne!(Guid::random(), Guid::random());
    }

    #[test]
    fn parent_locator_round_trip() {
        let item = encode_parent_locator(&[("relative_path", ".\\p.vhdx"), ("k", "v")]);
        let (kind, pairs) = parse_parent_locator(&item).unwrap();
        assert_eq!(kind, PARENT_LOCATOR_VHDX);
        assert_eq!(pairs[0], ("relative_path".into(), ".\\p.vhdx".into()));
        assert_eq!(pairs[1], ("k".into(), "v".into()));
        assert!(parse_parent_locator(&item[..item.len() - 1]).is_err());
    }
}
