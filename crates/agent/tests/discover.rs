//! Discovery against real QEMU processes (TCG, paused, no guest OS): by a socket glob, from the
//! process table, through a process's working directory, and the sockets it must skip (gone,
//! nameless, held by another client) without waiting longer than its timeout.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmvault_agent::discover::{discover, DiscoverConfig, Discovery};
use vmvault_api::agent::{FoundDisk, FoundVm};
use vmvault_qemu::Qmp;
use vmvault_testkit::QemuVm;

const SIZE: u64 = 64 << 20;

fn qcow2(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(SIZE.to_string())
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A paused VM with one qcow2 disk whose device id is `os`, plus `extra` arguments.
fn vm_with_disk(image: &Path, extra: &[&str]) -> Option<QemuVm> {
    qcow2(image);
    let os = format!(
        "driver=qcow2,node-name=drive0,file.driver=file,file.filename={}",
        image.display()
    );
    let mut args = vec![
        "-blockdev",
        &os,
        "-device",
        "virtio-blk-pci,drive=drive0,id=os",
    ];
    args.extend_from_slice(extra);
    QemuVm::start(0, &args)
}

fn glob_only(globs: Vec<String>, timeout: Duration) -> DiscoverConfig {
    DiscoverConfig {
        qmp_globs: globs,
        scan_processes: false,
        timeout,
        ..DiscoverConfig::default()
    }
}

fn canonical(p: &Path) -> String {
    p.canonicalize().unwrap().to_str().unwrap().to_string()
}

fn the_disk(image: &Path) -> Vec<FoundDisk> {
    vec![FoundDisk {
        name: "os".into(),
        file: Some(image.display().to_string()),
        format: "qcow2".into(),
        size: SIZE,
    }]
}

fn reason_for<'a>(d: &'a Discovery, what: &str) -> &'a str {
    d.skipped
        .iter()
        .find(|(w, _)| w == what)
        .map(|(_, why)| why.as_str())
        .unwrap_or_else(|| panic!("{what} is not among the skipped: {:?}", d.skipped))
}

#[test]
fn a_vm_is_found_by_its_qmp_socket_glob() {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("os.qcow2");
    let Some(vm) = vm_with_disk(&image, &["-name", "web01"]) else {
        return;
    };
    let glob = format!("{}/*.sock", vm.dir().display());
    let d = discover(&glob_only(vec![glob], Duration::from_secs(2)));
    assert_eq!(
        d.vms,
        vec![FoundVm {
            name: "web01".into(),
            kind: "qemu".into(),
            state: "paused".into(),
            qmp: Some(canonical(&vm.qmp_socket())),
            qga: None,
            disks: the_disk(&image),
        }],
        "skipped: {:?}",
        d.skipped
    );
    assert!(d.skipped.is_empty(), "{:?}", d.skipped);
}

#[test]
fn a_vm_is_found_from_its_process_command_line() {
    let t = tempfile::tempdir().unwrap();
    let image = t.path().join("os.qcow2");
    let qga = t.path().join("qga.sock");
    let chardev = format!("socket,id=qga0,path={},server=on,wait=off", qga.display());
    // Unique on the host: other tests' QEMUs may be running, and a name is reported once.
    let name = format!("discover-proc-{}", std::process::id());
    let extra = [
        "-name",
        &format!("guest={name},debug-threads=on"),
        "-chardev",
        &chardev,
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ];
    let Some(vm) = vm_with_disk(&image, &extra) else {
        return;
    };
    let cfg = DiscoverConfig {
        qmp_globs: vec![],
        scan_processes: true,
        ..DiscoverConfig::default()
    };
    let d = discover(&cfg);
    let qmp = canonical(&vm.qmp_socket());
    let ours: Vec<&FoundVm> = d
        .vms
        .iter()
        .filter(|v| v.qmp.as_deref() == Some(&qmp))
        .collect();
    assert_eq!(ours.len(), 1, "vms: {:?}\nskipped: {:?}", d.vms, d.skipped);
    let v = ours[0];
    assert_eq!(v.name, name);
    assert_eq!(v.state, "paused");
    assert_eq!(v.qga.as_deref(), Some(canonical(&qga).as_str()));
    assert_eq!(v.disks, the_disk(&image));
    let mut names: Vec<&str> = d.vms.iter().map(|v| v.name.as_str()).collect();
    assert!(names.is_sorted(), "{names:?}");
    names.dedup();
    assert_eq!(names.len(), d.vms.len(), "a name is reported once");
}

