//! The sender side of a data-plane session over WebSocket (`GET /db-sync/ws`): `Hello` is
//! checked by `validate_connection`, then list, describe and pull requests are served under the
//! connection's controls (offered tables, approval mode, download and record limits, rows per
//! request, rate limit). Rows go out in key order, a batch at a time, never more batches in
//! flight than the receiver granted.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use dbsync_agent::Store;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::Connection;
use dbsync_agent::link::{FrameReader, FrameWriter, Incoming, Link};
use dbsync_agent::source::EncodedPage;
use dbsync_agent::transfer::{NewTransfer, Progress, TransferDirection, TransferStatus, Transport};
use dbsync_agent::{AccessDenied, Agent};
use dbsync_protocol::Message;
use dbsync_protocol::codec::{HEADER_LEN, Limits};
use dbsync_protocol::error::codes;
use dbsync_protocol::message::TableSchema;
use dbsync_protocol::message::{ApprovalPending, ErrorMessage, Pull, PullDone, RowBatch, Welcome};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::AppState;
use crate::client_ip::ClientIp;

/// Time a receiver has to send `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the session waits for the next request or a credit.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// `GET /db-sync/ws`.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    client: ClientIp,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let limits = Limits::default();
    let user_agent = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(200).collect::<String>());
    ws.max_message_size(limits.max_frame_bytes as usize + HEADER_LEN)
        .max_frame_size(limits.max_frame_bytes as usize + HEADER_LEN)
        .on_upgrade(move |socket| async move {
            let (writer, reader) = socket.split();
            let link = Link::spawn(WsReader(reader), WsWriter(writer), limits);
            serve(&state, link, limits, client.0, user_agent, Transport::Ws).await;
        })
}

/// Runs one session over `link` until it ends or the server shuts down (either transport).
pub(crate) async fn serve(
    state: &AppState,
    mut link: Link,
    limits: Limits,
    client_ip: IpAddr,
    user_agent: Option<String>,
    transport: Transport,
) {
    link.set_zstd_level(state.agent.config.server.zstd_level);
    let mut session = Session {
        agent: &state.agent,
        link,
        limits,
        client_ip,
        user_agent,
        transport,
    };
    tokio::select! {
        outcome = session.run() => {
            if let Err(reason) = outcome {
                tracing::debug!(reason = %reason, %transport, "session ended");
            }
        }
        () = state.sessions_stopped() => tracing::debug!(%transport, "session ended by shutdown"),
    }
    session.link.close().await;
}

/// The reading half of a receiver's WebSocket.
struct WsReader(SplitStream<WebSocket>);

impl FrameReader for WsReader {
    async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, String> {
        loop {
            match self.0.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => return Ok(Some(bytes.into())),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Text(_))) => {
                    return Err("text frames are not part of the protocol".into());
                }
                Some(Ok(WsMessage::Close(_))) | None => return Ok(None),
                Some(Err(err)) => return Err(err.to_string()),
            }
        }
    }
}

/// The writing half of a receiver's WebSocket.
struct WsWriter(SplitSink<WebSocket, WsMessage>);

impl FrameWriter for WsWriter {
    async fn write_frame(&mut self, frame: Vec<u8>) -> Result<(), String> {
        self.0
            .send(WsMessage::Binary(frame.into()))
            .await
            .map_err(|e| e.to_string())
    }

    async fn finish(&mut self) {
        let _ = self.0.close().await;
    }
}

pub(crate) struct Session<'a> {
    pub(crate) agent: &'a Agent,
    pub(crate) link: Link,
    pub(crate) limits: Limits,
    pub(crate) client_ip: IpAddr,
    pub(crate) user_agent: Option<String>,
    pub(crate) transport: Transport,
}

type SessionResult<T> = Result<T, String>;

