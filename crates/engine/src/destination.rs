//! Where a QEMU VM's backup goes: straight into the vault ([`VaultDestination`], the CLI's
//! `backup --qmp`), or to the server, which alone holds the vault's keys (the host agent's
//! relay, crates/agent). The QEMU side of a backup (leftovers, tracking bitmaps, the instant,
//! the quiesce, the NBD exports) is the same for both and stays in `live.rs`; a destination
//! only takes the VM's lock, stores each disk as it is read and commits the point.

use chrono::{DateTime, Utc};
use vmvault_disk::DiskReader;
use vmvault_format::{
    Consistency, DiskRecord, Manifest, PointId, TransferStats, VmConfig, MANIFEST_VERSION,
};
use vmvault_store::{locks::hostname, LockGuard, Vault};

use crate::backup::{back_up_disk, check_size, Unchanged};
use crate::{BackupOptions, EngineError, Progress, Result};

/// A point of the VM that a new backup may build on, as much as tracking needs of it.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownPoint {
    pub id: PointId,
    pub time: String,
    /// Its disks' names and sizes.
    pub disks: Vec<(String, u64)>,
}

impl From<&Manifest> for KnownPoint {
    fn from(m: &Manifest) -> KnownPoint {
        KnownPoint {
            id: m.id,
            time: m.time.clone(),
            disks: m.disks.iter().map(|d| (d.name.clone(), d.size)).collect(),
        }
    }
}

/// A disk as the backup will record it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskToWrite {
    pub name: String,
    pub size: u64,
    /// vmvault's format word (`raw`, `qcow2`, ...).
    pub format: &'static str,
}

/// What a destination said when the backup began.
#[derive(Debug, Clone)]
pub struct Begun {
    /// The new point's id: its tracking bitmaps are named after it.
    pub point: PointId,
    pub vault_id: [u8; 16],
    pub chunk_size: u32,
    /// The VM's points whose tracking bitmaps may be trusted.
    pub history: Vec<KnownPoint>,
}

/// What changed on a disk since a point: that point, and per chunk the changed ranges
/// (offset in the chunk, length).
#[derive(Debug)]
pub struct Changes {
    pub base: PointId,
    pub dirty: Vec<Vec<(u32, u32)>>,
}

/// What the manifest says besides the disks.
#[derive(Debug, Clone)]
pub struct PointFacts {
    pub time: DateTime<Utc>,
    pub source: String,
    pub consistency: Consistency,
    pub reason: String,
    pub config: VmConfig,
}

pub trait Destination {
    /// Takes the VM's backup lock (or has the server take it): nothing else backs it up
    /// until the point is committed or the backup fails.
    fn begin(&mut self, vm: &str, disks: &[DiskToWrite], progress: &dyn Progress) -> Result<Begun>;
    /// Stores disk number `disk` from `source`; with `changes`, only the changed chunks are
    /// read and the others come from the base point.
    fn write_disk(
        &mut self,
        disk: usize,
        source: &dyn DiskReader,
        changes: Option<Changes>,
        progress: &dyn Progress,
    ) -> Result<()>;
    /// Writes the point; after this the backup cannot fail any more.
    fn commit(&mut self, facts: PointFacts) -> Result<PointId>;
}

/// The vault itself, on this host.
pub struct VaultDestination<'v> {
    vault: &'v Vault,
    opts: &'v BackupOptions,
    lock: Option<LockGuard>,
    vm: String,
    point: Option<PointId>,
    disks: Vec<DiskToWrite>,
    history: Vec<Manifest>,
    records: Vec<DiskRecord>,
    committed: Option<Manifest>,
}

impl<'v> VaultDestination<'v> {
    pub fn new(vault: &'v Vault, opts: &'v BackupOptions) -> Self {
        VaultDestination {
            vault,
            opts,
            lock: None,
            vm: String::new(),
            point: None,
            disks: Vec::new(),
            history: Vec::new(),
            records: Vec::new(),
            committed: None,
        }
    }

    /// The manifest the commit wrote.
    pub fn into_manifest(self) -> Option<Manifest> {
        self.committed
    }
}

impl Destination for VaultDestination<'_> {
    fn begin(&mut self, vm: &str, disks: &[DiskToWrite], progress: &dyn Progress) -> Result<Begun> {
        for d in disks {
            check_size(self.vault, &d.name, d.size)?;
        }
        self.lock = Some(self.vault.lock_backup(vm, &mut |m| progress.message(m))?);
        let (points, _) = self.vault.points()?;
        self.history = points.into_iter().filter(|m| m.vm == vm).collect();
        let point = PointId::generate();
        self.vm = vm.to_string();
        self.point = Some(point);
        self.disks = disks.to_vec();
        Ok(Begun {
            point,
            vault_id: self.vault.config().vault_id,
            chunk_size: self.vault.config().chunk_size,
            history: self.history.iter().map(KnownPoint::from).collect(),
        })
    }

    fn write_disk(
        &mut self,
        disk: usize,
        source: &dyn DiskReader,
        changes: Option<Changes>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| EngineError::Input(format!("no disk {disk} began")))?
            .clone();
        let previous = match &changes {
            Some(c) => {
                let record = self
                    .history
                    .iter()
                    .find(|m| m.id == c.base)
                    .and_then(|m| m.disks.iter().find(|r| r.name == d.name));
                match record {
                    Some(r) => Some(self.vault.load_index(&r.index, r.size)?),
                    None => None,
                }
            }
            None => None,
        };
        let unchanged = match (&previous, changes) {
            (Some(previous), Some(c)) => Some(Unchanged {
                previous,
                dirty: c.dirty,
            }),
            _ => None,
        };
        let (index, stats) = back_up_disk(self.vault, source, self.opts, unchanged, progress)?;
        self.records.push(DiskRecord {
            name: d.name,
            format: d.format.to_string(),
            size: d.size,
            index: self.vault.save_index(&index)?,
            stats,
        });
        Ok(())
    }

    fn commit(&mut self, facts: PointFacts) -> Result<PointId> {
        let (Some(lock), Some(id)) = (&self.lock, self.point) else {
            return Err(EngineError::Input(
                "a commit before the backup began".into(),
            ));
        };
        let total = self
            .records
            .iter()
            .fold(TransferStats::default(), |mut t, r| {
                t.add(&r.stats);
                t
            });
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            id,
            vm: self.vm.clone(),
            time: facts
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            source: facts.source,
            consistency: facts.consistency,
            consistency_reason: if facts.consistency == Consistency::Application {
                String::new()
            } else {
                facts.reason
            },
            host: hostname(),
            program: format!("vmvault {}", env!("CARGO_PKG_VERSION")),
            chunk_size: self.vault.config().chunk_size,
            vm_config: facts.config,
            disks: std::mem::take(&mut self.records),
            stats: total,
            retention: self.opts.retention.clone(),
        };
        self.vault.commit_point(lock, &manifest)?;
        self.committed = Some(manifest);
        Ok(id)
    }
}
