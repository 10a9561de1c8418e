//! `dbsync pull --parallel N`: a large table cut by the sender into key ranges (protocol 6,
//! `Split`), pulled side by side over up to N sessions, each range under a receive transfer
//! and a checkpoint of its own, so a pull that dies resumes every range where it stopped.
//!
//! The sender counts the cut as one download, and serves every part from the snapshot of the
//! session that cut the table. Each range is applied by its own connection to this site's
//! database; ranges never overlap, so their transactions never wait on each other's rows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use dbsync_protocol::Message;
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, Split, TableSchema};
use uuid::Uuid;

use super::pull::{
    Pass, Position, PullEvent, PullOptions, TableJob, TableSummary, ask, describe, prepare_table,
    pulled_columns,
};
use crate::agent::Agent;
use crate::connection::{ConflictStrategy, Connection};
use crate::error::Result;
use crate::session::receiver::Client;
use crate::sink::part_checkpoint;
use crate::store::Engine;
use crate::transfer::TransferStatus;

/// Most sessions a parallel pull opens to one sender.
pub const MAX_PARALLEL: usize = dbsync_protocol::message::MAX_PARTS as usize;

/// One range of a parallel pull.
#[derive(Debug, Clone)]
struct Part {
    index: usize,
    parts: usize,
    /// Lower bound (exclusive; none: from the first key).
    after: Option<Vec<Value>>,
    /// Upper bound (inclusive; none: to the last key).
    upto: Option<Vec<Value>>,
    /// Where it stands: its last applied key and the sender's transfer.
    position: Position,
    /// Whether it goes on from an earlier run.
    resumed: bool,
    /// The sender's grant a resumed part names when it never heard back from the sender (its
    /// first batch never came): the part goes on under the cut that counted its download.
    grant: Option<String>,
}

impl Part {
    fn checkpoint(&self, table: &str) -> String {
        part_checkpoint(table, self.index, self.parts)
    }
}

/// Whether a pull of a keyed table under `options` and `strategy` may go as parts: a whole,
/// non-incremental pull that applies rows by key without a mirror's delete pass, into
/// PostgreSQL (SQLite takes one writer at a time).
pub(super) fn may_split(options: &PullOptions, strategy: ConflictStrategy, engine: Engine) -> bool {
    options.parallel > 1
        && engine == Engine::Postgres
        && !options.incremental
        && !options.schema_only
        && options.where_key.is_none()
        && options.key_list.is_none()
        && !matches!(
            strategy,
            ConflictStrategy::Replace | ConflictStrategy::Mirror
        )
}

impl Agent {
    /// The unfinished parts of an interrupted parallel pull of `table` (empty when there is
    /// none). The parts that finished are left out; the others go on after their last key,
    /// under the sender's transfer they ran under. A part whose record cannot be read back
    /// whole (its transfer gone, its range unreadable) makes the pull start over: every range
    /// is cut again and pulled from its start, rather than one range be left out.
    async fn unfinished_parts(&self, connection_id: Uuid, table: &str) -> Result<Vec<Part>> {
        let mut parts = Vec::new();
        let mut any_unfinished = false;
        let mut unreadable = false;
        for (name, checkpoint) in self.store.part_checkpoints(connection_id, table).await? {
            let transfer = match checkpoint.transfer_id {
                Some(id) => self.store.get_transfer(id).await.ok(),
                None => None,
            };
            let Some(transfer) = transfer else {
                tracing::warn!(checkpoint = %name.escape_debug(), "a range's transfer is gone");
                unreadable = true;
                continue;
            };
            let meta = &transfer.metadata;
            let bound = |name: &str| -> Option<Option<Vec<Value>>> {
                match meta.get("range")?.get(name)? {
                    serde_json::Value::Null => Some(None),
                    key => serde_json::from_value(key.clone()).ok().map(Some),
                }
            };
            let (Some(index), Some(count), Some(after), Some(upto)) = (
                meta.get("part_index").and_then(|v| v.as_u64()),
                meta.get("parts").and_then(|v| v.as_u64()),
                bound("after"),
                bound("upto"),
            ) else {
                tracing::warn!(transfer = %transfer.id, "a range's record cannot be read back");
                unreadable = true;
                continue;
            };
            if transfer.status == TransferStatus::Completed {
                continue;
            }
            any_unfinished = true;
            if transfer.status == TransferStatus::InProgress {
                let _ = self
                    .store
                    .fail_transfer(
                        transfer.id,
                        "interrupted; resumed by a later pull",
                        self.now(),
                    )
                    .await;
            }
            let remote_transfer = meta
                .get("remote_transfer_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            let grant = match remote_transfer {
                Some(_) => None,
                None => meta
                    .get("grant")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
            };
            parts.push(Part {
                index: index as usize,
                parts: count as usize,
                position: Position {
                    after: checkpoint.last_key.clone().or_else(|| after.clone()),
                    remote_transfer,
                },
                after,
                upto,
                resumed: true,
                grant,
            });
        }
        if unreadable || !any_unfinished {
            parts.clear();
        }
        parts.sort_by_key(|p| p.index);
        Ok(parts)
    }

