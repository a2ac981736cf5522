//! The QEMU side of live restore against a real QEMU (TCG, no guest OS: SeaBIOS reads the
//! disk it boots from). `qemu-nbd` stands in for vmvault's own export here; the CLI tests run
//! the whole `restore --live` with vmvault serving.

use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;
use vmvault_qemu::{live, Qmp};
use vmvault_testkit::QemuVm;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn image(path: &std::path::Path, size: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut data: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // A hole, and a boot sector SeaBIOS will read.
    data[size / 2..size / 2 + (1 << 20)].fill(0);
    data[510] = 0x55;
    data[511] = 0xaa;
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn qmp_answers_commands_and_keeps_events() {
    let Some(vm) = QemuVm::start(0, &[]) else {
        return;
    };
    let mut qmp = Qmp::connect(&vm.qmp_socket()).unwrap();
    assert!(qmp.version().0 >= 7);
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], false, "started paused");
    let err = qmp.execute("no-such-command", json!({})).unwrap_err();
    assert!(err.to_string().contains("no-such-command"), "{err}");
    qmp.execute("cont", json!({})).unwrap();
    let resumed = qmp
        .wait_event("RESUME", Duration::from_secs(10), |_| true)
        .unwrap();
    assert_eq!(resumed.name, "RESUME");
    qmp.execute("quit", json!({})).unwrap();
}

#[test]
fn a_vm_starts_on_the_export_and_ends_on_a_local_disk() {
    let Some(mut vm) = QemuVm::start(1, &[]) else {
        return;
    };
    let dir = vm.dir().to_path_buf();
    let source = dir.join("source.raw");
    let want = image(&source, 8 << 20);
    let socket = dir.join("nbd.sock");
    let _nbd = Killed(
        Command::new("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=4",
                "--format=raw",
                "--export-name=os",
            ])
            .arg(format!("--socket={}", socket.display()))
            .arg(&source)
            .spawn()
            .unwrap(),
    );
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let overlay = dir.join("os.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&overlay)
        .arg((8u64 << 20).to_string())
        .status()
        .unwrap();
    assert!(made.success());

    let mut qmp = Qmp::connect(&vm.qmp_socket()).unwrap();
    let plan = live::Plan {
        nbd_socket: socket.clone(),
        export: "os".into(),
        overlay: overlay.clone(),
        device: "vd0".into(),
        bus: Some("rp1".into()),
    };
    live::attach(&mut qmp, &plan).unwrap();
    assert!(live::start_if_paused(&mut qmp).unwrap());
    // The guest writes while the copy runs: its write lands in the overlay and survives.
    qmp.execute(
        "human-monitor-command",
        json!({"command-line": "qemu-io -d vd0/virtio-backend \"write -P 0xcd 1M 64k\""}),
    )
    .unwrap();
    let mut seen = Vec::new();
    live::stream(&mut qmp, &plan, &mut |done, total| seen.push((done, total))).unwrap();
    assert_eq!(seen.last().map(|p| p.0), Some(8 << 20), "{seen:?}");
    assert_eq!(
        live::overlay_backing(&mut qmp, &plan).unwrap(),
        None,
        "stands alone"
    );
    qmp.execute("quit", json!({})).unwrap();
    assert!(vm.wait_exit(Duration::from_secs(20)));

    // The overlay alone is the source with the guest's write, byte for byte.
    let out = dir.join("out.raw");
    let converted = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&overlay)
        .arg(&out)
        .status()
        .unwrap();
    assert!(converted.success());
    let mut expected = want;
    expected[1 << 20..(1 << 20) + (64 << 10)].fill(0xcd);
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "restored disk differs"
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
}
