//! Backup of a QEMU VM: running (over QMP, at one instant while the guest keeps writing) or
//! stopped (its image files, through a paused QEMU of our own so that the qcow2 images'
//! tracking bitmaps are used and kept the same way).
//!
//! The order of steps is what keeps every recovery point true and every change tracked:
//! 1. leftovers of a backup that did not end are removed from QEMU, and each disk's bitmaps
//!    are sorted out ([`crate::tracking`]) while the guest runs on;
//! 2. the guest is quiesced (when a [`Quiesce`] is given), the instant is taken in one QMP
//!    transaction, and the guest is let go at once: it is frozen only for the transaction;
//! 3. the disks are read from QEMU's exports: only dirty chunks when a bitmap is trusted;
//! 4. the point is written (indexes, then the manifest), and only then is the old bitmap
//!    removed. A failure before that folds the new bitmap back into the old one, so the next
//!    backup reads every change again; a kill leaves both, and the next backup folds them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmvault_format::{Consistency, Manifest, PointId, VmConfig, VmDisk, VmNic};
use vmvault_qemu::block::{self, BlockDisk};
use vmvault_qemu::snapshot::{self, DiskPlan, NewBitmap};
use vmvault_qemu::{bitmap, Qmp};
use vmvault_store::Vault;

use crate::destination::{Changes, Destination, DiskToWrite, PointFacts, VaultDestination};
use crate::nbd_source::NbdSource;
use crate::tracking::{self, Decision};
use crate::{BackupOptions, DiskDescription, EngineError, Progress, Result};

/// Quiescing the guest around the instant (the guest agent's freeze and scripts).
pub trait Quiesce {
    /// Quiesces; returns the consistency the point will have and why it is not higher. An
    /// error fails the backup (and must leave the guest running normally).
    fn begin(&mut self) -> Result<(Consistency, String)>;
    /// Lets the guest go on, right after the instant. An error fails the backup (a
    /// post-script that failed without continue-on-failure).
    fn end(&mut self) -> Result<QuiesceEnd>;
}

/// How a quiesce ended.
#[derive(Debug, Default)]
pub struct QuiesceEnd {
    /// How long the guest was frozen.
    pub frozen_for: Duration,
    pub warnings: Vec<String>,
    /// A lower consistency than `begin` promised, and why (the guest was thawed before the
    /// instant, a post-script failed with continue-on-failure).
    pub downgrade: Option<(Consistency, String)>,
}

/// A running QEMU VM to back up.
pub struct RunningVm<'a> {
    pub qmp: PathBuf,
    /// The VM's name in the vault; QEMU's `-name` when absent.
    pub name: Option<String>,
    /// Where QEMU keeps the point-in-time images while the backup reads them.
    pub scratch: PathBuf,
    pub quiesce: Option<&'a mut dyn Quiesce>,
}

/// Backs up a running (or paused) QEMU VM at one instant.
pub fn backup_running_vm(
    vault: &Vault,
    vm: RunningVm<'_>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let mut dest = VaultDestination::new(vault, opts);
    backup_running_vm_to(&mut dest, vm, progress)?;
    committed(dest)
}

fn committed(dest: VaultDestination<'_>) -> Result<Manifest> {
    dest.into_manifest()
        .ok_or_else(|| EngineError::Input("the backup ended without a point".into()))
}

/// [`backup_running_vm`] into any [`Destination`]; returns the new point's id.
pub fn backup_running_vm_to(
    dest: &mut dyn Destination,
    vm: RunningVm<'_>,
    progress: &dyn Progress,
) -> Result<PointId> {
    let mut qmp = Qmp::connect(&vm.qmp)?;
    let info = block::vm_info(&mut qmp)?;
    let name = match vm.name.or(info.name.clone()) {
        Some(n) => n,
        None => {
            return Err(EngineError::Input(
                "QEMU was started without -name: give the VM's name with --name".into(),
            ))
        }
    };
    if !crate::description::valid_name(&name) {
        return Err(EngineError::Input(format!(
            "VM name {name:?} must be 1-64 letters, digits, '.', '_' or '-' (give another with --name)"
        )));
    }
    let disks = block::disks(&mut qmp)?;
    if disks.is_empty() {
        return Err(EngineError::Input(format!(
            "QEMU at {} has no disks to back up",
            vm.qmp.display()
        )));
    }
    let (consistency, reason) = match vm.quiesce {
        Some(_) => (Consistency::Crash, String::new()),
        None if info.running => (
            Consistency::Crash,
            "no guest agent given (--qga): the disks were taken as a power loss would leave them"
                .to_string(),
        ),
        None => (
            Consistency::Crash,
            format!(
                "the VM was {} (not running): its disks were taken as they stood",
                info.status
            ),
        ),
    };
    let job = Job {
        name,
        disks,
        config: Config::FromQemu(info),
        scratch: vm.scratch,
        consistency,
        reason,
    };
    job.run(dest, &mut qmp, vm.quiesce, progress)
}

