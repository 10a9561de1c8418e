//! SQLite's fast paths, on the connection's own handle through rusqlite: a batch's whole
//! transaction (begin, one prepared single-row `INSERT` bound and stepped per row, bookkeeping,
//! commit), and a page read into one buffer ([`Cells`]). Through sqlx a batch is one statement
//! with 30,000 `?` placeholders whose SQL is rebuilt, hashed and bound value by value through an
//! argument buffer, and each statement is a round trip to the connection's worker thread, which
//! on a busy machine costs more than the statement.
//!
//! The handle is sqlx's, locked for the duration ([`sqlx::sqlite::SqliteConnection::lock_handle`])
//! and lent to rusqlite for it ([`on_handle`]): the crate's one `unsafe` use of SQLite.

use std::ptr::NonNull;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{ErrorCode, ffi};

/// A value as SQLite stores it (the same mapping the sink binds through sqlx).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg<'a> {
    Null,
    Int(i64),
    Float(f64),
    Text(std::borrow::Cow<'a, str>),
    Blob(std::borrow::Cow<'a, [u8]>),
}

impl Arg<'_> {
    /// The same value, owning its text or bytes.
    pub(crate) fn into_owned(self) -> Arg<'static> {
        match self {
            Self::Null => Arg::Null,
            Self::Int(i) => Arg::Int(i),
            Self::Float(f) => Arg::Float(f),
            Self::Text(text) => Arg::Text(text.into_owned().into()),
            Self::Blob(bytes) => Arg::Blob(bytes.into_owned().into()),
        }
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Int(i) => ValueRef::Integer(*i),
            Self::Float(f) => ValueRef::Real(*f),
            Self::Text(text) => ValueRef::Text(text.as_bytes()),
            Self::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// What went wrong in [`load_rows`] or [`select_cells`].
#[derive(Debug)]
pub(crate) enum RawError {
    /// A row hit an existing key (a PRIMARY KEY or UNIQUE constraint).
    UniqueViolation(String),
    /// Anything else SQLite refused.
    Sqlite { code: i32, message: String },
    /// A value or a row did not fit the statement.
    Invalid(String),
    /// sqlx could not lend its handle.
    Sqlx(sqlx::Error),
    /// The bookkeeping statement at this index changed no row (the transaction was rolled
    /// back).
    NothingChanged(usize),
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UniqueViolation(message) => write!(f, "{message}"),
            Self::Sqlite { code, message } => write!(f, "SQLite error {code}: {message}"),
            Self::Invalid(message) => write!(f, "{message}"),
            Self::Sqlx(err) => write!(f, "{err}"),
            Self::NothingChanged(index) => write!(f, "statement {index} changed no row"),
        }
    }
}

impl From<rusqlite::Error> for RawError {
    fn from(err: rusqlite::Error) -> Self {
        match err {
            rusqlite::Error::SqliteFailure(failure, message) => {
                let message = message.unwrap_or_else(|| failure.to_string());
                match (failure.code, failure.extended_code) {
                    (
                        ErrorCode::ConstraintViolation,
                        ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE,
                    ) => Self::UniqueViolation(message),
                    _ => Self::Sqlite {
                        code: failure.extended_code,
                        message,
                    },
                }
            }
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// Runs `work` with rusqlite on `db`.
fn on_handle<T>(
    db: NonNull<ffi::sqlite3>,
    work: impl FnOnce(&rusqlite::Connection) -> Result<T, RawError>,
) -> Result<T, RawError> {
    // SAFETY: `db` is sqlx's open connection handle, locked by the caller (`lock_handle`) for
    // longer than this call, so nothing else uses it meanwhile. `from_handle` borrows it: the
    // wrapper never closes the handle, and it is dropped (finalizing the statements it
    // prepared) before this function returns, so none outlives the lock. `libsqlite3-sys` is
    // one crate for both sqlx and rusqlite (one `sqlite3` links), so the pointer types agree.
    #[allow(unsafe_code)]
    let conn = unsafe { rusqlite::Connection::from_handle(db.as_ptr()) }?;
    let result = work(&conn);
    drop(conn);
    result
}

/// One row after another for [`load_rows`]: each call pushes the next row's values onto the
/// (empty) vector it is given and says `true`, or says `false` past the last row.
pub(crate) trait NextRow<'r>: FnMut(&mut Vec<Arg<'r>>) -> Result<bool, String> {}

impl<'r, F: FnMut(&mut Vec<Arg<'r>>) -> Result<bool, String>> NextRow<'r> for F {}

/// The rows of a slice as [`NextRow`], each value given by `arg`.
pub(crate) fn each_row<'r, T>(
    rows: &'r [Vec<T>],
    arg: impl Fn(&'r T) -> Result<Arg<'r>, String>,
) -> impl NextRow<'r> {
    let mut rows = rows.iter();
    move |out: &mut Vec<Arg<'r>>| {
        let Some(row) = rows.next() else {
            return Ok(false);
        };
        for value in row {
            out.push(arg(value)?);
        }
        Ok(true)
    }
}

