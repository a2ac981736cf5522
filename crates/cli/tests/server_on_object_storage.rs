//! The real `vmvault server` binary on vaults in object storage (issue 12, item 2): a vault on
//! S3 (Garage, else moto) replicated to Azure Blob (Azurite), and one on Azure replicated to
//! a directory named in the server's TOML file. The CLI opens the same vault by the same
//! location and sees, restores and replicates what the server wrote: one library opens both.
//! A server whose tool is missing is a skip, except under `scripts/test`.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use common::server::Server;
use common::{credential_env, make_image, secondary_credential_env, write_vm, Env, Out};
use vmvault_testkit::{Azurite, S3Server};

/// The server over plain HTTP on loopback with `args` and `vars`, its vault named by them
/// (not `VMVAULT_VAULT`); returns once it listens.
fn start(env: &Env, args: &[&str], vars: &[(String, String)]) -> Server {
    let all = [&["--insecure-http"], args].concat();
    Server::start_with(env, &all, |cmd| {
        cmd.env_remove("VMVAULT_VAULT").envs(vars.iter().cloned());
    })
}

fn remote(env: &Env, s: &Server, args: &[&str]) -> Out {
    let o = s.cli(env, &s.admin, args);
    assert_eq!(o.code, 0, "{args:?}:\n{}\n{}", o.stdout, o.stderr);
    o
}

