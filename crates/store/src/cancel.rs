//! Cancelling work on a vault: a region wrapper that fails every read and write once a flag
//! is set (a server job cancelled, Ctrl-C in the CLI). The engine's normal failure paths do
//! the rest: a backup never writes its manifest, a restore removes what it created.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::{Kind, ObjectInfo, ReadBackend, Result, StoreError, WriteBackend};

/// A region wrapper that fails every read and write once its work is cancelled: the engine's
/// backup and restore then stop at the next chunk with an error, and a backup never writes
/// its manifest, so a cancelled backup leaves no recovery point (its chunks go at gc).
pub struct Cancellable {
    inner: Arc<dyn WriteBackend>,
    cancelled: Arc<AtomicBool>,
    why: &'static str,
}

impl Cancellable {
    /// `inner`, failing with [`StoreError::Cancelled`]`(why)` once `cancelled` is set.
    pub fn wrap(
        inner: Arc<dyn WriteBackend>,
        cancelled: &Arc<AtomicBool>,
        why: &'static str,
    ) -> Arc<dyn WriteBackend> {
        Arc::new(Cancellable {
            inner,
            cancelled: cancelled.clone(),
            why,
        })
    }

    fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(StoreError::Cancelled(self.why.into()));
        }
        Ok(())
    }
}

impl ReadBackend for Cancellable {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.check()?;
        self.inner.read(kind, name)
    }
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.check()?;
        self.inner.read_into(kind, name, buf)
    }
    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        self.inner.stat(kind, name)
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
}

impl WriteBackend for Cancellable {
    fn create(&self) -> Result<()> {
        self.inner.create()
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        // Lock objects pass: releasing the backup lock must work after a cancel.
        if kind != Kind::Lock {
            self.check()?;
        }
        self.inner.write(kind, name, data)
    }
    fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        self.inner.remove(kind, name)
    }
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        self.check()?;
        self.inner.touch(kind, name)
    }
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        self.check()?;
        self.inner.remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        self.inner.remove_temporaries(older_than)
    }
    fn atomic_touch(&self) -> bool {
        self.inner.atomic_touch()
    }
    fn set_hold(&self, hold: Option<crate::Hold>) -> Result<crate::HoldState> {
        self.inner.set_hold(hold)
    }
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        self.check()?;
        self.inner.extend_hold(kind, name)
    }
}
