//! Sinks: the receiving side of a pull. Creates a missing table from the described schema, and
//! applies each batch of rows with its checkpoint in one transaction, so a pull killed at any
//! point resumes after the last applied key with no row lost or applied twice.
//!
//! The store plans a batch ([`plan::Plan`]: names, keys, casts, the strategy's conflict clause)
//! and hands it to its engine's sink ([`EngineSink`]: `postgres`, `sqlite`), which chooses how
//! the rows go in. Same-engine transfers keep the source's native column types and values
//! exactly. Across engines, types map through the engine-neutral type (see `docs/types.md`).

use dbsync_protocol::Value;
use dbsync_protocol::message::TableSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::quote_ident;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

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

/// Moves the checkpoint of `$plan`'s table and its transfer's counters (from `$applied`) in
/// `$tx`, after the batch before committed; returns from the sink when the transfer was
/// cancelled or failed meanwhile (the batch rolls back and the pull stops).
macro_rules! checkpoint {
    ($store:expr, $plan:expr, $tx:expr, $applied:expr, $previous:expr) => {
        super::committed($previous.take()).await?;
        sqlx::query(super::CHECKPOINT_UPSERT)
            .bind($plan.connection_id)
            .bind($plan.checkpoint)
            .bind($plan.batch_of.map(|b| b.transfer_id))
            .bind(&$plan.last_key_json)
            .bind($plan.count)
            .bind($plan.now)
            .execute(&mut *$tx)
            .await?;
        if let Some(batch) = $plan.batch_of {
            let moved = sqlx::query(crate::transfer::PROGRESS_UPDATE)
                .bind(batch.transfer_id)
                .bind($plan.count)
                .bind($applied.created)
                .bind($applied.updated)
                .bind($applied.skipped)
                .bind(0_i64)
                .bind(batch.bytes_wire)
                .bind(0_i64)
                .bind(&$plan.last_key_json)
                .execute(&mut *$tx)
                .await?
                .rows_affected();
            if moved == 0 {
                return Err($store
                    .illegal_transfer(batch.transfer_id, "record progress on")
                    .await);
            }
        }
    };
}

