//! VMDK against qemu-img: images made by `qemu-img create`/`convert` and `qemu-io` are read
//! through vmvault's reader and compared byte for byte with their raw source; the writer's
//! images are checked with `qemu-img check` and `qemu-img compare`; damaged images must give
//! `Invalid`/`Unsupported` errors.

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

#[test]
fn reads_every_subformat_qemu_img_converts_to() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of the grain (64 KiB), a multiple of the sector, as VMDK counts sectors.
    let size = 45 * MIB + 7 * 512;
    let raw = dir.path().join("src.raw");
    let regs = regions(size);
    make_raw(&raw, size, &regs, 7);
    let data = read_file(&raw);
    for sub in SUBFORMATS {
        let image = dir.path().join(format!("{sub}.vmdk"));
        convert(&raw, &image, sub);
        let r = open(&image);
        assert_eq!(r.format(), "vmdk");
        assert_eq!(r.subformat().as_deref(), Some(sub));
        assert_eq!(r.size(), size);
        assert!(r.backing().is_none());
        assert_same_as_raw(&*r, &raw);
        let back = dir.path().join(format!("{sub}.raw"));
        qemu_raw(&image, &back);
        assert_same_as_raw(&*r, &back);
        assert_unaligned_reads(&*r, &data);
        assert_holes(&*r, &regs);
        let data_bytes: u64 = regs.iter().map(|r| r.1).sum();
        let allocated = r.allocated_bytes().unwrap();
        assert!(
            allocated >= data_bytes / 2 && allocated < size / 2,
            "{sub}: {allocated} bytes allocated for {data_bytes} of data"
        );
        assert!(
            r.read_at(&mut [0u8; 2], size - 1).is_err(),
            "read past the end"
        );
    }
}

#[test]
fn reads_two_gb_extents_across_their_borders() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * GIB + 5 * MIB + 512;
    let raw = dir.path().join("src.raw");
    let regs = regions(size);
    make_raw(&raw, size, &regs, 11);
    for sub in [
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicSparse",
    ] {
        let image = dir.path().join(format!("{sub}.vmdk"));
        convert(&raw, &image, sub);
        if sub.starts_with("twoGb") {
            let text = fs::read_to_string(&image).unwrap();
            let extents = text.lines().filter(|l| l.starts_with("RW ")).count();
            assert_eq!(extents, 2, "{text}");
        }
        let r = open(&image);
        assert_eq!(r.size(), size);
        assert_same_as_raw(&*r, &raw);
        // A read across the border of the two extents.
        let mut buf = vec![0u8; 3 * MIB as usize];
        r.read_at(&mut buf, 2 * GIB - MIB - 512).unwrap();
        let mut want = vec![0u8; buf.len()];
        File::open(&raw)
            .unwrap()
            .read_exact_at(&mut want, 2 * GIB - MIB - 512)
            .unwrap();
        assert!(buf == want);
        assert!(r.may_have_data(2 * GIB - MIB, 2 * MIB).unwrap());
        assert!(!r.may_have_data(GIB + 16 * MIB, 64 * MIB).unwrap());
        fs::remove_file(&image).unwrap();
        for e in fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap().path();
            if e.to_string_lossy().contains(sub) {
                fs::remove_file(e).unwrap();
            }
        }
    }
}

#[test]
fn reads_what_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB + 3 * 512;
    let writes: [(u64, u64, u8); 5] = [
        (0, 4096, 0xab),
        (1000 * 512, 3000, 0x11),
        (65536 * 3 + 512, 200 * KIB, 0x22),
        (33 * MIB - 7 * 512, 2 * MIB, 0x33),
        (size - 1536, 1536, 0x44),
    ];
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        let image = dir.path().join(format!("{sub}.vmdk"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&image),
                &size.to_string(),
            ],
        );
        let mut want = vec![0u8; size as usize];
        for &(off, len, byte) in &writes {
            ok(
                "qemu-io",
                &[
                    "-f",
                    "vmdk",
                    "-c",
                    &format!("write -P 0x{byte:02x} {off} {len}"),
                    p(&image),
                ],
            );
            want[off as usize..(off + len) as usize].fill(byte);
        }
        let r = open(&image);
        assert_eq!(r.size(), size);
        let mut got = vec![0u8; size as usize];
        r.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{sub}: differs from what qemu-io wrote");
        assert_unaligned_reads(&*r, &want);
        assert!(r.may_have_data(33 * MIB, MIB).unwrap());
        if sub.ends_with("Sparse") {
            assert!(!r.may_have_data(10 * MIB, 10 * MIB).unwrap());
        }
    }
    // Stream-optimized images take whole grains only.
    let image = dir.path().join("stream.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            p(&image),
            &size.to_string(),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x5a 131072 196608", p(&image)],
    );
    let r = open(&image);
    let mut got = vec![0u8; 512 * KIB as usize];
    r.read_at(&mut got, 0).unwrap();
    assert!(got[..131072].iter().all(|&b| b == 0));
    assert!(got[131072..327680].iter().all(|&b| b == 0x5a));
    assert!(got[327680..].iter().all(|&b| b == 0));
    assert!(!r.may_have_data(0, 131072).unwrap());
    assert!(r.may_have_data(131072, 65536).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), 196608);
}

