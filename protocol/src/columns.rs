//! A received row batch read in place: its columns stay in the decompressed payload, and a
//! reader walks each column's values as borrowed scalars ([`Scalar`]). A receiver that writes
//! rows in some binary form of its own (PostgreSQL's `COPY`) transcodes them from here with no
//! [`Value`] per cell; [`EncodedRows::to_rows`] builds values where they are needed.
//!
//! The layout is the one [`crate::message::columnar`] writes. [`decode_batch`] checks the batch's
//! shape before it returns (its fields; every column `[kind, values]`, of a known kind, all of
//! one length, one per column name); each value is checked where it is read: against its
//! column's kind by the cursor or by [`Scalar::value`], text as UTF-8 where it becomes a `String`.
//! (Text that goes straight into PostgreSQL is checked there: the server verifies the encoding
//! of every text it receives.) A batch whose values break the rules is an error when read,
//! never a panic.

use crate::error::ProtocolError;
use crate::message::RowBatch;
use crate::message::columnar::{DELTAS, Kind, MIXED, PACKED, UUID_BYTES};
use crate::value::Value;

/// One value of a column whose values are all of one kind (its [`Kind`] says which [`Value`]
/// variant it stands for), borrowed from the payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    /// NULL.
    Null,
    /// A bool.
    Bool(bool),
    /// An integer: ints, dates, times and timestamps.
    Int(i64),
    /// A float.
    Float(f64),
    /// Text, numeric text or JSON text: the bytes as sent, UTF-8 from an honest sender
    /// ([`Scalar::value`] checks).
    Str(&'a [u8]),
    /// Bytes, or a UUID's 16 bytes.
    Bin(&'a [u8]),
}

impl Scalar<'_> {
    /// The value this scalar stands for in a column of `kind`.
    pub fn value(self, kind: Kind) -> Result<Value, ProtocolError> {
        let mismatch = || bad(format!("a {kind:?} column holds {self:?}"));
        let text = |bytes: &[u8]| {
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| bad("a string that is not UTF-8"))
        };
        Ok(match (kind, self) {
            (_, Self::Null) => Value::Null,
            (Kind::Bool, Self::Bool(b)) => Value::Bool(b),
            (Kind::Int, Self::Int(i)) => Value::Int(i),
            (Kind::Float, Self::Float(f)) => Value::Float(f),
            (Kind::Numeric, Self::Str(s)) => Value::Numeric(text(s)?),
            (Kind::Text, Self::Str(s)) => Value::Text(text(s)?),
            (Kind::Json, Self::Str(s)) => Value::Json(text(s)?),
            (Kind::Bytes, Self::Bin(b)) => Value::Bytes(b.to_vec()),
            (Kind::Uuid, Self::Bin(b)) => {
                Value::Uuid(<[u8; 16]>::try_from(b).map_err(|_| bad("a uuid is 16 bytes"))?)
            }
            (Kind::Date, Self::Int(d)) => {
                Value::Date(i32::try_from(d).map_err(|_| bad("a date out of range"))?)
            }
            (Kind::Time, Self::Int(t)) => Value::Time(t),
            (Kind::Timestamp, Self::Int(t)) => Value::Timestamp(t),
            (Kind::TimestampTz, Self::Int(t)) => Value::TimestampTz(t),
            _ => return Err(mismatch()),
        })
    }
}

fn bad(reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed(reason.into())
}

