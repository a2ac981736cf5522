//! A tiny Linux guest running the QEMU guest agent, for the quiesce tests
//! (`../shared/TESTBED.md`, recipe D): Debian's kernel and an initramfs with busybox and
//! `qemu-ga`, built once by `scripts/make-qga-guest` into `~/.cache/vmvault/tools/qga-guest`,
//! booted under TCG (~9 s to an answering agent) with a data disk made from a folder
//! (`mkfs.ext4 -d`), mounted at `/mnt` in the guest: the test's scripts and fsfreeze hooks go
//! there (`fsfreeze-hook.d/*` run on every freeze and thaw).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Process;
use crate::qemu::QemuVm;
use crate::{home, missing};

/// How long the guest may take to boot to an answering agent (9 s measured under TCG; the
/// machine is shared).
const BOOT: Duration = Duration::from_secs(90);

/// Writes an executable shell script `name` with `body` into `dir` (the guest's data disk
/// folder: it shows up at `/mnt/NAME` in the guest).
pub fn write_script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("writing a guest script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
        .expect("making a guest script executable");
}

pub struct QgaGuest {
    process: Process,
    dir: tempfile::TempDir,
}

impl QgaGuest {
    /// The kernel and initramfs, built by `scripts/make-qga-guest` when not there yet.
    fn guest_files() -> Option<(PathBuf, PathBuf)> {
        let dir = home().join(".cache/vmvault/tools/qga-guest");
        let files = (dir.join("vmlinuz"), dir.join("initrd.gz"));
        if files.0.is_file() && files.1.is_file() {
            return Some(files);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-qga-guest");
        let built = Command::new(&script)
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if built && files.0.is_file() && files.1.is_file() {
            return Some(files);
        }
        missing("the guest-agent test guest", "scripts/make-qga-guest")
    }

    /// Boots the guest with a data disk holding `data`'s files (ext4), waits for its agent.
    /// `None` after a skip message when QEMU, the guest or `mkfs.ext4` is missing.
    pub fn start(data: &Path) -> Option<QgaGuest> {
        let (exe, fw) =
            QemuVm::exe().or_else(|| missing("qemu-system-x86_64", "scripts/install-qemu"))?;
        let (kernel, initrd) = Self::guest_files()?;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let disk = dir.path().join("data.img");
        if !make_data_disk(data, &disk)? {
            panic!("mkfs.ext4 -d {} failed", data.display());
        }
        let qga = dir.path().join("qga.sock");
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(exe);
        if let Some(fw) = fw {
            cmd.arg("-L").arg(fw);
        }
        cmd.args([
            "-accel", "tcg", "-machine", "q35", "-m", "512", "-display", "none",
        ])
        .args(["-nodefaults", "-serial"])
        .arg(format!("file:{}", dir.path().join("serial.log").display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet"])
        .arg("-blockdev")
        .arg(format!("file,node-name=f0,filename={}", disk.display()))
        .args(["-blockdev", "raw,node-name=drive0,file=f0"])
        .args(["-device", "virtio-blk-pci,drive=drive0"])
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
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        let mut process = Process::spawn("qemu", cmd, dir.path());
        let started = Instant::now();
        process.wait_until("the guest agent", BOOT, || agent_answers(&qga));
        eprintln!(
            "the guest agent answered {:.1} s after QEMU started",
            started.elapsed().as_secs_f64()
        );
        Some(QgaGuest { process, dir })
    }

    /// The guest agent's socket (one client at a time).
    pub fn qga_socket(&self) -> PathBuf {
        self.dir.path().join("qga.sock")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// QEMU's output and the guest's console.
    pub fn log(&self) -> String {
        let serial =
            std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default();
        format!("{}\n--- guest console:\n{serial}", self.process.log())
    }
}

/// `mkfs.ext4 -d DIR` into a 32 MiB image; `None` (a skip) when the tool is missing.
fn make_data_disk(data: &Path, disk: &Path) -> Option<bool> {
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    let Some(mkfs) = mkfs else {
        return missing("mkfs.ext4", "apt-get install e2fsprogs");
    };
    let file = std::fs::File::create(disk).expect("creating the data disk");
    file.set_len(32 << 20).expect("sizing the data disk");
    let status = Command::new(mkfs)
        .args(["-q", "-F", "-d"])
        .arg(data)
        .arg(disk)
        .status();
    Some(status.is_ok_and(|s| s.success()))
}

/// Whether an agent answers `guest-sync-delimited` on `socket` within a second. QEMU accepts
/// the connection before the guest's agent runs, so only an answer counts.
fn agent_answers(socket: &Path) -> Result<(), String> {
    let stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    writer
        .write_all(b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}\n")
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut skipped = Vec::new();
    reader
        .read_until(0xFF, &mut skipped)
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.contains("4242") {
        Ok(())
    } else {
        Err(format!("unexpected answer {line:?}"))
    }
}
