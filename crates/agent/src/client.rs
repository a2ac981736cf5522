//! The agent's connection to the server: TLS with the server's certificate pinned by its
//! fingerprint (as the CLI pins it), the host key as a client certificate, and the agent ALPN
//! (the only connections the server asks for a certificate).

// ureq's requests return its own large error type; the retry wraps them as they are.
#![allow(clippy::result_large_err)]

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmvault_api::agent::LEASE_HEADER;

use crate::{AgentError, Result};

/// The SHA-256 of a certificate as `AA:BB:...`, the form the server prints.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Debug)]
struct Pinned {
    expect: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp.clone());
        match &self.expect {
            // Enrollment without a fingerprint: its proofs cover the certificate seen.
            None => Ok(ServerCertVerified::assertion()),
            Some(want) if *want == fp => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::General(
                "the server's certificate is not the pinned one".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The host's key and the certificate that carries it.
pub struct Identity {
    pub cert: Vec<u8>,
    pub key_pkcs8: Vec<u8>,
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
    seen: Arc<Mutex<Option<String>>>,
}

/// An answer that is not a success.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl Client {
    /// `expect`: the pinned fingerprint; `None` only for enrollment.
    pub fn new(base: &str, id: &Identity, expect: Option<String>) -> Result<Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = Arc::new(Mutex::new(None));
        let verifier = Pinned {
            expect,
            seen: seen.clone(),
            provider: provider.clone(),
        };
        let key = PrivateKeyDer::Pkcs8(id.key_pkcs8.clone().into());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AgentError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![CertificateDer::from(id.cert.clone())], key)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![vmvault_api::agent::ALPN.to_vec()];
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(config))
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(Duration::from_secs(120))
            .timeout_write(Duration::from_secs(120))
            .build();
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("https://") {
            return Err(AgentError::Input(format!(
                "{base}: the server's address must start with https:// (agents talk TLS only)"
            )));
        }
        Ok(Client { base, agent, seen })
    }

    /// The fingerprint of the certificate the last connection saw.
    pub fn seen_fingerprint(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{path}", self.base, vmvault_api::BASE)
    }

    fn request(&self, method: &str, path: &str, lease: Option<&str>) -> ureq::Request {
        let r = self.agent.request(method, &self.url(path));
        match lease {
            Some(l) => r.set(LEASE_HEADER, l),
            None => r,
        }
    }

    /// Sends `req` (made by `make`), again once when the connection broke before an answer
    /// came: a kept-alive connection the server had just closed. Every agent request may be
    /// sent twice: the server takes the same fill, heartbeat or log line again, and a commit
    /// whose answer was lost is refused the second time without harm.
    fn send(
        &self,
        make: impl Fn() -> std::result::Result<ureq::Response, ureq::Error>,
    ) -> std::result::Result<ureq::Response, ureq::Error> {
        match make() {
            Err(ureq::Error::Transport(t)) if t.kind() == ureq::ErrorKind::Io => make(),
            r => r,
        }
    }

    fn read(&self, r: std::result::Result<ureq::Response, ureq::Error>) -> Result<Option<Vec<u8>>> {
        match r {
            Ok(resp) if resp.status() == 204 => Ok(None),
            Ok(resp) => {
                let mut body = Vec::new();
                resp.into_reader()
                    .take(1 << 30)
                    .read_to_end(&mut body)
                    .map_err(|e| {
                        AgentError::Server(format!("{}: reading the answer: {e}", self.base))
                    })?;
                Ok(Some(body))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<vmvault_api::ErrorBody>(&text)
                    .map(|b| b.error.message)
                    .unwrap_or(text);
                Err(AgentError::Refused(Refused { status, message }))
            }
            Err(e) => Err(AgentError::Server(format!("{}: {e}", self.base))),
        }
    }

    fn json<T: DeserializeOwned>(&self, body: Option<Vec<u8>>) -> Result<T> {
        let body = body.unwrap_or_else(|| b"null".to_vec());
        serde_json::from_slice(&body).map_err(|e| {
            AgentError::Server(format!(
                "{}: an answer this agent cannot read: {e}",
                self.base
            ))
        })
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        lease: Option<&str>,
        body: &impl Serialize,
    ) -> Result<T> {
        let text = serde_json::to_string(body).map_err(|e| AgentError::Input(e.to_string()))?;
        let r = self.send(|| {
            self.request("POST", path, lease)
                .set("Content-Type", "application/json")
                .send_string(&text)
        });
        let body = self.read(r)?;
        self.json(body)
    }

    /// A POST whose answer has no body that matters (204).
    pub fn tell(&self, path: &str, lease: Option<&str>, body: &impl Serialize) -> Result<()> {
        let text = serde_json::to_string(body).map_err(|e| AgentError::Input(e.to_string()))?;
        let r = self.send(|| {
            self.request("POST", path, lease)
                .set("Content-Type", "application/json")
                .send_string(&text)
        });
        self.read(r).map(|_| ())
    }

    pub fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        lease: Option<&str>,
        body: &[u8],
    ) -> Result<T> {
        let r = self.send(|| {
            self.request("POST", path, lease)
                .set("Content-Type", "application/octet-stream")
                .send_bytes(body)
        });
        let body = self.read(r)?;
        self.json(body)
    }

    /// A GET: `None` for 204.
    pub fn get_raw(&self, path: &str, lease: Option<&str>) -> Result<Option<Vec<u8>>> {
        let r = self.send(|| self.request("GET", path, lease).call());
        self.read(r)
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str, lease: Option<&str>) -> Result<Option<T>> {
        match self.get_raw(path, lease)? {
            None => Ok(None),
            Some(b) => self.json(Some(b)).map(Some),
        }
    }
}