/// A MessagePack reader over a slice, for the few shapes a batch uses.
#[derive(Debug, Clone, Copy)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.rest.len() {
            return Err(ProtocolError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, width: usize) -> Result<u64, ProtocolError> {
        Ok(self
            .take(width)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn array_len(&mut self) -> Result<usize, ProtocolError> {
        let marker = self.byte()?;
        let len = match marker {
            0x90..=0x9f => u64::from(marker & 0x0f),
            0xdc => self.be(2)?,
            0xdd => self.be(4)?,
            _ => return Err(bad(format!("an array expected, marker {marker:#04x}"))),
        };
        // Every item takes a byte at least: a length past the input is a lie.
        if len > self.rest.len() as u64 {
            return Err(ProtocolError::LengthOutOfBounds {
                declared: len,
                available: self.rest.len() as u64,
            });
        }
        Ok(len as usize)
    }

    fn uint(&mut self) -> Result<u64, ProtocolError> {
        if self.rest.first() == Some(&0xcf) {
            self.take(1)?;
            return self.be(8);
        }
        match self.scalar()? {
            Scalar::Int(i) => u64::try_from(i).map_err(|_| bad("a negative count")),
            other => Err(bad(format!(
                "an unsigned integer expected, found {other:?}"
            ))),
        }
    }

    /// A binary's header: its length, which must fit in what is left.
    fn bin_len(&mut self) -> Result<usize, ProtocolError> {
        let marker = self.byte()?;
        let len = match marker {
            0xc4 => self.be(1)?,
            0xc5 => self.be(2)?,
            0xc6 => self.be(4)?,
            _ => return Err(bad(format!("a binary expected, marker {marker:#04x}"))),
        };
        if len > self.rest.len() as u64 {
            return Err(ProtocolError::LengthOutOfBounds {
                declared: len,
                available: self.rest.len() as u64,
            });
        }
        Ok(len as usize)
    }

    fn str(&mut self) -> Result<&'a str, ProtocolError> {
        match self.scalar()? {
            Scalar::Str(s) => std::str::from_utf8(s).map_err(|_| bad("a string that is not UTF-8")),
            other => Err(bad(format!("a string expected, found {other:?}"))),
        }
    }

    /// Steps over the next value, whatever it is (the input passed [`crate::msgpack::check`],
    /// so every length in it fits).
    fn skip(&mut self) -> Result<(), ProtocolError> {
        let mut pending = 1u64;
        while pending > 0 {
            pending -= 1;
            let marker = self.byte()?;
            let (data, items) = match marker {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
                0x90..=0x9f => (0, u64::from(marker & 0x0f)),
                0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
                0xc4 | 0xd9 => (self.be(1)?, 0),
                0xc5 | 0xda => (self.be(2)?, 0),
                0xc6 | 0xdb => (self.be(4)?, 0),
                0xc7 => (self.be(1)? + 1, 0),
                0xc8 => (self.be(2)? + 1, 0),
                0xc9 => (self.be(4)? + 1, 0),
                0xca | 0xce | 0xd2 => (4, 0),
                0xcb | 0xcf | 0xd3 => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.be(2)?),
                0xdd => (0, self.be(4)?),
                0xde => (0, 2 * self.be(2)?),
                0xdf => (0, 2 * self.be(4)?),
                0xc1 => return Err(bad("reserved MessagePack marker 0xc1")),
            };
            self.take(usize::try_from(data).map_err(|_| ProtocolError::Truncated)?)?;
            pending += items;
        }
        Ok(())
    }

    /// The next value, which must be a scalar.
    fn scalar(&mut self) -> Result<Scalar<'a>, ProtocolError> {
        let marker = self.byte()?;
        let text = |reader: &mut Self, len: u64| -> Result<Scalar<'a>, ProtocolError> {
            let len = usize::try_from(len).map_err(|_| ProtocolError::Truncated)?;
            reader.take(len).map(Scalar::Str)
        };
        let binary = |reader: &mut Self, len: u64| -> Result<Scalar<'a>, ProtocolError> {
            let len = usize::try_from(len).map_err(|_| ProtocolError::Truncated)?;
            reader.take(len).map(Scalar::Bin)
        };
        Ok(match marker {
            0x00..=0x7f => Scalar::Int(i64::from(marker)),
            0xe0..=0xff => Scalar::Int(i64::from(marker as i8)),
            0xc0 => Scalar::Null,
            0xc2 => Scalar::Bool(false),
            0xc3 => Scalar::Bool(true),
            0xcc => Scalar::Int(self.be(1)? as i64),
            0xcd => Scalar::Int(self.be(2)? as i64),
            0xce => Scalar::Int(self.be(4)? as i64),
            0xcf => Scalar::Int(
                i64::try_from(self.be(8)?).map_err(|_| bad("an integer beyond 64 signed bits"))?,
            ),
            0xd0 => Scalar::Int(i64::from(self.be(1)? as u8 as i8)),
            0xd1 => Scalar::Int(i64::from(self.be(2)? as u16 as i16)),
            0xd2 => Scalar::Int(i64::from(self.be(4)? as u32 as i32)),
            0xd3 => Scalar::Int(self.be(8)? as i64),
            0xca => Scalar::Float(f64::from(f32::from_bits(self.be(4)? as u32))),
            0xcb => Scalar::Float(f64::from_bits(self.be(8)?)),
            0xa0..=0xbf => return text(self, u64::from(marker & 0x1f)),
            0xd9 => {
                let len = self.be(1)?;
                return text(self, len);
            }
            0xda => {
                let len = self.be(2)?;
                return text(self, len);
            }
            0xdb => {
                let len = self.be(4)?;
                return text(self, len);
            }
            0xc4 => {
                let len = self.be(1)?;
                return binary(self, len);
            }
            0xc5 => {
                let len = self.be(2)?;
                return binary(self, len);
            }
            0xc6 => {
                let len = self.be(4)?;
                return binary(self, len);
            }
            other => return Err(bad(format!("a scalar expected, marker {other:#04x}"))),
        })
    }

    /// The next value as a whole [`Value`] (of a column of mixed kinds), nested at most
    /// `max_depth` deep.
    fn value(&mut self, max_depth: usize) -> Result<Value, ProtocolError> {
        let mut read = self.rest;
        let mut deserializer = rmp_serde::Deserializer::new(&mut read);
        deserializer.set_max_depth(max_depth);
        let value = serde::Deserialize::deserialize(&mut deserializer)
            .map_err(|err: rmp_serde::decode::Error| bad(err.to_string()))?;
        self.rest = read;
        Ok(value)
    }
}

