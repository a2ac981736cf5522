//! Opens a vault from where it lives: a directory, `s3://bucket/prefix` or
//! `azblob://container/prefix`, with the secondary region its regions record names (of any
//! kind). The CLI and the server both open vaults through here, so a location means the same
//! thing to both, a passphrase comes from the same places, and local state (replication
//! queues, the copies of regions records) follows one rule.
//!
//! What it decides, and why:
//! - The regions come from the vault's own record (the object `regions`), not from each
//!   caller's flags, so every process that opens the vault replicates to the same place. The
//!   record is sealed like the vault's rules: the given region is opened alone, the record
//!   read through the vault (in an encrypted vault a forged one fails its tag: damage, and
//!   nothing is written), and the secondary it names attached. When the given region cannot
//!   be opened, the record copied under the state directory at the last successful open is
//!   used, so a vault whose primary region is gone is still reached by its usual name. A
//!   plain record of older builds is read on the safe side ([`open_recorded`]).
//! - Naming the recorded secondary directly opens that region alone (a user reaching the
//!   surviving region after losing the primary must not have writes sent back to it).
//! - Credentials are never recorded: each process takes them from its environment
//!   (`VMVAULT_SECONDARY_*` for the secondary when it differs).

mod location;
mod opening;
mod record;
pub mod storage_lock;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use location::Location;
pub use opening::{add_secondary, open, open_recorded, record, reopen};
pub use record::{Cache, Record, RECORD};
pub use vmvault_cloud::object_lock::StorageLock;
use vmvault_store::{CreateOptions, Notify, Regions, Replication, StoreError, Vault};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was given cannot name a vault or its region.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where vmvault keeps local state (replication queues, copies of regions records):
/// `VMVAULT_STATE_DIR`, else `$XDG_STATE_HOME/vmvault`, else `~/.local/state/vmvault`.
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

/// The passphrase configured for a vault: the file's contents when a file is given (without
/// the line end an editor or `echo` adds), else `VMVAULT_PASSWORD`; `None` when neither is
/// set, for the caller to prompt (the CLI) or to make one (the server, for a new vault).
pub fn passphrase(file: Option<&Path>) -> Result<Option<Vec<u8>>> {
    passphrase_from(file, "VMVAULT_PASSWORD")
}

/// [`passphrase`] with another variable (a new key's passphrase, say).
pub fn passphrase_from(file: Option<&Path>, env: &str) -> Result<Option<Vec<u8>>> {
    let pass = match file {
        Some(f) => {
            let text = std::fs::read(f).map_err(|e| {
                Error::Input(format!("reading the passphrase file {}: {e}", f.display()))
            })?;
            let end = text
                .iter()
                .rposition(|&b| b != b'\n' && b != b'\r')
                .map_or(0, |p| p + 1);
            text[..end].to_vec()
        }
        None => match std::env::var_os(env) {
            Some(v) => v.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    if pass.is_empty() {
        return Err(Error::Input("the passphrase is empty".into()));
    }
    Ok(Some(pass))
}

/// Which region(s) of a vault to work with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The primary, replicating to the secondary when the vault has one.
    Both,
    /// The primary alone.
    Primary,
    /// The secondary alone (the primary lost, or to check the copy).
    Secondary,
}

/// How writes reach the secondary when both regions are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// A write returns once both regions hold it.
    Sync,
    /// A write returns once the primary holds it; a queue journaled in the state directory
    /// (at most `capacity` entries, then an overflow mark for `vault replicate`) feeds the
    /// secondary in the background, and queues earlier runs left are adopted.
    Queue { capacity: usize },
}

