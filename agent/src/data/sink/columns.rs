//! A batch into PostgreSQL as one array parameter per column (`unnest`), and the connection a
//! batch runs on: the path for tables that may already hold the batch's keys (`ON CONFLICT`), and
//! the fallback of `COPY`.

use std::borrow::{Borrow, Cow};

use chrono::{DateTime, NaiveDate};
use dbsync_protocol::Value;
use dbsync_protocol::columns::Scalar;
use dbsync_protocol::message::columnar::Kind;
use sqlx::Arguments;
use uuid::Uuid;

use super::bind::*;
use super::{Applied, COPY_CHUNK_ROWS, Rows, locked};
use crate::connection::ConflictStrategy;
use crate::error::Result;
use crate::pg_copy;

/// One column of a batch as a PostgreSQL array parameter: in binary form where every value's kind
/// matches the target column's type (nothing formatted here, nothing parsed on the server), else
/// as PostgreSQL text cast to the column's type (the same input functions `COPY` uses). Text
/// that arrives as text is borrowed from the batch, not copied.
pub(super) enum ColumnArray<'a> {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Uuid(Vec<Option<Uuid>>),
    TimestampTz(Vec<Option<DateTime<chrono::Utc>>>),
    Timestamp(Vec<Option<chrono::NaiveDateTime>>),
    Date(Vec<Option<NaiveDate>>),
    Bytes(Vec<Option<Vec<u8>>>),
    Text(Vec<Option<Cow<'a, str>>>),
}

/// Collects `values` with `convert`: `Ok(None)` when one value does not fit (give up), the
/// first error of `values` as it is.
pub(super) fn typed<V: Borrow<Value>, T>(
    values: impl Iterator<Item = Result<V>>,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<Option<T>>>> {
    let mut out = Vec::with_capacity(values.size_hint().0);
    for value in values {
        out.push(match value?.borrow() {
            Value::Null => None,
            other => match convert(other) {
                Some(converted) => Some(converted),
                None => return Ok(None),
            },
        });
    }
    Ok(Some(out))
}

impl<'a> ColumnArray<'a> {
    /// The column `values` for a target column of type `native_type` (text copied: the values
    /// may not outlive the array).
    pub(super) fn build<'v>(
        values: impl Iterator<Item = &'v Value> + Clone,
        native_type: &str,
    ) -> Result<Self> {
        match Self::binary(values.clone().map(Ok), native_type)? {
            Some(array) => Ok(array),
            None => values
                .map(|v| Ok(pg_text(v)?.map(Cow::Owned)))
                .collect::<Result<_>>()
                .map(Self::Text),
        }
    }

    /// [`Self::build`] from a column's values as read from the batch (`kind` theirs): no value
    /// is made for text, which is borrowed from the batch.
    pub(super) fn from_scalars(
        scalars: &[Scalar<'a>],
        kind: Kind,
        native_type: &str,
    ) -> Result<Self> {
        let value = |s: &Scalar<'a>| {
            s.value(kind)
                .map_err(|err| crate::Error::invalid("row batch", err.to_string()))
        };
        if let Some(array) = Self::binary(scalars.iter().map(value), native_type)? {
            return Ok(array);
        }
        // (Pushed one by one: collecting `Result`s would grow the vector as it goes.)
        let mut texts = Vec::with_capacity(scalars.len());
        for s in scalars {
            texts.push(match (kind, s) {
                (_, Scalar::Null) => None,
                (Kind::Text | Kind::Numeric | Kind::Json, Scalar::Str(bytes)) => {
                    Some(Cow::Borrowed(std::str::from_utf8(bytes).map_err(|_| {
                        crate::Error::invalid("row batch", "a string that is not UTF-8")
                    })?))
                }
                _ => pg_text(&value(s)?)?.map(Cow::Owned),
            });
        }
        Ok(Self::Text(texts))
    }

    /// The binary array of `values` for a target column of type `native_type`, if it has one
    /// and every value fits it.
    fn binary<V: Borrow<Value>>(
        values: impl Iterator<Item = Result<V>>,
        native_type: &str,
    ) -> Result<Option<Self>> {
        Ok(match native_type {
            "bigint" | "integer" | "smallint" => typed(values, |v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })?
            .map(Self::Int),
            "double precision" | "real" => typed(values, |v| match v {
                Value::Float(f) => Some(*f),
                _ => None,
            })?
            .map(Self::Float),
            "boolean" => typed(values, |v| match v {
                Value::Bool(b) => Some(*b),
                _ => None,
            })?
            .map(Self::Bool),
            "uuid" => typed(values, |v| match v {
                Value::Uuid(bytes) => Some(Uuid::from_bytes(*bytes)),
                _ => None,
            })?
            .map(Self::Uuid),
            // ±infinity (the extreme values) has no chrono form: such a column goes as text.
            "timestamp with time zone" => typed(values, |v| match v {
                Value::TimestampTz(micros) if *micros != i64::MAX && *micros != i64::MIN => {
                    DateTime::from_timestamp_micros(*micros)
                }
                _ => None,
            })?
            .map(Self::TimestampTz),
            "timestamp without time zone" => typed(values, |v| match v {
                Value::Timestamp(micros) if *micros != i64::MAX && *micros != i64::MIN => {
                    DateTime::from_timestamp_micros(*micros).map(|t| t.naive_utc())
                }
                _ => None,
            })?
            .map(Self::Timestamp),
            "date" => typed(values, |v| match v {
                Value::Date(days) if *days != i32::MAX && *days != i32::MIN => {
                    NaiveDate::from_num_days_from_ce_opt(days.checked_add(719_163)?)
                }
                _ => None,
            })?
            .map(Self::Date),
            "bytea" => typed(values, |v| match v {
                Value::Bytes(bytes) => Some(bytes.clone()),
                _ => None,
            })?
            .map(Self::Bytes),
            _ => None,
        })
    }

    /// The parameter's array type.
    pub(super) fn sql_type(&self) -> &'static str {
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
pub(super) struct ColumnTarget<'a> {
    pub(super) table: &'a str,
    pub(super) conflicting: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    pub(super) columns: &'a [String],
    pub(super) casts: &'a [String],
    pub(super) key: &'a [String],
    pub(super) key_stage: Option<&'a str>,
    /// Every row changed since it was last pulled: no lookup for unchanged rows first.
    pub(super) changed: bool,
}

