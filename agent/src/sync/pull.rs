//! `dbsync pull`: the receiver's table loop. Lists and describes the sender's tables, creates
//! missing ones, and pulls each table in foreign-key order, applying every batch with its
//! checkpoint in one transaction. A pull that was interrupted resumes after the last applied key,
//! under the same sender transfer; a session that breaks off is re-opened with backoff. The
//! batches of one pass are received and applied in `super::rows`.

use std::time::{Duration, Instant};

use dbsync_protocol::Message;
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, TableInfo, TableSchema};
use dbsync_protocol::session::{Code, ReceiverCore};
use serde::Serialize;
use uuid::Uuid;

use crate::agent::Agent;
use crate::audit::Actor;
use crate::catalog::fk_levels;
use crate::connection::{ConflictStrategy, Connection, ConnectionStatus, Direction};
use crate::error::{Error, Result};
use crate::session::receiver::Client;
pub use crate::session::receiver::{QUIC_CONNECT_TIMEOUT, TransportChoice};
use crate::transfer::{NewTransfer, TransferDirection, TransferStatus};

/// Batches the sender may have in flight before it waits for credit.
pub const CREDITS: u32 = 8;
/// Most tables granted at once for pulling side by side (the sender keeps 16 grants per
/// connection).
const SIDE_BY_SIDE_BATCH: usize = 8;
/// How often a pull waiting for approval asks again.
pub const APPROVAL_POLL: Duration = Duration::from_secs(5);
/// How long a QUIC handshake may take before `auto` falls back to WebSocket.
/// First wait before reconnecting (doubles each attempt, with jitter).
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest wait between reconnect attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What to pull and how.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Tables to pull (none: every offered table).
    pub tables: Option<Vec<String>>,
    /// Conflict strategy (none: the connection's default).
    pub strategy: Option<ConflictStrategy>,
    /// Columns to leave out (key columns cannot be left out).
    pub exclude_columns: Vec<String>,
    /// The sender's download password, when it has one (never printed).
    pub password: Option<dbsync_protocol::Secret>,
    /// Give up waiting for an approval after this long (none: wait forever).
    pub approval_wait: Option<Duration>,
    /// Only rows whose key passes this filter (see [`crate::key_filter`]); one table only.
    pub where_key: Option<String>,
    /// Only these keys (at most [`dbsync_protocol::message::MAX_FILTER_KEYS`]), as values: what
    /// `verify --repair` moves. One table only; takes the place of `where_key`.
    pub key_list: Option<Vec<Vec<Value>>>,
    /// Transport (default: auto).
    pub transport: TransportChoice,
    /// Keep reconnecting after a session breaks off for this long (zero: give up at once).
    pub retry_for: Duration,
    /// Move only the rows changed since the last incremental pull of each table.
    pub incremental: bool,
    /// The cursor column of an incremental pull (none: `updated_at`, else `inserted_at`).
    pub cursor_column: Option<String>,
    /// Batches the sender may have in flight (none: [`CREDITS`]).
    pub credits: Option<u32>,
    /// A run of the auto-sync scheduler: recorded as such, and a table without a cursor column
    /// is pulled in full instead of failing the run.
    pub scheduled: bool,
    /// Create the missing tables (with their types, sequences, indexes and keys) and move no
    /// row.
    pub schema_only: bool,
    /// Add to an existing table the columns it lacks, as the sender declares them (nullable);
    /// a column whose type differs from the sender's is named and refused.
    pub add_columns: bool,
    /// Sessions a large table is pulled over side by side, each a key range the sender cut
    /// (1: one piece; see `sync::parallel`).
    pub parallel: usize,
}

/// The table a pull works on, and under what.
#[derive(Debug, Clone, Copy)]
pub(super) struct TableJob<'a> {
    /// The receiver connection.
    pub(super) connection: &'a Connection,
    /// The sender's description of the table.
    pub(super) schema: &'a TableSchema,
    /// Rows per request, as the sender's Welcome said.
    pub(super) max_per_request: u64,
    /// What the operator asked for.
    pub(super) options: &'a PullOptions,
    /// The sender's row estimate of the whole table (0 when unknown).
    pub(super) estimated_rows: u64,
}

/// What one pass over a table's rows asks the sender for.
#[derive(Debug, Clone)]
pub(super) struct Pass<'a> {
    /// The columns asked for, in order.
    pub(super) columns: &'a [String],
    /// How rows are applied.
    pub(super) strategy: ConflictStrategy,
    /// Only these keys.
    pub(super) key_filter: Option<&'a KeyFilter>,
    /// Incremental: page by this column, then the key.
    pub(super) cursor: Option<String>,
    /// Keys only (a mirror reconciliation pass).
    pub(super) keys_only: bool,
    /// A whole-table pull: the stage the rows go into.
    pub(super) into: Option<&'a str>,
    /// A part of a parallel pull: the sender's grant it runs under.
    pub(super) split: Option<&'a str>,
    /// A part of a parallel pull: the checkpoint it moves (none: the table's own).
    pub(super) checkpoint: Option<&'a str>,
}

