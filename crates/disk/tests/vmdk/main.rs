//! VMDK against qemu-img: images made by `qemu-img create`/`convert` and `qemu-io` are read
//! through vmvault's reader and compared byte for byte with their raw source; the writer's
//! images are checked with `qemu-img check` and `qemu-img compare`; damaged images must give
//! `Invalid`/`Unsupported` errors.

mod damage;
mod read;
mod write;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmvault_disk::{DiskError, DiskReader, DiskWriter, VmdkReader, VmdkWriter};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "streamOptimized",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    out
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Fills `buf` with one kind of content chosen by `kind`: random bytes, text, a repeated
/// byte, or data with a zero half (so grains are partly zero).
fn fill(buf: &mut [u8], kind: u64, rng: &mut Rng) {
    match kind {
        0 => buf.iter_mut().for_each(|b| *b = rng.next() as u8),
        1 => {
            let words = [
                "disk ", "grain ", "table ", "vault ", "backup ", "the ", "of ", "\n",
            ];
            let mut i = 0;
            while i < buf.len() {
                let w = words[rng.below(words.len() as u64) as usize].as_bytes();
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
        2 => buf.fill(rng.next() as u8 | 1),
        _ => {
            let half = buf.len() / 2;
            buf[..half].fill(0);
            buf[half..].iter_mut().for_each(|b| *b = rng.next() as u8);
        }
    }
}

/// Writes a raw image of `size` bytes: pieces of data of every kind at the offsets of
/// `regions` (offset, len), holes elsewhere. Returns the regions actually written.
fn make_raw(path: &Path, size: u64, regions: &[(u64, u64)], seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed | 1);
    for (n, &(off, len)) in regions.iter().enumerate() {
        let len = len.min(size - off);
        let mut buf = vec![0u8; len as usize];
        // Vary the kind every 64 KiB or so, with unaligned boundaries.
        let mut i = 0;
        while i < buf.len() {
            let step = (rng.below(96 * KIB) + 512) as usize;
            let end = (i + step).min(buf.len());
            fill(&mut buf[i..end], (n as u64 + rng.next()) % 4, &mut rng);
            i = end;
        }
        f.write_all_at(&buf, off).unwrap();
    }
}

/// Data at the start, in the middle (not grain aligned), across 32 MiB grain-table borders
/// when the image is large enough, and up to the end; holes between.
fn regions(size: u64) -> Vec<(u64, u64)> {
    let mut r = vec![(0, 300 * KIB + 512), (size / 2 + 4608, MIB + 1536)];
    if size > 40 * MIB {
        r.push((32 * MIB - 100 * KIB, 300 * KIB));
    }
    if size > 2 * GIB + 4 * MIB {
        r.push((2 * GIB - 3 * MIB, 4 * MIB));
    }
    r.push((size - 200 * KIB, 200 * KIB));
    r
}

fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

/// Compares the whole disk with a raw file, 1 MiB at a time, without holding either whole.
fn assert_same_as_raw(r: &dyn DiskReader, raw: &Path) {
    let f = File::open(raw).unwrap();
    let size = f.metadata().unwrap().len();
    assert!(r.size() >= size, "disk {} < raw {size}", r.size());
    let mut a = vec![0u8; MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < r.size() {
        let n = (r.size() - off).min(MIB) as usize;
        r.read_at(&mut a[..n], off).unwrap();
        let m = (size.saturating_sub(off) as usize).min(n);
        f.read_exact_at(&mut b[..m], off).unwrap();
        b[m..n].fill(0);
        if a[..n] != b[..n] {
            let first = (0..n).find(|&i| a[i] != b[i]).unwrap();
            panic!(
                "{}: differs from {} at byte {}",
                p(r.path()),
                p(raw),
                off + first as u64
            );
        }
        off += n as u64;
    }
}

/// Reads ranges that start and end inside grains, across grain and extent borders.
fn assert_unaligned_reads(r: &dyn DiskReader, raw: &[u8]) {
    let mut rng = Rng(99);
    let size = raw.len() as u64;
    for _ in 0..200 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(300 * KIB)) + 1;
        let mut buf = vec![0u8; len as usize];
        r.read_at(&mut buf, off).unwrap();
        assert!(
            buf == raw[off as usize..(off + len) as usize],
            "{}: read of {len} at {off} differs",
            p(r.path())
        );
    }
}

fn assert_holes(r: &dyn DiskReader, regions: &[(u64, u64)]) {
    let size = r.size();
    let has_data = |off: u64, len: u64| {
        regions
            .iter()
            .any(|&(o, l)| o < off + len && off < (o + l).min(size))
    };
    let grain = 64 * KIB;
    let mut off = 0;
    while off < size {
        let len = grain.min(size - off);
        let may = r.may_have_data(off, len).unwrap();
        // Holes are grain-sized in sparse images; a range sharing a grain with data may be
        // reported as data, so only whole grains away from data must be holes.
        let near = has_data(off.saturating_sub(grain), len + 2 * grain);
        if has_data(off, len) {
            assert!(may, "{}: data at {off} reported as a hole", p(r.path()));
        } else if !near {
            assert!(!may, "{}: hole at {off} reported as data", p(r.path()));
        }
        off += len;
    }
}

fn convert(raw: &Path, out: &Path, subformat: &str) {
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            p(raw),
            p(out),
        ],
    );
}

