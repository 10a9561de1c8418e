//! The PostgreSQL sink: rows go in column-wise, one statement (or `COPY`) a batch
//! (`columns::insert_columns`), their rows before the batch before commits; upserts of a large
//! batch into a table that already holds its keys go in as two halves on two connections. A
//! mirror's keys-only pass takes the statement path.

use super::bind::bind_pg;
use super::columns::{Arrays, BatchConnection, ColumnTarget, insert_columns, upsert_arrays};
use super::plan::Plan;
use super::{Applied, Batch, EngineSink, Gate, PARALLEL_MIN_ROWS, committed, locked};
use crate::connection::ConflictStrategy;
use crate::error::Result;
use crate::store::{Engine, Store};

/// A sink over a PostgreSQL pool.
pub(super) struct PgSink<'a>(pub &'a sqlx::PgPool);

impl EngineSink for PgSink<'_> {
    async fn apply(
        &self,
        store: &Store,
        batch: Batch<'_>,
        keys_only: bool,
        mut previous: Option<Gate>,
    ) -> Result<Applied> {
        let pool = self.0;
        if keys_only {
            committed(previous.take()).await?;
            let plan = Plan::new(store, Engine::Postgres, &batch, true).await?;
            return Ok(statements!(
                store,
                plan,
                pool,
                bind_pg,
                &batch.rows.values()?,
                previous
            ));
        }
        let plan = Plan::new(store, Engine::Postgres, &batch, false).await?;
        let rows = batch.rows;
        let strategy = plan.strategy;
        let target = ColumnTarget {
            table: &plan.table,
            conflicting: &store.conflicting,
            columns: &plan.quoted,
            casts: &plan.casts,
            key: &plan.key_list,
            key_stage: plan.mirror.as_ref().map(|m| m.stage.as_str()),
            changed: plan.changed,
        };
        // Upserts into a table that already holds the keys (a re-pull, an incremental pull)
        // keep one server process busy per statement, so a large batch goes in as two halves
        // on two connections at once. The first half commits first, then the second with the
        // checkpoint: a crash between the two leaves the first half applied and the checkpoint
        // where it was, and the batch is sent again, which changes nothing for a keyed strategy
        // (only its created/updated split).
        let split = strategy != ConflictStrategy::Append
            && plan.mirror.is_none()
            && rows.len() >= 2 * PARALLEL_MIN_ROWS
            && locked(&store.conflicting).contains(&plan.table);
        // (Declared before the transactions on them, so dropped after them.)
        let mut halves = None;
        let mut parallel = None;
        if split {
            let (a, b) = halves.insert((
                BatchConnection::acquire(pool).await?,
                BatchConnection::acquire(pool).await?,
            ));
            // The table holds keys of the pull already (`split`): no `COPY` is tried on
            // either connection.
            let (mut tx_first, _) = a.begin().await?;
            let (mut tx_second, _) = b.begin().await?;
            // Each half's arrays are built from the batch as received, a column at a time; the
            // second half's while the server works on the first.
            let at = rows.len() / 2;
            let mut arrays = Arrays::of(rows)?;
            let first = arrays.take(at, &plan.casts)?;
            let both = tokio::join!(
                upsert_arrays(
                    &mut tx_first,
                    &target,
                    first,
                    at,
                    strategy,
                    &plan.conflict,
                    false
                ),
                async {
                    let second = arrays.take(rows.len() - at, &plan.casts)?;
                    upsert_arrays(
                        &mut tx_second,
                        &target,
                        second,
                        rows.len() - at,
                        strategy,
                        &plan.conflict,
                        false,
                    )
                    .await
                }
            );
            // Anything odd (a deadlock through a trigger, say) rolls both back, and the batch
            // goes again the plain way below.
            if let (Ok(a), Ok(b)) = both
                && tx_first.commit().await.is_ok()
            {
                parallel = Some((tx_second, a, b));
            }
        }
        let applied = match parallel {
            Some((mut tx, a, b)) => {
                let applied = Applied {
                    created: a.created + b.created,
                    updated: a.updated + b.updated,
                    skipped: a.skipped + b.skipped,
                };
                checkpoint!(store, plan, tx, applied, previous);
                tx.commit().await?;
                applied
            }
            None => {
                let mut batch = BatchConnection::acquire(pool).await?;
                let (mut tx, copying) = batch.begin().await?;
                if let Some(mirror) = &plan.mirror {
                    sqlx::query(sqlx::AssertSqlSafe(mirror.create.clone()))
                        .execute(&mut *tx)
                        .await?;
                }
                let applied =
                    insert_columns(&mut tx, copying, &target, rows, strategy, &plan.conflict)
                        .await?;
                checkpoint!(store, plan, tx, applied, previous);
                tx.commit().await?;
                applied
            }
        };
        Ok(applied)
    }
}
