//! The API over real HTTP with real tokens: the authorization matrix, soft delete and
//! undelete, the vault lock, multi-user authorization, and paging.

mod common;

use std::sync::Arc;

use common::Server;
use serde_json::{json, Value};
use vmvault_server::SystemClock;

const ROLES: [&str; 4] = ["reader", "operator", "contributor", "admin"];

fn rank(role: &str) -> usize {
    ROLES.iter().position(|r| *r == role).unwrap()
}

/// Every role against every action: allowed ones never answer 401/403, the others answer
/// 403 with a JSON reason naming the role needed.
#[test]
fn authorization_matrix() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    let tokens: Vec<(&str, String)> = ROLES
        .iter()
        .map(|r| (*r, s.user(&format!("u-{r}"), r)))
        .collect();
    let vm = |name: &str| s.vm(name, 1);
    let restore_to = s.path("restored");
    // (method, path, body, least role)
    let actions: Vec<(&str, String, Option<Value>, &str)> = vec![
        ("GET", "/api/v1/vaults".into(), None, "reader"),
        ("GET", "/api/v1/vaults/default".into(), None, "reader"),
        ("GET", "/api/v1/policies".into(), None, "reader"),
        ("GET", "/api/v1/policies/base".into(), None, "reader"),
        ("GET", "/api/v1/protected-items".into(), None, "reader"),
        (
            "GET",
            "/api/v1/protected-items/web01".into(),
            None,
            "reader",
        ),
        ("GET", "/api/v1/recovery-points".into(), None, "reader"),
        (
            "GET",
            format!("/api/v1/recovery-points/{point}"),
            None,
            "reader",
        ),
        ("GET", "/api/v1/jobs".into(), None, "reader"),
        ("GET", "/api/v1/jobs/1".into(), None, "reader"),
        (
            "POST",
            "/api/v1/protected-items/web01/backup".into(),
            Some(json!({})),
            "operator",
        ),
        (
            "POST",
            "/api/v1/restores".into(),
            Some(json!({"point": point, "target": restore_to})),
            "operator",
        ),
        (
            "POST",
            "/api/v1/restores".into(),
            Some(json!({"point": point, "target": restore_to, "overwrite": true})),
            "admin",
        ),
        ("POST", "/api/v1/jobs/1/cancel".into(), None, "operator"),
        (
            "POST",
            "/api/v1/policies".into(),
            Some(json!({"name": "p2", "schedule": "hourly", "keep_last": 1})),
            "contributor",
        ),
        (
            "PUT",
            "/api/v1/policies/p2".into(),
            Some(json!({"name": "p2", "schedule": "hourly", "keep_last": 2})),
            "contributor",
        ),
        (
            "POST",
            "/api/v1/protected-items".into(),
            Some(json!({"description": vm("db01"), "policy": "p2"})),
            "contributor",
        ),
        (
            "DELETE",
            "/api/v1/protected-items/db01".into(),
            None,
            "contributor",
        ),
        ("DELETE", "/api/v1/policies/p2".into(), None, "contributor"),
        (
            "DELETE",
            format!("/api/v1/recovery-points/{point}"),
            None,
            "contributor",
        ),
        (
            "POST",
            format!("/api/v1/recovery-points/{point}/undelete"),
            None,
            "contributor",
        ),
        ("GET", "/api/v1/users".into(), None, "admin"),
        (
            "POST",
            "/api/v1/users".into(),
            Some(json!({"name": "new-user", "role": "reader"})),
            "admin",
        ),
        (
            "POST",
            "/api/v1/users/new-user/tokens".into(),
            None,
            "admin",
        ),
        (
            "DELETE",
            "/api/v1/users/new-user/tokens".into(),
            None,
            "admin",
        ),
        ("GET", "/api/v1/audit".into(), None, "admin"),
        ("GET", "/api/v1/approvals".into(), None, "admin"),
        (
            "POST",
            "/api/v1/approvals/999".into(),
            Some(json!({"approve": true})),
            "admin",
        ),
        (
            "PATCH",
            "/api/v1/vaults/default".into(),
            Some(json!({"soft_delete_days": 30})),
            "admin",
        ),
    ];
    for (method, path, body, least) in &actions {
        for (role, token) in &tokens {
            // A restore goes into a new folder: one per role.
            let mut body = body.clone();
            if path == "/api/v1/restores" {
                if let Some(b) = body.as_mut() {
                    b["target"] = json!(s.path(&format!("restored-{role}")));
                }
            }
            let a = s.call(Some(token), method, path, body);
            if rank(role) >= rank(least) {
                assert!(
                    a.status != 401 && a.status != 403 && a.status < 500,
                    "{role} {method} {path}: {} {}",
                    a.status,
                    a.body
                );
            } else {
                assert_eq!(a.status, 403, "{role} {method} {path}: {}", a.body);
                assert_eq!(a.body["error"]["code"], "forbidden");
                let msg = a.body["error"]["message"].as_str().unwrap();
                assert!(msg.contains(&format!("needs role {least}")), "{msg}");
            }
        }
        // No token, a bad one: 401 for every action.
        let a = s.call(None, method, path, body.clone());
        assert_eq!(a.status, 401, "{method} {path} without a token");
        let a = s.call(Some("vmv_000000000000_nope"), method, path, body.clone());
        assert_eq!(a.status, 401, "{method} {path} with a bad token");
        assert_eq!(a.body["error"]["code"], "unauthorized");
    }
    // Lock last: it cannot be undone. Only admins may.
    for (role, token) in &tokens {
        let a = s.call(Some(token), "POST", "/api/v1/vaults/default/lock", None);
        if *role == "admin" {
            assert_eq!(a.status, 200, "{}", a.body);
        } else {
            assert_eq!(a.status, 403);
        }
    }
    // The audit log saw both the refusals and the changes.
    let audit = s.admin("GET", "/api/v1/audit?limit=1000", None).body;
    let entries = audit.as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["user"] == "u-reader" && e["outcome"].as_str().unwrap().starts_with("denied")));
    assert!(entries
        .iter()
        .any(|e| e["user"] == "u-admin" && e["action"] == "vault.lock" && e["outcome"] == "ok"));
}