/// The statement-by-statement path, on either engine: in one transaction, the mirror's keys
/// (when staged), then per chunk of rows an existence count (for the created/updated split)
/// and a multi-row `INSERT ... ON CONFLICT`, then the checkpoint. Evaluates to the
/// [`Applied`] counts.
macro_rules! statements {
    ($store:expr, $plan:expr, $pool:expr, $bind:ident, $rows:expr, $previous:expr) => {{
        use super::bind::{existing_query, insert_query};
        let plan = &$plan;
        let rows: &[Vec<dbsync_protocol::Value>] = $rows;
        let mut applied = super::Applied::default();
        let mut tx = $pool.begin().await?;
        if let Some(mirror) = &plan.mirror {
            sqlx::query(sqlx::AssertSqlSafe(mirror.create.clone()))
                .execute(&mut *tx)
                .await?;
            let keys = plan.keys(rows);
            for chunk in keys.chunks((super::plan::MAX_PARAMS / plan.key_list.len()).max(1)) {
                let (sql, params) = insert_query(
                    plan.engine,
                    &mirror.stage,
                    &plan.key_list,
                    &mirror.key_casts,
                    chunk,
                    &plan.key_conflict,
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for value in params {
                    query = $bind(query, value, plan.engine)?;
                }
                query.execute(&mut *tx).await?;
            }
        }
        for chunk in
            rows.chunks(plan.per_statement)
                .take(if plan.keys_only { 0 } else { usize::MAX })
        {
            let existing = if plan.strategy == crate::connection::ConflictStrategy::Append {
                0
            } else {
                // A composite key is an OR of terms: keep each statement's expression well
                // under SQLite's depth limit of 1,000.
                let lookup = if plan.key_list.len() == 1 {
                    chunk.len()
                } else {
                    super::EXISTING_OR_TERMS
                };
                let mut existing = 0;
                for part in chunk.chunks(lookup.max(1)) {
                    let (sql, params) = existing_query(
                        plan.engine,
                        &plan.table,
                        &plan.key_list,
                        &plan.key_positions,
                        &plan.casts,
                        part,
                    );
                    let mut query = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
                    for value in params {
                        query = $bind(query, value, plan.engine)?;
                    }
                    existing += query.fetch_one(&mut *tx).await?;
                }
                existing
            };
            let (sql, params) = insert_query(
                plan.engine,
                &plan.table,
                &plan.quoted,
                &plan.casts,
                chunk,
                &plan.conflict,
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for value in params {
                query = $bind(query, value, plan.engine)?;
            }
            query.execute(&mut *tx).await?;
            let n = chunk.len() as i64;
            applied.created += n - existing;
            if plan.strategy == crate::connection::ConflictStrategy::Skip {
                applied.skipped += existing;
            } else {
                applied.updated += existing;
            }
        }
        if !plan.keys_only {
            checkpoint!($store, plan, tx, applied, $previous);
        }
        tx.commit().await?;
        applied
    }};
}

mod bind;
mod columns;
mod mirror;
mod plan;
mod postgres;
mod sqlite;
mod stage;
mod types;

pub use crate::batch::Rows;
pub use bind::pg_text;
pub(crate) use bind::sqlite_arg as stored_form;
pub use mirror::mirror_table;
pub use stage::{Swapped, stage_table};
pub use types::target_type;

/// One batch for a table: whose, which transfer's, its rows, and how they go in.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The connection whose checkpoint the batch moves.
    pub connection_id: Uuid,
    /// The transfer whose counters it moves, if any.
    pub batch_of: Option<BatchOf>,
    /// The table (as the sender described it).
    pub schema: &'a TableSchema,
    /// The rows' columns, in order.
    pub columns: &'a [String],
    /// The rows.
    pub rows: Rows<'a>,
    /// What happens to a row whose key is already here.
    pub strategy: ConflictStrategy,
    /// The key of the batch's last row: where the checkpoint moves.
    pub last_key: Option<&'a [Value]>,
    /// Where the rows go instead of `schema.name`: a table of the store's own with the same
    /// columns (the stage of a whole-table pull, [`Store::open_stage`]). Never a peer's name.
    pub into: Option<&'a str>,
    /// The checkpoint the batch moves when not the table's own: a part of a parallel pull
    /// ([`part_checkpoint`]).
    pub checkpoint: Option<&'a str>,
    /// Every row is known to have changed since it was last pulled (an incremental pass: its
    /// cursor moved), so no lookup first for rows stored exactly as sent.
    pub changed: bool,
}

/// The name of the checkpoint of part `index` (from 0) of `parts` of a parallel pull of
/// `table`. It holds a control character no table name this site pulls has (see
/// `catalog::is_internal_table`), so it never meets a table's own checkpoint.
pub fn part_checkpoint(table: &str, index: usize, parts: usize) -> String {
    format!("{table}\u{1}part {}/{parts}", index + 1)
}

/// The prefix every part checkpoint of `table` starts with.
pub(crate) fn part_checkpoint_prefix(table: &str) -> String {
    format!("{table}\u{1}part ")
}

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

/// The type `column` of `schema` gets here; a refusal names the table, the column and the type.
fn column_type(
    engine: crate::store::Engine,
    schema: &TableSchema,
    column: &dbsync_protocol::message::ColumnInfo,
) -> Result<String> {
    target_type(engine, schema, &column.native_type, &column.neutral_type).map_err(|err| {
        Error::invalid(
            "column type",
            format!(
                "table {:?}, column {:?} ({} on the sender): {}",
                schema.name,
                column.name,
                column.native_type,
                match &err {
                    Error::Invalid { reason, .. } => reason.clone(),
                    other => other.to_string(),
                }
            ),
        )
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
    /// naming the missing columns), or with `add_columns` adds the missing ones (nullable) after
    /// checking that every column both sides have is of the same type (same engine). Returns
    /// whether the table was created.
    pub async fn ensure_table(
        &self,
        schema: &TableSchema,
        columns: &[String],
        add_columns: bool,
    ) -> Result<bool> {
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
                if add_columns {
                    self.add_missing_columns(schema, &existing, &missing)
                        .await?;
                    return Ok(false);
                }
                if missing.is_empty() {
                    Ok(false)
                } else {
                    Err(Error::invalid(
                        "schema",
                        format!(
                            "table {:?} here lacks the columns {} (--add-columns adds them)",
                            schema.name,
                            missing.join(", ")
                        ),
                    ))
                }
            }
            Err(Error::NotFound { .. }) => {
                // Its schema, and the extensions and user types its columns use, first
                // (PostgreSQL).
                if self.engine() == crate::store::Engine::Postgres
                    && let Some(namespace) = crate::catalog::table_schema(&schema.name)
                {
                    self.run_ddl(format!(
                        "CREATE SCHEMA IF NOT EXISTS {}",
                        quote_ident(namespace)?
                    ))
                    .await?;
                }
                self.prepare_postgres_types(schema).await?;
                let collations = self.known_collations(schema).await?;
                let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
                let create = |generated: bool| -> Result<String> {
                    let mut definitions = Vec::new();
                    for column in schema.columns.iter().filter(|c| columns.contains(&c.name)) {
                        let ty = column_type(self.engine(), schema, column)?;
                        let not_null = if column.nullable { "" } else { " NOT NULL" };
                        // Identity and generated columns are made with the table; defaults
                        // once its rows are in (`Store::complete_schema`).
                        let extra = match (self.pool(), &schema.postgres) {
                            (Pool::Postgres(_), Some(extras)) => {
                                let identity = extras
                                    .sequences
                                    .iter()
                                    .find(|s| s.column == column.name)
                                    .map(crate::pg_schema::identity_clause)
                                    .transpose()?
                                    .flatten();
                                let computed = extras
                                    .generated
                                    .iter()
                                    .find(|g| g.column == column.name && generated)
                                    .and_then(|g| {
                                        crate::pg_schema::checked_expression(&g.expression)
                                            .inspect_err(|refusal| tracing::warn!(table = %schema.name, column = %column.name, %refusal, "generated column made as a plain one"))
                                            .ok()
                                    })
                                    .map(|e| format!(" GENERATED ALWAYS AS ({e}) STORED"));
                                let collate = extras
                                    .collations
                                    .iter()
                                    .find(|(c, name)| {
                                        c == &column.name && collations.contains(name)
                                    })
                                    .map(|(_, name)| {
                                        quote_ident(name).map(|n| format!(" COLLATE {n}"))
                                    })
                                    .transpose()?
                                    .unwrap_or_default();
                                format!("{collate}{}", identity.or(computed).unwrap_or_default())
                            }
                            _ => String::new(),
                        };
                        definitions.push(format!(
                            "{} {ty}{not_null}{extra}",
                            quote_ident(&column.name)?
                        ));
                    }
                    if !schema.primary_key.is_empty() {
                        let key = schema
                            .primary_key
                            .iter()
                            .map(|k| quote_ident(k))
                            .collect::<Result<Vec<_>>>()?;
                        definitions.push(format!("PRIMARY KEY ({})", key.join(", ")));
                    }
                    Ok(format!("CREATE TABLE {table} ({})", definitions.join(", ")))
                };
                let generated = schema
                    .postgres
                    .as_ref()
                    .is_some_and(|extras| !extras.generated.is_empty());
                if let Err(err) = self.run_ddl(create(true)?).await {
                    // A generated column's expression this database cannot take (a function
                    // it lacks): the table is made with plain columns, their values copied.
                    if !generated {
                        return Err(err);
                    }
                    tracing::warn!(table = %schema.name, error = %err, "generated columns made as plain ones");
                    self.run_ddl(create(false)?).await?;
                }
                self.add_serial_sequences(schema).await?;
                tracing::info!(table = %schema.name, "created table from the sender's schema");
                Ok(true)
            }
            Err(err) => Err(err),
        }
    }

    /// Adds `missing` (columns of `schema`) to the existing table `existing`, after checking
    /// that the columns both have are of the same type when both are on one engine.
    async fn add_missing_columns(
        &self,
        schema: &TableSchema,
        existing: &TableSchema,
        missing: &[&str],
    ) -> Result<()> {
        if existing.engine == schema.engine {
            for column in &schema.columns {
                if let Some(here) = existing.columns.iter().find(|c| c.name == column.name)
                    && here.native_type != column.native_type
                {
                    return Err(Error::invalid(
                        "schema",
                        format!(
                            "column {:?} of {:?} is {} here and {} on the sender; \
                             dbsync adds columns but does not change a column's type",
                            column.name, schema.name, here.native_type, column.native_type
                        ),
                    ));
                }
            }
        }
        let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
        for name in missing {
            let Some(column) = schema.columns.iter().find(|c| c.name == *name) else {
                continue;
            };
            let ty = column_type(self.engine(), schema, column)?;
            let sql = format!(
                "ALTER TABLE {table} ADD COLUMN {} {ty}",
                quote_ident(&column.name)?
            );
            self.run_ddl(sql).await?;
            tracing::info!(table = %schema.name, column = %column.name, "added a column the sender declares");
        }
        locked(&self.described).remove(&schema.name);
        Ok(())
    }

    /// Runs one statement the sink built (a `CREATE TABLE`, an `ALTER TABLE ... ADD COLUMN`).
    async fn run_ddl(&self, sql: String) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(pool)
                .await?;
        });
        Ok(())
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

    /// Applies `batch` to its table with its strategy, and moves the connection's checkpoint
    /// for the table to its last key (and the progress of its transfer, when given), in one
    /// transaction.
    pub async fn apply_batch(&self, batch: Batch<'_>) -> Result<Applied> {
        self.apply_batch_after(None, batch).await
    }

    /// [`Store::apply_batch`] for a batch applied while the one before it may still be going
    /// in (on another connection): its rows go in at once, but its checkpoint waits until
    /// `previous` says the batch before committed, so batches commit in order and a crash never
    /// leaves a later batch applied behind an earlier one (on SQLite, and on PostgreSQL paths
    /// other than the column-wise one, the whole batch waits). `previous` saying `false` (or
    /// dropped) fails this batch too; `None` is [`Store::apply_batch`].
    pub async fn apply_batch_after(
        &self,
        previous: Option<Gate>,
        batch: Batch<'_>,
    ) -> Result<Applied> {
        self.apply(batch, false, previous).await
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
        let batch = Batch {
            into: None,
            checkpoint: None,
            changed: false,
            connection_id,
            batch_of: None,
            schema,
            columns,
            rows: Rows::Values(rows),
            strategy: ConflictStrategy::Mirror,
            last_key: None,
        };
        self.apply(batch, true, None).await.map(drop)
    }

    /// Hands the batch to this store's engine.
    async fn apply(
        &self,
        batch: Batch<'_>,
        keys_only: bool,
        previous: Option<Gate>,
    ) -> Result<Applied> {
        refuse_reserved(&batch.schema.name)?;
        match self.pool() {
            Pool::Postgres(pool) => {
                postgres::PgSink(pool)
                    .apply(self, batch, keys_only, previous)
                    .await
            }
            Pool::Sqlite(pool) => {
                sqlite::SqliteSink(pool)
                    .apply(self, batch, keys_only, previous)
                    .await
            }
        }
    }
}

