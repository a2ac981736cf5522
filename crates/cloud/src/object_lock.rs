//! S3 Object Lock: whether the bucket holding a vault keeps every object version it is given
//! for a time nobody can shorten, so that `vault info` and `vault lock` can say plainly
//! whether the storage enforces the vault's lock or only vmvault does.
//!
//! `vault lock` makes vmvault refuse early deletions; on a bucket with Object Lock it also
//! has the storage hold every object it writes (the `hold` module), so that someone holding
//! the storage credentials (or vmvault's own, stolen) cannot destroy points early either.
//!
//! object_store has no call for the setting, so the request (GET `/?object-lock` on the
//! bucket) is made by [`crate::hold::S3Requests`].

use object_store::aws::AwsCredential;
use vmvault_store::StoreError;

use crate::config::{self, Env};
use crate::error::Failure;
use crate::hold::S3Requests;
use crate::{parse_url, Credentials, RemoteOptions, Service};

/// What the storage does to keep a vault's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLock {
    /// This storage cannot hold objects against deletion, and why.
    Unavailable(String),
    /// The bucket could, but has no Object Lock (it is enabled when a bucket is made).
    Disabled,
    /// Object Lock is on; new object versions get this default retention, if any.
    Enabled { default: Option<Retention> },
}

/// A bucket's default retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// COMPLIANCE or GOVERNANCE (the latter can be lifted by a privileged user).
    pub mode: String,
    pub days: u32,
}

impl std::fmt::Display for StorageLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageLock::Unavailable(why) => write!(f, "not enforced by the storage: {why}"),
            StorageLock::Disabled => f.write_str(
                "not enforced by the storage: the bucket has no S3 Object Lock (it is enabled \
                 when a bucket is made)",
            ),
            StorageLock::Enabled { default: None } => f.write_str(
                "enforced by the storage once the vault is locked: the bucket has S3 Object \
                 Lock, and a locked vault has it hold every object written (compliance mode)",
            ),
            StorageLock::Enabled {
                default: Some(r), ..
            } => write!(
                f,
                "enforced by the storage: S3 Object Lock keeps every object written for {} \
                 day(s) ({} mode)",
                r.days,
                r.mode.to_lowercase()
            ),
        }
    }
}

/// Where the bucket's objects and subresources are (path-style under an endpoint), and who
/// signs for them.
pub(crate) struct Bucket {
    pub base: String,
    pub region: String,
    pub allow_http: bool,
    pub credential: AwsCredential,
}

/// The S3 bucket `url` names; `None` for an Azure container.
pub(crate) fn bucket(url: &str, opts: &RemoteOptions) -> Result<Option<Bucket>, StoreError> {
    let target = parse_url(url)?;
    if target.service != Service::S3 {
        return Ok(None);
    }
    let env = Env::process();
    let endpoint = opts
        .endpoint
        .clone()
        .or_else(|| env.get("AWS_ENDPOINT_URL"))
        .map(|e| config::check_endpoint(&e))
        .transpose()?;
    let region = opts
        .region
        .clone()
        .or_else(|| env.get("AWS_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        session_token,
    } = config::s3_credentials(url, opts, &env)?
    else {
        return Err(StoreError::Invalid(format!(
            "{url}: Azure credentials given for an S3 bucket"
        )));
    };
    let (base, allow_http) = match endpoint {
        Some((e, allow_http)) => (format!("{e}/{}", target.bucket), allow_http),
        None => (
            format!("https://{}.s3.{region}.amazonaws.com", target.bucket),
            false,
        ),
    };
    Ok(Some(Bucket {
        base,
        region,
        allow_http,
        credential: AwsCredential {
            key_id: access_key_id,
            secret_key: secret_access_key,
            token: session_token,
        },
    }))
}

/// The signed `GET /?object-lock` on the bucket; the status and the body. On a thread of its
/// own: the caller may be a task of an async runtime (the server's handlers), where another
/// runtime cannot block.
fn call(b: Bucket) -> Result<(u16, String), StoreError> {
    let base = b.base.clone();
    let failed = |e: String| StoreError::Remote {
        location: base.clone(),
        detail: format!("S3 Object Lock: {e}"),
        transient: false,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| failed(e.to_string()))?;
            let requests = S3Requests::new(b)?;
            runtime
                .block_on(requests.object_lock())
                .map_err(|f| match f {
                    Failure::Other { detail, .. } => failed(detail),
                    Failure::Missing | Failure::NoBucket => failed("no such bucket".into()),
                })
        })
        .join()
        .unwrap_or_else(|_| Err(failed("the request's thread panicked".into())))
    })
}

