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

pub use crate::batch::Rows;

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

    /// Ends a mirror pull of `schema.name`: deletes the local rows whose key the sender did not
    /// send, and drops the staging table of seen keys, in one transaction. Returns the rows
    /// deleted.
    pub async fn finish_mirror(&self, connection_id: Uuid, schema: &TableSchema) -> Result<i64> {
        let table = quote_ident(&schema.name)?;
        let stage = quote_ident(&mirror_table(connection_id, &schema.name))?;
        let key_list: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Result<_>>()?;
        if key_list.is_empty() {
            return Err(Error::invalid(
                "strategy",
                format!("{:?} has no primary key to mirror by", schema.name),
            ));
        }
        let matches: Vec<String> = key_list
            .iter()
            .map(|k| format!("s.{k} = {table}.{k}"))
            .collect();
        let delete = format!(
            "DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE {})",
            matches.join(" AND ")
        );
        // A mirror pull of an empty sender table applies no batch: the stage may not exist.
        let target = self.describe_table(&schema.name).await?;
        let stage_columns: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| {
                let ty = target
                    .columns
                    .iter()
                    .find(|c| &c.name == k)
                    .map(|c| c.native_type.clone())
                    .unwrap_or_default();
                Ok(format!("{} {ty}", quote_ident(k)?))
            })
            .collect::<Result<_>>()?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {stage} ({})",
            stage_columns.join(", ")
        );
        let drop = format!("DROP TABLE {stage}");
        let deleted = crate::store::on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(create))
                .execute(&mut *tx)
                .await?;
            let deleted = sqlx::query(sqlx::AssertSqlSafe(delete))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(sqlx::AssertSqlSafe(drop))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            deleted
        });
        Ok(deleted as i64)
    }

    /// Drops the staging table of a mirror pull that will not finish (or starts over).
    pub async fn reset_mirror(&self, connection_id: Uuid, table: &str) -> Result<()> {
        let sql = format!(
            "DROP TABLE IF EXISTS {}",
            quote_ident(&mirror_table(connection_id, table))?
        );
        crate::store::on_pool!(self, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
        });
        Ok(())
    }

    /// Records where an incremental pull of `table` stopped (the next one starts after it).
    pub async fn set_incremental_cursor(
        &self,
        connection_id: Uuid,
        table: &str,
        cursor: &serde_json::Value,
    ) -> Result<()> {
        let now = to_micros(chrono::Utc::now());
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_checkpoints (connection_id, table_name, incremental_cursor, rows_applied, updated_at) \
                 VALUES ($1, $2, $3, 0, $4) ON CONFLICT (connection_id, table_name) DO UPDATE SET \
                 incremental_cursor = excluded.incremental_cursor, updated_at = excluded.updated_at",
            )
            .bind(connection_id)
            .bind(table)
            .bind(sqlx::types::Json(cursor))
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Forgets where an interrupted pull of a table stood (the next pull starts from the
    /// beginning, or from the incremental cursor, which is kept).
    pub async fn clear_checkpoint(&self, connection_id: Uuid, table: &str) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_checkpoints SET last_key = NULL, transfer_id = NULL, rows_applied = 0 \
                 WHERE connection_id = $1 AND table_name = $2",
            )
            .bind(connection_id)
            .bind(table)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}

/// The staging table of keys seen by a mirror pull of `table` under a connection. Its name
/// starts with `dbsync_`, so it is never offered to peers.
pub fn mirror_table(connection_id: Uuid, table: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{connection_id}\0{table}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("dbsync_mirror_{hex}")
}

/// One column of a batch as a PostgreSQL array parameter: in binary form where every value's kind
/// matches the target column's type (nothing formatted here, nothing parsed on the server), else
/// as PostgreSQL text cast to the column's type (the same input functions `COPY` uses).
enum ColumnArray {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Uuid(Vec<Option<Uuid>>),
    TimestampTz(Vec<Option<DateTime<chrono::Utc>>>),
    Timestamp(Vec<Option<chrono::NaiveDateTime>>),
    Date(Vec<Option<NaiveDate>>),
    Bytes(Vec<Option<Vec<u8>>>),
    Text(Vec<Option<String>>),
}