/// Binds and steps `insert` (one `?` per value) once per row that `next_row` gives.
fn insert_all<'r>(
    conn: &rusqlite::Connection,
    insert: &str,
    mut next_row: impl NextRow<'r>,
) -> Result<(), RawError> {
    let mut statement = conn.prepare(insert)?;
    let parameters = statement.parameter_count();
    let mut values: Vec<Arg<'r>> = Vec::with_capacity(parameters);
    loop {
        values.clear();
        if !next_row(&mut values).map_err(RawError::Invalid)? {
            return Ok(());
        }
        if values.len() != parameters {
            return Err(RawError::Invalid(format!(
                "a row of {} values for {parameters} parameters",
                values.len()
            )));
        }
        for (i, value) in values.iter().enumerate() {
            statement.raw_bind_parameter(i + 1, value)?;
        }
        statement.raw_execute()?;
    }
}

/// A bookkeeping statement run after the rows, in [`load_rows`]' transaction.
pub(crate) struct Then<'a> {
    /// SQL with `$1`, `$2`, ... parameters (in any order in the text).
    pub sql: &'a str,
    /// The value of `$1` first.
    pub params: Vec<Arg<'a>>,
    /// Whether the statement must change a row: if it changes none, the whole transaction is
    /// rolled back and the answer is [`RawError::NothingChanged`].
    pub must_change: bool,
}

/// Prepares `sql` and binds `params` to `$1`, `$2`, ... wherever each appears in the text.
fn prepare_numbered<'c>(
    conn: &'c rusqlite::Connection,
    sql: &str,
    params: &[Arg<'_>],
) -> Result<rusqlite::Statement<'c>, RawError> {
    let mut statement = conn.prepare(sql)?;
    if statement.parameter_count() != params.len() {
        return Err(RawError::Invalid(format!(
            "{} values for {} parameters",
            params.len(),
            statement.parameter_count()
        )));
    }
    for (i, value) in params.iter().enumerate() {
        let name = format!("${}", i + 1);
        let index = statement
            .parameter_index(&name)?
            .ok_or_else(|| RawError::Invalid(format!("no parameter {name}")))?;
        statement.raw_bind_parameter(index, value)?;
    }
    Ok(statement)
}

/// Loads a batch in one transaction on `conn`'s handle: `BEGIN IMMEDIATE`, `insert` (an
/// `INSERT` with one `?` per column) once per row `rows` gives, then each of `then` in order,
/// and `COMMIT`. Anything refused (a value `rows` cannot give, a row, a bookkeeping statement
/// that must change a row and did not) rolls the whole transaction back before the error is
/// returned. `conn` must not be inside a transaction.
pub(crate) async fn load_rows<'r>(
    conn: &mut sqlx::SqliteConnection,
    insert: &str,
    rows: impl NextRow<'r>,
    then: &[Then<'_>],
) -> Result<(), RawError> {
    let mut handle = conn.lock_handle().await.map_err(RawError::Sqlx)?;
    // From here to the end nothing awaits: the transaction cannot be left open by a dropped
    // future.
    on_handle(handle.as_raw_handle(), |conn| {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let loaded = (|| {
            insert_all(conn, insert, rows)?;
            for (index, step) in then.iter().enumerate() {
                let changed = prepare_numbered(conn, step.sql, &step.params)?.raw_execute()?;
                if step.must_change && changed == 0 {
                    return Err(RawError::NothingChanged(index));
                }
            }
            conn.execute_batch("COMMIT")?;
            Ok(())
        })();
        if loaded.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        loaded
    })
}

