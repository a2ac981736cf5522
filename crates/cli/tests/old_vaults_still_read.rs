//! A vault written by vmvault 0.1.0 (format version 1, checked in under `tests/data/vault-v1`)
//! is read by this build: listed, verified to the last byte, restored bit for bit, and written
//! to again. If a change to the format breaks this test, the change needs a version bump and a
//! reader for the old version, not a new fixture (docs/format.md, "Changes").
//!
//! The fixture: an encrypted vault (passphrase `test passphrase`, 64 KiB chunks) holding two
//! points of VM `web01`, whose one disk `os` is the 1 MiB image [`image`] makes. The checked-in
//! copy has no empty folders (git keeps none), as a vault copied object by object would not.

mod common;

use std::path::Path;

use common::*;

const FIRST: &str = "4a60e7ec98cc8c29acd202476fc0cf95";
const SECOND: &str = "d16cb7afb5d8b2126332c0dcff6b6b94";

/// splitmix64, as the fixture's generator used it.
fn splitmix(seed: u64) -> impl Iterator<Item = u64> {
    let mut s = seed;
    std::iter::repeat_with(move || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    })
}

/// The disk as it was in the fixture's first (`second = false`) or second point: 16 chunks of
/// text, random bytes, zeros and text again; the second point changed 2,700 bytes of chunk 5.
fn image(second: bool) -> Vec<u8> {
    let mut img = Vec::with_capacity(1 << 20);
    for i in 0..16u64 {
        let chunk: Vec<u8> = match i % 4 {
            0 | 3 => {
                let text = format!("vmvault v1 fixture {:02} ", i - i % 4);
                text.bytes().cycle().take(65536).collect()
            }
            1 => splitmix(i).take(8192).flat_map(u64::to_le_bytes).collect(),
            _ => vec![0; 65536],
        };
        img.extend(chunk);
    }
    if second {
        let patch = "changed in the second point".repeat(100);
        let at = 5 * 65536 + 100;
        img[at..at + patch.len()].copy_from_slice(patch.as_bytes());
    }
    img
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn fixture() -> Env {
    let env = Env::new();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vault-v1");
    copy_tree(&data, &env.vault);
    env
}

#[test]
fn a_version_1_vault_lists_verifies_and_restores_bit_for_bit() {
    let env = fixture();
    let j = env.ok(&["points", "--json"]).json();
    let ids: Vec<&str> = j["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [FIRST, SECOND]);
    assert!(j["unreadable"].as_array().unwrap().is_empty());
    assert_eq!(j["points"][0]["vm"], "web01");
    assert_eq!(j["points"][0]["program"], "vmvault 0.1.0");
    env.ok(&["verify", "--read-data"]);
    for (id, second) in [(FIRST, false), (SECOND, true)] {
        let to = env.path(&format!("{id}.raw"));
        env.ok(&[
            "restore",
            &format!("web01@{id}"),
            "--disk",
            "os",
            "--to",
            to.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&to).unwrap() == image(second),
            "point {id} restores other bytes than it was made from"
        );
    }
}

#[test]
fn a_version_1_vault_takes_new_points_and_collects_garbage() {
    let env = fixture();
    let mut img = image(true);
    img[9 * 65536..9 * 65536 + 11].copy_from_slice(b"a new point");
    std::fs::write(env.path("os.raw"), &img).unwrap();
    let desc = write_vm(env.dir.path(), "web01.toml", "web01", &[("os", "os.raw")]);
    // The new chunk goes into a chunk folder the copied vault does not have.
    let third = env.backup(&desc);
    env.ok(&["prune", "--keep-last", "1"]);
    env.ok(&["gc"]);
    env.ok(&["verify", "--read-data"]);
    let to = env.path("third.raw");
    env.ok(&[
        "restore",
        &format!("web01@{third}"),
        "--disk",
        "os",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&to).unwrap() == img);
}

/// The fixture's regions record is plain JSON, as builds before the sealed record wrote it:
/// read as it is by a host that never saw the vault, sealed by the next open on that host (it
/// then remembers it), and a plain record put back after that is damage.
#[test]
fn a_version_1_vaults_plain_regions_record_is_read_then_sealed() {
    let env = fixture();
    let record = env.vault.join("regions");
    let plain = std::fs::read(&record).unwrap();
    assert!(plain.starts_with(b"{"));
    env.ok(&["points", "--json"]);
    assert_eq!(
        std::fs::read(&record).unwrap(),
        plain,
        "read only, the first time"
    );
    let o = env.ok(&["points", "--json"]);
    assert!(
        o.stderr.contains("sealed the regions record"),
        "{}",
        o.stderr
    );
    let sealed = std::fs::read(&record).unwrap();
    assert!(sealed.starts_with(b"VMVREGNS"));
    assert!(
        !String::from_utf8_lossy(&sealed).contains("/tmp/fx"),
        "encrypted"
    );
    env.ok(&["verify"]);
    let info = env.ok(&["vault", "info", "--json"]).json();
    assert_eq!(info["secondary"], serde_json::Value::Null, "{info}");
    std::fs::write(&record, &plain).unwrap();
    let o = env.run(&["points"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("regions record is damaged"),
        "{}",
        o.stderr
    );
}
