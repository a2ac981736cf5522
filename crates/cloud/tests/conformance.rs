//! The backend contract (`vmvault_store::conformance`) on real servers, each on a fresh bucket.

use vmvault_cloud::{open, RemoteOptions};
use vmvault_store::{conformance, Kind};
use vmvault_testkit::{Azurite, Garage, Moto};

fn run(url: &str, opts: &RemoteOptions) {
    let backend = open(url, opts).unwrap();
    conformance::run(&*backend);
}

#[test]
fn s3_on_garage_keeps_the_contract() {
    let Some(garage) = Garage::start() else {
        return;
    };
    garage.create_bucket("conformance");
    run("s3://conformance/vaults/one", &garage.options());
}

#[test]
fn s3_on_moto_keeps_the_contract() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("conformance");
    run("s3://conformance/vaults/one", &moto.options());
    // A vault at the bucket's root, beside nothing else.
    moto.create_bucket("conformance-root");
    run("s3://conformance-root", &moto.options());
}

#[test]
fn azure_blob_on_azurite_keeps_the_contract() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    azurite.create_bucket("conformance");
    run("azblob://conformance/vaults/one", &azurite.options());
}

/// Objects sit under the prefix exactly as in a local vault directory. Seen through a second
/// backend whose prefix is a kind's folder: its `config` kind reads `PREFIX/NAME` directly.
fn layout_is_the_local_one(url: &str, opts: &RemoteOptions) {
    let vault = open(&format!("{url}/vault"), opts).unwrap();
    vault.create().unwrap();
    let cases = [
        (Kind::Config, "config", ""),
        (Kind::Key, "default", "/keys"),
        (Kind::Chunk, "ab12cd", "/chunks/ab"),
        (Kind::Index, "ef34", "/indexes"),
        (Kind::Point, "p1", "/points"),
        (Kind::Lock, "l1", "/locks"),
    ];
    for (kind, name, folder) in cases {
        vault.write(kind, name, name.as_bytes()).unwrap();
        let raw = open(&format!("{url}/vault{folder}"), opts).unwrap();
        assert_eq!(
            raw.read(Kind::Config, name).unwrap(),
            name.as_bytes(),
            "{kind:?}"
        );
    }
    // A neighbouring prefix that starts with the same letters is another vault.
    let neighbour = open(&format!("{url}/vault2"), opts).unwrap();
    neighbour.create().unwrap();
    assert!(neighbour.list(Kind::Chunk).unwrap().is_empty());
}

#[test]
fn layout_on_s3_and_azure_is_the_local_one() {
    if let Some(moto) = Moto::start() {
        moto.create_bucket("layout");
        layout_is_the_local_one("s3://layout/a", &moto.options());
    }
    if let Some(azurite) = Azurite::start() {
        azurite.create_bucket("layout");
        layout_is_the_local_one("azblob://layout/a", &azurite.options());
    }
}

/// The vault's rules matrix (`vmvault_store::rules_matrix`) on a server: each check on a fresh
/// prefix of one bucket.
fn rules(bucket_url: &str, opts: &RemoteOptions) {
    let n = std::sync::atomic::AtomicUsize::new(0);
    vmvault_store::rules_matrix::run(&|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        open(&format!("{bucket_url}/rules-{i}"), opts).unwrap()
    });
}

#[test]
fn the_vaults_rules_hold_on_s3() {
    let Some(s3) = vmvault_testkit::S3Server::start() else {
        return;
    };
    s3.create_bucket("rules");
    rules("s3://rules", &s3.options());
}

#[test]
fn the_vaults_rules_hold_on_azure_blob() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    azurite.create_bucket("rules");
    rules("azblob://rules", &azurite.options());
}