/// One value as read from SQLite, by storage class; text and bytes are a range of the page's
/// arena ([`Cells`]).
#[derive(Debug, Clone, Copy)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(usize, usize),
    Blob(usize, usize),
}

/// Rows read by [`select_cells`]: `width` cells a row, row after row, their text and bytes
/// copied one after another into one buffer (no allocation per value).
#[derive(Debug)]
pub(crate) struct Cells {
    width: usize,
    cells: Vec<Cell>,
    arena: Vec<u8>,
}

impl Cells {
    /// How many rows.
    pub(crate) fn rows(&self) -> usize {
        self.cells.len().checked_div(self.width).unwrap_or(0)
    }

    fn text(&self, start: usize, end: usize) -> Result<&str, RawError> {
        std::str::from_utf8(&self.arena[start..end])
            .map_err(|_| RawError::Invalid("a text value that is not UTF-8".into()))
    }

    fn value(&self, cell: Cell) -> Result<dbsync_protocol::Value, RawError> {
        use dbsync_protocol::Value;
        Ok(match cell {
            Cell::Null => Value::Null,
            Cell::Int(i) => Value::Int(i),
            Cell::Float(f) => Value::Float(f),
            Cell::Text(start, end) => Value::Text(self.text(start, end)?.to_owned()),
            Cell::Blob(start, end) => Value::Bytes(self.arena[start..end].to_vec()),
        })
    }

    /// Row `row`'s values at `positions` (a key).
    pub(crate) fn values_at(
        &self,
        row: usize,
        positions: &[usize],
    ) -> Result<Vec<dbsync_protocol::Value>, RawError> {
        positions
            .iter()
            .map(|i| self.value(self.cells[row * self.width + i]))
            .collect()
    }

    /// Every row as values: INTEGER, REAL, TEXT, BLOB and NULL as `Int`, `Float`, `Text`,
    /// `Bytes` and `Null`.
    pub(crate) fn to_rows(&self) -> Result<Vec<Vec<dbsync_protocol::Value>>, RawError> {
        let all: Vec<usize> = (0..self.width).collect();
        (0..self.rows())
            .map(|row| self.values_at(row, &all))
            .collect()
    }

    /// The rows encoded for the wire column by column (a row batch's `rows`), as
    /// [`Cells::to_rows`] would be, behind `room` zero bytes: a column whose values are all of
    /// one storage class (or NULL) goes bare, any other as whole values.
    pub(crate) fn encode(&self, room: usize) -> Result<Vec<u8>, RawError> {
        use dbsync_protocol::message::columnar::{ColumnsWriter, Kind};
        let rows = self.rows();
        let invalid = RawError::Invalid;
        let mut out = Vec::with_capacity(room + self.arena.len() + self.cells.len() * 4 + 64);
        out.resize(room, 0);
        let mut writer = ColumnsWriter::new(self.width, rows, out);
        for column in 0..self.width {
            let cells = || self.cells.iter().skip(column).step_by(self.width);
            let kind_of = |cell: &Cell| match cell {
                Cell::Null => None,
                Cell::Int(_) => Some(Kind::Int),
                Cell::Float(_) => Some(Kind::Float),
                Cell::Text(..) => Some(Kind::Text),
                Cell::Blob(..) => Some(Kind::Bytes),
            };
            let mut kinds = cells().filter_map(kind_of);
            let first = kinds.next();
            let kind = if kinds.all(|k| Some(k) == first) {
                Some(first.unwrap_or(Kind::Int))
            } else {
                None
            };
            let out = writer.column(kind).map_err(invalid)?;
            for cell in cells() {
                match (kind, *cell) {
                    (_, Cell::Null) => out.null(),
                    (None, cell) => out.value(&self.value(cell)?).map_err(invalid)?,
                    (Some(_), Cell::Int(i)) => out.int(i),
                    (Some(_), Cell::Float(f)) => out.float(f),
                    (Some(_), Cell::Text(start, end)) => out.str(self.text(start, end)?),
                    (Some(_), Cell::Blob(start, end)) => out.bin(&self.arena[start..end]),
                }
            }
        }
        writer.finish().map_err(invalid)
    }
}

