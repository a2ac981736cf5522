//! Partition tables: GPT (our own reader: see below) and MBR with extended and logical
//! partitions (the `mbrman` crate, under a read budget), or a filesystem on the whole disk.
//!
//! Why GPT is read here and not by the `gpt` crate: `gpt` 4.1 asserts that the entry size is
//! 128 (a panic on a hostile header) and allocates `entries × entry size` bytes as the header
//! says before checking anything (up to 2^64). The format is small: the primary header at
//! LBA 1, else the backup header at the disk's last LBA, each with a CRC32 over itself and
//! one over its entry array.

use std::sync::Arc;

use serde::Serialize;

use crate::disk::{Part, ReadAt};
use crate::error::{FilesError, Result};
use crate::fs::{probe, FsType};

const SECTOR: u64 = 512;
/// Bytes a partition-table parser may read: an MBR chain or a GPT array beyond this is refused.
const TABLE_READ_BUDGET: u64 = 4 << 20;
/// The largest GPT entry array read (the usual one is 16 KiB).
const MAX_GPT_ARRAY: u64 = 1 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// 1-based: the GPT entry's number, or the MBR's (primary 1-4, logical from 5).
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    pub size: u64,
    /// `gpt`, `mbr`, or `none` (a filesystem on the whole disk).
    pub table: &'static str,
    /// The GPT type GUID, or the MBR type as two hex digits.
    pub type_id: String,
    /// The GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The partitions of a disk, in table order. A disk with neither a partition table nor a
/// filesystem vmvault knows has none.
pub fn partitions(disk: &Arc<dyn ReadAt>) -> Result<Vec<Partition>> {
    let whole = Part::whole(disk.clone());
    let size = whole.len();
    let single = |ty: &str| {
        vec![Partition {
            number: 1,
            start: 0,
            size,
            table: "none",
            type_id: ty.into(),
            name: None,
        }]
    };
    match probe(&whole) {
        Some(FsType::Ext4) => return Ok(single("ext4")),
        Some(FsType::Ntfs) => return Ok(single("ntfs")),
        _ => {}
    }
    let mut mbr = [0u8; 512];
    if size < 512 || whole.read_exact_at(0, &mut mbr).is_err() || mbr[510..] != [0x55, 0xAA] {
        return Ok(Vec::new());
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    let plausible =
        entries.iter().all(|e| e[0] == 0 || e[0] == 0x80) && entries.iter().any(|e| e[4] != 0);
    if plausible && entries.iter().any(|e| e[4] == 0xEE) {
        return gpt(&whole);
    }
    if plausible {
        return mbr_partitions(&whole);
    }
    if probe(&whole) == Some(FsType::Fat) {
        return Ok(single("fat"));
    }
    Ok(Vec::new())
}

fn mbr_partitions(whole: &Part) -> Result<Vec<Partition>> {
    let mut reader = whole.clone().with_budget(TABLE_READ_BUDGET);
    let table = crate::guard::guarded("MBR partition table", || {
        mbrman::MBR::read_from(&mut reader, SECTOR as u32)
            .map_err(|e| FilesError::damaged("MBR partition table", e))
    })?;
    let mut out = Vec::new();
    for (number, p) in table.iter() {
        // Unused entries, and the extended partitions that only hold logical ones.
        if !p.is_used() || matches!(p.sys, 0x05 | 0x0F | 0x85) {
            continue;
        }
        out.push(Partition {
            number: number as u32,
            start: u64::from(p.starting_lba) * SECTOR,
            size: u64::from(p.sectors) * SECTOR,
            table: "mbr",
            type_id: format!("{:02x}", p.sys),
            name: None,
        });
    }
    Ok(out)
}

fn gpt(whole: &Part) -> Result<Vec<Partition>> {
    let last_lba = (whole.len() / SECTOR).saturating_sub(1);
    match gpt_at(whole, 1) {
        Ok(p) => Ok(p),
        Err(primary) => gpt_at(whole, last_lba).map_err(|_| primary),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the GPT whose header is at `lba`.
fn gpt_at(whole: &Part, lba: u64) -> Result<Vec<Partition>> {
    let bad = |reason: String| FilesError::damaged("GPT partition table", reason);
    let mut h = [0u8; 512];
    whole
        .read_exact_at(lba * SECTOR, &mut h)
        .map_err(|e| bad(format!("header at LBA {lba}: {e}")))?;
    if &h[0..8] != b"EFI PART" {
        return Err(bad(format!("no header at LBA {lba}")));
    }
    let header_size = le32(&h, 12) as usize;
    if !(92..=512).contains(&header_size) {
        return Err(bad(format!("header size {header_size}")));
    }
    let mut copy = h;
    copy[16..20].fill(0);
    if crc32(&copy[..header_size]) != le32(&h, 16) {
        return Err(bad(format!("header at LBA {lba}: checksum mismatch")));
    }
    let (array_lba, count, entry_size) = (le64(&h, 72), le32(&h, 80) as u64, le32(&h, 84) as u64);
    if entry_size < 128 || entry_size % 8 != 0 || count.saturating_mul(entry_size) > MAX_GPT_ARRAY {
        return Err(bad(format!("{count} entries of {entry_size} bytes")));
    }
    let mut array = vec![0u8; (count * entry_size) as usize];
    whole
        .read_exact_at(array_lba.saturating_mul(SECTOR), &mut array)
        .map_err(|e| bad(format!("entry array: {e}")))?;
    if crc32(&array) != le32(&h, 88) {
        return Err(bad("entry array: checksum mismatch".into()));
    }
    let mut out = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        if e[..16] == [0; 16] {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            return Err(bad(format!("entry {}: ends before it starts", i + 1)));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        out.push(Partition {
            number: i as u32 + 1,
            start: first.saturating_mul(SECTOR),
            size: (last - first).saturating_add(1).saturating_mul(SECTOR),
            table: "gpt",
            type_id: guid(&e[..16]),
            name: (!name.is_empty()).then_some(name),
        });
    }
    Ok(out)
}

/// A GUID as text: the first three fields are little-endian.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02X}"))
            .collect::<String>()
    )
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guid_text() {
        let b = [
            0xA2, 0xA0, 0xD0, 0xEB, 0xE5, 0xB9, 0x33, 0x44, 0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26,
            0x99, 0xC7,
        ];
        assert_eq!(guid(&b), "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
    }
}
