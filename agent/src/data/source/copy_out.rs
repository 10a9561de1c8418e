//! A PostgreSQL keyset page read as `COPY (SELECT ...) TO STDOUT (FORMAT binary)` and parsed in
//! place: the values are the same binary forms a `SELECT` returns, without sqlx's `PgRow` per
//! row and type information per value (about a quarter of a sender's CPU in a full pull).
//!
//! `COPY` takes no parameters, so a page's key bounds are written into it as literals. Only
//! values whose literal the agent writes itself and PostgreSQL cannot misread go this way
//! ([`key_literal`]): integers, UUIDs and text; any other key reads through sqlx as before.

use dbsync_protocol::Value;
use futures_util::{Stream, TryStreamExt};

use super::{EncodedPage, PageBuilder};
use crate::error::{Error, Result};

/// The SQL literal of key value `value` of a column of engine-neutral type `neutral`, typed as
/// sqlx would bind it, or `None` when the value has none this way (the page then binds it).
///
/// Text is written as an escape string (`E'...'`, backslashes and quotes doubled), which reads
/// the same whatever `standard_conforming_strings` says; text holding NUL has no literal.
pub(super) fn key_literal(value: &Value, neutral: &str) -> Option<String> {
    match (value, neutral) {
        (Value::Int(v), "int") => Some(format!("'{v}'::int8")),
        (Value::Uuid(v), "uuid") => Some(format!(
            "'{}'::uuid",
            uuid::Uuid::from_bytes(*v).hyphenated()
        )),
        (Value::Text(v), "uuid") => uuid::Uuid::try_parse(v)
            .ok()
            .map(|u| format!("'{}'::uuid", u.hyphenated())),
        (Value::Text(v), "text") if !v.contains('\0') => {
            let mut out = String::with_capacity(v.len() + 10);
            out.push_str("E'");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\'' => out.push_str("''"),
                    c => out.push(c),
                }
            }
            out.push_str("'::text");
            Some(out)
        }
        _ => None,
    }
}

/// `COPY (<select>) TO STDOUT (FORMAT binary)`.
pub(super) fn copy_statement(select: &str) -> String {
    format!("COPY ({select}) TO STDOUT (FORMAT binary)")
}

/// Reads one page with binary `COPY` `statement` on a connection of `pool`, in snapshot
/// `snapshot` when given ([`super::import_snapshot`]).
///
/// A `COPY` read only in part leaves its connection in the middle of it, unfit for anything
/// else: a page that fails, or whose read is dropped half-way (its session ended), closes its
/// connection rather than handing it back to the pool.
pub(super) async fn read(
    pool: &sqlx::PgPool,
    snapshot: Option<&str>,
    statement: &str,
    page: PageBuilder<'_>,
    key_positions: &[usize],
    room: usize,
) -> Result<EncodedPage> {
    let mut held = Held {
        conn: pool.acquire().await?,
        done: false,
    };
    if let Some(id) = snapshot {
        sqlx::raw_sql("BEGIN").execute(&mut *held.conn).await?;
        super::import_snapshot(&mut held.conn, id).await?;
    }
    let chunks = held.conn.copy_out_raw(statement).await?;
    let page = encode_copy(chunks, page, key_positions, room).await?;
    if snapshot.is_some() {
        sqlx::raw_sql("COMMIT").execute(&mut *held.conn).await?;
    }
    held.done = true;
    Ok(page)
}

/// A pooled connection closed when dropped unless `done`.
struct Held {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    done: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            self.conn.close_on_drop();
        }
    }
}

/// The signature binary `COPY` data starts with.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Reads a binary `COPY` stream (`chunks`, as PostgreSQL splits it) into `page`; the last
/// row's values at `key_positions` are its key.
async fn encode_copy<S, B>(
    mut chunks: S,
    mut page: PageBuilder<'_>,
    key_positions: &[usize],
    room: usize,
) -> Result<EncodedPage>
where
    S: Stream<Item = std::result::Result<B, sqlx::Error>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut parser = Parser {
        fields: page.width(),
        key_positions,
        last_key: vec![None; key_positions.len()],
        header: false,
        ended: false,
    };
    // A row split over chunks waits here whole; PostgreSQL sends one row a chunk, so this is
    // rarely used.
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = chunks.try_next().await? {
        let chunk = chunk.as_ref();
        if pending.is_empty() {
            let used = parser.parse(chunk, &mut page)?;
            pending.extend_from_slice(&chunk[used..]);
        } else {
            pending.extend_from_slice(chunk);
            let used = parser.parse(&pending, &mut page)?;
            pending.drain(..used);
        }
    }
    if !parser.ended || !pending.is_empty() {
        return Err(malformed(
            "the data ends inside a row or before its trailer",
        ));
    }
    let last_key = if page.rows() == 0 {
        None
    } else {
        let values = parser
            .last_key
            .iter()
            .zip(key_positions)
            .map(|(bytes, position)| match bytes {
                Some(bytes) => page.decode(*position, bytes),
                None => Ok(Value::Null),
            })
            .collect::<Result<Vec<_>>>()?;
        Some(values)
    };
    page.finish(room, last_key)
}