/// Runs the query `sql` with `params` (the values of `$1`, `$2`, ...) on `conn`'s handle and
/// returns every row's first `width` columns by storage class: INTEGER, REAL, TEXT, BLOB, NULL.
pub(crate) async fn select_cells(
    conn: &mut sqlx::SqliteConnection,
    sql: &str,
    params: &[Arg<'_>],
    width: usize,
) -> Result<Cells, RawError> {
    let mut handle = conn.lock_handle().await.map_err(RawError::Sqlx)?;
    on_handle(handle.as_raw_handle(), |conn| {
        let mut statement = prepare_numbered(conn, sql, params)?;
        let columns = statement.column_count();
        if width > columns {
            return Err(RawError::Invalid(format!("{width} of {columns} columns")));
        }
        let mut read = Cells {
            width,
            cells: Vec::new(),
            arena: Vec::new(),
        };
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next()? {
            for i in 0..width {
                let mut copy = |data: &[u8]| {
                    let start = read.arena.len();
                    read.arena.extend_from_slice(data);
                    (start, read.arena.len())
                };
                let cell = match row.get_ref(i)? {
                    ValueRef::Integer(i) => Cell::Int(i),
                    ValueRef::Real(f) => Cell::Float(f),
                    ValueRef::Null => Cell::Null,
                    ValueRef::Blob(bytes) => {
                        let (start, end) = copy(bytes);
                        Cell::Blob(start, end)
                    }
                    ValueRef::Text(text) => {
                        let (start, end) = copy(text);
                        Cell::Text(start, end)
                    }
                };
                read.cells.push(cell);
            }
        }
        Ok(read)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbsync_protocol::Value;
    use sqlx::Connection;

    #[tokio::test]
    async fn rows_go_in_and_come_out_by_storage_class() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, x, y TEXT NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        let rows = vec![
            vec![Arg::Int(1), Arg::Float(0.1), Arg::Text("é".into())],
            vec![
                Arg::Int(2),
                Arg::Blob([0, 255].as_slice().into()),
                Arg::Text("".into()),
            ],
            vec![Arg::Int(3), Arg::Null, Arg::Text("x".into())],
            vec![Arg::Int(4), Arg::Text("7".into()), Arg::Text("y".into())],
        ];
        let sql = "INSERT INTO t (id, x, y) VALUES (?, ?, ?)";
        load_rows(&mut conn, sql, each_row(&rows, |a| Ok(a.clone())), &[])
            .await
            .unwrap();
        let cells = select_cells(
            &mut conn,
            "SELECT id, x, y FROM t WHERE id > $1 ORDER BY id LIMIT $2",
            &[Arg::Int(0), Arg::Int(10)],
            3,
        )
        .await
        .unwrap();
        let read = cells.to_rows().unwrap();
        // Encoded for the wire (`x` mixes every storage class, so it goes as whole values), the
        // same rows come back out.
        let batch = dbsync_protocol::message::RowBatch {
            request_id: 1,
            seq: 0,
            columns: vec!["id".into(), "x".into(), "y".into()],
            rows: Vec::new(),
            last_key: cells.values_at(3, &[0]).unwrap(),
            transfer_id: String::new(),
        };
        let room = dbsync_protocol::codec::row_batch_room(&batch.columns);
        let mut page = cells.encode(room).unwrap();
        let (frame, _) =
            dbsync_protocol::codec::encode_row_batch_in_place(&batch, &mut page, room, 1).unwrap();
        let arrived =
            dbsync_protocol::codec::decode_batch_exact(&frame, &Default::default()).unwrap();
        assert_eq!(arrived.rows.to_rows().unwrap(), read);
        assert_eq!(arrived.last_key, vec![Value::Int(4)]);
        // Past the last row: an empty page of three columns.
        let none = select_cells(&mut conn, "SELECT id, x, y FROM t WHERE id > 99", &[], 3)
            .await
            .unwrap();
        assert_eq!(none.rows(), 0);
        assert!(none.to_rows().unwrap().is_empty());
        assert!(!none.encode(0).unwrap().is_empty());
        assert_eq!(
            read,
            vec![
                vec![Value::Int(1), Value::Float(0.1), Value::Text("é".into())],
                vec![
                    Value::Int(2),
                    Value::Bytes(vec![0, 255]),
                    Value::Text("".into())
                ],
                vec![Value::Int(3), Value::Null, Value::Text("x".into())],
                vec![
                    Value::Int(4),
                    Value::Text("7".into()),
                    Value::Text("y".into())
                ],
            ]
        );
        // An existing key is told apart from other refusals.
        let again = vec![vec![Arg::Int(1), Arg::Null, Arg::Text("z".into())]];
        assert!(matches!(
            load_rows(&mut conn, sql, each_row(&again, |a| Ok(a.clone())), &[]).await,
            Err(RawError::UniqueViolation(_))
        ));
        let null = vec![vec![Arg::Int(9), Arg::Null, Arg::Null]];
        let err = load_rows(&mut conn, sql, each_row(&null, |a| Ok(a.clone())), &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("NOT NULL"), "{err}");
        // Wrong shapes and bad SQL are errors, not panics.
        let short = vec![vec![Arg::Int(10)]];
        assert!(matches!(
            load_rows(&mut conn, sql, each_row(&short, |a| Ok(a.clone())), &[]).await,
            Err(RawError::Invalid(_))
        ));
        assert!(matches!(
            select_cells(&mut conn, "SELEC nonsense", &[], 1).await,
            Err(RawError::Sqlite { .. })
        ));
        // Text that is not UTF-8 is refused on the way out.
        sqlx::query("INSERT INTO t VALUES (20, CAST(x'ff' AS TEXT), 'ok')")
            .execute(&mut conn)
            .await
            .unwrap();
        let bad = select_cells(&mut conn, "SELECT id, x FROM t WHERE id = 20", &[], 2)
            .await
            .unwrap();
        for err in [bad.to_rows().unwrap_err(), bad.encode(0).unwrap_err()] {
            assert!(err.to_string().contains("UTF-8"), "{err}");
        }
        // Bookkeeping runs in the rows' transaction; one that must change a row and does not
        // takes the rows back with it.
        sqlx::query("CREATE TABLE book (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        let more = vec![vec![Arg::Int(30), Arg::Null, Arg::Text("a".into())]];
        let count = |n: i64| Then {
            sql: "INSERT INTO book (id, n) VALUES ($2, $1) ON CONFLICT (id) DO UPDATE SET n = n + $1",
            params: vec![Arg::Int(n), Arg::Int(1)],
            must_change: true,
        };
        load_rows(
            &mut conn,
            sql,
            each_row(&more, |a| Ok(a.clone())),
            &[count(5)],
        )
        .await
        .unwrap();
        let missing = Then {
            sql: "UPDATE book SET n = n + 1 WHERE id = $1",
            params: vec![Arg::Int(99)],
            must_change: true,
        };
        let next = vec![vec![Arg::Int(31), Arg::Null, Arg::Text("b".into())]];
        assert!(matches!(
            load_rows(
                &mut conn,
                sql,
                each_row(&next, |a| Ok(a.clone())),
                &[count(7), missing]
            )
            .await,
            Err(RawError::NothingChanged(1))
        ));
        let kept: (i64, i64) =
            sqlx::query_as("SELECT (SELECT n FROM book), (SELECT COUNT(*) FROM t WHERE id >= 30)")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(kept, (5, 1), "the refused batch left nothing behind");
        // A value that cannot be converted also takes back the rows before it.
        let bad = vec![
            vec![Arg::Int(40), Arg::Int(1), Arg::Text("c".into())],
            vec![Arg::Int(41), Arg::Null, Arg::Text("d".into())],
        ];
        let refuse_null = |a: &Arg<'static>| match a {
            Arg::Null => Err("no nulls here".to_owned()),
            other => Ok(other.clone()),
        };
        assert!(matches!(
            load_rows(&mut conn, sql, each_row(&bad, refuse_null), &[]).await,
            Err(RawError::Invalid(_))
        ));
        // The connection is still usable through sqlx.
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 6, "rows 1-4, 20 and 30");
    }
}
