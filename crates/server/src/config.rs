//! The server's configuration: one struct read from TOML (`--config server.toml`), then
//! overridden by environment variables and flags (the CLI maps both onto [`Overrides`]).
//! Everything has a default, so `vmvault server` runs with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the database, the TLS certificate and the first admin token live.
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Plain HTTP instead of TLS; refused on anything but a loopback address.
    pub insecure_http: bool,
    /// The vault the server works on: a directory, created when missing.
    pub vault: Option<PathBuf>,
    /// A second region the vault is replicated to (a directory, e.g. on another disk or a
    /// mounted remote filesystem). Jobs write both regions before a write returns; the
    /// server's own writes (markers, prunes) go through a journaled queue whose length is
    /// the replication lag in /metrics.
    pub secondary: Option<PathBuf>,
    /// Its name in the API.
    pub vault_name: String,
    /// The vault's passphrase, from a file (else VMVAULT_PASSWORD, else one generated into
    /// the state dir for a vault the server creates).
    pub passphrase_file: Option<PathBuf>,
    #[serde(skip)]
    pub passphrase: Option<String>,
    /// Jobs that run at once, over all VMs.
    pub max_jobs: usize,
    /// Attempts of a scheduled or on-demand backup before it stays failed.
    pub backup_attempts: u32,
    /// Seconds before the first retry; doubled for each further one.
    pub retry_backoff_secs: u64,
    /// When garbage collection runs (a schedule like a policy's).
    pub gc_schedule: String,
    pub timezone: String,
    /// Days a deleted recovery point stays restorable (1..=180).
    pub soft_delete_days: u32,
    /// Seconds between scheduler passes.
    pub tick_secs: u64,
    /// URLs that get every alert as a JSON POST.
    pub alert_webhooks: Vec<String>,
    /// Mail every alert through this SMTP relay.
    pub alert_smtp: Option<SmtpAlerts>,
    /// Where protected VMs' disks may be: folders (a disk anywhere below one) and device
    /// patterns (a `*` or `?` in the last component, e.g. `/dev/vg0/*`: the block devices
    /// the matches resolve to). Empty: no VM can be protected until an admin names them.
    /// The state dir, the vault and the passphrase file are never allowed.
    pub disk_roots: Vec<String>,
    /// Folders restores may write into (each restore a new folder below one). Empty: no
    /// restore until an admin names them.
    pub restore_roots: Vec<PathBuf>,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also an idle keep-alive's limit).
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to finish the TLS handshake.
    pub tls_handshake_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            state_dir: default_state_dir(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            insecure_http: false,
            vault: None,
            secondary: None,
            vault_name: "default".into(),
            passphrase_file: None,
            passphrase: None,
            max_jobs: 2,
            backup_attempts: 3,
            retry_backoff_secs: 60,
            gc_schedule: "daily 03:30".into(),
            timezone: "UTC".into(),
            soft_delete_days: 14,
            tick_secs: 5,
            alert_webhooks: Vec::new(),
            alert_smtp: None,
            disk_roots: Vec::new(),
            restore_roots: Vec::new(),
            max_connections: 1024,
            header_read_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
        }
    }
}

/// Where alert mail goes: a relay (a local MTA, typically) that takes plain SMTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpAlerts {
    pub host: String,
    #[serde(default = "smtp_port")]
    pub port: u16,
    pub from: String,
    pub to: Vec<String>,
}

fn smtp_port() -> u16 {
    25
}

/// `VMVAULT_SERVER_STATE`, else `~/.local/share/vmvault-server`.
fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMVAULT_SERVER_STATE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".local/share/vmvault-server")
}

/// What flags and the environment set; `None` leaves the file's (or the default) value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub insecure_http: bool,
    pub vault: Option<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    pub passphrase: Option<String>,
    pub max_jobs: Option<usize>,
    /// Added to the file's lists.
    pub disk_roots: Vec<String>,
    pub restore_roots: Vec<PathBuf>,
    pub max_connections: Option<usize>,
}

