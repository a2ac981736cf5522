//! A restore that fails half way removes what it wrote, so that running it again is not
//! refused because of its own leftovers; what was there before it (a file it was to replace
//! with `--force`, a block device) is never removed, and what it cannot remove it names.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A vault with one point of web01: disks "os" then "data".
fn vault_with_a_point() -> Env {
    web01_point(&[("os", 2 << 20, 11), ("data", 2 << 20, 12)])
}

/// Hides chunks until restoring `disk` fails; returns them (renamed) to put back.
fn break_disk(env: &Env, disk: &str) -> Vec<(PathBuf, PathBuf)> {
    let mut hidden = Vec::new();
    for c in env.chunk_files() {
        let h = c.with_extension("hidden");
        std::fs::rename(&c, &h).unwrap();
        hidden.push((c, h));
        let probe = env.path("probe.raw");
        let o = env.run(&[
            "restore",
            "web01@latest",
            "--disk",
            disk,
            "--to",
            probe.to_str().unwrap(),
            "--force",
        ]);
        let _ = std::fs::remove_file(&probe);
        if o.code != 0 {
            // Keep only this chunk hidden.
            let last = hidden.pop().unwrap();
            for (c, h) in hidden {
                std::fs::rename(h, c).unwrap();
            }
            return vec![last];
        }
    }
    panic!("no chunk breaks disk {disk}");
}

fn heal(hidden: Vec<(PathBuf, PathBuf)>) {
    for (c, h) in hidden {
        std::fs::rename(h, c).unwrap();
    }
}

fn assert_failed(o: &Out) {
    assert_ne!(
        o.code, 0,
        "the restore should fail: {}{}",
        o.stdout, o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_failed_single_disk_restore_removes_its_image() {
    let env = vault_with_a_point();
    let hidden = break_disk(&env, "os");
    std::fs::create_dir(env.path("out")).unwrap();
    for format in ["raw", "qcow2", "vmdk"] {
        let to = format!("out/os.{format}");
        let args = [
            "restore",
            "web01@latest",
            "--disk",
            "os",
            "--to",
            &to,
            "--format",
            format,
        ];
        let o = env.run(&args);
        assert_failed(&o);
        assert_eq!(entries(&env.path("out")), Vec::<String>::new(), "{format}");
    }
    heal(hidden);
    env.ok(&[
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        "out/os.raw",
    ]);
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
}

#[test]
fn a_failed_vm_restore_removes_every_file_it_wrote() {
    let env = vault_with_a_point();
    // The second disk fails, after the first was written whole.
    let hidden = break_disk(&env, "data");
    let o = env.run(&["restore", "web01@latest", "--to", "out"]);
    assert_failed(&o);
    assert_eq!(entries(&env.path("out")), Vec::<String>::new());
    heal(hidden);
    env.ok(&["restore", "web01@latest", "--to", "out"]);
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
    assert!(same_bytes(&env.path("out/data.raw"), &env.path("data.raw")));
}

#[test]
fn a_failed_forced_restore_keeps_the_files_it_was_to_replace() {
    let env = vault_with_a_point();
    std::fs::create_dir(env.path("out")).unwrap();
    for f in ["os.raw", "data.raw", "web01.toml"] {
        std::fs::write(env.path("out").join(f), format!("old {f}")).unwrap();
    }
    let hidden = break_disk(&env, "data");
    let o = env.run(&["restore", "web01@latest", "--to", "out", "--force"]);
    assert_failed(&o);
    assert_eq!(
        entries(&env.path("out")),
        ["data.raw", "os.raw", "web01.toml"]
    );
    for f in ["os.raw", "data.raw", "web01.toml"] {
        let got = std::fs::read_to_string(env.path("out").join(f)).unwrap();
        assert_eq!(
            got,
            format!("old {f}"),
            "{f} was changed by a failed restore"
        );
    }
    heal(hidden);
    env.ok(&["restore", "web01@latest", "--to", "out", "--force"]);
    assert!(same_bytes(&env.path("out/data.raw"), &env.path("data.raw")));
}

#[test]
fn a_failed_restore_onto_a_block_device_says_what_is_left() {
    let env = vault_with_a_point();
    let Some((dev, _)) = loop_device(&env, 2 << 20) else {
        return;
    };
    let hidden = break_disk(&env, "os");
    let to = dev.dev.display().to_string();
    let r = env.run(&["restore", "web01@latest", "--disk", "os", "--to", &to]);
    let exists = dev.dev.exists();
    drop(dev);
    heal(hidden);
    assert_failed(&r);
    assert!(exists, "the device was removed");
    assert!(
        r.stderr.contains(&to) && r.stderr.contains("partial"),
        "the error should say the device holds a partial restore: {}",
        r.stderr
    );
}
