//! VHD against the real thing: images made by qemu-img and qemu-io (QEMU's "vpc" driver) are
//! read through vmvault's reader and compared with their raw sources; images vmvault writes
//! are checked and compared by qemu-img. QEMU cannot make differencing VHDs, so those are
//! built here, byte by byte from the specification, over parents QEMU made.

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

#[test]
fn vhd_dynamic_images_from_qemu_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Not a multiple of the 2 MiB block size, nor of a CHS cylinder.
    let size = 37 * MIB + 3 * 512;
    let want = make_raw(&src, size, 1);
    for opts in ["subformat=dynamic", "subformat=dynamic,force_size=on"] {
        let image = dir.path().join("d.vhd");
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "auto").unwrap();
        assert_eq!(r.format(), "vhd");
        assert_eq!(r.subformat().as_deref(), Some("dynamic"));
        assert!(r.backing().is_none());
        assert_eq!(r.size(), qemu_virtual_size(&image), "{opts}");
        assert!(r.size() >= size);
        if opts.contains("force_size") {
            assert_eq!(r.size(), size);
        }
        let got = read_all(r.as_ref(), MIB as usize);
        assert_same_disk(&got, &want, opts);
        assert_eq!(
            got,
            qemu_raw(&image, dir.path()),
            "{opts}: as qemu-img reads it"
        );
        // Unaligned pieces cross block boundaries mid-sector.
        assert_eq!(read_all(r.as_ref(), 777_777), got);
        assert_parallel_reads(r.as_ref(), &got);

        // Holes where QEMU allocated nothing, data where it did.
        let mut allocated = 0;
        for (start, len, data) in qemu_map(&image) {
            assert_eq!(
                r.may_have_data(start, len).unwrap(),
                data,
                "{opts}: {start}+{len}"
            );
            if data {
                allocated += len;
            }
        }
        assert!(
            !r.may_have_data(8 * MIB, 6 * MIB).unwrap(),
            "the forced hole"
        );
        assert!(r.may_have_data(size - 4096, 4096).unwrap());
        assert_eq!(r.allocated_bytes().unwrap(), allocated);
        assert!(allocated < size);
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn vhd_fixed_images_from_qemu_read_like_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 29 * MIB + 5 * 512;
    let want = make_raw(&src, size, 2);
    for opts in ["subformat=fixed", "subformat=fixed,force_size=on"] {
        let image = dir.path().join("f.vhd");
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "auto").unwrap();
        assert_eq!(r.format(), "vhd");
        assert_eq!(r.subformat().as_deref(), Some("fixed"));
        assert_eq!(r.size(), qemu_virtual_size(&image), "{opts}");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), r.size() + 512);
        let got = read_all(r.as_ref(), MIB as usize);
        assert_same_disk(&got, &want, opts);
        assert_eq!(
            got,
            qemu_raw(&image, dir.path()),
            "{opts}: as qemu-img reads it"
        );
        assert_parallel_reads(r.as_ref(), &got);
        // QEMU leaves zeros unwritten: holes in the data area are reported.
        assert!(
            !r.may_have_data(8 * MIB, 6 * MIB).unwrap(),
            "the forced hole"
        );
        for off in (0..r.size()).step_by(MIB as usize) {
            let len = MIB.min(r.size() - off);
            let chunk = &got[off as usize..(off + len) as usize];
            if chunk.iter().any(|b| *b != 0) {
                assert!(r.may_have_data(off, len).unwrap(), "data at {off}");
            }
        }
        let allocated = r.allocated_bytes().unwrap();
        assert!(allocated > 0 && allocated < size - 6 * MIB, "{allocated}");
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn vhd_qemu_io_writes_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let writes: [(u64, u64); 5] = [
        (0, 4096),
        (3 * MIB - 512, 1024), // across a block boundary, unaligned
        (5 * MIB + 7 * 512, 64 << 10),
        (16 * MIB, 2 * MIB), // exactly one block
        (63 * MIB, MIB),     // the last MiB
    ];
    for subformat in ["dynamic", "fixed"] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={subformat},force_size=on"),
            ],
            &[&image, Path::new("64M")],
        );
        let mut want = vec![0u8; 64 * MIB as usize];
        for (i, &(off, len)) in writes.iter().enumerate() {
            let pattern = 0xab + i as u8;
            qemu_io_write(&image, pattern, off, len);
            want[off as usize..(off + len) as usize].fill(pattern);
        }
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.subformat().as_deref(), Some(subformat));
        assert_eq!(r.size(), 64 * MIB);
        assert_eq!(read_all(r.as_ref(), MIB as usize), want, "{subformat}");
        let mut buf = vec![0u8; 1000];
        r.read_at(&mut buf, 3 * MIB - 600).unwrap();
        assert_eq!(
            buf,
            want[(3 * MIB - 600) as usize..(3 * MIB + 400) as usize]
        );
        assert!(r.read_at(&mut buf, 64 * MIB - 999).is_err(), "past the end");
        // Each 2 MiB block holds data exactly when a write touched it.
        for block in 0..32u64 {
            let (s, e) = (block * 2 * MIB, (block + 1) * 2 * MIB);
            let touched = writes.iter().any(|&(o, l)| o < e && s < o + l);
            assert_eq!(
                r.may_have_data(s, 2 * MIB).unwrap(),
                touched,
                "{subformat} block {block}"
            );
        }
        if subformat == "dynamic" {
            // Blocks 0, 1, 2, 8, 31: the 2nd write spans blocks 1 and 2.
            assert_eq!(r.allocated_bytes().unwrap(), 5 * 2 * MIB);
        }
    }
}