/// Collects `values` with `convert` (`None` from it: this value does not fit, give up).
fn typed<'a, T>(
    values: impl Iterator<Item = &'a Value>,
    convert: impl Fn(&Value) -> Option<T>,
) -> Option<Vec<Option<T>>> {
    values
        .map(|value| match value {
            Value::Null => Some(None),
            other => convert(other).map(Some),
        })
        .collect()
}

impl ColumnArray {
    /// The column `values` for a target column of type `native_type`.
    fn build<'a>(
        values: impl Iterator<Item = &'a Value> + Clone,
        native_type: &str,
    ) -> Result<Self> {
        let binary = match native_type {
            "bigint" | "integer" | "smallint" => typed(values.clone(), |v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .map(Self::Int),
            "double precision" | "real" => typed(values.clone(), |v| match v {
                Value::Float(f) => Some(*f),
                _ => None,
            })
            .map(Self::Float),
            "boolean" => typed(values.clone(), |v| match v {
                Value::Bool(b) => Some(*b),
                _ => None,
            })
            .map(Self::Bool),
            "uuid" => typed(values.clone(), |v| match v {
                Value::Uuid(bytes) => Some(Uuid::from_bytes(*bytes)),
                _ => None,
            })
            .map(Self::Uuid),
            // ±infinity (the extreme values) has no chrono form: such a column goes as text.
            "timestamp with time zone" => typed(values.clone(), |v| match v {
                Value::TimestampTz(micros) if *micros != i64::MAX && *micros != i64::MIN => {
                    DateTime::from_timestamp_micros(*micros)
                }
                _ => None,
            })
            .map(Self::TimestampTz),
            "timestamp without time zone" => typed(values.clone(), |v| match v {
                Value::Timestamp(micros) if *micros != i64::MAX && *micros != i64::MIN => {
                    DateTime::from_timestamp_micros(*micros).map(|t| t.naive_utc())
                }
                _ => None,
            })
            .map(Self::Timestamp),
            "date" => typed(values.clone(), |v| match v {
                Value::Date(days) if *days != i32::MAX && *days != i32::MIN => {
                    NaiveDate::from_num_days_from_ce_opt(days.checked_add(719_163)?)
                }
                _ => None,
            })
            .map(Self::Date),
            "bytea" => typed(values.clone(), |v| match v {
                Value::Bytes(bytes) => Some(bytes.clone()),
                _ => None,
            })
            .map(Self::Bytes),
            _ => None,
        };
        match binary {
            Some(array) => Ok(array),
            None => values.map(pg_text).collect::<Result<_>>().map(Self::Text),
        }
    }

    /// The parameter's array type.
    fn sql_type(&self) -> &'static str {
        match self {
            Self::Int(_) => "int8[]",
            Self::Float(_) => "float8[]",
            Self::Bool(_) => "bool[]",
            Self::Uuid(_) => "uuid[]",
            Self::TimestampTz(_) => "timestamptz[]",
            Self::Timestamp(_) => "timestamp[]",
            Self::Date(_) => "date[]",
            Self::Bytes(_) => "bytea[]",
            Self::Text(_) => "text[]",
        }
    }
}

/// Where [`insert_columns`] puts a batch: quoted names of the table, the batch's columns and
/// the key columns, the columns' types, and the mirror key stage when the pull is a mirror.
struct ColumnTarget<'a> {
    table: &'a str,
    conflicting: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    columns: &'a [String],
    casts: &'a [String],
    key: &'a [String],
    key_stage: Option<&'a str>,
}

