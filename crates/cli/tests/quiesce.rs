//! The hidden `vmvault quiesce-child` subcommand as the quiesce helper: `vmvault_qemu::quiesce`
//! driving the real binary, as the backup of a running VM does. The sequence itself is tested
//! in `crates/qemu/tests/quiesce.rs`; this checks the binary's side of it.

use std::process::Command;
use std::time::{Duration, Instant};

use vmvault_qemu::qga::FreezeStatus;
use vmvault_qemu::{quiesce, Level, Qga, QuiesceOptions};
use vmvault_testkit::QgaGuest;

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
