//! Key ranges of a PostgreSQL table hashed inside the database (protocol 5): a range's row
//! count and hash in one statement, no row shipped; each row's key and hash when a range differs;
//! and where a range of so many rows ends. Both sides run the same statements over tables of
//! the same column types, so equal rows hash alike (see `catalog::pg_range_hash_query`).

use dbsync_protocol::Value;
use dbsync_protocol::message::{BucketHashes, Mark, TableSchema};
use futures_util::TryStreamExt;
use sqlx::Row;

use super::{KeyArray, bind_postgres, pg_binary, postgres_value};
use crate::catalog::{
    HashShape, KeyBounds, pg_key_cast, pg_range_hash_query, pg_read_cast, quote_table_on,
};
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

/// Session settings every range hash runs under, so a column hashed in its text form reads the
/// same on both sides whatever each server's defaults.
const FIXED_SETTINGS: &str = "SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; \
     SET LOCAL TimeZone = 'UTC'; SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'";

/// Working memory for grouping a range's rows in buckets: room for up to `MAX_BUCKETS`
/// buckets (about 9 MiB at the most), which the default 4 MiB would spill to disk.
const BUCKET_MEMORY: &str = "SET LOCAL work_mem = '16MB'";

/// Pages of some buckets' rows are read along the key's index, stopping at the limit: without
/// it the planner may read and sort the whole rest of the range for every page.
const KEY_ORDER: &str = "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_sort = off";

/// Rows written since a mark are few and spread over the table: one scan of it, then a sort
/// of those, instead of every row visited along the key's index.
const WHOLE_TABLE: &str = "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off";

/// A mark's transaction number as PostgreSQL's 32-bit `xid` (what a row's `xmin` holds): its
/// low 32 bits, never one of the special numbers below 3.
fn xid32(xid: u64) -> i64 {
    i64::try_from(xid & 0xffff_ffff).unwrap_or(0).max(3)
}

/// The mask that takes a key's hash to one of `count` buckets (a power of two).
fn bucket_mask(count: u32) -> i64 {
    i64::from(count.max(1)) - 1
}

/// A range's rows as keys and hashes, in key order.
#[derive(Debug, Default)]
pub struct RowHashes {
    /// Each row's key.
    pub keys: Vec<Vec<Value>>,
    /// Each row's hash, in the same order.
    pub hashes: Vec<[u8; 8]>,
}

/// The statement for one range of `schema`'s rows (after `after`, up to `upto`), hashing
/// `columns` in that order, and the key values to bind.
struct RangeQuery<'a> {
    sql: String,
    keys: Vec<&'a [Value]>,
    key_neutral: Vec<&'a str>,
}

impl<'a> RangeQuery<'a> {
    fn new(
        schema: &'a TableSchema,
        columns: &[String],
        after: Option<&'a [Value]>,
        upto: Option<&'a [Value]>,
        shape: HashShape,
    ) -> Result<Self> {
        if schema.engine != "postgres" {
            return Err(Error::invalid(
                "verification",
                "key ranges are hashed in the database only on PostgreSQL",
            ));
        }
        let column = |name: &str| {
            schema
                .columns
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| {
                    Error::invalid(
                        "columns",
                        format!("{:?} has no column {name:?}", schema.name),
                    )
                })
        };
        let hashed = columns
            .iter()
            .map(|name| column(name).map(|c| (c.name.as_str(), c.native_type.as_str())))
            .collect::<Result<Vec<_>>>()?;
        let key_columns = schema
            .primary_key
            .iter()
            .map(|k| column(k))
            .collect::<Result<Vec<_>>>()?;
        let key_reads: Vec<&str> = key_columns
            .iter()
            .map(|c| pg_read_cast(&c.native_type, &c.neutral_type))
            .collect();
        let key_casts = key_columns
            .iter()
            .map(|c| pg_key_cast(&c.native_type, &c.neutral_type))
            .collect::<Result<Vec<_>>>()?;
        let keys: Vec<&[Value]> = after.into_iter().chain(upto).collect();
        if keys.iter().any(|k| k.len() != key_columns.len()) {
            return Err(Error::invalid(
                "key",
                format!(
                    "{:?} has a key of {} column(s)",
                    schema.name,
                    key_columns.len()
                ),
            ));
        }
        let sql = pg_range_hash_query(
            &schema.name,
            &hashed,
            &schema.primary_key,
            &key_reads,
            &key_casts,
            KeyBounds {
                after: after.is_some(),
                above: false,
                at_most: upto.is_some(),
            },
            shape,
        )?;
        Ok(Self {
            sql,
            keys,
            key_neutral: key_columns
                .iter()
                .map(|c| c.neutral_type.as_str())
                .collect(),
        })
    }

    fn bound(
        &self,
        last: Option<i64>,
    ) -> Result<sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()));
        for key in &self.keys {
            for (value, neutral) in key.iter().zip(&self.key_neutral) {
                query = bind_postgres(query, value, neutral)?;
            }
        }
        Ok(match last {
            Some(n) => query.bind(n),
            None => query,
        })
    }

    /// The key a row of an `End` or `Last` query holds.
    fn key_of(&self, row: &sqlx::postgres::PgRow) -> Result<Vec<Value>> {
        self.key_decoders()
            .iter()
            .enumerate()
            .map(|(i, d)| postgres_value(row, i, d))
            .collect()
    }

    /// Rows of a `Rows`-like query (its key columns, then a hash) as keys and hashes.
    fn row_hashes(&self, fetched: &[sqlx::postgres::PgRow]) -> Result<RowHashes> {
        let decoders = self.key_decoders();
        let mut out = RowHashes {
            keys: Vec::with_capacity(fetched.len()),
            hashes: Vec::with_capacity(fetched.len()),
        };
        for row in fetched {
            out.keys.push(
                decoders
                    .iter()
                    .enumerate()
                    .map(|(i, d)| postgres_value(row, i, d))
                    .collect::<Result<_>>()?,
            );
            let hash: i64 = row.try_get(decoders.len())?;
            out.hashes.push(hash.to_be_bytes());
        }
        Ok(out)
    }

    fn key_decoders(&self) -> Vec<pg_binary::Decoder> {
        self.key_neutral
            .iter()
            .map(|n| pg_binary::Decoder::of(n))
            .collect()
    }
}

