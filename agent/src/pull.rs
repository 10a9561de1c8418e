//! The receiver side of a data-plane session: `dbsync pull`. Opens a WebSocket session to the
//! sending site, lists and describes the tables, creates missing ones, and pulls each table in
//! foreign-key order, applying every batch with its checkpoint in one transaction. A pull that
//! was interrupted resumes after the last applied key, under the same sender transfer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dbsync_protocol::codec::{HEADER_LEN, Limits};
use dbsync_protocol::columns::ReceivedBatch;
use dbsync_protocol::message::{Credit, Hello, KeyFilter, Pull, TableSchema};
use dbsync_protocol::peer::TransportOffer;
use dbsync_protocol::{Message, Value};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use uuid::Uuid;

use crate::agent::Agent;
use crate::audit::Actor;
use crate::catalog::fk_order;
use crate::connection::{ConflictStrategy, Connection, ConnectionStatus, Direction};
use crate::error::{Error, Result};
use crate::link::{FrameReader, FrameWriter, Incoming, Link, LinkFailure};
use crate::sink::{BatchOf, Rows};
use crate::transfer::{NewTransfer, TransferDirection, TransferStatus, Transport};

/// Batches the sender may have in flight before it waits for credit.
pub const CREDITS: u32 = 8;
/// How often a pull waiting for approval asks again.
pub const APPROVAL_POLL: Duration = Duration::from_secs(5);
/// How long a QUIC handshake may take before `auto` falls back to WebSocket.
pub const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// First wait before reconnecting (doubles each attempt, with jitter).
const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest wait between reconnect attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Which transport a pull uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// WebSocket over the HTTP port.
    Ws,
    /// QUIC over UDP.
    Quic,
    /// QUIC when the sender offers it and it answers, else WebSocket.
    #[default]
    Auto,
}

impl std::str::FromStr for TransportChoice {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "ws" | "websocket" => Ok(Self::Ws),
            "quic" => Ok(Self::Quic),
            "auto" => Ok(Self::Auto),
            other => Err(Error::invalid(
                "transport",
                format!("{other:?}: expected ws, quic or auto"),
            )),
        }
    }
}

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
}

/// What one pass over a table's rows asks the sender for.
#[derive(Debug, Clone, Default)]
struct Pass {
    /// Incremental: page by this column, then the key.
    cursor: Option<String>,
    /// Keys only (a mirror reconciliation pass).
    keys_only: bool,
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

/// Checks the sender's description of `table` before anything is created or written from it:
/// the table it asked for, under that name, with valid and distinct column names and a key made
/// of its columns.
fn check_described(table: &str, schema: &TableSchema) -> std::result::Result<(), String> {
    if schema.name != table {
        return Err(format!(
            "asked to describe {table:?}, the sender described {:?}",
            schema.name
        ));
    }
    let mut names = std::collections::HashSet::new();
    for column in &schema.columns {
        crate::catalog::quote_ident(&column.name).map_err(|e| e.to_string())?;
        if !names.insert(column.name.as_str()) {
            return Err(format!(
                "{table:?} is described with column {:?} twice",
                column.name
            ));
        }
    }
    if schema.columns.is_empty() {
        return Err(format!("{table:?} is described with no columns"));
    }
    for key in &schema.primary_key {
        if !names.contains(key.as_str()) {
            return Err(format!(
                "{table:?} is described with key column {key:?}, which it lacks"
            ));
        }
    }
    Ok(())
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
}

/// Outcome of a pull.
#[derive(Debug, Clone, Serialize)]
pub struct PullSummary {
    /// Per table, in the order pulled.
    pub tables: Vec<TableSummary>,
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
    /// A batch was applied.
    Batch {
        /// Table.
        table: String,
        /// Rows in the batch.
        rows: i64,
        /// Wire bytes of the batch.
        bytes_wire: i64,
    },
    /// The transfer waits for the sender's admin.
    WaitingForApproval {
        /// Table.
        table: String,
        /// The sender's transfer id.
        transfer_id: String,
    },
}

/// The sender's transfer a receive transfer ran under (a later run resumes under it).
fn remote_transfer_of(transfer: &crate::transfer::Transfer) -> Option<&str> {
    transfer
        .metadata
        .get("remote_transfer_id")
        .and_then(|v| v.as_str())
}

/// Records the sender's transfer id `id` on the receive transfer (with `facts`), when it is not
/// the one already known.
async fn adopt_remote_transfer(
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

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The reading half of the receiver's WebSocket.
struct WsReader(futures_util::stream::SplitStream<Socket>);

impl FrameReader for WsReader {
    async fn read_frame(&mut self) -> std::result::Result<Option<Vec<u8>>, LinkFailure> {
        loop {
            match self.0.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => return Ok(Some(bytes.into())),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                Some(Ok(WsMessage::Text(_))) => {
                    return Err(LinkFailure::NotProtocol("unexpected text frame".into()));
                }
                Some(Ok(WsMessage::Close(_))) | None => return Ok(None),
                Some(Err(err)) => return Err(LinkFailure::Transport(err.to_string())),
            }
        }
    }
}

/// The writing half of the receiver's WebSocket.
struct WsWriter(futures_util::stream::SplitSink<Socket, WsMessage>);

impl FrameWriter for WsWriter {
    async fn write_frame(&mut self, frame: Vec<u8>) -> std::result::Result<(), String> {
        self.0
            .send(WsMessage::Binary(frame.into()))
            .await
            .map_err(|e| e.to_string())
    }

