//! Guest disks made with the real tools (`docs/design.md`, "File restore"): a source tree of
//! nested folders, long and non-ASCII names, a large sparse file, symlinks and hard links;
//! partitioned raw disks (GPT or MBR with logical partitions) holding ext4 (`mkfs.ext4 -d`),
//! FAT32 (`mkfs.fat` + `mcopy`) and NTFS (`mkntfs`, filled through `ntfs-3g`).

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const MIB: u64 = 1 << 20;

/// The tools these disks need, and the Debian package of each.
pub const GUEST_TOOLS: [(&str, &str); 9] = [
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("unzip", "unzip"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("mkntfs", "ntfs-3g"),
    ("ntfs-3g", "ntfs-3g"),
    ("sfdisk", "fdisk"),
    ("sgdisk", "gdisk"),
];

fn have(tool: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Whether the tools are there; else prints a skip (or panics when servers and tools are
/// required, as under `scripts/test`).
pub fn guest_tools() -> bool {
    let missing: Vec<&str> = GUEST_TOOLS
        .iter()
        .filter(|(t, _)| !have(t))
        .map(|(t, p)| if *t == *p { *t } else { *p })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if crate::servers_required() {
        panic!("missing tools: apt-get install {}", missing.join(" "));
    }
    eprintln!("skipped: missing {}", missing.join(", "));
    false
}

pub fn run(cmd: &mut Command) {
    let out = cmd
        .env("LC_ALL", "C.UTF-8")
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 2021-05-06 12:34:56 UTC time, given to some files so that extraction can be checked.
pub const OLD_TIME: u64 = 1_620_304_496;

/// What the source tree holds, to compare extractions with.
pub struct Tree {
    pub root: PathBuf,
    /// Relative paths of regular files.
    pub files: Vec<String>,
    /// (relative path, target) of symlinks.
    pub symlinks: Vec<(String, String)>,
    /// Pairs of hard-linked files.
    pub hard_links: Vec<(String, String)>,
    pub sparse: String,
    pub sparse_size: u64,
    pub big: String,
}

/// SplitMix64: the next of a deterministic stream of 64-bit values from `state`.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&splitmix(&mut s).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Builds the source tree. `links`: symlinks and hard links too (not for FAT).
pub fn make_tree(root: &Path, links: bool, big_size: usize) -> Tree {
    let mut t = Tree {
        root: root.to_path_buf(),
        files: Vec::new(),
        symlinks: Vec::new(),
        hard_links: Vec::new(),
        sparse: "data/sparse.img".into(),
        // Smaller trees (for many rounds of damage) get a smaller sparse file.
        sparse_size: (big_size as u64 * 16).clamp(4 * MIB, 48 * MIB),
        big: "data/big.bin".into(),
    };
    let mut put = |rel: &str, content: &[u8]| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        t.files.push(rel.to_string());
    };
    put(
        "etc/nginx/nginx.conf",
        b"worker_processes 4;\nhttp { server { listen 80; } }\n",
    );
    put("etc/hostname", b"web01\n");
    // Past an inode's 60 bytes: with inline_data, the rest goes into an extended attribute.
    put(
        "etc/motd",
        &b"Welcome to web01. Authorised use only; every session is logged.\n".repeat(2),
    );
    put(
        "home/user/docs/report.txt",
        &b"quarterly report\n".repeat(300),
    );
    put(
        "home/user/Ünïcödé ファイル.txt",
        "non-ASCII: ü ファイル\n".as_bytes(),
    );
    put(
        "home/user/a very long file name that goes well past the eight dot three limit.txt",
        b"long name\n",
    );
    let deep: String = (1..=12).map(|i| format!("level{i}/")).collect();
    put(&format!("deep/{deep}leaf.txt"), b"deep leaf\n");
    put(
        "var/lib/db/dump.sql",
        &b"INSERT INTO t VALUES (1);\n".repeat(1000),
    );
    put("var/backups/old.sql", b"-- old\n");
    put("empty.txt", b"");
    put(&t.big.clone(), &random_bytes(big_size, 7));
    fs::create_dir_all(root.join("var/empty-dir")).unwrap();
    // A sparse file: three islands of data in 4 to 48 MiB of holes.
    let sparse = root.join(&t.sparse);
    let f = File::create(&sparse).unwrap();
    f.set_len(t.sparse_size).unwrap();
    for (i, at) in [0, t.sparse_size / 2 + 4096, t.sparse_size - 4096]
        .into_iter()
        .enumerate()
    {
        f.write_all_at(&random_bytes(4096, 100 + i as u64), at)
            .unwrap();
    }
    drop(f);
    t.files.push(t.sparse.clone());
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(OLD_TIME);
    let report = root.join("home/user/docs/report.txt");
    File::options()
        .write(true)
        .open(&report)
        .unwrap()
        .set_times(FileTimes::new().set_modified(old))
        .unwrap();
    fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o640)).unwrap();
    if links {
        for (rel, target) in [
            ("home/user/link-to-docs", "docs"),
            ("etc/escape", "../../../../../etc/passwd"),
            ("etc/absolute", "/etc/shadow"),
        ] {
            std::os::unix::fs::symlink(target, root.join(rel)).unwrap();
            t.symlinks.push((rel.into(), target.into()));
        }
        let second = "home/user/docs/report-hardlink.txt";
        fs::hard_link(&report, root.join(second)).unwrap();
        t.hard_links
            .push(("home/user/docs/report.txt".into(), second.into()));
    }
    t
}

/// One partition of a disk to make: its size, and what sfdisk calls its type.
pub struct PartSpec {
    pub size_mib: u64,
    pub sfdisk_type: &'static str,
}

/// Partitions a sparse disk image of `size_mib` with sfdisk (`label`: `gpt` or `dos`);
/// returns each partition's (start, size) in bytes, in table order. With `dos`, partitions
/// after the first go into an extended partition as logical ones.
pub fn partition(disk: &Path, size_mib: u64, label: &str, parts: &[PartSpec]) -> Vec<(u64, u64)> {
    File::create(disk).unwrap().set_len(size_mib * MIB).unwrap();
    let mut script = format!("label: {label}\n");
    for (i, p) in parts.iter().enumerate() {
        if label == "dos" {
            if i == 1 {
                script.push_str(",,E\n");
            }
            script.push_str(&format!(",{}MiB,{}\n", p.size_mib, p.sfdisk_type));
        } else {
            script.push_str(&format!("size={}MiB, type={}\n", p.size_mib, p.sfdisk_type));
        }
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", disk.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {script}");
    let out = Command::new("sfdisk").arg("-J").arg(disk).output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !matches!(p["type"].as_str(), Some("5") | Some("f") | Some("85")))
        .map(|p| {
            (
                p["start"].as_u64().unwrap() * 512,
                p["size"].as_u64().unwrap() * 512,
            )
        })
        .collect()
}

