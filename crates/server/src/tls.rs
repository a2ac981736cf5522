//! TLS: the server's certificate, and accepting connections (plain HTTP only on loopback and
//! only when asked: the config check refuses anything else).
//!
//! The certificate is self-signed, made with rcgen on first start, kept in the state
//! dir; clients pin its SHA-256 fingerprint on first use (as Proxmox Backup Server does).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::app::App;
use crate::{Error, Result};

pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// The SHA-256 of a certificate's DER bytes as `AA:BB:...`, the form people compare.
pub fn fingerprint(cert_der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert_der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads `tls/cert.der` and `tls/key.der` from the state dir, making them on first start.
pub fn load_or_create(state_dir: &Path) -> Result<Identity> {
    let dir = state_dir.join("tls");
    let cert_path = dir.join("cert.der");
    let key_path = dir.join("key.der");
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read(&cert_path)
            .map_err(|e| Error::io(format!("reading {}", cert_path.display()), e))?;
        let key = std::fs::read(&key_path)
            .map_err(|e| Error::io(format!("reading {}", key_path.display()), e))?;
        return Ok(Identity {
            cert: CertificateDer::from(cert),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        });
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let host = vmvault_store::locks::hostname();
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        host,
    ];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::Tls(format!("making the certificate: {e}")))?;
    let key = made.key_pair.serialize_der();
    // The key first, then the certificate: a start interrupted between the two makes a new
    // pair next time instead of pairing a certificate with a key it does not match.
    crate::auth::write_secret(&key_path, "")?;
    std::fs::write(&key_path, &key)
        .map_err(|e| Error::io(format!("writing {}", key_path.display()), e))?;
    std::fs::write(&cert_path, made.cert.der())
        .map_err(|e| Error::io(format!("writing {}", cert_path.display()), e))?;
    Ok(Identity {
        cert: made.cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    })
}

/// The two TLS configurations of one listener: browsers and the CLI are never asked for a
/// certificate; connections offering the agent ALPN must present one (see [`crate::peer`]).
#[derive(Clone)]
pub struct Tls {
    pub users: Arc<rustls::ServerConfig>,
    pub agents: Arc<rustls::ServerConfig>,
}

pub fn server_config(id: &Identity) -> Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut users = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| Error::Tls(e.to_string()))?;
    users.alpn_protocols = vec![b"http/1.1".to_vec()];
    let verifier = Arc::new(crate::peer::AgentCertVerifier {
        provider: provider.clone(),
    });
    let mut agents = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| Error::Tls(e.to_string()))?;
    agents.alpn_protocols = vec![vmvault_api::agent::ALPN.to_vec()];
    Ok(Tls {
        users: Arc::new(users),
        agents: Arc::new(agents),
    })
}

/// Completes the handshake with the configuration the client's ALPN asks for; what the
/// peer proved goes with every request of the connection.
async fn handshake(
    tls: &Tls,
    stream: tokio::net::TcpStream,
) -> std::io::Result<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    crate::peer::Peer,
)> {
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream).await?;
    let agent = start
        .client_hello()
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == vmvault_api::agent::ALPN));
    let config = if agent { &tls.agents } else { &tls.users };
    let stream = start.into_stream(config.clone()).await?;
    let key = if agent {
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::peer::host_key)
    } else {
        None
    };
    Ok((stream, crate::peer::Peer { agent: key }))
}

/// Holds one of the `max_connections` slots and the open-connection count while a
/// connection lives.
struct Slot {
    app: Arc<App>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.app.http_conns.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
///
/// No client can end it or keep others out: an `accept()` error (out of descriptors, a
/// connection reset before it was taken) is logged and retried after a pause, never
/// returned; at most `max_connections` are served at once (the others wait unaccepted in
/// the kernel's backlog, using no descriptor of ours); a TLS handshake and a request's
/// headers (also the wait for the next request on a kept-alive connection) each have a time
/// limit, so idle or slow clients give their slot back.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let router = crate::api::router(app.clone());
    let slots = Arc::new(Semaphore::new(app.cfg.max_connections));
    let handshake_limit = Duration::from_secs(app.cfg.tls_handshake_timeout_secs);
    let headers = Duration::from_secs(app.cfg.header_read_timeout_secs);
    let agent_idle = headers.max(Duration::from_secs(app.cfg.agent_heartbeat_secs + 15));
    let mut failures = 0u64;
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => return Ok(()),
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => return Ok(()),
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if failures > 0 {
                    eprintln!(
                        "vmvault server: accepting connections again (after {failures} failed \
                         accept(s))"
                    );
                    failures = 0;
                }
                stream
            }
            Err(e) => {
                // Said once per run of failures: a flood must not flood the log too.
                if failures == 0 {
                    eprintln!(
                        "vmvault server: accepting a connection: {e}; retrying (connections \
                         wait meanwhile)"
                    );
                }
                failures += 1;
                drop(permit);
                // The pause gives open connections time to end and free their descriptors;
                // it grows to a second so that a lasting shortage costs no CPU.
                let pause = Duration::from_millis(10u64 << failures.min(7)).min(ACCEPT_PAUSE_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = &mut shutdown => return Ok(()),
                }
            }
        };
        app.http_conns.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            app: app.clone(),
            _permit: permit,
        };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(headers);
            // A client that fails or stalls the handshake (an untrusted certificate, a port
            // scan, a slow attack) or drops the connection is its own business: nothing to
            // report.
            match tls {
                Some(tls) => {
                    let shaken =
                        tokio::time::timeout(handshake_limit, handshake(&tls, stream)).await;
                    if let Ok(Ok((stream, peer))) = shaken {
                        // A presented agent certificate (proved in the handshake) keeps its
                        // connection through the wait between heartbeats, so that each one
                        // does not cost a handshake, nor race the server closing it.
                        if peer.agent.is_some() {
                            http.header_read_timeout(agent_idle);
                        }
                        let service = TowerToHyperService::new(with_peer(router, peer));
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
                None => {
                    let service =
                        TowerToHyperService::new(with_peer(router, crate::peer::Peer::default()));
                    let _ = http.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

/// The router with the connection's [`crate::peer::Peer`] in every request's extensions.
fn with_peer(
    router: axum::Router,
    peer: crate::peer::Peer,
) -> impl tower::Service<
    axum::http::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    use tower::ServiceExt;
    router.map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        req
    })
}

/// The longest pause between failed accepts.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
