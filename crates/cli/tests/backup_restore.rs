//! A VM backed up and restored, whole and one disk at a time, over several incremental points.

mod common;

use common::*;

#[test]
fn every_point_restores_to_the_images_at_its_time() {
    let env = Env::with_vault();
    let dir = env.dir.path();
    // Sizes that are not multiples of the chunk size, so the last chunk is short.
    make_image(&env.path("os.raw"), 6 * 1024 * 1024 + 12345, 1);
    make_image(&env.path("data.raw"), 3 * 1024 * 1024 + 4096 * 3, 2);
    let desc = write_vm(
        dir,
        "web01.toml",
        "web01",
        &[("os", "os.raw"), ("data", "data.raw")],
    );

    let mut points = Vec::new();
    for round in 0..4u64 {
        if round > 0 {
            mutate_image(&env.path("os.raw"), 1.0, 10 + round);
            if round % 2 == 0 {
                mutate_image(&env.path("data.raw"), 2.0, 20 + round);
            }
        }
        let o = env.ok(&["backup", desc.to_str().unwrap(), "--json"]);
        let j = o.json();
        let id = j["id"].as_str().unwrap().to_string();
        let stats = &j["stats"];
        if round == 0 {
            assert_eq!(stats["chunks_reused"], 0);
        } else {
            // An incremental stores only what changed: a few chunks, not the disk.
            let new = stats["bytes_new"].as_u64().unwrap();
            let read = stats["bytes_read"].as_u64().unwrap();
            assert!(
                new > 0 && new < read / 2,
                "incremental stored {new} of {read}"
            );
            assert!(stats["chunks_reused"].as_u64().unwrap() > 0);
        }
        let snap = env.path(&format!("snap{round}"));
        std::fs::create_dir(&snap).unwrap();
        std::fs::copy(env.path("os.raw"), snap.join("os.raw")).unwrap();
        std::fs::copy(env.path("data.raw"), snap.join("data.raw")).unwrap();
        points.push((id, snap));
    }

    for (round, (id, snap)) in points.iter().enumerate() {
        let out = env.path(&format!("restore{round}"));
        let spec = format!("web01@{}", &id[..10]);
        env.ok(&["restore", &spec, "--to", out.to_str().unwrap()]);
        for disk in ["os", "data"] {
            let restored = out.join(format!("{disk}.raw"));
            assert!(
                same_bytes(&restored, &snap.join(format!("{disk}.raw"))),
                "point {round} disk {disk}"
            );
            assert!(is_sparse(&restored), "zero chunks are holes");
        }
        // The restored description is a valid description of the restored files.
        let desc_text = std::fs::read_to_string(out.join("web01.toml")).unwrap();
        assert!(desc_text.contains("path = \"os.raw\""), "{desc_text}");
        assert!(desc_text.contains("firmware = \"uefi\""), "{desc_text}");
        assert!(desc_text.contains("52:54:00:00:00:01"), "{desc_text}");
        let again = env.ok(&["backup", out.join("web01.toml").to_str().unwrap(), "--json"]);
        assert_eq!(
            again.json()["stats"]["chunks_new"],
            0,
            "restored VM dedups fully"
        );
    }

    // One disk of the oldest point, by unique id prefix, to a file.
    let one = env.path("one.raw");
    env.ok(&[
        "restore",
        &format!("web01@{}", &points[0].0[..8]),
        "--disk",
        "data",
        "--to",
        one.to_str().unwrap(),
    ]);
    assert!(same_bytes(&one, &points[0].1.join("data.raw")));
    // An existing file is not overwritten without --force.
    let o = env.run(&[
        "restore",
        "web01@latest",
        "--disk",
        "data",
        "--to",
        one.to_str().unwrap(),
    ]);
    assert_error(&o, 2, &["restore onto existing file"]);
    assert!(o.stderr.contains("--force"));
    env.ok(&[
        "restore",
        "web01@latest",
        "--disk",
        "data",
        "--to",
        one.to_str().unwrap(),
        "--force",
    ]);
    assert!(same_bytes(&one, &points[3].1.join("data.raw")));
}

