//! The VHD footer, the dynamic disk header and its parent locators: parsing (every field
//! checked before use), encoding, checksums and the CHS geometry of the specification's
//! appendix. All fields are big-endian.

use std::path::Path;

use crate::DiskError;

use super::FORMAT;

pub(crate) const SECTOR: u64 = 512;
pub(crate) const FOOTER_LEN: usize = 512;
pub(crate) const DYN_HEADER_LEN: usize = 1024;
pub(crate) const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub(crate) const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Version 1.0, the only one the specification defines, for both structures.
pub(crate) const VERSION: u32 = 0x0001_0000;
pub(crate) const TYPE_FIXED: u32 = 2;
pub(crate) const TYPE_DYNAMIC: u32 = 3;
pub(crate) const TYPE_DIFFERENCING: u32 = 4;
/// A BAT entry for a block that holds nothing in this image.
pub(crate) const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub(crate) const VHD_EPOCH: u64 = 946_684_800;

const FOOTER_CHECKSUM_AT: usize = 64;
const DYN_CHECKSUM_AT: usize = 36;
const LOCATORS_AT: usize = 576;
const LOCATOR_LEN: usize = 24;

/// Platform codes of the parent locators vmvault follows.
pub(crate) const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub(crate) const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub(crate) const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// The one's complement of the sum of all bytes but the checksum field's own four.
pub(crate) fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    !sum
}

/// The hard disk footer (specification section "Hard Disk Footer Format").
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Footer {
    pub features: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: u32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

impl Footer {
    /// Parses a footer whose first eight bytes are the "conectix" cookie.
    pub fn parse(buf: &[u8; FOOTER_LEN], path: &Path, at: u64) -> Result<Footer, DiskError> {
        if &buf[..8] != FOOTER_COOKIE {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!("no \"conectix\" footer cookie at offset {at}"),
            ));
        }
        let stored = be32(buf, FOOTER_CHECKSUM_AT);
        let computed = checksum(buf, FOOTER_CHECKSUM_AT);
        if stored != computed {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!(
                    "footer at offset {at}: checksum is {stored:#010x}, its bytes give {computed:#010x}"
                ),
            ));
        }
        let version = be32(buf, 12);
        if version >> 16 != VERSION >> 16 {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!("footer at offset {at}: unknown file format version {version:#010x}"),
            ));
        }
        let disk_type = be32(buf, 60);
        if !matches!(disk_type, TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING) {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!(
                    "footer at offset {at}: disk type {disk_type} is none of fixed (2), \
                     dynamic (3) and differencing (4)"
                ),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[28..32]);
        let mut creator_os = [0u8; 4];
        creator_os.copy_from_slice(&buf[36..40]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&buf[68..84]);
        Ok(Footer {
            features: be32(buf, 8),
            data_offset: be64(buf, 16),
            timestamp: be32(buf, 24),
            creator_app,
            creator_version: be32(buf, 32),
            creator_os,
            original_size: be64(buf, 40),
            current_size: be64(buf, 48),
            geometry: Geometry {
                cylinders: be16(buf, 56),
                heads: buf[58],
                sectors_per_track: buf[59],
            },
            disk_type,
            unique_id,
            saved_state: buf[84],
        })
    }

    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&VERSION.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os);
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors_per_track;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let sum = checksum(&b, FOOTER_CHECKSUM_AT);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// One entry of the dynamic header's parent locator table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Locator {
    pub platform: u32,
    /// Room reserved for the locator's data; the specification says in sectors, Hyper-V
    /// writes bytes, so vmvault reads only `length` bytes and never relies on it.
    pub space: u32,
    pub length: u32,
    pub offset: u64,
}

/// The dynamic disk header (specification section "Dynamic Disk Header Format").
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// UTF-16BE, NUL-padded.
    pub parent_name: [u8; 512],
    pub locators: [Locator; 8],
}

