//! From a URL, options and the environment to a configured `object_store` client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use vmvault_store::StoreError;

use crate::error::Redactor;
use crate::{Credentials, RemoteOptions, Service, Target, DEFAULT_CONCURRENCY};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variables the backends read, looked up once.
pub(crate) struct Env(HashMap<String, String>);

const ENV_NAMES: [&str; 8] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
];

impl Env {
    pub fn process() -> Env {
        Env::from_pairs(
            ENV_NAMES
                .iter()
                .filter_map(|n| std::env::var(n).ok().map(|v| (n.to_string(), v))),
        )
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Env {
        Env(pairs.into_iter().filter(|(_, v)| !v.is_empty()).collect())
    }

    pub(crate) fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// What [`crate::backend::ObjectBackend`] is made of.
pub(crate) struct Built {
    pub store: Arc<dyn ObjectStore>,
    pub root: Path,
    pub location: String,
    /// "bucket NAME" or "container NAME", for messages.
    pub bucket_label: String,
    pub redactor: Redactor,
    pub concurrency: usize,
}

/// Checks an endpoint: http(s), no user name, password or query; returns it without a
/// trailing slash and whether it allows plain http.
pub(crate) fn check_endpoint(endpoint: &str) -> Result<(String, bool), StoreError> {
    let bad = |why: &str| StoreError::Invalid(format!("invalid endpoint: {why}"));
    let (allow_http, rest) = if let Some(rest) = endpoint.strip_prefix("http://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("https://") {
        (false, rest)
    } else {
        return Err(bad("it must start with http:// or https://"));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("no host"));
    }
    if rest.contains(['@', '?', '#']) {
        return Err(bad("no user name, password, query or fragment allowed"));
    }
    Ok((endpoint.trim_end_matches('/').to_string(), allow_http))
}

pub(crate) fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
}

/// No retries inside `object_store`: the store's retry wrapper decides what to repeat.
fn no_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        retry_timeout: REQUEST_TIMEOUT,
        ..RetryConfig::default()
    }
}

pub(crate) fn build(target: &Target, opts: &RemoteOptions, env: &Env) -> Result<Built, StoreError> {
    let endpoint = match opts.endpoint.clone().or_else(|| match target.service {
        Service::S3 => env.get("AWS_ENDPOINT_URL"),
        Service::Azure => None,
    }) {
        Some(e) => Some(check_endpoint(&e)?),
        None => None,
    };
    let (store, redactor, location) = match target.service {
        Service::S3 => s3_store(target, opts, env, endpoint)?,
        Service::Azure => azure_store(target, opts, env, endpoint)?,
    };
    let what = match target.service {
        Service::S3 => "bucket",
        Service::Azure => "container",
    };
    Ok(Built {
        store,
        root: target.prefix.iter().map(String::as_str).collect(),
        location,
        bucket_label: format!("{what} {}", target.bucket),
        redactor,
        concurrency: opts.concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1),
    })
}

type Store = (Arc<dyn ObjectStore>, Redactor, String);

fn s3_store(
    target: &Target,
    opts: &RemoteOptions,
    env: &Env,
    endpoint: Option<(String, bool)>,
) -> Result<Store, StoreError> {
    let url = target.url();
    let credentials = s3_credentials(&url, opts, env)?;
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        session_token,
    } = &credentials
    else {
        return Err(StoreError::Invalid(format!(
            "{url}: Azure credentials given for an S3 bucket"
        )));
    };
    let region = opts
        .region
        .clone()
        .or_else(|| env.get("AWS_REGION"))
        .unwrap_or_else(|| "us-east-1".to_string());
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&target.bucket)
        .with_region(&region)
        .with_access_key_id(access_key_id)
        .with_secret_access_key(secret_access_key)
        // The payload is not hashed into the signature: every vmvault object carries its own
        // authentication (AES-GCM tag or BLAKE3 checksum), checked on every read, and TLS
        // protects it in transit; hashing each body cost a tenth of an upload's client CPU.
        .with_unsigned_payload(true)
        .with_retry(no_retries());
    if let Some(token) = session_token {
        builder = builder.with_token(token);
    }
    let location = match &endpoint {
        Some((endpoint, allow_http)) => {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_client_options(client_options(*allow_http));
            format!("{url} at {endpoint}")
        }
        None => {
            builder = builder.with_client_options(client_options(false));
            format!("{url} in {region}")
        }
    };
    let redactor = Redactor::new(credentials.secrets());
    let store = builder
        .build()
        .map_err(|e| build_error(&url, &redactor, e))?;
    Ok((Arc::new(store), redactor, location))
}

