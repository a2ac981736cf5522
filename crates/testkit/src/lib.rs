//! Real servers for tests: S3 (Garage, moto), Azure Blob (Azurite), QEMU VMs and a guest-agent guest.
//!
//! Every server binds 127.0.0.1 on free ports, keeps its data in a temporary directory, writes
//! its output to a log file there, and is killed (with its children) when dropped. Startup
//! waits for readiness with a timeout and panics with the log's tail when the server fails.
//!
//! A missing tool is a skip: `start()` prints `skipped: TOOL is not installed` and returns
//! `None`, unless [`servers_required`] (`VMVAULT_REQUIRE_SERVERS=1`, set by `scripts/test`),
//! where it panics with how to install the tool.
//!
//! ```no_run
//! let Some(s3) = vmvault_testkit::S3Server::start() else { return };
//! let backend = vmvault_cloud::open(&s3.url("vault1"), &s3.options()).unwrap();
//! ```

mod garage;
pub mod guest;
mod guest_agent;
mod process;
mod qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureCredential};
use object_store::client::{HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;
use process::{free_port, Process};
use vmvault_cloud::{Credentials, RemoteOptions};

pub use garage::{Garage, GarageCluster};
pub use guest::splitmix;
pub use guest_agent::{write_script, QgaGuest};
pub use qemu::QemuVm;

/// Deterministic bytes that neither compress nor dedup (xorshift64), for disk images.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether tests must run against real servers rather than skip when a tool is missing.
pub fn servers_required() -> bool {
    std::env::var("VMVAULT_REQUIRE_SERVERS").is_ok_and(|v| v == "1")
}

/// The bucket (or container) every server starts with.
pub const DEFAULT_BUCKET: &str = "vmvault-test";

const STARTUP: Duration = Duration::from_secs(60);

/// `None` after saying that the tool is missing; panics when servers are required.
fn missing<T>(tool: &str, install: &str) -> Option<T> {
    if servers_required() {
        panic!("{tool} is not installed and VMVAULT_REQUIRE_SERVERS=1: install it with {install}");
    }
    eprintln!("skipped: {tool} is not installed");
    None
}

/// The first of `candidates` that is an executable file, or the name found on `PATH`.
fn find_tool(name: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .iter()
        .cloned()
        .chain(on_path)
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// The options and URLs a test needs to reach a server's bucket.
fn s3_options(endpoint: &str, region: &str, credentials: Credentials) -> RemoteOptions {
    RemoteOptions {
        endpoint: Some(endpoint.to_string()),
        region: Some(region.to_string()),
        credentials: Some(credentials),
        ..RemoteOptions::default()
    }
}

/// moto's S3 server (`moto_server`), which accepts any credentials.
pub struct Moto {
    process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// `moto_server` on `PATH`, else the module of the same name in `python3`.
    fn command() -> Option<std::process::Command> {
        if let Some(exe) = find_tool("moto_server", &[]) {
            return Some(std::process::Command::new(exe));
        }
        let importable = std::process::Command::new("python3")
            .args(["-c", "import moto.server"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        importable.then(|| {
            let mut cmd = std::process::Command::new("python3");
            cmd.args(["-m", "moto.server"]);
            cmd
        })
    }

    pub fn start() -> Option<Moto> {
        let Some(mut cmd) = Self::command() else {
            return missing("moto", "pip install 'moto[server]'");
        };
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Process::spawn("moto", cmd, dir.path());
        process.wait_for_port(port, STARTUP);
        let moto = Moto {
            process,
            port,
            _dir: dir,
        };
        moto.create_bucket(DEFAULT_BUCKET);
        Some(moto)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> String {
        DEFAULT_BUCKET.to_string()
    }

    pub fn region(&self) -> String {
        "us-east-1".to_string()
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::S3 {
            access_key_id: "testing".into(),
            secret_access_key: "testing-secret".into(),
            session_token: None,
        }
    }

    pub fn options(&self) -> RemoteOptions {
        s3_options(&self.endpoint(), &self.region(), self.credentials())
    }

    /// `s3://BUCKET/PREFIX` in the default bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket())
    }

    pub fn create_bucket(&self, name: &str) {
        s3_create_bucket(&self.endpoint(), &self.region(), &self.credentials(), name)
            .unwrap_or_else(|e| self.process.fail(&format!("creating bucket {name}: {e}")));
    }

    /// A bucket made with S3 Object Lock enabled (and so versioned), which moto implements.
    pub fn create_locked_bucket(&self, name: &str) {
        s3_create_bucket_with(
            &self.endpoint(),
            &self.region(),
            &self.credentials(),
            name,
            &[("x-amz-bucket-object-lock-enabled", "true")],
        )
        .unwrap_or_else(|e| self.process.fail(&format!("creating bucket {name}: {e}")));
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// A request signed with the server's credentials, as someone holding them (an attacker
    /// with stolen storage credentials, in the tests) makes it: path-style, `path_and_query`
    /// after the endpoint (`/bucket/key?versionId=...`). The status and the body.
    pub fn signed(&self, method: http::Method, path_and_query: &str) -> (u16, String) {
        let credential = aws_credential(&self.credentials()).expect("moto takes S3 credentials");
        let region = self.region();
        request(
            method,
            &format!("{}{path_and_query}", self.endpoint()),
            &[],
            |r| {
                AwsAuthorizer::new(&credential, "s3", &region)
                    .try_authorize(r, None)
                    .map_err(|e| e.to_string())
            },
        )
        .unwrap_or_else(|e| self.process.fail(&format!("{path_and_query}: {e}")))
    }

    /// `(key, version id)` of the current version of every object under `prefix` in `bucket`
    /// (older versions of a rewritten object need no hold), listed with the server's
    /// credentials.
    pub fn current_versions(&self, bucket: &str, prefix: &str) -> Vec<(String, String)> {
        let (status, xml) = self.signed(
            http::Method::GET,
            &format!("/{bucket}?versions&prefix={prefix}"),
        );
        assert_eq!(status, 200, "{xml}");
        let text = |part: &str, tag: &str| -> Option<String> {
            let start = part.find(&format!("<{tag}>"))? + tag.len() + 2;
            let len = part[start..].find(&format!("</{tag}>"))?;
            Some(part[start..start + len].to_string())
        };
        xml.split("<Version>")
            .skip(1)
            .filter(|v| text(v, "IsLatest").as_deref() == Some("true"))
            .filter_map(|v| Some((text(v, "Key")?, text(v, "VersionId")?)))
            .collect()
    }

    /// As someone holding the bucket's credentials would: tries to destroy the current version
    /// of every object under `prefix` whose key contains one of `kinds` (each kind must have
    /// one), and fails the test unless the storage refuses each (403 AccessDenied, an Object
    /// Lock hold). How many were refused.
    pub fn assert_every_version_held(&self, bucket: &str, prefix: &str, kinds: &[&str]) -> usize {
        let versions = self.current_versions(bucket, prefix);
        for kind in kinds {
            assert!(
                versions.iter().any(|(k, _)| k.contains(kind)),
                "no {kind} in {versions:?}"
            );
        }
        let mut refused = 0;
        for (key, version) in versions
            .iter()
            .filter(|(k, _)| kinds.iter().any(|x| k.contains(x)))
        {
            let (status, body) = self.signed(
                http::Method::DELETE,
                &format!("/{bucket}/{key}?versionId={version}"),
            );
            assert!(
                status == 403 && body.contains("AccessDenied"),
                "the storage deleted {key} version {version}: HTTP {status} {body}"
            );
            refused += 1;
        }
        refused
    }
}

/// The S3 server the tests use: Garage when it is installed, else moto.
pub enum S3Server {
    Garage(Garage),
    Moto(Moto),
}

impl S3Server {
    pub fn start() -> Option<S3Server> {
        if garage::garage_exe().is_some() {
            return Garage::start().map(S3Server::Garage);
        }
        if Moto::command().is_some() {
            return Moto::start().map(S3Server::Moto);
        }
        missing(
            "an S3 server (garage or moto)",
            "cargo install garage --locked, or pip install 'moto[server]'",
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            S3Server::Garage(_) => "garage",
            S3Server::Moto(_) => "moto",
        }
    }

    pub fn endpoint(&self) -> String {
        match self {
            S3Server::Garage(s) => s.endpoint(),
            S3Server::Moto(s) => s.endpoint(),
        }
    }

    pub fn bucket(&self) -> String {
        match self {
            S3Server::Garage(s) => s.bucket(),
            S3Server::Moto(s) => s.bucket(),
        }
    }

    pub fn region(&self) -> String {
        match self {
            S3Server::Garage(s) => s.region(),
            S3Server::Moto(s) => s.region(),
        }
    }

    pub fn credentials(&self) -> Credentials {
        match self {
            S3Server::Garage(s) => s.credentials(),
            S3Server::Moto(s) => s.credentials(),
        }
    }

    pub fn options(&self) -> RemoteOptions {
        s3_options(&self.endpoint(), &self.region(), self.credentials())
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket())
    }

    pub fn create_bucket(&self, name: &str) {
        match self {
            S3Server::Garage(s) => s.create_bucket(name),
            S3Server::Moto(s) => s.create_bucket(name),
        }
    }
}

/// Azurite's Blob service, account `devstoreaccount1` with its well-known key.
pub struct Azurite {
    process: Process,
    port: u16,
    _data: tempfile::TempDir,
}

/// The emulator's documented account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    /// `VMVAULT_AZURITE`, else `~/.cache/vmvault/tools/node_modules/.bin/azurite-blob`, else
    /// `azurite-blob` on `PATH`.
    fn exe() -> Option<PathBuf> {
        let mut candidates: Vec<PathBuf> = std::env::var_os("VMVAULT_AZURITE")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.push(home().join(".cache/vmvault/tools/node_modules/.bin/azurite-blob"));
        find_tool("azurite-blob", &candidates)
    }

    pub fn start() -> Option<Azurite> {
        let Some(exe) = Self::exe() else {
            return missing(
                "azurite",
                "npm install --prefix \"$HOME/.cache/vmvault/tools\" azurite",
            );
        };
        let data = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--disableTelemetry")
            .arg("--skipApiVersionCheck")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(data.path().join("blob"));
        let mut process = Process::spawn("azurite", cmd, data.path());
        process.wait_for_port(port, STARTUP);
        let azurite = Azurite {
            process,
            port,
            _data: data,
        };
        azurite.create_bucket(DEFAULT_BUCKET);
        Some(azurite)
    }

    /// The account's URL: `http://127.0.0.1:PORT/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    pub fn account(&self) -> String {
        AZURITE_ACCOUNT.to_string()
    }

    /// The default container.
    pub fn bucket(&self) -> String {
        DEFAULT_BUCKET.to_string()
    }

    pub fn container(&self) -> String {
        self.bucket()
    }

    pub fn credentials(&self) -> Credentials {
        Credentials::AzureKey {
            key: AZURITE_KEY.to_string(),
        }
    }

    pub fn options(&self) -> RemoteOptions {
        RemoteOptions {
            endpoint: Some(self.endpoint()),
            account: Some(self.account()),
            credentials: Some(self.credentials()),
            ..RemoteOptions::default()
        }
    }

    /// `azblob://CONTAINER/PREFIX` in the default container.
    pub fn url(&self, prefix: &str) -> String {
        format!("azblob://{}/{prefix}", self.bucket())
    }

    /// Creates a container.
    pub fn create_bucket(&self, name: &str) {
        azure_create_container(&self.endpoint(), AZURITE_ACCOUNT, AZURITE_KEY, name)
            .unwrap_or_else(|e| {
                self.process
                    .fail(&format!("creating container {name}: {e}"))
            });
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

// Creating buckets and containers: the one request `object_store` has no call for, signed by
// `object_store`'s own authorizers.

/// Sends one signed PUT with an empty body; `Err` holds the status and the body.
fn put(url: &str, sign: impl FnOnce(&mut HttpRequest) -> Result<(), String>) -> Result<(), String> {
    put_with(url, &[], sign)
}

fn put_with(
    url: &str,
    headers: &[(&str, &str)],
    sign: impl FnOnce(&mut HttpRequest) -> Result<(), String>,
) -> Result<(), String> {
    match request(http::Method::PUT, url, headers, sign)? {
        (200..=299, _) => Ok(()),
        (status, body) => Err(format!("HTTP {status}: {body}")),
    }
}

/// Any signed request; the status and the body.
fn request(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    sign: impl FnOnce(&mut HttpRequest) -> Result<(), String>,
) -> Result<(u16, String), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = ReqwestConnector::default()
            .connect(&ClientOptions::new().with_allow_http(true))
            .map_err(|e| e.to_string())?;
        let mut builder = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let mut request = builder
            .body(HttpRequestBody::empty())
            .map_err(|e| e.to_string())?;
        sign(&mut request)?;
        let response = client.execute(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.into_body().bytes().await.unwrap_or_default();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

/// What object_store's SigV4 signer takes; `None` for Azure credentials.
fn aws_credential(credentials: &Credentials) -> Option<AwsCredential> {
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        session_token,
    } = credentials
    else {
        return None;
    };
    Some(AwsCredential {
        key_id: access_key_id.clone(),
        secret_key: secret_access_key.clone(),
        token: session_token.clone(),
    })
}

/// S3 `CreateBucket` (path-style).
fn s3_create_bucket(
    endpoint: &str,
    region: &str,
    credentials: &Credentials,
    name: &str,
) -> Result<(), String> {
    s3_create_bucket_with(endpoint, region, credentials, name, &[])
}

fn s3_create_bucket_with(
    endpoint: &str,
    region: &str,
    credentials: &Credentials,
    name: &str,
    headers: &[(&str, &str)],
) -> Result<(), String> {
    let credential = aws_credential(credentials).ok_or("not S3 credentials")?;
    put_with(&format!("{endpoint}/{name}"), headers, |request| {
        AwsAuthorizer::new(&credential, "s3", region)
            .try_authorize(request, None)
            .map_err(|e| e.to_string())
    })
}

/// Azure `Create Container`, signed with the account's shared key.
fn azure_create_container(
    endpoint: &str,
    account: &str,
    key: &str,
    name: &str,
) -> Result<(), String> {
    let key = AzureAccessKey::try_new(key).map_err(|e| e.to_string())?;
    let credential = AzureCredential::AccessKey(key);
    put(&format!("{endpoint}/{name}?restype=container"), |request| {
        AzureAuthorizer::new(&credential, account)
            .try_authorize(request)
            .map_err(|e| e.to_string())
    })
}
