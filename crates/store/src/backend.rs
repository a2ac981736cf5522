//! The storage abstraction every region of a vault is reached through.
//!
//! Objects are addressed by ([`Kind`], name). The contract every backend keeps:
//! - `write` is atomic: a reader sees the whole new object or none of it, never a prefix, and a
//!   failed or interrupted write leaves no object under the name (at most a temporary that
//!   [`WriteBackend::remove_temporaries`] can clean up).
//! - Writing the same name again replaces the object; callers only do so with equal content
//!   (chunks, indexes) or for the few mutable objects (key, locks). Removing an absent object
//!   succeeds: both are idempotent so that retries are safe.
//! - `read` of an absent object is [`StoreError::NotFound`]. Other failures are
//!   [`StoreError::is_transient`] (a timeout, a dropped connection, a server's 5xx or throttling:
//!   the same call may succeed later, and the retry wrapper repeats it) or permanent (access
//!   denied, a bad name, a full disk: repeating cannot help and is not done).
//! - Writes need not be durable before [`WriteBackend::sync`] returns.
//! - `touch` and `remove_unless_touched` are atomic with each other where
//!   [`WriteBackend::atomic_touch`] says so (a local directory). Object stores cannot renew an
//!   object's time or delete on a condition of it: there `touch` only says whether the object
//!   exists, and garbage collection waits until no backup runs instead (see the crate doc).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::Clock;
use crate::{Result, StoreError};

/// What a locked vault asks of its storage: to keep every object version written for `days`
/// days, so that nobody, not even someone holding the storage's own credentials, can destroy
/// a point before then (S3 Object Lock in compliance mode). Locks, which come and go by the
/// second, are not held.
#[derive(Clone)]
pub struct Hold {
    pub days: u32,
    /// Where the end of a hold is reckoned from (the storage refuses an end in its past).
    pub clock: Arc<dyn Clock>,
}

impl Hold {
    /// The end of a hold that starts now.
    pub fn until(&self) -> SystemTime {
        self.clock.now() + Duration::from_secs(u64::from(self.days) * 86_400)
    }

    /// Whether objects of this kind are held.
    pub fn holds(kind: Kind) -> bool {
        kind != Kind::Lock
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("days", &self.days).finish()
    }
}

/// Whether a region's storage keeps objects as a [`Hold`] asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldState {
    /// Every object written from now on is held, and [`WriteBackend::extend_hold`] works.
    Enforced,
    /// This storage does not hold objects (a directory, Azure Blob, a bucket without Object
    /// Lock), and why; the vault's own lock still applies.
    NotEnforced(String),
}

/// What an object is, which decides where a backend keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Config,
    Key,
    Chunk,
    Index,
    Point,
    Lock,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Config,
        Kind::Key,
        Kind::Chunk,
        Kind::Index,
        Kind::Point,
        Kind::Lock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Key => "key",
            Kind::Chunk => "chunk",
            Kind::Index => "index",
            Kind::Point => "point",
            Kind::Lock => "lock",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// Reading a region.
pub trait ReadBackend: Send + Sync {
    /// Where this region is, for messages (never holds credentials).
    fn location(&self) -> String;
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>>;
    /// Reads into `buf` (replacing its contents), so that a caller reading many objects can
    /// reuse one buffer.
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.read(kind, name)?;
        Ok(())
    }
    /// The object's size and modification time, or `None` when it is absent.
    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>>;
    /// Every object of a kind, in no particular order.
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>>;
    /// Reads into `buf` and has `check` judge the bytes; `check` may transform `buf` in place
    /// (open it into its payload). A judgement against the object is
    /// [`StoreError::Damaged`], naming this region. The one place objects are verified on read:
    /// the check is the caller's own decoding, so nothing is decrypted twice, and a wrapper
    /// that holds more than one copy (replication) tries the next copy when a check fails.
    fn read_checked(
        &self,
        kind: Kind,
        name: &str,
        buf: &mut Vec<u8>,
        check: Check<'_>,
    ) -> Result<()> {
        self.read_into(kind, name, buf)?;
        judge(self, kind, name, buf, check)
    }
    /// How many requests in flight pay off: 1 for a local directory, more for an object store
    /// whose latency, not bandwidth, bounds one request. The engine sizes its workers by it.
    fn concurrency(&self) -> usize {
        1
    }
}

/// Runs `check` on bytes `backend` returned; its verdict against them is
/// [`StoreError::Damaged`], naming the region.
pub fn judge(
    backend: &(impl ReadBackend + ?Sized),
    kind: Kind,
    name: &str,
    buf: &mut Vec<u8>,
    check: Check<'_>,
) -> Result<()> {
    check(buf).map_err(|reason| StoreError::Damaged {
        location: backend.location(),
        object: format!("{} {name}", kind.name()),
        reason,
    })
}

/// Judges an object's bytes as read (see [`ReadBackend::read_checked`]); `Err` says why they
/// are damaged.
pub type Check<'a> = &'a mut dyn FnMut(&mut Vec<u8>) -> std::result::Result<(), String>;

/// Writing a region.
pub trait WriteBackend: ReadBackend {
    /// Prepares a new, empty region; refuses one that already holds objects.
    fn create(&self) -> Result<()>;
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()>;
    fn remove(&self, kind: Kind, name: &str) -> Result<()>;
    /// Sets the object's modification time to now; its size, or `None` when it is absent.
    /// Garbage collection spares objects touched after it started (see the crate doc); the
    /// size lets a caller that reuses the object notice one that storage has truncated.
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>>;
    /// Removes the object unless it was written or touched at or after `cutoff`; `true` when
    /// it removed it. Atomic with respect to `touch`: once a `touch` has returned `true`, this
    /// call does not remove the object on the strength of an earlier look at its time.
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool>;
    /// Makes every completed write durable.
    fn sync(&self) -> Result<()>;
    /// Removes what interrupted writes left behind before `older_than`; returns how many.
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64>;
    /// Whether `touch` renews the object's time and `remove_unless_touched` is atomic with it,
    /// so that garbage collection may run beside backups (see the module doc).
    fn atomic_touch(&self) -> bool {
        true
    }
    /// From now on, has the storage hold every object written (`Some`), or stops (`None`).
    /// Says whether this storage can: one that cannot writes as before.
    fn set_hold(&self, hold: Option<Hold>) -> Result<HoldState> {
        let _ = hold;
        Ok(HoldState::NotEnforced(
            "this storage cannot hold objects against deletion".into(),
        ))
    }
    /// Holds an existing object for the hold's days from now: what was written before the
    /// vault was locked, and chunks that new points reuse long after they were written. Only
    /// called after [`WriteBackend::set_hold`] said [`HoldState::Enforced`].
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        let _ = name;
        Err(StoreError::Invalid(format!(
            "this storage cannot hold a {} object against deletion",
            kind.name()
        )))
    }
}

/// Checks an object name: names are generated by vmvault (hex digests, ids), never by users,
/// so anything else is refused before it can reach a path.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("invalid object name {name:?}")))
    }
}
