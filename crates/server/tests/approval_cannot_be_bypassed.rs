//! Multi-user authorization cannot be bypassed by one admin. On a vault that requires
//! approval, minting a token for another user, creating an admin and changing a role wait for
//! a second admin; the requester never approves their own request, whatever token they hold
//! (a token they minted for someone else is still theirs); and two admins deciding one request
//! at once do not both run it.

mod common;

use std::sync::{Arc, Barrier};

use common::{Answer, Server};
use serde_json::{json, Value};
use vmvault_server::SystemClock;

/// A server with a second, independent admin `bob`, a VM with one point, and approval on.
fn mua_server() -> (Server, String, String) {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    s.require_approval();
    (s, bob, point)
}

/// The request id of a 202 answer.
fn pending(a: &Answer) -> i64 {
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "approval_required", "{}", a.body);
    a.body["error"]["approval"].as_i64().unwrap()
}

/// Whatever token an answer carries: a 201's, or the one a 202 holds until it is approved.
fn token_in(a: &Answer) -> Option<String> {
    a.body["token"]
        .as_str()
        .or_else(|| a.body["error"]["token"].as_str())
        .map(str::to_string)
}

fn approve(s: &Server, token: &str, id: i64) -> Answer {
    s.call(
        Some(token),
        "POST",
        &format!("/api/v1/approvals/{id}"),
        Some(json!({"approve": true})),
    )
}

fn points_left(s: &Server) -> usize {
    s.admin("GET", "/api/v1/recovery-points", None).body["items"]
        .as_array()
        .unwrap()
        .len()
}

fn assert_refused(a: &Answer, what: &str) {
    assert!(
        a.status == 403 || a.status == 401,
        "{what}: {} {}",
        a.status,
        a.body
    );
}

