//! `dbsync verify`: whether this site holds the same rows as the sender, page by page, moving
//! hashes instead of rows; with `repair`, moving only the rows that differ.
//!
//! For each table the sender hashes a page of rows in key order (`Verify`, protocol 4) and this
//! side hashes its own rows of the same key range (after the previous page's last key, up to this
//! page's; the last page is open-ended, so rows here beyond the sender's last key count as
//! extra). Equal pages are done. For a page that differs the sender sends each row's key and
//! hash, and the rows here of that range are set beside them: keys only there are missing here,
//! keys only here are extra, keys on both sides with different hashes differ. Memory holds one
//! page (at most [`PAGE_ROWS`] rows) whatever the table size.
//!
//! `repair` pulls the missing and differing rows by key (`overwrite`, under the same checkpoints
//! as any pull) and deletes the extra ones.
//!
//! A diff pull after a comparison that left both sides alike compares only the rows written
//! on either side since ([`since`], protocol 9).

mod since;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dbsync_protocol::Message;
use dbsync_protocol::Value;
use dbsync_protocol::message::{
    Buckets, MAX_BUCKETS, MAX_FILTER_KEYS, Mark, RangeHash, TableSchema, Verify, VerifyPage,
    VerifyRange,
};
use serde::Serialize;

use super::pull::{PullOptions, TransportChoice};
use crate::agent::Agent;
use crate::connection::ConflictStrategy;
use crate::data::row_hash::{PageHasher, key_bytes, row_hash};
use crate::error::{Error, Result};
use crate::session::receiver::Client;
use crate::source::RowHashes;
use crate::transfer::Progress;

/// Rows in one page of hashes (the sender may send fewer).
pub const PAGE_ROWS: u64 = 10_000;
/// Parts a range is cut into when it differs after identical ranges.
const SPLIT: u64 = 16;
/// Keys of each kind named in a verdict.
const FIRST_KEYS: usize = 5;
/// Keys a repair pulls at a time: half a key list (in the bench, pulls of 10,000 keys took the
/// sender's peak from 56 to 68 MiB, over issue 26's 64, to save 0.3 s of 2.7).
const REPAIR_KEYS: usize = MAX_FILTER_KEYS / 2;
/// Rows per bucket, on average, when a range is hashed in buckets (protocol 8): with 1 % of
/// rows changed, spread evenly, about 8 % of the buckets differ.
const BUCKET_ROWS: u64 = 8;
/// How much larger each range is than the one before, when ranges are hashed in buckets.
const SPAN_GROWTH: u64 = 4;
/// Most pages' rows a range spans, when ranges are hashed in buckets.
const MAX_SPAN_PAGES: u64 = 64;

/// What to verify, and how.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Tables (none: every offered table with a primary key).
    pub tables: Option<Vec<String>>,
    /// Move the rows that differ, delete the extra ones.
    pub repair: bool,
    /// The sender's download password, when it has one.
    pub password: Option<dbsync_protocol::Secret>,
    /// Transport.
    pub transport: TransportChoice,
    /// Keep reconnecting for this long.
    pub retry_for: Duration,
    /// Rows per page (0: [`PAGE_ROWS`]); smaller pages find a few differences with fewer
    /// rows set side by side.
    pub page_rows: u64,
    /// After a repair, verify again before saying `identical` (`verify --repair`); without
    /// it a repair that moved and deleted exactly the rows found says so (`pull --diff`).
    pub recheck: bool,
}

/// What verifying one table found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableVerdict {
    /// The table.
    pub table: String,
    /// Every row here and there alike.
    pub identical: bool,
    /// Rows the sender has.
    pub rows_there: u64,
    /// Rows this site has.
    pub rows_here: u64,
    /// Keys the sender has and this site does not.
    pub missing_here: u64,
    /// Keys this site has and the sender does not.
    pub extra_here: u64,
    /// Keys on both sides whose rows differ.
    pub different: u64,
    /// The first few keys of each kind.
    pub first_missing: Vec<Vec<Value>>,
    /// See `first_missing`.
    pub first_extra: Vec<Vec<Value>>,
    /// See `first_missing`.
    pub first_different: Vec<Vec<Value>>,
    /// How rows were hashed: `database` (each side hashed key ranges inside its own
    /// PostgreSQL database) or `rows` (the sender's rows hashed in their neutral form).
    pub hashed_in: &'static str,
    /// Why the table could not be compared, when it could not.
    pub error: Option<String>,
    /// With repair: rows pulled again.
    pub repaired_rows: i64,
    /// With repair: extra rows deleted here.
    pub deleted_rows: u64,
    /// Only the rows written on either side since the last comparison that left both alike
    /// were compared (a diff pull, protocol 9).
    pub since_last: bool,
    /// Where both tables stood before this comparison read them.
    #[serde(skip)]
    marks: Option<since::Marks>,
}

/// What a verification found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifySummary {
    /// One verdict per table.
    pub tables: Vec<TableVerdict>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl VerifySummary {
    /// Whether every table is identical (after repair, when repairing).
    pub fn identical(&self) -> bool {
        self.tables.iter().all(|t| t.identical)
    }
}

/// Progress while verifying (for progress bars).
#[derive(Debug, Clone)]
pub enum VerifyEvent {
    /// A table starts; `estimated_rows` is the sender's estimate.
    TableStarted {
        /// Table.
        table: String,
        /// Estimate.
        estimated_rows: u64,
    },
    /// The whole table is being hashed in one statement on each side (PostgreSQL on both):
    /// no rows are counted until it is done (a `Page` of them all when alike; pages of its
    /// ranges otherwise).
    WholeTable,
    /// A page was compared.
    Page {
        /// Rows in it (the sender's).
        rows: u64,
    },
}

fn page_rows(options: &VerifyOptions) -> u64 {
    match options.page_rows {
        0 => PAGE_ROWS,
        rows => rows.min(PAGE_ROWS),
    }
}

/// This site's rows after one key and up to another, read a chunk of [`PAGE_ROWS`] at a time.
struct LocalRange<'a> {
    from: Option<Vec<Value>>,
    upto: Option<&'a [Value]>,
    done: bool,
}

impl<'a> LocalRange<'a> {
    fn new(after: Option<&[Value]>, upto: Option<&'a [Value]>) -> Self {
        Self {
            from: after.map(<[Value]>::to_vec),
            upto,
            done: false,
        }
    }

    /// The next chunk, or `None` once the range is read.
    async fn next(
        &mut self,
        agent: &Agent,
        here: &TableSchema,
        columns: &[String],
    ) -> Result<Option<Vec<Vec<Value>>>> {
        if self.done {
            return Ok(None);
        }
        let page = agent
            .store
            .read_page_between(
                here,
                columns,
                self.from.as_deref(),
                self.upto,
                PAGE_ROWS as i64,
            )
            .await?;
        self.done = (page.rows.len() as u64) < PAGE_ROWS;
        self.from = page.last_key;
        Ok(Some(page.rows))
    }
}

