//! Sources: rows of a synced table as engine-neutral values, one keyset page at a time in key
//! order (never OFFSET), so a reader holds one page whatever the table size.
//!
//! PostgreSQL values are decoded from the binary wire format, exactly ([`pg_binary`]). SQLite
//! values keep their storage class (integer, real, text, blob), so SQLite → SQLite is exact.

mod copy_out;
pub mod pg_binary;
mod range_hash;
mod snapshot;

pub use range_hash::RowHashes;
pub use snapshot::Snapshot;

use chrono::{DateTime, NaiveDate, Utc};
use dbsync_protocol::Value;
use dbsync_protocol::message::columnar::{Column, ColumnsWriter};
use dbsync_protocol::message::{KeyFilter, MAX_FILTER_KEYS, TableSchema};
use futures_util::TryStreamExt;
use sqlx::{Row, ValueRef};

use crate::catalog::{Casts, KeyBounds, keyset_query_filtered, pg_key_cast, pg_read_cast};
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

/// Bounds a sender sets on a page besides the receiver's `after`: a floor (`key > above`) and a
/// ceiling (`key <= at_most`), keys it recorded itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window<'a> {
    /// Only keys above this one.
    pub above: Option<&'a [Value]>,
    /// Only keys up to this one.
    pub at_most: Option<&'a [Value]>,
}

