//! VHD against the real thing: images made by qemu-img and qemu-io (QEMU's "vpc" driver) are
//! read through vmvault's reader and compared with their raw sources; images vmvault writes
//! are checked and compared by qemu-img. QEMU cannot make differencing VHDs, so those are
//! built here, byte by byte from the specification, over parents QEMU made.

mod confined;
mod damage;
mod read;
mod write;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use vmvault_disk::{DiskError, DiskReader, DiskWriter, RawReader, VhdWriter};

const MIB: u64 = 1 << 20;

/// Deterministic pseudo-random numbers (xorshift64*).
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
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str], paths: &[&Path]) -> String {
    run(Command::new("qemu-img").args(args).args(paths))
}

fn qemu_io_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c"])
        .arg(format!("write -P {pattern:#x} {offset} {len}"))
        .arg(image));
}

/// Writes a raw disk of `size` bytes mixing pseudo-random data, text, zeros written out, and
/// holes (never written), with a 6 MiB hole at 8 MiB and its last 300 KiB of data; returns its
/// bytes.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut data = vec![0u8; size as usize];
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let words = [
        "vmvault ", "backs ", "up ", "virtual ", "disks\n", "the ", "VHD ", "format, ",
    ];
    let mut pos = 0u64;
    while pos < size {
        let len = (4096 * (1 + rng.below(700))).min(size - pos);
        let (s, e) = (pos as usize, (pos + len) as usize);
        let forced_hole = pos < 14 * MIB && pos + len > 8 * MIB;
        match rng.below(5) {
            _ if forced_hole => {}
            0 => rng.fill(&mut data[s..e]),
            1 => {
                let mut text = Vec::with_capacity(e - s);
                while text.len() < e - s {
                    text.extend_from_slice(
                        words[rng.below(words.len() as u64) as usize].as_bytes(),
                    );
                }
                data[s..e].copy_from_slice(&text[..e - s]);
            }
            2 => {}                                            // a hole
            3 => file.write_all_at(&data[s..e], pos).unwrap(), // zeros, written out
            _ => {
                // A few scattered bytes in an otherwise empty stretch.
                for _ in 0..4 {
                    let at = s + rng.below(len) as usize;
                    data[at] = 0xee;
                }
            }
        }
        if !forced_hole && data[s..e].iter().any(|b| *b != 0) {
            file.write_all_at(&data[s..e], pos).unwrap();
        }
        pos += len;
    }
    for b in &mut data[(8 * MIB).min(size) as usize..(14 * MIB).min(size) as usize] {
        *b = 0;
    }
    let tail = size.saturating_sub(300 << 10);
    rng.fill(&mut data[tail as usize..]);
    file.write_all_at(&data[tail as usize..], tail).unwrap();
    data
}

/// The whole disk through `r`, read in pieces of `chunk` bytes.
fn read_all(r: &dyn DiskReader, chunk: usize) -> Vec<u8> {
    let mut out = vec![0u8; r.size() as usize];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        r.read_at(piece, (i * chunk) as u64).unwrap();
    }
    out
}

/// The disk as qemu-img sees it.
fn qemu_raw(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw"], &[image, &out]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `(start, length, data)` extents from `qemu-img map --output=json`.
fn qemu_map(image: &Path) -> Vec<(u64, u64, bool)> {
    let json = qemu_img(&["map", "--output=json", "-f", "vpc"], &[image]);
    let field = |line: &str, name: &str| -> String {
        let at = line.find(&format!("\"{name}\": ")).unwrap() + name.len() + 4;
        line[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect()
    };
    json.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            (
                field(l, "start").parse().unwrap(),
                field(l, "length").parse().unwrap(),
                field(l, "data") == "true",
            )
        })
        .collect()
}

fn qemu_virtual_size(image: &Path) -> u64 {
    let json = qemu_img(&["info", "--output=json", "-f", "vpc"], &[image]);
    // The top-level field, not that of the "file" child node (the file's length).
    let key = "\n    \"virtual-size\": ";
    let at = json.find(key).unwrap() + key.len();
    json[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Asserts `got` is `want` over `want`'s length and zeros after.
fn assert_same_disk(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() >= want.len(),
        "{what}: {} bytes, want {}",
        got.len(),
        want.len()
    );
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at byte {i}");
    }
    assert!(
        got[want.len()..].iter().all(|b| *b == 0),
        "{what}: non-zero tail"
    );
}

