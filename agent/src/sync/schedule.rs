//! The auto-sync scheduler. Each receiver connection with `auto_sync_enabled` has a schedule
//! row: when it is due, one scheduler claims it for a lease (on PostgreSQL with `FOR UPDATE SKIP
//! LOCKED`, so agents sharing a state database never run the same job), pulls the connection's
//! `auto_sync_tables` incrementally (tables without a cursor column in full; a `mirror`
//! connection also reconciles deletes), and stores the outcome and the next run time. Runs are
//! jittered, never overlap for one connection, and back off after failures; their transfers
//! carry actor `system` and `metadata.scheduled`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::agent::Agent;
use crate::clock::to_micros;
use crate::error::Result;
use crate::pull::PullOptions;
use crate::store::{Engine, Store, on_pool};

/// How long a claim holds at least (a run that outlives its lease may be claimed again).
pub const MIN_LEASE: chrono::Duration = chrono::Duration::hours(1);
/// How a connection's scheduled runs pull: `incremental` (the default) or `diff`
/// (`schedule set --diff`: verify, then move only the rows that differ).
pub fn mode_of(connection: &crate::Connection) -> &'static str {
    match connection
        .metadata
        .get("auto_sync_mode")
        .and_then(|m| m.as_str())
    {
        Some("diff") => "diff",
        _ => "incremental",
    }
}

/// How often a running scheduled sync renews its claim (well inside [`MIN_LEASE`]).
pub const LEASE_RENEWAL: std::time::Duration = std::time::Duration::from_secs(300);
/// First wait after a failure (doubles with each failure in a row, up to the interval).
pub const FAILURE_BACKOFF: chrono::Duration = chrono::Duration::minutes(1);

/// A connection's schedule.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Schedule {
    /// The receiver connection.
    pub connection_id: Uuid,
    /// When it runs next.
    pub next_run_at: DateTime<Utc>,
    /// The scheduler running it now, if any.
    pub claimed_by: Option<String>,
    /// Until when that claim holds.
    pub claimed_until: Option<DateTime<Utc>>,
    /// When the last run started.
    pub last_started_at: Option<DateTime<Utc>>,
    /// When the last run ended.
    pub last_finished_at: Option<DateTime<Utc>>,
    /// `completed` or `failed`.
    pub last_status: Option<String>,
    /// Why the last run failed.
    pub last_error: Option<String>,
    /// Rows the last run moved.
    pub last_rows: i64,
    /// Per table: rows moved, rows deleted, transfer id.
    #[sqlx(json)]
    pub last_tables: serde_json::Value,
    /// Failures in a row.
    pub failures: i64,
    /// Runs so far.
    pub runs: i64,
}

/// What one run did.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutcome {
    /// The connection.
    pub connection_id: Uuid,
    /// Its name.
    pub connection_name: String,
    /// `completed` or `failed`.
    pub status: String,
    /// Rows moved.
    pub rows: i64,
    /// Why it failed.
    pub error: Option<String>,
    /// When it runs next.
    pub next_run_at: DateTime<Utc>,
}

/// How a scheduled run ended, as its schedule records it.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd<'a> {
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// When the next run is due.
    pub next_run_at: DateTime<Utc>,
    /// `completed` or `failed`.
    pub status: &'a str,
    /// Why it failed.
    pub error: Option<&'a str>,
    /// Rows it applied.
    pub rows: i64,
    /// What it did per table (JSON array).
    pub tables: &'a serde_json::Value,
}

