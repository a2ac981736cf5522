//! An unencrypted vault authenticates nothing: whoever can write to its storage can forge a
//! recovery point. A forged manifest must never make a restore write outside `--to`, nor make
//! a reader reserve memory its disk sizes imply.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};
use vmvault_format::{Codec, Compression, Encryption, Header, ObjectKind, HEADER_LEN};
use vmvault_store::{Kind, LocalBackend, ReadBackend, WriteBackend};

/// An unencrypted vault with one point of VM web01 (one disk, "os"); returns it and the
/// point's id.
fn vault_with_a_point() -> (Env, String) {
    let env = Env::new();
    env.ok(&[
        "vault",
        "create",
        env.vault.to_str().unwrap(),
        "--no-encryption",
        "--chunk-size",
        "64K",
    ]);
    make_image(&env.path("os.raw"), 1 << 20, 7);
    let desc = write_vm(env.dir.path(), "web01.toml", "web01", &[("os", "os.raw")]);
    let id = env.backup(&desc);
    (env, id)
}

/// The point's manifest as JSON, read straight from the vault's storage.
fn manifest(vault: &Path, id: &str) -> Value {
    let sealed = LocalBackend::new(vault).read(Kind::Point, id).unwrap();
    let plain = Codec::plain(1)
        .open(ObjectKind::Manifest, &sealed, 1 << 24)
        .unwrap();
    serde_json::from_slice(&plain).unwrap()
}

/// Replaces the point's manifest with `m`, sealed as a backup would seal it.
fn forge(vault: &Path, id: &str, m: &Value) {
    let sealed = Codec::plain(1).seal(ObjectKind::Manifest, &serde_json::to_vec(m).unwrap());
    LocalBackend::new(vault)
        .write(Kind::Point, id, &sealed)
        .unwrap();
}

fn refused(o: &Out, what: &[&str]) {
    assert!(
        o.code == 2 || o.code == 3,
        "vmvault {what:?}: a forged point must be refused as bad input or damage, got {}: {}{}",
        o.code,
        o.stdout,
        o.stderr
    );
    assert_error(o, o.code, what);
}

#[test]
fn a_disk_name_climbing_out_of_the_target_writes_nothing_there() {
    let (env, id) = vault_with_a_point();
    let mut m = manifest(&env.vault, &id);
    m["disks"][0]["name"] = json!("../../escape");
    m["vm_config"]["disks"][0]["name"] = json!("../../escape");
    forge(&env.vault, &id, &m);
    std::fs::create_dir_all(env.path("a/b")).unwrap();
    let point = format!("web01@{id}");
    let args = ["restore", &point, "--to", "a/b/out"];
    let o = env.run(&args);
    refused(&o, &args);
    assert!(!env.path("a/escape.raw").exists(), "written outside --to");
    assert!(!env.path("a/b/out/web01.toml").exists());
}

#[test]
fn a_vm_name_climbing_out_of_the_target_writes_nothing_there() {
    let (env, id) = vault_with_a_point();
    let mut m = manifest(&env.vault, &id);
    m["vm"] = json!("../../evil");
    m["vm_config"]["name"] = json!("../../evil");
    forge(&env.vault, &id, &m);
    std::fs::create_dir_all(env.path("a/b")).unwrap();
    for point in [format!("../../evil@{id}"), id[..8].to_string()] {
        let args = ["restore", &point, "--to", "a/b/out"];
        let o = env.run(&args);
        assert_ne!(o.code, 0, "{point}: {}{}", o.stdout, o.stderr);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
        assert!(!env.path("a/evil.toml").exists(), "written outside --to");
    }
}

#[test]
fn an_absurd_disk_size_with_a_forged_index_is_refused_without_allocating() {
    let (env, id) = vault_with_a_point();
    let mut m = manifest(&env.vault, &id);
    m["disks"][0]["size"] = json!(1u64 << 62);
    forge(&env.vault, &id, &m);
    // The index object it names now claims a terabyte of payload behind a tiny body: a
    // reader that trusts the manifest's size reserves that before it can tell.
    let index = m["disks"][0]["index"].as_str().unwrap().to_string();
    let header = Header {
        kind: ObjectKind::Index,
        compression: Compression::Zstd,
        encryption: Encryption::None,
        plain_len: 1 << 40,
        nonce: [0; 12],
    };
    let mut sealed = header.encode().to_vec();
    sealed.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]);
    let sum = blake3::hash(&sealed);
    sealed.extend_from_slice(&sum.as_bytes()[..16]);
    assert!(sealed.len() > HEADER_LEN);
    LocalBackend::new(&env.vault)
        .write(Kind::Index, &index, &sealed)
        .unwrap();
    let point = format!("web01@{id}");
    for args in [
        vec!["restore", &point, "--disk", "os", "--to", "big.raw"],
        vec!["restore", &point, "--to", "out"],
    ] {
        let o = env.run(&args);
        refused(&o, &args);
        assert!(!env.path("big.raw").exists());
    }
    let o = env.run(&["verify"]);
    assert!(o.code != 0 && o.code != 134, "{}{}", o.stdout, o.stderr);
    assert!(!o.stderr.contains("memory allocation"), "{}", o.stderr);
}

#[test]
fn a_forged_point_does_not_hide_the_genuine_ones() {
    let (env, id) = vault_with_a_point();
    // A second, genuine point, then the first forged.
    mutate_image(&env.path("os.raw"), 5.0, 9);
    let good = env.backup(&env.path("web01.toml"));
    let mut m = manifest(&env.vault, &id);
    m["disks"][0]["name"] = json!("/etc/x");
    forge(&env.vault, &id, &m);
    env.ok(&["restore", &format!("web01@{good}"), "--to", "out"]);
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
}
