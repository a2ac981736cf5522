//! VHDX against the reference implementation: images made by qemu-img and qemu-io are read
//! and compared with their raw sources; images our writer makes must pass `qemu-img check` and
//! `qemu-img compare`; damaged images must be refused with a clear error, never a panic.
//!
//! QEMU cannot make differencing VHDX images; the differencing tests build them from two
//! qemu-made images by editing metadata and BAT as [MS-VHDX] describes, and check the reader
//! against content computed from the two sources (QEMU cannot read them either).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmvault_disk::{DiskError, DiskReader, DiskWriter, VhdxReader, VhdxWriter};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

// ---------------------------------------------------------------------------------------------
// Helpers

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (qemu-img and qemu-io must be installed)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    cmd.args(paths);
    run(&mut cmd)
}

fn qemu_io_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args(["-f", "vhdx", "-c"])
        .arg(format!("write -P {pattern:#x} {offset} {len}"))
        .arg(image));
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes a raw disk of `size` bytes mixing pseudo-random data, text-like data, zeros written
/// out, and holes, in 48 KiB segments (not aligned to any block); returns its content.
fn make_source(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = vec![0u8; size as usize];
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let seg = 48 * KIB as usize;
    let mut at = 0usize;
    let mut i = 0;
    while at < data.len() {
        let kind = rng.below(7);
        // Zeros and holes come in runs of up to 2 MiB, so that whole blocks are empty.
        let len = match kind {
            3 | 5 | 6 => seg * (1 + rng.below(40) as usize),
            _ => seg,
        }
        .min(data.len() - at);
        let chunk = &mut data[at..at + len];
        i += 1;
        at += len;
        match kind {
            0 | 1 => chunk.iter_mut().for_each(|b| *b = rng.next() as u8),
            2 => {
                let line = format!("line {i}: the quick brown fox jumps over the lazy dog\n");
                for (b, c) in chunk.iter_mut().zip(line.bytes().cycle()) {
                    *b = c;
                }
            }
            3 => {}
            // Sparse content: a few bytes in a mostly empty segment.
            4 => chunk[rng.below(chunk.len() as u64) as usize] = 0xee,
            _ => continue,
        }
        file.write_all_at(chunk, (at - len) as u64).unwrap();
    }
    data
}

fn read_all(r: &dyn DiskReader) -> Vec<u8> {
    let mut out = vec![0u8; r.size() as usize];
    for (i, chunk) in out.chunks_mut(MIB as usize).enumerate() {
        r.read_at(chunk, i as u64 * MIB).unwrap();
    }
    out
}

/// The image's content as qemu-img reads it.
fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw"], &[image, &out]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Opens as VHDX: "auto" would take a file whose signature is damaged for a raw disk.
fn open(path: &Path) -> Result<Box<dyn DiskReader>, DiskError> {
    vmvault_disk::open(path, "vhdx")
}

fn expect_invalid(path: &Path, needle: &str) -> String {
    match open(path) {
        Err(DiskError::Invalid { detail, .. }) => {
            assert!(
                detail.contains(needle),
                "expected {needle:?} in the error, got {detail:?}"
            );
            detail
        }
        Err(e) => panic!("expected an invalid image error containing {needle:?}, got {e}"),
        Ok(_) => panic!("expected an invalid image error containing {needle:?}, but it opened"),
    }
}

fn expect_unsupported(path: &Path, needle: &str) -> String {
    match open(path) {
        Err(DiskError::Unsupported { detail, .. }) => {
            assert!(
                detail.contains(needle),
                "expected {needle:?} in the error, got {detail:?}"
            );
            detail
        }
        Err(e) => panic!("expected an unsupported feature error containing {needle:?}, got {e}"),
        Ok(_) => panic!("expected an unsupported feature error, but it opened"),
    }
}

// Raw structure editing, for damaged and differencing images. -------------------------------

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

fn read_u64(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path).unwrap().read_exact_at(&mut b, at).unwrap();
    u64::from_le_bytes(b)
}

fn put(path: &Path, at: u64, bytes: &[u8]) {
    rw(path).write_all_at(bytes, at).unwrap();
}

/// Recomputes the CRC-32C of the header (4 KiB) or region table (64 KiB) at `start`.
fn fix_crc(path: &Path, start: u64, len: usize) {
    let f = rw(path);
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, start).unwrap();
    buf[4..8].fill(0);
    f.write_all_at(&crc32c(&buf).to_le_bytes(), start + 4)
        .unwrap();
}

const HEADERS: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_TABLES: [u64; 2] = [192 * KIB, 256 * KIB];

/// Sets bytes of both headers and fixes their checksums.
fn put_in_headers(path: &Path, at: u64, bytes: &[u8]) {
    for h in HEADERS {
        put(path, h + at, bytes);
        fix_crc(path, h, 4096);
    }
}

