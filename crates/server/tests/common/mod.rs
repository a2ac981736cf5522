//! A real server (the library, on an ephemeral loopback port, plain HTTP) with a fresh state
//! dir and vault per test (its folder the disk and restore roots), and a small HTTP client
//! with real tokens.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use vmvault_server::{App, Clock, ServerConfig};

pub mod raw_agent;
pub mod storage;

/// The ids of a page of recovery points (`GET /recovery-points`).
pub fn ids(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub base: String,
    pub app: Arc<App>,
    pub admin: String,
    rt: tokio::runtime::Runtime,
    /// The TLS certificate's fingerprint the client pins; `None` over plain HTTP.
    pin: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Server {
    pub fn start(clock: Arc<dyn Clock>) -> Server {
        Self::start_with(clock, |_| {})
    }

    /// Over TLS, as agents need (they talk nothing else).
    pub fn start_tls(clock: Arc<dyn Clock>) -> Server {
        Self::start_with(clock, |c| c.insecure_http = false)
    }

    /// The TLS certificate's fingerprint (TLS servers only).
    pub fn fingerprint(&self) -> String {
        self.app.fingerprint().expect("a TLS server")
    }

    pub fn start_with(clock: Arc<dyn Clock>, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig {
            state_dir: dir.path().join("state"),
            listen: "127.0.0.1:0".parse().unwrap(),
            insecure_http: true,
            passphrase: Some("test passphrase".into()),
            tick_secs: 1,
            retry_backoff_secs: 1,
            // Its discovery would ask every QEMU on this machine, other tests' too: the
            // tests that want it turn it on.
            own_host: false,
            // The test's folder holds the VMs' disks and the restores (and the state dir,
            // which is never allowed whatever the roots say).
            disk_roots: vec![dir.path().display().to_string()],
            restore_roots: vec![dir.path().to_path_buf()],
            ..ServerConfig::default()
        };
        tweak(&mut cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (started, listener, tls) = rt
            .block_on(vmvault_server::start(cfg, clock, &|_| {}))
            .unwrap();
        let app = started.app.clone();
        rt.spawn(vmvault_server::tls::serve(
            started.app,
            listener,
            tls,
            std::future::pending(),
        ));
        let admin = std::fs::read_to_string(&app.admin_token_file)
            .unwrap()
            .trim()
            .to_string();
        let scheme = if started.fingerprint.is_some() {
            "https"
        } else {
            "http"
        };
        Server {
            pin: started.fingerprint.clone(),
            base: format!("{scheme}://{}", started.addr),
            dir,
            app,
            admin,
            rt,
        }
    }

    pub fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut r = self.http().request(method, &format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    }

    /// A new client per request, as `ureq::request` gives: no kept-alive connection that the
    /// server closed meanwhile (an error answer to an unread body closes it) is reused.
    fn http(&self) -> ureq::Agent {
        match &self.pin {
            Some(fp) => pinned(fp),
            None => ureq::Agent::new(),
        }
    }

    /// A POST of raw bytes as the first admin; the status.
    pub fn call_bytes(&self, path: &str, body: &[u8]) -> u16 {
        self.call_bytes_as(Some(&self.admin.clone()), path, body)
    }

    pub fn call_bytes_as(&self, token: Option<&str>, path: &str, body: &[u8]) -> u16 {
        let mut r = self.http().post(&format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        match r
            .set("Content-Type", "application/octet-stream")
            .send_bytes(body)
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call(Some(&self.admin.clone()), method, path, body)
    }

    /// Asserts success and returns the body.
    pub fn ok(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let a = self.call(Some(token), method, path, body);
        assert!(
            (200..300).contains(&a.status),
            "{method} {path}: {} {}",
            a.status,
            a.body
        );
        a.body
    }

    /// An admin whose token is their own: made by the first admin, who hands over a token
    /// the new admin at once replaces with one they mint themselves (before the vault
    /// requires approval: a handed-over token never counts as its holder's own approval).
    pub fn independent_admin(&self, name: &str) -> String {
        let given = self.user(name, "admin");
        let b = self.ok(
            &given,
            "POST",
            &format!("/api/v1/users/{name}/tokens"),
            None,
        );
        b["token"].as_str().unwrap().to_string()
    }

    /// Turns on multi-user authorization.
    pub fn require_approval(&self) {
        self.ok(
            &self.admin.clone(),
            "PATCH",
            "/api/v1/vaults/default",
            Some(json!({"require_approval": true})),
        );
    }

    pub fn user(&self, name: &str, role: &str) -> String {
        let b = self.ok(
            &self.admin.clone(),
            "POST",
            "/api/v1/users",
            Some(json!({"name": name, "role": role})),
        );
        b["token"].as_str().unwrap().to_string()
    }

    /// A VM of one raw disk of `mib` MiB, every MiB different, described in a TOML file.
    pub fn vm(&self, name: &str, mib: usize) -> String {
        let disk = self.dir.path().join(format!("{name}.raw"));
        write_disk(&disk, mib, name);
        format!(
            "name = \"{name}\"\ncpus = 1\nmemory_mib = 512\n\n[[disks]]\nname = \"disk0\"\npath = \"{}\"\nformat = \"raw\"\n",
            disk.display()
        )
    }

    pub fn policy(&self, name: &str, schedule: &str, extra: Value) {
        let mut body = json!({"name": name, "schedule": schedule, "keep_last": 5});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.ok(&self.admin.clone(), "POST", "/api/v1/policies", Some(body));
    }

    pub fn protect(&self, vm: &str, policy: &str) {
        let d = self.vm(vm, 2);
        self.ok(
            &self.admin.clone(),
            "POST",
            "/api/v1/protected-items",
            Some(json!({"description": d, "policy": policy})),
        );
    }

    /// Waits for a job to end; returns it.
    pub fn wait_job(&self, id: i64) -> Value {
        for _ in 0..600 {
            let j = self.ok(
                &self.admin.clone(),
                "GET",
                &format!("/api/v1/jobs/{id}"),
                None,
            );
            if matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return j;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("job {id} did not end");
    }

    /// Backs a protected VM up now and waits; returns the new point's id.
    /// Runs an on-demand backup with `body` and waits for its job to end; returns the job.
    pub fn run_backup(&self, vm: &str, body: Value) -> Value {
        let j = self.ok(
            &self.admin.clone(),
            "POST",
            &format!("/api/v1/protected-items/{vm}/backup"),
            Some(body),
        );
        self.wait_job(j["job"].as_i64().unwrap())
    }

    /// A backup that must succeed; returns its point's id.
    pub fn backup(&self, vm: &str) -> String {
        let j = self.run_backup(vm, json!({}));
        assert_eq!(j["state"], "succeeded", "{j}");
        j["point"].as_str().unwrap().to_string()
    }

    /// A backup as the scheduler runs it: its point records the policy's retention and
    /// counts toward it (an on-demand one, [`Server::backup`], never does).
    pub fn scheduled_backup(&self, vm: &str) -> String {
        let id = self
            .app
            .enqueue(
                "backup",
                Some(vm),
                &vmvault_server::jobs::Params::default(),
                "scheduler",
            )
            .unwrap();
        let j = self.wait_job(id);
        assert_eq!(j["state"], "succeeded", "{j}");
        j["point"].as_str().unwrap().to_string()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.app.stop();
    }
}

pub fn write_disk(path: &Path, mib: usize, seed: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        let tag = format!("{seed} MiB {i} ");
        for (j, b) in block.iter_mut().enumerate().step_by(4096) {
            *b = (i + j / 4096) as u8 | 1;
        }
        block[..tag.len()].copy_from_slice(tag.as_bytes());
        f.write_all(&block).unwrap();
    }
}

/// A client that trusts exactly the server's certificate, as the CLI does once pinned.
fn pinned(fingerprint: &str) -> ureq::Agent {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
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
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pin(fingerprint.to_string(), provider)))
        .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .build()
}
