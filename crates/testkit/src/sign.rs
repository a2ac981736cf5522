//! Creating buckets and containers: the one request `object_store` has no call for, signed by
//! `object_store`'s own authorizers.

use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureCredential};
use object_store::client::{HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::ClientOptions;
use vmvault_cloud::Credentials;

/// Sends one signed PUT with an empty body; `Err` holds the status and the body.
fn put(url: &str, sign: impl FnOnce(&mut HttpRequest) -> Result<(), String>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = ReqwestConnector::default()
            .connect(&ClientOptions::new().with_allow_http(true))
            .map_err(|e| e.to_string())?;
        let mut request = http::Request::builder()
            .method(http::Method::PUT)
            .uri(url)
            .body(HttpRequestBody::empty())
            .map_err(|e| e.to_string())?;
        sign(&mut request)?;
        let response = client.execute(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.into_body().bytes().await.unwrap_or_default();
        Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
    })
}

/// S3 `CreateBucket` (path-style).
pub(crate) fn s3_create_bucket(
    endpoint: &str,
    region: &str,
    credentials: &Credentials,
    name: &str,
) -> Result<(), String> {
    let Credentials::S3 {
        access_key_id,
        secret_access_key,
        session_token,
    } = credentials
    else {
        return Err("not S3 credentials".into());
    };
    let credential = AwsCredential {
        key_id: access_key_id.clone(),
        secret_key: secret_access_key.clone(),
        token: session_token.clone(),
    };
    put(&format!("{endpoint}/{name}"), |request| {
        AwsAuthorizer::new(&credential, "s3", region)
            .try_authorize(request, None)
            .map_err(|e| e.to_string())
    })
}

/// Azure `Create Container`, signed with the account's shared key.
pub(crate) fn azure_create_container(
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
