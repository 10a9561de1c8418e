//! One pass over a table's rows on the receiver: pull requests, row batches checked against
//! what was asked ([`ReceiverCore::check_batch`]), applied two at a time where that is safe and
//! committed in order, each acknowledged the moment it commits.

use std::time::{Duration, Instant};

use dbsync_protocol::message::{Credit, Pull, TableSchema};
use dbsync_protocol::session::{Code, Expected, ReceiverCore};
use dbsync_protocol::{Message, Value};
use futures_util::StreamExt;

use super::pull::{
    APPROVAL_POLL, CREDITS, Pass, Position, PullEvent, TableJob, TableSummary,
    adopt_remote_transfer,
};
use crate::agent::Agent;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::session::receiver::{Client, Reply};
use crate::sink::{Batch, BatchOf, Rows};

impl Agent {
    /// One pass over a table's rows: pull requests until the sender says there is no more,
    /// each batch checked, applied and acknowledged; `position` moves with every commit.
    pub(super) async fn pull_rows(
        &self,
        client: &mut Client,
        job: &TableJob<'_>,
        pass: &Pass<'_>,
        on_event: &mut impl FnMut(PullEvent),
        position: &mut Position,
        summary: &mut TableSummary,
    ) -> Result<()> {
        let TableJob {
            connection,
            schema,
            max_per_request,
            options,
            ..
        } = *job;
        let (columns, strategy, key_filter) = (pass.columns, pass.strategy, pass.key_filter);
        let Position {
            after,
            remote_transfer,
        } = position;
        let store = &self.store;
        let excluded: Vec<String> = schema
            .columns
            .iter()
            .map(|c| c.name.clone())
            .filter(|c| !columns.contains(c))
            .collect();
        let waiting_since = Instant::now();
        let mut request_id = 0u64;
        // Two batches go in at once where that is safe: a full pull (keys strictly increasing
        // from batch to batch) with a keyed strategy that is not mirror. Each waits for the one
        // before to commit before its own checkpoint (`Store::apply_batch_after`).
        let overlap = !pass.keys_only
            && pass.cursor.is_none()
            && matches!(
                strategy,
                ConflictStrategy::Overwrite | ConflictStrategy::Skip | ConflictStrategy::Merge
            );
        // A range of a parallel pull overlaps with the other ranges instead: one batch at a
        // time each keeps the memory of N streams near N batches, not 2N.
        let most_in_flight = if overlap && pass.checkpoint.is_none() {
            2
        } else {
            1
        };
        let mut in_flight = futures_util::stream::FuturesOrdered::<InFlight<'_>>::new();
        // What the next batch waits for: the last one pushed committed.
        let mut next_gate: Option<crate::sink::Gate> = None;
        let outcome = async {
            loop {
                request_id += 1;
                client
                    .send(&Message::Pull(Pull {
                        request_id,
                        table: schema.name.clone(),
                        after_key: after.clone(),
                        limit: max_per_request,
                        exclude_columns: excluded.clone(),
                        credits: options.credits.unwrap_or(CREDITS),
                        transfer_id: remote_transfer.clone(),
                        key_filter: key_filter.cloned(),
                        cursor_column: pass.cursor.clone(),
                        keys_only: pass.keys_only,
                        split: pass.split.map(str::to_owned),
                    }))
                    .await?;
                loop {
                    // A batch is acknowledged the moment it commits (the sender waits for every
                    // acknowledgement before it ends a pull), while the next one is received.
                    let received = loop {
                        tokio::select! {
                            biased;
                            Some(finished) = in_flight.next(), if !in_flight.is_empty() => {
                                let (done, applied) = finished?;
                                client
                                    .send(&Message::Credit(Credit {
                                        request_id,
                                        batches: 1,
                                    }))
                                    .await?;
                                self.metrics.batch_received(
                                    client.transport.as_str(),
                                    u64::try_from(done.rows).unwrap_or(0),
                                    done.wire as u64,
                                );
                                done.record(applied, after, summary, schema, on_event);
                            }
                            received = client.recv_rows(), if in_flight.len() < most_in_flight => {
                                break received;
                            }
                        }
                    };
                    let (message, wire) = match received {
                        Ok(received) => received,
                        // Over the sender's request rate: wait as told, then ask again.
                        Err(Error::Remote {
                            code: Code::RateLimited,
                            retry_after_ms,
                            ..
                        }) => {
                            let wait = Duration::from_millis(
                                retry_after_ms.unwrap_or(1_000).clamp(100, 60_000),
                            );
                            tokio::time::sleep(wait).await;
                            request_id -= 1;
                            break;
                        }
                        Err(err) => return Err(err),
                    };
                    if let Reply::Batch(batch) = &message {
                        let expected = Expected {
                            request_id,
                            columns: if pass.keys_only {
                                schema.primary_key.clone()
                            } else {
                                columns.to_vec()
                            },
                            // A table without a key goes on from a row count.
                            key_len: schema.primary_key.len().max(1)
                                + usize::from(pass.cursor.is_some()),
                        };
                        ReceiverCore::check_batch(
                            &expected,
                            batch.request_id,
                            &batch.columns,
                            batch.last_key.len(),
                        )
                        .map_err(|violation| client.protocol_error(violation))?;
                    }
                    match message {
                        Reply::Batch(batch) if pass.keys_only => {
                            let keys =
                                batch.rows.to_rows().map_err(|e| client.protocol_error(e))?;
                            store
                                .stage_mirror_keys(connection.id, schema, &batch.columns, &keys)
                                .await?;
                            *after = (!batch.last_key.is_empty()).then_some(batch.last_key);
                            summary.rows += batch.rows.len() as i64;
                            client
                                .send(&Message::Credit(Credit {
                                    request_id,
                                    batches: 1,
                                }))
                                .await?;
                        }
                        Reply::Batch(batch) => {
                            adopt_remote_transfer(
                                store,
                                summary.transfer_id,
                                remote_transfer,
                                &batch.transfer_id,
                                serde_json::json!({}),
                            )
                            .await?;
                            let connection_id = connection.id;
                            let transfer_id = summary.transfer_id;
                            let previous = next_gate.take();
                            let (committed, next) = tokio::sync::oneshot::channel();
                            next_gate = Some(next);
                            // Polled beside the session's own work (not a task of its own):
                            // a pull that is dropped drops its batches with it, and their
                            // transactions roll back.
                            in_flight.push_back(Box::pin(async move {
                                let done = Committed {
                                    rows: batch.rows.len() as i64,
                                    wire,
                                    last_key: (!batch.last_key.is_empty())
                                        .then_some(batch.last_key),
                                };
                                let batch_of = Some(BatchOf {
                                    transfer_id,
                                    bytes_wire: wire as i64,
                                });
                                let applied = store
                                    .apply_batch_after(
                                        previous,
                                        Batch {
                                            into: pass.into,
                                            connection_id,
                                            batch_of,
                                            schema,
                                            columns: &batch.columns,
                                            rows: Rows::Encoded(&batch.rows),
                                            strategy,
                                            last_key: done.last_key.as_deref(),
                                            checkpoint: pass.checkpoint,
                                            // An incremental pass moves rows whose cursor
                                            // moved since the last pull.
                                            changed: pass.cursor.is_some(),
                                        },
                                    )
                                    .await;
                                let _ = committed.send(applied.is_ok());
                                applied.map(|applied| (done, applied))
                            }));
                        }
                        Reply::Message(Message::PullDone(done)) => {
                            if pass.keys_only {
                                *remote_transfer = Some(done.transfer_id.clone());
                            } else {
                                adopt_remote_transfer(
                                    store,
                                    summary.transfer_id,
                                    remote_transfer,
                                    &done.transfer_id,
                                    serde_json::json!({}),
                                )
                                .await?;
                            }
                            summary.truncated |= done.truncated;
                            if let Some(key) = done.last_key {
                                *after = Some(key);
                            }
                            if !done.more {
                                return Ok(());
                            }
                            break;
                        }
                        Reply::Message(Message::ApprovalPending(pending)) => {
                            adopt_remote_transfer(
                                store,
                                summary.transfer_id,
                                remote_transfer,
                                &pending.transfer_id,
                                serde_json::json!({ "waited_for_approval": true }),
                            )
                            .await?;
                            on_event(PullEvent::WaitingForApproval {
                                table: schema.name.clone(),
                                transfer_id: pending.transfer_id.clone(),
                            });
                            if options
                                .approval_wait
                                .is_some_and(|limit| waiting_since.elapsed() >= limit)
                            {
                                return Err(Error::Remote {
                                    site: connection.site_url.clone(),
                                    code: Code::ApprovalPending,
                                    message: format!(
                                        "transfer {} still waits for the sender's approval",
                                        pending.transfer_id
                                    ),
                                    retry_after_ms: None,
                                });
                            }
                            tokio::time::sleep(
                                APPROVAL_POLL.min(options.approval_wait.unwrap_or(APPROVAL_POLL)),
                            )
                            .await;
                            // Ask again under the same transfer: the sender answers ApprovalPending until
                            // an admin decides.
                            break;
                        }
                        Reply::Message(Message::Pong(_)) => {}
                        Reply::Message(other) => {
                            return Err(
                                client.protocol_error(format!("unexpected {:?}", other.kind()))
                            );
                        }
                    }
                }
            }
        }
        .await;
        // However the pull ended, the batches still going in finish first, in order, so the
        // resume key is exact (a batch that commits after the pull gave up is not asked for
        // again).
        while let Some(finished) = in_flight.next().await {
            if let Ok((done, applied)) = finished {
                self.metrics.batch_received(
                    client.transport.as_str(),
                    u64::try_from(done.rows).unwrap_or(0),
                    done.wire as u64,
                );
                done.record(applied, after, summary, schema, on_event);
            }
        }
        outcome
    }
}

/// A batch going in: what it counts once committed, and what it applied.
type InFlight<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<(Committed, crate::sink::Applied)>> + Send + 'a>>;

/// What a committed batch counts for.
struct Committed {
    rows: i64,
    wire: usize,
    last_key: Option<Vec<Value>>,
}

impl Committed {
    /// Counts a committed batch: the resume key, the summary, the progress event.
    fn record(
        self,
        applied: crate::sink::Applied,
        after: &mut Option<Vec<Value>>,
        summary: &mut TableSummary,
        schema: &TableSchema,
        on_event: &mut impl FnMut(PullEvent),
    ) {
        *after = self.last_key;
        summary.rows += self.rows;
        summary.created += applied.created;
        summary.updated += applied.updated;
        summary.skipped += applied.skipped;
        summary.bytes_wire += self.wire as i64;
        on_event(PullEvent::Batch {
            table: schema.name.clone(),
            rows: self.rows,
            bytes_wire: self.wire as i64,
        });
    }
}
