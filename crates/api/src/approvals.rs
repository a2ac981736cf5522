//! `/api/v1/approvals`: destructive requests waiting for a second administrator.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Approval {
    pub id: i64,
    /// point.delete, item.unprotect, policy.shorten, vault.settings, user.create,
    /// token.create or user.role.
    pub action: String,
    pub target: String,
    /// Who asked: the holder of the token the request was made with.
    pub requested_by: String,
    pub requested_at: String,
    /// pending, deciding (being carried out), approved, rejected or failed.
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// true grants and runs the action; false rejects it.
    pub approve: bool,
}

/// `GET` (`Vec<Approval>`).
pub const COLLECTION: &str = "/approvals";

/// `POST` (`Decision`, answered with the `Approval` as decided).
pub fn approval_path(id: i64) -> String {
    format!("/approvals/{id}")
}
