//! The client side of `--server`: a blocking HTTPS client that pins the server's
//! certificate by its SHA-256 fingerprint on first use (as Proxmox Backup Server's client
//! does), then refuses any other certificate for that server. Requests and answers are the
//! API crate's types (crates/api), paths its percent-encoded builders.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmvault_api::path::PathError;
use vmvault_api::{ErrorBody, ErrorDetail};

use crate::exit::InputError;

/// `~/.config/vmvault/known_servers` (or in `VMVAULT_STATE_DIR`): `host:port FINGERPRINT`.
fn known_servers_path() -> PathBuf {
    if let Some(d) = std::env::var_os("VMVAULT_STATE_DIR") {
        return PathBuf::from(d).join("known_servers");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".config/vmvault/known_servers")
}

/// `AA:BB:..` in upper case, whatever way it was typed.
pub fn normalize_fingerprint(s: &str) -> String {
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    hex.to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pinned(host: &str) -> Option<String> {
    let text = std::fs::read_to_string(known_servers_path()).ok()?;
    text.lines().find_map(|l| {
        let (h, fp) = l.split_once(' ')?;
        (h == host).then(|| fp.trim().to_string())
    })
}

fn pin(host: &str, fp: &str) -> Result<()> {
    let path = known_servers_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| l.split_once(' ').is_none_or(|(h, _)| h != host))
        .map(String::from)
        .collect();
    lines.push(format!("{host} {fp}"));
    std::fs::write(&path, lines.join("\n") + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Accepts exactly the pinned certificate (or the one the user vouched for); records the
/// one it saw so that the user can be asked.
#[derive(Debug)]
struct Pinning {
    host: String,
    expect: Option<String>,
    seen: Arc<Mutex<Option<String>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinning {
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
            Some(want) if *want == fp => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::General(format!(
                "the certificate of {} is not the trusted one",
                self.host
            ))),
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

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// A server's answer that is not a success: its JSON error, or what came instead.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// A request that mints a token and waits for approval: the token, shown this once.
    pub token: Option<String>,
}

impl ApiError {
    fn new(status: u16, detail: Option<ErrorDetail>) -> ApiError {
        match detail {
            Some(d) => ApiError {
                status,
                code: d.code,
                message: d.message,
                token: d.token,
            },
            // Not the server's own answer (a proxy's page, a cut connection): the status
            // alone says what class it is.
            None => ApiError {
                status,
                code: String::new(),
                message: "(no message)".into(),
                token: None,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server answered {} ({}): {}",
            self.status, self.code, self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// A request path from the API crate's builders; a name no path can carry is bad input.
pub fn route(p: std::result::Result<String, PathError>) -> Result<String> {
    p.map_err(|e| InputError(e.to_string()).into())
}

/// The body, up to `limit` bytes: an answer (a page of manifests) can be larger than ureq's
/// string limit, while an error is a line of JSON and whatever else is only skimmed.
fn body(resp: ureq::Response, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(resp.into_reader(), limit),
        &mut buf,
    )?;
    Ok(buf)
}

fn host_port(url: &str) -> Result<(bool, String)> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(InputError(format!(
            "--server {url}: give https://HOST:PORT (or http:// for a server started with --insecure-http)"
        ))
        .into());
    };
    let hp = rest.split('/').next().unwrap_or(rest);
    let hp = if hp
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hp.ends_with(']')
    {
        hp.to_string()
    } else {
        format!("{hp}:{}", if tls { 443 } else { 80 })
    };
    Ok((tls, hp))
}

impl Client {
    /// Connects once to check the certificate: pinned, vouched for with `trust`, or (on a
    /// terminal) accepted by the user; anything else is refused with the fingerprint shown.
    pub fn connect(server: &str, token: Option<String>, trust: Option<&str>) -> Result<Client> {
        let base = server.trim_end_matches('/').to_string();
        let (tls, host) = host_port(&base)?;
        let token = match token {
            Some(t) if t.starts_with('@') => Some(
                std::fs::read_to_string(&t[1..])
                    .with_context(|| format!("reading the token from {}", &t[1..]))?
                    .trim()
                    .to_string(),
            ),
            other => other,
        };
        if !tls {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build();
            return Ok(Client { base, token, agent });
        }
        let pinned_fp = pinned(&host);
        let trusted = trust.map(normalize_fingerprint);
        if let (Some(p), Some(t)) = (&pinned_fp, &trusted) {
            if p != t {
                bail!(
                    "{host} is pinned to certificate {p}; --trust-fingerprint {t} differs: \
                     remove its line from {} to trust a new certificate",
                    known_servers_path().display()
                );
            }
        }
        let expect = pinned_fp.clone().or(trusted.clone());
        let (agent, seen) = Self::agent(&host, expect.clone());
        let client = Client { base, token, agent };
        match client.probe() {
            Ok(()) => {
                if pinned_fp.is_none() {
                    if let Some(fp) = &expect {
                        pin(&host, fp)?;
                        eprintln!("vmvault: trusting {host} with certificate {fp} from now on");
                    }
                }
                Ok(client)
            }
            Err(e) => {
                let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(seen) = seen else { return Err(e) };
                if let Some(p) = pinned_fp {
                    bail!(
                        "the certificate of {host} changed: it is {seen}, the trusted one is {p}. \
                         Refusing to connect (if the server's certificate was renewed on purpose, \
                         remove its line from {})",
                        known_servers_path().display()
                    );
                }
                if let Some(t) = trusted {
                    bail!(
                        "the certificate of {host} is {seen}, not {t} as --trust-fingerprint says"
                    );
                }
                if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
                    eprint!(
                        "The server {host} has the certificate fingerprint (SHA-256)\n  {seen}\n\
                         Compare it with the one `vmvault server` printed at start. Trust it? [y/N] "
                    );
                    let _ = std::io::stderr().flush();
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    if line.trim().eq_ignore_ascii_case("y")
                        || line.trim().eq_ignore_ascii_case("yes")
                    {
                        return Client::connect(server, client.token, Some(&seen));
                    }
                }
                Err(InputError(format!(
                    "the server {host} is not trusted yet: its certificate fingerprint is {seen}; \
                     compare it with the one `vmvault server` printed and pass --trust-fingerprint {seen}"
                ))
                .into())
            }
        }
    }

    fn agent(host: &str, expect: Option<String>) -> (ureq::Agent, Arc<Mutex<Option<String>>>) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = Arc::new(Mutex::new(None));
        let verifier = Pinning {
            host: host.to_string(),
            expect,
            seen: seen.clone(),
            provider: provider.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(config))
            .timeout(Duration::from_secs(60))
            .build();
        (agent, seen)
    }

    /// The OpenAPI document needs no token: a cheap way to test the connection.
    fn probe(&self) -> Result<()> {
        self.agent
            .get(&format!("{}/api/v1/openapi.json", self.base))
            .call()
            .map_err(|e| anyhow!("connecting to {}: {e}", self.base))?;
        Ok(())
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self
            .agent
            .request(method, &format!("{}/api/v1{path}", self.base));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// The answer as `T`. 202 is both "accepted" (a job queued) and "waiting for a second
    /// admin" (an error body); 204 has no body, which reads as `()`.
    fn answer<T: DeserializeOwned>(
        &self,
        r: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        match r {
            Ok(resp) => {
                let status = resp.status();
                if status == 204 {
                    return serde_json::from_slice(b"null")
                        .context("the server answered 204 (no content) where an answer was due");
                }
                let bytes = body(resp, u64::MAX)
                    .with_context(|| format!("reading {}'s answer", self.base))?;
                if status == 202 {
                    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&bytes) {
                        return Err(ApiError::new(status, Some(e.error)).into());
                    }
                }
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("the answer of {} (status {status})", self.base))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let detail = body(resp, 1 << 20)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ErrorBody>(&b).ok())
                    .map(|b| b.error);
                Err(ApiError::new(status, detail).into())
            }
            Err(e) => Err(anyhow!("{}: {e}", self.base)),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("GET", path).call())
    }

    pub fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T> {
        self.answer(self.request(method, path).send_json(body))
    }

    /// A POST of raw bytes (an agent release), with extra headers.
    pub fn send_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        bytes: &[u8],
        headers: &[(&str, String)],
    ) -> Result<T> {
        let mut r = self
            .request("POST", path)
            .set("Content-Type", "application/octet-stream");
        for (k, v) in headers {
            r = r.set(k, v);
        }
        self.answer(r.send_bytes(bytes))
    }

    /// A POST with no body: the action is all in the path.
    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("POST", path).call())
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("DELETE", path).call())
    }
}
