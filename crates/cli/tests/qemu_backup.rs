//! `vmvault backup --qmp` end to end against a real QEMU (TCG, no guest OS; the guest's writes
//! go through QEMU's `qemu-io` on the guest's device, from a second monitor): a running VM's
//! point, its consistency in `points`, a restore in the source format, a backup killed in the
//! middle followed by a correct incremental, and the same VM backed up while stopped.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use serde_json::json;
use vmvault_qemu::Qmp;
use vmvault_testkit::QemuVm;

const SIZE: u64 = 96 << 20;

fn start_vm(env: &Env) -> Option<QemuVm> {
    let os = format!(
        "driver=qcow2,node-name=drive0,file.driver=file,file.filename={}",
        env.path("os.qcow2").display()
    );
    let second = format!("unix:{},server=on,wait=off", env.path("mon.sock").display());
    let _ = std::fs::remove_file(env.path("mon.sock"));
    let vm = QemuVm::start(
        0,
        &[
            "-name",
            "web01",
            "-blockdev",
            &os,
            "-device",
            "virtio-blk-pci,drive=drive0,id=vblk0",
            "-qmp",
            &second,
        ],
    )?;
    Qmp::connect(&vm.qmp_socket())
        .unwrap()
        .execute("cont", json!({}))
        .unwrap();
    Some(vm)
}

fn monitor(env: &Env) -> Qmp {
    Qmp::connect(&env.path("mon.sock")).unwrap()
}

fn guest_write(env: &Env, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("qemu-io -d vblk0/virtio-backend \"write -P {pattern:#x} {offset} {len}\"");
    let out = monitor(env)
        .execute("human-monitor-command", json!({ "command-line": cmd }))
        .unwrap();
    assert!(!out.to_string().contains("error"), "{out}");
}

/// Writes QEMU's cached qcow2 metadata out, so that another reader sees what the guest wrote.
fn flush(env: &Env) {
    let cmd = "qemu-io -d vblk0/virtio-backend flush";
    monitor(env)
        .execute("human-monitor-command", json!({ "command-line": cmd }))
        .unwrap();
}

