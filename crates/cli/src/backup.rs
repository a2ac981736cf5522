//! `vmvault backup DESCRIPTION` and `vmvault backup --qmp SOCKET`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vmvault_engine::{backup_image_vm, BackupOptions, VmDescription};
use vmvault_format::{Consistency, TransferStats};

use crate::output::{bytes, print_json, Bar};
use crate::Global;

#[derive(Args)]
pub struct BackupArgs {
    /// The VM description (TOML): its disk images (source = "image"), or its QEMU sockets
    /// (source = "qemu").
    #[arg(required_unless_present = "qmp")]
    pub(crate) description: Option<PathBuf>,
    /// A QEMU VM's monitor socket (QMP): back up the running VM at one instant; a VM that is
    /// not running is backed up from its image files.
    #[arg(long, value_name = "SOCKET")]
    pub(crate) qmp: Option<PathBuf>,
    /// The VM's guest agent socket (QEMU's chardev for org.qemu.guest_agent.0): freeze the
    /// guest's file systems (and run its scripts) around the instant.
    #[arg(long, value_name = "SOCKET")]
    pub(crate) qga: Option<PathBuf>,
    /// The VM's pre/post scripts file (TOML; see the README), run in the guest by its agent.
    #[arg(long, value_name = "FILE")]
    pub(crate) scripts: Option<PathBuf>,
    /// The longest the guest stays frozen: the helper thaws it then, whatever happens.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub(crate) freeze_limit: u64,
    /// The VM's name in the vault (default: QEMU's -name, or the description's).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Where QEMU keeps the point in time's copy-before-write images during the backup.
    #[arg(long, value_name = "DIR", env = "VMVAULT_SCRATCH")]
    pub(crate) scratch: Option<PathBuf>,
}

#[derive(Serialize)]
struct BackupResult {
    id: String,
    vm: String,
    time: String,
    consistency: Consistency,
    consistency_reason: String,
    logical_bytes: u64,
    seconds: f64,
    stats: TransferStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<Replication>,
}

/// What the secondary region got, when the vault has one.
#[derive(Serialize)]
struct Replication {
    /// Objects still queued for the secondary when the command ended (0: it has the point).
    queued: usize,
    /// The queue dropped entries: only `vault replicate` finds them.
    overflowed: bool,
    seconds: f64,
}

/// Waits while the queue for the secondary shrinks, so that a backup normally ends with its
/// point in both regions; a secondary that makes no progress for `stall` is left to the
/// queue (kept for the next run) and said so. The point is in the primary either way.
fn finish_replication(
    vault: &vmvault_store::Vault,
    stall: Duration,
) -> Result<Option<Replication>> {
    let Some(r) = vault.replication() else {
        return Ok(None);
    };
    let started = Instant::now();
    let mut last = (usize::MAX, r.stats().copied.load(Ordering::Relaxed));
    let mut since = Instant::now();
    loop {
        let left = r.drain(Duration::from_secs(1))?;
        let copied = r.stats().copied.load(Ordering::Relaxed);
        if left == 0 {
            break;
        }
        if (left, copied) != last {
            last = (left, copied);
            since = Instant::now();
        } else if since.elapsed() >= stall {
            break;
        }
    }
    let (queued, overflowed) = r.backlog();
    if queued > 0 || overflowed {
        let why = r
            .stats()
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| "it is slow".into());
        eprintln!(
            "vmvault: warning: the secondary region does not have this point yet ({queued} \
             object(s) queued{}): {why}; the next backup or `vmvault vault replicate` copies them",
            if overflowed { ", queue overflowed" } else { "" }
        );
    }
    Ok(Some(Replication {
        queued,
        overflowed,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

pub fn run(g: &Global, args: BackupArgs) -> Result<()> {
    // The description is checked before the vault is opened: bad input fails fast.
    let desc = args
        .description
        .as_deref()
        .map(VmDescription::load)
        .transpose()?;
    let vault = crate::regions::open(g, crate::regions::Use::Backup)?;
    if vault.failed_over() {
        return Err(anyhow::anyhow!(
            "the vault's primary region is unavailable, and backups go to the primary first; \
             restores work from the secondary (`--from-region secondary`)"
        ));
    }
    let started = Instant::now();
    let m = match desc {
        Some(desc) if desc.source == "image" && args.qmp.is_none() => {
            backup_image_vm(&vault, &desc, &BackupOptions::default(), &Bar::new())?
        }
        desc => crate::qemu::backup(&vault, desc, &args)?,
    };
    let seconds = started.elapsed().as_secs_f64();
    let replication = finish_replication(&vault, Duration::from_secs(g.replication_wait))?;
    let result = BackupResult {
        id: m.id.to_hex(),
        vm: m.vm.clone(),
        time: m.time.clone(),
        consistency: m.consistency,
        consistency_reason: m.consistency_reason.clone(),
        logical_bytes: m.logical_bytes(),
        seconds,
        stats: m.stats,
        replication,
    };
    if g.json {
        print_json(&result);
        return Ok(());
    }
    outln!("{}", result.id);
    let s = &m.stats;
    eprintln!(
        "{}: recovery point {} ({}-consistent) of {} in {:.1} s: read {}, new {}, stored {} \
         ({} chunks new, {} reused, {} zero)",
        m.vm,
        m.id.short(),
        m.consistency,
        bytes(result.logical_bytes),
        seconds,
        bytes(s.bytes_read),
        bytes(s.bytes_new),
        bytes(s.bytes_stored),
        s.chunks_new,
        s.chunks_reused,
        s.chunks_zero
    );
    Ok(())
}
