//! `vmvault backup` of a QEMU VM: running (over its QMP socket) or stopped (from the image
//! files its description lists, else those QEMU had open at its last backup).

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use vmvault_engine::{
    backup_running_vm, backup_stopped_vm, BackupOptions, DiskDescription, RunningVm, VmDescription,
};
use vmvault_format::Manifest;
use vmvault_store::Vault;

use crate::exit::InputError;
use crate::output::Bar;

pub fn backup(
    vault: &Vault,
    desc: Option<VmDescription>,
    qmp: &Option<PathBuf>,
    name: Option<String>,
    scratch: Option<PathBuf>,
) -> Result<Manifest> {
    if let Some(d) = &desc {
        if d.source == "image" {
            return Err(InputError(format!(
                "{} describes image files (source = \"image\"): leave out --qmp, or make it \
                 source = \"qemu\"",
                d.name
            ))
            .into());
        }
    }
    let qmp = qmp
        .clone()
        .or_else(|| desc.as_ref().and_then(|d| d.qmp.clone()))
        .ok_or_else(|| {
            InputError("give --qmp SOCKET (or qmp = \"...\" in the description)".into())
        })?;
    let name = name.or_else(|| desc.as_ref().map(|d| d.name.clone()));
    let scratch = scratch.unwrap_or_else(std::env::temp_dir);
    let opts = BackupOptions::default();
    let bar = Bar::new();
    if running(&qmp)? {
        let vm = RunningVm {
            qmp,
            name,
            scratch,
            quiesce: None,
        };
        return Ok(backup_running_vm(vault, vm, &opts, &bar)?);
    }
    let name = name.ok_or_else(|| {
        InputError(format!(
            "QEMU is not running at {} and the VM's name is unknown: give --name or a \
             description",
            qmp.display()
        ))
    })?;
    let disks = match desc.map(|d| d.disks).filter(|d| !d.is_empty()) {
        Some(disks) => disks,
        None => last_disks(vault, &name, &qmp)?,
    };
    eprintln!(
        "vmvault: {name} is not running (nothing answers at {}): backing it up from its image \
         files",
        qmp.display()
    );
    Ok(backup_stopped_vm(
        vault, &name, &disks, &scratch, &opts, &bar,
    )?)
}

/// Whether a QEMU answers at `socket`: a missing socket or a refused connection is a stopped
/// VM; anything else is an error worth seeing.
fn running(socket: &Path) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::metadata(socket) {
        if !meta.file_type().is_socket() {
            return Err(InputError(format!(
                "{} is not a socket: --qmp takes QEMU's monitor socket (-qmp unix:PATH,server=on)",
                socket.display()
            ))
            .into());
        }
    }
    match UnixStream::connect(socket) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            Ok(false)
        }
        Err(e) => Err(anyhow!("connecting to {}: {e}", socket.display())),
    }
}

/// The image files QEMU had open at the VM's latest backup.
fn last_disks(vault: &Vault, name: &str, qmp: &Path) -> Result<Vec<DiskDescription>> {
    let (points, _) = vault.points()?;
    let last = points
        .iter()
        .filter(|m| m.vm == name && !m.vm_config.disks.is_empty())
        .max_by(|a, b| a.time.cmp(&b.time))
        .ok_or_else(|| {
            InputError(format!(
                "QEMU is not running at {} and {name} has no recovery point naming its image \
                 files: give a description with source = \"qemu\" and [[disks]]",
                qmp.display()
            ))
        })?;
    Ok(last
        .vm_config
        .disks
        .iter()
        .map(|d| DiskDescription {
            name: d.name.clone(),
            path: PathBuf::from(&d.path),
            format: d.format.clone(),
            bus: d.bus.clone(),
        })
        .collect())
}