/// A pooled PostgreSQL connection for one batch's transaction, closed instead of going back to
/// the pool when it is dropped in the middle of a `COPY` (a pull cancelled or killed mid-batch).
/// sqlx 0.9 does not count the server's reply to the `CopyFail` it sends for a `COPY` dropped
/// unfinished, nor to one it aborts after the server has already failed it, so the connection's
/// next user would read that reply as its own: a protocol error ("expected ParseComplete, got
/// ReadyForQuery") or, worse, another statement's result.
struct BatchConnection {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// Set while the server may still owe replies to a `COPY` (see `insert_columns`).
    copying: bool,
}

impl BatchConnection {
    async fn acquire(pool: &sqlx::PgPool) -> Result<Self> {
        Ok(Self {
            conn: pool.acquire().await?,
            copying: false,
        })
    }

    /// Starts the batch's transaction. The batch and its checkpoint commit together, so a
    /// commit lost to a server crash loses both, and the pull resumes from the checkpoint
    /// before: waiting for each batch's WAL flush buys nothing (later synchronous commits, like
    /// the transfer's completion, flush everything before them). No JIT either: a batch's
    /// statement is large in the planner's eyes (a lookup per row) and simple in fact, so
    /// compiling it costs more than it saves. (`set_config(..., true)` is `SET LOCAL`.)
    async fn begin(&mut self) -> Result<(sqlx::Transaction<'_, sqlx::Postgres>, &mut bool)> {
        let Self { conn, copying } = self;
        let mut tx = sqlx::Connection::begin(&mut **conn).await?;
        sqlx::query(
            "SELECT set_config('synchronous_commit', 'off', true), \
             set_config('jit', 'off', true)",
        )
        .execute(&mut *tx)
        .await?;
        Ok((tx, copying))
    }
}

impl Drop for BatchConnection {
    fn drop(&mut self) {
        if self.copying {
            self.conn.close_on_drop();
        }
    }
}

/// Clears `copying` when `result` shows that sqlx read the server's replies to the end: a
/// success, or an error the server reported.
fn settled<T>(result: sqlx::Result<T>, copying: &mut bool) -> sqlx::Result<T> {
    if matches!(result, Ok(_) | Err(sqlx::Error::Database(_))) {
        *copying = false;
    }
    result
}