impl ServerConfig {
    /// Reads the TOML file when there is one, applies `over`, and checks the result.
    pub fn load(file: Option<&Path>, over: Overrides) -> Result<ServerConfig> {
        let mut c = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                toml::from_str(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => ServerConfig::default(),
        };
        if let Some(v) = over.state_dir {
            c.state_dir = v;
        }
        if let Some(v) = over.listen {
            c.listen = v;
        }
        c.insecure_http |= over.insecure_http;
        if let Some(v) = over.vault {
            c.vault = Some(v);
        }
        if let Some(v) = over.passphrase_file {
            c.passphrase_file = Some(v);
        }
        if over.passphrase.is_some() {
            c.passphrase = over.passphrase;
        }
        if let Some(v) = over.max_jobs {
            c.max_jobs = v;
        }
        c.disk_roots.extend(over.disk_roots);
        c.restore_roots.extend(over.restore_roots);
        if let Some(v) = over.max_connections {
            c.max_connections = v;
        }
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if self.insecure_http && !self.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "--insecure-http is allowed only on a loopback address (127.0.0.1, ::1), not \
                 {}: plain HTTP would send tokens readable on the network",
                self.listen
            )));
        }
        if self.max_jobs == 0 {
            return Err(Error::Config("max_jobs must be at least 1".into()));
        }
        if !(1..=180).contains(&self.soft_delete_days) {
            return Err(Error::Config(
                "soft_delete_days must be between 1 and 180".into(),
            ));
        }
        if self.backup_attempts == 0 {
            return Err(Error::Config("backup_attempts must be at least 1".into()));
        }
        // Longer would overflow the retry time (and means "never" anyway).
        if self.retry_backoff_secs > 86_400 {
            return Err(Error::Config(
                "retry_backoff_secs must be at most 86400 (a day)".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        for (name, v) in [
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            (
                "tls_handshake_timeout_secs",
                self.tls_handshake_timeout_secs,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(Error::Config(format!("{name} must be between 1 and 3600")));
            }
        }
        for r in &self.disk_roots {
            crate::confine::check_root(Path::new(r), "disk_roots", true)?;
        }
        for r in &self.restore_roots {
            crate::confine::check_root(r, "restore_roots", false)?;
        }
        crate::schedule::Schedule::parse(&self.gc_schedule, &self.timezone)?;
        if let Some(m) = &self.alert_smtp {
            for a in m.to.iter().chain([&m.from]) {
                a.parse::<lettre::message::Mailbox>().map_err(|e| {
                    Error::Config(format!("alert_smtp: '{a}' is not a mail address: {e}"))
                })?;
            }
            if m.to.is_empty() {
                return Err(Error::Config("alert_smtp.to names no recipient".into()));
            }
        }
        Ok(())
    }

    /// The vault's regions: the primary directory, and the secondary when there is one,
    /// replicated synchronously (`journal: None`) or through a journal in the state dir.
    pub fn regions(&self, journal: bool) -> vmvault_store::Regions {
        use std::sync::Arc;
        use vmvault_store::{LocalBackend, Regions, Replication, WriteBackend};
        let primary: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(self.vault_path()));
        let secondary = self.secondary.as_ref().map(|p| {
            let b: Arc<dyn WriteBackend> = Arc::new(LocalBackend::new(p));
            b
        });
        let replication = if journal {
            Replication::Async {
                state_dir: self.state_dir.clone(),
                capacity: 1_000_000,
            }
        } else {
            Replication::Sync
        };
        Regions {
            primary,
            secondary,
            replication,
            notify: Arc::new(|m: &str| eprintln!("vmvault server: replication: {m}")),
        }
    }

    pub fn vault_path(&self) -> PathBuf {
        self.vault
            .clone()
            .unwrap_or_else(|| self.state_dir.join("vault"))
    }
}
