//! `/api/v1/hosts` and `/api/v1/vms`: the hypervisor hosts whose agents the server drives, and
//! the VMs those agents found (docs/design.md, "Host agents").

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::path::{segment, PathError};

wire_words! {
    /// Where a host is in its life: a code was made, the agent enrolled, or it was removed
    /// (its key stays refused; its points keep its name).
    pub enum HostState {
        Pending = "pending",
        Enrolled = "enrolled",
        Revoked = "revoked",
    }
}

wire_words! {
    /// What a found VM was doing at its host's last heartbeat.
    pub enum VmRunState {
        Running = "running",
        Paused = "paused",
        /// Known from an earlier heartbeat or a point, not running now.
        Stopped = "stopped",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AddHostRequest {
    pub name: String,
    /// How long the code enrolls: `30m`, `1h` (the default), `7d`; 5 minutes to 7 days.
    #[serde(default)]
    pub expires: Option<String>,
    /// Replace the key of a host that has enrolled (the old key is revoked when the new
    /// one enrolls).
    #[serde(default)]
    pub replace: bool,
}

/// The answer to `host add`: shown once; the server keeps only a verifier of the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentCode {
    pub host: String,
    pub code: String,
    pub expires: String,
    /// The server certificate's SHA-256 fingerprint, for `--trust-fingerprint`.
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub name: String,
    #[schema(value_type = String)]
    pub state: HostState,
    pub agent_version: Option<String>,
    pub last_heartbeat: Option<String>,
    /// How many VMs the agent reported at its last heartbeat.
    pub vms: u32,
    /// Whether the agent has been silent longer than `agent_silence_alert_secs`.
    pub silent: bool,
    /// The release the host is to run (an upgrade asked for, or the newest with
    /// `auto_upgrade`), until it runs it.
    pub wanted_version: Option<String>,
    pub auto_upgrade: bool,
    /// Versions that did not come back healthy on this host: never offered to it again.
    pub bad_versions: Vec<String>,
    pub created: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub host: String,
    pub name: String,
    #[schema(value_type = String)]
    pub state: VmRunState,
    /// The protected item backing it up, if any.
    pub protected: Option<String>,
    pub policy: Option<String>,
    pub disks: Vec<crate::agent::FoundDisk>,
    pub guest_agent: bool,
    pub last_seen: String,
}

#[derive(
    Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default, utoipa::IntoParams,
)]
pub struct VmQuery {
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProtectVmRequest {
    pub policy: String,
    /// The per-VM pre/post scripts file (TOML), kept by the server and sent with each job.
    #[serde(default)]
    pub scripts: Option<String>,
}

/// `GET` (`Vec<Host>`), `POST` (`AddHostRequest`, answered with an `EnrollmentCode`).
pub const HOSTS: &str = "/hosts";
/// `GET` (`Vec<Vm>`, `VmQuery`).
pub const VMS: &str = "/vms";

/// `DELETE`: revoke the host's key at once and cancel its running jobs.
pub fn host_path(name: &str) -> Result<String, PathError> {
    Ok(format!("/hosts/{}", segment(name)?))
}

/// `POST` (`ProtectVmRequest`, answered with the `Item`).
pub fn protect_vm_path(host: &str, vm: &str) -> Result<String, PathError> {
    Ok(format!(
        "/hosts/{}/vms/{}/protect",
        segment(host)?,
        segment(vm)?
    ))
}
