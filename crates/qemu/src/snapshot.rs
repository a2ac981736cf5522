//! A point in time of a running VM's disks, held by QEMU and served over NBD (image fleecing).
//!
//! ```text
//!   guest ── drive0 (its disk) ──copy-before-write──▶ fleece (temporary qcow2, backing: drive0)
//!                                                        └── NBD export (unix socket) ──▶ vmvault
//! ```
//! One QMP `transaction` starts a `blockdev-backup sync=none` job from every disk to its fleece
//! node: from that instant, before the guest overwrites a block, QEMU copies the old block into
//! the fleece, so reading the fleece (which falls through to the disk for untouched blocks)
//! gives the disk as it was at the instant while the guest keeps writing. The same transaction
//! turns the dirty bitmaps over: the one that recorded changes since the last backup stops
//! recording (and is exported with the fleece, as `qemu:dirty-bitmap:NAME`), and a new one
//! starts, so no write is in neither.
//!
//! Everything this module adds to QEMU has a name starting with [`PREFIX`], so that what a
//! killed backup left behind can be found and removed ([`remove_leftovers`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{QemuError, Qmp, Result};

/// The prefix of every node, job and export a backup adds.
pub const PREFIX: &str = "vmvault-pit-";

/// One disk to hold.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    /// The disk's node (top of its chain).
    pub node: String,
    pub size: u64,
    /// The bitmap with the changes since the last backup: disabled at the instant and exported.
    pub base_bitmap: Option<String>,
    /// The bitmap to start at the instant, recording the changes until the next backup.
    pub new_bitmap: Option<NewBitmap>,
}

#[derive(Debug, Clone)]
pub struct NewBitmap {
    pub name: String,
    /// Kept in the image (qcow2) across restarts; else it lives as long as QEMU does.
    pub persistent: bool,
}

/// The instant, as QEMU holds it: one NBD export per disk, named by the disk's position.
pub struct PointInTime {
    socket: PathBuf,
    held: Vec<Held>,
    server_started: bool,
}

struct Held {
    fleece: String,
    file_node: String,
    job: String,
    export: String,
    path: PathBuf,
}

impl PointInTime {
    /// The unix socket QEMU serves the exports on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The export of the `i`th disk of the plan.
    pub fn export(&self, i: usize) -> &str {
        &self.held[i].export
    }
}

/// Takes the instant: makes a fleece image per disk in `scratch`, then in one transaction
/// turns the bitmaps over and starts the copy-before-write jobs, then exports the fleeces on
/// `socket`. On failure, whatever was added is removed again (bitmaps were changed only if the
/// transaction ran, and then it succeeded whole).
pub fn take(
    qmp: &mut Qmp,
    plans: &[DiskPlan],
    scratch: &Path,
    socket: &Path,
) -> Result<PointInTime> {
    let tag = std::process::id();
    let mut pit = PointInTime {
        socket: socket.to_path_buf(),
        held: Vec::new(),
        server_started: false,
    };
    let result = (|| {
        for (i, plan) in plans.iter().enumerate() {
            let held = Held {
                fleece: format!("{PREFIX}{tag}-{i}"),
                file_node: format!("{PREFIX}{tag}-{i}-file"),
                job: format!("{PREFIX}{tag}-{i}-job"),
                export: format!("disk{i}"),
                path: scratch.join(format!("{PREFIX}{tag}-{i}.qcow2")),
            };
            make_fleece(qmp, &held, plan)?;
            pit.held.push(held);
        }
        let mut actions = Vec::new();
        for (plan, held) in plans.iter().zip(&pit.held) {
            if let Some(base) = &plan.base_bitmap {
                actions.push(json!({ "type": "block-dirty-bitmap-disable",
                    "data": { "node": plan.node, "name": base } }));
            }
            if let Some(new) = &plan.new_bitmap {
                actions.push(json!({ "type": "block-dirty-bitmap-add",
                    "data": { "node": plan.node, "name": new.name, "persistent": new.persistent } }));
            }
            actions.push(json!({ "type": "blockdev-backup",
                "data": { "job-id": held.job, "device": plan.node, "target": held.fleece,
                          "sync": "none", "auto-finalize": true, "auto-dismiss": true } }));
        }
        qmp.execute("transaction", json!({ "actions": actions }))?;
        let _ = std::fs::remove_file(socket);
        qmp.execute(
            "nbd-server-start",
            json!({ "addr": { "type": "unix", "data": { "path": socket } } }),
        )
        .map_err(|e| match e {
            QemuError::Command { desc, .. } if desc.contains("already") => QemuError::Job(
                "QEMU already runs an NBD server (one per QEMU): stop it, or back up when it is \
                 not in use"
                    .into(),
            ),
            e => e,
        })?;
        pit.server_started = true;
        for (plan, held) in plans.iter().zip(&pit.held) {
            let mut export = json!({ "type": "nbd", "id": held.export_id(), "node-name": held.fleece,
                "name": held.export, "writable": false });
            if let Some(base) = &plan.base_bitmap {
                export["bitmaps"] = json!([{ "node": plan.node, "name": base }]);
            }
            qmp.execute("block-export-add", export)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(pit),
        Err(e) => {
            let _ = release(qmp, pit);
            Err(e)
        }
    }
}

impl Held {
    fn export_id(&self) -> String {
        format!("{}-export", self.fleece)
    }
}

/// An empty qcow2 of the disk's size, created by QEMU itself (`blockdev-create`), opened with
/// the disk as its backing.
fn make_fleece(qmp: &mut Qmp, held: &Held, plan: &DiskPlan) -> Result<()> {
    std::fs::File::create(&held.path).map_err(|e| QemuError::Io {
        context: format!("creating the point-in-time image {}", held.path.display()),
        source: e,
    })?;
    qmp.execute(
        "blockdev-add",
        json!({ "driver": "file", "node-name": held.file_node, "filename": held.path }),
    )?;
    let job = format!("{}-create", held.fleece);
    qmp.execute(
        "blockdev-create",
        json!({ "job-id": job, "options": { "driver": "qcow2", "file": held.file_node,
                 "size": plan.size } }),
    )?;
    wait_concluded(qmp, &job)?;
    qmp.execute(
        "blockdev-add",
        json!({ "driver": "qcow2", "node-name": held.fleece, "file": held.file_node,
                "backing": plan.node, "discard": "unmap" }),
    )?;
    Ok(())
}

/// Waits for a job (not a block job) to conclude, dismisses it, and returns its error if any.
fn wait_concluded(qmp: &mut Qmp, job: &str) -> Result<()> {
    qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(30), |d| {
        d["id"] == json!(job) && d["status"] == json!("concluded")
    })?;
    let jobs = qmp.execute("query-jobs", json!({}))?;
    let error = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == json!(job)))
        .and_then(|j| j.get("error").and_then(Value::as_str).map(str::to_string));
    qmp.execute("job-dismiss", json!({ "id": job }))?;
    match error {
        Some(e) => Err(QemuError::Job(format!("{job}: {e}"))),
        None => Ok(()),
    }
}