/// This site's rows of a range as keys and hashes, a chunk at a time: read whole and hashed
/// here, or hashed in the database.
enum LocalHashes<'a> {
    Neutral {
        range: LocalRange<'a>,
        types: &'a [&'a str],
        key_positions: &'a [usize],
    },
    InDb {
        from: Option<Vec<Value>>,
        upto: Option<&'a [Value]>,
        /// Only the rows of these buckets (their count and bitmap).
        buckets: Option<(u32, &'a [u8])>,
        done: bool,
    },
    /// Read already, in one chunk.
    Ready(Option<RowHashes>),
}

impl LocalHashes<'_> {
    async fn next(
        &mut self,
        agent: &Agent,
        here: &TableSchema,
        columns: &[String],
    ) -> Result<Option<Vec<(Vec<Value>, Vec<u8>)>>> {
        match self {
            Self::Neutral {
                range,
                types,
                key_positions,
            } => {
                let Some(rows) = range.next(agent, here, columns).await? else {
                    return Ok(None);
                };
                rows.iter()
                    .map(|row| {
                        let key = key_positions.iter().map(|i| row[*i].clone()).collect();
                        Ok((key, row_hash(row, types)?.to_vec()))
                    })
                    .collect::<Result<_>>()
                    .map(Some)
            }
            Self::Ready(rows) => Ok(rows.take().map(|rows| {
                rows.keys
                    .into_iter()
                    .zip(rows.hashes.iter().map(|h| h.to_vec()))
                    .collect()
            })),
            Self::InDb {
                from,
                upto,
                buckets,
                done,
            } => {
                if *done {
                    return Ok(None);
                }
                let rows = agent
                    .store
                    .range_row_hashes(
                        here,
                        columns,
                        from.as_deref(),
                        *upto,
                        *buckets,
                        PAGE_ROWS as i64,
                    )
                    .await?;
                *done = (rows.keys.len() as u64) < PAGE_ROWS;
                *from = rows.keys.last().cloned();
                Ok(Some(
                    rows.keys
                        .into_iter()
                        .zip(rows.hashes.iter().map(|h| h.to_vec()))
                        .collect(),
                ))
            }
        }
    }
}

/// Range `(.., upto]` hashed as `PgRecord`, nothing more asked.
fn range_of(upto: Option<&[Value]>) -> VerifyRange {
    VerifyRange {
        upto: upto.map(<[Value]>::to_vec),
        hash: RangeHash::PgRecord,
        buckets: None,
        keys_only: false,
        since: None,
        keys: None,
    }
}

/// Asks for the rows of range `(after, upto]` of the walk's table as keys and hashes (protocol 5), with
/// `buckets` only those buckets' rows (protocol 8).
fn detail_request(
    walk: &mut Walk<'_>,
    (after, upto): (Option<&[Value]>, Option<&[Value]>),
    buckets: Option<&Buckets>,
) -> Message {
    Message::Verify(Verify {
        request_id: walk.next_id(),
        table: walk.table.to_owned(),
        after: after.map(<[Value]>::to_vec),
        limit: page_rows(walk.options),
        detail: true,
        range: Some(VerifyRange {
            buckets: buckets.cloned(),
            ..range_of(upto)
        }),
    })
}

/// Whether a page of keys and hashes is well formed: a key and a hash of `hash_len` bytes per
/// row, each key of `key_len` values.
fn check_detail(client: &Client, page: &VerifyPage, key_len: usize, hash_len: usize) -> Result<()> {
    if page.keys.len() != page.hashes.len()
        || page.keys.len() as u64 != page.rows
        || page.keys.iter().any(|k| k.len() != key_len)
        || page.hashes.iter().any(|h| h.len() != hash_len)
    {
        return Err(client.protocol_error("a page's keys and hashes do not match"));
    }
    Ok(())
}

/// How keys are told apart when the two sides' rows are set side by side.
enum KeyId<'a> {
    /// By their neutral stored form, read as the sender's key types (any two engines).
    Stored(&'a [&'a str]),
    /// As they are: both sides read them from columns of the same PostgreSQL types.
    Exact,
}

impl KeyId<'_> {
    fn id(&self, key: &[Value]) -> Result<Vec<u8>> {
        match self {
            Self::Stored(types) => key_bytes(key, types),
            Self::Exact => {
                let mut out = Vec::with_capacity(16 * key.len());
                for value in key {
                    // Tagged and length-prefixed, so no two keys share bytes.
                    let (tag, bytes): (u8, std::borrow::Cow<'_, [u8]>) = match value {
                        Value::Int(i) => (1, i.to_be_bytes().to_vec().into()),
                        Value::Text(t) => (2, t.as_bytes().into()),
                        Value::Bytes(b) => (3, b.as_slice().into()),
                        Value::Uuid(u) => (4, u.as_slice().into()),
                        other => (5, format!("{other:?}").into_bytes().into()),
                    };
                    out.push(tag);
                    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
                    out.extend_from_slice(&bytes);
                }
                Ok(out)
            }
        }
    }
}

/// The sender's rows of a range: by key, each row's hash and key.
type RowsThere = HashMap<Vec<u8>, (Vec<u8>, Vec<Value>)>;

/// A page's rows by key; `None` when it lists a key twice.
fn index_detail(page: VerifyPage, keys: &KeyId<'_>) -> Result<Option<RowsThere>> {
    let mut there = HashMap::with_capacity(page.keys.len());
    for (key, hash) in page.keys.into_iter().zip(page.hashes) {
        if there
            .insert(keys.id(&key)?, (hash.into_vec(), key))
            .is_some()
        {
            return Ok(None);
        }
    }
    Ok(Some(there))
}

/// Whether both tables are in PostgreSQL with the same type for every column the sender
/// offers, so each side can hash a key range inside its own database and get the same hash.
fn hashed_alike_in_db(there: &TableSchema, here: &TableSchema) -> bool {
    there.engine == "postgres"
        && here.engine == "postgres"
        && there.columns.iter().all(|column| {
            here.columns
                .iter()
                .any(|h| h.name == column.name && h.native_type == column.native_type)
        })
}

/// Whether the last of the verifications that `ended` (newest first) found every row alike
/// (none ended: no).
fn last_found_alike(ended: &[crate::transfer::Transfer]) -> bool {
    let Some(last) = ended.first() else {
        return false;
    };
    let verdict = &last.metadata["verdict"];
    ["missing_here", "extra_here", "different"]
        .iter()
        .all(|count| verdict[count].as_u64() == Some(0))
}

/// Differences found in one page, waiting to be repaired.
#[derive(Default)]
struct Pending {
    pull: Vec<Vec<Value>>,
    delete: Vec<Vec<Value>>,
}

/// How the keys of a one-column integer or UUID key are spread, as far as seen: the last key
/// here, and the rows a key's worth of the range after one end found by counting rows. Keys
/// are points on a line ([`key_point`]).
#[derive(Debug, Default)]
struct KeySpread {
    last: Option<i128>,
    rows_per_key: Option<f64>,
}

