//! Injectable time.
//!
//! Everything that depends on "now" (expiry, allowed hours, rate limits, approval deadlines) reads
//! it from a [`Clock`], so tests set the time instead of sleeping.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, DurationRound, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant, truncated to microseconds (what both state engines store).
    fn now(&self) -> DateTime<Utc>;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// Truncates to the microsecond precision PostgreSQL keeps, so a value reads back equal.
pub(crate) fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::microseconds(1)).unwrap_or(t)
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        to_micros(Utc::now())
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(to_micros(start))),
        }
    }

    /// Moves the clock to `t`.
    pub fn set(&self, t: DateTime<Utc>) {
        *self.now.lock().expect("clock lock poisoned") = to_micros(t);
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().expect("clock lock poisoned");
        *now = to_micros(*now + d);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock poisoned")
    }
}