/// Which rows a page may hold: after the receiver's key, inside the sender's window, and through
/// the receiver's key filter.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bounds<'a> {
    /// Only keys after this one (the last key of the page before).
    pub after: Option<&'a [Value]>,
    /// The sender's own floor and ceiling.
    pub window: Window<'a>,
    /// Only these keys.
    pub filter: Option<&'a KeyFilter>,
    /// Read from the pull's snapshot ([`Store::export_snapshot`]), not from the database as it
    /// is now.
    pub snapshot: Option<&'a PullSnapshot>,
}

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
        self.read_page_window(schema, columns, after, Window::default(), filter, limit)
            .await
    }

    /// Reads up to `limit` rows after `after` and up to `at_most` (both keys, either open), in
    /// key order: a range of this site's rows to set beside the sender's (verification).
    pub async fn read_page_between(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        at_most: Option<&[Value]>,
        limit: i64,
    ) -> Result<Page> {
        let window = Window {
            above: None,
            at_most,
        };
        self.read_page_window(schema, columns, after, window, None, limit)
            .await
    }

    async fn read_page_window(
        &self,
        schema: &TableSchema,
        columns: &[String],
        after: Option<&[Value]>,
        window: Window<'_>,
        filter: Option<&KeyFilter>,
        limit: i64,
    ) -> Result<Page> {
        let query = PageQuery::new(schema, columns, after, window, filter)?;
        let rows = match self.pool() {
            Pool::Postgres(pool) => {
                let fetched = query.postgres(limit)?.fetch_all(pool).await?;
                let decoders = query.decoders();
                fetched
                    .iter()
                    .map(|row| {
                        (0..columns.len())
                            .map(|i| postgres_value(row, i, &decoders[i]))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Pool::Sqlite(pool) => {
                let cells = query.select_sqlite(pool, schema, limit).await?;
                cells.to_rows().map_err(|err| sqlite_error(schema, err))?
            }
        };
        let last_key = rows.last().map(|row| {
            query
                .key_positions
                .iter()
                .map(|i| row[*i].clone())
                .collect()
        });
        Ok(Page { rows, last_key })
    }

    /// [`Store::read_page_filtered`] with the rows encoded for the wire as they are read, column
    /// by column, with no [`Value`] per cell (only the last row's key is decoded), behind `room`
    /// bytes left free for the fields a frame puts before them
    /// ([`dbsync_protocol::codec::row_batch_room`]); with `compact`, in the compact forms of a
    /// peer of [`dbsync_protocol::COMPACT_VERSION`] (integers as differences where that is
    /// smaller, UUIDs packed: [`Column::compact`]).
    pub async fn read_page_encoded(
        &self,
        schema: &TableSchema,
        columns: &[String],
        bounds: Bounds<'_>,
        limit: i64,
        room: usize,
        compact: bool,
    ) -> Result<EncodedPage> {
        let Bounds {
            after,
            window,
            filter,
            snapshot,
        } = bounds;
        let query = PageQuery::new(schema, columns, after, window, filter)?;
        let pool = match self.pool() {
            Pool::Postgres(pool) => pool,
            Pool::Sqlite(pool) => {
                let cells = match snapshot {
                    Some(PullSnapshot::Sqlite(held)) => {
                        let mut conn = held.lock().await;
                        query.select_sqlite_on(&mut conn, schema, limit).await?
                    }
                    _ => query.select_sqlite(pool, schema, limit).await?,
                };
                let last_key = match cells.rows() {
                    0 => None,
                    rows => Some(cells.values_at(rows - 1, &query.key_positions)),
                };
                return Ok(EncodedPage {
                    columns: cells
                        .encode(room, compact)
                        .map_err(|err| sqlite_error(schema, err))?,
                    room,
                    rows: cells.rows(),
                    last_key: last_key
                        .transpose()
                        .map_err(|err| sqlite_error(schema, err))?,
                });
            }
        };
        let decoders = query.decoders();
        let page = PageBuilder::new(&decoders, limit, compact);
        let snapshot = match snapshot {
            Some(PullSnapshot::Postgres(id)) => Some(id.as_str()),
            _ => None,
        };
        if let Some(statement) = query.copy(limit)? {
            return copy_out::read(pool, snapshot, &statement, page, &query.key_positions, room)
                .await;
        }
        let Some(snapshot) = snapshot else {
            let rows = query.postgres(limit)?.fetch(pool);
            return encode_pg_rows(rows, page, &query.key_positions, room).await;
        };
        let mut tx = pool.begin().await?;
        import_snapshot(&mut tx, snapshot).await?;
        let rows = query.postgres(limit)?.fetch(&mut *tx);
        let page = encode_pg_rows(rows, page, &query.key_positions, room).await?;
        tx.commit().await?;
        Ok(page)
    }

    /// Exports a snapshot of the database as it is now, for every table of one pull to be read
    /// from (`Bounds::snapshot`), held until the returned value is dropped. `None` on SQLite.
    pub async fn export_snapshot(&self) -> Result<Option<ExportedSnapshot>> {
        let pool = match self.pool() {
            Pool::Postgres(pool) => pool,
            Pool::Sqlite(pool) => {
                // One read transaction on a connection taken out of the pool (closed, not
                // handed back, when the pull ends), begun by its first read.
                let mut conn = pool.acquire().await?.detach();
                sqlx::raw_sql("BEGIN").execute(&mut conn).await?;
                sqlx::query("SELECT count(*) FROM sqlite_master")
                    .execute(&mut conn)
                    .await?;
                return Ok(Some(ExportedSnapshot {
                    held: PullSnapshot::Sqlite(std::sync::Arc::new(tokio::sync::Mutex::new(conn))),
                    _connection: None,
                }));
            }
        };
        // A connection of its own, outside the pool: sessions holding snapshots never leave
        // the pool without connections to read their pages with.
        let mut connection =
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&pool.connect_options()).await?;
        // Idle in its transaction for as long as the pull lasts: a server-wide idle timeout
        // would end it, and the snapshot with it.
        sqlx::raw_sql(
            "SET idle_in_transaction_session_timeout = 0; \
             BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        )
        .execute(&mut connection)
        .await?;
        let id: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut connection)
            .await?;
        Ok(Some(ExportedSnapshot {
            held: PullSnapshot::Postgres(id),
            _connection: Some(connection),
        }))
    }
}

/// The snapshot every table of one pull is read from ([`Store::export_snapshot`]), held until
/// dropped: on PostgreSQL an exported snapshot, whose exporting transaction this value holds
/// open on a connection of its own; on SQLite a read transaction on a connection of its own,
/// every page read through it.
pub struct ExportedSnapshot {
    held: PullSnapshot,
    _connection: Option<sqlx::PgConnection>,
}

impl ExportedSnapshot {
    /// What a page read needs to read from it (`Bounds::snapshot`).
    pub fn handle(&self) -> PullSnapshot {
        self.held.clone()
    }
}

impl std::fmt::Debug for ExportedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedSnapshot")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// A pull's snapshot as page reads use it.
#[derive(Clone)]
pub enum PullSnapshot {
    /// `SET TRANSACTION SNAPSHOT` this identifier.
    Postgres(String),
    /// Read on this connection, inside its read transaction.
    Sqlite(std::sync::Arc<tokio::sync::Mutex<sqlx::SqliteConnection>>),
}

impl std::fmt::Debug for PullSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Postgres(id) => write!(f, "Postgres({id})"),
            Self::Sqlite(_) => f.write_str("Sqlite(read transaction)"),
        }
    }
}