impl KeySpread {
    /// Range `(from, to]` held `rows` rows here: the next ranges are cut by its spread (an
    /// empty one counts as one row, so ranges over a gap in the keys grow fast).
    fn saw(&mut self, rows: u64, from: i128, to: i128) {
        let keys = to as f64 - from as f64;
        if keys > 0.0 {
            self.rows_per_key = Some(rows.max(1) as f64 / keys);
        }
    }
}

/// A one-column key as a point on a line, in the order both engines sort it: an integer as
/// itself, a UUID as the 128-bit number its bytes spell (PostgreSQL compares UUIDs byte by
/// byte), shifted into `i128`. Other keys have no spread.
fn key_point(key: &[Value]) -> Option<i128> {
    match key {
        [Value::Int(v)] => Some(i128::from(*v)),
        [Value::Uuid(bytes)] => Some(u128::from_be_bytes(*bytes).cast_signed() ^ i128::MIN),
        _ => None,
    }
}

/// The key at `point`, of the kind of `like` ([`key_point`] backwards); `None` past an
/// integer's range.
fn key_at(point: i128, like: &[Value]) -> Option<Vec<Value>> {
    match like {
        [Value::Int(_)] => i64::try_from(point).ok().map(|v| vec![Value::Int(v)]),
        [Value::Uuid(_)] => Some(vec![Value::Uuid(
            (point ^ i128::MIN).cast_unsigned().to_be_bytes(),
        )]),
        _ => None,
    }
}

/// One table's comparison: what every step of it reads, and what it carries from step to step.
struct Walk<'a> {
    connection: &'a crate::Connection,
    table: &'a str,
    here: &'a TableSchema,
    columns: &'a [String],
    options: &'a VerifyOptions,
    /// The last request's number.
    request_id: u64,
    /// Differences found and not yet repaired.
    pending: Pending,
    /// Every last key a page ended on: a sender that names one again is going round.
    ends_seen: std::collections::HashSet<Vec<u8>>,
    /// Protocol 9: where this side's table stood before the comparison read it.
    mark_here: Option<Mark>,
    /// Protocol 9: the earliest mark among the sender's answers, unless they named two tables.
    mark_there: Option<Mark>,
    /// The sender's answers named two tables (its table was replaced during the comparison).
    marks_differ: bool,
}

impl Walk<'_> {
    /// The next request's number.
    fn next_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// Keeps the earliest of the sender's marks (each taken before its answer's statement).
    fn saw_mark(&mut self, mark: Option<Mark>) {
        let Some(mark) = mark else {
            return;
        };
        match &self.mark_there {
            Some(known) if known.table != mark.table => self.marks_differ = true,
            Some(known) if known.xid <= mark.xid => {}
            _ => self.mark_there = Some(mark),
        }
    }
}