    async fn finish(&mut self) {
        let _ = self.0.close().await;
    }
}

/// What a pull receives: a message, or a row batch with its rows still encoded.
enum Reply {
    Message(Message),
    Batch(ReceivedBatch),
}

pub(crate) struct Client {
    link: Link,
    site: String,
    transport: Transport,
    quic: Option<crate::quic::QuicConnection>,
}

impl Client {
    fn session_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Session {
            site: self.site.clone(),
            reason: reason.to_string(),
        }
    }

    fn broke_off(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            site: self.site.clone(),
            reason: reason.to_string(),
        }
    }

    async fn send(&mut self, message: &Message) -> Result<()> {
        match self.link.send(message).await {
            Ok(_) => Ok(()),
            Err(reason) => Err(self.broke_off(reason)),
        }
    }

    async fn close(self) {
        self.link.close().await;
        if let Some(quic) = self.quic {
            quic.close().await;
        }
    }

    /// The next message and its size on the wire; a remote `Error` becomes [`Error::Remote`],
    /// and a row batch is not expected.
    async fn recv(&mut self) -> Result<(Message, usize)> {
        match self.recv_rows().await? {
            (Reply::Message(message), wire) => Ok((message, wire)),
            (Reply::Batch(_), _) => Err(self.session_error("unexpected RowBatch")),
        }
    }

    /// The next message or row batch and its size on the wire; a remote `Error` becomes
    /// [`Error::Remote`].
    async fn recv_rows(&mut self) -> Result<(Reply, usize)> {
        let next = tokio::time::timeout(Duration::from_secs(300), self.link.recv())
            .await
            .map_err(|_| self.broke_off("no answer for 300 s"))?;
        match next {
            Some(Incoming::Message(Message::Error(error), _)) => Err(Error::Remote {
                site: self.site.clone(),
                code: error.code,
                message: error.message,
                retry_after_ms: error.retry_after_ms,
            }),
            Some(Incoming::Message(message, wire)) => Ok((Reply::Message(message), wire)),
            Some(Incoming::Batch(batch, wire)) => Ok((Reply::Batch(batch), wire)),
            Some(Incoming::Malformed(reason)) => Err(self.session_error(reason)),
            Some(Incoming::Failed(reason)) => Err(self.broke_off(reason)),
            None => Err(self.broke_off("the sender closed the session")),
        }
    }
}

