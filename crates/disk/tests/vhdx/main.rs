//! VHDX against the reference implementation: images made by qemu-img and qemu-io are read
//! and compared with their raw sources; images our writer makes must pass `qemu-img check` and
//! `qemu-img compare`; damaged images must be refused with a clear error, never a panic.
//!
//! QEMU cannot make differencing VHDX images; the differencing tests build them from two
//! qemu-made images by editing metadata and BAT as [MS-VHDX] describes, and check the reader
//! against content computed from the two sources (QEMU cannot read them either).

mod confined;
mod damage;
mod read;
mod write;

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
