//! Whoever can write to a restore's target folder can plant a symlink where the restore will
//! write (`NAME.raw`, `VM.toml`). A restore never writes through one: without `--force` a
//! symlink counts as an existing file, even a dangling one; with `--force` the link itself is
//! replaced and what it points at is left alone. A block device named with `--to` is the one
//! target that is written in place.

mod common;

use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::Path;

use common::*;

/// A vault with one point of web01: disks "os" (2 MiB) and "data" (1 MiB).
fn vault_with_a_point() -> Env {
    web01_point(&[("os", 2 << 20, 1), ("data", 1 << 20, 2)])
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

#[test]
fn dangling_symlinks_in_the_target_folder_are_not_written_through() {
    let env = vault_with_a_point();
    std::fs::create_dir(env.path("out")).unwrap();
    for planted in ["os.raw", "web01.toml"] {
        let link = env.path("out").join(planted);
        let victim = env.path(&format!("victim-{planted}"));
        symlink(&victim, &link).unwrap();
        let args = ["restore", "web01@latest", "--to", "out"];
        let err = env.fails(&args, 2);
        assert!(err.contains("exists"), "{err}");
        assert!(
            !victim.exists(),
            "restore wrote through the symlink {planted}"
        );
        assert!(is_symlink(&link));
        std::fs::remove_file(&link).unwrap();
    }
    // Nothing was left by the refused runs: the same restore now succeeds.
    env.ok(&["restore", "web01@latest", "--to", "out"]);
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
}

#[test]
fn force_replaces_a_symlink_and_leaves_its_target_alone() {
    let env = vault_with_a_point();
    std::fs::create_dir(env.path("out")).unwrap();
    let precious = env.path("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    symlink(&precious, env.path("out/os.raw")).unwrap();
    symlink(&precious, env.path("out/web01.toml")).unwrap();
    let dangling = env.path("nowhere");
    symlink(&dangling, env.path("out/data.raw")).unwrap();
    env.ok(&["restore", "web01@latest", "--to", "out", "--force"]);
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    assert!(!dangling.exists());
    for f in ["os.raw", "data.raw", "web01.toml"] {
        let p = env.path("out").join(f);
        assert!(!is_symlink(&p), "{f} is still a symlink");
        assert!(p.is_file());
    }
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
    assert!(same_bytes(&env.path("out/data.raw"), &env.path("data.raw")));
}

#[test]
fn a_single_disk_restore_does_not_follow_a_symlink_either() {
    let env = vault_with_a_point();
    let precious = env.path("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    for format in ["raw", "qcow2", "vhdx", "vmdk", "vhd"] {
        let link = env.path(&format!("disk.{format}"));
        let victim = env.path(&format!("victim.{format}"));
        symlink(&victim, &link).unwrap();
        let to = link.to_str().unwrap();
        let args = [
            "restore",
            "web01@latest",
            "--disk",
            "os",
            "--to",
            to,
            "--format",
            format,
        ];
        let err = env.fails(&args, 2);
        assert!(err.contains("exists"), "{format}: {err}");
        assert!(!victim.exists(), "{format}: written through the symlink");
        std::fs::remove_file(&link).unwrap();
        symlink(&precious, &link).unwrap();
        let mut forced = args.to_vec();
        forced.push("--force");
        env.ok(&forced);
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me", "{format}");
        assert!(!is_symlink(&link) && link.is_file(), "{format}");
    }
}

#[test]
fn the_live_restore_overlay_does_not_follow_a_symlink() {
    let env = vault_with_a_point();
    let link = env.path("overlay.qcow2");
    let victim = env.path("victim.qcow2");
    symlink(&victim, &link).unwrap();
    // No QEMU listens there: the overlay is made (or refused) before QEMU is asked anything.
    let o = env.run(&[
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        link.to_str().unwrap(),
        "--live",
        "--qmp",
        env.path("no.qmp").to_str().unwrap(),
    ]);
    assert_ne!(o.code, 0);
    assert!(
        !victim.exists(),
        "the overlay was written through the symlink"
    );
}

#[test]
fn a_block_device_is_still_a_target() {
    let env = vault_with_a_point();
    let Some((dev, backing)) = loop_device(&env, 2 << 20) else {
        return;
    };
    assert!(std::fs::metadata(&dev.dev)
        .unwrap()
        .file_type()
        .is_block_device());
    let to = dev.dev.to_str().unwrap();
    env.ok(&["restore", "web01@latest", "--disk", "os", "--to", to]);
    assert!(same_bytes(&backing, &env.path("os.raw")));
    // A symlink to a block device planted outside /dev is not followed.
    let link = env.path("dev-link");
    symlink(&dev.dev, &link).unwrap();
    let o = env.run(&[
        "restore",
        "web01@latest",
        "--disk",
        "data",
        "--to",
        link.to_str().unwrap(),
    ]);
    assert_ne!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(same_bytes(&backing, &env.path("os.raw")), "device changed");
}
