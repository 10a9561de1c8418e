//! A received batch's rows as the sinks take them: values, or as they arrived on the wire.

use std::borrow::Cow;

use dbsync_protocol::Value;
use dbsync_protocol::columns::{Cursor, EncodedRows};

use crate::error::{Error, Result};

/// A batch's rows: values, or as they arrived (read in place where they go into PostgreSQL by
/// `COPY`, turned into values everywhere else).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// Rows of values.
    Values(&'a [Vec<Value>]),
    /// Rows as received.
    Encoded(&'a EncodedRows),
}

impl<'a> Rows<'a> {
    /// The number of rows.
    pub fn len(&self) -> usize {
        match self {
            Self::Values(rows) => rows.len(),
            Self::Encoded(rows) => rows.len(),
        }
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader per column over encoded rows whose columns are all of bare scalars, or `None`
    /// (values, or a column of whole values).
    pub fn cursors(&self) -> Option<Vec<Cursor<'a>>> {
        match self {
            Self::Values(_) => None,
            Self::Encoded(rows) => rows.cursors(),
        }
    }

    /// The rows as values (built here for encoded rows).
    pub fn values(&self) -> Result<Cow<'a, [Vec<Value>]>> {
        match self {
            Self::Values(rows) => Ok(Cow::Borrowed(rows)),
            Self::Encoded(rows) => rows
                .to_rows()
                .map(Cow::Owned)
                .map_err(|err| Error::invalid("row batch", err.to_string())),
        }
    }
}
