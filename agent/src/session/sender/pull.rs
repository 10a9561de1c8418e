//! Serving one pull request: the transfer it runs under (new, resumed or waiting for
//! approval), what it covers, and its batches sent under the credit window.

use dbsync_protocol::Message;
use dbsync_protocol::message::{
    ApprovalPending, KeyFilter, MAX_FILTER_KEYS, Pull, PullDone, RowBatch, TableSchema,
};
use dbsync_protocol::session::{Code, SenderEvent};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::pages::{PAGES_AHEAD, ProduceJob, Produced, produce};
use super::{Session, SessionEnd, SessionResult};
use crate::access::AccessDenied;
use crate::audit::Actor;
use crate::connection::Connection;
use crate::transfer::{NewTransfer, Progress, TransferDirection, TransferStatus};

impl Session<'_> {
    /// Serves one pull request.
    ///
    /// Accounting: a row counts (against the connection's record limit and in the transfer) when
    /// it leaves this site, however the receiver behaves afterwards. The transfer keeps the
    /// furthest key it sent (`resume_key`) and the key it started after (`start_key` in its
    /// metadata); a resume re-sends what lies between the receiver's key and the furthest key
    /// sent without counting it again, never reads at or below the start key, and must ask for
    /// what the transfer started with (columns, key filter, cursor, keys-only): a resume cannot
    /// widen what its transfer covers. Its batches carry columns of differences on a session
    /// of `version` 7 or later.
    pub(super) async fn pull(
        &mut self,
        connection: &Connection,
        pull: Pull,
        version: u16,
    ) -> SessionResult<()> {
        let store = &self.agent.store;
        let Some(schema) = self.offered_schema(connection, &pull.table).await? else {
            return Ok(());
        };
        let columns: Vec<String> = if pull.keys_only {
            schema.primary_key.clone()
        } else {
            schema
                .columns
                .iter()
                .map(|c| c.name.clone())
                .filter(|c| !pull.exclude_columns.contains(c))
                .collect()
        };
        // Incremental pulls page by (cursor, key): the same keyset machinery over a longer key.
        let schema = match &pull.cursor_column {
            Some(cursor) if !pull.keys_only => {
                if !columns.contains(cursor) || schema.primary_key.contains(cursor) {
                    return self
                        .refuse(
                            Code::InvalidRequest,
                            format!("{cursor:?} cannot be the cursor of {:?}", pull.table),
                            None,
                        )
                        .await;
                }
                let mut paging = schema.clone();
                paging.primary_key.insert(0, cursor.clone());
                paging
            }
            _ => schema,
        };
        if let Err(reason) = check_pull_shape(&pull, &schema, &columns) {
            return self.refuse(Code::InvalidRequest, reason, None).await;
        }
        // A whole-table pull goes on only from the snapshot this session holds for it, at the
        // count it reached: anything else is refused before a transfer is touched.
        if schema.primary_key.is_empty()
            && let Some([dbsync_protocol::Value::Int(position)]) = pull.after_key.as_deref()
        {
            let held = self.snapshot.as_ref().is_some_and(|(id, snapshot)| {
                pull.transfer_id.as_deref() == Some(id.to_string().as_str())
                    && snapshot.position() == *position
            });
            if !held {
                return self
                    .refuse(
                        Code::SnapshotGone,
                        format!(
                            "{:?} has no primary key and is read whole from one snapshot, which \
                             this session does not hold at row {position}: pull it again from \
                             the start",
                            pull.table
                        ),
                        None,
                    )
                    .await;
            }
        }
        let scope = PullScope::of(&pull, &columns);
        let now = self.agent.now();
        // A part of a cut that names no transfer: a new part, or one that started before for a
        // receiver that never heard of it (killed before its first batch came), resumed here.
        let mut granted = match pull.transfer_id {
            None => self.agent.splits.part(connection.id, &pull, true),
            Some(_) => None,
        };
        // Resume a transfer of this connection, or start a new one (a new download).
        let named = pull
            .transfer_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
            .or_else(|| granted.as_ref().and_then(|part| part.started_as));
        let resumed = match named {
            Some(id) => match store.get_transfer(id).await {
                Ok(t)
                    if t.connection_id == Some(connection.id)
                        && t.direction == TransferDirection::Send
                        && t.table_name == pull.table =>
                {
                    Some(t)
                }
                _ => None,
            },
            None => None,
        };
        if let Some(t) = &resumed
            && matches!(
                t.status,
                TransferStatus::InProgress
                    | TransferStatus::PendingApproval
                    | TransferStatus::Approved
            )
            && !scope.matches(t)
        {
            return self
                .refuse(
                    Code::InvalidRequest,
                    format!(
                        "transfer {} covers other rows or columns than this request asks for; \
                         a resume asks for what its transfer started with",
                        t.id
                    ),
                    None,
                )
                .await;
        }
        // The transfer sent every row it had to, and the receiver, killed before it heard the
        // end, asks again from the last of them: nothing is left, so nothing new starts and
        // nothing is counted. (A transfer the record limit may have cut goes on as before.)
        if let Some(t) = &resumed
            && t.status == TransferStatus::Completed
            && !pull.keys_only
            && pull.cursor_column.is_none()
            && pull.after_key.is_some()
            && scope.matches(t)
            && connection
                .max_records_total
                .is_none_or(|max| connection.total_records < max)
            && t.resume_key.as_ref().and_then(stored_key) == pull.after_key
        {
            return self
                .send(&Message::PullDone(PullDone {
                    request_id: pull.request_id,
                    rows: 0,
                    more: false,
                    truncated: false,
                    last_key: pull.after_key.clone(),
                    transfer_id: t.id.to_string(),
                }))
                .await
                .map(drop);
        }
        let transfer = match resumed {
            Some(t) if t.status == TransferStatus::InProgress => t,
            Some(t) if t.status == TransferStatus::PendingApproval => {
                return self.approval_pending(&pull, t.id).await;
            }
            Some(t) if t.status == TransferStatus::Denied => {
                let reason = t.denial_reason.clone().unwrap_or_default();
                return self.refuse(Code::ApprovalDenied, reason, None).await;
            }
            Some(t) if t.status == TransferStatus::Approved => {
                if !t.metadata.get("keys_only").is_some_and(|k| k == true)
                    && !store.take_download(connection.id).await?
                {
                    return self.denied(AccessDenied::DownloadLimitExceeded).await;
                }
                store.start_transfer(t.id, now).await?
            }
            _ => {
                // One of the ranges of a cut (whose download was counted by the cut), once.
                let part = match pull.transfer_id {
                    None => granted.take(),
                    Some(_) => self.agent.splits.part(connection.id, &pull, true),
                }
                .and_then(|part| part.new_part);
                // Keys are data: a keys-only pass waits for approval and counts its keys against
                // the record limit, like any pull.
                let requires_approval = connection.table_requires_approval(&pull.table);
                let created = match store
                    .create_transfer(
                        NewTransfer {
                            connection_id: connection.id,
                            direction: TransferDirection::Send,
                            table_name: pull.table.clone(),
                            requires_approval,
                            records_requested: pull.limit as i64,
                            conflict_strategy: connection.default_conflict_strategy,
                            transport: Some(self.transport),
                            requester_ip: Some(self.client_ip.to_string()),
                            requester_user_agent: self.user_agent.clone(),
                        },
                        self.agent.config.approval_ttl(),
                        &Actor::remote(&connection.site_url),
                        now,
                    )
                    .await
                {
                    Ok(created) => created,
                    Err(err) => {
                        if let Some((index, _)) = part {
                            self.agent.splits.part_started(&pull, index, None);
                        }
                        return Err(err.into());
                    }
                };
                if let Some((index, _)) = part {
                    self.agent
                        .splits
                        .part_started(&pull, index, Some(created.id));
                }
                let mut facts = serde_json::json!({ "scope": scope.0 });
                if pull.keys_only {
                    facts["keys_only"] = true.into();
                } else if let Some(cursor) = &pull.cursor_column {
                    facts["incremental"] = serde_json::json!({ "cursor": cursor });
                }
                if let Some((index, parts)) = part {
                    facts["part"] = format!("{}/{parts}", index + 1).into();
                }
                if let Some(start) = &pull.after_key {
                    facts["start_key"] = serde_json::to_value(start).unwrap_or_default();
                }
                // What the pages show progress against: the whole table, when all of it goes.
                if !pull.keys_only
                    && pull.cursor_column.is_none()
                    && pull.key_filter.is_none()
                    && pull.after_key.is_none()
                    && let Some(rows) = store.row_estimate(&pull.table).await?
                {
                    facts["estimated_rows"] = rows.into();
                }
                store.merge_transfer_metadata(created.id, facts).await?;
                if requires_approval {
                    return self.approval_pending(&pull, created.id).await;
                }
                // A keys-only pass reconciles the row pass before it, which was the download;
                // a part's was the cut.
                if !pull.keys_only && part.is_none() && !store.take_download(connection.id).await? {
                    let _ = store
                        .fail_transfer(created.id, "download limit reached", now)
                        .await;
                    return self.denied(AccessDenied::DownloadLimitExceeded).await;
                }
                store.start_transfer(created.id, now).await?
            }
        };
        // Every table of the pull (its keys-only pass too) is read from one snapshot of the
        // database, exported at the session's first pull: a child's rows never reference a
        // parent row that came from a later moment than they did. A part of a cut reads from
        // the cut's, whichever session serves it.
        let shared = self
            .agent
            .splits
            .part(connection.id, &pull, false)
            .and_then(|part| part.snapshot);
        if shared.is_none() && self.exported.is_none() {
            match store.export_snapshot().await {
                Ok(exported) => self.exported = exported.map(std::sync::Arc::new),
                // Each page is then read as the database is when it is read.
                Err(err) => {
                    tracing::warn!(error = %err, "exporting a snapshot for the pull failed")
                }
            }
        }
        let exported = shared
            .as_ref()
            .or(self.exported.as_ref())
            .map(|exported| exported.handle());
        // A table without a primary key is read whole from one snapshot, held by this session
        // from one request of the pull to the next.
        let keyless = schema.primary_key.is_empty();
        let snapshot = if keyless {
            let held = self.snapshot.take();
            match pull.after_key.as_deref() {
                None => match store
                    .open_snapshot(&schema, &columns, exported.as_ref())
                    .await
                {
                    Ok(snapshot) => Some(snapshot),
                    Err(err) => {
                        let reason = err.to_string();
                        let _ = store.fail_transfer(transfer.id, &reason, now).await;
                        let code = match err {
                            crate::Error::Invalid { .. } => Code::InvalidRequest,
                            _ => {
                                tracing::error!(error = %reason, table = %pull.table, "opening a snapshot failed");
                                Code::InternalError
                            }
                        };
                        return self.refuse(code, reason, None).await;
                    }
                },
                // Checked above: the session holds it for this transfer at this count.
                Some(_) => held.map(|(_, snapshot)| snapshot),
            }
        } else {
            None
        };
        // A snapshot sends each row once, counted as it leaves: no floor, nothing re-sent.
        let start_key = transfer
            .metadata
            .get("start_key")
            .filter(|_| !keyless)
            .and_then(stored_key);
        let sent_up_to = transfer
            .resume_key
            .as_ref()
            .filter(|_| !keyless)
            .and_then(stored_key);
        let limit = (pull.limit as i64).clamp(1, connection.max_records_per_request);
        self.core.start_pull(&pull);
        let limited = connection.max_records_total.is_some();
        // Pages are read by their own task, one ahead besides the one being read, while this one
        // encodes and the link's writer sends: reading, encoding and sending overlap.
        let (pages_tx, mut pages) = mpsc::channel::<Produced>(PAGES_AHEAD);
        let producer = tokio::spawn(produce(
            self.agent.store.clone(),
            std::sync::Arc::clone(&self.agent.readers),
            ProduceJob {
                connection_id: connection.id,
                limited,
                schema: schema.clone(),
                columns: columns.clone(),
                after: pull.after_key.clone(),
                start_key,
                sent_up_to,
                filter: pull.key_filter.clone(),
                limit,
                batch_rows: self.agent.config.server.batch_rows,
                snapshot,
                exported,
                compact: version >= dbsync_protocol::COMPACT_VERSION,
            },
            pages_tx,
        ));
        let mut after = pull.after_key.clone();
        let mut sent: i64 = 0;
        let mut seq = 0;
        let mut truncated = false;
        let mut exhausted = false;
        let outcome: SessionResult<bool> = async {
            loop {
                // A credit first, then the next page: while the receiver holds every batch it
                // allowed, the pages read ahead wait in the channel (where an ended pull gives
                // their records back), and the reader waits with them.
                while !self.core.may_send() {
                    if !self.next_credit(connection, transfer.id).await? {
                        return Ok(false);
                    }
                }
                // The reader ends every pull with `End` or `Failed`; a closed channel means it
                // died (a panic), which must fail the transfer, not end it as if complete.
                let produced = pages.recv().await.unwrap_or_else(|| {
                    Produced::Failed(crate::Error::Config(
                        "the sender's page reader stopped unexpectedly".into(),
                    ))
                });
                let (mut page, reserved, fresh) = match produced {
                    Produced::Page {
                        page,
                        reserved,
                        fresh,
                    } => (page, reserved, fresh),
                    Produced::End {
                        exhausted: e,
                        truncated: t,
                    } => {
                        exhausted = e;
                        truncated = t;
                        break;
                    }
                    Produced::Failed(err) => {
                        let reason = err.to_string();
                        let _ = store
                            .fail_transfer(transfer.id, &reason, self.agent.now())
                            .await;
                        // What the receiver asked for that cannot be read is its error;
                        // anything else is this site's.
                        let code = match err {
                            crate::Error::Invalid { .. } => Code::InvalidRequest,
                            _ => {
                                tracing::error!(error = %reason, table = %pull.table, "reading a page failed");
                                Code::InternalError
                            }
                        };
                        self.refuse(code, reason, None).await?;
                        return Ok(false);
                    }
                };
                let got = page.rows as i64;
                let last_key = page.last_key.clone();
                let batch = RowBatch {
                    request_id: pull.request_id,
                    seq,
                    columns: columns.clone(),
                    last_key: last_key.clone().unwrap_or_default(),
                    rows: Vec::new(),
                    transfer_id: transfer.id.to_string(),
                };
                let sent_batch = self
                    .link
                    .send_row_batch_in_place(&batch, &mut page.columns, page.room)
                    .await;
                let (wire, raw) = match sent_batch {
                    Ok(sizes) => {
                        self.agent.metrics.batch_sent(
                            self.transport.as_str(),
                            page.rows as u64,
                            sizes.0 as u64,
                            sizes.1 as u64,
                        );
                        sizes
                    }
                    Err(err) => {
                        // Never handed to the link: these rows did not leave.
                        if reserved > 0 {
                            let _ = store.release_records(connection.id, reserved).await;
                        }
                        return Err(SessionEnd::Link(err));
                    }
                };
                // The rows left: they count now, whatever the receiver does with them. Rows
                // re-sent from before the furthest key sent were counted when they first left.
                store
                    .record_progress(
                        transfer.id,
                        &Progress {
                            records_transferred: if fresh { got } else { 0 },
                            bytes_wire: wire as i64,
                            bytes_raw: raw as i64,
                            resume_key: if fresh {
                                last_key.as_ref().and_then(|k| serde_json::to_value(k).ok())
                            } else {
                                None
                            },
                            ..Progress::default()
                        },
                    )
                    .await?;
                // Without a record limit nothing reserved these rows: count them now.
                if !limited && fresh {
                    store.count_records(connection.id, got).await?;
                }
                self.core.sent();
                seq += 1;
                sent += got;
                after = last_key;
            }
            Ok(true)
        }
        .await;
        // Whatever the producer read ahead and this task never sent is given back.
        pages.close();
        let mut unsent = 0;
        while let Some(produced) = pages.recv().await {
            if let Produced::Page { reserved, .. } = produced {
                unsent += reserved;
            }
        }
        let snapshot = producer.await.ok().flatten();
        if unsent > 0 {
            let _ = store.release_records(connection.id, unsent).await;
        }
        if !outcome? {
            return Ok(());
        }
        // The pull ends once the receiver has applied every batch (its credits come back), so
        // a receiver that dies now leaves the transfer in progress, to be resumed.
        while self.core.in_flight() > 0 {
            if !self.next_credit(connection, transfer.id).await? {
                return Ok(());
            }
        }
        let more = !exhausted && !truncated;
        if more && let Some(snapshot) = snapshot {
            self.snapshot = Some((transfer.id, snapshot));
        }
        if !more {
            store
                .complete_transfer(transfer.id, self.agent.now())
                .await?;
            if truncated {
                let _ = store
                    .merge_connection_metadata(
                        connection.id,
                        serde_json::json!({ "record_limit_reached_at": self.agent.now() }),
                    )
                    .await;
            }
        }
        self.send(&Message::PullDone(PullDone {
            request_id: pull.request_id,
            rows: sent as u64,
            more,
            truncated,
            last_key: after,
            transfer_id: transfer.id.to_string(),
        }))
        .await
        .map(|_| ())
    }

    /// Waits for the receiver's next credit for the current pull (the core counts what it
    /// acknowledges, at most the batches in flight), answering pings on the way. `false` when
    /// the receiver cancelled the pull.
    async fn next_credit(
        &mut self,
        connection: &Connection,
        transfer_id: Uuid,
    ) -> SessionResult<bool> {
        loop {
            match self.next().await? {
                (SenderEvent::Acknowledged(_), _) => return Ok(true),
                (SenderEvent::Cancelled, _) => {
                    let _ = self
                        .agent
                        .store
                        .cancel_transfer(
                            transfer_id,
                            &Actor::remote(&connection.site_url),
                            self.agent.now(),
                        )
                        .await;
                    return Ok(false);
                }
                (SenderEvent::Ping, Message::Ping(ping)) => {
                    if let Err(denied) = self.agent.validator.check_rate(connection).await {
                        self.denied(denied).await?;
                        return Err(SessionEnd::Ended(Code::RateLimited));
                    }
                    self.send(&Message::Pong(ping)).await?;
                }
                _ => {}
            }
        }
    }

    async fn approval_pending(&mut self, pull: &Pull, transfer_id: Uuid) -> SessionResult<()> {
        self.send(&Message::ApprovalPending(ApprovalPending {
            request_id: pull.request_id,
            transfer_id: transfer_id.to_string(),
        }))
        .await
        .map(|_| ())
    }
}

