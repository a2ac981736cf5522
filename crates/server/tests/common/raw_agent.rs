//! A host agent the tests drive by hand, so that it can send what a hostile one would: its
//! own Ed25519 key and state dir (enrolled through `vmvault_agent::enroll`, the real code),
//! made-up VMs in its heartbeats, and every request of the agent protocol written out, with
//! any job id, lease and body. It speaks over the same TLS an agent does (the agent ALPN, its
//! key as the client certificate, the server's certificate pinned), and it keeps every byte
//! the server answered (status line, headers, body), so that tests can look for what it must
//! never hear.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use vmvault_agent::client::Identity;
use vmvault_agent::AgentState;
use vmvault_api::agent::{
    base_path, disk_path, job_path, put_frame, AgentJob, BeginAnswer, BeginDisk, BeginRequest,
    CommitRequest, FoundDisk, FoundVm, Heartbeat, HEARTBEAT, LEASE_HEADER, NEXT_JOB, ZSTD,
};
use vmvault_api::BASE;

use super::Server;

/// One answer: its status and its body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a 2xx answer; returns its JSON.
    pub fn ok(&self, what: &str) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "{what}: {} {}",
            self.status,
            self.text()
        );
        self.json()
    }
}

pub struct RawAgent {
    /// The host's name as `host add` made it.
    pub host: String,
    pub dir: tempfile::TempDir,
    pub state: AgentState,
    pub identity: Identity,
    pub base: String,
    pub fingerprint: String,
    /// Random per RawAgent, as an agent process's is.
    pub instance: String,
    http: ureq::Agent,
    received: Mutex<Vec<u8>>,
}

/// A VM as an agent would report it: one raw disk `disk0` of `size` bytes.
pub fn fake_vm(name: &str, size: u64) -> FoundVm {
    FoundVm {
        name: name.to_string(),
        kind: "qemu".into(),
        state: "running".into(),
        qmp: Some(format!("/run/fake/{name}.qmp")),
        qga: None,
        disks: vec![FoundDisk {
            name: "disk0".into(),
            file: Some(format!("/var/lib/fake/{name}.raw")),
            format: "raw".into(),
            size,
        }],
    }
}

/// A commit as a well-behaved agent sends it.
pub fn commit_request(vm: &str) -> CommitRequest {
    let config = vmvault_format::VmConfig {
        name: vm.to_string(),
        cpus: 1,
        memory_mib: 512,
        firmware: "bios".into(),
        disks: vec![vmvault_format::VmDisk {
            name: "disk0".into(),
            path: format!("/var/lib/fake/{vm}.raw"),
            format: "raw".into(),
            bus: "virtio".into(),
        }],
        nics: Vec::new(),
    };
    CommitRequest {
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        source: "qemu".into(),
        consistency: "crash".into(),
        consistency_reason: "no guest agent".into(),
        vm_config: toml::to_string(&config).unwrap(),
    }
}

impl RawAgent {
    /// An agent with a fresh key that has not enrolled.
    pub fn new(s: &Server, host: &str) -> RawAgent {
        Self::made(s, host, None)
    }

    /// A state dir of its own (nothing pinned) holding a copy of `other`'s key, as a thief
    /// of its key file would have.
    pub fn with_key_of(s: &Server, other: &RawAgent) -> RawAgent {
        Self::made(s, &other.host, Some(&other.state.dir))
    }

    fn made(s: &Server, host: &str, key_from: Option<&std::path::Path>) -> RawAgent {
        let dir = tempfile::tempdir().unwrap();
        let state = AgentState::open(&dir.path().join("state")).unwrap();
        if let Some(from) = key_from {
            for f in ["host.key", "host.crt"] {
                std::fs::copy(from.join(f), state.dir.join(f)).unwrap();
            }
        }
        let identity = state.identity().unwrap();
        let fingerprint = s.fingerprint();
        let config = tls_config(&fingerprint, Some(&identity));
        let http = ureq::AgentBuilder::new()
            .tls_config(Arc::new(config))
            .timeout(Duration::from_secs(120))
            .build();
        let mut instance = [0u8; 16];
        vmvault_format::random_bytes(&mut instance);
        RawAgent {
            host: host.to_string(),
            dir,
            state,
            identity,
            base: s.base.clone(),
            fingerprint,
            instance: hex::encode(instance),
            http,
            received: Mutex::new(Vec::new()),
        }
    }

    /// `host add HOST` by the admin, and this agent enrolled with the code (trusting the
    /// server's fingerprint, as `--trust-fingerprint` does).
    pub fn enrolled(s: &Server, host: &str) -> RawAgent {
        let a = RawAgent::new(s, host);
        let code = add_host(s, host);
        a.enroll(&code).unwrap();
        a
    }

