//! The body of every error answer: `{"error": {"code": "...", "message": "..."}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable, one per error class (crates/class): bad_request, not_found,
    /// conflict, damaged, wrong_passphrase, busy, forbidden, unauthorized,
    /// approval_required, unavailable, internal.
    pub code: String,
    pub message: String,
    /// The approval request that must be granted, for `approval_required`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<i64>,
    /// For `approval_required` on a request that mints a token (a new admin, a token for
    /// another user): the token, shown this once, which works from its approval on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}