/// Reads the image from four threads at once, in interleaved 1 MiB pieces.
fn assert_parallel_reads(r: &dyn DiskReader, want: &[u8]) {
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                let mut buf = vec![0u8; MIB as usize];
                let mut off = t * MIB;
                while off < want.len() as u64 {
                    let n = (want.len() as u64 - off).min(MIB) as usize;
                    r.read_at(&mut buf[..n], off).unwrap();
                    assert!(
                        buf[..n] == want[off as usize..off as usize + n],
                        "thread {t} at {off}"
                    );
                    off += 4 * MIB;
                }
            });
        }
    });
}

fn assert_invalid(result: Result<Box<dyn DiskReader>, DiskError>, needle: &str) -> String {
    match result {
        Err(e @ DiskError::Invalid { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(needle), "{msg:?} does not say {needle:?}");
            msg
        }
        Err(e) => panic!("want an invalid-image error saying {needle:?}, got {e}"),
        Ok(r) => panic!(
            "want an error saying {needle:?}, opened a {:?} image",
            r.subformat()
        ),
    }
}

/// Splits `[0, size)` into pieces of 64 KiB multiples (the last ends at `size`), shuffled.
fn shuffled_pieces(size: u64, rng: &mut Rng) -> Vec<(u64, u64)> {
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < size {
        let len = ((1 + rng.below(40)) * (64 << 10)).min(size - pos);
        pieces.push((pos, len));
        pos += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    pieces
}

/// Restores `want` through `w` in shuffled pieces: data written, zero pieces written as zeros,
/// as `write_zeros` or not at all.
fn restore(w: &dyn DiskWriter, want: &[u8], rng: &mut Rng) {
    for (off, len) in shuffled_pieces(want.len() as u64, rng) {
        let piece = &want[off as usize..(off + len) as usize];
        if piece.iter().any(|b| *b != 0) {
            w.write_at(piece, off).unwrap();
        } else {
            match rng.below(3) {
                0 => w.write_at(piece, off).unwrap(),
                1 => w.write_zeros(off, len).unwrap(),
                _ => {} // never written
            }
        }
    }
    w.finish().unwrap();
}

/// `qemu-img check` and `compare` on a written image. QEMU's vpc driver has no check: it
/// answers "This image format does not support checks" (exit 63), which is accepted; the
/// image must still open and compare equal.
fn qemu_accepts(src: &Path, out: &Path) {
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() || stderr.contains("does not support checks"),
        "qemu-img check: {stderr}"
    );
    let compare = qemu_img(&["compare", "-f", "raw", "-F", "vpc"], &[src, out]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

/// The CHS geometry of the specification's appendix, computed independently of the crate.
fn spec_geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// A parent locator: platform code and the locator's bytes.
type Locator = ([u8; 4], Vec<u8>);

/// A differencing VHD, built from the specification's structures.
struct Child {
    size: u64,
    block_size: u32,
    unique_id: [u8; 16],
    parent_id: [u8; 16],
    parent_name: String,
    locators: Vec<Locator>,
    /// Block index, its sector bitmap, its data (block_size bytes).
    blocks: Vec<(u64, Vec<u8>, Vec<u8>)>,
}

fn vhd_checksum(buf: &[u8], skip: usize) -> [u8; 4] {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    (!sum).to_be_bytes()
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

impl Child {
    fn footer(&self) -> [u8; 512] {
        let mut f = [0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&512u64.to_be_bytes());
        f[28..32].copy_from_slice(b"win ");
        f[36..40].copy_from_slice(b"Wi2k");
        f[40..48].copy_from_slice(&self.size.to_be_bytes());
        f[48..56].copy_from_slice(&self.size.to_be_bytes());
        let (c, h, s) = spec_geometry(self.size);
        f[56..58].copy_from_slice(&c.to_be_bytes());
        f[58] = h;
        f[59] = s;
        f[60..64].copy_from_slice(&4u32.to_be_bytes());
        f[68..84].copy_from_slice(&self.unique_id);
        let sum = vhd_checksum(&f, 64);
        f[64..68].copy_from_slice(&sum);
        f
    }

    fn write(&self, path: &Path) {
        let entries = self.size.div_ceil(u64::from(self.block_size));
        let table_len = (entries * 4).next_multiple_of(512);
        let mut out = vec![0u8; 1536 + table_len as usize];
        out[..512].copy_from_slice(&self.footer());
        let mut h = [0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        h[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        h[40..56].copy_from_slice(&self.parent_id);
        let name: Vec<u8> = self
            .parent_name
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .collect();
        h[64..64 + name.len()].copy_from_slice(&name);
        for (i, (code, data)) in self.locators.iter().enumerate() {
            let at = out.len() as u64;
            let space = (data.len() as u64).next_multiple_of(512);
            out.extend_from_slice(data);
            out.resize((at + space) as usize, 0);
            let l = 576 + 24 * i;
            h[l..l + 4].copy_from_slice(code);
            h[l + 4..l + 8].copy_from_slice(&(space as u32).to_be_bytes());
            h[l + 8..l + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            h[l + 16..l + 24].copy_from_slice(&at.to_be_bytes());
        }
        let sum = vhd_checksum(&h, 36);
        h[36..40].copy_from_slice(&sum);
        out[512..1536].copy_from_slice(&h);
        let mut bat = vec![0xffu8; table_len as usize];
        for (block, bitmap, data) in &self.blocks {
            let at = out.len() as u64;
            let bitmap_len = (u64::from(self.block_size) / 512)
                .div_ceil(8)
                .next_multiple_of(512);
            assert_eq!(bitmap.len() as u64, bitmap_len);
            assert_eq!(data.len() as u64, u64::from(self.block_size));
            out.extend_from_slice(bitmap);
            out.extend_from_slice(data);
            let b = *block as usize * 4;
            bat[b..b + 4].copy_from_slice(&((at / 512) as u32).to_be_bytes());
        }
        out[1536..1536 + table_len as usize].copy_from_slice(&bat);
        out.extend_from_slice(&self.footer());
        std::fs::write(path, out).unwrap();
    }

    /// What the disk reads as: `parent` overlaid with the sectors this image holds.
    fn expected(&self, parent: &[u8]) -> Vec<u8> {
        let mut want = parent.to_vec();
        want.resize(self.size as usize, 0);
        let bs = self.block_size as usize;
        for (block, bitmap, data) in &self.blocks {
            for sector in 0..bs / 512 {
                if bitmap[sector / 8] & (0x80 >> (sector % 8)) != 0 {
                    let at = *block as usize * bs + sector * 512;
                    let end = (at + 512).min(want.len());
                    if at < end {
                        want[at..end].copy_from_slice(&data[sector * 512..sector * 512 + end - at]);
                    }
                }
            }
        }
        want
    }
}

fn unique_id(path: &Path) -> [u8; 16] {
    let mut footer = [0u8; 512];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut footer, 0)
        .unwrap();
    footer[68..84].try_into().unwrap()
}

/// Child blocks over a disk of `size` in 2 MiB blocks: block 0 whole, block 2 every other
/// run of sectors, block 5 its first 3 sectors only, block 7 (past a parent hole) half.
fn child_blocks(size: u64, rng: &mut Rng) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    let bs = 2 * MIB as usize;
    let mut blocks = Vec::new();
    for (block, bitmap_of) in [
        (0u64, (|_| 0xff) as fn(usize) -> u8),
        (2, |i| if i % 3 == 0 { 0b1100_1010 } else { 0x0f }),
        (5, |i| if i == 0 { 0b1110_0000 } else { 0 }),
        (7, |i| if i < 256 { 0xff } else { 0 }),
    ] {
        if block * bs as u64 >= size {
            continue;
        }
        let mut bitmap = vec![0u8; 512];
        for (i, b) in bitmap.iter_mut().enumerate() {
            *b = bitmap_of(i);
        }
        let mut data = vec![0u8; bs];
        rng.fill(&mut data);
        blocks.push((block, bitmap, data));
    }
    blocks
}

fn fix_footer_checksum(bytes: &mut [u8], at: usize) {
    let sum = vhd_checksum(&bytes[at..at + 512], 64);
    bytes[at + 64..at + 68].copy_from_slice(&sum);
}

fn fix_header_checksum(bytes: &mut [u8]) {
    let sum = vhd_checksum(&bytes[512..1536], 36);
    bytes[548..552].copy_from_slice(&sum);
}
