//! Live restore, the QEMU side: a running (or paused) VM gets a disk whose reads come from a
//! recovery point served over NBD, through a local qcow2 overlay that receives the guest's
//! writes; a `block-stream` job then copies every block the overlay lacks from the NBD
//! export, and when it ends the overlay is a normal local disk and the export is let go.
//!
//! ```text
//!   guest ── virtio-blk ── qcow2 overlay (local file) ── backing: nbd (vmvault serve)
//!                                  ▲ block-stream copies backing → overlay, then drops it
//! ```
//! The guest can start the moment the overlay is attached: a read of a block not yet copied
//! goes to the export, which fetches just that chunk from the vault.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{QemuError, Qmp, Result};

/// What to attach, and where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The unix socket vmvault serves the recovery point's disk on, and its export name.
    pub nbd_socket: PathBuf,
    pub export: String,
    /// The local overlay: an empty qcow2 file of the disk's size, made beforehand.
    pub overlay: PathBuf,
    /// The guest device's id (`device_add id`), and the bus to plug it into (a free
    /// `pcie-root-port` on q35), if any.
    pub device: String,
    pub bus: Option<String>,
}

impl Plan {
    fn source_node(&self) -> String {
        format!("{}-vmvault-src", self.device)
    }

    fn overlay_node(&self) -> String {
        format!("{}-vmvault", self.device)
    }

    fn job(&self) -> String {
        format!("{}-vmvault-stream", self.device)
    }
}

/// Adds the export and the overlay as block nodes and plugs the overlay into the guest.
/// Undone as far as it went when a step fails.
pub fn attach(qmp: &mut Qmp, plan: &Plan) -> Result<()> {
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": plan.source_node(),
            "server": { "type": "unix", "path": plan.nbd_socket },
            "export": plan.export,
            "read-only": true,
        }),
    )?;
    let overlay = qmp.execute(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": plan.overlay_node(),
            "file": { "driver": "file", "filename": plan.overlay },
            "backing": plan.source_node(),
        }),
    );
    if let Err(e) = overlay {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": plan.source_node() }));
        return Err(e);
    }
    let mut device = json!({
        "driver": "virtio-blk-pci",
        "drive": plan.overlay_node(),
        "id": plan.device,
    });
    if let Some(bus) = &plan.bus {
        device["bus"] = json!(bus);
    }
    if let Err(e) = qmp.execute("device_add", device) {
        let _ = qmp.execute("blockdev-del", json!({ "node-name": plan.overlay_node() }));
        let _ = qmp.execute("blockdev-del", json!({ "node-name": plan.source_node() }));
        return Err(e);
    }
    Ok(())
}

/// Resumes a VM that waits to start (`-S`) or is paused; `true` when it did.
pub fn start_if_paused(qmp: &mut Qmp) -> Result<bool> {
    let status = qmp.execute("query-status", json!({}))?;
    if status["running"].as_bool() == Some(true) {
        return Ok(false);
    }
    qmp.execute("cont", json!({}))?;
    Ok(true)
}

/// Progress of the copy: bytes done of total.
pub type OnProgress<'a> = &'a mut dyn FnMut(u64, u64);

/// Copies everything the overlay lacks from the export and waits for it; then the export's
/// node is removed and the overlay stands alone.
pub fn stream(qmp: &mut Qmp, plan: &Plan, on_progress: OnProgress<'_>) -> Result<()> {
    qmp.execute(
        "block-stream",
        json!({ "job-id": plan.job(), "device": plan.overlay_node() }),
    )?;
    let job = plan.job();
    loop {
        // Progress from the job list; completion from its event.
        let jobs = qmp.execute("query-block-jobs", json!({}))?;
        if let Some(j) = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == json!(job)))
        {
            on_progress(
                j["offset"].as_u64().unwrap_or(0),
                j["len"].as_u64().unwrap_or(0),
            );
        }
        let done = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_millis(500), |d| {
            d["device"] == json!(job)
        });
        match done {
            Ok(e) => {
                if let Some(err) = e.data.get("error").and_then(Value::as_str) {
                    return Err(QemuError::Job(format!("copying the disk in failed: {err}")));
                }
                let len = e.data["len"].as_u64().unwrap_or(0);
                on_progress(len, len);
                break;
            }
            Err(QemuError::Timeout(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    qmp.execute("blockdev-del", json!({ "node-name": plan.source_node() }))?;
    Ok(())
}

/// The overlay file's backing as QEMU sees it now (`None`: it stands alone).
pub fn overlay_backing(qmp: &mut Qmp, plan: &Plan) -> Result<Option<String>> {
    let nodes = qmp.execute("query-named-block-nodes", json!({}))?;
    let node = nodes
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|n| n["node-name"] == json!(plan.overlay_node()))
        })
        .cloned()
        .ok_or_else(|| QemuError::Protocol("the overlay node is gone".into()))?;
    Ok(node["backing_file"].as_str().map(str::to_string))
}
