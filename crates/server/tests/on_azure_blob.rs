//! The server's own API on a vault in Azure Blob (Azurite), not only a directory (issue 12,
//! "Verified by"): the checks of `common::storage`, as `on_object_storage.rs` runs them on S3.
//! One test in this binary: it puts the account key in the process environment (where the
//! server, like the CLI, takes it from) before anything runs.

mod common;

use std::sync::Arc;

use common::Server;
use vmvault_server::SystemClock;
use vmvault_testkit::{Azurite, AZURITE_KEY};

#[test]
fn the_server_keeps_the_vaults_rules_on_azure_blob() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    // Set before the server (or any other thread of this test binary) starts.
    std::env::set_var("AZURE_STORAGE_KEY", AZURITE_KEY);
    let (url, endpoint, account) = (
        azurite.url("server-api"),
        azurite.endpoint(),
        azurite.account(),
    );
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.vault = Some(url.clone());
        c.endpoint = Some(endpoint.clone());
        c.account = Some(account.clone());
    });
    common::storage::the_vaults_rules_hold(&s, &url);
}