/// Backs up a stopped QEMU VM from its image files. qcow2 images keep their tracking bitmaps,
/// so a paused QEMU of our own (`qemu-storage-daemon`, else `qemu-system-x86_64 -machine none`)
/// opens them and the backup reads only what changed; without QEMU here, every disk is read
/// whole by vmvault's own readers.
pub fn backup_stopped_vm(
    vault: &Vault,
    name: &str,
    disks: &[DiskDescription],
    scratch: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest> {
    let reason = STOPPED.to_string();
    let desc = stopped_description(name, disks);
    let tracked = disks.iter().any(|d| d.format == "qcow2");
    let qemu = if tracked { own_qemu() } else { None };
    let Some(exe) = qemu else {
        if tracked {
            progress.message(
                "no qemu-storage-daemon or qemu-system-x86_64 here: the qcow2 images' change \
                 tracking is not used, every disk is read whole",
            );
        }
        return crate::backup::backup_image_vm_as(vault, &desc, opts, progress, "qemu", &reason);
    };
    let mut dest = VaultDestination::new(vault, opts);
    backup_with_own_qemu(&mut dest, &exe, name, disks, scratch, reason, progress)?;
    committed(dest)
}

const STOPPED: &str = "the VM was stopped: its disks were read from their image files";

fn stopped_description(name: &str, disks: &[DiskDescription]) -> crate::VmDescription {
    crate::VmDescription {
        name: name.to_string(),
        cpus: 0,
        memory_mib: 0,
        firmware: "bios".into(),
        source: "qemu".into(),
        qmp: None,
        qga: None,
        scripts: None,
        disks: disks.to_vec(),
        nics: Vec::new(),
    }
}

/// A stopped VM's images through a paused QEMU of our own, into any [`Destination`] (the
/// host agent's, which always has QEMU); returns the new point's id.
pub fn backup_stopped_vm_to(
    dest: &mut dyn Destination,
    name: &str,
    disks: &[DiskDescription],
    scratch: &Path,
    progress: &dyn Progress,
) -> Result<PointId> {
    let reason = STOPPED.to_string();
    let exe = own_qemu().ok_or_else(|| {
        EngineError::Input(
            "no qemu-storage-daemon or qemu-system-x86_64 here to read the stopped VM's images"
                .into(),
        )
    })?;
    backup_with_own_qemu(dest, &exe, name, disks, scratch, reason, progress)
}

fn backup_with_own_qemu(
    dest: &mut dyn Destination,
    exe: &Path,
    name: &str,
    disks: &[DiskDescription],
    scratch: &Path,
    reason: String,
    progress: &dyn Progress,
) -> Result<PointId> {
    let desc = stopped_description(name, disks);
    let dir = tempfile::Builder::new()
        .prefix("vmvault-qemu-")
        .tempdir_in(scratch)
        .map_err(|e| EngineError::io(format!("making a folder in {}", scratch.display()), e))?;
    let mut daemon = OwnQemu::start(exe, dir.path(), disks)?;
    let mut qmp = daemon.connect()?;
    let mut found = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        found.push(block::node_disk(
            &mut qmp,
            &format!("vmvault-d{i}"),
            &d.name,
        )?);
    }
    let job = Job {
        name: name.to_string(),
        disks: found,
        config: Config::Given(desc.to_config()),
        scratch: dir.path().to_path_buf(),
        consistency: Consistency::Crash,
        reason,
    };
    let result = job.run(dest, &mut qmp, None, progress);
    // `quit` closes the images, which writes their bitmaps into them.
    daemon.quit(qmp);
    result
}