#[test]
fn zeroed_grains_read_as_zeros_and_hide_the_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", p(&base), "16M"]);
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0xb0 0 8M", p(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            p(&child),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "vmdk",
            "-c",
            "write -P 0xc1 1M 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 0xc2 12M 65536",
            p(&child),
        ],
    );
    let r = open(&child);
    let parent = r.backing().expect("the child reads from its parent");
    assert_eq!(parent.format(), "vmdk");
    assert_eq!(parent.path(), base.as_path());
    let flat = dir.path().join("child.raw");
    qemu_raw(&child, &flat);
    assert_same_as_raw(&*r, &flat);
    let mut buf = vec![0u8; MIB as usize];
    r.read_at(&mut buf, 4 * MIB).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "zeroed grains over the parent's data"
    );
    r.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0xb0), "the parent's data");
    assert!(!r.may_have_data(4 * MIB, MIB).unwrap(), "zeroed grains");
    assert!(r.may_have_data(2 * MIB, MIB).unwrap(), "the parent's data");
    assert!(
        !r.may_have_data(9 * MIB, 3 * MIB).unwrap(),
        "a hole in both"
    );
    assert!(r.may_have_data(12 * MIB, MIB).unwrap());
    assert_eq!(r.allocated_bytes().unwrap(), MIB + 65536);
    assert_eq!(parent.allocated_bytes().unwrap(), 8 * MIB);
}

#[test]
fn huge_mostly_empty_images_open_and_report_holes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let size = 100 * GIB;
    for sub in [
        "monolithicSparse",
        "streamOptimized",
        "twoGbMaxExtentSparse",
        "monolithicFlat",
    ] {
        let image = dir.path().join(format!("{sub}.vmdk"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                p(&image),
                "100G",
            ],
        );
        let at = 50 * GIB + 3 * MIB;
        if sub != "streamOptimized" {
            ok(
                "qemu-io",
                &[
                    "-f",
                    "vmdk",
                    "-c",
                    &format!("write -P 0x77 {at} 1M"),
                    p(&image),
                ],
            );
        }
        let start = Instant::now();
        let r = open(&image);
        assert_eq!(r.size(), size);
        let mut with_data = Vec::new();
        let mut off = 0;
        while off < size {
            if r.may_have_data(off, GIB).unwrap() {
                with_data.push(off / GIB);
            }
            off += GIB;
        }
        let mut buf = vec![0u8; MIB as usize];
        r.read_at(&mut buf, at).unwrap();
        eprintln!("{sub}: 100 GiB opened and mapped in {:?}", start.elapsed());
        if sub == "streamOptimized" {
            assert!(with_data.is_empty());
            assert!(buf.iter().all(|&b| b == 0));
        } else {
            // qemu allocates the first block of the files it creates (to probe alignment).
            with_data.retain(|&g| g != 0 || sub != "monolithicFlat");
            assert_eq!(with_data, vec![50], "{sub}");
            assert!(buf.iter().all(|&b| b == 0x77));
            assert!(r.may_have_data(at, 512).unwrap());
            assert!(!r.may_have_data(at + MIB, 32 * MIB).unwrap());
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "{sub} took {:?}",
            start.elapsed()
        );
    }
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