/// One column's values, read in order.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    kind: Kind,
    /// The column's values, and nothing after them.
    reader: Reader<'a>,
    /// A column of differences ([`DELTAS`]): the last value read.
    last: Option<i64>,
    /// A column of packed UUIDs ([`PACKED`]).
    packed: bool,
}

impl<'a> Cursor<'a> {
    /// The column's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The next value. Past the column's last value this is an error, never a panic; a value
    /// of another kind than the column's is returned as it is (the reader refuses it).
    pub fn next_scalar(&mut self) -> Result<Scalar<'a>, ProtocolError> {
        if self.packed {
            return self.reader.take(UUID_BYTES).map(Scalar::Bin);
        }
        let scalar = self.reader.scalar()?;
        Ok(match (&mut self.last, scalar) {
            (Some(last), Scalar::Int(difference)) => {
                *last = last.wrapping_add(difference);
                Scalar::Int(*last)
            }
            _ => scalar,
        })
    }
}

/// The first `count` values of a column written as differences ([`DELTAS`]), `nil` or
/// integers, written as the values they stand for.
pub(crate) fn summed(bytes: &[u8], count: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut cursor = Cursor {
        kind: Kind::Int,
        reader: Reader { rest: bytes },
        last: Some(0),
        packed: false,
    };
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for _ in 0..count {
        // Writes into a `Vec` cannot fail.
        match cursor.next_scalar()? {
            Scalar::Null => out.push(0xc0),
            Scalar::Int(value) => drop(rmp::encode::write_sint(&mut out, value)),
            other => return Err(bad(format!("an integer expected, found {other:?}"))),
        }
    }
    Ok(out)
}

/// How a column's values are written.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Form {
    /// An array of values.
    Values,
    /// An array of integers as differences ([`DELTAS`]).
    Deltas,
    /// One binary of 16 bytes a value ([`PACKED`]).
    Packed,
}

/// Where one column's values lie in the payload, whether they are bare scalars of one kind or
/// whole values, and in what form.
#[derive(Debug, Clone, PartialEq)]
struct ColumnAt {
    kind: Option<Kind>,
    form: Form,
    values: std::ops::Range<usize>,
}

impl ColumnAt {
    fn cursor<'a>(&self, payload: &'a [u8]) -> Cursor<'a> {
        Cursor {
            kind: self.kind.unwrap_or(Kind::Int),
            reader: Reader {
                rest: &payload[self.values.clone()],
            },
            last: (self.form == Form::Deltas).then_some(0),
            packed: self.form == Form::Packed,
        }
    }
}

/// A batch's rows as they arrived: the decompressed payload and where each column starts in it.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRows {
    payload: Vec<u8>,
    /// The columns' bytes (the `rows` field of the payload).
    span: std::ops::Range<usize>,
    columns: Vec<ColumnAt>,
    rows: usize,
    max_depth: usize,
}

impl EncodedRows {
    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The columns as the sender encoded them (what `codec::encode_row_batch_columns` and `codec::encode_row_batch_in_place` take).
    pub fn as_bytes(&self) -> &[u8] {
        &self.payload[self.span.clone()]
    }