/// Lets the instant go: exports, NBD server, jobs, nodes and files. Every step is tried even
/// when one fails; the first failure is returned.
pub fn release(qmp: &mut Qmp, pit: PointInTime) -> Result<()> {
    let mut first: Option<QemuError> = None;
    let mut keep = |r: Result<()>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    for held in &pit.held {
        keep(remove_export(qmp, &held.export_id()));
    }
    if pit.server_started {
        keep(qmp.execute("nbd-server-stop", json!({})).map(drop));
        let _ = std::fs::remove_file(&pit.socket);
    }
    for held in &pit.held {
        keep(cancel_job(qmp, &held.job));
        keep(remove_node(qmp, &held.fleece));
        keep(remove_node(qmp, &held.file_node));
        let _ = std::fs::remove_file(&held.path);
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn remove_export(qmp: &mut Qmp, id: &str) -> Result<()> {
    let exports = qmp.execute("query-block-exports", json!({}))?;
    let present = exports
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["id"] == json!(id)));
    if !present {
        return Ok(());
    }
    qmp.execute("block-export-del", json!({ "id": id }))?;
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(30), |d| {
        d["id"] == json!(id)
    })?;
    Ok(())
}

fn cancel_job(qmp: &mut Qmp, job: &str) -> Result<()> {
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    let present = jobs
        .as_array()
        .is_some_and(|a| a.iter().any(|j| j["device"] == json!(job)));
    if !present {
        return Ok(());
    }
    qmp.execute("block-job-cancel", json!({ "device": job, "force": true }))?;
    // A `sync=none` job never completes by itself: cancelled is how it ends.
    qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), |d| {
        d["device"] == json!(job)
    })?;
    Ok(())
}

fn remove_node(qmp: &mut Qmp, node: &str) -> Result<()> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let present = nodes
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["node-name"] == json!(node)));
    if !present {
        return Ok(());
    }
    qmp.execute("blockdev-del", json!({ "node-name": node }))?;
    Ok(())
}

/// Whether `name` is a leftover: ours (by its prefix), and its backup's process (named in it)
/// is gone, or is this process, which backs up one VM at a time. Another live process's
/// backup is running and is left alone.
fn leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    match pid {
        Some(pid) if pid == std::process::id() => true,
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => true,
    }
}

/// Removes what a backup that did not end (killed, or QEMU's connection lost) left in QEMU:
/// its exports, the NBD server when nothing else is exported, its jobs, its nodes and their
/// files. Returns how many things were removed.
pub fn remove_leftovers(qmp: &mut Qmp) -> Result<usize> {
    let mut removed = 0;
    let exports = qmp.execute("query-block-exports", json!({}))?;
    let exports: Vec<String> = ids(&exports, "id");
    let others = exports.iter().filter(|e| !leftover(e)).count();
    for id in exports.iter().filter(|e| leftover(e)) {
        remove_export(qmp, id)?;
        removed += 1;
    }
    if removed > 0 && others == 0 {
        // Ours was the only user of the server.
        let _ = qmp.execute("nbd-server-stop", json!({}));
    }
    let jobs = qmp.execute("query-block-jobs", json!({}))?;
    for job in ids(&jobs, "device") {
        if leftover(&job) {
            cancel_job(qmp, &job)?;
            removed += 1;
        }
    }
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let mut ours: Vec<(String, Option<String>)> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let name = n["node-name"].as_str()?;
            leftover(name).then(|| {
                let file = n["image"]["filename"].as_str().map(str::to_string);
                (name.to_string(), file)
            })
        })
        .collect();
    // The qcow2 nodes before the file nodes under them.
    ours.sort_by_key(|(n, _)| n.ends_with("-file"));
    for (node, file) in ours {
        remove_node(qmp, &node)?;
        if let Some(f) = file.filter(|_| node.ends_with("-file")) {
            let _ = std::fs::remove_file(f);
        }
        removed += 1;
    }
    Ok(removed)
}

fn ids(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x[key].as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_gone_process_or_this_one_leaves_leftovers() {
        let me = std::process::id();
        assert!(leftover(&format!("{PREFIX}{me}-0")));
        assert!(!leftover("drive0"));
        // PID 1 runs as long as the machine does: its backup would be running.
        assert!(!leftover(&format!("{PREFIX}1-0-job")));
        assert!(leftover(&format!("{PREFIX}4194304999-0-file")));
    }
}