#[test]
fn writer_output_passes_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let size = 70 * MIB + 5 * 512; // not a multiple of the grain: the last piece is partial
    let raw = dir.path().join("src.raw");
    let regs = regions(size);
    make_raw(&raw, size, &regs, 3);
    let mut rng = Rng(5);
    let mut order = pieces(size, &mut rng);
    for (name, shuffled) in [("in-order", false), ("shuffled", true)] {
        if shuffled {
            shuffle(&mut order, &mut rng);
        }
        let out = dir.path().join(format!("{name}.vmdk"));
        write_image(&raw, &out, &order);
        check_with_qemu(&raw, &out);
        let grains = assert_streamable(&out);
        assert!(grains > 0);
        let r = VmdkReader::open(&out, &mut Vec::new()).unwrap();
        assert_eq!(r.size(), size);
        assert_eq!(r.subformat().as_deref(), Some("streamOptimized"));
        assert_same_as_raw(&r, &raw);
        assert_holes(&r, &regs);
        // Only grains holding data were written.
        assert!(fs::metadata(&out).unwrap().len() < 10 * MIB);
    }
    assert!(matches!(
        VmdkWriter::create(&dir.path().join("in-order.vmdk"), size, false),
        Err(DiskError::Exists { .. })
    ));
}

#[test]
fn writer_puts_grains_back_in_order_when_they_arrive_out_of_order() {
    // More incompressible data than the writer holds back (64 MiB), written backwards, makes
    // it write grains out of order and rewrite the file at finish.
    let dir = tempfile::tempdir().unwrap();
    let size = 96 * MIB;
    let raw = dir.path().join("src.raw");
    let mut f = File::create(&raw).unwrap();
    let mut rng = Rng(17);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..96 {
        if i % 10 == 3 {
            buf.fill(0);
        } else {
            fill(&mut buf, 0, &mut rng);
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let mut order: Vec<(u64, u64)> = (0..size / MIB).map(|i| (i * MIB, MIB)).collect();
    order.reverse();
    let out = dir.path().join("out.vmdk");
    write_image(&raw, &out, &order);
    assert!(!dir.path().join("out.vmdk.vmvault-tmp").exists());
    check_with_qemu(&raw, &out);
    assert_streamable(&out);
    let r = open(&out);
    assert_same_as_raw(&*r, &raw);
}

#[test]
fn writer_handles_empty_and_tiny_disks() {
    let dir = tempfile::tempdir().unwrap();
    // qemu cannot open a disk of 0 sectors as streamOptimized (it takes a sparse file of no
    // capacity for a descriptor file), so that size is checked with vmvault's reader only.
    for size in [0u64, 512, 64 * KIB, 64 * KIB + 512] {
        let raw = dir.path().join(format!("{size}.raw"));
        let mut data = vec![0u8; size as usize];
        if size > 0 {
            data[size as usize - 1] = 9;
        }
        fs::write(&raw, &data).unwrap();
        let out = dir.path().join(format!("{size}.vmdk"));
        let w = VmdkWriter::create(&out, size, false).unwrap();
        if size > 0 {
            w.write_at(&data, 0).unwrap();
        }
        w.finish().unwrap();
        assert!(
            w.write_at(&data, 0).is_err() || size == 0,
            "no writes after finish"
        );
        if size > 0 {
            check_with_qemu(&raw, &out);
        }
        assert_streamable(&out);
        let r = open(&out);
        assert_eq!(r.size(), size);
        let mut back = vec![0u8; size as usize];
        r.read_at(&mut back, 0).unwrap();
        assert!(back == data);
    }
    // Writes must be whole grains.
    let w = VmdkWriter::create(&dir.path().join("x.vmdk"), MIB, false).unwrap();
    assert!(w.write_at(&[1u8; 512], 512).is_err());
    assert!(w.write_at(&[1u8; 512], 0).is_err());
    assert!(w.write_at(&[1u8; 65536], MIB).is_err());
}

#[test]
fn sequential_read_of_256_mib_in_1_mib_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let raw = dir.path().join("src.raw");
    let mut f = File::create(&raw).unwrap();
    let mut rng = Rng(23);
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..256 {
        if i % 8 == 5 {
            buf.fill(0);
        } else {
            fill(&mut buf, i % 3, &mut rng);
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    let raw_file = File::open(&raw).unwrap();
    for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let image = dir.path().join(format!("{sub}.vmdk"));
        convert(&raw, &image, sub);
        let r = open(&image);
        let mut got = vec![0u8; MIB as usize];
        let mut want = vec![0u8; MIB as usize];
        let start = Instant::now();
        let mut off = 0;
        while off < size {
            if r.may_have_data(off, MIB).unwrap() {
                r.read_at(&mut got, off).unwrap();
            } else {
                got.fill(0);
            }
            raw_file.read_exact_at(&mut want, off).unwrap();
            assert!(got == want, "{sub}: MiB at {off} differs");
            off += MIB;
        }
        eprintln!("{sub}: 256 MiB read and compared in {:?}", start.elapsed());
    }
}

#[test]
fn reads_from_several_threads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let raw = dir.path().join("src.raw");
    make_raw(&raw, size, &[(0, 20 * MIB), (40 * MIB, 24 * MIB)], 31);
    let data = read_file(&raw);
    for sub in ["monolithicSparse", "streamOptimized"] {
        let image = dir.path().join(format!("{sub}.vmdk"));
        convert(&raw, &image, sub);
        let r = open(&image);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (r, data) = (&r, &data);
                s.spawn(move || {
                    let mut rng = Rng(t + 1);
                    let mut buf = vec![0u8; 300 * KIB as usize];
                    for _ in 0..100 {
                        let off = rng.below(size - buf.len() as u64);
                        r.read_at(&mut buf, off).unwrap();
                        assert!(buf[..] == data[off as usize..off as usize + buf.len()]);
                    }
                });
            }
        });
    }
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

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 40 * MIB;
    make_raw(&raw, size, &regions(size), 41);
    let sparse = dir.path().join("sparse.vmdk");
    convert(&raw, &sparse, "monolithicSparse");
    let stream = dir.path().join("stream.vmdk");
    write_image(&raw, &stream, &pieces(size, &mut Rng(1)));
    for image in [&sparse, &stream] {
        let len = fs::metadata(image).unwrap().len();
        let gd = le64(image, 56);
        let mut cuts = vec![
            0,
            3,
            100,
            511,
            512,
            513,
            1024,
            20 * 512,
            65536,
            len / 3,
            len / 2,
            len - 1536,
            len - 512,
            len - 1,
        ];
        if gd != u64::MAX {
            cuts.push(gd * 512 + 2);
        }
        for cut in cuts {
            let t = copy_to(image, dir.path(), "cut.vmdk");
            OpenOptions::new()
                .write(true)
                .open(&t)
                .unwrap()
                .set_len(cut)
                .unwrap();
            match vmvault_disk::open(&t, "vmdk") {
                Err(DiskError::Invalid { detail, .. }) => assert!(!detail.is_empty()),
                Err(e) => panic!("{} cut at {cut}: expected Invalid, got {e:?}", p(image)),
                Ok(_) => panic!("{} cut at {cut} of {len} opened", p(image)),
            }
        }
    }
}

