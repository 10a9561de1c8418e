//! Sinks: the receiving side of a pull. Creates a missing table from the described schema, and
//! applies each batch of rows with its checkpoint in one transaction, so a pull killed at any
//! point resumes after the last applied key with no row lost or applied twice.
//!
//! Same-engine transfers keep the source's native column types and values exactly. Across
//! engines, types map through the engine-neutral type (see `docs/types.md`).

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Timelike};
use dbsync_protocol::Value;
use dbsync_protocol::columns::{Cursor, Scalar};
use dbsync_protocol::message::TableSchema;
use dbsync_protocol::message::columnar::Kind;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::quote_ident;
use crate::clock::to_micros;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::pg_copy;
use crate::store::{Engine, Pool, Store};

/// Most bind parameters in one statement (below SQLite's 32766 and PostgreSQL's 65535).
const MAX_PARAMS: usize = 30_000;
/// Moves a connection's checkpoint for a table (in the batch's transaction).
const CHECKPOINT_UPSERT: &str = "INSERT INTO dbsync_checkpoints (connection_id, table_name, transfer_id, last_key, rows_applied, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (connection_id, table_name) DO UPDATE SET \
     transfer_id = excluded.transfer_id, last_key = excluded.last_key, \
     rows_applied = dbsync_checkpoints.rows_applied + excluded.rows_applied, updated_at = excluded.updated_at";
/// Says whether the batch before committed (see [`Store::apply_batch_after`]).
pub type Gate = tokio::sync::oneshot::Receiver<bool>;

/// Waits for the batch before to commit; an error when it did not.
async fn committed(previous: Option<Gate>) -> Result<()> {
    match previous {
        None => Ok(()),
        Some(gate) => match gate.await {
            Ok(true) => Ok(()),
            _ => Err(Error::invalid(
                "batch",
                "the batch before it in the pull was not applied",
            )),
        },
    }
}

mod bind;
mod columns;
mod mirror;

pub use crate::batch::Rows;
pub use bind::pg_text;
use bind::*;
use columns::*;
pub use mirror::mirror_table;

/// The transfer a batch belongs to: the batch's checkpoint names it, and its counters (rows,
/// bytes on the wire, resume key) move in the batch's own transaction, so a batch costs one
/// commit and the counters always agree with the rows applied.
#[derive(Debug, Clone, Copy)]
pub struct BatchOf {
    /// The receiver's transfer.
    pub transfer_id: Uuid,
    /// The batch's size on the wire.
    pub bytes_wire: i64,
}

/// Rows of binary `COPY` data written and sent at a time (~300 KiB of a users-like table).
const COPY_CHUNK_ROWS: usize = 2_000;
/// Fewest rows in each half of a batch upserted as two halves at once (PostgreSQL).
const PARALLEL_MIN_ROWS: usize = 1_000;
/// Most rows in one existence lookup over a composite key (an OR of ANDs).
const EXISTING_OR_TERMS: usize = 400;

/// Rows created, updated and skipped by one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// New rows.
    pub created: i64,
    /// Rows that replaced or merged into existing ones.
    pub updated: i64,
    /// Rows left alone (`skip`).
    pub skipped: i64,
}

/// Where a pull of one table stands on the receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Key of the last applied row.
    pub last_key: Option<Vec<Value>>,
    /// Rows applied under this checkpoint.
    pub rows_applied: i64,
    /// The receive transfer that wrote it.
    pub transfer_id: Option<Uuid>,
    /// Where the last completed incremental pull stopped: `{"column": c, "after": [cursor, key...]}`.
    pub incremental_cursor: Option<serde_json::Value>,
}

