//! The sender side of a data-plane session over WebSocket (`GET /db-sync/ws`): `Hello` is
//! checked by `validate_connection`, then list, describe and pull requests are served under the
//! connection's controls (offered tables, approval mode, download and record limits, rows per
//! request, rate limit). Rows go out in key order, a batch at a time, never more batches in
//! flight than the receiver granted.

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use dbsync_agent::Store;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::Connection;
use dbsync_agent::link::{FrameReader, FrameWriter, Incoming, Link, LinkFailure};
use dbsync_agent::source::EncodedPage;
use dbsync_agent::source::Window;
use dbsync_agent::transfer::{NewTransfer, Progress, TransferDirection, TransferStatus, Transport};
use dbsync_agent::{AccessDenied, Agent};
use dbsync_protocol::Message;
use dbsync_protocol::codec::{HEADER_LEN, Limits};
use dbsync_protocol::error::codes;
use dbsync_protocol::message::{
    ApprovalPending, ErrorMessage, KeyFilter, MAX_CREDITS, MAX_FILTER_KEYS, Pull, PullDone,
    RowBatch, TableSchema, Welcome,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::AppState;
use crate::client_ip::ClientIp;

/// Time a receiver has to send `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /db-sync/ws`.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    client: ClientIp,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let limits = Limits::requests();
    let user_agent = headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(200).collect::<String>());
    ws.max_message_size(limits.max_frame_bytes as usize + HEADER_LEN)
        .max_frame_size(limits.max_frame_bytes as usize + HEADER_LEN)
        .on_upgrade(move |socket| async move {
            let (writer, reader) = socket.split();
            let link = Link::spawn(WsReader(reader), WsWriter(writer), limits);
            serve(&state, link, client.0, user_agent, Transport::Ws).await;
        })
}

