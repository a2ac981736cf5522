//! `vmvault backup` of a QEMU VM: running (over its QMP socket) or stopped (from the image
//! files its description lists, else those QEMU had open at its last backup).

use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Result};
use vmvault_engine::{
    backup_running_vm, backup_stopped_vm, BackupOptions, DiskDescription, EngineError, Quiesce,
    QuiesceEnd, RunningVm, VmDescription,
};
use vmvault_format::{Consistency, Manifest};
use vmvault_qemu::{Level, QuiesceOptions, QuiesceSession, Scripts};
use vmvault_store::Vault;

use crate::backup::BackupArgs;
use crate::exit::InputError;
use crate::output::Bar;

pub fn backup(vault: &Vault, desc: Option<VmDescription>, args: &BackupArgs) -> Result<Manifest> {
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
    let qmp = args
        .qmp
        .clone()
        .or_else(|| desc.as_ref().and_then(|d| d.qmp.clone()))
        .ok_or_else(|| {
            InputError("give --qmp SOCKET (or qmp = \"...\" in the description)".into())
        })?;
    let name = args
        .name
        .clone()
        .or_else(|| desc.as_ref().map(|d| d.name.clone()));
    let scratch = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let qga = args
        .qga
        .clone()
        .or_else(|| desc.as_ref().and_then(|d| d.qga.clone()));
    let scripts = match args
        .scripts
        .clone()
        .or_else(|| desc.as_ref().and_then(|d| d.scripts.clone()))
    {
        Some(file) => Some(Scripts::load(&file).map_err(|e| InputError(e.to_string()))?),
        None => None,
    };
    if scripts.is_some() && qga.is_none() {
        return Err(InputError(
            "scripts run in the guest through its agent: give --qga SOCKET too".into(),
        )
        .into());
    }
    if args.freeze_limit == 0 || args.freeze_limit > 600 {
        return Err(InputError("--freeze-limit must be 1 to 600 seconds".into()).into());
    }
    let opts = BackupOptions::default();
    let bar = Bar::new();
    if running(&qmp)? {
        let mut agent = qga.map(|qga| {
            GuestAgent::new(QuiesceOptions {
                qga,
                scripts,
                freeze_limit: Duration::from_secs(args.freeze_limit),
            })
        });
        let vm = RunningVm {
            qmp,
            name,
            scratch,
            quiesce: agent.as_mut().map(|a| a as &mut dyn Quiesce),
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

/// The guest agent's quiesce, for the engine: a helper process (this binary, re-executed)
/// holds the freeze, so that the guest thaws even if this process dies. `backup --qmp` and
/// `agent run` both use it.
pub(crate) struct GuestAgent {
    opts: QuiesceOptions,
    session: Option<QuiesceSession>,
}

impl GuestAgent {
    pub(crate) fn new(opts: QuiesceOptions) -> GuestAgent {
        GuestAgent {
            opts,
            session: None,
        }
    }
}

impl Quiesce for GuestAgent {
    fn begin(&mut self) -> vmvault_engine::Result<(Consistency, String)> {
        let helper = crate::quiesce::helper_command().map_err(|e| EngineError::Io {
            context: "finding this program to start the quiesce helper".into(),
            source: e,
        })?;
        let session = vmvault_qemu::quiesce(&self.opts, helper)?;
        let state = session.state().clone();
        self.session = Some(session);
        let consistency = match state.level {
            Level::Application => Consistency::Application,
            Level::Filesystem => Consistency::Filesystem,
            Level::Crash => Consistency::Crash,
        };
        Ok((consistency, state.reason.unwrap_or_default()))
    }

    fn end(&mut self) -> vmvault_engine::Result<QuiesceEnd> {
        let Some(session) = self.session.take() else {
            return Ok(QuiesceEnd::default());
        };
        let released = session.release()?;
        let limit = self.opts.freeze_limit.as_secs();
        Ok(QuiesceEnd {
            frozen_for: released.frozen_for,
            warnings: released.warnings,
            downgrade: released.thawed_early.then(|| {
                (
                    Consistency::Crash,
                    format!(
                        "the guest was thawed at the freeze limit ({limit} s) before the \
                         instant was taken"
                    ),
                )
            }),
        })
    }
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
            allow_backing: Vec::new(),
        })
        .collect())
}