/// PostgreSQL's fast path: one statement per batch, whatever its size. Each column travels as one
/// array parameter ([`ColumnArray`]); `unnest` turns them back into rows, cast to the target's
/// types, and one `INSERT ... SELECT` with the strategy's `ON CONFLICT`
/// moves them, counting inserted against updated rows by `xmax = 0` in its `RETURNING`. While
/// a table's batches meet no existing key they go in by binary `COPY` instead ([`pg_copy`]).
async fn insert_columns(
    tx: &mut sqlx::PgConnection,
    copying: &mut bool,
    target: &ColumnTarget<'_>,
    rows: Rows<'_>,
    strategy: ConflictStrategy,
    conflict: &str,
) -> Result<Applied> {
    let conflicting = || locked(target.conflicting);
    let mut optimistic = !conflict.is_empty() && !conflicting().contains(target.table);
    // Into a table that has none of the batch's keys (a new or emptied one, or an append), a
    // binary `COPY` does the least work on the server. At an existing key it fails with a unique
    // violation, is rolled back to its savepoint, and the batch goes again with the strategy's
    // `ON CONFLICT` below.
    if (optimistic || conflict.is_empty()) && target.key_stage.is_none() {
        let columns = target
            .casts
            .iter()
            .map(|native| pg_copy::Column::for_type(native))
            .collect::<Option<Vec<_>>>();
        let mut encoder = columns
            .as_deref()
            .and_then(|columns| pg_copy::Encoder::new(rows, columns));
        // The first chunk is written before the `COPY` starts: a batch whose values do not fit
        // it (say text for an integer column) goes straight to the path below.
        let first = encoder.as_mut().and_then(|e| e.fill(COPY_CHUNK_ROWS));
        if let (Some(encoder), Some(more)) = (encoder.as_mut(), first) {
            let sql = format!(
                "COPY {} ({}) FROM STDIN (FORMAT binary)",
                target.table,
                target.columns.join(", ")
            );
            // The rows go a chunk at a time, so the server works on each while the next is
            // written. A later value that does not fit aborts the `COPY` (`Ok(None)`).
            // `copying` stays set from the start of the `COPY` until sqlx has read the server's
            // last reply to it: when the server refuses to start it, when it ends with success
            // or a database error, or when it is aborted with success ([`BatchConnection`]).
            let mut copy = async |tx: &mut sqlx::PgConnection| -> sqlx::Result<Option<u64>> {
                *copying = true;
                let mut copy = match tx.copy_in_raw(&sql).await {
                    Ok(copy) => copy,
                    Err(err) => return settled(Err(err), copying),
                };
                copy.send(encoder.out.as_slice()).await?;
                let mut more = more;
                while more {
                    match encoder.fill(COPY_CHUNK_ROWS) {
                        Some(next) => more = next,
                        None => {
                            copy.abort("a value has no exact binary form").await?;
                            *copying = false;
                            return Ok(None);
                        }
                    }
                    copy.send(encoder.out.as_slice()).await?;
                }
                settled(copy.finish().await, copying).map(Some)
            };
            sqlx::query("SAVEPOINT dbsync_copy")
                .execute(&mut *tx)
                .await?;
            let rollback = async |tx: &mut sqlx::PgConnection| -> Result<()> {
                sqlx::query("ROLLBACK TO SAVEPOINT dbsync_copy")
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            };
            match copy(&mut *tx).await {
                Ok(Some(created)) => {
                    sqlx::query("RELEASE SAVEPOINT dbsync_copy")
                        .execute(&mut *tx)
                        .await?;
                    return Ok(Applied {
                        created: created as i64,
                        ..Applied::default()
                    });
                }
                Ok(None) => rollback(&mut *tx).await?,
                Err(sqlx::Error::Database(err))
                    if err.code().as_deref() == Some("23505") && !conflict.is_empty() =>
                {
                    rollback(&mut *tx).await?;
                    conflicting().insert(target.table.to_owned());
                    optimistic = false;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    let rows = rows.values()?;
    let width = target.columns.len();
    let arrays: Vec<ColumnArray> = (0..width)
        .map(|i| ColumnArray::build(rows.iter().map(|row| &row[i]), &target.casts[i]))
        .collect::<Result<_>>()?;
    let mut projections = Vec::with_capacity(width);
    let mut parameters = Vec::with_capacity(width);
    let mut aliases = Vec::with_capacity(width);
    for (i, ((column, cast), array)) in target
        .columns
        .iter()
        .zip(target.casts)
        .zip(&arrays)
        .enumerate()
    {
        projections.push(if cast.is_empty() {
            format!("s.c{i} AS {column}")
        } else {
            format!("CAST(s.c{i} AS {cast}) AS {column}")
        });
        parameters.push(format!("${}::{}", i + 1, array.sql_type()));
        aliases.push(format!("c{i}"));
    }
    let columns = target.columns.join(", ");
    let staged = match target.key_stage {
        Some(stage) => {
            let key = target.key.join(", ");
            format!(
                ", staged AS (INSERT INTO {stage} ({key}) SELECT {key} FROM src ON CONFLICT ({key}) DO NOTHING)"
            )
        }
        None => String::new(),
    };
    // Overwrite and mirror leave a row alone when its stored image already equals the incoming
    // one (`*<>` in `conflict`), but `ON CONFLICT DO UPDATE` locks the stored row before it
    // looks: a lock written to the WAL and a dirtied page per row even when nothing changes,
    // most of a re-pull's cost on the server. So such rows are dropped first by a lookup that
    // takes no lock (a subquery per row, which the planner runs as one index probe; a join
    // could become a hash join over the whole table). A row changed between that lookup and the
    // insert still meets the `ON CONFLICT`.
    let unchanged_first = matches!(
        strategy,
        ConflictStrategy::Overwrite | ConflictStrategy::Mirror
    ) && target.columns.len() > target.key.len();
    let unchanged = if unchanged_first {
        let others = || target.columns.iter().filter(|c| !target.key.contains(c));
        let old: Vec<String> = others().map(|c| format!("dbsync_old.{c}")).collect();
        let new: Vec<String> = others().map(|c| format!("src.{c}")).collect();
        let same_key: Vec<String> = target
            .key
            .iter()
            .map(|k| format!("dbsync_old.{k} = src.{k}"))
            .collect();
        format!(
            " WHERE (SELECT pg_catalog.record_image_eq(ROW({}), ROW({})) FROM {} AS dbsync_old \
             WHERE {}) IS NOT TRUE",
            old.join(", "),
            new.join(", "),
            target.table,
            same_key.join(" AND ")
        )
    } else {
        String::new()
    };
    let statement = |conflict: &str| {
        let filter = if conflict.is_empty() { "" } else { &unchanged };
        format!(
            "WITH src AS (SELECT {} FROM unnest({}) AS s({})){staged}, \
             moved AS (INSERT INTO {} ({columns}) SELECT {columns} FROM src{filter}{conflict} RETURNING (xmax = 0) AS inserted) \
             SELECT CAST(COUNT(*) FILTER (WHERE inserted) AS BIGINT) FROM moved",
            projections.join(", "),
            parameters.join(", "),
            aliases.join(", "),
            target.table,
        )
    };
    let run = |sql: String| {
        let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
        for array in &arrays {
            query = match array {
                ColumnArray::Int(values) => query.bind(values),
                ColumnArray::Float(values) => query.bind(values),
                ColumnArray::Bool(values) => query.bind(values),
                ColumnArray::Uuid(values) => query.bind(values),
                ColumnArray::TimestampTz(values) => query.bind(values),
                ColumnArray::Timestamp(values) => query.bind(values),
                ColumnArray::Date(values) => query.bind(values),
                ColumnArray::Bytes(values) => query.bind(values),
                ColumnArray::Text(values) => query.bind(values),
            };
        }
        query
    };
    // Where `COPY` cannot carry the batch (a column type with no binary form in `pg_copy`), a
    // plain INSERT, which costs the server about half an `ON CONFLICT` one, is tried first in the
    // same way (in a savepoint) while a table's batches meet no existing key. At an existing key it fails with a unique violation and the batch goes
    // again with the strategy's `ON CONFLICT`; later batches into that table go straight there
    // (a failed attempt costs about as much as it would have saved) until one creates every row.
    let created = if conflict.is_empty() {
        run(statement("")).fetch_one(&mut *tx).await?
    } else if !optimistic {
        let created = run(statement(conflict)).fetch_one(&mut *tx).await?;
        if created == rows.len() as i64 {
            conflicting().remove(target.table);
        }
        created
    } else {
        sqlx::query("SAVEPOINT dbsync_plain_insert")
            .execute(&mut *tx)
            .await?;
        match run(statement("")).fetch_one(&mut *tx).await {
            Ok(created) => {
                sqlx::query("RELEASE SAVEPOINT dbsync_plain_insert")
                    .execute(&mut *tx)
                    .await?;
                created
            }
            Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("23505") => {
                sqlx::query("ROLLBACK TO SAVEPOINT dbsync_plain_insert")
                    .execute(&mut *tx)
                    .await?;
                conflicting().insert(target.table.to_owned());
                run(statement(conflict)).fetch_one(&mut *tx).await?
            }
            Err(err) => return Err(err.into()),
        }
    };
    let n = rows.len() as i64;
    let mut applied = Applied {
        created,
        ..Applied::default()
    };
    // The others hit an existing key: left alone (skip, or nothing to update) or updated.
    if strategy == ConflictStrategy::Skip {
        applied.skipped = n - created;
    } else {
        applied.updated = n - created;
    }
    Ok(applied)
}

/// One of the store's memos, locked: the tables (quoted names) whose batches met existing keys
/// (their next batches skip the plain-insert attempt), or the target tables described this pull.
/// A poisoned lock still holds a usable memo.
fn locked<T>(memo: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    memo.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `$n`, or `$n::type` on PostgreSQL so text parameters become the column's type. On SQLite an
/// anonymous `?` (parameters are always numbered in order here): SQLite finds a named `$n` by a
/// linear scan, and sqlx looks up every parameter's name, so a 10,000-parameter batch spent 90 %
/// of its time in `sqlite3_bind_parameter_name`.
fn push_placeholder(sql: &mut String, engine: Engine, n: usize, cast: &str) {
    use std::fmt::Write;
    match engine {
        Engine::Postgres if !cast.is_empty() => {
            let _ = write!(sql, "${n}::{cast}");
        }
        Engine::Postgres => {
            let _ = write!(sql, "${n}");
        }
        Engine::Sqlite => sql.push('?'),
    }
}

fn insert_query<'a>(
    engine: Engine,
    table: &str,
    quoted: &[String],
    casts: &[String],
    rows: &'a [Vec<Value>],
    conflict: &str,
) -> (String, Vec<&'a Value>) {
    let mut params = Vec::with_capacity(rows.len() * quoted.len());
    // Written straight into one string: a 3,000-row SQLite statement has 30,000 placeholders.
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", quoted.join(", "));
    sql.reserve(rows.len() * (quoted.len() * 3 + 4) + conflict.len());
    for (i, row) in rows.iter().enumerate() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for (j, (value, cast)) in row.iter().zip(casts).enumerate() {
            params.push(value);
            if j > 0 {
                sql.push_str(", ");
            }
            push_placeholder(&mut sql, engine, params.len(), cast);
        }
        sql.push(')');
    }
    sql.push_str(conflict);
    (sql, params)
}

fn existing_query<'a>(
    engine: Engine,
    table: &str,
    key_list: &[String],
    key_positions: &[usize],
    casts: &[String],
    rows: &'a [Vec<Value>],
) -> (String, Vec<&'a Value>) {
    // Written so both engines look the keys up in the primary-key index: `k IN (...)` for one
    // key column, `(a = .. AND b = ..) OR ...` for several. (A row-value `IN (VALUES ...)` made
    // both scan the whole table for every batch.)
    let mut params = Vec::new();
    let mut terms = Vec::with_capacity(rows.len());
    for row in rows {
        let mut slots = Vec::with_capacity(key_positions.len());
        for (position, column) in key_positions.iter().zip(key_list) {
            params.push(&row[*position]);
            let mut slot = String::new();
            push_placeholder(&mut slot, engine, params.len(), &casts[*position]);
            slots.push(if key_list.len() == 1 {
                slot
            } else {
                format!("{column} = {slot}")
            });
        }
        terms.push(if key_list.len() == 1 {
            slots.remove(0)
        } else {
            format!("({})", slots.join(" AND "))
        });
    }
    let condition = if key_list.len() == 1 {
        format!("{} IN ({})", key_list[0], terms.join(", "))
    } else {
        terms.join(" OR ")
    };
    let sql = format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {condition}");
    (sql, params)
}

trait Bind<'q>: Sized {
    fn bind_text(self, value: Option<String>) -> Self;
    fn bind_i64(self, value: i64) -> Self;
    fn bind_f64(self, value: f64) -> Self;
    fn bind_bytes(self, value: Vec<u8>) -> Self;
}

macro_rules! impl_bind {
    ($ty:ty) => {
        impl<'q> Bind<'q> for $ty {
            fn bind_text(self, value: Option<String>) -> Self {
                self.bind(value)
            }
            fn bind_i64(self, value: i64) -> Self {
                self.bind(value)
            }
            fn bind_f64(self, value: f64) -> Self {
                self.bind(value)
            }
            fn bind_bytes(self, value: Vec<u8>) -> Self {
                self.bind(value)
            }
        }
    };
}

impl_bind!(sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>);
impl_bind!(sqlx::query::QueryScalar<'q, sqlx::Postgres, i64, sqlx::postgres::PgArguments>);
impl_bind!(sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>);
impl_bind!(sqlx::query::QueryScalar<'q, sqlx::Sqlite, i64, sqlx::sqlite::SqliteArguments>);

/// On PostgreSQL every value travels as its text form and is cast to the column type in SQL.
fn bind_pg<'q, Q: Bind<'q>>(query: Q, value: &Value, _engine: Engine) -> Result<Q> {
    Ok(query.bind_text(pg_text(value)?))
}

/// `rows` encoded rows, read through one cursor per column, as SQLite binds them.
fn sqlite_rows<'r>(
    mut cursors: Vec<Cursor<'r>>,
    mut rows: usize,
) -> impl crate::sqlite_raw::NextRow<'r> {
    move |out: &mut Vec<crate::sqlite_raw::Arg<'r>>| {
        if rows == 0 {
            return Ok(false);
        }
        rows -= 1;
        for cursor in &mut cursors {
            let scalar = cursor.next_scalar().map_err(|err| err.to_string())?;
            out.push(sqlite_scalar(cursor.kind(), scalar)?);
        }
        Ok(true)
    }
}

