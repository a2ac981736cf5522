//! The VM description: a small TOML file naming a VM's disks and configuration.
//!
//! ```toml
//! name = "web01"          # required; letters, digits, '.', '_', '-' (1-64, starting alphanumeric)
//! cpus = 2                # required; virtual CPUs, at least 1
//! memory_mib = 2048       # required; memory in MiB, at least 1
//! firmware = "bios"       # "bios" (default) or "uefi"
//! source = "image"        # where disks are read: "image" (default), the VM's disk image files
//!
//! [[disks]]               # at least one
//! name = "os"             # required; unique within the VM, same characters as the VM name
//! path = "web01-os.raw"   # required; relative to this file's folder, or absolute
//! format = "raw"          # "raw" (default), "qcow2", "vhd", "vhdx", "vmdk", "auto" (detected)
//! bus = "virtio"          # "virtio" (default), "scsi", "sata", "ide" or "nvme"
//! allow_backing = ["/var/lib/images/bases"]  # folders besides the image's own that its
//!                         # backing files, parents and extents may be read from (default none)
//!
//! [[nics]]                # any number
//! model = "virtio"        # "virtio" (default), "e1000", "e1000e", "rtl8139", "vmxnet3"
//! mac = "52:54:00:12:34:56"   # optional
//! network = "br0"         # optional: the bridge or network the NIC is attached to
//! ```
//! Unknown fields are errors, so that a misspelt field is never silently ignored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmvault_format::{VmConfig, VmDisk, VmNic};

use crate::{EngineError, Result};

