//! The CLI's side of opening a vault: the global flags turned into a [`vmvault_open::Spec`].
//! Where a vault lives, its regions record and the state directory are the library's
//! (crates/open), shared with the server.

use std::sync::Arc;

use anyhow::Result;
use vmvault_open::{Feed, Reach, Spec};
use vmvault_store::{Vault, WriteBackend};

pub use vmvault_open::{Location, Record};

use crate::exit::InputError;
use crate::{password, Global};

/// Queue entries kept for the secondary before the queue records an overflow instead.
const QUEUE_CAPACITY: usize = 200_000;

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
    Ok(Location::new(
        vault,
        g.endpoint.clone(),
        g.region.clone(),
        g.account.clone(),
    )?)
}

/// Creates a vault in its region(s) and records them.
pub fn create(
    primary: Location,
    secondary: Option<Location>,
    opts: vmvault_store::CreateOptions,
) -> Result<Vault> {
    Ok(vmvault_open::create(
        primary,
        secondary,
        opts,
        &vmvault_open::state_dir(),
        notify(),
    )?)
}

/// The regions of the vault named by `--vault`, as its record (or the local copy of it, when
/// the primary cannot be read) gives them.
pub fn record(g: &Global) -> Result<(Record, Arc<dyn WriteBackend>)> {
    let cache = vmvault_open::Cache::new(&vmvault_open::state_dir());
    Ok(vmvault_open::record(
        &primary_location(g)?,
        &cache,
        &notify(),
    )?)
}

/// Opens the vault named by --vault, asking for its passphrase if it has one.
pub fn open(g: &Global, use_: Use) -> Result<Vault> {
    let spec = Spec {
        given: primary_location(g)?,
        reach: match g.from_region {
            None => Reach::Both,
            Some(FromRegion::Primary) => Reach::Primary,
            Some(FromRegion::Secondary) => Reach::Secondary,
        },
        feed: if use_ == Use::Backup && !g.sync {
            Feed::Queue {
                capacity: QUEUE_CAPACITY,
            }
        } else {
            Feed::Sync
        },
        state_dir: vmvault_open::state_dir(),
        notify: notify(),
        cancel: Some((crate::interrupt::flag(), crate::interrupt::WHY)),
    };
    let file = g.password_file.clone();
    Ok(vmvault_open::open(&spec, || {
        password::existing(file.as_deref())
    })?)
}
