//! Arbitrary bytes never panic the reader: images made by qemu-img (and a differencing image
//! made here) mutated byte by byte, with and without their checksums fixed up, and garbage.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::header::{
    checksum, DynHeader, Footer, Geometry, Locator, PLATFORM_W2RU, TYPE_DIFFERENCING,
};
use crate::DiskError;

/// Deterministic pseudo-random bytes (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens the image and uses it as a backup would; only panics matter here.
fn exercise(path: &Path) -> Result<(), DiskError> {
    let r = crate::open(path, "vhd")?;
    let size = r.size();
    let mut buf = vec![0u8; 65536];
    for off in [
        0,
        size / 2,
        size.saturating_sub(65536),
        size.saturating_sub(1000),
    ] {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = r.read_at(&mut buf[..n], off);
        let _ = r.may_have_data(off, 1 << 20);
    }
    let _ = r.may_have_data(0, u64::MAX);
    let _ = r.read_at(&mut buf, u64::MAX - 10);
    let _ = r.allocated_bytes();
    let _ = r.subformat();
    Ok(())
}

/// Recomputes the checksums of whatever footers and dynamic header `image` has, so that a
/// mutation gets past them to the fields behind.
fn fix_checksums(image: &mut [u8], header_at: Option<usize>) {
    let len = image.len();
    for at in [0, len.saturating_sub(512)] {
        if len >= 512 && &image[at..at + 8] == b"conectix" {
            let sum = checksum(&image[at..at + 512], 64);
            image[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
        }
    }
    if let Some(h) = header_at {
        if h + 1024 <= len {
            let sum = checksum(&image[h..h + 1024], 36);
            image[h + 36..h + 40].copy_from_slice(&sum.to_be_bytes());
        }
    }
}

/// Mutates `original` at each of `positions` (three ways, checksums fixed or not), writing
/// only the bytes that change so that the loop stays quick. Returns how many mutants opened
/// and how many were refused.
fn mutate_everywhere(
    path: &Path,
    original: &[u8],
    positions: &[usize],
    header_at: Option<usize>,
) -> (usize, usize) {
    let (mut opened, mut refused) = (0, 0);
    std::fs::write(path, original).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    // The regions a checksum fix-up rewrites, restored after each round.
    let mut touched: Vec<(usize, usize)> = vec![(0, 512.min(original.len()))];
    touched.push((original.len().saturating_sub(512), original.len()));
    if let Some(h) = header_at {
        touched.push((h, (h + 1024).min(original.len())));
    }
    let mut work = original.to_vec();
    for &p in positions {
        for x in [0x01u8, 0x80, 0xff] {
            for fix in [false, true] {
                work[p] ^= x;
                if fix {
                    fix_checksums(&mut work, header_at);
                }
                file.write_all_at(&work[p..p + 1], p as u64).unwrap();
                for &(s, e) in &touched {
                    file.write_all_at(&work[s..e], s as u64).unwrap();
                }
                match exercise(path) {
                    Ok(()) => opened += 1,
                    Err(_) => refused += 1,
                }
                work[p] ^= x;
                for &(s, e) in &touched {
                    work[s..e].copy_from_slice(&original[s..e]);
                    file.write_all_at(&work[s..e], s as u64).unwrap();
                }
                file.write_all_at(&work[p..p + 1], p as u64).unwrap();
            }
        }
    }
    (opened, refused)
}

#[test]
fn vhd_mutated_qemu_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let dynamic = dir.path().join("dynamic.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&dynamic)
        .arg("5M"));
    for (off, len) in [("0", "64k"), ("2M", "4k"), ("4608k", "512")] {
        run(Command::new("qemu-io")
            .args(["-f", "vpc", "-c", &format!("write -P 0x5a {off} {len}")])
            .arg(&dynamic));
    }
    let original = std::fs::read(&dynamic).unwrap();
    exercise(&dynamic).expect("the unmutated image opens");
    let len = original.len();
    let mut positions: Vec<usize> = (0..2048).collect();
    positions.extend(len - 512..len);
    // The first block's bitmap and data.
    positions.extend((2048..2600).step_by(7));
    let (opened, refused) = mutate_everywhere(&dynamic, &original, &positions, Some(512));
    eprintln!("dynamic: {opened} mutants opened, {refused} refused");
    assert!(
        opened > 1000 && refused > 1000,
        "the mutations reach past the checksums"
    );

    let fixed = dir.path().join("fixed.vhd");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
        ])
        .arg(&fixed)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x33 4k 8k"])
        .arg(&fixed));
    let original = std::fs::read(&fixed).unwrap();
    exercise(&fixed).expect("the unmutated image opens");
    let len = original.len();
    let mut positions: Vec<usize> = (len - 512..len).collect();
    positions.extend(0..16);
    let (opened, refused) = mutate_everywhere(&fixed, &original, &positions, None);
    eprintln!("fixed: {opened} mutants opened, {refused} refused");
    assert!(opened > 100 && refused > 100);
}

