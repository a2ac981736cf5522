//! Host agents end to end through the real binaries only: one `vmvault server` over TLS, two
//! `vmvault agent run` processes (their own state dirs, each finding only its own QEMU VM),
//! enrolled with codes from `vmvault host add`, reported by `hosts` and `vms`, protected
//! and backed up as HOST/VM; an agent killed (SIGKILL) mid-backup fails its job at the
//! server, and the retried job, once the agent is back, makes a whole point; a guest with a
//! guest agent and scripts is backed up application-consistent; and the agent's bad input
//! (not enrolled, a malformed code, a wrong configuration) is said in one line.

#[path = "common/agents.rs"]
mod agents;
mod common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use agents::{same_content, server_config, wait_for, Agent, GuestVm, HostVm};
use common::server::Server;
use common::{assert_error, out, Env, Out};

/// Each line's words joined by one space: a table compared without its column widths.
fn words(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The real server over TLS with `extra` configuration lines. Its in-process agent for its
/// own host stays off: it would report every QEMU on this machine, other tests' included.
fn start_server(env: &Env, extra: &str) -> Server {
    let config = server_config(env, extra);
    Server::start_with(env, &["--config", config.to_str().unwrap()], |c| {
        c.env("VMVAULT_SERVER_NO_OWN_HOST", "true");
    })
}

/// The CLI against `s` as its admin, the certificate trusted on first use.
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

/// `host add NAME --json` and `agent enroll` with its code, through the CLI; the state dir.
fn enroll(env: &Env, s: &Server, host: &str, fingerprint: &str) -> std::path::PathBuf {
    let code = admin_ok(env, s, &["host", "add", host, "--json"]).json();
    assert_eq!(code["host"], host);
    assert_eq!(code["fingerprint"], s.fingerprint.as_str());
    let state = env.path(&format!("{host}-state"));
    env.ok(&[
        "agent",
        "enroll",
        &s.url,
        "--code",
        code["code"].as_str().unwrap(),
        "--trust-fingerprint",
        fingerprint,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    state
}

fn vms_json(env: &Env, s: &Server, host: Option<&str>) -> Vec<serde_json::Value> {
    let mut args = vec!["vms", "--json"];
    args.extend(host.iter().flat_map(|h| ["--host", h]));
    admin_ok(env, s, &args).json().as_array().unwrap().clone()
}

/// Restores disk `os` of web01's point `point` from the vault itself (not through the
/// server) as a raw image.
fn restored(env: &Env, point: &str, name: &str) -> std::path::PathBuf {
    let to = env.path(name);
    env.ok(&[
        "restore",
        &format!("web01@{point}"),
        "--disk",
        "os",
        "--format",
        "raw",
        "--to",
        to.to_str().unwrap(),
    ]);
    to
}

#[test]
fn two_hosts_enroll_report_their_vms_and_back_up_through_the_server() {
    let env = Env::new();
    let s = start_server(&env, "backup_attempts = 1\n");
    // Both hosts have a VM named web01, with different disks: nothing may mix them up.
    let Some(vm1) = HostVm::start(&env.path("kvm1"), "web01", 16 << 20, 1) else {
        return;
    };
    let Some(vm2) = HostVm::start(&env.path("kvm2"), "web01", 16 << 20, 2) else {
        return;
    };
    admin_ok(
        &env,
        &s,
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

    // kvm1 enrolls with the code from --json, its fingerprint typed as people do.
    let typed = s.fingerprint.replace(':', "").to_lowercase();
    let state1 = enroll(&env, &s, "kvm1", &typed);
    let status = env
        .ok(&[
            "agent",
            "status",
            "--json",
            "--state-dir",
            state1.to_str().unwrap(),
        ])
        .json();
    assert_eq!(status["enrolled"], true, "{status}");
    assert_eq!(status["host"], "kvm1");
    assert_eq!(status["server"], s.url.as_str());
    assert_eq!(status["fingerprint"], s.fingerprint.as_str());
    // kvm2 runs exactly the command `host add` printed.
    let o = admin_ok(&env, &s, &["host", "add", "kvm2", "--expires", "30m"]);
    let command = o
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("vmvault "))
        .unwrap_or_else(|| panic!("no command in {:?}", o.stdout));
    let code = o
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("code"))
        .unwrap();
    assert_eq!(
        command,
        format!(
            "agent enroll {} --code {} --trust-fingerprint {}",
            s.url,
            code.trim(),
            s.fingerprint
        )
    );
    assert!(o.stdout.contains("expires"), "{}", o.stdout);
    let state2 = env.path("kvm2-state");
    let mut args: Vec<&str> = command.split_whitespace().collect();
    args.extend(["--state-dir", state2.to_str().unwrap()]);
    let o = env.ok(&args);
    assert!(o.stdout.contains("enrolled as host 'kvm2'"), "{}", o.stdout);
    // A code enrolls once: the server refuses it again (401, exit 6).
    let third = env.path("third-state");
    let n = args.len();
    args[n - 1] = third.to_str().unwrap();
    assert_error(&env.run(&args), 6, &args);

    let a1 = Agent::start(&env, &state1, &vm1.qmp());
    let mut a2 = Agent::start(&env, &state2, &vm2.qmp());
    let logs = || format!("kvm1:\n{}\nkvm2:\n{}", a1.log(), a2.log());
    wait_for("both agents' reports", 60, logs, || {
        let v = vms_json(&env, &s, None);
        v.len() == 2 && v.iter().all(|x| x["state"] == "running")
    });

    let hosts = admin_ok(&env, &s, &["hosts"]).stdout;
    let rows: Vec<Vec<&str>> = hosts
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "HOST",
            "STATE",
            "VERSION",
            "LAST",
            "HEARTBEAT",
            "VMS",
            "SILENT"
        ]
    );
    assert_eq!(rows.len(), 3, "{hosts}");
    for (row, host) in rows[1..].iter().zip(["kvm1", "kvm2"]) {
        // The heartbeat's time is the one column that moves.
        assert!(
            chrono::DateTime::parse_from_rfc3339(row[3]).is_ok(),
            "{hosts}"
        );
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            [row[0], row[1], row[2], row[4], row[5]],
            [host, "enrolled", version, "1", "no"]
        );
    }
    let table = |o: Out| words(&o.stdout);
    assert_eq!(
        table(admin_ok(&env, &s, &["vms"])),
        "HOST/VM STATE POLICY DISKS GUEST AGENT\n\
         kvm1/web01 running - os 16.0 MiB no\n\
         kvm2/web01 running - os 16.0 MiB no"
    );
    // Each host's list has its own VM, with its own disk, and nothing of the other's.
    for (host, vm, other) in [("kvm1", &vm1, &vm2), ("kvm2", &vm2, &vm1)] {
        let list = vms_json(&env, &s, Some(host));
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["host"], host);
        let file = list[0]["disks"][0]["file"].as_str().unwrap();
        assert_eq!(
            Path::new(file),
            vm.qcow2.canonicalize().unwrap(),
            "{list:?}"
        );
        let text = serde_json::to_string(&list).unwrap();
        assert!(!text.contains(other.qcow2.to_str().unwrap()), "{text}");
    }

    // Names that are not there: one line each, exit 2 (the class of "not found").
    for (args, missing) in [
        (
            &["protect", "kvm1/nosuchvm", "--policy", "daily"][..],
            "nosuchvm",
        ),
        (&["backup", "kvm1/nosuchvm"], "nosuchvm"),
        (&["vms", "--host", "kvm9"], "kvm9"),
        (
            &["protect", "kvm1/web01", "--policy", "nosuchpolicy"],
            "nosuchpolicy",
        ),
    ] {
        let o = admin(&env, &s, args);
        assert_error(&o, 2, args);
        assert!(o.stderr.contains(missing), "{args:?}: {}", o.stderr);
    }

    let o = admin_ok(&env, &s, &["protect", "kvm1/web01", "--policy", "daily"]);
    assert_eq!(o.stdout.trim(), "kvm1/web01 is protected by policy daily");
    // The item is named after the VM: kvm2's web01 can be neither protected too nor backed
    // up in its place.
    let o = admin(&env, &s, &["protect", "kvm2/web01", "--policy", "daily"]);
    assert_error(&o, 2, &["protect", "kvm2/web01"]);
    let o = admin(&env, &s, &["backup", "kvm2/web01"]);
    assert_error(&o, 2, &["backup", "kvm2/web01"]);
    assert!(
        o.stderr.contains("kvm2/web01 is not protected"),
        "{}",
        o.stderr
    );
    assert_eq!(
        table(admin_ok(&env, &s, &["vms"])),
        "HOST/VM STATE POLICY DISKS GUEST AGENT\n\
         kvm1/web01 running daily os 16.0 MiB no\n\
         kvm2/web01 running - os 16.0 MiB no"
    );

    let o = admin(&env, &s, &["backup", "kvm1/web01", "--wait"]);
    assert_eq!(o.code, 0, "{}{}\n{}", o.stdout, o.stderr, logs());
    let point = o.stdout.trim().to_string();
    assert!(
        point.len() == 32 && point.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        o.stdout
    );
    assert!(
        o.stderr.contains("taken by the agent on host 'kvm1'"),
        "{}",
        o.stderr
    );
    let points = admin_ok(&env, &s, &["points", "web01", "--json"]).json();
    let listed = points["points"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{points}");
    assert_eq!(listed[0]["id"], point.as_str());
    assert_eq!(listed[0]["host"], "kvm1", "{points}");
    let disk = restored(&env, &point, "web01-os.raw");
    assert!(same_content(&disk, &vm1.raw), "the point is kvm1's web01");
    assert!(!same_content(&disk, &vm2.raw));
    env.ok(&["verify"]);

    // SIGTERM stops the agent cleanly (exit 0, as systemd expects of a stop), and its log
    // lines carry the time.
    let st = a2.terminate(Duration::from_secs(40));
    assert!(st.success(), "{st:?}\n{}", a2.log());
    let log = a2.log();
    let first = log.lines().next().unwrap_or_default();
    let (time, rest) = first.split_once(' ').unwrap_or_default();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{log}");
    assert!(rest.starts_with("vmvault agent "), "{log}");
    assert!(
        log.lines().last().unwrap_or_default().ends_with(" stopped"),
        "{log}"
    );
    drop(a1);
}