/// Checks a pull's keys against the table before anything is read: the resume key and every
/// filter key have one value per key column, and a key list is within [`MAX_FILTER_KEYS`].
fn check_pull_shape(pull: &Pull, schema: &TableSchema, columns: &[String]) -> Result<(), String> {
    let key_len = schema.primary_key.len();
    if key_len == 0 {
        // Read whole from one snapshot: no key to filter by or to be the cursor's tie-break;
        // the resume key is the number of rows the snapshot has sent.
        if pull.keys_only || pull.cursor_column.is_some() || pull.key_filter.is_some() {
            return Err(format!(
                "{:?} has no primary key: it is pulled whole (no key filter, cursor or \
                 keys-only pass)",
                schema.name
            ));
        }
        return match pull.after_key.as_deref() {
            None | Some([dbsync_protocol::Value::Int(0..)]) => Ok(()),
            Some(_) => Err(format!(
                "{:?} has no primary key: a pull goes on from a row count, not a key",
                schema.name
            )),
        };
    }
    for key in &schema.primary_key {
        if !columns.contains(key) {
            return Err(format!("the key column {key:?} cannot be left out"));
        }
    }
    let shape = |what: &str, key: &[dbsync_protocol::Value], len: usize| {
        if key.len() == len {
            Ok(())
        } else {
            Err(format!(
                "{what} has {} value(s); {:?} pages by {len}",
                key.len(),
                schema.name
            ))
        }
    };
    if let Some(after) = &pull.after_key {
        shape("the resume key", after, key_len)?;
    }
    let filter_len = key_len - usize::from(pull.cursor_column.is_some() && !pull.keys_only);
    match &pull.key_filter {
        None => {}
        Some(KeyFilter::Range { from, to }) => {
            for key in from.iter().chain(to.iter()) {
                shape("a key filter bound", key, filter_len)?;
            }
        }
        Some(KeyFilter::Keys(keys)) => {
            if keys.len() > MAX_FILTER_KEYS {
                return Err(format!(
                    "a key filter lists {} keys; at most {MAX_FILTER_KEYS} may be listed (use a range)",
                    keys.len()
                ));
            }
            for key in keys {
                shape("a listed key", key, filter_len)?;
            }
        }
    }
    Ok(())
}

/// What a transfer covers: its columns, key filter, cursor and kind. Recorded when the transfer
/// is created; every later request under it must ask for the same.
struct PullScope(serde_json::Value);

impl PullScope {
    fn of(pull: &Pull, columns: &[String]) -> Self {
        Self(serde_json::json!({
            "columns": columns,
            "key_filter": pull.key_filter,
            "cursor": pull.cursor_column,
            "keys_only": pull.keys_only,
        }))
    }

    /// Whether `transfer` was created for this scope (a transfer recorded before scopes were
    /// kept is taken as it is).
    fn matches(&self, transfer: &crate::transfer::Transfer) -> bool {
        transfer
            .metadata
            .get("scope")
            .is_none_or(|scope| *scope == self.0)
    }
}

/// A key stored in a transfer's record (`resume_key`, `metadata.start_key`).
fn stored_key(stored: &serde_json::Value) -> Option<Vec<dbsync_protocol::Value>> {
    serde_json::from_value(stored.clone()).ok()
}