/// Makes the transaction `tx` (before its first query) read from the exported snapshot `id`.
async fn import_snapshot(conn: &mut sqlx::PgConnection, id: &str) -> Result<()> {
    // An identifier PostgreSQL printed (`00000003-0000001B-1`); checked before it goes into
    // the statement, which takes no parameter.
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::invalid("snapshot", "not a snapshot identifier"));
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{id}'"
    )))
    .execute(conn)
    .await?;
    Ok(())
}

/// Encodes PostgreSQL rows for the wire as they arrive ([`Store::read_page_encoded`]): each row
/// is written into its columns and dropped, so the page is held once, encoded, not also as
/// rows. The last row's values at `key_positions` are its key.
async fn encode_pg_rows<S>(
    mut rows: S,
    mut page: PageBuilder<'_>,
    key_positions: &[usize],
    room: usize,
) -> Result<EncodedPage>
where
    S: futures_util::Stream<Item = std::result::Result<sqlx::postgres::PgRow, sqlx::Error>> + Unpin,
{
    let mut last = None;
    while let Some(row) = rows.try_next().await? {
        for i in 0..page.width() {
            let raw = row.try_get_raw(i)?;
            if raw.is_null() {
                page.value(i, None)?;
            } else {
                let bytes = raw
                    .as_bytes()
                    .map_err(|e| Error::invalid("value", e.to_string()))?;
                page.value(i, Some(bytes))?;
            }
        }
        page.row_done();
        last = Some(row);
    }
    drop(rows);
    let last_key = last
        .map(|row| {
            key_positions
                .iter()
                .map(|i| postgres_value(&row, *i, &page.decoders[*i]))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    page.finish(room, last_key)
}

/// A PostgreSQL page's columns as its rows' binary values come in, one value at a time; with
/// `compact`, each column is kept for its compact form ([`Column::compact`]).
struct PageBuilder<'d> {
    decoders: &'d [pg_binary::Decoder],
    columns: Vec<Column>,
    numeric: String,
    limit: i64,
    rows: usize,
}

impl<'d> PageBuilder<'d> {
    fn new(decoders: &'d [pg_binary::Decoder], limit: i64, compact: bool) -> Self {
        let column = if compact {
            Column::compact
        } else {
            Column::new
        };
        Self {
            decoders,
            columns: decoders.iter().map(|d| column(d.kind())).collect(),
            numeric: String::new(),
            limit,
            rows: 0,
        }
    }

    /// Columns a row has.
    fn width(&self) -> usize {
        self.columns.len()
    }

    /// Rows written.
    fn rows(&self) -> usize {
        self.rows
    }

    /// Writes the value of column `i` of the row under way (`None`: null).
    fn value(&mut self, i: usize, bytes: Option<&[u8]>) -> Result<()> {
        let column = &mut self.columns[i];
        match bytes {
            None => {
                column.null();
                Ok(())
            }
            Some(bytes) => self.decoders[i].write(bytes, column, &mut self.numeric),
        }
    }

    /// Column `i`'s value `bytes` decoded.
    fn decode(&self, i: usize, bytes: &[u8]) -> Result<Value> {
        self.decoders[i].decode(bytes)
    }

    /// Ends the row under way.
    fn row_done(&mut self) {
        self.rows += 1;
        // Each column sized from the first row for the whole page, with a quarter to spare,
        // rather than grown (and copied) a dozen times; at most `COLUMN_RESERVE` bytes each (a
        // huge first value does not reserve a hundred times itself).
        if self.rows == 1 {
            let rows = usize::try_from(self.limit).unwrap_or(0);
            for column in &mut self.columns {
                let estimate = column
                    .encoded_len()
                    .max(1)
                    .saturating_mul(rows)
                    .saturating_mul(5)
                    / 4;
                column.reserve(estimate.min(COLUMN_RESERVE));
            }
        }
    }

    /// The page, behind `room` bytes, with its last row's key.
    fn finish(self, room: usize, last_key: Option<Vec<Value>>) -> Result<EncodedPage> {
        let invalid = |e: String| Error::invalid("rows", e);
        let count = self.columns.first().map_or(0, Column::len);
        let size = self.columns.iter().map(Column::encoded_len).sum::<usize>();
        let mut out = Vec::with_capacity(room + size + 16 * self.columns.len());
        out.resize(room, 0);
        let mut writer = ColumnsWriter::new(self.columns.len(), count, out);
        for column in self.columns {
            writer.push(&column).map_err(invalid)?;
        }
        Ok(EncodedPage {
            columns: writer.finish().map_err(invalid)?,
            room,
            rows: count,
            last_key,
        })
    }
}

/// Most bytes a page's column is sized for before its values need them (a sender's page aims at
/// 4 MiB in all).
const COLUMN_RESERVE: usize = 4 * 1024 * 1024;

/// One page of rows encoded for the wire ([`Store::read_page_encoded`]).
#[derive(Debug)]
pub struct EncodedPage {
    /// `room` free bytes, then the rows column by column: a row batch's `rows` field as it goes
    /// on the wire.
    pub columns: Vec<u8>,
    /// Free bytes before the rows.
    pub room: usize,
    /// How many rows.
    pub rows: usize,
    /// Key of the last row, if any row was read.
    pub last_key: Option<Vec<Value>>,
}

/// A keyset page's query and what reading its rows needs.
struct PageQuery<'a> {
    sql: String,
    /// The key values bound, in order: `after`, the window's floor and ceiling, then the
    /// filter's keys (unless `listed`).
    keys: Vec<&'a [Value]>,
    /// The filter's listed keys, bound after `keys` as one PostgreSQL array.
    listed: Option<(KeyArray, &'a [Vec<Value>])>,
    /// Where each key column is among the columns read.
    key_positions: Vec<usize>,
    /// Each column's engine-neutral type.
    neutral: Vec<&'a str>,
    /// What [`PageQuery::copy`] writes the query again from.
    parts: QueryParts<'a>,
}

/// What a page's query is made of ([`keyset_query_filtered`]'s arguments but the literals).
struct QueryParts<'a> {
    schema: &'a TableSchema,
    columns: &'a [String],
    casts: Vec<&'a str>,
    key_casts: Vec<String>,
    bounds: KeyBounds,
    filter: Option<&'a KeyFilter>,
}