/// Where a pass is: the key it resumes after and the sender's transfer it runs under.
#[derive(Debug, Clone, Default)]
pub(super) struct Position {
    /// The last key applied.
    pub(super) after: Option<Vec<Value>>,
    /// The sender's transfer.
    pub(super) remote_transfer: Option<String>,
}

/// The cursor column of an incremental pull of `schema`.
fn cursor_column(schema: &TableSchema, given: Option<&str>) -> Result<String> {
    let has = |name: &str| schema.columns.iter().any(|c| c.name == name);
    let chosen = match given {
        Some(name) if has(name) => name.to_owned(),
        Some(name) => {
            return Err(Error::invalid(
                "cursor column",
                format!("{:?} has no column {name:?}", schema.name),
            ));
        }
        None => ["updated_at", "inserted_at"]
            .into_iter()
            .find(|name| has(name))
            .map(str::to_owned)
            .ok_or_else(|| {
                Error::invalid(
                    "cursor column",
                    format!(
                        "{:?} has no updated_at or inserted_at column; name one with --cursor-column",
                        schema.name
                    ),
                )
            })?,
    };
    if schema.primary_key.contains(&chosen) {
        return Err(Error::invalid(
            "cursor column",
            format!("{chosen:?} is part of the primary key of {:?}", schema.name),
        ));
    }
    Ok(chosen)
}

/// One table's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableSummary {
    /// The table.
    pub table: String,
    /// Rows received.
    pub rows: i64,
    /// Rows inserted.
    pub created: i64,
    /// Rows updated.
    pub updated: i64,
    /// Rows left alone.
    pub skipped: i64,
    /// Local rows deleted because the sender no longer has them (`mirror`).
    pub deleted: i64,
    /// Compressed bytes received.
    pub bytes_wire: i64,
    /// Bytes before compression.
    pub bytes_raw: i64,
    /// Whether the table was created here.
    pub created_table: bool,
    /// Whether the pull resumed an interrupted one.
    pub resumed: bool,
    /// Whether the sender's record limit cut it.
    pub truncated: bool,
    /// The receive transfer record.
    pub transfer_id: Uuid,
    /// The transport of the session that finished the table ("ws" or "quic").
    pub transport: String,
    /// Sessions that broke off and were re-opened while pulling this table.
    pub reconnects: u32,
    /// Key ranges pulled side by side (`--parallel`); 0 when the table came in one piece.
    pub parts: u32,
}

/// A table a pull left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SkippedTable {
    /// Table.
    pub table: String,
    /// Stable code of the reason (`no_primary_key`).
    pub code: &'static str,
    /// The reason, naming what would work.
    pub reason: String,
}

/// Outcome of a pull.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PullSummary {
    /// Per table, in the order pulled.
    pub tables: Vec<TableSummary>,
    /// Tables left out (a keyless table in a pull of several); the others went on.
    pub skipped: Vec<SkippedTable>,
    /// Parts of a created table's schema that could not be made here (an index, a foreign
    /// key), each with the reason; the rows are in.
    pub warnings: Vec<String>,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// Progress events while pulling (for progress bars).
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// A table starts; `estimated_rows` is the sender's estimate.
    TableStarted {
        /// Table.
        table: String,
        /// Estimate.
        estimated_rows: u64,
    },
    /// A table's rows are all in.
    TableDone {
        /// Table.
        table: String,
    },
    /// A batch was applied.
    Batch {
        /// Table.
        table: String,
        /// Rows in the batch.
        rows: i64,
        /// Wire bytes of the batch.
        bytes_wire: i64,
    },
    /// A table is left out; the pull goes on with the others.
    TableSkipped {
        /// Table.
        table: String,
        /// Why.
        reason: String,
    },
    /// The transfer waits for the sender's admin.
    WaitingForApproval {
        /// Table.
        table: String,
        /// The sender's transfer id.
        transfer_id: String,
    },
}

/// The columns of `schema` a pull asks for: all but those left out.
pub(super) fn pulled_columns(schema: &TableSchema, options: &PullOptions) -> Vec<String> {
    schema
        .columns
        .iter()
        .map(|c| c.name.clone())
        .filter(|c| !options.exclude_columns.contains(c))
        .collect()
}

/// The tables a pull takes: the sender's list without reserved names and repeats, narrowed to
/// `--tables` (a name not offered is refused); a key filter needs exactly one.
async fn wanted_tables(
    client: &mut Client,
    connection: &Connection,
    options: &PullOptions,
) -> Result<Vec<TableInfo>> {
    let offered = match ask(client, &Message::ListTables, options.retry_for).await? {
        Message::TableList(tables) => tables,
        other => {
            return Err(
                client.protocol_error(format!("expected TableList, got {:?}", other.kind()))
            );
        }
    };
    // The sender's list is the sender's word: a name this site reserves (its own state, the
    // engine's tables, in any spelling) is never pulled, whoever offers it.
    let mut offered: Vec<_> = offered
            .into_iter()
            .filter(|t| {
                let reserved = crate::catalog::is_internal_table(&t.name);
                if reserved {
                    tracing::warn!(table = %t.name, site = %connection.site_url, "the sender offered a reserved table name; it is not pulled");
                }
                !reserved
            })
            .collect();
    let mut seen = std::collections::HashSet::new();
    offered.retain(|t| seen.insert(t.name.clone()));
    let wanted: Vec<TableInfo> = match &options.tables {
        Some(names) => {
            for name in names {
                if !offered.iter().any(|t| &t.name == name) {
                    return Err(Error::Remote {
                        site: connection.site_url.clone(),
                        code: Code::TableNotAllowed,
                        message: format!("{name:?} is not offered"),
                        retry_after_ms: None,
                    });
                }
            }
            offered
                .into_iter()
                .filter(|t| names.contains(&t.name))
                .collect()
        }
        None => offered,
    };
    if (options.where_key.is_some() || options.key_list.is_some()) && wanted.len() != 1 {
        return Err(Error::invalid(
            "where-key",
            "a key filter applies to one table: name it with --tables",
        ));
    }
    Ok(wanted)
}

