//! PostgreSQL binary wire values → engine-neutral [`Value`]s, exactly: numerics of any precision
//! (and NaN, ±Infinity) as decimal text, dates and timestamps with PostgreSQL's own infinity
//! sentinels kept, intervals as (months, days, µs), arrays of any dimension.

use dbsync_protocol::Value;

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

    /// Decodes one non-null value.
    pub fn decode(&self, bytes: &[u8]) -> Result<Value> {
        let name = self.name();
        Ok(match self {
            Self::Bool => Value::Bool(fixed::<1>(bytes, name)?[0] != 0),
            Self::Int => Value::Int(match bytes.len() {
                2 => i64::from(i16::from_be_bytes(fixed(bytes, name)?)),
                4 => i64::from(i32::from_be_bytes(fixed(bytes, name)?)),
                8 => i64::from_be_bytes(fixed(bytes, name)?),
                n => return Err(bad(name, format!("{n} bytes"))),
            }),
            Self::Float => Value::Float(match bytes.len() {
                4 => f64::from(f32::from_be_bytes(fixed(bytes, name)?)),
                8 => f64::from_be_bytes(fixed(bytes, name)?),
                n => return Err(bad(name, format!("{n} bytes"))),
            }),
            Self::Numeric => Value::Numeric(numeric_to_string(bytes)?),
            Self::Text => Value::Text(utf8(bytes, name)?),
            Self::Bytes => Value::Bytes(bytes.to_vec()),
            Self::Uuid => Value::Uuid(fixed(bytes, name)?),
            // jsonb starts with a version byte (1); json is plain text.
            Self::Json => Value::Json(utf8(
                match bytes.first() {
                    Some(1) => &bytes[1..],
                    _ => bytes,
                },
                name,
            )?),
            Self::Date => {
                let days = i32::from_be_bytes(fixed(bytes, name)?);
                Value::Date(match days {
                    i32::MIN | i32::MAX => days,
                    _ => days
                        .checked_add(PG_EPOCH_DAYS)
                        .ok_or_else(|| bad(name, "out of range"))?,
                })
            }
            Self::Time => Value::Time(i64::from_be_bytes(fixed(bytes, name)?)),
            Self::Timestamp | Self::TimestampTz => {
                let micros = i64::from_be_bytes(fixed(bytes, name)?);
                let micros = match micros {
                    i64::MIN | i64::MAX => micros,
                    _ => micros
                        .checked_add(PG_EPOCH_MICROS)
                        .ok_or_else(|| bad(name, "out of range"))?,
                };
                if *self == Self::Timestamp {
                    Value::Timestamp(micros)
                } else {
                    Value::TimestampTz(micros)
                }
            }
            Self::Interval => {
                let raw: [u8; 16] = fixed(bytes, name)?;
                Value::Interval {
                    micros: i64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
                    days: i32::from_be_bytes(raw[8..12].try_into().expect("4 bytes")),
                    months: i32::from_be_bytes(raw[12..].try_into().expect("4 bytes")),
                }
            }
            Self::Array(element) => decode_array(element, bytes)?,
            Self::Unsupported(other) => {
                return Err(Error::invalid(
                    "column type",
                    format!("{other} values cannot be transferred yet"),
                ));
            }
        })
    }
}

fn utf8(bytes: &[u8], name: &str) -> Result<String> {
    Ok(std::str::from_utf8(bytes)
        .map_err(|e| bad(name, e))?
        .to_owned())
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
    match sign {
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        0x0000 | 0x4000 => {}
        other => return Err(bad("numeric", format!("sign {other:#06x}"))),
    }
    if bytes.len() != 8 + 2 * ndigits {
        return Err(bad("numeric", "length does not match digit count"));
    }
    let digits: Vec<u16> = (0..ndigits).map(|i| field(4 + i)).collect::<Result<_>>()?;
    if digits.iter().any(|d| *d > 9999) {
        return Err(bad("numeric", "a base-10000 digit over 9999"));
    }
    let digit = |group: i32| -> u16 {
        usize::try_from(group)
            .ok()
            .and_then(|g| digits.get(g))
            .copied()
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for group in 0..=weight {
            // The leading group without its leading zeros.
            push_group(&mut text, digit(group), group > 0);
        }
    }
    if dscale > 0 {
        let mut fraction = String::with_capacity(dscale + 4);
        let mut group = weight + 1;
        while fraction.len() < dscale {
            push_group(&mut fraction, digit(group), true);
            group += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
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
