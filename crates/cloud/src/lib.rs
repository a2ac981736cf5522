//! S3 and Azure Blob regions for a vault, through the `object_store` crate.
//!
//! [`open`] turns `s3://bucket/prefix` or `azblob://container/prefix` into a
//! [`WriteBackend`]. Objects sit under the prefix exactly as in a local vault directory:
//!
//! ```text
//! PREFIX/config  PREFIX/keys/NAME  PREFIX/chunks/XX/DIGEST  PREFIX/indexes/D
//! PREFIX/points/ID  PREFIX/locks/ID
//! ```
//! so a vault copied object by object between a directory and a bucket stays a vault.
//!
//! # How the backend contract maps onto an object store
//! - `write` is one PUT of the whole object. S3 and Azure Blob make a PUT atomic and durable
//!   when it returns: readers see the old object or the new one, never a part, and a failed PUT
//!   leaves nothing. So `sync` does nothing, and `remove_temporaries` finds nothing: the
//!   backend never starts multipart uploads that could be left behind.
//! - `remove` is a DELETE; an absent object is not an error.
//! - `touch` is a HEAD and only says whether the object exists. `remove_unless_touched` is a
//!   HEAD and, when the object's last-modified time is before the cutoff, a DELETE.
//! - `create` refuses a prefix that holds any object and creates nothing: an object store has
//!   no directories. The bucket or container must already exist.
//! - `concurrency` is [`RemoteOptions::concurrency`] (16 by default): one request is bound by
//!   latency, not bandwidth, so the engine keeps that many in flight.
//!
//! # Why `atomic_touch` is false
//! An object store cannot renew an object's modification time without rewriting it (a
//! self-copy is a full server-side copy per reused chunk, and not every store allows it), and
//! it cannot delete "unless modified since": between the collector's HEAD and its DELETE a
//! backup may touch the chunk, and the DELETE still removes it. So the backend says so, and
//! garbage collection on such a region waits until no backup runs (see `vmvault_store`).
//!
//! # Errors and credentials
//! A missing object is [`StoreError::NotFound`]; every other failure is
//! [`StoreError::Remote`], transient for timeouts, connection failures, HTTP 5xx and
//! throttling (429, 503), permanent for the other 4xx. `object_store`'s own retries are off:
//! the store's retry wrapper decides. No secret (keys, session tokens, SAS tokens, signatures)
//! ever appears in an error, in [`Debug`] output or in [`ReadBackend::location`]: every message
//! is redacted before the error is built.
//!
//! # Threads
//! Each backend owns a tokio runtime with two worker threads that drive the connections. The
//! caller's thread runs each request's future itself (`block_on`), so many caller threads make
//! requests in parallel, each signing and hashing its own payload.

mod backend;
mod config;
mod error;

use std::fmt;
use std::sync::Arc;

use vmvault_store::{StoreError, WriteBackend};

/// The default number of requests in flight ([`RemoteOptions::concurrency`]).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// How to reach a remote region. Unset fields come from the environment (see [`open`]).
#[derive(Clone, Debug, Default)]
pub struct RemoteOptions {
    /// The service's address, e.g. `http://127.0.0.1:3900` (S3) or
    /// `http://127.0.0.1:10000/devstoreaccount1` (Azurite). Requests are path-style when it is
    /// set; plain http is allowed only when it says `http://`.
    pub endpoint: Option<String>,
    /// The S3 region; `us-east-1` by default (Garage's is usually `garage`).
    pub region: Option<String>,
    /// The Azure storage account.
    pub account: Option<String>,
    /// `None`: from the usual environment variables.
    pub credentials: Option<Credentials>,
    /// How many requests in flight pay off; [`DEFAULT_CONCURRENCY`] by default.
    pub concurrency: Option<usize>,
}

/// Secrets for a remote region. Their [`Debug`] output never shows a secret.
#[derive(Clone)]
pub enum Credentials {
    S3 {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    AzureKey {
        key: String,
    },
    AzureSas {
        token: String,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::S3 { session_token, .. } => f
                .debug_struct("S3")
                .field("access_key_id", &"<redacted>")
                .field("secret_access_key", &"<redacted>")
                .field(
                    "session_token",
                    &session_token.as_ref().map(|_| "<redacted>"),
                )
                .finish(),
            Credentials::AzureKey { .. } => f
                .debug_struct("AzureKey")
                .field("key", &"<redacted>")
                .finish(),
            Credentials::AzureSas { .. } => f
                .debug_struct("AzureSas")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

impl Credentials {
    /// Every secret value these credentials hold, for redaction.
    pub(crate) fn secrets(&self) -> Vec<String> {
        match self {
            Credentials::S3 {
                access_key_id,
                secret_access_key,
                session_token,
            } => {
                let mut v = vec![access_key_id.clone(), secret_access_key.clone()];
                v.extend(session_token.clone());
                v
            }
            Credentials::AzureKey { key } => vec![key.clone()],
            Credentials::AzureSas { token } => {
                // The token as given, and its signature on its own, as given and decoded
                // (request URLs carry it re-encoded: `sig=` values are redacted as well).
                let trimmed = token.trim_start_matches('?');
                let mut v = vec![token.clone(), trimmed.to_string()];
                for pair in trimmed.split('&') {
                    if let Some(("sig", value)) = pair.split_once('=') {
                        v.push(value.to_string());
                        v.push(error::percent_decode(value));
                    }
                }
                v
            }
        }
    }
}

/// Whether `location` names a remote region (`s3://` or `azblob://`) rather than a directory.
pub fn is_remote(location: &str) -> bool {
    location.starts_with("s3://") || location.starts_with("azblob://")
}

/// Opens the region at `url` (`s3://bucket/prefix` or `azblob://container/prefix`).
///
/// Explicit options win over the environment: S3 reads `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` and `AWS_ENDPOINT_URL`; Azure
/// reads `AZURE_STORAGE_ACCOUNT`, `AZURE_STORAGE_KEY` and `AZURE_STORAGE_SAS_TOKEN`. Makes no
/// request: a missing bucket shows on first use. A bad URL or missing credentials are
/// [`StoreError::Invalid`].
pub fn open(url: &str, opts: &RemoteOptions) -> Result<Arc<dyn WriteBackend>, StoreError> {
    let target = config::parse_url(url)?;
    let built = config::build(&target, opts, &config::Env::process())?;
    Ok(Arc::new(backend::ObjectBackend::new(built)?))
}
