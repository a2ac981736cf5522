//! The server's own API on a vault in S3 (Garage, else moto), not only a directory (issue 12,
//! "Verified by"): the checks of `common::storage` (scheduled and on-demand backups, retention
//! that evicts no on-demand point, soft delete and undelete, the lock and its refusal,
//! `storage_lock` saying whether the storage enforces it). One test in this binary: it puts the S3 credentials in the process
//! environment (where the server, like the CLI, takes them from) before anything runs.

mod common;

use std::sync::Arc;

use common::Server;
use vmvault_cloud::Credentials;
use vmvault_server::SystemClock;
use vmvault_testkit::S3Server;

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
    common::storage::the_vaults_rules_hold(&s, &url);
}
