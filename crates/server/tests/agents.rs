//! A host agent end to end, through the real server over TLS: `host add`, enrollment with the
//! one-time code, a running QEMU VM found and reported, protected, backed up live through the
//! relay (the agent holds no vault key), then incrementally with changed-block tracking, then
//! stopped and backed up offline; the points restore to the disk at their instant, on the
//! server and on the host (only under its restore roots). Also: a silent host, and the
//! server's own host.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmvault_agent::discover::DiscoverConfig;
use vmvault_agent::{AgentOptions, AgentState};
use vmvault_engine::{restore_disk, NoProgress, RestoreOptions};
use vmvault_qemu::Qmp;
use vmvault_server::SystemClock;
use vmvault_testkit::QemuVm;

use common::Server;

const SIZE: usize = 16 << 20;

/// 16 MiB of data that differs per MiB, with a zero MiB in the middle, as a qcow2 image.
fn make_image(dir: &Path) -> Vec<u8> {
    let mut data = vec![0u8; SIZE];
    for (i, mib) in data.chunks_mut(1 << 20).enumerate() {
        if i != 7 {
            for (j, b) in mib.iter_mut().enumerate() {
                *b = (i * 31 + j / 4096) as u8 ^ 0x5a;
            }
        }
    }
    let raw = dir.join("os.raw");
    std::fs::write(&raw, &data).unwrap();
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(dir.join("os.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    data
}

fn start_vm(dir: &Path) -> Option<QemuVm> {
    let os = format!(
        "driver=qcow2,node-name=drive0,file.driver=file,file.filename={}",
        dir.join("os.qcow2").display()
    );
    let second = format!(
        "unix:{},server=on,wait=off",
        dir.join("monitor2.sock").display()
    );
    let vm = QemuVm::start(
        0,
        &[
            "-name",
            "web01",
            "-blockdev",
            &os,
            "-device",
            "virtio-blk-pci,drive=drive0,id=os",
            "-qmp",
            &second,
        ],
    )?;
    let mut qmp = Qmp::connect(&vm.qmp_socket()).unwrap();
    qmp.execute("cont", json!({})).unwrap();
    Some(vm)
}

fn guest_write(monitor: &Path, pattern: u8, offset: usize, len: usize) {
    let mut qmp = Qmp::connect(monitor).unwrap();
    let cmd = format!("qemu-io -d os/virtio-backend \"write -P {pattern:#x} {offset} {len}\"");
    let out = qmp
        .execute("human-monitor-command", json!({ "command-line": cmd }))
        .unwrap();
    assert!(
        !out.as_str().unwrap_or("").contains("error"),
        "qemu-io: {out}"
    );
}

fn restored(s: &Server, point: &str) -> Vec<u8> {
    let (points, _) = s.app.vault.points().unwrap();
    let m = points.into_iter().find(|m| m.id.to_hex() == point).unwrap();
    let out = s.path(&format!("restored-{point}.raw"));
    let opts = RestoreOptions {
        overwrite: true,
        format: Some("raw".into()),
        ..RestoreOptions::default()
    };
    restore_disk(&s.app.vault, &m, &m.disks[0], &out, &opts, &NoProgress).unwrap();
    std::fs::read(out).unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not happen in 30 s");
}

fn job_log(j: &Value) -> String {
    j["log"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| x["line"].as_str().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn an_enrolled_agent_backs_up_a_running_vm_through_the_server_then_only_what_changed() {
    let s = Server::start_with(Arc::new(SystemClock), |c| {
        c.insecure_http = false;
        c.agent_heartbeat_secs = 1;
    });
    let vm_dir = tempfile::tempdir().unwrap();
    let mut data = make_image(vm_dir.path());
    let Some(vm) = start_vm(vm_dir.path()) else {
        return;
    };

    let code = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts",
        Some(json!({"name": "kvm02"})),
    );
    assert_eq!(code["fingerprint"], s.fingerprint());
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts[0]["state"], "pending");

    let agent_dir = tempfile::tempdir().unwrap();
    let state = AgentState::open(agent_dir.path()).unwrap();
    let pins = vmvault_agent::enroll(
        &state,
        &s.base,
        code["code"].as_str().unwrap(),
        Some(&s.fingerprint()),
    )
    .unwrap();
    assert_eq!(pins.host, "kvm02");
    assert_eq!(pins.release_key, s.app.release_public_key().unwrap());
    // A code enrolls once.
    let again = AgentState::open(&agent_dir.path().join("second")).unwrap();
    let err =
        vmvault_agent::enroll(&again, &s.base, code["code"].as_str().unwrap(), None).unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");

    let restores = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    drop(state);
    let glob = vm.qmp_socket().display().to_string();
    let roots = vec![restores.path().to_path_buf()];
    let state_dir = agent_dir.path().to_path_buf();
    let spawn_agent = || {
        let opts = AgentOptions {
            restore_roots: roots.clone(),
            discover: DiscoverConfig {
                qmp_globs: vec![glob.clone()],
                scan_processes: false,
                ..DiscoverConfig::default()
            },
            poll_wait_secs: 1,
            ..AgentOptions::default()
        };
        let stop = opts.stop.clone();
        let state = AgentState::open(&state_dir).unwrap();
        let handle = std::thread::spawn(move || {
            vmvault_agent::run(&state, &opts, &|line| eprintln!("agent: {line}")).unwrap()
        });
        (handle, stop)
    };
    let (agent, stop) = spawn_agent();

    wait_for("the agent's report of web01", || {
        let vms = s.ok(&s.admin.clone(), "GET", "/api/v1/vms?host=kvm02", None);
        vms.as_array()
            .is_some_and(|v| v.iter().any(|x| x["name"] == "web01"))
    });
    let vms = s.ok(&s.admin.clone(), "GET", "/api/v1/vms", None);
    assert_eq!(vms[0]["state"], "running", "{vms}");
    assert_eq!(vms[0]["disks"][0]["name"], "os");
    assert_eq!(vms[0]["protected"], Value::Null);
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts[0]["state"], "enrolled", "{hosts}");
    assert_eq!(hosts[0]["agent_version"], vmvault_agent::VERSION);
    assert_eq!(hosts[0]["vms"], 1);

    s.policy("daily", "daily 02:00", json!({}));
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts/kvm02/vms/web01/protect",
        Some(json!({"policy": "daily"})),
    );
    let vms = s.ok(&s.admin.clone(), "GET", "/api/v1/vms", None);
    assert_eq!(vms[0]["protected"], "web01");

    // The first backup reads the whole disk; the guest writes during it.
    let first = s.run_backup("web01", json!({}));
    assert_eq!(first["state"], "succeeded", "{first}");
    let p1 = first["point"].as_str().unwrap().to_string();
    let detail = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/jobs/{}", first["id"]),
        None,
    );
    assert!(
        job_log(&detail).contains("taken by the agent on host 'kvm02'"),
        "{}",
        job_log(&detail)
    );
    assert!(
        job_log(&detail).contains("reading it whole"),
        "{}",
        job_log(&detail)
    );
    let m = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/recovery-points/{p1}"),
        None,
    );
    let m = &m["manifest"];
    assert_eq!(m["host"], "kvm02", "{m}");
    assert_eq!(m["vm"], "web01");
    assert_eq!(m["source"], "qemu");
    assert!(
        restored(&s, &p1) == data,
        "the point is the disk at its instant"
    );

    // Then only what the guest wrote is read and sent; the rest is claimed from the base.
    guest_write(
        &vm_dir.path().join("monitor2.sock"),
        0xab,
        3 << 20,
        64 << 10,
    );
    data[3 << 20..(3 << 20) + (64 << 10)].fill(0xab);
    let second = s.run_backup("web01", json!({}));
    assert_eq!(second["state"], "succeeded", "{second}");
    let p2 = second["point"].as_str().unwrap().to_string();
    let detail = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/jobs/{}", second["id"]),
        None,
    );
    assert!(
        job_log(&detail).contains("reading only what changed since"),
        "{}",
        job_log(&detail)
    );
    let m2 = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/recovery-points/{p2}"),
        None,
    );
    let stats = &m2["manifest"]["disks"][0]["stats"];
    assert_eq!(stats["chunks_new"], 1, "one changed chunk: {m2}");
    assert_eq!(stats["bytes_read"], 1 << 20, "one chunk sent: {m2}");
    assert!(
        restored(&s, &p2) == data,
        "the incremental point is the disk with the change"
    );
    assert!(restored(&s, &p1) != data);

    // Restores run on the host, by its agent, and only under its restore roots.
    let to = restores.path().join("web01-restored");
    let job = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/restores",
        Some(json!({"point": p2, "target": to, "host": "kvm02", "format": "raw"})),
    );
    let done = s.wait_job(job["job"].as_i64().unwrap());
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        std::fs::read(to.join("os.raw")).unwrap() == data,
        "the host's restore is the point"
    );
    assert!(to.join("web01.toml").exists());
    let one = restores.path().join("os-only.qcow2");
    let job = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/restores",
        Some(json!({"point": p1, "target": one, "host": "kvm02", "disk": "os"})),
    );
    assert_eq!(
        s.wait_job(job["job"].as_i64().unwrap())["state"],
        "succeeded"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&one)
        .arg(s.path(&format!("restored-{p1}.raw")))
        .status()
        .unwrap();
    assert!(
        out.success(),
        "one disk restored as qcow2 on the host is the first point"
    );
    let escape = outside.path().join("web01");
    let job = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/restores",
        Some(json!({"point": p2, "target": escape, "host": "kvm02"})),
    );
    let refused = s.wait_job(job["job"].as_i64().unwrap());
    assert_eq!(refused["state"], "failed", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("not under this agent's restore roots"),
        "{refused}"
    );
    assert!(!escape.exists(), "nothing is written outside the roots");

    // The VM stops: it stays known, and its next backup is offline, from the images QEMU had
    // open, crash-consistent, and says so.
    let mut vm = vm;
    Qmp::connect(&vm.qmp_socket())
        .unwrap()
        .execute("quit", json!({}))
        .unwrap();
    assert!(vm.wait_exit(Duration::from_secs(10)));
    wait_for("web01 reported stopped", || {
        let vms = s.ok(&s.admin.clone(), "GET", "/api/v1/vms", None);
        vms[0]["state"] == "stopped"
    });
    // The agent restarts while the VM is off: it still knows the images QEMU had open.
    stop.store(true, Ordering::Relaxed);
    agent.join().unwrap();
    let (agent, stop) = spawn_agent();
    let third = s.run_backup("web01", json!({}));
    assert_eq!(third["state"], "succeeded", "{third}");
    let p3 = third["point"].as_str().unwrap().to_string();
    let m3 = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/recovery-points/{p3}"),
        None,
    );
    let m3 = &m3["manifest"];
    assert_eq!(m3["consistency"], "crash", "{m3}");
    assert!(
        m3["consistency_reason"]
            .as_str()
            .unwrap()
            .contains("stopped"),
        "{m3}"
    );
    assert!(
        restored(&s, &p3) == data,
        "the stopped VM's point is its disk"
    );

    stop.store(true, Ordering::Relaxed);
    agent.join().unwrap();
}

