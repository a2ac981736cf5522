//! A small, typed client for the QEMU guest agent (`qemu-ga`), over the unix socket QEMU
//! exposes for the guest's `org.qemu.guest_agent.0` port
//! (`-chardev socket,path=qga.sock,server=on,wait=off`).
//!
//! Unlike QMP there is no greeting and no command id: a reply is simply the next line. A
//! previous client may have left a half-sent command in the agent's parser or an unread reply
//! in the channel, so every connection starts with `guest-sync-delimited`: a 0xFF byte (the
//! agent resets its parser on it), then the command with a fresh id; the agent answers with a
//! 0xFF byte before the reply, and everything before that marker (and replies with another id)
//! is stale and dropped. After a read times out the channel is in an unknown state again, so
//! the next command resyncs first. QEMU accepts one client on the socket at a time.
//!
//! Every read has a deadline: an agent that is not running (the socket still accepts), hangs,
//! or a guest that stopped is an error, never a hang.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{QemuError, Result};

/// How long a command may take to answer by default (`guest-fsfreeze-freeze` flushes every
/// file system; callers shorten it where they have a tighter bound).
/// The longest reply line taken from a guest agent: `guest-exec-status` carries up to 16 MiB
/// of a script's output, base64-encoded.
const MAX_LINE: u64 = 32 << 20;

pub const QGA_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the first sync may take: an agent that is running answers in milliseconds.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

/// Kills process `$1` and its descendants in a Linux guest: stopped first so that it starts
/// no more children, then its children (found through /proc with one `grep`: `pkill -P` is
/// missing from minimal guests such as busybox ones), then itself.
const KILL_TREE: &str = r#"t() {
  kill -STOP "$1" 2>/dev/null
  for s in $(grep -l "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null); do
    c=${s#/proc/}
    t "${c%/status}"
  done
  kill -KILL "$1" 2>/dev/null
}
t "$1""#;

/// How long to wait for the kill of a script that timed out to be done.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What `guest-fsfreeze-status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// The guest's operating system, from `guest-get-osinfo` (fields the guest left out are empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// e.g. `mswindows`, `debian`, `rhel`; empty when the guest has no os-release.
    pub id: String,
    pub name: String,
    pub kernel_release: String,
}

impl OsInfo {
    /// Windows guests freeze through VSS, which also asks applications to quiesce.
    pub fn is_windows(&self) -> bool {
        self.id == "mswindows"
    }
}

/// How a `guest-exec` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code, when the process exited by itself.
    pub exit_code: Option<i64>,
    /// The signal that ended it (Linux guests).
    pub signal: Option<i64>,
    /// Whether it was still running when the timeout passed (it was then killed, if possible).
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// "exit code 3", "killed by signal 9", "timed out after 30 s", with stderr's last line.
    pub fn describe(&self, timeout: Duration) -> String {
        let how = if self.timed_out {
            format!("timed out after {} s", timeout.as_secs_f64())
        } else if let Some(code) = self.exit_code {
            format!("exit code {code}")
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            "ended without an exit code".to_string()
        };
        let err = String::from_utf8_lossy(&self.stderr);
        match err.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) => format!("{how}: {}", line.trim()),
            None => how,
        }
    }
}

pub struct Qga {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    /// Whether the channel may hold a stale reply (after a timeout): resync before the next
    /// command.
    dirty: bool,
    next_sync: u64,
}

impl Qga {
    /// Connects and syncs within `sync_timeout`; [`QemuError::AgentTimeout`] when no agent
    /// answers (QEMU accepts the connection whether or not the guest runs one).
    pub fn connect(path: &Path, sync_timeout: Duration) -> Result<Qga> {
        let stream = UnixStream::connect(path).map_err(|e| QemuError::Io {
            context: format!("connecting to the guest agent socket {}", path.display()),
            source: e,
        })?;
        let writer = stream.try_clone().map_err(|e| QemuError::Io {
            context: "cloning the guest agent socket".into(),
            source: e,
        })?;
        writer
            .set_write_timeout(Some(sync_timeout.max(Duration::from_secs(1))))
            .map_err(|e| QemuError::Io {
                context: "setting the guest agent write timeout".into(),
                source: e,
            })?;
        // A per-process, per-time seed: ids of an earlier client's syncs must not match ours.
        let seed = std::process::id() as u64 * 1_000_003
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let mut qga = Qga {
            reader: BufReader::new(stream),
            writer,
            timeout: QGA_TIMEOUT,
            dirty: true,
            next_sync: seed % 1_000_000_000,
        };
        qga.sync(sync_timeout)?;
        Ok(qga)
    }

