//! `vmvault files`: single files out of recovery points of disks made with the real tools
//! (GPT and MBR; ext4, FAT32, NTFS), read lazily from the vault.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use common::*;
use vmvault_testkit::guest::{self, PartSpec};

fn same_file(a: &Path, b: &Path) {
    assert!(
        same_bytes(a, b),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

#[test]
fn list_get_and_find_in_a_backed_up_gpt_disk() {
    if !guest::guest_tools() {
        return;
    }
    let env = Env::with_vault();
    let dir = env.dir.path();
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let (full, fat) = guest::recipe_e_disk(&env.path("os.raw"), "gpt", &work, 2 << 20);
    let desc = write_vm(dir, "web01.toml", "web01", &[("os", "os.raw")]);
    env.backup(&desc);

    // The root of a disk with several partitions lists them.
    let j = env.ok(&["files", "ls", "web01@latest", "--json"]).json();
    let parts = j["partitions"].as_array().unwrap();
    let fs: Vec<&str> = parts
        .iter()
        .map(|p| p["filesystem"].as_str().unwrap())
        .collect();
    assert_eq!(fs, ["ext4", "fat", "ntfs"]);
    let labels: Vec<&str> = parts.iter().map(|p| p["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["rootfs", "ESP", "Windows"]);
    let text = env
        .ok(&["files", "ls", "web01@latest", "--disk", "os"])
        .stdout;
    assert!(text.contains("/p2") && text.contains("ESP"), "{text}");

    // Folders, by number or by label; --long shows modes, symlink targets and streams.
    let long = env
        .ok(&["files", "ls", "web01", "/rootfs/etc", "--long"])
        .stdout;
    assert!(long.contains("-rw-r-----"), "{long}");
    assert!(
        long.contains("escape -> ../../../../../etc/passwd"),
        "{long}"
    );
    let ntfs = env
        .ok(&["files", "ls", "web01", "/Windows/etc", "-l"])
        .stdout;
    assert!(ntfs.contains("[stream backup: 9 bytes]"), "{ntfs}");
    let j = env
        .ok(&["files", "ls", "web01", "/p3/home/user", "--json"])
        .json();
    let names: Vec<&str> = j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"Ünïcödé ファイル.txt"), "{names:?}");

    // One file, then a folder from each filesystem, compared with the source files.
    let out = env.path("out");
    env.ok(&[
        "files",
        "get",
        "web01",
        "/p1/etc/nginx/nginx.conf",
        "--to",
        out.to_str().unwrap(),
    ]);
    same_file(
        &out.join("nginx.conf"),
        &full.root.join("etc/nginx/nginx.conf"),
    );
    for (path, tree, name) in [
        ("/p1/home", &full, "home"),
        ("/ESP/home", &fat, "home"),
        ("/p3/var", &full, "var"),
    ] {
        let to = env.path(&format!("get-{}", path.replace('/', "_")));
        let j = env
            .ok(&[
                "files",
                "get",
                "web01",
                path,
                "--to",
                to.to_str().unwrap(),
                "--json",
            ])
            .json();
        assert!(j["files"].as_u64().unwrap() >= 1, "{j}");
        for rel in tree
            .files
            .iter()
            .filter(|f| f.starts_with(&format!("{name}/")))
        {
            same_file(&to.join(rel), &tree.root.join(rel));
        }
    }
    // The target is never overwritten.
    env.fails(
        &[
            "files",
            "get",
            "web01",
            "/p1/etc/nginx/nginx.conf",
            "--to",
            out.to_str().unwrap(),
        ],
        2,
    );

    // tar and zip on stdout.
    let o = env
        .command(&["files", "get", "web01", "/p1/data", "--tar"])
        .output()
        .unwrap();
    assert!(o.status.success());
    std::fs::write(env.path("data.tar"), &o.stdout).unwrap();
    let untar = env.path("untar");
    std::fs::create_dir(&untar).unwrap();
    guest::run(
        std::process::Command::new("tar")
            .arg("-xf")
            .arg(env.path("data.tar"))
            .arg("-C")
            .arg(&untar),
    );
    same_file(&untar.join(&full.big), &full.root.join(&full.big));
    let sparse = std::fs::metadata(untar.join(&full.sparse)).unwrap();
    assert_eq!(sparse.len(), full.sparse_size);
    let o = env
        .command(&["files", "get", "web01", "/ESP/etc", "--zip"])
        .output()
        .unwrap();
    assert!(o.status.success());
    std::fs::write(env.path("etc.zip"), &o.stdout).unwrap();
    guest::run(
        std::process::Command::new("unzip")
            .arg("-q")
            .arg(env.path("etc.zip"))
            .arg("-d")
            .arg(env.path("unzip")),
    );
    same_file(
        &env.path("unzip/etc/nginx/nginx.conf"),
        &fat.root.join("etc/nginx/nginx.conf"),
    );

    // find, in every partition.
    let j = env
        .ok(&["files", "find", "web01", "*.sql", "--json"])
        .json();
    let mut found: Vec<&str> = j["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap())
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            "/p1/var/backups/old.sql",
            "/p1/var/lib/db/dump.sql",
            "/p2/var/backups/old.sql",
            "/p2/var/lib/db/dump.sql",
            "/p3/var/backups/old.sql",
            "/p3/var/lib/db/dump.sql"
        ]
    );
    let text = env
        .ok(&["files", "find", "web01", "/p1/**/leaf.txt"])
        .stdout;
    assert_eq!(text.lines().count(), 1, "{text}");

    // Paths that name nothing are bad input (2).
    let err = env.fails(&["files", "ls", "web01", "/p1/no/such"], 2);
    assert!(err.contains("/p1/no"), "{err}");
    env.fails(&["files", "ls", "web01", "/p9"], 2);
    env.fails(&["files", "get", "web01", "/", "--to", "x"], 2);
    env.fails(&["files", "ls", "web01", "/", "--disk", "nope"], 2);
}

#[test]
fn mbr_logical_partitions_through_the_cli() {
    if !guest::guest_tools() {
        return;
    }
    let env = Env::with_vault();
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let (full, fat) = guest::recipe_e_disk(&env.path("os.raw"), "dos", &work, 1 << 20);
    let desc = write_vm(env.dir.path(), "db01.toml", "db01", &[("os", "os.raw")]);
    env.backup(&desc);
    let j = env.ok(&["files", "ls", "db01", "--json"]).json();
    let names: Vec<&str> = j["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["p1", "p5", "p6"]);
    let out = env.path("out");
    for (path, tree) in [("/p5/data/big.bin", &fat), ("/p6/data/big.bin", &full)] {
        let to = out.join(&path[1..3]);
        env.ok(&["files", "get", "db01", path, "--to", to.to_str().unwrap()]);
        same_file(&to.join("big.bin"), &tree.root.join(&tree.big));
    }
}

/// The speed goal: on a 20 GiB disk with three partitions, `ls /` and `get` of a
/// 10 MiB file fetch under 1% of the disk's chunks (the time is printed, not checked).
#[test]
fn twenty_gib_disk_ls_and_get_fetch_under_one_percent() {
    if !guest::guest_tools() {
        return;
    }
    let env = Env::new();
    env.ok(&["vault", "create", env.vault.to_str().unwrap()]); // 1 MiB chunks, the default
    let work = env.path("work");
    std::fs::create_dir(&work).unwrap();
    let disk = env.path("big.raw");
    let parts = guest::partition(
        &disk,
        20 << 10,
        "gpt",
        &[
            PartSpec {
                size_mib: 12 << 10,
                sfdisk_type: "linux",
            },
            PartSpec {
                size_mib: 2 << 10,
                sfdisk_type: "uefi",
            },
            PartSpec {
                size_mib: 5 << 10,
                sfdisk_type: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            },
        ],
    );
    let tree = guest::make_tree(&work.join("src"), true, 10 << 20);
    let small = work.join("small");
    std::fs::create_dir_all(small.join("etc")).unwrap();
    std::fs::write(small.join("etc/hostname"), b"web01\n").unwrap();
    guest::ext4_into(&disk, parts[0], &tree.root, "rootfs");
    guest::fat_into(&disk, parts[1], &small, "ESP");
    guest::ntfs_into(&disk, parts[2], &small, "Windows", &work);
    let desc = write_vm(env.dir.path(), "big.toml", "big", &[("os", "big.raw")]);
    env.backup(&desc);

    let started = Instant::now();
    let ls = env.ok(&["files", "ls", "big", "/", "--json", "--verbose"]);
    let out = env.path("out");
    let get = env.ok(&[
        "files",
        "get",
        "big",
        "/p1/data/big.bin",
        "--to",
        out.to_str().unwrap(),
        "--json",
    ]);
    let seconds = started.elapsed().as_secs_f64();
    same_file(&out.join("big.bin"), &tree.root.join(&tree.big));
    assert!(
        ls.stderr.contains("fetched") && ls.stderr.contains("guest parsers"),
        "{}",
        ls.stderr
    );
    let (ls, get) = (ls.json(), get.json());
    assert_eq!(ls["partitions"].as_array().unwrap().len(), 3);
    let total = ls["chunks"]["total"].as_u64().unwrap();
    assert_eq!(total, 20 << 10);
    let fetched =
        ls["chunks"]["fetched"].as_u64().unwrap() + get["chunks"]["fetched"].as_u64().unwrap();
    println!(
        "20 GiB disk: ls / + get of 10 MiB: {seconds:.2} s, {fetched} of {total} chunks ({:.2}%)",
        100.0 * fetched as f64 / total as f64
    );
    assert!(fetched * 100 < total, "fetched {fetched} of {total} chunks");
    assert!(std::fs::metadata(out.join("big.bin")).unwrap().size() == 10 << 20);
}

/// A guest filesystem vmvault cannot read, damaged or using a feature it does not read, is
/// exit code 3 with one line saying why; a chunk missing from the vault is exit code 1.
#[test]
fn damaged_unsupported_and_unreadable_disks() {
    if !guest::guest_tools() {
        return;
    }
    let env = Env::with_vault();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/motd"), b"hello\n").unwrap();
    // No partition table and no filesystem vmvault reads.
    std::fs::write(
        env.path("unknown.raw"),
        b"not a disk vmvault knows\n".repeat(40_000),
    )
    .unwrap();
    // Inline data: ext4-view refuses it; vmvault's own reader reads it.
    let inline = env.path("inline.raw");
    std::fs::File::create(&inline)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    guest::run(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "inline_data", "-d"])
            .arg(&src)
            .arg(&inline),
    );
    // Damaged: the block group descriptors zeroed (after block 0 with 1 KiB or 4 KiB blocks).
    let damaged = env.path("damaged.raw");
    std::fs::File::create(&damaged)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    guest::ext4_into(&damaged, (0, 32 << 20), &src, "broken");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 6144], 2048).unwrap();
    drop(f);
    let desc = write_vm(
        env.dir.path(),
        "odd.toml",
        "odd",
        &[
            ("unknown", "unknown.raw"),
            ("inline", "inline.raw"),
            ("damaged", "damaged.raw"),
        ],
    );
    env.backup(&desc);
    let err = env.fails(&["files", "ls", "odd", "/etc"], 3);
    assert!(err.contains("unsupported"), "{err}");
    let out = env.path("inline-out");
    env.ok(&[
        "files",
        "get",
        "odd",
        "/etc/motd",
        "--disk",
        "inline",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(out.join("motd")).unwrap(), b"hello\n");
    let err = env.fails(
        &[
            "files", "get", "odd", "/etc", "--disk", "damaged", "--to", "out",
        ],
        3,
    );
    assert!(err.contains("damaged"), "{err}");
    // The vault loses its chunks: reading the disk fails (1), and says so.
    for c in env.chunk_files() {
        std::fs::remove_file(c).unwrap();
    }
    let err = env.fails(&["files", "ls", "odd", "/"], 1);
    assert!(err.contains("reading the disk"), "{err}");
}
