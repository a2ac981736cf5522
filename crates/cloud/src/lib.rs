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
//! garbage collection on such a region must not run beside backups (see `vmvault_store`).
//! Object times are the server's clock.
//!
//! # Errors and credentials
//! A missing object is [`StoreError::NotFound`]; every other failure is
//! [`StoreError::Remote`], transient for timeouts, connection failures, HTTP 5xx and
//! throttling (429, 503), permanent for the other 4xx. `object_store`'s own retries are off:
//! the store's retry wrapper decides. No secret (keys, session tokens, SAS tokens, signatures)
//! ever appears in an error, in [`Debug`] output or in
//! [`location`](vmvault_store::ReadBackend::location): every message is redacted before the
//! error is built. A missing bucket or container is a clear permanent error, except to a HEAD
//! (`stat`, `touch`), whose answer has no body to tell it from a missing object.
//!
//! # Threads
//! Each backend owns a tokio runtime with two worker threads that drive the connections. The
//! caller's thread runs each request's future itself (`block_on`), so many caller threads make
//! requests in parallel, each signing and hashing its own payload.

mod backend;
mod config;
mod error;
mod hold;
pub mod object_lock;

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
    let target = parse_url(url)?;
    let built = config::build(&target, opts, &config::Env::process())?;
    let bucket = object_lock::bucket(url, opts)?;
    Ok(Arc::new(backend::ObjectBackend::new(built, bucket)?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Service {
    S3,
    Azure,
}

/// A parsed region URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    pub service: Service,
    /// The bucket (S3) or container (Azure).
    pub bucket: String,
    /// The prefix's segments; empty for the bucket's root.
    pub prefix: Vec<String>,
}

impl Target {
    /// The URL in its normal form (no trailing slash).
    pub fn url(&self) -> String {
        let scheme = match self.service {
            Service::S3 => "s3",
            Service::Azure => "azblob",
        };
        let mut url = format!("{scheme}://{}", self.bucket);
        for part in &self.prefix {
            url.push('/');
            url.push_str(part);
        }
        url
    }
}

fn invalid(url: &str, why: &str) -> StoreError {
    StoreError::Invalid(format!(
        "invalid region URL {url:?}: {why} (expected s3://BUCKET/PREFIX or azblob://CONTAINER/PREFIX)"
    ))
}

/// Parses `s3://bucket/prefix` or `azblob://container/prefix`; the prefix may be empty or
/// nested, and a trailing slash is ignored.
pub(crate) fn parse_url(url: &str) -> Result<Target, StoreError> {
    let (service, rest) = if let Some(rest) = url.strip_prefix("s3://") {
        (Service::S3, rest)
    } else if let Some(rest) = url.strip_prefix("azblob://") {
        (Service::Azure, rest)
    } else {
        return Err(invalid(url, "unknown scheme"));
    };
    if rest.contains(['?', '#', '@']) {
        return Err(invalid(url, "no query, fragment or user name allowed"));
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    let bucket = parts.next().unwrap_or_default();
    let what = match service {
        Service::S3 => "bucket",
        Service::Azure => "container",
    };
    if bucket.is_empty() {
        return Err(invalid(url, &format!("no {what} name")));
    }
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'-'
                || (b == b'.' && service == Service::S3)
        })
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        let chars = match service {
            Service::S3 => "lowercase letters, digits, '-' and '.'",
            Service::Azure => "lowercase letters, digits and '-'",
        };
        return Err(invalid(
            url,
            &format!("{what} name {bucket:?} must be 3 to 63 {chars}"),
        ));
    }
    let mut prefix = Vec::new();
    for part in parts {
        let ok = !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            return Err(invalid(
                url,
                &format!("prefix segment {part:?} must be letters, digits, '-', '_' or '.'"),
            ));
        }
        prefix.push(part.to_string());
    }
    Ok(Target {
        service,
        bucket: bucket.to_string(),
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("s3://my-bucket/a/b.c/").unwrap();
        assert_eq!(t.service, Service::S3);
        assert_eq!(t.bucket, "my-bucket");
        assert_eq!(t.prefix, ["a", "b.c"]);
        assert_eq!(t.url(), "s3://my-bucket/a/b.c");
        let t = parse_url("azblob://box").unwrap();
        assert_eq!((t.service, t.prefix.len()), (Service::Azure, 0));
        for bad in [
            "s3://",
            "s3:///x",
            "s3://Bucket/x",
            "s3://ab/x",
            "s3://b-b/a//c",
            "s3://b-b/../c",
            "s3://b-b/a?x=1",
            "s3://key:secret@bucket/x",
            "azblob://a.b.c/x",
            "gs://bucket/x",
            "/srv/vault",
            "s3://bkt/a b",
        ] {
            match parse_url(bad) {
                Err(StoreError::Invalid(m)) => assert!(m.contains("invalid region URL"), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
