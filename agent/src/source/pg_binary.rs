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

/// Decodes one non-null value of engine-neutral type `neutral` (as [`crate::catalog`] names it).
pub fn decode(neutral: &str, bytes: &[u8]) -> Result<Value> {
    if let Some(element) = neutral
        .strip_prefix("array<")
        .and_then(|rest| rest.strip_suffix('>'))
    {
        return decode_array(element, bytes);
    }
    Ok(match neutral {
        "bool" => Value::Bool(fixed::<1>(bytes, neutral)?[0] != 0),
        "int" => Value::Int(match bytes.len() {
            2 => i64::from(i16::from_be_bytes(fixed(bytes, neutral)?)),
            4 => i64::from(i32::from_be_bytes(fixed(bytes, neutral)?)),
            8 => i64::from_be_bytes(fixed(bytes, neutral)?),
            n => return Err(bad(neutral, format!("{n} bytes"))),
        }),
        "float" => Value::Float(match bytes.len() {
            4 => f64::from(f32::from_be_bytes(fixed(bytes, neutral)?)),
            8 => f64::from_be_bytes(fixed(bytes, neutral)?),
            n => return Err(bad(neutral, format!("{n} bytes"))),
        }),
        "numeric" => Value::Numeric(numeric_to_string(bytes)?),
        "text" => Value::Text(
            std::str::from_utf8(bytes)
                .map_err(|e| bad(neutral, e))?
                .to_owned(),
        ),
        "bytes" => Value::Bytes(bytes.to_vec()),
        "uuid" => Value::Uuid(fixed(bytes, neutral)?),
        "json" => {
            // jsonb starts with a version byte (1); json is plain text.
            let text = match bytes.first() {
                Some(1) => &bytes[1..],
                _ => bytes,
            };
            Value::Json(
                std::str::from_utf8(text)
                    .map_err(|e| bad(neutral, e))?
                    .to_owned(),
            )
        }
        "date" => {
            let days = i32::from_be_bytes(fixed(bytes, neutral)?);
            Value::Date(match days {
                i32::MIN | i32::MAX => days,
                _ => days
                    .checked_add(PG_EPOCH_DAYS)
                    .ok_or_else(|| bad(neutral, "out of range"))?,
            })
        }
        "time" => Value::Time(i64::from_be_bytes(fixed(bytes, neutral)?)),
        "timestamp" | "timestamptz" => {
            let micros = i64::from_be_bytes(fixed(bytes, neutral)?);
            let micros = match micros {
                i64::MIN | i64::MAX => micros,
                _ => micros
                    .checked_add(PG_EPOCH_MICROS)
                    .ok_or_else(|| bad(neutral, "out of range"))?,
            };
            if neutral == "timestamp" {
                Value::Timestamp(micros)
            } else {
                Value::TimestampTz(micros)
            }
        }
        "interval" => {
            let raw: [u8; 16] = fixed(bytes, neutral)?;
            Value::Interval {
                micros: i64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
                days: i32::from_be_bytes(raw[8..12].try_into().expect("4 bytes")),
                months: i32::from_be_bytes(raw[12..].try_into().expect("4 bytes")),
            }
        }
        other => {
            return Err(Error::invalid(
                "column type",
                format!("{other} values cannot be transferred yet"),
            ));
        }
    })
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

fn decode_array(element: &str, bytes: &[u8]) -> Result<Value> {
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
                decode(element, cursor.take(len as usize)?)?
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
            if group == 0 {
                text.push_str(&digit(group).to_string());
            } else {
                text.push_str(&format!("{:04}", digit(group)));
            }
        }
    }
    if dscale > 0 {
        let mut fraction = String::with_capacity(dscale + 4);
        let mut group = weight + 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit(group)));
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
        assert!(numeric_to_string(&[0, 1]).is_err());
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
