//! Resource limits: a full vault filesystem, and memory bounded whatever the disk's size.

mod common;

use std::process::Command;

use common::*;

/// A small tmpfs mounted for the test, unmounted when dropped. Needs root, as CI runs.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(path: &std::path::Path, size: &str) -> Mount {
        std::fs::create_dir_all(path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Mount(path.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_vault_storage_fails_cleanly_and_the_vault_stays_valid() {
    let env = Env::new();
    let _m = Mount::tmpfs(&env.vault, "6m");
    env.ok(&[
        "vault",
        "create",
        env.vault.to_str().unwrap(),
        "--chunk-size",
        "64K",
    ]);
    make_image(&env.path("small.raw"), 512 * 1024, 100);
    let small = write_vm(
        env.dir.path(),
        "small.toml",
        "small",
        &[("os", "small.raw")],
    );
    env.backup(&small);
    // Random data does not compress: 16 MiB cannot fit in what is left of 6 MiB.
    let mut rng = Rng(101);
    let mut big = vec![0u8; 16 * 1024 * 1024];
    rng.fill(&mut big);
    std::fs::write(env.path("big.raw"), &big).unwrap();
    let desc = write_vm(env.dir.path(), "big.toml", "big", &[("os", "big.raw")]);
    let e = env.fails(&["backup", desc.to_str().unwrap()], 1);
    assert!(e.contains("full"), "{e}");
    let j = env.ok(&["points", "--json"]).json();
    assert_eq!(
        j["points"].as_array().unwrap().len(),
        1,
        "only the earlier point"
    );
    env.ok(&["verify", "--read-data"]);
    // Space freed (here: by gc of the failed backup's chunks), the vault works on.
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN);
    env.ok(&["gc"]);
    env.backup(&small);
    env.ok(&["restore", "small@latest", "--disk", "os", "--to", "r.raw"]);
    assert!(same_bytes(&env.path("r.raw"), &env.path("small.raw")));
}

/// Peak RSS in KiB of a command that must succeed.
fn peak_rss_kib(env: &Env, args: &[&str]) -> u64 {
    let (code, rss, err) = measured(env, args);
    assert_eq!(code, 0, "vmvault {args:?} failed: {err}");
    rss
}

#[test]
fn memory_stays_bounded_for_a_40_gib_disk() {
    let env = Env::new();
    env.ok(&["vault", "create", env.vault.to_str().unwrap()]);
    // 40 GiB, sparse, with 24 MiB of data in each of ten places.
    let path = env.path("big.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(40 << 30).unwrap();
        let mut rng = Rng(7);
        let mut buf = vec![0u8; 24 << 20];
        for i in 0..10u64 {
            rng.fill(&mut buf);
            f.seek(SeekFrom::Start(i * (4 << 30) + 12345 * 4096))
                .unwrap();
            f.write_all(&buf).unwrap();
        }
    }
    let desc = write_vm(env.dir.path(), "vm.toml", "huge", &[("os", "big.raw")]);
    let backup = peak_rss_kib(&env, &["backup", desc.to_str().unwrap()]);
    assert!(backup < 512 * 1024, "backup peak RSS {backup} KiB");
    let restore = peak_rss_kib(
        &env,
        &["restore", "huge@latest", "--disk", "os", "--to", "r.raw"],
    );
    assert!(restore < 512 * 1024, "restore peak RSS {restore} KiB");
    assert!(is_sparse(&env.path("r.raw")));
    assert_eq!(
        std::fs::metadata(env.path("r.raw")).unwrap().len(),
        40 << 30
    );
    // Compare only where data is: the rest are holes in both.
    use std::os::unix::fs::FileExt;
    let (a, b) = (
        std::fs::File::open(&path).unwrap(),
        std::fs::File::open(env.path("r.raw")).unwrap(),
    );
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for i in 0..10u64 {
        for off in (0..26u64).map(|k| i * (4 << 30) + 12345 * 4096 - (1 << 20) + k * (1 << 20)) {
            a.read_exact_at(&mut x, off).unwrap();
            b.read_exact_at(&mut y, off).unwrap();
            assert!(x == y, "differs at {off}");
        }
    }
}