/// The column type to create on `target` for a column described by `schema`.
pub fn target_type(
    target: Engine,
    schema: &TableSchema,
    native: &str,
    neutral: &str,
) -> Result<String> {
    let same_engine = matches!(
        (target, schema.engine.as_str()),
        (Engine::Postgres, "postgres") | (Engine::Sqlite, "sqlite")
    );
    if same_engine {
        return Ok(native.to_owned());
    }
    let (scalar, array) = match neutral
        .strip_prefix("array<")
        .and_then(|r| r.strip_suffix('>'))
    {
        Some(element) => (element, true),
        None => (neutral, false),
    };
    let mapped = match (target, scalar) {
        (_, unsupported) if unsupported.starts_with("unsupported:") => None,
        (Engine::Postgres, "bool") => Some("BOOLEAN"),
        (Engine::Postgres, "int") => Some("BIGINT"),
        (Engine::Postgres, "float") => Some("DOUBLE PRECISION"),
        (Engine::Postgres, "numeric") => Some("NUMERIC"),
        (Engine::Postgres, "text") => Some("TEXT"),
        (Engine::Postgres, "bytes") => Some("BYTEA"),
        (Engine::Postgres, "uuid") => Some("UUID"),
        (Engine::Postgres, "json") => Some("JSONB"),
        (Engine::Postgres, "date") => Some("DATE"),
        (Engine::Postgres, "time") => Some("TIME"),
        (Engine::Postgres, "timestamp") => Some("TIMESTAMP"),
        (Engine::Postgres, "timestamptz") => Some("TIMESTAMPTZ"),
        (Engine::Postgres, "interval") => Some("INTERVAL"),
        (Engine::Sqlite, _) if array => Some("TEXT"),
        (Engine::Sqlite, "bool") => Some("BOOLEAN"),
        (Engine::Sqlite, "int") => Some("INTEGER"),
        (Engine::Sqlite, "float") => Some("REAL"),
        (Engine::Sqlite, "bytes") => Some("BLOB"),
        (
            Engine::Sqlite,
            "numeric" | "text" | "uuid" | "json" | "date" | "time" | "timestamp" | "timestamptz"
            | "interval",
        ) => Some("TEXT"),
        _ => None,
    };
    let mapped = mapped.ok_or_else(|| {
        Error::invalid(
            "column type",
            format!("{native} ({neutral}) cannot be mapped to {target:?}"),
        )
    })?;
    Ok(if array && target == Engine::Postgres {
        format!("{mapped}[]")
    } else {
        mapped.to_owned()
    })
}

/// A receiver never creates or writes a table that [`crate::catalog::is_internal_table`]
/// reserves, whatever its peer sent.
fn refuse_reserved(table: &str) -> Result<()> {
    if crate::catalog::is_internal_table(table) {
        return Err(Error::invalid(
            "table",
            format!("{table:?} is reserved for dbsync or the database engine and is never written"),
        ));
    }
    Ok(())
}

impl Store {
    /// Creates `schema.name` when it does not exist (columns, types, NOT NULL, primary key);
    /// when it exists, checks that every column of `columns` is there (schema drift is an error
    /// naming the missing columns). Returns whether the table was created.
    pub async fn ensure_table(&self, schema: &TableSchema, columns: &[String]) -> Result<bool> {
        refuse_reserved(&schema.name)?;
        // A new pull describes the table again (it may have been altered since the last one).
        locked(&self.described).remove(&schema.name);
        match self.describe_table(&schema.name).await {
            Ok(existing) => {
                let missing: Vec<&str> = columns
                    .iter()
                    .filter(|c| !existing.columns.iter().any(|e| &e.name == *c))
                    .map(String::as_str)
                    .collect();
                if missing.is_empty() {
                    Ok(false)
                } else {
                    Err(Error::invalid(
                        "schema",
                        format!(
                            "table {:?} here lacks the columns {}",
                            schema.name,
                            missing.join(", ")
                        ),
                    ))
                }
            }
            Err(Error::NotFound { .. }) => {
                let mut definitions = Vec::new();
                for column in schema.columns.iter().filter(|c| columns.contains(&c.name)) {
                    let ty = target_type(
                        self.engine(),
                        schema,
                        &column.native_type,
                        &column.neutral_type,
                    )?;
                    let not_null = if column.nullable { "" } else { " NOT NULL" };
                    definitions.push(format!("{} {ty}{not_null}", quote_ident(&column.name)?));
                }
                if !schema.primary_key.is_empty() {
                    let key = schema
                        .primary_key
                        .iter()
                        .map(|k| quote_ident(k))
                        .collect::<Result<Vec<_>>>()?;
                    definitions.push(format!("PRIMARY KEY ({})", key.join(", ")));
                }
                let sql = format!(
                    "CREATE TABLE {} ({})",
                    quote_ident(&schema.name)?,
                    definitions.join(", ")
                );
                match self.pool() {
                    Pool::Postgres(pool) => {
                        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                    }
                    Pool::Sqlite(pool) => {
                        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                    }
                }
                tracing::info!(table = %schema.name, "created table from the sender's schema");
                Ok(true)
            }
            Err(err) => Err(err),
        }
    }