fn azure_store(
    target: &Target,
    opts: &RemoteOptions,
    env: &Env,
    endpoint: Option<(String, bool)>,
) -> Result<Store, StoreError> {
    let url = target.url();
    let credentials = azure_credentials(&url, opts, env)?;
    let account = opts
        .account
        .clone()
        .or_else(|| env.get("AZURE_STORAGE_ACCOUNT"))
        .or_else(|| {
            let (e, _) = endpoint.as_ref()?;
            account_from_endpoint(e)
        })
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "{url}: no Azure storage account: set AZURE_STORAGE_ACCOUNT or give the account"
            ))
        })?;
    let (endpoint, allow_http) =
        endpoint.unwrap_or_else(|| (format!("https://{account}.blob.core.windows.net"), false));
    let builder = MicrosoftAzureBuilder::new()
        .with_account(&account)
        .with_container_name(&target.bucket)
        .with_endpoint(endpoint.clone())
        .with_client_options(client_options(allow_http))
        .with_retry(no_retries());
    let builder = match &credentials {
        Credentials::AzureKey { key } => builder.with_access_key(key),
        Credentials::AzureSas { token } => {
            let pairs = object_store::azure::split_sas(token).map_err(|_| {
                StoreError::Invalid(format!(
                    "{url}: the Azure SAS token is not of the form key=value&key=value"
                ))
            })?;
            builder.with_sas_authorization(pairs)
        }
        Credentials::S3 { .. } => {
            return Err(StoreError::Invalid(format!(
                "{url}: S3 credentials given for an Azure container"
            )))
        }
    };
    let redactor = Redactor::new(credentials.secrets());
    let store = builder
        .build()
        .map_err(|e| build_error(&url, &redactor, e))?;
    Ok((Arc::new(store), redactor, format!("{url} at {endpoint}")))
}

fn build_error(url: &str, redactor: &Redactor, e: object_store::Error) -> StoreError {
    let text = e.to_string();
    let detail = if text.to_ascii_lowercase().contains("access key") {
        "the Azure storage key is not valid (expected base64)".to_string()
    } else {
        redactor.redact(&text)
    };
    StoreError::Invalid(format!("{url}: {detail}"))
}

pub(crate) fn s3_credentials(
    url: &str,
    opts: &RemoteOptions,
    env: &Env,
) -> Result<Credentials, StoreError> {
    if let Some(c) = &opts.credentials {
        return Ok(c.clone());
    }
    match (
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials::S3 {
            access_key_id,
            secret_access_key,
            session_token: env.get("AWS_SESSION_TOKEN"),
        }),
        _ => Err(StoreError::Invalid(format!(
            "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             (and AWS_SESSION_TOKEN for temporary credentials)"
        ))),
    }
}

fn azure_credentials(
    url: &str,
    opts: &RemoteOptions,
    env: &Env,
) -> Result<Credentials, StoreError> {
    if let Some(c) = &opts.credentials {
        return Ok(c.clone());
    }
    if let Some(key) = env.get("AZURE_STORAGE_KEY") {
        return Ok(Credentials::AzureKey { key });
    }
    if let Some(token) = env.get("AZURE_STORAGE_SAS_TOKEN") {
        return Ok(Credentials::AzureSas { token });
    }
    Err(StoreError::Invalid(format!(
        "{url}: no Azure credentials: set AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN \
         (and AZURE_STORAGE_ACCOUNT)"
    )))
}

