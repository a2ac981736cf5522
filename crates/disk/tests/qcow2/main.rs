//! qcow2 against the real `qemu-img` and `qemu-io`: images made by QEMU are read and compared
//! byte for byte with their source and with `qemu-img convert -O raw`, allocation maps are
//! compared with `qemu-img map`, images written by vmvault pass `qemu-img check` and
//! `qemu-img compare`, and damaged images are refused with a clear error.

mod damage;
mod read;
mod write;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmvault_disk::{DiskError, DiskReader, DiskWriter, Qcow2Reader, Qcow2Writer};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const G: u64 = 1024 * M;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands ("write -P 0xab 0 64k") on a qcow2 image.
fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let image = image.to_str().unwrap();
    args.push(image);
    run("qemu-io", &args);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// xorshift64*: deterministic pseudo-random data without a dependency.
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

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes a raw image of `size` bytes mixing, 64 KiB block by block, random data, text-like
/// data, written zeros, holes never written, and blocks mostly zero with a few bytes set.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; size as usize];
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let text = b"The quick brown fox jumps over the lazy dog; qcow2 clusters and tables. ";
    for (i, block) in data.chunks_mut(64 * K as usize).enumerate() {
        match (i as u64 * 7 + seed) % 6 {
            0 | 1 => rng.fill(block),
            2 => {
                for (j, b) in block.iter_mut().enumerate() {
                    *b = text[(j + i) % text.len()];
                }
            }
            3 => {}
            4 => {
                file.write_all_at(block, (i as u64) * 64 * K).unwrap();
                continue;
            }
            _ => {
                for _ in 0..5 {
                    let at = rng.below(block.len() as u64) as usize;
                    block[at] = rng.next() as u8 | 1;
                }
            }
        }
        if block.iter().any(|&b| b != 0) {
            file.write_all_at(block, (i as u64) * 64 * K).unwrap();
        }
    }
    data
}

fn read_all(r: &dyn DiskReader, piece: u64) -> Vec<u8> {
    let mut out = vec![0u8; r.size() as usize];
    for (i, chunk) in out.chunks_mut(piece as usize).enumerate() {
        r.read_at(chunk, i as u64 * piece).unwrap();
    }
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// `qemu-img convert -O raw`: QEMU's own reading of the image.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    qemu_img(&["convert", "-O", "raw", s(image), s(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    depth: u64,
}

