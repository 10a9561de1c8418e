//! SQLite's fast path into a table: one prepared single-row `INSERT`, bound and stepped per row
//! on the connection's own handle. Through sqlx a batch is one statement with 30,000 `?`
//! placeholders whose SQL is rebuilt, hashed and bound value by value through an argument
//! buffer; here each value is bound straight from the batch (text and blobs without a copy).
//! The batch's whole transaction (begin, rows, bookkeeping, commit) runs here too: through sqlx
//! each statement is a round trip to the connection's worker thread, which on a busy machine
//! costs more than the statement.
//!
//! The handle is sqlx's, locked for the duration ([`sqlx::sqlite::SqliteConnection::lock_handle`]).
//! All `unsafe` of the crate's SQLite use is here.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_int};
use std::ptr;

use libsqlite3_sys as ffi;

mod cells;

use cells::Cell;
pub(crate) use cells::Cells;

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

/// What went wrong in [`load_rows`] or [`select_cells`].
#[derive(Debug)]
pub(crate) enum RawError {
    /// A row hit an existing key (a PRIMARY KEY or UNIQUE constraint).
    UniqueViolation(String),
    /// Anything else SQLite refused.
    Sqlite { code: c_int, message: String },
    /// The statement text had a NUL byte, or a value was too large for SQLite's length type.
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

/// A prepared statement, finalized when dropped.
struct Statement {
    db: *mut ffi::sqlite3,
    stmt: *mut ffi::sqlite3_stmt,
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: `stmt` came from a successful prepare on `db` and is finalized exactly once.
        unsafe {
            ffi::sqlite3_finalize(self.stmt);
        }
    }
}

fn sql_text(sql: &str) -> Result<CString, RawError> {
    CString::new(sql).map_err(|_| RawError::Invalid("NUL in SQL".into()))
}

impl Statement {
    /// Prepares `sql` on `db`, an open handle the caller keeps locked while the statement lives.
    fn prepare(db: *mut ffi::sqlite3, sql: &CStr) -> Result<Self, RawError> {
        let mut stmt = ptr::null_mut();
        // SAFETY: `db` is sqlx's open connection, locked by the caller; `sql` is NUL-terminated
        // and outlives the call.
        let rc =
            unsafe { ffi::sqlite3_prepare_v2(db, sql.as_ptr(), -1, &mut stmt, ptr::null_mut()) };
        if rc != ffi::SQLITE_OK || stmt.is_null() {
            // SAFETY: as above; the message is copied before anything else runs on the handle.
            let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db)) }
                .to_string_lossy()
                .into_owned();
            return Err(RawError::Sqlite { code: rc, message });
        }
        Ok(Self { db, stmt })
    }

    fn error(&self, code: c_int) -> RawError {
        // SAFETY: `db` is the open handle the statement belongs to; the message is copied out
        // before any other call on the handle.
        let (extended, message) = unsafe {
            let message = CStr::from_ptr(ffi::sqlite3_errmsg(self.db))
                .to_string_lossy()
                .into_owned();
            (ffi::sqlite3_extended_errcode(self.db), message)
        };
        match extended {
            ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE => {
                RawError::UniqueViolation(message)
            }
            _ => RawError::Sqlite {
                code: if extended != 0 { extended } else { code },
                message,
            },
        }
    }

    fn bind(&self, index: c_int, arg: &Arg<'_>) -> Result<(), RawError> {
        let too_long = || RawError::Invalid("a value is too large for SQLite".into());
        // SAFETY: `stmt` is a live prepared statement and `index` is within its parameter
        // count (checked by the caller). Text and blob pointers are bound as SQLITE_STATIC: the
        // callers keep the values alive until they are bound again, stepped past or cleared
        // (`insert_all`, `bind_numbered` callers step before their values go).
        let rc = unsafe {
            match arg {
                Arg::Null => ffi::sqlite3_bind_null(self.stmt, index),
                Arg::Int(i) => ffi::sqlite3_bind_int64(self.stmt, index, *i),
                Arg::Float(f) => ffi::sqlite3_bind_double(self.stmt, index, *f),
                Arg::Text(text) => ffi::sqlite3_bind_text(
                    self.stmt,
                    index,
                    text.as_ptr().cast(),
                    c_int::try_from(text.len()).map_err(|_| too_long())?,
                    ffi::SQLITE_STATIC(),
                ),
                Arg::Blob(bytes) => ffi::sqlite3_bind_blob(
                    self.stmt,
                    index,
                    bytes.as_ptr().cast(),
                    c_int::try_from(bytes.len()).map_err(|_| too_long())?,
                    ffi::SQLITE_STATIC(),
                ),
            }
        };
        if rc == ffi::SQLITE_OK {
            Ok(())
        } else {
            Err(self.error(rc))
        }
    }

    /// Binds `params` to `$1`, `$2`, ... wherever each appears in the text.
    fn bind_numbered(&self, params: &[Arg<'_>]) -> Result<(), RawError> {
        // SAFETY: `stmt` is live.
        let count = unsafe { ffi::sqlite3_bind_parameter_count(self.stmt) };
        if c_int::try_from(params.len()).ok() != Some(count) {
            return Err(RawError::Invalid(format!(
                "{} values for {count} parameters",
                params.len()
            )));
        }
        for (i, value) in params.iter().enumerate() {
            let name = sql_text(&format!("${}", i + 1))?;
            // SAFETY: `stmt` is live and `name` is NUL-terminated.
            let index = unsafe { ffi::sqlite3_bind_parameter_index(self.stmt, name.as_ptr()) };
            if index == 0 {
                return Err(RawError::Invalid(format!("no parameter ${}", i + 1)));
            }
            self.bind(index, value)?;
        }
        Ok(())
    }

    /// Steps a statement that returns no row.
    fn run(&self) -> Result<(), RawError> {
        // SAFETY: `stmt` is live and fully bound.
        let rc = unsafe { ffi::sqlite3_step(self.stmt) };
        if rc != ffi::SQLITE_DONE {
            return Err(self.error(rc));
        }
        // SAFETY: as above. (A failed step's reset repeats that error, already reported.)
        unsafe {
            ffi::sqlite3_reset(self.stmt);
        }
        Ok(())
    }
}