#[test]
fn zero_padding_after_the_end_of_stream_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 8 * MIB;
    make_raw(&raw, size, &regions(size), 47);
    let stream = dir.path().join("stream.vmdk");
    write_image(&raw, &stream, &pieces(size, &mut Rng(2)));
    let len = fs::metadata(&stream).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&stream)
        .unwrap()
        .set_len(len + 8192)
        .unwrap();
    assert_same_as_raw(&*open(&stream), &raw);
    patch(&stream, len + 4096, &[1]);
    assert_invalid(&stream, "footer");
}

#[test]
fn damaged_headers_and_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 40 * MIB;
    make_raw(&raw, size, &regions(size), 43);
    let good = dir.path().join("good.vmdk");
    convert(&raw, &good, "monolithicSparse");
    let len = fs::metadata(&good).unwrap().len();
    let gd = le64(&good, 56);
    let case = |name: &str, at: u64, bytes: &[u8]| {
        let t = copy_to(&good, dir.path(), name);
        patch(&t, at, bytes);
        t
    };
    assert_invalid(&case("magic", 0, b"XDMV"), "no KDMV magic");
    assert_unsupported(&case("cowd", 0, b"COWD"), "COWD");
    assert_unsupported(&case("v4", 4, &4u32.to_le_bytes()), "version 4");
    assert_invalid(&case("v0", 4, &0u32.to_le_bytes()), "version 0");
    assert_invalid(
        &case("cap", 12, &(1u64 << 60).to_le_bytes()),
        "absurd capacity",
    );
    assert_invalid(
        &case("cap2", 12, &(1u64 << 40).to_le_bytes()),
        "grain directory",
    );
    assert_invalid(&case("grain", 20, &3u64.to_le_bytes()), "power of two");
    assert_unsupported(&case("grain2", 20, &(1u64 << 20).to_le_bytes()), "grain of");
    assert_invalid(
        &case("gtes", 44, &0u32.to_le_bytes()),
        "entries per grain table",
    );
    assert_invalid(
        &case("gd", 56, &(len / 512).to_le_bytes()),
        "grain directory",
    );
    assert_invalid(&case("gd0", 56, &0u64.to_le_bytes()), "grain directory");
    assert_invalid(&case("gdend", 56, &u64::MAX.to_le_bytes()), "footer");
    assert_invalid(&case("newline", 73, b"\r\n"), "newline");
    assert_unsupported(
        &case("algo", 77, &7u16.to_le_bytes()),
        "compression algorithm 7",
    );
    assert_invalid(&case("desc", 28, &(len / 512).to_le_bytes()), "descriptor");
    // A grain directory entry, then a grain table entry, pointing past the end.
    assert_invalid(
        &case("gde", gd * 512, &u32::MAX.to_le_bytes()),
        "grain table 0",
    );
    let gt = le32(&good, gd * 512) as u64;
    assert_invalid(
        &case("gte", gt * 512, &((len / 512) as u32 + 7).to_le_bytes()),
        "points past the end",
    );
    // Corrupt compressed grain data opens, but reading it fails cleanly.
    let stream = dir.path().join("stream.vmdk");
    convert(&raw, &stream, "streamOptimized");
    let overhead = le64(&stream, 64) * 512;
    patch(&stream, overhead + 12, &[0xff; 64]);
    let r = open(&stream);
    let err = r.read_at(&mut vec![0u8; 65536], 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    patch(&stream, overhead, &77u64.to_le_bytes());
    let err = r.read_at(&mut vec![0u8; 65536], 0).unwrap_err();
    assert!(err.to_string().contains("sector 77"), "{err}");
    // Not an image at all.
    let junk = dir.path().join("junk.vmdk");
    fs::write(&junk, b"hello, world\n").unwrap();
    assert_invalid(&junk, "neither");
    let big = dir.path().join("big.vmdk");
    File::create(&big).unwrap().set_len(2 * MIB).unwrap();
    assert_invalid(&big, "too large for a descriptor");
}

