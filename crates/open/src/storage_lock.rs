//! Whether a vault's storage keeps its objects against deletion, said in the same words by
//! `vault lock`, `vault info` and the server's `storage_lock`.
//!
//! Two facts make the answer: what the storage can do (its setting, asked of the storage) and
//! what the vault asked of it (a locked vault's hold, which only an opened vault knows). A
//! bucket with Object Lock whose vault holds its objects is "enforced" with the hold's days;
//! without a hold in force the storage's setting is all there is to say.

use vmvault_store::{HoldState, Vault};

use crate::Location;

/// The days `region`'s storage holds each object for, when the vault asked it to and it does.
pub fn held_days(vault: &Vault, region: &str) -> Option<u32> {
    let days = vault.rules().ok()?.locked?.hold_days?;
    let states = vault.apply_hold().ok()?;
    states
        .iter()
        .any(|(r, s)| r == region && *s == HoldState::Enforced)
        .then_some(days)
}

/// The words for one region: `held` from [`held_days`] when the vault is open, else `None`.
pub fn words(location: &Location, secondary: bool, held: Option<u32>) -> String {
    if let Some(d) = held {
        return format!(
            "enforced by the storage: S3 Object Lock holds every object for {d} day(s) after it \
             is written or renewed (compliance mode; gc and `vault lock` renew them)"
        );
    }
    match location.storage_lock(secondary) {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_says_it_enforces_nothing_and_a_hold_names_its_days() {
        let d = tempfile::tempdir().unwrap();
        let l = Location::new(d.path().to_str().unwrap(), None, None, None).unwrap();
        assert!(
            words(&l, false, None).starts_with("not enforced by the storage: a directory"),
            "{}",
            words(&l, false, None)
        );
        assert!(words(&l, false, Some(7)).contains("for 7 day(s)"));
    }

    #[test]
    fn an_unlocked_or_unheld_vault_holds_nothing() {
        let d = tempfile::tempdir().unwrap();
        let v = Vault::create(
            vmvault_store::Regions::single(std::sync::Arc::new(vmvault_store::LocalBackend::new(
                d.path(),
            ))),
            vmvault_store::CreateOptions::default(),
        )
        .unwrap();
        assert_eq!(held_days(&v, "primary"), None);
        v.lock_vault("admin").unwrap();
        // Locked with a hold, but a directory does not enforce it.
        assert_eq!(held_days(&v, "primary"), None);
    }
}
