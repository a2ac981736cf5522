//! `/api/v1/releases` and host upgrades: agent releases signed with the server's release key
//! (docs/design.md, "Releases and the keys they touch").

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::path::{segment, PathError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseInfo {
    pub version: String,
    pub target: String,
    /// The binary's SHA-256 (hex).
    pub sha256: String,
    pub size: u64,
    pub added: String,
}

/// `POST /releases?version=V&target=T` with the binary as the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, IntoParams)]
pub struct AddRelease {
    pub version: String,
    /// The target triple; the server's own by default.
    #[serde(default)]
    pub target: Option<String>,
}

/// The header carrying a detached signature (`vmvault release sign`'s `.sig` file, hex of its
/// bytes) when the server holds only the public half of an offline release key.
pub const SIGNATURE_HEADER: &str = "vmvault-release-signature";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The version to run; the newest release for the host's target when absent.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    /// Upgrade to each newest release by itself.
    #[serde(default)]
    pub auto_upgrade: Option<bool>,
}

/// `GET` (`Vec<ReleaseInfo>`), `POST` (`AddRelease` + the binary, answered with the info).
pub const RELEASES: &str = "/releases";

/// `POST` (`UpgradeRequest`, answered with the `Host`).
pub fn upgrade_path(host: &str) -> Result<String, PathError> {
    Ok(format!("/hosts/{}/upgrade", segment(host)?))
}

/// `PATCH` (`HostSettings`, answered with the `Host`).
pub fn settings_path(host: &str) -> Result<String, PathError> {
    Ok(format!("/hosts/{}", segment(host)?))
}