#[test]
fn descriptor_files_with_bad_extents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("flat.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            p(&flat),
            "4M",
        ],
    );
    let text = fs::read_to_string(&flat).unwrap();
    let variant = |name: &str, from: &str, to: &str| {
        let path = dir.path().join(name);
        assert!(text.contains(from), "{text}");
        fs::write(&path, text.replace(from, to)).unwrap();
        path
    };
    assert_invalid(
        &variant("missing.vmdk", "\"flat-flat.vmdk\"", "\"gone-flat.vmdk\""),
        "gone-flat.vmdk",
    );
    assert_invalid(
        &variant("short.vmdk", "RW 8192 FLAT", "RW 8193 FLAT"),
        "shorter than",
    );
    assert_invalid(
        &variant(
            "offset.vmdk",
            "\"flat-flat.vmdk\" 0",
            "\"flat-flat.vmdk\" 1",
        ),
        "shorter than",
    );
    assert_invalid(
        &variant("huge.vmdk", "RW 8192 FLAT", "RW 9999999999999999 FLAT"),
        "absurdly large",
    );
    assert_invalid(
        &variant(
            "noname.vmdk",
            "RW 8192 FLAT \"flat-flat.vmdk\" 0",
            "RW 8192 FLAT",
        ),
        "names no file",
    );
    assert_invalid(
        &variant("garbled.vmdk", "RW 8192 FLAT", "RW eight FLAT"),
        "invalid extent line",
    );
    assert_unsupported(
        &variant("noaccess.vmdk", "RW 8192", "NOACCESS 8192"),
        "NOACCESS",
    );
    assert_unsupported(
        &variant(
            "vmfssparse.vmdk",
            "FLAT \"flat-flat.vmdk\" 0",
            "VMFSSPARSE \"flat-flat.vmdk\"",
        ),
        "VMFSSPARSE",
    );
    assert_unsupported(
        &variant("device.vmdk", "monolithicFlat", "fullDevice"),
        "physical device",
    );
    assert_unsupported(
        &variant("sesparse.vmdk", "monolithicFlat", "seSparse"),
        "ESXi",
    );
    let dev = variant("dev.vmdk", "\"flat-flat.vmdk\"", "\"/dev/null\"");
    assert_unsupported(&dev, "not a regular file");
    // Zero extents and read-only extents are read.
    let zero = variant(
        "zero.vmdk",
        "RW 8192 FLAT \"flat-flat.vmdk\" 0",
        "RDONLY 4096 FLAT \"flat-flat.vmdk\" 4096\nRW 100 ZERO",
    );
    let r = open(&zero);
    assert_eq!(r.size(), 4196 * 512);
    assert!(!r.may_have_data(4096 * 512, 100 * 512).unwrap());
    let mut buf = vec![1u8; 100 * 512];
    r.read_at(&mut buf, 4096 * 512).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A sparse extent shorter than its descriptor says, or missing.
    let split = dir.path().join("split.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            p(&split),
            "4M",
        ],
    );
    let text = fs::read_to_string(&split).unwrap();
    fs::write(&split, text.replace("RW 8192 SPARSE", "RW 8200 SPARSE")).unwrap();
    assert_invalid(&split, "only 8192");
    fs::write(&split, &text).unwrap();
    fs::remove_file(dir.path().join("split-s001.vmdk")).unwrap();
    assert_invalid(&split, "split-s001.vmdk");
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

