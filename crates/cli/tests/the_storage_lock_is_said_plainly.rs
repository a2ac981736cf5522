//! Whether the storage itself keeps a vault's objects against deletion (issue 12): `vault
//! info` and `vault lock` say it per region, from the bucket's S3 Object Lock setting, read
//! on real servers: moto (which implements Object Lock) for a bucket without it and one with
//! it but no default retention, and Garage, which has no Object Lock at all. The lock itself
//! is vmvault's in every case and works the same.

mod common;

use common::{credential_env, make_image, write_vm, Env, Out};
use vmvault_cloud::Credentials;
use vmvault_testkit::{Garage, Moto};

/// The CLI with the storage's credentials in its environment.
fn try_run(env: &Env, c: &Credentials, args: &[&str]) -> Out {
    let mut cmd = env.command(args);
    cmd.envs(credential_env(c));
    common::out(cmd.output().unwrap())
}

fn run(env: &Env, c: &Credentials, args: &[&str]) -> Out {
    let o = try_run(env, c, args);
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
            "primary region: enforced by the storage: S3 Object Lock holds every object for 30 \
             day(s) after it is written or renewed"
        ),
        "{}",
        o.stdout
    );
    // What the backup before the lock wrote is held from the lock on.
    assert!(
        o.stdout
            .contains("object(s) in the vault are held from now on"),
        "{}",
        o.stdout
    );
    let info = on("locked", &["--json", "vault", "info"]).json();
    assert!(
        info["storage_lock"]
            .as_str()
            .unwrap()
            .contains("enforced by the storage once the vault is locked"),
        "{info}"
    );
    // A backup after the lock: its objects are written held.
    make_image(&img, 2 << 20, 4);
    on("locked", &["backup", desc.to_str().unwrap()]);

    // Someone holding the storage's own credentials tries to destroy every version of every
    // chunk, index, manifest and the rules: the storage refuses each one.
    let kinds = ["/chunks/", "/indexes/", "/points/", "v/rules", "v/config"];
    let refused = moto.assert_every_version_held("locked", "v/", &kinds);
    assert!(refused > 10, "{refused} held");
    // A collection renews the holds, so that chunks reused long after they were written stay
    // held.
    let gc = on("locked", &["gc"]);
    assert!(
        gc.stderr.contains("the storage's hold renewed on"),
        "{}",
        gc.stderr
    );
    // Everything is still there and whole.
    on("locked", &["verify"]);
    // The lock is the vault's own all the same: the point cannot be deleted.
    let o = try_run(
        &env,
        &c,
        &[
            "--vault",
            "s3://locked/v",
            "--endpoint",
            &endpoint,
            "point",
            "delete",
            "web01@latest",
        ],
    );
    common::assert_error(&o, 6, &["point", "delete"]);
    let points = on("locked", &["--json", "points"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 2, "{points}");
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