/// (BAT offset, metadata offset) from the region table.
fn regions(path: &Path) -> (u64, u64) {
    let f = File::open(path).unwrap();
    let mut rt = vec![0u8; 64 * KIB as usize];
    f.read_exact_at(&mut rt, REGION_TABLES[0]).unwrap();
    let count = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    let (mut bat, mut meta) = (0, 0);
    for i in 0..count {
        let e = &rt[16 + 32 * i..48 + 32 * i];
        let offset = u64::from_le_bytes(e[16..24].try_into().unwrap());
        match e[0] {
            0x66 => bat = offset,  // 2DC27766-...
            0x06 => meta = offset, // 8B7CA206-...
            _ => {}
        }
    }
    (bat, meta)
}

/// The file offset of metadata item number `index` in the table.
fn metadata_item(path: &Path, index: u64) -> u64 {
    let (_, meta) = regions(path);
    let mut b = [0u8; 4];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, meta + 32 + 32 * index + 16)
        .unwrap();
    meta + u32::from_le_bytes(b) as u64
}

/// The data write GUID of the current header, in the text form parent locators use.
fn data_write_guid(path: &Path) -> String {
    let f = File::open(path).unwrap();
    let mut best: Option<(u64, [u8; 16])> = None;
    for h in HEADERS {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, h).unwrap();
        let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
        if best.is_none_or(|(s, _)| seq > s) {
            best = Some((seq, b[32..48].try_into().unwrap()));
        }
    }
    let g = best.unwrap().1;
    format!(
        "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}}}",
        u32::from_le_bytes(g[0..4].try_into().unwrap()),
        u16::from_le_bytes(g[4..6].try_into().unwrap()),
        u16::from_le_bytes(g[6..8].try_into().unwrap()),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn encode_locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * pairs.len()];
    // B04AEFB7-D19E-4A81-B789-25B8E9445913, the VHDX parent locator type.
    b[0..16].copy_from_slice(&[
        0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59,
        0x13,
    ]);
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let mut text = |s: &str| {
            let at = b.len() as u32;
            for u in s.encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            (at, (b.len() as u32 - at) as u16)
        };
        let (ko, kl) = text(k);
        let (vo, vl) = text(v);
        let e = &mut b[20 + 12 * i..32 + 12 * i];
        e[0..4].copy_from_slice(&ko.to_le_bytes());
        e[4..8].copy_from_slice(&vo.to_le_bytes());
        e[8..10].copy_from_slice(&kl.to_le_bytes());
        e[10..12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// Turns a qemu-made dynamic image into a differencing one: sets HasParent and adds a parent
/// locator item after the five items QEMU writes. The metadata region has no checksum.
fn make_differencing(child: &Path, locator: &[(&str, &str)]) {
    let (_, meta) = regions(child);
    let params = metadata_item(child, 0);
    let mut flags = [0u8; 4];
    File::open(child)
        .unwrap()
        .read_exact_at(&mut flags, params + 4)
        .unwrap();
    flags[0] |= 2;
    put(child, params + 4, &flags);
    let item = encode_locator(locator);
    let item_offset = 64 * KIB + 4096;
    put(child, meta + item_offset, &item);
    let mut entry = [0u8; 32];
    // A8D35F2D-B30B-454D-ABF7-D3D84834AB0C, the parent locator item.
    entry[0..16].copy_from_slice(&[
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ]);
    entry[16..20].copy_from_slice(&(item_offset as u32).to_le_bytes());
    entry[20..24].copy_from_slice(&(item.len() as u32).to_le_bytes());
    entry[24..28].copy_from_slice(&4u32.to_le_bytes());
    put(child, meta + 32 + 32 * 5, &entry);
    put(child, meta + 10, &6u16.to_le_bytes());
}

/// A qemu-made dynamic image of 1 MiB blocks whose payload block `block` was written.
fn block_offset_in_file(path: &Path, block: u64) -> u64 {
    let (bat, _) = regions(path);
    // 1 MiB blocks, 512-byte sectors: chunk ratio 4096.
    let index = block + block / 4096;
    read_u64(path, bat + 8 * index) & !(MIB - 1)
}

fn set_bat(path: &Path, index: u64, entry: u64) {
    let (bat, _) = regions(path);
    put(path, bat + 8 * index, &entry.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Reading qemu-made images

#[test]
fn converted_images_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any block size: the last block is cut short.
    let size = 37 * MIB + 3 * 512;
    let src = dir.path().join("src.raw");
    let data = make_source(&src, size, 7);
    for (opts, subformat) in [
        ("subformat=dynamic,block_size=1M", "dynamic"),
        ("subformat=dynamic,block_size=32M", "dynamic"),
        ("subformat=dynamic", "dynamic"),
        ("subformat=fixed,block_size=1M", "fixed"),
        (
            "subformat=fixed,block_size=32M,block_state_zero=off",
            "fixed",
        ),
        (
            "subformat=fixed,block_size=8M,block_state_zero=off",
            "fixed",
        ),
    ] {
        let out = dir.path().join("out.vhdx");
        let _ = std::fs::remove_file(&out);
        qemu_img(
            &["convert", "-f", "raw", "-O", "vhdx", "-o", opts],
            &[&src, &out],
        );
        let r = vmvault_disk::open(&out, "auto").unwrap();
        assert_eq!(r.format(), "vhdx");
        assert_eq!(r.subformat().as_deref(), Some(subformat), "{opts}");
        assert_eq!(r.size(), size, "{opts}");
        assert!(r.backing().is_none());
        let got = read_all(&*r);
        assert_same(&got, &data, opts);
        assert_same(&got, &qemu_raw(&out, dir.path()), opts);
        // Unaligned reads across block boundaries.
        let mut buf = vec![0u8; 3 * MIB as usize + 777];
        for off in [1, MIB - 100, 8 * MIB - 1, size - buf.len() as u64] {
            r.read_at(&mut buf, off).unwrap();
            assert_same(&buf, &data[off as usize..off as usize + buf.len()], opts);
        }
        assert!(r.read_at(&mut buf[..2], size - 1).is_err(), "read past end");
        assert!(r.allocated_bytes().unwrap() <= size.next_multiple_of(32 * MIB));
    }
}

#[test]
fn qemu_io_writes_are_read_and_holes_reported() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let mut want = vec![0u8; size as usize];
    let writes = [
        (0xabu8, MIB, 64 * KIB),
        (0x11, 5 * MIB + 512, 3 * 512),
        (0x22, 9 * MIB - 4 * KIB, 8 * KIB), // across a block boundary
        (0x33, size - 64 * KIB, 64 * KIB),
    ];
    for (opts, bs) in [
        ("block_size=1M", MIB),
        ("block_size=1M,block_state_zero=off", MIB),
    ] {
        let img = dir.path().join("w.vhdx");
        let _ = std::fs::remove_file(&img);
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "vhdx", "-o", opts])
            .arg(&img)
            .arg(size.to_string()));
        for &(p, off, len) in &writes {
            qemu_io_write(&img, p, off, len);
            want[off as usize..(off + len) as usize].fill(p);
        }
        let r = open(&img).unwrap();
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        let got = read_all(&*r);
        assert_same(&got, &want, opts);
        assert_same(&got, &qemu_raw(&img, dir.path()), opts);

        // Written blocks have data, every other block is a hole.
        let written: Vec<u64> = vec![1, 5, 8, 9, 63];
        for block in 0..size / bs {
            assert_eq!(
                r.may_have_data(block * bs, bs).unwrap(),
                written.contains(&block),
                "{opts}: block {block}"
            );
        }
        assert!(r.may_have_data(0, size).unwrap());
        assert!(!r.may_have_data(10 * MIB, 50 * MIB).unwrap());
        assert!(!r.may_have_data(size, MIB).unwrap(), "past the end");
        assert_eq!(r.allocated_bytes().unwrap(), written.len() as u64 * bs);
    }
}

