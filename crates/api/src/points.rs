//! `/api/v1/recovery-points` (paged, by item), soft delete and undelete; `/api/v1/restores`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::path::{segment, with_query, PathError};

/// A recovery point as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PointRow {
    /// The point's id (32 hex digits).
    pub id: String,
    /// The protected VM it belongs to.
    pub vm: String,
    pub time: String,
    pub bytes_logical: u64,
    pub bytes_stored: u64,
    /// When it was (soft-)deleted; it is removed for good `soft_delete_days` later.
    pub deleted_at: Option<String>,
    /// Kept at least until then, whatever the policy's retention says.
    pub keep_until: Option<String>,
    /// The whole manifest, as `vmvault points --json` shows it.
    // As JSON, not as the format crate's `Manifest`: the API carries it as the vault
    // stores it, and the server sends it without reading it. A client reads it into the
    // `Manifest` of the format version it knows.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

impl PointRow {
    /// The manifest read as the client's own manifest type (the format crate's `Manifest`,
    /// for the CLI).
    pub fn read_manifest<M: DeserializeOwned>(&self) -> Result<M, serde_json::Error> {
        M::deserialize(&self.manifest)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
pub struct PointQuery {
    /// Only this protected item's (VM's) points.
    pub item: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// List soft-deleted points instead.
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PointPage {
    pub items: Vec<PointRow>,
    /// Give it as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub deleted_at: String,
    /// Undelete is possible until then; after it the point is removed for good.
    pub purge_after: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreRequest {
    /// The point: its id (or a unique prefix), or VM@latest, VM@ID-PREFIX, VM@RFC3339-TIME, VM.
    pub point: String,
    /// On the server's host: a new folder for the VM's disks and description, or with
    /// `disk`, the new image file for that disk.
    pub target: String,
    #[serde(default)]
    pub overwrite: bool,
    /// One disk only, by its name in the VM description.
    #[serde(default)]
    pub disk: Option<String>,
    /// The image format to write (raw, qcow2, vhd, vhdx, vmdk); default: each disk's own.
    #[serde(default)]
    pub format: Option<String>,
    /// Restore on this enrolled host, by its agent (the target is then a path on that host,
    /// under the agent's restore roots); on the server's own host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `GET` (`PointPage`).
pub fn list_path(q: &PointQuery) -> Result<String, PathError> {
    with_query("/recovery-points", q)
}

/// `GET` (`PointRow`), `DELETE` (answered with `Deleted`). `spec`: the id or a unique
/// prefix of it, or VM@latest, VM@ID-PREFIX, VM@RFC3339-TIME, VM.
pub fn point_path(spec: &str) -> Result<String, PathError> {
    Ok(format!("/recovery-points/{}", segment(spec)?))
}

/// `POST` (answered with the `PointRow`).
pub fn undelete_path(spec: &str) -> Result<String, PathError> {
    Ok(format!("/recovery-points/{}/undelete", segment(spec)?))
}

/// `POST` (`RestoreRequest`, answered with a `JobRef`).
pub const RESTORES: &str = "/restores";
