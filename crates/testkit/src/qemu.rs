//! A QEMU virtual machine for tests: q35 under TCG (nested KVM runs guest code unusably slowly
//! here), paused at start (`-S`), with a QMP socket and free PCIe root ports to plug disks
//! into. No guest OS: SeaBIOS boots and reads whatever disk it is given, which is enough for
//! block-layer tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Process;
use crate::{find_tool, home, missing, STARTUP};

pub struct QemuVm {
    process: Process,
    dir: tempfile::TempDir,
}

impl QemuVm {
    /// `VMVAULT_QEMU`, else what `scripts/install-qemu` unpacked, else `PATH`; with its
    /// firmware folder.
    pub(crate) fn exe() -> Option<(PathBuf, Option<PathBuf>)> {
        let installed = home().join(".cache/vmvault/tools/qemu");
        let mut candidates: Vec<PathBuf> = std::env::var_os("VMVAULT_QEMU")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.push(installed.join("root/usr/bin/qemu-system-x86_64"));
        let exe = find_tool("qemu-system-x86_64", &candidates)?;
        let fw = exe
            .ancestors()
            .nth(4)
            .map(|d| d.join("fw"))
            .filter(|d| d.is_dir());
        Some((exe, fw))
    }

    /// A paused VM with `ports` free root ports named `rp1`..; `extra` arguments appended.
    pub fn start(ports: usize, extra: &[&str]) -> Option<QemuVm> {
        let Some((exe, fw)) = Self::exe() else {
            return missing("qemu-system-x86_64", "scripts/install-qemu");
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(exe);
        if let Some(fw) = fw {
            cmd.arg("-L").arg(fw);
        }
        cmd.args([
            "-accel", "tcg", "-machine", "q35", "-m", "128", "-display", "none",
        ])
        .args(["-S", "-nodefaults", "-serial", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        for i in 1..=ports {
            cmd.arg("-device")
                .arg(format!("pcie-root-port,id=rp{i},bus=pcie.0,chassis={i}"));
        }
        cmd.args(extra);
        let mut process = Process::spawn("qemu", cmd, dir.path());
        process.wait_until("the QMP socket", STARTUP, || {
            std::os::unix::net::UnixStream::connect(&qmp)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Some(QemuVm { process, dir })
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// A folder that lives as long as the VM.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits for QEMU to exit by itself (after a QMP `quit`); whether it did in `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        self.process.wait_exit(timeout)
    }
}