#[test]
fn fixed_images_hold_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o"])
        .arg("subformat=fixed,block_size=1M,block_state_zero=off")
        .arg(&img)
        .arg((5 * MIB + 512).to_string()));
    qemu_io_write(&img, 0x44, 2 * MIB, 4096);
    let r = open(&img).unwrap();
    assert_eq!(r.subformat().as_deref(), Some("fixed"));
    assert_eq!(r.allocated_bytes().unwrap(), 5 * MIB + 512);
    assert!(r.may_have_data(0, MIB).unwrap());
    let got = read_all(&*r);
    let mut want = vec![0u8; (5 * MIB + 512) as usize];
    want[2 * MIB as usize..2 * MIB as usize + 4096].fill(0x44);
    assert_same(&got, &want, "fixed");
}

#[test]
fn huge_sparse_image_opens_and_reports_holes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx"])
        .arg(&img)
        .arg("100G"));
    qemu_io_write(&img, 0x5a, 50 * GIB + 3 * MIB, 64 * KIB);
    let r = open(&img).unwrap();
    assert_eq!(r.size(), 100 * GIB);
    for gib in 0..100 {
        assert_eq!(
            r.may_have_data(gib * GIB, GIB).unwrap(),
            gib == 50,
            "GiB {gib}"
        );
    }
    assert!(r.may_have_data(0, 100 * GIB).unwrap());
    let mut buf = vec![0u8; MIB as usize];
    r.read_at(&mut buf, 50 * GIB + 3 * MIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0x5a));
    assert!(buf[64 * KIB as usize..].iter().all(|&b| b == 0));
    // QEMU picks 16 MiB blocks for a disk of 100 GiB.
    assert_eq!(r.allocated_bytes().unwrap(), 16 * MIB);
}

