//! qcow2 against the real `qemu-img` and `qemu-io`: images made by QEMU are read and compared
//! byte for byte with their source and with `qemu-img convert -O raw`, allocation maps are
//! compared with `qemu-img map`, images written by vmvault pass `qemu-img check` and
//! `qemu-img compare`, and damaged images are refused with a clear error.

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

#[test]
fn reads_every_subformat_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 6 MiB + 3.5 KiB: not a multiple of any cluster size.
    let size = 6 * M + 7 * 512;
    let src = dir.path().join("src.raw");
    let want = make_raw(&src, size, 11);
    let cases: &[(&str, &[&str], &str)] = &[
        ("v2", &["-o", "compat=0.10"], "v2"),
        ("v3", &["-o", "compat=1.1"], "v3"),
        ("c512", &["-o", "cluster_size=512"], "v3"),
        ("c4k", &["-o", "cluster_size=4096"], "v3"),
        ("c64k", &["-o", "cluster_size=65536"], "v3"),
        ("c2m", &["-o", "cluster_size=2M"], "v3"),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"], "v3"),
        ("zlib", &["-c"], "v3"),
        ("zlib-v2", &["-c", "-o", "compat=0.10"], "v2"),
        ("zlib-c512", &["-c", "-o", "cluster_size=512"], "v3"),
        ("zlib-c2m", &["-c", "-o", "cluster_size=2M"], "v3"),
        ("zstd", &["-c", "-o", "compression_type=zstd"], "v3"),
        (
            "zstd-extl2",
            &["-c", "-o", "compression_type=zstd,extended_l2=on"],
            "v3",
        ),
    ];
    for (name, opts, sub) in cases {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        assert_eq!(r.format(), "qcow2");
        assert_eq!(r.subformat().as_deref(), Some(*sub), "{name}");
        assert_eq!(r.size(), size);
        assert!(r.backing().is_none());
        let got = read_all(r.as_ref(), M);
        assert_same(&got, &want, name);
        assert_same(&got, &qemu_raw(&img), name);
        check_unaligned_reads(r.as_ref(), &want, 3);
        check_map(&img, r.as_ref());
        // Every 64 KiB block holding data is said to, whatever the cluster size.
        for (i, block) in want.chunks(64 * K as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                assert!(r
                    .may_have_data(i as u64 * 64 * K, block.len() as u64)
                    .unwrap());
            }
        }
    }
}

/// Several threads read one reader at once (the backup may): caches and decoders are shared.
#[test]
fn concurrent_reads_agree_with_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let want = make_raw(&src, 8 * M, 13);
    for (name, opts) in [
        ("plain", &["-o", "cluster_size=4096"][..]),
        ("zstd", &["-c", "-o", "compression_type=zstd"][..]),
        ("zlib", &["-c"][..]),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (r, want) = (&r, &want);
                scope.spawn(move || {
                    let mut rng = Rng(t * 1000 + 1);
                    for _ in 0..50 {
                        let off = rng.below(want.len() as u64);
                        let len = rng.below((want.len() as u64 - off).min(2 * M)) + 1;
                        let mut buf = vec![0u8; len as usize];
                        r.read_at(&mut buf, off).unwrap();
                        assert_same(&buf, &want[off as usize..(off + len) as usize], name);
                    }
                });
            }
        });
    }
}

