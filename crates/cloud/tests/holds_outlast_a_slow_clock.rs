//! Attack: a host whose clock is behind (by more than the hold) locks a vault on a bucket with
//! S3 Object Lock. Reckoned from the host's clock alone, every hold would end in the past and
//! hold nothing: someone with the bucket's credentials could delete any object at once. The
//! hold's end comes from the later of the host's and the storage's clocks, so the objects stay
//! held. Real moto, which implements Object Lock.

use std::sync::Arc;

use vmvault_cloud::open;
use vmvault_store::{CreateOptions, ManualClock, Vault, WriteBackend};
use vmvault_testkit::Moto;

#[test]
fn a_host_clock_thirty_days_behind_still_holds_every_object() {
    let Some(moto) = Moto::start() else { return };
    moto.create_locked_bucket("slow");
    let backend: Arc<dyn WriteBackend> = open("s3://slow/v", &moto.options()).unwrap();
    Vault::create(backend.clone(), CreateOptions::default()).unwrap();
    let vault = Vault::open(backend, || Ok(Vec::new()))
        .unwrap()
        .with_clock(ManualClock::skewed(-30 * 86_400));
    vault.lock_vault_holding("admin", 2).unwrap();
    assert!(vault.renew_holds(&|_| {}).unwrap() >= 2);

    // Reckoned from the host's clock alone, each of these would be deletable at once.
    moto.assert_every_version_held("slow", "v/", &["v/config", "v/rules"]);
}