/// `GET /metrics`, over plain HTTP.
fn metrics(s: &Server) -> String {
    let mut c = std::net::TcpStream::connect(s.addr()).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        s.addr()
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// The CLI on the vault at `location` with `flags` and `vars`, as a user on the server's host.
fn local(env: &Env, vars: &[(String, String)], flags: &[&str], args: &[&str]) -> Out {
    let mut all: Vec<&str> = flags.to_vec();
    all.extend_from_slice(args);
    let mut c = env.command(&all);
    c.envs(vars.iter().cloned());
    let o = common::out(c.output().unwrap());
    assert_eq!(o.code, 0, "{args:?}:\n{}\n{}", o.stdout, o.stderr);
    o
}

/// A server start with `args` on the state dir `state` in the test's folder, that must not
/// come to listen: what it said.
fn refused_start(env: &Env, state: &str, args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_vmvault"))
        .args(["server", "--insecure-http", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("VMVAULT_SERVER_STATE", env.path(state))
        .env("VMVAULT_PASSWORD", common::PASS)
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    common::out(o)
}

/// Protects and backs up a 3 MiB VM through the server; returns its image.
fn back_up_through(env: &Env, s: &Server) -> std::path::PathBuf {
    let img = env.path("web01.raw");
    make_image(&img, 3 << 20, 11);
    let desc = write_vm(
        env.dir.path(),
        "web01.toml",
        "web01",
        &[("disk0", "web01.raw")],
    );
    remote(
        env,
        s,
        &[
            "policy",
            "create",
            "daily",
            "--schedule",
            "daily 02:00",
            "--keep-daily",
            "7",
        ],
    );
    remote(
        env,
        s,
        &["protect", desc.to_str().unwrap(), "--policy", "daily"],
    );
    remote(env, s, &["backup", "web01", "--wait"]);
    img
}

fn no_stray_folders(dir: &Path) {
    for name in ["s3:", "azblob:"] {
        assert!(
            !dir.join(name).exists(),
            "a local folder {name} was made instead of reaching the object store"
        );
    }
}

#[test]
fn a_server_on_s3_replicates_to_azure_and_the_cli_opens_the_same_vault() {
    let Some(s3) = S3Server::start() else { return };
    let Some(az) = Azurite::start() else { return };
    let env = Env::new();
    let (url, endpoint, region) = (s3.url("server-vault"), s3.endpoint(), s3.region());
    let (az_url, az_endpoint) = (az.url("server-copy"), az.endpoint());
    let vars = [
        credential_env(&s3.credentials()),
        secondary_credential_env(&az.credentials()),
    ]
    .concat();
    let s = start(
        &env,
        &[
            "--vault",
            &url,
            "--endpoint",
            &endpoint,
            "--region",
            &region,
            "--secondary",
            &az_url,
            "--secondary-endpoint",
            &az_endpoint,
            "--secondary-account",
            "devstoreaccount1",
        ],
        &vars,
    );
    assert!(
        s.log
            .iter()
            .any(|l| l.contains(&format!("created the vault {url}"))),
        "{:?}",
        s.log
    );
    let img = back_up_through(&env, &s);
    let m = metrics(&s);
    assert!(
        m.contains("vmvault_replication_lag_objects{vault=\"default\"}"),
        "{m}"
    );
    no_stray_folders(env.dir.path());

    // The CLI reaches the same vault by its location alone: the regions come from the record
    // the server wrote, so the secondary is Azure here too.
    let flags = [
        "--vault",
        &url,
        "--endpoint",
        &endpoint,
        "--region",
        &region,
    ];
    let points = local(&env, &vars, &flags, &["points", "--json"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 1, "{points}");
    let status = local(&env, &vars, &flags, &["vault", "status", "--json"]).json();
    assert_eq!(status["regions"].as_array().unwrap().len(), 2, "{status}");
    assert!(
        status["regions"][1]["location"]
            .as_str()
            .unwrap()
            .starts_with("azblob://"),
        "{status}"
    );
    assert_eq!(status["replication_lag"]["objects"], 0, "{status}");
    // Restored from the Azure copy alone, the bytes are the VM's.
    let out = env.path("restored.raw");
    local(
        &env,
        &vars,
        &flags,
        &[
            "--from-region",
            "secondary",
            "restore",
            "web01@latest",
            "--disk",
            "disk0",
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(common::same_bytes(&out, &img));
}

#[test]
fn a_server_on_azure_with_a_secondary_from_its_config_file() {
    let Some(az) = Azurite::start() else { return };
    let env = Env::new();
    let url = az.url("server-az");
    let secondary = env.path("copy");
    let config = env.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "vault = \"{url}\"\nendpoint = \"{}\"\naccount = \"devstoreaccount1\"\nsecondary = \"{}\"\n",
            az.endpoint(),
            secondary.display()
        ),
    )
    .unwrap();
    let vars = credential_env(&az.credentials());
    let s = start(&env, &["--config", config.to_str().unwrap()], &vars);
    back_up_through(&env, &s);
    no_stray_folders(env.dir.path());
    // The point's manifest reached the directory secondary.
    let copied = std::fs::read_dir(secondary.join("points")).unwrap().count();
    assert_eq!(copied, 1, "one point in the secondary");
    // The CLI opens the directory copy alone when it is named.
    let dir_flags = ["--vault", secondary.to_str().unwrap()];
    let points = local(&env, &[], &dir_flags, &["points", "--json"]).json();
    assert_eq!(points["points"].as_array().unwrap().len(), 1, "{points}");
    drop(s);

    // A kind of storage vmvault does not reach is refused at start, as bad input.
    let o = refused_start(&env, "server2", &["--vault", "gs://bucket/v"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("gs:// is not a kind"), "{}", o.stderr);
    assert!(!env.dir.path().join("gs:").exists());

    // A vault that cannot be read stops the start with its own error: it is not taken for
    // "no vault there" (which made the server try to create one and say "not empty").
    let damaged = env.path("damaged");
    env.ok(&[
        "vault",
        "create",
        damaged.to_str().unwrap(),
        "--no-encryption",
    ]);
    let config = damaged.join("config");
    let mut bytes = std::fs::read(&config).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&config, bytes).unwrap();
    let o = refused_start(&env, "server3", &["--vault", damaged.to_str().unwrap()]);
    assert_ne!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("vault config"), "{}", o.stderr);
    assert!(!o.stderr.contains("not empty"), "{}", o.stderr);
}
