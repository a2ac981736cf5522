//! `/api/v1/audit`: who did what, and how it ended, newest first.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::path::{with_query, PathError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub time: String,
    pub user: String,
    pub action: String,
    pub target: String,
    /// `ok`, `denied: ...`, `failed: ...` or `pending approval N`.
    pub outcome: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
pub struct AuditQuery {
    pub limit: Option<u32>,
    /// Entries older than this id.
    pub before: Option<i64>,
}

/// `GET` (`Vec<AuditEntry>`).
pub fn list_path(q: &AuditQuery) -> Result<String, PathError> {
    with_query("/audit", q)
}
