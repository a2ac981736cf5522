//! Fault matrix: damage is named, never stepped around. A damaged newest manifest is not
//! quietly replaced by an older point; a chunk storage emptied is not reused by a new point;
//! a collection stopped by damage says so with the damage exit code.

mod common;

use common::*;

fn two_points(env: &Env) -> (String, String) {
    make_image(&env.path("web01.raw"), 1024 * 1024, 7);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("os", "web01.raw")],
    );
    let old = env.backup(&desc);
    mutate_image(&env.path("web01.raw"), 5.0, 8);
    let new = env.backup(&desc);
    (old, new)
}

fn damage_manifest(env: &Env, id: &str) {
    let path = env.vault.join("points").join(id);
    let mut b = std::fs::read(&path).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x40;
    std::fs::write(&path, b).unwrap();
}

#[test]
fn latest_refuses_when_the_newest_point_is_damaged() {
    let env = Env::with_vault();
    let (old, new) = two_points(&env);
    damage_manifest(&env, &new);
    for spec in ["web01@latest", "web01"] {
        let err = env.fails(&["restore", spec, "--to", "out"], 3);
        assert!(err.contains(&new[..8]), "names the damaged point: {err}");
        assert!(err.contains(&format!("web01@{}", &old[..8])), "{err}");
    }
    assert!(!env.path("out").exists(), "nothing restored");
    // A time after both points could mean the damaged one too.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    env.fails(&["restore", &format!("web01@{later}"), "--to", "out"], 3);
    // Named by its id, the older point restores.
    env.ok(&["restore", &format!("web01@{}", &old[..8]), "--to", "out"]);
}

#[test]
fn a_damaged_point_named_by_its_id_is_called_damaged() {
    let env = Env::with_vault();
    let (_, new) = two_points(&env);
    damage_manifest(&env, &new);
    let err = env.fails(
        &["restore", &format!("web01@{}", &new[..8]), "--to", "out"],
        3,
    );
    assert!(err.contains("cannot be read"), "{err}");
    assert!(!err.contains("has an id starting with"), "{err}");
}

#[test]
fn garbage_collection_stopped_by_damage_exits_3() {
    let env = Env::with_vault();
    let (_, new) = two_points(&env);
    damage_manifest(&env, &new);
    let err = env.fails(&["gc"], 3);
    assert!(err.contains("stopped before deleting anything"), "{err}");
}

#[test]
fn a_chunk_emptied_in_storage_is_stored_again_not_reused() {
    let env = Env::with_vault();
    make_image(&env.path("web01.raw"), 1024 * 1024, 9);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("os", "web01.raw")],
    );
    env.backup(&desc);
    for c in env.chunk_files() {
        std::fs::write(&c, b"").unwrap();
    }
    let second = env.backup(&desc);
    // The new point is whole from the start (and storing the chunks again mends the first).
    let o = env.run(&["verify", "--read-data", "--json"]);
    assert_eq!(o.code, 0, "verify: {}{}", o.stdout, o.stderr);
    env.ok(&["restore", &format!("web01@{}", &second[..8]), "--to", "out"]);
    assert!(same_bytes(&env.path("web01.raw"), &env.path("out/os.raw")));
}