/// The VM's configuration for the point: given, or read from QEMU once its disks are known.
enum Config {
    Given(VmConfig),
    FromQemu(block::VmInfo),
}

struct Job {
    name: String,
    disks: Vec<BlockDisk>,
    config: Config,
    scratch: PathBuf,
    consistency: Consistency,
    reason: String,
}

impl Job {
    fn run(
        self,
        dest: &mut dyn Destination,
        qmp: &mut Qmp,
        quiesce: Option<&mut dyn Quiesce>,
        progress: &dyn Progress,
    ) -> Result<PointId> {
        let to_write: Vec<DiskToWrite> = self
            .disks
            .iter()
            .map(|d| DiskToWrite {
                name: d.name.clone(),
                size: d.size,
                format: static_format(&d.format),
            })
            .collect();
        let begun = dest.begin(&self.name, &to_write, progress)?;
        let removed = snapshot::remove_leftovers(qmp)?;
        if removed > 0 {
            progress.message(&format!(
                "removed {removed} leftovers of a backup that did not end from QEMU"
            ));
        }
        // Bitmaps were listed before the leftovers went: list them again.
        let disks = refresh(qmp, &self.disks)?;
        let config = match &self.config {
            Config::Given(c) => c.clone(),
            Config::FromQemu(info) => vm_config(qmp, &self.name, info, &disks),
        };
        let points = &begun.history;
        let prefix = tracking::bitmap_prefix(&begun.vault_id);
        let id = begun.point;
        let new_name = format!("{prefix}{}", id.to_hex());

        let mut decisions = Vec::new();
        for disk in &disks {
            let d = tracking::decide(disk, &prefix, points);
            settle(qmp, disk, &d)?;
            match (&d.base, &d.full_read_reason) {
                (Some((_, base)), _) => progress.message(&format!(
                    "disk {}: reading only what changed since {}",
                    disk.name,
                    &base.to_hex()[..8]
                )),
                (None, Some(why)) => {
                    progress.message(&format!("disk {}: reading it whole: {why}", disk.name))
                }
                (None, None) => {}
            }
            decisions.push(d);
        }
        let plans: Vec<DiskPlan> = disks
            .iter()
            .zip(&decisions)
            .map(|(disk, d)| DiskPlan {
                node: disk.node.clone(),
                size: disk.size,
                base_bitmap: d.base.as_ref().map(|b| b.0.clone()),
                new_bitmap: (!disk.read_only).then(|| NewBitmap {
                    name: new_name.clone(),
                    persistent: disk.can_persist_bitmaps(),
                }),
            })
            .collect();

        let held = tempfile::Builder::new()
            .prefix("vmvault-pit-")
            .tempdir_in(&self.scratch)
            .map_err(|e| {
                EngineError::io(format!("making a folder in {}", self.scratch.display()), e)
            })?;
        let socket = held.path().join("nbd.sock");
        let (mut consistency, mut reason) = (self.consistency, self.reason.clone());
        let mut quiesce = quiesce;
        if let Some(q) = &mut quiesce {
            (consistency, reason) = q.begin()?;
        }
        let time = chrono::Utc::now();
        let taken = snapshot::take(qmp, &plans, held.path(), &socket);
        let ended = quiesce.as_mut().map(|q| q.end());
        let (pit, written) = match taken {
            Err(e) => (None, Err(e.into())),
            Ok(pit) => {
                let ended = match ended {
                    Some(Err(e)) => Err(e),
                    Some(Ok(end)) => {
                        for w in &end.warnings {
                            progress.message(&format!("warning: {w}"));
                        }
                        progress.message(&format!(
                            "guest quiesced for {:.0} ms around the instant",
                            end.frozen_for.as_secs_f64() * 1000.0
                        ));
                        if let Some(lower) = end.downgrade {
                            (consistency, reason) = lower;
                        }
                        Ok(())
                    }
                    None => Ok(()),
                };
                let point = PointFacts {
                    time,
                    source: "qemu".into(),
                    consistency,
                    reason: reason.clone(),
                    config: config.clone(),
                };
                let written = ended.and_then(|()| {
                    self.write_point(
                        dest,
                        &pit,
                        &disks,
                        &decisions,
                        point,
                        begun.chunk_size,
                        progress,
                    )
                });
                (Some(pit), written)
            }
        };
        let released = pit.map_or(Ok(()), |pit| snapshot::release(qmp, pit));
        if let Err(e) = released {
            progress.message(&format!("warning: letting QEMU's instant go: {e}"));
        }
        match written {
            Ok(point) => {
                // The point is in the vault: the old bitmaps have done their work.
                for (disk, d) in disks.iter().zip(&decisions) {
                    if let Some((old, _)) = &d.base {
                        if let Err(e) = bitmap::remove(qmp, &disk.node, old) {
                            progress.message(&format!(
                                "warning: disk {}: the old tracking bitmap stays until the next \
                                 backup: {e}",
                                disk.name
                            ));
                        }
                    }
                }
                Ok(point)
            }
            Err(e) => {
                roll_back(qmp, &disks, &plans, progress);
                Err(e)
            }
        }
    }

