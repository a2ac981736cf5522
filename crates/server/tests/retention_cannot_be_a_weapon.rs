//! Issue 12, item 1, as a user found it through the real API: retention destroyed points the
//! lock and soft delete promised to keep, and an operator could trigger it. Now every removal
//! goes through the vault's rules: on-demand points never count toward a policy, retention
//! soft-deletes and audits with its rule, and a locked vault keeps what the retention recorded
//! in each point keeps, whatever policy or protection is in place later.

mod common;

use std::sync::Arc;

use common::{ids, Server};
use serde_json::json;
use vmvault_server::SystemClock;

fn live(s: &Server, vm: &str) -> Vec<String> {
    ids(&s
        .admin("GET", &format!("/api/v1/recovery-points?item={vm}"), None)
        .body)
}

fn deleted(s: &Server) -> Vec<String> {
    ids(&s
        .admin("GET", "/api/v1/recovery-points?deleted=true", None)
        .body)
}

/// Every manifest ever made is still in the vault (soft-deleted or not).
fn nothing_lost(s: &Server, made: &[String]) {
    let stored: Vec<String> = s
        .app
        .vault
        .point_ids()
        .unwrap()
        .iter()
        .map(|i| i.to_hex())
        .collect();
    for id in made {
        assert!(stored.contains(id), "point {id} is gone from the vault");
    }
}

#[test]
fn an_operators_burst_of_on_demand_backups_evicts_nothing() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("four", "daily 02:00", json!({"keep_last": 4}));
    s.protect("au01", "four");
    let scheduled: Vec<String> = (0..4).map(|_| s.scheduled_backup("au01")).collect();
    let op = s.user("op", "operator");
    for _ in 0..4 {
        let j = s.ok(
            &op,
            "POST",
            "/api/v1/protected-items/au01/backup",
            Some(json!({})),
        );
        assert_eq!(s.wait_job(j["job"].as_i64().unwrap())["state"], "succeeded");
    }
    let now = live(&s, "au01");
    assert_eq!(now.len(), 8, "{now:?}");
    for id in &scheduled {
        assert!(now.contains(id), "scheduled point {id} was evicted");
    }
    // Each on-demand point says how long it is kept (30 days by default).
    let list = s
        .admin("GET", "/api/v1/recovery-points?item=au01", None)
        .body;
    let held = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep_until"].is_string())
        .count();
    assert_eq!(held, 4);
}

#[test]
fn retention_soft_deletes_and_audits_with_its_rule() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("two", "daily 02:00", json!({"keep_last": 2}));
    s.protect("web02", "two");
    let made: Vec<String> = (0..3).map(|_| s.scheduled_backup("web02")).collect();
    assert_eq!(live(&s, "web02"), made[1..].to_vec());
    assert_eq!(deleted(&s), vec![made[0].clone()], "soft-deleted, not gone");
    nothing_lost(&s, &made);
    let audit = s.admin("GET", "/api/v1/audit?limit=1000", None).body;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "point.delete"
                && e["target"] == made[0].as_str()
                && e["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("retention: policy 'two' (last 2)")),
        "{audit}"
    );
    // And it can be brought back.
    let u = s.admin(
        "POST",
        &format!("/api/v1/recovery-points/{}/undelete", made[0]),
        None,
    );
    assert_eq!(u.status, 200, "{}", u.body);
}

#[test]
fn a_locked_vault_keeps_what_each_point_was_promised() {
    let s = Server::start(Arc::new(SystemClock));
    s.policy("three", "daily 02:00", json!({"keep_last": 3}));
    s.protect("web02", "three");
    let mut made: Vec<String> = (0..3).map(|_| s.scheduled_backup("web02")).collect();
    assert_eq!(
        s.admin("POST", "/api/v1/vaults/default/lock", None).status,
        200
    );
    // A delete of a point the policy keeps is refused, and says why.
    let d = s.admin(
        "DELETE",
        &format!("/api/v1/recovery-points/{}", made[0]),
        None,
    );
    assert_eq!(d.status, 403, "{}", d.body);
    // An on-demand backup one second later removes nothing.
    made.push(s.backup("web02"));
    assert_eq!(live(&s, "web02").len(), 4);

    // Unprotect, protect again under a policy keeping 1, change its time zone, back up on
    // schedule: only what the retention recorded in each point no longer keeps may go, and
    // then only softly. keep_last 3 recorded: of four scheduled points the oldest is out.
    assert_eq!(
        s.admin("DELETE", "/api/v1/protected-items/web02", None)
            .status,
        204
    );
    s.policy(
        "one",
        "daily 02:00",
        json!({"keep_last": 1, "timezone": "Pacific/Kiritimati"}),
    );
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/protected-items",
        Some(json!({"description": s.vm("web02", 2), "policy": "one"})),
    );
    made.push(s.scheduled_backup("web02"));
    let now = live(&s, "web02");
    for id in &made[1..] {
        assert!(now.contains(id), "point {id} was removed under the lock");
    }
    assert_eq!(deleted(&s), vec![made[0].clone()]);
    nothing_lost(&s, &made);
    // The audit shows the refusals with the rule that kept each point.
    let audit = s.admin("GET", "/api/v1/audit?limit=1000", None).body;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "point.delete"
                && e["outcome"].as_str().unwrap().starts_with("denied")
                && e["outcome"]
                    .as_str()
                    .unwrap()
                    .contains("policy 'three' (last 3)")),
        "{audit}"
    );
}
