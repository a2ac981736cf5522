//! What a running QEMU says about itself: its name, size, and the disks its guest sees, each
//! with the block node on top of its chain and the dirty bitmaps that node carries.

use serde_json::{json, Value};

use crate::{QemuError, Qmp, Result};

/// One disk the guest sees.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDisk {
    /// A stable name: the device's id (`-device ...,id=vblk0`), else the drive's name, else
    /// the node's.
    pub name: String,
    /// The node the guest's device reads and writes (top of the chain).
    pub node: String,
    /// The image file as QEMU opened it.
    pub filename: String,
    /// `qcow2`, `raw`, ... (`raw` also for a bare `file` or `host_device` node).
    pub format: String,
    pub size: u64,
    /// The QOM path of the guest device, when it has one.
    pub qdev: Option<String>,
    pub read_only: bool,
    pub bitmaps: Vec<Bitmap>,
}

impl BlockDisk {
    /// Whether a bitmap on this node can be kept in the image across a restart.
    pub fn can_persist_bitmaps(&self) -> bool {
        self.format == "qcow2"
    }

    pub fn bitmap(&self, name: &str) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// A dirty bitmap as `query-block` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bitmap {
    pub name: String,
    pub recording: bool,
    pub persistent: bool,
    /// In use by a job or an export.
    pub busy: bool,
    /// QEMU stopped without saving it (a crash): its contents cannot be trusted.
    pub inconsistent: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// The VM as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    /// `-name`, if QEMU was given one.
    pub name: Option<String>,
    /// `running`, `paused`, `prelaunch`, ...
    pub status: String,
    pub running: bool,
    pub memory_bytes: u64,
    pub cpus: u32,
}

pub fn vm_info(qmp: &mut Qmp) -> Result<VmInfo> {
    let name = qmp.execute("query-name", json!({}))?;
    let status = qmp.execute("query-status", json!({}))?;
    let memory = qmp.execute("query-memory-size-summary", json!({}))?;
    let cpus = qmp.execute("query-cpus-fast", json!({}))?;
    Ok(VmInfo {
        name: name["name"].as_str().map(str::to_string),
        status: status["status"].as_str().unwrap_or("unknown").to_string(),
        running: status["running"].as_bool().unwrap_or(false),
        memory_bytes: memory["base-memory"].as_u64().unwrap_or(0)
            + memory["plugged-memory"].as_u64().unwrap_or(0),
        cpus: cpus.as_array().map_or(0, |a| a.len() as u32),
    })
}

/// The guest's disks: every drive with an image inserted, except removable media (a CD-ROM's
/// ISO is not the VM's data).
pub fn disks(qmp: &mut Qmp) -> Result<Vec<BlockDisk>> {
    let block = qmp.execute("query-block", json!({}))?;
    let entries = block
        .as_array()
        .ok_or_else(|| QemuError::Protocol(format!("query-block returned {block}")))?;
    let mut out = Vec::new();
    for e in entries {
        if e["removable"].as_bool() == Some(true) {
            continue;
        }
        let Some(ins) = e.get("inserted") else {
            continue;
        };
        out.push(parse_disk(e, ins)?);
    }
    Ok(out)
}

fn parse_disk(e: &Value, ins: &Value) -> Result<BlockDisk> {
    let node = ins["node-name"]
        .as_str()
        .ok_or_else(|| QemuError::Protocol(format!("a drive without a node name: {ins}")))?
        .to_string();
    let qdev = e["qdev"].as_str().map(str::to_string);
    let device = e["device"].as_str().filter(|d| !d.is_empty());
    let name = qdev
        .as_deref()
        .and_then(device_id)
        .or(device)
        .unwrap_or(&node)
        .to_string();
    let image = &ins["image"];
    let format = match ins["drv"].as_str().unwrap_or("raw") {
        "file" | "host_device" | "raw" => "raw",
        other => other,
    }
    .to_string();
    let bitmaps = ins["dirty-bitmaps"]
        .as_array()
        .map(|a| a.iter().map(parse_bitmap).collect())
        .unwrap_or_default();
    Ok(BlockDisk {
        name,
        node,
        filename: image["filename"]
            .as_str()
            .or(ins["file"].as_str())
            .unwrap_or("")
            .to_string(),
        format,
        size: image["virtual-size"]
            .as_u64()
            .ok_or_else(|| QemuError::Protocol(format!("a drive without a size: {ins}")))?,
        qdev,
        read_only: ins["ro"].as_bool().unwrap_or(false),
        bitmaps,
    })
}

