//! `--where-key`: a row filter on the primary key, written on the command line and turned into
//! typed key values once the table is described.
//!
//! Forms: `FROM..TO` (a range, both ends included, either end may be left empty) or a
//! comma-separated list of keys. A composite key's values are separated by `:` in key order,
//! e.g. `eu:17,us:3`. Values are read by the key column's engine-neutral type.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, MAX_FILTER_KEYS, TableSchema};

use crate::error::{Error, Result};

/// Parses `text` against the key columns of `schema`.
pub fn parse(text: &str, schema: &TableSchema) -> Result<KeyFilter> {
    if schema.primary_key.is_empty() {
        return Err(Error::invalid(
            "where-key",
            format!("{:?} has no primary key to filter on", schema.name),
        ));
    }
    let text = text.trim();
    if let Some((from, to)) = text.split_once("..") {
        let bound = |part: &str| -> Result<Option<Vec<Value>>> {
            let part = part.trim();
            if part.is_empty() {
                Ok(None)
            } else {
                parse_key(part, schema).map(Some)
            }
        };
        let filter = KeyFilter::Range {
            from: bound(from)?,
            to: bound(to)?,
        };
        return Ok(filter);
    }
    let keys: Vec<Vec<Value>> = text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| parse_key(part, schema))
        .collect::<Result<_>>()?;
    if keys.is_empty() {
        return Err(Error::invalid("where-key", "no key given"));
    }
    if keys.len() > MAX_FILTER_KEYS {
        return Err(Error::invalid(
            "where-key",
            format!("at most {MAX_FILTER_KEYS} keys may be listed; use a range"),
        ));
    }
    Ok(KeyFilter::Keys(keys))
}

fn parse_key(text: &str, schema: &TableSchema) -> Result<Vec<Value>> {
    let parts: Vec<&str> = if schema.primary_key.len() == 1 {
        vec![text]
    } else {
        text.split(':').collect()
    };
    if parts.len() != schema.primary_key.len() {
        return Err(Error::invalid(
            "where-key",
            format!(
                "{text:?}: the key of {:?} has {} columns ({}); separate their values with ':'",
                schema.name,
                schema.primary_key.len(),
                schema.primary_key.join(", ")
            ),
        ));
    }
    schema
        .primary_key
        .iter()
        .zip(parts)
        .map(|(column, part)| {
            let neutral = schema
                .columns
                .iter()
                .find(|c| &c.name == column)
                .map_or("text", |c| c.neutral_type.as_str());
            parse_value(part.trim(), neutral).map_err(|reason| {
                Error::invalid("where-key", format!("{part:?} for {column:?}: {reason}"))
            })
        })
        .collect()
}

pub(crate) fn parse_value(text: &str, neutral: &str) -> std::result::Result<Value, String> {
    let bad = |what: &str| format!("not {what}");
    Ok(match neutral {
        "int" => Value::Int(text.parse().map_err(|_| bad("an integer"))?),
        "text" => Value::Text(text.to_owned()),
        "bool" => Value::Bool(match text {
            "true" | "t" | "1" => true,
            "false" | "f" | "0" => false,
            _ => return Err(bad("a boolean")),
        }),
        "uuid" => Value::Uuid(
            *uuid::Uuid::parse_str(text)
                .map_err(|_| bad("a UUID"))?
                .as_bytes(),
        ),
        "bytes" => {
            let hex = text.strip_prefix("\\x").unwrap_or(text);
            if !hex.len().is_multiple_of(2) {
                return Err(bad("hex bytes"));
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| bad("hex bytes"))?;
            Value::Bytes(bytes)
        }
        "date" => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .map_err(|_| bad("a YYYY-MM-DD date"))?;
            let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
            Value::Date((date - epoch).num_days() as i32)
        }
        "timestamptz" => Value::TimestampTz(
            DateTime::parse_from_rfc3339(text)
                .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
                .map_err(|_| bad("an RFC 3339 timestamp"))?
                .timestamp_micros(),
        ),
        "timestamp" => Value::Timestamp(
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f"))
                .map_err(|_| bad("a YYYY-MM-DD HH:MM:SS timestamp"))?
                .and_utc()
                .timestamp_micros(),
        ),
        other => return Err(format!("a {other} key cannot be filtered on")),
    })
}

#[cfg(test)]
mod tests {
    use dbsync_protocol::message::ColumnInfo;

    use super::*;

    fn schema(key: &[(&str, &str)]) -> TableSchema {
        TableSchema {
            name: "t".into(),
            engine: "postgres".into(),
            columns: key
                .iter()
                .map(|(name, neutral)| ColumnInfo {
                    name: (*name).into(),
                    native_type: String::new(),
                    neutral_type: (*neutral).into(),
                    nullable: false,
                })
                .collect(),
            primary_key: key.iter().map(|(name, _)| (*name).to_owned()).collect(),
            postgres: None,
        }
    }

    #[test]
    fn ranges_and_lists() {
        let ints = schema(&[("id", "int")]);
        assert_eq!(
            parse("10..20", &ints).unwrap(),
            KeyFilter::Range {
                from: Some(vec![Value::Int(10)]),
                to: Some(vec![Value::Int(20)])
            }
        );
        assert_eq!(
            parse("..5", &ints).unwrap(),
            KeyFilter::Range {
                from: None,
                to: Some(vec![Value::Int(5)])
            }
        );
        assert_eq!(
            parse("1, 2,3", &ints).unwrap(),
            KeyFilter::Keys(vec![
                vec![Value::Int(1)],
                vec![Value::Int(2)],
                vec![Value::Int(3)]
            ])
        );
        let composite = schema(&[("region", "text"), ("n", "int")]);
        assert_eq!(
            parse("eu:1,us:2", &composite).unwrap(),
            KeyFilter::Keys(vec![
                vec![Value::Text("eu".into()), Value::Int(1)],
                vec![Value::Text("us".into()), Value::Int(2)]
            ])
        );
        assert_eq!(
            parse("2024-01-02", &schema(&[("d", "date")])).unwrap(),
            KeyFilter::Keys(vec![vec![Value::Date(19_724)]])
        );
    }

    #[test]
    fn clear_errors() {
        let ints = schema(&[("id", "int")]);
        let err = parse("abc", &ints).unwrap_err().to_string();
        assert!(err.contains("not an integer"), "{err}");
        let composite = schema(&[("region", "text"), ("n", "int")]);
        let err = parse("eu", &composite).unwrap_err().to_string();
        assert!(err.contains("separate their values with ':'"), "{err}");
        assert!(parse(" , ", &ints).is_err());
        assert!(parse("1.5", &schema(&[("x", "float")])).is_err());
    }
}