#[test]
fn a_dead_or_nameless_socket_is_skipped_with_a_reason() {
    let t = tempfile::tempdir().unwrap();
    let dead = t.path().join("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let image = t.path().join("os.qcow2");
    let Some(vm) = vm_with_disk(&image, &[]) else {
        return;
    };
    let globs = vec![
        format!("{}/*.sock", t.path().display()),
        format!("{}/qmp.s?ck", vm.dir().display()),
    ];
    let start = Instant::now();
    let d = discover(&glob_only(globs, Duration::from_secs(2)));
    let took = start.elapsed();
    assert!(d.vms.is_empty(), "{:?}", d.vms);
    assert_eq!(d.skipped.len(), 2, "{:?}", d.skipped);
    let why = reason_for(&d, &canonical(&dead));
    assert!(why.contains("connection refused"), "{why}");
    let why = reason_for(&d, &canonical(&vm.qmp_socket()));
    assert_eq!(why, "QEMU was started without -name");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_socket_another_client_holds_is_given_up_after_the_timeout() {
    let t = tempfile::tempdir().unwrap();
    let Some(vm) = vm_with_disk(&t.path().join("os.qcow2"), &["-name", "busy01"]) else {
        return;
    };
    let glob = vec![vm.qmp_socket().display().to_string()];
    let holder = Qmp::connect(&vm.qmp_socket()).unwrap();
    let start = Instant::now();
    let d = discover(&glob_only(glob.clone(), Duration::from_secs(1)));
    let took = start.elapsed();
    assert!(d.vms.is_empty(), "{:?}", d.vms);
    let why = reason_for(&d, &canonical(&vm.qmp_socket()));
    assert!(why.contains("no answer within 1s"), "{why}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // Let go, it answers again: the given-up attempt did not keep the monitor.
    drop(holder);
    let d = discover(&glob_only(glob, Duration::from_secs(10)));
    let names: Vec<&str> = d.vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["busy01"], "{:?}", d.skipped);
}

#[test]
fn a_relative_socket_path_is_resolved_against_the_process_cwd() {
    let t = tempfile::tempdir().unwrap();
    let Some(vm) = vm_with_disk(&t.path().join("os.qcow2"), &[]) else {
        return;
    };
    // A process table with one QEMU, started in the VM's folder with a relative socket and a
    // -name that the real QEMU lacks: the name comes from the command line.
    let proc_root: PathBuf = t.path().join("proc");
    let pid = proc_root.join("4242");
    std::fs::create_dir_all(&pid).unwrap();
    let argv = [
        "/usr/bin/qemu-system-x86_64",
        "-S",
        "--qmp",
        "unix:qmp.sock,server,nowait",
        "-name",
        "guest=fromproc,debug-threads=on",
    ];
    std::fs::write(pid.join("cmdline"), argv.join("\0") + "\0").unwrap();
    std::os::unix::fs::symlink(vm.dir(), pid.join("cwd")).unwrap();
    let cfg = DiscoverConfig {
        qmp_globs: vec![],
        scan_processes: true,
        proc_root,
        timeout: Duration::from_secs(2),
    };
    let d = discover(&cfg);
    let found: Vec<(&str, Option<&str>)> = d
        .vms
        .iter()
        .map(|v| (v.name.as_str(), v.qmp.as_deref()))
        .collect();
    let qmp = canonical(&vm.qmp_socket());
    assert_eq!(found, [("fromproc", Some(qmp.as_str()))], "{:?}", d.skipped);
}
