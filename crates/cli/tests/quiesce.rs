//! The hidden `vmvault quiesce-child` subcommand as the quiesce helper: `vmvault_qemu::quiesce`
//! driving the real binary, as the backup of a running VM does. The sequence itself is tested
//! in `crates/qemu/tests/quiesce.rs`; this checks the binary's side of it.

use std::process::Command;
use std::time::{Duration, Instant};

use vmvault_qemu::qga::FreezeStatus;
use vmvault_qemu::{quiesce, Level, Qga, QuiesceOptions};
use vmvault_testkit::{write_script, QgaGuest};

fn helper() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmvault"));
    cmd.arg("quiesce-child");
    cmd
}

#[test]
fn the_helper_subcommand_is_hidden_and_answers_without_an_agent() {
    let help = Command::new(env!("CARGO_BIN_EXE_vmvault"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("quiesce"));
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let session = quiesce(&QuiesceOptions::new(dir.path().join("qga.sock")), helper()).unwrap();
    assert_eq!(session.state().level, Level::Crash);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(session.release().unwrap().frozen_for, Duration::ZERO);
    // Run by hand, without options on stdin, it says so and fails.
    let out = helper()
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_binary_freezes_a_real_guest_ignores_ctrl_c_and_thaws() {
    let data = tempfile::tempdir().unwrap();
    let Some(guest) = QgaGuest::start(data.path()) else {
        return;
    };
    let session = quiesce(&QuiesceOptions::new(guest.qga_socket()), helper()).unwrap();
    assert_eq!(
        session.state().level,
        Level::Filesystem,
        "{:?}",
        session.state()
    );
    // A Ctrl-C meant for vmvault, sent to the helper itself: it goes on holding the freeze.
    let pid = session.helper_pid().unwrap().to_string();
    let kill = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(kill.success());
    std::thread::sleep(Duration::from_millis(200));
    let released = session.release().unwrap();
    assert!(
        !released.thawed_early && released.warnings.is_empty(),
        "{released:?}"
    );
    eprintln!(
        "through the binary: frozen for {:.0} ms (with a 200 ms pause)",
        released.frozen_for.as_secs_f64() * 1000.0
    );
    let mut agent = Qga::connect(&guest.qga_socket(), Duration::from_secs(5)).unwrap();
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
}

/// `vmvault backup --qmp --qga [--scripts]` of the real guest: each point says how consistent
/// it is and why, and a failing pre-script fails the job with the guest thawed.
#[test]
fn backups_of_a_running_guest_are_as_consistent_as_its_agent_and_scripts_make_them() {
    let data = tempfile::tempdir().unwrap();
    write_script(data.path(), "ok.sh", "exit 0");
    write_script(data.path(), "hang.sh", "sleep 100");
    write_script(
        data.path(),
        "fail.sh",
        "echo 'the database said no' >&2; exit 3",
    );
    let Some(guest) = QgaGuest::start(data.path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    let vmvault = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmvault"))
            .args(args)
            .env("VMVAULT_PASSWORD", "pw")
            .env("VMVAULT_VAULT", &vault)
            .env("VMVAULT_STATE_DIR", dir.path().join("state"))
            .output()
            .unwrap()
    };
    assert!(vmvault(&["vault", "create", vault.to_str().unwrap()])
        .status
        .success());
    let scripts = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let qmp = guest.qmp_socket();
    let qga = guest.qga_socket();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "--qmp",
            qmp.to_str().unwrap(),
            "--qga",
            qga.to_str().unwrap(),
            "--name",
            "guest",
            "--json",
        ];
        args.extend_from_slice(extra);
        vmvault(&args)
    };
    let point = |o: &std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };

    let p = point(&backup(&[]));
    assert_eq!(p["consistency"], "filesystem", "{p}");
    let stderr = String::from_utf8_lossy(&backup(&[]).stderr).to_string();
    assert!(stderr.contains("guest quiesced for"), "{stderr}");

    let quick = scripts(
        "quick.toml",
        "[pre]\npath = \"/mnt/ok.sh\"\n[post]\npath = \"/mnt/ok.sh\"\n",
    );
    let p = point(&backup(&["--scripts", &quick]));
    assert_eq!(p["consistency"], "application", "{p}");
    assert_eq!(p["consistency_reason"], "");

    let hang = scripts(
        "hang.toml",
        "continue_on_failure = true\n[pre]\npath = \"/mnt/hang.sh\"\ntimeout_secs = 2\n",
    );
    let p = point(&backup(&["--scripts", &hang]));
    assert_eq!(p["consistency"], "filesystem", "{p}");
    assert!(!p["consistency_reason"].as_str().unwrap().is_empty(), "{p}");

    let fail = scripts("fail.toml", "[pre]\npath = \"/mnt/fail.sh\"\n");
    let o = backup(&["--scripts", &fail]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("the database said no"));
    let mut agent = Qga::connect(&guest.qga_socket(), Duration::from_secs(5)).unwrap();
    assert_eq!(agent.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
    drop(agent);

    // The points list says it per point.
    let points = vmvault(&["points"]);
    let (out, err) = (
        String::from_utf8_lossy(&points.stdout),
        String::from_utf8_lossy(&points.stderr),
    );
    assert!(
        out.contains("application") && out.contains("filesystem"),
        "{out}"
    );
    assert!(err.contains("filesystem-consistent"), "{err}");
    // Scripts need the agent.
    let o = vmvault(&[
        "backup",
        "--qmp",
        qmp.to_str().unwrap(),
        "--scripts",
        &quick,
    ]);
    assert_eq!(o.status.code(), Some(2));
}