fn malformed(detail: &str) -> Error {
    Error::invalid(
        "rows",
        format!("malformed binary COPY data from PostgreSQL: {detail}"),
    )
}

/// Where a binary `COPY` stream is.
struct Parser<'k> {
    fields: usize,
    key_positions: &'k [usize],
    /// The last row's key columns, as sent (`None`: null).
    last_key: Vec<Option<Vec<u8>>>,
    header: bool,
    ended: bool,
}

impl Parser<'_> {
    /// Takes the whole rows at the start of `data` into `page`; returns how many bytes they
    /// (and the header or trailer, if there) took.
    fn parse(&mut self, data: &[u8], page: &mut PageBuilder<'_>) -> Result<usize> {
        let mut at = 0;
        if !self.header {
            // Signature, flags, then the header extension's length and bytes.
            let Some(fixed) = data.get(..SIGNATURE.len() + 8) else {
                return Ok(0);
            };
            if &fixed[..SIGNATURE.len()] != SIGNATURE {
                return Err(malformed("no binary COPY signature"));
            }
            let flags = be_u32(&fixed[11..15]);
            if flags & (1 << 16) != 0 {
                return Err(malformed("rows carry OIDs"));
            }
            let extension = be_u32(&fixed[15..19]) as usize;
            let end = fixed.len().saturating_add(extension);
            if data.len() < end {
                return Ok(0);
            }
            at = end;
            self.header = true;
        }
        while at < data.len() {
            if self.ended {
                return Err(malformed("data after the trailer"));
            }
            let Some(end) = self.row_end(&data[at..])? else {
                break;
            };
            let row = &data[at..at + end];
            at += end;
            let count = i16::from_be_bytes([row[0], row[1]]);
            if count == -1 {
                self.ended = true;
                continue;
            }
            let mut field = 2;
            for i in 0..self.fields {
                let len = be_i32(&row[field..field + 4]);
                field += 4;
                let value = if len < 0 {
                    None
                } else {
                    let bytes = &row[field..field + len as usize];
                    field += len as usize;
                    Some(bytes)
                };
                if let Some(k) = self.key_positions.iter().position(|p| *p == i) {
                    match (&mut self.last_key[k], value) {
                        (Some(kept), Some(bytes)) => {
                            kept.clear();
                            kept.extend_from_slice(bytes);
                        }
                        (slot, bytes) => *slot = bytes.map(<[u8]>::to_vec),
                    }
                }
                page.value(i, value)?;
            }
            page.row_done();
        }
        Ok(at)
    }

    /// The length of the row (or trailer) at the start of `data` if all of it is there.
    fn row_end(&self, data: &[u8]) -> Result<Option<usize>> {
        let Some(count) = data.get(..2) else {
            return Ok(None);
        };
        let count = i16::from_be_bytes([count[0], count[1]]);
        if count == -1 {
            return Ok(Some(2));
        }
        if usize::try_from(count).ok() != Some(self.fields) {
            return Err(malformed(&format!(
                "a row of {count} fields, expected {}",
                self.fields
            )));
        }
        let mut at = 2usize;
        for _ in 0..self.fields {
            let Some(len) = data.get(at..at + 4) else {
                return Ok(None);
            };
            let len = be_i32(len);
            at += 4;
            if len >= 0 {
                at = at.saturating_add(len as usize);
            } else if len != -1 {
                return Err(malformed("a negative field length"));
            }
        }
        Ok((at <= data.len()).then_some(at))
    }
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn be_i32(bytes: &[u8]) -> i32 {
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_literals_cannot_be_misread() {
        assert_eq!(
            key_literal(&Value::Int(-9_223_372_036_854_775_808), "int").as_deref(),
            Some("'-9223372036854775808'::int8")
        );
        assert_eq!(
            key_literal(&Value::Text("a'b\\c\"d".into()), "text").as_deref(),
            Some("E'a''b\\\\c\"d'::text")
        );
        assert_eq!(key_literal(&Value::Text("a\0b".into()), "text"), None);
        assert_eq!(key_literal(&Value::Text("not a uuid".into()), "uuid"), None);
        assert_eq!(
            key_literal(
                &Value::Text("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11".into()),
                "uuid"
            )
            .as_deref(),
            Some("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid")
        );
        // A value of another kind than its column, or a type with no literal here.
        assert_eq!(key_literal(&Value::Text("1".into()), "int"), None);
        assert_eq!(key_literal(&Value::Int(1), "text"), None);
        assert_eq!(key_literal(&Value::Bool(true), "bool"), None);
    }

    /// Binary `COPY` data of rows of (int8, text) in PostgreSQL's format.
    fn copy_data(rows: &[(i64, Option<&str>)]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        // A header extension of three bytes, skipped.
        out.extend_from_slice(&3u32.to_be_bytes());
        out.extend_from_slice(b"ext");
        for (n, text) in rows {
            out.extend_from_slice(&2i16.to_be_bytes());
            out.extend_from_slice(&8i32.to_be_bytes());
            out.extend_from_slice(&n.to_be_bytes());
            match text {
                Some(t) => {
                    out.extend_from_slice(&(t.len() as i32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn decoders() -> Vec<super::super::pg_binary::Decoder> {
        vec![
            super::super::pg_binary::Decoder::of("int"),
            super::super::pg_binary::Decoder::of("text"),
        ]
    }

    async fn read_in(chunks: Vec<Vec<u8>>) -> Result<EncodedPage> {
        let decoders = decoders();
        let page = PageBuilder::new(&decoders, 10, false);
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(Ok::<_, sqlx::Error>)
                .collect::<Vec<_>>(),
        );
        encode_copy(stream, page, &[0], 4).await
    }

    #[tokio::test]
    async fn copy_data_split_anywhere_reads_alike() {
        let data = copy_data(&[(1, Some("one")), (-7, None), (300, Some("drei ü"))]);
        let whole = read_in(vec![data.clone()]).await.unwrap();
        assert_eq!(whole.rows, 3);
        assert_eq!(whole.last_key, Some(vec![Value::Int(300)]));
        assert_eq!(whole.room, 4);
        for size in 1..data.len() {
            let chunks = data.chunks(size).map(<[u8]>::to_vec).collect();
            let split = read_in(chunks).await.unwrap();
            assert_eq!(split.rows, whole.rows, "chunks of {size}");
            assert_eq!(split.last_key, whole.last_key, "chunks of {size}");
            assert_eq!(split.columns, whole.columns, "chunks of {size}");
        }
        // No rows: no key.
        let empty = read_in(vec![copy_data(&[])]).await.unwrap();
        assert_eq!((empty.rows, empty.last_key), (0, None));
    }

    #[tokio::test]
    async fn malformed_copy_data_is_refused() {
        let data = copy_data(&[(1, Some("one")), (2, Some("two"))]);
        let refused = |chunks: Vec<Vec<u8>>| async move {
            let err = read_in(chunks).await.unwrap_err().to_string();
            assert!(err.contains("malformed binary COPY data"), "{err}");
        };
        // Cut short: inside a row, and before the trailer.
        refused(vec![data[..data.len() - 5].to_vec()]).await;
        refused(vec![data[..data.len() - 2].to_vec()]).await;
        // Not binary COPY data.
        refused(vec![b"1\tone\n".to_vec()]).await;
        // A row of another width.
        let mut wide = data.clone();
        let first_row = SIGNATURE.len() + 8 + 3;
        wide[first_row..first_row + 2].copy_from_slice(&3i16.to_be_bytes());
        refused(vec![wide]).await;
        // Bytes after the trailer.
        let mut trailing = data.clone();
        trailing.extend_from_slice(b"x");
        refused(vec![trailing]).await;
        // A field length below -1.
        let mut negative = data;
        negative[first_row + 2..first_row + 6].copy_from_slice(&(-2i32).to_be_bytes());
        refused(vec![negative]).await;
    }
}