#[test]
fn holes_and_zero_clusters_are_reported_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("holes.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        &img,
        &[
            "write -P 0xab 1M 192k",
            "write -P 0xcd 8M 64k",
            "write -P 0x11 16M 128k",
            // A zero cluster over allocated data, and one over nothing.
            "write -z 16M 64k",
            "write -z 32M 1M",
        ],
    );
    let r = open(&img);
    assert!(!r.may_have_data(0, M).unwrap());
    assert!(r.may_have_data(M, 64 * K).unwrap());
    assert!(r.may_have_data(0, 2 * M).unwrap());
    assert!(!r.may_have_data(M + 192 * K, 8 * M - (M + 192 * K)).unwrap());
    assert!(!r.may_have_data(16 * M, 64 * K).unwrap(), "zero cluster");
    assert!(r.may_have_data(16 * M + 64 * K, 64 * K).unwrap());
    assert!(!r.may_have_data(32 * M, 32 * M).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), 192 * K + 64 * K + 64 * K);
    let mut buf = vec![1u8; 128 * K as usize];
    r.read_at(&mut buf, 16 * M).unwrap();
    assert!(buf[..64 * K as usize].iter().all(|&b| b == 0));
    assert!(buf[64 * K as usize..].iter().all(|&b| b == 0x11));
    check_map(&img, r.as_ref());
    assert_same(&read_all(r.as_ref(), M), &qemu_raw(&img), "holes");
}

#[test]
fn a_mostly_empty_100_gib_disk_reports_its_holes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "100G"]);
    qemu_io(
        &img,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x5b 50G 64k",
            "write -P 0x5c 102399M 1M",
        ],
    );
    let r = open(&img);
    assert_eq!(r.size(), 100 * G);
    let with_data: Vec<u64> = (0..100)
        .filter(|&i| r.may_have_data(i * G, G).unwrap())
        .collect();
    assert_eq!(with_data, vec![0, 50, 99]);
    assert!(r.may_have_data(0, 100 * G).unwrap());
    assert!(!r.may_have_data(64 * K, 50 * G - 64 * K).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), 64 * K + 64 * K + M);
    let mut buf = vec![0u8; 64 * K as usize];
    r.read_at(&mut buf, 50 * G).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5b));
    r.read_at(&mut buf, 70 * G).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // The backup's pattern: ask, then read only what may hold data.
    let mut chunk = vec![0u8; M as usize];
    let mut read = 0;
    for i in 0..100 * 1024 {
        if r.may_have_data(i * M, M).unwrap() {
            r.read_at(&mut chunk, i * M).unwrap();
            read += 1;
        }
    }
    assert_eq!(read, 3);
}

/// base (raw) <- mid (qcow2, -F raw) <- top (qcow2, -F qcow2), writes in each layer.
#[test]
fn backing_chains_read_as_one_disk() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let want_base = make_raw(&base, 8 * M, 5);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    // Relative backing names: QEMU resolves them against the overlay's folder.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x21 1M 128k",
            "write -P 0x22 3M 64k",
            "write -z 5M 256k",
        ],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "12M",
    ]);
    qemu_io(&top, &["write -P 0x31 1M 64k", "write -P 0x32 7M 2M"]);

    let r = open(&top);
    assert_eq!(r.size(), 12 * M);
    assert_eq!(r.subformat().as_deref(), Some("v2"));
    let b1 = r.backing().expect("mid");
    assert_eq!(b1.format(), "qcow2");
    assert_eq!(b1.size(), 8 * M);
    let b2 = b1.backing().expect("base");
    assert_eq!(b2.format(), "raw");
    assert!(b2.backing().is_none());
    let got = read_all(r.as_ref(), M);
    let qemu = qemu_raw(&top);
    assert_same(&got, &qemu, "chain");
    // Spot checks by hand, so that the test does not only trust qemu-img.
    assert!(got[M as usize..(M + 64 * K) as usize]
        .iter()
        .all(|&b| b == 0x31));
    let mid_part = (M + 64 * K) as usize..(M + 128 * K) as usize;
    assert!(got[mid_part].iter().all(|&b| b == 0x21));
    assert!(got[5 * M as usize..(5 * M + 256 * K) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_same(&got[..M as usize], &want_base[..M as usize], "base part");
    assert!(
        got[9 * M as usize..].iter().all(|&b| b == 0),
        "past the base"
    );
    check_unaligned_reads(r.as_ref(), &qemu, 9);
    check_map(&top, r.as_ref());
    // The zero clusters in mid hide base's data.
    assert!(!r.may_have_data(5 * M, 256 * K).unwrap());
}

#[test]
fn qcow2_backing_with_extended_l2_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 4 * M, 2);
    let base = dir.path().join("base.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&base)]);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&mid),
    ]);
    // Subclusters of 4 KiB: allocated, zero and unallocated ones in one cluster.
    qemu_io(
        &mid,
        &[
            "write -P 0x41 4k 4k",
            "write -z 16k 8k",
            "write -P 0x42 200k 12k",
            "write -z 1M 128k",
        ],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&mid),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x51 2M 4k"]);
    let qemu = qemu_raw(&top);
    // Without its backing format extension (renamed to an unknown one, which readers skip),
    // the backing file's format is detected.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    file.write_all_at(&[0x12, 0x34, 0x56, 0x78], at as u64)
        .unwrap();
    let r = open(&top);
    assert_same(&read_all(r.as_ref(), M), &qemu, "ext-l2 chain");
    check_unaligned_reads(r.as_ref(), &qemu, 17);
    check_map(&top, r.as_ref());
    let m = Qcow2Reader::open(&mid, &mut Vec::new()).unwrap();
    assert_eq!(m.allocated_bytes().unwrap(), 4 * K + 12 * K);
    assert!(!m.may_have_data(16 * K, 8 * K).unwrap());
    assert!(m.may_have_data(4 * K, 4 * K).unwrap());
}

