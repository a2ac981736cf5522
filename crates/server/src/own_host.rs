//! The server's own host is a host too (docs/design.md, "Host agents"): unless turned off
//! (`own_host = false`), `vmvault server` runs the agent code for its own host in-process, so
//! a one-machine install needs no enrollment and finds the VMs running beside it.
//!
//! Its identity is given in-process, never by a network request: the server makes a host key
//! in `STATE/own-agent`, records it as an enrolled host under this machine's name and pins
//! its own certificate and release key for it. The agent then talks to this server over
//! loopback TLS like any other, through the same handlers and checks. It never upgrades
//! itself: the server's own binary is upgraded with the server.

use std::net::SocketAddr;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};
use vmvault_agent::discover::DiscoverConfig;
use vmvault_agent::run::QuiesceMaker;
use vmvault_agent::state::Pins;
use vmvault_agent::{AgentOptions, AgentState, RunEnd};

/// The guest-agent quiesce of the own host's agent: the binary that runs the server gives
/// it (the CLI's helper process), before the server starts.
static QUIESCE: std::sync::OnceLock<Box<QuiesceMaker>> = std::sync::OnceLock::new();

/// Gives the own host's agent its quiesce; the first call wins.
pub fn use_quiesce(maker: Box<QuiesceMaker>) {
    let _ = QUIESCE.set(maker);
}

use crate::app::App;
use crate::db::ts;
use crate::{Error, Result};

impl App {
    /// Records this machine as an enrolled host (once) and starts its agent's thread.
    pub fn start_own_host(self: &Arc<App>, addr: SocketAddr, say: &dyn Fn(&str)) -> Result<()> {
        let Some(fingerprint) = self.fingerprint() else {
            return Ok(());
        };
        let name = own_name();
        let state = AgentState::open(&self.cfg.state_dir.join("own-agent"))
            .map_err(|e| Error::Config(format!("the own host's agent: {e}")))?;
        let identity = state
            .identity()
            .map_err(|e| Error::Config(format!("the own host's agent key: {e}")))?;
        let public = state
            .public_key(&identity)
            .map_err(|e| Error::Config(format!("the own host's agent key: {e}")))?;
        let key = crate::peer::key_id(&public);
        let existing: Option<(i64, Option<String>, String)> = self
            .db
            .conn()
            .query_row(
                "SELECT id, key, state FROM hosts WHERE name = ?1",
                [&name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let host_id = match existing {
            None => {
                let conn = self.db.conn();
                conn.execute(
                    "INSERT INTO hosts (name, state, key, public_key, created)
                     VALUES (?1, 'enrolled', ?2, ?3, ?4)",
                    params![name, key, hex::encode(public), ts(self.now())],
                )?;
                conn.last_insert_rowid()
            }
            Some((id, Some(k), s)) if k == key && s == "enrolled" => id,
            Some(_) => {
                // A host of this name was added by hand or removed: the admin's word stands.
                say(&format!(
                    "vmvault server: not running the own host's agent: host '{name}' is \
                     enrolled or removed otherwise"
                ));
                return Ok(());
            }
        };
        let port = addr.port();
        let pins = Pins {
            server: format!("https://127.0.0.1:{port}"),
            fingerprint,
            host: name.clone(),
            host_id,
            release_key: self.release_public_key()?,
        };
        state
            .save_pins(&pins)
            .map_err(|e| Error::Config(format!("the own host's agent: {e}")))?;
        let opts = AgentOptions {
            discover: DiscoverConfig {
                qmp_globs: self.cfg.own_host_qmp_globs.clone(),
                scan_processes: self.cfg.own_host_scan_processes,
                ..DiscoverConfig::default()
            },
            restore_roots: self.cfg.restore_roots.clone(),
            quiesce: QUIESCE
                .get()
                .map(|make| Box::new(make) as Box<QuiesceMaker>),
            ..AgentOptions::default()
        };
        *self.own_host_stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(opts.stop.clone());
        say(&format!(
            "vmvault server: this host's VMs are found and backed up as host '{name}'"
        ));
        std::thread::Builder::new()
            .name("own-host-agent".into())
            .spawn(move || loop {
                let said = |line: &str| eprintln!("vmvault server: own host agent: {line}");
                match vmvault_agent::run(&state, &opts, &said) {
                    Ok(RunEnd::Stopped) => return,
                    // Only an upgrade asks for a restart, and this agent is upgraded with
                    // the server: run on.
                    Ok(RunEnd::Restart(_)) => continue,
                    Err(e) => {
                        eprintln!("vmvault server: own host agent stopped: {e}");
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("starting the own host's agent", e))?;
        Ok(())
    }

    /// Whether `name` is the server's own host (which is upgraded with the server, never by
    /// a release).
    pub(crate) fn is_own_host(&self, name: &str) -> bool {
        self.cfg.own_host && self.fingerprint().is_some() && name == own_name()
    }
}

fn own_name() -> String {
    let host = vmvault_store::locks::hostname();
    let name: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() || name == "." || name == ".." {
        "server".into()
    } else {
        name
    }
}