impl<'a> PageQuery<'a> {
    /// Reads the page from SQLite on the raw handle (sqlx would hand each row over from its
    /// worker thread), `limit` rows at most.
    async fn select_sqlite(
        &self,
        pool: &sqlx::SqlitePool,
        schema: &TableSchema,
        limit: i64,
    ) -> Result<crate::sqlite_raw::Cells> {
        let mut conn = pool.acquire().await?;
        self.select_sqlite_on(&mut conn, schema, limit).await
    }

    /// [`PageQuery::select_sqlite`] on connection `conn`.
    async fn select_sqlite_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        schema: &TableSchema,
        limit: i64,
    ) -> Result<crate::sqlite_raw::Cells> {
        let mut params = Vec::new();
        for value in self.keys.iter().copied().flatten() {
            params.push(sqlite_key(value)?);
        }
        params.push(crate::sqlite_raw::Arg::Int(limit));
        crate::sqlite_raw::select_cells(conn, &self.sql, &params, self.neutral.len())
            .await
            .map_err(|err| match err {
                crate::sqlite_raw::RawError::Sqlx(err) => err.into(),
                other => sqlite_error(schema, other),
            })
    }

    fn new(
        schema: &'a TableSchema,
        columns: &'a [String],
        after: Option<&'a [Value]>,
        window: Window<'a>,
        filter: Option<&'a KeyFilter>,
    ) -> Result<Self> {
        // On PostgreSQL a list of keys of one integer, text or UUID column goes as one array.
        let key_array = match schema.engine.as_str() {
            "postgres" => KeyArray::of_key(schema),
            _ => None,
        };
        let mut listed = None;
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
                match key_array {
                    Some(array) if !keys.is_empty() => {
                        listed = Some((array, keys.as_slice()));
                        Vec::new()
                    }
                    _ => keys.iter().map(Vec::as_slice).collect(),
                }
            }
        };
        let keys: Vec<&[Value]> = after
            .into_iter()
            .chain(window.above)
            .chain(window.at_most)
            .chain(filter_keys)
            .collect();
        let listed_keys = listed
            .iter()
            .flat_map(|(_, keys)| keys.iter().map(Vec::as_slice));
        for key in keys.iter().copied().chain(listed_keys) {
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
        // Types dbsync does not model are read in their text form (money as numeric).
        let casts: Vec<&str> = if schema.engine == "postgres" {
            columns
                .iter()
                .map(|c| {
                    schema
                        .columns
                        .iter()
                        .find(|col| &col.name == c)
                        .map_or("", |col| pg_read_cast(&col.native_type, &col.neutral_type))
                })
                .collect()
        } else {
            Vec::new()
        };
        // Key values of such types come back in their text form: compared as the key's type.
        let key_casts: Vec<String> = if schema.engine == "postgres" {
            schema
                .primary_key
                .iter()
                .map(|k| {
                    schema
                        .columns
                        .iter()
                        .find(|col| &col.name == k)
                        .map_or(Ok(String::new()), |col| {
                            pg_key_cast(&col.native_type, &col.neutral_type)
                        })
                })
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let bounds = KeyBounds {
            after: after.is_some(),
            above: window.above.is_some(),
            at_most: window.at_most.is_some(),
        };
        let sql = keyset_query_filtered(
            &schema.name,
            columns,
            Casts {
                engine: &schema.engine,
                columns: &casts,
                key: &key_casts,
                key_array: listed.map(|(array, _)| array.sql_type()),
                literals: None,
            },
            &schema.primary_key,
            bounds,
            filter,
        )?;
        Ok(Self {
            sql,
            keys,
            listed,
            key_positions,
            neutral,
            parts: QueryParts {
                schema,
                columns,
                casts,
                key_casts,
                bounds,
                filter,
            },
        })
    }

    /// The page's query on PostgreSQL as a binary `COPY` with its keys and `limit` in place,
    /// if every key value has a literal ([`copy_out::key_literal`]) and no key column is read in
    /// its text form; `None`: read it through [`PageQuery::postgres`].
    fn copy(&self, limit: i64) -> Result<Option<String>> {
        let parts = &self.parts;
        if self.listed.is_some()
            || parts.schema.engine != "postgres"
            || parts.key_casts.iter().any(|cast| !cast.is_empty())
        {
            return Ok(None);
        }
        let mut literals = Vec::new();
        for key in &self.keys {
            for (value, position) in key.iter().zip(&self.key_positions) {
                match copy_out::key_literal(value, self.neutral[*position]) {
                    Some(literal) => literals.push(literal),
                    None => return Ok(None),
                }
            }
        }
        literals.push(limit.to_string());
        let select = keyset_query_filtered(
            &parts.schema.name,
            parts.columns,
            Casts {
                engine: &parts.schema.engine,
                columns: &parts.casts,
                key: &parts.key_casts,
                key_array: None,
                literals: Some(&literals),
            },
            &parts.schema.primary_key,
            parts.bounds,
            parts.filter,
        )?;
        Ok(Some(copy_out::copy_statement(&select)))
    }

    fn decoders(&self) -> Vec<pg_binary::Decoder> {
        self.neutral
            .iter()
            .map(|n| pg_binary::Decoder::of(n))
            .collect()
    }

    /// The page's query on PostgreSQL, its keys and `limit` bound.
    fn postgres(
        &self,
        limit: i64,
    ) -> Result<sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()));
        for key in &self.keys {
            for (value, position) in key.iter().zip(&self.key_positions) {
                query = bind_postgres(query, value, self.neutral[*position])?;
            }
        }
        if let Some((array, keys)) = self.listed {
            query = array.bind(query, keys)?;
        }
        Ok(query.bind(limit))
    }
}

