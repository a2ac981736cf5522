//! A server process: its own process group, output to a log file, killed on drop.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process_group, Pid, Signal};

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

pub(crate) struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `cmd` in a new process group, stdout and stderr appended to `DIR/NAME.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("{name}: opening {}: {e}", log.display()));
        let err = out.try_clone().expect("a second handle on the log");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: starting {:?}: {e}", cmd.get_program()));
        Process {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with `msg` and the log's last lines.
    pub fn fail(&self, msg: &str) -> ! {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        panic!(
            "{}: {msg}\n--- last lines of {}:\n{tail}",
            self.name,
            self.log.display()
        );
    }

    /// Waits until the process accepts connections on `port`; fails if it exits first or
    /// `timeout` passes.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                self.fail(&format!("exited during startup ({status})"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!("not listening on port {port} after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Retries `probe` until it returns `Ok`, failing with its last error after `timeout`.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                self.fail(&format!("exited while waiting for {what} ({status})"));
            }
            match probe() {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => {
                    self.fail(&format!("{what}: not ready after {timeout:?}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits up to `timeout` for the process to end by itself; whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// How the process ended, if it has.
    fn exited(&mut self) -> Option<String> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// Kills the process and everything it started, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group's id is the child's own (process_group(0)).
            let _ = kill_process_group(Pid::from_child(&child), Signal::KILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
