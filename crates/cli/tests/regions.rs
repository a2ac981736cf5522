//! Vaults in object storage and in two regions, end to end through the `vmvault` binary, on
//! real servers on 127.0.0.1: S3 on Garage (moto when Garage is not installed), Azure Blob on
//! Azurite, and a three-node Garage cluster in three zones. A server whose tool is missing is a
//! skip, except under `scripts/test`, which installs them and requires them.

mod common;

use std::path::Path;

use common::{credential_env, Env, Out};
use vmvault_cloud::Credentials;
use vmvault_testkit::{Azurite, Garage, GarageCluster, S3Server};

/// Runs the binary with credentials in its environment; checks no output shows the secret.
struct Remote<'a> {
    env: &'a Env,
    vars: Vec<(String, String)>,
    secret: String,
}

impl<'a> Remote<'a> {
    fn new(env: &'a Env, credentials: &Credentials) -> Remote<'a> {
        Remote {
            env,
            vars: credential_env(credentials),
            secret: common::secret(credentials).to_string(),
        }
    }

    fn run(&self, args: &[&str]) -> Out {
        let mut c = self.env.command(args);
        c.envs(self.vars.iter().cloned());
        let o = common::out(c.output().unwrap());
        for text in [&o.stdout, &o.stderr] {
            assert!(
                !text.contains(&self.secret),
                "a credential leaked into the output of {args:?}"
            );
        }
        o
    }

    fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, 0, "{args:?} failed:\n{}\n{}", o.stdout, o.stderr);
        o
    }
}

fn random(size: usize, seed: u64) -> Vec<u8> {
    vmvault_testkit::random_bytes(size, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn image(env: &Env, name: &str, mib: usize, seed: u64) -> std::path::PathBuf {
    let p = env.path(name);
    let mut data = random(mib << 20, seed);
    // A hole in the middle, as real disks have.
    let mid = (mib / 2) << 20;
    data[mid..mid + (1 << 20)].fill(0);
    std::fs::write(&p, data).unwrap();
    p
}

fn description(env: &Env, vm: &str, image: &Path) -> String {
    let p = env.path(&format!("{vm}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"{vm}\"\ncpus = 1\nmemory_mib = 64\n[[disks]]\nname = \"os\"\npath = \"{}\"\n",
            image.display()
        ),
    )
    .unwrap();
    p.display().to_string()
}

fn same_file(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} differs from {}",
        a.display(),
        b.display()
    );
}

/// Create, back up twice, restore, verify, prune and collect in one remote vault.
fn round_trip(r: &Remote, url: &str, connection: &[&str]) {
    let env = r.env;
    // Pruned points go at once, so that gc frees what they held (soft delete: maintenance.rs).
    let mut create = vec![
        "vault",
        "create",
        url,
        "--chunk-size",
        "64K",
        "--soft-delete-days",
        "0",
    ];
    create.extend_from_slice(connection);
    r.ok(&create);
    let with = |args: &[&str]| {
        let mut v = vec!["--vault", url];
        v.extend_from_slice(connection);
        v.extend_from_slice(args);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: &[&str]| {
        let owned = with(args);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        r.ok(&refs)
    };
    let img = image(env, "web01.img", 3, 1);
    let desc = description(env, "web01", &img);
    let first = run(&["backup", &desc, "--json"]).json();
    assert!(first["stats"]["chunks_new"].as_u64().unwrap() > 10);
    let img2 = image(env, "web01.img", 3, 2);
    run(&["backup", &desc]);
    let out = env.path("out.img");
    let id = first["id"].as_str().unwrap();
    run(&[
        "restore",
        &format!("web01@{id}"),
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]);
    let want = env.path("want.img");
    std::fs::write(&want, {
        let mut d = random(3 << 20, 1);
        d[1 << 20..2 << 20].fill(0);
        d
    })
    .unwrap();
    same_file(&out, &want);
    run(&[
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
        "--force",
    ]);
    same_file(&out, &img2);
    run(&["verify", "--read-data"]);
    run(&["prune", "--keep-last", "1"]);
    // The collector spares what is younger than its start, less a second, by the storage's
    // clock, and object stores stamp times to the second: on a fast machine everything above
    // takes less than that. The pause is the storage's clock moving on, which no test clock
    // can stand in for.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let gc = run(&["gc", "--json"]).json();
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0, "{gc}");
    run(&["verify", "--read-data"]);
    let points = run(&["points", "--json"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 1);
}

#[test]
fn an_s3_vault_backs_up_restores_prunes_and_collects() {
    let Some(s3) = S3Server::start() else { return };
    let env = Env::new();
    let r = Remote::new(&env, &s3.credentials());
    let (endpoint, region) = (s3.endpoint(), s3.region());
    round_trip(
        &r,
        &s3.url("vault-a"),
        &["--endpoint", &endpoint, "--region", &region],
    );
}

#[test]
fn an_azure_blob_vault_backs_up_restores_prunes_and_collects() {
    let Some(az) = Azurite::start() else { return };
    let env = Env::new();
    let r = Remote::new(&env, &az.credentials());
    let (endpoint, account) = (az.endpoint(), az.account());
    round_trip(
        &r,
        &az.url("vault-a"),
        &["--endpoint", &endpoint, "--account", &account],
    );
}

#[test]
fn wrong_credentials_fail_clearly_without_showing_them() {
    let Some(s3) = S3Server::start() else { return };
    let env = Env::new();
    let secret = "wrongSecretKey0123456789abcdefWRONG".to_string();
    let r = Remote {
        env: &env,
        vars: vec![
            ("AWS_ACCESS_KEY_ID".into(), "GKwrongkeyid".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), secret.clone()),
        ],
        secret,
    };
    let (endpoint, region) = (s3.endpoint(), s3.region());
    let url = s3.url("vault-w");
    let o = r.run(&[
        "vault",
        "create",
        &url,
        "--endpoint",
        &endpoint,
        "--region",
        &region,
    ]);
    // moto accepts any credentials; Garage refuses unknown ones.
    if s3.name() == "garage" {
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(o.stderr.contains("vault"), "{}", o.stderr);
    }
    let o = r.run(&["vault", "create", "s3://", "--endpoint", &endpoint]);
    assert_eq!(o.code, 2, "a bad URL is bad input: {}", o.stderr);
}

