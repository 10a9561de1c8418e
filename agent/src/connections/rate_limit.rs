//! Per-connection request rate limits (GCRA), driven by the agent's [`Clock`](crate::Clock).
//!
//! Each connection has a burst of `rate_limit_per_minute` that refills evenly over the minute.
//! On SQLite (one agent) the limiter is governor's, in memory; on PostgreSQL, where several agents
//! may share the state database, the same algorithm runs in the database ([`Store::take_rate`]):
//! one atomic statement per request moves the key's theoretical arrival time, so N agents admit
//! N per minute in all, not N each.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Reference;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use uuid::Uuid;

use chrono::{DateTime, Utc};

use crate::clock::SharedClock;
use crate::error::Result;
use crate::store::{Store, on_pool};

/// Adapts the agent clock to governor: nanoseconds since the Unix epoch.
#[derive(Debug, Clone)]
struct GovernorClock(SharedClock);

impl governor::clock::Clock for GovernorClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let nanos = self.0.now().timestamp_nanos_opt().unwrap_or(0).max(0);
        Nanos::from(u64::try_from(nanos).unwrap_or(0))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, GovernorClock, NoOpMiddleware<Nanos>>;

/// Rate limiters for every connection seen.
#[derive(Debug)]
pub struct RateLimits {
    clock: SharedClock,
    limiters: Mutex<HashMap<Uuid, (u32, Arc<Limiter>)>>,
}

impl RateLimits {
    /// Limiters reading time from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for `connection_id` under a limit of `per_minute`; on refusal, says how
    /// long until the next request would pass.
    pub fn check(&self, connection_id: Uuid, per_minute: i64) -> Result<(), Duration> {
        let per_minute = u32::try_from(per_minute.max(1)).unwrap_or(u32::MAX);
        let limiter = {
            let mut limiters = self.limiters.lock().expect("rate limiter lock poisoned");
            let entry = limiters
                .entry(connection_id)
                .or_insert_with(|| (0, Arc::new(self.limiter(per_minute))));
            if entry.0 != per_minute {
                *entry = (per_minute, Arc::new(self.limiter(per_minute)));
            }
            Arc::clone(&entry.1)
        };
        limiter.check().map_err(|not_until| {
            let clock = GovernorClock(Arc::clone(&self.clock));
            let now = governor::clock::Clock::now(&clock);
            Duration::from(not_until.earliest_possible().duration_since(now))
        })
    }

    /// Forgets a connection's limiter (after delete).
    pub fn forget(&self, connection_id: Uuid) {
        self.limiters
            .lock()
            .expect("rate limiter lock poisoned")
            .remove(&connection_id);
    }

    fn limiter(&self, per_minute: u32) -> Limiter {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN));
        RateLimiter::direct_with_clock(quota, GovernorClock(Arc::clone(&self.clock)))
    }
}

impl Store {
    /// Takes one request for `key` under a limit of `per_minute` (burst `per_minute`), in the
    /// state database; on refusal, says how long until the next request would pass.
    pub async fn take_rate(
        &self,
        key: Uuid,
        per_minute: i64,
        now: DateTime<Utc>,
    ) -> Result<std::result::Result<(), Duration>> {
        let per_minute = per_minute.max(1);
        let interval = (60_000_000 / per_minute).max(1);
        let window = interval.saturating_mul(per_minute);
        let now = now.timestamp_micros();
        // On PostgreSQL the statement's own transaction commits without waiting for its WAL
        // to reach the disk (a request is taken at every step of a session): a crash can lose
        // the last moments of the limits' state, never make it wrong for anyone else.
        let (greatest, values) = match self.engine() {
            crate::store::Engine::Postgres => (
                "GREATEST",
                "SELECT $1, $2 + $3 FROM (SELECT set_config('synchronous_commit', 'off', true)) s",
            ),
            crate::store::Engine::Sqlite => ("MAX", "VALUES ($1, $2 + $3)"),
        };
        let sql = format!(
            "INSERT INTO dbsync_rate_limits (key, tat_micros) {values} \
             ON CONFLICT (key) DO UPDATE \
             SET tat_micros = {greatest}(dbsync_rate_limits.tat_micros, $2) + $3 \
             WHERE {greatest}(dbsync_rate_limits.tat_micros, $2) + $3 - $4 <= $2 \
             RETURNING tat_micros"
        );
        let taken: Option<i64> = on_pool!(self, |pool| {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .bind(key)
                .bind(now)
                .bind(interval)
                .bind(window)
                .fetch_optional(pool)
                .await?
        });
        if taken.is_some() {
            return Ok(Ok(()));
        }
        let tat: i64 = on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT tat_micros FROM dbsync_rate_limits WHERE key = $1")
                .bind(key)
                .fetch_optional(pool)
                .await?
                .unwrap_or(now)
        });
        let wait = tat.max(now) + interval - window - now;
        Ok(Err(Duration::from_micros(
            u64::try_from(wait).unwrap_or(0).max(1),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn burst_then_refill_with_a_set_clock() {
        let clock = ManualClock::new(chrono::Utc::now());
        let limits = RateLimits::new(Arc::new(clock.clone()));
        let id = Uuid::new_v4();
        for _ in 0..6 {
            assert!(limits.check(id, 6).is_ok());
        }
        let wait = limits.check(id, 6).unwrap_err();
        assert!(
            wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
        clock.advance(chrono::Duration::seconds(10));
        assert!(limits.check(id, 6).is_ok());
        assert!(limits.check(id, 6).is_err());
        // Another connection has its own budget.
        assert!(limits.check(Uuid::new_v4(), 6).is_ok());
    }
}
