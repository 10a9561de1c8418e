//! Sources: rows of a synced table as engine-neutral values, one keyset page at a time in key
//! order (never OFFSET), so a reader holds one page whatever the table size.
//!
//! PostgreSQL values are decoded from the binary wire format, exactly ([`pg_binary`]). SQLite
//! values keep their storage class (integer, real, text, blob), so SQLite → SQLite is exact.

pub mod pg_binary;

use chrono::{DateTime, NaiveDate, Utc};
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, MAX_FILTER_KEYS, TableSchema};
use sqlx::{Row, ValueRef};

use crate::catalog::keyset_query_filtered;
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

/// One page of rows and where the next page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Rows, each with the requested columns in order.
    pub rows: Vec<Vec<Value>>,
    /// Key of the last row (to pass as `after` for the next page), if any row was read.
    pub last_key: Option<Vec<Value>>,
}

impl Store {
    /// Reads up to `limit` rows of `schema.name` after `after` (a previous page's last key), in
    /// primary-key order. `columns` are the columns to return; the key columns must be among
    /// them.
    pub async fn read_page(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        limit: i64,
    ) -> Result<Page> {
        self.read_page_filtered(schema, columns, after, None, limit)
            .await
    }

    /// [`Store::read_page`] restricted to the keys `filter` lets through.
    pub async fn read_page_filtered(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        filter: Option<&KeyFilter>,
        limit: i64,
    ) -> Result<Page> {
        let filter_keys: Vec<&[Value]> = match filter {
            None => Vec::new(),
            Some(KeyFilter::Range { from, to }) => {
                from.iter().chain(to.iter()).map(Vec::as_slice).collect()
            }
            Some(KeyFilter::Keys(keys)) => {
                if keys.len() > MAX_FILTER_KEYS {
                    return Err(Error::invalid(
                        "key filter",
                        format!("at most {MAX_FILTER_KEYS} keys may be listed"),
                    ));
                }
                keys.iter().map(Vec::as_slice).collect()
            }
        };
        for key in after.iter().chain(filter_keys.iter()) {
            if key.len() != schema.primary_key.len() {
                return Err(Error::invalid(
                    "key",
                    format!(
                        "{:?} has a key of {} column(s); got {} value(s)",
                        schema.name,
                        schema.primary_key.len(),
                        key.len()
                    ),
                ));
            }
        }
        let key_positions: Vec<usize> = schema
            .primary_key
            .iter()
            .map(|k| {
                columns.iter().position(|c| c == k).ok_or_else(|| {
                    Error::invalid("columns", format!("key column {k:?} cannot be excluded"))
                })
            })
            .collect::<Result<_>>()?;
        let neutral: Vec<&str> = columns
            .iter()
            .map(|c| {
                schema
                    .columns
                    .iter()
                    .find(|col| &col.name == c)
                    .map(|col| col.neutral_type.as_str())
                    .ok_or_else(|| {
                        Error::invalid("columns", format!("{:?} has no column {c:?}", schema.name))
                    })
            })
            .collect::<Result<_>>()?;
        let sql = sqlx::AssertSqlSafe(keyset_query_filtered(
            &schema.name,
            columns,
            &schema.primary_key,
            after.is_some(),
            filter,
        )?);
        let rows = match self.pool() {
            Pool::Postgres(pool) => {
                let mut query = sqlx::query(sql);
                for key in after.iter().chain(filter_keys.iter()) {
                    for (value, position) in key.iter().zip(&key_positions) {
                        query = bind_postgres(query, value, neutral[*position])?;
                    }
                }
                let fetched = query.bind(limit).fetch_all(pool).await?;
                let decoders: Vec<pg_binary::Decoder> =
                    neutral.iter().map(|n| pg_binary::Decoder::of(n)).collect();
                fetched
                    .iter()
                    .map(|row| {
                        (0..columns.len())
                            .map(|i| {
                                let raw = row.try_get_raw(i)?;
                                if raw.is_null() {
                                    Ok(Value::Null)
                                } else {
                                    let bytes = raw
                                        .as_bytes()
                                        .map_err(|e| Error::invalid("value", e.to_string()))?;
                                    decoders[i].decode(bytes)
                                }
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Pool::Sqlite(pool) => {
                // Read on the raw handle: sqlx hands each row over from its worker thread.
                let mut params = Vec::new();
                for value in after.iter().chain(filter_keys.iter()).copied().flatten() {
                    params.push(sqlite_key(value)?);
                }
                params.push(crate::sqlite_raw::Arg::Int(limit));
                let mut conn = pool.acquire().await?;
                crate::sqlite_raw::select_rows(&mut conn, &sql.0, &params, columns.len())
                    .await
                    .map_err(|err| match err {
                        crate::sqlite_raw::RawError::Sqlx(err) => err.into(),
                        other => {
                            Error::invalid("rows", format!("reading {:?}: {other}", schema.name))
                        }
                    })?
            }
        };
        let last_key = rows
            .last()
            .map(|row| key_positions.iter().map(|i| row[*i].clone()).collect());
        Ok(Page { rows, last_key })
    }
}

fn key_type_error(neutral: &str) -> Error {
    Error::invalid(
        "primary key",
        format!("a {neutral} key column cannot be paged by yet"),
    )
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn bind_postgres<'q>(query: PgQuery<'q>, value: &Value, neutral: &str) -> Result<PgQuery<'q>> {
    Ok(match (value, neutral) {
        (Value::Int(v), "int") => query.bind(*v),
        (Value::Text(v), "text") => query.bind(v.clone()),
        (Value::Uuid(v), "uuid") => query.bind(uuid::Uuid::from_bytes(*v)),
        (Value::Bytes(v), "bytes") => query.bind(v.clone()),
        (Value::Bool(v), "bool") => query.bind(*v),
        (Value::Date(days), "date") => {
            let date = NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| key_type_error("date"))?;
            query.bind(date)
        }
        (Value::TimestampTz(micros), "timestamptz") => query.bind(
            DateTime::<Utc>::from_timestamp_micros(*micros)
                .ok_or_else(|| key_type_error("timestamptz"))?,
        ),
        (Value::Timestamp(micros), "timestamp") => query.bind(
            DateTime::<Utc>::from_timestamp_micros(*micros)
                .ok_or_else(|| key_type_error("timestamp"))?
                .naive_utc(),
        ),
        _ => return Err(key_type_error(neutral)),
    })
}

/// A SQLite key value as bound: integers, reals, text and blobs keep their storage class.
fn sqlite_key(value: &Value) -> Result<crate::sqlite_raw::Arg<'_>> {
    use crate::sqlite_raw::Arg;
    Ok(match value {
        Value::Int(v) => Arg::Int(*v),
        Value::Float(v) => Arg::Float(*v),
        Value::Text(v) => Arg::Text(v.as_str().into()),
        Value::Bytes(v) => Arg::Blob(v),
        other => return Err(key_type_error(&format!("{other:?}"))),
    })
}
