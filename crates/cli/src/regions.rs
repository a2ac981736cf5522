//! Where a vault lives: a directory, `s3://bucket/prefix` or `azblob://container/prefix`, and
//! the secondary region it replicates to.
//!
//! The regions are recorded in the vault itself, as the object `config/regions` in both
//! regions (JSON, no credentials: those come from the environment at every run), and in a
//! local copy under the state directory, so that a vault whose primary is gone can still be
//! reached through its secondary by the name the user knows it by.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use vmvault_cloud::{Credentials, RemoteOptions};
use vmvault_store::{
    Kind, LocalBackend, Regions, Replication, RetryPolicy, Retrying, StoreError, Vault,
    WriteBackend,
};

use crate::exit::InputError;
use crate::{password, Global};

/// The name of the regions record among the vault's config objects.
const RECORD: &str = "regions";
/// Queue entries kept for the secondary before the queue records an overflow instead.
const QUEUE_CAPACITY: usize = 200_000;

/// One region's address: everything but credentials.
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
    /// The location as given on the command line: a URL as is, a path made absolute.
    pub fn new(
        location: &str,
        endpoint: Option<String>,
        region: Option<String>,
        account: Option<String>,
    ) -> Result<Location> {
        let location = if vmvault_cloud::is_remote(location) {
            location.to_string()
        } else {
            if endpoint.is_some() || account.is_some() {
                return Err(InputError(format!(
                    "{location} is a directory: --endpoint and --account are for s3:// and \
                     azblob:// vaults"
                ))
                .into());
            }
            std::path::absolute(location)
                .with_context(|| format!("the vault path {location}"))?
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

    /// The backend for this region, with retries. The secondary's credentials may differ
    /// from the primary's: `VMVAULT_SECONDARY_`-prefixed variables win for it when set.
    pub fn backend(&self, secondary: bool) -> Result<Arc<dyn WriteBackend>> {
        let inner: Arc<dyn WriteBackend> = if self.is_remote() {
            let opts = RemoteOptions {
                endpoint: self.endpoint.clone(),
                region: self.region.clone(),
                account: self.account.clone(),
                credentials: if secondary {
                    secondary_credentials()
                } else {
                    None
                },
                concurrency: None,
            };
            vmvault_cloud::open(&self.location, &opts)?
        } else {
            Arc::new(LocalBackend::new(&self.location))
        };
        Ok(Arc::new(Retrying::new(inner, RetryPolicy::default())))
    }

    /// What the user sees: the location and the endpoint it is reached at.
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

/// The vault's regions, as recorded in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub primary: Location,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<Location>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a record serializes")
    }

    fn read(backend: &dyn WriteBackend) -> Result<Option<Record>, StoreError> {
        match backend.read(Kind::Config, RECORD) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                StoreError::Invalid(format!(
                    "the regions record of {} cannot be read: {e}",
                    backend.location()
                ))
            }),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where vmvault keeps local state: replication queues, known vaults.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMVAULT_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("vmvault");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/vmvault")
}

fn cache_path(location: &str) -> PathBuf {
    let hash = blake3::hash(location.as_bytes());
    state_dir()
        .join("vaults")
        .join(format!("{}.json", &hash.to_hex()[..32]))
}

fn remember(record: &Record) {
    // Best effort: the cache only helps when the primary is gone.
    let path = cache_path(&record.primary.location);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, record.encode()).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

fn remembered(location: &str) -> Option<Record> {
    let bytes = std::fs::read(cache_path(location)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Which region(s) a command works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FromRegion {
    Primary,
    Secondary,
}

/// How a command uses the vault: only backups feed the secondary in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Read,
    Backup,
}

fn notify() -> vmvault_store::Notify {
    Arc::new(|msg: &str| eprintln!("vmvault: {msg}"))
}

pub fn primary_location(g: &Global) -> Result<Location> {
    let vault = g.vault.as_deref().ok_or_else(|| {
        InputError("no vault given: pass --vault LOCATION or set VMVAULT_VAULT".into())
    })?;
    Location::new(
        vault,
        g.endpoint.clone(),
        g.region.clone(),
        g.account.clone(),
    )
}

/// Creates a vault in its region(s) and records them.
pub fn create(
    primary: Location,
    secondary: Option<Location>,
    opts: vmvault_store::CreateOptions,
) -> Result<Vault> {
    let record = Record {
        version: 1,
        primary: primary.clone(),
        secondary: secondary.clone(),
    };
    let regions = Regions {
        primary: primary.backend(false)?,
        secondary: secondary.as_ref().map(|s| s.backend(true)).transpose()?,
        replication: Replication::Sync,
        notify: notify(),
    };
    let vault = Vault::create(regions, opts)?;
    vault
        .backend()
        .write(Kind::Config, RECORD, &record.encode())?;
    vault.backend().sync()?;
    remember(&record);
    Ok(vault)
}

/// The regions of the vault named by `--vault`, as its record (or the local copy of it, when
/// the primary cannot be read) gives them.
pub fn record(g: &Global) -> Result<(Record, Arc<dyn WriteBackend>)> {
    let primary = primary_location(g)?;
    let backend = primary.backend(false)?;
    let found = match Record::read(&*backend) {
        Ok(Some(r)) => Some(r),
        Ok(None) => None,
        Err(e) => match remembered(&primary.location) {
            Some(r) => {
                eprintln!(
                    "vmvault: the primary region cannot be read ({e}); using the regions \
                     remembered from an earlier run"
                );
                Some(r)
            }
            None => return Err(e.into()),
        },
    };
    // A vault without a record (made before regions existed, or the record was lost):
    // one region, as given. One whose primary is gone entirely: the remembered record.
    let record = found
        .or_else(|| remembered(&primary.location).filter(|r| r.secondary.is_some()))
        .unwrap_or(Record {
            version: 1,
            primary: primary.clone(),
            secondary: None,
        });
    Ok((record, backend))
}

/// Opens the vault named by --vault, asking for its passphrase if it has one.
pub fn open(g: &Global, use_: Use) -> Result<Vault> {
    let (record, primary_backend) = record(g)?;
    let given = primary_location(g)?;
    let file = g.password_file.clone();
    let pass = || password::existing(file.as_deref());
    // The location given is the record's secondary: the user reached the secondary directly.
    let is_secondary = record
        .secondary
        .as_ref()
        .is_some_and(|s| s.location == given.location);
    let single = |backend: Arc<dyn WriteBackend>| {
        let mut r = Regions::single(backend);
        r.notify = notify();
        r
    };
    let regions = match (g.from_region, &record.secondary) {
        (Some(FromRegion::Secondary), None) => {
            return Err(InputError(format!(
                "{} has no secondary region (create one with `vault create --secondary`)",
                given.describe()
            ))
            .into())
        }
        (Some(FromRegion::Secondary), Some(_)) if is_secondary => single(primary_backend),
        (Some(FromRegion::Secondary), Some(s)) => single(s.backend(true)?),
        (Some(FromRegion::Primary), _) | (None, None) => single(primary_backend),
        (None, Some(_)) if is_secondary => single(primary_backend),
        (None, Some(s)) => Regions {
            primary: primary_backend,
            secondary: Some(s.backend(true)?),
            replication: if use_ == Use::Backup && !g.sync {
                Replication::Async {
                    state_dir: state_dir(),
                    capacity: QUEUE_CAPACITY,
                }
            } else {
                Replication::Sync
            },
            notify: notify(),
        },
    };
    let vault = Vault::open(regions, pass)?;
    if !is_secondary && g.from_region.is_none() {
        remember(&record);
    }
    Ok(vault)
}
