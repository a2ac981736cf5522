//! `/api/v1/agent/*`: what a host agent and the server say to each other (docs/design.md,
//! "The relay data path"). Only an agent's TLS client certificate opens these routes; no
//! user token does, and no agent route creates a job, names a point or lists anything.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The ALPN protocol an agent offers; the server asks such connections for a client
/// certificate and no others.
pub const ALPN: &[u8] = b"vmvault-agent/1";

/// The header that carries a job's lease on every job route.
pub const LEASE_HEADER: &str = "vmvault-lease";

/// At most this many VMs in one heartbeat.
pub const MAX_VMS: usize = 10_000;

/// At most this many chunk frames in one upload request.
pub const MAX_FRAMES: usize = 32;

/// At most this many bytes in one upload request.
pub const MAX_UPLOAD: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The code's public part (8 Crockford base32 characters).
    pub id: String,
    /// The agent's Ed25519 public key, 32 bytes in hex; its TLS client certificate holds it.
    pub public_key: String,
    pub version: String,
    /// BLAKE3-keyed(verifier, "agent" ‖ fingerprint ‖ id ‖ public key), hex.
    pub proof: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollAnswer {
    pub host_id: i64,
    pub host: String,
    /// The server certificate's fingerprint, as the server knows it.
    pub fingerprint: String,
    /// The release public key (Ed25519, hex) agent releases are signed with.
    pub release_key: String,
    /// BLAKE3-keyed(verifier, "server" ‖ fingerprint ‖ id ‖ public key ‖ host id ‖ host ‖
    /// release key), hex: only the holder of the code's verifier can make it.
    pub server_proof: String,
}

/// A disk of a found VM, as QEMU has it open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FoundDisk {
    /// The guest's device name (`os`, `virtio0`, ...): a point's disk name.
    pub name: String,
    /// The image file QEMU has open, if it is a file.
    pub file: Option<String>,
    pub format: String,
    pub size: u64,
}

/// A VM the agent found on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FoundVm {
    pub name: String,
    /// `qemu` (bare QEMU over QMP) today; libvirt later.
    pub kind: String,
    /// `running`, `paused` or `stopped`.
    pub state: String,
    /// The QMP socket the agent reaches it through.
    pub qmp: Option<String>,
    /// The guest agent's socket, if it has one.
    pub qga: Option<String>,
    pub disks: Vec<FoundDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub version: String,
    /// The target triple the agent runs on: releases are offered for it only.
    pub target: String,
    /// An upgrade this agent rolled back since its last heartbeat.
    #[serde(default)]
    pub rolled_back: Option<RolledBack>,
    /// Random per agent process: two live instances with one key show as a conflict.
    pub instance: String,
    pub vms: Vec<FoundVm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolledBack {
    /// The version that did not come back healthy.
    pub version: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAnswer {
    /// Seconds until the next heartbeat is due.
    pub every_secs: u64,
    /// A release the agent is to run, once no job runs.
    #[serde(default)]
    pub upgrade: Option<UpgradeOffer>,
}

/// A release to upgrade to: the agent fetches the binary from [`release_path`] and trusts it
/// only if this signature checks against the release key pinned at enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpgradeOffer {
    pub version: String,
    /// The detached signature (`vmvault release 1` JSON).
    pub signature: String,
}

/// `GET`: the binary of release `version` for the calling host's target.
pub fn release_path(version: &str) -> String {
    format!("/agent/releases/{version}")
}

wire_words! {
    /// What an agent job asks the agent to do.
    pub enum AgentJobKind {
        Backup = "backup",
        Restore = "restore",
    }
}