    /// Reads the disks from QEMU's exports and writes the point: indexes, then the manifest.
    #[allow(clippy::too_many_arguments)]
    fn write_point(
        &self,
        dest: &mut dyn Destination,
        pit: &snapshot::PointInTime,
        disks: &[BlockDisk],
        decisions: &[Decision],
        point: PointFacts,
        chunk_size: u32,
        progress: &dyn Progress,
    ) -> Result<PointId> {
        for (i, (disk, d)) in disks.iter().zip(decisions).enumerate() {
            let base = d.base.as_ref();
            let source = NbdSource::connect(
                pit.socket(),
                pit.export(i),
                static_format(&disk.format),
                base.map(|b| b.0.as_str()),
            )?;
            let changes = match base {
                Some((bitmap, id)) => Some(Changes {
                    base: *id,
                    dirty: source.dirty_ranges(bitmap, chunk_size as u64)?,
                }),
                None => None,
            };
            progress.start(&format!("{} disk {}", self.name, disk.name), disk.size);
            dest.write_disk(i, &source, changes, progress)?;
            progress.finish();
        }
        dest.commit(point)
    }
}

/// After a failure: every change since the last point must be read again next time, so the
/// new bitmap (if the instant was taken) goes back into the old one.
fn roll_back(qmp: &mut Qmp, disks: &[BlockDisk], plans: &[DiskPlan], progress: &dyn Progress) {
    let now = block::disks(qmp).unwrap_or_default();
    for (disk, plan) in disks.iter().zip(plans) {
        let (Some(new), base) = (&plan.new_bitmap, &plan.base_bitmap) else {
            continue;
        };
        let present = now
            .iter()
            .find(|d| d.node == disk.node)
            .is_none_or(|d| d.bitmap(&new.name).is_some());
        if !present {
            continue;
        }
        let undone = match base {
            Some(old) => bitmap::fold(qmp, &disk.node, old, &new.name),
            None => bitmap::remove(qmp, &disk.node, &new.name),
        };
        if let Err(u) = undone {
            progress.message(&format!(
                "warning: disk {}: the tracking bitmaps stay as they are and are sorted out at \
                 the next backup: {u}",
                disk.name
            ));
        }
    }
}

/// The disks again, with their nodes and bitmaps as they are now (a leftover job's filter
/// node sat on top of a disk until the leftovers went).
fn refresh(qmp: &mut Qmp, disks: &[BlockDisk]) -> Result<Vec<BlockDisk>> {
    let now = block::disks(qmp)?;
    let mut out = Vec::new();
    for d in disks {
        let fresh = match now.iter().find(|n| n.name == d.name) {
            Some(n) => n.clone(),
            None => block::node_disk(qmp, &d.node, &d.name)?,
        };
        out.push(fresh);
    }
    Ok(out)
}

/// Applies a decision's folds and drops, before the instant.
fn settle(qmp: &mut Qmp, disk: &BlockDisk, d: &Decision) -> Result<()> {
    for name in &d.drop {
        bitmap::remove(qmp, &disk.node, name)?;
    }
    if let Some((base, _)) = &d.base {
        for other in &d.fold {
            bitmap::fold(qmp, &disk.node, base, other)?;
        }
        if disk.bitmap(base).is_some_and(|b| !b.recording) {
            // Left disabled by a backup that did not end: it must record until the instant.
            bitmap::enable(qmp, &disk.node, base)?;
        }
    }
    Ok(())
}

