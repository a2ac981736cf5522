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
    /// The vault the server works on: a directory (created when missing),
    /// `s3://bucket/prefix` or `azblob://container/prefix`; `STATE_DIR/vault` by default.
    pub vault: Option<String>,
    /// The object store's endpoint, for an s3:// or azblob:// vault not on AWS or Azure.
    pub endpoint: Option<String>,
    /// The S3 region of an s3:// vault (else AWS_REGION, else us-east-1).
    pub region: Option<String>,
    /// The Azure storage account of an azblob:// vault (else AZURE_STORAGE_ACCOUNT).
    pub account: Option<String>,
    /// A second region the vault is replicated to, of any kind (a directory, s3:// or
    /// azblob://; its credentials from `VMVAULT_SECONDARY_*` when they differ). A vault that
    /// records its secondary (`vault create --secondary`) needs none here. Jobs write both
    /// regions before a write returns; the server's own writes (markers, prunes) go through
    /// a journaled queue whose length is the replication lag in /metrics.
    pub secondary: Option<String>,
    pub secondary_endpoint: Option<String>,
    pub secondary_region: Option<String>,
    pub secondary_account: Option<String>,
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
    /// Run the agent for this machine in-process, as host `HOSTNAME` (over TLS only).
    pub own_host: bool,
    /// Where that agent looks for QMP sockets.
    pub own_host_qmp_globs: Vec<String>,
    /// Whether it also finds QEMU processes by their command lines.
    pub own_host_scan_processes: bool,
    /// The public half (hex) of an offline release key: the server then signs no release
    /// itself, and `release add` needs a signature made with `vmvault release sign`.
    pub release_public_key: Option<String>,
    /// Seconds between an agent's heartbeats (told to it in each answer).
    pub agent_heartbeat_secs: u64,
    /// An agent not heard from for this long shows as silent in `hosts` and is alerted.
    pub agent_silence_alert_secs: u64,
    /// A running agent job with no request for this long fails (its lock goes; no point).
    pub agent_job_silence_secs: u64,
    /// A queued job for a host whose agent has not taken it for this long fails, alerted.
    pub agent_job_wait_secs: u64,
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
            endpoint: None,
            region: None,
            account: None,
            secondary: None,
            secondary_endpoint: None,
            secondary_region: None,
            secondary_account: None,
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
            release_public_key: None,
            own_host: true,
            own_host_qmp_globs: vec!["/run/vmvault/qmp/*.sock".into()],
            own_host_scan_processes: true,
            agent_heartbeat_secs: 30,
            agent_silence_alert_secs: 300,
            agent_job_silence_secs: 120,
            agent_job_wait_secs: 3600,
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
    /// Turns the own host's agent off.
    pub no_own_host: bool,
    pub vault: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub account: Option<String>,
    pub secondary: Option<String>,
    pub secondary_endpoint: Option<String>,
    pub secondary_region: Option<String>,
    pub secondary_account: Option<String>,
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
        if over.no_own_host {
            c.own_host = false;
        }
        for (field, v) in [
            (&mut c.vault, over.vault),
            (&mut c.endpoint, over.endpoint),
            (&mut c.region, over.region),
            (&mut c.account, over.account),
            (&mut c.secondary, over.secondary),
            (&mut c.secondary_endpoint, over.secondary_endpoint),
            (&mut c.secondary_region, over.secondary_region),
            (&mut c.secondary_account, over.secondary_account),
        ] {
            if v.is_some() {
                *field = v;
            }
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
        let primary = self.primary_location()?;
        if let Some(s) = self.secondary_location()? {
            if s.location == primary.location {
                return Err(Error::Config(format!(
                    "secondary: {} is the vault itself",
                    s.describe()
                )));
            }
        }
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

    /// Where the vault is, as the configuration names it.
    pub fn primary_location(&self) -> Result<vmvault_open::Location> {
        let vault = match &self.vault {
            Some(v) => v.clone(),
            None => self.state_dir.join("vault").display().to_string(),
        };
        vmvault_open::Location::new(
            &vault,
            self.endpoint.clone(),
            self.region.clone(),
            self.account.clone(),
        )
        .map_err(|e| Error::Config(format!("vault: {e}")))
    }

    /// The secondary region the configuration names, if any.
    pub fn secondary_location(&self) -> Result<Option<vmvault_open::Location>> {
        self.secondary
            .as_ref()
            .map(|s| {
                vmvault_open::Location::new(
                    s,
                    self.secondary_endpoint.clone(),
                    self.secondary_region.clone(),
                    self.secondary_account.clone(),
                )
                .map_err(|e| Error::Config(format!("secondary: {e}")))
            })
            .transpose()
    }

    /// How the vault is opened: its primary and the regions its record names; writes reach
    /// the secondary at once (`queue: false`, jobs) or through a journal in the state dir.
    pub fn spec(&self, queue: bool) -> Result<vmvault_open::Spec> {
        use std::sync::Arc;
        Ok(vmvault_open::Spec {
            given: self.primary_location()?,
            reach: vmvault_open::Reach::Both,
            feed: if queue {
                vmvault_open::Feed::Queue {
                    capacity: 1_000_000,
                }
            } else {
                vmvault_open::Feed::Sync
            },
            state_dir: self.state_dir.clone(),
            notify: Arc::new(|m: &str| eprintln!("vmvault server: replication: {m}")),
            cancel: None,
        })
    }

    /// The server's own files on this machine (a local vault and secondary among them).
    pub fn local_paths(&self) -> Vec<PathBuf> {
        let mut out = vec![self.state_dir.clone()];
        if let Ok(p) = self.primary_location() {
            out.extend(p.local_path());
        }
        if let Ok(Some(s)) = self.secondary_location() {
            out.extend(s.local_path());
        }
        out.extend(self.passphrase_file.clone());
        out
    }
}
