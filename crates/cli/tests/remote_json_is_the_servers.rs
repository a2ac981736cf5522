//! The real `vmvault server` binary driven by the real CLI: what `--json` prints is the JSON
//! the server sent (read into the API crate's types and written back: nothing lost or
//! renamed), a name goes to the server as one path segment whatever it holds, and a token
//! minted by a request that waits for approval is printed, not lost.

mod common;

use common::server::Server;
use common::{make_image, write_vm, Env};
use serde_json::{json, Value};

/// The server over plain HTTP on loopback (these tests are about the answers, not the
/// certificate), with the admin's token.
struct Api {
    server: Server,
    token: String,
}

fn start(env: &Env) -> Api {
    let server = Server::start(env, &["--insecure-http"]);
    let token = server.admin_token();
    Api { server, token }
}

impl Api {
    /// What the server itself answers to a GET.
    fn raw(&self, path: &str) -> Value {
        ureq::get(&format!("{}/api/v1{path}", self.server.url))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    fn cli(&self, env: &Env, args: &[&str]) -> common::Out {
        self.server.cli(env, &self.token, args)
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
    // With --json a new token is an object, as `user create --json` prints one: the server's
    // answer, the user and the token.
    let created = s.ok(
        &env,
        &["--json", "user", "create", "ci", "--role", "reader"],
    );
    assert_token_of(&created, "ci");
    assert_token_of(&s.ok(&env, &["--json", "user", "token", name]), name);
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
    // Another user's token waits too; with --json it is printed as the same object.
    let o = s.cli(&env, &["--json", "user", "token", name]);
    assert_eq!(o.code, 7, "{}", o.stderr);
    assert_token_of(&o, name);
}

/// What `--json` prints for a new token of `user`: the object {"user", "token"}, nothing else.
fn assert_token_of(printed: &common::Out, user: &str) {
    let v = printed.json();
    let token = v["token"].as_str().unwrap_or_default();
    assert!(token.starts_with("vmv_"), "{v}");
    assert_eq!(v, json!({"user": user, "token": token}));
}