/// What [`sqlite_arg`] makes of a batch's encoded value, without building the value where the
/// bytes can be bound as they are.
fn sqlite_scalar(
    kind: Kind,
    scalar: Scalar<'_>,
) -> std::result::Result<crate::sqlite_raw::Arg<'_>, String> {
    use crate::sqlite_raw::Arg;
    Ok(match (kind, scalar) {
        (_, Scalar::Null) => Arg::Null,
        (Kind::Bool, Scalar::Bool(b)) => Arg::Int(i64::from(b)),
        (Kind::Int, Scalar::Int(i)) => Arg::Int(i),
        (Kind::Float, Scalar::Float(f)) if !f.is_nan() => Arg::Float(f),
        (Kind::Text | Kind::Json | Kind::Numeric, Scalar::Str(bytes)) => Arg::Text(
            std::str::from_utf8(bytes)
                .map_err(|_| "a string that is not UTF-8".to_owned())?
                .into(),
        ),
        (Kind::Bytes, Scalar::Bin(bytes)) => Arg::Blob(bytes.into()),
        (kind, scalar) => {
            let value = scalar.value(kind).map_err(|err| err.to_string())?;
            sqlite_arg(&value)
                .map_err(|err| err.to_string())?
                .into_owned()
        }
    })
}

/// On SQLite integers, reals and blobs keep their storage class; everything else is text.
fn sqlite_arg(value: &Value) -> Result<crate::sqlite_raw::Arg<'_>> {
    use crate::sqlite_raw::Arg;
    Ok(match value {
        Value::Null => Arg::Null,
        Value::Bool(b) => Arg::Int(i64::from(*b)),
        Value::Int(i) => Arg::Int(*i),
        Value::Float(f) if f.is_nan() => Arg::Text("NaN".into()),
        Value::Float(f) => Arg::Float(*f),
        Value::Bytes(b) => Arg::Blob(b.as_slice().into()),
        Value::Text(text) => Arg::Text(text.as_str().into()),
        Value::Array(_) => Arg::Text(array_json(value).to_string().into()),
        other => match pg_text(other)? {
            Some(text) => Arg::Text(text.into()),
            None => Arg::Null,
        },
    })
}

