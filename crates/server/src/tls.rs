//! TLS: the server's certificate, and accepting connections (plain HTTP only on loopback and
//! only when asked: the config check refuses anything else).
//!
//! The certificate is self-signed, made with rcgen on first start, kept in the state
//! dir; clients pin its SHA-256 fingerprint on first use (as Proxmox Backup Server does).

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

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

pub fn server_config(id: &Identity) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let router = crate::api::router(app);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r.map_err(|e| Error::io("accepting a connection", e))?,
            _ = &mut shutdown => return Ok(()),
        };
        let service = TowerToHyperService::new(router.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that fails the handshake (an untrusted certificate, a port scan) is
            // its own business: nothing to report.
            match acceptor {
                Some(acc) => {
                    if let Ok(tls) = acc.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}
