//! A job whose thread panics ends failed, with the panic's message in its log, frees its VM
//! for the next job and raises the usual failure alert, instead of showing the VM as running
//! until the server restarts.

mod common;

use std::sync::Arc;

use common::Server;
use serde_json::json;
use vmvault_server::SystemClock;

fn alerts(s: &Server, kind: &str) -> usize {
    let audit = s.admin("GET", "/api/v1/audit?limit=1000", None).body;
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == format!("alert.{kind}"))
        .count()
}

#[test]
fn a_panicking_backup_fails_frees_its_vm_and_alerts() {
    let s = Server::start_with(Arc::new(SystemClock), |c| c.backup_attempts = 3);
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    s.app
        .set_job_hook(Some(Arc::new(|kind: &str, item: Option<&str>| {
            if item == Some("web01") {
                panic!("injected fault in a {kind} job");
            }
        })));
    let j = s.run_backup("web01", json!({}));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(
        error.contains("panicked") && error.contains("injected fault in a backup job"),
        "{error}"
    );
    assert!(
        j["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["line"].as_str().unwrap().contains("injected fault")),
        "{j}"
    );
    // A bug is not retried as a flaky disk would be: failed at once, and alerted.
    assert_eq!(j["attempt"], 0, "{j}");
    assert_eq!(alerts(&s, "backup_failed"), 1);
    let running = s.admin("GET", "/api/v1/jobs?state=running", None).body;
    assert_eq!(running.as_array().unwrap().len(), 0, "{running}");
    assert_eq!(s.app.runner.running_count(), 0);
    // The VM is free: its next backup runs.
    s.app.set_job_hook(None);
    s.backup("web01");
}

#[test]
fn a_panicking_restore_fails_and_alerts() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    s.app
        .set_job_hook(Some(Arc::new(|kind: &str, _: Option<&str>| {
            if kind == "restore" {
                panic!("injected fault");
            }
        })));
    let a = s.admin(
        "POST",
        "/api/v1/restores",
        Some(json!({"point": point, "target": s.path("restored")})),
    );
    assert_eq!(a.status, 202, "{}", a.body);
    let j = s.wait_job(a.body["job"].as_i64().unwrap());
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("injected fault"),
        "{j}"
    );
    assert_eq!(alerts(&s, "restore_failed"), 1);
    s.app.set_job_hook(None);
    s.backup("web01");
}
