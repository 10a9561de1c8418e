//! The SQLite sink. While a table's batches meet no existing key, plain inserts (no existence
//! lookup, no `ON CONFLICT`), one prepared row at a time on the raw handle, the checkpoint and
//! the transfer's counters after them, in one transaction that never leaves the calling thread
//! (`sqlite_raw::load_rows`). At the first unique violation the transaction is rolled back, the
//! table is remembered, and the batch goes again on the statement path, counted key by key.

use super::bind::{bind_sqlite, sqlite_arg, sqlite_rows};
use super::plan::Plan;
use super::{Applied, Batch, CHECKPOINT_UPSERT, EngineSink, Gate, committed, locked};
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::sqlite_raw::{Arg, RawError, Then};
use crate::store::{Engine, Store};

/// A sink over a SQLite pool.
pub(super) struct SqliteSink<'a>(pub &'a sqlx::SqlitePool);

impl EngineSink for SqliteSink<'_> {
    async fn apply(
        &self,
        store: &Store,
        batch: Batch<'_>,
        keys_only: bool,
        mut previous: Option<Gate>,
    ) -> Result<Applied> {
        // One connection writes at a time: the whole batch waits for the one before.
        committed(previous.take()).await?;
        let plan = Plan::new(store, Engine::Sqlite, &batch, keys_only).await?;
        let optimistic = !keys_only
            && plan.mirror.is_none()
            && plan.strategy != ConflictStrategy::Append
            && !locked(&store.conflicting).contains(&plan.table);
        let applied = if optimistic {
            match self.load(store, &plan, &batch).await? {
                Some(applied) => applied,
                None => {
                    locked(&store.conflicting).insert(plan.table.clone());
                    self.statements(store, &plan, &batch, previous).await?
                }
            }
        } else {
            self.statements(store, &plan, &batch, previous).await?
        };
        store.checkpoint_wal();
        Ok(applied)
    }
}

impl SqliteSink<'_> {
    /// The statement path; forgets that the table met existing keys once a batch creates every
    /// row.
    async fn statements(
        &self,
        store: &Store,
        plan: &Plan<'_>,
        batch: &Batch<'_>,
        mut previous: Option<Gate>,
    ) -> Result<Applied> {
        let pool = self.0;
        let applied = statements!(
            store,
            plan,
            pool,
            bind_sqlite,
            &batch.rows.values()?,
            previous
        );
        if applied.created == plan.count {
            locked(&store.conflicting).remove(&plan.table);
        }
        Ok(applied)
    }

    /// Plain inserts on the raw handle; `None` when a row's key is already here (nothing was
    /// applied).
    async fn load(
        &self,
        store: &Store,
        plan: &Plan<'_>,
        batch: &Batch<'_>,
    ) -> Result<Option<Applied>> {
        let slots = vec!["?"; plan.columns.len()].join(", ");
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({slots})",
            plan.table,
            plan.quoted.join(", ")
        );
        // The values as sqlx binds them for the same statements elsewhere: UUIDs as 16-byte
        // blobs, JSON as text, times as RFC 3339 text.
        let transfer = plan.batch_of.map(|b| *b.transfer_id.as_bytes());
        let transfer_arg = || {
            transfer
                .as_ref()
                .map_or(Arg::Null, |t| Arg::Blob(t.as_slice().into()))
        };
        let last_key_text = plan
            .last_key_json
            .as_ref()
            .map(|key| serde_json::to_string(&key.0))
            .transpose()
            .map_err(|err| Error::invalid("last key", err.to_string()))?;
        let last_key_arg = || {
            last_key_text
                .as_deref()
                .map_or(Arg::Null, |k| Arg::Text(k.into()))
        };
        let now = plan
            .now
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
        let count = plan.count;
        let mut then = vec![Then {
            sql: CHECKPOINT_UPSERT,
            params: vec![
                Arg::Blob(plan.connection_id.as_bytes().as_slice().into()),
                Arg::Text(plan.checkpoint.into()),
                transfer_arg(),
                last_key_arg(),
                Arg::Int(count),
                Arg::Text(now.as_str().into()),
            ],
            must_change: false,
        }];
        if let Some(batch) = plan.batch_of {
            then.push(Then {
                sql: crate::transfer::PROGRESS_UPDATE,
                params: vec![
                    transfer_arg(),
                    Arg::Int(count),
                    Arg::Int(count),
                    Arg::Int(0),
                    Arg::Int(0),
                    Arg::Int(0),
                    Arg::Int(batch.bytes_wire),
                    Arg::Int(0),
                    last_key_arg(),
                ],
                must_change: true,
            });
        }
        let mut conn = self.0.acquire().await?;
        // Encoded rows are bound straight from the batch, column by column.
        let loaded = match batch.rows.cursors() {
            Some(cursors) => {
                let next_row = sqlite_rows(cursors, batch.rows.len());
                crate::sqlite_raw::load_rows(&mut conn, &sql, next_row, &then).await
            }
            None => {
                let values = batch.rows.values()?;
                let next_row = crate::sqlite_raw::each_row(&values, |v| {
                    sqlite_arg(v).map_err(|err| err.to_string())
                });
                crate::sqlite_raw::load_rows(&mut conn, &sql, next_row, &then).await
            }
        };
        drop(conn);
        match loaded {
            Ok(()) => Ok(Some(Applied {
                created: count,
                ..Applied::default()
            })),
            Err(RawError::UniqueViolation(_)) => Ok(None),
            // Only the counters' update must change a row, and it runs only for a transfer.
            Err(RawError::NothingChanged(_)) => {
                let id = plan.batch_of.map(|b| b.transfer_id).unwrap_or_default();
                Err(store.illegal_transfer(id, "record progress on").await)
            }
            Err(RawError::Sqlx(err)) => Err(err.into()),
            Err(err) => Err(Error::invalid(
                "row",
                format!("SQLite refused a row of {}: {err}", plan.schema.name),
            )),
        }
    }
}