#[test]
fn sequential_backup_reads_of_a_256_mib_image() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let src = dir.path().join("src.raw");
    let data = make_source(&src, size, 99);
    let img = dir.path().join("seq.vhdx");
    qemu_img(
        &["convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M"],
        &[&src, &img],
    );
    let r = VhdxReader::open(&img, &mut Vec::new()).unwrap();
    // As the backup reads: may_have_data, then read_at, 1 MiB at a time.
    let mut buf = vec![0u8; MIB as usize];
    let mut skipped = 0;
    for i in 0..size / MIB {
        let want = &data[(i * MIB) as usize..((i + 1) * MIB) as usize];
        if r.may_have_data(i * MIB, MIB).unwrap() {
            r.read_at(&mut buf, i * MIB).unwrap();
            assert_same(&buf, want, "sequential read");
        } else {
            skipped += 1;
            assert!(want.iter().all(|&b| b == 0), "hole at MiB {i} holds data");
        }
    }
    assert!(skipped > 0, "some 1 MiB pieces are holes");

    // Several threads at once, each on its own ranges.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let r = &r;
            let data = &data;
            s.spawn(move || {
                let mut buf = vec![0u8; 3 * MIB as usize / 2];
                let mut off = t * 7 * MIB + 4096 * t;
                while off + buf.len() as u64 <= size {
                    r.read_at(&mut buf, off).unwrap();
                    assert_same(
                        &buf,
                        &data[off as usize..off as usize + buf.len()],
                        "threads",
                    );
                    off += 29 * MIB;
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes `data` through a VhdxWriter in shuffled 64 KiB-multiple pieces, leaving some pieces
/// unwritten and giving all-zero pieces to write_zeros; returns what the image must hold.
fn write_shuffled(w: &dyn DiskWriter, data: &[u8], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let size = data.len() as u64;
    let mut pieces = Vec::new();
    let mut off = 0;
    while off < size {
        let len = ((1 + rng.below(40)) * 64 * KIB).min(size - off);
        pieces.push((off, len));
        off += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut want = data.to_vec();
    for (off, len) in pieces {
        let piece = &data[off as usize..(off + len) as usize];
        match rng.below(8) {
            0 => want[off as usize..(off + len) as usize].fill(0),
            _ if piece.iter().all(|&b| b == 0) => w.write_zeros(off, len).unwrap(),
            _ => w.write_at(piece, off).unwrap(),
        }
    }
    w.finish().unwrap();
    want
}

#[test]
fn writer_output_passes_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte multiples that are not 64 KiB or 1 MiB multiples, and a size that QEMU would
    // pick another block size for.
    for (i, size) in [20 * MIB + 3 * 512, 3 * MIB + 64 * KIB, 130 * MIB + 512]
        .into_iter()
        .enumerate()
    {
        let src = dir.path().join("src.raw");
        let data = make_source(&src, size, 1000 + i as u64);
        let out = dir.path().join("out.vhdx");
        let w = vmvault_disk::create(&out, "vhdx", size, true).unwrap();
        let want = write_shuffled(&*w, &data, 77 + i as u64);
        let expected = dir.path().join("expected.raw");
        std::fs::write(&expected, &want).unwrap();

        let check = qemu_img(&["check", "-f", "vhdx"], &[&out]);
        assert!(check.contains("No errors were found"), "{check}");
        let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx"], &[&expected, &out]);
        assert!(cmp.contains("Images are identical"), "{cmp}");
        let info = qemu_img(&["info", "-f", "vhdx"], &[&out]);
        assert!(info.contains(&format!("({size} bytes)")), "{info}");

        let r = open(&out).unwrap();
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        assert_same(&read_all(&*r), &want, "our reader on our writer's image");
        // Holes stay holes: blocks never written, or written with zeros only.
        for block in 0..size.div_ceil(MIB) {
            let range = (block * MIB) as usize..((block + 1) * MIB).min(size) as usize;
            if want[range.clone()].iter().all(|&b| b == 0) {
                assert!(
                    !r.may_have_data(block * MIB, MIB).unwrap(),
                    "block {block} is all zeros yet allocated"
                );
            }
        }
    }
}

#[test]
fn writer_handles_odd_sizes_large_sparse_disks_and_refuses_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of 512: the virtual size is rounded up to a whole sector.
    let out = dir.path().join("odd.vhdx");
    let size = 3 * MIB + 100;
    let w = VhdxWriter::create(&out, size, false).unwrap();
    w.write_at(&vec![0x77; (2 * MIB + 100) as usize], MIB)
        .unwrap();
    assert!(w.write_at(&[1; 1024], size).is_err(), "write past the end");
    w.finish().unwrap();
    let r = open(&out).unwrap();
    assert_eq!(r.size(), 3 * MIB + 512);
    let mut tail = vec![0u8; 512];
    r.read_at(&mut tail, 3 * MIB).unwrap();
    assert!(tail[..100].iter().all(|&b| b == 0x77) && tail[100..].iter().all(|&b| b == 0));
    let check = qemu_img(&["check", "-f", "vhdx"], &[&out]);
    assert!(check.contains("No errors were found"), "{check}");

    // A 100 GiB disk with little data: a small file, quick to write and check.
    let big = dir.path().join("big.vhdx");
    let w = VhdxWriter::create(&big, 100 * GIB, false).unwrap();
    w.write_at(&[0x42; 128 * 1024], 70 * GIB).unwrap();
    w.write_zeros(0, 10 * GIB).unwrap();
    w.write_at(&[0x43; 64 * 1024], 100 * GIB - 64 * KIB)
        .unwrap();
    w.finish().unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&big).unwrap().blocks() * 512 < 8 * MIB);
    let check = qemu_img(&["check", "-f", "vhdx"], &[&big]);
    assert!(check.contains("No errors were found"), "{check}");
    let r = open(&big).unwrap();
    assert_eq!(r.allocated_bytes().unwrap(), 2 * MIB);
    let mut buf = vec![0u8; 128 * 1024];
    r.read_at(&mut buf, 70 * GIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
    let mut buf = vec![0u8; 64 * 1024];
    let verified = run(Command::new("qemu-io")
        .args(["-r", "-f", "vhdx", "-c"])
        .arg(format!("read -P 0x43 {} 65536", 100 * GIB - 64 * KIB))
        .arg(&big));
    assert!(!verified.contains("failed"), "{verified}");
    r.read_at(&mut buf, 100 * GIB - 64 * KIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));

    assert!(matches!(
        vmvault_disk::create(&big, "vhdx", MIB, false),
        Err(DiskError::Exists { .. })
    ));
    assert!(matches!(
        VhdxWriter::create(&dir.path().join("huge.vhdx"), 65 << 40, false),
        Err(DiskError::Unsupported { .. })
    ));
    // An unfinished image is no valid VHDX: the file identifier is written last.
    let unfinished = dir.path().join("unfinished.vhdx");
    let w = VhdxWriter::create(&unfinished, 4 * MIB, false).unwrap();
    w.write_at(&[1; 65536], 0).unwrap();
    drop(w);
    assert!(VhdxReader::open(&unfinished, &mut Vec::new()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Damaged images

/// A small qemu-made image with data in a few blocks.
fn sample(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&img)
        .arg("8M"));
    qemu_io_write(&img, 0x61, 0, 64 * KIB);
    qemu_io_write(&img, 0x62, 6 * MIB, MIB);
    img
}

fn fresh_copy(src: &Path, dir: &Path) -> PathBuf {
    let p = dir.join("bad.vhdx");
    std::fs::copy(src, &p).unwrap();
    p
}

#[test]
fn truncated_images_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let len = std::fs::metadata(&img).unwrap().len();
    let last_block = block_offset_in_file(&img, 6);
    for cut in [
        0,
        4,
        100,
        64 * KIB + 10,
        130 * KIB,
        200 * KIB,
        MIB,
        2 * MIB + 5,
        3 * MIB + 100,
        last_block + 4096,
        len - 1,
    ] {
        let bad = fresh_copy(&img, dir.path());
        File::options()
            .write(true)
            .open(&bad)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let detail = match open(&bad) {
            Err(DiskError::Invalid { detail, .. }) => detail,
            Err(e) => panic!("cut at {cut}: expected an invalid image error, got {e}"),
            Ok(_) => panic!("cut at {cut}: opened"),
        };
        assert!(
            detail.contains("truncated") || detail.contains("vhdxfile"),
            "cut at {cut}: {detail}"
        );
    }
}