/// The account of a path-style endpoint (`http://127.0.0.1:10000/devstoreaccount1`, as
/// Azurite) or of an Azure host name (`https://ACCOUNT.blob.core.windows.net`).
fn account_from_endpoint(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://")?.1;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let account = match path.split('/').find(|s| !s.is_empty()) {
        Some(segment) => segment,
        None => host.strip_suffix(".blob.core.windows.net")?,
    };
    Some(account.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::parse_url;

    #[test]
    fn missing_credentials_name_the_variables() {
        let env = Env::from_pairs([("AWS_ACCESS_KEY_ID".to_string(), "AKIA".to_string())]);
        let t = parse_url("s3://bucket/p").unwrap();
        let Err(StoreError::Invalid(m)) = build(&t, &RemoteOptions::default(), &env) else {
            panic!("no secret key: refused")
        };
        assert!(m.contains("AWS_SECRET_ACCESS_KEY"), "{m}");
        let t = parse_url("azblob://box/p").unwrap();
        let Err(StoreError::Invalid(m)) = build(&t, &RemoteOptions::default(), &env) else {
            panic!("no key: refused")
        };
        assert!(
            m.contains("AZURE_STORAGE_KEY") && m.contains("AZURE_STORAGE_SAS_TOKEN"),
            "{m}"
        );
    }

    #[test]
    fn options_win_over_the_environment() {
        let env = Env::from_pairs([
            ("AWS_ACCESS_KEY_ID".to_string(), "envkey".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "envsecret".to_string()),
            (
                "AWS_ENDPOINT_URL".to_string(),
                "http://127.0.0.1:1".to_string(),
            ),
            ("AWS_REGION".to_string(), "eu-west-1".to_string()),
        ]);
        let t = parse_url("s3://bucket/p").unwrap();
        let built = build(&t, &RemoteOptions::default(), &env).unwrap();
        assert_eq!(built.location, "s3://bucket/p at http://127.0.0.1:1");
        let opts = RemoteOptions {
            endpoint: Some("https://s3.example.invalid/".into()),
            concurrency: Some(4),
            ..Default::default()
        };
        let built = build(&t, &opts, &env).unwrap();
        assert_eq!(
            built.location,
            "s3://bucket/p at https://s3.example.invalid"
        );
        assert_eq!(built.concurrency, 4);
        assert_eq!(built.redactor.redact("x envsecret y"), "x <redacted> y");
    }

    #[test]
    fn bad_credentials_are_invalid_and_not_shown() {
        let t = parse_url("azblob://box/p").unwrap();
        let key = "not base64 at all: s3cr3t!";
        let opts = RemoteOptions {
            account: Some("acct".into()),
            credentials: Some(Credentials::AzureKey { key: key.into() }),
            ..Default::default()
        };
        let Err(StoreError::Invalid(m)) = build(&t, &opts, &Env::from_pairs([])) else {
            panic!("a key that is not base64: refused")
        };
        assert!(m.contains("not valid") && !m.contains("s3cr3t"), "{m}");
        let s3 = parse_url("s3://bucket/p").unwrap();
        let Err(StoreError::Invalid(m)) = build(&s3, &opts, &Env::from_pairs([])) else {
            panic!("Azure credentials for S3: refused")
        };
        assert!(
            m.contains("Azure credentials") && !m.contains("s3cr3t"),
            "{m}"
        );
        assert!(!format!("{opts:?}").contains("s3cr3t"));
    }

    #[test]
    fn azure_account_and_endpoint() {
        assert_eq!(
            account_from_endpoint("http://127.0.0.1:10000/devstoreaccount1").as_deref(),
            Some("devstoreaccount1")
        );
        assert_eq!(
            account_from_endpoint("https://acct.blob.core.windows.net").as_deref(),
            Some("acct")
        );
        let env = Env::from_pairs([
            ("AZURE_STORAGE_ACCOUNT".to_string(), "acct".to_string()),
            (
                "AZURE_STORAGE_SAS_TOKEN".to_string(),
                "sv=2022-11-02&sig=abc%2Bdef".to_string(),
            ),
        ]);
        let t = parse_url("azblob://box/p").unwrap();
        let built = build(&t, &RemoteOptions::default(), &env).unwrap();
        assert_eq!(
            built.location,
            "azblob://box/p at https://acct.blob.core.windows.net"
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://u:p@host",
            "http://host/?sig=1",
        ] {
            let opts = RemoteOptions {
                endpoint: Some(bad.into()),
                ..Default::default()
            };
            assert!(
                matches!(build(&t, &opts, &env), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
