//! Fault injection, for tests: a region that is slow, fails, goes down, or loses what was
//! written since its last sync (as a machine that loses power does).
//!
//! Tests put it under the other wrappers to prove them: retries ride out transient failures,
//! replication survives a region that is down, and a vault stays valid when its unsynced
//! writes vanish (the redb way of testing crash consistency: lose exactly what the contract
//! allows to be lost, then check every promise that remains).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::backend::{Kind, ObjectInfo, ReadBackend, WriteBackend};
use crate::{Result, StoreError};

/// What goes wrong, changeable while in use.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Added to every call.
    pub latency: Duration,
    /// Every call fails as a transient outage would (connection refused).
    pub down: bool,
    /// Every Nth call fails with a transient error (0: never).
    pub fail_every: u64,
    /// Writes of this kind fail with a permanent error.
    pub refuse_writes_of: Option<Kind>,
    /// Every call after this many (counted from [`Faulty::set`]) fails: the machine died.
    pub die_after: Option<u64>,
}

pub struct Faulty {
    inner: Arc<dyn WriteBackend>,
    faults: Mutex<Faults>,
    calls: AtomicU64,
    /// Writes and removes since the last sync, with what the object held before (`None`:
    /// absent), so that [`Faulty::lose_unsynced`] can put the region back.
    unsynced: Mutex<HashMap<(Kind, String), Before>>,
}

/// An object's bytes before an unsynced change; `None`: it was absent.
type Before = Option<Vec<u8>>;

impl Faulty {
    pub fn new(inner: Arc<dyn WriteBackend>) -> Faulty {
        Faulty {
            inner,
            faults: Mutex::new(Faults::default()),
            calls: AtomicU64::new(0),
            unsynced: Mutex::new(HashMap::new()),
        }
    }

    pub fn set(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
        self.calls.store(0, Ordering::Relaxed);
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Undoes every write and remove since the last sync, as a power loss would; returns how
    /// many objects it put back.
    pub fn lose_unsynced(&self) -> Result<usize> {
        let lost: Vec<_> = self
            .unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for ((kind, name), before) in &lost {
            match before {
                Some(bytes) => self.inner.write(*kind, name, bytes)?,
                None => self.inner.remove(*kind, name)?,
            }
        }
        self.inner.sync()?;
        Ok(lost.len())
    }

    fn enter(&self) -> Result<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let f = self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !f.latency.is_zero() {
            std::thread::sleep(f.latency);
        }
        if f.die_after.is_some_and(|d| n > d) {
            return Err(StoreError::Io {
                context: format!(
                    "{}: injected power loss after call {n}",
                    self.inner.location()
                ),
                source: std::io::Error::other("the machine is off"),
            });
        }
        if f.down || (f.fail_every > 0 && n.is_multiple_of(f.fail_every)) {
            return Err(StoreError::Remote {
                location: self.inner.location(),
                detail: format!("injected fault on call {n}: connection refused"),
                transient: true,
            });
        }
        Ok(())
    }

    fn remember(&self, kind: Kind, name: &str) -> Result<()> {
        let key = (kind, name.to_string());
        if self
            .unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key)
        {
            return Ok(());
        }
        let before = match self.inner.read(kind, name) {
            Ok(b) => Some(b),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        self.unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(before);
        Ok(())
    }
}

impl ReadBackend for Faulty {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.enter()?;
        self.inner.read(kind, name)
    }
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.enter()?;
        self.inner.read_into(kind, name, buf)
    }
    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        self.enter()?;
        self.inner.stat(kind, name)
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.enter()?;
        self.inner.list(kind)
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
}

impl WriteBackend for Faulty {
    fn create(&self) -> Result<()> {
        self.enter()?;
        self.inner.create()
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.enter()?;
        if self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refuse_writes_of
            == Some(kind)
        {
            return Err(StoreError::Remote {
                location: self.inner.location(),
                detail: format!("injected fault: writing {} refused (403)", kind.name()),
                transient: false,
            });
        }
        self.remember(kind, name)?;
        self.inner.write(kind, name, data)
    }
    fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        self.enter()?;
        self.remember(kind, name)?;
        self.inner.remove(kind, name)
    }
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        self.enter()?;
        self.inner.touch(kind, name)
    }
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        self.enter()?;
        self.remember(kind, name)?;
        self.inner.remove_unless_touched(kind, name, cutoff)
    }
    fn sync(&self) -> Result<()> {
        self.enter()?;
        self.inner.sync()?;
        self.unsynced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        self.enter()?;
        self.inner.remove_temporaries(older_than)
    }
    fn atomic_touch(&self) -> bool {
        self.inner.atomic_touch()
    }
    fn set_hold(&self, hold: Option<crate::Hold>) -> Result<crate::HoldState> {
        self.inner.set_hold(hold)
    }
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        self.inner.extend_hold(kind, name)
    }
}
