//! One region's address, and the backend that reaches it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmvault_cloud::object_lock::StorageLock;
use vmvault_cloud::{Credentials, RemoteOptions};
use vmvault_store::{LocalBackend, RetryPolicy, Retrying, WriteBackend};

use crate::{Error, Result};

/// One region's address: everything but credentials (those come from the environment at
/// every run, so they are never written into a vault or a state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// A directory (absolute) or a URL.
    pub location: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

impl Location {
    /// The location as given by a user: a URL as is, a path made absolute. An endpoint or
    /// account given with a directory is refused rather than ignored.
    pub fn new(
        location: &str,
        endpoint: Option<String>,
        region: Option<String>,
        account: Option<String>,
    ) -> Result<Location> {
        if location.is_empty() {
            return Err(Error::Input("the vault location is empty".into()));
        }
        let location = if vmvault_cloud::is_remote(location) {
            location.to_string()
        } else {
            if endpoint.is_some() || account.is_some() {
                return Err(Error::Input(format!(
                    "{location} is a directory: an endpoint and an account are for s3:// and \
                     azblob:// vaults"
                )));
            }
            if let Some(scheme) = location.split_once("://").map(|(s, _)| s) {
                return Err(Error::Input(format!(
                    "{location}: {scheme}:// is not a kind of vault storage (a directory, \
                     s3://bucket/prefix or azblob://container/prefix)"
                )));
            }
            std::path::absolute(location)
                .map_err(|e| Error::Input(format!("the vault path {location}: {e}")))?
                .display()
                .to_string()
        };
        Ok(Location {
            location,
            endpoint,
            region,
            account,
        })
    }

    pub fn is_remote(&self) -> bool {
        vmvault_cloud::is_remote(&self.location)
    }

    /// The directory of a local region; `None` for object storage.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        (!self.is_remote()).then(|| std::path::PathBuf::from(&self.location))
    }

    /// The backend for this region, with retries. The secondary's credentials may differ
    /// from the primary's: `VMVAULT_SECONDARY_`-prefixed variables win for it when set.
    pub fn backend(&self, secondary: bool) -> Result<Arc<dyn WriteBackend>> {
        let inner: Arc<dyn WriteBackend> = if self.is_remote() {
            vmvault_cloud::open(&self.location, &self.remote_options(secondary))?
        } else {
            Arc::new(LocalBackend::new(&self.location))
        };
        Ok(Arc::new(Retrying::new(inner, RetryPolicy::default())))
    }

    fn remote_options(&self, secondary: bool) -> RemoteOptions {
        RemoteOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            account: self.account.clone(),
            credentials: if secondary {
                secondary_credentials()
            } else {
                None
            },
            concurrency: None,
        }
    }

    /// Whether the storage itself keeps objects against deletion (S3 Object Lock).
    pub fn storage_lock(&self, secondary: bool) -> Result<StorageLock> {
        if !self.is_remote() {
            return Ok(StorageLock::Unavailable(
                "a directory: anyone who can write it can delete from it".into(),
            ));
        }
        Ok(vmvault_cloud::object_lock::status(
            &self.location,
            &self.remote_options(secondary),
        )?)
    }

    /// What a user sees: the location and the endpoint it is reached at.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{} at {e}", self.location),
            None => self.location.clone(),
        }
    }
}

fn secondary_credentials() -> Option<Credentials> {
    let var = |n: &str| std::env::var(format!("VMVAULT_SECONDARY_{n}")).ok();
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        return Some(Credentials::S3 {
            access_key_id: id,
            secret_access_key: secret,
            session_token: var("AWS_SESSION_TOKEN"),
        });
    }
    if let Some(key) = var("AZURE_STORAGE_KEY") {
        return Some(Credentials::AzureKey { key });
    }
    var("AZURE_STORAGE_SAS_TOKEN").map(|token| Credentials::AzureSas { token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_made_absolute_and_a_url_is_kept() {
        let l = Location::new("some/dir", None, None, None).unwrap();
        assert!(std::path::Path::new(&l.location).is_absolute());
        assert!(l.local_path().is_some());
        let u = Location::new("s3://b/p", Some("http://x:1".into()), None, None).unwrap();
        assert_eq!(u.location, "s3://b/p");
        assert!(u.local_path().is_none());
        assert_eq!(u.describe(), "s3://b/p at http://x:1");
    }

    #[test]
    fn an_endpoint_with_a_directory_or_an_unknown_scheme_is_refused() {
        let e = Location::new("dir", Some("http://x".into()), None, None).unwrap_err();
        assert!(matches!(e, Error::Input(_)), "{e}");
        let e = Location::new("gs://bucket/v", None, None, None).unwrap_err();
        assert!(e.to_string().contains("gs:// is not a kind"), "{e}");
    }
}