#[test]
fn damaged_structures_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let (bat, meta) = regions(&img);
    open(&img).unwrap();

    // One damaged header: the other one is used.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, HEADERS[1] + 100, &[0xff]);
    assert_same(
        &read_all(&*open(&bad).unwrap()),
        &qemu_raw(&img, dir.path()),
        "one header",
    );
    // Both damaged: refused.
    put(&bad, HEADERS[0] + 100, &[0xff]);
    expect_invalid(&bad, "CRC-32C mismatch");

    let bad = fresh_copy(&img, dir.path());
    put(&bad, 0, b"vhdxfilf");
    expect_invalid(&bad, "vhdxfile");

    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 66, &2u16.to_le_bytes());
    expect_invalid(&bad, "version 2");

    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 0, b"hEAd");
    expect_invalid(&bad, "signature");

    // Region table: the second copy stands in for a damaged first one.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, REGION_TABLES[0] + 40, &[0x55]);
    open(&bad).unwrap();
    put(&bad, REGION_TABLES[1] + 40, &[0x55]);
    expect_invalid(&bad, "no valid region table");

    // Tables pointing past the end of the file.
    let bad = fresh_copy(&img, dir.path());
    for t in REGION_TABLES {
        put(&bad, t + 16 + 16, &(1u64 << 40).to_le_bytes());
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    expect_invalid(&bad, "past the end of the file");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, (1u64 << 40) | 6);
    expect_invalid(&bad, "block 6 at offset");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, 6); // a block in the header section
    expect_invalid(&bad, "overlaps the header section");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 6, bat | 6); // a block on top of the BAT
    expect_invalid(&bad, "overlaps the BAT");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 3, 4); // a reserved state
    expect_invalid(&bad, "reserved state 4");

    let bad = fresh_copy(&img, dir.path());
    set_bat(&bad, 3, 7); // partially present outside a differencing image
    expect_invalid(&bad, "partially present");

    let bad = fresh_copy(&img, dir.path());
    put(
        &bad,
        meta + 32 + 32 * 2 + 16,
        &(2 * MIB as u32).to_le_bytes(),
    );
    expect_invalid(&bad, "outside the metadata region");

    let bad = fresh_copy(&img, dir.path());
    put(&bad, meta, b"metadatX");
    expect_invalid(&bad, "metadata");

    // Absurd sizes.
    let size_item = metadata_item(&img, 1);
    for (value, needle) in [
        (1u64 << 60, "larger than the format's 64 TiB"),
        (u64::MAX, "larger than the format's 64 TiB"),
        (8 * MIB + 1, "not a multiple"),
        (1u64 << 40, "too small"),
    ] {
        let bad = fresh_copy(&img, dir.path());
        put(&bad, size_item, &value.to_le_bytes());
        expect_invalid(&bad, needle);
    }
    let params = metadata_item(&img, 0);
    for (value, needle) in [
        (3 * MIB as u32, "block size"),
        (512 * 1024, "block size"),
        (512 * MIB as u32, "block size"),
    ] {
        let bad = fresh_copy(&img, dir.path());
        put(&bad, params, &value.to_le_bytes());
        expect_invalid(&bad, needle);
    }
    let bad = fresh_copy(&img, dir.path());
    put(&bad, metadata_item(&img, 3), &1000u32.to_le_bytes());
    expect_invalid(&bad, "logical sector size 1000");

    // A differencing image without a parent locator.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, params + 4, &2u32.to_le_bytes());
    expect_invalid(&bad, "without a parent locator");

    // A required metadata item missing.
    let bad = fresh_copy(&img, dir.path());
    put(&bad, meta + 10, &4u16.to_le_bytes());
    expect_invalid(&bad, "physical sector size metadata item is missing");
}

