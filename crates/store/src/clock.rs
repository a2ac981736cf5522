//! Time as the vault's rules see it: lock ages, the garbage collector's waits, and when a
//! holder last refreshed its lock. Injected, so that tests can skew a writer's clock or jump
//! past a stale age without sleeping on the wall clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub trait Clock: Send + Sync {
    /// The wall-clock time this process believes it is.
    fn now(&self) -> SystemTime;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A clock that moves only when told, from the real time it was made at plus an offset: a host
/// whose clock is skewed, or a process that slept through minutes.
#[derive(Debug)]
pub struct ManualClock {
    at: Mutex<SystemTime>,
}

impl ManualClock {
    /// Starts at the real time now, shifted by `skew` (ahead when positive).
    pub fn skewed(skew_secs: i64) -> Arc<ManualClock> {
        let now = SystemTime::now();
        let at = if skew_secs >= 0 {
            now + Duration::from_secs(skew_secs as u64)
        } else {
            now - Duration::from_secs(skew_secs.unsigned_abs())
        };
        Arc::new(ManualClock { at: Mutex::new(at) })
    }

    pub fn starting_now() -> Arc<ManualClock> {
        Self::skewed(0)
    }

    pub fn advance(&self, by: Duration) {
        *self.at.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.at.lock().unwrap_or_else(|e| e.into_inner())
    }
}