#[test]
fn soft_delete_keeps_a_point_restorable_until_undeleted_or_expired() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let p1 = s.backup("web01");
    let p2 = s.backup("web01");
    let d = s.admin(
        "DELETE",
        &format!("/api/v1/recovery-points/{}", &p1[..8]),
        None,
    );
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.body["id"], p1.as_str());
    // Hidden from the listing, shown among the deleted, still restorable.
    let list = s
        .admin("GET", "/api/v1/recovery-points?item=web01", None)
        .body;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [p2.as_str()]);
    let del = s
        .admin("GET", "/api/v1/recovery-points?deleted=true", None)
        .body;
    assert_eq!(del["items"][0]["id"], p1.as_str());
    let j = s
        .admin(
            "POST",
            "/api/v1/restores",
            Some(json!({"point": p1, "target": s.path("r1")})),
        )
        .body;
    assert_eq!(s.wait_job(j["job"].as_i64().unwrap())["state"], "succeeded");
    assert!(s.path("r1/disk0.raw").exists());
    // The marker lives in the vault: a catalog rebuilt from it still knows.
    vmvault_server::catalog::rebuild(&s.app.db, "default", &s.app.vault).unwrap();
    let del = s
        .admin("GET", "/api/v1/recovery-points?deleted=true", None)
        .body;
    assert_eq!(del["items"].as_array().unwrap().len(), 1);
    // Deleting twice is a conflict; undelete brings it back.
    assert_eq!(
        s.admin("DELETE", &format!("/api/v1/recovery-points/{p1}"), None)
            .status,
        409
    );
    let u = s.admin(
        "POST",
        &format!("/api/v1/recovery-points/{p1}/undelete"),
        None,
    );
    assert_eq!(u.status, 200, "{}", u.body);
    let list = s
        .admin("GET", "/api/v1/recovery-points?item=web01", None)
        .body;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    // Soft delete days are 1..=180.
    assert_eq!(
        s.admin(
            "PATCH",
            "/api/v1/vaults/default",
            Some(json!({"soft_delete_days": 181}))
        )
        .status,
        400
    );
    assert_eq!(
        s.admin(
            "PATCH",
            "/api/v1/vaults/default",
            Some(json!({"soft_delete_days": 1}))
        )
        .status,
        200
    );
    // Within its window a collection keeps it, whatever the state database says: the
    // window is the vault's (its marker's own times; the store's tests age them).
    s.admin("DELETE", &format!("/api/v1/recovery-points/{p1}"), None);
    s.app
        .db
        .conn()
        .execute(
            "UPDATE points SET deleted_at = '2000-01-01T00:00:00.000Z' WHERE id = ?1",
            [&p1],
        )
        .unwrap();
    s.app.tick().unwrap();
    let gc = s
        .app
        .enqueue("gc", None, &vmvault_server::jobs::Params::default(), "test")
        .unwrap();
    assert_eq!(s.wait_job(gc)["state"], "succeeded");
    let p = s.admin("GET", &format!("/api/v1/recovery-points/{p1}"), None);
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body["deleted_at"].is_string());
    assert_eq!(s.app.vault.point_ids().unwrap().len(), 2);
}

