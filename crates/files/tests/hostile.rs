//! Hostile guest disks, crafted here: partition tables that ask for absurd reads, folders that
//! loop, names that try to climb out, a symlink and a folder of one name, and hundreds of
//! randomly damaged filesystems. Each is refused or read safely: no panic, no hang, nothing
//! written outside the target.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmvault_files::{extract, FileDisk, FilesError, GuestDisk, MemDisk, Output, ReadAt, Target};
use vmvault_testkit::guest::{self, run};

fn mem(bytes: Vec<u8>) -> Arc<dyn ReadAt> {
    Arc::new(MemDisk(bytes))
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// A protective MBR and a GPT header at LBA 1 with these entry count and size, checksummed.
fn gpt_disk(entries: u32, entry_size: u32) -> Vec<u8> {
    let mut d = vec![0u8; 1 << 20];
    d[446 + 4] = 0xEE;
    d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xAA;
    let h = &mut d[512..1024];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&entries.to_le_bytes());
    h[84..88].copy_from_slice(&entry_size.to_le_bytes());
    let crc = crc32(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    d
}

#[test]
fn gpt_headers_asking_for_absurd_arrays_are_refused() {
    for (n, size) in [(u32::MAX, 128), (4, 64), (1 << 20, 4096), (128, 7)] {
        let started = Instant::now();
        let r = GuestDisk::open(mem(gpt_disk(n, size)));
        assert!(
            matches!(r, Err(FilesError::Damaged { .. })),
            "{n} x {size}: {:?}",
            r.err()
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}

#[test]
fn an_endless_chain_of_logical_partitions_is_cut() {
    // An extended partition whose every EBR points to the next sector: 40,000 of them.
    let sectors = 40_000usize;
    let mut d = vec![0u8; (sectors + 2) * 512];
    let entry = |d: &mut [u8], at: usize, ty: u8, start: u32, len: u32| {
        d[at + 4] = ty;
        d[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        d[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    };
    entry(&mut d, 446, 0x05, 1, sectors as u32);
    d[510] = 0x55;
    d[511] = 0xAA;
    for i in 0..sectors - 1 {
        let s = (1 + i) * 512;
        entry(&mut d, s + 446, 0x83, 1, 1);
        entry(&mut d, s + 462, 0x05, i as u32 + 1, 1);
        d[s + 510] = 0x55;
        d[s + 511] = 0xAA;
    }
    let started = Instant::now();
    let r = GuestDisk::open(mem(d));
    assert!(r.is_err(), "an endless chain was read whole");
    assert!(started.elapsed() < Duration::from_secs(5));
}

fn ext4_image(dir: &Path, src: &Path, extra: &[&str]) -> std::path::PathBuf {
    let img = dir.join("ext4.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^metadata_csum"])
        .args(extra)
        .arg("-d")
        .arg(src)
        .arg(&img));
    img
}

fn open_file(img: &Path) -> GuestDisk {
    GuestDisk::open(Arc::new(FileDisk::open(img).unwrap())).unwrap()
}

fn replace_once(img: &Path, from: &[u8], to: &[u8]) {
    let mut b = std::fs::read(img).unwrap();
    let at = b
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern in image");
    b[at..at + to.len()].copy_from_slice(to);
    std::fs::write(img, b).unwrap();
}

#[test]
fn a_folder_that_contains_itself_ends_and_writes_only_inside() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    std::fs::write(src.join("dir/f.txt"), b"x").unwrap();
    let img = ext4_image(work.path(), &src, &[]);
    // A second name for the root folder inside `dir`: a loop.
    run(Command::new("debugfs")
        .args(["-w", "-R", "ln / dir/loop"])
        .arg(&img));
    let g = open_file(&img);
    let Target::In(root) = g.resolve("/").unwrap() else {
        panic!()
    };
    let out = work.path().join("out");
    let started = Instant::now();
    let done = extract(root.fs, &root.path, "root", Output::Dir(&out)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        done.skipped
            .iter()
            .any(|s| s.reason.contains("deeper than")),
        "{done:?}"
    );
    let mut tar = Vec::new();
    extract(root.fs, &root.path, "root", Output::Tar(&mut tar)).unwrap();
    // Nothing beside the output folder.
    let names: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn a_symlink_and_a_folder_of_one_name_never_lead_outside() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    for first_link in [true, false] {
        let src = work.path().join(format!("src{first_link}"));
        std::fs::create_dir_all(&src).unwrap();
        let link = || std::os::unix::fs::symlink(&outside, src.join("ZZZZ_lnk")).unwrap();
        let dir = || {
            std::fs::create_dir(src.join("ZZZZ_dir")).unwrap();
            std::fs::write(src.join("ZZZZ_dir/evil"), b"pwned").unwrap();
        };
        if first_link {
            link();
            dir();
        } else {
            dir();
            link();
        }
        let img = ext4_image(work.path(), &src, &[]);
        // The folder takes the symlink's name: one folder holds two entries `ZZZZ_lnk`.
        replace_once(&img, b"ZZZZ_dir", b"ZZZZ_lnk");
        let g = open_file(&img);
        let Target::In(root) = g.resolve("/").unwrap() else {
            panic!()
        };
        let names: Vec<String> = root
            .fs
            .list(&[])
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names.iter().filter(|n| *n == "ZZZZ_lnk").count(),
            2,
            "{names:?}"
        );
        let out = work.path().join(format!("out{first_link}"));
        let done = extract(root.fs, &root.path, "root", Output::Dir(&out)).unwrap();
        assert!(!done.skipped.is_empty(), "{done:?}");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "written through a symlink"
        );
    }
}