impl Store {
    fn postgres_pool(&self) -> Result<&sqlx::PgPool> {
        match self.pool() {
            Pool::Postgres(pool) => Ok(pool),
            Pool::Sqlite(_) => Err(Error::invalid(
                "verification",
                "key ranges are hashed in the database only on PostgreSQL",
            )),
        }
    }

    /// A transaction under [`FIXED_SETTINGS`] and `more` settings, set in one round trip.
    async fn hashing(
        &self,
        more: Option<&str>,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.postgres_pool()?.begin().await?;
        let settings = match more {
            Some(more) => format!("{FIXED_SETTINGS}; {more}"),
            None => FIXED_SETTINGS.to_owned(),
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(settings))
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// The row count and hash of `schema`'s rows after `after` and up to `upto` (either open),
    /// `columns` hashed in that order.
    pub async fn range_hash(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
    ) -> Result<(u64, [u8; 8])> {
        let query = RangeQuery::new(schema, columns, after, upto, HashShape::Summary)?;
        let mut tx = self.hashing(None).await?;
        let row = query.bound(None)?.fetch_one(&mut *tx).await?;
        tx.commit().await?;
        let rows: i64 = row.try_get(0)?;
        let hash: i64 = row.try_get(1)?;
        Ok((u64::try_from(rows).unwrap_or(0), hash.to_be_bytes()))
    }

    /// Each non-empty bucket of `schema`'s rows after `after` and up to `upto`, rows spread
    /// over `count` buckets (a power of two) by their key; `columns` hashed in that order.
    pub async fn range_buckets(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
        count: u32,
    ) -> Result<(u64, [u8; 8], BucketHashes)> {
        let query = RangeQuery::new(schema, columns, after, upto, HashShape::Buckets)?;
        let mut tx = self.hashing(Some(BUCKET_MEMORY)).await?;
        let mut out = BucketHashes::default();
        let (mut total, mut whole) = (0u64, [0u8; 8]);
        // Row by row as they come: up to `MAX_BUCKETS` rows, never all held as rows at once.
        let bound = query.bound(None)?.bind(bucket_mask(count));
        let mut fetched = bound.fetch(&mut *tx);
        while let Some(row) = fetched.try_next().await? {
            let row = &row;
            let id: i32 = row.try_get(0)?;
            let rows: i64 = row.try_get(1)?;
            let hash = row.try_get::<i64, _>(2)?.to_be_bytes();
            let rows = u64::try_from(rows).unwrap_or(0);
            out.ids.push(u32::try_from(id).unwrap_or(0));
            out.rows.push(rows);
            out.hashes.extend_from_slice(&hash);
            total += rows;
            for (w, h) in whole.iter_mut().zip(hash) {
                *w ^= h;
            }
        }
        drop(fetched);
        tx.commit().await?;
        Ok((total, whole, out))
    }

    /// Up to `limit` rows' keys and hashes after `after` and up to `upto`, in key order; with
    /// `buckets` (their count and a bitmap of the ones wanted, see
    /// `dbsync_protocol::message::Buckets`) only the rows of those buckets.
    pub async fn range_row_hashes(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
        buckets: Option<(u32, &[u8])>,
        limit: i64,
    ) -> Result<RowHashes> {
        let shape = match buckets {
            Some(_) => HashShape::BucketRows,
            None => HashShape::Rows,
        };
        let query = RangeQuery::new(schema, columns, after, upto, shape)?;
        let mut tx = self.hashing(buckets.map(|_| KEY_ORDER)).await?;
        let bound = match buckets {
            Some((count, only)) => query
                .bound(None)?
                .bind(bucket_mask(count))
                .bind(only)
                .bind(limit),
            None => query.bound(Some(limit))?,
        };
        let fetched = bound.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        query.row_hashes(&fetched)
    }

    /// Where `schema`'s table stands now (protocol 9): every row written from here on is
    /// written by a transaction numbered at or after the mark's; and what names the table in
    /// this cluster (its file's number changes when it is rewritten or truncated).
    pub async fn change_mark(&self, schema: &TableSchema) -> Result<Mark> {
        let table = quote_table_on("postgres", &schema.name)?;
        let (xid, name): (i64, String) = sqlx::query_as(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8, \
             (SELECT system_identifier FROM pg_control_system())::text || '/' || d.oid::text \
             || '/' || c.oid::text || '/' || coalesce(pg_relation_filenode(c.oid), 0)::text \
             FROM pg_class c, pg_database d \
             WHERE c.oid = $1::regclass AND d.datname = current_database()",
        )
        .bind(table)
        .fetch_one(self.postgres_pool()?)
        .await?;
        Ok(Mark {
            xid: u64::try_from(xid).unwrap_or(0),
            table: name,
        })
    }

    /// The row count of `schema`'s rows after `after` and up to `upto` and the XOR of their
    /// keys' bucket hashes: which keys the range holds, without reading the rest of a row.
    pub async fn range_keys_hash(
        &self,
        schema: &TableSchema,
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
    ) -> Result<(u64, [u8; 8])> {
        let query = RangeQuery::new(
            schema,
            &schema.primary_key,
            after,
            upto,
            HashShape::KeysSummary,
        )?;
        let row = query.bound(None)?.fetch_one(self.postgres_pool()?).await?;
        let rows: i64 = row.try_get(0)?;
        let hash: i64 = row.try_get(1)?;
        Ok((u64::try_from(rows).unwrap_or(0), hash.to_be_bytes()))
    }

    /// Up to `limit` rows' keys and hashes after `after` and up to `upto`, in key order, of
    /// the rows written at or after transaction `xid` (`written`) or of the others. The
    /// table is read whole rather than along its key (a few of its rows are wanted).
    #[allow(clippy::too_many_arguments)]
    pub async fn written_row_hashes(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
        xid: u64,
        written: bool,
        limit: i64,
    ) -> Result<RowHashes> {
        let query = RangeQuery::new(schema, columns, after, upto, HashShape::Written(written))?;
        let mut tx = self.hashing(Some(WHOLE_TABLE)).await?;
        let bound = query.bound(None)?.bind(xid32(xid)).bind(limit);
        let fetched = bound.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        query.row_hashes(&fetched)
    }

    /// The keys and hashes of the rows of listed `keys` (one value each, of a one-column key
    /// of an integer, text or UUID type) in key order; with `since`, only those written at or
    /// after its transaction (`true`) or only the others.
    pub async fn listed_row_hashes(
        &self,
        schema: &TableSchema,
        columns: &[String],
        keys: &[Vec<Value>],
        since: Option<(u64, bool)>,
    ) -> Result<RowHashes> {
        let array = KeyArray::of_key(schema).ok_or_else(|| {
            Error::invalid(
                "key",
                "listed keys are hashed for a one-column integer, text or UUID key only",
            )
        })?;
        let shape = HashShape::Listed(array.sql_type(), since.map(|(_, written)| written));
        let query = RangeQuery::new(schema, columns, None, None, shape)?;
        let mut tx = self.hashing(None).await?;
        let mut bound = array.bind(query.bound(None)?, keys)?;
        if let Some((xid, _)) = since {
            bound = bound.bind(xid32(xid));
        }
        let fetched = bound.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        query.row_hashes(&fetched)
    }

    /// The key of the table's last row after `after` (any when open), if it has one.
    pub async fn range_last(
        &self,
        schema: &TableSchema,
        after: Option<&[Value]>,
    ) -> Result<Option<Vec<Value>>> {
        let query = RangeQuery::new(schema, &schema.primary_key, after, None, HashShape::Last)?;
        let row = query
            .bound(None)?
            .fetch_optional(self.postgres_pool()?)
            .await?;
        row.map(|row| query.key_of(&row)).transpose()
    }

    /// The key `rows` rows after `after` (the `rows`-th key past it), if the table holds that
    /// many: where a range of `rows` rows starting after `after` ends.
    pub async fn range_end(
        &self,
        schema: &TableSchema,
        after: Option<&[Value]>,
        rows: u64,
    ) -> Result<Option<Vec<Value>>> {
        let query = RangeQuery::new(schema, &schema.primary_key, after, None, HashShape::End)?;
        let offset = i64::try_from(rows.saturating_sub(1)).unwrap_or(i64::MAX);
        let row = query
            .bound(Some(offset))?
            .fetch_optional(self.postgres_pool()?)
            .await?;
        row.map(|row| query.key_of(&row)).transpose()
    }
}
