//! The server's own API on a vault in S3 (Garage, else moto), not only a directory (issue 12,
//! "Verified by"): scheduled and on-demand backups, retention that evicts no on-demand point,
//! soft delete and undelete, the lock and its refusal, and `storage_lock` saying whether the
//! storage enforces it. One test in this binary: it puts the S3 credentials in the process
//! environment (where the server, like the CLI, takes them from) before anything runs.

mod common;

use std::sync::Arc;

use common::Server;
use serde_json::json;
use vmvault_cloud::Credentials;
use vmvault_server::SystemClock;
use vmvault_testkit::S3Server;

fn ids(list: &serde_json::Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_server_keeps_the_vaults_rules_on_s3() {
    let Some(s3) = S3Server::start() else { return };
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        ..
    } = s3.credentials()
    else {
        unreachable!()
    };
    // Set before the server (or any other thread of this test binary) starts.
    std::env::set_var("AWS_ACCESS_KEY_ID", access_key_id);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret_access_key);
    let (url, endpoint, region) = (s3.url("server-api"), s3.endpoint(), s3.region());
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.vault = Some(url.clone());
        c.endpoint = Some(endpoint.clone());
        c.region = Some(region.clone());
    });
    let info = s.admin("GET", "/api/v1/vaults", None).body;
    assert_eq!(
        info[0]["location"].as_str().unwrap().split(' ').next(),
        Some(url.as_str()),
        "{info}"
    );

    s.policy("four", "daily 02:00", json!({"keep_last": 4}));
    s.protect("au01", "four");
    let scheduled: Vec<String> = (0..4).map(|_| s.scheduled_backup("au01")).collect();
    let op = s.user("op", "operator");
    for _ in 0..3 {
        let j = s.ok(
            &op,
            "POST",
            "/api/v1/protected-items/au01/backup",
            Some(json!({})),
        );
        assert_eq!(s.wait_job(j["job"].as_i64().unwrap())["state"], "succeeded");
    }
    let live = || {
        ids(&s
            .admin("GET", "/api/v1/recovery-points?item=au01", None)
            .body)
    };
    assert_eq!(
        live().len(),
        7,
        "no on-demand point counts toward keep_last 4"
    );

    // A delete is soft, and undone.
    let gone = &scheduled[0];
    let d = s.admin("DELETE", &format!("/api/v1/recovery-points/{gone}"), None);
    assert_eq!(d.status, 200, "{}", d.body);
    let deleted = ids(&s
        .admin("GET", "/api/v1/recovery-points?deleted=true", None)
        .body);
    assert_eq!(deleted, vec![gone.clone()]);
    let u = s.admin(
        "POST",
        &format!("/api/v1/recovery-points/{gone}/undelete"),
        None,
    );
    assert_eq!(u.status, 200, "{}", u.body);
    assert_eq!(live().len(), 7);

    // Locked: the point stays, whoever asks; the answer says what the storage does.
    let l = s.admin("POST", "/api/v1/vaults/default/lock", None);
    assert_eq!(l.status, 200, "{}", l.body);
    let said = l.body["storage_lock"].as_str().unwrap();
    assert!(said.contains("storage"), "{said}");
    if s3.name() == "garage" {
        assert!(said.starts_with("not enforced by the storage"), "{said}");
    }
    let d = s.admin("DELETE", &format!("/api/v1/recovery-points/{gone}"), None);
    assert_eq!(d.status, 403, "{}", d.body);
    assert_eq!(live().len(), 7);
    // Every manifest made is still in the bucket.
    let stored: Vec<String> = s
        .app
        .vault
        .point_ids()
        .unwrap()
        .iter()
        .map(|i| i.to_hex())
        .collect();
    assert_eq!(stored.len(), 7, "{stored:?}");
}
