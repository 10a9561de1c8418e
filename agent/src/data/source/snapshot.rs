//! A whole table read from one snapshot, page after page: how a table without a primary key is
//! sent (there is no key to page by, nor to resume after). The snapshot is a transaction held
//! open on one connection for as long as the reading lasts, so every page sees the table as it
//! was when the first one was read, whatever is written meanwhile.
//!
//! PostgreSQL: a `REPEATABLE READ, READ ONLY` transaction and a cursor over the table, fetched a
//! page at a time and decoded from the binary format like any page. SQLite: a read transaction
//! (the database is in WAL mode, so writers go on) and pages by `rowid`, which every table
//! without a primary key has.

use dbsync_protocol::Value;
use dbsync_protocol::message::TableSchema;

use super::{EncodedPage, PageBuilder, encode_pg_rows, pg_binary, sqlite_error};
use crate::catalog::{pg_read_cast, quote_ident};
use crate::error::{Error, Result};
use crate::store::{Pool, Store};

/// The cursor a PostgreSQL snapshot reads through (one per connection, which it holds).
const CURSOR: &str = "dbsync_snapshot";

/// A table being read whole from one snapshot ([`Store::open_snapshot`]).
pub struct Snapshot {
    /// The table, for errors.
    table: TableSchema,
    /// Rows read so far: where the next page starts.
    position: i64,
    reader: Reader,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("table", &self.table.name)
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

enum Reader {
    Postgres {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        decoders: Vec<pg_binary::Decoder>,
    },
    Sqlite {
        tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        /// `SELECT columns, rowid ... WHERE rowid > $1 ORDER BY rowid LIMIT $2`.
        sql: String,
        /// Columns sent (the rowid read after them is not).
        width: usize,
        /// The rowid of the last row read.
        after: i64,
    },
}

impl Store {
    /// Opens a snapshot of `schema.name` and reads its `columns` from it, in no particular
    /// order; nothing is read until [`Snapshot::next_page`].
    /// `exported`: a snapshot of the whole pull ([`Store::export_snapshot`]) to read from (on
    /// PostgreSQL; a SQLite table read whole is read in a read transaction of its own).
    pub async fn open_snapshot(
        &self,
        schema: &TableSchema,
        columns: &[String],
        exported: Option<&super::PullSnapshot>,
    ) -> Result<Snapshot> {
        let table = crate::catalog::quote_table(self.engine(), &schema.name)?;
        let mut neutral = Vec::with_capacity(columns.len());
        let mut select = Vec::with_capacity(columns.len());
        for name in columns {
            let column = schema
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| {
                    Error::invalid(
                        "columns",
                        format!("{:?} has no column {name:?}", schema.name),
                    )
                })?;
            neutral.push(column.neutral_type.as_str());
            let cast = if schema.engine == "postgres" {
                pg_read_cast(&column.native_type, &column.neutral_type)
            } else {
                ""
            };
            select.push(format!("{}{cast}", quote_ident(name)?));
        }
        let select = select.join(", ");
        let reader = match self.pool() {
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                match exported {
                    Some(super::PullSnapshot::Postgres(id)) => {
                        super::import_snapshot(&mut tx, id).await?;
                    }
                    _ => {
                        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DECLARE {CURSOR} NO SCROLL CURSOR FOR SELECT {select} FROM {table}"
                )))
                .execute(&mut *tx)
                .await?;
                Reader::Postgres {
                    tx,
                    decoders: neutral.iter().map(|n| pg_binary::Decoder::of(n)).collect(),
                }
            }
            Pool::Sqlite(pool) => {
                // A column may take the name `rowid`; SQLite then answers to its other names.
                let rowid = ["rowid", "_rowid_", "oid"]
                    .into_iter()
                    .find(|alias| {
                        !schema
                            .columns
                            .iter()
                            .any(|c| c.name.eq_ignore_ascii_case(alias))
                    })
                    .ok_or_else(|| {
                        Error::invalid(
                            "table",
                            format!(
                                "{:?} has no primary key and columns named rowid, _rowid_ and \
                                 oid: there is nothing to read it in order by",
                                schema.name
                            ),
                        )
                    })?;
                Reader::Sqlite {
                    tx: pool.begin().await?,
                    sql: format!(
                        "SELECT {select}, {rowid} FROM {table} WHERE {rowid} > $1 \
                         ORDER BY {rowid} LIMIT $2"
                    ),
                    width: columns.len(),
                    after: i64::MIN,
                }
            }
        };
        Ok(Snapshot {
            table: schema.clone(),
            position: 0,
            reader,
        })
    }
}

impl Snapshot {
    /// Rows read so far.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// The next `limit` rows at most, encoded behind `room` free bytes; the page's last key is
    /// the snapshot's position after it (rows read so far), the key a receiver goes on from;
    /// `compact` as for [`super::Store::read_page_encoded`].
    pub async fn next_page(
        &mut self,
        limit: i64,
        room: usize,
        compact: bool,
    ) -> Result<EncodedPage> {
        let limit = limit.max(1);
        let mut page = match &mut self.reader {
            Reader::Postgres { tx, decoders } => {
                // The count is a number of ours, not a parameter (FETCH takes none).
                let sql = format!("FETCH FORWARD {limit} FROM {CURSOR}");
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .persistent(false)
                    .fetch(&mut **tx);
                let page = PageBuilder::new(decoders, limit, compact);
                encode_pg_rows(rows, page, &[], room).await?
            }
            Reader::Sqlite {
                tx,
                sql,
                width,
                after,
            } => {
                let params = [
                    crate::sqlite_raw::Arg::Int(*after),
                    crate::sqlite_raw::Arg::Int(limit),
                ];
                let cells = crate::sqlite_raw::select_cells(&mut *tx, sql, &params, *width + 1)
                    .await
                    .map_err(|err| match err {
                        crate::sqlite_raw::RawError::Sqlx(err) => err.into(),
                        other => sqlite_error(&self.table, other),
                    })?;
                let rows = cells.rows();
                if rows > 0 {
                    match cells
                        .values_at(rows - 1, &[*width])
                        .map_err(|err| sqlite_error(&self.table, err))?
                        .first()
                    {
                        Some(Value::Int(rowid)) => *after = *rowid,
                        _ => {
                            return Err(Error::invalid(
                                "table",
                                format!("{:?}: a rowid that is not an integer", self.table.name),
                            ));
                        }
                    }
                }
                EncodedPage {
                    columns: cells
                        .encode_columns(room, *width, compact)
                        .map_err(|err| sqlite_error(&self.table, err))?,
                    room,
                    rows,
                    last_key: None,
                }
            }
        };
        self.position += page.rows as i64;
        page.last_key = (page.rows > 0).then(|| vec![Value::Int(self.position)]);
        Ok(page)
    }
}
