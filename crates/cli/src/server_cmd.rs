//! `vmvault server`: runs the vault server (crates/server) in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use vmvault_server::{Overrides, ServerConfig, SystemClock};

use crate::Global;

/// Flags and environment variables; each overrides the config file's value.
#[derive(Args)]
pub struct ServerArgs {
    /// A TOML file with the server's settings (docs/design.md, "Server").
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the state database, TLS certificate and first admin token live.
    #[arg(long, env = "VMVAULT_SERVER_STATE", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Address and port to listen on (default 127.0.0.1:8443).
    #[arg(long, env = "VMVAULT_SERVER_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Plain HTTP instead of TLS: only on a loopback address.
    #[arg(long)]
    insecure_http: bool,
    /// Do not run the agent for this machine in-process (it finds the VMs running here and
    /// backs them up as host HOSTNAME; over TLS only).
    #[arg(long, env = "VMVAULT_SERVER_NO_OWN_HOST", value_parser = clap::builder::BoolishValueParser::new())]
    no_own_host: bool,
    /// Jobs that run at once.
    #[arg(long, value_name = "N")]
    max_jobs: Option<usize>,
    /// A folder VMs' disks may be in, or a device pattern (`/dev/vg0/*`); repeat for more.
    /// Added to the config file's `disk_roots`. None at all: nothing can be protected.
    #[arg(
        long = "disk-root",
        env = "VMVAULT_SERVER_DISK_ROOTS",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    disk_roots: Vec<String>,
    /// A folder restores may write into (each a new folder below it); repeat for more.
    /// Added to the config file's `restore_roots`. None at all: no restore.
    #[arg(
        long = "restore-root",
        env = "VMVAULT_SERVER_RESTORE_ROOTS",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    restore_roots: Vec<PathBuf>,
    /// Connections served at once (default 1024); more wait to be accepted.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// A second region to replicate the vault to: a directory, s3://bucket/prefix or
    /// azblob://container/prefix (not needed when the vault records its secondary).
    #[arg(long, value_name = "LOCATION")]
    secondary: Option<String>,
    /// The secondary's object-store endpoint.
    #[arg(long, value_name = "URL", requires = "secondary")]
    secondary_endpoint: Option<String>,
    /// The secondary's S3 region.
    #[arg(long, value_name = "REGION", requires = "secondary")]
    secondary_region: Option<String>,
    /// The secondary's Azure storage account.
    #[arg(long, value_name = "ACCOUNT", requires = "secondary")]
    secondary_account: Option<String>,
}

pub fn run(g: &Global, args: ServerArgs) -> Result<()> {
    // The vault is the global --vault (any location, with --endpoint/--region/--account)
    // when given.
    let over = Overrides {
        state_dir: args.state_dir,
        listen: args.listen,
        insecure_http: args.insecure_http,
        no_own_host: args.no_own_host,
        vault: g.vault.clone(),
        endpoint: g.endpoint.clone(),
        region: g.region.clone(),
        account: g.account.clone(),
        secondary: args.secondary,
        secondary_endpoint: args.secondary_endpoint,
        secondary_region: args.secondary_region,
        secondary_account: args.secondary_account,
        passphrase_file: g.password_file.clone(),
        passphrase: std::env::var("VMVAULT_PASSWORD").ok(),
        max_jobs: args.max_jobs,
        disk_roots: args.disk_roots,
        restore_roots: args.restore_roots,
        max_connections: args.max_connections,
    };
    let cfg = ServerConfig::load(args.config.as_deref(), over)?;
    // The own host's agent quiesces guests as `agent run` does: a helper process holds each
    // freeze, so a guest thaws even if the server dies.
    vmvault_server::own_host::use_quiesce(Box::new(|qga, scripts| {
        Box::new(crate::qemu::GuestAgent::new(vmvault_qemu::QuiesceOptions {
            qga,
            scripts,
            freeze_limit: std::time::Duration::from_secs(60),
        })) as Box<dyn vmvault_engine::Quiesce>
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let say = |m: &str| eprintln!("vmvault server: {m}");
        let (started, listener, tls) =
            vmvault_server::start(cfg, Arc::new(SystemClock), &say).await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        eprintln!("vmvault server: listening on {scheme}://{}", started.addr);
        if let Some(fp) = &started.fingerprint {
            eprintln!("vmvault server: certificate fingerprint (SHA-256) {fp}");
        }
        let app = started.app.clone();
        // Ctrl-C or SIGTERM (systemd's stop): stop accepting, leave the rest to the
        // restart's recovery (a job cut off is marked failed then).
        let shutdown = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        let r = vmvault_server::tls::serve(started.app, listener, tls, shutdown).await;
        app.stop();
        eprintln!("vmvault server: stopped");
        r
    })?;
    Ok(())
}