fn field(line: &str, name: &str) -> Option<String> {
    let at = line.find(&format!("\"{name}\":"))? + name.len() + 3;
    let rest = line[at..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

/// `qemu-img map --output=json`: QEMU's allocation map of the whole chain.
fn qemu_map(image: &Path) -> Vec<MapEntry> {
    qemu_img(&["map", "--output=json", s(image)])
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| MapEntry {
            start: field(l, "start").unwrap().parse().unwrap(),
            length: field(l, "length").unwrap().parse().unwrap(),
            data: field(l, "data").unwrap() == "true",
            depth: field(l, "depth").unwrap().parse().unwrap(),
        })
        .collect()
}

/// `may_have_data` agrees with QEMU's map: false exactly where QEMU says no data, through the
/// whole chain; and `allocated_bytes` is what QEMU maps as data in the image itself.
fn check_map(image: &Path, r: &dyn DiskReader) {
    let map = qemu_map(image);
    let mut own = 0;
    for e in &map {
        assert_eq!(
            r.may_have_data(e.start, e.length).unwrap(),
            e.data,
            "{}: may_have_data({}, {}) against qemu-img map",
            image.display(),
            e.start,
            e.length
        );
        if e.data && e.depth == 0 {
            own += e.length;
        }
    }
    assert_eq!(r.allocated_bytes().unwrap(), own, "{}", image.display());
}

fn open(path: &Path) -> Box<dyn DiskReader> {
    vmvault_disk::open(path, "auto").unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn open_err(path: &Path) -> DiskError {
    match vmvault_disk::open(path, "qcow2") {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

/// Reads at odd offsets and lengths that cut clusters and subclusters.
fn check_unaligned_reads(r: &dyn DiskReader, want: &[u8], seed: u64) {
    let mut rng = Rng(seed);
    for _ in 0..64 {
        let off = rng.below(want.len() as u64);
        let len = rng.below((want.len() as u64 - off).min(300 * K)) + 1;
        let mut buf = vec![0u8; len as usize];
        r.read_at(&mut buf, off).unwrap();
        assert_same(
            &buf,
            &want[off as usize..(off + len) as usize],
            "unaligned read",
        );
    }
}

/// Restores `src` through the writer in shuffled pieces, some zero ranges written as zeros,
/// some never written; QEMU must find the image consistent and equal to the source.
fn restore_and_check(dir: &Path, name: &str, size: u64, seed: u64) {
    let src = dir.join(format!("{name}.raw"));
    let want = make_raw(&src, size, seed);
    let out = dir.join(format!("{name}.qcow2"));
    let w = vmvault_disk::create(&out, "qcow2", size, false).unwrap();
    let mut rng = Rng(seed * 31 + 7);
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < size {
        let len = ((rng.below(16) + 1) * 64 * K).min(size - at);
        pieces.push((at, len));
        at += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for (at, len) in pieces {
        let data = &want[at as usize..(at + len) as usize];
        let zero = data.iter().all(|&b| b == 0);
        match (zero, rng.below(3)) {
            (true, 0) => w.write_zeros(at, len).unwrap(),
            (true, 1) => {}
            _ => w.write_at(data, at).unwrap(),
        }
    }
    w.finish().unwrap();
    let check = qemu_img(&["check", "-f", "qcow2", s(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&out)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let info = qemu_img(&["info", s(&out)]);
    assert!(info.contains("compat: 1.1"), "{info}");
    assert!(info.contains("cluster_size: 65536"), "{info}");
    let r = open(&out);
    assert_same(&read_all(r.as_ref(), M), &want, name);
    // Zero clusters take no room: what is allocated is exactly the clusters holding data.
    let data_clusters = want
        .chunks(64 * K as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| c.len() as u64)
        .sum::<u64>();
    assert_eq!(r.allocated_bytes().unwrap(), data_clusters, "{name}");
    check_map(&out, r.as_ref());
}

// ---- damaged and refused images ----

fn patch(path: &Path, at: u64, f: impl FnOnce(&mut u8)) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    f(&mut b[0]);
    file.write_all_at(&b, at).unwrap();
}

fn put_be64(path: &Path, at: u64, v: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&v.to_be_bytes(), at).unwrap();
}

fn put_be32(path: &Path, at: u64, v: u32) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&v.to_be_bytes(), at).unwrap();
}

fn get_be64(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

fn assert_invalid(e: &DiskError, needle: &str) {
    match e {
        DiskError::Invalid { detail, .. } => {
            assert!(detail.contains(needle), "{e} does not say {needle:?}")
        }
        other => panic!("expected Invalid ({needle}), got {other:?}"),
    }
}

fn assert_unsupported(e: &DiskError, needle: &str) {
    match e {
        DiskError::Unsupported { detail, .. } => {
            assert!(detail.contains(needle), "{e} does not say {needle:?}")
        }
        other => panic!("expected Unsupported ({needle}), got {other:?}"),
    }
}

/// A 4 MiB v3 image with data in two L2 entries; returns (path, L1 offset, L2 offset).
fn sample(dir: &Path, name: &str) -> (PathBuf, u64, u64) {
    let img = dir.join(name);
    qemu_img(&["create", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, &["write -P 0x33 0 64k", "write -P 0x34 1M 64k"]);
    let l1 = get_be64(&img, 40);
    let l2 = get_be64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    (img, l1, l2)
}

fn read_everything(r: &dyn DiskReader) -> io::Result<()> {
    let mut buf = vec![0u8; M as usize];
    let mut at = 0;
    while at < r.size() {
        let n = (r.size() - at).min(M);
        r.may_have_data(at, n)?;
        r.read_at(&mut buf[..n as usize], at)?;
        at += n;
    }
    r.allocated_bytes().map(|_| ())
}
