//! A vault locked through the server's API is held by the storage too, as one locked by the
//! CLI is (issue 12, "A vault rule holds on every path"): on a moto bucket with S3 Object
//! Lock, `POST /vaults/NAME/lock` sets the hold, renews it on what was there before the lock,
//! and `storage_lock` says how many days; someone holding the bucket's own credentials then
//! cannot destroy any object version. One test in this binary: it puts the S3 credentials in
//! the process environment (where the server takes them from) before anything runs.

mod common;

use std::sync::Arc;

use common::Server;
use serde_json::json;
use vmvault_cloud::Credentials;
use vmvault_server::SystemClock;
use vmvault_testkit::Moto;

#[test]
fn a_lock_through_the_api_has_the_storage_hold_every_object() {
    let Some(moto) = Moto::start() else { return };
    moto.create_locked_bucket("held");
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        ..
    } = moto.credentials()
    else {
        unreachable!()
    };
    // Set before the server (or any other thread of this test binary) starts.
    std::env::set_var("AWS_ACCESS_KEY_ID", access_key_id);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret_access_key);
    let (endpoint, region) = (moto.endpoint(), moto.region());
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.vault = Some("s3://held/srv".into());
        c.endpoint = Some(endpoint.clone());
        c.region = Some(region.clone());
    });
    let said = |info: &serde_json::Value| info["storage_lock"].as_str().unwrap().to_string();
    let before = s.admin("GET", "/api/v1/vaults/default", None).body;
    assert!(
        said(&before).starts_with("enforced by the storage once the vault is locked"),
        "{before}"
    );

    s.policy("daily", "daily 02:00", json!({}));
    s.protect("web01", "daily");
    s.backup("web01");

    // A hold of 0 days, or a body that is not one, is the caller's mistake.
    let bad = s.admin(
        "POST",
        "/api/v1/vaults/default/lock",
        Some(json!({"hold_days": 0})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let bad = s.admin(
        "POST",
        "/api/v1/vaults/default/lock",
        Some(json!({"hold_days": "long"})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(
        s.admin("GET", "/api/v1/vaults/default", None).body["locked_at"],
        serde_json::Value::Null,
        "a refused lock locked nothing"
    );

    let l = s.admin(
        "POST",
        "/api/v1/vaults/default/lock",
        Some(json!({"hold_days": 2})),
    );
    assert_eq!(l.status, 200, "{}", l.body);
    assert!(
        said(&l.body)
            .starts_with("enforced by the storage: S3 Object Lock holds every object for 2 day(s)"),
        "{}",
        l.body
    );
    // After the lock: written held.
    s.backup("web01");

    // Someone with the bucket's credentials tries to destroy every version of every chunk,
    // index, manifest, the rules and the config: the storage refuses each one, the objects
    // written before the lock included.
    let kinds = [
        "/chunks/",
        "/indexes/",
        "/points/",
        "srv/rules",
        "srv/config",
    ];
    let refused = moto.assert_every_version_held("held", "srv/", &kinds);
    assert!(refused > 6, "{refused} held");

    // Locking again asks for nothing new: a conflict. A longer hold lengthens it.
    let again = s.admin("POST", "/api/v1/vaults/default/lock", None);
    assert_eq!(again.status, 409, "{}", again.body);
    let shorter = s.admin(
        "POST",
        "/api/v1/vaults/default/lock",
        Some(json!({"hold_days": 1})),
    );
    assert_eq!(shorter.status, 409, "{}", shorter.body);
    let longer = s.admin(
        "POST",
        "/api/v1/vaults/default/lock",
        Some(json!({"hold_days": 5})),
    );
    assert_eq!(longer.status, 200, "{}", longer.body);
    assert!(
        said(&longer.body).contains("for 5 day(s)"),
        "{}",
        longer.body
    );
    assert_eq!(
        s.app.vault.rules().unwrap().locked.unwrap().hold_days,
        Some(5)
    );
}