/// The names vmvault's disk formats go by, for QEMU's drivers.
fn static_format(qemu: &str) -> &'static str {
    match qemu {
        "qcow2" => "qcow2",
        "vpc" => "vhd",
        "vhdx" => "vhdx",
        "vmdk" => "vmdk",
        _ => "raw",
    }
}

fn vm_config(qmp: &mut Qmp, name: &str, info: &block::VmInfo, disks: &[BlockDisk]) -> VmConfig {
    let disks = disks
        .iter()
        .map(|d| {
            let ty = d
                .qdev
                .as_deref()
                .and_then(|q| block::device_type(qmp, q))
                .unwrap_or_default();
            let bus = if ty.starts_with("virtio") {
                "virtio"
            } else if ty.starts_with("scsi") {
                "scsi"
            } else if ty.starts_with("nvme") {
                "nvme"
            } else if ty.starts_with("ide") {
                "sata"
            } else {
                "virtio"
            };
            VmDisk {
                name: d.name.clone(),
                path: d.filename.clone(),
                format: static_format(&d.format).to_string(),
                bus: bus.to_string(),
            }
        })
        .collect();
    let nics = block::nics(qmp)
        .into_iter()
        .map(|(model, mac)| VmNic {
            model: model
                .trim_end_matches("-pci")
                .replace("virtio-net", "virtio"),
            mac,
            network: None,
        })
        .collect();
    VmConfig {
        name: name.to_string(),
        cpus: info.cpus,
        memory_mib: info.memory_bytes >> 20,
        firmware: "bios".into(),
        disks,
        nics,
    }
}

/// `VMVAULT_QEMU_STORAGE_DAEMON` / `qemu-storage-daemon`, else `VMVAULT_QEMU` /
/// `qemu-system-x86_64`, whichever is found first.
fn own_qemu() -> Option<PathBuf> {
    let from_env = |var: &str| std::env::var_os(var).map(PathBuf::from);
    let in_path = |exe: &str| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(exe))
                .find(|f| f.is_file())
        })
    };
    let qemu = from_env("VMVAULT_QEMU").filter(|p| p.is_file());
    from_env("VMVAULT_QEMU_STORAGE_DAEMON")
        .filter(|p| p.is_file())
        .or_else(|| {
            // The storage daemon sits beside the emulator in QEMU's packages.
            qemu.as_ref()
                .and_then(|q| q.parent())
                .map(|d| d.join("qemu-storage-daemon"))
                .filter(|p| p.is_file())
        })
        .or_else(|| in_path("qemu-storage-daemon"))
        .or(qemu)
        .or_else(|| in_path("qemu-system-x86_64"))
}

/// A paused QEMU of our own holding a stopped VM's images.
struct OwnQemu {
    child: Child,
    socket: PathBuf,
}

impl OwnQemu {
    fn start(exe: &Path, dir: &Path, disks: &[DiskDescription]) -> Result<OwnQemu> {
        let socket = dir.join("qmp.sock");
        let daemon = exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().contains("storage-daemon"));
        let mut cmd = Command::new(exe);
        if daemon {
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,path={},server=on,wait=off,id=m0",
                    socket.display()
                ))
                .args(["--monitor", "chardev=m0"]);
        } else {
            cmd.args(["-machine", "none", "-S", "-nodefaults", "-display", "none"])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
        }
        for (i, d) in disks.iter().enumerate() {
            let driver = match d.format.as_str() {
                "vhd" => "vpc",
                f => f,
            };
            let path = d.path.display().to_string().replace(',', ",,");
            let flag = if daemon { "--blockdev" } else { "-blockdev" };
            cmd.arg(flag).arg(format!(
                "driver=file,node-name=vmvault-f{i},filename={path}"
            ));
            cmd.arg(flag).arg(format!(
                "driver={driver},node-name=vmvault-d{i},file=vmvault-f{i}"
            ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| EngineError::io(format!("starting {}", exe.display()), e))?;
        Ok(OwnQemu { child, socket })
    }

    fn connect(&mut self) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(EngineError::Input(format!(
                    "QEMU could not open the VM's images ({status}): {}",
                    err.trim()
                )));
            }
            match Qmp::connect(&self.socket) {
                Ok(q) => return Ok(q),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn quit(mut self, mut qmp: Qmp) {
        let _ = qmp.execute("quit", serde_json::json!({}));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for OwnQemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
