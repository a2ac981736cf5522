//! The client side of `--server`: a blocking HTTPS client that pins the server's
//! certificate by its SHA-256 fingerprint on first use (as Proxmox Backup Server's client
//! does), then refuses any other certificate for that server.

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

    fn answer<T: DeserializeOwned>(
        &self,
        r: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<T> {
        match r {
            Ok(resp)
                if resp.status() == 202
                    && resp
                        .header("content-type")
                        .is_some_and(|c| c.contains("json")) =>
            {
                let v: serde_json::Value = resp.into_json()?;
                if let Some(e) = v.get("error") {
                    return Err(ApiError {
                        status: 202,
                        code: e["code"].as_str().unwrap_or("").into(),
                        message: e["message"].as_str().unwrap_or("").into(),
                    }
                    .into());
                }
                Ok(serde_json::from_value(v)?)
            }
            Ok(resp) if resp.status() == 204 => {
                Ok(serde_json::from_value(serde_json::Value::Null)?)
            }
            Ok(resp) => Ok(resp.into_json()?),
            Err(ureq::Error::Status(status, resp)) => {
                let v: serde_json::Value = resp.into_json().unwrap_or_default();
                Err(ApiError {
                    status,
                    code: v["error"]["code"].as_str().unwrap_or("").into(),
                    message: v["error"]["message"]
                        .as_str()
                        .unwrap_or("(no message)")
                        .into(),
                }
                .into())
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

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.answer(self.request("DELETE", path).call())
    }
}
