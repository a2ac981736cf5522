//! The quiesce helper process ([`child_main`]): owns the guest-agent connection, runs the
//! pre-script, freezes, and thaws when told, when the freeze limit passes, or when its stdin
//! closes (vmvault died). See [`crate::quiesce`] for the whole picture.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::qga::{FreezeStatus, OsInfo, Qga, QGA_TIMEOUT, SYNC_TIMEOUT};
use crate::quiesce::{FromHelper, Level, ToHelper};
use crate::scripts::{Script, Scripts};

/// Attempts at a thaw (each on a fresh, synced connection after the first) and the time each
/// may take: a thaw is quick, so a slow one is an agent in trouble.
pub(crate) const THAW_ATTEMPTS: u32 = 3;
pub(crate) const THAW_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the helper waits for its options: the parent sends them right after the start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The helper's main function: reads the options from `input` (the first line), quiesces,
/// and answers on `output`; the process's exit code (0 done, 1 the job must fail, 2 misuse).
/// `input` is read on a thread of its own so that the freeze limit can pass while waiting.
pub fn child_main(input: impl BufRead + Send + 'static, mut output: impl Write) -> i32 {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        // The sender drops here: end of input reads as "the parent is gone".
    });
    let start = match lines.recv_timeout(START_TIMEOUT) {
        Ok(line) => serde_json::from_str::<ToHelper>(&line),
        Err(_) => {
            eprintln!("vmvault quiesce helper: no options on stdin");
            return 2;
        }
    };
    let (qga, scripts, limit) = match start {
        Ok(ToHelper::Start {
            qga,
            scripts,
            freeze_limit_ms,
        }) => (qga, scripts, Duration::from_millis(freeze_limit_ms)),
        other => {
            let error = format!("the first line must be the options, not {other:?}");
            say(&mut output, &FromHelper::Failed { error });
            return 2;
        }
    };
    let mut helper = Helper {
        path: qga,
        agent: None,
        os: OsInfo::default(),
        scripts: scripts.unwrap_or_default(),
        warnings: Vec::new(),
    };
    helper.run(limit, &lines, &mut output)
}

struct Helper {
    path: PathBuf,
    agent: Option<Qga>,
    os: OsInfo,
    scripts: Scripts,
    warnings: Vec<String>,
}

/// Why the helper stopped waiting for the release.
enum Wake {
    Release,
    ParentGone,
    LimitPassed,
}

impl Helper {
    fn run(&mut self, limit: Duration, lines: &Receiver<String>, output: &mut impl Write) -> i32 {
        let (level, reason, frozen_at) = match self.quiesce(limit) {
            Ok(q) => q,
            Err(error) => {
                say(output, &FromHelper::Failed { error });
                return 1;
            }
        };
        // The app stays quiesced (pre-script) or the guest frozen until the release, the
        // parent's death, or the limit: counted from the freeze, else from now.
        let quiesced = frozen_at.is_some() || (level == Level::Application);
        let since = frozen_at.unwrap_or_else(Instant::now);
        say(output, &FromHelper::Quiesced { level, reason });
        let mut wake = wait(lines, quiesced.then(|| since + limit));
        let mut thawed_early = false;
        let mut frozen_for = Duration::ZERO;
        if frozen_at.is_some() {
            self.thaw();
            frozen_for = since.elapsed();
        }
        let post = if matches!(wake, Wake::LimitPassed) {
            thawed_early = true;
            self.warnings.push(format!(
                "the freeze limit of {:.1} s passed before the point was taken: the helper \
                 thawed the guest on its own (treat the point as crash-consistent)",
                limit.as_secs_f64()
            ));
            // The post-script now too: the application must not stay paused either.
            let post = self.post_script();
            wake = wait(lines, None);
            post
        } else {
            self.post_script()
        };
        let error = match post {
            Err(e) if !self.scripts.continue_on_failure => Some(e),
            Err(e) => {
                self.warnings.push(e);
                None
            }
            Ok(()) => None,
        };
        if let Wake::ParentGone = wake {
            // Nobody to tell but the log: what went wrong, if anything, goes to stderr.
            eprintln!("vmvault quiesce helper: vmvault went away; thawed and done");
            for w in self.warnings.iter().chain(&error) {
                eprintln!("vmvault quiesce helper: {w}");
            }
            return 0;
        }
        say(
            output,
            &FromHelper::Released {
                frozen_for_ms: frozen_for.as_millis() as u64,
                warnings: std::mem::take(&mut self.warnings),
                thawed_early,
                error,
            },
        );
        0
    }

