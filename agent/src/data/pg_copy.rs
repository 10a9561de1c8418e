//! Rows as PostgreSQL's binary `COPY` stream, the fastest way into a table: the server runs each
//! column type's binary receive function (no text parsing for numbers, timestamps or uuids) and
//! inserts in bulk. The sink uses it where a batch meets no existing key (see `sink.rs`).
//!
//! Only exact encodings are written: a value whose kind does not match the target column's type
//! (say text into an integer column) makes [`encode`] give up, and the sink takes its
//! text-and-cast path instead, which converts the way an `INSERT` would.

use dbsync_protocol::Value;
use dbsync_protocol::columns::{Cursor, Scalar};
use dbsync_protocol::message::columnar::Kind;

use crate::batch::Rows;
use crate::source::pg_binary::{PG_EPOCH_DAYS, PG_EPOCH_MICROS};

/// `PGCOPY\n\377\r\n\0`, then flags and header-extension length (both 0).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The trailer: a field count of -1.
const TRAILER: &[u8] = &[0xff, 0xff];

/// How one target column's values are written, from its `format_type` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    Int8,
    Int4,
    Int2,
    Float8,
    Float4,
    Bool,
    Uuid,
    Bytea,
    Text,
    Json,
    Jsonb,
    Numeric,
    Timestamp,
    TimestampTz,
    Date,
    Time,
}

impl Column {
    /// The encoding for a column of PostgreSQL type `native` (as `format_type` prints it, typmod
    /// included), or `None` when this module has no binary form for it.
    pub(crate) fn for_type(native: &str) -> Option<Self> {
        // Drop a typmod: `numeric(12,2)`, `character varying(40)`, `timestamp(3) with time zone`.
        let base: String = match (native.find('('), native.find(')')) {
            (Some(open), Some(close)) if open < close => {
                format!("{}{}", &native[..open], &native[close + 1..])
            }
            _ => native.to_owned(),
        };
        Some(match base.as_str() {
            "bigint" => Self::Int8,
            "integer" => Self::Int4,
            "smallint" => Self::Int2,
            "double precision" => Self::Float8,
            "real" => Self::Float4,
            "boolean" => Self::Bool,
            "uuid" => Self::Uuid,
            "bytea" => Self::Bytea,
            "text" | "character varying" | "character" => Self::Text,
            "json" => Self::Json,
            "jsonb" => Self::Jsonb,
            "numeric" => Self::Numeric,
            "timestamp without time zone" => Self::Timestamp,
            "timestamp with time zone" => Self::TimestampTz,
            "date" => Self::Date,
            "time without time zone" => Self::Time,
            _ => return None,
        })
    }
}

/// The binary `COPY` data (header, rows, trailer) of `rows` for columns written as `columns`, or
/// `None` when some value has no exact binary form for its column.
#[cfg(test)]
pub(crate) fn encode(rows: Rows<'_>, columns: &[Column]) -> Option<Vec<u8>> {
    let mut encoder = Encoder::new(rows, columns)?;
    encoder.fill(usize::MAX)?;
    Some(encoder.out)
}

/// Where an [`Encoder`] reads its rows.
enum Source<'a> {
    Values(std::slice::Iter<'a, Vec<Value>>),
    /// Encoded rows, read in place with a cursor per column, row by row: no [`Value`] is built.
    Cursors(Vec<Cursor<'a>>),
}

/// Writes a batch's rows as binary `COPY` data a chunk at a time, so the server can work on one
/// chunk while the next is written.
pub(crate) struct Encoder<'a> {
    source: Source<'a>,
    columns: &'a [Column],
    field_count: [u8; 2],
    /// Rows not written yet.
    left: usize,
    started: bool,
    /// The chunk last written by [`Encoder::fill`].
    pub(crate) out: Vec<u8>,
}

