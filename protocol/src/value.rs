//! The engine-neutral value model (SPEC section 6). Every value a source reads maps to one of
//! these, and every sink maps them back; exactness rules live with the engines.

use serde::{Deserialize, Serialize};

/// One column value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Boolean.
    Bool(bool),
    /// Any integer up to 64 bits.
    Int(i64),
    /// Floating point; NaN and the infinities survive.
    Float(f64),
    /// Exact numeric of any precision, as decimal text (`-12.3400`, `NaN`, `Infinity`).
    Numeric(String),
    /// Text (UTF-8).
    Text(String),
    /// Raw bytes (need not be UTF-8).
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// UUID, 16 bytes.
    Uuid([u8; 16]),
    /// JSON document as text (json and jsonb alike).
    Json(String),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since 1970-01-01 00:00, no time zone.
    Timestamp(i64),
    /// Microseconds since 1970-01-01 00:00 UTC.
    TimestampTz(i64),
    /// Interval as PostgreSQL keeps it: months, days and microseconds.
    Interval {
        /// Months.
        months: i32,
        /// Days.
        days: i32,
        /// Microseconds.
        micros: i64,
    },
    /// Array of values; nested arrays for more dimensions.
    Array(Vec<Value>),
}

impl Value {
    /// Nesting depth (1 for a scalar).
    pub fn depth(&self) -> usize {
        match self {
            Self::Array(items) => 1 + items.iter().map(Self::depth).max().unwrap_or(0),
            _ => 1,
        }
    }

    /// The kind's name, as errors name a value without quoting it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float(_) => "float",
            Self::Numeric(_) => "numeric",
            Self::Text(_) => "text",
            Self::Bytes(_) => "bytes",
            Self::Uuid(_) => "uuid",
            Self::Json(_) => "json",
            Self::Date(_) => "date",
            Self::Time(_) => "time",
            Self::Timestamp(_) => "timestamp",
            Self::TimestampTz(_) => "timestamptz",
            Self::Interval { .. } => "interval",
            Self::Array(_) => "array",
        }
    }
}
