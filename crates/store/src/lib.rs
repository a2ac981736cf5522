//! The vault: where recovery points live, and the rules that keep them whole.
//!
//! # Objects
//! A vault is a set of objects reached through one [`WriteBackend`] per region: the vault
//! config, the key file, chunks (named by their keyed digest), disk indexes (named by the digest
//! of their payload), recovery-point manifests (named by the point's id) and lock objects. Their
//! bytes are described in `docs/format.md`; this crate decides which objects exist and when.
//!
//! Objects are written once, atomically, and never modified (the vault's `rules` object is the
//! one that is replaced); only garbage collection deletes chunks and indexes, and manifests go
//! only through the vault's rules (see below). A backup writes its chunks, then its disk
//! indexes, syncs, and writes its manifest last: a recovery point exists once its manifest
//! does, so an interrupted backup leaves only unreferenced objects, which the next backup
//! reuses and garbage collection eventually removes.
//!
//! # The vault's rules
//! Soft delete, the lock and each point's recorded retention are kept here, under every caller
//! (the module `rules` says how): a point is deleted only by [`Vault::delete_point`], which
//! writes a sealed deletion marker (or, with soft delete off in an unlocked vault, removes the
//! manifest) and refuses in a locked vault while the point's own retention is in force; garbage
//! collection removes soft-deleted manifests once their window is over by both clocks.
//!
//! # Locking
//! Backups and garbage collection register [lock objects](locks) (see there for liveness).
//! Two backups of one VM: the younger refuses. Backups of different VMs run side by side.
//! A backup that finds a garbage collection running waits for it to end. Prune, delete and
//! verify take no lock: a deletion only adds a marker or removes a manifest, which can only make
//! a collection keep more.
//!
//! # Garbage collection and the race with backups
//! Mark and sweep, with a safety window:
//! 1. The collector writes its lock, then lists the live locks. Its *cutoff* is the earliest of
//!    its own start (by its clock and by the storage's) and the start of every running writer,
//!    less [`gc::SAFETY_MARGIN`]. Where `touch` is not atomic (object stores) it first waits
//!    until no writer runs, letting new writers go ahead while it waits, for a bounded time.
//! 2. Mark: every manifest, every index it names, every chunk those name. An unreadable
//!    manifest or index stops the collection before anything is deleted.
//! 3. Sweep: a chunk or index is deleted only if it is unmarked *and* its modification time is
//!    before the cutoff.
//!
//! A backup writes every new chunk and *touches* every chunk it reuses (sets its modification
//! time to now) before its index can reference it. Why no chunk a backup is about to reference
//! is ever deleted:
//! - A backup that was running when the collector listed the locks started after the cutoff;
//!   every chunk it references was written or touched after it started, so after the cutoff:
//!   spared.
//! - A backup that registered after the collector wrote its lock sees that lock and waits
//!   until the collection ends before it touches anything. One of the two always sees the
//!   other, because each writes its own lock before it lists.
//! - A writer whose lock was presumed dead (silent longer than [`locks::STALE_AFTER`] plus
//!   [`locks::STALE_MARGIN`] by the storage's clock and its own) has distrusted that lock since
//!   [`locks::LOST_AFTER`], and [`Vault::commit_point`] writes no manifest for it (or takes it
//!   back). What the collector assumes about clocks and storage is in docs/design.md.
//! - Points that existed when the collector listed manifests are marked.
//!
//! What this costs: chunks orphaned by a backup that is still running are kept until a later
//! collection, and one `touch` per reused chunk (a `utimensat` on a local vault).

mod backend;
mod cancel;
pub mod clock;
pub mod compare;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod error;
pub mod faulty;
pub mod gc;
mod hold;
#[cfg(any(test, feature = "conformance"))]
pub mod rules_matrix;
pub use hold::REGIONS_RECORD;
pub mod journal;
mod local;
pub mod locks;
mod point_disk;
mod regions_record;
pub mod replicated;
pub mod retention;
pub mod retry;
mod rules;
mod vault;
pub mod verified;

pub use backend::{
    check_name, Check, Hold, HoldState, Kind, ObjectInfo, ReadBackend, WriteBackend,
};
pub use cancel::Cancellable;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Result, StoreError};
pub use gc::{GcReport, LockTiming};
pub use local::LocalBackend;
pub use locks::{LiveLock, LockGuard, LockInfo, LockKind};
pub use point_disk::{PointDisk, DEFAULT_CACHE_BYTES};
pub use regions_record::StoredRegions;
pub use replicated::{Notify, Region, Replicated};
pub use retention::{in_force, plan_prune, point_time, PruneDecision};
pub use retry::{RetryPolicy, Retrying};
pub use rules::{Deleted, PointList};
pub use vault::{ChunkReader, CreateOptions, Regions, Replication, Unreadable, Vault};
pub use verified::{VaultVerifier, Verified, Verify};