    /// A cursor over each column's values, when every column holds scalars of one kind (a column
    /// of whole values, mixed kinds or intervals and arrays, gives `None`: read
    /// [`EncodedRows::to_rows`] instead).
    pub fn cursors(&self) -> Option<Vec<Cursor<'_>>> {
        self.columns
            .iter()
            .map(|column| column.kind.map(|_| column.cursor(&self.payload)))
            .collect()
    }

    /// Each column's tag as it was sent: its kind, plus [`DELTAS`] or [`PACKED`] for a compact
    /// form, or 255 for whole values (what a peer chose to send, for diagnostics and tests).
    pub fn column_tags(&self) -> Vec<u8> {
        self.columns
            .iter()
            .map(|column| match (column.kind, column.form) {
                (None, _) => MIXED,
                (Some(kind), Form::Values) => kind as u8,
                (Some(kind), Form::Deltas) => kind as u8 | DELTAS,
                (Some(kind), Form::Packed) => kind as u8 | PACKED,
            })
            .collect()
    }

    /// The rows as values.
    pub fn to_rows(&self) -> Result<Vec<Vec<Value>>, ProtocolError> {
        let mut rows: Vec<Vec<Value>> = (0..self.rows)
            .map(|_| Vec::with_capacity(self.columns.len()))
            .collect();
        for column in &self.columns {
            let mut cursor = column.cursor(&self.payload);
            for row in &mut rows {
                row.push(match column.kind {
                    Some(kind) => cursor.next_scalar()?.value(kind)?,
                    None => cursor.reader.value(self.max_depth)?,
                });
            }
        }
        Ok(rows)
    }
}

/// A received row batch, its rows left encoded ([`EncodedRows`]); the fields are
/// [`RowBatch`]'s.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedBatch {
    /// The pull this answers.
    pub request_id: u64,
    /// Batch number within the pull, from 0.
    pub seq: u64,
    /// Column names, in row order.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: EncodedRows,
    /// Key of the last row, to resume after.
    pub last_key: Vec<Value>,
    /// The sender's transfer record.
    pub transfer_id: String,
}

impl ReceivedBatch {
    /// The batch with its rows as values.
    pub fn into_row_batch(self) -> Result<RowBatch, ProtocolError> {
        Ok(RowBatch {
            rows: self.rows.to_rows()?,
            request_id: self.request_id,
            seq: self.seq,
            columns: self.columns,
            last_key: self.last_key,
            transfer_id: self.transfer_id,
        })
    }
}

