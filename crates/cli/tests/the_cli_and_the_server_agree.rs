//! One grammar, end to end (issue 12, "Verified by"): every command that exists both with and
//! without a server (`points`, `point delete|undelete`, `restore`, `backup`) run both ways on
//! the same vault, the remote form against the real `vmvault server` binary, comparing what
//! each prints and how it exits. The server reads the vault the local commands change, so
//! each side also sees what the other did.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use common::{make_image, write_vm, Env, Out};

/// The `points` of a `points --json` answer (the `vault` field names the vault as each side
/// was given it).
fn points(o: &Out) -> serde_json::Value {
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    o.json()["points"].clone()
}

/// Both sides exit with `code`; the output of each, stdout then stderr.
fn both(local: Out, remote: Out, code: i32, what: &str) -> (Out, Out) {
    assert_eq!(
        (local.code, remote.code),
        (code, code),
        "{what}: local {}: {}{} / remote {}: {}{}",
        local.code,
        local.stdout,
        local.stderr,
        remote.code,
        remote.stdout,
        remote.stderr
    );
    (local, remote)
}

/// Waits until the server's listing equals the vault's own (it notices another process's
/// change within seconds), and returns it.
fn agreed(env: &Env, s: &Server, args: &[&str]) -> serde_json::Value {
    let began = Instant::now();
    loop {
        let mine = points(&env.run(args));
        let theirs = points(&s.cli(env, &s.admin, args));
        if mine == theirs {
            return mine;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "{args:?}: the server still lists\n{theirs:#}\nwhere the vault has\n{mine:#}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn short(o: &Out) -> String {
    let id = o.stdout.trim();
    assert_eq!(id.len(), 32, "a point id on stdout: {}", o.stdout);
    id[..8].to_string()
}

#[test]
fn every_command_on_both_sides_says_the_same() {
    let env = Env::with_vault();
    let s = Server::start(&env, &["--insecure-http"]);
    let remote = |args: &[&str]| s.cli(&env, &s.admin, args);
    let img = env.path("web01.raw");
    make_image(&img, 3 << 20, 5);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("disk0", "web01.raw")],
    );
    let desc = desc.to_str().unwrap();
    for args in [
        &[
            "policy",
            "create",
            "daily",
            "--schedule",
            "daily 02:00",
            "--keep-daily",
            "7",
        ][..],
        &["protect", desc, "--policy", "daily"],
    ] {
        assert_eq!(remote(args).code, 0, "{args:?}");
    }

    // backup: each prints the new point's id and nothing else on stdout.
    let (local, served) = both(
        env.run(&["backup", desc]),
        remote(&["backup", "web01", "--wait"]),
        0,
        "backup",
    );
    let (mine, theirs) = (short(&local), short(&served));
    let (_, _) = both(
        env.run(&["backup", env.path("nosuch.toml").to_str().unwrap()]),
        remote(&["backup", "nosuch", "--wait"]),
        2,
        "backup of what does not exist",
    );

    // points: the same points, the same table, the same refusal of a name that is no VM's.
    let listed = agreed(&env, &s, &["--json", "points"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
    let (local, served) = both(
        env.run(&["points", "web01"]),
        remote(&["points", "web01"]),
        0,
        "points web01",
    );
    assert_eq!(local.stdout, served.stdout);
    let (local, served) = both(
        env.run(&["points", "web01x"]),
        remote(&["points", "web01x"]),
        2,
        "points of a typo",
    );
    for o in [&local, &served] {
        assert!(
            o.stderr
                .starts_with("vmvault: error: no recovery point of VM \"web01x\"")
                && o.stderr.contains("(its VMs: web01)"),
            "{}",
            o.stderr
        );
    }

    // point delete and undelete: the same words, and each side sees the other's deletion.
    let (local, served) = both(
        env.run(&["point", "delete", &format!("web01@{mine}")]),
        remote(&["point", "delete", &format!("web01@{theirs}")]),
        0,
        "point delete",
    );
    for (o, id) in [(&local, &mine), (&served, &theirs)] {
        assert!(
            o.stdout.starts_with(&format!(
                "web01@{id} deleted; restorable and undeletable until "
            )),
            "{}",
            o.stdout
        );
    }
    let deleted = agreed(&env, &s, &["--json", "points", "--deleted"]);
    assert_eq!(deleted.as_array().unwrap().len(), 2, "{deleted:#}");
    both(
        env.run(&["point", "delete", "web01@ffff"]),
        remote(&["point", "delete", "web01@ffff"]),
        2,
        "point delete of no point",
    );
    let (local, served) = both(
        env.run(&["point", "undelete", &format!("web01@{mine}")]),
        remote(&["point", "undelete", &format!("web01@{theirs}")]),
        0,
        "point undelete",
    );
    assert_eq!(local.stdout, format!("web01@{mine} is back\n"));
    assert_eq!(served.stdout, format!("web01@{theirs} is back\n"));
    both(
        env.run(&["point", "undelete", &format!("web01@{mine}")]),
        remote(&["point", "undelete", &format!("web01@{theirs}")]),
        2,
        "undelete of a point that is not deleted",
    );
    agreed(&env, &s, &["--json", "points"]);

    // restore: the same files from the same point name; onto what exists, the same refusal.
    let (a, b) = (env.path("restored-here"), env.path("restored-there"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    both(
        env.run(&["restore", "web01@latest", "--to", a]),
        remote(&["restore", "web01@latest", "--to", b, "--wait"]),
        0,
        "restore",
    );
    for dir in [a, b] {
        assert!(common::same_bytes(
            &std::path::Path::new(dir).join("disk0.raw"),
            &img
        ));
    }
    both(
        env.run(&["restore", "web01@latest", "--to", a]),
        remote(&["restore", "web01@latest", "--to", b, "--wait"]),
        2,
        "restore onto what exists",
    );
    both(
        env.run(&["restore", "nosuch@latest", "--to", a]),
        remote(&["restore", "nosuch@latest", "--to", b, "--wait"]),
        2,
        "restore of no VM",
    );
}
