//! VMDK (VMware Virtual Disk) images.
//!
//! Specification: VMware's technical note "Virtual Disk Format 5.0" (VMware ESXi and hosted
//! products; it extends "Virtual Disk Format 1.1"): the text descriptor, hosted sparse
//! extents and stream-optimized compressed sparse extents. Where the note and the files the
//! tools write differ, qemu's and VirtualBox's readers were followed (version 3 headers, the
//! footer found 1536 bytes before the end of the file, `createType` unquoted).
//!
//! Read:
//! - monolithicSparse: one hosted sparse extent file (`KDMV`, versions 1 to 3) with its
//!   embedded descriptor, grain directory and grain tables; unallocated grains read from the
//!   parent, or as zeros; the zeroed-grain entry (1, with header flag bit 2) reads as zeros.
//!   The redundant grain directory is ignored (it is a copy).
//! - streamOptimized: a sparse extent whose grains are deflate streams (zlib-wrapped or raw)
//!   behind a grain marker (LBA, size); the grain directory is found through the footer when
//!   the header's `gdOffset` is "at end" (-1).
//! - descriptor files (`# Disk DescriptorFile`): monolithicFlat, twoGbMaxExtentFlat,
//!   twoGbMaxExtentSparse, vmfs and others, whose `RW`/`RDONLY` extents are FLAT or VMFS (data
//!   at an offset of a file), SPARSE (a hosted sparse extent file) or ZERO; files relative to
//!   the descriptor's folder. A missing extent file, or one shorter than its extent, is
//!   invalid.
//! - delta disks: a descriptor with `parentFileNameHint` reads unallocated grains from that
//!   parent (through [`crate::open_in_chain`], so loops and deep chains are refused); a parent
//!   whose CID differs from the child's `parentCID` is refused as VMware refuses it, since the
//!   parent changed after the child was taken from it.
//!
//! Refused as unsupported, because their data is not in hosted image files or their format
//! is not the one the technote describes: raw device mappings and device-backed disks
//! (`fullDevice`, `partitionedDevice`, `vmfsRaw`, `vmfsRDM`... and VMFSRDM/VMFSRAW extents,
//! extent files that are not regular files), ESXi snapshot deltas (`vmfsSparse` COWD extents,
//! `seSparse`), NOACCESS extents, sparse versions above 3, compression algorithms other than
//! deflate, compressed grains without markers, grains outside 4 KiB..1 MiB.
//!
//! The header's `uncleanShutdown` flag is not acted on: vmvault reads what the file holds, as
//! qemu does (a disk in use should be backed up from a snapshot).
//!
//! Written ([`VmdkWriter`]): streamOptimized only, the kind OVF/OVA packages carry (version 3,
//! 64 KiB grains compressed at deflate level 1, grains in increasing order, grain tables,
//! directory and footer at the end; see `writer.rs` for why and how).

mod descriptor;
mod header;
mod reader;
mod sparse;
mod writer;

use std::io;
use std::path::Path;

pub use reader::VmdkReader;
pub use writer::VmdkWriter;

const FORMAT: &str = "vmdk";
/// Disks larger than 1 PiB are taken for damaged headers (VMware's limit is 62 TiB).
const MAX_DISK_BYTES: u64 = 1 << 50;
/// Descriptors are a few hundred bytes; 1 MiB leaves room for thousands of extents.
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// A read error for damaged image contents found after open.
fn data_error(path: &Path, detail: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: damaged vmdk image: {detail}", path.display()),
    )
}

