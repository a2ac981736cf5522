//! Quiescing a real guest: a tiny Linux guest with Debian's qemu-guest-agent under TCG
//! (`vmvault_testkit::QgaGuest`, booted once for the whole file: a boot takes ~9 s). The
//! quiesce helper is this test binary re-executed into `helper_entry`, as `vmvault` re-executes
//! itself with its hidden `quiesce-child` subcommand.
//!
//! Windows guests (VSS) cannot run here; they take the same guest-agent calls.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmvault_qemu::qga::FreezeStatus;
use vmvault_qemu::{child_main, quiesce, Level, QemuError, Qga, QuiesceOptions, Scripts};
use vmvault_testkit::{write_script, QgaGuest};

const ROLE: &str = "VMVAULT_QUIESCE_TEST_ROLE";
const PARENT_QGA: &str = "VMVAULT_QUIESCE_TEST_QGA";

/// Does nothing in a normal run. Re-executed with `ROLE=helper` it is the quiesce helper;
/// with `ROLE=parent` it is a vmvault that quiesces the guest, says so, and waits to be killed.
#[test]
fn helper_entry() {
    match std::env::var(ROLE).as_deref() {
        Ok("helper") => {
            let input = BufReader::new(std::io::stdin());
            std::process::exit(child_main(input, std::io::stdout()));
        }
        Ok("parent") => {
            let mut opts = QuiesceOptions::new(std::env::var(PARENT_QGA).unwrap());
            opts.freeze_limit = Duration::from_secs(60);
            let session = quiesce(&opts, helper()).unwrap();
            let mut out = std::io::stdout();
            writeln!(
                out,
                "QUIESCED {} {}",
                session.state().level.as_str(),
                session.helper_pid().unwrap()
            )
            .unwrap();
            out.flush().unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        _ => {}
    }
}

fn helper() -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_entry", "--nocapture", "--quiet"])
        .env(ROLE, "helper");
    cmd
}

fn options(guest: &QgaGuest, scripts: &str) -> QuiesceOptions {
    let mut opts = QuiesceOptions::new(guest.qga_socket());
    opts.scripts = Some(Scripts::parse(scripts).unwrap());
    opts
}

/// A fresh agent connection (the helper's is closed by now): the freeze status.
fn status(guest: &QgaGuest) -> FreezeStatus {
    let mut agent = Qga::connect(&guest.qga_socket(), Duration::from_secs(5)).unwrap();
    agent.fsfreeze_status().unwrap()
}

/// Runs a command in the guest; its stdout. Clears the log the scripts write to, after.
fn guest_run(guest: &QgaGuest, path: &str, args: &[&str]) -> (bool, String) {
    let mut agent = Qga::connect(&guest.qga_socket(), Duration::from_secs(5)).unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let r = agent
        .exec(path, &args, Duration::from_secs(10), false)
        .unwrap();
    (r.success(), String::from_utf8_lossy(&r.stdout).into_owned())
}

/// What the scripts and the fsfreeze hook wrote, in order; the log is emptied.
fn take_order(guest: &QgaGuest) -> Vec<String> {
    let (_, out) = guest_run(
        guest,
        "/bin/sh",
        &["-c", "cat /run/order.log; rm -f /run/order.log"],
    );
    out.lines().map(str::to_string).collect()
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fsfreeze-hook.d")).unwrap();
    let d = dir.path();
    write_script(
        &d.join("fsfreeze-hook.d"),
        "log",
        "echo \"hook $1\" >> /run/order.log",
    );
    // A freeze that hangs (in the guest's own hook) when the test asks for it.
    write_script(
        &d.join("fsfreeze-hook.d"),
        "slow",
        "[ \"$1\" = freeze ] && [ -e /run/slow-freeze ] && sleep 4\nexit 0",
    );
    write_script(d, "pre.sh", "echo \"pre $*\" >> /run/order.log");
    write_script(d, "post.sh", "echo post >> /run/order.log");
    write_script(d, "hang.sh", "echo hang >> /run/order.log\nsleep 997");
    write_script(d, "fail.sh", "echo 'cannot reach the database' >&2\nexit 3");
    dir
}