#[test]
fn fat_names_that_climb_out_are_skipped() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("fat.img");
    run(Command::new("mkfs.fat").arg("-C").arg(&img).arg("1024"));
    let src = work.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // Spaces make mcopy write long names (UTF-16), which are then changed.
    std::fs::write(src.join("a q b.txt"), b"slash").unwrap();
    std::fs::write(src.join("c d"), b"dots").unwrap();
    let mut cmd = Command::new("mcopy");
    cmd.arg("-i")
        .arg(&img)
        .arg(src.join("a q b.txt"))
        .arg(src.join("c d"))
        .arg("::/");
    run(&mut cmd);
    // `a /b.txt`, and `..`.
    replace_once(&img, b"a\0 \0q\0", b"a\0 \0/\0");
    replace_once(&img, b"c\0 \0d\0\0\0", b".\0.\0\0\0\xff\xff");
    let g = open_file(&img);
    let Target::In(root) = g.resolve("/").unwrap() else {
        panic!()
    };
    let out = work.path().join("out");
    let done = extract(root.fs, &root.path, "root", Output::Dir(&out)).unwrap();
    assert_eq!(done.files, 0, "{done:?}");
    let all: Vec<_> = walk_dir(work.path());
    assert!(all.iter().all(|p| !p.ends_with("b.txt")), "{all:?}");
}

fn walk_dir(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_dir(&e.path()));
        }
    }
    out
}

/// Flips bytes of each filesystem's metadata area at random, six hundred times: every
/// damaged copy opens or is refused, and lists and extracts (to a tar sink) without a panic.
#[test]
fn randomly_damaged_filesystems_never_panic() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let (_full, _fat) = guest::recipe_e_disk(&disk, "gpt", work.path(), 64 << 10);
    let clean = std::fs::read(&disk).unwrap();
    let g = GuestDisk::open(mem(clean.clone())).unwrap();
    let starts: Vec<(u64, u64)> = g
        .volumes
        .iter()
        .map(|v| (v.partition.start, v.partition.size))
        .collect();
    drop(g);
    let mut seed = 0x5eed_u64;
    let mut next = || vmvault_testkit::splitmix(&mut seed);
    let started = Instant::now();
    let mut opened = 0;
    // One copy of the disk, damaged and mended in place round after round.
    let mut d = clean;
    for round in 0..600 {
        let (start, size) = starts[round % starts.len()];
        // Metadata lives near the start of each filesystem (and the MFT a few MiB in).
        let span = size.min(8 << 20);
        let flips: Vec<(usize, u8)> = (0..1 + next() % 64)
            .map(|_| ((start + next() % span) as usize, 1u8 << (next() % 8)))
            .collect();
        for &(at, bit) in &flips {
            d[at] ^= bit;
        }
        let disk = Arc::new(MemDisk(d));
        if let Ok(g) = GuestDisk::open(disk.clone()) {
            for v in &g.volumes {
                let Some(fs) = &v.fs else { continue };
                opened += 1;
                let mut sink = std::io::sink();
                let _ = extract(&**fs, &[], "root", Output::Tar(&mut sink));
                sink.flush().unwrap();
            }
        }
        d = Arc::try_unwrap(disk)
            .ok()
            .expect("the disk is free again")
            .0;
        for &(at, bit) in flips.iter().rev() {
            d[at] ^= bit;
        }
    }
    assert!(opened > 300, "only {opened} damaged filesystems opened");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{:?}",
        started.elapsed()
    );
}