#[test]
fn internal_snapshots_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "4M"]);
    qemu_io(&img, &["write -P 0x61 0 1M"]);
    qemu_img(&["snapshot", "-c", "one", s(&img)]);
    qemu_io(&img, &["write -P 0x62 512k 1M"]);
    let r = open(&img);
    assert_same(&read_all(r.as_ref(), M), &qemu_raw(&img), "snapshot");
    check_map(&img, r.as_ref());
}

#[test]
fn dirty_images_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x71 0 1M"]);
    patch(&img, 79, |b| *b |= 1);
    let r = open(&img);
    let mut buf = vec![0u8; M as usize];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x71));
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

#[test]
fn writer_output_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    restore_and_check(dir.path(), "small", 5 * M + 7 * 512, 3);
    restore_and_check(dir.path(), "aligned", 16 * M, 4);
    restore_and_check(dir.path(), "tiny", 512, 5);
    restore_and_check(dir.path(), "empty", 0, 6);
}

#[test]
fn writer_spreads_over_several_l2_tables() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * G / 2 + 4096;
    let out = dir.path().join("wide.qcow2");
    let w = Qcow2Writer::create(&out, size, false).unwrap();
    let piece = vec![0x99u8; M as usize];
    let mut at_end = vec![0x98u8; (M + 4096) as usize];
    at_end[0] = 1;
    w.write_at(&at_end, size - (M + 4096)).unwrap();
    w.write_at(&piece, 600 * M).unwrap();
    w.write_at(&piece, 0).unwrap();
    w.write_zeros(M, 599 * M).unwrap();
    w.finish().unwrap();
    // Finishing twice changes nothing; writing after finishing is refused.
    w.finish().unwrap();
    assert!(w.write_at(&piece, 2 * M).is_err());
    let check = qemu_img(&["check", "-f", "qcow2", s(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&out);
    assert_eq!(r.size(), size);
    check_map(&out, r.as_ref());
    assert_eq!(r.allocated_bytes().unwrap(), 3 * M + 4096);
    let mut buf = vec![0u8; M as usize];
    r.read_at(&mut buf, 600 * M).unwrap();
    assert!(buf.iter().all(|&b| b == 0x99));
    r.read_at(&mut buf, 700 * M).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mut tail = vec![0u8; (M + 4096) as usize];
    r.read_at(&mut tail, size - (M + 4096)).unwrap();
    assert_same(&tail, &at_end, "tail");
}

/// Over 32768 host clusters (2 GiB of data): the refcounts need a second refcount block,
/// which must count itself.
#[test]
fn writer_needs_several_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * G;
    let out = dir.path().join("full.qcow2");
    let w = Qcow2Writer::create(&out, size, false).unwrap();
    let mut piece = vec![0u8; M as usize];
    let written = 2 * G + 64 * M;
    // Backwards, so that host clusters run opposite to guest clusters.
    for i in (0..written / M).rev() {
        piece.fill(i as u8 | 1);
        piece[..8].copy_from_slice(&i.to_be_bytes());
        w.write_at(&piece, i * M).unwrap();
    }
    w.finish().unwrap();
    let check = qemu_img(&["check", "-f", "qcow2", s(&out)]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&out);
    assert_eq!(r.allocated_bytes().unwrap(), written);
    check_map(&out, r.as_ref());
    for i in [0, 1, 1000, written / M - 1] {
        r.read_at(&mut piece, i * M).unwrap();
        assert_eq!(piece[..8], i.to_be_bytes());
        assert!(piece[8..].iter().all(|&b| b == i as u8 | 1));
    }
    assert!(!r.may_have_data(written, size - written).unwrap());
}

