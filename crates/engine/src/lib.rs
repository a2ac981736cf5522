//! Backup, restore, verify and prune of VMs as library calls: source → chunker → store.
//!
//! Nothing here parses command lines or speaks HTTP; the CLI, the server and the agent call
//! these functions and show their [`Progress`].

mod backup;
mod description;
mod destination;
mod error;
mod export;
mod live;
mod nbd_source;
mod progress;
mod prune;
mod restore;
mod select;
mod tracking;
mod verify;

pub use backup::{backup_image_vm, BackupOptions};
pub use description::{DiskDescription, NicDescription, VmDescription};
pub use destination::{
    Begun, Changes, Destination, DiskToWrite, KnownPoint, PointFacts, VaultDestination,
};
pub use error::{EngineError, Result};
pub use export::PointExport;
pub use live::{
    backup_running_vm, backup_running_vm_to, backup_stopped_vm, backup_stopped_vm_to, Quiesce,
    QuiesceEnd, RunningVm,
};
pub use progress::{NoProgress, Progress};
pub use prune::{prune, PruneOutcome, PrunedPoint};
pub use restore::{
    restore_disk, restore_disk_from, restore_vm, restore_vm_from, ChunkFetcher, DiskChunks,
    PointChunks, RestoreOptions, VaultChunks,
};
pub use select::{select_disk, select_point, DamagedPoint, Points};
pub use verify::{verify, Problem, VerifyOptions, VerifyReport};
pub use vmvault_format::Keep;
pub use vmvault_store::{plan_prune, PruneDecision};

/// How many threads hash, compress and encrypt: one per core.
pub(crate) fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