pub fn ext4_into(disk: &Path, (start, size): (u64, u64), src: &Path, label: &str) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-d"])
        .arg(src)
        .arg("-E")
        .arg(format!("offset={start}"))
        .arg(disk)
        .arg(format!("{}k", size / 1024)));
}

pub fn fat_into(disk: &Path, (start, size): (u64, u64), src: &Path, label: &str) {
    run(Command::new("mkfs.fat")
        // One sector per cluster: enough clusters for FAT32 on a small partition.
        .args(["-F", "32", "-s", "1", "-n", label, "--offset"])
        .arg((start / 512).to_string())
        .arg(disk)
        .arg((size / 1024).to_string()));
    let image = format!("{}@@{start}", disk.display());
    let mut cmd = Command::new("mcopy");
    cmd.args(["-s", "-m", "-Q", "-i", &image]);
    for e in fs::read_dir(src).unwrap() {
        cmd.arg(e.unwrap().path());
    }
    run(cmd.arg("::/"));
}

/// Makes NTFS in a file of its own, fills it through an `ntfs-3g` mount (the only tool here
/// that makes folders, links and sparse files on NTFS), and copies its data into the disk.
pub fn ntfs_into(disk: &Path, (start, size): (u64, u64), src: &Path, label: &str, work: &Path) {
    let image = work.join(format!("ntfs-{start}.img"));
    File::create(&image).unwrap().set_len(size).unwrap();
    run(Command::new("mkntfs")
        .args(["-F", "-Q", "-q", "-L", label, "-p"])
        .arg((start / 512).to_string())
        .arg(&image));
    let mnt = work.join(format!("ntfs-{start}.mnt"));
    fs::create_dir_all(&mnt).unwrap();
    run(Command::new("ntfs-3g")
        .args(["-o", "streams_interface=windows,compression"])
        .arg(&image)
        .arg(&mnt));
    let copied = Command::new("cp")
        .args(["-a", "--sparse=always", "--no-preserve=ownership"])
        .arg(format!("{}/.", src.display()))
        .arg(&mnt)
        .output();
    // An alternate data stream, listed by `files ls --long`.
    let ads = fs::write(mnt.join("etc/hostname:backup"), b"old name\n");
    // NTFS-compressed files: made in a folder marked compressed (ntfs-3g's attribute xattr).
    let comp = mnt.join("compressed");
    let compressed = fs::create_dir(&comp).and_then(|()| {
        let attr = rustix::fs::getxattr(&comp, "system.ntfs_attrib_be", &mut [0u8; 4][..])
            .map(|_| 0x10u32 | 0x800)?;
        rustix::fs::setxattr(
            &comp,
            "system.ntfs_attrib_be",
            &attr.to_be_bytes(),
            rustix::fs::XattrFlags::empty(),
        )?;
        for (name, content) in compressed_files() {
            fs::write(comp.join(name), content)?;
        }
        Ok(())
    });
    run(Command::new("umount").arg(&mnt));
    let copied = copied.unwrap();
    assert!(
        copied.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&copied.stderr)
    );
    ads.unwrap();
    compressed.unwrap();
    copy_data(&image, disk, start);
    fs::remove_file(&image).unwrap();
}