#[test]
fn vhd_mostly_empty_100g_disks_open_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let size = 100u64 << 30;
    for subformat in ["dynamic", "fixed"] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={subformat},force_size=on"),
            ],
            &[&image, Path::new("100G")],
        );
        qemu_io_write(&image, 0x77, 50 << 30, MIB);
        let started = Instant::now();
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.size(), size);
        // Every 1 MiB chunk, as a backup asks.
        let with_data: Vec<u64> = (0..size / MIB)
            .filter(|i| r.may_have_data(i * MIB, MIB).unwrap())
            .collect();
        // A dynamic disk allocates whole 2 MiB blocks; qemu-img writes the first 4 KiB of a
        // new file (zeros, to probe alignment), which a fixed disk's data area reports.
        let written = (50 << 30) / MIB;
        let want = match subformat {
            "dynamic" => vec![written, written + 1],
            _ => vec![0, written],
        };
        assert_eq!(with_data, want, "{subformat}");
        assert!(!r.may_have_data(2 * MIB, size / 2 - 2 * MIB).unwrap());
        assert!(r.may_have_data(0, size).unwrap());
        let mut buf = vec![0u8; MIB as usize];
        r.read_at(&mut buf, 50 << 30).unwrap();
        assert!(buf.iter().all(|b| *b == 0x77));
        eprintln!(
            "{subformat} 100 GiB: opened and mapped in {:?}",
            started.elapsed()
        );
        let allocated = r.allocated_bytes().unwrap();
        match subformat {
            "dynamic" => assert_eq!(allocated, 2 * MIB),
            _ => assert!((MIB..8 * MIB).contains(&allocated), "{allocated}"),
        }
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