    /// Pulls `job`'s table as parts when an interrupted parallel pull of it left some, or when
    /// `--parallel` asks for it and the sender cuts it. `None`: pull it in one piece.
    pub(super) async fn pull_parallel(
        &self,
        client: &mut Client,
        job: &TableJob<'_>,
        strategy: ConflictStrategy,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<Option<TableSummary>> {
        let TableJob {
            connection,
            schema,
            options,
            ..
        } = *job;
        let store = &self.store;
        if store.engine() != Engine::Postgres {
            return Ok(None);
        }
        let mut parts = self.unfinished_parts(connection.id, &schema.name).await?;
        let mut token = None;
        if parts.is_empty() {
            store
                .clear_part_checkpoints(connection.id, &schema.name)
                .await?;
            if !may_split(options, strategy, store.engine())
                || client.version < dbsync_protocol::SPLIT_VERSION
            {
                return Ok(None);
            }
            // A pull of the table in one piece that was interrupted goes on as it started.
            if let Some(checkpoint) = store.checkpoint(connection.id, &schema.name).await?
                && checkpoint.last_key.is_some()
                && let Some(transfer) = checkpoint.transfer_id
                && store
                    .get_transfer(transfer)
                    .await
                    .is_ok_and(|t| t.status != TransferStatus::Completed)
            {
                return Ok(None);
            }
            let asked = options.parallel.min(MAX_PARALLEL);
            let request = Message::Split(Split {
                request_id: 0,
                table: schema.name.clone(),
                parts: u32::try_from(asked).unwrap_or(1),
            });
            let done = match ask(client, &request, options.retry_for).await? {
                Message::SplitDone(done) if done.request_id == 0 => done,
                other => {
                    return Err(client
                        .protocol_error(format!("expected SplitDone, got {:?}", other.kind())));
                }
            };
            let count = done.bounds.len() + 1;
            if done.bounds.is_empty() {
                return Ok(None);
            }
            // The sender's word decides which keys go in which range, never how much this side
            // holds: more ranges than asked for, or a bound that is no key, is refused.
            if count > asked {
                return Err(client.protocol_error(format!(
                    "{count} ranges of {:?} for {asked} asked",
                    schema.name
                )));
            }
            let key_len = schema.primary_key.len();
            if done.bounds.iter().any(|b| b.len() != key_len) || done.token.is_none() {
                return Err(client.protocol_error(format!(
                    "a bound of the cut of {:?} is not a key of {key_len} value(s), or the cut \
                     has no token",
                    schema.name
                )));
            }
            token = done.token;
            let mut after = None;
            for (index, upto) in done
                .bounds
                .into_iter()
                .map(Some)
                .chain(std::iter::once(None))
                .enumerate()
            {
                parts.push(Part {
                    index,
                    parts: count,
                    position: Position {
                        after: after.clone(),
                        remote_transfer: None,
                    },
                    after: after.clone(),
                    upto: upto.clone(),
                    resumed: false,
                    grant: None,
                });
                after = upto;
            }
        }
        let columns = pulled_columns(schema, options);
        let (created_table, columns) =
            prepare_table(store, connection.id, schema, &columns, options).await?;
        let cut = parts.first().map_or(0, |part| part.parts);
        let resumed = parts.iter().any(|part| part.resumed);
        let work = TableWork {
            job: *job,
            strategy,
            columns,
            token,
            remaining: Mutex::new(parts.len()),
            totals: Mutex::new(TableSummary {
                table: schema.name.clone(),
                created_table,
                resumed,
                transport: client.transport.to_string(),
                parts: u32::try_from(cut).unwrap_or(u32::MAX),
                ..TableSummary::default()
            }),
        };
        let mut queue = VecDeque::new();
        self.register_parts(client, &work, parts, &mut queue)
            .await?;
        let streams = options.parallel.clamp(1, MAX_PARALLEL).min(queue.len());
        tracing::info!(table = %schema.name, parts = queue.len(), streams, "pulling a table as parts");
        self.run_streams(client, connection, options, streams, queue, on_event)
            .await?;
        store
            .clear_part_checkpoints(connection.id, &schema.name)
            .await?;
        Ok(Some(work.into_summary()))
    }

    /// Pulls `tables` (keyed, small, none of them references another) side by side, each whole
    /// under a grant of the sender (a `Split` of one part): up to `--parallel` sessions take
    /// tables off one queue, and all of them read from the snapshot of the session that asked
    /// for the grants. A table the sender grants nothing for, or one not finished when a stream
    /// failed, is left for the pull to take in one piece (a table started here then resumes
    /// after its last applied key).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pull_side_by_side(
        &self,
        client: &mut Client,
        connection: &Connection,
        names: &[(String, u64)],
        described: &mut HashMap<String, TableSchema>,
        (max_per_request, strategy): (u64, ConflictStrategy),
        options: &PullOptions,
        on_event: &mut impl FnMut(PullEvent),
    ) -> SideBySide {
        let mut outcome = SideBySide::default();
        // Each table as the sender describes it (those described before the pull began are
        // not asked again).
        let mut tables = Vec::with_capacity(names.len());
        for (name, estimated_rows) in names {
            let schema = match described.remove(name) {
                Some(schema) => schema,
                None => match describe(client, name, options.retry_for).await {
                    Ok(schema) => schema,
                    Err(err) => {
                        outcome.left = names.iter().map(|(name, _)| name.clone()).collect();
                        outcome.error = Some(err);
                        return outcome;
                    }
                },
            };
            tables.push((schema, *estimated_rows));
        }
        let tables = tables.as_slice();
        let mut works = Vec::with_capacity(tables.len());
        let mut asked = 0;
        for (schema, estimated_rows) in tables {
            let granted = async {
                let request = Message::Split(Split {
                    request_id: 0,
                    table: schema.name.clone(),
                    parts: 1,
                });
                let done = match ask(client, &request, options.retry_for).await? {
                    Message::SplitDone(done) if done.request_id == 0 => done,
                    other => {
                        return Err(client.protocol_error(format!(
                            "expected SplitDone, got {:?}",
                            other.kind()
                        )));
                    }
                };
                if !done.bounds.is_empty() {
                    return Err(client.protocol_error(format!(
                        "one part of {:?} asked for, {} ranges given",
                        schema.name,
                        done.bounds.len() + 1
                    )));
                }
                let Some(token) = done.token else {
                    return Ok(None);
                };
                let columns = pulled_columns(schema, options);
                let (created_table, columns) =
                    prepare_table(&self.store, connection.id, schema, &columns, options).await?;
                Ok(Some(TableWork {
                    job: TableJob {
                        connection,
                        schema,
                        max_per_request,
                        options,
                        estimated_rows: *estimated_rows,
                    },
                    strategy,
                    columns,
                    token: Some(token),
                    remaining: Mutex::new(1),
                    totals: Mutex::new(TableSummary {
                        table: schema.name.clone(),
                        created_table,
                        transport: client.transport.to_string(),
                        ..TableSummary::default()
                    }),
                }))
            }
            .await;
            asked += 1;
            match granted {
                Ok(Some(work)) => works.push(work),
                Ok(None) => outcome.left.push(schema.name.clone()),
                Err(err) => {
                    outcome.error = Some(err);
                    break;
                }
            }
        }
        outcome
            .left
            .extend(tables[asked..].iter().map(|(s, _)| s.name.clone()));
        // The tables granted before a refusal (the download limit reached, say) still go: each
        // took its download.
        if !works.is_empty() {
            let mut queue = VecDeque::new();
            let mut registered = Ok(());
            for work in &works {
                on_event(PullEvent::TableStarted {
                    table: work.job.schema.name.clone(),
                    estimated_rows: work.job.estimated_rows,
                });
                let whole = Part {
                    index: 0,
                    parts: 1,
                    after: None,
                    upto: None,
                    position: Position::default(),
                    resumed: false,
                    grant: None,
                };
                registered = self
                    .register_parts(client, work, vec![whole], &mut queue)
                    .await;
                if registered.is_err() {
                    break;
                }
            }
            let streams = options.parallel.clamp(1, MAX_PARALLEL).min(queue.len());
            tracing::info!(tables = queue.len(), streams, "pulling tables side by side");
            let ran = match registered {
                Ok(()) => {
                    self.run_streams(client, connection, options, streams, queue, on_event)
                        .await
                }
                Err(err) => Err(err),
            };
            if outcome.error.is_none() {
                outcome.error = ran.err();
            }
        }
        for work in works {
            if work.done() {
                let schema = work.job.schema.clone();
                outcome.done.push((work.into_summary(), schema));
            } else {
                outcome.left.push(work.job.schema.name.clone());
            }
        }
        outcome
    }