#[test]
fn unknown_required_features_and_pending_logs_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path(), "s.vhdx");
    let (_, meta) = regions(&img);

    // A header naming a log: its updates are not in the BAT yet.
    let bad = fresh_copy(&img, dir.path());
    put_in_headers(&bad, 48, &[0x42; 16]);
    let detail = expect_unsupported(&bad, "log");
    assert!(detail.contains("qemu-img check -r all"), "{detail}");
    assert!(detail.contains("Hyper-V"), "{detail}");

    // An unknown region flagged required.
    let bad = fresh_copy(&img, dir.path());
    for t in REGION_TABLES {
        put(&bad, t + 8, &3u32.to_le_bytes());
        let mut entry = [0u8; 32];
        entry[0..16].copy_from_slice(&[0x99; 16]);
        entry[16..24].copy_from_slice(&(5 * MIB).to_le_bytes());
        entry[24..28].copy_from_slice(&(MIB as u32).to_le_bytes());
        entry[28..32].copy_from_slice(&1u32.to_le_bytes());
        put(&bad, t + 16 + 64, &entry);
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    expect_unsupported(&bad, "region");
    // The same region, not required, is skipped.
    for t in REGION_TABLES {
        put(&bad, t + 16 + 64 + 28, &0u32.to_le_bytes());
        fix_crc(&bad, t, 64 * KIB as usize);
    }
    open(&bad).unwrap();

    // An unknown metadata item flagged required.
    let bad = fresh_copy(&img, dir.path());
    let mut entry = [0u8; 32];
    entry[0..16].copy_from_slice(&[0x98; 16]);
    entry[16..20].copy_from_slice(&(64 * 1024 + 8192u32).to_le_bytes());
    entry[20..24].copy_from_slice(&8u32.to_le_bytes());
    entry[24..28].copy_from_slice(&4u32.to_le_bytes());
    put(&bad, meta + 32 + 32 * 5, &entry);
    put(&bad, meta + 10, &6u16.to_le_bytes());
    expect_unsupported(&bad, "metadata item");
    // Not required: skipped.
    put(&bad, meta + 32 + 32 * 5 + 24, &0u32.to_le_bytes());
    open(&bad).unwrap();
}

