//! `dbsync pull --parallel N`: a large table cut by the sender into key ranges (protocol 6,
//! `Split`), pulled side by side over up to N sessions, each range under a receive transfer
//! and a checkpoint of its own, so a pull that dies resumes every range where it stopped.
//!
//! The sender counts the cut as one download, and serves every part from the snapshot of the
//! session that cut the table. Each range is applied by its own connection to this site's
//! database; ranges never overlap, so their transactions never wait on each other's rows.

use std::collections::VecDeque;
use std::sync::Mutex;

use dbsync_protocol::Message;
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, Split};
use uuid::Uuid;

use super::pull::{
    Pass, Position, PullEvent, PullOptions, TableJob, TableSummary, ask, prepare_table,
    pulled_columns,
};
use crate::agent::Agent;
use crate::connection::ConflictStrategy;
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
            parts.push(Part {
                index: index as usize,
                parts: count as usize,
                position: Position {
                    after: checkpoint.last_key.clone().or_else(|| after.clone()),
                    remote_transfer: meta
                        .get("remote_transfer_id")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned),
                },
                after,
                upto,
                resumed: true,
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
                });
                after = upto;
            }
        }
        let columns = pulled_columns(schema, options);
        let (created_table, columns) =
            prepare_table(store, connection.id, schema, &columns, options).await?;
        // Each part's record, pointed at by its checkpoint before any row moves: a pull killed
        // at any moment leaves every part findable.
        let mut jobs = VecDeque::new();
        for part in parts {
            let transfer = self
                .start_receive_transfer(connection, &schema.name, strategy, client.transport)
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
            store.merge_transfer_metadata(transfer.id, facts).await?;
            store
                .set_checkpoint_transfer(connection.id, &part.checkpoint(&schema.name), transfer.id)
                .await?;
            jobs.push_back((part, transfer.id));
        }
        let streams = options.parallel.clamp(1, MAX_PARALLEL).min(jobs.len());
        let first_transfer = jobs.front().map(|(_, id)| *id).unwrap_or_default();
        let cut = jobs.front().map_or(0, |(part, _)| part.parts);
        let resumed = jobs.iter().any(|(part, _)| part.resumed);
        tracing::info!(table = %schema.name, parts = jobs.len(), streams, "pulling a table as parts");
        let queue = Mutex::new(jobs);
        let events = Mutex::new(on_event);
        let totals = Mutex::new(TableSummary {
            table: schema.name.clone(),
            created_table,
            resumed,
            transfer_id: first_transfer,
            transport: client.transport.to_string(),
            parts: u32::try_from(cut).unwrap_or(u32::MAX),
            ..TableSummary::default()
        });
        let shared = Shared {
            job,
            strategy,
            columns: &columns,
            token: token.as_deref(),
            queue: &queue,
            events: &events,
            totals: &totals,
        };
        let mut workers = Vec::with_capacity(streams);
        workers.push(futures_util::future::Either::Left(
            self.run_parts(client, &shared),
        ));
        for _ in 1..streams {
            workers.push(futures_util::future::Either::Right(
                self.run_parts_own_session(&shared),
            ));
        }
        futures_util::future::try_join_all(workers).await?;
        store
            .clear_part_checkpoints(connection.id, &schema.name)
            .await?;
        let summary = totals.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(Some(summary))
    }

    /// A stream of its own: a session opened for it takes parts until none is left. A session
    /// the sender will not open (too many, say) leaves its parts to the others.
    async fn run_parts_own_session<F: FnMut(PullEvent)>(
        &self,
        shared: &Shared<'_, '_, F>,
    ) -> Result<()> {
        let options = shared.job.options;
        let password = match &options.password {
            Some(given) => Some(given.clone()),
            None => self
                .store
                .receiver_password(shared.job.connection, &self.vault)?,
        };
        let (mut client, _) = match self
            .open_session(shared.job.connection, password.as_ref(), options.transport)
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
        let schema = shared.job.schema;
        loop {
            let next = shared
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some((mut part, transfer)) = next else {
                return Ok(());
            };
            let checkpoint = part.checkpoint(&schema.name);
            let filter = KeyFilter::Range {
                from: None,
                to: part.upto.clone(),
            };
            let pass = Pass {
                columns: shared.columns,
                strategy: shared.strategy,
                key_filter: Some(&filter),
                cursor: None,
                keys_only: false,
                into: None,
                split: shared.token,
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
                    shared.job,
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
            let mut totals = shared.totals.lock().unwrap_or_else(|e| e.into_inner());
            totals.rows += summary.rows;
            totals.created += summary.created;
            totals.updated += summary.updated;
            totals.skipped += summary.skipped;
            totals.bytes_wire += summary.bytes_wire;
            totals.bytes_raw += summary.bytes_raw;
            totals.truncated |= summary.truncated;
        }
    }
}

/// What every stream of one parallel pull shares.
struct Shared<'a, 'e, F> {
    job: &'a TableJob<'a>,
    strategy: ConflictStrategy,
    columns: &'a [String],
    token: Option<&'a str>,
    queue: &'a Mutex<VecDeque<(Part, Uuid)>>,
    events: &'a Mutex<&'e mut F>,
    totals: &'a Mutex<TableSummary>,
}