#[test]
fn vhd_dynamic_writer_output_is_what_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Not a multiple of 512: the last piece ends mid-sector.
    let size = 45 * MIB + 3 * (64 << 10) + 1000;
    let want = make_raw(&src, size, 3);
    let out = dir.path().join("out.vhd");
    let w = vmvault_disk::create(&out, "vhd", size, false).unwrap();
    restore(w.as_ref(), &want, &mut Rng(30));
    drop(w);
    qemu_accepts(&src, &out);
    let vsize = size.next_multiple_of(512);
    assert_eq!(qemu_virtual_size(&out), vsize, "whole sectors");
    let r = vmvault_disk::open(&out, "vhd").unwrap();
    assert_eq!(r.subformat().as_deref(), Some("dynamic"));
    assert_same_disk(&read_all(r.as_ref(), MIB as usize), &want, "read back");
    // A block QEMU finds allocated holds data; zero blocks were left unallocated.
    for (start, len, data) in qemu_map(&out) {
        assert_eq!(r.may_have_data(start, len).unwrap(), data);
        let chunk = &want[start as usize..((start + len) as usize).min(want.len())];
        assert_eq!(data, chunk.iter().any(|b| *b != 0), "block at {start}");
    }
    assert!(!r.may_have_data(8 * MIB, 6 * MIB).unwrap());
    // Unwritten parts of allocated blocks are holes: the file takes about what the data does.
    let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
    let src_on_disk = std::fs::metadata(&src).unwrap().blocks() * 512;
    assert!(
        on_disk <= src_on_disk + 4 * MIB,
        "{on_disk} vs {src_on_disk}"
    );

    // Refuses an existing file unless told to overwrite it.
    assert!(matches!(
        vmvault_disk::create(&out, "vhd", size, false),
        Err(DiskError::Exists { .. })
    ));
    let w = VhdWriter::create_dynamic(&out, 4 * MIB, true).unwrap();
    w.finish().unwrap();
    let r = vmvault_disk::open(&out, "vhd").unwrap();
    assert_eq!(r.size(), 4 * MIB);
    assert!(!r.may_have_data(0, 4 * MIB).unwrap());
    assert_eq!(qemu_virtual_size(&out), 4 * MIB);

    assert!(matches!(
        VhdWriter::create_dynamic(&dir.path().join("huge.vhd"), 2041 << 30, false),
        Err(DiskError::Unsupported { .. })
    ));
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

#[test]
fn vhd_fixed_writer_output_is_what_qemu_and_azure_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 45 * MIB + 12345;
    let want = make_raw(&src, size, 4);
    let out = dir.path().join("out.vhd");
    let w = vmvault_disk::create(&out, "vhd-fixed", size, false).unwrap();
    restore(w.as_ref(), &want, &mut Rng(40));
    drop(w);
    qemu_accepts(&src, &out);
    // Rounded up to whole MiB, as Azure requires.
    let vsize = 46 * MIB;
    assert_eq!(qemu_virtual_size(&out), vsize);
    let bytes_len = std::fs::metadata(&out).unwrap().len();
    assert_eq!(bytes_len, vsize + 512);
    let mut footer = [0u8; 512];
    File::open(&out)
        .unwrap()
        .read_exact_at(&mut footer, vsize)
        .unwrap();
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(
        u64::from_be_bytes(footer[48..56].try_into().unwrap()),
        vsize
    );
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed"
    );
    let (c, h, s) = spec_geometry(vsize);
    assert_eq!(u16::from_be_bytes([footer[56], footer[57]]), c);
    assert_eq!((footer[58], footer[59]), (h, s));
    let r = vmvault_disk::open(&out, "auto").unwrap();
    assert_eq!(r.subformat().as_deref(), Some("fixed"));
    assert_eq!(r.size(), vsize);
    assert_same_disk(&read_all(r.as_ref(), MIB as usize), &want, "read back");
    // Never-written ranges are holes.
    assert!(!r.may_have_data(8 * MIB, 6 * MIB).unwrap());
    assert!(!r
        .may_have_data(
            size.next_multiple_of(4096),
            vsize - size.next_multiple_of(4096)
        )
        .unwrap());
    let on_disk = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(on_disk < vsize - 6 * MIB, "sparse: {on_disk}");
    assert!(matches!(
        VhdWriter::create_fixed(&dir.path().join("huge.vhd"), 2041 << 30, false),
        Err(DiskError::Unsupported { .. })
    ));
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

