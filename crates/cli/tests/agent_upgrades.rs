//! The agent's self-upgrade through the real binaries: `release add` (signed by the server),
//! `host upgrade`, the agent swapping its binary and restarting in it (the same process, by
//! exec); a release that exits at start rolled back when the installed binary starts again,
//! and never offered to that host again; a tampered release refused with nothing installed;
//! an offline release key's signature made with `release sign`.

#[path = "common/agents.rs"]
#[allow(dead_code)]
mod agents;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use agents::{server_config, wait_for};
use common::server::Server;
use common::{Env, Out};

fn admin(env: &Env, s: &Server, args: &[&str]) -> Out {
    let mut all = vec!["--trust-fingerprint", &s.fingerprint];
    all.extend_from_slice(args);
    s.cli(env, &s.admin, &all)
}

fn admin_ok(env: &Env, s: &Server, args: &[&str]) -> Out {
    let o = admin(env, s, args);
    assert_eq!(o.code, 0, "vmvault {args:?}: {}{}", o.stdout, o.stderr);
    o
}

/// The agent as systemd would start it: the package's binary (a copy, so that the test's
/// own stays as it is), which hands over to the installed version.
fn start_agent(launcher: &Path, state: &Path, log: &Path) -> Child {
    Command::new(launcher)
        .args(["agent", "run", "--config", "/dev/null", "--state-dir"])
        .arg(state)
        .args(["--qmp-glob", "/nonexistent/*.sock", "--no-process-scan"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

fn host(env: &Env, s: &Server) -> serde_json::Value {
    admin_ok(env, s, &["hosts", "--json"]).json()[0].clone()
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

#[test]
fn an_agent_upgrades_itself_rolls_back_a_release_that_exits_and_refuses_a_tampered_one() {
    let env = Env::new();
    let config = server_config(&env, "");
    let s = Server::start_with(&env, &["--config", config.to_str().unwrap()], |_| {});
    let code = admin_ok(&env, &s, &["host", "add", "kvm1", "--json"]).json();
    let state = env.path("kvm1-state");
    env.ok(&[
        "agent",
        "enroll",
        &s.url,
        "--code",
        code["code"].as_str().unwrap(),
        "--trust-fingerprint",
        &s.fingerprint,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let launcher = env.path("usr-bin/vmvault");
    std::fs::create_dir_all(launcher.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_vmvault"), &launcher).unwrap();
    let log = env.path("agent.log");
    let mut agent = start_agent(&launcher, &state, &log);
    let why = || std::fs::read_to_string(env.path("agent.log")).unwrap_or_default();
    wait_for("the first heartbeat", 30, why, || {
        host(&env, &s)["agent_version"] == env!("CARGO_PKG_VERSION")
    });

    // A good release: this very program, released as 9.0.0. The agent runs as the version of
    // the release it was installed as.
    let o = admin_ok(
        &env,
        &s,
        &[
            "release",
            "add",
            env!("CARGO_BIN_EXE_vmvault"),
            "--version",
            "9.0.0",
            "--json",
        ],
    );
    assert_eq!(o.json()["version"], "9.0.0");
    admin_ok(&env, &s, &["host", "upgrade", "kvm1"]);
    wait_for("the upgrade to 9.0.0", 60, why, || {
        host(&env, &s)["agent_version"] == "9.0.0"
    });
    let installed = state.join("install/versions/9.0.0/vmvault");
    assert_eq!(
        exe_of(agent.id()),
        installed,
        "the same process, exec'd into the new binary"
    );
    wait_for("the upgrade confirmed", 30, why, || {
        !state.join("install/upgrade.pending").exists()
    });
    assert_eq!(host(&env, &s)["wanted_version"], serde_json::Value::Null);

    // A release that exits at start: the agent hands over to it, it dies; started again as
    // systemd would, the installed binary rolls it back, and the server never offers it again.
    let bad = env.path("exits.sh");
    std::fs::write(&bad, "#!/bin/sh\nexit 1\n").unwrap();
    admin_ok(
        &env,
        &s,
        &[
            "release",
            "add",
            bad.to_str().unwrap(),
            "--version",
            "9.1.0",
        ],
    );
    admin_ok(&env, &s, &["host", "upgrade", "kvm1", "--version", "9.1.0"]);
    let status = agent.wait().unwrap();
    assert!(
        !status.success(),
        "the bad release ran and exited: {}",
        why()
    );
    assert_eq!(
        std::fs::read(state.join("install/current/vmvault")).unwrap(),
        b"#!/bin/sh\nexit 1\n"
    );
    let log2 = env.path("agent2.log");
    let mut agent = start_agent(&launcher, &state, &log2);
    let why2 = || std::fs::read_to_string(env.path("agent2.log")).unwrap_or_default();
    wait_for("the rollback reported", 30, why2, || {
        host(&env, &s)["bad_versions"] == serde_json::json!(["9.1.0"])
    });
    assert_eq!(host(&env, &s)["agent_version"], "9.0.0");
    assert_eq!(
        exe_of(agent.id()),
        installed,
        "rolled back, the package's binary handed over to 9.0.0"
    );
    assert!(
        std::fs::read(state.join("install/current/vmvault")).unwrap() != b"#!/bin/sh\nexit 1\n"
    );
    let again = admin(&env, &s, &["host", "upgrade", "kvm1", "--version", "9.1.0"]);
    assert_ne!(
        again.code, 0,
        "a rolled-back version is refused for that host"
    );

    // A tampered release: signed, then its bytes changed on the server. Refused by the agent.
    admin_ok(
        &env,
        &s,
        &[
            "release",
            "add",
            env!("CARGO_BIN_EXE_vmvault"),
            "--version",
            "9.2.0",
        ],
    );
    let target = admin_ok(&env, &s, &["releases", "--json"]).json()[0]["target"]
        .as_str()
        .unwrap()
        .to_string();
    let stored = env.path(&format!("server/releases/9.2.0-{target}/vmvault"));
    std::fs::write(&stored, b"#!/bin/sh\necho tampered\n").unwrap();
    admin_ok(&env, &s, &["host", "upgrade", "kvm1", "--version", "9.2.0"]);
    wait_for("the refusal", 30, why2, || {
        why2().contains("release 9.2.0 refused")
    });
    assert!(!state.join("install/versions/9.2.0").exists());
    assert!(agent.try_wait().unwrap().is_none(), "the agent runs on");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn an_offline_key_signs_releases_the_server_only_checks() {
    let env = Env::new();
    let key = env.path("release.key");
    let public = env
        .ok(&["release", "key", "--out", key.to_str().unwrap()])
        .stdout
        .trim()
        .to_string();
    assert_eq!(public.len(), 64, "{public}");
    let config = server_config(&env, &format!("release_public_key = \"{public}\"\n"));
    let s = Server::start_with(&env, &["--config", config.to_str().unwrap()], |_| {});
    let bin = env.path("agent-bin");
    std::fs::write(&bin, b"#!/bin/sh\necho new\n").unwrap();
    // Without a signature the server, holding no private key, refuses.
    let o = admin(
        &env,
        &s,
        &[
            "release",
            "add",
            bin.to_str().unwrap(),
            "--version",
            "1.2.3",
        ],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("vmvault release sign"), "{}", o.stderr);
    let sig = env.ok(&[
        "release",
        "sign",
        bin.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--version",
        "1.2.3",
    ]);
    let sig = sig.stdout.trim().to_string();
    assert!(sig.ends_with("agent-bin.sig"), "{sig}");
    admin_ok(
        &env,
        &s,
        &["release", "add", bin.to_str().unwrap(), "--signature", &sig],
    );
    let list = admin_ok(&env, &s, &["releases", "--json"]).json();
    assert_eq!(list[0]["version"], "1.2.3");
    // A signature for other bytes is refused.
    std::fs::write(&bin, b"#!/bin/sh\necho other\n").unwrap();
    let o = admin(
        &env,
        &s,
        &["release", "add", bin.to_str().unwrap(), "--signature", &sig],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
}
