//! The messages of a data-plane session. Each kind has an explicit numeric tag carried in the
//! frame header; the payload is the MessagePack of the matching struct.

use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::value::Value;

/// Message kinds and their wire tags. Tags are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Receiver → sender, first frame.
    Hello = 1,
    /// Sender → receiver, session accepted.
    Welcome = 2,
    /// Either way, a refusal or failure with a stable code.
    Error = 3,
    /// Receiver asks for the offered tables.
    ListTables = 10,
    /// Sender lists them.
    TableList = 11,
    /// Receiver asks for one table's schema.
    DescribeTable = 12,
    /// Sender describes it.
    TableSchema = 13,
    /// Receiver asks for rows.
    Pull = 20,
    /// Sender sends rows (payload zstd-compressed).
    RowBatch = 21,
    /// Receiver grants the sender more batches in flight.
    Credit = 22,
    /// Sender: the pull is over.
    PullDone = 23,
    /// Sender: the transfer waits for approval.
    ApprovalPending = 24,
    /// Reserved: asking about an approval. A receiver asks again with `Pull` and the transfer id,
    /// and a sender answers this kind with a protocol error.
    ApprovalStatus = 25,
    /// Receiver stops a pull.
    Cancel = 26,
    /// Receiver asks for the row hashes of a page (protocol 4).
    Verify = 27,
    /// Sender answers with a page's hash, and each row's with `detail`.
    VerifyPage = 28,
    /// Receiver asks how to cut a table into key ranges for a parallel pull (protocol 6).
    Split = 40,
    /// Sender answers with the ranges' bounds.
    SplitDone = 41,
    /// Liveness probe.
    Ping = 30,
    /// Answer to a ping.
    Pong = 31,
}

impl Kind {
    /// Every kind.
    pub const ALL: &'static [Kind] = &[
        Kind::Hello,
        Kind::Welcome,
        Kind::Error,
        Kind::ListTables,
        Kind::TableList,
        Kind::DescribeTable,
        Kind::TableSchema,
        Kind::Pull,
        Kind::RowBatch,
        Kind::Credit,
        Kind::PullDone,
        Kind::ApprovalPending,
        Kind::ApprovalStatus,
        Kind::Cancel,
        Kind::Verify,
        Kind::VerifyPage,
        Kind::Split,
        Kind::SplitDone,
        Kind::Ping,
        Kind::Pong,
    ];

    /// The kind with this tag.
    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|kind| *kind as u8 == tag)
    }
}

/// First frame of a session. Its secrets are [`Secret`]s: no `Debug` of it prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the receiver speaks.
    pub versions: Vec<u16>,
    /// The connection token.
    pub token: Secret,
    /// The download password, when the connection has one.
    pub password: Option<Secret>,
    /// Receiver software and version, for the transfer records.
    pub client_name: String,
}

/// Session accepted, with the limits the receiver must respect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version chosen.
    pub version: u16,
    /// Session id (for logs and transfer records).
    pub session_id: String,
    /// Rows in one pull request.
    pub max_records_per_request: u64,
    /// Largest frame the sender will send or accept.
    pub max_frame_bytes: u64,
}

/// A refusal or failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// Stable code (see [`crate::error::codes`]).
    pub code: String,
    /// Explanation.
    pub message: String,
    /// For `rate_limited`: milliseconds until a retry may pass.
    pub retry_after_ms: Option<u64>,
    /// For approval codes: the transfer concerned.
    pub transfer_id: Option<String>,
}

/// One table as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// Estimated rows.
    pub estimated_rows: u64,
    /// Estimated size in bytes.
    pub bytes: u64,
    /// Primary key columns.
    pub primary_key: Vec<String>,
    /// Tables this one references (pulled first).
    pub depends_on: Vec<String>,
}

/// Column of a described table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// The source engine's type, e.g. `numeric(12,2)`.
    pub native_type: String,
    /// The engine-neutral type, e.g. `numeric`, `timestamptz`, `array<int>`.
    pub neutral_type: String,
    /// Whether NULL is allowed.
    pub nullable: bool,
}

/// A described table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Table name.
    pub name: String,
    /// Engine of the source ("postgres" or "sqlite"): native types are in its dialect.
    pub engine: String,
    /// Columns in order.
    pub columns: Vec<ColumnInfo>,
    /// Primary key columns, in key order.
    pub primary_key: Vec<String>,
    /// What a PostgreSQL receiver needs besides the columns to make the table usable: the user
    /// types and extensions its columns use, and its sequences (version 3 and later; absent
    /// before, and from a SQLite sender).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSchema>,
}

/// The parts of a PostgreSQL table's schema a receiver rebuilds, as data: a receiver writes every
/// statement itself, from names it quotes and types it checks. Expressions (defaults, CHECK,
/// generated columns, index expressions and predicates) are the only SQL text; a receiver writes
/// one only after reading it token by token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresSchema {
    /// Extensions that provide a type a column uses (`hstore`, `citext`, ...).
    pub extensions: Vec<String>,
    /// The user types the columns use, each after the types it uses.
    pub types: Vec<UserType>,
    /// Sequences that give a column its values (serial and identity columns).
    pub sequences: Vec<ColumnSequence>,
    /// Column defaults (other than a serial column's), as PostgreSQL prints them. A receiver
    /// writes only those it checks hold nothing but values, operators, casts and known
    /// functions.
    #[serde(default)]
    pub defaults: Vec<ColumnDefault>,
    /// Secondary indexes, UNIQUE and EXCLUDE constraints, with their expressions, predicates,
    /// INCLUDE columns, sort options and operator classes.
    #[serde(default)]
    pub indexes: Vec<IndexDef>,
    /// Foreign keys of the table.
    #[serde(default)]
    pub foreign_keys: Vec<ForeignKeyDef>,
    /// CHECK constraints of the table (a domain's travel with the domain).
    #[serde(default)]
    pub checks: Vec<CheckDef>,
    /// Generated columns and their expressions (the receiver computes them; their values are
    /// not pulled).
    #[serde(default)]
    pub generated: Vec<GeneratedColumn>,
    /// Comments on the table and its columns.
    #[serde(default)]
    pub comments: Vec<CommentDef>,
    /// Columns whose collation is not their type's default: column and collation name.
    #[serde(default)]
    pub collations: Vec<(String, String)>,
}

