//! Prune: applies a retention plan (see `vmvault_store::retention`) through the vault's rules.
//! Every removal is a [`Vault::delete_point`]: soft unless the vault's soft delete is off, and
//! refused in a locked vault for a point whose own retention is still in force.

use serde::Serialize;
use vmvault_format::PointId;
use vmvault_store::{Deleted, PruneDecision, StoreError, Vault};

use crate::Result;

/// What a prune did to the points its plan does not keep.
#[derive(Debug, Default, Serialize)]
pub struct PruneOutcome {
    /// Soft-deleted (restorable until the time given) or removed.
    pub deleted: Vec<PrunedPoint>,
    /// Kept by the vault's lock, with why.
    pub refused: Vec<(PointId, String)>,
}

#[derive(Debug, Serialize)]
pub struct PrunedPoint {
    pub id: PointId,
    /// RFC 3339: until when it can be undeleted; absent when it was removed at once.
    pub purge_after: Option<String>,
}

/// Deletes the points `plan` does not keep, as `by`, recording `reason` in each marker.
pub fn prune(
    vault: &Vault,
    plan: &[PruneDecision],
    by: &str,
    reason: &str,
) -> Result<PruneOutcome> {
    let mut out = PruneOutcome::default();
    for d in plan.iter().filter(|d| !d.keep) {
        match vault.delete_point(&d.id, by, reason) {
            Ok(Deleted::Until(t)) => out.deleted.push(PrunedPoint {
                id: d.id,
                purge_after: Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            }),
            Ok(Deleted::Removed) => out.deleted.push(PrunedPoint {
                id: d.id,
                purge_after: None,
            }),
            Err(StoreError::Refused(why)) => out.refused.push((d.id, why)),
            // Deleted or removed by someone else since the plan was made.
            Err(StoreError::NotFound(_)) | Err(StoreError::Invalid(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}
