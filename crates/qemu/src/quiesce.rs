//! Quiescing a running guest for a backup's point in time: pre-script → file-system freeze →
//! (the caller takes the point in time) → thaw → post-script, through the QEMU guest agent.
//!
//! The guest must never stay frozen, whatever happens to vmvault. So the sequence runs in a
//! **helper process** that owns the guest-agent connection (the `vmvault` binary re-executing
//! itself with a hidden subcommand, which calls [`child_main`]); it thaws when told to, when
//! the freeze limit passes (default 10 s), or when its stdin closes because vmvault died. It
//! runs in its own process group, so a Ctrl-C to vmvault does not kill it before it thaws.
//!
//! Parent and helper talk in JSON lines: the parent sends the options, the helper answers
//! `quiesced` (with the level) or `failed`; the parent sends `release`, the helper thaws, runs
//! the post-script and answers `released`. The options travel over stdin rather than the
//! command line, so script arguments (which may hold database credentials) never show in `ps`.
//!
//! ```text
//! vmvault ──spawn──▶ helper ──unix socket──▶ QEMU ──virtio-serial──▶ qemu-ga in the guest
//!   {options} ─▶        connect+sync, pre-script, guest-fsfreeze-freeze
//!   ◀─ {quiesced}       … watchdog: thaw at the freeze limit or when stdin closes …
//!   {release} ─▶        guest-fsfreeze-thaw, post-script
//!   ◀─ {released}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::qga::{Qga, QGA_TIMEOUT, SYNC_TIMEOUT};
use crate::scripts::{Script, Scripts};
use crate::{QemuError, Result};

pub use crate::quiesce_child::child_main;

/// How long the guest may stay frozen by default: Windows' VSS itself gives up after 10 s.
pub const DEFAULT_FREEZE_LIMIT: Duration = Duration::from_secs(10);

/// What to quiesce and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuiesceOptions {
    /// The guest agent's unix socket (QEMU's `-chardev socket,path=…` for the
    /// `org.qemu.guest_agent.0` port).
    pub qga: PathBuf,
    /// The VM's pre/post scripts, if it has any.
    pub scripts: Option<Scripts>,
    /// The longest the guest stays frozen (or quiesced by its pre-script) before the helper
    /// thaws it on its own.
    pub freeze_limit: Duration,
}

impl QuiesceOptions {
    pub fn new(qga: impl Into<PathBuf>) -> QuiesceOptions {
        QuiesceOptions {
            qga: qga.into(),
            scripts: None,
            freeze_limit: DEFAULT_FREEZE_LIMIT,
        }
    }
}

/// How consistent the point in time will be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Applications flushed and paused: the pre-script succeeded (and the freeze, unless
    /// skipped), or Windows' VSS writers took part in the freeze.
    Application,
    /// File systems flushed and frozen, applications not asked.
    Filesystem,
    /// As if the power went off: no agent, or the freeze failed.
    Crash,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Application => "application",
            Level::Filesystem => "filesystem",
            Level::Crash => "crash",
        }
    }
}

/// The state the guest is in while the point is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesced {
    pub level: Level,
    /// Why the level is below [`Level::Application`].
    pub reason: Option<String>,
}

/// How the quiesce ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// From sending the freeze to the thaw's answer (zero when the freeze failed or was not
    /// asked for: a freeze that timed out may still have held briefly, until its thaw).
    pub frozen_for: Duration,
    /// Things that went wrong without failing the job (a slow thaw, a failed post-script
    /// with `continue_on_failure`).
    pub warnings: Vec<String>,
    /// The freeze limit passed before the release: the helper thawed on its own, so the point
    /// may have been taken from a thawed guest (treat it as crash-consistent).
    pub thawed_early: bool,
}

/// Parent → helper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub(crate) enum ToHelper {
    Start {
        qga: PathBuf,
        scripts: Option<Scripts>,
        freeze_limit_ms: u64,
    },
    Release,
}

/// Helper → parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum FromHelper {
    Quiesced {
        level: Level,
        reason: Option<String>,
    },
    Failed {
        error: String,
    },
    Released {
        frozen_for_ms: u64,
        warnings: Vec<String>,
        thawed_early: bool,
        /// A post-script that failed without `continue_on_failure`: the job fails.
        error: Option<String>,
    },
}

/// A quiesced guest, until [`QuiesceSession::release`]. Dropped without a release, the helper
/// sees its stdin close and thaws on its own.
pub struct QuiesceSession {
    helper: Option<Child>,
    stdin: Option<ChildStdin>,
    events: Receiver<Line>,
    state: Quiesced,
    qga: PathBuf,
    release_budget: Duration,
}

/// A line the helper wrote; lines that are not messages are kept to explain a failure.
enum Line {
    Message(FromHelper),
    Other(String),
}