    /// Records each of `parts` of `work`'s table before any row moves (a receive transfer, and
    /// its checkpoint pointing at it: a pull killed at any moment leaves every part findable),
    /// and queues it.
    async fn register_parts<'a>(
        &self,
        client: &Client,
        work: &'a TableWork<'a>,
        parts: Vec<Part>,
        queue: &mut VecDeque<Item<'a>>,
    ) -> Result<()> {
        let (connection, table) = (work.job.connection, &work.job.schema.name);
        for part in parts {
            let transfer = self
                .start_receive_transfer(connection, table, work.strategy, client.transport)
                .await?;
            let mut facts = serde_json::json!({
                "part": format!("{}/{}", part.index + 1, part.parts),
                "part_index": part.index,
                "parts": part.parts,
                "range": { "after": part.after, "upto": part.upto },
            });
            if let Some(remote) = &part.position.remote_transfer {
                facts["remote_transfer_id"] = remote.clone().into();
            }
            // The cut's grant, for a run after this one dies to name (a grant is good only
            // for this connection, and for an hour after its session ends).
            if let Some(grant) = part.grant.as_ref().or(work.token.as_ref()) {
                facts["grant"] = grant.clone().into();
            }
            self.store
                .merge_transfer_metadata(transfer.id, facts)
                .await?;
            self.store
                .set_checkpoint_transfer(connection.id, &part.checkpoint(table), transfer.id)
                .await?;
            let mut totals = work.totals.lock().unwrap_or_else(|e| e.into_inner());
            if totals.transfer_id.is_nil() {
                totals.transfer_id = transfer.id;
            }
            drop(totals);
            queue.push_back((part, transfer.id, work));
        }
        Ok(())
    }

    /// Drains `queue` over `streams` sessions: `client`, and as many more opened for the
    /// purpose (closed when the queue is empty).
    async fn run_streams<'a>(
        &self,
        client: &mut Client,
        connection: &Connection,
        options: &PullOptions,
        streams: usize,
        queue: VecDeque<Item<'a>>,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<()> {
        let transfers: Vec<Uuid> = queue.iter().map(|(_, transfer, _)| *transfer).collect();
        let queue = Mutex::new(queue);
        let events = Mutex::new(on_event);
        let shared = Shared {
            queue: &queue,
            events: &events,
        };
        let mut workers = Vec::with_capacity(streams);
        workers.push(futures_util::future::Either::Left(
            self.run_parts(client, &shared),
        ));
        for _ in 1..streams.max(1) {
            workers.push(futures_util::future::Either::Right(
                self.run_parts_own_session(connection, options, &shared),
            ));
        }
        if let Err(err) = futures_util::future::try_join_all(workers).await {
            // The other streams stopped where they were, and the parts not begun never will:
            // their transfers end as failed (a finished one stays completed; the checkpoints
            // keep where each range got to, for the next pull).
            let reason = format!("the parallel pull stopped: {err}");
            for transfer in transfers {
                let _ = self
                    .store
                    .fail_transfer(transfer, &reason, self.now())
                    .await;
            }
            return Err(err);
        }
        Ok(())
    }

    /// A stream of its own: a session opened for it takes parts until none is left. A session
    /// the sender will not open (too many, say) leaves its parts to the others.
    async fn run_parts_own_session<F: FnMut(PullEvent)>(
        &self,
        connection: &Connection,
        options: &PullOptions,
        shared: &Shared<'_, '_, F>,
    ) -> Result<()> {
        let password = match &options.password {
            Some(given) => Some(given.clone()),
            None => self.store.receiver_password(connection, &self.vault)?,
        };
        let (mut client, _) = match self
            .open_session(connection, password.as_ref(), options.transport)
            .await
        {
            Ok(opened) => opened,
            Err(err) => {
                tracing::warn!(error = %err, "could not open another session for a parallel pull; the others take its parts");
                return Ok(());
            }
        };
        let outcome = self.run_parts(&mut client, shared).await;
        client.close().await;
        outcome
    }

    /// Takes parts off the queue and pulls each through `client`, until none is left.
    async fn run_parts<F: FnMut(PullEvent)>(
        &self,
        client: &mut Client,
        shared: &Shared<'_, '_, F>,
    ) -> Result<()> {
        loop {
            let next = shared
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some((mut part, transfer, work)) = next else {
                return Ok(());
            };
            let schema = work.job.schema;
            let checkpoint = part.checkpoint(&schema.name);
            let filter = KeyFilter::Range {
                from: None,
                to: part.upto.clone(),
            };
            let pass = Pass {
                columns: &work.columns,
                strategy: work.strategy,
                key_filter: Some(&filter),
                cursor: None,
                keys_only: false,
                into: None,
                split: part.grant.as_deref().or(work.token.as_deref()),
                checkpoint: Some(&checkpoint),
            };
            let mut summary = TableSummary {
                transfer_id: transfer,
                ..TableSummary::default()
            };
            let mut on_event = |event: PullEvent| {
                let mut events = shared.events.lock().unwrap_or_else(|e| e.into_inner());
                (**events)(event);
            };
            let outcome = self
                .pull_rows(
                    client,
                    &work.job,
                    &pass,
                    &mut on_event,
                    &mut part.position,
                    &mut summary,
                )
                .await;
            if let Err(err) = outcome {
                super::pull::mark_if_denied(&self.store, transfer, &err).await;
                let _ = self
                    .store
                    .fail_transfer(transfer, &err.to_string(), self.now())
                    .await;
                return Err(err);
            }
            self.store.complete_transfer(transfer, self.now()).await?;
            work.add(&summary);
            let last = {
                let mut remaining = work.remaining.lock().unwrap_or_else(|e| e.into_inner());
                *remaining = remaining.saturating_sub(1);
                *remaining == 0
            };
            // The table is in: its ranges are forgotten at once, so a pull that breaks off
            // later does not take it for unfinished.
            if last {
                self.store
                    .clear_part_checkpoints(work.job.connection.id, &schema.name)
                    .await?;
            }
        }
    }
}

