//! `/api/v1/protected-items`: VMs under a policy, and on-demand backups of them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::path::{segment, PathError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProtectRequest {
    /// The VM description (the TOML `vmvault backup` reads), disk paths absolute on the
    /// server's host.
    pub description: String,
    pub policy: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Item {
    pub name: String,
    pub policy: String,
    pub next_run: Option<String>,
    pub created: String,
    /// The VM description (TOML).
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct BackupRequest {
    /// Keep the new point at least until this date (YYYY-MM-DD or RFC 3339).
    #[serde(default)]
    pub keep_until: Option<String>,
}

/// `GET` (`Vec<Item>`), `POST` (`ProtectRequest`, answered with the `Item`).
pub const COLLECTION: &str = "/protected-items";

/// `GET` (`Item`), `DELETE` (unprotect; its points stay).
pub fn item_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/protected-items/{}", segment(name)?))
}

/// `POST` (`BackupRequest`, answered with a `JobRef`).
pub fn backup_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/protected-items/{}/backup", segment(name)?))
}