#[test]
fn a_locked_vault_refuses_deletion_and_shorter_retention() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({"keep_last": 2}));
    s.protect("web01", "base");
    let p1 = s.backup("web01");
    let lock = s.admin("POST", "/api/v1/vaults/default/lock", None);
    assert_eq!(lock.status, 200, "{}", lock.body);
    assert!(lock.body["locked_at"].is_string());
    // Kept by the policy (keep_last 2): refused.
    let d = s.admin("DELETE", &format!("/api/v1/recovery-points/{p1}"), None);
    assert_eq!(d.status, 403, "{}", d.body);
    assert!(d.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("locked"));
    // Shortening retention or soft delete: refused; lengthening is fine.
    let short = json!({"name": "base", "schedule": "daily 02:00", "keep_last": 1});
    assert_eq!(
        s.admin("PUT", "/api/v1/policies/base", Some(short)).status,
        403
    );
    let long = json!({"name": "base", "schedule": "daily 02:00", "keep_last": 3});
    assert_eq!(
        s.admin("PUT", "/api/v1/policies/base", Some(long)).status,
        200
    );
    assert_eq!(
        s.admin(
            "PATCH",
            "/api/v1/vaults/default",
            Some(json!({"soft_delete_days": 7}))
        )
        .status,
        403
    );
    // The lock cannot be undone, and a second one is a conflict.
    assert_eq!(
        s.admin("POST", "/api/v1/vaults/default/lock", None).status,
        409
    );
    // The point is kept by a keep-until date too; once newer points push it out of the
    // policy's retention it may go (but not before).
    let held = s.run_backup("web01", json!({"keep_until": "2999-01-01"}))["point"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..3 {
        s.backup("web01");
    }
    let d = s.admin("DELETE", &format!("/api/v1/recovery-points/{held}"), None);
    assert_eq!(d.status, 403, "kept until 2999: {}", d.body);
    assert!(d.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2999"));
    // The lock is in the vault: a state database made afresh still sees it.
    assert!(s.app.vault.rules().unwrap().locked.is_some());
}

#[test]
fn destructive_actions_wait_for_a_second_admin() {
    let s = Server::start(Arc::new(SystemClock));
    let second = s.independent_admin("second-admin");
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let p1 = s.backup("web01");
    assert_eq!(
        s.admin(
            "PATCH",
            "/api/v1/vaults/default",
            Some(json!({"require_approval": true}))
        )
        .status,
        200
    );
    // Delete: accepted as a request, nothing happens yet.
    let d = s.admin("DELETE", &format!("/api/v1/recovery-points/{p1}"), None);
    assert_eq!(d.status, 202, "{}", d.body);
    assert_eq!(d.body["error"]["code"], "approval_required");
    let req = d.body["error"]["approval"].as_i64().unwrap();
    let list = s.admin("GET", "/api/v1/recovery-points", None).body;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    // The requester cannot approve their own request.
    let own = s.admin(
        "POST",
        &format!("/api/v1/approvals/{req}"),
        Some(json!({"approve": true})),
    );
    assert_eq!(own.status, 403, "{}", own.body);
    // A second admin approves: it is carried out.
    let ok = s.ok(
        &second,
        "POST",
        &format!("/api/v1/approvals/{req}"),
        Some(json!({"approve": true})),
    );
    assert_eq!(ok["state"], "approved");
    assert_eq!(ok["decided_by"], "second-admin");
    let list = s.admin("GET", "/api/v1/recovery-points", None).body;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
    // Decided once only.
    assert_eq!(
        s.call(
            Some(&second),
            "POST",
            &format!("/api/v1/approvals/{req}"),
            Some(json!({"approve": true}))
        )
        .status,
        409
    );
    // Unprotect, rejected by the second admin: the item stays.
    let u = s.admin("DELETE", "/api/v1/protected-items/web01", None);
    assert_eq!(u.status, 202);
    let req = u.body["error"]["approval"].as_i64().unwrap();
    let r = s.ok(
        &second,
        "POST",
        &format!("/api/v1/approvals/{req}"),
        Some(json!({"approve": false})),
    );
    assert_eq!(r["state"], "rejected");
    assert_eq!(
        s.admin("GET", "/api/v1/protected-items/web01", None).status,
        200
    );
    // Turning the requirement off is itself destructive.
    let off = s.admin(
        "PATCH",
        "/api/v1/vaults/default",
        Some(json!({"require_approval": false})),
    );
    assert_eq!(off.status, 202);
    let approvals = s.ok(&second, "GET", "/api/v1/approvals", None);
    assert_eq!(approvals.as_array().unwrap().len(), 3);
}

#[test]
fn errors_have_a_stable_shape_and_openapi_is_served() {
    let s = Server::start(Arc::new(SystemClock));
    let doc = s.call(None, "GET", "/api/v1/openapi.json", None);
    assert_eq!(doc.status, 200);
    for p in [
        "/api/v1/policies",
        "/api/v1/protected-items",
        "/api/v1/recovery-points",
        "/api/v1/jobs",
        "/api/v1/restores",
        "/api/v1/vaults",
        "/api/v1/approvals",
    ] {
        assert!(
            doc.body["paths"].get(p).is_some(),
            "{p} missing from the OpenAPI document"
        );
    }
    let bad = s.admin(
        "POST",
        "/api/v1/policies",
        Some(json!({"name": "x", "schedule": "sometimes", "keep_last": 1})),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["code"], "bad_request");
    assert!(bad.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sometimes"));
    // A QEMU VM is not protected by the server yet: said, not backed up wrongly.
    s.admin(
        "POST",
        "/api/v1/policies",
        Some(json!({"name": "p", "schedule": "daily 02:00", "keep_last": 1})),
    );
    let qemu = s.admin(
        "POST",
        "/api/v1/protected-items",
        Some(
            json!({"description": "name = \"vm1\"\nsource = \"qemu\"\nqmp = \"/run/q.sock\"\n",
                    "policy": "p"}),
        ),
    );
    assert_eq!(qemu.status, 400, "{:?}", qemu.body);
    assert!(qemu.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--qmp"));
    let missing = s.admin("GET", "/api/v1/policies/nope", None);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "not_found");
    assert_eq!(s.admin("GET", "/api/v1/jobs?state=bogus", None).status, 400);
    // What axum refuses itself has the same shape.
    for (method, path, body) in [
        ("GET", "/api/v1/jobs/abc", None),
        ("POST", "/api/v1/policies", Some(json!({"name": 5}))),
        ("PATCH", "/api/v1/jobs", None),
    ] {
        let a = s.admin(method, path, body);
        assert!(
            a.status >= 400 && a.status < 500,
            "{method} {path}: {}",
            a.status
        );
        assert!(
            a.body["error"]["code"].is_string(),
            "{method} {path}: {}",
            a.body
        );
    }
    assert_eq!(
        s.admin("GET", "/api/v1/recovery-points?cursor=zzz", None)
            .status,
        400
    );
    let m = s.call(None, "GET", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m
        .body
        .as_str()
        .unwrap()
        .contains("vmvault_jobs{state=\"failed\"} 0"));
}

#[test]
fn jobs_show_progress_and_log_and_can_be_cancelled() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({}));
    let big = s.vm("big", 256);
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/protected-items",
        Some(json!({"description": big, "policy": "base"})),
    );
    let j = s
        .admin(
            "POST",
            "/api/v1/protected-items/big/backup",
            Some(json!({})),
        )
        .body;
    let id = j["job"].as_i64().unwrap();
    // A second backup of the same VM waits: one job per VM.
    let j2 = s
        .admin(
            "POST",
            "/api/v1/protected-items/big/backup",
            Some(json!({})),
        )
        .body["job"]
        .as_i64()
        .unwrap();
    loop {
        let job = s.admin("GET", &format!("/api/v1/jobs/{id}"), None).body;
        if job["state"] == "running" && job["bytes_done"].as_u64().unwrap() > 0 {
            assert!(job["bytes_total"].as_u64().unwrap() >= 256 << 20);
            let queued = s.admin("GET", &format!("/api/v1/jobs/{j2}"), None).body;
            assert_eq!(queued["state"], "queued");
            break;
        }
        assert!(
            job["state"] == "running" || job["state"] == "queued",
            "{job}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let c = s.admin("POST", &format!("/api/v1/jobs/{id}/cancel"), None);
    assert_eq!(c.status, 200);
    let done = s.wait_job(id);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(done["log"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["line"] == "cancel requested"));
    // The queued one can be cancelled before it starts, or ends on its own.
    s.admin("POST", &format!("/api/v1/jobs/{j2}/cancel"), None);
    let j2 = s.wait_job(j2);
    assert!(j2["state"] == "cancelled" || j2["state"] == "succeeded");
    let running = s.admin("GET", "/api/v1/jobs?state=running", None).body;
    assert_eq!(running.as_array().unwrap().len(), 0);
}

#[test]
fn a_failed_backup_is_retried_with_backoff_then_fails_and_alerts() {
    let s = Server::start_with(Arc::new(SystemClock), |c| c.backup_attempts = 2);
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    std::fs::remove_file(s.path("web01.raw")).unwrap();
    let done = s.run_backup("web01", json!({}));
    assert_eq!(done["state"], "failed");
    assert_eq!(done["attempt"], 1);
    let log: Vec<&str> = done["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("attempt 1 failed") && l.contains("retrying in 1 s")),
        "{log:?}"
    );
    let audit = s.admin("GET", "/api/v1/audit", None).body;
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "alert.backup_failed"));
    let failed = s.admin("GET", "/api/v1/jobs?state=failed", None).body;
    assert_eq!(failed.as_array().unwrap().len(), 1);
}

#[test]
fn points_are_paged() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("base", "daily 02:00", json!({"keep_last": 100}));
    s.protect("web01", "base");
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(s.backup("web01"));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!(
                "/api/v1/recovery-points?limit=2&cursor={}",
                c.replace(':', "%3A").replace('+', "%2B")
            ),
            None => "/api/v1/recovery-points?limit=2".into(),
        };
        let page = s.admin("GET", &q, None).body;
        for p in page["items"].as_array().unwrap() {
            seen.push(p["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.into()),
            None => break,
        }
    }
    assert_eq!(seen, made);
}
