//! Row hashes for verification: both sides hash the same rows the same way, whatever engine
//! holds them.
//!
//! A value is hashed in its neutral *stored* form, the one it takes in a SQLite table
//! ([`crate::sink::stored_form`]): integers, reals and blobs as they are, everything else as the
//! text a copy would store. First, a value a SQLite table holds as text or an integer where the
//! sender's column is a date, time stamp, UUID or boolean is read as that type, so the same
//! instant written two ways is one value. A PostgreSQL value and the SQLite copy made of it
//! therefore hash alike, and so do two tables of the same types. A row's hash is the first 16 bytes
//! of SHA-256 over its values in column order, each tagged with its storage class and length; a
//! page's hash is SHA-256 over its rows' hashes in key order.

use dbsync_protocol::Value;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::sqlite_raw::Arg;

/// Bytes of a row hash.
pub const ROW_HASH_LEN: usize = 16;

/// A value as the sender's column type `neutral` reads it (see the module).
fn typed(value: &Value, neutral: &str) -> Option<Value> {
    match (value, neutral) {
        (Value::Text(text), "date" | "timestamp" | "timestamptz" | "uuid" | "bool") => {
            crate::key_filter::parse_value(text, neutral).ok()
        }
        (Value::Int(i @ (0 | 1)), "bool") => Some(Value::Bool(*i == 1)),
        _ => None,
    }
}

/// The hash of one row's values, read as the sender's column types `neutral` (in the same
/// order; a missing type leaves the value as it is).
pub fn row_hash(values: &[Value], neutral: &[&str]) -> Result<[u8; ROW_HASH_LEN]> {
    let mut hasher = Sha256::new();
    for (i, value) in values.iter().enumerate() {
        let retyped = neutral.get(i).and_then(|n| typed(value, n));
        let value = retyped.as_ref().unwrap_or(value);
        match crate::sink::stored_form(value)? {
            Arg::Null => hasher.update([0]),
            Arg::Int(i) => {
                hasher.update([1]);
                hasher.update(i.to_be_bytes());
            }
            Arg::Float(f) => {
                hasher.update([2]);
                // -0.0 and 0.0 are one value to both engines.
                let f = if f == 0.0 { 0.0 } else { f };
                hasher.update(f.to_bits().to_be_bytes());
            }
            Arg::Text(text) => {
                hasher.update([3]);
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
            Arg::Blob(bytes) => {
                hasher.update([4]);
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(&bytes);
            }
        }
    }
    let digest = hasher.finalize();
    let mut out = [0; ROW_HASH_LEN];
    out.copy_from_slice(&digest[..ROW_HASH_LEN]);
    Ok(out)
}

/// A key in the same stored form, as bytes to look it up by.
pub fn key_bytes(key: &[Value], neutral: &[&str]) -> Result<Vec<u8>> {
    Ok(row_hash(key, neutral)?.to_vec())
}

/// Folds row hashes, in key order, into a page hash.
#[derive(Debug, Default, Clone)]
pub struct PageHasher {
    hasher: Sha256,
    rows: u64,
}

impl PageHasher {
    /// Adds the next row's hash.
    pub fn add(&mut self, row: &[u8; ROW_HASH_LEN]) {
        self.hasher.update(row);
        self.rows += 1;
    }

    /// Rows added and the page hash.
    pub fn finish(self) -> (u64, Vec<u8>) {
        (self.rows, self.hasher.finalize().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_value_and_its_stored_copy_hash_alike() {
        let typed = [
            Value::Int(7),
            Value::Bool(true),
            Value::TimestampTz(1_000_001),
            Value::Text("a".into()),
            Value::Null,
        ];
        let stored: Vec<Value> = typed
            .iter()
            .map(|v| match crate::sink::stored_form(v).unwrap() {
                Arg::Null => Value::Null,
                Arg::Int(i) => Value::Int(i),
                Arg::Float(f) => Value::Float(f),
                Arg::Text(t) => Value::Text(t.into_owned()),
                Arg::Blob(b) => Value::Bytes(b.into_owned()),
            })
            .collect();
        let types = ["int", "bool", "timestamptz", "text", "text"];
        assert_eq!(
            row_hash(&typed, &types).unwrap(),
            row_hash(&stored, &types).unwrap()
        );
        // The same instant written as SQLite text.
        assert_eq!(
            row_hash(&[Value::Text("1970-01-01 00:00:01".into())], &["timestamp"]).unwrap(),
            row_hash(&[Value::Timestamp(1_000_000)], &["timestamp"]).unwrap()
        );
        // NULL is not the empty string; column boundaries count.
        assert_ne!(
            row_hash(&[Value::Null], &[]).unwrap(),
            row_hash(&[Value::Text(String::new())], &[]).unwrap()
        );
        assert_ne!(
            row_hash(&[Value::Text("ab".into()), Value::Text("c".into())], &[]).unwrap(),
            row_hash(&[Value::Text("a".into()), Value::Text("bc".into())], &[]).unwrap()
        );
    }
}
