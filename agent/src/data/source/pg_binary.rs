//! PostgreSQL binary wire values → engine-neutral [`Value`]s, exactly: numerics of any precision
//! (and NaN, ±Infinity) as decimal text, dates and timestamps with PostgreSQL's own infinity
//! sentinels kept, intervals as (months, days, µs), arrays of any dimension.

use dbsync_protocol::Value;
use dbsync_protocol::message::columnar::{Column, Kind as ColumnKind};

use crate::error::{Error, Result};

/// Days from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
pub(crate) const PG_EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
pub(crate) const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

fn bad(neutral: &str, detail: impl std::fmt::Display) -> Error {
    Error::invalid(
        "value",
        format!("malformed binary {neutral} value from PostgreSQL: {detail}"),
    )
}

fn fixed<const N: usize>(bytes: &[u8], neutral: &str) -> Result<[u8; N]> {
    bytes
        .try_into()
        .map_err(|_| bad(neutral, format!("{} bytes, expected {N}", bytes.len())))
}

/// How to decode the values of one column, resolved once from its engine-neutral type name (as
/// [`crate::catalog`] names it) rather than matched by name for every value.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoder {
    Bool,
    Int,
    Float,
    Numeric,
    Text,
    Bytes,
    Uuid,
    Json,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Interval,
    /// An array of the inner type, of any dimension.
    Array(Box<Decoder>),
    /// A type with no transfer yet (refused at its first non-null value).
    Unsupported(String),
}

impl Decoder {
    /// The decoder of engine-neutral type `neutral`.
    pub fn of(neutral: &str) -> Self {
        if let Some(element) = neutral
            .strip_prefix("array<")
            .and_then(|rest| rest.strip_suffix('>'))
        {
            return Self::Array(Box::new(Self::of(element)));
        }
        match neutral {
            "bool" => Self::Bool,
            "int" => Self::Int,
            "float" => Self::Float,
            "numeric" => Self::Numeric,
            "text" => Self::Text,
            "bytes" => Self::Bytes,
            "uuid" => Self::Uuid,
            "json" => Self::Json,
            "date" => Self::Date,
            "time" => Self::Time,
            "timestamp" => Self::Timestamp,
            "timestamptz" => Self::TimestampTz,
            "interval" => Self::Interval,
            other => Self::Unsupported(other.to_owned()),
        }
    }

    /// The type's name in errors.
    fn name(&self) -> &str {
        match self {
            Self::Bool => "bool",
            Self::Int => "int",
            Self::Float => "float",
            Self::Numeric => "numeric",
            Self::Text => "text",
            Self::Bytes => "bytes",
            Self::Uuid => "uuid",
            Self::Json => "json",
            Self::Date => "date",
            Self::Time => "time",
            Self::Timestamp => "timestamp",
            Self::TimestampTz => "timestamptz",
            Self::Interval => "interval",
            Self::Array(_) => "array",
            Self::Unsupported(name) => name,
        }
    }

    /// The wire kind of this type's values (`None`: they travel whole, as intervals and arrays
    /// do).
    pub fn kind(&self) -> Option<ColumnKind> {
        Some(match self {
            Self::Bool => ColumnKind::Bool,
            Self::Int => ColumnKind::Int,
            Self::Float => ColumnKind::Float,
            Self::Numeric => ColumnKind::Numeric,
            Self::Text => ColumnKind::Text,
            Self::Bytes => ColumnKind::Bytes,
            Self::Uuid => ColumnKind::Uuid,
            Self::Json => ColumnKind::Json,
            Self::Date => ColumnKind::Date,
            Self::Time => ColumnKind::Time,
            Self::Timestamp => ColumnKind::Timestamp,
            Self::TimestampTz => ColumnKind::TimestampTz,
            Self::Interval | Self::Array(_) | Self::Unsupported(_) => return None,
        })
    }