/// A CHECK constraint. Its expression is SQL text of the sender's: a receiver writes it only
/// after checking it holds nothing but values, columns, operators, casts and known functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDef {
    /// Constraint name.
    pub name: String,
    /// The expression, as `pg_get_expr` prints it.
    pub expression: String,
    /// Validated on the sender (else `NOT VALID` there).
    pub validated: bool,
}

/// A generated column (`GENERATED ALWAYS AS (expression) STORED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratedColumn {
    /// The column.
    pub column: String,
    /// The expression, as `pg_get_expr` prints it.
    pub expression: String,
}

/// A comment on the table (`column` none) or one of its columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentDef {
    /// The column, or none for the table.
    pub column: Option<String>,
    /// The comment.
    pub text: String,
}

/// One key of an index that is more than a plain column: an expression, an operator class, a
/// collation or a sort order of its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexKey {
    /// A column...
    pub column: Option<String>,
    /// ...or an expression, as `pg_get_indexdef` prints it.
    pub expression: Option<String>,
    /// Operator class, when not the type's default.
    pub opclass: Option<String>,
    /// Collation, when not the column's.
    pub collation: Option<String>,
    /// `DESC`.
    pub descending: bool,
    /// `NULLS FIRST` (`NULLS LAST` otherwise).
    pub nulls_first: bool,
}

/// A column's default expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnDefault {
    /// The column.
    pub column: String,
    /// The expression, as `pg_get_expr` prints it.
    pub expression: String,
}

/// An index over plain columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexDef {
    /// Index (or constraint) name.
    pub name: String,
    /// Access method: `btree`, `hash`, `gin`, `gist`, `brin` or `spgist`.
    pub method: String,
    /// Key columns in order.
    pub columns: Vec<String>,
    /// Unique.
    pub unique: bool,
    /// It backs a UNIQUE constraint (made as the constraint).
    pub constraint: bool,
    /// Each key in full, when any is more than a plain column (then `columns` is empty).
    #[serde(default)]
    pub keys: Vec<IndexKey>,
    /// `INCLUDE` columns.
    #[serde(default)]
    pub include: Vec<String>,
    /// A partial index's predicate, as `pg_get_expr` prints it.
    #[serde(default)]
    pub predicate: Option<String>,
    /// An exclusion constraint's operator for each key (empty for any other index).
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// A foreign key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignKeyDef {
    /// Constraint name.
    pub name: String,
    /// Referencing columns.
    pub columns: Vec<String>,
    /// Referenced table (in the same schema).
    pub references: String,
    /// Referenced columns.
    pub referenced_columns: Vec<String>,
    /// `ON UPDATE` action: `a` no action, `r` restrict, `c` cascade, `n` set null, `d` set default.
    pub on_update: String,
    /// `ON DELETE` action, as `on_update`.
    pub on_delete: String,
    /// `MATCH FULL`.
    pub match_full: bool,
    /// `DEFERRABLE`.
    pub deferrable: bool,
    /// `INITIALLY DEFERRED`.
    pub initially_deferred: bool,
    /// Validated on the sender (else `NOT VALID` there).
    pub validated: bool,
}

/// A user-defined type, as its definition's parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserType {
    /// `CREATE TYPE name AS ENUM (labels...)`.
    Enum {
        /// Type name (`format_type`: schema-qualified when outside the search path).
        name: String,
        /// Labels in sort order.
        labels: Vec<String>,
    },
    /// `CREATE TYPE name AS (attribute type, ...)`.
    Composite {
        /// Type name.
        name: String,
        /// Attributes: name and type.
        attributes: Vec<(String, String)>,
    },
    /// `CREATE TYPE name AS RANGE (SUBTYPE = subtype)`.
    Range {
        /// Type name.
        name: String,
        /// Element type.
        subtype: String,
    },
    /// `CREATE DOMAIN name AS base [NOT NULL] [CONSTRAINT c CHECK (...)]...`.
    Domain {
        /// Type name.
        name: String,
        /// Base type.
        base: String,
        /// NOT NULL.
        not_null: bool,
        /// CHECK constraints (their expressions checked as a table's are).
        #[serde(default)]
        checks: Vec<CheckDef>,
    },
}

impl UserType {
    /// The type's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Enum { name, .. }
            | Self::Composite { name, .. }
            | Self::Range { name, .. }
            | Self::Domain { name, .. } => name,
        }
    }
}

/// A sequence that gives a column its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSequence {
    /// The column.
    pub column: String,
    /// `always` or `by default` for an identity column; `None` for a serial column (a sequence
    /// owned by the column and its `nextval` default).
    pub identity: Option<String>,
    /// The sequence's type (`bigint`, `integer`, `smallint`).
    pub data_type: String,
    /// Increment.
    pub increment: i64,
    /// Smallest value.
    pub min_value: i64,
    /// Largest value.
    pub max_value: i64,
    /// First value.
    pub start: i64,
    /// Wraps around at the end.
    pub cycle: bool,
    /// The last value handed out on the sender, if any.
    pub last_value: Option<i64>,
}

