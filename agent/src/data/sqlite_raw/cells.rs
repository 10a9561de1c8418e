//! A page read from SQLite held as one buffer: a cell per value by storage class, text and bytes
//! copied one after another into one arena (no allocation per value), turned into values or
//! encoded for the wire from there. No `unsafe` here: [`super::select_cells`] fills it.

use super::RawError;

/// One value as read from SQLite, by storage class; text and bytes are a range of the page's
/// arena ([`Cells`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(usize, usize),
    Blob(usize, usize),
}

/// Rows read by [`super::select_cells`]: `width` cells a row, row after row, their text and bytes
/// copied one after another into one buffer (no allocation per value).
#[derive(Debug)]
pub(crate) struct Cells {
    pub(super) width: usize,
    pub(super) cells: Vec<Cell>,
    pub(super) arena: Vec<u8>,
}

impl Cells {
    /// How many rows.
    pub(crate) fn rows(&self) -> usize {
        self.cells.len().checked_div(self.width).unwrap_or(0)
    }

    fn text(&self, start: usize, end: usize) -> Result<&str, RawError> {
        std::str::from_utf8(&self.arena[start..end])
            .map_err(|_| RawError::Invalid("a text value that is not UTF-8".into()))
    }

    fn value(&self, cell: Cell) -> Result<dbsync_protocol::Value, RawError> {
        use dbsync_protocol::Value;
        Ok(match cell {
            Cell::Null => Value::Null,
            Cell::Int(i) => Value::Int(i),
            Cell::Float(f) => Value::Float(f),
            Cell::Text(start, end) => Value::Text(self.text(start, end)?.to_owned()),
            Cell::Blob(start, end) => Value::Bytes(self.arena[start..end].to_vec()),
        })
    }

    /// Row `row`'s values at `positions` (a key).
    pub(crate) fn values_at(
        &self,
        row: usize,
        positions: &[usize],
    ) -> Result<Vec<dbsync_protocol::Value>, RawError> {
        positions
            .iter()
            .map(|i| self.value(self.cells[row * self.width + i]))
            .collect()
    }

    /// Every row as values: INTEGER, REAL, TEXT, BLOB and NULL as `Int`, `Float`, `Text`,
    /// `Bytes` and `Null`.
    pub(crate) fn to_rows(&self) -> Result<Vec<Vec<dbsync_protocol::Value>>, RawError> {
        let all: Vec<usize> = (0..self.width).collect();
        (0..self.rows())
            .map(|row| self.values_at(row, &all))
            .collect()
    }

    /// The rows encoded for the wire column by column (a row batch's `rows`), as
    /// [`Cells::to_rows`] would be, behind `room` zero bytes: a column whose values are all of
    /// one storage class (or NULL) goes bare, any other as whole values. With `compact`, a column
    /// of integers goes as differences where that is smaller
    /// ([`dbsync_protocol::message::columnar::Column::compact`]).
    pub(crate) fn encode(&self, room: usize, compact: bool) -> Result<Vec<u8>, RawError> {
        self.encode_columns(room, self.width, compact)
    }

    /// [`Cells::encode`] of the first `count` columns only (those after are read, not sent).
    pub(crate) fn encode_columns(
        &self,
        room: usize,
        count: usize,
        compact: bool,
    ) -> Result<Vec<u8>, RawError> {
        use dbsync_protocol::message::columnar::{Column, ColumnsWriter, Kind};
        let rows = self.rows();
        let count = count.min(self.width);
        let invalid = RawError::Invalid;
        let mut out = Vec::with_capacity(room + self.arena.len() + self.cells.len() * 4 + 64);
        out.resize(room, 0);
        let mut writer = ColumnsWriter::new(count, rows, out);
        for column in 0..count {
            let cells = || self.cells.iter().skip(column).step_by(self.width);
            let kind_of = |cell: &Cell| match cell {
                Cell::Null => None,
                Cell::Int(_) => Some(Kind::Int),
                Cell::Float(_) => Some(Kind::Float),
                Cell::Text(..) => Some(Kind::Text),
                Cell::Blob(..) => Some(Kind::Bytes),
            };
            let mut kinds = cells().filter_map(kind_of);
            let first = kinds.next();
            let kind = if kinds.all(|k| Some(k) == first) {
                Some(first.unwrap_or(Kind::Int))
            } else {
                None
            };
            if compact && kind == Some(Kind::Int) {
                // Written apart: the writer picks differences or values once it has both sizes.
                let mut ints = Column::compact(kind);
                for cell in cells() {
                    match *cell {
                        Cell::Int(i) => ints.int(i),
                        _ => ints.null(),
                    }
                }
                writer.push(&ints).map_err(invalid)?;
                continue;
            }
            let out = writer.column(kind).map_err(invalid)?;
            for cell in cells() {
                match (kind, *cell) {
                    (_, Cell::Null) => out.null(),
                    (None, cell) => out.value(&self.value(cell)?).map_err(invalid)?,
                    (Some(_), Cell::Int(i)) => out.int(i),
                    (Some(_), Cell::Float(f)) => out.float(f),
                    (Some(_), Cell::Text(start, end)) => out.str(self.text(start, end)?),
                    (Some(_), Cell::Blob(start, end)) => out.bin(&self.arena[start..end]),
                }
            }
        }
        writer.finish().map_err(invalid)
    }
}