/// A pooled PostgreSQL connection for one batch's transaction, closed instead of going back to
/// the pool when it is dropped in the middle of a `COPY` (a pull cancelled or killed mid-batch).
/// sqlx 0.9 does not count the server's reply to the `CopyFail` it sends for a `COPY` dropped
/// unfinished, nor to one it aborts after the server has already failed it, so the connection's
/// next user would read that reply as its own: a protocol error ("expected ParseComplete, got
/// ReadyForQuery") or, worse, another statement's result.
pub(super) struct BatchConnection {
    pub(super) conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// Set while the server may still owe replies to a `COPY` (see `insert_columns`).
    pub(super) copying: bool,
}

impl BatchConnection {
    pub(super) async fn acquire(pool: &sqlx::PgPool) -> Result<Self> {
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
    pub(super) async fn begin(
        &mut self,
    ) -> Result<(sqlx::Transaction<'_, sqlx::Postgres>, &mut bool)> {
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
pub(super) fn settled<T>(result: sqlx::Result<T>, copying: &mut bool) -> sqlx::Result<T> {
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
pub(super) async fn insert_columns(
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
    let n = rows.len();
    let arrays = column_arrays(rows, target.casts)?;
    upsert_arrays(tx, target, arrays, n, strategy, conflict, optimistic).await
}

/// One array parameter per column of `rows`, for the target's column types ([`Arrays`]).
pub(super) fn column_arrays<'a>(rows: Rows<'a>, casts: &[String]) -> Result<Vec<ColumnArray<'a>>> {
    Arrays::of(rows)?.take(rows.len(), casts)
}

/// Where a batch's array parameters come from, taken a run of rows at a time: read a column at a
/// time from the batch as received where every column is of one kind (only one column's values
/// of one run exist besides the arrays), else from the rows' values.
pub(super) enum Arrays<'a> {
    Cursors(Vec<dbsync_protocol::columns::Cursor<'a>>),
    Values {
        rows: std::borrow::Cow<'a, [Vec<Value>]>,
        next: usize,
    },
}

impl<'a> Arrays<'a> {
    pub(super) fn of(rows: Rows<'a>) -> Result<Self> {
        Ok(match rows.cursors() {
            Some(cursors) => Self::Cursors(cursors),
            None => Self::Values {
                rows: rows.values()?,
                next: 0,
            },
        })
    }

    /// The arrays of the next `count` rows.
    pub(super) fn take(&mut self, count: usize, casts: &[String]) -> Result<Vec<ColumnArray<'a>>> {
        match self {
            Self::Cursors(cursors) => {
                let mut scalars = Vec::with_capacity(count);
                cursors
                    .iter_mut()
                    .zip(casts)
                    .map(|(cursor, cast)| {
                        scalars.clear();
                        for _ in 0..count {
                            scalars.push(cursor.next_scalar().map_err(|err| {
                                crate::Error::invalid("row batch", err.to_string())
                            })?);
                        }
                        ColumnArray::from_scalars(&scalars, cursor.kind(), cast)
                    })
                    .collect()
            }
            Self::Values { rows, next } => {
                let end = (*next + count).min(rows.len());
                let run = &rows[*next..end];
                *next = end;
                casts
                    .iter()
                    .enumerate()
                    .map(|(i, cast)| ColumnArray::build(run.iter().map(|row| &row[i]), cast))
                    .collect()
            }
        }
    }
}

/// `n` rows, as one array per column ([`column_arrays`]), into the target by one
/// `INSERT ... SELECT FROM unnest(...)` with the strategy's `ON CONFLICT` (`optimistic`: tried
/// first without it, in a savepoint, while the table's batches meet no existing key).
pub(super) async fn upsert_arrays(
    tx: &mut sqlx::PgConnection,
    target: &ColumnTarget<'_>,
    arrays: Vec<ColumnArray<'_>>,
    n: usize,
    strategy: ConflictStrategy,
    conflict: &str,
    optimistic: bool,
) -> Result<Applied> {
    let conflicting = || locked(target.conflicting);
    let width = target.columns.len();
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
    ) && target.columns.len() > target.key.len()
        && !target.changed;
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
             moved AS (INSERT INTO {} ({columns}) OVERRIDING SYSTEM VALUE SELECT {columns} FROM src{filter}{conflict} RETURNING (xmax = 0) AS inserted) \
             SELECT CAST(COUNT(*) FILTER (WHERE inserted) AS BIGINT) FROM moved",
            projections.join(", "),
            parameters.join(", "),
            aliases.join(", "),
            target.table,
        )
    };
    // The arrays are encoded once and dropped: a batch's values are held as the statement's
    // encoded parameters only while it runs (on a re-pull, two batches in flight of two halves
    // each held both).
    let mut arguments = sqlx::postgres::PgArguments::default();
    for array in arrays {
        let added = match array {
            ColumnArray::Int(values) => arguments.add(values),
            ColumnArray::Float(values) => arguments.add(values),
            ColumnArray::Bool(values) => arguments.add(values),
            ColumnArray::Uuid(values) => arguments.add(values),
            ColumnArray::TimestampTz(values) => arguments.add(values),
            ColumnArray::Timestamp(values) => arguments.add(values),
            ColumnArray::Date(values) => arguments.add(values),
            ColumnArray::Bytes(values) => arguments.add(values),
            ColumnArray::Text(values) => arguments.add(values),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    let run = |sql: String, arguments: sqlx::postgres::PgArguments| {
        sqlx::query_scalar_with::<_, i64, _>(sqlx::AssertSqlSafe(sql), arguments)
    };
    // Where `COPY` cannot carry the batch (a column type with no binary form in `pg_copy`), a
    // plain INSERT, which costs the server about half an `ON CONFLICT` one, is tried first in the
    // same way (in a savepoint) while a table's batches meet no existing key. At an existing key it fails with a unique violation and the batch goes
    // again with the strategy's `ON CONFLICT`; later batches into that table go straight there
    // (a failed attempt costs about as much as it would have saved) until one creates every row.
    let created = if conflict.is_empty() {
        run(statement(""), arguments).fetch_one(&mut *tx).await?
    } else if !optimistic {
        let created = run(statement(conflict), arguments)
            .fetch_one(&mut *tx)
            .await?;
        if created == n as i64 {
            conflicting().remove(target.table);
        }
        created
    } else {
        sqlx::query("SAVEPOINT dbsync_plain_insert")
            .execute(&mut *tx)
            .await?;
        // Kept for a second try at an existing key.
        match run(statement(""), arguments.clone())
            .fetch_one(&mut *tx)
            .await
        {
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
                run(statement(conflict), arguments)
                    .fetch_one(&mut *tx)
                    .await?
            }
            Err(err) => return Err(err.into()),
        }
    };
    let n = n as i64;
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