#[test]
fn vhd_differencing_chains_read_through_their_parents() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("base.raw");
    let size = 20 * MIB;
    let base_bytes = make_raw(&src, size, 5);
    let base = dir.path().join("base.vhd");
    qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ],
        &[&src, &base],
    );
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    qemu_img(
        &["create", "-q", "-f", "vpc"],
        &[&other.join("base.vhd"), Path::new("20M")],
    );
    let mut rng = Rng(50);
    let abs = base.canonicalize().unwrap();
    let abs_str = abs.to_str().unwrap().to_string();
    let url = format!("file://localhost{}", abs_str.replace(' ', "%20"));
    let locator_sets: Vec<(&str, Vec<Locator>)> = vec![
        ("W2ru relative", vec![(*b"W2ru", utf16le(".\\base.vhd"))]),
        (
            "W2ru in another case",
            vec![(*b"W2ru", utf16le(".\\BASE.VHD"))],
        ),
        ("W2ku absolute", vec![(*b"W2ku", utf16le(&abs_str))]),
        (
            "W2ku Windows path, parent beside the child",
            vec![(*b"W2ku", utf16le("D:\\Hyper-V\\Disks\\base.vhd"))],
        ),
        ("MacX file URL", vec![(*b"MacX", url.into_bytes())]),
        (
            "a stale W2ru to a namesake, the W2ku to the parent",
            vec![
                (*b"W2ru", utf16le(".\\other\\base.vhd")),
                (*b"W2ku", utf16le(&abs_str)),
            ],
        ),
        (
            "W2ru wins over a W2ku that points elsewhere",
            vec![
                (*b"W2ku", utf16le("/nonexistent/base.vhd")),
                (*b"W2ru", utf16le(".\\base.vhd")),
            ],
        ),
    ];
    for (what, locators) in locator_sets {
        let child = Child {
            size,
            block_size: 2 * MIB as u32,
            unique_id: [0x42; 16],
            parent_id: unique_id(&base),
            parent_name: "base.vhd".into(),
            locators,
            blocks: child_blocks(size, &mut rng),
        };
        let path = dir.path().join("child.vhd");
        child.write(&path);
        let want = child.expected(&base_bytes);
        let r = vmvault_disk::open(&path, "auto").unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.subformat().as_deref(), Some("differencing"), "{what}");
        let parent = r.backing().expect("a parent");
        assert_eq!(parent.subformat().as_deref(), Some("dynamic"));
        assert_eq!(parent.path().canonicalize().unwrap(), abs, "{what}");
        assert_eq!(read_all(r.as_ref(), MIB as usize), want, "{what}");
        assert_eq!(read_all(r.as_ref(), 100_000), want, "{what}: unaligned");
        assert_parallel_reads(r.as_ref(), &want);
        // Set bits: 2 MiB + block 2 (half of its sectors) + 3 sectors + 1 MiB.
        let bits: u64 = child
            .blocks
            .iter()
            .map(|(_, b, _)| b.iter().map(|x| u64::from(x.count_ones())).sum::<u64>())
            .sum();
        assert_eq!(r.allocated_bytes().unwrap(), bits * 512, "{what}");
        for block in 0..size / (2 * MIB) {
            let (s, e) = (block * 2 * MIB, (block + 1) * 2 * MIB);
            let has = r.may_have_data(s, 2 * MIB).unwrap();
            let mine = child.blocks.iter().any(|b| b.0 == block);
            assert_eq!(
                has,
                mine || parent.may_have_data(s, 2 * MIB).unwrap(),
                "{what} {block}"
            );
            if !has {
                assert!(want[s as usize..e as usize].iter().all(|b| *b == 0));
            }
        }
        // The parent's forced hole (8..14 MiB) is blocks 4..6; block 5 has 3 sectors here.
        assert!(!r.may_have_data(8 * MIB, 2 * MIB).unwrap());
        assert!(r.may_have_data(10 * MIB, 2 * MIB).unwrap());
        assert!(!r
            .may_have_data(10 * MIB + 3 * 512, 2 * MIB - 3 * 512)
            .unwrap());
        assert!(r.may_have_data(14 * MIB, MIB).unwrap());
    }

    // Three deep: base <- mid <- top, the top bigger than its parents.
    let mid = dir.path().join("mid.vhd");
    let mid_child = Child {
        size,
        block_size: 2 * MIB as u32,
        unique_id: [0x51; 16],
        parent_id: unique_id(&base),
        parent_name: "base.vhd".into(),
        locators: vec![(*b"W2ru", utf16le(".\\base.vhd"))],
        blocks: child_blocks(size, &mut rng),
    };
    mid_child.write(&mid);
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let top = sub.join("top.vhd");
    let top_child = Child {
        size: size + 4 * MIB,
        block_size: 512 << 10,
        unique_id: [0x52; 16],
        parent_id: [0x51; 16],
        parent_name: "mid.vhd".into(),
        locators: vec![(*b"W2ru", utf16le("..\\mid.vhd"))],
        blocks: vec![
            (1, vec![0xf0; 512], vec![0x99; 512 << 10]),
            (45, vec![0x01; 512], vec![0x98; 512 << 10]),
        ],
    };
    top_child.write(&top);
    let want = top_child.expected(&mid_child.expected(&base_bytes));
    let r = vmvault_disk::open(&top, "vhd").unwrap();
    assert_eq!(r.size(), size + 4 * MIB);
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);
    assert_eq!(
        r.backing()
            .unwrap()
            .backing()
            .unwrap()
            .subformat()
            .as_deref(),
        Some("dynamic")
    );
    // Past the parents' end: only block 45 (22.5 MiB) has data.
    assert!(!r.may_have_data(size, 2 * MIB).unwrap());
    assert!(r.may_have_data(size + 2 * MIB, 2 * MIB).unwrap());
}