fn qemu_raw(image: &Path, out: &Path) {
    ok(
        "qemu-img",
        &["convert", "-f", "vmdk", "-O", "raw", p(image), p(out)],
    );
}

fn open(path: &Path) -> Box<dyn DiskReader> {
    vmvault_disk::open(path, "auto").unwrap_or_else(|e| panic!("{}: {e}", p(path)))
}

/// Splits `[0, size)` into pieces of 64 KiB multiples (the last ending at `size`).
fn pieces(size: u64, rng: &mut Rng) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let len = ((rng.below(16) + 1) * 64 * KIB).min(size - off);
        out.push((off, len));
        off += len;
    }
    out
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Writes `raw` through a `VmdkWriter` in the order `order` (pieces as (offset, len));
/// pieces of zeros are skipped, passed to `write_zeros` or written as zero data in turn.
fn write_image(raw: &Path, out: &Path, order: &[(u64, u64)]) {
    let data = read_file(raw);
    let w = vmvault_disk::create(out, "vmdk", data.len() as u64, false).unwrap();
    let mut zeros = 0;
    for &(off, len) in order {
        let piece = &data[off as usize..(off + len) as usize];
        if piece.iter().all(|&b| b == 0) {
            zeros += 1;
            match zeros % 3 {
                0 => continue, // never written
                1 => w.write_zeros(off, len).unwrap(),
                _ => w.write_at(piece, off).unwrap(),
            }
        } else {
            w.write_at(piece, off).unwrap();
        }
    }
    w.finish().unwrap();
}

/// Walks a stream-optimized file as a streaming importer does: every grain's LBA must be
/// above the previous one, the markers must chain to the end-of-stream marker at the end.
fn assert_streamable(path: &Path) -> usize {
    let f = read_file(path);
    let u64_at = |at: usize| u64::from_le_bytes(f[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(f[at..at + 4].try_into().unwrap());
    let mut pos = (u64_at(64) * 512) as usize; // overHead
    let mut last: Option<u64> = None;
    let mut grains = 0;
    let mut tables = 0;
    loop {
        let (val, size, kind) = (u64_at(pos), u32_at(pos + 8), u32_at(pos + 12));
        if size != 0 {
            assert!(
                last.is_none_or(|l| val > l),
                "grain LBA {val} after {last:?}"
            );
            last = Some(val);
            grains += 1;
            pos += (12 + size as usize).div_ceil(512) * 512;
            continue;
        }
        match kind {
            0 => {
                assert_eq!(pos + 512, f.len(), "end-of-stream marker at the end");
                break;
            }
            1 => {
                tables += 1;
                pos += 512 + val as usize * 512;
            }
            2 | 3 => pos += 512 + val as usize * 512,
            k => panic!("unknown marker {k} at {pos}"),
        }
    }
    let disk_sectors = u64_at(12);
    assert_eq!(
        tables as u64,
        disk_sectors.div_ceil(128 * 512),
        "one grain table per 32 MiB"
    );
    grains
}

fn check_with_qemu(raw: &Path, image: &Path) {
    let out = run("qemu-img", &["check", "-f", "vmdk", p(image)]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img check: {text}");
    assert!(
        text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "vmdk", p(raw), p(image)],
    );
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info = ok("qemu-img", &["info", "-f", "vmdk", p(image)]);
    assert!(info.contains("create type: streamOptimized"), "{info}");
}

// ---- damaged and unsupported images ----

fn open_err(path: &Path) -> DiskError {
    match vmvault_disk::open(path, "vmdk") {
        Ok(_) => panic!("{} opened", p(path)),
        Err(e) => e,
    }
}

fn assert_invalid(path: &Path, needle: &str) {
    match open_err(path) {
        DiskError::Invalid { detail, .. } => {
            assert!(
                detail.contains(needle),
                "{}: {detail:?} lacks {needle:?}",
                p(path)
            )
        }
        e => panic!("{}: expected Invalid ({needle}), got {e:?}", p(path)),
    }
}

fn assert_unsupported(path: &Path, needle: &str) {
    match open_err(path) {
        DiskError::Unsupported { detail, .. } => {
            assert!(
                detail.contains(needle),
                "{}: {detail:?} lacks {needle:?}",
                p(path)
            )
        }
        e => panic!("{}: expected Unsupported ({needle}), got {e:?}", p(path)),
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn copy_to(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    fs::copy(src, &dst).unwrap();
    dst
}

fn le32(image: &Path, at: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u32::from_le_bytes(b)
}

fn le64(image: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_le_bytes(b)
}

/// Sets `key` in the embedded descriptor of a monolithic sparse file (sector 1 on).
fn set_embedded(image: &Path, key: &str, value: &str) {
    let mut desc = vec![0u8; 20 * 512];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut desc, 512)
        .unwrap();
    let end = desc.iter().position(|&b| b == 0).unwrap();
    let text = String::from_utf8(desc[..end].to_vec()).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    match lines.iter().position(|l| l.starts_with(&format!("{key}="))) {
        Some(i) => lines[i] = format!("{key}={value}"),
        None => lines.insert(4, format!("{key}={value}")),
    }
    let mut new = lines.join("\n").into_bytes();
    new.push(b'\n');
    new.resize(20 * 512, 0);
    patch(image, 512, &new);
}

fn cid(image: &Path) -> String {
    let mut desc = vec![0u8; 20 * 512];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut desc, 512)
        .unwrap();
    let text = String::from_utf8_lossy(&desc).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("CID="))
        .unwrap()
        .to_string()
}