/// Whether a list of `schema`'s keys goes as one array parameter: a one-column key of an
/// integer, text or UUID type.
pub fn keys_listable(schema: &TableSchema) -> bool {
    KeyArray::of_key(schema).is_some()
}

/// A list of keys of one column bound as one PostgreSQL array, by the column's neutral type.
#[derive(Debug, Clone, Copy)]
enum KeyArray {
    Int,
    Text,
    Uuid,
}

impl KeyArray {
    /// For a column of PostgreSQL type `native`, if its keys compare as the array's (a type
    /// that only converts to `text`, as `character(n)` does, compares otherwise).
    fn of(native: &str) -> Option<Self> {
        match native {
            "bigint" | "integer" | "smallint" => Some(Self::Int),
            "text" => Some(Self::Text),
            varchar if varchar.starts_with("character varying") => Some(Self::Text),
            "uuid" => Some(Self::Uuid),
            _ => None,
        }
    }

    /// For `schema`'s key, when it is one such column.
    fn of_key(schema: &TableSchema) -> Option<Self> {
        match schema.primary_key.as_slice() {
            [key] => schema
                .columns
                .iter()
                .find(|c| &c.name == key)
                .and_then(|c| Self::of(&c.native_type)),
            _ => None,
        }
    }

    fn sql_type(self) -> &'static str {
        match self {
            Self::Int => "int8[]",
            Self::Text => "text[]",
            Self::Uuid => "uuid[]",
        }
    }

    /// Binds `keys` (one value each) as one array; a value of another kind is refused.
    fn bind<'q>(self, query: PgQuery<'q>, keys: &[Vec<Value>]) -> Result<PgQuery<'q>> {
        let neutral = self.sql_type().trim_end_matches("[]");
        let wrong = |key: &[Value]| match key {
            [value] => wrong_key_kind(value, neutral),
            _ => Error::invalid("key", "a listed key has more than one value"),
        };
        Ok(match self {
            Self::Int => query.bind(
                keys.iter()
                    .map(|k| match k.as_slice() {
                        [Value::Int(v)] => Ok(*v),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<Vec<i64>>>()?,
            ),
            Self::Text => query.bind(
                keys.iter()
                    .map(|k| match k.as_slice() {
                        [Value::Text(v)] => Ok(v.clone()),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<Vec<String>>>()?,
            ),
            Self::Uuid => query.bind(
                keys.iter()
                    .map(|k| match k.as_slice() {
                        [Value::Uuid(v)] => Ok(uuid::Uuid::from_bytes(*v)),
                        [Value::Text(v)] => text_uuid(v),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<Vec<uuid::Uuid>>>()?,
            ),
        })
    }
}

/// Column `i` of a PostgreSQL row as a value.
fn postgres_value(
    row: &sqlx::postgres::PgRow,
    i: usize,
    decoder: &pg_binary::Decoder,
) -> Result<Value> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let bytes = raw
        .as_bytes()
        .map_err(|e| Error::invalid("value", e.to_string()))?;
    decoder.decode(bytes)
}

fn key_type_error(neutral: &str) -> Error {
    Error::invalid(
        "primary key",
        format!("a {neutral} key column cannot be paged by yet"),
    )
}

/// A key value (a peer's, or a checkpoint's) that does not fit its key column, named by its
/// kind and never quoted.
fn wrong_key_kind(value: &Value, neutral: &str) -> Error {
    Error::invalid(
        "key",
        format!(
            "a key value of kind {} does not fit the key column ({neutral})",
            value.kind()
        ),
    )
}

/// A UUID key given as text (how SQLite keeps UUIDs), refused unless it reads as one.
fn text_uuid(text: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::try_parse(text).map_err(|_| {
        Error::invalid(
            "key",
            "a text key value is not a UUID, as the key column is",
        )
    })
}

/// A date or time key out of the range PostgreSQL's types hold.
fn key_out_of_range(neutral: &str) -> Error {
    Error::invalid("key", format!("a {neutral} key value is out of range"))
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn bind_postgres<'q>(query: PgQuery<'q>, value: &Value, neutral: &str) -> Result<PgQuery<'q>> {
    Ok(match (value, neutral) {
        (Value::Int(v), "int") => query.bind(*v),
        (Value::Text(v), "text") => query.bind(v.clone()),
        (Value::Uuid(v), "uuid") => query.bind(uuid::Uuid::from_bytes(*v)),
        // A SQLite peer's UUID key, kept there as text.
        (Value::Text(v), "uuid") => query.bind(text_uuid(v)?),
        (Value::Bytes(v), "bytes") => query.bind(v.clone()),
        (Value::Bool(v), "bool") => query.bind(*v),
        (Value::Date(days), "date") => {
            let date = NaiveDate::from_num_days_from_ce_opt(days + 719_163)
                .ok_or_else(|| key_out_of_range("date"))?;
            query.bind(date)
        }
        (Value::TimestampTz(micros), "timestamptz") => query.bind(
            DateTime::<Utc>::from_timestamp_micros(*micros)
                .ok_or_else(|| key_out_of_range("timestamptz"))?,
        ),
        (Value::Timestamp(micros), "timestamp") => query.bind(
            DateTime::<Utc>::from_timestamp_micros(*micros)
                .ok_or_else(|| key_out_of_range("timestamp"))?
                .naive_utc(),
        ),
        (
            value,
            "int" | "text" | "uuid" | "bytes" | "bool" | "date" | "timestamptz" | "timestamp",
        ) => {
            return Err(wrong_key_kind(value, neutral));
        }
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
        Value::Bytes(v) => Arg::Blob(v.as_slice().into()),
        // A PostgreSQL peer's UUID key: SQLite keeps UUIDs as their hyphenated text.
        Value::Uuid(v) => Arg::Text(uuid::Uuid::from_bytes(*v).hyphenated().to_string().into()),
        other => return Err(wrong_key_kind(other, "SQLite")),
    })
}

/// A SQLite page that could not be read (text that is not UTF-8, say), naming the table.
fn sqlite_error(schema: &TableSchema, err: crate::sqlite_raw::RawError) -> Error {
    Error::invalid("rows", format!("reading {:?}: {err}", schema.name))
}
