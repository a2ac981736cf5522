//! A flipped byte or a missing object anywhere in a vault is found and named.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// A vault with two VMs, two points each; returns the env.
fn populated() -> Env {
    let env = Env::with_vault();
    for (i, vm) in ["web01", "db01"].iter().enumerate() {
        let img = format!("{vm}.raw");
        make_image(&env.path(&img), 2 * 1024 * 1024, 40 + i as u64);
        let desc = write_vm(env.dir.path(), &format!("{vm}.toml"), vm, &[("os", &img)]);
        env.backup(&desc);
        mutate_image(&env.path(&img), 2.0, 50 + i as u64);
        env.backup(&desc);
    }
    env.ok(&["verify", "--read-data"]);
    env
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// The chunk files a VM's points reference, found by which ones break its restore.
fn chunk_of(env: &Env, vm: &str) -> PathBuf {
    let j = env.ok(&["points", vm, "--json"]).json();
    assert!(!j["points"].as_array().unwrap().is_empty());
    // A chunk only this VM's data has: restore the VM with each chunk hidden until one fails.
    for c in env.chunk_files() {
        let hidden = c.with_extension("hidden");
        std::fs::rename(&c, &hidden).unwrap();
        let o = env.run(&[
            "restore",
            &format!("{vm}@latest"),
            "--disk",
            "os",
            "--to",
            "probe.raw",
            "--force",
        ]);
        std::fs::rename(&hidden, &c).unwrap();
        if o.code != 0 {
            return c;
        }
    }
    panic!("no chunk of {vm} found");
}

#[test]
fn flipped_byte_in_a_chunk_is_found_with_read_data() {
    let env = populated();
    let chunk = chunk_of(&env, "db01");
    flip(&chunk, 100);
    // Existence only: the chunk is there.
    env.ok(&["verify"]);
    let o = env.run(&["verify", "--read-data"]);
    assert_eq!(o.code, 3, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("DAMAGED VM db01"), "{}", o.stdout);
    assert!(o.stdout.contains("disk os"), "{}", o.stdout);
    assert!(
        !o.stdout.contains("web01"),
        "only the damaged VM is named: {}",
        o.stdout
    );
    let j = env.run(&["verify", "--read-data", "--json"]);
    assert_eq!(j.code, 3);
    let problems = j.json()["problems"].as_array().unwrap().clone();
    assert!(problems
        .iter()
        .all(|p| p["vm"] == "db01" && p["disk"] == "os"));
    // Restore refuses damaged data rather than writing it.
    let o = env.run(&["restore", "db01@latest", "--to", "r"]);
    assert_error(&o, 1, &["restore of a damaged point"]);
    assert!(o.stderr.contains("damaged"), "{}", o.stderr);
}

#[test]
fn missing_chunk_is_found_without_read_data() {
    let env = populated();
    let chunk = chunk_of(&env, "web01");
    std::fs::remove_file(&chunk).unwrap();
    let o = env.run(&["verify"]);
    assert_eq!(o.code, 3);
    assert!(
        o.stdout.contains("web01") && o.stdout.contains("missing"),
        "{}",
        o.stdout
    );
}

#[test]
fn flipped_byte_in_manifest_index_config_or_key_is_found() {
    let env = populated();
    // Every byte position class of a manifest: header, body, trailer.
    let points = files_in(&env.vault.join("points"));
    let len = std::fs::metadata(&points[0]).unwrap().len() as usize;
    for at in [3, 20, 45, len / 2, len - 1] {
        flip(&points[0], at);
        let o = env.run(&["verify"]);
        assert_eq!(o.code, 3, "manifest byte {at}: {}", o.stdout);
        let name = points[0].file_name().unwrap().to_str().unwrap();
        assert!(o.stdout.contains(name), "names the point: {}", o.stdout);
        flip(&points[0], at);
    }
    env.ok(&["verify"]);

    let indexes = files_in(&env.vault.join("indexes"));
    for idx in &indexes {
        flip(idx, 60);
        let o = env.run(&["verify", "--json"]);
        assert_eq!(o.code, 3);
        let problems = o.json()["problems"].as_array().unwrap().clone();
        assert!(!problems.is_empty() && problems.iter().all(|p| p["disk"] == "os"));
        flip(idx, 60);
    }
    env.ok(&["verify", "--read-data"]);

    flip(&env.vault.join("config"), 13);
    let e = env.fails(&["verify"], 1);
    assert!(e.contains("vault config") && e.contains("damaged"), "{e}");
    flip(&env.vault.join("config"), 13);

    flip(&env.vault.join("keys/default"), 100);
    let e = env.fails(&["verify"], 1);
    assert!(e.contains("key file") && e.contains("damaged"), "{e}");
    assert!(!e.contains("wrong passphrase"), "{e}");
    flip(&env.vault.join("keys/default"), 100);
    env.ok(&["verify", "--read-data"]);
}