#[test]
fn writer_refuses_bad_pieces_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.qcow2");
    let w = Qcow2Writer::create(&out, 4 * M, false).unwrap();
    assert!(w.write_at(&[1u8; 4096], 0).is_err(), "not a 64 KiB piece");
    assert!(w.write_at(&[1u8; 65536], 4096).is_err(), "unaligned");
    assert!(w.write_at(&[1u8; 65536], 4 * M).is_err(), "past the end");
    assert!(
        w.write_zeros(4 * M - 64 * K, 128 * K).is_err(),
        "past the end"
    );
    drop(w);
    assert!(matches!(
        Qcow2Writer::create(&out, 4 * M, false),
        Err(DiskError::Exists { .. })
    ));
    assert!(Qcow2Writer::create(&out, 4 * M, true).is_ok());
    assert!(matches!(
        Qcow2Writer::create(&dir.path().join("huge"), u64::MAX / 2, false),
        Err(DiskError::Unsupported { .. })
    ));
}

/// The backup's access pattern over 256 MiB: `may_have_data` then `read_at`, 1 MiB at a time.
#[test]
fn sequential_read_of_256_mib_in_1_mib_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 256 * M;
    let want = make_raw(&src, size, 21);
    for (name, opts) in [("plain", &[][..]), ("zlib", &["-c"][..])] {
        let img = dir.path().join(format!("{name}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&src), s(&img)]);
        qemu_img(&args);
        let r = open(&img);
        let mut buf = vec![0u8; M as usize];
        for i in 0..size / M {
            let part = &want[(i * M) as usize..((i + 1) * M) as usize];
            if r.may_have_data(i * M, M).unwrap() {
                r.read_at(&mut buf, i * M).unwrap();
                assert_same(&buf, part, name);
            } else {
                assert!(
                    part.iter().all(|&b| b == 0),
                    "{name}: data at MiB {i} missed"
                );
            }
        }
        std::fs::remove_file(&img).unwrap();
    }
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

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (img, l1, l2) = sample(dir.path(), "t.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    let data_start = l2 + 64 * K;
    let cuts = [
        0,
        3,
        50,
        71,
        72,
        100,
        104,
        112,
        4096,
        64 * K,
        l1 + 4,
        l2,
        l2 + 100,
        data_start + 10,
        data_start + 64 * K,
    ];
    for cut in cuts {
        assert!(cut < bytes.len() as u64);
        let t = dir.path().join(format!("cut{cut}.qcow2"));
        std::fs::write(&t, &bytes[..cut as usize]).unwrap();
        match vmvault_disk::open(&t, "qcow2") {
            Err(e) => assert_invalid(&e, ""),
            Ok(r) => {
                let e = read_everything(r.as_ref()).expect_err("truncated data must fail");
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "cut at {cut}: {e}");
                assert!(e.to_string().contains("past the end"), "{e}");
            }
        }
    }
}

#[test]
fn tables_pointing_past_the_end_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (img, l1, l2) = sample(dir.path(), "p.qcow2");
    let len = std::fs::metadata(&img).unwrap().len();
    // L1 table itself past the end.
    put_be64(&img, 40, len.next_multiple_of(64 * K));
    assert_invalid(&open_err(&img), "past the end");
    put_be64(&img, 40, l1);
    // L1 entry naming an L2 table past the end.
    put_be64(
        &img,
        l1,
        (1 << 63) | (len.next_multiple_of(64 * K) + 64 * K),
    );
    assert_invalid(&open_err(&img), "past the end");
    // Unaligned L2 table.
    put_be64(&img, l1, (1 << 63) | (l2 + 512));
    assert_invalid(&open_err(&img), "unaligned");
    put_be64(&img, l1, (1 << 63) | l2);
    // L2 entry naming a data cluster past the end: the image opens, reading it fails.
    put_be64(
        &img,
        l2,
        (1 << 63) | (len.next_multiple_of(64 * K) + 10 * 64 * K),
    );
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let mut buf = vec![0u8; 64 * K as usize];
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(r.may_have_data(0, 64 * K).unwrap());
    // Unaligned data cluster.
    put_be64(&img, l2, (1 << 63) | 0x10200);
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("unaligned"), "{e}");
    // Compressed cluster past the end.
    put_be64(&img, l2, (1 << 62) | (len + 4096));
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // Compressed cluster of garbage.
    put_be64(&img, l2, (1 << 62) | (3 << 54) | 512);
    let r = vmvault_disk::open(&img, "qcow2").unwrap();
    let e = r.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
}

