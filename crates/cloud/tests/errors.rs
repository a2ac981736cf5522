//! How failures reach the vault: transient or permanent, clear, and never with a secret in them.

use std::time::Instant;

use vmvault_cloud::{open, Credentials, RemoteOptions};
use vmvault_store::{Kind, StoreError, WriteBackend};
use vmvault_testkit::{Azurite, Garage, GarageCluster, S3Server};

fn expect_remote(result: Result<impl std::fmt::Debug, StoreError>, transient: bool) -> StoreError {
    match result {
        Err(e @ StoreError::Remote { .. }) => {
            assert_eq!(e.is_transient(), transient, "{e}");
            e
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
}

/// Every call fails, transiently, once the server is gone.
fn stopped_server_is_transient(backend: &dyn WriteBackend) {
    let e = expect_remote(backend.write(Kind::Chunk, "abcd", b"x"), true);
    assert!(e.to_string().contains(&backend.location()), "{e}");
    expect_remote(backend.read(Kind::Chunk, "abcd"), true);
    expect_remote(backend.stat(Kind::Chunk, "abcd"), true);
    expect_remote(backend.list(Kind::Chunk), true);
    expect_remote(backend.remove(Kind::Chunk, "abcd"), true);
    expect_remote(backend.create(), true);
}

#[test]
fn a_stopped_server_is_a_transient_error() {
    if let Some(s3) = S3Server::start() {
        let backend = open(&s3.url("stopped"), &s3.options()).unwrap();
        backend.write(Kind::Chunk, "abcd", b"x").unwrap();
        drop(s3);
        stopped_server_is_transient(&*backend);
    }
    if let Some(azurite) = Azurite::start() {
        let backend = open(&azurite.url("stopped"), &azurite.options()).unwrap();
        backend.write(Kind::Chunk, "abcd", b"x").unwrap();
        drop(azurite);
        stopped_server_is_transient(&*backend);
    }
}

/// A request the server refuses for its credentials is permanent, and neither the error's
/// text nor its debug form holds any of `secrets`.
fn refused(url: &str, opts: &RemoteOptions, secrets: &[&str]) {
    let backend = open(url, opts).unwrap();
    let mut errors = vec![
        expect_remote(backend.write(Kind::Chunk, "abcd", b"x"), false),
        expect_remote(backend.read(Kind::Chunk, "abcd"), false),
        expect_remote(backend.list(Kind::Point), false),
    ];
    errors.push(expect_remote(backend.stat(Kind::Chunk, "abcd"), false));
    eprintln!("refused: {}", errors[0]);
    assert!(errors[0].to_string().contains("403"), "{}", errors[0]);
    let shown = format!("{errors:?} {opts:?} {}", backend.location());
    for e in &errors {
        let text = e.to_string();
        for secret in secrets {
            assert!(!text.contains(secret), "{secret:?} in {text}");
        }
    }
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret:?} in {shown}");
    }
}

#[test]
fn a_wrong_secret_is_permanent_and_never_shown() {
    // moto takes any credentials: Garage checks them.
    if let Some(garage) = Garage::start() {
        let Credentials::S3 { access_key_id, .. } = garage.credentials() else {
            unreachable!()
        };
        let secret = "wrong-secret-f00dfeed-0123456789";
        let mut opts = garage.options();
        opts.credentials = Some(Credentials::S3 {
            access_key_id: access_key_id.clone(),
            secret_access_key: secret.into(),
            session_token: Some("session-token-cafe".into()),
        });
        refused(
            &garage.url("wrong"),
            &opts,
            &[secret, "session-token-cafe", &access_key_id],
        );
    }
    if let Some(azurite) = Azurite::start() {
        // A well-formed key that is not the account's.
        let key = "bm90IHRoZSBhY2NvdW50IGtleSBhdCBhbGwsIG5vdCBhdCBhbGwgMTIzNDU2Nzg=";
        let mut opts = azurite.options();
        opts.credentials = Some(Credentials::AzureKey { key: key.into() });
        refused(&azurite.url("wrong"), &opts, &[key]);
        // A SAS token whose signature is wrong: Azurite refuses it, and the signature,
        // which travels in the URL, shows nowhere.
        let sig = "Zm9yZ2VkK3NpZ25hdHVyZS9ub3QvcmVhbD0";
        let token = format!(
            "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z&st=2020-01-01T00:00:00Z\
             &spr=https,http&sig={sig}%3D"
        );
        opts.credentials = Some(Credentials::AzureSas {
            token: token.clone(),
        });
        refused(&azurite.url("wrong"), &opts, &[sig, &token]);
    }
}

fn missing_bucket(url: &str, opts: &RemoteOptions) {
    let backend = open(url, opts).unwrap();
    for e in [
        expect_remote(backend.create(), false),
        expect_remote(backend.write(Kind::Chunk, "abcd", b"x"), false),
        expect_remote(backend.read(Kind::Chunk, "abcd"), false),
        expect_remote(backend.list(Kind::Chunk), false),
    ] {
        let text = e.to_string();
        assert!(text.contains("no-such-bucket does not exist"), "{text}");
    }
}

#[test]
fn a_missing_bucket_is_a_clear_permanent_error() {
    if let Some(s3) = S3Server::start() {
        missing_bucket("s3://no-such-bucket/vault", &s3.options());
    }
    if let Some(azurite) = Azurite::start() {
        missing_bucket("azblob://no-such-bucket/vault", &azurite.options());
    }
}

#[test]
fn bad_urls_and_endpoints_are_invalid() {
    let opts = RemoteOptions {
        credentials: Some(Credentials::AzureKey { key: "a2V5".into() }),
        account: Some("acct".into()),
        ..RemoteOptions::default()
    };
    for url in [
        "",
        "s3://",
        "s3:///prefix",
        "azblob://Upper/x",
        "ftp://bucket/x",
        "s3://bkt/a//b",
    ] {
        match open(url, &opts) {
            Err(StoreError::Invalid(m)) => assert!(m.contains("region URL"), "{m}"),
            Err(other) => panic!("{url:?}: {other}"),
            Ok(_) => panic!("{url:?} opened"),
        }
    }
    let with_endpoint = RemoteOptions {
        endpoint: Some("localhost:9000".into()),
        ..opts
    };
    assert!(matches!(
        open("azblob://box/x", &with_endpoint),
        Err(StoreError::Invalid(m)) if m.contains("http:// or https://")
    ));
}

/// Garage answers with a 5xx when too few nodes are up for a quorum: transient.
#[test]
fn a_server_error_is_transient() {
    let Some(mut cluster) = GarageCluster::start(3) else {
        return;
    };
    let backend = open(&cluster.url("quorum"), &cluster.options(0)).unwrap();
    backend.write(Kind::Chunk, "abcd", b"x").unwrap();
    cluster.stop_node(1);
    cluster.stop_node(2);
    let started = Instant::now();
    let e = expect_remote(backend.write(Kind::Chunk, "abce", b"y"), true);
    eprintln!("{e} after {:?}", started.elapsed());
    assert!(e.to_string().contains("HTTP 5"), "{e}");
    cluster.start_node(1);
    backend.write(Kind::Chunk, "abce", b"y").unwrap();
}