#[test]
fn image_with_a_log_to_replay_is_refused_until_qemu_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("log.vhdx");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vhdx", "-o", "block_size=1M"])
        .arg(&img)
        .arg("8M"));
    // QEMU updates the BAT through a log entry, then clears the log GUID in the headers.
    // Setting it back to the entry's GUID leaves the image as a crash right after the log
    // write would: an active log that must be replayed.
    qemu_io_write(&img, 0x71, MIB, 64 * KIB);
    let log_offset = read_u64(&img, HEADERS[0] + 72);
    let mut entry = [0u8; 48];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut entry, log_offset)
        .unwrap();
    assert_eq!(&entry[0..4], b"loge", "QEMU left its log entry");
    put_in_headers(&img, 48, &entry[32..48]);
    let detail = expect_unsupported(&img, "log");
    assert!(detail.contains("qemu-img check -r all"), "{detail}");
    // QEMU agrees the log needs replaying, and replays it when told to.
    let ro = Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!ro.status.success(), "qemu-img opened it read-only");
    let _ = Command::new("qemu-img")
        .args(["check", "-r", "all", "-f", "vhdx"])
        .arg(&img)
        .output()
        .unwrap();
    let r = open(&img).unwrap();
    let mut buf = vec![0u8; 128 * KIB as usize];
    r.read_at(&mut buf, MIB).unwrap();
    assert!(buf[..64 * KIB as usize].iter().all(|&b| b == 0x71));
    assert!(buf[64 * KIB as usize..].iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// Differencing images

struct Diff {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    child: PathBuf,
    parent_data: Vec<u8>,
    child_data: Vec<u8>,
}

const DIFF_SIZE: u64 = 12 * MIB;

/// A parent converted from a raw source, and a child of 1 MiB blocks written by qemu-io, not
/// yet made differencing.
fn diff_pair() -> Diff {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("parent.raw");
    let parent_data = make_source(&src, DIFF_SIZE, 4242);
    let parent = dir.path().join("parent.vhdx");
    qemu_img(
        &["convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=2M"],
        &[&src, &parent],
    );
    let child = dir.path().join("child.vhdx");
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M,block_state_zero=off",
        ])
        .arg(&child)
        .arg(DIFF_SIZE.to_string()));
    let mut child_data = vec![0u8; DIFF_SIZE as usize];
    for (p, block) in [(0xc1u8, 1u64), (0xc2, 4), (0xc3, 5), (0xc4, 9)] {
        qemu_io_write(&child, p, block * MIB, MIB);
        child_data[(block * MIB) as usize..((block + 1) * MIB) as usize].fill(p);
    }
    Diff {
        _dir: dir,
        parent,
        child,
        parent_data,
        child_data,
    }
}