/// The text of `<tag>...</tag>` in a small S3 answer.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = xml[start..].find(&format!("</{tag}>"))?;
    Some(xml[start..start + len].trim())
}

/// What the storage at `url` does to keep objects.
pub fn status(url: &str, opts: &RemoteOptions) -> Result<StorageLock, StoreError> {
    let Some(b) = bucket(url, opts)? else {
        return Ok(StorageLock::Unavailable(
            "Azure Blob immutability policies are not used by vmvault yet".into(),
        ));
    };
    let (status, body) = call(b)?;
    Ok(parse_status(status, &body))
}

pub(crate) fn parse_status(status: u16, body: &str) -> StorageLock {
    match status {
        200 if element(body, "ObjectLockEnabled") == Some("Enabled") => StorageLock::Enabled {
            default: element(body, "DefaultRetention").and_then(|r| {
                Some(Retention {
                    mode: element(r, "Mode")?.to_string(),
                    days: element(r, "Days")?.parse().ok()?,
                })
            }),
        },
        200 => StorageLock::Disabled,
        404 if body.contains("ObjectLockConfigurationNotFound") => StorageLock::Disabled,
        // Servers without Object Lock (Garage) answer 501 NotImplemented or a 4xx of their own.
        _ => StorageLock::Unavailable(format!(
            "the S3 server does not implement Object Lock (it answered HTTP {status}{})",
            element(body, "Code")
                .map(|c| format!(", {c}"))
                .unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_s3_servers_give_them() {
        let on = "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled>\
                  <Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Days>30</Days>\
                  </DefaultRetention></Rule></ObjectLockConfiguration>";
        assert_eq!(
            parse_status(200, on),
            StorageLock::Enabled {
                default: Some(Retention {
                    mode: "COMPLIANCE".into(),
                    days: 30
                })
            }
        );
        let bare = "<ObjectLockConfiguration><ObjectLockEnabled>Enabled</ObjectLockEnabled>\
                    </ObjectLockConfiguration>";
        assert_eq!(
            parse_status(200, bare),
            StorageLock::Enabled { default: None }
        );
        let none = "<Error><Code>ObjectLockConfigurationNotFoundError</Code></Error>";
        assert_eq!(parse_status(404, none), StorageLock::Disabled);
        // The server's bytes are untrusted: any answer is read without a panic.
        let pieces = [
            "<ObjectLockEnabled>",
            "</ObjectLockEnabled>",
            "Enabled",
            "<Days>",
            "</Days>",
            "<Mode>",
            "</Mode>",
            "<DefaultRetention>",
            "</DefaultRetention>",
            "<Code>",
            "</Code>",
            "9999999999999",
            "é",
            "<",
            ">",
            "",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..(x % 12) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.push_str(pieces[(x % pieces.len() as u64) as usize]);
            }
            for status in [200, 404, 501] {
                let _ = parse_status(status, &text);
            }
            x = x.wrapping_add(1);
        }
        let garage = "<Error><Code>NotImplemented</Code></Error>";
        assert!(matches!(
            parse_status(501, garage),
            StorageLock::Unavailable(w) if w.contains("NotImplemented")
        ));
    }
}