    /// Enrolls through the agent's own code.
    pub fn enroll(
        &self,
        code: &str,
    ) -> Result<vmvault_agent::state::Pins, vmvault_agent::AgentError> {
        vmvault_agent::enroll(&self.state, &self.base, code, Some(&self.fingerprint))
    }

    /// The raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.state.public_key(&self.identity).unwrap()
    }

    /// Everything the server answered this agent so far.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }

    /// Any request: `path` is the whole path (`/api/v1/...`); `body` a content type and
    /// bytes. Recorded: status line, headers and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        lease: Option<&str>,
        body: Option<(&str, &[u8])>,
    ) -> Reply {
        let mut r = self.http.request(method, &format!("{}{path}", self.base));
        if let Some(l) = lease {
            r = r.set(LEASE_HEADER, l);
        }
        let res = match body {
            Some((ct, b)) => r.set("Content-Type", ct).send_bytes(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let mut record = format!("{} {}\n", status, resp.status_text()).into_bytes();
        for name in resp.headers_names() {
            for v in resp.all(&name) {
                record.extend_from_slice(format!("{name}: {v}\n").as_bytes());
            }
        }
        let mut body = Vec::new();
        resp.into_reader().read_to_end(&mut body).unwrap();
        record.extend_from_slice(&body);
        self.received.lock().unwrap().extend_from_slice(&record);
        Reply { status, body }
    }

    /// A path under `/api/v1` (as the agent's own path helpers give them).
    pub fn api(path: &str) -> String {
        format!("{BASE}{path}")
    }

    pub fn post(&self, path: &str, lease: Option<&str>, body: &impl Serialize) -> Reply {
        let text = serde_json::to_vec(body).unwrap();
        self.request(
            "POST",
            &Self::api(path),
            lease,
            Some(("application/json", &text)),
        )
    }

    pub fn post_bytes(&self, path: &str, lease: Option<&str>, body: &[u8]) -> Reply {
        self.request(
            "POST",
            &Self::api(path),
            lease,
            Some(("application/octet-stream", body)),
        )
    }

    pub fn get(&self, path: &str, lease: Option<&str>) -> Reply {
        self.request("GET", &Self::api(path), lease, None)
    }

    pub fn heartbeat(&self, vms: &[FoundVm]) -> Reply {
        let hb = Heartbeat {
            version: vmvault_agent::VERSION.into(),
            target: "x86_64-unknown-linux-gnu".into(),
            rolled_back: None,
            instance: self.instance.clone(),
            vms: vms.to_vec(),
        };
        self.post(HEARTBEAT, None, &hb)
    }

    /// The next job the server leases to this host, waiting up to `wait` seconds.
    pub fn take_job_within(&self, wait: u64) -> Option<AgentJob> {
        let r = self.get(&format!("{NEXT_JOB}?wait={wait}"), None);
        match r.status {
            204 => None,
            200 => Some(serde_json::from_slice(&r.body).unwrap()),
            s => panic!("{}: jobs/next: {s} {}", self.host, r.text()),
        }
    }

    /// The next job; there must be one within 5 s.
    pub fn take_job(&self) -> AgentJob {
        self.take_job_within(5)
            .unwrap_or_else(|| panic!("{}: no job came", self.host))
    }

    pub fn begin(&self, job: &AgentJob, disks: &[(&str, u64)]) -> BeginAnswer {
        let req = BeginRequest {
            disks: disks
                .iter()
                .map(|(name, size)| BeginDisk {
                    name: name.to_string(),
                    size: *size,
                    format: "raw".into(),
                })
                .collect(),
        };
        let r = self.post(&job_path(job.id, "begin"), Some(&job.lease), &req);
        r.ok("begin");
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn base_ids(&self, job: &AgentJob, disk: usize) -> Vec<[u8; 32]> {
        let r = self.get(&base_path(job.id, disk), Some(&job.lease));
        r.ok("base");
        r.body
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect()
    }

    pub fn reuse(&self, job: &AgentJob, disk: usize, claims: &[(u64, String)]) -> Reply {
        self.post(
            &disk_path(job.id, disk, "reuse"),
            Some(&job.lease),
            &json!({ "claims": claims }),
        )
    }

    pub fn zero(&self, job: &AgentJob, disk: usize, runs: &[(u64, u64)]) -> Reply {
        self.post(
            &disk_path(job.id, disk, "zero"),
            Some(&job.lease),
            &json!({ "runs": runs }),
        )
    }

    pub fn chunks(&self, job: &AgentJob, disk: usize, body: &[u8]) -> Reply {
        self.post_bytes(&disk_path(job.id, disk, "chunks"), Some(&job.lease), body)
    }

    pub fn commit(&self, job: &AgentJob, req: &impl Serialize) -> Reply {
        self.post(&job_path(job.id, "commit"), Some(&job.lease), req)
    }

    /// A whole well-behaved backup of one disk `disk0` holding `data`: the positions in
    /// `claim` are claimed from the base point (whose ids the server gives), all-zero chunks
    /// are said as zero runs, the rest is sent zstd-compressed. Returns the point's id.
    pub fn backup(&self, job: &AgentJob, data: &[u8], claim: &[u64]) -> String {
        let begun = self.begin(job, &[("disk0", data.len() as u64)]);
        let cs = begun.chunk_size as usize;
        let count = data.len().div_ceil(cs);
        let mut send: Vec<u64> = Vec::new();
        let mut zeros = Vec::new();
        if !claim.is_empty() {
            let ids = self.base_ids(job, 0);
            let claims: Vec<(u64, String)> = claim
                .iter()
                .map(|&p| (p, hex::encode(ids[p as usize])))
                .collect();
            let missing = self.reuse(job, 0, &claims).ok("reuse")["missing"].clone();
            for m in missing.as_array().unwrap() {
                send.push(m.as_u64().unwrap());
            }
        }
        for p in 0..count as u64 {
            if claim.contains(&p) {
                continue;
            }
            if vmvault_format::is_zero(chunk(data, cs, p)) {
                zeros.push((p, 1));
            } else {
                send.push(p);
            }
        }
        if !zeros.is_empty() {
            self.zero(job, 0, &zeros).ok("zero");
        }
        for batch in send.chunks(8) {
            let mut body = Vec::new();
            for &p in batch {
                let c = chunk(data, cs, p);
                put_frame(
                    &mut body,
                    p,
                    ZSTD,
                    c.len() as u32,
                    &zstd::bulk::compress(c, 3).unwrap(),
                );
            }
            self.chunks(job, 0, &body).ok("chunks");
        }
        let r = self.commit(job, &commit_request(&job.vm));
        r.ok("commit")["point"].as_str().unwrap().to_string()
    }
}

/// Chunk `p` of `data`.
pub fn chunk(data: &[u8], chunk_size: usize, p: u64) -> &[u8] {
    let start = p as usize * chunk_size;
    &data[start..(start + chunk_size).min(data.len())]
}

/// `host add NAME` by the admin: the one-time code.
pub fn add_host(s: &Server, host: &str) -> String {
    let code = s.ok(
        &s.admin.clone(),
        "POST",
        "/api/v1/hosts",
        Some(json!({ "name": host })),
    );
    code["code"].as_str().unwrap().to_string()
}

/// A TLS client config that trusts exactly the server's certificate; with `identity`, an
/// agent's (its key as the client certificate, the agent ALPN), without, a browser's or the
/// CLI's (no certificate, no ALPN).
pub fn tls_config(fingerprint: &str, identity: Option<&Identity>) -> rustls::ClientConfig {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Pin(String, Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for Pin {
        fn verify_server_cert(
            &self,
            cert: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if vmvault_server::tls::fingerprint(cert) == self.0 {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(rustls::Error::General("not the pinned certificate".into()))
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.1.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin(fingerprint.to_string(), provider)));
    match identity {
        Some(id) => {
            let mut c = builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(id.cert.clone())],
                    PrivateKeyDer::Pkcs8(id.key_pkcs8.clone().into()),
                )
                .unwrap();
            c.alpn_protocols = vec![vmvault_api::agent::ALPN.to_vec()];
            c
        }
        None => builder.with_no_client_auth(),
    }
}

/// A plain TLS client (no certificate, no agent ALPN), as browsers and the CLI connect.
pub fn user_http(fingerprint: &str) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls_config(fingerprint, None)))
        .build()
}