impl Agent {
    /// Verifies the tables of receiver connection `id_or_name` against its sender.
    pub async fn verify(
        &self,
        id_or_name: &str,
        options: &VerifyOptions,
        mut on_event: impl FnMut(VerifyEvent),
    ) -> Result<VerifySummary> {
        let started = Instant::now();
        let connection = self.active_receiver(id_or_name, "verify").await?;
        let pull_options = PullOptions {
            password: options.password.clone(),
            transport: options.transport,
            retry_for: options.retry_for,
            ..PullOptions::default()
        };
        let (mut failing_since, mut attempts) = (None, 0);
        let (mut client, _) = self
            .open_session_retrying(
                &connection,
                &pull_options,
                &mut failing_since,
                &mut attempts,
            )
            .await?;
        if client.version < dbsync_protocol::VERIFY_VERSION {
            return Err(Error::Session {
                site: connection.site_url.clone(),
                fault: crate::SessionFault::Protocol,
                reason: format!(
                    "the sender speaks protocol {}; verification needs {} (upgrade the sender)",
                    client.version,
                    dbsync_protocol::VERIFY_VERSION
                ),
            });
        }
        let offered =
            match super::pull::ask(&mut client, &Message::ListTables, options.retry_for).await? {
                Message::TableList(tables) => tables,
                other => {
                    return Err(client
                        .protocol_error(format!("expected TableList, got {:?}", other.kind())));
                }
            };
        let wanted: Vec<_> = match &options.tables {
            Some(names) => {
                let mut wanted = Vec::new();
                for name in names {
                    let Some(table) = offered.iter().find(|t| &t.name == name) else {
                        return Err(Error::Remote {
                            site: connection.site_url.clone(),
                            code: dbsync_protocol::session::Code::TableNotAllowed,
                            message: format!("{name:?} is not offered"),
                            retry_after_ms: None,
                        });
                    };
                    wanted.push(table.clone());
                }
                wanted
            }
            None => offered
                .iter()
                .filter(|t| !t.primary_key.is_empty())
                .filter(|t| !crate::catalog::is_internal_table(&t.name))
                .cloned()
                .collect(),
        };
        let mut summary = VerifySummary::default();
        for table in wanted {
            on_event(VerifyEvent::TableStarted {
                table: table.name.clone(),
                estimated_rows: table.estimated_rows,
            });
            let verdict = self
                .verify_table(
                    &mut client,
                    &connection,
                    &table.name,
                    options,
                    &mut on_event,
                )
                .await?;
            summary.tables.push(verdict);
        }
        summary.seconds = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    async fn verify_table(
        &self,
        client: &mut Client,
        connection: &crate::Connection,
        table: &str,
        options: &VerifyOptions,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<TableVerdict> {
        let mut verdict = TableVerdict {
            table: table.to_owned(),
            ..TableVerdict::default()
        };
        let there = super::pull::describe(client, table, options.retry_for).await?;
        if there.primary_key.is_empty() {
            verdict.error = Some("no primary key to compare by".into());
            return Ok(verdict);
        }
        let here = match self.store.describe_table(table).await {
            Ok(here) => here,
            Err(Error::NotFound { .. }) => {
                verdict.error = Some("the table is not here".into());
                return Ok(verdict);
            }
            Err(err) => return Err(err),
        };
        let columns: Vec<String> = there.columns.iter().map(|c| c.name.clone()).collect();
        if let Some(absent) = columns
            .iter()
            .find(|c| !here.columns.iter().any(|h| &h.name == *c))
        {
            verdict.error = Some(format!("column {absent:?} is not here"));
            return Ok(verdict);
        }
        if here.primary_key != there.primary_key {
            verdict.error = Some(format!(
                "the key here ({}) is not the sender's ({})",
                here.primary_key.join(", "),
                there.primary_key.join(", ")
            ));
            return Ok(verdict);
        }
        // A diff pull reads what the comparisons of the table that ended here left: it expects
        // the tables alike (as a verification does) when the last found nothing to move (a
        // scheduled diff run of a table that rarely changes), and after one that left both
        // sides alike it compares only the rows written since on either side.
        let ended = if options.repair && !options.recheck {
            self.verifications_here(
                connection,
                table,
                crate::transfer::TransferStatus::Completed,
                20,
            )
            .await?
        } else {
            Vec::new()
        };
        let expect_alike = !options.repair || options.recheck || last_found_alike(&ended);
        let since_last = since::last_marks(&ended);
        // A verification of the table that was cut off (its process killed) is over: this one
        // takes its place.
        let cut_off = self
            .verifications_here(
                connection,
                table,
                crate::transfer::TransferStatus::InProgress,
                100,
            )
            .await?;
        for earlier in cut_off {
            self.store
                .fail_transfer(
                    earlier.id,
                    "cut off before it ended; a later verification of the table took its place",
                    self.now(),
                )
                .await?;
        }
        let transfer = self
            .start_receive_transfer(
                connection,
                table,
                ConflictStrategy::Overwrite,
                client.transport,
            )
            .await?;
        self.store
            .merge_transfer_metadata(transfer.id, serde_json::json!({ "kind": "verify" }))
            .await?;
        let types: Vec<String> = there
            .columns
            .iter()
            .map(|c| c.neutral_type.clone())
            .collect();
        let in_db = client.version >= dbsync_protocol::RANGE_HASH_VERSION
            && hashed_alike_in_db(&there, &here);
        verdict.hashed_in = if in_db { "database" } else { "rows" };
        let mut outcome = self
            .compare(
                client,
                connection,
                &here,
                &columns,
                &types,
                in_db,
                expect_alike,
                since_last.as_ref(),
                options,
                &mut verdict,
                on_event,
            )
            .await;
        // Repaired: compare again (hashes only) to say whether the copy is identical now, or
        // count on the repair having moved and deleted exactly the rows found.
        if outcome.is_ok() && options.repair && !verdict.identical && !options.recheck {
            verdict.identical = verdict.repaired_rows
                == i64::try_from(verdict.missing_here + verdict.different).unwrap_or(i64::MAX)
                && verdict.deleted_rows == verdict.extra_here;
        } else if outcome.is_ok() && options.repair && !verdict.identical {
            let mut again = TableVerdict {
                table: table.to_owned(),
                ..TableVerdict::default()
            };
            let check = VerifyOptions {
                repair: false,
                ..options.clone()
            };
            outcome = self
                .compare(
                    client, connection, &here, &columns, &types, in_db, true, None, &check,
                    &mut again, on_event,
                )
                .await;
            verdict.identical = again.identical;
            verdict.rows_here = again.rows_here;
        }
        match &outcome {
            Ok(()) => {
                self.store
                    .record_progress(
                        transfer.id,
                        &Progress {
                            records_transferred: i64::try_from(verdict.rows_there)
                                .unwrap_or(i64::MAX),
                            ..Progress::default()
                        },
                    )
                    .await?;
                self.store
                    .merge_transfer_metadata(
                        transfer.id,
                        serde_json::json!({ "verdict": {
                            "identical": verdict.identical, "missing_here": verdict.missing_here,
                            "extra_here": verdict.extra_here, "different": verdict.different,
                            "repaired_rows": verdict.repaired_rows, "deleted_rows": verdict.deleted_rows,
                        }}),
                    )
                    .await?;
                // Both sides alike as they stood at these marks: the next diff pull compares
                // only the rows written since.
                if let (true, Some(marks)) = (verdict.identical, &verdict.marks) {
                    self.store
                        .merge_transfer_metadata(transfer.id, serde_json::json!({ "marks": marks }))
                        .await?;
                }
                self.store
                    .complete_transfer(transfer.id, self.now())
                    .await?;
            }
            Err(err) => {
                let _ = self
                    .store
                    .fail_transfer(transfer.id, &err.to_string(), self.now())
                    .await;
            }
        }
        outcome.map(|()| verdict)
    }

    /// The verifications of `table` received on `connection` with `status`, newest first,
    /// among its last `among` transfers of any kind.
    async fn verifications_here(
        &self,
        connection: &crate::Connection,
        table: &str,
        status: crate::transfer::TransferStatus,
        among: i64,
    ) -> Result<Vec<crate::transfer::Transfer>> {
        let listed = self
            .store
            .list_transfers(&crate::transfer::TransferFilter {
                connection_id: Some(connection.id),
                direction: Some(crate::transfer::TransferDirection::Receive),
                status: Some(status),
                table_name: Some(table.to_owned()),
                per_page: Some(among),
                ..Default::default()
            })
            .await?;
        Ok(listed
            .items
            .into_iter()
            .filter(|t| t.metadata["kind"] == "verify")
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    async fn compare(
        &self,
        client: &mut Client,
        connection: &crate::Connection,
        here: &TableSchema,
        columns: &[String],
        types: &[String],
        in_db: bool,
        expect_alike: bool,
        since_last: Option<&since::Marks>,
        options: &VerifyOptions,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<()> {
        let table = verdict.table.clone();
        let mut walk = Walk {
            connection,
            table: &table,
            here,
            columns,
            options,
            request_id: 0,
            pending: Pending::default(),
            ends_seen: std::collections::HashSet::new(),
            mark_here: None,
            mark_there: None,
            marks_differ: false,
        };
        if in_db && client.version >= dbsync_protocol::MARK_VERSION {
            // Before this side reads anything: every row written later is written at or
            // after it.
            walk.mark_here = self.store.change_mark(here).await.ok();
        }
        if in_db && client.version >= dbsync_protocol::BUCKET_VERSION {
            let compared = match since_last {
                Some(last) => {
                    self.compare_since(client, &mut walk, last, verdict, on_event)
                        .await?
                }
                None => false,
            };
            if !compared {
                self.compare_buckets(client, &mut walk, expect_alike, verdict, on_event)
                    .await?;
            }
        } else if in_db {
            self.compare_ranges(client, &mut walk, expect_alike, verdict, on_event)
                .await?;
        } else {
            self.compare_pages(client, &mut walk, types, verdict, on_event)
                .await?;
        }
        self.finish_table(&mut walk, verdict).await?;
        verdict.marks = match (walk.mark_there, walk.mark_here, walk.marks_differ) {
            (Some(there), Some(here), false) => Some(since::Marks {
                there,
                here,
                columns: since::columns_named(walk.here, walk.columns),
            }),
            _ => None,
        };
        Ok(())
    }

    /// Both sides PostgreSQL with the same column types: this side cuts its table into ranges
    /// of a page's rows, and each range is hashed inside both databases at once (protocol 5);
    /// a range that differs is set beside the sender's row by row, as keys and hashes only.
    /// When the tables are expected alike, the whole table is hashed first.
    #[allow(clippy::too_many_arguments)]
    async fn compare_ranges(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        expect_alike: bool,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<()> {
        let (here, columns) = (walk.here, walk.columns);
        let rows = page_rows(walk.options);
        let mut start = self
            .whole_alike(client, walk, expect_alike, verdict, on_event)
            .await?;
        // Each range ends at a key this side has; the last, past this side's last key, is
        // asked for as a summary, and that ends the sender's verification of the table.
        let mut end = self.next_end(here, start.as_deref(), rows).await?;
        // After a range that differed the next is asked for row by row at once (changes spread
        // over a table make neighbouring ranges differ too), before this one is set side by
        // side: the sender reads it meanwhile.
        let mut last_differs = false;
        let mut asked: Option<Message> = None;
        // Where the range after this one ends, found while this one is hashed.
        let mut ahead: Option<Option<Vec<Value>>>;
        loop {
            ahead = None;
            let range = (start.as_deref(), end.as_deref());
            let differs = if asked.is_some() || (last_differs && end.is_some()) {
                true
            } else {
                let (differs, next) = tokio::join!(
                    self.ranges_differ(client, &mut *walk, range, verdict, on_event),
                    async {
                        match range.1 {
                            Some(done) => self.next_end(here, Some(done), rows).await.map(Some),
                            None => Ok(None),
                        }
                    }
                );
                ahead = next?;
                differs?
            };
            // A difference after identical ranges is likely alone: the range is cut in parts,
            // and only the parts that differ are compared row by row.
            if differs && !last_differs && asked.is_none() && rows >= 2 * SPLIT {
                let parts_differing = self
                    .compare_parts(client, walk, range, verdict, on_event)
                    .await?;
                last_differs = parts_differing > SPLIT / 2;
                let Some(done) = end.take() else {
                    break;
                };
                end = match ahead.take() {
                    Some(next) => next,
                    None => self.next_end(here, Some(&done), rows).await?,
                };
                start = Some(done);
                continue;
            }
            let mut next_end = None;
            if differs {
                let request = match asked.take() {
                    Some(request) => request,
                    None => {
                        let request = detail_request(walk, range, None);
                        client.send(&request).await?;
                        request
                    }
                };
                let (local, answer) = tokio::join!(
                    // One row past a page: whether this side has more of the range.
                    self.store.range_row_hashes(
                        here,
                        columns,
                        range.0,
                        range.1,
                        None,
                        PAGE_ROWS as i64 + 1
                    ),
                    self.answer_to(client, &request, walk.options)
                );
                let (local, answer) = (local?, answer?);
                // The range ends with this page: the next range is asked for now.
                if let (Some(done), false) = (&end, answer.more) {
                    let next = match ahead.take() {
                        Some(next) => next,
                        None => self.next_end(here, Some(done), rows).await?,
                    };
                    // Not the range past this side's last key: its summary ends the sender's
                    // verification, so it is always asked for as one.
                    if let Some(upto) = &next {
                        let range = (Some(done.as_slice()), Some(upto.as_slice()));
                        let request = detail_request(walk, range, None);
                        client.send(&request).await?;
                        asked = Some(request);
                    }
                    next_end = Some(next);
                }
                last_differs = self
                    .diff_range(
                        client,
                        walk,
                        range,
                        Some((answer, local)),
                        None,
                        verdict,
                        on_event,
                    )
                    .await?;
            } else {
                last_differs = false;
            }
            let Some(done) = end.take() else {
                break;
            };
            end = match next_end.or_else(|| ahead.take()) {
                Some(next) => next,
                None => self.next_end(here, Some(&done), rows).await?,
            };
            start = Some(done);
        }
        Ok(())
    }

    /// Tables expected alike (`expect_alike`): the whole table up to this side's last key is
    /// hashed first, one scan on each side, and only when it differs is it cut in ranges. Where
    /// the ranges start: after that key when alike (past it only the sender can have rows), else
    /// at the start.
    #[allow(clippy::too_many_arguments)]
    async fn whole_alike(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        expect_alike: bool,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<Option<Vec<Value>>> {
        if !expect_alike {
            return Ok(None);
        }
        let Some(last) = self.store.range_last(walk.here, None).await? else {
            return Ok(None);
        };
        on_event(VerifyEvent::WholeTable);
        // Its rows count towards progress only when alike; else its ranges count them.
        let mut rows_alike = 0;
        let differs = self
            .ranges_differ(
                client,
                walk,
                (None, Some(last.as_slice())),
                verdict,
                &mut |event| {
                    if let VerifyEvent::Page { rows } = event {
                        rows_alike = rows;
                    }
                },
            )
            .await?;
        if differs {
            return Ok(None);
        }
        on_event(VerifyEvent::Page { rows: rows_alike });
        Ok(Some(last))
    }

    /// Both sides PostgreSQL with the same column types, on protocol 8: ranges grow from a
    /// page's rows by [`SPAN_GROWTH`] to [`MAX_SPAN_PAGES`] pages (each ends at a key here),
    /// and each range is hashed in buckets of about [`BUCKET_ROWS`] rows by key, inside both
    /// databases at once; only the rows of the buckets that differ are set beside the sender's,
    /// as keys and hashes. However the differences are spread, each range costs one hashing
    /// scan and one scan of its keys on each side, and moves a few bytes a bucket.
    #[allow(clippy::too_many_arguments)]
    async fn compare_buckets(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        expect_alike: bool,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<()> {
        let here = walk.here;
        let base = page_rows(walk.options);
        let most = (base * MAX_SPAN_PAGES).min(u64::from(MAX_BUCKETS) * BUCKET_ROWS);
        let mut start = self
            .whole_alike(client, walk, expect_alike, verdict, on_event)
            .await?;
        let mut span = base.min(most);
        let mut end = self.next_end(here, start.as_deref(), span).await?;
        let mut spread = KeySpread::default();
        // Only a key of one integer or UUID column spreads over values ([`key_point`]).
        if let [key] = here.primary_key.as_slice()
            && here
                .columns
                .iter()
                .any(|c| &c.name == key && matches!(c.neutral_type.as_str(), "int" | "uuid"))
            && let Some(last) = self.store.range_last(here, None).await?
        {
            spread.last = key_point(&last);
        }
        loop {
            let range = (start.as_deref(), end.as_deref());
            let next_span = (span * SPAN_GROWTH).min(most);
            let Some(done) = range.1 else {
                // Past this side's last key: only the sender can have rows there. Its summary
                // ends the sender's verification of the table.
                if self
                    .ranges_differ(client, walk, range, verdict, on_event)
                    .await?
                {
                    self.diff_range(client, walk, range, None, None, verdict, on_event)
                        .await?;
                }
                break;
            };
            // Where the next range ends is found while this one is hashed.
            let count = u32::try_from((span / BUCKET_ROWS).max(1).next_power_of_two())
                .unwrap_or(MAX_BUCKETS)
                .min(MAX_BUCKETS);
            let rows_before = verdict.rows_here;
            let (differs, ahead) = tokio::join!(
                self.diff_buckets(client, &mut *walk, range, count, verdict, on_event),
                self.bucket_end(here, done, next_span, &mut spread)
            );
            differs?;
            let ahead = ahead?;
            if let (Some(from), Some(to)) = (range.0.and_then(key_point), key_point(done)) {
                spread.saw(verdict.rows_here - rows_before, from, to);
            }
            start = end.take();
            end = ahead;
            span = next_span;
        }
        Ok(())
    }

    /// Compares range `(after, upto]` in `count` buckets: both sides hash each bucket, and the
    /// rows of the buckets that differ are set side by side; whether any row differs.
    #[allow(clippy::too_many_arguments)]
    async fn diff_buckets(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        range: (Option<&[Value]>, Option<&[Value]>),
        count: u32,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<bool> {
        let (after, upto) = range;
        let request_id = walk.next_id();
        let (local, answer) = tokio::join!(
            self.store
                .range_buckets(walk.here, walk.columns, after, upto, count),
            self.ask_page(
                client,
                walk.table,
                after.map(<[Value]>::to_vec),
                false,
                request_id,
                walk.options,
                Some(VerifyRange {
                    buckets: Some(Buckets {
                        count,
                        only: Vec::new(),
                    }),
                    ..range_of(upto)
                }),
            )
        );
        let ((rows_here, _, mine), mut answer) = (local?, answer?);
        walk.saw_mark(answer.mark.take());
        let theirs = match &answer.buckets {
            Some(theirs)
                if !answer.more
                    && answer.keys.is_empty()
                    && theirs.is_well_formed(count, answer.rows) =>
            {
                theirs
            }
            _ => {
                return Err(client.protocol_error(
                    "a range's buckets do not add up (numbers out of order or out of range, \
                     or counts that do not make its rows)",
                ));
            }
        };
        // Bucket by bucket, in order: the ones on one side only, or with other counts or
        // hashes, differ.
        let mut only = vec![0u8; (count as usize).div_ceil(8)];
        let (mut i, mut j, mut alike_rows, mut differing) = (0, 0, 0, 0);
        let mut mark = |bucket: u32| {
            only[bucket as usize / 8] |= 1 << (bucket % 8);
            differing += 1;
        };
        while i < mine.ids.len() || j < theirs.ids.len() {
            match (mine.ids.get(i), theirs.ids.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    if mine.rows[i] == theirs.rows[j] && mine.hash(i) == theirs.hash(j) {
                        alike_rows += mine.rows[i];
                    } else {
                        mark(*a);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    mark(*a);
                    i += 1;
                }
                (Some(a), None) => {
                    mark(*a);
                    i += 1;
                }
                (_, Some(b)) => {
                    mark(*b);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        if differing == 0 {
            verdict.rows_there += answer.rows;
            verdict.rows_here += rows_here;
            on_event(VerifyEvent::Page { rows: answer.rows });
            return Ok(false);
        }
        verdict.rows_there += alike_rows;
        verdict.rows_here += alike_rows;
        on_event(VerifyEvent::Page { rows: alike_rows });
        self.diff_range(
            client,
            walk,
            range,
            None,
            Some(&Buckets { count, only }),
            verdict,
            on_event,
        )
        .await
    }

    /// [`Self::next_end`] for a range hashed in buckets, after `done`: on a key of one integer
    /// column, once one range has shown how many keys its rows span, `rows` rows' worth of keys
    /// past `done` by that spread (the rows in between are not counted, which on a table whose
    /// pages are not all visible reads each row), and this side's last key when that is nearer.
    /// A range that holds more rows than asked has fuller buckets, one that holds fewer has
    /// emptier ones: either way every row is compared.
    async fn bucket_end(
        &self,
        here: &TableSchema,
        done: &[Value],
        rows: u64,
        spread: &mut KeySpread,
    ) -> Result<Option<Vec<Value>>> {
        if let (Some(per_key), Some(last), Some(from)) =
            (spread.rows_per_key, spread.last, key_point(done))
        {
            // At least one key wide, so ranges always move on (`as` saturates).
            let width = (rows as f64 / per_key).ceil().max(1.0) as i128;
            let end = from
                .checked_add(width)
                .filter(|to| *to < last)
                .and_then(|to| key_at(to, done));
            return match end {
                Some(end) => Ok(Some(end)),
                None => self.store.range_last(here, Some(done)).await,
            };
        }
        let end = self.next_end(here, Some(done), rows).await?;
        if let (Some(to), Some(from)) = (end.as_deref().and_then(key_point), key_point(done)) {
            spread.saw(rows, from, to);
        }
        Ok(end)
    }

    /// Where the range after `after` ends here: `rows` rows past it, or at this side's last
    /// key when fewer are left; `None` when none are (the last range, open-ended).
    async fn next_end(
        &self,
        here: &TableSchema,
        after: Option<&[Value]>,
        rows: u64,
    ) -> Result<Option<Vec<Value>>> {
        match self.store.range_end(here, after, rows).await? {
            Some(end) => Ok(Some(end)),
            None => self.store.range_last(here, after).await,
        }
    }

    /// Whether range `(after, upto]` differs, by its row count and hash on both sides (each
    /// side hashing at the same time); an equal range's rows are counted. A range open at its
    /// end (`upto` none) is one past this side's last key (see [`Self::next_end`]).
    #[allow(clippy::too_many_arguments)]
    async fn ranges_differ(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        (after, upto): (Option<&[Value]>, Option<&[Value]>),
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<bool> {
        let request_id = walk.next_id();
        let (local, answer) = tokio::join!(
            async {
                // A range open at its end lies past this side's last key: no rows here.
                match upto {
                    Some(_) => {
                        self.store
                            .range_hash(walk.here, walk.columns, after, upto)
                            .await
                    }
                    None => Ok((0, [0; 8])),
                }
            },
            self.ask_page(
                client,
                walk.table,
                after.map(<[Value]>::to_vec),
                false,
                request_id,
                walk.options,
                Some(range_of(upto)),
            )
        );
        let ((rows_here, hash_here), mut answer) = (local?, answer?);
        walk.saw_mark(answer.mark.take());
        if answer.hash.len() != 8 || answer.more || !answer.keys.is_empty() {
            return Err(client.protocol_error("a range's answer is not one 8-byte hash"));
        }
        on_event(VerifyEvent::Page { rows: answer.rows });
        let differs = rows_here != answer.rows || hash_here[..] != answer.hash[..];
        if !differs {
            verdict.rows_there += answer.rows;
            verdict.rows_here += rows_here;
        }
        Ok(differs)
    }

    /// Compares range `(after, upto]` in [`SPLIT`] parts (cut by this side's rows), row by row
    /// only the parts that differ; how many parts differed.
    #[allow(clippy::too_many_arguments)]
    async fn compare_parts(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        (after, upto): (Option<&[Value]>, Option<&[Value]>),
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<u64> {
        let here = walk.here;
        let part_rows = page_rows(walk.options) / SPLIT;
        let mut start = after.map(<[Value]>::to_vec);
        let mut differing = 0;
        for part in 0..SPLIT {
            // The last part ends where the range does; so does one that runs out of rows here.
            let end = if part + 1 == SPLIT {
                upto.map(<[Value]>::to_vec)
            } else {
                match self
                    .store
                    .range_end(here, start.as_deref(), part_rows)
                    .await?
                {
                    Some(end) => Some(end),
                    None => upto.map(<[Value]>::to_vec),
                }
            };
            let range = (start.as_deref(), end.as_deref());
            // A part that is the whole range (this side has too few rows to cut it) differs.
            let differs = range == (after, upto)
                || self
                    .ranges_differ(client, walk, range, verdict, on_event)
                    .await?;
            if differs {
                differing += 1;
                self.diff_range(client, walk, range, None, None, verdict, on_event)
                    .await?;
            }
            if end.as_deref() == upto || end.is_none() {
                break;
            }
            start = end;
        }
        Ok(differing)
    }

    /// The answer to `request`, sent already: over the sender's rate limit, asked again once
    /// the limit allows (for as long as `retry_for`).
    async fn answer_to(
        &self,
        client: &mut Client,
        request: &Message,
        options: &VerifyOptions,
    ) -> Result<VerifyPage> {
        let Message::Verify(verify) = request else {
            return Err(Error::invalid("request", "not a verification"));
        };
        let started = Instant::now();
        loop {
            match client.recv().await {
                Ok((Message::VerifyPage(page), _)) if page.request_id == verify.request_id => {
                    if page.rows > page_rows(options) {
                        return Err(client.protocol_error("a page larger than asked for"));
                    }
                    return Ok(page);
                }
                Ok((other, _)) => {
                    return Err(client
                        .protocol_error(format!("expected VerifyPage, got {:?}", other.kind())));
                }
                Err(Error::Remote {
                    code: dbsync_protocol::session::Code::RateLimited,
                    retry_after_ms,
                    ..
                }) if started.elapsed() < options.retry_for => {
                    let wait =
                        Duration::from_millis(retry_after_ms.unwrap_or(1_000).clamp(100, 60_000));
                    tokio::time::sleep(wait).await;
                    client.send(request).await?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Sets the sender's rows of range `(after, upto]` beside the rows here, page by page of
    /// keys and hashes (`first`: the first page and this side's rows read alongside it);
    /// whether any differ. Each later page is asked for while this side reads its own rows of
    /// the range; when the sender's page stops short of the range's end, this side's rows are
    /// read again up to where it stopped.
    #[allow(clippy::too_many_arguments)]
    async fn diff_range(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        (start, upto): (Option<&[Value]>, Option<&[Value]>),
        first: Option<(VerifyPage, RowHashes)>,
        buckets: Option<&Buckets>,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<bool> {
        let (here, columns) = (walk.here, walk.columns);
        let before = verdict.missing_here + verdict.extra_here + verdict.different;
        let keys = KeyId::Exact;
        let only = buckets.map(|b| (b.count, b.only.as_slice()));
        let mut after = start.map(<[Value]>::to_vec);
        let mut first = first;
        loop {
            let (detail, local) = match first.take() {
                Some(first) => first,
                None => {
                    let request = detail_request(walk, (after.as_deref(), upto), buckets);
                    client.send(&request).await?;
                    let (local, detail) = tokio::join!(
                        self.store.range_row_hashes(
                            here,
                            columns,
                            after.as_deref(),
                            upto,
                            only,
                            PAGE_ROWS as i64 + 1
                        ),
                        self.answer_to(client, &request, walk.options)
                    );
                    (detail?, local?)
                }
            };
            check_detail(client, &detail, here.primary_key.len(), 8)?;
            on_event(VerifyEvent::Page { rows: detail.rows });
            let more = detail.more;
            if more {
                let moved_on = detail.rows > 0
                    && match &detail.last_key {
                        Some(key) => walk.ends_seen.insert(keys.id(key)?),
                        None => false,
                    };
                if !moved_on {
                    return Err(client.protocol_error("a page that says more but does not move on"));
                }
            }
            verdict.rows_there += detail.rows;
            let page_upto = if more {
                detail.last_key.clone()
            } else {
                upto.map(<[Value]>::to_vec)
            };
            let there = index_detail(detail, &keys)?
                .ok_or_else(|| client.protocol_error("a page lists one key twice"))?;
            // The rows read alongside are the page's unless either side had more of the range;
            // when the sender's page stops at a key this side read too, they are the ones up to
            // it (read in key order), and are not read again.
            let ends_at = match (more, page_upto.as_deref()) {
                (true, Some(last)) => local.keys.iter().rposition(|k| k.as_slice() == last),
                _ => None,
            };
            let mut local = if !more && (local.keys.len() as u64) <= PAGE_ROWS {
                LocalHashes::Ready(Some(local))
            } else if let Some(end) = ends_at {
                let mut local = local;
                local.keys.truncate(end + 1);
                local.hashes.truncate(end + 1);
                LocalHashes::Ready(Some(local))
            } else {
                LocalHashes::InDb {
                    from: after.clone(),
                    upto: page_upto.as_deref(),
                    buckets: only,
                    done: false,
                }
            };
            verdict.rows_here += self
                .set_beside(walk, &keys, &mut local, there, verdict)
                .await?;
            if !more {
                break;
            }
            after = page_upto;
        }
        Ok(verdict.missing_here + verdict.extra_here + verdict.different > before)
    }

    #[allow(clippy::too_many_arguments)]
    async fn compare_pages(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        types: &[String],
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<()> {
        let (here, columns, options, table) = (walk.here, walk.columns, walk.options, walk.table);
        let types: Vec<&str> = types.iter().map(String::as_str).collect();
        let key_positions: Vec<usize> = here
            .primary_key
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        let key_types: Vec<&str> = key_positions.iter().map(|i| types[*i]).collect();
        let mut after: Option<Vec<Value>> = None;
        // Each page's summary is asked for while this side hashes the page before it; after a
        // page that differed the next is asked for with its details at once (changes spread
        // over a table make neighbouring pages differ too).
        let first_id = walk.next_id();
        let mut page = self
            .ask_page(client, table, None, false, first_id, options, None)
            .await?;
        let mut page_detail = false;
        let mut last_differs = false;
        loop {
            let more = page.more;
            if more
                && page
                    .last_key
                    .as_ref()
                    .is_none_or(|k| k.len() != here.primary_key.len())
            {
                return Err(client.protocol_error("a page with more rows but no last key"));
            }
            // A page that says more must move on: rows in it, and a last key never seen before.
            let fresh_end = match &page.last_key {
                Some(key) => walk.ends_seen.insert(key_bytes(key, &key_types)?),
                None => true,
            };
            if more && (page.rows == 0 || !fresh_end) {
                return Err(client.protocol_error("a page that says more but does not move on"));
            }
            // The last page reaches to the end here too: rows past the sender's last key are
            // extra.
            let upto = if more { page.last_key.clone() } else { None };
            let next_id = walk.next_id();
            let detail_next = last_differs;
            let (local, next) = tokio::join!(
                self.local_page_hash(here, columns, &types, after.as_deref(), upto.as_deref()),
                async {
                    if more {
                        Some(
                            self.ask_page(
                                client,
                                table,
                                upto.clone(),
                                detail_next,
                                next_id,
                                options,
                                None,
                            )
                            .await,
                        )
                    } else {
                        None
                    }
                }
            );
            let (rows_here, hash_here) = local?;
            let rows = page.rows;
            verdict.rows_there += rows;
            verdict.rows_here += rows_here;
            let differs = rows_here != rows || hash_here != page.hash;
            if differs {
                let detail = if page_detail {
                    page
                } else {
                    let request_id = walk.next_id();
                    self.ask_page(
                        client,
                        table,
                        after.clone(),
                        true,
                        request_id,
                        options,
                        None,
                    )
                    .await?
                };
                check_detail(
                    client,
                    &detail,
                    here.primary_key.len(),
                    crate::data::row_hash::ROW_HASH_LEN,
                )?;
                let keys = KeyId::Stored(&key_types);
                let there = index_detail(detail, &keys)?
                    .ok_or_else(|| client.protocol_error("a page lists one key twice"))?;
                let mut local = LocalHashes::Neutral {
                    range: LocalRange::new(after.as_deref(), upto.as_deref()),
                    types: &types,
                    key_positions: &key_positions,
                };
                self.set_beside(walk, &keys, &mut local, there, verdict)
                    .await?;
            }
            last_differs = differs;
            on_event(VerifyEvent::Page { rows });
            match next {
                None => break,
                Some(next) => {
                    page = next?;
                    page_detail = detail_next;
                    after = upto;
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn ask_page(
        &self,
        client: &mut Client,
        table: &str,
        after: Option<Vec<Value>>,
        detail: bool,
        request_id: u64,
        options: &VerifyOptions,
        range: Option<VerifyRange>,
    ) -> Result<VerifyPage> {
        // A range's summary covers the whole range, however many rows.
        let bounded = detail || range.is_none();
        let request = Message::Verify(Verify {
            request_id,
            table: table.to_owned(),
            after,
            limit: page_rows(options),
            detail,
            range,
        });
        match super::pull::ask(client, &request, options.retry_for).await? {
            Message::VerifyPage(page) if page.request_id == request_id => {
                if bounded && page.rows > page_rows(options) {
                    return Err(client.protocol_error("a page larger than asked for"));
                }
                Ok(page)
            }
            other => {
                Err(client.protocol_error(format!("expected VerifyPage, got {:?}", other.kind())))
            }
        }
    }

    /// The rows here after `after` and up to `upto`, hashed like the sender's page.
    async fn local_page_hash(
        &self,
        here: &TableSchema,
        columns: &[String],
        types: &[&str],
        after: Option<&[Value]>,
        upto: Option<&[Value]>,
    ) -> Result<(u64, Vec<u8>)> {
        let mut hasher = PageHasher::default();
        let mut range = LocalRange::new(after, upto);
        while let Some(rows) = range.next(self, here, columns).await? {
            for row in &rows {
                hasher.add(&row_hash(row, types)?);
            }
        }
        Ok(hasher.finish())
    }

    /// Sets the sender's rows of a range (`there`, by key) beside this site's rows of it, and
    /// settles the differences found ([`Self::settle_pending`]); how many rows this site has in it.
    async fn set_beside(
        &self,
        walk: &mut Walk<'_>,
        keys: &KeyId<'_>,
        local: &mut LocalHashes<'_>,
        mut there: RowsThere,
        verdict: &mut TableVerdict,
    ) -> Result<u64> {
        let (here, columns) = (walk.here, walk.columns);
        let pending = &mut walk.pending;
        let note = |list: &mut Vec<Vec<Value>>, key: &Vec<Value>| {
            if list.len() < FIRST_KEYS {
                list.push(key.clone());
            }
        };
        let mut seen = 0;
        while let Some(rows) = local.next(self, here, columns).await? {
            seen += rows.len() as u64;
            for (key, hash) in rows {
                match there.remove(&keys.id(&key)?) {
                    Some((hash_there, key_there)) => {
                        if hash_there != hash {
                            verdict.different += 1;
                            note(&mut verdict.first_different, &key_there);
                            pending.pull.push(key_there);
                        }
                    }
                    None => {
                        verdict.extra_here += 1;
                        note(&mut verdict.first_extra, &key);
                        pending.delete.push(key);
                    }
                }
            }
        }
        let mut missing: Vec<Vec<Value>> = there.into_values().map(|(_, key)| key).collect();
        missing.sort_by_key(|key| format!("{key:?}"));
        for key in missing {
            verdict.missing_here += 1;
            note(&mut verdict.first_missing, &key);
            pending.pull.push(key);
        }
        self.settle_pending(walk, verdict).await?;
        Ok(seen)
    }

    /// The last repair of a table compared to its end, and its verdict.
    async fn finish_table(&self, walk: &mut Walk<'_>, verdict: &mut TableVerdict) -> Result<()> {
        if walk.options.repair {
            self.repair(walk, verdict).await?;
        }
        verdict.identical = verdict.missing_here == 0
            && verdict.extra_here == 0
            && verdict.different == 0
            && verdict.rows_here == verdict.rows_there;
        Ok(())
    }

    /// With `repair`, repairs the rows found so far once there are [`REPAIR_KEYS`]; without,
    /// forgets them (the verdict keeps its counts and first keys), so memory stays bounded.
    async fn settle_pending(&self, walk: &mut Walk<'_>, verdict: &mut TableVerdict) -> Result<()> {
        let pending = &mut walk.pending;
        if !walk.options.repair {
            pending.pull.clear();
            pending.delete.clear();
        } else if pending.pull.len() + pending.delete.len() >= REPAIR_KEYS {
            self.repair(walk, verdict).await?;
        }
        Ok(())
    }

    /// Pulls the keys waiting (overwrite, by key) and deletes the extra ones.
    async fn repair(&self, walk: &mut Walk<'_>, verdict: &mut TableVerdict) -> Result<()> {
        let (connection, here, options) = (walk.connection, walk.here, walk.options);
        let pending = &mut walk.pending;
        if !pending.delete.is_empty() {
            verdict.deleted_rows += self.store.delete_keys(here, &pending.delete).await?;
            pending.delete.clear();
        }
        for keys in pending.pull.chunks(REPAIR_KEYS) {
            let pulled = self
                .pull(
                    &connection.name,
                    &PullOptions {
                        tables: Some(vec![here.name.clone()]),
                        strategy: Some(ConflictStrategy::Overwrite),
                        key_list: Some(keys.to_vec()),
                        password: options.password.clone(),
                        transport: options.transport,
                        retry_for: options.retry_for,
                        ..PullOptions::default()
                    },
                    |_| {},
                )
                .await?;
            verdict.repaired_rows += pulled.tables.iter().map(|t| t.rows).sum::<i64>();
        }
        pending.pull.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_points_keep_the_order_of_keys_and_come_back() {
        let uuids: Vec<[u8; 16]> = vec![
            [0; 16],
            [0x00, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x7f; 16],
            [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xff; 16],
        ];
        let points: Vec<i128> = uuids
            .iter()
            .map(|u| key_point(&[Value::Uuid(*u)]).unwrap())
            .collect();
        assert!(points.windows(2).all(|w| w[0] < w[1]), "{points:?}");
        for (uuid, point) in uuids.iter().zip(&points) {
            assert_eq!(
                key_at(*point, &[Value::Uuid([0; 16])]),
                Some(vec![Value::Uuid(*uuid)])
            );
        }
        for v in [i64::MIN, -1, 0, 1, i64::MAX] {
            let point = key_point(&[Value::Int(v)]).unwrap();
            assert_eq!(key_at(point, &[Value::Int(0)]), Some(vec![Value::Int(v)]));
        }
        assert_eq!(key_at(i128::from(i64::MAX) + 1, &[Value::Int(0)]), None);
        assert_eq!(key_point(&[Value::Text("a".into())]), None);
        assert_eq!(key_point(&[Value::Int(1), Value::Int(2)]), None);
    }
}
