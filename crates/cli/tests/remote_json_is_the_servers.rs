//! The real `vmvault server` binary driven by the real CLI: what `--json` prints is the JSON
//! the server sent (read into the API crate's types and written back: nothing lost or
//! renamed), a name goes to the server as one path segment whatever it holds, and a token
//! minted by a request that waits for approval is printed, not lost.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{make_image, write_vm, Env};
use serde_json::Value;

struct Server {
    child: Child,
    url: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain HTTP on loopback: these tests are about the answers, not the certificate.
fn start(env: &Env) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmvault"))
        .args(["server", "--insecure-http", "--listen", "127.0.0.1:0"])
        .arg("--disk-root")
        .arg(env.dir.path())
        .arg("--restore-root")
        .arg(env.dir.path())
        .env("VMVAULT_SERVER_STATE", env.path("server"))
        .env("VMVAULT_VAULT", &env.vault)
        .env("VMVAULT_PASSWORD", common::PASS)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("the server says where it listens")
            .unwrap();
        if let Some(u) = line.strip_prefix("vmvault server: listening on ") {
            break u.trim_end_matches('/').to_string();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let token = std::fs::read_to_string(env.path("server/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    Server { child, url, token }
}

impl Server {
    /// What the server itself answers to a GET.
    fn raw(&self, path: &str) -> Value {
        ureq::get(&format!("{}/api/v1{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    fn cli(&self, env: &Env, args: &[&str]) -> common::Out {
        let mut all = vec!["--server", &self.url, "--token", &self.token];
        all.extend_from_slice(args);
        env.run(&all)
    }

    fn ok(&self, env: &Env, args: &[&str]) -> common::Out {
        let o = self.cli(env, args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        o
    }
}

#[test]
fn json_output_is_what_the_server_sent() {
    let env = Env::with_vault();
    let s = start(&env);
    s.ok(
        &env,
        &[
            "policy",
            "create",
            "daily",
            "--schedule",
            "daily 02:00",
            "--timezone",
            "Europe/Berlin",
            "--keep-daily",
            "7",
        ],
    );
    make_image(&env.path("web01.raw"), 4 << 20, 5);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("disk0", "web01.raw")],
    );
    s.ok(
        &env,
        &["protect", desc.to_str().unwrap(), "--policy", "daily"],
    );
    let point = s.ok(&env, &["backup", "web01", "--wait"]).stdout;
    let point = point.trim();
    s.ok(
        &env,
        &["user", "create", "ops@example.org", "--role", "reader"],
    );

    let same = [
        (
            vec!["policy", "show", "daily"],
            "/policies/daily".to_string(),
        ),
        (vec!["policy", "list"], "/policies".into()),
        (vec!["jobs"], "/jobs?limit=50".into()),
        (
            vec!["jobs", "--failed"],
            "/jobs?limit=50&state=failed".into(),
        ),
        (vec!["job", "show", "1"], "/jobs/1".into()),
        (vec!["vault", "show"], "/vaults/default".into()),
        (vec!["user", "list"], "/users".into()),
        (vec!["audit", "--limit", "5"], "/audit?limit=5".into()),
        (vec!["approval", "list"], "/approvals".into()),
    ];
    for (args, path) in same {
        let mut with_json = vec!["--json"];
        with_json.extend(&args);
        let printed = s.ok(&env, &with_json).json();
        assert_eq!(printed, s.raw(&path), "{args:?}");
    }
    // The backup job's JSON carries every field the server has, `null`s included.
    let job = s.ok(&env, &["--json", "job", "show", "1"]).json();
    for k in ["rate", "eta_secs", "error", "error_code", "point", "log"] {
        assert!(job.get(k).is_some(), "{k}: {job}");
    }
    assert_eq!(job["point"], point);
    let deleted = s
        .ok(
            &env,
            &["--json", "point", "delete", &format!("web01@{point}")],
        )
        .json();
    assert_eq!(deleted["id"], point);
    let back = s
        .ok(
            &env,
            &["--json", "point", "undelete", &format!("web01@{point}")],
        )
        .json();
    assert_eq!(back, s.raw(&format!("/recovery-points/{point}")));
}

#[test]
fn names_are_one_path_segment_and_waiting_tokens_are_printed() {
    let env = Env::with_vault();
    let s = start(&env);
    s.ok(
        &env,
        &[
            "policy",
            "create",
            "daily",
            "--schedule",
            "hourly",
            "--keep-last",
            "1",
        ],
    );
    // Each would reach the policy `daily` (or another resource) if pasted into the path.
    for name in [
        "daily/../../vaults/default",
        "daily?x=1",
        "daily#x",
        "%64aily",
        "daily 2",
    ] {
        let o = s.cli(&env, &["policy", "show", name]);
        common::assert_error(&o, 2, &["policy", "show", name]);
        assert!(
            o.stderr.contains(&format!("no policy '{name}'")),
            "{}",
            o.stderr
        );
    }
    let o = s.cli(&env, &["policy", "delete", ".."]);
    common::assert_error(&o, 2, &["policy", "delete", ".."]);
    assert!(o.stderr.contains("cannot be named"), "{}", o.stderr);
    s.ok(&env, &["policy", "show", "daily"]);

    let name = "ops@example.org";
    s.ok(&env, &["user", "create", name, "--role", "reader"]);
    let t = s.ok(&env, &["user", "token", name]);
    assert!(t.stdout.starts_with("vmv_"), "{}", t.stdout);
    s.ok(&env, &["user", "revoke", name]);

    // On a vault that requires approval, a new admin's token comes with the 202: it is
    // printed (it works once approved), and the command exits 7.
    s.ok(&env, &["vault", "set", "--require-approval", "true"]);
    let o = s.cli(&env, &["user", "create", "boss", "--role", "admin"]);
    assert_eq!(o.code, 7, "{}", o.stderr);
    assert!(o.stdout.trim().starts_with("vmv_"), "{}", o.stdout);
    assert!(
        o.stderr.contains("once the request is approved"),
        "{}",
        o.stderr
    );
    let waiting = s.ok(&env, &["--json", "approval", "list"]).json();
    assert_eq!(waiting, s.raw("/approvals"));
    assert_eq!(waiting[0]["action"], "user.create", "{waiting}");
}
