//! Partitioned disks made with the real tools (GPT and MBR; ext4, FAT32, NTFS), read through
//! the library: partitions, labels, listing, and extraction compared with the source files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use vmvault_files::{extract, FileDisk, FsType, GuestDisk, Kind, Output, ReadAt, Target};
use vmvault_testkit::guest::{self, Tree, OLD_TIME};

fn open(disk: &Path) -> GuestDisk {
    let d: Arc<dyn ReadAt> = Arc::new(FileDisk::open(disk).unwrap());
    GuestDisk::open(d).unwrap()
}

/// Every file, symlink and hard link of `tree` is in `out` as it was.
pub fn same_tree(tree: &Tree, out: &Path, links: bool, modes: bool) {
    for rel in &tree.files {
        let a = std::fs::read(tree.root.join(rel)).unwrap();
        let b = std::fs::read(out.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(a == b, "{rel} differs");
    }
    let sparse = std::fs::metadata(out.join(&tree.sparse)).unwrap();
    assert_eq!(sparse.len(), tree.sparse_size);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "{} is not sparse",
        tree.sparse
    );
    let report = std::fs::metadata(out.join("home/user/docs/report.txt")).unwrap();
    assert!(
        (report.mtime() - OLD_TIME as i64).abs() <= 2,
        "mtime {}",
        report.mtime()
    );
    if modes {
        let m = std::fs::metadata(out.join("etc/hostname")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
    }
    assert!(out.join("var/empty-dir").is_dir());
    if links {
        for (rel, target) in &tree.symlinks {
            let t = std::fs::read_link(out.join(rel)).unwrap();
            assert_eq!(t.to_str().unwrap(), target, "{rel}");
        }
    }
}

#[test]
fn gpt_disk_with_ext4_fat_and_ntfs() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let (full, fat) = guest::recipe_e_disk(&disk, "gpt", work.path(), 3 << 20);
    let g = open(&disk);
    let kinds: Vec<_> = g.volumes.iter().map(|v| v.fs_type).collect();
    assert_eq!(
        kinds,
        [Some(FsType::Ext4), Some(FsType::Fat), Some(FsType::Ntfs)]
    );
    let labels: Vec<_> = g.volumes.iter().map(|v| v.label()).collect();
    assert_eq!(
        labels,
        [
            Some("rootfs".into()),
            Some("ESP".into()),
            Some("Windows".into())
        ]
    );
    assert!(matches!(g.resolve("/").unwrap(), Target::Volumes));

    for (prefix, tree, links, modes) in [
        ("/p1", &full, true, true),
        ("/ESP", &fat, false, false),
        ("/p3", &full, true, false),
    ] {
        let Target::In(at) = g
            .resolve(&format!("{prefix}/etc/nginx/nginx.conf"))
            .unwrap()
        else {
            panic!("a file")
        };
        let mut buf = vec![0u8; 100];
        let n = at.fs.read_range(&at.path, 18, &mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &std::fs::read(tree.root.join("etc/nginx/nginx.conf")).unwrap()[18..]
        );
        let Target::In(root) = g.resolve(prefix).unwrap() else {
            panic!()
        };
        let names: Vec<String> = root
            .fs
            .list(&root.path)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        for n in ["etc", "home", "var", "data", "deep", "empty.txt"] {
            assert!(names.contains(&n.to_string()), "{prefix}: {names:?}");
        }
        let out = work.path().join(format!("out{}", prefix.replace('/', "-")));
        let done = extract(root.fs, &root.path, "root", Output::Dir(&out)).unwrap();
        assert!(done.files >= tree.files.len() as u64, "{done:?}");
        same_tree(tree, &out.join("root"), links, modes);
    }

    // NTFS: one file record under two names comes back as a hard link; streams are listed.
    let Target::In(ntfs) = g.resolve("/Windows/home/user/docs").unwrap() else {
        panic!()
    };
    let out = work.path().join("ntfs-docs");
    let done = extract(ntfs.fs, &ntfs.path, "docs", Output::Dir(&out)).unwrap();
    assert_eq!(done.hard_links, 1, "{done:?}");
    let a = std::fs::metadata(out.join("docs/report.txt")).unwrap();
    let b = std::fs::metadata(out.join("docs/report-hardlink.txt")).unwrap();
    assert_eq!(a.ino(), b.ino());
    let Target::In(etc) = g.resolve("/p3/etc").unwrap() else {
        panic!()
    };
    let host = etc
        .fs
        .list(&etc.path)
        .unwrap()
        .into_iter()
        .find(|e| e.name == "hostname")
        .unwrap();
    assert_eq!(host.streams.len(), 1, "{host:?}");
    assert_eq!(host.streams[0].name, "backup");
    // ntfs-3g stores symlinks as Interix links: read back as symlinks.
    let link = ntfs
        .fs
        .stat(&["home".into(), "user".into(), "link-to-docs".into()])
        .unwrap();
    assert_eq!(link.kind, Kind::Symlink);
    assert_eq!(link.target.as_deref(), Some("docs"));
    // ext4 symlinks are recreated as they are, pointing out or not, and never followed.
    let Target::In(ext) = g.resolve("/rootfs/etc").unwrap() else {
        panic!()
    };
    let esc = ext.fs.stat(&["etc".into(), "escape".into()]).unwrap();
    assert_eq!(esc.target.as_deref(), Some("../../../../../etc/passwd"));
}

