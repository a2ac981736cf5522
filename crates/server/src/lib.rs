//! The vault server: REST API, auth, scheduler, job runner, catalog database, metrics and
//! alerts. It drives the engine for backups and restores and never reads byte formats itself.

pub mod alerts;
pub mod api;
pub mod app;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod confine;
pub mod db;
mod error;
pub mod hosts;
pub mod jobs;
pub mod metrics;
pub mod own_host;
pub mod peer;
pub mod relay;
pub mod relay_restore;
pub mod releases;
pub mod schedule;
pub mod tls;
mod work;

use std::sync::Arc;

pub use app::App;
pub use config::{Overrides, ServerConfig};
pub use error::{Error, Result};
pub use schedule::{Clock, ManualClock, SystemClock};
pub use vmvault_api::{ErrorBody, ErrorDetail};

/// A started server: where it listens and what a client needs to reach it.
pub struct Started {
    pub app: Arc<App>,
    pub addr: std::net::SocketAddr,
    /// The certificate's SHA-256 fingerprint; `None` with plain HTTP.
    pub fingerprint: Option<String>,
}

/// Opens the state, binds the listener and starts the scheduler and job runner; the caller
/// then awaits [`tls::serve`] with `listener`.
pub async fn start(
    cfg: ServerConfig,
    clock: Arc<dyn Clock>,
    say: &dyn Fn(&str),
) -> Result<(Started, tokio::net::TcpListener, Option<tls::Tls>)> {
    let listen = cfg.listen;
    let insecure = cfg.insecure_http;
    let state_dir = cfg.state_dir.clone();
    let app = App::open(cfg, clock, say)?;
    let (tls, fingerprint) = if insecure {
        (None, None)
    } else {
        let id = tls::load_or_create(&state_dir)?;
        let fp = tls::fingerprint(&id.cert);
        (Some(tls::server_config(&id)?), Some(fp))
    };
    *app.fingerprint.lock().unwrap_or_else(|e| e.into_inner()) = fingerprint.clone();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("listening on {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;
    app.start_background()?;
    if app.cfg.own_host {
        app.start_own_host(addr, say)?;
    }
    Ok((
        Started {
            app,
            addr,
            fingerprint,
        },
        listener,
        tls,
    ))
}
