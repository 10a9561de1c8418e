//! A batch planned for its target: quoted names, key positions, the casts PostgreSQL needs, the
//! conflict clause of the strategy, the mirror's key stage, and the bookkeeping values its
//! checkpoint writes. Engine-neutral but for the SQL dialect; each engine's sink runs it.

use dbsync_protocol::Value;
use dbsync_protocol::message::TableSchema;
use uuid::Uuid;

use super::{Batch, BatchOf, mirror_table};
use crate::catalog::quote_ident;
use crate::clock::to_micros;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::store::{Engine, Store};

/// The staging table of a mirror pull's keys (see [`Store::finish_mirror`]).
pub(super) struct MirrorStage {
    /// Its quoted name.
    pub stage: String,
    /// The target's types of the key columns.
    pub key_casts: Vec<String>,
    /// Creates it when missing.
    pub create: String,
}

/// One batch, ready for an engine's sink.
pub(super) struct Plan<'a> {
    pub engine: Engine,
    pub connection_id: Uuid,
    pub batch_of: Option<BatchOf>,
    pub schema: &'a TableSchema,
    /// The checkpoint the batch moves (the table's own, or a part's).
    pub checkpoint: &'a str,
    /// Every row changed since it was last pulled ([`Batch::changed`]).
    pub changed: bool,
    pub columns: &'a [String],
    pub strategy: ConflictStrategy,
    /// Stage the keys only (a mirror's reconciliation pass); no row changes, no checkpoint.
    pub keys_only: bool,
    /// Rows in the batch.
    pub count: i64,
    /// The target table, quoted.
    pub table: String,
    /// The batch's columns, quoted.
    pub quoted: Vec<String>,
    /// The key's columns, quoted.
    pub key_list: Vec<String>,
    /// Where each key column is in a row.
    pub key_positions: Vec<usize>,
    /// The target's type of each column (PostgreSQL, and a mirror's key stage), else empty.
    pub casts: Vec<String>,
    /// The strategy's `ON CONFLICT` clause (empty for append).
    pub conflict: String,
    /// `ON CONFLICT (key) DO NOTHING`, for the key stage.
    pub key_conflict: String,
    pub mirror: Option<MirrorStage>,
    /// Rows per statement on the statement-by-statement path.
    pub per_statement: usize,
    /// When the checkpoint moved (bookkeeping only; the wall clock is right here).
    pub now: chrono::DateTime<chrono::Utc>,
    /// The checkpoint's key, as stored.
    pub last_key_json: Option<sqlx::types::Json<serde_json::Value>>,
}

/// Most bind parameters in one statement (below SQLite's 32766 and PostgreSQL's 65535).
pub(super) const MAX_PARAMS: usize = 30_000;

impl<'a> Plan<'a> {
    /// Plans `batch` for `engine`; the target's column types are read (once a pull) when the
    /// engine needs them for casts or the strategy for its key stage.
    pub(super) async fn new(
        store: &Store,
        engine: Engine,
        batch: &Batch<'a>,
        keys_only: bool,
    ) -> Result<Plan<'a>> {
        let Batch {
            connection_id,
            batch_of,
            schema,
            columns,
            rows,
            strategy,
            last_key,
            into,
            checkpoint,
            changed,
        } = *batch;
        let table = match into {
            Some(stage) => quote_ident(stage)?,
            None => crate::catalog::quote_table(engine, &schema.name)?,
        };
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
        let casts: Vec<String> =
            if engine == Engine::Postgres || strategy == ConflictStrategy::Mirror {
                let target = store.described_table(&schema.name).await?;
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
        let table_ref = match into {
            Some(stage) => quote_ident(stage)?,
            None => crate::catalog::table_ref(engine, &schema.name)?,
        };
        let conflict = conflict_clause(
            engine, strategy, &table_ref, &quoted, columns, key, &key_list,
        );
        let last_key_json = last_key
            .map(serde_json::to_value)
            .transpose()
            .map_err(|err| Error::invalid("last key", err.to_string()))?
            .map(sqlx::types::Json);
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
            Some(MirrorStage {
                stage,
                key_casts,
                create,
            })
        } else {
            None
        };
        Ok(Plan {
            engine,
            connection_id,
            batch_of,
            schema,
            checkpoint: checkpoint.unwrap_or(&schema.name),
            changed,
            columns,
            strategy,
            keys_only,
            count: rows.len() as i64,
            key_conflict: format!(" ON CONFLICT ({}) DO NOTHING", key_list.join(", ")),
            per_statement: (MAX_PARAMS / columns.len().max(1)).max(1),
            now: to_micros(chrono::Utc::now()),
            table,
            quoted,
            key_list,
            key_positions,
            casts,
            conflict,
            mirror,
            last_key_json,
        })
    }

    /// The key of each row, for the mirror's key stage.
    pub(super) fn keys(&self, rows: &[Vec<Value>]) -> Vec<Vec<Value>> {
        rows.iter()
            .map(|row| self.key_positions.iter().map(|p| row[*p].clone()).collect())
            .collect()
    }
}

/// The `ON CONFLICT` clause of `strategy`.
fn conflict_clause(
    engine: Engine,
    strategy: ConflictStrategy,
    table: &str,
    quoted: &[String],
    columns: &[String],
    key: &[String],
    key_list: &[String],
) -> String {
    match strategy {
        // A whole-table pull's rows go into its stage as they come.
        ConflictStrategy::Append | ConflictStrategy::Replace => String::new(),
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
                // bytes, so `1.0` against `1.00`, or a case change under citext, still counts
                // as a change. (When the pull leaves columns out, `excluded` holds their
                // defaults, so every row differs here; the lock-free lookup before it in
                // `insert_columns` compares the pulled columns only.)
                let unchanged = if engine == Engine::Postgres && strategy != ConflictStrategy::Merge
                {
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
    }
}