#[test]
fn vhd_broken_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let child = |id: u8, parent_id: [u8; 16], locator: &str| Child {
        size,
        block_size: 2 * MIB as u32,
        unique_id: [id; 16],
        parent_id,
        parent_name: String::new(),
        locators: vec![(*b"W2ru", utf16le(locator))],
        blocks: vec![(1, vec![0xff; 512], vec![id; 2 * MIB as usize])],
    };
    // a -> b -> a
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    child(0xa, [0xb; 16], ".\\b.vhd").write(&a);
    child(0xb, [0xa; 16], ".\\a.vhd").write(&b);
    assert_invalid(vmvault_disk::open(&a, "auto"), "loops");
    // a -> a
    child(0xa, [0xa; 16], ".\\a.vhd").write(&a);
    assert_invalid(vmvault_disk::open(&a, "vhd"), "loops");
    // A missing parent says where it was looked for.
    child(0xa, [0xb; 16], ".\\gone.vhd").write(&a);
    let msg = assert_invalid(vmvault_disk::open(&a, "vhd"), "parent image not found");
    assert!(msg.contains("gone.vhd"), "{msg}");
    // A parent that is not the one the child was made from.
    let c = dir.path().join("c.vhd");
    qemu_img(&["create", "-q", "-f", "vpc"], &[&c, Path::new("4M")]);
    child(0xa, [0xb; 16], ".\\c.vhd").write(&a);
    assert_invalid(vmvault_disk::open(&a, "vhd"), "unique id");
    // Only locators vmvault does not follow.
    let mut only_old = child(0xa, [0xb; 16], "");
    only_old.locators = vec![(*b"Wi2k", b"C:\\old.vhd".to_vec())];
    only_old.write(&a);
    let msg = assert_invalid(vmvault_disk::open(&a, "vhd"), "parent");
    assert!(msg.contains("Wi2k"), "{msg}");
    // A locator past the end of the file.
    child(0xa, [0xb; 16], ".\\b.vhd").write(&a);
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[512 + 576 + 16..512 + 576 + 24].copy_from_slice(&(1u64 << 40).to_be_bytes());
    fix_header_checksum(&mut bytes);
    std::fs::write(&a, &bytes).unwrap();
    assert_invalid(vmvault_disk::open(&a, "vhd"), "parent locator 0");
}

fn fix_footer_checksum(bytes: &mut [u8], at: usize) {
    let sum = vhd_checksum(&bytes[at..at + 512], 64);
    bytes[at + 64..at + 68].copy_from_slice(&sum);
}