const BUSES: &[&str] = &["virtio", "scsi", "sata", "ide", "nvme"];
const NIC_MODELS: &[&str] = &["virtio", "e1000", "e1000e", "rtl8139", "vmxnet3"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDescription {
    pub name: String,
    /// For a `qemu` VM, 0 (the default) means: as QEMU says.
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
    #[serde(default = "default_firmware")]
    pub firmware: String,
    #[serde(default = "default_source")]
    pub source: String,
    /// `qemu` VMs: QEMU's monitor socket; its guest agent's socket; the pre/post scripts file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qga: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scripts: Option<PathBuf>,
    /// For a `qemu` VM, the image files to read when the VM is stopped (else those QEMU had
    /// open at the last backup).
    #[serde(default)]
    pub disks: Vec<DiskDescription>,
    #[serde(default)]
    pub nics: Vec<NicDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDescription {
    pub name: String,
    pub path: PathBuf,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_bus")]
    pub bus: String,
    /// Folders besides the image's own that the files it names (qcow2 backing files, VHD and
    /// VHDX parents, VMDK extents) may be read from: relative to the description's folder, or
    /// absolute. The image chose those names, not the user, so none is followed elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_backing: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicDescription {
    #[serde(default = "default_nic_model")]
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

fn default_firmware() -> String {
    "bios".into()
}
fn default_source() -> String {
    "image".into()
}
fn default_format() -> String {
    "raw".into()
}
fn default_bus() -> String {
    "virtio".into()
}
fn default_nic_model() -> String {
    "virtio".into()
}

/// The rule for VM and disk names lives with the manifest, which is checked against it again
/// when read back from a vault.
pub(crate) use vmvault_format::{valid_name, NAME_RULE};

impl VmDescription {
    /// Reads and checks a description; disk paths come back resolved against its folder.
    pub fn load(path: &Path) -> Result<VmDescription> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Input(format!("reading {}: {e}", path.display())))?;
        let mut desc = Self::parse(&text)
            .map_err(|e| EngineError::Input(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for d in &mut desc.disks {
            d.path = base.join(&d.path);
            for a in &mut d.allow_backing {
                *a = base.join(&*a);
            }
        }
        for p in [&mut desc.qmp, &mut desc.qga, &mut desc.scripts]
            .into_iter()
            .flatten()
        {
            *p = base.join(&*p);
        }
        Ok(desc)
    }

    /// Parses and checks a description's text.
    pub fn parse(text: &str) -> std::result::Result<VmDescription, String> {
        let desc: VmDescription = toml::from_str(text).map_err(|e| {
            // toml's messages span several lines with a source excerpt: keep the gist on one.
            e.message().to_string()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default()
        })?;
        desc.check()?;
        Ok(desc)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!("VM name {:?} must be {NAME_RULE}", self.name));
        }
        let qemu = self.source == "qemu";
        if !qemu && (self.cpus == 0 || self.memory_mib == 0) {
            return Err("cpus and memory_mib must be at least 1".into());
        }
        if !matches!(self.firmware.as_str(), "bios" | "uefi") {
            return Err(format!(
                "firmware {:?} must be \"bios\" or \"uefi\"",
                self.firmware
            ));
        }
        if !matches!(self.source.as_str(), "image" | "qemu") {
            return Err(format!(
                "source {:?} must be \"image\" (disk image files) or \"qemu\" (a QEMU VM, \
                 running or not)",
                self.source
            ));
        }
        if qemu && self.qmp.is_none() {
            return Err("a VM with source = \"qemu\" needs qmp = \"/path/to/qmp.sock\"".into());
        }
        if !qemu && (self.qmp.is_some() || self.qga.is_some() || self.scripts.is_some()) {
            return Err("qmp, qga and scripts are for source = \"qemu\"".into());
        }
        if !qemu && self.disks.is_empty() {
            return Err("a VM needs at least one [[disks]] entry".into());
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for d in &self.disks {
            if !valid_name(&d.name) {
                return Err(format!("disk name {:?} must be {NAME_RULE}", d.name));
            }
            if !names.insert(d.name.as_str()) {
                return Err(format!("disk {:?} is listed twice", d.name));
            }
            if !paths.insert(d.path.as_path()) {
                return Err(format!("disk path {} is listed twice", d.path.display()));
            }
            if !vmvault_disk::FORMATS.contains(&d.format.as_str()) {
                return Err(format!(
                    "disk {:?}: format {:?} is not one of {}",
                    d.name,
                    d.format,
                    vmvault_disk::FORMATS.join(", ")
                ));
            }
            if !BUSES.contains(&d.bus.as_str()) {
                return Err(format!(
                    "disk {:?}: bus {:?} is not one of {}",
                    d.name,
                    d.bus,
                    BUSES.join(", ")
                ));
            }
        }
        for n in &self.nics {
            if !NIC_MODELS.contains(&n.model.as_str()) {
                return Err(format!(
                    "nic model {:?} is not one of {}",
                    n.model,
                    NIC_MODELS.join(", ")
                ));
            }
            if let Some(mac) = &n.mac {
                let ok = mac.len() == 17
                    && mac.split(':').count() == 6
                    && mac
                        .split(':')
                        .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
                if !ok {
                    return Err(format!("nic mac {mac:?} is not like 52:54:00:12:34:56"));
                }
            }
        }
        Ok(())
    }

    /// The configuration stored in a recovery point.
    pub fn to_config(&self) -> VmConfig {
        VmConfig {
            name: self.name.clone(),
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            firmware: self.firmware.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| VmDisk {
                    name: d.name.clone(),
                    path: d.path.display().to_string(),
                    format: d.format.clone(),
                    bus: d.bus.clone(),
                })
                .collect(),
            nics: self
                .nics
                .iter()
                .map(|n| VmNic {
                    model: n.model.clone(),
                    mac: n.mac.clone(),
                    network: n.network.clone(),
                })
                .collect(),
        }
    }

    /// The description of a restored VM whose disks are the files `disk_files` (by disk name).
    pub fn from_config(
        config: &VmConfig,
        disk_file: impl Fn(&VmDisk) -> (PathBuf, String),
    ) -> VmDescription {
        VmDescription {
            name: config.name.clone(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            firmware: config.firmware.clone(),
            source: default_source(),
            qmp: None,
            qga: None,
            scripts: None,
            disks: config
                .disks
                .iter()
                .map(|d| {
                    let (path, format) = disk_file(d);
                    DiskDescription {
                        name: d.name.clone(),
                        path,
                        format,
                        bus: d.bus.clone(),
                        allow_backing: Vec::new(),
                    }
                })
                .collect(),
            nics: config
                .nics
                .iter()
                .map(|n| NicDescription {
                    model: n.model.clone(),
                    mac: n.mac.clone(),
                    network: n.network.clone(),
                })
                .collect(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("description serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web01"
cpus = 2
memory_mib = 2048
firmware = "uefi"
[[disks]]
name = "os"
path = "os.raw"
[[disks]]
name = "data"
path = "/srv/data.raw"
format = "raw"
bus = "scsi"
[[nics]]
mac = "52:54:00:12:34:56"
network = "br0"
"#;

    #[test]
    fn parses_with_defaults() {
        let d = VmDescription::parse(GOOD).unwrap();
        assert_eq!(d.disks[0].format, "raw");
        assert_eq!(d.disks[0].bus, "virtio");
        assert_eq!(d.nics[0].model, "virtio");
        let again = VmDescription::parse(&d.to_toml()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn a_qemu_vm_needs_only_its_sockets() {
        let d = VmDescription::parse(
            "name = \"web01\"\nsource = \"qemu\"\nqmp = \"/run/vm/web01.qmp\"\nqga = \"/run/vm/web01.qga\"",
        )
        .unwrap();
        assert_eq!(d.qmp.as_deref(), Some(Path::new("/run/vm/web01.qmp")));
        assert!(d.disks.is_empty() && d.cpus == 0);
    }

    #[test]
    fn rejects_bad_descriptions() {
        let cases = [
            (GOOD.replace("firmware", "firmwar"), "unknown field"),
            (GOOD.replace("\"data\"", "\"os\""), "listed twice"),
            (GOOD.replace("/srv/data.raw", "os.raw"), "listed twice"),
            (GOOD.replace("\"web01\"", "\"../x\""), "VM name"),
            (GOOD.replace("\"uefi\"", "\"efi\""), "firmware"),
            (GOOD.replace("\"scsi\"", "\"usb\""), "bus"),
            (
                GOOD.replace("format = \"raw\"", "format = \"iso\""),
                "format",
            ),
            (GOOD.replace("52:54:00:12:34:56", "nope"), "mac"),
            (GOOD.replace("cpus = 2", "cpus = 0"), "at least 1"),
            (GOOD.replace("cpus = 2", ""), "at least 1"),
            (
                GOOD.replace("name = \"web01\"", "name = \"web01\"\nsource = \"qemu\""),
                "needs qmp",
            ),
            (
                GOOD.replace("name = \"web01\"", "name = \"web01\"\nqmp = \"q.sock\""),
                "are for source",
            ),
            (
                GOOD.replace("name = \"web01\"", "name = \"web01\"\nsource = \"xen\""),
                "must be",
            ),
            (
                "name = \"x\"\ncpus = 1\nmemory_mib = 1\ndisks = []".to_string(),
                "at least one",
            ),
            (GOOD.replace("cpus = 2", "cpus = \"two\""), "invalid type"),
        ];
        for (text, want) in cases {
            let err = VmDescription::parse(&text).unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }
}