/// A job the server leased to this host: its lease goes in [`LEASE_HEADER`] of every job
/// route until the job ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentJob {
    pub id: i64,
    #[schema(value_type = String)]
    pub kind: AgentJobKind,
    pub lease: String,
    /// The VM as the agent reported it (name on this host).
    pub vm: String,
    /// The per-VM scripts file (TOML) around the instant, if the VM has one.
    pub scripts: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginDisk {
    pub name: String,
    pub size: u64,
    /// The point's format word for the disk (`raw`, `qcow2`, ...).
    pub format: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginRequest {
    pub disks: Vec<BeginDisk>,
}

/// The base point a backup may build on: its own VM's latest live point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BasePoint {
    pub id: String,
    pub time: String,
    /// Its disks' names and sizes; each index is at [`base_path`].
    pub disks: Vec<BeginDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BeginAnswer {
    /// The new point's id (hex): the agent names its new tracking bitmap after it.
    pub point: String,
    /// The vault's id (hex), which prefixes the tracking bitmaps' names.
    pub vault_id: String,
    pub chunk_size: u32,
    /// The zstd level chunks are compressed with.
    pub zstd_level: i32,
    pub base: Option<BasePoint>,
}

/// Claims that chunks are the base point's at the same positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReuseRequest {
    /// `(position, chunk id in hex)`.
    pub claims: Vec<(u64, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReuseAnswer {
    /// The claimed positions whose chunk the vault lacks: send them.
    pub missing: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ZeroRequest {
    /// `(first position, count)` runs of all-zero chunks.
    pub runs: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub accepted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// The instant (RFC 3339); the server clamps it to [begin, now].
    pub time: String,
    /// `qemu` (a running VM at an instant) or `image` (a stopped VM's files).
    pub source: String,
    /// `application`, `filesystem` or `crash`.
    pub consistency: String,
    pub consistency_reason: String,
    /// The VM's configuration (TOML, as a point's manifest has it).
    pub vm_config: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CommitAnswer {
    pub point: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressReport {
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogReport {
    pub line: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailReport {
    pub error: String,
}

/// One frame of an upload: `position u64 | compression u8 | 0 u8×3 | plain_len u32 |
/// body_len u32 | body`, little-endian.
pub const FRAME_HEADER: usize = 20;

/// A frame's body encoding.
pub const RAW: u8 = 0;
/// One zstd frame.
pub const ZSTD: u8 = 1;
/// A chunk of zeros: no body (restore only).
pub const ZERO: u8 = 2;

/// Appends one frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, position: u64, compression: u8, plain_len: u32, body: &[u8]) {
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&[compression, 0, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// A frame read back: position, compression, plain length, body.
pub type Frame<'a> = (u64, u8, u32, &'a [u8]);

/// Splits an upload into frames; `None` if any header is cut short, has nonzero padding or a
/// body runs past the end.
pub fn frames(mut bytes: &[u8]) -> Option<Vec<Frame<'_>>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < FRAME_HEADER || bytes[9..12] != [0, 0, 0] {
            return None;
        }
        let position = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
        let compression = bytes[8];
        let plain = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
        let body_len = u32::from_le_bytes(bytes[16..20].try_into().ok()?) as usize;
        let rest = &bytes[FRAME_HEADER..];
        if rest.len() < body_len {
            return None;
        }
        out.push((position, compression, plain, &rest[..body_len]));
        bytes = &rest[body_len..];
    }
    Some(out)
}

/// What a restore job asks of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestorePlan {
    /// The point's manifest (JSON): its disks, their sizes and formats, the VM's
    /// configuration. Its chunks come by position from [`restore_chunk_path`].
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// The folder (a VM) or image file (one disk) on this host.
    pub target: String,
    pub disk: Option<String>,
    pub format: Option<String>,
    pub overwrite: bool,
}

/// `GET`: the [`RestorePlan`].
pub fn restore_path(job: i64) -> String {
    format!("/agent/jobs/{job}/restore")
}

/// `GET`: one chunk of disk number `disk` (in the manifest's order) as one frame.
pub fn restore_chunk_path(job: i64, disk: usize, position: u64) -> String {
    format!("/agent/jobs/{job}/restore/{disk}/{position}")
}

pub const ENROLL: &str = "/agent/enroll";
pub const HEARTBEAT: &str = "/agent/heartbeat";
/// `GET ?wait=SECS`: 200 with an [`AgentJob`], or 204 when none came in that time.
pub const NEXT_JOB: &str = "/agent/jobs/next";

/// A job route: `begin`, `commit`, `progress`, `log`, `fail`.
pub fn job_path(job: i64, action: &str) -> String {
    format!("/agent/jobs/{job}/{action}")
}

/// `GET`: the base point's index of disk number `disk` (32 bytes a chunk).
pub fn base_path(job: i64, disk: usize) -> String {
    format!("/agent/jobs/{job}/base/{disk}")
}

/// A disk's data route: `reuse`, `chunks`, `zero`; disks by their number in `begin`.
pub fn disk_path(job: i64, disk: usize, action: &str) -> String {
    format!("/agent/jobs/{job}/disks/{disk}/{action}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_and_a_cut_or_padded_one_is_refused() {
        let mut b = Vec::new();
        put_frame(&mut b, 7, ZSTD, 1 << 20, b"abc");
        put_frame(&mut b, 9, RAW, 2, b"xy");
        let f = frames(&b).unwrap();
        assert_eq!(
            f,
            vec![(7, ZSTD, 1 << 20, &b"abc"[..]), (9, RAW, 2, &b"xy"[..])]
        );
        assert!(frames(&b[..b.len() - 1]).is_none());
        let mut padded = b.clone();
        padded[10] = 1;
        assert!(frames(&padded).is_none());
        assert_eq!(frames(&[]).unwrap(), vec![]);
    }
}