/// Reads a row batch's payload (decompressed, and through [`crate::msgpack::check`]): its
/// fields and the shape of its columns, whose values are left in place (see the module's
/// documentation for what is checked when).
pub fn decode_batch(payload: Vec<u8>, max_depth: usize) -> Result<ReceivedBatch, ProtocolError> {
    let mut reader = Reader { rest: &payload };
    let at = |reader: &Reader<'_>| payload.len() - reader.rest.len();
    if reader.array_len()? != 6 {
        return Err(bad("a row batch has 6 fields"));
    }
    let request_id = reader.uint()?;
    let seq = reader.uint()?;
    let names = reader.array_len()?;
    let mut columns = Vec::with_capacity(names);
    for _ in 0..names {
        columns.push(reader.str()?.to_owned());
    }
    let start = at(&reader);
    let width = reader.array_len()?;
    let mut located = Vec::with_capacity(width);
    let mut rows = None;
    for _ in 0..width {
        if reader.array_len()? != 2 {
            return Err(bad("a column is [kind, values]"));
        }
        let tag = reader.uint()?;
        let unknown = || bad(format!("unknown column kind {tag}"));
        let (kind, form) = match u8::try_from(tag) {
            Ok(MIXED) => (None, Form::Values),
            Ok(tag) => {
                let kind = Kind::from_tag(tag & !(DELTAS | PACKED)).ok_or_else(unknown)?;
                let form = match tag & (DELTAS | PACKED) {
                    0 => Form::Values,
                    DELTAS if kind.takes_deltas() => Form::Deltas,
                    PACKED if kind == Kind::Uuid => Form::Packed,
                    _ => return Err(bad(format!("a {kind:?} column in a form it has not"))),
                };
                (Some(kind), form)
            }
            Err(_) => return Err(unknown()),
        };
        let count = match form {
            Form::Packed => {
                let bytes = reader.bin_len()?;
                if bytes % UUID_BYTES != 0 {
                    return Err(bad(format!("{bytes} bytes of packed UUIDs")));
                }
                bytes / UUID_BYTES
            }
            Form::Values | Form::Deltas => reader.array_len()?,
        };
        if *rows.get_or_insert(count) != count {
            return Err(bad("columns of a batch differ in length"));
        }
        let start = at(&reader);
        if form == Form::Packed {
            reader.take(count * UUID_BYTES)?;
        } else {
            for _ in 0..count {
                reader.skip()?;
            }
        }
        located.push(ColumnAt {
            kind,
            form,
            values: start..at(&reader),
        });
    }
    let rows = rows.unwrap_or(0);
    if width != 0 && width != columns.len() {
        return Err(bad(format!(
            "{width} columns of values for {} column names",
            columns.len()
        )));
    }
    let span = start..at(&reader);
    let mut tail = reader.rest;
    let mut deserializer = rmp_serde::Deserializer::new(&mut tail);
    deserializer.set_max_depth(max_depth);
    let malformed = |err: rmp_serde::decode::Error| bad(err.to_string());
    let last_key: Vec<Value> =
        serde::Deserialize::deserialize(&mut deserializer).map_err(malformed)?;
    let transfer_id: String =
        serde::Deserialize::deserialize(&mut deserializer).map_err(malformed)?;
    if !tail.is_empty() {
        return Err(bad(format!("{} bytes after a row batch", tail.len())));
    }
    Ok(ReceivedBatch {
        request_id,
        seq,
        columns,
        rows: EncodedRows {
            payload,
            span,
            columns: located,
            rows,
            max_depth,
        },
        last_key,
        transfer_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row batch payload with `columns` for names and `body` written as its rows field.
    fn payload(names: &[&str], body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 6).unwrap();
        rmp::encode::write_uint(&mut out, 1).unwrap();
        rmp::encode::write_uint(&mut out, 0).unwrap();
        rmp::encode::write_array_len(&mut out, names.len() as u32).unwrap();
        for name in names {
            rmp::encode::write_str(&mut out, name).unwrap();
        }
        body(&mut out);
        rmp::encode::write_array_len(&mut out, 0).unwrap();
        rmp::encode::write_str(&mut out, "t").unwrap();
        out
    }

    /// Writes one value.
    type Write<'a> = &'a dyn Fn(&mut Vec<u8>);

    fn column(out: &mut Vec<u8>, tag: u8, values: &[Write<'_>]) {
        rmp::encode::write_array_len(out, 2).unwrap();
        rmp::encode::write_uint(out, u64::from(tag)).unwrap();
        rmp::encode::write_array_len(out, values.len() as u32).unwrap();
        for value in values {
            value(out);
        }
    }

    fn decoded(payload: Vec<u8>) -> Result<ReceivedBatch, ProtocolError> {
        crate::msgpack::check(&payload, 32)?;
        decode_batch(payload, 32)
    }

    #[test]
    fn columns_are_read_in_place_and_as_values() {
        let batch = decoded(payload(&["id", "name"], |out| {
            rmp::encode::write_array_len(out, 2).unwrap();
            column(
                out,
                Kind::Int as u8,
                &[&|o| drop(rmp::encode::write_sint(o, -5)), &|o| {
                    drop(rmp::encode::write_nil(o))
                }],
            );
            column(
                out,
                Kind::Text as u8,
                &[&|o| drop(rmp::encode::write_str(o, "a")), &|o| {
                    drop(rmp::encode::write_str(o, "b"))
                }],
            );
        }))
        .unwrap();
        assert_eq!(batch.rows.len(), 2);
        let mut cursors = batch.rows.cursors().unwrap();
        assert_eq!(cursors[0].next_scalar().unwrap(), Scalar::Int(-5));
        assert_eq!(cursors[0].next_scalar().unwrap(), Scalar::Null);
        assert_eq!(cursors[1].kind(), Kind::Text);
        assert_eq!(cursors[1].next_scalar().unwrap(), Scalar::Str(b"a"));
        // Past the end of a column: an error, not a panic.
        assert!(cursors[1].next_scalar().is_ok());
        assert!(cursors[1].next_scalar().is_err());
        assert_eq!(
            batch.rows.to_rows().unwrap(),
            vec![
                vec![Value::Int(-5), Value::Text("a".into())],
                vec![Value::Null, Value::Text("b".into())]
            ]
        );
    }

    #[test]
    fn a_batch_that_breaks_the_layout_is_refused() {
        let int = |v: i64| move |o: &mut Vec<u8>| drop(rmp::encode::write_sint(o, v));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "columns differ in length",
                payload(&["a", "b"], |out| {
                    rmp::encode::write_array_len(out, 2).unwrap();
                    column(out, Kind::Int as u8, &[&int(1), &int(2)]);
                    column(out, Kind::Int as u8, &[&int(1)]);
                }),
            ),
            (
                "more columns than names",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 2).unwrap();
                    column(out, Kind::Int as u8, &[&int(1)]);
                    column(out, Kind::Int as u8, &[&int(1)]);
                }),
            ),
            (
                "a text in an int column",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Int as u8,
                        &[&|o| drop(rmp::encode::write_str(o, "1"))],
                    );
                }),
            ),
            (
                "a uuid of 3 bytes",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Uuid as u8,
                        &[&|o| drop(rmp::encode::write_bin(o, &[1, 2, 3]))],
                    );
                }),
            ),
            (
                "a date past 32 bits",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(out, Kind::Date as u8, &[&int(1 << 40)]);
                }),
            ),
            (
                "text that is not UTF-8",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Text as u8,
                        &[&|o| {
                            rmp::encode::write_str_len(o, 2).unwrap();
                            o.extend_from_slice(&[0xff, 0xfe]);
                        }],
                    );
                }),
            ),
            (
                "an unknown kind",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(out, 99, &[&int(1)]);
                }),
            ),
            (
                "a text column sent as differences",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Text as u8 | DELTAS,
                        &[&|o| drop(rmp::encode::write_str(o, "1"))],
                    );
                }),
            ),
            (
                "dates whose differences sum past 32 bits",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Date as u8 | DELTAS,
                        &[&int(i64::from(i32::MAX)), &int(1)],
                    );
                }),
            ),
            (
                "a text among differences",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(
                        out,
                        Kind::Int as u8 | DELTAS,
                        &[&int(1), &|o| drop(rmp::encode::write_str(o, "1"))],
                    );
                }),
            ),
            (
                "packed UUIDs of 17 bytes",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    rmp::encode::write_array_len(out, 2).unwrap();
                    rmp::encode::write_uint(out, u64::from(Kind::Uuid as u8 | PACKED)).unwrap();
                    rmp::encode::write_bin(out, &[7; 17]).unwrap();
                }),
            ),
            (
                "packed text",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    rmp::encode::write_array_len(out, 2).unwrap();
                    rmp::encode::write_uint(out, u64::from(Kind::Text as u8 | PACKED)).unwrap();
                    rmp::encode::write_bin(out, &[7; 16]).unwrap();
                }),
            ),
            (
                "packed UUIDs that claim more bytes than the batch holds",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    rmp::encode::write_array_len(out, 2).unwrap();
                    rmp::encode::write_uint(out, u64::from(Kind::Uuid as u8 | PACKED)).unwrap();
                    rmp::encode::write_bin_len(out, 1 << 30).unwrap();
                    out.extend_from_slice(&[7; 32]);
                }),
            ),
            (
                "packed differences",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    column(out, Kind::Int as u8 | DELTAS | PACKED, &[&int(1)]);
                }),
            ),
            (
                "a column of three parts",
                payload(&["a"], |out| {
                    rmp::encode::write_array_len(out, 1).unwrap();
                    rmp::encode::write_array_len(out, 3).unwrap();
                    rmp::encode::write_uint(out, Kind::Int as u64).unwrap();
                    rmp::encode::write_array_len(out, 0).unwrap();
                    rmp::encode::write_nil(out).unwrap();
                }),
            ),
        ];
        // The shape is refused on arrival; a value that does not fit its column, when read.
        for (what, payload) in cases {
            let shape = matches!(
                what,
                "columns differ in length"
                    | "more columns than names"
                    | "an unknown kind"
                    | "a text column sent as differences"
                    | "packed UUIDs of 17 bytes"
                    | "packed text"
                    | "packed UUIDs that claim more bytes than the batch holds"
                    | "packed differences"
                    | "a column of three parts"
            );
            match decoded(payload) {
                Err(_) => assert!(shape, "{what} was refused on arrival"),
                Ok(batch) => {
                    assert!(!shape, "{what} was accepted");
                    assert!(batch.rows.to_rows().is_err(), "{what} was read");
                }
            }
        }
    }
}
