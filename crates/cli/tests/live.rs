//! `restore --live` end to end: vmvault serves a recovery point's disk to a real QEMU (TCG, no
//! guest OS: SeaBIOS reads the disk it boots from), which runs on it at once and ends with a
//! local qcow2 that is the backed-up disk byte for byte.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Env;
use serde_json::json;
use vmvault_qemu::Qmp;
use vmvault_testkit::QemuVm;

#[test]
fn a_vm_runs_on_a_recovery_point_and_ends_on_a_local_disk() {
    let Some(mut vm) = QemuVm::start(1, &[]) else {
        return;
    };
    let env = Env::with_vault();
    let image = env.path("os.raw");
    common::make_image(&image, 24 << 20, 7);
    // A boot sector, so that the firmware reads the disk as soon as the VM runs.
    let mut data = std::fs::read(&image).unwrap();
    data[510] = 0x55;
    data[511] = 0xaa;
    std::fs::write(&image, &data).unwrap();
    let desc = common::write_vm(env.dir.path(), "web01.toml", "web01", &[("os", "os.raw")]);
    env.ok(&["backup", desc.to_str().unwrap()]);

    let target = env.path("restored.qcow2");
    let qmp = vm.qmp_socket();
    let o = env.ok(&[
        "restore",
        "web01@latest",
        "--disk",
        "os",
        "--to",
        target.to_str().unwrap(),
        "--live",
        "--qmp",
        qmp.to_str().unwrap(),
        "--bus",
        "rp1",
        "--json",
    ]);
    let r = o.json();
    let first = r["first_read_seconds"]
        .as_f64()
        .expect("the VM read its disk");
    assert!(first < r["seconds"].as_f64().unwrap(), "{r}");
    assert!(r["chunks_fetched"].as_u64().unwrap() > 0, "{r}");

    // The VM still runs, on the local disk alone.
    let mut q = Qmp::connect(&qmp).unwrap();
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["running"],
        true
    );
    q.execute("quit", json!({})).unwrap();
    assert!(vm.wait_exit(Duration::from_secs(20)));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&target)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&target)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}
