//! An approved action is checked again when it runs, against the vault lock and the rules of
//! that moment, not only when it was requested: a shorter soft delete asked for before the
//! lock and approved after it is refused, as is an action whose requester has since lost the
//! role it needs.

mod common;

use std::sync::Arc;

use common::{Answer, Server};
use serde_json::json;
use vmvault_server::SystemClock;

fn pending(a: &Answer) -> i64 {
    assert_eq!(a.status, 202, "{}", a.body);
    a.body["error"]["approval"].as_i64().unwrap()
}

fn approve(s: &Server, token: &str, id: i64) -> Answer {
    s.call(
        Some(token),
        "POST",
        &format!("/api/v1/approvals/{id}"),
        Some(json!({"approve": true})),
    )
}

fn approval_state(s: &Server, id: i64) -> String {
    let all = s.admin("GET", "/api/v1/approvals", None).body;
    all.as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn refused_because_locked(a: &Answer) {
    assert_eq!(a.status, 403, "{}", a.body);
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("locked"), "{msg}");
}

#[test]
fn a_shorter_soft_delete_approved_after_the_lock_is_refused() {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    s.require_approval();
    let req = pending(&s.admin(
        "PATCH",
        "/api/v1/vaults/default",
        Some(json!({"soft_delete_days": 2})),
    ));
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/vaults/default/lock",
        None,
    );
    refused_because_locked(&approve(&s, &bob, req));
    let v = s.admin("GET", "/api/v1/vaults/default", None).body;
    assert_eq!(v["soft_delete_days"], 14, "{v}");
    assert_eq!(approval_state(&s, req), "failed");
}

#[test]
fn a_shorter_retention_or_a_delete_approved_after_the_lock_is_refused() {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    s.policy("base", "daily 02:00", json!({"keep_last": 3}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    s.require_approval();
    let shorten = pending(&s.admin(
        "PUT",
        "/api/v1/policies/base",
        Some(json!({"name": "base", "schedule": "daily 02:00", "keep_last": 1})),
    ));
    let delete = pending(&s.admin("DELETE", &format!("/api/v1/recovery-points/{point}"), None));
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/vaults/default/lock",
        None,
    );
    refused_because_locked(&approve(&s, &bob, shorten));
    refused_because_locked(&approve(&s, &bob, delete));
    let p = s.admin("GET", "/api/v1/policies/base", None).body;
    assert_eq!(p["keep_last"], 3);
    let points = s.admin("GET", "/api/v1/recovery-points", None).body;
    assert_eq!(points["items"].as_array().unwrap().len(), 1);
}

#[test]
fn an_approved_action_runs_only_while_its_requester_still_holds_the_role() {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    let carol = s.independent_admin("carol");
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    s.require_approval();
    let delete = pending(&s.call(
        Some(&carol),
        "DELETE",
        &format!("/api/v1/recovery-points/{point}"),
        None,
    ));
    // Carol is made a reader (approved by bob) before her request is approved.
    let demote = pending(&s.admin(
        "PUT",
        "/api/v1/users/carol/role",
        Some(json!({"role": "reader"})),
    ));
    assert_eq!(approve(&s, &bob, demote).status, 200);
    let a = approve(&s, &bob, delete);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("needs role contributor"),
        "{}",
        a.body
    );
    let points = s.admin("GET", "/api/v1/recovery-points", None).body;
    assert_eq!(points["items"].as_array().unwrap().len(), 1);
}
