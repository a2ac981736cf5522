//! Whether the storage itself keeps a vault's objects against deletion (issue 12): `vault
//! info` and `vault lock` say it per region, from the bucket's S3 Object Lock setting, read
//! on real servers: moto (which implements Object Lock) for a bucket without it and one with
//! it but no default retention, and Garage, which has no Object Lock at all. The lock itself
//! is vmvault's in every case and works the same.

mod common;

use common::{make_image, write_vm, Env, Out};
use vmvault_cloud::Credentials;
use vmvault_testkit::{Garage, Moto};

fn run(env: &Env, c: &Credentials, args: &[&str]) -> Out {
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        ..
    } = c
    else {
        unreachable!()
    };
    let mut cmd = env.command(args);
    cmd.env("AWS_ACCESS_KEY_ID", access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", secret_access_key);
    let o = common::out(cmd.output().unwrap());
    assert_eq!(o.code, 0, "{args:?}:\n{}\n{}", o.stdout, o.stderr);
    o
}

#[test]
fn moto_buckets_with_and_without_object_lock_are_told_apart() {
    let Some(moto) = Moto::start() else { return };
    moto.create_locked_bucket("locked");
    let env = Env::new();
    let c = moto.credentials();
    let endpoint = moto.endpoint();
    let on = |bucket: &str, args: &[&str]| {
        let url = format!("s3://{bucket}/v");
        let mut all = vec!["--vault", &url, "--endpoint", &endpoint];
        all.extend_from_slice(args);
        run(&env, &c, &all)
    };

    on(
        &moto.bucket(),
        &["vault", "create", &format!("s3://{}/v", moto.bucket())],
    );
    let info = on(&moto.bucket(), &["vault", "info"]).stdout;
    assert!(
        info.contains("storage     not enforced by the storage: the bucket has no S3 Object Lock"),
        "{info}"
    );

    on(
        "locked",
        &["vault", "create", "s3://locked/v", "--chunk-size", "64K"],
    );
    let img = env.path("web01.raw");
    make_image(&img, 2 << 20, 3);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("disk0", "web01.raw")],
    );
    on("locked", &["backup", desc.to_str().unwrap()]);
    let o = on(
        "locked",
        &["vault", "lock", "--yes-i-understand-this-is-irreversible"],
    );
    assert!(o.stdout.contains("the vault is locked"), "{}", o.stdout);
    assert!(
        o.stdout.contains(
            "primary region: not enforced by the storage: the bucket has S3 Object Lock but no \
             default retention"
        ),
        "{}",
        o.stdout
    );
    let info = on("locked", &["--json", "vault", "info"]).json();
    assert!(
        info["storage_lock"]
            .as_str()
            .unwrap()
            .contains("no default retention"),
        "{info}"
    );
    // The lock is the vault's own all the same: the point cannot be deleted.
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        ..
    } = &c
    else {
        unreachable!()
    };
    let mut cmd = env.command(&[
        "--vault",
        "s3://locked/v",
        "--endpoint",
        &endpoint,
        "point",
        "delete",
        "web01@latest",
    ]);
    cmd.env("AWS_ACCESS_KEY_ID", access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", secret_access_key);
    let o = common::out(cmd.output().unwrap());
    common::assert_error(&o, 6, &["point", "delete"]);
    let points = on("locked", &["--json", "points"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 1, "{points}");
}

#[test]
fn garage_has_no_object_lock_and_the_lock_says_so() {
    let Some(garage) = Garage::start() else {
        return;
    };
    let env = Env::new();
    let c = garage.credentials();
    let (endpoint, region, url) = (garage.endpoint(), garage.region(), garage.url("g"));
    let flags = [
        "--vault",
        &url,
        "--endpoint",
        &endpoint,
        "--region",
        &region,
    ];
    let with = |args: &[&str]| {
        let mut all = flags.to_vec();
        all.extend_from_slice(args);
        run(&env, &c, &all)
    };
    with(&["vault", "create", &url]);
    let o = with(&["vault", "lock", "--yes-i-understand-this-is-irreversible"]);
    assert!(o.stdout.contains("the vault is locked"), "{}", o.stdout);
    assert!(
        o.stdout.contains(
            "primary region: not enforced by the storage: the S3 server does not implement \
             Object Lock"
        ),
        "{}",
        o.stdout
    );
    let info = with(&["vault", "info"]).stdout;
    assert!(
        info.contains("storage     not enforced by the storage"),
        "{info}"
    );
}
