//! `/api/v1/approvals`: destructive requests waiting for a second administrator.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

wire_words! {
    /// Where a request for approval is: `pending` (waiting for a second administrator),
    /// `deciding` (being carried out), or decided: `approved`, `rejected`, `failed`.
    pub enum ApprovalState {
        Pending = "pending",
        Deciding = "deciding",
        Approved = "approved",
        Rejected = "rejected",
        /// Approved, but carrying it out failed (or the server stopped while it ran).
        Failed = "failed",
    }
}

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
    #[schema(value_type = String)]
    pub state: ApprovalState,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(state: ApprovalState) -> Approval {
        Approval {
            id: 4,
            action: "point.delete".into(),
            target: "web01@0123abcd".into(),
            requested_by: "ops".into(),
            requested_at: "2024-05-01T02:00:00.000Z".into(),
            state,
            decided_by: None,
            decided_at: None,
        }
    }

    /// Each state is its exact word on the wire and in the server's database.
    #[test]
    fn approval_states_are_their_wire_words() {
        let words = [
            (ApprovalState::Pending, "pending"),
            (ApprovalState::Deciding, "deciding"),
            (ApprovalState::Approved, "approved"),
            (ApprovalState::Rejected, "rejected"),
            (ApprovalState::Failed, "failed"),
        ];
        assert_eq!(ApprovalState::KNOWN.len(), words.len());
        for (state, word) in words {
            let v = serde_json::to_value(approval(state.clone())).unwrap();
            assert_eq!(v["state"], word);
            let back: Approval = serde_json::from_value(v).unwrap();
            assert_eq!(back.state, state);
            assert_eq!(ApprovalState::from(word.to_string()), state);
            assert_eq!(state.to_string(), word);
        }
    }

    /// A state from a newer server is kept as written, not refused.
    #[test]
    fn an_unknown_approval_state_reads_as_unknown() {
        let mut v = serde_json::to_value(approval(ApprovalState::Pending)).unwrap();
        v["state"] = "expired".into();
        let back: Approval = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.state, ApprovalState::Unknown("expired".into()));
        assert!(!back.state.is_known());
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
    }
}