impl Agent {
    /// The address of a peer's host on `port`, refusing private addresses unless allowed.
    async fn resolve_peer(
        &self,
        site: &str,
        port_override: Option<u16>,
    ) -> Result<(String, SocketAddr)> {
        let refused = |reason: String| Error::Session {
            site: site.to_owned(),
            reason,
        };
        let http = crate::peer::checked_url(site, "/db-sync/ws", self.config.allow_private_peers)
            .map_err(|e| refused(e.to_string()))?;
        let host = http
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = port_override
            .or_else(|| http.port_or_known_default())
            .unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| Error::Unreachable {
                site: site.to_owned(),
                reason: format!("cannot resolve {host}: {e}"),
            })?
            .filter(|a| self.config.allow_private_peers || !crate::peer::is_forbidden(a.ip()))
            .collect();
        let addr = addrs
            .first()
            .copied()
            .ok_or_else(|| refused(format!("{host} resolves to no allowed address")))?;
        Ok((host, addr))
    }

    async fn open_ws(&self, connection: &Connection) -> Result<Client> {
        let site = connection.site_url.clone();
        let unreachable = |reason: String| Error::Unreachable {
            site: site.clone(),
            reason,
        };
        let http = crate::peer::checked_url(&site, "/db-sync/ws", self.config.allow_private_peers)
            .map_err(|e| Error::Session {
                site: site.clone(),
                reason: e.to_string(),
            })?;
        let mut ws_url = http.clone();
        let _ = ws_url.set_scheme(if http.scheme() == "https" {
            "wss"
        } else {
            "ws"
        });
        let (_, addr) = self.resolve_peer(&site, None).await?;
        let stream = tokio::time::timeout(crate::peer::PEER_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).ok();
        let limits = Limits::default();
        let config = WebSocketConfig::default()
            .max_message_size(Some(limits.max_frame_bytes as usize + HEADER_LEN))
            .max_frame_size(Some(limits.max_frame_bytes as usize + HEADER_LEN));
        let (socket, _) = tokio_tungstenite::client_async_tls_with_config(
            ws_url.as_str(),
            stream,
            Some(config),
            None,
        )
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        let (writer, reader) = socket.split();
        Ok(Client {
            link: Link::spawn(WsReader(reader), WsWriter(writer), limits),
            site,
            transport: Transport::Ws,
            quic: None,
        })
    }

    /// The sender's QUIC offer: pinned at registration, or learned (and pinned) from its status
    /// the first time. `None` when it offers no QUIC.
    pub async fn quic_offer_of(&self, connection: &Connection) -> Result<Option<TransportOffer>> {
        let stored = connection
            .metadata
            .get("quic")
            .or_else(|| connection.metadata.pointer("/registration/quic"))
            .filter(|v| !v.is_null())
            .and_then(|v| serde_json::from_value::<TransportOffer>(v.clone()).ok());
        if stored.is_some() {
            return Ok(stored);
        }
        let status = match self.peers.status(&connection.site_url).await {
            Ok(status) => status,
            Err(err) => {
                tracing::debug!(error = %err, "cannot ask the sender which transports it offers");
                return Ok(None);
            }
        };
        let offer = status.transports.into_iter().find(|t| t.kind == "quic");
        if let Some(offer) = &offer {
            // Trust on first use: from now on this certificate, and only it, is accepted.
            self.store
                .merge_connection_metadata(connection.id, serde_json::json!({ "quic": offer }))
                .await?;
            tracing::info!(connection = %connection.name, fingerprint = ?offer.cert_fingerprint, "pinned the sender's QUIC certificate");
        }
        Ok(offer)
    }

    async fn open_quic(
        &self,
        connection: &Connection,
        offer: &TransportOffer,
    ) -> std::result::Result<Client, (bool, Error)> {
        let site = connection.site_url.clone();
        let (host, addr) = self
            .resolve_peer(&site, offer.port)
            .await
            .map_err(|e| (false, e))?;
        let verify = match &offer.cert_fingerprint {
            Some(fingerprint) => crate::quic::Verify::Pinned(fingerprint.clone()),
            None => crate::quic::Verify::Roots(self.config.quic.ca_file.clone()),
        };
        let server_name = if host.parse::<std::net::IpAddr>().is_ok() {
            "dbsync".to_owned()
        } else {
            host
        };
        match crate::quic::connect(
            addr,
            &server_name,
            &verify,
            &self.config.quic,
            Limits::default(),
            QUIC_CONNECT_TIMEOUT,
        )
        .await
        {
            Ok((link, quic)) => Ok(Client {
                link,
                site,
                transport: Transport::Quic,
                quic: Some(quic),
            }),
            Err(crate::quic::ConnectError::Unreachable(reason)) => {
                Err((true, Error::Unreachable { site, reason }))
            }
            Err(crate::quic::ConnectError::Refused(reason)) => {
                Err((false, Error::Session { site, reason }))
            }
        }
    }

    /// Opens a session over the chosen transport and says Hello.
    async fn open_session(
        &self,
        connection: &Connection,
        password: Option<&dbsync_protocol::Secret>,
        choice: TransportChoice,
    ) -> Result<(Client, u64)> {
        let mut client = match choice {
            TransportChoice::Ws => self.open_ws(connection).await?,
            TransportChoice::Quic => {
                let offer =
                    self.quic_offer_of(connection)
                        .await?
                        .ok_or_else(|| Error::Session {
                            site: connection.site_url.clone(),
                            reason: "the sender offers no QUIC transport".into(),
                        })?;
                self.open_quic(connection, &offer)
                    .await
                    .map_err(|(_, e)| e)?
            }
            TransportChoice::Auto => match self.quic_offer_of(connection).await? {
                Some(offer) => match self.open_quic(connection, &offer).await {
                    Ok(client) => client,
                    // UDP blocked or nothing listening: WebSocket. A refused certificate is
                    // not a reason to try elsewhere.
                    Err((true, err)) => {
                        tracing::info!(error = %err, "QUIC unreachable; falling back to WebSocket");
                        self.open_ws(connection).await?
                    }
                    Err((false, err)) => return Err(err),
                },
                None => self.open_ws(connection).await?,
            },
        };
        let token = self.store.receiver_token(connection, &self.vault)?;
        client
            .send(&Message::Hello(Hello {
                versions: dbsync_protocol::SUPPORTED_VERSIONS.to_vec(),
                token: dbsync_protocol::Secret::new(token.expose()),
                password: password.cloned(),
                client_name: concat!("dbsync/", env!("CARGO_PKG_VERSION")).to_owned(),
            }))
            .await?;
        match client.recv().await? {
            // A sender must choose a version this receiver offered.
            (Message::Welcome(welcome), _)
                if dbsync_protocol::SUPPORTED_VERSIONS.contains(&welcome.version) =>
            {
                Ok((client, welcome.max_records_per_request.max(1)))
            }
            (Message::Welcome(welcome), _) => Err(client.session_error(format!(
                "the sender chose protocol version {}, which this receiver does not speak ({:?})",
                welcome.version,
                dbsync_protocol::SUPPORTED_VERSIONS
            ))),
            (other, _) => {
                Err(client.session_error(format!("expected Welcome, got {:?}", other.kind())))
            }
        }
    }

    /// Opens a session, retrying a transient failure with exponential backoff and jitter until
    /// `retry_for` has passed since `failing_since`.
    async fn open_session_retrying(
        &self,
        connection: &Connection,
        options: &PullOptions,
        failing_since: &mut Option<Instant>,
        attempts: &mut u32,
    ) -> Result<(Client, u64)> {
        loop {
            match self
                .open_session(connection, options.password.as_ref(), options.transport)
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

    /// Pulls tables from the sending site of a receiver connection.
    pub async fn pull(
        &self,
        id_or_name: &str,
        options: &PullOptions,
        mut on_event: impl FnMut(PullEvent),
    ) -> Result<PullSummary> {
        let started = Instant::now();
        let connection = self.store.get_connection(id_or_name).await?;
        if connection.direction != Direction::Receiver {
            return Err(Error::invalid(
                "connection",
                format!(
                    "{} is a sender connection; pull from a receiver connection",
                    connection.name
                ),
            ));
        }
        if connection.status != ConnectionStatus::Active {
            return Err(Error::illegal_connection(
                &connection.name,
                "pull through",
                connection.status,
            ));
        }
        let strategy = options
            .strategy
            .unwrap_or(connection.default_conflict_strategy);
        if options.incremental && options.where_key.is_some() {
            return Err(Error::invalid(
                "where-key",
                "an incremental pull moves what changed; it takes no key filter",
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
        client.send(&Message::ListTables).await?;
        let offered = match client.recv().await? {
            (Message::TableList(tables), _) => tables,
            (other, _) => {
                return Err(
                    client.session_error(format!("expected TableList, got {:?}", other.kind()))
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
        let wanted: Vec<_> = match &options.tables {
            Some(names) => {
                for name in names {
                    if !offered.iter().any(|t| &t.name == name) {
                        return Err(Error::Remote {
                            site: connection.site_url.clone(),
                            code: "table_not_allowed".into(),
                            message: format!("{name:?} is not offered"),
                            retry_after_ms: None,
                        });
                    }
                }
                offered
                    .iter()
                    .filter(|t| names.contains(&t.name))
                    .cloned()
                    .collect()
            }
            None => offered.clone(),
        };
        if options.where_key.is_some() && wanted.len() != 1 {
            return Err(Error::invalid(
                "where-key",
                "a key filter applies to one table: name it with --tables",
            ));
        }
        let mut summaries = Vec::new();
        for table in fk_order(&wanted) {
            let estimated_rows = wanted
                .iter()
                .find(|t| t.name == table)
                .map_or(0, |t| t.estimated_rows);
            on_event(PullEvent::TableStarted {
                table: table.clone(),
                estimated_rows,
            });
            let mut reconnects = 0;
            let summary = loop {
                let attempt = async {
                    client.send(&Message::DescribeTable(table.clone())).await?;
                    let schema = match client.recv().await? {
                        (Message::TableSchema(schema), _) => {
                            check_described(&table, &schema)
                                .map_err(|reason| client.session_error(reason))?;
                            schema
                        }
                        (other, _) => {
                            return Err(client.session_error(format!(
                                "expected TableSchema, got {:?}",
                                other.kind()
                            )));
                        }
                    };
                    self.pull_table(
                        &mut client,
                        &connection,
                        &schema,
                        strategy,
                        max_per_request,
                        options,
                        &mut on_event,
                    )
                    .await
                }
                .await;
                match attempt {
                    Ok(summary) => break summary,
                    Err(err) => {
                        // A session that broke off is re-opened; the table resumes after its
                        // checkpoint.
                        self.backoff(err, options, &mut failing_since, &mut attempts)
                            .await?;
                        reconnects += 1;
                        let (reopened, max) = self
                            .open_session_retrying(
                                &connection,
                                options,
                                &mut failing_since,
                                &mut attempts,
                            )
                            .await?;
                        std::mem::replace(&mut client, reopened).close().await;
                        max_per_request = max;
                    }
                }
            };
            failing_since = None;
            attempts = 0;
            if reconnects > 0 {
                store_reconnects(&self.store, summary.transfer_id, reconnects).await;
            }
            summaries.push(TableSummary {
                reconnects,
                ..summary
            });
        }
        client.close().await;
        Ok(PullSummary {
            tables: summaries,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_table(
        &self,
        client: &mut Client,
        connection: &Connection,
        schema: &TableSchema,
        strategy: ConflictStrategy,
        max_per_request: u64,
        options: &PullOptions,
        on_event: &mut impl FnMut(PullEvent),
    ) -> Result<TableSummary> {
        let store = &self.store;
        let columns: Vec<String> = schema
            .columns
            .iter()
            .map(|c| c.name.clone())
            .filter(|c| !options.exclude_columns.contains(c))
            .collect();
        let key_filter = options
            .where_key
            .as_deref()
            .map(|text| crate::key_filter::parse(text, schema))
            .transpose()?;
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
        let created_table = store.ensure_table(schema, &columns).await?;
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
                t.metadata.get("key_filter").and_then(|v| v.as_str())
                    == options.where_key.as_deref()
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
            let latest = store
                .list_transfers(&crate::transfer::TransferFilter {
                    connection_id: Some(connection.id),
                    direction: Some(TransferDirection::Receive),
                    table_name: Some(schema.name.clone()),
                    per_page: Some(1),
                    ..Default::default()
                })
                .await?;
            if let Some(previous) = latest.items.first()
                && previous.status != TransferStatus::Completed
                && let Some(id) = remote_transfer_of(previous)
            {
                remote_transfer = Some(id.to_owned());
                resumed = true;
            }
        }
        let transfer = store
            .create_transfer(
                NewTransfer {
                    connection_id: connection.id,
                    direction: TransferDirection::Receive,
                    table_name: schema.name.clone(),
                    requires_approval: false,
                    records_requested: 0,
                    conflict_strategy: strategy,
                    transport: Some(client.transport),
                    requester_ip: None,
                    requester_user_agent: None,
                },
                self.config.approval_ttl(),
                &Actor::system(),
                self.now(),
            )
            .await?;
        store.start_transfer(transfer.id, self.now()).await?;
        // What a later run needs to resume this one: the filter, and the sender's transfer.
        let mut facts = serde_json::Map::new();
        if let Some(text) = &options.where_key {
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
            cursor: cursor.clone(),
            keys_only: false,
        };
        let mut outcome = self
            .pull_rows(
                client,
                connection,
                schema,
                &columns,
                row_strategy,
                max_per_request,
                options,
                key_filter.as_ref(),
                &pass,
                on_event,
                &mut after,
                &mut remote_transfer,
                &mut summary,
            )
            .await;
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
            let mut keys_after = None;
            let mut keys_remote = None;
            let mut keys_summary = TableSummary::default();
            outcome = self
                .pull_rows(
                    client,
                    connection,
                    schema,
                    &schema.primary_key,
                    ConflictStrategy::Mirror,
                    max_per_request,
                    options,
                    None,
                    &Pass {
                        cursor: None,
                        keys_only: true,
                    },
                    &mut |_| {},
                    &mut keys_after,
                    &mut keys_remote,
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
        match outcome {
            Ok(()) => {
                store.complete_transfer(transfer.id, self.now()).await?;
                Ok(summary)
            }
            Err(err) => {
                let _ = store
                    .fail_transfer(transfer.id, &err.to_string(), self.now())
                    .await;
                Err(err)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn pull_rows(
        &self,
        client: &mut Client,
        connection: &Connection,
        schema: &TableSchema,
        columns: &[String],
        strategy: ConflictStrategy,
        max_per_request: u64,
        options: &PullOptions,
        key_filter: Option<&KeyFilter>,
        pass: &Pass,
        on_event: &mut impl FnMut(PullEvent),
        after: &mut Option<Vec<Value>>,
        remote_transfer: &mut Option<String>,
        summary: &mut TableSummary,
    ) -> Result<()> {
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
        let most_in_flight = if overlap { 2 } else { 1 };
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
                            code,
                            retry_after_ms,
                            ..
                        }) if code == "rate_limited" => {
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
                        let expected: &[String] = if pass.keys_only {
                            &schema.primary_key
                        } else {
                            columns
                        };
                        let key_len = schema.primary_key.len() + usize::from(pass.cursor.is_some());
                        if batch.request_id != request_id
                            || batch.columns != expected
                            || !(batch.last_key.is_empty() || batch.last_key.len() == key_len)
                        {
                            return Err(client.session_error(format!(
                                "a row batch for request {} with columns {:?} does not answer request {request_id} for {:?}",
                                batch.request_id, batch.columns, expected
                            )));
                        }
                    }
                    match message {
                        Reply::Batch(batch) if pass.keys_only => {
                            let keys = batch.rows.to_rows().map_err(|e| client.session_error(e))?;
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
                                        connection_id,
                                        batch_of,
                                        schema,
                                        &batch.columns,
                                        Rows::Encoded(&batch.rows),
                                        strategy,
                                        done.last_key.as_deref(),
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
                                    code: "approval_pending".into(),
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
                                client.session_error(format!("unexpected {:?}", other.kind()))
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