fn bind_sqlite<'q, Q: Bind<'q>>(query: Q, value: &Value, _engine: Engine) -> Result<Q> {
    use crate::sqlite_raw::Arg;
    Ok(match sqlite_arg(value)? {
        Arg::Null => query.bind_text(None),
        Arg::Int(i) => query.bind_i64(i),
        Arg::Float(f) => query.bind_f64(f),
        Arg::Text(text) => query.bind_text(Some(text.into_owned())),
        Arg::Blob(bytes) => query.bind_bytes(bytes.into_owned()),
    })
}

fn array_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => (*b).into(),
        Value::Int(i) => (*i).into(),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or_else(|| f.to_string().into(), Into::into)
        }
        Value::Array(items) => items.iter().map(array_json).collect(),
        other => pg_text(other)
            .ok()
            .flatten()
            .map_or(serde_json::Value::Null, Into::into),
    }
}

fn date_text(days: i32) -> Result<String> {
    match days {
        i32::MAX => return Ok("infinity".into()),
        i32::MIN => return Ok("-infinity".into()),
        _ => {}
    }
    let date = NaiveDate::from_num_days_from_ce_opt(
        days.checked_add(719_163).ok_or_else(|| range("date"))?,
    )
    .ok_or_else(|| range("date"))?;
    Ok(with_era(date, String::new()))
}