#[test]
fn absurd_sizes_and_flipped_header_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = sample(dir.path(), "h.qcow2");
    let good = std::fs::read(&img).unwrap();
    let reset = || std::fs::write(&img, &good).unwrap();

    put_be64(&img, 24, 1 << 62);
    assert_invalid(&open_err(&img), "absurd virtual size");
    reset();
    put_be64(&img, 24, u64::MAX);
    assert_invalid(&open_err(&img), "absurd virtual size");
    reset();
    put_be64(&img, 24, G);
    assert_invalid(&open_err(&img), "cannot map the virtual size");
    reset();
    put_be32(&img, 4, 4);
    assert_invalid(&open_err(&img), "unknown version 4");
    reset();
    put_be32(&img, 4, 1);
    assert_invalid(&open_err(&img), "unknown version 1");
    reset();
    put_be32(&img, 20, 22);
    assert_invalid(&open_err(&img), "cluster_bits 22");
    reset();
    put_be32(&img, 20, 8);
    assert_invalid(&open_err(&img), "cluster_bits 8");
    reset();
    patch(&img, 0, |b| *b = b'X');
    assert_invalid(&open_err(&img), "magic");
    reset();
    put_be32(&img, 100, 96);
    assert_invalid(&open_err(&img), "header_length");
    reset();
    put_be32(&img, 36, u32::MAX);
    assert_invalid(&open_err(&img), "L1 table");
    reset();
    patch(&img, 79, |b| *b |= 2);
    assert_invalid(&open_err(&img), "corrupt");
    reset();
    patch(&img, 79, |b| *b |= 1 << 5);
    assert_unsupported(&open_err(&img), "incompatible feature bit(s) 5");
    reset();
    patch(&img, 72, |b| *b |= 1 << 7);
    assert_unsupported(&open_err(&img), "bit(s) 63");
    reset();
    put_be32(&img, 32, 1);
    assert_unsupported(&open_err(&img), "encrypted");
    reset();
    patch(&img, 79, |b| *b |= 8);
    patch(&img, 104, |b| *b = 2);
    assert_unsupported(&open_err(&img), "compression type 2");
    reset();
    patch(&img, 104, |b| *b = 1);
    assert_invalid(&open_err(&img), "compression type bit");
    reset();
    patch(&img, 79, |b| *b |= 16);
    // Extended L2 entries reinterpret the tables; the result must not be taken for data.
    if let Ok(r) = vmvault_disk::open(&img, "qcow2") {
        let _ = read_everything(r.as_ref());
    }

    // Every field, top bit flipped, then all ones, in an image where each of them matters
    // (with a backing file and a snapshot): each damage is refused.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 4 << 20]).unwrap();
    let img = dir.path().join("flip.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&img),
    ]);
    qemu_io(&img, &["write -P 0x35 0 64k"]);
    qemu_img(&["snapshot", "-c", "snap", s(&img)]);
    qemu_io(&img, &["write -P 0x36 1M 64k"]);
    let good = std::fs::read(&img).unwrap();
    let reset = || std::fs::write(&img, &good).unwrap();
    for (at, width) in [
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 4),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (96, 4),
        (100, 4),
    ] {
        for all_ones in [false, true] {
            reset();
            for i in 0..width {
                patch(&img, at + i, |b| {
                    if all_ones {
                        *b = 0xff
                    } else if i == 0 {
                        *b ^= 0x80
                    }
                });
            }
            match vmvault_disk::open(&img, "qcow2") {
                Err(DiskError::Invalid { .. }) | Err(DiskError::Unsupported { .. }) => {}
                Err(e) => panic!("field at {at}: unexpected error {e:?}"),
                Ok(r) => panic!("field at {at} flipped, still opened: {:?}", r.size()),
            }
        }
    }
}

