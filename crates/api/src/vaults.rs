//! `/api/v1/vaults`: the vault this server keeps, its settings and its lock.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::path::{segment, PathError};

// No doc comment on the types whose schema has no description: it would become one.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VaultInfo {
    pub name: String,
    pub location: String,
    pub encrypted: bool,
    pub chunk_size: u32,
    pub recovery_points: i64,
    pub bytes_stored: i64,
    /// Days a deleted point stays restorable.
    pub soft_delete_days: u32,
    /// When the vault was made immutable (irreversible), if it was.
    pub locked_at: Option<String>,
    /// Destructive actions wait for a second admin's approval.
    pub require_approval: bool,
    /// Whether the storage itself keeps objects against deletion (S3 Object Lock), in words.
    pub storage_lock: String,
    pub schema_version: usize,
}

// The PATCH body: only the fields given change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VaultSettings {
    /// 1..=180.
    pub soft_delete_days: Option<u32>,
    pub require_approval: Option<bool>,
}

// The POST body of a lock (optional): how long the storage holds each object.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Days the storage holds each object after it is written or renewed (S3 Object Lock,
    /// compliance mode), 1..=3650; 30 when not given. Can be lengthened later, never shortened.
    pub hold_days: Option<u32>,
}

/// `GET`: every vault (`Vec<VaultInfo>`).
pub const COLLECTION: &str = "/vaults";

/// `GET` (`VaultInfo`), `PATCH` (`VaultSettings`).
pub fn vault_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/vaults/{}", segment(name)?))
}

/// `POST` (optional `LockRequest`): lock the vault (irreversible), or lengthen its storage hold.
pub fn lock_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/vaults/{}/lock", segment(name)?))
}