fn with_era(date: NaiveDate, time: String) -> String {
    let year = date.year();
    if year <= 0 {
        format!(
            "{:04}-{:02}-{:02}{time} BC",
            1 - year,
            date.month(),
            date.day()
        )
    } else {
        format!("{:04}-{:02}-{:02}{time}", year, date.month(), date.day())
    }
}

fn timestamp_text(micros: i64, zone: &str) -> Result<String> {
    match micros {
        i64::MAX => return Ok("infinity".into()),
        i64::MIN => return Ok("-infinity".into()),
        _ => {}
    }
    let at = DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| range("timestamp"))?
        .naive_utc();
    let time = format!(" {}{zone}", at.time().format("%H:%M:%S%.6f"));
    // The era goes after the zone in PostgreSQL's input syntax, so build it by hand.
    Ok(with_era(at.date(), time))
}

fn range(what: &str) -> Error {
    Error::invalid("value", format!("{what} out of range"))
}

fn quote_array_element(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn array_literal(items: &[Value]) -> Result<String> {
    let mut parts = Vec::with_capacity(items.len());
    for item in items {
        parts.push(match item {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner)?,
            other => quote_array_element(&pg_text(other)?.unwrap_or_default()),
        });
    }
    Ok(format!("{{{}}}", parts.join(",")))
}