/// `qemu-img compare` of two images (`-U`: the VM still has one open).
fn same_disk(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-q"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

fn restore(env: &Env, point: &str, to: &str) -> std::path::PathBuf {
    let out = env.path(to);
    env.ok(&[
        "restore",
        point,
        "--disk",
        "vblk0",
        "--to",
        out.to_str().unwrap(),
        "--force",
    ]);
    out
}

#[test]
fn a_running_vm_is_backed_up_killed_mid_backup_and_backed_up_stopped() {
    let env = Env::with_vault();
    common::make_image(&env.path("os.raw"), SIZE, 11);
    let st = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(env.path("os.raw"))
        .arg(env.path("os.qcow2"))
        .status()
        .unwrap();
    assert!(st.success());
    let Some(mut vm) = start_vm(&env) else { return };
    let qmp = vm.qmp_socket();
    let qmp = qmp.to_str().unwrap();

    let first = env.ok(&["backup", "--qmp", qmp, "--json"]).json();
    assert_eq!(first["vm"], "web01");
    assert_eq!(first["consistency"], "crash");
    assert!(first["consistency_reason"]
        .as_str()
        .unwrap()
        .contains("no guest agent"));
    let points = env.ok(&["points"]);
    assert!(points.stdout.contains("crash"), "{}", points.stdout);
    assert!(
        points.stderr.contains("crash-consistent: no guest agent"),
        "{}",
        points.stderr
    );
    let restored = restore(&env, "web01@latest", "first.qcow2");
    let kind = Command::new("qemu-img")
        .arg("info")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&kind.stdout).contains("file format: qcow2"),
        "restored in the source format"
    );
    flush(&env);
    assert!(same_disk(&restored, &env.path("os.qcow2")));

    // A backup killed once QEMU holds its instant and exports it.
    guest_write(&env, 0xab, 3 << 20, 64 << 10);
    let mut child = env
        .command(&["backup", "--qmp", qmp])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let exports = monitor(&env)
            .execute("query-block-exports", json!({}))
            .unwrap();
        if exports.as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before it was killed"
        );
        assert!(Instant::now() < deadline, "QEMU never exported the instant");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    guest_write(&env, 0xcd, 40 << 20, 64 << 10);

    // The next backup clears what the killed one left, and reads every change since the
    // first point: both writes, before and after the kill.
    let o = env.ok(&["backup", "--qmp", qmp, "--json"]);
    assert!(
        o.stderr.contains("leftovers of a backup that did not end"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("reading only what changed"),
        "{}",
        o.stderr
    );
    let second = o.json();
    let read = second["stats"]["bytes_read"].as_u64().unwrap();
    assert!(
        read <= 4 * (64 << 10) as u64,
        "read {read} bytes for two 64 KiB writes"
    );
    let restored = restore(&env, "web01@latest", "second.qcow2");
    flush(&env);
    assert!(same_disk(&restored, &env.path("os.qcow2")));

    // Stopped: the same command backs it up from the image files the last point names.
    guest_write(&env, 0xef, 80 << 20, 4096);
    monitor(&env).execute("quit", json!({})).unwrap();
    assert!(vm.wait_exit(Duration::from_secs(20)));
    let o = env.run(&["backup", "--qmp", qmp, "--json"]);
    assert_eq!(o.code, 2, "no name for a stopped VM: {}", o.stderr);
    assert!(o.stderr.contains("--name"), "{}", o.stderr);
    let o = env.ok(&["backup", "--qmp", qmp, "--name", "web01", "--json"]);
    assert!(o.stderr.contains("is not running"), "{}", o.stderr);
    let third = o.json();
    assert_eq!(third["consistency"], "crash");
    assert!(third["consistency_reason"]
        .as_str()
        .unwrap()
        .contains("stopped"));
    assert!(
        third["stats"]["bytes_read"].as_u64().unwrap() <= 64 << 10,
        "{third} {}",
        o.stderr
    );
    let restored = restore(&env, "web01@latest", "third.qcow2");
    assert!(same_disk(&restored, &env.path("os.qcow2")));
}

#[test]
fn a_qemu_description_backs_up_a_stopped_vm_from_the_disks_it_lists() {
    let env = Env::with_vault();
    common::make_image(&env.path("os.raw"), 8 << 20, 12);
    let desc = env.path("web02.toml");
    std::fs::write(
        &desc,
        "name = \"web02\"\nsource = \"qemu\"\nqmp = \"gone.sock\"\n\
         [[disks]]\nname = \"os\"\npath = \"os.raw\"\n",
    )
    .unwrap();
    let o = env.ok(&["backup", desc.to_str().unwrap(), "--json"]);
    assert!(o.stderr.contains("is not running"), "{}", o.stderr);
    let point = o.json();
    assert_eq!(point["vm"], "web02");
    assert!(point["consistency_reason"]
        .as_str()
        .unwrap()
        .contains("stopped"));
    let out = env.path("os.out");
    env.ok(&[
        "restore",
        "web02@latest",
        "--disk",
        "os",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(common::same_bytes(&out, &env.path("os.raw")));

    // A QMP path that is not a socket, and an image description given --qmp, are refused.
    std::fs::write(env.path("not-a-socket"), "x").unwrap();
    let o = env.run(&[
        "backup",
        "--qmp",
        env.path("not-a-socket").to_str().unwrap(),
    ]);
    common::assert_error(&o, 2, &["backup"]);
    assert!(o.stderr.contains("is not a socket"), "{}", o.stderr);
    let image = common::write_vm(env.dir.path(), "img.toml", "img", &[("os", "os.raw")]);
    let o = env.run(&["backup", image.to_str().unwrap(), "--qmp", "x.sock"]);
    common::assert_error(&o, 2, &["backup"]);
    assert!(o.stderr.contains("source = \"image\""), "{}", o.stderr);
}