    /// One non-null value's bare form, borrowed from `bytes` where it can be; `None` for the
    /// types without one (see [`Decoder::kind`]).
    fn bare<'a>(&self, bytes: &'a [u8]) -> Result<Option<Bare<'a>>> {
        let name = self.name();
        Ok(Some(match self {
            Self::Bool => Bare::Bool(fixed::<1>(bytes, name)?[0] != 0),
            Self::Int => Bare::Int(match bytes.len() {
                2 => i64::from(i16::from_be_bytes(fixed(bytes, name)?)),
                4 => i64::from(i32::from_be_bytes(fixed(bytes, name)?)),
                8 => i64::from_be_bytes(fixed(bytes, name)?),
                n => return Err(bad(name, format!("{n} bytes"))),
            }),
            Self::Float => Bare::Float(match bytes.len() {
                4 => f64::from(f32::from_be_bytes(fixed(bytes, name)?)),
                8 => f64::from_be_bytes(fixed(bytes, name)?),
                n => return Err(bad(name, format!("{n} bytes"))),
            }),
            Self::Numeric => Bare::Numeric(bytes),
            Self::Text => Bare::Text(std::str::from_utf8(bytes).map_err(|e| bad(name, e))?),
            Self::Bytes => Bare::Bin(bytes),
            Self::Uuid => Bare::Bin(fixed::<16>(bytes, name).map(|_| bytes)?),
            // jsonb starts with a version byte (1); json is plain text.
            Self::Json => Bare::Text(
                std::str::from_utf8(match bytes.first() {
                    Some(1) => &bytes[1..],
                    _ => bytes,
                })
                .map_err(|e| bad(name, e))?,
            ),
            Self::Date => {
                let days = i32::from_be_bytes(fixed(bytes, name)?);
                Bare::Int(i64::from(match days {
                    i32::MIN | i32::MAX => days,
                    _ => days
                        .checked_add(PG_EPOCH_DAYS)
                        .ok_or_else(|| bad(name, "out of range"))?,
                }))
            }
            Self::Time => Bare::Int(i64::from_be_bytes(fixed(bytes, name)?)),
            Self::Timestamp | Self::TimestampTz => {
                let micros = i64::from_be_bytes(fixed(bytes, name)?);
                Bare::Int(match micros {
                    i64::MIN | i64::MAX => micros,
                    _ => micros
                        .checked_add(PG_EPOCH_MICROS)
                        .ok_or_else(|| bad(name, "out of range"))?,
                })
            }
            Self::Interval | Self::Array(_) | Self::Unsupported(_) => return Ok(None),
        }))
    }

    /// Decodes one non-null value.
    pub fn decode(&self, bytes: &[u8]) -> Result<Value> {
        let Some(bare) = self.bare(bytes)? else {
            return self.decode_whole(bytes);
        };
        Ok(match (self, bare) {
            (_, Bare::Bool(b)) => Value::Bool(b),
            (Self::Date, Bare::Int(days)) => Value::Date(days as i32),
            (Self::Time, Bare::Int(micros)) => Value::Time(micros),
            (Self::Timestamp, Bare::Int(micros)) => Value::Timestamp(micros),
            (Self::TimestampTz, Bare::Int(micros)) => Value::TimestampTz(micros),
            (_, Bare::Int(i)) => Value::Int(i),
            (_, Bare::Float(f)) => Value::Float(f),
            (_, Bare::Numeric(raw)) => Value::Numeric(numeric_to_string(raw)?),
            (Self::Json, Bare::Text(text)) => Value::Json(text.to_owned()),
            (_, Bare::Text(text)) => Value::Text(text.to_owned()),
            (Self::Uuid, Bare::Bin(raw)) => Value::Uuid(fixed(raw, "uuid")?),
            (_, Bare::Bin(raw)) => Value::Bytes(raw.to_vec()),
        })
    }

    /// Writes one non-null value to its wire column (of [`Decoder::kind`]); `numeric` is
    /// scratch space for numeric text.
    pub fn write(&self, bytes: &[u8], writer: &mut Column, numeric: &mut String) -> Result<()> {
        match self.bare(bytes)? {
            None => writer
                .value(&self.decode_whole(bytes)?)
                .map_err(|e| Error::invalid("value", e))?,
            Some(Bare::Bool(b)) => writer.bool(b),
            Some(Bare::Int(i)) => writer.int(i),
            Some(Bare::Float(f)) => writer.float(f),
            Some(Bare::Numeric(raw)) => {
                numeric.clear();
                write_numeric(raw, numeric)?;
                writer.str(numeric);
            }
            Some(Bare::Text(text)) => writer.str(text),
            Some(Bare::Bin(raw)) => writer.bin(raw),
        }
        Ok(())
    }

    /// The types without a bare form, as whole values.
    fn decode_whole(&self, bytes: &[u8]) -> Result<Value> {
        let name = self.name();
        match self {
            Self::Interval => {
                let raw: [u8; 16] = fixed(bytes, name)?;
                Ok(Value::Interval {
                    micros: i64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
                    days: i32::from_be_bytes(raw[8..12].try_into().expect("4 bytes")),
                    months: i32::from_be_bytes(raw[12..].try_into().expect("4 bytes")),
                })
            }
            Self::Array(element) => decode_array(element, bytes),
            Self::Unsupported(other) => Err(Error::invalid(
                "column type",
                format!("{other} values cannot be transferred yet"),
            )),
            scalar => Err(bad(scalar.name(), "has a bare form")),
        }
    }
}

