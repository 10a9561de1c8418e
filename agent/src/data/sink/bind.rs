//! Values bound as statement parameters on either engine, and PostgreSQL's text forms of values
//! (the cast path where no exact binary form fits).

use chrono::{DateTime, Datelike, NaiveDate, NaiveTime, Timelike};
use dbsync_protocol::Value;
use dbsync_protocol::columns::{Cursor, Scalar};
use dbsync_protocol::message::columnar::Kind;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Engine;

/// `$n`, or `$n::type` on PostgreSQL so text parameters become the column's type. On SQLite an
/// anonymous `?` (parameters are always numbered in order here): SQLite finds a named `$n` by a
/// linear scan, and sqlx looks up every parameter's name, so a 10,000-parameter batch spent 90 %
/// of its time in `sqlite3_bind_parameter_name`.
pub(super) fn push_placeholder(sql: &mut String, engine: Engine, n: usize, cast: &str) {
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

pub(super) fn insert_query<'a>(
    engine: Engine,
    table: &str,
    quoted: &[String],
    casts: &[String],
    rows: &'a [Vec<Value>],
    conflict: &str,
) -> (String, Vec<&'a Value>) {
    let mut params = Vec::with_capacity(rows.len() * quoted.len());
    // Written straight into one string: a 3,000-row SQLite statement has 30,000 placeholders.
    // The sender's values go in as they are, into `GENERATED ALWAYS` identity columns too.
    let overriding = if engine == Engine::Postgres {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let mut sql = format!(
        "INSERT INTO {table} ({}){overriding} VALUES ",
        quoted.join(", ")
    );
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

pub(super) fn existing_query<'a>(
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

pub(super) trait Bind<'q>: Sized {
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
pub(super) fn bind_pg<'q, Q: Bind<'q>>(query: Q, value: &Value, _engine: Engine) -> Result<Q> {
    Ok(query.bind_text(pg_text(value)?))
}

/// `rows` encoded rows, read through one cursor per column, as SQLite binds them.
pub(super) fn sqlite_rows<'r>(
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
pub(super) fn sqlite_scalar(
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
pub(crate) fn sqlite_arg(value: &Value) -> Result<crate::sqlite_raw::Arg<'_>> {
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

pub(super) fn bind_sqlite<'q, Q: Bind<'q>>(query: Q, value: &Value, _engine: Engine) -> Result<Q> {
    use crate::sqlite_raw::Arg;
    Ok(match sqlite_arg(value)? {
        Arg::Null => query.bind_text(None),
        Arg::Int(i) => query.bind_i64(i),
        Arg::Float(f) => query.bind_f64(f),
        Arg::Text(text) => query.bind_text(Some(text.into_owned())),
        Arg::Blob(bytes) => query.bind_bytes(bytes.into_owned()),
    })
}

pub(super) fn array_json(value: &Value) -> serde_json::Value {
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

pub(super) fn date_text(days: i32) -> Result<String> {
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

pub(super) fn with_era(date: NaiveDate, time: String) -> String {
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

pub(super) fn timestamp_text(micros: i64, zone: &str) -> Result<String> {
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

pub(super) fn range(what: &str) -> Error {
    Error::invalid("value", format!("{what} out of range"))
}

pub(super) fn quote_array_element(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

pub(super) fn array_literal(items: &[Value]) -> Result<String> {
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
    use chrono::Datelike;

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