/// The files `ntfs_into` writes NTFS-compressed into `/compressed`: text (compresses well),
/// random bytes (stored raw, unit by unit), and a mix with a run of zeros (a sparse unit).
pub fn compressed_files() -> Vec<(&'static str, Vec<u8>)> {
    let text: Vec<u8> = (0..20_000)
        .flat_map(|i| {
            format!("line {i}: the quick brown fox jumps over the lazy dog\n").into_bytes()
        })
        .collect();
    let mut mixed = text[..100_000].to_vec();
    mixed.extend(std::iter::repeat_n(0u8, 200_000));
    mixed.extend(random_bytes(70_000, 9));
    mixed.extend_from_slice(&text[..12_345]);
    vec![
        ("text.txt", text),
        ("random.bin", random_bytes(150_001, 8)),
        ("mixed.bin", mixed),
    ]
}

/// Copies the data (not the holes) of `from` into `to` at `offset`.
pub fn copy_data(from: &Path, to: &Path, offset: u64) {
    let mut src = File::open(from).unwrap();
    let dst = OpenOptions::new().write(true).open(to).unwrap();
    let len = src.metadata().unwrap().len();
    let mut pos = 0;
    let mut buf = vec![0u8; MIB as usize];
    while pos < len {
        let data = match rustix::fs::seek(&src, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(_) => break,
        };
        let hole = rustix::fs::seek(&src, rustix::fs::SeekFrom::Hole(data)).unwrap();
        let mut at = data;
        while at < hole {
            let n = (hole - at).min(buf.len() as u64) as usize;
            src.seek(SeekFrom::Start(at)).unwrap();
            std::io::Read::read_exact(&mut src, &mut buf[..n]).unwrap();
            dst.write_all_at(&buf[..n], offset + at).unwrap();
            at += n as u64;
        }
        pos = hole;
    }
}

/// The usual test disk (recipe E): GPT with ext4 (`rootfs`), FAT32 (`ESP`) and NTFS
/// (`Windows`), each holding `tree` (FAT without links).
pub fn recipe_e_disk(disk: &Path, label: &str, work: &Path, big_size: usize) -> (Tree, Tree) {
    let full = make_tree(&work.join("src-full"), true, big_size);
    let fat = make_tree(&work.join("src-fat"), false, big_size);
    let parts = partition(
        disk,
        400,
        label,
        &[
            PartSpec {
                size_mib: 120,
                sfdisk_type: if label == "gpt" { "linux" } else { "83" },
            },
            PartSpec {
                size_mib: 120,
                sfdisk_type: if label == "gpt" { "uefi" } else { "c" },
            },
            PartSpec {
                size_mib: 120,
                sfdisk_type: if label == "gpt" {
                    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
                } else {
                    "7"
                },
            },
        ],
    );
    assert_eq!(parts.len(), 3, "{parts:?}");
    ext4_into(disk, parts[0], &full.root, "rootfs");
    fat_into(disk, parts[1], &fat.root, "ESP");
    ntfs_into(disk, parts[2], &full.root, "Windows", work);
    (full, fat)
}