#[test]
fn a_silent_host_is_alerted_and_a_job_it_never_takes_fails_with_the_reason() {
    use vmvault_api::agent::{FoundDisk, FoundVm, Heartbeat, HeartbeatAnswer, HEARTBEAT};
    let clock = Arc::new(vmvault_server::ManualClock::new(chrono::Utc::now()));
    let s = Server::start_with(clock.clone(), |c| {
        c.insecure_http = false;
        c.agent_silence_alert_secs = 300;
        c.agent_job_wait_secs = 900;
    });
    let code = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts",
        Some(json!({"name": "kvm03"})),
    );
    let dir = tempfile::tempdir().unwrap();
    let state = AgentState::open(dir.path()).unwrap();
    let pins =
        vmvault_agent::enroll(&state, &s.base, code["code"].as_str().unwrap(), None).unwrap();
    let client = vmvault_agent::client::Client::new(
        &s.base,
        &state.identity().unwrap(),
        Some(pins.fingerprint),
    )
    .unwrap();
    let hb = Heartbeat {
        version: "0.1.0".into(),
        target: vmvault_release::this_target(),
        rolled_back: None,
        instance: "one".into(),
        vms: vec![FoundVm {
            name: "db01".into(),
            kind: "qemu".into(),
            state: "running".into(),
            qmp: Some("/run/db01.qmp".into()),
            qga: None,
            disks: vec![FoundDisk {
                name: "os".into(),
                file: None,
                format: "raw".into(),
                size: 1 << 20,
            }],
        }],
    };
    let _: HeartbeatAnswer = client.post(HEARTBEAT, None, &hb).unwrap();
    s.policy("daily", "daily 02:00", json!({}));
    s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts/kvm03/vms/db01/protect",
        Some(json!({"policy": "daily"})),
    );
    let job = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/protected-items/db01/backup",
        Some(json!({})),
    );
    let job = job["job"].as_i64().unwrap();

    // The host goes quiet: alerted once, shown silent; its job waits until the limit.
    clock.advance(chrono::Duration::seconds(301));
    s.app.tick().unwrap();
    s.app.tick().unwrap();
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts[0]["silent"], true, "{hosts}");
    let audit = s
        .ok(&s.admin.clone(), "GET", "/api/v1/audit?limit=200", None)
        .to_string();
    assert_eq!(
        audit.matches("alert.agent_silent").count(),
        1,
        "alerted once: {audit}"
    );
    let j = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/jobs/{job}"),
        None,
    );
    assert_eq!(j["state"], "queued", "{j}");
    let metrics = ureq_metrics(&s);
    assert!(metrics.contains("vmvault_host_info{host=\"kvm03\",version=\"0.1.0\",state=\"enrolled\",silent=\"true\"} 1"), "{metrics}");
    assert!(
        metrics.contains("vmvault_host_jobs{host=\"kvm03\",state=\"queued\"} 1"),
        "{metrics}"
    );

    clock.advance(chrono::Duration::seconds(600));
    s.app.tick().unwrap();
    let j = s.ok(
        &s.admin.clone(),
        "GET",
        &format!("/api/v1/jobs/{job}"),
        None,
    );
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("did not take the job within 900 s"),
        "{j}"
    );
    let audit = s
        .ok(&s.admin.clone(), "GET", "/api/v1/audit?limit=200", None)
        .to_string();
    assert!(audit.contains("alert.backup_failed"), "{audit}");

    // A heartbeat brings it back (and re-arms the alert).
    let _: HeartbeatAnswer = client.post(HEARTBEAT, None, &hb).unwrap();
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts[0]["silent"], false, "{hosts}");
}