/// Runs SQL text without parameters (transaction control).
fn execute(db: *mut ffi::sqlite3, sql: &CStr) -> Result<(), RawError> {
    Statement::prepare(db, sql)?.run()
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

/// Binds and steps `statement` (one `?` per value) once per row that `next_row` gives.
fn insert_all<'r>(statement: &Statement, mut next_row: impl NextRow<'r>) -> Result<(), RawError> {
    // SAFETY: `stmt` is live.
    let parameters = unsafe { ffi::sqlite3_bind_parameter_count(statement.stmt) };
    // One row's values, made just before they are bound. SQLite keeps pointers into the text
    // and blobs (SQLITE_STATIC) until they are bound again, so the buffer is refilled only
    // after the row was stepped, and emptied only after the bindings are cleared.
    let mut values: Vec<Arg<'r>> = Vec::with_capacity(usize::try_from(parameters).unwrap_or(0));
    let inserted = (|| {
        loop {
            values.clear();
            if !next_row(&mut values).map_err(RawError::Invalid)? {
                break;
            }
            if c_int::try_from(values.len()).ok() != Some(parameters) {
                return Err(RawError::Invalid(format!(
                    "a row of {} values for {parameters} parameters",
                    values.len()
                )));
            }
            for (i, value) in values.iter().enumerate() {
                statement.bind(i as c_int + 1, value)?;
            }
            statement.run()?;
        }
        Ok(())
    })();
    // SAFETY: unbinds the pointers into `values` and the caller's rows before either goes.
    unsafe {
        ffi::sqlite3_clear_bindings(statement.stmt);
    }
    drop(values);
    inserted
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
    let text = sql_text(insert)?;
    let then_text = then
        .iter()
        .map(|step| sql_text(step.sql))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handle = conn.lock_handle().await.map_err(RawError::Sqlx)?;
    let db = handle.as_raw_handle().as_ptr();
    // From here to the end nothing awaits: the transaction cannot be left open by a dropped
    // future.
    execute(db, c"BEGIN IMMEDIATE")?;
    let loaded = (|| {
        insert_all(&Statement::prepare(db, &text)?, rows)?;
        for (index, (step, sql)) in then.iter().zip(&then_text).enumerate() {
            let statement = Statement::prepare(db, sql)?;
            statement.bind_numbered(&step.params)?;
            statement.run()?;
            // SAFETY: `db` is the open handle; reads the count of the statement just run.
            if step.must_change && unsafe { ffi::sqlite3_changes64(db) } == 0 {
                return Err(RawError::NothingChanged(index));
            }
        }
        execute(db, c"COMMIT")
    })();
    // SAFETY: `db` is the open handle. (Every statement above is finalized by now.)
    if loaded.is_err() && unsafe { ffi::sqlite3_get_autocommit(db) } == 0 {
        let _ = execute(db, c"ROLLBACK");
    }
    drop(handle);
    loaded
}