#[test]
fn mbr_disk_with_logical_partitions() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let (full, fat) = guest::recipe_e_disk(&disk, "dos", work.path(), 1 << 20);
    let g = open(&disk);
    let numbers: Vec<u32> = g.volumes.iter().map(|v| v.partition.number).collect();
    assert_eq!(numbers, [1, 5, 6]);
    assert!(g.volumes.iter().all(|v| v.partition.table == "mbr"));
    for (path, tree) in [("/p1", &full), ("/p5", &fat), ("/p6", &full)] {
        let Target::In(at) = g.resolve(&format!("{path}/{}", tree.big)).unwrap() else {
            panic!()
        };
        let mut content = Vec::new();
        std::io::Read::read_to_end(&mut at.fs.open(&at.path).unwrap(), &mut content).unwrap();
        assert!(
            content == std::fs::read(tree.root.join(&tree.big)).unwrap(),
            "{path}"
        );
    }
    // A disk holding one filesystem and no table: its root is `/`.
    let whole = work.path().join("whole.raw");
    std::fs::File::create(&whole)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    guest::ext4_into(&whole, (0, 64 << 20), &full.root.join("etc"), "single");
    let g = open(&whole);
    assert_eq!(g.volumes.len(), 1);
    let Target::In(at) = g.resolve("/nginx/nginx.conf").unwrap() else {
        panic!()
    };
    assert_eq!(at.fs.stat(&at.path).unwrap().kind, Kind::File);
}

#[test]
fn tar_and_zip_hold_the_tree() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let disk = work.path().join("disk.raw");
    let (full, _) = guest::recipe_e_disk(&disk, "gpt", work.path(), 1 << 20);
    let g = open(&disk);
    let Target::In(home) = g.resolve("/p1/home").unwrap() else {
        panic!()
    };
    let mut tar = Vec::new();
    extract(home.fs, &home.path, "home", Output::Tar(&mut tar)).unwrap();
    let tar_path = work.path().join("home.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let out = work.path().join("untar");
    std::fs::create_dir(&out).unwrap();
    guest::run(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tar_path)
            .arg("-C")
            .arg(&out),
    );
    for rel in full.files.iter().filter(|f| f.starts_with("home/")) {
        assert!(
            std::fs::read(out.join(rel)).unwrap() == std::fs::read(full.root.join(rel)).unwrap(),
            "{rel}"
        );
    }
    assert_eq!(
        std::fs::read_link(out.join("home/user/link-to-docs"))
            .unwrap()
            .to_str(),
        Some("docs")
    );

    let mut zip = Vec::new();
    extract(home.fs, &home.path, "home", Output::Zip(&mut zip)).unwrap();
    let zip_path = work.path().join("home.zip");
    std::fs::write(&zip_path, &zip).unwrap();
    let out = work.path().join("unzip");
    guest::run(
        std::process::Command::new("unzip")
            .arg("-q")
            .arg(&zip_path)
            .arg("-d")
            .arg(&out),
    );
    for rel in full.files.iter().filter(|f| f.starts_with("home/")) {
        assert!(
            std::fs::read(out.join(rel)).unwrap() == std::fs::read(full.root.join(rel)).unwrap(),
            "{rel}"
        );
    }
    let m = std::fs::symlink_metadata(out.join("home/user/docs/report.txt")).unwrap();
    assert!((m.mtime() - OLD_TIME as i64).abs() <= 2);
}

/// ext4 with inline data (small files and folders inside their inodes), which ext4-view
/// refuses, read by vmvault's own small reader: hard links come back as links there.
#[test]
fn ext4_with_inline_data() {
    if !guest::guest_tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let tree = guest::make_tree(&work.path().join("src"), true, 1 << 20);
    for (i, extra) in [
        &["-O", "inline_data"][..],
        &[
            "-O",
            "inline_data,^extent,^64bit,^metadata_csum",
            "-t",
            "ext4",
        ],
    ]
    .iter()
    .enumerate()
    {
        let img = work.path().join(format!("inline{i}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(96 << 20)
            .unwrap();
        guest::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "inline"])
                .args(*extra)
                .arg("-d")
                .arg(&tree.root)
                .arg(&img),
        );
        let g = open(&img);
        assert_eq!(g.volumes[0].label().as_deref(), Some("inline"));
        let Target::In(root) = g.resolve("/").unwrap() else {
            panic!()
        };
        let out = work.path().join(format!("out{i}"));
        let done = extract(root.fs, &root.path, "root", Output::Dir(&out)).unwrap();
        assert!(done.skipped.is_empty(), "{done:?}");
        same_tree(&tree, &out.join("root"), true, true);
        assert_eq!(done.hard_links, 1, "{done:?}");
    }
}