/// The PostgreSQL text form of a value (`None` for NULL).
pub fn pg_text(value: &Value) -> Result<Option<String>> {
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Bool(b) => if *b { "t" } else { "f" }.to_owned(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) if f.is_nan() => "NaN".into(),
        Value::Float(f) if f.is_infinite() => {
            if *f > 0.0 { "Infinity" } else { "-Infinity" }.into()
        }
        Value::Float(f) => format!("{f:e}"),
        Value::Numeric(text) | Value::Text(text) | Value::Json(text) => text.clone(),
        Value::Bytes(bytes) => {
            let mut text = String::with_capacity(2 + bytes.len() * 2);
            text.push_str("\\x");
            for b in bytes {
                text.push_str(&format!("{b:02x}"));
            }
            text
        }
        Value::Uuid(bytes) => Uuid::from_bytes(*bytes).hyphenated().to_string(),
        Value::Date(days) => date_text(*days)?,
        Value::Time(micros) => {
            let secs = u32::try_from(micros.div_euclid(1_000_000)).map_err(|_| range("time"))?;
            let nanos =
                u32::try_from(micros.rem_euclid(1_000_000) * 1_000).map_err(|_| range("time"))?;
            if secs == 86_400 && nanos == 0 {
                "24:00:00".into()
            } else {
                let time = NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)
                    .ok_or_else(|| range("time"))?;
                format!(
                    "{:02}:{:02}:{:02}.{:06}",
                    time.hour(),
                    time.minute(),
                    time.second(),
                    nanos / 1_000
                )
            }
        }
        Value::Timestamp(micros) => timestamp_text(*micros, "")?,
        Value::TimestampTz(micros) => timestamp_text(*micros, "+00")?,
        Value::Interval {
            months,
            days,
            micros,
        } => format!("{months} mons {days} days {micros} microseconds"),
        Value::Array(items) => array_literal(items)?,
    }))
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