impl DynHeader {
    pub fn parse(buf: &[u8; DYN_HEADER_LEN], path: &Path, at: u64) -> Result<DynHeader, DiskError> {
        if &buf[..8] != DYN_COOKIE {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!("no \"cxsparse\" dynamic disk header at offset {at}"),
            ));
        }
        let stored = be32(buf, DYN_CHECKSUM_AT);
        let computed = checksum(buf, DYN_CHECKSUM_AT);
        if stored != computed {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!(
                    "dynamic disk header at offset {at}: checksum is {stored:#010x}, its bytes \
                     give {computed:#010x}"
                ),
            ));
        }
        let version = be32(buf, 24);
        if version >> 16 != VERSION >> 16 {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!("dynamic disk header: unknown header version {version:#010x}"),
            ));
        }
        let block_size = be32(buf, 32);
        if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR {
            return Err(DiskError::invalid(
                path,
                FORMAT,
                format!(
                    "dynamic disk header: block size {block_size} is not a power of two of at \
                     least 512"
                ),
            ));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&buf[40..56]);
        let mut parent_name = [0u8; 512];
        parent_name.copy_from_slice(&buf[64..576]);
        let mut locators = [Locator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let at = LOCATORS_AT + i * LOCATOR_LEN;
            *l = Locator {
                platform: be32(buf, at),
                space: be32(buf, at + 4),
                length: be32(buf, at + 8),
                offset: be64(buf, at + 16),
            };
        }
        Ok(DynHeader {
            table_offset: be64(buf, 16),
            max_table_entries: be32(buf, 28),
            block_size,
            parent_unique_id,
            parent_timestamp: be32(buf, 56),
            parent_name,
            locators,
        })
    }

    pub fn encode(&self) -> [u8; DYN_HEADER_LEN] {
        let mut b = [0u8; DYN_HEADER_LEN];
        b[..8].copy_from_slice(DYN_COOKIE);
        // The specification says 0xFFFFFFFF, but Microsoft's tools expect all 64 bits set.
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&VERSION.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_unique_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let at = LOCATORS_AT + i * LOCATOR_LEN;
            b[at..at + 4].copy_from_slice(&l.platform.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&l.space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&l.length.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&l.offset.to_be_bytes());
        }
        let sum = checksum(&b, DYN_CHECKSUM_AT);
        b[DYN_CHECKSUM_AT..DYN_CHECKSUM_AT + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The parent's name as the header stores it (UTF-16BE), if it decodes.
    pub fn parent_name(&self) -> Option<String> {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        if units.is_empty() {
            return None;
        }
        String::from_utf16(&units).ok()
    }
}

/// Size in bytes of a block's sector bitmap: one bit per sector, padded to a whole sector.
pub(crate) fn bitmap_size(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR;
    sectors.div_ceil(8).next_multiple_of(SECTOR)
}

/// Cylinders, heads and sectors per track, as BIOSes of the day wanted them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The specification's appendix "CHS Calculation": the geometry covers at most the disk
    /// (it rounds down), and at most 65535 x 16 x 255 sectors (about 127 GiB).
    pub fn for_size(size: u64) -> Geometry {
        let total = (size / SECTOR).min(65535 * 16 * 255);
        let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        // Bounded above: cth / heads <= 65535 and heads, spt <= 255.
        Geometry {
            cylinders: (cth / heads) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhd_geometry_follows_the_specification_appendix() {
        // Values qemu-img computes (same algorithm) for these sizes.
        let g = Geometry::for_size(10 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (301, 4, 17));
        let g = Geometry::for_size(100 << 30);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (51400, 16, 255)
        );
        let g = Geometry::for_size(1 << 40);
        assert_eq!(
            (g.cylinders, g.heads, g.sectors_per_track),
            (65535, 16, 255)
        );
        let g = Geometry::for_size(0);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (0, 4, 17));
    }

    #[test]
    fn vhd_headers_round_trip() {
        let f = Footer {
            features: 2,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"test",
            creator_version: 0x0001_0002,
            creator_os: *b"Wi2k",
            original_size: 1 << 30,
            current_size: 1 << 30,
            geometry: Geometry::for_size(1 << 30),
            disk_type: TYPE_DYNAMIC,
            unique_id: [9; 16],
            saved_state: 0,
        };
        let p = Path::new("x");
        assert_eq!(Footer::parse(&f.encode(), p, 0).unwrap(), f);
        let mut h = DynHeader {
            table_offset: 1536,
            max_table_entries: 512,
            block_size: 2 << 20,
            parent_unique_id: [3; 16],
            parent_timestamp: 5,
            parent_name: [0; 512],
            locators: [Locator::default(); 8],
        };
        h.locators[2] = Locator {
            platform: PLATFORM_W2RU,
            space: 1,
            length: 20,
            offset: 4096,
        };
        h.parent_name[1] = b'p';
        assert_eq!(DynHeader::parse(&h.encode(), p, 512).unwrap(), h);
        assert_eq!(h.parent_name().as_deref(), Some("p"));
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(1 << 31), 512 << 10);
    }
}
