//! A restore writes only into a new folder under the restore roots the server's config names,
//! checked with symlinks resolved when it is asked for and again when its job starts: not
//! into a folder that exists (an operator must not drop files into /etc/cron.d), not outside
//! the roots, never into the server's state directory, and not through a symlink planted
//! between the request and the job.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;

use common::{Answer, Server};
use serde_json::json;
use vmvault_server::SystemClock;

fn restore(s: &Server, token: &str, point: &str, target: &Path, overwrite: bool) -> Answer {
    s.call(
        Some(token),
        "POST",
        "/api/v1/restores",
        Some(json!({"point": point, "target": target, "overwrite": overwrite})),
    )
}

fn assert_refused(a: &Answer, target: &Path) {
    assert_eq!(
        a.status,
        403,
        "{}: {} {}",
        target.display(),
        a.status,
        a.body
    );
    assert_eq!(a.body["error"]["code"], "forbidden");
}

fn ready(s: &Server) -> String {
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    s.backup("web01")
}

#[test]
fn a_restore_into_an_existing_folder_outside_the_roots_or_through_a_symlink_is_refused() {
    let s = Server::start(Arc::new(SystemClock));
    let point = ready(&s);
    let operator = s.user("olga", "operator");
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(s.path("existing")).unwrap();
    symlink(outside.path(), s.path("link")).unwrap();
    symlink(outside.path().join("new"), s.path("dangling")).unwrap();
    // Below the roots, a folder that exists is bad input, as a local restore onto it is.
    let a = restore(&s, &operator, &point, &s.path("existing"), false);
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("it exists"),
        "{}",
        a.body
    );
    for target in [
        outside.path().join("r"),
        s.path("state/r"),
        s.path("state"),
        s.path("link/r"),
        s.path("link"),
        s.path("dangling"),
        s.path("existing/../link/r"),
        Path::new("/etc/cron.d").to_path_buf(),
    ] {
        assert_refused(&restore(&s, &operator, &point, &target, false), &target);
    }
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written outside the roots"
    );
    assert_eq!(std::fs::read_dir(s.path("existing")).unwrap().count(), 0);
    // A new folder (its parents made as needed) under a root is fine.
    let target = s.path("restores/web01");
    let a = restore(&s, &operator, &point, &target, false);
    assert_eq!(a.status, 202, "{}", a.body);
    let j = s.wait_job(a.body["job"].as_i64().unwrap());
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(target.join("disk0.raw").exists());
    // What is restored is the VM's data: the new folder is the server user's alone, so
    // nobody else reaches its files whatever their own modes.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", target.display());
    // An admin may restore over an existing folder, but only under a root, never outside.
    let a = restore(&s, &s.admin.clone(), &point, &target, true);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(
        s.wait_job(a.body["job"].as_i64().unwrap())["state"],
        "succeeded"
    );
    let out = outside.path().to_path_buf();
    assert_refused(&restore(&s, &s.admin.clone(), &point, &out, true), &out);
    let link = s.path("link");
    assert_refused(&restore(&s, &s.admin.clone(), &point, &link, true), &link);
}

#[test]
fn a_symlink_planted_before_the_job_starts_is_refused() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    let desc = s.vm("web01", 256);
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/protected-items",
        Some(json!({"description": desc, "policy": "base"})),
    );
    let point = s.backup("web01");
    let operator = s.user("olga", "operator");
    let outside = tempfile::tempdir().unwrap();
    // A running backup of the VM holds its restore in the queue (one job per VM).
    let backup = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/protected-items/web01/backup",
        Some(json!({})),
    )["job"]
        .as_i64()
        .unwrap();
    while s.admin("GET", &format!("/api/v1/jobs/{backup}"), None).body["state"] == "queued" {
        std::thread::yield_now();
    }
    let target = s.path("restores/web01");
    let a = restore(&s, &operator, &point, &target, false);
    assert_eq!(a.status, 202, "{}", a.body);
    let job = a.body["job"].as_i64().unwrap();
    std::fs::create_dir(s.path("restores")).unwrap();
    symlink(outside.path(), &target).unwrap();
    let queued = s.admin("GET", &format!("/api/v1/jobs/{job}"), None).body;
    assert_eq!(queued["state"], "queued", "{queued}");
    s.admin("POST", &format!("/api/v1/jobs/{backup}/cancel"), None);
    s.wait_job(backup);
    let j = s.wait_job(job);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written through the symlink"
    );
}