fn ureq_metrics(s: &Server) -> String {
    let a = s.call(None, "GET", "/metrics", None);
    a.body.as_str().unwrap_or_default().to_string()
}

#[test]
fn the_servers_own_host_finds_and_backs_up_its_running_vms_without_enrollment() {
    let vm_dir = tempfile::tempdir().unwrap();
    let data = make_image(vm_dir.path());
    let Some(vm) = start_vm(vm_dir.path()) else {
        return;
    };
    let glob = vm.qmp_socket().display().to_string();
    let s = Server::start_with(Arc::new(SystemClock), move |c| {
        c.insecure_http = false;
        c.own_host = true;
        c.own_host_scan_processes = false;
        c.own_host_qmp_globs = vec![glob];
        c.agent_heartbeat_secs = 1;
    });
    let mut host = String::new();
    wait_for("the own host's report of web01", || {
        let vms = s.ok(&s.admin.clone(), "GET", "/api/v1/vms", None);
        match vms
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == "web01"))
        {
            Some(v) => {
                host = v["host"].as_str().unwrap().to_string();
                true
            }
            None => false,
        }
    });
    let hosts = s.ok(&s.admin.clone(), "GET", "/api/v1/hosts", None);
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts}");
    assert_eq!(
        hosts[0]["state"], "enrolled",
        "no code, no enrollment: {hosts}"
    );
    s.policy("daily", "daily 02:00", json!({}));
    s.ok(
        &s.admin.clone(),
        "POST",
        &format!("/api/v1/hosts/{host}/vms/web01/protect"),
        Some(json!({"policy": "daily"})),
    );
    let j = s.run_backup("web01", json!({}));
    assert_eq!(j["state"], "succeeded", "{j}");
    let p = j["point"].as_str().unwrap().to_string();
    assert!(restored(&s, &p) == data);
    // It is upgraded with the server, never by a release.
    let up = s.admin(
        "POST",
        &format!("/api/v1/hosts/{host}/upgrade"),
        Some(json!({"version": "9.9.9"})),
    );
    assert_eq!(up.status, 409, "{}", up.body);
}