    /// How long each command may take from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `guest-sync-delimited`: drops whatever stale bytes and replies are in the channel and
    /// checks that the agent answers.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let id = self.next_sync;
        self.next_sync += 1;
        let mut msg = vec![0xFF];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.send(&msg, "guest-sync-delimited")?;
        let deadline = Instant::now() + timeout;
        loop {
            // Skip to the marker, then read the reply after it; a reply to an older sync
            // (another id) is stale: look for the next marker.
            let mut skipped = Vec::new();
            self.read(deadline, |r| {
                std::io::Read::take(&mut *r, MAX_LINE).read_until(0xFF, &mut skipped)
            })?;
            if skipped.last() != Some(&0xFF) {
                self.dirty = true;
                return Err(QemuError::GuestAgent(format!(
                    "the guest agent sent {} MiB without answering the sync",
                    MAX_LINE >> 20
                )));
            }
            let line = self.read_line(deadline)?;
            if line.get("return").and_then(Value::as_u64) == Some(id) {
                self.dirty = false;
                return Ok(());
            }
        }
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", json!({})).map(drop)
    }

    /// `guest-info`: the agent's version and its commands.
    pub fn info(&mut self) -> Result<Value> {
        self.execute("guest-info", json!({}))
    }

    /// `guest-get-osinfo`.
    pub fn osinfo(&mut self) -> Result<OsInfo> {
        let v = self.execute("guest-get-osinfo", json!({}))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(OsInfo {
            id: s("id"),
            name: s("pretty-name"),
            kernel_release: s("kernel-release"),
        })
    }

    /// `guest-fsfreeze-freeze` (fsfreeze on Linux, VSS on Windows): how many file systems the
    /// agent froze.
    pub fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze", json!({}))?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`: how many file systems the agent thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw", json!({}))?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-status`.
    pub fn fsfreeze_status(&mut self) -> Result<FreezeStatus> {
        match self.execute("guest-fsfreeze-status", json!({}))?.as_str() {
            Some("thawed") => Ok(FreezeStatus::Thawed),
            Some("frozen") => Ok(FreezeStatus::Frozen),
            other => Err(QemuError::GuestAgent(format!(
                "guest-fsfreeze-status answered {other:?}"
            ))),
        }
    }

    /// `guest-exec` of `path` with `args`, output captured, then `guest-exec-status` polled
    /// until it ends or `timeout` passes. A process still running then is killed when the
    /// guest allows (`kill` of its children and itself on Linux, `taskkill /T` on Windows)
    /// and the result says it timed out.
    pub fn exec(
        &mut self,
        path: &str,
        args: &[String],
        timeout: Duration,
        windows: bool,
    ) -> Result<ExecResult> {
        let started = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
        )?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| QemuError::GuestAgent(format!("guest-exec answered {started}")))?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            let status = self.execute("guest-exec-status", json!({"pid": pid}))?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                return Ok(ExecResult {
                    exit_code: status.get("exitcode").and_then(Value::as_i64),
                    signal: status.get("signal").and_then(Value::as_i64),
                    timed_out: false,
                    stdout: decode(&status, "out-data")?,
                    stderr: decode(&status, "err-data")?,
                });
            }
            if Instant::now() >= deadline {
                // Best effort: the timeout is reported whether or not the kill works.
                let _ = self.kill(pid, windows);
                return Ok(ExecResult {
                    exit_code: None,
                    signal: None,
                    timed_out: true,
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                });
            }
            // Quick scripts end in milliseconds: poll fast at first, then back off.
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Kills a process `guest-exec` started, and its descendants (a script's `sleep` would
    /// otherwise live on), with a second `guest-exec`: the agent has no kill command.
    fn kill(&mut self, pid: i64, windows: bool) -> Result<()> {
        let pid = pid.to_string();
        let args: Vec<&str> = if windows {
            vec!["/F", "/T", "/PID", &pid]
        } else {
            vec!["-c", KILL_TREE, "kill-tree", &pid]
        };
        let path = if windows { "taskkill" } else { "/bin/sh" };
        let killer = self.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": false}),
        )?;
        // Wait (briefly) for the kill to be done: what runs next (the freeze, the next try of
        // the script) must not race with the process being killed.
        let Some(killer) = killer.get("pid").and_then(Value::as_i64) else {
            return Ok(());
        };
        let deadline = Instant::now() + KILL_WAIT;
        while Instant::now() < deadline {
            let status = self.execute("guest-exec-status", json!({"pid": killer}))?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Runs a command; its `return` value, or [`QemuError::Command`] with the agent's class
    /// and text.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        if self.dirty {
            self.sync(self.timeout.min(SYNC_TIMEOUT))?;
        }
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line, command)?;
        let reply = self.read_line(Instant::now() + self.timeout)?;
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        if err.is_null() {
            self.dirty = true;
            return Err(QemuError::GuestAgent(format!(
                "{command}: unexpected reply {reply}"
            )));
        }
        Err(QemuError::Command {
            command: command.to_string(),
            class: err["class"].as_str().unwrap_or("GenericError").to_string(),
            desc: err["desc"].as_str().unwrap_or("no description").to_string(),
        })
    }

    fn send(&mut self, bytes: &[u8], command: &str) -> Result<()> {
        self.writer.write_all(bytes).map_err(|e| {
            self.dirty = true;
            QemuError::Io {
                context: format!("sending {command} to the guest agent"),
                source: e,
            }
        })
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = Vec::new();
        // The guest writes these lines: a line without an end must not grow without bound.
        self.read(deadline, |r| {
            std::io::Read::take(&mut *r, MAX_LINE).read_until(b'\n', &mut line)
        })?;
        if line.len() as u64 >= MAX_LINE && line.last() != Some(&b'\n') {
            self.dirty = true;
            return Err(QemuError::GuestAgent(format!(
                "the guest agent sent a line longer than {} MiB",
                MAX_LINE >> 20
            )));
        }
        // A stray 0xFF (a sync marker we did not wait for) is not part of the JSON.
        let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
        serde_json::from_slice(&text).map_err(|e| {
            self.dirty = true;
            QemuError::GuestAgent(format!("the guest agent sent something not JSON: {e}"))
        })
    }

    /// One read with the time left to `deadline`; a timeout leaves the channel dirty.
    fn read(
        &mut self,
        deadline: Instant,
        f: impl FnOnce(&mut BufReader<UnixStream>) -> std::io::Result<usize>,
    ) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.dirty = true;
            return Err(QemuError::AgentTimeout(
                "the guest agent did not answer in time".into(),
            ));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| QemuError::Io {
                context: "setting the guest agent read timeout".into(),
                source: e,
            })?;
        match f(&mut self.reader) {
            Ok(0) => {
                self.dirty = true;
                Err(QemuError::Closed)
            }
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.dirty = true;
                Err(QemuError::AgentTimeout(format!(
                    "the guest agent did not answer in {:.1} s",
                    left.as_secs_f64()
                )))
            }
            Err(e) => {
                self.dirty = true;
                Err(QemuError::Io {
                    context: "reading from the guest agent".into(),
                    source: e,
                })
            }
        }
    }
}

/// A base64 field of `guest-exec-status`, decoded; absent is empty.
fn decode(status: &Value, key: &str) -> Result<Vec<u8>> {
    match status.get(key).and_then(Value::as_str) {
        None => Ok(Vec::new()),
        Some(b64) => {
            base64_decode(b64).ok_or_else(|| QemuError::GuestAgent(format!("{key} is not base64")))
        }
    }
}

/// Standard base64 (with padding, as the agent sends it); `None` on anything else.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for quad in bytes.chunks(4) {
        let pad = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || quad[..4 - pad].contains(&b'=') {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that answers the sync, then streams a reply that never ends.
    #[test]
    fn an_endless_reply_is_refused_not_kept() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let guest = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 512];
            let n = s.read(&mut request).unwrap();
            let text = String::from_utf8_lossy(&request[1..n]).to_string();
            let v: Value = serde_json::from_str(text.trim()).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            s.write_all(&[0xFF]).unwrap();
            s.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .unwrap();
            let _ = s.read(&mut request);
            let junk = vec![b'a'; 1 << 20];
            for _ in 0..40 {
                if s.write_all(&junk).is_err() {
                    break;
                }
            }
        });
        let mut qga = Qga::connect(&path, Duration::from_secs(5)).unwrap();
        let err = qga.ping().unwrap_err();
        assert!(err.to_string().contains("longer than 32 MiB"), "{err}");
        drop(qga);
        guest.join().unwrap();
    }

    #[test]
    fn base64_decodes_what_the_agent_sends() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("aGkh").unwrap(), b"hi!");
        assert_eq!(base64_decode("aA==").unwrap(), b"h");
        assert_eq!(
            base64_decode("aG9vayBmcmVlemUK").unwrap(),
            b"hook freeze\n".to_vec()
        );
        assert!(base64_decode("aGk").is_none());
        assert!(base64_decode("a=Gk").is_none());
        assert!(base64_decode("aG!k").is_none());
    }

    #[test]
    fn exec_results_say_how_they_ended() {
        let r = ExecResult {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            stdout: vec![],
            stderr: b"psql: could not connect\n\n".to_vec(),
        };
        assert!(!r.success());
        assert_eq!(
            r.describe(Duration::from_secs(1)),
            "exit code 3: psql: could not connect"
        );
        let t = ExecResult {
            timed_out: true,
            exit_code: None,
            stderr: vec![],
            ..r
        };
        assert_eq!(t.describe(Duration::from_secs(2)), "timed out after 2 s");
    }
}
