//! Untrusted bytes never panic, hang or over-allocate: images made by qemu-img, damaged byte
//! by byte, and random garbage are opened and read (a deterministic stand-in for the fuzzer).

use std::path::Path;
use std::process::Command;

use super::Qcow2Reader;
use crate::{DiskError, DiskReader};

fn qemu(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Opens and exercises an image the way a backup and the fuzz target do; errors are fine.
fn exercise(path: &Path) {
    let r = match Qcow2Reader::open(path, &mut crate::Chain::default()) {
        Ok(r) => r,
        Err(DiskError::Invalid { .. } | DiskError::Unsupported { .. }) => return,
        Err(
            DiskError::Io { .. } | DiskError::UnsupportedFormat(_) | DiskError::NotADisk { .. },
        ) => return,
        Err(e) => panic!("unexpected error {e:?}"),
    };
    let size = r.size();
    let mut buf = vec![0u8; 1 << 20];
    // Whole small disks, and a few pieces of large ones.
    let offsets: Vec<u64> = if size <= 4 << 20 {
        (0..size.div_ceil(1 << 20)).map(|i| i << 20).collect()
    } else {
        vec![0, (size / 2) & !0xffff, size - (1 << 20)]
    };
    for off in offsets {
        let n = (size - off).min(1 << 20) as usize;
        let _ = r.may_have_data(off, n as u64);
        let _ = r.read_at(&mut buf[..n], off);
        // A part of a cluster, at an odd offset.
        if n > 1000 {
            let _ = r.read_at(&mut buf[..777], off + 123);
        }
    }
    let _ = r.may_have_data(0, size);
    let _ = r.allocated_bytes();
}

/// A 1 MiB v3 image holding data, a zero cluster, and the extension area QEMU writes.
fn images(dir: &Path) -> Vec<std::path::PathBuf> {
    let plain = dir.join("plain.qcow2");
    qemu(
        "qemu-img",
        &["create", "-f", "qcow2", plain.to_str().unwrap(), "1M"],
    );
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "write -P 0x5b 512k 128k",
            "-c",
            "write -z 960k 64k",
            plain.to_str().unwrap(),
        ],
    );
    let raw = dir.join("src.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate().take(300_000) {
        *b = (i % 251) as u8 ^ (i / 4096) as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    let mut out = vec![plain];
    for (name, opts) in [
        ("zlib.qcow2", &["-c"][..]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"][..]),
        ("extl2.qcow2", &["-o", "extended_l2=on"][..]),
        ("v2.qcow2", &["-o", "compat=0.10,cluster_size=4096"][..]),
    ] {
        let p = dir.join(name);
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[raw.to_str().unwrap(), p.to_str().unwrap()]);
        qemu("qemu-img", &args);
        out.push(p);
    }
    out
}

fn be64(b: &[u8], at: usize) -> usize {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap()) as usize
}

#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mutated.qcow2");
    for image in images(dir.path()) {
        let good = std::fs::read(&image).unwrap();
        // The header and its extensions, the L1 table, the first L2 table and the start of
        // the first data cluster (compressed data, for the compressed images).
        let l1 = be64(&good, 40);
        let l2 = be64(&good, l1) & 0x00ff_ffff_ffff_fe00;
        let cluster_bits = u32::from_be_bytes(good[20..24].try_into().unwrap());
        let entry = be64(&good, l2);
        let first = if entry & (1 << 62) != 0 {
            entry & ((1 << (62 - (cluster_bits - 8))) - 1)
        } else {
            entry & 0x00ff_ffff_ffff_fe00
        };
        let mut positions: Vec<usize> = (0..320).collect();
        positions.extend(l1..l1 + 16);
        positions.extend(l2..l2 + 256);
        if first > 0 && first + 64 < good.len() {
            positions.extend(first..first + 64);
        }
        for &at in &positions {
            if at >= good.len() {
                continue;
            }
            for change in [0x01u8, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[at] ^= change;
                std::fs::write(&target, &bytes).unwrap();
                exercise(&target);
            }
            let mut bytes = good.clone();
            bytes[at] = 0;
            std::fs::write(&target, &bytes).unwrap();
            exercise(&target);
        }
        // Truncated at every 512 bytes of the metadata area.
        for cut in (0..good.len().min(l2 + 65536)).step_by(512) {
            std::fs::write(&target, &good[..cut]).unwrap();
            exercise(&target);
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("garbage.qcow2");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for len in [
        0usize, 1, 4, 7, 72, 103, 104, 111, 512, 4096, 65536, 200_000,
    ] {
        for round in 0..40 {
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Most rounds get past the magic and version, and some a sane cluster size, so
            // that the parsers behind them see the garbage too.
            if round % 4 != 0 && len >= 8 {
                bytes[..4].copy_from_slice(b"QFI\xfb");
                bytes[4..8].copy_from_slice(&(2 + (round as u32 % 2)).to_be_bytes());
            }
            if round % 2 == 1 && len >= 24 {
                bytes[20..24].copy_from_slice(&(9 + (rng.next() as u32 % 13)).to_be_bytes());
            }
            if round % 3 == 1 && len >= 104 {
                // A small virtual size and an L1 table inside the file.
                bytes[24..32].copy_from_slice(&(rng.next() % (64 << 20)).to_be_bytes());
                bytes[36..40].copy_from_slice(&(1 + rng.next() as u32 % 64).to_be_bytes());
                bytes[40..48].copy_from_slice(&(512u64 * (rng.next() % 8)).to_be_bytes());
                bytes[72..80].copy_from_slice(&(rng.next() & 0x1d).to_be_bytes());
                bytes[100..104].copy_from_slice(&104u32.to_be_bytes());
            }
            std::fs::write(&target, &bytes).unwrap();
            exercise(&target);
        }
    }
}
