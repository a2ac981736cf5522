//! Storage holds: what a locked vault asks of storage that can keep objects against deletion
//! by anyone, the vault's own credentials included (S3 Object Lock in compliance mode).
//!
//! The vault's lock (see `rules`) binds every vmvault path, but not someone who holds the
//! storage's credentials. A locked vault whose rules name `hold_days` therefore asks each
//! region's storage to hold every object version it writes for that many days ([`Hold`]); a
//! storage that cannot says so ([`HoldState::NotEnforced`]) and is written as before.
//!
//! A hold starts when an object is written, but chunks are shared: a point taken today reuses
//! chunks written months ago, whose holds have ended. So holds are renewed
//! ([`Vault::renew_holds`]) on every object the vault has, by `vault lock` (for what was written
//! before the lock) and by every garbage collection; a vault whose collection runs at least
//! once per `hold_days` keeps every object it still needs under a hold.
//!
//! What a hold does not stop: a delete without a version id on a versioned bucket, which hides
//! the object behind a delete marker. The held version stays, and removing the marker brings it
//! back (docs/format.md, "Threat model").

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::{Hold, HoldState, Kind};
use crate::rules::RULES_NAME;
use crate::{Result, StoreError, Vault};

/// The regions record's name (crates/open keeps it), beside the config and the rules.
pub const REGIONS_RECORD: &str = "regions";

/// The hold the vault's regions were last given, shared by every view of one opened vault.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// `None` until the rules were first read; then the hold days in force (`Some(None)`: none).
    days: Option<Option<u32>>,
    states: Vec<(String, HoldState)>,
}

pub(crate) type AppliedHold = Arc<Mutex<Applied>>;

impl Vault {
    /// Gives every region the hold the vault's rules ask for, if that changed since it was last
    /// given; each region's answer. Called when the vault is opened, by every writer's lock (a
    /// vault locked by another process since is held from the next backup on) and by
    /// [`Vault::lock_vault`].
    pub fn apply_hold(&self) -> Result<Vec<(String, HoldState)>> {
        let days = self.rules()?.locked.and_then(|l| l.hold_days);
        let mut applied = self.applied_hold.lock().unwrap_or_else(|e| e.into_inner());
        if applied.days == Some(days) {
            return Ok(applied.states.clone());
        }
        let hold = days.map(|days| Hold {
            days,
            clock: self.clock.clone(),
        });
        let mut states = Vec::new();
        for region in self.regions() {
            let state = match &hold {
                Some(h) => region.backend.set_hold(Some(h.clone()))?,
                None => HoldState::NotEnforced("the vault asks for no storage hold".into()),
            };
            states.push((region.name.clone(), state));
        }
        applied.days = Some(days);
        applied.states = states.clone();
        Ok(states)
    }

    /// [`Vault::apply_hold`] where a damaged rules object must not stop the caller: the regions
    /// keep what they were given, and the damage shows wherever the rules are needed.
    pub(crate) fn apply_hold_unless_damaged(&self) -> Result<()> {
        match self.apply_hold() {
            Ok(_) | Err(StoreError::Damaged { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Renews the hold on every object of every region whose storage holds them (locks
    /// excepted), calling `progress` with the count so far; how many were renewed.
    pub fn renew_holds(&self, progress: &(dyn Fn(u64) + Sync)) -> Result<u64> {
        let states = self.apply_hold()?;
        let done = AtomicU64::new(0);
        for (region, (_, state)) in self.regions().iter().zip(&states) {
            if *state != HoldState::Enforced {
                continue;
            }
            let backend = &region.backend;
            let mut objects = Vec::new();
            for kind in Kind::ALL.into_iter().filter(|k| Hold::holds(*k)) {
                objects.extend(backend.list(kind)?.into_iter().map(|o| (kind, o.name)));
            }
            // A listing of the vault's top level names only its config.
            for name in [RULES_NAME, REGIONS_RECORD] {
                if backend.stat(Kind::Config, name)?.is_some() {
                    objects.push((Kind::Config, name.to_string()));
                }
            }
            // One request per object: as many at once as the region takes.
            let next = AtomicUsize::new(0);
            let failed: Mutex<Option<StoreError>> = Mutex::new(None);
            std::thread::scope(|s| {
                for _ in 0..backend.concurrency().clamp(1, 32) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((kind, name)) = objects.get(i) else {
                            break;
                        };
                        if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            break;
                        }
                        match backend.extend_hold(*kind, name) {
                            // Removed since the listing (a collection, a purge): nothing to hold.
                            Ok(()) | Err(StoreError::NotFound(_)) => {
                                progress(done.fetch_add(1, Ordering::Relaxed) + 1);
                            }
                            Err(e) => {
                                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                                break;
                            }
                        }
                    });
                }
            });
            if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                return Err(e);
            }
        }
        Ok(done.into_inner())
    }
}
