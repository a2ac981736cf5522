//! `vmvault agent`: the host agent's commands, run on a hypervisor host (docs/design.md,
//! "Host agents"). `enroll` turns a one-time code from `vmvault host add` into this host's
//! credential, `run` is the agent itself (the systemd unit's command), `status` says what
//! enrollment pinned. They work on the agent's state dir, never on a vault.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use vmvault_agent::config::{AgentConfig, Overrides};
use vmvault_agent::run::QuiesceMaker;
use vmvault_agent::state::Pins;
use vmvault_agent::{AgentError, AgentOptions, AgentState, RunEnd};
use vmvault_class::Class;
use vmvault_engine::Quiesce;
use vmvault_qemu::QuiesceOptions;

use crate::exit::InputError;
use crate::output::print_json;
use crate::qemu::GuestAgent;
use crate::remote::{normalize_fingerprint, ApiError};

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Enroll this host with a server, once, with the code `vmvault host add` printed.
    Enroll(EnrollArgs),
    /// Run the agent: report this host's VMs and run the backups the server asks for, until
    /// SIGTERM or Ctrl-C (then after the job running, if any; a second signal stops at once).
    Run(RunArgs),
    /// What enrollment pinned: the server, this host's name, the certificate's fingerprint.
    Status(StateArgs),
    /// Go back to the version before a pending upgrade (systemd's OnFailure=, or by hand when
    /// a new version does not start); told to the server with the next heartbeat.
    Rollback(StateArgs),
}

/// Where the agent's state is; every agent command takes them.
#[derive(Args)]
pub struct StateArgs {
    /// The agent's configuration (TOML); default /etc/vmvault/agent.toml when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The host key and what enrollment pinned (default /var/lib/vmvault-agent).
    #[arg(long, env = "VMVAULT_AGENT_STATE", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct EnrollArgs {
    /// The server: https://HOST:PORT, as `host add` printed it.
    server: String,
    /// The one-time code (ID-SECRET).
    #[arg(long)]
    code: String,
    /// The server certificate's SHA-256 fingerprint: anything else stops the enrollment
    /// before it sends anything.
    #[arg(long, value_name = "SHA256")]
    trust_fingerprint: Option<String>,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    state: StateArgs,
    /// A glob of QMP sockets to ask (`*` and `?` in any segment); repeat for more. Given:
    /// these instead of the configuration's.
    #[arg(long = "qmp-glob", value_name = "GLOB")]
    qmp_globs: Vec<String>,
    /// Do not read running QEMU processes' command lines for their sockets (guest-agent
    /// sockets are found only that way).
    #[arg(long)]
    no_process_scan: bool,
    /// The longest a guest stays frozen during a backup, in seconds (default 60): its
    /// quiesce helper thaws it then, whatever happens.
    #[arg(long, value_name = "SECONDS")]
    freeze_limit: Option<u64>,
    /// A folder restores on this host may write into; repeat for more. Added to the
    /// configuration's `restore_roots`. None at all: this host takes no restore.
    #[arg(long = "restore-root", value_name = "DIR")]
    restore_roots: Vec<PathBuf>,
}

pub fn run(json: bool, cmd: AgentCommand) -> Result<()> {
    match cmd {
        AgentCommand::Enroll(a) => enroll(json, a),
        AgentCommand::Run(a) => run_agent(a),
        AgentCommand::Status(a) => status(json, a),
        AgentCommand::Rollback(a) => rollback(json, a),
    }
}

/// An agent error as the CLI classifies errors: bad input exits 2, a refusal as the server's
/// own status would (401: 6), anything else 1.
fn classified(e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Input(m) => InputError(m).into(),
        AgentError::Refused(r) => ApiError {
            status: r.status,
            code: Class::from_http_status(r.status).api_code().to_string(),
            message: r.message,
            token: None,
        }
        .into(),
        AgentError::Engine(e) => e.into(),
        other => anyhow!("{other}"),
    }
}

fn config(state: &StateArgs, over: Overrides) -> Result<AgentConfig> {
    let over = Overrides {
        state_dir: state.state_dir.clone(),
        ..over
    };
    AgentConfig::load(state.config.as_deref(), over).map_err(classified)
}

fn enroll(json: bool, a: EnrollArgs) -> Result<()> {
    let cfg = config(&a.state, Overrides::default())?;
    let state = AgentState::open(&cfg.state_dir).map_err(classified)?;
    // Typed as the CLI's `--trust-fingerprint` takes it: any case, colons or not.
    let trust = a.trust_fingerprint.as_deref().map(normalize_fingerprint);
    let pins =
        vmvault_agent::enroll(&state, &a.server, &a.code, trust.as_deref()).map_err(classified)?;
    if json {
        print_json(&Status::of(&cfg, Some(pins)));
    } else {
        outln!(
            "enrolled as host '{}' with {}; its certificate {} is pinned",
            pins.host,
            pins.server,
            pins.fingerprint
        );
        eprintln!(
            "vmvault: start the agent: `systemctl enable --now vmvault-agent`, or `vmvault \
             agent run`"
        );
    }
    Ok(())
}