/// A request for rows of one table, in key order after `after_key`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pull {
    /// Receiver-chosen id, echoed in batches.
    pub request_id: u64,
    /// Table name.
    pub table: String,
    /// Resume after this key (none: from the start).
    pub after_key: Option<Vec<Value>>,
    /// Rows wanted (capped by the sender's max_records_per_request).
    pub limit: u64,
    /// Columns to leave out.
    pub exclude_columns: Vec<String>,
    /// Batches the sender may have in flight before waiting for credit.
    pub credits: u32,
    /// The transfer being resumed, if any (a resume is not a new download).
    pub transfer_id: Option<String>,
    /// Only rows whose key passes this filter (none: every row).
    pub key_filter: Option<KeyFilter>,
    /// Incremental: page by (this column, primary key) instead of the primary key, so
    /// `after_key` and every `last_key` hold the cursor value first, then the key.
    pub cursor_column: Option<String>,
    /// Send the primary key columns only (a reconciliation pass: the receiver deletes the rows
    /// the sender no longer has). Keys are data: subject to approval like any pull, and each key
    /// counted as a record against the record limit; not a download of its own (the row pass it
    /// reconciles was).
    pub keys_only: bool,
    /// Protocol 6: one part of a parallel pull, under the grant a [`SplitDone`] named. A part
    /// asks for exactly one of the grant's ranges (`after_key` its lower bound, `key_filter` a
    /// range up to its upper bound); it reads from the grant's snapshot, and only the first part
    /// to start counts as a download. A token the sender does not know, or a request that is
    /// not one of its ranges, is served as a pull of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

/// Most ranges a table is cut into for a parallel pull.
pub const MAX_PARTS: u32 = 16;

/// The receiver asks how to cut `table` into at most `parts` key ranges, to pull them side by
/// side (protocol 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Matches the answer.
    pub request_id: u64,
    /// The table.
    pub table: String,
    /// Ranges wanted (the sender clamps it to `1..=MAX_PARTS`, and cuts fewer when the table is
    /// small).
    pub parts: u32,
}

/// The sender's cut: `bounds` are the ranges' upper keys in key order, so part 0 is every key up
/// to `bounds[0]` (inclusive), part i the keys after `bounds[i-1]` up to `bounds[i]`, and the
/// last part the keys after the last bound. No bound: pull the table in one piece.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitDone {
    /// The request answered.
    pub request_id: u64,
    /// At most `parts - 1` keys, strictly increasing.
    pub bounds: Vec<Vec<Value>>,
    /// The grant each part names in [`Pull::split`] (none when `bounds` is empty).
    pub token: Option<String>,
}

/// Most batches a receiver may let a sender have in flight in one pull; a sender clamps what it
/// is granted to `1..=MAX_CREDITS`.
pub const MAX_CREDITS: u32 = 64;

/// Largest key list a [`KeyFilter::Keys`] may carry.
pub const MAX_FILTER_KEYS: usize = 10_000;

/// A row filter on the primary key. Keys have one value per key column, in key order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KeyFilter {
    /// Keys between `from` and `to`, both included; a missing bound is open.
    Range {
        /// Lowest key (none: from the first row).
        from: Option<Vec<Value>>,
        /// Highest key (none: to the last row).
        to: Option<Vec<Value>>,
    },
    /// Exactly these keys (at most [`MAX_FILTER_KEYS`]).
    Keys(Vec<Vec<Value>>),
}

/// Rows, in key order. Sent as this; read back as a [`crate::columns::ReceivedBatch`], whose
/// rows stay encoded until asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowBatch {
    /// The pull this answers.
    pub request_id: u64,
    /// Batch number within the pull, from 0.
    pub seq: u64,
    /// Column names, in row order.
    pub columns: Vec<String>,
    /// The rows. On the wire they travel column-major (see [`columnar`]).
    #[serde(serialize_with = "columnar::serialize")]
    pub rows: Vec<Vec<Value>>,
    /// Key of the last row, to resume after.
    pub last_key: Vec<Value>,
    /// The sender's transfer record (a receiver that dies mid-pull resumes under it).
    pub transfer_id: String,
}

/// More batches may be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// The pull.
    pub request_id: u64,
    /// Additional batches allowed in flight.
    pub batches: u32,
}

/// End of a pull.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullDone {
    /// The pull.
    pub request_id: u64,
    /// Rows sent in this pull.
    pub rows: u64,
    /// Whether the table has more rows after `last_key` (limit or record cap reached).
    pub more: bool,
    /// Whether the connection's record limit cut the pull.
    pub truncated: bool,
    /// Key of the last row sent.
    pub last_key: Option<Vec<Value>>,
    /// The sender's transfer record.
    pub transfer_id: String,
}

/// The transfer waits for an admin on the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalPending {
    /// The pull.
    pub request_id: u64,
    /// The transfer to ask about.
    pub transfer_id: String,
}

/// Ask about a pending approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalStatus {
    /// The transfer.
    pub transfer_id: String,
}

/// Stop a pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// The pull.
    pub request_id: u64,
}

/// The receiver asks for one page of a table's rows as hashes, in key order after `after`
/// (protocol 4). Moves no row value; counts against no download or record limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verify {
    /// Matches the answer.
    pub request_id: u64,
    /// The table.
    pub table: String,
    /// Only keys after this one (a previous page's last key).
    pub after: Option<Vec<Value>>,
    /// Rows in the page (the sender may send fewer: its own per-request limit).
    pub limit: u64,
    /// Also send each row's key and hash.
    pub detail: bool,
    /// Protocol 5: hash the rows after `after` and up to `range.upto` inside the sender's
    /// PostgreSQL database instead (see [`RangeHash`]). Absent in protocol 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<VerifyRange>,
}