impl Store {
    /// Creates the schedules of connections that gained auto-sync (due at once) and drops the
    /// schedules of connections that lost it.
    pub async fn sync_schedules(&self, now: DateTime<Utc>) -> Result<()> {
        let now = to_micros(now);
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO dbsync_schedules (connection_id, next_run_at) \
                 SELECT id, $1 FROM dbsync_connections \
                 WHERE direction = 'receiver' AND auto_sync_enabled \
                 ON CONFLICT (connection_id) DO NOTHING",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM dbsync_schedules WHERE connection_id IN \
                 (SELECT id FROM dbsync_connections WHERE direction <> 'receiver' OR NOT auto_sync_enabled)",
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every schedule, soonest first.
    pub async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_schedules ORDER BY next_run_at")
                .fetch_all(pool)
                .await?
        }))
    }

    /// Claims the most overdue unclaimed schedule of an active connection for `owner` until
    /// `until`; `only` restricts it to one connection and ignores its due time (run now).
    pub async fn claim_schedule(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        only: Option<Uuid>,
    ) -> Result<Option<Schedule>> {
        let now = to_micros(now);
        let until = to_micros(until);
        let lock = match self.engine() {
            Engine::Postgres => " FOR UPDATE OF s SKIP LOCKED",
            Engine::Sqlite => "",
        };
        let sql = format!(
            "UPDATE dbsync_schedules SET claimed_by = $1, claimed_until = $3, last_started_at = $2 \
             WHERE connection_id = (\
               SELECT s.connection_id FROM dbsync_schedules s \
               JOIN dbsync_connections c ON c.id = s.connection_id \
               WHERE (s.next_run_at <= $2 OR s.connection_id = $4) \
                 AND ($4 IS NULL OR s.connection_id = $4) \
                 AND (s.claimed_until IS NULL OR s.claimed_until < $2) \
                 AND c.status = 'active' AND c.auto_sync_enabled \
               ORDER BY s.next_run_at LIMIT 1{lock}) \
             AND (claimed_until IS NULL OR claimed_until < $2) \
             RETURNING *"
        );
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(owner)
                .bind(now)
                .bind(until)
                .bind(only)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Extends `owner`'s claim on a running schedule to `until`; false when the claim is no
    /// longer `owner`'s (it ran out and another scheduler took the schedule).
    pub async fn renew_schedule_claim(
        &self,
        connection_id: Uuid,
        owner: &str,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let renewed = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_schedules SET claimed_until = $3 \
                 WHERE connection_id = $1 AND claimed_by = $2",
            )
            .bind(connection_id)
            .bind(owner)
            .bind(to_micros(until))
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(renewed == 1)
    }

    /// Records the end of a claimed run and when the next one is due; releases the claim.
    pub async fn finish_schedule(
        &self,
        connection_id: Uuid,
        owner: &str,
        run: &RunEnd<'_>,
    ) -> Result<()> {
        let RunEnd {
            finished_at: now,
            next_run_at,
            status,
            error,
            rows,
            tables,
        } = *run;
        let failed = status != "completed";
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_schedules SET claimed_by = NULL, claimed_until = NULL, \
                 last_finished_at = $3, next_run_at = $4, last_status = $5, last_error = $6, \
                 last_rows = $7, last_tables = $8, runs = runs + 1, \
                 failures = CASE WHEN $9 THEN failures + 1 ELSE 0 END \
                 WHERE connection_id = $1 AND claimed_by = $2",
            )
            .bind(connection_id)
            .bind(owner)
            .bind(to_micros(now))
            .bind(to_micros(next_run_at))
            .bind(status)
            .bind(error)
            .bind(rows)
            .bind(sqlx::types::Json(tables))
            .bind(failed)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

impl Agent {
    /// This process as a scheduler: host name and process id.
    pub fn scheduler_name() -> String {
        format!(
            "{}:{}",
            whoami::hostname().unwrap_or_else(|_| "host".into()),
            std::process::id()
        )
    }

    /// Runs every due job, one after another, as scheduler `owner`. Returns what each did.
    pub async fn run_due_jobs(&self, owner: &str) -> Result<Vec<JobOutcome>> {
        self.store.sync_schedules(self.now()).await?;
        let mut outcomes = Vec::new();
        loop {
            let now = self.now();
            let Some(schedule) = self
                .store
                .claim_schedule(owner, now, now + MIN_LEASE, None)
                .await?
            else {
                return Ok(outcomes);
            };
            outcomes.push(self.run_claimed(owner, schedule).await?);
        }
    }

    /// Runs one connection's scheduled sync now (unless another scheduler is running it).
    pub async fn run_schedule_now(&self, id_or_name: &str, owner: &str) -> Result<JobOutcome> {
        let connection = self.store.get_connection(id_or_name).await?;
        if !connection.auto_sync_enabled {
            return Err(crate::Error::invalid(
                "connection",
                format!("{} has no auto-sync; enable it first", connection.name),
            ));
        }
        self.store.sync_schedules(self.now()).await?;
        let now = self.now();
        let schedule = self
            .store
            .claim_schedule(owner, now, now + MIN_LEASE, Some(connection.id))
            .await?
            .ok_or_else(|| {
                crate::Error::Conflict(format!(
                    "the scheduled sync of {} is running elsewhere, or the connection is not active",
                    connection.name
                ))
            })?;
        self.run_claimed(owner, schedule).await
    }