#[test]
fn a_token_minted_for_another_admin_needs_approval_and_never_approves_for_its_minter() {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    // A third admin, to approve what bob cannot be asked to.
    let carol = s.independent_admin("carol");
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let point = s.backup("web01");
    s.require_approval();
    let req = pending(&s.admin("DELETE", &format!("/api/v1/recovery-points/{point}"), None));
    // The attack: the admin mints a token for bob and approves its own request with it.
    let mint = s.admin("POST", "/api/v1/users/bob/tokens", None);
    let minted = token_in(&mint).expect("the requester gets the token it asked for");
    assert_refused(
        &approve(&s, &minted, req),
        "approving with a self-minted token",
    );
    assert_eq!(points_left(&s), 1, "the point must not be deleted");
    // Minting for someone else waits for a second admin, and the token works only then.
    let mint_req = pending(&mint);
    assert_eq!(
        s.call(Some(&minted), "GET", "/api/v1/vaults", None).status,
        401
    );
    assert_refused(&approve(&s, &s.admin.clone(), mint_req), "own mint request");
    assert_eq!(approve(&s, &carol, mint_req).status, 200);
    assert_eq!(
        s.call(Some(&minted), "GET", "/api/v1/vaults", None).status,
        200
    );
    // Even approved, it is the minter's: it never approves the minter's requests...
    let a = approve(&s, &minted, req);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin"));
    // ...nor does a token minted with it (it cannot be laundered into bob's own).
    let laundered = s.ok(&minted, "POST", "/api/v1/users/bob/tokens", None)["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_refused(&approve(&s, &laundered, req), "a laundered token");
    assert_eq!(points_left(&s), 1);
    // Bob's own token does.
    assert_eq!(approve(&s, &bob, req).status, 200);
    assert_eq!(points_left(&s), 0);
}

#[test]
fn creating_an_admin_needs_approval_and_its_token_never_approves_for_its_creator() {
    let (s, bob, point) = mua_server();
    let req = pending(&s.admin("DELETE", &format!("/api/v1/recovery-points/{point}"), None));
    let made = s.admin(
        "POST",
        "/api/v1/users",
        Some(json!({"name": "sock", "role": "admin"})),
    );
    let sock = token_in(&made).expect("the creator gets the new admin's token");
    assert_refused(
        &approve(&s, &sock, req),
        "approving as a freshly made admin",
    );
    assert_eq!(points_left(&s), 1, "the point must not be deleted");
    let create_req = pending(&made);
    let users = s.admin("GET", "/api/v1/users", None).body;
    assert!(
        !users.to_string().contains("sock"),
        "no user before approval: {users}"
    );
    assert_refused(&approve(&s, &s.admin.clone(), create_req), "own request");
    assert_eq!(approve(&s, &bob, create_req).status, 200);
    assert_eq!(
        s.call(Some(&sock), "GET", "/api/v1/users", None).status,
        200
    );
    assert_eq!(approve(&s, &sock, req).status, 403);
    assert_eq!(points_left(&s), 1);
    // Users below admin are made at once: they approve nothing.
    let r = s.admin(
        "POST",
        "/api/v1/users",
        Some(json!({"name": "rita", "role": "reader"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

#[test]
fn a_token_handed_over_before_approval_was_required_is_still_its_minters() {
    let s = Server::start(Arc::new(SystemClock));
    let bob = s.independent_admin("bob");
    // Made by the first admin, who keeps a copy of the token it handed over.
    let eve = s.user("eve", "admin");
    s.policy("base", "daily 02:00", json!({}));
    s.protect("web01", "base");
    let p1 = s.backup("web01");
    let p2 = s.backup("web01");
    s.require_approval();
    let req = pending(&s.admin("DELETE", &format!("/api/v1/recovery-points/{p1}"), None));
    assert_refused(&approve(&s, &eve, req), "the first admin acting as eve");
    // A request made with eve's token is the first admin's too.
    let req2 = pending(&s.call(
        Some(&eve),
        "DELETE",
        &format!("/api/v1/recovery-points/{p2}"),
        None,
    ));
    assert_refused(
        &approve(&s, &s.admin.clone(), req2),
        "approving what it asked for as eve",
    );
    assert_eq!(points_left(&s), 2);
    assert_eq!(approve(&s, &bob, req).status, 200);
    assert_eq!(approve(&s, &bob, req2).status, 200);
    assert_eq!(points_left(&s), 0);
}

#[test]
fn role_changes_need_approval() {
    let (s, bob, _) = mua_server();
    let carl = s.user("carl", "contributor");
    let a = s.admin(
        "PUT",
        "/api/v1/users/carl/role",
        Some(json!({"role": "admin"})),
    );
    let req = pending(&a);
    assert_eq!(
        s.call(Some(&carl), "GET", "/api/v1/users", None).status,
        403
    );
    assert_refused(&approve(&s, &s.admin.clone(), req), "own request");
    assert_eq!(approve(&s, &bob, req).status, 200);
    assert_eq!(
        s.call(Some(&carl), "GET", "/api/v1/users", None).status,
        200
    );
    // Without approval required, a role changes at once.
    let s2 = Server::start(Arc::new(SystemClock));
    s2.user("dana", "reader");
    let a = s2.admin(
        "PUT",
        "/api/v1/users/dana/role",
        Some(json!({"role": "operator"})),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    let users = s2.admin("GET", "/api/v1/users", None).body;
    let dana = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "dana")
        .unwrap();
    assert_eq!(dana["roles"][0][1], "operator", "{users}");
}

#[test]
fn admins_deciding_at_once_run_a_request_once() {
    let s = Server::start(Arc::new(SystemClock));
    // Four deciders per request widen the window between reading a request as pending and
    // marking it decided: without one claiming update, two of them run it.
    let deciders: Vec<String> = ["bob", "carol", "dave", "erin"]
        .iter()
        .map(|n| s.independent_admin(n))
        .collect();
    s.policy("base", "daily 02:00", json!({"keep_last": 100}));
    s.protect("web01", "base");
    let points: Vec<String> = (0..12).map(|_| s.backup("web01")).collect();
    s.require_approval();
    let s = Arc::new(s);
    for p in &points {
        let req = pending(&s.admin("DELETE", &format!("/api/v1/recovery-points/{p}"), None));
        let barrier = Arc::new(Barrier::new(deciders.len()));
        let answers: Vec<(u16, Value)> = deciders
            .iter()
            .cloned()
            .map(|t| {
                let (s, barrier) = (s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let a = approve(&s, &t, req);
                    (a.status, a.body)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let ok = answers.iter().filter(|(st, _)| *st == 200).count();
        let conflict = answers.iter().filter(|(st, _)| *st == 409).count();
        assert_eq!(
            (ok, conflict),
            (1, deciders.len() - 1),
            "request {req}: {answers:?}"
        );
        // And the record says so: one decision, the winner's, never overwritten by a loser
        // that ran it again (and failed, the point being gone already).
        let winner = &answers.iter().find(|(st, _)| *st == 200).unwrap().1;
        let all = s.admin("GET", "/api/v1/approvals", None).body;
        let row = all
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == req)
            .unwrap()
            .clone();
        assert_eq!(row["state"], "approved", "{row}");
        assert_eq!(row["decided_by"], winner["decided_by"], "{row}");
    }
    assert_eq!(points_left(&s), 0);
    let audit = s.admin("GET", "/api/v1/audit?limit=1000", None).body;
    let runs = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "approval.decide" && e["outcome"] == "approved")
        .count();
    assert_eq!(runs, points.len(), "each request ran once");
}