impl<'a> Encoder<'a> {
    /// An encoder of `rows` into columns written as `columns`; `None` when the rows do not
    /// have one value per column, or some column of encoded rows holds whole values (mixed
    /// kinds, intervals, arrays), which have no binary form here.
    pub(crate) fn new(rows: Rows<'a>, columns: &'a [Column]) -> Option<Self> {
        let field_count = i16::try_from(columns.len()).ok()?.to_be_bytes();
        let (source, left) = match rows {
            Rows::Values(values) => {
                if values.iter().any(|row| row.len() != columns.len()) {
                    return None;
                }
                (Source::Values(values.iter()), values.len())
            }
            Rows::Encoded(encoded) => {
                let cursors = encoded.cursors()?;
                if cursors.len() != columns.len() && !encoded.is_empty() {
                    return None;
                }
                (Source::Cursors(cursors), encoded.len())
            }
        };
        Some(Self {
            source,
            columns,
            field_count,
            left,
            started: false,
            out: Vec::new(),
        })
    }

    /// Replaces [`Encoder::out`] with the next chunk of at most `max_rows` rows (the header
    /// before the first row, the trailer after the last): `Some(true)` while rows are left,
    /// `Some(false)` once the trailer is written, `None` when a value has no exact binary form
    /// for its column (or an encoded value is malformed).
    pub(crate) fn fill(&mut self, max_rows: usize) -> Option<bool> {
        let rows = self.left.min(max_rows);
        self.out.clear();
        self.out
            .reserve(rows * (2 + self.columns.len() * 16) + HEADER.len());
        if !self.started {
            self.out.extend_from_slice(HEADER);
            self.started = true;
        }
        let out = &mut self.out;
        for _ in 0..rows {
            out.extend_from_slice(&self.field_count);
            match &mut self.source {
                Source::Values(values) => {
                    for (value, column) in values.next()?.iter().zip(self.columns) {
                        let (kind, scalar) = scalar_of(value)?;
                        field(out, kind, scalar, *column)?;
                    }
                }
                Source::Cursors(cursors) => {
                    for (cursor, column) in cursors.iter_mut().zip(self.columns) {
                        let kind = cursor.kind();
                        field(out, kind, cursor.next_scalar().ok()?, *column)?;
                    }
                }
            }
        }
        self.left -= rows;
        if self.left == 0 {
            out.extend_from_slice(TRAILER);
            return Some(false);
        }
        Some(true)
    }
}

/// A value as the scalar of its kind, the way a batch's column carries it (`None` for an
/// interval or an array: no binary form here). NULL's kind does not matter.
fn scalar_of(value: &Value) -> Option<(Kind, Scalar<'_>)> {
    Some(match value {
        Value::Null => (Kind::Int, Scalar::Null),
        Value::Bool(b) => (Kind::Bool, Scalar::Bool(*b)),
        Value::Int(i) => (Kind::Int, Scalar::Int(*i)),
        Value::Float(f) => (Kind::Float, Scalar::Float(*f)),
        Value::Numeric(t) => (Kind::Numeric, Scalar::Str(t.as_bytes())),
        Value::Text(t) => (Kind::Text, Scalar::Str(t.as_bytes())),
        Value::Json(t) => (Kind::Json, Scalar::Str(t.as_bytes())),
        Value::Bytes(b) => (Kind::Bytes, Scalar::Bin(b)),
        Value::Uuid(u) => (Kind::Uuid, Scalar::Bin(u)),
        Value::Date(d) => (Kind::Date, Scalar::Int(i64::from(*d))),
        Value::Time(t) => (Kind::Time, Scalar::Int(*t)),
        Value::Timestamp(t) => (Kind::Timestamp, Scalar::Int(*t)),
        Value::TimestampTz(t) => (Kind::TimestampTz, Scalar::Int(*t)),
        Value::Interval { .. } | Value::Array(_) => return None,
    })
}