#[test]
fn backing_chains_are_read_and_bad_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let mid = dir.path().join("mid.vmdk");
    let top = dir.path().join("top.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", p(&base), "8M"]);
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x01 0 4M", p(&base)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            p(&mid),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x02 1M 1M", p(&mid)],
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "mid.vmdk",
            "-F",
            "vmdk",
            p(&top),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x03 3M 2M", p(&top)],
    );
    let r = open(&top);
    let flat = dir.path().join("top.raw");
    qemu_raw(&top, &flat);
    assert_same_as_raw(&*r, &flat);
    let mut buf = vec![0u8; 8 * MIB as usize];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 1));
    assert!(buf[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 2));
    assert!(buf[3 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&b| b == 3));
    assert!(buf[5 * MIB as usize..].iter().all(|&b| b == 0));
    assert!(r.may_have_data(0, MIB).unwrap(), "data two levels down");
    assert!(!r.may_have_data(5 * MIB, 3 * MIB).unwrap());
    assert_eq!(
        r.backing().unwrap().backing().unwrap().path(),
        base.as_path()
    );
    assert_eq!(r.allocated_bytes().unwrap(), 2 * MIB);

    // A parent changed after its child was made (qemu gives it a new CID on write).
    let base2 = copy_to(&base, dir.path(), "base2.vmdk");
    let child2 = dir.path().join("child2.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base2.vmdk",
            "-F",
            "vmdk",
            p(&child2),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "vmdk", "-c", "write -P 0x09 0 64k", p(&base2)],
    );
    assert_invalid(&child2, "parent changed");

    // A missing parent.
    let orphan = dir.path().join("orphan.vmdk");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base2.vmdk",
            "-F",
            "vmdk",
            p(&orphan),
        ],
    );
    fs::remove_file(&base2).unwrap();
    assert_invalid(&orphan, "missing");

    // A chain that loops: a -> b -> a.
    let a = dir.path().join("a.vmdk");
    let b = dir.path().join("b.vmdk");
    ok("qemu-img", &["create", "-q", "-f", "vmdk", p(&b), "4M"]);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "b.vmdk",
            "-F",
            "vmdk",
            p(&a),
        ],
    );
    let a_cid = cid(&a);
    set_embedded(&b, "parentCID", &a_cid);
    set_embedded(&b, "parentFileNameHint", "\"a.vmdk\"");
    match vmvault_disk::open(&a, "auto") {
        Err(DiskError::Invalid { detail, .. }) => assert!(detail.contains("loops"), "{detail}"),
        other => panic!("a looping chain gave {:?}", other.err()),
    }
    // A delta that names no parent file.
    let c = copy_to(&a, dir.path(), "c.vmdk");
    set_embedded(&c, "parentFileNameHint", "\"\"");
    let _ = vmvault_disk::open(&c, "vmdk")
        .err()
        .expect("an empty parent name");
}
