//! The agent's extension lifecycle through the real server: a release added and signed by the
//! server, offered to one host in its heartbeat, fetched, checked against the release key the
//! agent pinned at enrollment and installed between jobs; the agent then asks to be restarted
//! in the new binary. A version that is rolled back is reported and never offered to that
//! host again; a release whose bytes were changed on the server is refused and installs
//! nothing.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use vmvault_agent::discover::DiscoverConfig;
use vmvault_agent::{AgentOptions, AgentState, RunEnd};
use vmvault_server::SystemClock;

use common::Server;

fn opts() -> AgentOptions {
    AgentOptions {
        discover: DiscoverConfig {
            qmp_globs: Vec::new(),
            scan_processes: false,
            ..DiscoverConfig::default()
        },
        poll_wait_secs: 1,
        ..AgentOptions::default()
    }
}

/// Runs the agent until it returns (an upgrade asks for a restart) or `limit` passes.
fn run_for(state: &AgentState, limit: Duration) -> RunEnd {
    let opts = opts();
    let stop = opts.stop.clone();
    std::thread::scope(|s| {
        let h = s.spawn(|| vmvault_agent::run(state, &opts, &|l| eprintln!("agent: {l}")).unwrap());
        let until = std::time::Instant::now() + limit;
        while !h.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        h.join().unwrap()
    })
}

fn add_release(s: &Server, version: &str, bytes: &[u8]) -> u16 {
    s.call_bytes(&format!("/api/v1/releases?version={version}"), bytes)
}

fn enrolled(s: &Server, dir: &Path) -> AgentState {
    let code = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts",
        Some(json!({"name": "kvm02"})),
    );
    let state = AgentState::open(dir).unwrap();
    vmvault_agent::enroll(
        &state,
        &s.base,
        code["code"].as_str().unwrap(),
        Some(&s.fingerprint()),
    )
    .unwrap();
    state
}

#[test]
fn a_signed_release_is_installed_between_jobs_and_a_rolled_back_one_never_comes_back() {
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.insecure_http = false;
        c.agent_heartbeat_secs = 1;
    });
    let dir = tempfile::tempdir().unwrap();
    let state = enrolled(&s, dir.path());
    // A first heartbeat tells the server what the host runs on.
    assert_eq!(
        run_for(&state, Duration::from_millis(1500)),
        RunEnd::Stopped
    );

    let new = b"#!/bin/sh\necho vmvault 0.1.1\n".to_vec();
    assert_eq!(add_release(&s, "0.1.1", &new), 201);
    let listed = s.ok(&s.admin.clone(), "GET", "/api/v1/releases", None);
    assert_eq!(listed[0]["version"], "0.1.1", "{listed}");
    let host = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts/kvm02/upgrade",
        Some(json!({})),
    );
    assert_eq!(
        host["wanted_version"], "0.1.1",
        "the newest release is the default: {host}"
    );

    let install = dir.path().join("install");
    let end = run_for(&state, Duration::from_secs(20));
    assert_eq!(
        end,
        RunEnd::Restart(install.join("current/vmvault")),
        "the agent asks to restart in the new binary"
    );
    assert_eq!(std::fs::read(install.join("current/vmvault")).unwrap(), new);
    assert!(install.join("upgrade.pending").exists());
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(
        std::fs::read(install.join("previous/vmvault")).unwrap() == exe,
        "the running binary is kept to roll back to"
    );
    for key in ["host.key", "host.crt", "server.json"] {
        assert!(
            dir.path().join(key).exists(),
            "{key} stays in the state dir"
        );
        assert!(!install.join(key).exists());
    }

    // The new version does not come up (systemd's OnFailure= runs `agent rollback`).
    let rolled = vmvault_agent::upgrade::rollback(&state, "it exited at start").unwrap();
    assert_eq!(
        rolled.map(|(a, b)| (a.to_string(), b.to_string())),
        Some(("0.1.1".into(), "0.1.0".into()))
    );
    // The old version, started again, reports it, and is not offered 0.1.1 again.
    assert_eq!(run_for(&state, Duration::from_secs(3)), RunEnd::Stopped);
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts[0]["bad_versions"], json!(["0.1.1"]), "{hosts}");
    assert_eq!(
        hosts[0]["wanted_version"],
        json!(null),
        "a rolled-back version is not wanted any more"
    );
    let again = s.admin(
        "POST",
        "/api/v1/hosts/kvm02/upgrade",
        Some(json!({"version": "0.1.1"})),
    );
    assert_eq!(again.status, 409, "{}", again.body);
    let audit = s.ok(&s.admin.clone(), "GET", "/api/v1/audit", None);
    assert!(
        audit.to_string().contains("alert.upgrade_rolled_back"),
        "{audit}"
    );

    // A release whose binary was changed on the server after it was signed is refused by
    // the agent: nothing is installed.
    assert_eq!(add_release(&s, "0.1.2", b"#!/bin/sh\necho 0.1.2\n"), 201);
    let target = vmvault_release::this_target();
    std::fs::write(
        s.app
            .cfg
            .state_dir
            .join(format!("releases/0.1.2-{target}/vmvault")),
        b"#!/bin/sh\necho not what was signed\n",
    )
    .unwrap();
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts/kvm02/upgrade",
        Some(json!({"version": "0.1.2"})),
    );
    let before = std::fs::read(install.join("current/vmvault")).unwrap();
    assert_eq!(
        run_for(&state, Duration::from_secs(4)),
        RunEnd::Stopped,
        "no restart for a refused release"
    );
    assert!(std::fs::read(install.join("current/vmvault")).unwrap() == before);
    assert!(!install.join("versions/0.1.2").exists());
}

#[test]
fn only_admins_add_releases_and_agents_fetch_only_through_their_certificate() {
    let s = Server::start_tls(Arc::new(SystemClock));
    let op = s.user("op", "operator");
    let r = s.call_bytes_as(Some(&op), "/api/v1/releases?version=0.2.0", b"x");
    assert_eq!(r, 403);
    assert_eq!(
        s.call_bytes("/api/v1/releases?version=2", b"x"),
        400,
        "a version is MAJOR.MINOR.PATCH"
    );
    let fetched = s.admin("GET", "/api/v1/agent/releases/0.2.0", None);
    assert_eq!(fetched.status, 401, "a token opens no agent route");
}