    /// Pre-script and freeze: the level, the reason it is lower, and when the freeze started
    /// (if it worked). `Err` when the job must fail; nothing is frozen then.
    fn quiesce(
        &mut self,
        limit: Duration,
    ) -> Result<(Level, Option<String>, Option<Instant>), String> {
        let scripts = self.scripts.clone();
        match Qga::connect(&self.path, SYNC_TIMEOUT) {
            Ok(agent) => self.agent = Some(agent),
            Err(e) => {
                let why = format!("the guest agent does not answer ({e})");
                if let (Some(_), false) = (&scripts.pre, scripts.continue_on_failure) {
                    return Err(format!("the pre-script could not run: {why}"));
                }
                return Ok((Level::Crash, Some(why), None));
            }
        }
        // Older agents lack guest-get-osinfo: then not Windows, which only costs the level.
        self.os = self.agent()?.osinfo().unwrap_or_default();
        let mut reason = None;
        if let Some(pre) = &scripts.pre {
            if let Err(why) = self.run_script("pre-script", pre) {
                if !scripts.continue_on_failure {
                    // Undo whatever the pre-script did before it failed.
                    let undo = match self.post_script() {
                        Err(e) => format!("; {e}"),
                        Ok(()) => String::new(),
                    };
                    return Err(format!("{why}{undo}"));
                }
                reason = Some(why);
            }
        }
        let app_quiesced = scripts.pre.is_some() && reason.is_none();
        if scripts.skip_freeze {
            return Ok(match reason {
                None => (Level::Application, None, None),
                Some(why) => (
                    Level::Crash,
                    Some(format!("{why}; no freeze (skip_freeze)")),
                    None,
                ),
            });
        }
        let agent = self.agent()?;
        // The freeze may take up to the limit: past it, the guest must be thawed anyway.
        agent.set_timeout(limit);
        let started = Instant::now();
        match agent.fsfreeze_freeze() {
            Ok(_) => {
                let level = match &reason {
                    Some(_) => Level::Filesystem,
                    None if app_quiesced || self.os.is_windows() => Level::Application,
                    None => Level::Filesystem,
                };
                Ok((level, reason, Some(started)))
            }
            Err(e) => {
                // A freeze that failed or timed out may have frozen some file systems.
                self.thaw();
                let mut why = format!("the file-system freeze failed ({e})");
                if let Some(pre) = reason {
                    why = format!("{pre}; {why}");
                }
                Ok((Level::Crash, Some(why), None))
            }
        }
    }

    fn agent(&mut self) -> Result<&mut Qga, String> {
        self.agent
            .as_mut()
            .ok_or_else(|| "no guest agent connection".to_string())
    }

    /// Runs a script with its retries; the error says which, how it failed and how often.
    fn run_script(&mut self, which: &str, script: &Script) -> Result<(), String> {
        let windows = self.os.is_windows();
        let mut last = String::new();
        for _ in 0..=script.retries {
            let result = match self.agent.as_mut() {
                Some(agent) => {
                    agent.set_timeout(QGA_TIMEOUT);
                    agent.exec(&script.path, &script.args, script.timeout(), windows)
                }
                None => return Err(format!("{which} {}: no guest agent", script.path)),
            };
            match result {
                Ok(r) if r.success() => return Ok(()),
                Ok(r) => last = r.describe(script.timeout()),
                Err(e) => last = e.to_string(),
            }
        }
        let tries = match script.retries {
            0 => String::new(),
            n => format!(" ({} tries)", n + 1),
        };
        Err(format!("{which} {} failed: {last}{tries}", script.path))
    }

    fn post_script(&mut self) -> Result<(), String> {
        match (self.scripts.post.clone(), &self.agent) {
            (Some(post), Some(_)) => self.run_script("post-script", &post),
            _ => Ok(()),
        }
    }

    /// Thaws, retrying on a fresh connection; what went wrong becomes a warning. Checks the
    /// status when a thaw call fails: the guest may be thawed all the same.
    fn thaw(&mut self) {
        let mut last = None;
        for attempt in 0..THAW_ATTEMPTS {
            if attempt > 0 || self.agent.is_none() {
                self.agent = Qga::connect(&self.path, SYNC_TIMEOUT).ok();
            }
            let Some(agent) = self.agent.as_mut() else {
                last = Some("the guest agent does not answer".to_string());
                continue;
            };
            agent.set_timeout(THAW_TIMEOUT);
            match agent.fsfreeze_thaw() {
                Ok(_) => return self.note_retries(attempt, last),
                Err(e) => last = Some(e.to_string()),
            }
            if let Ok(FreezeStatus::Thawed) = agent.fsfreeze_status() {
                return self.note_retries(attempt, last);
            }
        }
        self.warnings.push(format!(
            "the guest could not be thawed after {THAW_ATTEMPTS} attempts: {}",
            last.unwrap_or_default()
        ));
    }

    fn note_retries(&mut self, attempt: u32, last: Option<String>) {
        if let (true, Some(e)) = (attempt > 0, last) {
            self.warnings
                .push(format!("the thaw took {} attempts: {e}", attempt + 1));
        }
    }
}

/// Waits for the release, the end of input, or `deadline`.
fn wait(lines: &Receiver<String>, deadline: Option<Instant>) -> Wake {
    loop {
        let line = match deadline {
            Some(d) => match lines.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => return Wake::LimitPassed,
                Err(RecvTimeoutError::Disconnected) => return Wake::ParentGone,
            },
            None => match lines.recv() {
                Ok(line) => line,
                Err(_) => return Wake::ParentGone,
            },
        };
        if let Ok(ToHelper::Release) = serde_json::from_str(&line) {
            return Wake::Release;
        }
        eprintln!("vmvault quiesce helper: ignored {line:?}");
    }
}

/// One message to the parent. A parent that is gone cannot read it; the guest is thawed
/// regardless, so a failed write is not an error here.
fn say(output: &mut impl Write, message: &FromHelper) {
    let mut line = serde_json::to_vec(message).expect("messages serialize");
    line.push(b'\n');
    let _ = output.write_all(&line).and_then(|()| output.flush());
}