/// A differencing disk of one 4 KiB block over `parent`, laid out as: footer, header, BAT,
/// a "W2ru" locator, the block, footer.
fn differencing_image(parent_id: [u8; 16]) -> Vec<u8> {
    let size = 16384u64;
    let footer = Footer {
        features: 2,
        data_offset: 512,
        timestamp: 0,
        creator_app: *b"test",
        creator_version: 0,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: Geometry::for_size(size),
        disk_type: TYPE_DIFFERENCING,
        unique_id: [7; 16],
        saved_state: 0,
    }
    .encode();
    let name: Vec<u8> = ".\\parent.vhd"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let mut locators = [Locator::default(); 8];
    locators[0] = Locator {
        platform: PLATFORM_W2RU,
        space: 512,
        length: name.len() as u32,
        offset: 2048,
    };
    let header = DynHeader {
        table_offset: 1536,
        max_table_entries: 4,
        block_size: 4096,
        parent_unique_id: parent_id,
        parent_timestamp: 0,
        parent_name: [0; 512],
        locators,
    }
    .encode();
    let mut image = vec![0u8; 2560 + 512 + 4096];
    image[..512].copy_from_slice(&footer);
    image[512..1536].copy_from_slice(&header);
    image[1536..1552].copy_from_slice(&[0xff; 16]);
    // Block 1 at sector 5 (offset 2560): half its sectors here.
    image[1540..1544].copy_from_slice(&5u32.to_be_bytes());
    image[2048..2048 + name.len()].copy_from_slice(&name);
    image[2560] = 0b1010_0011;
    image[3072..].fill(0x42);
    image.extend_from_slice(&footer);
    image
}

#[test]
fn vhd_mutated_differencing_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ])
        .arg(&parent)
        .arg("16k"));
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x11 0 16k"])
        .arg(&parent));
    let mut id = [0u8; 16];
    id.copy_from_slice(&std::fs::read(&parent).unwrap()[68..84]);
    let child = dir.path().join("child.vhd");
    let original = differencing_image(id);
    std::fs::write(&child, &original).unwrap();
    let r = crate::open(&child, "vhd").expect("the unmutated image opens");
    assert_eq!(r.subformat().as_deref(), Some("differencing"));
    let mut buf = vec![0u8; 16384];
    r.read_at(&mut buf, 0).unwrap();
    let mut want = vec![0x11u8; 16384];
    for (sector, bit) in [
        (0, true),
        (1, false),
        (2, true),
        (3, false),
        (6, true),
        (7, true),
    ] {
        if bit {
            want[4096 + sector * 512..4096 + (sector + 1) * 512].fill(0x42);
        }
    }
    assert_eq!(buf, want);
    drop(r);
    let positions: Vec<usize> = (0..original.len()).collect();
    let (opened, refused) = mutate_everywhere(&child, &original, &positions, Some(512));
    eprintln!("differencing: {opened} mutants opened, {refused} refused");
    assert!(opened > 1000 && refused > 1000);
}

#[test]
fn vhd_garbage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.vhd");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for len in [
        0usize,
        1,
        8,
        511,
        512,
        513,
        1024,
        1536,
        2048,
        3000,
        4096,
        65536 + 512,
    ] {
        for variant in 0..24 {
            let mut image = vec![0u8; len];
            rng.fill(&mut image);
            if len >= 512 {
                match variant % 4 {
                    // A footer copy at 0 whose fields are random, checksum right.
                    1 => image[..8].copy_from_slice(b"conectix"),
                    // Plausible fields: version 1, dynamic or differencing, header at 512.
                    2 | 3 => {
                        image[..8].copy_from_slice(b"conectix");
                        image[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
                        image[16..24].copy_from_slice(&512u64.to_be_bytes());
                        image[48..56].copy_from_slice(&(rng.next() % (64 << 20)).to_be_bytes());
                        image[60..64].copy_from_slice(&(2 + variant as u32 % 3).to_be_bytes());
                        if len >= 1536 {
                            image[512..520].copy_from_slice(b"cxsparse");
                            image[536..540].copy_from_slice(&0x0001_0000u32.to_be_bytes());
                            let shift = 9 + rng.next() % 16;
                            image[544..548].copy_from_slice(&(1u32 << shift).to_be_bytes());
                            image[528..536].copy_from_slice(&(rng.next() % 4096).to_be_bytes());
                        }
                    }
                    _ => {}
                }
                if variant % 8 >= 4 && len >= 1024 {
                    // The same footer at the end too (for fixed disks, the one that counts).
                    let head = image[..512].to_vec();
                    image[len - 512..].copy_from_slice(&head);
                }
                fix_checksums(&mut image, (len >= 1536).then_some(512));
            }
            std::fs::write(&path, &image).unwrap();
            let _ = exercise(&path);
        }
    }
}
