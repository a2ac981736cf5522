//! prune, gc and key passwd as a user runs them.

mod common;

use common::*;

#[test]
fn prune_removes_points_and_gc_their_chunks() {
    let env = Env::with_vault();
    make_image(&env.path("os.raw"), 4 * 1024 * 1024, 60);
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")]);
    make_image(&env.path("b.raw"), 1024 * 1024, 61);
    let other = write_vm(env.dir.path(), "b.toml", "db01", &[("os", "b.raw")]);
    env.backup(&other);
    let mut ids = Vec::new();
    for round in 0..3 {
        // Rewrite a large part so that each point has chunks of its own.
        mutate_image(&env.path("os.raw"), 30.0, 70 + round);
        ids.push(env.backup(&desc));
    }
    std::fs::copy(env.path("os.raw"), env.path("final.raw")).unwrap();
    let before = env.chunk_files().len();

    // Deletions are immediate here, so that gc frees the space now (soft delete: below).
    env.ok(&["vault", "set", "--soft-delete-days", "0"]);
    let e = env.fails(&["prune"], 2);
    assert!(e.contains("--keep"), "{e}");

    let dry = env
        .ok(&[
            "prune",
            "--vm",
            "web01",
            "--keep-last",
            "1",
            "--dry-run",
            "--json",
        ])
        .json();
    assert_eq!(dry["deleted"], 2);
    assert_eq!(
        env.ok(&["points", "--json"]).json()["points"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    let o = env.ok(&["prune", "--keep-last", "1"]);
    assert!(o.stderr.contains("2 deleted"), "{}", o.stderr);
    let j = env.ok(&["points", "--json"]).json();
    let left: Vec<&str> = j["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(left.len(), 2, "db01's only point and web01's newest");
    assert!(left.contains(&ids[2].as_str()));
    assert_eq!(
        env.chunk_files().len(),
        before,
        "prune removes points, not chunks"
    );

    // gc spares objects younger than the safety margin: let it pass.
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN + std::time::Duration::from_millis(200));
    let g = env.ok(&["gc", "--json"]).json();
    assert!(g["chunks_removed"].as_u64().unwrap() > 0, "{g}");
    assert_eq!(g["indexes_removed"], 2);
    assert!(env.chunk_files().len() < before);
    env.ok(&["verify", "--read-data"]);
    env.ok(&["restore", "web01@latest", "--disk", "os", "--to", "r.raw"]);
    assert!(same_bytes(&env.path("r.raw"), &env.path("final.raw")));
    let again = env.ok(&["gc", "--json"]).json();
    assert_eq!(again["chunks_removed"], 0);
}

/// The vault's rules on the CLI: prune and `point delete` soft-delete (listed, undeletable,
/// chunks kept through gc); in a locked vault a point with no recorded end stays, exit 6.
#[test]
fn deletions_are_soft_and_a_locked_vault_keeps_its_points() {
    let env = Env::with_vault();
    make_image(&env.path("os.raw"), 1024 * 1024, 90);
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")]);
    let mut ids = Vec::new();
    for round in 0..3 {
        mutate_image(&env.path("os.raw"), 30.0, 91 + round);
        ids.push(env.backup(&desc));
    }
    let o = env.ok(&["prune", "--keep-last", "2"]);
    assert!(o.stderr.contains("1 deleted"), "{}", o.stderr);
    assert!(o.stderr.contains("point undelete"), "{}", o.stderr);
    let listed = |args: &[&str]| -> Vec<String> {
        env.ok(args).json()["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(listed(&["points", "--json"]), ids[1..].to_vec());
    assert_eq!(
        listed(&["points", "--deleted", "--json"]),
        vec![ids[0].clone()]
    );
    // gc keeps what a soft-deleted point holds: it still restores, and comes back.
    std::thread::sleep(vmvault_store::gc::SAFETY_MARGIN + std::time::Duration::from_millis(200));
    let g = env.ok(&["gc", "--json"]).json();
    assert_eq!(g["points_purged"], 0, "{g}");
    env.ok(&["point", "undelete", &format!("web01@{}", &ids[0][..8])]);
    env.ok(&["verify", "--read-data"]);
    assert_eq!(listed(&["points", "--json"]).len(), 3);
    let d = env.ok(&[
        "point",
        "delete",
        &format!("web01@{}", &ids[1][..8]),
        "--json",
    ]);
    assert!(d.json()["purge_after"].is_string());

    // Locked: nothing that has no recorded end of retention leaves, by any command.
    let e = env.fails(&["vault", "lock"], 2);
    assert!(e.contains("cannot be undone"), "{e}");
    env.ok(&["vault", "lock", "--yes-i-understand-this-is-irreversible"]);
    let e = env.fails(&["point", "delete", &format!("web01@{}", &ids[0][..8])], 6);
    assert!(e.contains("the vault is locked"), "{e}");
    let o = env.ok(&["prune", "--keep-last", "1"]);
    assert!(
        o.stderr.contains("kept: the vault is locked"),
        "{}",
        o.stderr
    );
    assert_eq!(listed(&["points", "--json"]).len(), 2);
    let e = env.fails(&["vault", "set", "--soft-delete-days", "0"], 6);
    assert!(e.contains("locked"), "{e}");
}

#[test]
fn key_passwd_changes_the_passphrase_without_rewriting_data() {
    let env = Env::with_vault();
    make_image(&env.path("os.raw"), 1024 * 1024, 80);
    let desc = write_vm(env.dir.path(), "vm.toml", "web01", &[("os", "os.raw")]);
    env.backup(&desc);
    let chunks_before: Vec<_> = env
        .chunk_files()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let o = env.run_env(&["key", "passwd"], &[("VMVAULT_NEW_PASSWORD", "new one")]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = env.run(&["points"]);
    assert_error(&o, 4, &["old passphrase"]);
    let o = env.run_env(
        &["restore", "web01@latest", "--to", "out"],
        &[("VMVAULT_PASSWORD", "new one")],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(same_bytes(&env.path("out/os.raw"), &env.path("os.raw")));
    let chunks_after: Vec<_> = env
        .chunk_files()
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(chunks_before, chunks_after);
    let e = env.run_env(
        &["key", "passwd"],
        &[
            ("VMVAULT_PASSWORD", "new one"),
            ("VMVAULT_NEW_PASSWORD", ""),
        ],
    );
    assert_error(&e, 2, &["empty new passphrase"]);
}