/// Arbitrary bytes never panic, hang or allocate wildly: valid images (from qemu-img and from
/// the writer) mutated at many places, cut at many lengths, and random garbage.
#[cfg(test)]
mod tests {
    use std::fs::{self, File, OpenOptions};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::DiskWriter;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs");
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }

    /// A raw disk of 4 MiB with data of several kinds at a few places.
    fn source(dir: &Path) -> PathBuf {
        let raw = dir.join("src.raw");
        let f = File::create(&raw).unwrap();
        f.set_len(4 << 20).unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let random: Vec<u8> = (0..100_000).map(|_| rng.next() as u8).collect();
        f.write_all_at(&random, 0).unwrap();
        f.write_all_at(&b"text of a disk\n".repeat(5000), 1 << 20)
            .unwrap();
        f.write_all_at(&[0xab; 70_000], (4 << 20) - 70_000).unwrap();
        raw
    }

    fn images(dir: &Path) -> Vec<PathBuf> {
        let raw = source(dir);
        let mut out = Vec::new();
        for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
            let image = dir.join(format!("{sub}.vmdk"));
            let opt = format!("subformat={sub}");
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                &opt,
                raw.to_str().unwrap(),
                image.to_str().unwrap(),
            ]);
            out.push(image);
        }
        let data = fs::read(&raw).unwrap();
        let ours = dir.join("ours.vmdk");
        let w = super::VmdkWriter::create(&ours, data.len() as u64, false).unwrap();
        for off in (0..data.len()).step_by(1 << 20) {
            w.write_at(&data[off..off + (1 << 20)], off as u64).unwrap();
        }
        w.finish().unwrap();
        out.push(ours);
        out
    }

    /// Opens `path` and, if it opens, uses it as the backup would.
    fn exercise(path: &Path) {
        let Ok(r) = crate::open(path, "vmdk") else {
            return;
        };
        let size = r.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 3, size / 2 + 4095, size.saturating_sub(65536)] {
            let len = (size - off.min(size)).min(65536) as usize;
            let _ = r.read_at(&mut buf[..len], off.min(size));
            let _ = r.may_have_data(off, 65536);
        }
        let _ = r.may_have_data(0, size);
        let _ = r.allocated_bytes();
        let _ = r.subformat();
    }

    #[test]
    fn mutated_images_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        for image in images(dir.path()) {
            let base = fs::read(&image).unwrap();
            let len = base.len();
            let mut places: Vec<usize> = (0..512.min(len)).collect();
            places.extend((512..len.min(512 + 2048)).step_by(7));
            places.extend((0..len).step_by((len / 200).max(1)));
            places.extend((len.saturating_sub(1536)..len).step_by(5));
            // The grain directory and the first grain table, wherever the header puts them.
            let gd = u64::from_le_bytes(base[56..64].try_into().unwrap_or_default());
            if let Some(at) = gd.checked_mul(512).map(|a| a as usize).filter(|&a| a < len) {
                places.extend(at..(at + 64).min(len));
                let gt = u32::from_le_bytes(base[at..at + 4].try_into().unwrap_or_default());
                let gt = gt as usize * 512;
                places.extend((gt..(gt + 256).min(len)).filter(|&p| p < len));
            }
            let path = dir.path().join(format!(
                "m-{}",
                image.file_name().unwrap().to_string_lossy()
            ));
            fs::write(&path, &base).unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for &at in &places {
                let old = base[at];
                for new in [0u8, 0xff, old ^ 1, old ^ 0x80, b'9'] {
                    f.write_all_at(&[new], at as u64).unwrap();
                    exercise(&path);
                }
                f.write_all_at(&[old], at as u64).unwrap();
            }
            // Random words at random places, a few at a time.
            let mut rng = Rng(len as u64 | 1);
            for _ in 0..300 {
                let edits: Vec<(usize, u32)> = (0..1 + rng.next() % 4)
                    .map(|_| {
                        (
                            (rng.next() as usize) % len.saturating_sub(4).max(1),
                            rng.next() as u32,
                        )
                    })
                    .collect();
                for &(at, v) in &edits {
                    let n = 4.min(len - at);
                    f.write_all_at(&v.to_le_bytes()[..n], at as u64).unwrap();
                }
                exercise(&path);
                for &(at, _) in &edits {
                    let n = 4.min(len - at);
                    f.write_all_at(&base[at..at + n], at as u64).unwrap();
                }
            }
            for cut in (0..len)
                .step_by((len / 60).max(1))
                .chain([len - 1, len - 512])
            {
                f.set_len(cut as u64).unwrap();
                exercise(&path);
                f.write_all_at(&base[cut..], cut as u64).unwrap();
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.vmdk");
        let mut rng = Rng(12345);
        for n in 0..400usize {
            let len = (rng.next() % 6000) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            match n % 4 {
                0 => {}
                1 if len >= 4 => bytes[..4].copy_from_slice(b"KDMV"),
                2 if len >= 80 => {
                    // A plausible header with random fields.
                    bytes[..4].copy_from_slice(b"KDMV");
                    bytes[4..8].copy_from_slice(&(1 + (rng.next() % 3) as u32).to_le_bytes());
                    bytes[20..28].copy_from_slice(&(1u64 << (rng.next() % 12)).to_le_bytes());
                    bytes[44..48].copy_from_slice(&(1u32 << (rng.next() % 10)).to_le_bytes());
                    bytes[56..64].copy_from_slice(&(rng.next() % 12).to_le_bytes());
                    bytes[12..20].copy_from_slice(&(rng.next() % (1 << 40)).to_le_bytes());
                }
                _ => {
                    let text = format!(
                        "# Disk DescriptorFile\ncreateType=\"x\"\nRW {} {} \"{}\" {}\nparentFileNameHint=\"{}\"\n",
                        rng.next() % 100_000,
                        ["FLAT", "SPARSE", "ZERO", "VMFS", "WHAT"][(rng.next() % 5) as usize],
                        ["garbage.vmdk", "nothing", "/dev/zero", ""][(rng.next() % 4) as usize],
                        rng.next() % 1000,
                        ["garbage.vmdk", "none.vmdk", ""][(rng.next() % 3) as usize],
                    );
                    bytes = text.into_bytes();
                }
            }
            fs::write(&path, &bytes).unwrap();
            exercise(&path);
        }
    }
}