impl Session<'_> {
    /// Sends a message; returns (bytes on the wire, payload bytes before compression).
    async fn send_sized(&mut self, message: &Message) -> SessionResult<(usize, usize)> {
        self.link.send(message).await
    }

    async fn send(&mut self, message: &Message) -> SessionResult<usize> {
        self.send_sized(message).await.map(|(wire, _)| wire)
    }

    async fn refuse(
        &mut self,
        code: &str,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> SessionResult<()> {
        let error = Message::Error(ErrorMessage {
            code: code.to_owned(),
            message: message.into(),
            retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
            transfer_id: None,
        });
        self.send(&error).await.map(|_| ())
    }

    async fn recv(&mut self, timeout: Duration) -> SessionResult<Message> {
        loop {
            let next = tokio::time::timeout(timeout, self.link.recv())
                .await
                .map_err(|_| "timed out waiting for the receiver".to_owned())?;
            return match next {
                Some(Incoming::Message(message, _)) => Ok(message),
                // Rows only ever flow to the receiver: refused like any unexpected message, and
                // the session goes on.
                Some(Incoming::Batch(..)) => {
                    self.refuse(
                        codes::PROTOCOL_ERROR,
                        format!("unexpected {:?}", dbsync_protocol::Kind::RowBatch),
                        None,
                    )
                    .await?;
                    continue;
                }
                Some(Incoming::Malformed(reason)) => {
                    let _ = self
                        .refuse(codes::PROTOCOL_ERROR, reason.clone(), None)
                        .await;
                    Err(reason)
                }
                Some(Incoming::Failed(reason)) => {
                    if reason.contains("text frames") {
                        let _ = self
                            .refuse(codes::PROTOCOL_ERROR, reason.clone(), None)
                            .await;
                    }
                    Err(reason)
                }
                None => Err("closed by the receiver".into()),
            };
        }
    }

    async fn denied(&mut self, denied: AccessDenied) -> SessionResult<()> {
        let retry = match &denied {
            AccessDenied::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        };
        let message = match &denied {
            AccessDenied::Internal(err) => {
                tracing::error!(error = %err, "session check failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        self.refuse(denied.code(), message, retry).await
    }

    pub(crate) async fn run(&mut self) -> SessionResult<()> {
        let Message::Hello(hello) = self.recv(HELLO_TIMEOUT).await? else {
            self.refuse(codes::PROTOCOL_ERROR, "the first frame must be Hello", None)
                .await?;
            return Err("no hello".into());
        };
        let Some(version) = dbsync_protocol::negotiate(&hello.versions) else {
            self.refuse(
                codes::UNSUPPORTED_VERSION,
                format!(
                    "this sender speaks {:?}",
                    dbsync_protocol::SUPPORTED_VERSIONS
                ),
                None,
            )
            .await?;
            return Err("unsupported version".into());
        };
        let now = self.agent.now();
        let connection = match self
            .agent
            .validator
            .validate_connection(&hello.token, self.client_ip, now, hello.password.as_deref())
            .await
        {
            Ok(connection) => connection,
            Err(denied) => {
                let code = denied.code();
                self.denied(denied).await?;
                return Err(format!("refused: {code}"));
            }
        };
        if self.user_agent.is_none() {
            self.user_agent = Some(hello.client_name.chars().take(200).collect());
        }
        tracing::info!(connection_id = %connection.id, client = %self.client_ip, "session opened");
        self.send(&Message::Welcome(Welcome {
            version,
            session_id: Uuid::new_v4().to_string(),
            max_records_per_request: connection.max_records_per_request as u64,
            max_frame_bytes: u64::from(self.limits.max_frame_bytes),
        }))
        .await?;
        loop {
            let request = self.recv(IDLE_TIMEOUT).await?;
            // Every request re-reads the connection: a suspension or a changed limit applies at once.
            let connection = match self.agent.store.find_connection(connection.id).await {
                Ok(Some(c)) if c.status == dbsync_agent::ConnectionStatus::Active => c,
                Ok(Some(c)) => {
                    return self
                        .denied(AccessDenied::ConnectionNotActive(c.status))
                        .await;
                }
                Ok(None) => {
                    return self
                        .refuse(
                            codes::INVALID_TOKEN,
                            "the connection no longer exists",
                            None,
                        )
                        .await;
                }
                Err(err) => return self.denied(AccessDenied::Internal(err)).await,
            };
            if matches!(request, Message::Ping(_)) {
                if let Message::Ping(ping) = request {
                    self.send(&Message::Pong(ping)).await?;
                }
                continue;
            }
            if let Err(denied) = self.agent.validator.check_rate(&connection) {
                self.denied(denied).await?;
                continue;
            }
            match request {
                Message::ListTables => {
                    let tables = self
                        .agent
                        .store
                        .list_tables()
                        .await
                        .map_err(|e| e.to_string())?;
                    let offered = tables
                        .into_iter()
                        .filter(|t| connection.offers_table(&t.name))
                        .collect();
                    self.send(&Message::TableList(offered)).await?;
                }
                Message::DescribeTable(table) => {
                    if !connection.offers_table(&table) {
                        self.refuse(
                            codes::TABLE_NOT_ALLOWED,
                            format!("{table:?} is not offered"),
                            None,
                        )
                        .await?;
                        continue;
                    }
                    match self.agent.store.describe_table(&table).await {
                        Ok(schema) => self.send(&Message::TableSchema(schema)).await.map(|_| ())?,
                        Err(_) => {
                            self.refuse(
                                codes::TABLE_NOT_ALLOWED,
                                format!("{table:?} is not offered"),
                                None,
                            )
                            .await?
                        }
                    }
                }
                Message::Pull(pull) => self.pull(&connection, pull).await?,
                Message::Cancel(_) | Message::Credit(_) => {}
                other => {
                    self.refuse(
                        codes::PROTOCOL_ERROR,
                        format!("unexpected {:?}", other.kind()),
                        None,
                    )
                    .await?;
                }
            }
        }
    }

    /// Serves one pull request.
    async fn pull(&mut self, connection: &Connection, pull: Pull) -> SessionResult<()> {
        let store = &self.agent.store;
        if !connection.offers_table(&pull.table) {
            return self
                .refuse(
                    codes::TABLE_NOT_ALLOWED,
                    format!("{:?} is not offered", pull.table),
                    None,
                )
                .await;
        }
        let Ok(schema) = store.describe_table(&pull.table).await else {
            return self
                .refuse(
                    codes::TABLE_NOT_ALLOWED,
                    format!("{:?} is not offered", pull.table),
                    None,
                )
                .await;
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
                            codes::PROTOCOL_ERROR,
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
        let now = self.agent.now();
        // Resume a transfer of this connection, or start a new one (a new download).
        let resumed = match pull
            .transfer_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
        {
            Some(id) => match store.get_transfer(id).await {
                Ok(t) if t.connection_id == Some(connection.id) && t.table_name == pull.table => {
                    Some(t)
                }
                _ => None,
            },
            None => None,
        };
        let transfer = match resumed {
            Some(t) if t.status == TransferStatus::InProgress => {
                self.count_applied_unacknowledged(connection, &schema, &t, &pull)
                    .await?;
                t
            }
            Some(t) if t.status == TransferStatus::PendingApproval => {
                return self.approval_pending(&pull, t.id).await;
            }
            Some(t) if t.status == TransferStatus::Denied => {
                let reason = t.denial_reason.clone().unwrap_or_default();
                return self.refuse(codes::APPROVAL_DENIED, reason, None).await;
            }
            Some(t) if t.status == TransferStatus::Approved => {
                if !store
                    .take_download(connection.id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    return self.denied(AccessDenied::DownloadLimitExceeded).await;
                }
                store
                    .start_transfer(t.id, now)
                    .await
                    .map_err(|e| e.to_string())?
            }
            _ => {
                // A keys-only pass reveals no row data: no approval, not a download.
                let requires_approval =
                    !pull.keys_only && connection.table_requires_approval(&pull.table);
                let created = store
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
                    .map_err(|e| e.to_string())?;
                if requires_approval {
                    return self.approval_pending(&pull, created.id).await;
                }
                let kind = match (&pull.cursor_column, pull.keys_only) {
                    (_, true) => Some(serde_json::json!({ "keys_only": true })),
                    (Some(cursor), false) => {
                        Some(serde_json::json!({ "incremental": { "cursor": cursor } }))
                    }
                    (None, false) => None,
                };
                if let Some(kind) = kind {
                    let _ = store.merge_transfer_metadata(created.id, kind).await;
                }
                if !pull.keys_only
                    && !store
                        .take_download(connection.id)
                        .await
                        .map_err(|e| e.to_string())?
                {
                    let _ = store
                        .fail_transfer(created.id, "download limit reached", now)
                        .await;
                    return self.denied(AccessDenied::DownloadLimitExceeded).await;
                }
                store
                    .start_transfer(created.id, now)
                    .await
                    .map_err(|e| e.to_string())?
            }
        };

        // A transfer's resume key is its last acknowledged key; before the first credit it is
        // where the pull started, so a resume can tell which rows came before this transfer.
        if transfer.resume_key.is_none()
            && let Some(start) = &pull.after_key
        {
            store
                .record_progress(
                    transfer.id,
                    &Progress {
                        resume_key: serde_json::to_value(start).ok(),
                        ..Progress::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        let limit = (pull.limit as i64).clamp(1, connection.max_records_per_request);
        let initial_credits = pull.credits.clamp(1, 64);
        let mut credits = initial_credits;
        let limited = connection.max_records_total.is_some() && !pull.keys_only;
        // Pages are read by their own task, one ahead besides the one being read, while this one
        // encodes and the link's writer sends: reading, encoding and sending overlap.
        let (pages_tx, mut pages) = mpsc::channel::<Produced>(PAGES_AHEAD);
        let producer = tokio::spawn(produce(
            self.agent.store.clone(),
            ProduceJob {
                connection_id: connection.id,
                limited,
                schema: schema.clone(),
                columns: columns.clone(),
                after: pull.after_key.clone(),
                filter: pull.key_filter.clone(),
                limit,
                batch_rows: self.agent.config.server.batch_rows,
            },
            pages_tx,
        ));
        let mut after = pull.after_key.clone();
        let mut sent: i64 = 0;
        let mut seq = 0;
        let mut truncated = false;
        let mut exhausted = false;
        let mut in_flight: VecDeque<SentBatch> = VecDeque::new();
        let outcome: SessionResult<bool> = async {
            loop {
                // A credit first, then the next page: while the receiver holds every batch it
                // allowed, the pages read ahead wait in the channel (where an ended pull gives
                // their records back), and the reader waits with them.
                while credits == 0 {
                    match self
                        .next_credit(connection, transfer.id, pull.request_id, &mut in_flight)
                        .await
                    {
                        Ok(Some(batches)) => credits += batches,
                        Ok(None) => {
                            self.release_unacknowledged(connection, &mut in_flight, 0)
                                .await;
                            return Ok(false);
                        }
                        Err(err) => {
                            self.release_unacknowledged(connection, &mut in_flight, 0)
                                .await;
                            return Err(err);
                        }
                    }
                }
                // The reader ends every pull with `End` or `Failed`; a closed channel means it
                // died (a panic), which must fail the transfer, not end it as if complete.
                let produced = pages.recv().await.unwrap_or_else(|| {
                    Produced::Failed("the sender's page reader stopped unexpectedly".into())
                });
                let (mut page, reserved) = match produced {
                    Produced::Page { page, reserved } => (page, reserved),
                    Produced::End {
                        exhausted: e,
                        truncated: t,
                    } => {
                        exhausted = e;
                        truncated = t;
                        break;
                    }
                    Produced::Failed(reason) => {
                        let _ = store
                            .fail_transfer(transfer.id, &reason, self.agent.now())
                            .await;
                        self.refuse(codes::INTERNAL_ERROR, reason, None).await?;
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
                    Ok(sizes) => sizes,
                    Err(err) => {
                        self.release_unacknowledged(connection, &mut in_flight, reserved)
                            .await;
                        return Err(err);
                    }
                };
                credits -= 1;
                seq += 1;
                sent += got;
                after = last_key;
                in_flight.push_back(SentBatch {
                    rows: got,
                    wire: wire as i64,
                    raw: raw as i64,
                    last_key: after.clone(),
                    reserved,
                });
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
        let _ = producer.await;
        if unsent > 0 {
            let _ = store.release_records(connection.id, unsent).await;
        }
        if !outcome? {
            return Ok(());
        }
        // A batch counts as delivered only when the receiver has applied it (its credit comes
        // back): wait for every outstanding one, so a receiver that dies now leaves the
        // transfer in progress, to be resumed, not completed.
        while credits < initial_credits {
            match self
                .next_credit(connection, transfer.id, pull.request_id, &mut in_flight)
                .await?
            {
                Some(batches) => credits += batches,
                None => return Ok(()),
            }
        }
        let more = !exhausted && !truncated;
        if !more {
            store
                .complete_transfer(transfer.id, self.agent.now())
                .await
                .map_err(|e| e.to_string())?;
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

    /// A resumed transfer: batches the receiver applied but whose credit never arrived (it died
    /// in between) were not counted and their record reservations were given back. The rows
    /// between the last acknowledged key and the receiver's resume key are those rows: count
    /// them now, once. (At most the credits of one pull, so the read is small.)
    async fn count_applied_unacknowledged(
        &mut self,
        connection: &Connection,
        schema: &dbsync_protocol::message::TableSchema,
        transfer: &dbsync_agent::transfer::Transfer,
        pull: &Pull,
    ) -> SessionResult<()> {
        use dbsync_protocol::message::KeyFilter;
        let Some(resume) = &pull.after_key else {
            return Ok(());
        };
        // No acknowledged key: no credit ever came back, and the transfer started at the first
        // row (a transfer that started elsewhere records its start as its resume key).
        let acknowledged = match &transfer.resume_key {
            Some(key) => match serde_json::from_value::<Vec<dbsync_protocol::Value>>(key.clone()) {
                Ok(key) => Some(key),
                Err(_) => return Ok(()),
            },
            None => None,
        };
        // Within the pull's own key filter.
        let from = match &pull.key_filter {
            Some(KeyFilter::Range { from, .. }) => from.clone(),
            _ => None,
        };
        let store = &self.agent.store;
        let page = store
            .read_page_filtered(
                schema,
                &schema.primary_key,
                acknowledged.as_deref(),
                Some(&KeyFilter::Range {
                    from,
                    to: Some(resume.clone()),
                }),
                64 * self.agent.config.server.batch_rows,
            )
            .await
            .map_err(|e| e.to_string())?;
        let rows = match &pull.key_filter {
            Some(KeyFilter::Keys(keys)) => page.rows.iter().filter(|r| keys.contains(r)).count(),
            _ => page.rows.len(),
        } as i64;
        if rows == 0 {
            return Ok(());
        }
        if connection.max_records_total.is_some() && !pull.keys_only {
            store
                .take_records(connection.id, rows)
                .await
                .map_err(|e| e.to_string())?;
        }
        store
            .record_progress(
                transfer.id,
                &Progress {
                    records_transferred: rows,
                    resume_key: page.last_key.and_then(|k| serde_json::to_value(k).ok()),
                    ..Progress::default()
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        tracing::debug!(transfer_id = %transfer.id, rows, "counted rows applied before the receiver's last credit was lost");
        Ok(())
    }

    /// Waits for the receiver's next credit for `request_id`. Batches it acknowledges are
    /// recorded as transferred; if the receiver goes away, rows reserved for unacknowledged
    /// batches are given back, so a resumed transfer never counts them twice. `None` when the
    /// receiver cancelled the pull.
    async fn next_credit(
        &mut self,
        connection: &Connection,
        transfer_id: Uuid,
        request_id: u64,
        in_flight: &mut VecDeque<SentBatch>,
    ) -> SessionResult<Option<u32>> {
        loop {
            let message = match self.recv(IDLE_TIMEOUT).await {
                Ok(message) => message,
                Err(err) => {
                    self.release_unacknowledged(connection, in_flight, 0).await;
                    return Err(err);
                }
            };
            match message {
                Message::Credit(credit) if credit.request_id == request_id => {
                    for _ in 0..credit.batches {
                        let Some(batch) = in_flight.pop_front() else {
                            break;
                        };
                        self.agent
                            .store
                            .record_progress(
                                transfer_id,
                                &Progress {
                                    records_transferred: batch.rows,
                                    bytes_wire: batch.wire,
                                    bytes_raw: batch.raw,
                                    resume_key: batch
                                        .last_key
                                        .as_ref()
                                        .and_then(|k| serde_json::to_value(k).ok()),
                                    ..Progress::default()
                                },
                            )
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    return Ok(Some(credit.batches));
                }
                Message::Cancel(_) => {
                    self.release_unacknowledged(connection, in_flight, 0).await;
                    let _ = self
                        .agent
                        .store
                        .cancel_transfer(
                            transfer_id,
                            &Actor::remote(&connection.site_url),
                            self.agent.now(),
                        )
                        .await;
                    return Ok(None);
                }
                Message::Ping(ping) => {
                    self.send(&Message::Pong(ping)).await?;
                }
                _ => {}
            }
        }
    }

    /// Gives back the record reservations of batches the receiver never acknowledged (plus
    /// `extra` reserved rows not sent at all).
    async fn release_unacknowledged(
        &mut self,
        connection: &Connection,
        in_flight: &mut VecDeque<SentBatch>,
        extra: i64,
    ) {
        let unacknowledged: i64 = in_flight.drain(..).map(|b| b.reserved).sum::<i64>() + extra;
        if unacknowledged > 0
            && let Err(err) = self
                .agent
                .store
                .release_records(connection.id, unacknowledged)
                .await
        {
            tracing::warn!(error = %err, "could not release unacknowledged record reservations");
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

/// Pages read ahead of the encoder (besides the one being read).
const PAGES_AHEAD: usize = 1;
/// Uncompressed bytes a batch aims at: wide rows make pages shorter than `server.batch_rows`,
/// which bounds the memory of both agents and keeps batches far under the frame limit.
const TARGET_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The same for SQLite sources, read into one buffer per page and encoded from it: ~11,000 rows
/// of the bench's users table, sender peak 69-73 MiB. (At 1 MiB, ~17,000 rows, the peak was
/// 93-120 MiB for no clear gain in time; at 384 KiB, ~6,000 rows, pulls took ~10 % longer.)
const TARGET_SQLITE_BATCH_BYTES: usize = 640 * 1024;
/// Rows of a pull's first page, before the width of a row is known.
const FIRST_PAGE_ROWS: i64 = 100;
/// About how many bytes a row of `page` takes encoded (to size the next page).
fn bytes_per_row(page: &EncodedPage) -> usize {
    (page.columns.len() - page.room) / page.rows.max(1)
}

/// What the page reader hands the session.
enum Produced {
    /// Rows to send, with the record reservation taken for them (0 when unlimited).
    Page { page: EncodedPage, reserved: i64 },
    /// Nothing more to read: the table is done (`exhausted`) or the record limit cut it.
    End { exhausted: bool, truncated: bool },
    /// Reading failed.
    Failed(String),
}

/// One pull's reading job.
struct ProduceJob {
    connection_id: Uuid,
    limited: bool,
    schema: TableSchema,
    columns: Vec<String>,
    after: Option<Vec<dbsync_protocol::Value>>,
    filter: Option<dbsync_protocol::message::KeyFilter>,
    limit: i64,
    batch_rows: i64,
}

/// Reads the pages of one pull in key order, reserving records against the connection's
/// total when it has one. Stops when the session stops listening, giving back the reservation
/// of a page it could not hand over.
async fn produce(store: Store, job: ProduceJob, to_session: mpsc::Sender<Produced>) {
    let mut after = job.after;
    let mut sent: i64 = 0;
    // Slow start: the first page is small; later pages hold as many rows as fit the target
    // batch size, up to `batch_rows`.
    let mut page_rows = job.batch_rows.min(FIRST_PAGE_ROWS);
    let target = match store.engine() {
        dbsync_agent::store::Engine::Postgres => TARGET_BATCH_BYTES,
        dbsync_agent::store::Engine::Sqlite => TARGET_SQLITE_BATCH_BYTES,
    };
    // Each page is read behind room for the frame fields before its rows, so it is sent from
    // where it lies (`codec::encode_row_batch_in_place`).
    let room = dbsync_protocol::codec::row_batch_room(&job.columns);
    let end = loop {
        if sent >= job.limit {
            break Produced::End {
                exhausted: false,
                truncated: false,
            };
        }
        let want = page_rows.min(job.limit - sent);
        let granted = if job.limited {
            match store.take_records(job.connection_id, want).await {
                Ok(granted) => granted,
                Err(err) => break Produced::Failed(err.to_string()),
            }
        } else {
            want
        };
        if granted == 0 {
            break Produced::End {
                exhausted: false,
                truncated: true,
            };
        }
        let (schema, columns, from, filter) = (
            &job.schema,
            &job.columns,
            after.as_deref(),
            job.filter.as_ref(),
        );
        let read = store
            .read_page_encoded(schema, columns, from, filter, granted, room)
            .await;
        let page = match read {
            Ok(page) => page,
            Err(err) => {
                if job.limited {
                    let _ = store.release_records(job.connection_id, granted).await;
                }
                break Produced::Failed(err.to_string());
            }
        };
        let got = page.rows as i64;
        if job.limited
            && got < granted
            && let Err(err) = store
                .release_records(job.connection_id, granted - got)
                .await
        {
            break Produced::Failed(err.to_string());
        }
        if got == 0 {
            break Produced::End {
                exhausted: true,
                truncated: false,
            };
        }
        after = page.last_key.clone();
        sent += got;
        let per_row = bytes_per_row(&page).max(1);
        page_rows = i64::try_from(target / per_row)
            .unwrap_or(i64::MAX)
            .clamp(1, job.batch_rows);
        let reserved = if job.limited { got } else { 0 };
        if let Err(mpsc::error::SendError(unsent)) =
            to_session.send(Produced::Page { page, reserved }).await
        {
            if let Produced::Page { reserved, .. } = unsent
                && reserved > 0
            {
                let _ = store.release_records(job.connection_id, reserved).await;
            }
            return;
        }
        if got < granted {
            // Fewer rows than asked for: the table is done.
            break Produced::End {
                exhausted: true,
                truncated: false,
            };
        }
        if granted < want {
            // The record limit cut this page: the connection has no rows left to give.
            break Produced::End {
                exhausted: false,
                truncated: true,
            };
        }
    };
    let _ = to_session.send(end).await;
}

/// A batch sent and not yet acknowledged.
struct SentBatch {
    rows: i64,
    wire: i64,
    raw: i64,
    last_key: Option<Vec<dbsync_protocol::Value>>,
    reserved: i64,
}