    async fn run_claimed(&self, owner: &str, schedule: Schedule) -> Result<JobOutcome> {
        let connection = self
            .store
            .get_connection(&schedule.connection_id.to_string())
            .await?;
        let options = PullOptions {
            tables: (!connection.auto_sync_tables.is_empty())
                .then(|| connection.auto_sync_tables.clone()),
            incremental: true,
            scheduled: true,
            ..PullOptions::default()
        };
        let lag = (self.now() - schedule.next_run_at).num_milliseconds();
        #[allow(clippy::cast_precision_loss)]
        self.metrics.scheduler_started(lag as f64 / 1000.0);
        tracing::info!(connection = %connection.name, lag_ms = lag.max(0), "scheduled sync starts");
        // The claim is renewed while the run lasts, so a run longer than the lease is not
        // claimed again by another scheduler.
        let diff = mode_of(&connection) == "diff";
        let result = {
            let pull = async {
                if !diff {
                    return self.pull(&connection.name, &options, |_| {}).await;
                }
                // A diff run: verify, move only what differs; reported like a pull.
                let verify = crate::sync::verify::VerifyOptions {
                    tables: options.tables.clone(),
                    repair: true,
                    transport: options.transport,
                    retry_for: options.retry_for,
                    ..Default::default()
                };
                let summary = self.verify(&connection.name, &verify, |_| {}).await?;
                if let Some(bad) = summary.tables.iter().find(|t| !t.identical) {
                    return Err(crate::Error::Conflict(format!(
                        "{} still differs after the repair{}",
                        bad.table,
                        bad.error
                            .as_deref()
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    )));
                }
                Ok(crate::pull::PullSummary {
                    tables: summary
                        .tables
                        .iter()
                        .map(|t| crate::pull::TableSummary {
                            table: t.table.clone(),
                            rows: t.repaired_rows,
                            deleted: i64::try_from(t.deleted_rows).unwrap_or(i64::MAX),
                            ..crate::pull::TableSummary::default()
                        })
                        .collect(),
                    seconds: summary.seconds,
                    ..crate::pull::PullSummary::default()
                })
            };
            tokio::pin!(pull);
            let mut renew = tokio::time::interval(LEASE_RENEWAL);
            renew.tick().await;
            loop {
                tokio::select! {
                    result = &mut pull => break result,
                    _ = renew.tick() => {
                        let until = self.now() + MIN_LEASE;
                        match self.store.renew_schedule_claim(connection.id, owner, until).await {
                            Ok(true) => {}
                            Ok(false) => tracing::warn!(connection = %connection.name, "the schedule's claim was lost during the run"),
                            Err(err) => tracing::warn!(connection = %connection.name, error = %err, "could not renew the schedule's claim"),
                        }
                    }
                }
            }
        };
        let now = self.now();
        let interval = chrono::Duration::minutes(connection.auto_sync_interval_minutes.max(1));
        let (status, error, rows, tables, next_run_at) = match &result {
            Ok(summary) => {
                // Up to a tenth of the interval later, so many connections spread out.
                let jitter_ms = rand::random_range(0..=interval.num_milliseconds() / 10);
                let tables: Vec<serde_json::Value> = summary
                    .tables
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "table": t.table, "rows": t.rows, "deleted": t.deleted,
                            "transfer_id": t.transfer_id,
                        })
                    })
                    .collect();
                (
                    "completed",
                    None,
                    summary.tables.iter().map(|t| t.rows).sum(),
                    serde_json::Value::Array(tables),
                    now + interval + chrono::Duration::milliseconds(jitter_ms),
                )
            }
            Err(err) => {
                let backoff = FAILURE_BACKOFF
                    .checked_mul(1 << schedule.failures.clamp(0, 16))
                    .unwrap_or(interval)
                    .min(interval);
                (
                    "failed",
                    Some(err.to_string()),
                    0,
                    serde_json::json!([]),
                    now + backoff,
                )
            }
        };
        let run = RunEnd {
            finished_at: now,
            next_run_at,
            status,
            error: error.as_deref(),
            rows,
            tables: &tables,
        };
        self.store
            .finish_schedule(connection.id, owner, &run)
            .await?;
        self.metrics.scheduler_ran(error.is_none());
        match &error {
            None => tracing::info!(connection = %connection.name, rows, "scheduled sync completed"),
            Some(err) => {
                tracing::warn!(connection = %connection.name, error = %err, "scheduled sync failed")
            }
        }
        Ok(JobOutcome {
            connection_id: connection.id,
            connection_name: connection.name,
            status: status.to_owned(),
            rows,
            error,
            next_run_at,
        })
    }
}

/// How often `dbsync serve` looks for due jobs.
pub const TICK: Duration = Duration::from_secs(15);