fn fix_header_checksum(bytes: &mut [u8]) {
    let sum = vhd_checksum(&bytes[512..1536], 36);
    bytes[548..552].copy_from_slice(&sum);
}

#[test]
fn vhd_bad_images_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 16 * MIB, 6);
    let dynamic = dir.path().join("d.vhd");
    qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
        ],
        &[&src, &dynamic],
    );
    let fixed = dir.path().join("f.vhd");
    qemu_img(
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed,force_size=on",
        ],
        &[&src, &fixed],
    );
    let good_d = std::fs::read(&dynamic).unwrap();
    let good_f = std::fs::read(&fixed).unwrap();
    let bad = dir.path().join("bad.vhd");
    let try_bytes = |bytes: &[u8], needle: &str| -> String {
        std::fs::write(&bad, bytes).unwrap();
        assert_invalid(vmvault_disk::open(&bad, "vhd"), needle)
    };

    // Truncated at several points.
    let len = good_d.len();
    for cut in [0, 1, 511, 600, 1536 + 4, 4096, len / 2, len - 513] {
        try_bytes(&good_d[..cut], "");
    }
    try_bytes(&good_d[..4096], "past the end");
    try_bytes(&good_d[..len / 2], "truncated");
    for cut in [0, 100, 4096, good_f.len() / 2, good_f.len() - 1] {
        try_bytes(&good_f[..cut], "");
    }
    // A fixed disk that lost data but kept its footer.
    let mut short = good_f[..good_f.len() - 512 - 4096].to_vec();
    short.extend_from_slice(&good_f[good_f.len() - 512..]);
    try_bytes(&short, "truncated");

    // Checksums.
    let mut b = good_d.clone();
    b[48] ^= 1;
    try_bytes(&b, "checksum");
    let mut b = good_d.clone();
    b[512 + 40] ^= 1;
    try_bytes(&b, "checksum");
    let mut b = good_f.clone();
    let at = b.len() - 512;
    b[at + 30] ^= 0x20;
    try_bytes(&b, "checksum");

    // Flipped fields, checksums fixed so that the field itself is what is refused.
    let edit_footer = |f: &dyn Fn(&mut [u8]), fixed_disk: bool| {
        let mut b = if fixed_disk {
            good_f.clone()
        } else {
            good_d.clone()
        };
        let at = if fixed_disk { b.len() - 512 } else { 0 };
        f(&mut b[at..at + 512]);
        fix_footer_checksum(&mut b, at);
        b
    };
    let edit_header = |f: &dyn Fn(&mut [u8])| {
        let mut b = good_d.clone();
        f(&mut b[512..1536]);
        fix_header_checksum(&mut b);
        b
    };
    try_bytes(&edit_footer(&|f| f[12] = 2, false), "version");
    try_bytes(&edit_footer(&|f| f[63] = 7, false), "disk type 7");
    try_bytes(&edit_footer(&|f| f[63] = 1, true), "disk type 1");
    try_bytes(&edit_header(&|h| h[7] = b'f'), "cxsparse");
    try_bytes(&edit_header(&|h| h[25] = 3), "version");
    try_bytes(
        &edit_header(&|h| h[32..36].copy_from_slice(&3000u32.to_be_bytes())),
        "block size",
    );
    try_bytes(
        &edit_header(&|h| h[28..32].copy_from_slice(&1u32.to_be_bytes())),
        "too few",
    );
    // Tables pointing past the end.
    try_bytes(
        &edit_footer(
            &|f| f[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes()),
            false,
        ),
        "dynamic disk header at offset",
    );
    try_bytes(
        &edit_footer(
            &|f| f[16..24].copy_from_slice(&u64::MAX.to_be_bytes()),
            false,
        ),
        "past the end",
    );
    try_bytes(
        &edit_header(&|h| h[16..24].copy_from_slice(&(1u64 << 33).to_be_bytes())),
        "block allocation table at offset",
    );
    let mut b = good_d.clone();
    b[1536..1540].copy_from_slice(&0x00ff_0000u32.to_be_bytes());
    try_bytes(&b, "block 0 at offset");
    let mut b = good_d.clone();
    b[1536..1540].copy_from_slice(&1u32.to_be_bytes());
    try_bytes(&b, "overlaps");
    // Absurd virtual sizes.
    for size in [u64::MAX, 1 << 60, 1 << 49] {
        let big = edit_footer(&|f| f[48..56].copy_from_slice(&size.to_be_bytes()), false);
        try_bytes(&big, "");
        try_bytes(
            &edit_footer(&|f| f[48..56].copy_from_slice(&size.to_be_bytes()), true),
            "truncated",
        );
    }
    try_bytes(
        &edit_footer(
            &|f| f[48..56].copy_from_slice(&(1u64 << 49).to_be_bytes()),
            false,
        ),
        "absurd",
    );
    try_bytes(
        &edit_footer(
            &|f| f[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes()),
            false,
        ),
        "too few",
    );
    // No footer at all.
    let mut garbage = vec![0u8; 8192];
    Rng(7).fill(&mut garbage);
    try_bytes(&garbage, "no footer");

    // Damage the reader tolerates: the footer at the end lost (the copy at 0 is used), or
    // the copy at 0 lost (the end's is used).
    let mut b = good_d.clone();
    b.truncate(len - 512);
    std::fs::write(&bad, &b).unwrap();
    let want = std::fs::read(&src).unwrap();
    let r = vmvault_disk::open(&bad, "vhd").unwrap();
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);
    let mut b = good_d.clone();
    b[..512].fill(0);
    std::fs::write(&bad, &b).unwrap();
    let r = vmvault_disk::open(&bad, "vhd").unwrap();
    assert_eq!(read_all(r.as_ref(), MIB as usize), want);

    // Not a file.
    assert!(matches!(
        vmvault_disk::open(dir.path(), "vhd"),
        Err(DiskError::NotADisk { .. })
    ));
}

