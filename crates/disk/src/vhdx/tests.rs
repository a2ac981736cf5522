//! Arbitrary bytes never panic the reader: valid images (from qemu-img and from our writer)
//! mutated at every byte of their structures, truncated, and replaced by garbage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::format::*;
use super::{VhdxReader, VhdxWriter};
use crate::{DiskError, DiskReader, DiskWriter};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .expect("qemu-img and qemu-io must be installed");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens the image and, if it opens, exercises every reading method: none may panic.
fn exercise(path: &Path) -> Result<(), DiskError> {
    let r = VhdxReader::open(path, &mut crate::Chain::default())?;
    let size = r.size();
    let mut buf = vec![0u8; 65536];
    for off in [0, size / 3, size / 2, size.saturating_sub(65536)] {
        let n = (size - off).min(65536) as usize;
        let _ = r.read_at(&mut buf[..n], off);
        let _ = r.may_have_data(off, 65536);
    }
    let _ = r.read_at(&mut buf, size);
    let _ = r.may_have_data(0, u64::MAX);
    let _ = r.allocated_bytes();
    let _ = r.subformat();
    Ok(())
}

/// Byte ranges worth mutating: the structures the reader parses.
fn structure_ranges(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap();
    let mut rt = vec![0u8; REGION_TABLE_SIZE];
    f.read_exact_at(&mut rt, REGION_TABLE_OFFSETS[0]).unwrap();
    let regions = parse_region_table(&rt).unwrap();
    let mut ranges = vec![
        (0, 16),
        (HEADER_OFFSETS[0], 80),
        (HEADER_OFFSETS[1], 80),
        (REGION_TABLE_OFFSETS[0], 16 + 32 * regions.len() as u64),
    ];
    for r in &regions {
        if r.guid == METADATA_REGION {
            ranges.push((r.offset, 32 + 32 * 5));
            ranges.push((r.offset + METADATA_TABLE_SIZE as u64, 40));
        } else {
            ranges.push((r.offset, 48));
        }
    }
    ranges
}

/// Rewrites the checksum of the header or region table holding `at`, so that a mutation gets
/// past the CRC check and reaches the parsers behind it.
fn fix_checksum(f: &File, at: u64) {
    let (start, len) = if HEADER_OFFSETS.iter().any(|&h| (h..h + 4096).contains(&at)) {
        (at - at % 65536, HEADER_SIZE)
    } else if (REGION_TABLE_OFFSETS[0]..REGION_TABLE_OFFSETS[0] + 65536).contains(&at) {
        (REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE)
    } else {
        return;
    };
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, start).unwrap();
    let crc = checksum_with_field_zeroed(&buf);
    f.write_all_at(&crc.to_le_bytes(), start + 4).unwrap();
}

fn mutate_everywhere(path: &Path) {
    exercise(path).expect("the unmutated image opens");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut opened = 0;
    let mut refused = 0;
    for (start, len) in structure_ranges(path) {
        let mut original = vec![0u8; len as usize];
        f.read_exact_at(&mut original, start).unwrap();
        let mut header_copy = vec![0u8; REGION_TABLE_SIZE];
        for i in 0..len {
            let at = start + i;
            for (k, value) in [0x01u8, 0x80, 0xff, 0x00, 0x7f].into_iter().enumerate() {
                let byte = if k < 3 {
                    original[i as usize] ^ value
                } else {
                    value
                };
                // Keep the unmutated checksummed structure to restore it afterwards.
                let (cs, cl) = if at < 65536 * 4 {
                    (at - at % 65536, REGION_TABLE_SIZE)
                } else {
                    (at, 1)
                };
                f.read_exact_at(&mut header_copy[..cl], cs).unwrap();
                f.write_all_at(&[byte], at).unwrap();
                fix_checksum(&f, at);
                match exercise(path) {
                    Ok(()) => opened += 1,
                    Err(DiskError::Invalid { .. }) | Err(DiskError::Unsupported { .. }) => {
                        refused += 1
                    }
                    Err(e) => panic!("mutation at {at} gave an unexpected error kind: {e}"),
                }
                f.write_all_at(&header_copy[..cl], cs).unwrap();
            }
        }
    }
    exercise(path).expect("the image opens again once restored");
    assert!(
        opened > 0 && refused > 0,
        "opened {opened}, refused {refused}"
    );
}

#[test]
fn mutated_qemu_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&path)
        .arg("6M"));
    run(Command::new("qemu-io")
        .args(["-f", "vhdx", "-c", "write -P 0x5a 1M 64k"])
        .arg(&path));
    mutate_everywhere(&path);

    let fixed = dir.path().join("f.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o"])
        .arg("subformat=fixed,block_size=1M,block_state_zero=off")
        .arg(&fixed)
        .arg("3M"));
    mutate_everywhere(&fixed);
}

#[test]
fn mutated_writer_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.vhdx");
    let w = VhdxWriter::create(&path, (5 << 20) + 512, false).unwrap();
    w.write_at(&[0x11; 65536], 2 << 20).unwrap();
    w.write_at(&[0x22; 512], 5 << 20).unwrap();
    w.finish().unwrap();
    let r = VhdxReader::open(&path, &mut crate::Chain::default()).unwrap();
    assert_eq!(r.size(), (5 << 20) + 512);
    assert_eq!(r.allocated_bytes().unwrap(), (1 << 20) + 512);
    mutate_everywhere(&path);
}

#[test]
fn truncated_and_garbage_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.vhdx");
    let w = VhdxWriter::create(&path, 3 << 20, false).unwrap();
    w.write_at(&[0x33; 1 << 20], 1 << 20).unwrap();
    w.finish().unwrap();
    let whole = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.vhdx");
    let mut at = 0usize;
    while at < whole.len() {
        std::fs::write(&cut, &whole[..at]).unwrap();
        match exercise(&cut) {
            Err(DiskError::Invalid { detail, .. }) => {
                assert!(!detail.is_empty())
            }
            other => panic!("cut at {at}: {other:?}"),
        }
        at = at * 2 + 4093;
    }

    // Deterministic pseudo-random garbage, bare and behind a valid signature.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let garbage = dir.path().join("g.vhdx");
    for len in [
        0usize,
        1,
        7,
        8,
        9,
        512,
        4096,
        65536,
        300_000,
        1 << 20,
        3 << 20,
    ] {
        for signed in [false, true] {
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if signed && len >= 8 {
                data[..8].copy_from_slice(FILE_SIGNATURE);
            }
            std::fs::write(&garbage, &data).unwrap();
            assert!(exercise(&garbage).is_err(), "garbage of {len} bytes opened");
        }
    }
}