    /// The checkpoint of `table` under a connection, if a pull has applied anything.
    pub async fn checkpoint(&self, connection_id: Uuid, table: &str) -> Result<Option<Checkpoint>> {
        type Row = (Option<String>, i64, Option<Uuid>, Option<String>);
        let row: Option<Row> = crate::store::on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT CAST(last_key AS TEXT), rows_applied, transfer_id, CAST(incremental_cursor AS TEXT) \
                 FROM dbsync_checkpoints WHERE connection_id = $1 AND table_name = $2",
            )
            .bind(connection_id)
            .bind(table)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(last_key, rows_applied, transfer_id, cursor)| {
            let last_key = last_key
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|err| Error::invalid("checkpoint", err.to_string()))?;
            let incremental_cursor = cursor
                .map(|text| serde_json::from_str(&text))
                .transpose()
                .map_err(|err| Error::invalid("checkpoint", err.to_string()))?;
            Ok(Checkpoint {
                last_key,
                rows_applied,
                transfer_id,
                incremental_cursor,
            })
        })
        .transpose()
    }

    /// `table` as described by the catalog, once per pull (see [`Store::ensure_table`]).
    async fn described_table(&self, table: &str) -> Result<TableSchema> {
        let cached = locked(&self.described).get(table).cloned();
        if let Some(schema) = cached {
            return Ok(schema);
        }
        let schema = self.describe_table(table).await?;
        locked(&self.described).insert(table.to_owned(), schema.clone());
        Ok(schema)
    }

    /// Applies `rows` (columns in `columns` order) to `schema.name` with `strategy`, and moves the
    /// connection's checkpoint for the table to `last_key` (and the progress of the transfer in
    /// `batch_of`, when given), in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_batch(
        &self,
        connection_id: Uuid,
        batch_of: Option<BatchOf>,
        schema: &TableSchema,
        columns: &[String],
        rows: Rows<'_>,
        strategy: ConflictStrategy,
        last_key: Option<&[Value]>,
    ) -> Result<Applied> {
        self.apply_batch_after(
            None,
            connection_id,
            batch_of,
            schema,
            columns,
            rows,
            strategy,
            last_key,
        )
        .await
    }

    /// [`Store::apply_batch`] for a batch applied while the one before it may still be going
    /// in (on another connection): its rows go in at once, but its checkpoint waits until
    /// `previous` says the batch before committed, so batches commit in order and a crash never
    /// leaves a later batch applied behind an earlier one (on SQLite, and on PostgreSQL paths
    /// other than the column-wise one, the whole batch waits). `previous` saying `false` (or
    /// dropped) fails this batch too; `None` is [`Store::apply_batch`].
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_batch_after(
        &self,
        previous: Option<Gate>,
        connection_id: Uuid,
        batch_of: Option<BatchOf>,
        schema: &TableSchema,
        columns: &[String],
        rows: Rows<'_>,
        strategy: ConflictStrategy,
        last_key: Option<&[Value]>,
    ) -> Result<Applied> {
        self.apply(
            connection_id,
            batch_of,
            schema,
            columns,
            rows,
            strategy,
            last_key,
            false,
            previous,
        )
        .await
    }

    /// A keys-only reconciliation batch of a mirror pass: stages the keys the sender has (for
    /// [`Store::finish_mirror`]) and changes no row.
    pub async fn stage_mirror_keys(
        &self,
        connection_id: Uuid,
        schema: &TableSchema,
        columns: &[String],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        self.apply(
            connection_id,
            None,
            schema,
            columns,
            Rows::Values(rows),
            ConflictStrategy::Mirror,
            None,
            true,
            None,
        )
        .await
        .map(drop)
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        connection_id: Uuid,
        batch_of: Option<BatchOf>,
        schema: &TableSchema,
        columns: &[String],
        rows: Rows<'_>,
        strategy: ConflictStrategy,
        last_key: Option<&[Value]>,
        keys_only: bool,
        mut previous: Option<Gate>,
    ) -> Result<Applied> {
        refuse_reserved(&schema.name)?;
        let count = rows.len() as i64;
        let engine = self.engine();
        let table = quote_ident(&schema.name)?;
        let quoted: Vec<String> = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Result<_>>()?;
        let key = &schema.primary_key;
        if strategy != ConflictStrategy::Append && key.is_empty() {
            return Err(Error::invalid(
                "strategy",
                format!(
                    "{:?} has no primary key; only the append strategy can load it",
                    schema.name
                ),
            ));
        }
        let key_positions: Vec<usize> =
            key.iter()
                .map(|k| {
                    columns.iter().position(|c| c == k).ok_or_else(|| {
                        Error::invalid("columns", format!("key column {k:?} missing"))
                    })
                })
                .collect::<Result<_>>()?;
        // PostgreSQL needs the target's column types for the casts of its text values, and a
        // mirror pull for its key stage. (PostgreSQL rows go in column-wise, one statement a
        // batch: `insert_columns`.)
        let columnwise = engine == Engine::Postgres && !keys_only;
        // Only PostgreSQL's column-wise path puts rows in before the batch before commits.
        if !columnwise {
            committed(previous.take()).await?;
        }
        let casts: Vec<String> =
            if engine == Engine::Postgres || strategy == ConflictStrategy::Mirror {
                let target = self.described_table(&schema.name).await?;
                columns
                    .iter()
                    .map(|c| {
                        target
                            .columns
                            .iter()
                            .find(|t| &t.name == c)
                            .map(|t| t.native_type.clone())
                            .unwrap_or_default()
                    })
                    .collect()
            } else {
                vec![String::new(); columns.len()]
            };
        let key_list: Vec<String> = key.iter().map(|k| quote_ident(k)).collect::<Result<_>>()?;
        let conflict = match strategy {
            ConflictStrategy::Append => String::new(),
            ConflictStrategy::Skip => format!(" ON CONFLICT ({}) DO NOTHING", key_list.join(", ")),
            ConflictStrategy::Overwrite | ConflictStrategy::Mirror | ConflictStrategy::Merge => {
                let updates: Vec<String> = quoted
                    .iter()
                    .zip(columns)
                    .filter(|(_, c)| !key.contains(c))
                    .map(|(q, _)| {
                        if strategy == ConflictStrategy::Merge {
                            format!("{q} = COALESCE(excluded.{q}, {table}.{q})")
                        } else {
                            format!("{q} = excluded.{q}")
                        }
                    })
                    .collect();
                if updates.is_empty() {
                    format!(" ON CONFLICT ({}) DO NOTHING", key_list.join(", "))
                } else {
                    // On PostgreSQL a row whose stored image already equals the incoming one is
                    // left alone: a re-pull of mostly unchanged data writes no new row versions,
                    // WAL or bloat for the rows that did not change. `*<>` on whole rows compares
                    // bytes, so `1.0` against `1.00`, or a case change under citext, still
                    // counts as a change. (When the pull leaves columns out, `excluded` holds
                    // their defaults, so every row differs here; the lock-free lookup before it
                    // in `insert_columns` compares the pulled columns only.)
                    let unchanged =
                        if engine == Engine::Postgres && strategy != ConflictStrategy::Merge {
                            format!(" WHERE {table} OPERATOR(pg_catalog.*<>) excluded")
                        } else {
                            String::new()
                        };
                    format!(
                        " ON CONFLICT ({}) DO UPDATE SET {}{unchanged}",
                        key_list.join(", "),
                        updates.join(", ")
                    )
                }
            }
        };
        let per_statement = (MAX_PARAMS / columns.len().max(1)).max(1);
        // Bookkeeping only (when the checkpoint moved); the wall clock is right here.
        let now = to_micros(chrono::Utc::now());
        let last_key_json = last_key
            .map(serde_json::to_value)
            .transpose()
            .map_err(|err| Error::invalid("last key", err.to_string()))?
            .map(sqlx::types::Json);
        let mut applied = Applied::default();
        // Moves the connection's checkpoint for the table and the transfer's counters, in the
        // batch's transaction (after the rows, when `applied` holds their counts).
        macro_rules! checkpoint {
            ($tx:expr) => {
                committed(previous.take()).await?;
                sqlx::query(CHECKPOINT_UPSERT)
                    .bind(connection_id)
                    .bind(&schema.name)
                    .bind(batch_of.map(|b| b.transfer_id))
                    .bind(&last_key_json)
                    .bind(count)
                    .bind(now)
                    .execute(&mut *$tx)
                    .await?;
                if let Some(batch) = batch_of {
                    let moved = sqlx::query(crate::transfer::PROGRESS_UPDATE)
                        .bind(batch.transfer_id)
                        .bind(count)
                        .bind(applied.created)
                        .bind(applied.updated)
                        .bind(applied.skipped)
                        .bind(0_i64)
                        .bind(batch.bytes_wire)
                        .bind(0_i64)
                        .bind(&last_key_json)
                        .execute(&mut *$tx)
                        .await?
                        .rows_affected();
                    // Cancelled or failed meanwhile: the batch is rolled back and the pull stops.
                    if moved == 0 {
                        return Err(self
                            .illegal_transfer(batch.transfer_id, "record progress on")
                            .await);
                    }
                }
            };
        }
        // Mirror: the keys seen go into a staging table in the same transaction, so the delete
        // pass at the end knows every key the sender has, even across an interrupted pull.
        let mirror = if strategy == ConflictStrategy::Mirror {
            let stage = quote_ident(&mirror_table(connection_id, &schema.name))?;
            let key_casts: Vec<String> = key_positions.iter().map(|p| casts[*p].clone()).collect();
            let definitions: Vec<String> = key_list
                .iter()
                .zip(&key_casts)
                .map(|(k, ty)| format!("{k} {ty}"))
                .collect();
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {stage} ({}, PRIMARY KEY ({}))",
                definitions.join(", "),
                key_list.join(", ")
            );
            Some((stage, key_casts, create))
        } else {
            None
        };
        let key_conflict = format!(" ON CONFLICT ({}) DO NOTHING", key_list.join(", "));
        let optimistic = engine == Engine::Sqlite
            && !keys_only
            && mirror.is_none()
            && strategy != ConflictStrategy::Append
            && !locked(&self.conflicting).contains(&table);
        macro_rules! run {
            ($pool:expr, $bind:ident, $rows:expr) => {{
                let rows: &[Vec<Value>] = $rows;
                let mut tx = $pool.begin().await?;
                if let Some((stage, key_casts, create)) = &mirror {
                    sqlx::query(sqlx::AssertSqlSafe(create.clone()))
                        .execute(&mut *tx)
                        .await?;
                    let keys: Vec<Vec<Value>> = rows
                        .iter()
                        .map(|row| key_positions.iter().map(|p| row[*p].clone()).collect())
                        .collect();
                    for chunk in keys.chunks((MAX_PARAMS / key_list.len()).max(1)) {
                        let (sql, params) =
                            insert_query(engine, stage, &key_list, key_casts, chunk, &key_conflict);
                        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                        for value in params {
                            query = $bind(query, value, engine)?;
                        }
                        query.execute(&mut *tx).await?;
                    }
                }
                for chunk in rows
                    .chunks(per_statement)
                    .take(if keys_only { 0 } else { usize::MAX })
                {
                    let existing = if strategy == ConflictStrategy::Append {
                        0
                    } else {
                        // A composite key is an OR of terms: keep each statement's expression
                        // well under SQLite's depth limit of 1,000.
                        let lookup = if key_list.len() == 1 {
                            chunk.len()
                        } else {
                            EXISTING_OR_TERMS
                        };
                        let mut existing = 0;
                        for part in chunk.chunks(lookup.max(1)) {
                            let (sql, params) = existing_query(
                                engine,
                                &table,
                                &key_list,
                                &key_positions,
                                &casts,
                                part,
                            );
                            let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
                            for value in params {
                                query = $bind(query, value, engine)?;
                            }
                            existing += query.fetch_one(&mut *tx).await?;
                        }
                        existing
                    };
                    let (sql, params) =
                        insert_query(engine, &table, &quoted, &casts, chunk, &conflict);
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for value in params {
                        query = $bind(query, value, engine)?;
                    }
                    query.execute(&mut *tx).await?;
                    let n = chunk.len() as i64;
                    applied.created += n - existing;
                    if strategy == ConflictStrategy::Skip {
                        applied.skipped += existing;
                    } else {
                        applied.updated += existing;
                    }
                }
                if engine == Engine::Sqlite && applied.created == count {
                    locked(&self.conflicting).remove(&table);
                }
                if !keys_only {
                    checkpoint!(tx);
                }
                tx.commit().await?;
            }};
        }
        match self.pool() {
            Pool::Postgres(pool) if columnwise => {
                let target = ColumnTarget {
                    table: &table,
                    conflicting: &self.conflicting,
                    columns: &quoted,
                    casts: &casts,
                    key: &key_list,
                    key_stage: mirror.as_ref().map(|m| m.0.as_str()),
                };
                // Upserts into a table that already holds the keys (a re-pull, an incremental
                // pull) keep one server process busy per statement, so a large batch goes in
                // as two halves on two connections at once. The first half commits first, then
                // the second with the checkpoint: a crash between the two leaves the first half
                // applied and the checkpoint where it was, and the batch is sent again, which
                // changes nothing for a keyed strategy (only its created/updated split).
                let split = strategy != ConflictStrategy::Append
                    && mirror.is_none()
                    && rows.len() >= 2 * PARALLEL_MIN_ROWS
                    && locked(&self.conflicting).contains(&table);
                // (Declared before the transactions on them, so dropped after them.)
                let mut halves = None;
                let mut parallel = None;
                if split {
                    let values = rows.values()?;
                    let (first, second) = values.split_at(values.len() / 2);
                    let (first, second) = (Rows::Values(first), Rows::Values(second));
                    let (a, b) = halves.insert((
                        BatchConnection::acquire(pool).await?,
                        BatchConnection::acquire(pool).await?,
                    ));
                    let (mut tx_first, copying_first) = a.begin().await?;
                    let (mut tx_second, copying_second) = b.begin().await?;
                    let both = tokio::join!(
                        insert_columns(
                            &mut tx_first,
                            copying_first,
                            &target,
                            first,
                            strategy,
                            &conflict
                        ),
                        insert_columns(
                            &mut tx_second,
                            copying_second,
                            &target,
                            second,
                            strategy,
                            &conflict
                        )
                    );
                    // Anything odd (a deadlock through a trigger, say) rolls both back, and the
                    // batch goes again the plain way below.
                    if let (Ok(a), Ok(b)) = both
                        && tx_first.commit().await.is_ok()
                    {
                        parallel = Some((tx_second, a, b));
                    }
                }
                match parallel {
                    Some((mut tx, a, b)) => {
                        applied = Applied {
                            created: a.created + b.created,
                            updated: a.updated + b.updated,
                            skipped: a.skipped + b.skipped,
                        };
                        checkpoint!(tx);
                        tx.commit().await?;
                    }
                    None => {
                        let mut batch = BatchConnection::acquire(pool).await?;
                        let (mut tx, copying) = batch.begin().await?;
                        if let Some((_, _, create)) = &mirror {
                            sqlx::query(sqlx::AssertSqlSafe(create.clone()))
                                .execute(&mut *tx)
                                .await?;
                        }
                        applied =
                            insert_columns(&mut tx, copying, &target, rows, strategy, &conflict)
                                .await?;
                        checkpoint!(tx);
                        tx.commit().await?;
                    }
                }
            }
            Pool::Postgres(pool) => run!(pool, bind_pg, &rows.values()?),
            // As on PostgreSQL: while a table's batches meet no existing key, plain inserts (no
            // existence lookup, no ON CONFLICT), one prepared row at a time on the raw handle,
            // the checkpoint and the transfer's counters after them, in one transaction that
            // never leaves the calling thread (`sqlite_raw::load_rows`). At the first unique
            // violation the transaction is rolled back, the table is remembered, and the batch
            // goes again counted key by key.
            Pool::Sqlite(pool) if optimistic => {
                let slots = vec!["?"; columns.len()].join(", ");
                let sql = format!(
                    "INSERT INTO {table} ({}) VALUES ({slots})",
                    quoted.join(", ")
                );
                // The values as sqlx binds them for the same statements elsewhere: UUIDs as
                // 16-byte blobs, JSON as text, times as RFC 3339 text.
                use crate::sqlite_raw::{Arg, RawError, Then};
                let transfer = batch_of.map(|b| *b.transfer_id.as_bytes());
                let transfer_arg = || {
                    transfer
                        .as_ref()
                        .map_or(Arg::Null, |t| Arg::Blob(t.as_slice().into()))
                };
                let last_key_text = last_key_json
                    .as_ref()
                    .map(|key| serde_json::to_string(&key.0))
                    .transpose()
                    .map_err(|err| Error::invalid("last key", err.to_string()))?;
                let last_key_arg = || {
                    last_key_text
                        .as_deref()
                        .map_or(Arg::Null, |k| Arg::Text(k.into()))
                };
                let now_text = now.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false);
                let mut then = vec![Then {
                    sql: CHECKPOINT_UPSERT,
                    params: vec![
                        Arg::Blob(connection_id.as_bytes().as_slice().into()),
                        Arg::Text(schema.name.as_str().into()),
                        transfer_arg(),
                        last_key_arg(),
                        Arg::Int(count),
                        Arg::Text(now_text.as_str().into()),
                    ],
                    must_change: false,
                }];
                if let Some(batch) = batch_of {
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
                let mut conn = pool.acquire().await?;
                // Encoded rows are bound straight from the batch, column by column.
                let loaded = match rows.cursors() {
                    Some(cursors) => {
                        let next_row = sqlite_rows(cursors, rows.len());
                        crate::sqlite_raw::load_rows(&mut conn, &sql, next_row, &then).await
                    }
                    None => {
                        let values = rows.values()?;
                        let next_row = crate::sqlite_raw::each_row(&values, |v| {
                            sqlite_arg(v).map_err(|err| err.to_string())
                        });
                        crate::sqlite_raw::load_rows(&mut conn, &sql, next_row, &then).await
                    }
                };
                drop(conn);
                match loaded {
                    Ok(()) => applied.created = count,
                    Err(RawError::UniqueViolation(_)) => {
                        locked(&self.conflicting).insert(table.clone());
                        run!(pool, bind_sqlite, &rows.values()?)
                    }
                    // Only the counters' update must change a row, and it runs only for a
                    // transfer.
                    Err(RawError::NothingChanged(_)) => {
                        let id = batch_of.map(|b| b.transfer_id).unwrap_or_default();
                        return Err(self.illegal_transfer(id, "record progress on").await);
                    }
                    Err(RawError::Sqlx(err)) => return Err(err.into()),
                    Err(err) => {
                        return Err(Error::invalid(
                            "row",
                            format!("SQLite refused a row of {}: {err}", schema.name),
                        ));
                    }
                }
                self.checkpoint_wal();
            }
            Pool::Sqlite(pool) => {
                run!(pool, bind_sqlite, &rows.values()?);
                self.checkpoint_wal();
            }
        }
        Ok(applied)
    }
}