/// Runs the pre-script and freezes the guest through a helper process started from `child`
/// (its stdin, stdout and process group are set here). Returns once the guest is quiesced, or
/// the lower level was decided; `Err` means the job must fail (a pre-script failed without
/// `continue_on_failure`, or the helper broke), and nothing is left frozen.
pub fn quiesce(opts: &QuiesceOptions, mut child: Command) -> Result<QuiesceSession> {
    child
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0);
    let mut helper = child.spawn().map_err(|e| QemuError::Io {
        context: format!("starting the quiesce helper {:?}", child.get_program()),
        source: e,
    })?;
    let stdin = helper.stdin.take();
    let stdout = helper.stdout.take();
    let (tx, events) = mpsc::channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parsed = match serde_json::from_str(&line) {
                    Ok(m) => Line::Message(m),
                    Err(_) => Line::Other(line),
                };
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
    }
    let scripts = opts.scripts.as_ref();
    let mut session = QuiesceSession {
        helper: Some(helper),
        stdin,
        events,
        state: Quiesced {
            level: Level::Crash,
            reason: None,
        },
        qga: opts.qga.clone(),
        release_budget: thaw_budget() + script_budget(scripts.and_then(|s| s.post.as_ref())),
    };
    session.send(&ToHelper::Start {
        qga: opts.qga.clone(),
        scripts: opts.scripts.clone(),
        freeze_limit_ms: opts.freeze_limit.as_millis() as u64,
    })?;
    // Everything the helper may do before it answers, with room to spare: a stuck helper is
    // killed then, and the guest thawed from here.
    let budget = SYNC_TIMEOUT
        + QGA_TIMEOUT
        + script_budget(scripts.and_then(|s| s.pre.as_ref()))
        + script_budget(scripts.and_then(|s| s.post.as_ref()))
        + opts.freeze_limit
        + thaw_budget()
        + Duration::from_secs(10);
    match session.next_message(budget)? {
        FromHelper::Quiesced { level, reason } => {
            session.state = Quiesced { level, reason };
            Ok(session)
        }
        FromHelper::Failed { error } => {
            session.finish();
            Err(QemuError::Script(error))
        }
        other => Err(session.broken(&format!("answered {other:?} before quiescing"))),
    }
}

impl QuiesceSession {
    /// The level the point will have, and why it is lower than application-consistent.
    pub fn state(&self) -> &Quiesced {
        &self.state
    }

    /// The helper's process id (its process group's too).
    pub fn helper_pid(&self) -> Option<u32> {
        self.helper.as_ref().map(Child::id)
    }

    /// Thaws the guest and runs the post-script. `Err` when the post-script failed without
    /// `continue_on_failure` (the guest is thawed all the same) or the helper broke.
    pub fn release(mut self) -> Result<Released> {
        self.send(&ToHelper::Release)?;
        let budget = self.release_budget + Duration::from_secs(10);
        let message = self.next_message(budget)?;
        self.finish();
        match message {
            FromHelper::Released {
                frozen_for_ms,
                warnings,
                thawed_early,
                error,
            } => match error {
                Some(e) => Err(QemuError::Script(e)),
                None => Ok(Released {
                    frozen_for: Duration::from_millis(frozen_for_ms),
                    warnings,
                    thawed_early,
                }),
            },
            other => Err(QemuError::Helper(format!(
                "answered {other:?} to the release"
            ))),
        }
    }

    fn send(&mut self, message: &ToHelper) -> Result<()> {
        let mut line = serde_json::to_vec(message).expect("messages serialize");
        line.push(b'\n');
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin.write_all(&line).and_then(|()| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        sent.map_err(|e| self.broken(&format!("could not be written to ({e})")))
    }

    /// The helper's next message within `budget`; a helper that exits or stays silent is
    /// killed and the guest thawed from here.
    fn next_message(&mut self, budget: Duration) -> Result<FromHelper> {
        let deadline = Instant::now() + budget;
        let mut noise = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Line::Message(m)) => return Ok(m),
                // e.g. a test harness's banner when a test binary is the helper.
                Ok(Line::Other(line)) => noise.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.broken(&format!("did not answer in {budget:?}")))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let tail = noise.last().map_or(String::new(), |l| format!(": {l}"));
                    return Err(self.broken(&format!("exited without answering{tail}")));
                }
            }
        }
    }

    /// Kills a broken helper and thaws the guest from this process (the socket is free once
    /// the helper is gone); the error to return.
    fn broken(&mut self, what: &str) -> QemuError {
        if let Some(mut helper) = self.helper.take() {
            let _ = helper.kill();
            let _ = helper.wait();
        }
        self.stdin = None;
        let thawed = match emergency_thaw(&self.qga) {
            Ok(()) => "the guest was thawed".to_string(),
            Err(e) => format!("thawing the guest from vmvault failed too: {e}"),
        };
        QemuError::Helper(format!("the quiesce helper {what}; {thawed}"))
    }

    /// Closes the helper's stdin and reaps it.
    fn finish(&mut self) {
        self.stdin = None;
        if let Some(mut helper) = self.helper.take() {
            let _ = helper.wait();
        }
    }
}

impl Drop for QuiesceSession {
    /// Not released: closing stdin makes the helper thaw and run the post-script on its own;
    /// a thread reaps it so that dropping never blocks.
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut helper) = self.helper.take() {
            std::thread::spawn(move || helper.wait());
        }
    }
}

/// A thaw from the parent, for when the helper broke: a fresh connection, short timeouts.
fn emergency_thaw(qga: &std::path::Path) -> Result<()> {
    let mut agent = Qga::connect(qga, SYNC_TIMEOUT)?;
    agent.set_timeout(Duration::from_secs(5));
    agent.fsfreeze_thaw().map(drop)
}

/// The longest the helper's thaw takes: a few resyncs and attempts (see `quiesce_child`).
pub(crate) fn thaw_budget() -> Duration {
    crate::quiesce_child::THAW_ATTEMPTS * (SYNC_TIMEOUT + crate::quiesce_child::THAW_TIMEOUT)
}

/// The longest a script takes with its retries: each run, plus the agent's answers.
pub(crate) fn script_budget(script: Option<&Script>) -> Duration {
    script.map_or(Duration::ZERO, |s| {
        (s.timeout() + QGA_TIMEOUT + SYNC_TIMEOUT) * (s.retries + 1)
    })
}