/// A key range hashed in the database (protocol 5, both sides PostgreSQL with the same column
/// types). Without `detail` the answer is the whole range's row count and hash, however many
/// rows it holds (`limit` does not apply, `more` is false); with `detail` it is up to `limit`
/// rows' keys and hashes, and `more` says whether the range goes on after `last_key`.
///
/// Messages go as MessagePack arrays, a field by its place: the fields after `hash` are
/// written up to the last one that is not empty (an older peer reads no field it does not
/// know, and a field after an empty one keeps its place).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VerifyRange {
    /// The range's last key (inclusive); `None`: to the end of the table.
    pub upto: Option<Vec<Value>>,
    /// How rows are hashed.
    pub hash: RangeHash,
    /// Protocol 8: the range's rows spread over buckets by their key (see [`Buckets`]).
    #[serde(default)]
    pub buckets: Option<Buckets>,
    /// Protocol 9, a summary: hash only the rows' keys, a row's hash being its bucket hash
    /// (see [`Buckets`]); the answer's `hash` is their XOR, found without reading the rest of
    /// any row.
    #[serde(default)]
    pub keys_only: bool,
    /// Protocol 9, with `detail`: only the rows written since a [`Mark`] (or only those not).
    #[serde(default)]
    pub since: Option<Since>,
    /// Protocol 9, with `detail` and `since`: only the rows of these keys (a one-column key;
    /// at most a page's `limit` of them), in key order, instead of a range (`after` and
    /// `upto` absent).
    #[serde(default)]
    pub keys: Option<Vec<Vec<Value>>>,
}

impl Serialize for VerifyRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let present = [
            self.buckets.is_some(),
            self.keys_only,
            self.since.is_some(),
            self.keys.is_some(),
        ];
        let trailing = present.iter().rposition(|p| *p).map_or(0, |i| i + 1);
        let mut out = serializer.serialize_struct("VerifyRange", 2 + trailing)?;
        out.serialize_field("upto", &self.upto)?;
        out.serialize_field("hash", &self.hash)?;
        // Each field after `hash` up to the last that is not empty; the rest left out.
        if trailing > 0 {
            out.serialize_field("buckets", &self.buckets)?;
        } else {
            out.skip_field("buckets")?;
        }
        if trailing > 1 {
            out.serialize_field("keys_only", &self.keys_only)?;
        } else {
            out.skip_field("keys_only")?;
        }
        if trailing > 2 {
            out.serialize_field("since", &self.since)?;
        } else {
            out.skip_field("since")?;
        }
        if trailing > 3 {
            out.serialize_field("keys", &self.keys)?;
        } else {
            out.skip_field("keys")?;
        }
        out.end()
    }
}

/// Rows written since a [`Mark`] the same sender gave (protocol 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    /// The mark's transaction number.
    pub xid: u64,
    /// `true`: only rows written by a transaction at or after the mark (in progress or later
    /// when it was taken); `false`: only the others.
    pub written: bool,
}

/// Where a PostgreSQL table stood before a statement (protocol 9): every row written later
/// was written by a transaction numbered at or after `xid`. Meaningful only for the same
/// table in the same cluster, which `table` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The oldest transaction then in progress or yet to start (`pg_snapshot_xmin`).
    pub xid: u64,
    /// The cluster's system identifier, the database's and table's object numbers and its
    /// file's: any of them changes when the table is replaced or rewritten.
    pub table: String,
}

/// Most buckets a range is spread over (protocol 8).
pub const MAX_BUCKETS: u32 = 65_536;

/// A range's rows spread over `count` buckets (protocol 8): a row goes to bucket
/// `hashint8extended(key::int8, 0) & (count - 1)` when its key is one column of `smallint`,
/// `integer` or `bigint`, else `hash_record_extended(ROW(key columns), 0) & (count - 1)`, the
/// key columns hashed as [`RangeHash::PgRecord`] hashes them. Without `detail` the answer also holds each non-empty
/// bucket's row count and hash ([`VerifyPage::buckets`]); with `detail` the pages hold only the
/// rows of the buckets set in `only`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buckets {
    /// A power of two, at most [`MAX_BUCKETS`].
    pub count: u32,
    /// With `detail`: a bitmap of `count` bits, bucket `b` being bit `b % 8` (the lowest first)
    /// of byte `b / 8`. Empty without `detail`.
    #[serde(with = "serde_bytes")]
    pub only: Vec<u8>,
}

impl Buckets {
    /// Whether `count` is a power of two within [`MAX_BUCKETS`] and `only` is empty or holds
    /// exactly `count` bits.
    pub fn is_well_formed(&self, detail: bool) -> bool {
        let bitmap = (self.count as usize).div_ceil(8);
        self.count.is_power_of_two()
            && self.count <= MAX_BUCKETS
            && if detail {
                self.only.len() == bitmap
            } else {
                self.only.is_empty()
            }
    }
}

/// Each non-empty bucket of a range (protocol 8, see [`Buckets`]): its number, row count and
/// hash (the XOR of its rows' hashes), in bucket order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketHashes {
    /// Bucket numbers, strictly increasing, each below the count asked for.
    pub ids: Vec<u32>,
    /// Each bucket's row count (at least one).
    pub rows: Vec<u64>,
    /// Each bucket's hash, 8 bytes each, one after another.
    #[serde(with = "serde_bytes")]
    pub hashes: Vec<u8>,
}