/// One of the store's memos, locked: the tables (quoted names) whose batches met existing keys
/// (their next batches skip the plain-insert attempt), or the target tables described this pull.
/// A poisoned lock still holds a usable memo.
fn locked<T>(memo: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    memo.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_text_forms() {
        assert_eq!(pg_text(&Value::Float(0.1)).unwrap().unwrap(), "1e-1");
        assert_eq!(
            pg_text(&Value::Float(f64::NEG_INFINITY)).unwrap().unwrap(),
            "-Infinity"
        );
        assert_eq!(
            pg_text(&Value::Bytes(vec![0, 255])).unwrap().unwrap(),
            "\\x00ff"
        );
        assert_eq!(pg_text(&Value::Date(0)).unwrap().unwrap(), "1970-01-01");
        assert_eq!(
            pg_text(&Value::Date(i32::MAX)).unwrap().unwrap(),
            "infinity"
        );
        assert_eq!(
            pg_text(&Value::TimestampTz(1_000_001)).unwrap().unwrap(),
            "1970-01-01 00:00:01.000001+00"
        );
        assert_eq!(
            pg_text(&Value::Time(86_399_999_999)).unwrap().unwrap(),
            "23:59:59.999999"
        );
        assert_eq!(
            pg_text(&Value::Array(vec![Value::Text("a\"b".into()), Value::Null]))
                .unwrap()
                .unwrap(),
            "{\"a\\\"b\",NULL}"
        );
        // 44 BC: year -43 in the proleptic calendar.
        let days = NaiveDate::from_ymd_opt(-43, 3, 15)
            .unwrap()
            .num_days_from_ce()
            - 719_163;
        assert_eq!(
            pg_text(&Value::Date(days)).unwrap().unwrap(),
            "0044-03-15 BC"
        );
    }
}