/// Writes one field, a value of `kind`: its length (-1 for NULL), then its bytes.
fn field(out: &mut Vec<u8>, kind: Kind, scalar: Scalar<'_>, column: Column) -> Option<()> {
    fn fixed(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn varying(out: &mut Vec<u8>, prefix: &[u8], bytes: &[u8]) -> Option<()> {
        let len = i32::try_from(prefix.len() + bytes.len()).ok()?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(prefix);
        out.extend_from_slice(bytes);
        Some(())
    }
    match (kind, scalar, column) {
        (_, Scalar::Null, _) => out.extend_from_slice(&(-1i32).to_be_bytes()),
        (Kind::Int, Scalar::Int(i), Column::Int8) => fixed(out, &i.to_be_bytes()),
        (Kind::Int, Scalar::Int(i), Column::Int4) => {
            fixed(out, &i32::try_from(i).ok()?.to_be_bytes())
        }
        (Kind::Int, Scalar::Int(i), Column::Int2) => {
            fixed(out, &i16::try_from(i).ok()?.to_be_bytes())
        }
        (Kind::Float, Scalar::Float(f), Column::Float8) => fixed(out, &f.to_be_bytes()),
        // Only where the value came from a `real` (or fits one exactly): no silent rounding.
        (Kind::Float, Scalar::Float(f), Column::Float4)
            if f64::from(f as f32) == f || f.is_nan() =>
        {
            fixed(out, &(f as f32).to_be_bytes())
        }
        (Kind::Bool, Scalar::Bool(b), Column::Bool) => fixed(out, &[u8::from(b)]),
        (Kind::Uuid, Scalar::Bin(bytes), Column::Uuid) if bytes.len() == 16 => fixed(out, bytes),
        (Kind::Bytes, Scalar::Bin(bytes), Column::Bytea) => varying(out, &[], bytes)?,
        // Text goes as it came: PostgreSQL verifies the encoding of every text it receives, so
        // a batch with bytes that are not UTF-8 fails its `COPY` and is rolled back.
        (Kind::Text, Scalar::Str(text), Column::Text) => varying(out, &[], text)?,
        (Kind::Json | Kind::Text, Scalar::Str(text), Column::Json) => varying(out, &[], text)?,
        // jsonb's binary form is a version byte (1) and the document as text.
        (Kind::Json | Kind::Text, Scalar::Str(text), Column::Jsonb) => varying(out, &[1], text)?,
        (Kind::Numeric, Scalar::Str(text), Column::Numeric) => {
            let bytes = numeric(std::str::from_utf8(text).ok()?)?;
            varying(out, &[], &bytes)?
        }
        (Kind::Timestamp, Scalar::Int(micros), Column::Timestamp)
        | (Kind::TimestampTz, Scalar::Int(micros), Column::TimestampTz) => {
            let micros = match micros {
                // PostgreSQL's ±infinity sentinels are kept as they are.
                i64::MIN | i64::MAX => micros,
                m => m.checked_sub(PG_EPOCH_MICROS)?,
            };
            fixed(out, &micros.to_be_bytes())
        }
        (Kind::Date, Scalar::Int(days), Column::Date) => {
            let days = match i32::try_from(days).ok()? {
                d @ (i32::MIN | i32::MAX) => d,
                d => d.checked_sub(PG_EPOCH_DAYS)?,
            };
            fixed(out, &days.to_be_bytes())
        }
        (Kind::Time, Scalar::Int(micros), Column::Time) => fixed(out, &micros.to_be_bytes()),
        _ => return None,
    }
    Some(())
}

/// Decimal text (`-12.3400`, `NaN`, `Infinity`) as PostgreSQL's binary numeric: digit count,
/// weight (of the first base-10000 digit), sign, display scale, then the base-10000 digits.
/// `None` for anything else (exponents included: PostgreSQL never prints one).
pub(crate) fn numeric(text: &str) -> Option<Vec<u8>> {
    let special = |sign: u16| {
        let mut out = vec![0u8; 8];
        out[4..6].copy_from_slice(&sign.to_be_bytes());
        Some(out)
    };
    match text {
        "NaN" => return special(0xC000),
        "Infinity" => return special(0xD000),
        "-Infinity" => return special(0xF000),
        _ => {}
    }
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (integer, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    if integer.is_empty() && fraction.is_empty()
        || !integer
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let dscale = u16::try_from(fraction.len())
        .ok()
        .filter(|s| *s <= 0x3FFF)?;
    let integer = integer.trim_start_matches('0');
    // Pad the integer part on the left and the fraction on the right to whole 4-digit groups.
    let lead = (4 - integer.len() % 4) % 4;
    let trail = (4 - fraction.len() % 4) % 4;
    let digits: Vec<u8> = std::iter::repeat_n(0, lead)
        .chain(integer.bytes().map(|b| b - b'0'))
        .chain(fraction.bytes().map(|b| b - b'0'))
        .chain(std::iter::repeat_n(0, trail))
        .collect();
    let mut groups: Vec<i16> = digits
        .chunks(4)
        .map(|g| g.iter().fold(0i16, |acc, d| acc * 10 + i16::from(*d)))
        .collect();
    let mut weight = i32::try_from((lead + integer.len()) / 4).ok()? - 1;
    // Leading zero groups (a value below 1) lower the weight; trailing ones are dropped.
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    weight -= leading as i32;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let (weight, sign) = if groups.is_empty() {
        (0, 0x0000u16)
    } else {
        (weight, if negative { 0x4000 } else { 0x0000 })
    };
    let mut out = Vec::with_capacity(8 + groups.len() * 2);
    out.extend_from_slice(&u16::try_from(groups.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&i16::try_from(weight).ok()?.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for group in groups {
        out.extend_from_slice(&group.to_be_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pg_binary::numeric_to_string;

    #[test]
    fn numerics_round_trip_through_the_binary_form() {
        for text in [
            "0",
            "0.00",
            "1",
            "-1",
            "12.34",
            "-12.3400",
            "10000",
            "9999.9999",
            "0.0001",
            "0.000012",
            "123456789012345678901234567890.123456789",
            "-0.5",
            "100000000",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            let bytes = numeric(text).unwrap_or_else(|| panic!("{text} encodes"));
            assert_eq!(numeric_to_string(&bytes).unwrap(), text, "{text}");
        }
        // Forms PostgreSQL would also read, normalised.
        assert_eq!(
            numeric_to_string(&numeric("+007.50").unwrap()).unwrap(),
            "7.50"
        );
        assert_eq!(numeric_to_string(&numeric(".5").unwrap()).unwrap(), "0.5");
        assert_eq!(numeric_to_string(&numeric("-0").unwrap()).unwrap(), "0");
        for bad in ["", "-", ".", "1e5", "1.2.3", "12a", " 1", "nan"] {
            assert_eq!(numeric(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn column_types_and_mismatches() {
        assert_eq!(Column::for_type("numeric(12,2)"), Some(Column::Numeric));
        assert_eq!(
            Column::for_type("timestamp(3) with time zone"),
            Some(Column::TimestampTz)
        );
        assert_eq!(
            Column::for_type("character varying(40)"),
            Some(Column::Text)
        );
        assert_eq!(Column::for_type("integer[]"), None);
        assert_eq!(Column::for_type("interval"), None);
        let columns = [Column::Int4, Column::Text];
        let rows = vec![vec![Value::Int(7), Value::Null]];
        let data = encode(Rows::Values(&rows), &columns).unwrap();
        assert!(data.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert!(data.ends_with(&[0xff, 0xff]));
        // 19-byte header, field count, 4-byte length + 4-byte int, -1 for NULL, trailer.
        assert_eq!(data.len(), 19 + 2 + 8 + 4 + 2);
        assert_eq!(
            encode(
                Rows::Values(&[vec![Value::Int(1 << 40), Value::Null]]),
                &columns
            ),
            None
        );
        assert_eq!(
            encode(
                Rows::Values(&[vec![Value::Text("7".into()), Value::Null]]),
                &columns
            ),
            None
        );
        assert_eq!(
            encode(
                Rows::Values(&[vec![Value::Float(0.1), Value::Null]]),
                &[Column::Float4, Column::Text]
            ),
            None
        );
    }

    /// The rows of a batch as a receiver gets them (through the wire codec).
    fn received(rows: &[Vec<Value>]) -> dbsync_protocol::columns::EncodedRows {
        let width = rows.first().map_or(0, Vec::len);
        let batch = dbsync_protocol::message::RowBatch {
            request_id: 1,
            seq: 0,
            columns: (0..width).map(|i| format!("c{i}")).collect(),
            rows: rows.to_vec(),
            last_key: vec![],
            transfer_id: String::new(),
        };
        let frame = dbsync_protocol::codec::encode(
            &dbsync_protocol::Message::RowBatch(batch),
            dbsync_protocol::codec::DEFAULT_ZSTD_LEVEL,
        )
        .unwrap();
        dbsync_protocol::codec::decode_batch_exact(&frame, &Default::default())
            .unwrap()
            .rows
    }

    #[test]
    fn encoded_rows_make_the_same_copy_data_as_values() {
        let columns = [
            Column::Int8,
            Column::Int4,
            Column::Int2,
            Column::Float8,
            Column::Float4,
            Column::Bool,
            Column::Uuid,
            Column::Bytea,
            Column::Text,
            Column::Json,
            Column::Jsonb,
            Column::Numeric,
            Column::Timestamp,
            Column::TimestampTz,
            Column::Date,
            Column::Time,
        ];
        let row = |i: i64| {
            vec![
                Value::Int(i << 40),
                Value::Int(-i),
                Value::Int(i % 300),
                Value::Float(i as f64 / 3.0),
                Value::Float(f64::from(i as f32 * 0.5)),
                Value::Bool(i % 2 == 0),
                Value::Uuid([i as u8; 16]),
                Value::Bytes(vec![0, 255, i as u8]),
                Value::Text(format!("row {i} ü")),
                Value::Json(format!("{{\"n\": {i}}}")),
                Value::Text(format!("[{i}]")),
                Value::Numeric(format!("-{i}.50")),
                Value::Timestamp(i * 1_000_000),
                Value::TimestampTz(if i == 2 { i64::MAX } else { -i }),
                Value::Date(i as i32 - 20_000),
                Value::Time(i * 7),
            ]
        };
        let mut rows: Vec<Vec<Value>> = (0..50).map(row).collect();
        rows[3] = vec![Value::Null; columns.len()];
        rows[4][8] = Value::Null;
        let from_values = encode(Rows::Values(&rows), &columns).unwrap();
        assert_eq!(
            encode(Rows::Encoded(&received(&rows)), &columns).as_ref(),
            Some(&from_values)
        );
        // What values refuse, encoded rows refuse: a value too wide, a kind that does not fit.
        for (column, value) in [
            (Column::Int2, Value::Int(1 << 20)),
            (Column::Int8, Value::Text("1".into())),
            (Column::Float4, Value::Float(0.1)),
        ] {
            let rows = vec![vec![value]];
            assert_eq!(encode(Rows::Values(&rows), &[column]), None);
            assert_eq!(encode(Rows::Encoded(&received(&rows)), &[column]), None);
        }
        // A column of whole values has no cursor; the sink reads such rows as values.
        let mixed = vec![vec![Value::Int(1)], vec![Value::Text("a".into())]];
        assert_eq!(
            encode(Rows::Encoded(&received(&mixed)), &[Column::Text]),
            None
        );
        assert_eq!(
            encode(Rows::Encoded(&received(&[])), &columns).map(|d| d.len()),
            Some(HEADER.len() + TRAILER.len())
        );
    }
}