/// A 256 MiB disk read as a backup reads it: `may_have_data`, then `read_at`, 1 MiB at a time.
#[test]
fn vhd_sequential_read_of_256_mib() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 256 * MIB;
    make_raw(&src, size, 8);
    let raw = RawReader::open(&src).unwrap();
    for (subformat, opts) in [
        ("dynamic", "subformat=dynamic,force_size=on"),
        ("fixed", "subformat=fixed,force_size=on"),
    ] {
        let image = dir.path().join(format!("{subformat}.vhd"));
        qemu_img(
            &["convert", "-f", "raw", "-O", "vpc", "-o", opts],
            &[&src, &image],
        );
        let r = vmvault_disk::open(&image, "vhd").unwrap();
        assert_eq!(r.size(), size);
        let mut buf = vec![0u8; MIB as usize];
        let mut want = vec![0u8; MIB as usize];
        let started = Instant::now();
        let mut read = 0u64;
        for off in (0..size).step_by(MIB as usize) {
            if r.may_have_data(off, MIB).unwrap() {
                r.read_at(&mut buf, off).unwrap();
                read += MIB;
            } else {
                buf.fill(0);
            }
            raw.read_at(&mut want, off).unwrap();
            assert!(buf == want, "{subformat}: MiB at {off}");
        }
        let checked = started.elapsed();
        // For comparison (not asserted): the same pass over the VHD alone and over the raw file.
        let mut time_pass = |r: &dyn DiskReader| {
            let started = Instant::now();
            for off in (0..size).step_by(MIB as usize) {
                if r.may_have_data(off, MIB).unwrap() {
                    r.read_at(&mut buf, off).unwrap();
                }
            }
            started.elapsed()
        };
        let vhd_time = time_pass(r.as_ref());
        let raw_time = time_pass(&raw);
        eprintln!(
            "{subformat}: 256 MiB checked in {checked:?} ({} MiB read); a backup pass takes \
             {vhd_time:?}, {raw_time:?} over the raw file",
            read / MIB
        );
    }
}