impl BucketHashes {
    /// Whether the lists agree in length, the numbers increase within `count`, no bucket is
    /// empty and the counts add up to `rows`.
    pub fn is_well_formed(&self, count: u32, rows: u64) -> bool {
        self.ids.len() == self.rows.len()
            && self.hashes.len() == 8 * self.ids.len()
            && self.ids.windows(2).all(|w| w[0] < w[1])
            && self.ids.last().is_none_or(|last| *last < count)
            && self.rows.iter().all(|r| *r > 0)
            && self
                .rows
                .iter()
                .try_fold(0u64, |sum, r| sum.checked_add(*r))
                == Some(rows)
    }

    /// Bucket `i`'s hash.
    pub fn hash(&self, i: usize) -> &[u8] {
        &self.hashes[8 * i..8 * i + 8]
    }
}

/// How a [`VerifyRange`] hashes rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeHash {
    /// A row's hash is PostgreSQL's `hash_record_extended(ROW(...), 0)` over its columns in the
    /// sender's order (a column of a type without an exact hash read as `::text` under fixed
    /// settings), as 8 big-endian bytes; a range's hash is the XOR of its rows' hashes.
    PgRecord,
}

/// One page of row hashes. `hash` is SHA-256 over the page's row hashes in key order; a row's
/// hash is the first 16 bytes of SHA-256 over its values in their neutral stored form (see
/// docs/protocol.md, "Verification").
///
/// Written as [`VerifyRange`] is: `buckets` and `mark` up to the last that is not empty.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VerifyPage {
    /// The request answered.
    pub request_id: u64,
    /// Rows in the page.
    pub rows: u64,
    /// Hash of the page.
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
    /// Key of the page's last row (the next page starts after it).
    pub last_key: Option<Vec<Value>>,
    /// Whether rows follow.
    pub more: bool,
    /// With `detail`: each row's key, in key order.
    pub keys: Vec<Vec<Value>>,
    /// With `detail`: each row's hash (16 bytes), in the same order.
    pub hashes: Vec<serde_bytes::ByteBuf>,
    /// Protocol 8, a range's summary over buckets: each non-empty bucket's count and hash.
    #[serde(default)]
    pub buckets: Option<BucketHashes>,
    /// Protocol 9, in answer to a range: where the sender's table stood before the range was
    /// read.
    #[serde(default)]
    pub mark: Option<Mark>,
}

impl Serialize for VerifyPage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let trailing = if self.mark.is_some() {
            2
        } else {
            usize::from(self.buckets.is_some())
        };
        let mut out = serializer.serialize_struct("VerifyPage", 7 + trailing)?;
        out.serialize_field("request_id", &self.request_id)?;
        out.serialize_field("rows", &self.rows)?;
        out.serialize_field("hash", serde_bytes::Bytes::new(&self.hash))?;
        out.serialize_field("last_key", &self.last_key)?;
        out.serialize_field("more", &self.more)?;
        out.serialize_field("keys", &self.keys)?;
        out.serialize_field("hashes", &self.hashes)?;
        if trailing > 0 {
            out.serialize_field("buckets", &self.buckets)?;
        } else {
            out.skip_field("buckets")?;
        }
        if trailing > 1 {
            out.serialize_field("mark", &self.mark)?;
        } else {
            out.skip_field("mark")?;
        }
        out.end()
    }
}

/// Liveness probe and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Echoed back.
    pub nonce: u64,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`ErrorMessage`].
    Error(ErrorMessage),
    /// Ask for the offered tables.
    ListTables,
    /// The offered tables.
    TableList(Vec<TableInfo>),
    /// Ask for one table's schema.
    DescribeTable(String),
    /// See [`TableSchema`].
    TableSchema(TableSchema),
    /// See [`Pull`].
    Pull(Pull),
    /// See [`RowBatch`].
    RowBatch(RowBatch),
    /// See [`Credit`].
    Credit(Credit),
    /// See [`PullDone`].
    PullDone(PullDone),
    /// See [`ApprovalPending`].
    ApprovalPending(ApprovalPending),
    /// See [`ApprovalStatus`].
    ApprovalStatus(ApprovalStatus),
    /// See [`Cancel`].
    Cancel(Cancel),
    /// See [`Verify`].
    Verify(Verify),
    /// See [`VerifyPage`].
    VerifyPage(VerifyPage),
    /// See [`Split`].
    Split(Split),
    /// See [`SplitDone`].
    SplitDone(SplitDone),
    /// See [`Ping`].
    Ping(Ping),
    /// Answer to [`Ping`].
    Pong(Ping),
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Hello(_) => Kind::Hello,
            Self::Welcome(_) => Kind::Welcome,
            Self::Error(_) => Kind::Error,
            Self::ListTables => Kind::ListTables,
            Self::TableList(_) => Kind::TableList,
            Self::DescribeTable(_) => Kind::DescribeTable,
            Self::TableSchema(_) => Kind::TableSchema,
            Self::Pull(_) => Kind::Pull,
            Self::RowBatch(_) => Kind::RowBatch,
            Self::Credit(_) => Kind::Credit,
            Self::PullDone(_) => Kind::PullDone,
            Self::ApprovalPending(_) => Kind::ApprovalPending,
            Self::ApprovalStatus(_) => Kind::ApprovalStatus,
            Self::Cancel(_) => Kind::Cancel,
            Self::Verify(_) => Kind::Verify,
            Self::VerifyPage(_) => Kind::VerifyPage,
            Self::Split(_) => Kind::Split,
            Self::SplitDone(_) => Kind::SplitDone,
            Self::Ping(_) => Kind::Ping,
            Self::Pong(_) => Kind::Pong,
        }
    }
}