/// A local primary replicated to an S3 secondary; the primary is then lost.
#[test]
fn a_secondary_region_gets_every_point_and_restores_when_the_primary_is_gone() {
    let Some(s3) = S3Server::start() else { return };
    let env = Env::new();
    let r = Remote::new(&env, &s3.credentials());
    let (endpoint, region, url) = (s3.endpoint(), s3.region(), s3.url("geo"));
    let vault = env.vault.to_str().unwrap();
    r.ok(&[
        "vault",
        "create",
        vault,
        "--chunk-size",
        "64K",
        "--secondary",
        &url,
        "--secondary-endpoint",
        &endpoint,
        "--secondary-region",
        &region,
    ]);
    let info = r.ok(&["vault", "info", "--json"]).json();
    assert!(
        info["secondary"].as_str().unwrap().starts_with(&url),
        "{info}"
    );
    let img = image(&env, "web01.img", 4, 3);
    let desc = description(&env, "web01", &img);
    let b = r.ok(&["backup", &desc, "--json"]).json();
    assert_eq!(b["replication"]["queued"], 0, "{b}");
    r.ok(&["backup", &desc]);
    let status = r.ok(&["vault", "status", "--json"]).json();
    assert_eq!(status["regions"].as_array().unwrap().len(), 2);
    assert_eq!(status["replication_lag"]["objects"], 0, "{status}");
    assert_eq!(
        status["regions"][0]["objects"], status["regions"][1]["objects"],
        "{status}"
    );

    // Neither the vault's own objects nor the local state hold a credential.
    for f in walk(&env.vault).into_iter().chain(walk(&env.path("state"))) {
        let text = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&text).contains(&r.secret),
            "{}",
            f.display()
        );
    }
    std::fs::remove_dir_all(&env.vault).unwrap();
    // Named by its primary, the vault now works from the secondary alone, and says so.
    let o = r.ok(&["points", "--json"]);
    assert_eq!(o.json()["points"].as_array().unwrap().len(), 2);
    assert!(o.stderr.contains("secondary region"), "{}", o.stderr);
    // Backups go to the primary first: refused while it is gone.
    let o = r.run(&["backup", &desc]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("primary region is unavailable"),
        "{}",
        o.stderr
    );
    let out = env.path("out");
    let o = r.ok(&[
        "restore",
        "--from-region",
        "secondary",
        "web01@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(o.stdout.contains("web01") || o.stderr.contains("web01"));
    same_file(&out.join("os.raw"), &img);
    // The secondary is a vault in its own right.
    let points = r
        .ok(&[
            "--vault",
            &url,
            "--endpoint",
            &endpoint,
            "--region",
            &region,
            "points",
            "--json",
        ])
        .json();
    assert_eq!(points["points"].as_array().unwrap().len(), 2);
    // Nothing in the local state holds a credential.
    for f in walk(&env.path("state")) {
        let text = std::fs::read(&f).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains(&r.secret));
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The secondary is down during a backup: the backup completes, says the secondary lags,
/// keeps the queue, and `vault replicate` catches up once the secondary is back.
#[test]
fn a_secondary_that_was_down_is_caught_up() {
    let Some(mut garage) = Garage::start() else {
        return;
    };
    let env = Env::new();
    let r = Remote::new(&env, &garage.credentials());
    let (endpoint, region, url) = (garage.endpoint(), garage.region(), garage.url("geo"));
    let vault = env.vault.to_str().unwrap();
    r.ok(&[
        "vault",
        "create",
        vault,
        "--chunk-size",
        "64K",
        "--secondary",
        &url,
        "--secondary-endpoint",
        &endpoint,
        "--secondary-region",
        &region,
    ]);
    let img = image(&env, "web01.img", 2, 4);
    let desc = description(&env, "web01", &img);
    garage.stop();
    let b = r
        .ok(&["backup", &desc, "--json", "--replication-wait", "2"])
        .json();
    assert!(b["replication"]["queued"].as_u64().unwrap() > 0, "{b}");
    // The point is in the primary whatever the secondary does.
    let points = r
        .ok(&["points", "--json", "--from-region", "primary"])
        .json();
    assert_eq!(points["points"].as_array().unwrap().len(), 1);
    // Sync mode refuses to pretend: the backup fails while the secondary is down.
    let o = r.run(&["backup", &desc, "--sync"]);
    assert_eq!(o.code, 1, "{}", o.stderr);

    garage.start_again();
    let status = r.ok(&["vault", "status", "--json"]).json();
    assert!(
        status["replication_lag"]["objects"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(status["replication_lag"]["oldest_seconds"]
        .as_u64()
        .is_some());
    let rep = r.ok(&["vault", "replicate", "--json"]).json();
    assert!(rep["objects"].as_u64().unwrap() > 0, "{rep}");
    let status = r.ok(&["vault", "status", "--json"]).json();
    assert_eq!(status["replication_lag"]["objects"], 0, "{status}");
    let again = r.ok(&["vault", "replicate", "--json"]).json();
    assert_eq!(
        again["objects"], 0,
        "resumable: nothing left the second time"
    );
    let out = env.path("os.raw");
    r.ok(&[
        "restore",
        "--from-region",
        "secondary",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]);
    same_file(&out, &img);
}

/// A three-node Garage cluster, one node per zone (replication factor 3): a node stops in the
/// middle of a backup, and the backup completes, restores and verifies.
#[test]
fn a_backup_survives_a_storage_node_stopping_midway() {
    let Some(mut cluster) = GarageCluster::start(3) else {
        return;
    };
    let env = Env::new();
    let r = Remote::new(&env, &cluster.credentials());
    let (endpoint, region, url) = (cluster.endpoint(0), cluster.region(), cluster.url("zoned"));
    let conn = [
        "--vault",
        url.as_str(),
        "--endpoint",
        endpoint.as_str(),
        "--region",
        region.as_str(),
    ];
    let args =
        |rest: &[&str]| -> Vec<String> { conn.iter().chain(rest).map(|s| s.to_string()).collect() };
    r.ok(&[
        "vault",
        "create",
        &url,
        "--endpoint",
        &endpoint,
        "--region",
        &region,
        "--chunk-size",
        "64K",
    ]);
    let img = image(&env, "big.img", 48, 5);
    let desc = description(&env, "big", &img);

    let mut cmd = env.command(
        &args(&["backup", &desc, "--json"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    cmd.envs(r.vars.iter().cloned());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Stop a node once the backup has stored part of the disk.
    let probe = vmvault_cloud::open(&url, &cluster.options(0)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = probe
            .list(vmvault_store::Kind::Chunk)
            .map(|l| l.len())
            .unwrap_or(0);
        if n >= 50 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backup never started storing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cluster.stop_node(2);
    let mut child = child;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the node must stop in the middle of the backup, not after it"
    );
    let o = common::out(child.wait_with_output().unwrap());
    assert_eq!(
        o.code, 0,
        "the backup failed with a node down: {}",
        o.stderr
    );
    let done = o.json();
    assert!(
        done["stats"]["chunks_new"].as_u64().unwrap() > 600,
        "{done}"
    );

    let out = env.path("big.out");
    let owned = args(&[
        "restore",
        "big@latest",
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]);
    r.ok(&owned.iter().map(String::as_str).collect::<Vec<_>>());
    same_file(&out, &img);
    let owned = args(&["verify", "--read-data"]);
    r.ok(&owned.iter().map(String::as_str).collect::<Vec<_>>());
    cluster.start_node(2);
}

/// Damage in one region is found with its region named, and `--repair` mends it.
#[test]
fn verify_names_the_region_and_repair_mends_it() {
    let env = Env::new();
    let vault = env.vault.to_str().unwrap().to_string();
    let second = env.path("second");
    env.ok(&[
        "vault",
        "create",
        &vault,
        "--chunk-size",
        "64K",
        "--secondary",
        second.to_str().unwrap(),
    ]);
    let img = image(&env, "web01.img", 2, 6);
    let desc = description(&env, "web01", &img);
    env.ok(&["backup", &desc]);
    let chunk = walk(&env.vault.join("chunks"))
        .into_iter()
        .find(|p| !p.file_name().unwrap().to_str().unwrap().starts_with('.'))
        .unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[70] ^= 0x10;
    std::fs::write(&chunk, bytes).unwrap();
    let o = env.run(&["verify", "--read-data", "--json"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    let report = o.json();
    assert_eq!(report["problems"][0]["region"], "primary", "{report}");
    let o = env.ok(&["verify", "--read-data", "--repair"]);
    assert!(o.stdout.contains("REPAIRED primary region"), "{}", o.stdout);
    env.ok(&["verify", "--read-data"]);
    // With one region, there is nothing to repair from.
    let o = env.run(&["verify", "--repair", "--from-region", "primary"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}
