//! Hosts for end-to-end tests of the host agent: a real QEMU VM per host (a qcow2 disk made
//! from a raw image the test keeps to compare restores with; or the guest-agent test guest),
//! and real `vmvault agent run` processes, each with its own state dir. A test includes this
//! file next to its `mod common` (`#[path]`); the server is
//! [`crate::common::server::Server`], which runs over TLS, as agents need.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmvault_qemu::Qmp;
use vmvault_testkit::QemuVm;

use crate::common::{qemu_img, Env, Rng};

/// A server configuration for agent tests, `extra` lines appended: heartbeats every second,
/// so that VMs show up (and a restarted agent is back) without waiting half a minute.
pub fn server_config(env: &Env, extra: &str) -> PathBuf {
    let path = env.path("server.toml");
    std::fs::write(&path, format!("agent_heartbeat_secs = 1\n{extra}")).unwrap();
    path
}

/// A running VM of a host: QEMU started with `-name`, a qcow2 disk `os` made from `raw`.
pub struct HostVm {
    pub qemu: QemuVm,
    /// The disk's content as it was made; the guest writes nothing (no OS boots).
    pub raw: PathBuf,
    pub qcow2: PathBuf,
}

/// `size` bytes of data in `dir/os.raw`: random (so a backup cannot compress it away) and
/// different per `seed`, with a zero MiB so that the zero path is taken too.
fn make_raw(dir: &Path, size: usize, seed: u64) -> PathBuf {
    let raw = dir.join("os.raw");
    let mut f = BufWriter::new(File::create(&raw).unwrap());
    let mut rng = Rng(seed);
    let mut mib = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        if i == 3 {
            f.write_all(&vec![0u8; 1 << 20]).unwrap();
            continue;
        }
        rng.fill(&mut mib);
        f.write_all(&mib).unwrap();
    }
    f.flush().unwrap();
    raw
}

impl HostVm {
    /// `None` (after a skip message) where QEMU is missing.
    pub fn start(dir: &Path, name: &str, size: usize, seed: u64) -> Option<HostVm> {
        std::fs::create_dir_all(dir).unwrap();
        let raw = make_raw(dir, size, seed);
        let qcow2 = dir.join("os.qcow2");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ]);
        let blockdev = format!(
            "driver=qcow2,node-name=drive0,file.driver=file,file.filename={}",
            qcow2.display()
        );
        let qemu = QemuVm::start(
            0,
            &[
                "-name",
                name,
                "-blockdev",
                &blockdev,
                "-device",
                "virtio-blk-pci,drive=drive0,id=os",
            ],
        )?;
        // Let go of the monitor at once: QEMU serves one QMP client, and the agent is it.
        let mut qmp = Qmp::connect(&qemu.qmp_socket()).unwrap();
        qmp.execute("cont", json!({})).unwrap();
        drop(qmp);
        Some(HostVm { qemu, raw, qcow2 })
    }

    pub fn qmp(&self) -> String {
        self.qemu.qmp_socket().display().to_string()
    }
}

/// The QEMU and the guest-agent test guest the testkit uses (`scripts/install-qemu`,
/// `scripts/make-qga-guest`); `None` after a skip message when either is missing.
fn guest_tools() -> Option<(PathBuf, Option<PathBuf>, PathBuf, PathBuf)> {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    let tools = home.join(".cache/vmvault/tools");
    let exe = std::env::var_os("VMVAULT_QEMU")
        .map(PathBuf::from)
        .into_iter()
        .chain([tools.join("qemu/root/usr/bin/qemu-system-x86_64")])
        .find(|p| p.is_file());
    let guest = tools.join("qga-guest");
    let (kernel, initrd) = (guest.join("vmlinuz"), guest.join("initrd.gz"));
    let mkfs = Path::new("/usr/sbin/mkfs.ext4").is_file() || Path::new("/sbin/mkfs.ext4").is_file();
    match exe {
        Some(exe) if kernel.is_file() && initrd.is_file() && mkfs => {
            let fw = exe
                .ancestors()
                .nth(4)
                .map(|d| d.join("fw"))
                .filter(|d| d.is_dir());
            Some((exe, fw, kernel, initrd))
        }
        _ if vmvault_testkit::servers_required() => panic!(
            "QEMU, the guest-agent test guest or mkfs.ext4 is missing: scripts/install-qemu, \
             scripts/make-qga-guest"
        ),
        _ => {
            eprintln!("skipped: QEMU or the guest-agent test guest is not installed");
            None
        }
    }
}