/// One TLS connection held open by hand, so that a test knows its requests share it:
/// HTTP/1.1 keep-alive, written and read without a client library.
pub struct KeptAlive {
    stream: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl KeptAlive {
    pub fn open(agent: &RawAgent) -> KeptAlive {
        let addr = agent.base.trim_start_matches("https://");
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let config = tls_config(&agent.fingerprint, Some(&agent.identity));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        KeptAlive {
            stream: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        }
    }

    /// One request on this connection; `None` if the server had closed it.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        lease: Option<&str>,
        json: Option<&Value>,
    ) -> Option<Reply> {
        let body = json.map(|j| j.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
            body.len()
        );
        if json.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(l) = lease {
            head.push_str(&format!("{LEASE_HEADER}: {l}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        let s = self.stream.get_mut();
        if s.write_all(head.as_bytes())
            .and_then(|_| s.flush())
            .is_err()
        {
            return None;
        }
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let status: u16 = line.split(' ').nth(1)?.parse().ok()?;
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':')?;
            match k.to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().ok()?,
                "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size).ok()?;
                let n = usize::from_str_radix(size.trim(), 16).ok()?;
                let mut part = vec![0u8; n + 2];
                self.stream.read_exact(&mut part).ok()?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&part[..n]);
            }
        } else {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).ok()?;
        }
        Some(Reply { status, body })
    }
}