/// `agent status --json`, and `agent enroll --json`.
#[derive(Serialize)]
struct Status {
    enrolled: bool,
    state_dir: PathBuf,
    #[serde(flatten)]
    pins: Option<Pins>,
}

impl Status {
    fn of(cfg: &AgentConfig, pins: Option<Pins>) -> Status {
        Status {
            enrolled: pins.is_some(),
            state_dir: cfg.state_dir.clone(),
            pins,
        }
    }
}

fn status(json: bool, a: StateArgs) -> Result<()> {
    let cfg = config(&a, Overrides::default())?;
    // Not `open`: asking must not make the state dir.
    let state = AgentState {
        dir: cfg.state_dir.clone(),
    };
    let pins = state.pins().map_err(classified)?;
    let s = Status::of(&cfg, pins);
    if json {
        print_json(&s);
        return Ok(());
    }
    outln!("{:<13}{}", "state_dir", s.state_dir.display());
    match &s.pins {
        None => outln!(
            "{:<13}no (`vmvault agent enroll URL --code CODE` enrolls it)",
            "enrolled"
        ),
        Some(p) => {
            outln!("{:<13}{}", "host", p.host);
            outln!("{:<13}{}", "server", p.server);
            outln!("{:<13}{}", "fingerprint", p.fingerprint);
            outln!("{:<13}{}", "release_key", p.release_key);
        }
    }
    Ok(())
}

/// A line of the agent's log on stderr, with the time (the journal adds its own, but a
/// foreground run or a redirected log has none).
fn say(line: &str) {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    eprintln!("{now} {line}");
}

/// The first SIGTERM or SIGINT asks the agent to stop between jobs (a backup is not cut
/// short); a second ends it at once, as a kill would: the server fails that job, and the
/// next one is correct (docs/design.md, "The relay data path").
fn stop_on_signals(stop: Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| anyhow!("installing the signal handlers: {e}"))?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if stop.swap(true, Ordering::SeqCst) {
                say("stopping at once (a second signal)");
                std::process::exit(Class::Cancelled.exit_code());
            }
            say("stopping after the job running now, if any (a second signal stops at once)");
        }
    });
    Ok(())
}

fn run_agent(a: RunArgs) -> Result<()> {
    let cfg = config(
        &a.state,
        Overrides {
            qmp_globs: a.qmp_globs,
            no_process_scan: a.no_process_scan,
            freeze_limit_secs: a.freeze_limit,
            restore_roots: a.restore_roots,
            ..Overrides::default()
        },
    )?;
    let state = AgentState::open(&cfg.state_dir).map_err(classified)?;
    let freeze_limit = cfg.freeze_limit();
    // Each job with a guest agent gets its own helper process holding the freeze, so that
    // the guest thaws even when the agent dies mid-job.
    let quiesce: Box<QuiesceMaker> = Box::new(move |qga, scripts| {
        Box::new(GuestAgent::new(QuiesceOptions {
            qga,
            scripts,
            freeze_limit,
        })) as Box<dyn Quiesce>
    });
    let opts = AgentOptions {
        discover: cfg.discover(),
        quiesce: Some(quiesce),
        restore_roots: cfg.restore_roots.clone(),
        health_deadline_secs: cfg.health_deadline_secs,
        ..AgentOptions::default()
    };
    stop_on_signals(opts.stop.clone())?;
    match vmvault_agent::run(&state, &opts, &say).map_err(classified)? {
        RunEnd::Stopped => {
            say("stopped");
            Ok(())
        }
        RunEnd::Restart(bin) => {
            // The same process (systemd keeps following its PID) in the new binary, with
            // the same arguments.
            say(&format!("restarting as {}", bin.display()));
            let e = std::process::Command::new(&bin)
                .args(std::env::args_os().skip(1))
                .exec();
            Err(anyhow!("starting {}: {e}", bin.display()))
        }
    }
}

fn rollback(json: bool, a: StateArgs) -> Result<()> {
    let cfg = config(&a, Overrides::default())?;
    let state = AgentState::open(&cfg.state_dir).map_err(classified)?;
    let rolled =
        vmvault_agent::upgrade::rollback(&state, "rolled back by `vmvault agent rollback`")
            .map_err(classified)?;
    let said = rolled.map(|(failed, now)| (failed.to_string(), now.to_string()));
    crate::remote_show::emit(
        json,
        &serde_json::json!({ "rolled_back": said }),
        |_| match &said {
            Some((failed, now)) => outln!("rolled back {failed}: {now} runs next"),
            None => outln!("no upgrade is pending: nothing to roll back"),
        },
    );
    Ok(())
}