/// The guest-agent test guest (a tiny Linux with qemu-ga; the testkit's QgaGuest, which has
/// no `-name`) as a VM an agent finds: named, its guest agent's socket on its command line,
/// a data disk `data` (ext4 of `files`, at /mnt in the guest, where scripts go).
pub struct GuestVm {
    child: Child,
    pub dir: PathBuf,
}

impl GuestVm {
    pub fn start(dir: &Path, name: &str, files: &Path) -> Option<GuestVm> {
        let (exe, fw, kernel, initrd) = guest_tools()?;
        std::fs::create_dir_all(dir).unwrap();
        let disk = dir.join("data.img");
        File::create(&disk).unwrap().set_len(32 << 20).unwrap();
        let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap();
        let st = Command::new(mkfs)
            .args(["-q", "-F", "-d"])
            .arg(files)
            .arg(&disk)
            .status()
            .unwrap();
        assert!(st.success());
        let (qga, qmp) = (dir.join("qga.sock"), dir.join("qmp.sock"));
        let mut cmd = Command::new(exe);
        if let Some(fw) = fw {
            cmd.arg("-L").arg(fw);
        }
        cmd.args([
            "-name", name, "-accel", "tcg", "-machine", "q35", "-m", "512",
        ])
        .args(["-display", "none", "-nodefaults", "-serial"])
        .arg(format!("file:{}", dir.join("serial.log").display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet", "-blockdev"])
        .arg(format!("file,node-name=f0,filename={}", disk.display()))
        .args(["-blockdev", "raw,node-name=drive0,file=f0"])
        .args(["-device", "virtio-blk-pci,drive=drive0,id=data"])
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            qga.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::from(File::create(dir.join("qemu.log")).unwrap()));
        let vm = GuestVm {
            child: cmd.spawn().unwrap(),
            dir: dir.to_path_buf(),
        };
        // QEMU accepts the connection before the guest runs its agent: only a sync counts.
        let log = || std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
        wait_for("the guest agent's answer", 180, log, || {
            vmvault_qemu::qga::Qga::connect(&qga, Duration::from_secs(1)).is_ok()
        });
        Some(vm)
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `vmvault agent run`, its stderr in a file. Killed (SIGKILL) when dropped.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// The agent with state in `state`, finding only the VM at `qmp` (no process scan: the
    /// other tests' QEMUs are not its host's).
    pub fn start(env: &Env, state: &Path, qmp: &str) -> Agent {
        Agent::start_finding(env, state, &["--qmp-glob", qmp, "--no-process-scan"])
    }

    /// The agent finding VMs as `find` (its discovery flags) says.
    pub fn start_finding(env: &Env, state: &Path, find: &[&str]) -> Agent {
        // An empty configuration file: the machine's /etc/vmvault/agent.toml is not the test's.
        let config = env.path("agent.toml");
        if !config.exists() {
            std::fs::write(&config, "").unwrap();
        }
        let log = unique(state);
        let mut args = vec![
            "agent",
            "run",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(find);
        let mut cmd = env.command(&args);
        cmd.stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log).unwrap()));
        Agent {
            child: cmd.spawn().unwrap(),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; its exit status, which must come within `within`.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let until = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < until,
                "the agent did not stop within {within:?} of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A log file name no earlier agent of the same state dir used (a restarted agent keeps its
/// predecessor's log for the failure message).
fn unique(base: &Path) -> PathBuf {
    (0..)
        .map(|i| base.with_extension(format!("log{i}")))
        .find(|p| !p.exists())
        .unwrap()
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it holds; panics with `what` (and `why`, for the log) after
/// `secs`.
pub fn wait_for(what: &str, secs: u64, why: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not happen within {secs} s\n{}", why());
}

/// Whether two files hold the same bytes, read a MiB at a time (the disks are large).
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}