#[test]
fn points_lists_time_vm_disks_sizes_and_consistency() {
    let env = Env::with_vault();
    make_image(&env.path("a.raw"), 2 * 1024 * 1024, 3);
    let desc = write_vm(env.dir.path(), "db01.toml", "db01", &[("os", "a.raw")]);
    let id = env.backup(&desc);
    let plain = env.ok(&["points"]);
    assert!(plain.stdout.contains(&id[..8]), "{}", plain.stdout);
    assert!(plain.stdout.contains("crash"), "{}", plain.stdout);
    assert!(plain.stdout.contains("db01"));
    assert!(plain.stdout.contains("2.0 MiB"), "{}", plain.stdout);
    assert!(
        plain.stderr.contains("offline VM"),
        "says why crash-consistent"
    );
    let j = env.ok(&["points", "db01", "--json"]).json();
    assert_eq!(j["encrypted"], true);
    let p = &j["points"][0];
    assert_eq!(p["id"], id.as_str());
    assert_eq!(p["vm"], "db01");
    assert_eq!(p["consistency"], "crash");
    assert_eq!(p["disks"][0]["name"], "os");
    assert_eq!(p["disks"][0]["size"], 2 * 1024 * 1024);
    assert!(p["stats"]["bytes_stored"].as_u64().unwrap() > 0);
    // A VM with no point at all is a typo (issue 12, item 8), named with the VMs there are.
    let e = env.fails(&["points", "other"], 2);
    assert!(e.contains("\"other\"") && e.contains("db01"), "{e}");

    // A point by time: the newest at or before it.
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let t = later.to_rfc3339();
    let o = env.ok(&[
        "restore",
        &format!("db01@{t}"),
        "--disk",
        "os",
        "--to",
        "x.raw",
    ]);
    assert!(o.stdout.contains("x.raw"));
    let o = env.run(&[
        "restore",
        "db01@2001-01-01T00:00:00Z",
        "--disk",
        "os",
        "--to",
        "y.raw",
    ]);
    assert_error(&o, 2, &["restore before the first point"]);
}

#[test]
fn unencrypted_vault_says_so_and_works() {
    let env = Env::new();
    env.ok(&[
        "vault",
        "create",
        env.vault.to_str().unwrap(),
        "--no-encryption",
    ]);
    let info = env.ok(&["vault", "info"]);
    assert!(info.stdout.contains("NOT ENCRYPTED"), "{}", info.stdout);
    assert_eq!(
        env.ok(&["vault", "info", "--json"]).json()["encrypted"],
        false
    );
    make_image(&env.path("a.raw"), 3 * 1024 * 1024 + 1, 4);
    let desc = write_vm(env.dir.path(), "vm.toml", "plain", &[("os", "a.raw")]);
    // No passphrase is needed or asked for.
    let o = env.run_env(
        &["backup", desc.to_str().unwrap()],
        &[("VMVAULT_PASSWORD", "")],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pts = env.ok(&["points"]);
    assert!(pts.stderr.contains("NOT ENCRYPTED"), "{}", pts.stderr);
    env.ok(&["restore", "plain@latest", "--disk", "os", "--to", "r.raw"]);
    assert!(same_bytes(&env.path("r.raw"), &env.path("a.raw")));
    env.ok(&["verify", "--read-data"]);
}

#[test]
fn different_vms_back_up_at_the_same_time() {
    let env = Env::with_vault();
    let mut children = Vec::new();
    for (i, vm) in ["a1", "b2", "c3"].iter().enumerate() {
        let img = format!("{vm}.raw");
        make_image(&env.path(&img), 8 * 1024 * 1024, 30 + i as u64);
        let desc = write_vm(env.dir.path(), &format!("{vm}.toml"), vm, &[("os", &img)]);
        let mut c = env.command(&["backup", desc.to_str().unwrap()]);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        children.push(c.spawn().unwrap());
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let j = env.ok(&["points", "--json"]).json();
    assert_eq!(j["points"].as_array().unwrap().len(), 3);
    env.ok(&["verify", "--read-data"]);
}