/// How a table pulled whole (no primary key, or `replace`) goes in under `strategy`, which the
/// operator named (`explicit`) or the connection's default gave: `append` and `replace` as they
/// are, a keyed default as `replace`; a keyed strategy the operator named leaves the table out.
fn whole_strategy(
    table: &str,
    strategy: ConflictStrategy,
    explicit: bool,
) -> std::result::Result<ConflictStrategy, SkippedTable> {
    match strategy {
        ConflictStrategy::Append | ConflictStrategy::Replace => Ok(strategy),
        _ if !explicit => Ok(ConflictStrategy::Replace),
        other => Err(SkippedTable {
            table: table.to_owned(),
            code: "no_primary_key",
            reason: format!(
                "{table:?} has no primary key, and the {} strategy matches rows by key: pull \
                 it with --strategy replace (the table replaced whole) or --strategy append (its \
                 rows added); the other tables went on",
                other.as_str()
            ),
        }),
    }
}

/// Creates the table here when it is missing (or checks, and with `--add-columns` widens, the
/// one here), and remembers that a created table still needs its indexes and foreign keys.
/// Returns whether it was created, and the columns to pull: `columns` less those this table
/// computes itself (generated columns, whose values are not pulled).
pub(super) async fn prepare_table(
    store: &crate::Store,
    connection_id: Uuid,
    schema: &TableSchema,
    columns: &[String],
    options: &PullOptions,
) -> Result<(bool, Vec<String>)> {
    let created = store
        .ensure_table(schema, columns, options.add_columns)
        .await?;
    if created && schema.postgres.is_some() {
        store
            .mark_schema_pending(connection_id, &schema.name)
            .await?;
    }
    let generated = store.generated_columns(&schema.name).await?;
    let pulled = columns
        .iter()
        .filter(|c| !generated.contains(c))
        .cloned()
        .collect();
    Ok((created, pulled))
}