#[test]
fn encrypted_and_external_data_file_images_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "--object",
        "secret,id=sec0,data=password",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&luks),
        "1M",
    ]);
    assert_unsupported(&open_err(&luks), "LUKS");
    let ext = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data)),
        s(&ext),
        "1M",
    ]);
    let e = open_err(&ext);
    assert_unsupported(&e, "external data file");
    assert!(e.to_string().contains("ext.data"), "{e}");
}

#[test]
fn backing_loops_and_missing_backing_files_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&b), "1M"]);
    qemu_img(&["create", "-f", "qcow2", "-b", s(&b), "-F", "qcow2", s(&a)]);
    qemu_img(&["rebase", "-u", "-b", s(&a), "-F", "qcow2", s(&b)]);
    match open_err(&a) {
        DiskError::Invalid { detail, .. } => assert!(detail.contains("loops"), "{detail}"),
        e => panic!("{e:?}"),
    }
    // An image that is its own backing file.
    qemu_img(&["rebase", "-u", "-b", s(&a), "-F", "qcow2", s(&a)]);
    assert!(matches!(open_err(&a), DiskError::Invalid { .. }));

    let c = dir.path().join("c.qcow2");
    let gone = dir.path().join("gone.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&gone), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&gone),
        "-F",
        "qcow2",
        s(&c),
    ]);
    std::fs::remove_file(&gone).unwrap();
    let e = open_err(&c);
    assert_invalid(&e, "missing");
    assert!(e.to_string().contains("gone.qcow2"), "{e}");

    // A backing format vmvault does not read.
    let d = dir.path().join("d.qcow2");
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    qemu_img(&["create", "-f", "qcow2", "-b", s(&base), "-F", "raw", s(&d)]);
    let file = OpenOptions::new().read(true).write(true).open(&d).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    let at = head.windows(3).position(|w| w == b"raw").unwrap();
    file.write_all_at(b"qed", at as u64).unwrap();
    assert!(matches!(
        open_err(&d),
        DiskError::UnsupportedFormat(f) if f == "qed"
    ));
}
