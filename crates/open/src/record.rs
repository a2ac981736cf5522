//! The regions record: which regions a vault lives in, kept in the vault itself as the
//! object `config/regions` in both regions (JSON, no credentials), and in a local copy under
//! the state directory, so that a vault whose primary is gone can still be reached through
//! its secondary by the name the user knows it by.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmvault_store::{Kind, StoreError, WriteBackend};

use crate::{Location, Result};

/// The name of the regions record among the vault's config objects.
pub const RECORD: &str = vmvault_store::REGIONS_RECORD;

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
    pub fn new(primary: Location, secondary: Option<Location>) -> Record {
        Record {
            version: 1,
            primary,
            secondary,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a record serializes")
    }

    /// The record in `backend`; `None` for a vault made before regions existed.
    pub fn read(backend: &dyn WriteBackend) -> Result<Option<Record>, StoreError> {
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

    pub fn write(&self, backend: &dyn WriteBackend) -> Result<(), StoreError> {
        backend.write(Kind::Config, RECORD, &self.encode())?;
        backend.sync()
    }
}

/// The local copies of records, under a state directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(state_dir: &Path) -> Cache {
        Cache {
            dir: state_dir.join("vaults"),
        }
    }

    fn path(&self, location: &str) -> PathBuf {
        let hash = blake3::hash(location.as_bytes());
        self.dir.join(format!("{}.json", &hash.to_hex()[..32]))
    }

    /// Best effort: the copy only helps when the primary is gone.
    pub fn remember(&self, record: &Record) {
        let path = self.path(&record.primary.location);
        let _ = std::fs::create_dir_all(&self.dir);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, record.encode()).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    pub fn remembered(&self, location: &str) -> Option<Record> {
        let bytes = std::fs::read(self.path(location)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let r = Record::new(
            Location::new("/v/a", None, None, None).unwrap(),
            Some(Location::new("s3://b/p", None, Some("garage".into()), None).unwrap()),
        );
        assert_eq!(cache.remembered("/v/a"), None);
        cache.remember(&r);
        assert_eq!(cache.remembered("/v/a"), Some(r));
        assert_eq!(cache.remembered("/v/b"), None);
    }
}