/// One node by name, as a disk called `name` (for QEMU processes without guest devices, such
/// as `qemu-storage-daemon`).
pub fn node_disk(qmp: &mut Qmp, node: &str, name: &str) -> Result<BlockDisk> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let entry = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == json!(node)))
        .ok_or_else(|| QemuError::Protocol(format!("QEMU has no block node {node}")))?;
    let mut disk = parse_disk(&json!({}), entry)?;
    disk.name = name.to_string();
    Ok(disk)
}

fn parse_bitmap(b: &Value) -> Bitmap {
    Bitmap {
        name: b["name"].as_str().unwrap_or("").to_string(),
        recording: b["recording"].as_bool().unwrap_or(false),
        persistent: b["persistent"].as_bool().unwrap_or(false),
        busy: b["busy"].as_bool().unwrap_or(false),
        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
        granularity: b["granularity"].as_u64().unwrap_or(0),
        count: b["count"].as_u64().unwrap_or(0),
    }
}

/// `vblk0` from `/machine/peripheral/vblk0/virtio-backend` (devices without an id live under
/// `peripheral-anon` with names QEMU makes up, which are not stable).
fn device_id(qdev: &str) -> Option<&str> {
    let rest = qdev.strip_prefix("/machine/peripheral/")?;
    rest.split('/').next().filter(|s| !s.is_empty())
}

/// The guest device's QOM type (`virtio-blk-pci`, `scsi-hd`, ...), when it can be asked.
pub fn device_type(qmp: &mut Qmp, qdev: &str) -> Option<String> {
    // The block backend sits below the device for virtio (`.../virtio-backend`).
    let path = qdev.strip_suffix("/virtio-backend").unwrap_or(qdev);
    qmp.execute("qom-get", json!({ "path": path, "property": "type" }))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

/// Network devices with an id: (model, MAC).
pub fn nics(qmp: &mut Qmp) -> Vec<(String, Option<String>)> {
    let Ok(list) = qmp.execute("qom-list", json!({ "path": "/machine/peripheral" })) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for child in list.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (child["name"].as_str(), child["type"].as_str()) else {
            continue;
        };
        let model = ty.trim_start_matches("child<").trim_end_matches('>');
        if !(model.contains("net") || model.starts_with("e1000") || model.starts_with("rtl8139")) {
            continue;
        }
        let mac = qmp
            .execute(
                "qom-get",
                json!({ "path": format!("/machine/peripheral/{name}"), "property": "mac" }),
            )
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        out.push((model.to_string(), mac));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_come_from_the_qom_path() {
        assert_eq!(
            device_id("/machine/peripheral/vblk0/virtio-backend"),
            Some("vblk0")
        );
        assert_eq!(device_id("/machine/peripheral-anon/device[0]"), None);
    }

    #[test]
    fn a_drive_is_read_from_query_block() {
        let e = json!({
            "device": "", "removable": false, "qdev": "/machine/peripheral/vblk1/virtio-backend",
            "inserted": { "node-name": "drive1", "drv": "file", "ro": false, "file": "d1.raw",
              "image": { "virtual-size": 33554432, "filename": "d1.raw", "format": "file" },
              "dirty-bitmaps": [ { "name": "b", "recording": true, "persistent": false,
                 "busy": false, "granularity": 65536, "count": 0 } ] }
        });
        let d = parse_disk(&e, &e["inserted"]).unwrap();
        assert_eq!(d.name, "vblk1");
        assert_eq!(d.format, "raw");
        assert_eq!(d.size, 32 << 20);
        assert!(!d.can_persist_bitmaps());
        assert_eq!(d.bitmaps[0].name, "b");
        assert!(!d.bitmaps[0].inconsistent);
    }
}