/// Everything needed to open a vault.
pub struct Spec {
    /// The location the user named (the primary, or the recorded secondary).
    pub given: Location,
    pub reach: Reach,
    pub feed: Feed,
    /// Where queues and copies of records live ([`state_dir`] for the CLI, the server's
    /// own state directory for the server).
    pub state_dir: PathBuf,
    /// Told of reads that fell back to the other region and of replication trouble.
    pub notify: Notify,
    /// A flag that, once set, fails every further read and write of both regions with
    /// [`StoreError::Cancelled`] and this reason (a job's cancel, Ctrl-C).
    pub cancel: Option<(Arc<AtomicBool>, &'static str)>,
}

/// Creates a vault in its region(s) and records them there (sealed) and in the state
/// directory.
pub fn create(
    primary: Location,
    secondary: Option<Location>,
    opts: CreateOptions,
    state_dir: &Path,
    notify: Notify,
) -> Result<Vault> {
    if let Some(s) = &secondary {
        if s.location == primary.location {
            return Err(Error::Input(format!(
                "the secondary region {} is the primary itself",
                s.describe()
            )));
        }
    }
    let record = Record::new(primary.clone(), secondary.clone());
    let regions = Regions {
        primary: primary.backend(false)?,
        secondary: secondary.as_ref().map(|s| s.backend(true)).transpose()?,
        replication: Replication::Sync,
        notify,
    };
    let vault = Vault::create(regions, opts)?;
    vault.write_regions_record(&record.payload())?;
    let cache = Cache::new(state_dir);
    cache.remember(&primary.location, &record);
    cache.remember_sealed(&primary.location, &vault.config().vault_id);
    Ok(vault)
}

impl vmvault_class::Classify for Error {
    fn class(&self) -> vmvault_class::Class {
        match self {
            Error::Input(_) => vmvault_class::Class::Input,
            Error::Store(s) => s.class(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Notify {
        Arc::new(|_: &str| {})
    }

    fn spec(given: &Path, reach: Reach, state: &Path) -> Spec {
        Spec {
            given: Location::new(given.to_str().unwrap(), None, None, None).unwrap(),
            reach,
            feed: Feed::Sync,
            state_dir: state.to_path_buf(),
            notify: quiet(),
            cancel: None,
        }
    }

    #[test]
    fn a_vault_with_a_secondary_is_opened_with_it_and_the_secondary_alone_when_named() {
        let d = tempfile::tempdir().unwrap();
        let (p, s, state) = (d.path().join("p"), d.path().join("s"), d.path().join("st"));
        let loc = |x: &Path| Location::new(x.to_str().unwrap(), None, None, None).unwrap();
        create(
            loc(&p),
            Some(loc(&s)),
            CreateOptions::default(),
            &state,
            quiet(),
        )
        .unwrap();
        let v = open(&spec(&p, Reach::Both, &state), || Err("none".into())).unwrap();
        assert_eq!(v.regions().len(), 2);
        let v = open(&spec(&p, Reach::Primary, &state), || Err("none".into())).unwrap();
        assert_eq!(v.regions().len(), 1);
        let v = open(&spec(&s, Reach::Both, &state), || Err("none".into())).unwrap();
        assert_eq!(
            v.regions().len(),
            1,
            "the secondary named directly is opened alone"
        );
        assert!(v.location().contains("/s"), "{}", v.location());
        // The primary gone: its name still reaches the secondary through the local copy.
        std::fs::remove_dir_all(&p).unwrap();
        let v = open(&spec(&p, Reach::Secondary, &state), || Err("none".into())).unwrap();
        assert!(v.location().contains("/s"), "{}", v.location());
    }

    #[test]
    fn a_reopened_view_asks_no_passphrase_and_keeps_both_regions() {
        let d = tempfile::tempdir().unwrap();
        let (p, s, state) = (d.path().join("p"), d.path().join("s"), d.path().join("st"));
        let loc = |x: &Path| Location::new(x.to_str().unwrap(), None, None, None).unwrap();
        let opts = CreateOptions {
            passphrase: Some(b"pw".to_vec()),
            ..CreateOptions::default()
        };
        create(loc(&p), Some(loc(&s)), opts, &state, quiet()).unwrap();
        let both = spec(&p, Reach::Both, &state);
        let opened = open(&both, || Ok(b"pw".to_vec())).unwrap();
        let view = reopen(&both, &opened, || panic!("the key is derived again")).unwrap();
        assert_eq!(view.regions().len(), 2);
        assert_eq!(view.config().vault_id, opened.config().vault_id);
        let primary = spec(&p, Reach::Primary, &state);
        let one = open(&primary, || Ok(b"pw".to_vec())).unwrap();
        let view = reopen(&primary, &one, || panic!("the key is derived again")).unwrap();
        assert_eq!(view.regions().len(), 1);
    }

    #[test]
    fn a_secondary_that_is_the_primary_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = Location::new(d.path().join("p").to_str().unwrap(), None, None, None).unwrap();
        let e = create(
            p.clone(),
            Some(p),
            CreateOptions::default(),
            d.path(),
            quiet(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, Error::Input(_)), "{e}");
    }

    #[test]
    fn the_passphrase_file_loses_its_line_end_and_an_empty_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pass");
        std::fs::write(&f, "secret\r\n").unwrap();
        assert_eq!(passphrase(Some(&f)).unwrap(), Some(b"secret".to_vec()));
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(passphrase(Some(&f)), Err(Error::Input(_))));
    }
}
