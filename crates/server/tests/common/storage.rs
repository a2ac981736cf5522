//! The vault's rules kept by the server on a vault in object storage (issue 12, "The server's
//! own tests run against an S3 vault and an Azure vault"): one body of checks, run by
//! `on_object_storage.rs` (S3) and `on_azure_blob.rs` (Azure Blob), each in its own test
//! binary because each puts its storage's credentials in the process environment.

use serde_json::json;

use super::{ids, Server};

/// Scheduled and on-demand backups, retention that evicts no on-demand point, soft delete and
/// undelete, the lock and its refusal, `storage_lock` in words, on the server's vault at `url`.
pub fn the_vaults_rules_hold(s: &Server, url: &str) {
    let info = s.admin("GET", "/api/v1/vaults", None).body;
    assert_eq!(
        info[0]["location"].as_str().unwrap().split(' ').next(),
        Some(url),
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
    // No bucket here has Object Lock, and Azure Blob's immutability is not used.
    assert!(said.starts_with("not enforced by the storage"), "{said}");
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