/// Reads everything a filesystem lists, as the fuzz targets do.
fn read_all(fs: &dyn vmvault_files::Filesystem) {
    use vmvault_files::{Entry, Kind, Opener, Visit, Visitor, Walk};
    struct All<'a>(&'a dyn vmvault_files::Filesystem);
    impl Visitor for All<'_> {
        fn entry(
            &mut self,
            rel: &[String],
            e: &Entry,
            content: Option<&dyn Opener>,
        ) -> vmvault_files::Result<Visit> {
            if e.kind == Kind::File {
                let mut buf = vec![0u8; 1 << 16];
                match content.map(|c| c.open()) {
                    Some(Ok(mut f)) => {
                        let _ = std::io::Read::read(&mut f, &mut buf);
                    }
                    Some(Err(_)) => {}
                    None => {
                        let _ = self.0.read_range(&rel[1..], 0, &mut buf);
                    }
                }
            }
            Ok(Visit::Enter)
        }
    }
    let Ok(top) = fs.stat(&[]) else { return };
    let _ = Walk::new(fs).run(&[], &top, &mut vec![String::new()], &mut All(fs));
}

/// Inputs the fuzz targets found: a panic and an unbounded allocation inside `ext4-view`
/// (caught, and refused before it), and a FAT image whose folders loop, slow to walk.
#[test]
fn inputs_found_by_fuzzing() {
    vmvault_files::quiet_caught_panics();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    for (file, ty) in [
        ("ext4-read-bytes-panic.img", vmvault_files::FsType::Ext4),
        // Its superblock counts 200 million block groups: ext4-view asked for 12 GiB.
        ("ext4-descriptor-oom.img", vmvault_files::FsType::Ext4),
        ("fat-slow.img", vmvault_files::FsType::Fat),
    ] {
        let bytes = std::fs::read(data.join(file)).unwrap();
        let started = Instant::now();
        let part = vmvault_files::Part::whole(mem(bytes));
        if let Ok(fs) = vmvault_files::open_filesystem(ty, part) {
            read_all(&*fs);
        }
        eprintln!("{file}: {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(10), "{file}");
    }
}

/// The same for vmvault's own ext4 reader (inline data): 400 damaged copies.
#[test]
fn randomly_damaged_inline_ext4_never_panics() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tree = guest::make_tree(&work.path().join("src"), true, 64 << 10);
    let img = ext4_image(
        work.path(),
        &tree.root,
        &["-O", "inline_data", "-b", "1024"],
    );
    let mut d = std::fs::read(&img).unwrap();
    let mut seed = 0xfeed_u64;
    let mut next = || vmvault_testkit::splitmix(&mut seed);
    let started = Instant::now();
    let (mut opened, mut whole, mut bytes) = (0, 0, 0);
    for _ in 0..400 {
        // The superblock, group descriptors, bitmaps and the used inodes are in the first
        // 160 KiB with 1 KiB blocks.
        let flips: Vec<(usize, u8)> = (0..1 + next() % 16)
            .map(|_| ((next() % (160 << 10)) as usize, 1u8 << (next() % 8)))
            .collect();
        for &(at, bit) in &flips {
            d[at] ^= bit;
        }
        let disk = Arc::new(MemDisk(d));
        if let Ok(g) = GuestDisk::open(disk.clone()) {
            if let Some(fs) = &g.volumes[0].fs {
                opened += 1;
                if let Ok(done) = extract(&**fs, &[], "root", Output::Tar(&mut std::io::sink())) {
                    whole += u64::from(done.skipped.is_empty());
                    bytes += done.bytes;
                }
            }
        }
        d = Arc::try_unwrap(disk)
            .ok()
            .expect("the disk is free again")
            .0;
        for &(at, bit) in flips.iter().rev() {
            d[at] ^= bit;
        }
    }
    eprintln!("{opened} opened, {whole} extracted whole, {bytes} bytes");
    assert!(opened > 100, "only {opened} opened");
    assert!(whole < opened, "no damage reached the filesystem");
    assert!(started.elapsed() < Duration::from_secs(120));
}
