//! The wire shapes of vmvault's REST API under `/api/v1`: every request body, query and
//! answer, with the OpenAPI schema each has.
//!
//! They live here, in one crate, so that there is one definition of what goes over the
//! wire: the server (crates/server) answers with these types and reads requests into them;
//! its clients (the CLI's `--server` commands today; the host agents and the web console
//! later) send and read the very same types. There is no second copy to drift from the
//! first: a field renamed or retyped changes for every side at once, and code that used the
//! old one stops compiling instead of reading a `null` at run time. The OpenAPI document the
//! server serves is derived from the same definitions, and values with a fixed set of
//! meanings (a [`Role`], a [`JobState`]) are enums on both sides, not strings each side checks
//! its own way.
//!
//! Serialization is the wire format: field order, names and `serde` attributes decide the
//! bytes the server sends, so they change only with the API. [`path`] builds request paths
//! and query strings from names with percent-encoding, so that a name is always one path
//! segment or one query value, whatever characters it has.

#[macro_use]
mod words;

pub mod agent;
pub mod approvals;
pub mod audit;
pub mod error;
pub mod hosts;
pub mod items;
pub mod jobs;
pub mod path;
pub mod points;
pub mod policies;
pub mod releases;
pub mod users;
pub mod vaults;

pub use approvals::{Approval, ApprovalState, Decision};
pub use audit::{AuditEntry, AuditQuery};
pub use error::{ErrorBody, ErrorDetail};
pub use hosts::{
    AddHostRequest, EnrollmentCode, Host, HostState, ProtectVmRequest, Vm, VmQuery, VmRunState,
};
pub use items::{BackupRequest, Item, ProtectRequest};
pub use jobs::{CancelState, Cancelled, Job, JobDetail, JobQuery, JobRef, JobState, LogLine};
pub use path::PathError;
pub use points::{Deleted, PointPage, PointQuery, PointRow, RestoreRequest};
pub use policies::Policy;
pub use releases::{AddRelease, HostSettings, ReleaseInfo, UpgradeRequest};
pub use users::{NewToken, NewUser, Role, RoleChange, UnknownRole, User};
pub use vaults::{LockRequest, VaultInfo, VaultSettings};

/// Where the API is mounted; every path this crate builds is relative to it.
pub const BASE: &str = "/api/v1";