/// One table pulled as parts: what its parts share.
pub(super) struct TableWork<'a> {
    job: TableJob<'a>,
    strategy: ConflictStrategy,
    columns: Vec<String>,
    /// The sender's grant the parts name (none: parts resumed, each an ordinary pull).
    token: Option<String>,
    /// Parts not finished yet.
    remaining: Mutex<usize>,
    totals: Mutex<TableSummary>,
}

impl TableWork<'_> {
    fn add(&self, part: &TableSummary) {
        let mut totals = self.totals.lock().unwrap_or_else(|e| e.into_inner());
        totals.rows += part.rows;
        totals.created += part.created;
        totals.updated += part.updated;
        totals.skipped += part.skipped;
        totals.bytes_wire += part.bytes_wire;
        totals.bytes_raw += part.bytes_raw;
        totals.truncated |= part.truncated;
    }

    fn done(&self) -> bool {
        *self.remaining.lock().unwrap_or_else(|e| e.into_inner()) == 0
    }

    fn into_summary(self) -> TableSummary {
        self.totals.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// What [`Agent::pull_side_by_side`] did.
#[derive(Default)]
pub(super) struct SideBySide {
    /// The tables pulled, with their descriptions.
    pub(super) done: Vec<(TableSummary, TableSchema)>,
    /// The tables left for the pull to take one at a time.
    pub(super) left: Vec<String>,
    /// Why it stopped early, if it did.
    pub(super) error: Option<crate::error::Error>,
}

/// A queued part: the range, its receive transfer, and its table.
type Item<'a> = (Part, Uuid, &'a TableWork<'a>);

/// What every stream of one parallel pull shares.
struct Shared<'a, 'e, F> {
    queue: &'a Mutex<VecDeque<Item<'a>>>,
    events: &'a Mutex<&'e mut F>,
}