/// `backup HOST/VM --wait` as a process of its own, its output piped.
fn backup_waiting(env: &Env, s: &Server) -> Child {
    let mut cmd = env.command(&[
        "--server",
        &s.url,
        "--token",
        &s.admin,
        "backup",
        "kvm1/web01",
        "--wait",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

#[test]
fn a_killed_agent_fails_its_job_and_the_next_backup_is_whole() {
    let env = Env::new();
    // A silent agent's job fails after 3 s, not 120; one retry, a second later.
    let s = start_server(
        &env,
        "agent_job_silence_secs = 3\nbackup_attempts = 2\nretry_backoff_secs = 1\n",
    );
    // Random data, large enough that the backup is still sending it when the agent dies.
    let Some(vm) = HostVm::start(&env.path("kvm1"), "web01", 256 << 20, 7) else {
        return;
    };
    admin_ok(
        &env,
        &s,
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
    let state = enroll(&env, &s, "kvm1", &s.fingerprint);
    let mut agent = Agent::start(&env, &state, &vm.qmp());
    wait_for(
        "the agent's report",
        60,
        || agent.log(),
        || vms_json(&env, &s, Some("kvm1")).len() == 1,
    );
    admin_ok(&env, &s, &["protect", "kvm1/web01", "--policy", "daily"]);

    let waiting = backup_waiting(&env, &s);
    let started = Instant::now();
    let job = loop {
        let running = admin_ok(&env, &s, &["jobs", "--running", "--json"]).json();
        let sending = running
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["bytes_done"].as_u64().unwrap_or(0) > 0);
        if let Some(j) = sending {
            // Mid-job, or the kill below tests nothing.
            assert!(j["bytes_done"].as_u64() < j["bytes_total"].as_u64(), "{j}");
            eprintln!(
                "killing the agent at {} of {} bytes",
                j["bytes_done"], j["bytes_total"]
            );
            break j["id"].as_i64().unwrap().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{running}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    let killed_log = agent.log();

    // The server notices the silence, fails the attempt, and queues the retry: no point.
    let show = || admin_ok(&env, &s, &["job", "show", &job, "--json"]).json();
    wait_for(
        "the silent job's failure",
        60,
        || format!("{}", show()),
        || {
            let j = show();
            let log = serde_json::to_string(&j["log"]).unwrap();
            log.contains("attempt 1 failed") && log.contains("was silent for 3 s")
        },
    );
    let j = show();
    assert_eq!(j["state"], "queued", "{j}\n{killed_log}");
    assert!(j["point"].is_null(), "{j}");
    let o = admin(&env, &s, &["points", "web01"]);
    assert_error(&o, 2, &["points", "web01"]);
    env.ok(&["verify"]);

    // Back up again: the agent restarted takes the retry, and the waiting CLI gets its point.
    let agent = Agent::start(&env, &state, &vm.qmp());
    let o = out(waiting.wait_with_output().unwrap());
    assert_eq!(o.code, 0, "{}{}\n{}", o.stdout, o.stderr, agent.log());
    let point = o.stdout.trim().to_string();
    assert!(o.stderr.contains("was silent for 3 s"), "{}", o.stderr);
    let points = admin_ok(&env, &s, &["points", "web01", "--json"]).json();
    let listed = points["points"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{points}");
    assert_eq!(listed[0]["id"], point.as_str());
    env.ok(&["verify", "--read-data"]);
    let disk = restored(&env, &point, "web01-os.raw");
    assert!(
        same_content(&disk, &vm.raw),
        "the point after the kill is the whole disk"
    );
}

/// The guest-agent factory `agent run` gives the agent, and the scripts `protect --scripts`
/// hands the server, reach the job: the guest is quiesced by its agent and its scripts run.
#[test]
fn a_vm_with_a_guest_agent_is_backed_up_application_consistent_with_its_scripts() {
    let env = Env::new();
    let files = env.path("guest-files");
    std::fs::create_dir_all(&files).unwrap();
    vmvault_testkit::write_script(&files, "ok.sh", "exit 0");
    let Some(guest) = GuestVm::start(&env.path("kvm3"), "db01", &files) else {
        return;
    };
    let s = start_server(&env, "backup_attempts = 1\n");
    admin_ok(
        &env,
        &s,
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
    let state = enroll(&env, &s, "kvm3", &s.fingerprint);
    // Its guest agent's socket is found on QEMU's command line only: the process scan is on.
    let qmp = guest.dir.join("qmp.sock");
    let agent = Agent::start_finding(&env, &state, &["--qmp-glob", qmp.to_str().unwrap()]);
    wait_for(
        "the agent's report of db01",
        60,
        || agent.log(),
        || {
            vms_json(&env, &s, Some("kvm3"))
                .iter()
                .any(|v| v["name"] == "db01" && v["guest_agent"] == true)
        },
    );
    let scripts = env.path("db01-scripts.toml");
    std::fs::write(
        &scripts,
        "[pre]\npath = \"/mnt/ok.sh\"\n[post]\npath = \"/mnt/ok.sh\"\n",
    )
    .unwrap();
    let scripts = scripts.to_str().unwrap();
    let protect = [
        "protect",
        "kvm3/db01",
        "--policy",
        "daily",
        "--scripts",
        scripts,
    ];
    admin_ok(&env, &s, &protect);
    let o = admin(&env, &s, &["backup", "kvm3/db01", "--wait"]);
    assert_eq!(o.code, 0, "{}{}\n{}", o.stdout, o.stderr, agent.log());
    let points = admin_ok(&env, &s, &["points", "db01", "--json"]).json();
    let p = &points["points"][0];
    assert_eq!(p["consistency"], "application", "{points}");
    assert_eq!(p["consistency_reason"], "", "{points}");
    // A scripts file the agent could not run is refused when it is given, naming the file.
    std::fs::write(
        env.path("bad-scripts.toml"),
        "[pre]\npaht = \"/mnt/ok.sh\"\n",
    )
    .unwrap();
    let bad = env.path("bad-scripts.toml");
    let args = [
        "protect",
        "kvm3/db01",
        "--policy",
        "daily",
        "--scripts",
        bad.to_str().unwrap(),
    ];
    let o = admin(&env, &s, &args);
    assert_error(&o, 2, &args);
    assert!(o.stderr.contains("bad-scripts.toml"), "{}", o.stderr);
}

#[test]
fn an_agent_not_enrolled_or_given_a_bad_code_or_configuration_says_so() {
    let env = Env::new();
    let state = env.path("agent-state");
    let state = state.to_str().unwrap();
    let empty = env.path("agent.toml");
    std::fs::write(&empty, "").unwrap();
    let config = empty.to_str().unwrap();

    let args = ["agent", "run", "--config", config, "--state-dir", state];
    let e = env.fails(&args, 2);
    assert!(
        e.contains("not enrolled") && e.contains("vmvault agent enroll"),
        "{e}"
    );
    // The state dir comes from the environment as well.
    let o = env.run_env(
        &["agent", "run", "--config", config],
        &[("VMVAULT_AGENT_STATE", state)],
    );
    assert_error(&o, 2, &["agent", "run"]);

    for code in [
        "nodash",
        "ABCDEFGH-short",
        "ABCDEFG-ABCDEFGHJKMNPQRSTVWXYZ01",
    ] {
        let args = [
            "agent",
            "enroll",
            "https://127.0.0.1:9",
            "--code",
            code,
            "--state-dir",
            state,
        ];
        let e = env.fails(&args, 2);
        assert!(e.contains("ID-SECRET"), "{code}: {e}");
    }
    // Agents talk TLS only.
    let code = "ABCDEFGH-ABCDEFGHJKMNPQRSTVWXYZ0123";
    let args = [
        "agent",
        "enroll",
        "http://127.0.0.1:9",
        "--code",
        code,
        "--state-dir",
        state,
    ];
    let e = env.fails(&args, 2);
    assert!(e.contains("https://"), "{e}");
    // --trust-fingerprint is the agent's own option here, even with VMVAULT_SERVER set.
    let o = env.run_env(
        &[
            "agent",
            "enroll",
            "https://127.0.0.1:9",
            "--code",
            "x",
            "--trust-fingerprint",
            "AB",
        ],
        &[("VMVAULT_SERVER", "https://127.0.0.1:9")],
    );
    assert_error(&o, 2, &["agent", "enroll"]);
    assert!(o.stderr.contains("ID-SECRET"), "{}", o.stderr);

    let status = env
        .ok(&["agent", "status", "--json", "--state-dir", state])
        .json();
    assert_eq!(status["enrolled"], false, "{status}");

    let bad = env.path("bad.toml");
    std::fs::write(&bad, "scan_processes = true\nqmp_glob = [\"/x\"]\n").unwrap();
    let args = [
        "agent",
        "run",
        "--config",
        bad.to_str().unwrap(),
        "--state-dir",
        state,
    ];
    let e = env.fails(&args, 2);
    assert!(
        e.contains("bad.toml, line 2") && e.contains("qmp_glob"),
        "{e}"
    );
    let args = [
        "agent",
        "run",
        "--config",
        config,
        "--state-dir",
        state,
        "--freeze-limit",
        "0",
    ];
    let e = env.fails(&args, 2);
    assert!(e.contains("freeze limit"), "{e}");
    let no_globs = env.path("no-globs.toml");
    std::fs::write(&no_globs, "qmp_globs = []\n").unwrap();
    let no_globs = no_globs.to_str().unwrap();
    let args = [
        "agent",
        "run",
        "--config",
        no_globs,
        "--no-process-scan",
        "--state-dir",
        state,
    ];
    let e = env.fails(&args, 2);
    assert!(e.contains("never find a VM"), "{e}");
}

#[test]
fn a_server_killed_mid_backup_queues_the_job_again_and_nothing_is_lost() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let config = server_config(&env, "backup_attempts = 3\nretry_backoff_secs = 1\n");
    let start = || {
        Server::start_on(
            &env,
            &listen,
            &["--config", config.to_str().unwrap()],
            |c| {
                c.env("VMVAULT_SERVER_NO_OWN_HOST", "true");
            },
        )
    };
    let mut s = start();
    let Some(vm) = HostVm::start(&env.path("kvm1"), "web01", 256 << 20, 11) else {
        return;
    };
    admin_ok(
        &env,
        &s,
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
    let state = enroll(&env, &s, "kvm1", &s.fingerprint);
    let agent = Agent::start(&env, &state, &vm.qmp());
    wait_for(
        "the agent's report",
        60,
        || agent.log(),
        || vms_json(&env, &s, Some("kvm1")).len() == 1,
    );
    admin_ok(&env, &s, &["protect", "kvm1/web01", "--policy", "daily"]);
    let job = admin_ok(&env, &s, &["backup", "kvm1/web01"])
        .stdout
        .trim()
        .to_string();
    let started = Instant::now();
    loop {
        let j = admin_ok(&env, &s, &["job", "show", &job, "--json"]).json();
        let done = j["bytes_done"].as_u64().unwrap_or(0);
        if done > 0 {
            assert!(
                done < j["bytes_total"].as_u64().unwrap(),
                "mid-job, or the kill tests nothing: {j}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{j}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.child.kill().unwrap(); // SIGKILL, mid-backup
    s.child.wait().unwrap();

    // Started again on its state: the cut-off backup is queued again; the agent, told its
    // lease is gone, rolls its instant back and takes the retry.
    let s = start();
    let show = || admin_ok(&env, &s, &["job", "show", &job, "--json"]).json();
    wait_for(
        "the retried job's end",
        120,
        || format!("{}\n{}", show(), agent.log()),
        || matches!(show()["state"].as_str(), Some("succeeded" | "failed")),
    );
    let j = show();
    assert_eq!(j["state"], "succeeded", "{j}\n{}", agent.log());
    let log = serde_json::to_string(&j["log"]).unwrap();
    assert!(
        log.contains("the server stopped while this job ran: queued again"),
        "{log}"
    );
    let point = j["point"].as_str().unwrap().to_string();
    env.ok(&["verify", "--read-data"]);
    let out = restored(&env, &point, "after-restart.raw");
    assert!(same_content(&out, &vm.raw), "the retried point is the disk");
    // And the next backup is incremental: the agent's tracking survived the cut.
    let next = admin_ok(&env, &s, &["backup", "kvm1/web01", "--wait"]);
    assert!(
        next.stderr.contains("reading only what changed"),
        "{}",
        next.stderr
    );
}