#[test]
fn differencing_image_reads_through_its_parent() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", ".\\parent.vhdx"),
            ("absolute_win32_path", "C:\\VMs\\parent.vhdx"),
        ],
    );
    // Block 5: partially present, with a sector bitmap block appended to the file; block 2:
    // ZERO (hides the parent); block 3: UNMAPPED (reads from the parent). The sector bitmap
    // entry of chunk 0 is BAT entry 4096 (chunk ratio 4096 for 1 MiB blocks).
    let file_len = std::fs::metadata(&d.child).unwrap().len();
    let bitmap_at = file_len.next_multiple_of(MIB);
    let mut bitmap = vec![0u8; MIB as usize];
    let sectors: Vec<u64> = (0..2048u64)
        .filter(|s| (s / 3) % 2 == 0 || *s == 2047)
        .collect();
    for s in &sectors {
        let bit = 5 * 2048 + s;
        bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
    }
    put(&d.child, bitmap_at, &bitmap);
    set_bat(&d.child, 4096, bitmap_at | 6);
    let block5 = block_offset_in_file(&d.child, 5);
    set_bat(&d.child, 5, block5 | 7);
    set_bat(&d.child, 2, 2);
    set_bat(&d.child, 3, 3);

    let mut want = d.parent_data.clone();
    for block in [1u64, 4, 9] {
        let r = (block * MIB) as usize..((block + 1) * MIB) as usize;
        want[r.clone()].copy_from_slice(&d.child_data[r]);
    }
    want[2 * MIB as usize..3 * MIB as usize].fill(0);
    for s in &sectors {
        let at = (5 * MIB + s * 512) as usize;
        want[at..at + 512].copy_from_slice(&d.child_data[at..at + 512]);
    }

    let r = open(&d.child).unwrap();
    assert_eq!(r.subformat().as_deref(), Some("differencing"));
    let parent = r.backing().expect("a parent");
    assert_eq!(parent.format(), "vhdx");
    assert_eq!(
        parent.path().canonicalize().unwrap(),
        d.parent.canonicalize().unwrap()
    );
    assert_same(&read_all(&*r), &want, "differencing");
    let mut buf = vec![0u8; 5000];
    for off in [5 * MIB - 1000, 5 * MIB + 1, 5 * MIB + 1535, 6 * MIB - 3000] {
        r.read_at(&mut buf, off).unwrap();
        assert_same(
            &buf,
            &want[off as usize..off as usize + 5000],
            "partial block",
        );
    }
    assert_eq!(
        r.allocated_bytes().unwrap(),
        3 * MIB + sectors.len() as u64 * 512
    );
    assert!(!r.may_have_data(2 * MIB, MIB).unwrap(), "ZERO block");
    assert!(r.may_have_data(5 * MIB, MIB).unwrap(), "partial block");
    for block in [0u64, 3, 6, 7, 8, 10, 11] {
        let parent_has = parent.may_have_data(block * MIB, MIB).unwrap();
        assert_eq!(
            r.may_have_data(block * MIB, MIB).unwrap(),
            parent_has,
            "block {block} is the parent's"
        );
    }
}

#[test]
fn differencing_parent_is_found_beside_the_child_when_moved() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", "..\\old-folder\\parent.vhdx"),
            (
                "volume_path",
                "\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\parent.vhdx",
            ),
            ("absolute_win32_path", "D:\\VMs\\parent.vhdx"),
        ],
    );
    let r = open(&d.child).unwrap();
    let got = read_all(&*r);
    assert_same(
        &got[..MIB as usize],
        &d.parent_data[..MIB as usize],
        "block 0",
    );
}

#[test]
fn differencing_with_a_missing_or_changed_parent_is_invalid() {
    let d = diff_pair();
    let linkage = data_write_guid(&d.parent);
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", &linkage),
            ("relative_path", ".\\gone.vhdx"),
            ("absolute_win32_path", "C:\\VMs\\gone.vhdx"),
        ],
    );
    let detail = expect_invalid(&d.child, "parent disk not found");
    assert!(detail.contains("gone.vhdx"), "{detail}");

    let d = diff_pair();
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", "{12345678-1234-1234-1234-123456789abc}"),
            ("relative_path", "parent.vhdx"),
        ],
    );
    expect_invalid(&d.child, "not the disk this image was made from");

    let d = diff_pair();
    make_differencing(&d.child, &[("relative_path", "parent.vhdx")]);
    expect_invalid(&d.child, "parent_linkage");

    // A parent that is not a VHDX.
    let d = diff_pair();
    std::fs::write(d.parent.with_extension("raw2"), vec![0u8; 4096]).unwrap();
    make_differencing(
        &d.child,
        &[
            ("parent_linkage", "{12345678-1234-1234-1234-123456789abc}"),
            ("relative_path", "parent.raw2"),
        ],
    );
    expect_invalid(&d.child, "vhdxfile");
}

#[test]
fn differencing_chain_that_loops_is_invalid() {
    let d = diff_pair();
    let a = d.child.clone();
    let b = d.child.with_file_name("b.vhdx");
    std::fs::copy(&a, &b).unwrap();
    let (la, lb) = (data_write_guid(&a), data_write_guid(&b));
    make_differencing(&a, &[("parent_linkage", &lb), ("relative_path", "b.vhdx")]);
    make_differencing(&b, &[("parent_linkage", &la), ("relative_path", "a.vhdx")]);
    std::fs::rename(&a, a.with_file_name("a.vhdx")).unwrap();
    let a = a.with_file_name("a.vhdx");
    match open(&a) {
        Err(DiskError::Invalid { format, detail, .. }) => {
            assert_eq!(format, "backing chain");
            assert!(detail.contains("loops"), "{detail}");
        }
        Err(e) => panic!("expected a loop error, got {e}"),
        Ok(_) => panic!("a looping chain opened"),
    }
    // An image that is its own parent.
    let c = a.with_file_name("c.vhdx");
    std::fs::copy(&d.parent, &c).unwrap();
    let lc = data_write_guid(&c);
    make_differencing(&c, &[("parent_linkage", &lc), ("relative_path", "c.vhdx")]);
    assert!(matches!(open(&c), Err(DiskError::Invalid { .. })));
}