/// A non-null value as it goes on the wire in a column of one kind.
enum Bare<'a> {
    Bool(bool),
    Int(i64),
    Float(f64),
    /// PostgreSQL's binary numeric, formatted where it is used.
    Numeric(&'a [u8]),
    Text(&'a str),
    Bin(&'a [u8]),
}

/// Decodes one non-null value of engine-neutral type `neutral` (as [`crate::catalog`] names it).
pub fn decode(neutral: &str, bytes: &[u8]) -> Result<Value> {
    Decoder::of(neutral).decode(bytes)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| bad("array", "truncated"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

fn decode_array(element: &Decoder, bytes: &[u8]) -> Result<Value> {
    let mut cursor = Cursor { bytes, pos: 0 };
    let ndim = cursor.i32()?;
    let _has_nulls = cursor.i32()?;
    let _element_oid = cursor.i32()?;
    if !(0..=6).contains(&ndim) {
        return Err(bad("array", format!("{ndim} dimensions")));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        let len = cursor.i32()?;
        let _lower_bound = cursor.i32()?;
        dims.push(usize::try_from(len).map_err(|_| bad("array", "negative length"))?);
    }
    let total: usize = dims
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| bad("array", "too large"))?;
    if ndim > 0 && total > bytes.len() / 4 {
        return Err(bad("array", "more elements than bytes"));
    }
    let mut flat = Vec::with_capacity(if ndim == 0 { 0 } else { total });
    if ndim > 0 {
        for _ in 0..total {
            let len = cursor.i32()?;
            flat.push(if len < 0 {
                Value::Null
            } else {
                element.decode(cursor.take(len as usize)?)?
            });
        }
    }
    Ok(nest(&dims, &mut flat.into_iter()))
}

fn nest(dims: &[usize], items: &mut impl Iterator<Item = Value>) -> Value {
    match dims.split_first() {
        None => Value::Array(Vec::new()),
        Some((len, [])) => Value::Array(items.take(*len).collect()),
        Some((len, rest)) => Value::Array((0..*len).map(|_| nest(rest, items)).collect()),
    }
}

/// Appends a base-10000 digit group (below 10,000) in decimal: four digits when `pad`, else
/// without leading zeros.
fn push_group(text: &mut String, group: u16, pad: bool) {
    let mut started = pad;
    for divisor in [1000, 100, 10, 1] {
        let digit = (group / divisor % 10) as u8;
        if started || digit != 0 || divisor == 1 {
            text.push(char::from(b'0' + digit));
            started = true;
        }
    }
}

/// PostgreSQL's binary numeric (base-10000 digits) as the decimal text PostgreSQL prints.
pub fn numeric_to_string(bytes: &[u8]) -> Result<String> {
    let mut text = String::new();
    write_numeric(bytes, &mut text)?;
    Ok(text)
}

/// [`numeric_to_string`] appending to `text`.
pub fn write_numeric(bytes: &[u8], text: &mut String) -> Result<()> {
    let field = |i: usize| -> Result<u16> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| bad("numeric", "truncated"))
    };
    let ndigits = usize::from(field(0)?);
    let weight = i32::from(field(1)? as i16);
    let sign = field(2)?;
    let dscale = usize::from(field(3)?);
    let special = match sign {
        0xC000 => "NaN",
        0xD000 => "Infinity",
        0xF000 => "-Infinity",
        0x0000 | 0x4000 => "",
        other => return Err(bad("numeric", format!("sign {other:#06x}"))),
    };
    if !special.is_empty() {
        text.push_str(special);
        return Ok(());
    }
    if bytes.len() != 8 + 2 * ndigits {
        return Err(bad("numeric", "length does not match digit count"));
    }
    for i in 0..ndigits {
        if field(4 + i)? > 9999 {
            return Err(bad("numeric", "a base-10000 digit over 9999"));
        }
    }
    // Digit groups past the stored ones (or before the first) are zero.
    let digit = |group: i32| -> Result<u16> {
        match usize::try_from(group) {
            Ok(g) if g < ndigits => field(4 + g),
            _ => Ok(0),
        }
    };
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for group in 0..=weight {
            // The leading group without its leading zeros.
            push_group(text, digit(group)?, group > 0);
        }
    }
    if dscale > 0 {
        text.push('.');
        let start = text.len();
        let mut group = weight + 1;
        while text.len() - start < dscale {
            push_group(text, digit(group)?, true);
            group += 1;
        }
        text.truncate(start + dscale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [ndigits, weight as u16, sign, dscale] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for d in digits {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out
    }

    #[test]
    fn numerics() {
        assert_eq!(
            numeric_to_string(&numeric(2, 0, 0, 2, &[12, 3400])).unwrap(),
            "12.34"
        );
        assert_eq!(
            numeric_to_string(&numeric(1, -1, 0x4000, 4, &[5])).unwrap(),
            "-0.0005"
        );
        assert_eq!(
            numeric_to_string(&numeric(2, 1, 0, 0, &[1, 0])).unwrap(),
            "10000"
        );
        assert_eq!(
            numeric_to_string(&numeric(0, 0, 0, 3, &[])).unwrap(),
            "0.000"
        );
        assert_eq!(
            numeric_to_string(&numeric(0, 0, 0xC000, 0, &[])).unwrap(),
            "NaN"
        );
        assert_eq!(
            numeric_to_string(&numeric(0, 0, 0xF000, 0, &[])).unwrap(),
            "-Infinity"
        );
        assert_eq!(
            numeric_to_string(&numeric(3, 1, 0, 2, &[1234, 5, 700])).unwrap(),
            "12340005.07"
        );
        assert!(numeric_to_string(&[0, 1]).is_err());
        assert!(numeric_to_string(&numeric(1, 0, 0, 0, &[10_000])).is_err());
    }

    #[test]
    fn timestamps_keep_infinity() {
        assert_eq!(
            decode("timestamptz", &i64::MAX.to_be_bytes()).unwrap(),
            Value::TimestampTz(i64::MAX)
        );
        assert_eq!(
            decode("timestamptz", &0i64.to_be_bytes()).unwrap(),
            Value::TimestampTz(PG_EPOCH_MICROS)
        );
        assert_eq!(
            decode("date", &i32::MIN.to_be_bytes()).unwrap(),
            Value::Date(i32::MIN)
        );
        assert_eq!(
            decode("date", &0i32.to_be_bytes()).unwrap(),
            Value::Date(PG_EPOCH_DAYS)
        );
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        assert!(decode("int", &[1, 2, 3]).is_err());
        assert!(decode("uuid", &[0; 15]).is_err());
        assert!(decode("array<int>", &[0, 0, 0, 1]).is_err());
        // One dimension of 1,000,000 elements in a 20-byte array.
        let mut huge = Vec::new();
        for v in [1i32, 0, 23, 1_000_000, 1] {
            huge.extend_from_slice(&v.to_be_bytes());
        }
        assert!(decode("array<int>", &huge).is_err());
        assert!(decode("tsvector", b"x").is_err());
    }
}
