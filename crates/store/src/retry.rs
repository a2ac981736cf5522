//! Retry with backoff: a region whose transient failures are repeated before anyone sees them.
//!
//! Only errors the backend calls transient ([`StoreError::is_transient`]) are repeated; a
//! permanent one (access denied, not found, damaged) returns at once. Every call of the backend
//! contract is safe to repeat: writes are atomic and idempotent, removes of absent objects
//! succeed. A `remove_unless_touched` whose first try removed the object but lost the answer
//! reports `false` on the retry: the report under-counts, the vault is right.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backend::{Check, Kind, ObjectInfo, ReadBackend, WriteBackend};
use crate::Result;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait before the second try; doubled each time, with jitter, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before try `n` (2, 3, ...): exponential, with up to a quarter added at random
    /// so that many workers hit by one outage do not retry in step.
    fn delay(&self, n: u32) -> Duration {
        let base = self
            .first_delay
            .saturating_mul(1u32 << (n.saturating_sub(2)).min(16))
            .min(self.max_delay);
        let mut r = [0u8; 2];
        vmvault_format::random_bytes(&mut r);
        let jitter = base.mul_f64(u16::from_le_bytes(r) as f64 / u16::MAX as f64 / 4.0);
        base + jitter
    }
}

pub struct Retrying {
    inner: Arc<dyn WriteBackend>,
    policy: RetryPolicy,
}

impl Retrying {
    pub fn new(inner: Arc<dyn WriteBackend>, policy: RetryPolicy) -> Retrying {
        Retrying { inner, policy }
    }

    fn run<T>(&self, mut call: impl FnMut() -> Result<T>) -> Result<T> {
        let mut n = 1;
        loop {
            match call() {
                Err(e) if e.is_transient() && n < self.policy.attempts => {
                    n += 1;
                    std::thread::sleep(self.policy.delay(n));
                }
                other => return other,
            }
        }
    }
}

impl ReadBackend for Retrying {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.run(|| self.inner.read(kind, name))
    }
    fn read_into(&self, kind: Kind, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        self.run(|| self.inner.read_into(kind, name, buf))
    }
    fn read_checked(
        &self,
        kind: Kind,
        name: &str,
        buf: &mut Vec<u8>,
        check: Check<'_>,
    ) -> Result<()> {
        // Only the fetch is repeated: a check's verdict on bytes that arrived is final.
        self.run(|| self.inner.read_into(kind, name, buf))?;
        crate::backend::judge(self, kind, name, buf, check)
    }
    fn stat(&self, kind: Kind, name: &str) -> Result<Option<ObjectInfo>> {
        self.run(|| self.inner.stat(kind, name))
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.run(|| self.inner.list(kind))
    }
    fn concurrency(&self) -> usize {
        self.inner.concurrency()
    }
}

impl WriteBackend for Retrying {
    fn create(&self) -> Result<()> {
        self.run(|| self.inner.create())
    }
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<()> {
        self.run(|| self.inner.write(kind, name, data))
    }
    fn remove(&self, kind: Kind, name: &str) -> Result<()> {
        self.run(|| self.inner.remove(kind, name))
    }
    fn touch(&self, kind: Kind, name: &str) -> Result<Option<u64>> {
        self.run(|| self.inner.touch(kind, name))
    }
    fn remove_unless_touched(&self, kind: Kind, name: &str, cutoff: SystemTime) -> Result<bool> {
        self.run(|| self.inner.remove_unless_touched(kind, name, cutoff))
    }
    fn sync(&self) -> Result<()> {
        self.run(|| self.inner.sync())
    }
    fn remove_temporaries(&self, older_than: SystemTime) -> Result<u64> {
        self.run(|| self.inner.remove_temporaries(older_than))
    }
    fn atomic_touch(&self) -> bool {
        self.inner.atomic_touch()
    }
    fn set_hold(&self, hold: Option<crate::Hold>) -> Result<crate::HoldState> {
        self.run(|| self.inner.set_hold(hold.clone()))
    }
    fn extend_hold(&self, kind: Kind, name: &str) -> Result<()> {
        self.run(|| self.inner.extend_hold(kind, name))
    }
}