#[test]
fn quiesce_a_real_guest() {
    let data = data_dir();
    let Some(guest) = QgaGuest::start(data.path()) else {
        return;
    };
    let t = Instant::now();
    quick_scripts_give_an_application_consistent_point_frozen_under_a_second(&guest);
    no_scripts_give_a_filesystem_consistent_point(&guest);
    a_hanging_pre_script_times_out_and_falls_back(&guest);
    a_failing_pre_script_fails_the_job_and_leaves_nothing_frozen(&guest);
    a_failing_post_script_fails_the_job_after_the_thaw(&guest);
    skip_freeze_relies_on_the_pre_script(&guest);
    the_freeze_limit_thaws_without_a_release(&guest);
    a_freeze_that_hangs_is_crash_level_and_still_thawed(&guest);
    a_killed_vmvault_still_thaws(&guest);
    eprintln!(
        "all quiesce steps on the guest: {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

fn quick_scripts_give_an_application_consistent_point_frozen_under_a_second(guest: &QgaGuest) {
    let opts = options(
        guest,
        "[pre]\npath = \"/mnt/pre.sh\"\nargs = [\"--database\", \"orders\"]\n\
         [post]\npath = \"/mnt/post.sh\"\n",
    );
    let t = Instant::now();
    let session = quiesce(&opts, helper()).unwrap();
    let to_frozen = t.elapsed();
    assert_eq!(
        session.state().level,
        Level::Application,
        "{:?}",
        session.state()
    );
    assert_eq!(session.state().reason, None);
    // The caller would take its point in time here.
    let released = session.release().unwrap();
    eprintln!(
        "quick scripts: frozen for {:.0} ms; quiesce took {:.0} ms, the whole round {:.0} ms",
        released.frozen_for.as_secs_f64() * 1000.0,
        to_frozen.as_secs_f64() * 1000.0,
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(released.frozen_for < Duration::from_secs(1), "{released:?}");
    assert!(released.frozen_for > Duration::ZERO);
    assert!(
        released.warnings.is_empty() && !released.thawed_early,
        "{released:?}"
    );
    assert_eq!(status(guest), FreezeStatus::Thawed);
    assert_eq!(
        take_order(guest),
        ["pre --database orders", "hook freeze", "hook thaw", "post"]
    );
}

fn no_scripts_give_a_filesystem_consistent_point(guest: &QgaGuest) {
    let session = quiesce(&QuiesceOptions::new(guest.qga_socket()), helper()).unwrap();
    assert_eq!(session.state().level, Level::Filesystem);
    assert_eq!(session.state().reason, None);
    let released = session.release().unwrap();
    eprintln!(
        "no scripts: frozen for {:.0} ms",
        released.frozen_for.as_secs_f64() * 1000.0
    );
    assert!(released.frozen_for < Duration::from_secs(1), "{released:?}");
    assert_eq!(status(guest), FreezeStatus::Thawed);
    assert_eq!(take_order(guest), ["hook freeze", "hook thaw"]);
}

fn a_hanging_pre_script_times_out_and_falls_back(guest: &QgaGuest) {
    let opts = options(
        guest,
        "continue_on_failure = true\n[pre]\npath = \"/mnt/hang.sh\"\ntimeout_secs = 2\n\
         [post]\npath = \"/mnt/post.sh\"\n",
    );
    let t = Instant::now();
    let session = quiesce(&opts, helper()).unwrap();
    let waited = t.elapsed();
    let state = session.state().clone();
    assert_eq!(state.level, Level::Filesystem, "{state:?}");
    let reason = state.reason.unwrap();
    assert!(
        reason.contains("hang.sh") && reason.contains("timed out after 2 s"),
        "{reason}"
    );
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    session.release().unwrap();
    assert_eq!(status(guest), FreezeStatus::Thawed);
    assert_eq!(
        take_order(guest),
        ["hang", "hook freeze", "hook thaw", "post"]
    );
    // The script and its `sleep` were killed, not left behind.
    let (found, ps) = guest_run(
        guest,
        "/bin/sh",
        &["-c", "ps | grep -v grep | grep -E 'hang.sh|sleep 997'"],
    );
    assert!(!found, "still running in the guest:\n{ps}");
}

fn a_failing_pre_script_fails_the_job_and_leaves_nothing_frozen(guest: &QgaGuest) {
    let opts = options(
        guest,
        "[pre]\npath = \"/mnt/fail.sh\"\nretries = 1\n[post]\npath = \"/mnt/post.sh\"\n",
    );
    let err = quiesce(&opts, helper()).err().expect("the job fails");
    assert!(matches!(err, QemuError::Script(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("fail.sh") && msg.contains("exit code 3: cannot reach the database"),
        "{msg}"
    );
    assert!(msg.contains("2 tries"), "{msg}");
    assert_eq!(status(guest), FreezeStatus::Thawed);
    // Never frozen; the post-script ran to undo what the pre-script may have done.
    assert_eq!(take_order(guest), ["post"]);
}

fn a_failing_post_script_fails_the_job_after_the_thaw(guest: &QgaGuest) {
    let opts = options(
        guest,
        "[pre]\npath = \"/mnt/pre.sh\"\n[post]\npath = \"/mnt/fail.sh\"\n",
    );
    let session = quiesce(&opts, helper()).unwrap();
    assert_eq!(session.state().level, Level::Application);
    let err = session.release().unwrap_err();
    assert!(
        err.to_string().contains("post-script /mnt/fail.sh failed"),
        "{err}"
    );
    assert_eq!(status(guest), FreezeStatus::Thawed);
    assert_eq!(take_order(guest), ["pre ", "hook freeze", "hook thaw"]);
}

fn skip_freeze_relies_on_the_pre_script(guest: &QgaGuest) {
    let opts = options(
        guest,
        "skip_freeze = true\n[pre]\npath = \"/mnt/pre.sh\"\n[post]\npath = \"/mnt/post.sh\"\n",
    );
    let session = quiesce(&opts, helper()).unwrap();
    assert_eq!(session.state().level, Level::Application);
    let released = session.release().unwrap();
    assert_eq!(released.frozen_for, Duration::ZERO);
    assert_eq!(take_order(guest), ["pre ", "post"]);
}

fn the_freeze_limit_thaws_without_a_release(guest: &QgaGuest) {
    let mut opts = QuiesceOptions::new(guest.qga_socket());
    opts.freeze_limit = Duration::from_millis(1500);
    let session = quiesce(&opts, helper()).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    let released = session.release().unwrap();
    assert!(released.thawed_early, "{released:?}");
    assert!(
        released.warnings[0].contains("freeze limit"),
        "{released:?}"
    );
    let f = released.frozen_for;
    assert!(
        f >= Duration::from_millis(1500) && f < Duration::from_millis(2900),
        "{f:?}"
    );
    assert_eq!(status(guest), FreezeStatus::Thawed);
    assert_eq!(take_order(guest), ["hook freeze", "hook thaw"]);
}

fn a_freeze_that_hangs_is_crash_level_and_still_thawed(guest: &QgaGuest) {
    guest_run(guest, "/bin/touch", &["/run/slow-freeze"]);
    let mut opts = QuiesceOptions::new(guest.qga_socket());
    opts.freeze_limit = Duration::from_secs(2);
    let t = Instant::now();
    let session = quiesce(&opts, helper()).unwrap();
    let state = session.state().clone();
    assert_eq!(state.level, Level::Crash, "{state:?}");
    let reason = state.reason.unwrap();
    assert!(
        reason.contains("freeze failed") && reason.contains("did not answer"),
        "{reason}"
    );
    let released = session.release().unwrap();
    eprintln!(
        "a freeze hanging 4 s with a 2 s limit: crash level after {:.1} s, {released:?}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(released.frozen_for, Duration::ZERO);
    assert_eq!(status(guest), FreezeStatus::Thawed);
    guest_run(guest, "/bin/rm", &["/run/slow-freeze"]);
    assert_eq!(take_order(guest), ["hook freeze", "hook thaw"]);
}

fn a_killed_vmvault_still_thaws(guest: &QgaGuest) {
    let mut parent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_entry", "--nocapture", "--quiet"])
        .env(ROLE, "parent")
        .env(PARENT_QGA, guest.qga_socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let line = lines
        .find_map(|l| l.ok().filter(|l| l.starts_with("QUIESCED ")))
        .expect("the parent quiesced");
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[1], "filesystem", "{line}");
    let helper_pid = words[2];
    parent.kill().unwrap(); // SIGKILL: no destructor, no cleanup in vmvault
    parent.wait().unwrap();
    let killed = Instant::now();
    // The helper alone holds the agent's socket; it thaws and exits (the freeze limit is 60 s).
    while helper_alive(helper_pid) {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the helper lives on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status(guest), FreezeStatus::Thawed);
    eprintln!(
        "vmvault killed while frozen: thawed and gone {:.0} ms later",
        killed.elapsed().as_secs_f64() * 1000.0
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(take_order(guest), ["hook freeze", "hook thaw"]);
}

/// Whether a process lives (a zombie awaiting its reaper counts as gone).
fn helper_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn no_agent_means_a_crash_consistent_point_quickly() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU accepts on the socket whether or not the guest runs an agent: so does this one.
    let socket = dir.path().join("qga.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(2).collect();
        std::thread::sleep(Duration::from_secs(8));
        drop(conns);
    });
    for path in [socket.clone(), dir.path().join("no-such.sock")] {
        let t = Instant::now();
        let session = quiesce(&QuiesceOptions::new(&path), helper()).unwrap();
        let took = t.elapsed();
        let state = session.state().clone();
        assert_eq!(state.level, Level::Crash, "{state:?}");
        assert!(state.reason.unwrap().contains("does not answer"));
        assert!(took < Duration::from_secs(5), "{took:?}");
        let released = session.release().unwrap();
        assert_eq!(released.frozen_for, Duration::ZERO);
    }
    // A pre-script that cannot run fails the job unless continue_on_failure says otherwise.
    let mut opts = QuiesceOptions::new(&socket);
    opts.scripts = Some(Scripts::parse("[pre]\npath = \"/x\"\n").unwrap());
    let err = quiesce(&opts, helper()).err().expect("the job fails");
    assert!(err.to_string().contains("could not run"), "{err}");
    held.join().unwrap();
}

#[test]
fn a_helper_that_breaks_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let opts = QuiesceOptions::new(dir.path().join("qga.sock"));
    let err = quiesce(&opts, Command::new("true"))
        .err()
        .expect("an error");
    assert!(matches!(err, QemuError::Helper(_)), "{err:?}");
    // `true` may exit before or after the options are written to it.
    let msg = err.to_string();
    assert!(
        msg.contains("exited without answering") || msg.contains("could not be written to"),
        "{msg}"
    );
    let err = quiesce(&opts, Command::new("/nonexistent/vmvault"))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("starting the quiesce helper"),
        "{err}"
    );
}