/// What one engine does for a sink: apply a batch (its rows, the mirror's key stage, the
/// checkpoint, all in one transaction) the way that engine takes rows fastest.
trait EngineSink {
    /// Applies `batch`; stages its keys only (no rows, no checkpoint) when `keys_only`. Its
    /// checkpoint waits for `previous` to say the batch before committed.
    async fn apply(
        &self,
        store: &Store,
        batch: Batch<'_>,
        keys_only: bool,
        previous: Option<Gate>,
    ) -> Result<Applied>;
}

/// One of the store's memos, locked: the tables (quoted names) whose batches met existing keys
/// (their next batches skip the plain-insert attempt), or the target tables described this pull.
/// A poisoned lock still holds a usable memo.
fn locked<T>(memo: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    memo.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Store {
    /// Deletes the rows of `schema.name` (a table here) with these keys, in one transaction;
    /// returns how many went. For `verify --repair`: rows this site has and the sender does not.
    pub async fn delete_keys(&self, schema: &TableSchema, keys: &[Vec<Value>]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let engine = self.engine();
        let table = crate::catalog::quote_table(engine, &schema.name)?;
        let key_list: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| quote_ident(k))
            .collect::<Result<_>>()?;
        let casts: Vec<String> = schema
            .primary_key
            .iter()
            .map(|k| {
                schema
                    .columns
                    .iter()
                    .find(|c| &c.name == k)
                    .filter(|_| engine == crate::store::Engine::Postgres)
                    .map(|c| c.native_type.clone())
                    .unwrap_or_default()
            })
            .collect();
        let positions: Vec<usize> = (0..key_list.len()).collect();
        let per_statement = (plan::MAX_PARAMS / key_list.len().max(1)).max(1);
        let statements: Vec<(String, Vec<&Value>)> = keys
            .chunks(per_statement)
            .map(|chunk| {
                let (sql, params) =
                    bind::existing_query(engine, &table, &key_list, &positions, &casts, chunk);
                let sql = sql.replacen(
                    &format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}"),
                    &format!("DELETE FROM {table}"),
                    1,
                );
                (sql, params)
            })
            .collect();
        macro_rules! run {
            ($pool:expr, $bind:path) => {{
                let mut deleted = 0;
                let mut tx = $pool.begin().await?;
                for (sql, params) in statements {
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for value in params {
                        query = $bind(query, value, engine)?;
                    }
                    deleted += query.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                deleted
            }};
        }
        Ok(match self.pool() {
            crate::store::Pool::Postgres(pool) => run!(pool, bind::bind_pg),
            crate::store::Pool::Sqlite(pool) => run!(pool, bind::bind_sqlite),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbsync_protocol::message::ColumnInfo;

    #[test]
    fn a_column_that_cannot_map_is_named_with_its_table_and_type() {
        let column = ColumnInfo {
            name: "doc".into(),
            native_type: "tsvector".into(),
            neutral_type: "unsupported:tsvector".into(),
            nullable: true,
        };
        let schema = TableSchema {
            name: "pages".into(),
            engine: "postgres".into(),
            columns: vec![column.clone()],
            primary_key: vec![],
            postgres: None,
        };
        let err = column_type(crate::store::Engine::Sqlite, &schema, &column)
            .unwrap_err()
            .to_string();
        for part in ["\"pages\"", "\"doc\"", "tsvector"] {
            assert!(err.contains(part), "{part} in {err}");
        }
    }
}