/// Runs the query `sql` with `params` (the values of `$1`, `$2`, ...) on `conn`'s handle and
/// returns every row's first `width` columns by storage class: INTEGER, REAL, TEXT, BLOB, NULL.
pub(crate) async fn select_cells(
    conn: &mut sqlx::SqliteConnection,
    sql: &str,
    params: &[Arg<'_>],
    width: usize,
) -> Result<Cells, RawError> {
    let text = sql_text(sql)?;
    let mut handle = conn.lock_handle().await.map_err(RawError::Sqlx)?;
    let db = handle.as_raw_handle().as_ptr();
    let statement = Statement::prepare(db, &text)?;
    let stmt = statement.stmt;
    // SAFETY: `stmt` is live.
    let columns = unsafe { ffi::sqlite3_column_count(stmt) };
    if c_int::try_from(width).map_or(true, |w| w > columns) {
        return Err(RawError::Invalid(format!("{width} of {columns} columns")));
    }
    statement.bind_numbered(params)?;
    let mut read = Cells {
        width,
        cells: Vec::new(),
        arena: Vec::new(),
    };
    loop {
        // SAFETY: `stmt` is live and fully bound.
        let rc = unsafe { ffi::sqlite3_step(stmt) };
        if rc == ffi::SQLITE_DONE {
            break;
        }
        if rc != ffi::SQLITE_ROW {
            return Err(statement.error(rc));
        }
        for i in 0..width as c_int {
            // SAFETY: `stmt` is on a row and `i` is below its column count. Each pointer is read
            // right after the call that returns it (text or blob first, then its length, as
            // SQLite documents) and copied before the next step.
            let cell = unsafe {
                let mut copy = |data: *const u8| {
                    let len = usize::try_from(ffi::sqlite3_column_bytes(stmt, i)).unwrap_or(0);
                    let start = read.arena.len();
                    if !data.is_null() && len > 0 {
                        read.arena
                            .extend_from_slice(std::slice::from_raw_parts(data, len));
                    }
                    (start, read.arena.len())
                };
                match ffi::sqlite3_column_type(stmt, i) {
                    ffi::SQLITE_INTEGER => Cell::Int(ffi::sqlite3_column_int64(stmt, i)),
                    ffi::SQLITE_FLOAT => Cell::Float(ffi::sqlite3_column_double(stmt, i)),
                    ffi::SQLITE_NULL => Cell::Null,
                    ffi::SQLITE_BLOB => {
                        let (start, end) = copy(ffi::sqlite3_column_blob(stmt, i).cast());
                        Cell::Blob(start, end)
                    }
                    _ => {
                        let (start, end) = copy(ffi::sqlite3_column_text(stmt, i));
                        Cell::Text(start, end)
                    }
                }
            };
            read.cells.push(cell);
        }
    }
    drop(statement);
    drop(handle);
    Ok(read)
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
        // Both as values and with the keys as differences (the same rows either way).
        for compact in [false, true] {
            let mut page = cells.encode(room, compact).unwrap();
            let (frame, _) =
                dbsync_protocol::codec::encode_row_batch_in_place(&batch, &mut page, room, 1)
                    .unwrap();
            let arrived =
                dbsync_protocol::codec::decode_batch_exact(&frame, &Default::default()).unwrap();
            assert_eq!(arrived.rows.to_rows().unwrap(), read, "compact: {compact}");
            assert_eq!(arrived.last_key, vec![Value::Int(4)]);
        }
        // Past the last row: an empty page of three columns.
        let none = select_cells(&mut conn, "SELECT id, x, y FROM t WHERE id > 99", &[], 3)
            .await
            .unwrap();
        assert_eq!(none.rows(), 0);
        assert!(none.to_rows().unwrap().is_empty());
        assert!(!none.encode(0, false).unwrap().is_empty());
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
        for err in [bad.to_rows().unwrap_err(), bad.encode(0, true).unwrap_err()] {
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