/// Runs one session over `link` until it ends or the server shuts down (either transport).
pub(crate) async fn serve(
    state: &AppState,
    mut link: Link,
    client_ip: IpAddr,
    user_agent: Option<String>,
    transport: Transport,
) {
    link.set_zstd_level(state.agent.config.server.zstd_level);
    // A place under the session caps, held while the session runs; none left: refused at once,
    // before any Hello is read.
    let _permit = match state.sessions.admit(client_ip) {
        Ok(permit) => permit,
        Err(refusal) => {
            tracing::debug!(client = %client_ip, reason = %refusal, %transport, "session refused");
            let _ = link
                .send(&Message::Error(ErrorMessage {
                    code: codes::TOO_MANY_SESSIONS.to_owned(),
                    message: format!("{refusal}; try again later"),
                    retry_after_ms: Some(5_000),
                    transfer_id: None,
                }))
                .await;
            link.close().await;
            return;
        }
    };
    let mut session = Session {
        agent: &state.agent,
        link,
        idle: Duration::from_secs(state.agent.config.server.session_idle_timeout_secs),
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
    async fn read_frame(&mut self) -> Result<Option<Vec<u8>>, LinkFailure> {
        loop {
            match self.0.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => return Ok(Some(bytes.into())),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                Some(Ok(WsMessage::Text(_))) => {
                    return Err(LinkFailure::NotProtocol(
                        "text frames are not part of the protocol".into(),
                    ));
                }
                Some(Ok(WsMessage::Close(_))) | None => return Ok(None),
                Some(Err(err)) => return Err(LinkFailure::Transport(err.to_string())),
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
    /// How long the session waits for the next request or a credit
    /// (`server.session_idle_timeout_secs`).
    pub(crate) idle: Duration,
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

    /// The next request, by `deadline` (pings answered on the way do not move it). A row batch
    /// or a malformed frame is answered with `protocol_error`; silence past the deadline with
    /// `timeout`.
    async fn recv(&mut self, deadline: tokio::time::Instant) -> SessionResult<Message> {
        let next = match tokio::time::timeout_at(deadline, self.link.recv()).await {
            Ok(next) => next,
            Err(_) => {
                let _ = self
                    .refuse(
                        codes::TIMEOUT,
                        "no request in time; closing the session",
                        None,
                    )
                    .await;
                return Err("timed out waiting for the receiver".to_owned());
            }
        };
        match next {
            Some(Incoming::Message(message, _)) => Ok(message),
            // The link refuses row batches from a receiver before decoding them
            // (`Limits::requests`): they arrive as malformed frames.
            Some(Incoming::Batch(..)) => {
                let reason = format!("unexpected {:?}", dbsync_protocol::Kind::RowBatch);
                let _ = self
                    .refuse(codes::PROTOCOL_ERROR, reason.clone(), None)
                    .await;
                Err(reason)
            }
            Some(Incoming::Malformed(reason)) => {
                let _ = self
                    .refuse(codes::PROTOCOL_ERROR, reason.clone(), None)
                    .await;
                Err(reason)
            }
            Some(Incoming::Failed(failure)) => {
                if let LinkFailure::NotProtocol(reason) = &failure {
                    let _ = self
                        .refuse(codes::PROTOCOL_ERROR, reason.clone(), None)
                        .await;
                }
                Err(failure.to_string())
            }
            None => Err("closed by the receiver".into()),
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
        let hello_by = tokio::time::Instant::now() + HELLO_TIMEOUT;
        let Message::Hello(hello) = self.recv(hello_by).await? else {
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
            .validate_connection(
                hello.token.expose(),
                self.client_ip,
                now,
                hello.password.as_ref().map(dbsync_protocol::Secret::expose),
            )
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
            max_frame_bytes: u64::from(dbsync_protocol::codec::DEFAULT_MAX_FRAME_BYTES),
        }))
        .await?;
        // Pings answer but do not keep a session open: the idle deadline moves with requests.
        let mut idle_by = tokio::time::Instant::now() + self.idle;
        loop {
            let request = self.recv(idle_by).await?;
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
            if !matches!(request, Message::Ping(_)) {
                idle_by = tokio::time::Instant::now() + self.idle;
            }
            // Every request counts against the rate limit, pings included.
            if let Err(denied) = self.agent.validator.check_rate(&connection) {
                self.denied(denied).await?;
                continue;
            }
            match request {
                Message::Ping(ping) => {
                    self.send(&Message::Pong(ping)).await?;
                }
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
    ///
    /// Accounting: a row counts (against the connection's record limit and in the transfer) when
    /// it leaves this site, however the receiver behaves afterwards. The transfer keeps the
    /// furthest key it sent (`resume_key`) and the key it started after (`start_key` in its
    /// metadata); a resume re-sends what lies between the receiver's key and the furthest key
    /// sent without counting it again, never reads at or below the start key, and must ask for
    /// what the transfer started with (columns, key filter, cursor, keys-only): a resume cannot
    /// widen what its transfer covers.
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
                            codes::INVALID_REQUEST,
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
            return self.refuse(codes::INVALID_REQUEST, reason, None).await;
        }
        let scope = PullScope::of(&pull, &columns);
        let now = self.agent.now();
        // Resume a transfer of this connection, or start a new one (a new download).
        let resumed = match pull
            .transfer_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok())
        {
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
                    codes::INVALID_REQUEST,
                    format!(
                        "transfer {} covers other rows or columns than this request asks for; \
                         a resume asks for what its transfer started with",
                        t.id
                    ),
                    None,
                )
                .await;
        }
        let transfer = match resumed {
            Some(t) if t.status == TransferStatus::InProgress => t,
            Some(t) if t.status == TransferStatus::PendingApproval => {
                return self.approval_pending(&pull, t.id).await;
            }
            Some(t) if t.status == TransferStatus::Denied => {
                let reason = t.denial_reason.clone().unwrap_or_default();
                return self.refuse(codes::APPROVAL_DENIED, reason, None).await;
            }
            Some(t) if t.status == TransferStatus::Approved => {
                if !t.metadata.get("keys_only").is_some_and(|k| k == true)
                    && !store
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
                // Keys are data: a keys-only pass waits for approval and counts its keys against
                // the record limit, like any pull.
                let requires_approval = connection.table_requires_approval(&pull.table);
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
                let mut facts = serde_json::json!({ "scope": scope.0 });
                if pull.keys_only {
                    facts["keys_only"] = true.into();
                } else if let Some(cursor) = &pull.cursor_column {
                    facts["incremental"] = serde_json::json!({ "cursor": cursor });
                }
                if let Some(start) = &pull.after_key {
                    facts["start_key"] = serde_json::to_value(start).unwrap_or_default();
                }
                store
                    .merge_transfer_metadata(created.id, facts)
                    .await
                    .map_err(|e| e.to_string())?;
                if requires_approval {
                    return self.approval_pending(&pull, created.id).await;
                }
                // A keys-only pass reconciles the row pass before it, which was the download.
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
        let start_key = transfer
            .metadata
            .get("start_key")
            .and_then(|k| serde_json::from_value::<Vec<dbsync_protocol::Value>>(k.clone()).ok());
        let sent_up_to = transfer
            .resume_key
            .as_ref()
            .and_then(|k| serde_json::from_value::<Vec<dbsync_protocol::Value>>(k.clone()).ok());
        let limit = (pull.limit as i64).clamp(1, connection.max_records_per_request);
        let initial_credits = pull.credits.clamp(1, MAX_CREDITS);
        let mut credits = initial_credits;
        let limited = connection.max_records_total.is_some();
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
                start_key,
                sent_up_to,
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
        // Batches sent and not yet acknowledged (a credit comes back for each).
        let mut in_flight: u32 = 0;
        let outcome: SessionResult<bool> = async {
            loop {
                // A credit first, then the next page: while the receiver holds every batch it
                // allowed, the pages read ahead wait in the channel (where an ended pull gives
                // their records back), and the reader waits with them.
                while credits == 0 {
                    match self
                        .next_credit(connection, transfer.id, pull.request_id, in_flight)
                        .await?
                    {
                        Some(batches) => {
                            credits += batches;
                            in_flight -= batches;
                        }
                        None => return Ok(false),
                    }
                }
                // The reader ends every pull with `End` or `Failed`; a closed channel means it
                // died (a panic), which must fail the transfer, not end it as if complete.
                let produced = pages.recv().await.unwrap_or_else(|| {
                    Produced::Failed(dbsync_agent::Error::Config(
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
                            dbsync_agent::Error::Invalid { .. } => codes::INVALID_REQUEST,
                            _ => {
                                tracing::error!(error = %reason, table = %pull.table, "reading a page failed");
                                codes::INTERNAL_ERROR
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
                    Ok(sizes) => sizes,
                    Err(err) => {
                        // Never handed to the link: these rows did not leave.
                        if reserved > 0 {
                            let _ = store.release_records(connection.id, reserved).await;
                        }
                        return Err(err);
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
                    .await
                    .map_err(|e| e.to_string())?;
                credits -= 1;
                in_flight += 1;
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
        let _ = producer.await;
        if unsent > 0 {
            let _ = store.release_records(connection.id, unsent).await;
        }
        if !outcome? {
            return Ok(());
        }
        // The pull ends once the receiver has applied every batch (its credits come back), so
        // a receiver that dies now leaves the transfer in progress, to be resumed.
        while in_flight > 0 {
            match self
                .next_credit(connection, transfer.id, pull.request_id, in_flight)
                .await?
            {
                Some(batches) => in_flight -= batches,
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

    /// Waits for the receiver's next credit for `request_id`, of at most the `in_flight`
    /// batches it has not acknowledged (a receiver cannot grant itself more than it was sent).
    /// `None` when the receiver cancelled the pull.
    async fn next_credit(
        &mut self,
        connection: &Connection,
        transfer_id: Uuid,
        request_id: u64,
        in_flight: u32,
    ) -> SessionResult<Option<u32>> {
        let deadline = tokio::time::Instant::now() + self.idle;
        loop {
            match self.recv(deadline).await? {
                Message::Credit(credit) if credit.request_id == request_id => {
                    let batches = credit.batches.min(in_flight);
                    if batches > 0 {
                        return Ok(Some(batches));
                    }
                }
                Message::Cancel(_) => {
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
                    if let Err(denied) = self.agent.validator.check_rate(connection) {
                        self.denied(denied).await?;
                        return Err("rate limited while pinging".into());
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
        return Err(format!("{:?} has no primary key to page by", schema.name));
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
    fn matches(&self, transfer: &dbsync_agent::transfer::Transfer) -> bool {
        transfer
            .metadata
            .get("scope")
            .is_none_or(|scope| *scope == self.0)
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
    /// Rows to send, with the record reservation taken for them (0 when unlimited or when they
    /// were sent before), and whether they are rows this transfer never sent (`fresh`).
    Page {
        page: EncodedPage,
        reserved: i64,
        fresh: bool,
    },
    /// Nothing more to read: the table is done (`exhausted`) or the record limit cut it.
    End { exhausted: bool, truncated: bool },
    /// Reading failed.
    Failed(dbsync_agent::Error),
}

/// One pull's reading job.
struct ProduceJob {
    connection_id: Uuid,
    limited: bool,
    schema: TableSchema,
    columns: Vec<String>,
    /// The receiver's resume key.
    after: Option<Vec<dbsync_protocol::Value>>,
    /// Where the transfer started: nothing at or below it is read.
    start_key: Option<Vec<dbsync_protocol::Value>>,
    /// The furthest key the transfer sent: rows up to it were counted when they first left.
    sent_up_to: Option<Vec<dbsync_protocol::Value>>,
    filter: Option<dbsync_protocol::message::KeyFilter>,
    limit: i64,
    batch_rows: i64,
}

/// Reads the pages of one pull in key order: first, on a resume, the rows between the
/// receiver's key and the furthest key sent (sent before, not counted again), then the rows
/// past it, reserving records against the connection's total when it has one. Stops when the
/// session stops listening, giving back the reservation of a page it could not hand over.
async fn produce(store: Store, job: ProduceJob, to_session: mpsc::Sender<Produced>) {
    let mut after = job.after;
    let mut sent: i64 = 0;
    // Re-sending what the transfer sent before, while there is any between the receiver's key
    // and the furthest key sent.
    let mut resending = job.sent_up_to.is_some() && after != job.sent_up_to;
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
        let charged = job.limited && !resending;
        let granted = if charged {
            match store.take_records(job.connection_id, want).await {
                Ok(granted) => granted,
                Err(err) => break Produced::Failed(err),
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
        let window = if resending {
            Window {
                above: job.start_key.as_deref(),
                at_most: job.sent_up_to.as_deref(),
            }
        } else {
            Window {
                above: job.sent_up_to.as_deref().or(job.start_key.as_deref()),
                at_most: None,
            }
        };
        let (schema, columns, from, filter) = (
            &job.schema,
            &job.columns,
            after.as_deref(),
            job.filter.as_ref(),
        );
        let read = store
            .read_page_encoded(schema, columns, from, window, filter, granted, room)
            .await;
        let page = match read {
            Ok(page) => page,
            Err(err) => {
                if charged {
                    let _ = store.release_records(job.connection_id, granted).await;
                }
                break Produced::Failed(err);
            }
        };
        let got = page.rows as i64;
        if charged
            && got < granted
            && let Err(err) = store
                .release_records(job.connection_id, granted - got)
                .await
        {
            break Produced::Failed(err);
        }
        if got == 0 {
            if resending {
                // Everything sent before is sent again: on to the rows past it.
                resending = false;
                continue;
            }
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
        let reserved = if charged { got } else { 0 };
        let fresh = !resending;
        if let Err(mpsc::error::SendError(unsent)) = to_session
            .send(Produced::Page {
                page,
                reserved,
                fresh,
            })
            .await
        {
            if let Produced::Page { reserved, .. } = unsent
                && reserved > 0
            {
                let _ = store.release_records(job.connection_id, reserved).await;
            }
            return;
        }
        if got < granted {
            if resending {
                resending = false;
                continue;
            }
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