/// The wire layout of a batch's rows: one array per column, each holding that column's values in
/// row order. Like values sit together, so zstd finds far more to share (on a users-like table,
/// 0.16 of the `COPY` text size against 0.24 row by row).
///
/// A column is `[kind, values]`. When every non-null value of the column is of one kind, `kind`
/// names it (see [`columnar::Kind`]) and `values` holds the bare payloads, `nil` for NULL: no
/// per-value variant name to write, read and check. Otherwise `kind` is 255 and `values` holds
/// whole [`Value`]s. Every column must hold the same number of values; a batch with rows has at
/// least one column. [`crate::columns`] reads it.
pub mod columnar {
    use serde::ser::{Error as _, SerializeSeq, SerializeTuple};
    use serde::{Serialize, Serializer};

    use crate::Value;

    /// The kind tag of a column whose non-null values are all of one kind.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    pub enum Kind {
        /// `Value::Bool`: a boolean.
        Bool = 1,
        /// `Value::Int`: an integer.
        Int = 2,
        /// `Value::Float`: a float64.
        Float = 3,
        /// `Value::Numeric`: a string.
        Numeric = 4,
        /// `Value::Text`: a string.
        Text = 5,
        /// `Value::Bytes`: binary.
        Bytes = 6,
        /// `Value::Uuid`: 16 bytes of binary.
        Uuid = 7,
        /// `Value::Json`: a string.
        Json = 8,
        /// `Value::Date`: an integer.
        Date = 9,
        /// `Value::Time`: an integer.
        Time = 10,
        /// `Value::Timestamp`: an integer.
        Timestamp = 11,
        /// `Value::TimestampTz`: an integer.
        TimestampTz = 12,
    }

    /// The tag of a column of whole values (mixed kinds, intervals, arrays).
    pub const MIXED: u8 = 255;

    /// Added to the tag of a column of integers ([`Kind::takes_deltas`]) whose values are
    /// written as differences: each non-null value as itself minus the non-null value before
    /// it in the column (the first minus 0), in wrapping 64-bit arithmetic; NULLs as `nil`.
    /// Sequential keys and time stamps become runs of one small number, which zstd all but
    /// removes. Sent from protocol version 7 on ([`crate::COMPACT_VERSION`]).
    pub const DELTAS: u8 = 0x40;

    /// Added to the tag of a column of UUIDs with no NULL, whose values are one binary of 16
    /// bytes a row instead of an array of binaries (two bytes of header fewer a value: on
    /// random UUIDs, which no compression shrinks, an eighth of the column). Sent from protocol
    /// version 7 on.
    pub const PACKED: u8 = 0x20;

    /// The width of a packed UUID.
    pub(crate) const UUID_BYTES: usize = 16;

    impl Kind {
        /// The kind of a non-null scalar value (`None` for NULL, intervals and arrays).
        pub fn of(value: &Value) -> Option<Self> {
            Some(match value {
                Value::Bool(_) => Self::Bool,
                Value::Int(_) => Self::Int,
                Value::Float(_) => Self::Float,
                Value::Numeric(_) => Self::Numeric,
                Value::Text(_) => Self::Text,
                Value::Bytes(_) => Self::Bytes,
                Value::Uuid(_) => Self::Uuid,
                Value::Json(_) => Self::Json,
                Value::Date(_) => Self::Date,
                Value::Time(_) => Self::Time,
                Value::Timestamp(_) => Self::Timestamp,
                Value::TimestampTz(_) => Self::TimestampTz,
                Value::Null | Value::Interval { .. } | Value::Array(_) => return None,
            })
        }

        /// Whether a column of this kind may be sent as differences ([`DELTAS`]): the kinds
        /// whose bare values are integers.
        pub fn takes_deltas(self) -> bool {
            matches!(
                self,
                Self::Int | Self::Date | Self::Time | Self::Timestamp | Self::TimestampTz
            )
        }

        pub(crate) fn from_tag(tag: u8) -> Option<Self> {
            [
                Self::Bool,
                Self::Int,
                Self::Float,
                Self::Numeric,
                Self::Text,
                Self::Bytes,
                Self::Uuid,
                Self::Json,
                Self::Date,
                Self::Time,
                Self::Timestamp,
                Self::TimestampTz,
            ]
            .into_iter()
            .find(|kind| *kind as u8 == tag)
        }
    }

    /// One value's bare payload (the column's kind says which variant it was).
    struct Bare<'a>(&'a Value);

    impl Serialize for Bare<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                Value::Null => serializer.serialize_unit(),
                Value::Bool(b) => serializer.serialize_bool(*b),
                Value::Int(i) | Value::Time(i) | Value::Timestamp(i) | Value::TimestampTz(i) => {
                    serializer.serialize_i64(*i)
                }
                Value::Date(d) => serializer.serialize_i32(*d),
                Value::Float(f) => serializer.serialize_f64(*f),
                Value::Numeric(t) | Value::Text(t) | Value::Json(t) => serializer.serialize_str(t),
                Value::Bytes(b) => serializer.serialize_bytes(b),
                Value::Uuid(u) => serializer.serialize_bytes(u),
                Value::Interval { .. } | Value::Array(_) => {
                    Err(S::Error::custom("no bare form for this value"))
                }
            }
        }
    }

    struct RowsColumn<'a> {
        rows: &'a [Vec<Value>],
        index: usize,
    }

    /// A column's values, bare (its kind written once before them) or whole.
    struct Values<'a> {
        column: &'a RowsColumn<'a>,
        bare: bool,
    }

    impl Serialize for Values<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut seq = serializer.serialize_seq(Some(self.column.rows.len()))?;
            for value in self.column.values() {
                if self.bare {
                    seq.serialize_element(&Bare(value))?;
                } else {
                    seq.serialize_element(value)?;
                }
            }
            seq.end()
        }
    }

    impl RowsColumn<'_> {
        fn values(&self) -> impl Iterator<Item = &Value> {
            self.rows.iter().map(|row| &row[self.index])
        }
    }

    impl Serialize for RowsColumn<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut kinds = self.values().filter(|v| **v != Value::Null).map(Kind::of);
            let kind = match kinds.next() {
                None => Some(Kind::Int),
                Some(first) => first.filter(|k| kinds.all(|other| other == Some(*k))),
            };
            let mut pair = serializer.serialize_tuple(2)?;
            pair.serialize_element(&kind.map_or(MIXED, |k| k as u8))?;
            pair.serialize_element(&Values {
                column: self,
                bare: kind.is_some(),
            })?;
            pair.end()
        }
    }

    /// Writes a batch's rows column by column straight from a source's own representation,
    /// with no [`Value`] per cell: the bytes [`serialize`] writes for the same rows, except that
    /// a column whose values are all NULL keeps the kind it is given (the reader takes NULLs of
    /// any kind alike). Either write each column in place ([`ColumnsWriter::column`], then
    /// exactly `rows` values into the [`Column`] it returns), or add columns written apart, once
    /// the rows are counted ([`ColumnsWriter::push`]).
    #[derive(Debug)]
    pub struct ColumnsWriter {
        /// The column being written; its buffer is the whole batch.
        current: Column,
        width: usize,
        rows: usize,
        columns: usize,
    }

    /// One column's values, each written as it is read: in a [`ColumnsWriter`]'s batch, or on
    /// its own ([`Column::new`]) for a reader that learns the row count only at the end.
    #[derive(Debug)]
    pub struct Column {
        out: Vec<u8>,
        kind: Option<Kind>,
        values: usize,
        /// Kept for a compact form ([`Column::compact`]).
        compact: Option<Compact>,
    }

    /// What a column kept for a compact form needs to know.
    #[derive(Debug, Clone, Copy)]
    enum Compact {
        /// Integers, written as differences ([`DELTAS`]).
        Deltas {
            /// The last non-null value.
            last: i64,
            /// The size its values would take written as they are.
            plain: usize,
        },
        /// UUIDs, written as they are; packed ([`PACKED`]) when every value is 16 bytes.
        Packed {
            /// Values that are NULL or not 16 bytes.
            unfit: usize,
        },
    }

    /// The size of `value` as `rmp::encode::write_sint` writes it.
    fn sint_len(value: i64) -> usize {
        match value {
            -32..=127 => 1,
            -128..=255 => 2,
            -32_768..=65_535 => 3,
            -2_147_483_648..=4_294_967_295 => 5,
            _ => 9,
        }
    }

    fn written<T, E: std::fmt::Display>(result: Result<T, E>) {
        // Writes into a `Vec` cannot fail.
        if let Err(err) = result {
            unreachable!("MessagePack write into memory failed: {err}");
        }
    }

    impl Column {
        /// An empty column whose values are all of `kind` or NULL (`None`: whole values, written
        /// with [`Column::value`]).
        pub fn new(kind: Option<Kind>) -> Self {
            Self {
                out: Vec::new(),
                kind,
                values: 0,
                compact: None,
            }
        }

        /// [`Column::new`] for a peer of [`crate::COMPACT_VERSION`]: a column of integers
        /// ([`Kind::takes_deltas`]) keeps its values as differences, and [`ColumnsWriter::push`]
        /// sends them so ([`DELTAS`]) when that is smaller than the values; a column of UUIDs
        /// goes packed ([`PACKED`]) when it holds no NULL. Any other kind is written as by
        /// [`Column::new`].
        pub fn compact(kind: Option<Kind>) -> Self {
            let mut column = Self::new(kind);
            column.compact = match kind {
                Some(Kind::Uuid) => Some(Compact::Packed { unfit: 0 }),
                Some(kind) if kind.takes_deltas() => Some(Compact::Deltas { last: 0, plain: 0 }),
                _ => None,
            };
            column
        }

        /// How many values are written.
        pub fn len(&self) -> usize {
            self.values
        }

        /// No value is written yet.
        pub fn is_empty(&self) -> bool {
            self.values == 0
        }

        /// The size of its values as written, in bytes.
        pub fn encoded_len(&self) -> usize {
            self.out.len()
        }

        /// Makes room for at least `additional` more bytes of values.
        pub fn reserve(&mut self, additional: usize) {
            self.out.reserve(additional);
        }

        fn count(&mut self) -> &mut Vec<u8> {
            self.values += 1;
            &mut self.out
        }

        /// NULL (bare, or the whole value `Value::Null` in a column of whole values).
        pub fn null(&mut self) {
            match &mut self.compact {
                Some(Compact::Deltas { plain, .. }) => *plain += 1,
                Some(Compact::Packed { unfit }) => *unfit += 1,
                None => {}
            }
            if self.kind.is_none() {
                written(rmp_serde::encode::write(self.count(), &Value::Null));
            } else {
                written(rmp::encode::write_nil(self.count()));
            }
        }

        /// A bool.
        pub fn bool(&mut self, value: bool) {
            written(rmp::encode::write_bool(self.count(), value));
        }

        /// An integer (ints, dates, times, timestamps).
        pub fn int(&mut self, value: i64) {
            let written_as = match &mut self.compact {
                Some(Compact::Deltas { last, plain }) => {
                    *plain += sint_len(value);
                    let difference = value.wrapping_sub(*last);
                    *last = value;
                    difference
                }
                _ => value,
            };
            written(rmp::encode::write_sint(self.count(), written_as));
        }

        /// A float.
        pub fn float(&mut self, value: f64) {
            written(rmp::encode::write_f64(self.count(), value));
        }

        /// Text, numeric text or JSON text.
        pub fn str(&mut self, value: &str) {
            written(rmp::encode::write_str(self.count(), value));
        }

        /// Bytes or a UUID's 16 bytes.
        pub fn bin(&mut self, value: &[u8]) {
            if let Some(Compact::Packed { unfit }) = &mut self.compact
                && value.len() != UUID_BYTES
            {
                *unfit += 1;
            }
            written(rmp::encode::write_bin(self.count(), value));
        }

        /// A whole value (a column of kind `None`).
        pub fn value(&mut self, value: &Value) -> Result<(), String> {
            rmp_serde::encode::write(self.count(), value).map_err(|err| err.to_string())
        }
    }

    impl ColumnsWriter {
        /// Starts `width` columns of `rows` values each, appended to `out`.
        pub fn new(width: usize, rows: usize, mut out: Vec<u8>) -> Self {
            written(rmp::encode::write_array_len(&mut out, width as u32));
            Self {
                current: Column {
                    out,
                    kind: None,
                    values: rows,
                    compact: None,
                },
                width,
                rows,
                columns: 0,
            }
        }

        /// Starts the next column in place: its values are all of `kind` or NULL (`None`: whole
        /// values, written with [`Column::value`]). Write exactly `rows` values into it.
        pub fn column(&mut self, kind: Option<Kind>) -> Result<&mut Column, String> {
            let rows = self.rows;
            let column = self.start(kind, kind.map_or(MIXED, |k| k as u8))?;
            written(rmp::encode::write_array_len(&mut column.out, rows as u32));
            Ok(column)
        }

        /// Starts the next column with its tag; its values' header is the caller's to write.
        fn start(&mut self, kind: Option<Kind>, tag: u8) -> Result<&mut Column, String> {
            if self.current.values != self.rows || self.columns == self.width {
                return Err("a column started before the last one was full".into());
            }
            self.columns += 1;
            let column = &mut self.current;
            column.values = 0;
            column.kind = kind;
            written(rmp::encode::write_array_len(&mut column.out, 2));
            written(rmp::encode::write_uint(&mut column.out, u64::from(tag)));
            Ok(column)
        }

        /// Adds the next column, written on its own with exactly `rows` values. A column kept
        /// for a compact form ([`Column::compact`]) goes in it when it fits: integers as
        /// differences when they take fewer bytes than the values, UUIDs packed when none is
        /// NULL; as plain values otherwise.
        pub fn push(&mut self, column: &Column) -> Result<(), String> {
            if column.values != self.rows {
                return Err(format!(
                    "a column of {} values in a batch of {} rows",
                    column.values, self.rows
                ));
            }
            let tag = column.kind.map_or(MIXED, |k| k as u8);
            let values = column.values;
            match (column.kind, column.compact) {
                (Some(kind), Some(Compact::Deltas { plain, .. })) if plain <= column.out.len() => {
                    let plain = crate::columns::summed(&column.out, values)
                        .map_err(|err| err.to_string())?;
                    let out = &mut self.start(Some(kind), tag)?.out;
                    written(rmp::encode::write_array_len(out, values as u32));
                    out.extend_from_slice(&plain);
                }
                (Some(kind), Some(Compact::Deltas { .. })) => {
                    let out = &mut self.start(Some(kind), tag | DELTAS)?.out;
                    written(rmp::encode::write_array_len(out, values as u32));
                    out.extend_from_slice(&column.out);
                }
                (Some(kind), Some(Compact::Packed { unfit: 0 })) if values > 0 => {
                    // One binary of every value's bytes; each was written as `bin8` of 16 bytes
                    // (a 2-byte header, then them).
                    let out = &mut self.start(Some(kind), tag | PACKED)?.out;
                    let bytes = values * UUID_BYTES;
                    written(rmp::encode::write_bin_len(out, bytes as u32));
                    out.reserve(bytes);
                    for value in column.out.chunks_exact(2 + UUID_BYTES) {
                        out.extend_from_slice(&value[2..]);
                    }
                }
                (kind, _) => {
                    let out = &mut self.start(kind, tag)?.out;
                    written(rmp::encode::write_array_len(out, values as u32));
                    out.extend_from_slice(&column.out);
                }
            }
            self.current.values = column.values;
            Ok(())
        }

        /// The encoded columns (the `rows` field of a [`super::RowBatch`] on the wire).
        pub fn finish(self) -> Result<Vec<u8>, String> {
            if self.columns != self.width || self.current.values != self.rows {
                return Err(format!(
                    "{} of {} columns written, the last with {} of {} values",
                    self.columns, self.width, self.current.values, self.rows
                ));
            }
            Ok(self.current.out)
        }
    }

    /// Writes `rows` column by column.
    pub fn serialize<S: Serializer>(rows: &[Vec<Value>], serializer: S) -> Result<S::Ok, S::Error> {
        let width = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|row| row.len() != width) {
            return Err(S::Error::custom("rows of a batch differ in length"));
        }
        if width == 0 && !rows.is_empty() {
            return Err(S::Error::custom("a batch with rows needs a column"));
        }
        let mut seq = serializer.serialize_seq(Some(width))?;
        for index in 0..width {
            seq.serialize_element(&RowsColumn { rows, index })?;
        }
        seq.end()
    }
}
