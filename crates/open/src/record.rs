//! The regions record: which regions a vault lives in (JSON, no credentials), kept in the vault
//! itself as the sealed object `regions` in both regions (vmvault_store's `regions_record`),
//! and in a local copy under the state directory, so that a vault whose primary is gone can
//! still be reached through its secondary by the name the user knows it by. The local copy is
//! this host's own memory, trusted where the vault's plain record of older builds is not.

use std::path::{Path, PathBuf};

use crate::Location;
use serde::{Deserialize, Serialize};

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

    /// The record as the state directory keeps it (and as builds before the sealed record
    /// wrote it into the vault).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a record serializes")
    }

    /// The record's payload in its sealed vault object.
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serializes")
    }

    /// A record's JSON (a sealed payload, a plain record, a local copy).
    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let r: Record = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if r.version != 1 {
            return Err(format!("version {} (this build reads 1)", r.version));
        }
        Ok(r)
    }
}

/// The local copies of records, under a state directory, by the location a vault was opened
/// by.
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

    fn path(&self, location: &str, ext: &str) -> PathBuf {
        let hash = blake3::hash(location.as_bytes());
        self.dir.join(format!("{}.{ext}", &hash.to_hex()[..32]))
    }

    fn write(&self, path: &Path, bytes: &[u8]) {
        let _ = std::fs::create_dir_all(&self.dir);
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    /// Remembers the record of the vault opened by `location`. Best effort: the copy only
    /// helps when the vault's own cannot be read.
    pub fn remember(&self, location: &str, record: &Record) {
        self.write(&self.path(location, "json"), &record.encode());
    }

    pub fn remembered(&self, location: &str) -> Option<Record> {
        let bytes = std::fs::read(self.path(location, "json")).ok()?;
        Record::decode(&bytes).ok()
    }

    /// Remembers that the vault `vault_id` at `location` was read with a sealed record: a
    /// plain one found there later is forged or put back, not one an older build wrote. Never
    /// forgotten (another vault made at the location has another id).
    pub fn remember_sealed(&self, location: &str, vault_id: &[u8; 16]) {
        if !self.saw_sealed(location, vault_id) {
            self.write(&self.path(location, "sealed"), hex(vault_id).as_bytes());
        }
    }

    pub fn saw_sealed(&self, location: &str, vault_id: &[u8; 16]) -> bool {
        std::fs::read(self.path(location, "sealed")).is_ok_and(|b| b == hex(vault_id).as_bytes())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
        cache.remember("/v/a", &r);
        assert_eq!(cache.remembered("/v/a"), Some(r));
        assert_eq!(cache.remembered("/v/b"), None);
        // The mark of a sealed record is the vault's: another vault there is not it.
        assert!(!cache.saw_sealed("/v/a", &[1; 16]));
        cache.remember_sealed("/v/a", &[1; 16]);
        assert!(cache.saw_sealed("/v/a", &[1; 16]));
        assert!(!cache.saw_sealed("/v/a", &[2; 16]));
        assert!(!cache.saw_sealed("/v/b", &[1; 16]));
    }

    #[test]
    fn a_record_is_json_of_version_1_without_unknown_fields() {
        let r = Record::new(Location::new("/v/a", None, None, None).unwrap(), None);
        assert_eq!(Record::decode(&r.payload()).unwrap(), r);
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        for bad in [
            r#"{"version":2,"primary":{"location":"/v/a"}}"#,
            r#"{"version":1,"primary":{"location":"/v/a"},"extra":1}"#,
            r#"{"version":1}"#,
        ] {
            assert!(Record::decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