/// The sender's description of `table`, checked against what a description may hold.
/// Sends `message` and reads the answer. A refusal over the sender's rate limit is waited out
/// as the sender says, while `retry_for` allows, and the request sent again on the same session.
pub(super) async fn ask(
    client: &mut Client,
    message: &Message,
    retry_for: Duration,
) -> Result<Message> {
    let started = Instant::now();
    loop {
        client.send(message).await?;
        match client.recv().await {
            Ok((answer, _)) => return Ok(answer),
            Err(err) => {
                let Error::Remote {
                    code: Code::RateLimited,
                    retry_after_ms,
                    ..
                } = &err
                else {
                    return Err(err);
                };
                let wait =
                    Duration::from_millis(retry_after_ms.unwrap_or(1_000).clamp(100, 60_000));
                if started.elapsed() + wait > retry_for {
                    return Err(err);
                }
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    "over the sender's rate limit; waiting"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

pub(super) async fn describe(
    client: &mut Client,
    table: &str,
    retry_for: Duration,
) -> Result<TableSchema> {
    let answer = ask(client, &Message::DescribeTable(table.to_owned()), retry_for).await?;
    match answer {
        Message::TableSchema(schema) => {
            ReceiverCore::check_schema(table, &schema)
                .map_err(|violation| client.protocol_error(violation))?;
            Ok(schema)
        }
        other => {
            Err(client.protocol_error(format!("expected TableSchema, got {:?}", other.kind())))
        }
    }
}

/// The sender's transfer a receive transfer ran under (a later run resumes under it).
fn remote_transfer_of(transfer: &crate::transfer::Transfer) -> Option<&str> {
    transfer
        .metadata
        .get("remote_transfer_id")
        .and_then(|v| v.as_str())
}

/// The sender's transfer of the latest receive transfer of `table` under `connection_id`, when
/// that one did not complete (it may wait for the sender's approval: a new pull asks about it
/// rather than opening another).
pub(super) async fn unfinished_remote_transfer(
    store: &crate::Store,
    connection_id: Uuid,
    table: &str,
) -> Result<Option<String>> {
    let latest = store
        .list_transfers(&crate::transfer::TransferFilter {
            connection_id: Some(connection_id),
            direction: Some(TransferDirection::Receive),
            table_name: Some(table.to_owned()),
            per_page: Some(1),
            ..Default::default()
        })
        .await?;
    // A transfer the sender's admin denied is over: the next pull asks again.
    Ok(latest
        .items
        .first()
        .filter(|previous| {
            previous.status != TransferStatus::Completed
                && previous.metadata.get("remote_denied") != Some(&serde_json::Value::Bool(true))
                // A part of a parallel pull resumes as a part (`sync::parallel`).
                && previous.metadata.get("part").is_none()
        })
        .and_then(remote_transfer_of)
        .map(str::to_owned))
}

/// Records the sender's transfer id `id` on the receive transfer (with `facts`), when it is not
/// the one already known.
pub(super) async fn adopt_remote_transfer(
    store: &crate::Store,
    receive_transfer: Uuid,
    known: &mut Option<String>,
    id: &str,
    mut facts: serde_json::Value,
) -> Result<()> {
    if known.as_deref() == Some(id) {
        return Ok(());
    }
    *known = Some(id.to_owned());
    facts["remote_transfer_id"] = id.into();
    store
        .merge_transfer_metadata(receive_transfer, facts)
        .await
        .map(drop)
}

async fn store_reconnects(store: &crate::Store, transfer: Uuid, reconnects: u32) {
    let _ = store
        .merge_transfer_metadata(transfer, serde_json::json!({ "reconnects": reconnects }))
        .await;
}

impl Agent {
    /// Opens a session, retrying a transient failure with exponential backoff and jitter until
    /// `retry_for` has passed since `failing_since`.
    pub(super) async fn open_session_retrying(
        &self,
        connection: &Connection,
        options: &PullOptions,
        failing_since: &mut Option<Instant>,
        attempts: &mut u32,
    ) -> Result<(Client, u64)> {
        // The password given, else the one this site keeps for the connection.
        let password = match &options.password {
            Some(given) => Some(given.clone()),
            None => self.store.receiver_password(connection, &self.vault)?,
        };
        loop {
            match self
                .open_session(connection, password.as_ref(), options.transport)
                .await
            {
                Ok(opened) => return Ok(opened),
                Err(err) => self.backoff(err, options, failing_since, attempts).await?,
            }
        }
    }

    /// Waits before the next attempt after a transient `err`, or gives `err` back when it is not
    /// transient or the retry time is used up.
    async fn backoff(
        &self,
        err: Error,
        options: &PullOptions,
        failing_since: &mut Option<Instant>,
        attempts: &mut u32,
    ) -> Result<()> {
        let since = *failing_since.get_or_insert_with(Instant::now);
        // Over the sender's rate limit (when a session opens, say), or its sessions per
        // address (a run just stopped whose sessions the sender has not yet seen close): wait
        // as it says, when that fits in the time left to retry.
        if let Error::Remote {
            code: code @ (Code::RateLimited | Code::TooManySessions),
            retry_after_ms,
            ..
        } = &err
        {
            let wait = Duration::from_millis(retry_after_ms.unwrap_or(1_000).clamp(100, 60_000));
            if since.elapsed() + wait > options.retry_for {
                return Err(err);
            }
            tracing::warn!(
                wait_ms = wait.as_millis() as u64,
                code = code.as_str(),
                "the sender asks to wait; waiting"
            );
            tokio::time::sleep(wait).await;
            return Ok(());
        }
        if !err.is_transient() || since.elapsed() >= options.retry_for {
            return Err(err);
        }
        *attempts += 1;
        let base = RETRY_BASE
            .saturating_mul(1 << (*attempts - 1).min(6))
            .min(RETRY_MAX);
        let jitter = rand::random_range(0.5..1.5);
        let wait = base
            .mul_f64(jitter)
            .min(RETRY_MAX)
            .min(options.retry_for.saturating_sub(since.elapsed()));
        tracing::warn!(error = %err, attempt = *attempts, wait_ms = wait.as_millis() as u64, "session broke off; retrying");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The active receiver connection `id_or_name`, to `verb` (pull, verify) through.
    pub(super) async fn active_receiver(
        &self,
        id_or_name: &str,
        verb: &'static str,
    ) -> Result<Connection> {
        let connection = self.store.get_connection(id_or_name).await?;
        if connection.direction != Direction::Receiver {
            return Err(Error::invalid(
                "connection",
                format!(
                    "{} is a sender connection; {verb} from a receiver connection",
                    connection.name
                ),
            ));
        }
        if connection.status != ConnectionStatus::Active {
            let through = if verb == "verify" {
                "verify through"
            } else {
                "pull through"
            };
            return Err(Error::illegal_connection(
                &connection.name,
                through,
                connection.status,
            ));
        }
        Ok(connection)
    }

    /// Pulls tables from the sending site of a receiver connection.
    pub async fn pull(
        &self,
        id_or_name: &str,
        options: &PullOptions,
        mut on_event: impl FnMut(PullEvent),
    ) -> Result<PullSummary> {
        let started = Instant::now();
        let connection = self.active_receiver(id_or_name, "pull").await?;
        let strategy = options
            .strategy
            .unwrap_or(connection.default_conflict_strategy);
        if options.incremental && options.where_key.is_some() {
            return Err(Error::invalid(
                "where-key",
                "an incremental pull moves what changed; it takes no key filter",
            ));
        }
        if strategy == ConflictStrategy::Replace
            && (options.where_key.is_some() || options.incremental)
        {
            return Err(Error::invalid(
                "strategy",
                "replace copies whole tables: leave out --where-key and --incremental",
            ));
        }
        if strategy == ConflictStrategy::Mirror && options.where_key.is_some() {
            return Err(Error::invalid(
                "strategy",
                "mirror deletes the rows the sender no longer has, so it needs a full pull: \
                 leave out --where-key",
            ));
        }
        let mut failing_since: Option<Instant> = None;
        let mut attempts = 0;
        let (mut client, mut max_per_request) = self
            .open_session_retrying(&connection, options, &mut failing_since, &mut attempts)
            .await?;
        let wanted = wanted_tables(&mut client, &connection, options).await?;
        // The tables not here yet are described first: an extension their types need is named
        // before any row of any table moves.
        let mut described = std::collections::HashMap::new();
        for table in &wanted {
            if self.store.engine() != crate::store::Engine::Postgres
                || self.store.describe_table(&table.name).await.is_ok()
            {
                continue;
            }
            let schema = describe(&mut client, &table.name, options.retry_for).await?;
            self.store.check_extensions(&schema).await?;
            described.insert(table.name.clone(), schema);
        }
        let mut summaries = Vec::new();
        let mut skipped = Vec::new();
        let mut warnings = Vec::new();
        // Tables whose foreign keys are made once every table of the pull is in.
        let mut completed = Vec::new();
        // Small keyed tables of one foreign-key level go side by side under `--parallel`.
        let side_by_side = super::parallel::may_split(options, strategy, self.store.engine())
            && client.version >= dbsync_protocol::SPLIT_VERSION;
        for level in fk_levels(&wanted) {
            let mut one_at_a_time = level;
            if side_by_side {
                let (together, alone) = self
                    .side_by_side_candidates(&connection, &wanted, one_at_a_time)
                    .await?;
                one_at_a_time = alone;
                for batch in together.chunks(SIDE_BY_SIDE_BATCH) {
                    let outcome = self
                        .pull_side_by_side(
                            &mut client,
                            &connection,
                            batch,
                            &mut described,
                            (max_per_request, strategy),
                            options,
                            &mut on_event,
                        )
                        .await;
                    for (summary, schema) in outcome.done {
                        let (more, created) =
                            self.table_pulled(connection.id, &schema, options).await?;
                        warnings.extend(more);
                        completed.extend(created);
                        on_event(PullEvent::TableDone {
                            table: summary.table.clone(),
                        });
                        summaries.push(summary);
                    }
                    // What is left goes one table at a time, each resuming where it stopped.
                    one_at_a_time.extend(outcome.left);
                    if let Some(err) = outcome.error {
                        max_per_request = self
                            .reopen(
                                err,
                                &mut client,
                                &connection,
                                options,
                                &mut failing_since,
                                &mut attempts,
                            )
                            .await?;
                    }
                }
            }
            for table in one_at_a_time {
                let estimated_rows = wanted
                    .iter()
                    .find(|t| t.name == table)
                    .map_or(0, |t| t.estimated_rows);
                on_event(PullEvent::TableStarted {
                    table: table.clone(),
                    estimated_rows,
                });
                let mut reconnects = 0;
                let mut cached = described.remove(&table);
                let summary = loop {
                    let attempt = self
                        .pull_one(
                            &mut client,
                            &connection,
                            (&table, cached.take()),
                            (max_per_request, strategy, estimated_rows),
                            options,
                            &mut on_event,
                        )
                        .await;
                    match attempt {
                        Ok(summary) => break summary,
                        Err(err) => {
                            // A session that broke off is re-opened; the table resumes after its
                            // checkpoint.
                            max_per_request = self
                                .reopen(
                                    err,
                                    &mut client,
                                    &connection,
                                    options,
                                    &mut failing_since,
                                    &mut attempts,
                                )
                                .await?;
                            reconnects += 1;
                        }
                    }
                };
                failing_since = None;
                attempts = 0;
                // A keyless table under a strategy that matches rows by key: left out, the others
                // go on.
                let (summary, schema) = match summary {
                    Ok(pulled) => pulled,
                    Err(skip) => {
                        tracing::warn!(table = %table, reason = %skip.reason, "skipped");
                        on_event(PullEvent::TableSkipped {
                            table: table.clone(),
                            reason: skip.reason.clone(),
                        });
                        skipped.push(skip);
                        continue;
                    }
                };
                if reconnects > 0 {
                    store_reconnects(&self.store, summary.transfer_id, reconnects).await;
                }
                let (more, created) = self.table_pulled(connection.id, &schema, options).await?;
                warnings.extend(more);
                completed.extend(created);
                on_event(PullEvent::TableDone {
                    table: summary.table.clone(),
                });
                summaries.push(TableSummary {
                    reconnects,
                    ..summary
                });
            }
        }
        client.close().await;
        for schema in &completed {
            warnings.extend(self.store.add_foreign_keys(schema).await?);
            self.store
                .clear_schema_pending(connection.id, &schema.name)
                .await?;
        }
        // Nothing pulled and something left out: say so as an error (scripts see the status).
        if summaries.is_empty()
            && let Some(first) = skipped.first()
        {
            return Err(Error::invalid("table", first.reason.clone()));
        }
        Ok(PullSummary {
            tables: summaries,
            skipped,
            warnings,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// One attempt at one table on `client`: described (unless `cached`), then pulled whole, in
    /// ranges or in one piece, as its key and the strategy say; a table left out (no key
    /// under a strategy that needs one) is the inner `Err`.
    #[allow(clippy::type_complexity)]
    async fn pull_one(
        &self,
        client: &mut Client,
        connection: &Connection,
        (table, cached): (&str, Option<TableSchema>),
        (max_per_request, strategy, estimated_rows): (u64, ConflictStrategy, u64),
        options: &PullOptions,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<std::result::Result<(TableSummary, TableSchema), SkippedTable>> {
        let schema = match cached {
            Some(schema) => schema,
            None => describe(client, table, options.retry_for).await?,
        };
        if options.schema_only {
            let columns = pulled_columns(&schema, options);
            let (created_table, _) =
                prepare_table(&self.store, connection.id, &schema, &columns, options).await?;
            let summary = TableSummary {
                table: schema.name.clone(),
                created_table,
                transport: client.transport.to_string(),
                ..TableSummary::default()
            };
            return Ok(Ok((summary, schema)));
        }
        let job = TableJob {
            connection,
            schema: &schema,
            max_per_request,
            options,
            estimated_rows,
        };
        // A table without a key, or any under `replace`, comes whole.
        let summary = if schema.primary_key.is_empty() || strategy == ConflictStrategy::Replace {
            let strategy = match whole_strategy(&schema.name, strategy, options.strategy.is_some())
            {
                Ok(strategy) => strategy,
                Err(skip) => return Ok(Err(skip)),
            };
            self.pull_whole(client, &job, strategy, on_event).await?
        } else if let Some(summary) = self.pull_parallel(client, &job, strategy, on_event).await? {
            summary
        } else {
            self.pull_table(client, &job, strategy, on_event).await?
        };
        Ok(Ok((summary, schema)))
    }

    /// After `err` broke a session off: waits as [`Agent::backoff`] says (or gives up with
    /// `err`), then opens a new session in place of `client` (closed), retrying as
    /// [`Agent::open_session_retrying`] does; the new session's rows per request.
    async fn reopen(
        &self,
        err: Error,
        client: &mut Client,
        connection: &Connection,
        options: &PullOptions,
        failing_since: &mut Option<Instant>,
        attempts: &mut u32,
    ) -> Result<u64> {
        self.backoff(err, options, failing_since, attempts).await?;
        let (reopened, max) = self
            .open_session_retrying(connection, options, failing_since, attempts)
            .await?;
        std::mem::replace(client, reopened).close().await;
        Ok(max)
    }

    /// What follows a table's rows: the copy's sequences reach the sender's values (it takes
    /// inserts at once), and a table this pull (or an interrupted one before it) created gets
    /// its indexes now its rows are in. The warnings, and the schema when its foreign keys are
    /// still to be made (once every table of the pull is in).
    async fn table_pulled(
        &self,
        connection_id: Uuid,
        schema: &TableSchema,
        options: &PullOptions,
    ) -> Result<(Vec<String>, Option<TableSchema>)> {
        let mut warnings = Vec::new();
        if !options.schema_only {
            warnings.extend(self.store.follow_sequences(schema).await?);
        }
        if schema.postgres.is_some()
            && self
                .store
                .schema_pending(connection_id, &schema.name)
                .await?
        {
            warnings.extend(self.store.complete_schema(schema).await?);
            return Ok((warnings, Some(schema.clone())));
        }
        Ok((warnings, None))
    }

    /// Which of `level`'s tables go side by side (with their row estimates): keyed ones the
    /// sender would not cut (fewer rows than two ranges' worth) with nothing interrupted to
    /// resume. None when fewer than two qualify; the others go one at a time.
    async fn side_by_side_candidates(
        &self,
        connection: &Connection,
        wanted: &[TableInfo],
        level: Vec<String>,
    ) -> Result<(Vec<(String, u64)>, Vec<String>)> {
        let mut together = Vec::new();
        let mut alone = Vec::new();
        for name in level {
            let Some(info) = wanted.iter().find(|t| t.name == name) else {
                alone.push(name);
                continue;
            };
            let small = !info.primary_key.is_empty()
                && info.estimated_rows < 2 * crate::session::sender::MIN_PART_ROWS;
            let mut interrupted = !self
                .store
                .part_checkpoints(connection.id, &name)
                .await?
                .is_empty();
            if let Some(checkpoint) = self.store.checkpoint(connection.id, &name).await?
                && checkpoint.last_key.is_some()
                && let Some(transfer) = checkpoint.transfer_id
            {
                interrupted |= self
                    .store
                    .get_transfer(transfer)
                    .await
                    .is_ok_and(|t| t.status != TransferStatus::Completed);
            }
            if small && !interrupted {
                together.push((name, info.estimated_rows));
            } else {
                alone.push(name);
            }
        }
        if together.len() < 2 {
            alone.extend(together.drain(..).map(|(name, _)| name));
        }
        Ok((together, alone))
    }

    /// A receive transfer of `table` under `strategy`, created and started (the record both a
    /// keyed and a whole-table pull run under).
    pub(super) async fn start_receive_transfer(
        &self,
        connection: &Connection,
        table: &str,
        strategy: ConflictStrategy,
        transport: crate::transfer::Transport,
    ) -> Result<crate::transfer::Transfer> {
        let transfer = self
            .store
            .create_transfer(
                NewTransfer {
                    connection_id: connection.id,
                    direction: TransferDirection::Receive,
                    table_name: table.to_owned(),
                    requires_approval: false,
                    records_requested: 0,
                    conflict_strategy: strategy,
                    transport: Some(transport),
                    requester_ip: None,
                    requester_user_agent: None,
                },
                self.config.approval_ttl(),
                &Actor::system(),
                self.now(),
            )
            .await?;
        self.store.start_transfer(transfer.id, self.now()).await
    }

    async fn pull_table(
        &self,
        client: &mut Client,
        job: &TableJob<'_>,
        strategy: ConflictStrategy,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<TableSummary> {
        let TableJob {
            connection,
            schema,
            options,
            ..
        } = *job;
        let store = &self.store;
        let columns = pulled_columns(schema, options);
        let key_filter = match &options.key_list {
            Some(keys) => Some(KeyFilter::Keys(keys.clone())),
            None => options
                .where_key
                .as_deref()
                .map(|text| crate::key_filter::parse(text, schema))
                .transpose()?,
        };
        // What a resume must match: the filter as written, or a digest of the key list.
        let filter_identity = match &options.key_list {
            Some(keys) => Some(format!(
                "keys:{}",
                hex::encode(crate::data::row_hash::row_hash(
                    &keys.iter().cloned().map(Value::Array).collect::<Vec<_>>(),
                    &[],
                )?)
            )),
            None => options.where_key.clone(),
        };
        let cursor = if options.incremental {
            let column = match cursor_column(schema, options.cursor_column.as_deref()) {
                Ok(column) => column,
                Err(_) if options.scheduled && options.cursor_column.is_none() => String::new(),
                Err(err) => return Err(err),
            };
            if options.exclude_columns.contains(&column) {
                return Err(Error::invalid(
                    "exclude-columns",
                    format!("the cursor column {column:?} cannot be left out"),
                ));
            }
            (!column.is_empty()).then_some(column)
        } else {
            None
        };
        let table_started = Instant::now();
        let (created_table, columns) =
            prepare_table(store, connection.id, schema, &columns, options).await?;
        // Resume an interrupted pull of this table, or start from the beginning.
        let mut after: Option<Vec<Value>> = None;
        let mut remote_transfer: Option<String> = None;
        let mut resumed = false;
        if let Some(checkpoint) = store.checkpoint(connection.id, &schema.name).await? {
            let previous = match checkpoint.transfer_id {
                Some(id) => store.get_transfer(id).await.ok(),
                None => None,
            };
            // Resume only the same kind of pull: same filter, and a mirror pull only a mirror
            // pull (its staging table must hold every key seen).
            let excluded = serde_json::json!(options.exclude_columns);
            let same_pull = |t: &crate::transfer::Transfer| {
                t.metadata.get("key_filter").and_then(|v| v.as_str()) == filter_identity.as_deref()
                    && t.metadata
                        .get("exclude_columns")
                        .unwrap_or(&serde_json::json!([]))
                        == &excluded
                    && t.metadata.get("cursor").and_then(|v| v.as_str()) == cursor.as_deref()
                    && (t.conflict_strategy == ConflictStrategy::Mirror)
                        == (strategy == ConflictStrategy::Mirror)
            };
            match previous {
                Some(t) if t.status != TransferStatus::Completed && same_pull(&t) => {
                    after = checkpoint.last_key;
                    remote_transfer = remote_transfer_of(&t).map(str::to_owned);
                    resumed = true;
                    if t.status == TransferStatus::InProgress {
                        let _ = store
                            .fail_transfer(t.id, "interrupted; resumed by a later pull", self.now())
                            .await;
                    }
                }
                _ => store.clear_checkpoint(connection.id, &schema.name).await?,
            }
            // A new incremental pull starts after the previous one's last (cursor, key).
            if !resumed
                && let Some(column) = &cursor
                && let Some(saved) = &checkpoint.incremental_cursor
                && saved.get("column").and_then(|c| c.as_str()) == Some(column.as_str())
            {
                after = saved
                    .get("after")
                    .and_then(|a| serde_json::from_value(a.clone()).ok());
            }
        }
        if !resumed {
            store.reset_mirror(connection.id, &schema.name).await?;
        }
        if remote_transfer.is_none() {
            // Nothing applied yet, but an earlier pull may have been told to wait for approval:
            // ask about the same sender transfer rather than opening a new one.
            remote_transfer =
                unfinished_remote_transfer(store, connection.id, &schema.name).await?;
            resumed = remote_transfer.is_some();
        }
        let transfer = self
            .start_receive_transfer(connection, &schema.name, strategy, client.transport)
            .await?;
        // What a later run needs to resume this one: the filter, and the sender's transfer.
        let mut facts = serde_json::Map::new();
        if let Some(text) = &filter_identity {
            facts.insert("key_filter".into(), text.clone().into());
        }
        if let Some(remote) = &remote_transfer {
            facts.insert("remote_transfer_id".into(), remote.clone().into());
        }
        if let Some(column) = &cursor {
            facts.insert("cursor".into(), column.clone().into());
        }
        if !options.exclude_columns.is_empty() {
            // The sender holds a transfer to the columns it started with: a resume asks for them.
            facts.insert(
                "exclude_columns".into(),
                serde_json::json!(options.exclude_columns),
            );
        }
        if options.scheduled {
            facts.insert("scheduled".into(), true.into());
        }
        // What the pages show progress against: the whole table, when the whole table comes.
        if cursor.is_none() && options.where_key.is_none() && job.estimated_rows > 0 {
            facts.insert("estimated_rows".into(), job.estimated_rows.into());
        }
        if !facts.is_empty() {
            store
                .merge_transfer_metadata(transfer.id, serde_json::Value::Object(facts))
                .await?;
        }
        let mut summary = TableSummary {
            table: schema.name.clone(),
            created_table,
            resumed,
            transfer_id: transfer.id,
            transport: client.transport.to_string(),
            ..TableSummary::default()
        };
        // An incremental mirror moves the changed rows, then reconciles keys in a second pass.
        let row_strategy = if strategy == ConflictStrategy::Mirror && cursor.is_some() {
            ConflictStrategy::Overwrite
        } else {
            strategy
        };
        let pass = Pass {
            columns: &columns,
            strategy: row_strategy,
            key_filter: key_filter.as_ref(),
            cursor: cursor.clone(),
            keys_only: false,
            into: None,
            split: None,
            checkpoint: None,
        };
        let mut position = Position {
            after,
            remote_transfer,
        };
        let mut outcome = self
            .pull_rows(client, job, &pass, on_event, &mut position, &mut summary)
            .await;
        let after = position.after;
        if outcome.is_ok()
            && let Some(column) = &cursor
        {
            let saved = serde_json::json!({ "column": column, "after": after });
            outcome = store
                .set_incremental_cursor(connection.id, &schema.name, &saved)
                .await;
        }
        if outcome.is_ok() && strategy == ConflictStrategy::Mirror && cursor.is_some() {
            store.reset_mirror(connection.id, &schema.name).await?;
            let mut keys_summary = TableSummary::default();
            let keys = Pass {
                columns: &schema.primary_key,
                strategy: ConflictStrategy::Mirror,
                key_filter: None,
                cursor: None,
                keys_only: true,
                into: None,
                split: None,
                checkpoint: None,
            };
            outcome = self
                .pull_rows(
                    client,
                    job,
                    &keys,
                    &mut |_| {},
                    &mut Position::default(),
                    &mut keys_summary,
                )
                .await;
            summary.truncated |= keys_summary.truncated;
        }
        let outcome = match outcome {
            Ok(()) if strategy == ConflictStrategy::Mirror => {
                if summary.truncated {
                    // Rows past the cut were never seen: deleting them would be wrong.
                    store.reset_mirror(connection.id, &schema.name).await?;
                    tracing::warn!(table = %schema.name, "mirror delete pass skipped: the sender's record limit cut the pull");
                    store
                        .merge_transfer_metadata(
                            transfer.id,
                            serde_json::json!({ "mirror_skipped": "record limit reached" }),
                        )
                        .await
                        .map(drop)
                } else {
                    match store.finish_mirror(connection.id, schema).await {
                        Ok(deleted) => {
                            summary.deleted = deleted;
                            store
                                .merge_transfer_metadata(
                                    transfer.id,
                                    serde_json::json!({ "rows_deleted": deleted }),
                                )
                                .await
                                .map(drop)
                        }
                        Err(err) => Err(err),
                    }
                }
            }
            other => other,
        };
        self.metrics
            .table_pulled(outcome.is_ok(), table_started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                store.complete_transfer(transfer.id, self.now()).await?;
                Ok(summary)
            }
            Err(err) => {
                mark_if_denied(store, transfer.id, &err).await;
                let _ = store
                    .fail_transfer(transfer.id, &err.to_string(), self.now())
                    .await;
                Err(err)
            }
        }
    }
}

/// Remembers on the receive transfer `transfer` that the sender denied it, so later pulls of
/// the table ask for a new transfer rather than resume the denied one.
pub(super) async fn mark_if_denied(store: &crate::Store, transfer: Uuid, err: &Error) {
    if let Error::Remote {
        code: Code::ApprovalDenied,
        ..
    } = err
    {
        let _ = store
            .merge_transfer_metadata(transfer, serde_json::json!({ "remote_denied": true }))
            .await;
    }
}
