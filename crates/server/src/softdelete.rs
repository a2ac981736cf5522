//! Soft-delete and vault-lock state kept in the vault itself, so that a catalog rebuilt from
//! the vault (a lost state database, a second server) knows which points are deleted and
//! that the vault is locked.
//!
//! Markers are small JSON objects of kind `config` (written once, replicated to both regions
//! like the vault's config; docs/design.md, "Server"):
//! - `deleted.<point id>`: `{"version":1,"point":"<id>","deleted_at":"<RFC 3339>","by":"<user>"}`.
//!   The point's manifest stays, so its chunks stay and it can be restored and undeleted;
//!   removing the marker undeletes it. When the soft-delete time is over the manifest is
//!   removed first, then the marker.
//! - `immutable`: `{"version":1,"locked_at":"<RFC 3339>","by":"<user>"}`: the vault is locked.

use serde::{Deserialize, Serialize};
use vmvault_store::{Kind, StoreError, Vault};

use crate::Result;

#[derive(Serialize, Deserialize)]
struct Deleted {
    version: u32,
    point: String,
    deleted_at: String,
    by: String,
}

#[derive(Serialize, Deserialize)]
struct Locked {
    version: u32,
    locked_at: String,
    by: String,
}

fn marker_name(id: &str) -> String {
    format!("deleted.{id}")
}

pub fn mark_deleted(vault: &Vault, id: &str, at: &str, by: &str) -> Result<()> {
    let body = serde_json::to_vec(&Deleted {
        version: 1,
        point: id.into(),
        deleted_at: at.into(),
        by: by.into(),
    })
    .map_err(|e| crate::Error::Input(e.to_string()))?;
    vault
        .backend()
        .write(Kind::Config, &marker_name(id), &body)?;
    vault.backend().sync()?;
    Ok(())
}

pub fn unmark_deleted(vault: &Vault, id: &str) -> Result<()> {
    match vault.backend().remove(Kind::Config, &marker_name(id)) {
        Ok(()) | Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The deleted points and when: one stat per point, as the backends list only the vault's
/// own config among `config` objects.
pub fn markers(vault: &Vault) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for id in vault.point_ids()? {
        let name = marker_name(&id.to_hex());
        if vault.backend().stat(Kind::Config, &name)?.is_none() {
            continue;
        }
        let bytes = match vault.backend().read(Kind::Config, &name) {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        // A marker that does not parse still means deleted: hiding a point is the safe side,
        // it stays restorable and can be undeleted.
        let at = serde_json::from_slice::<Deleted>(&bytes)
            .map(|d| d.deleted_at)
            .unwrap_or_else(|_| crate::db::ts(chrono::Utc::now()));
        out.push((id.to_hex(), at));
    }
    Ok(out)
}

/// Removes a point whose soft-delete time is over: manifest first, so a crash in between
/// leaves a stray marker (ignored), never a visible point without its marker.
pub fn purge(vault: &Vault, id: &str) -> Result<()> {
    let pid = id
        .parse()
        .map_err(|_| crate::Error::Input(format!("'{id}' is not a point id")))?;
    match vault.remove_manifest(&pid) {
        Ok(()) | Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    vault.backend().sync()?;
    unmark_deleted(vault, id)
}

pub fn write_lock(vault: &Vault, at: &str, by: &str) -> Result<()> {
    let body = serde_json::to_vec(&Locked {
        version: 1,
        locked_at: at.into(),
        by: by.into(),
    })
    .map_err(|e| crate::Error::Input(e.to_string()))?;
    vault.backend().write(Kind::Config, "immutable", &body)?;
    vault.backend().sync()?;
    Ok(())
}

/// When the vault was locked, if it was.
pub fn read_lock(vault: &Vault) -> Result<Option<String>> {
    match vault.backend().read(Kind::Config, "immutable") {
        Ok(b) => Ok(Some(
            serde_json::from_slice::<Locked>(&b)
                .map(|l| l.locked_at)
                .unwrap_or_else(|_| crate::db::ts(chrono::Utc::now())),
        )),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
