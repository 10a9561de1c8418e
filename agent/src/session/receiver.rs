//! The receiver's half of a data-plane session: dialing the sender (WebSocket or QUIC, private
//! addresses refused unless allowed, the QUIC certificate pinned), saying Hello, and a client
//! that sends requests and receives messages and row batches. What the sender answers is checked
//! by [`ReceiverCore`] before anything is believed.

use std::net::SocketAddr;
use std::time::Duration;

use dbsync_protocol::Message;
use dbsync_protocol::codec::{HEADER_LEN, Limits};
use dbsync_protocol::columns::ReceivedBatch;
use dbsync_protocol::message::Hello;
use dbsync_protocol::peer::TransportOffer;
use dbsync_protocol::session::{Code, ReceiverCore};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::agent::Agent;
use crate::connection::Connection;
use crate::error::{Error, Result, SessionFault};
use crate::link::{FrameReader, FrameWriter, Incoming, Link, LinkFailure};
use crate::transfer::Transport;

/// How long a QUIC handshake may take before `auto` falls back to WebSocket.
pub const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
pub(crate) enum Reply {
    Message(Message),
    Batch(ReceivedBatch),
}

pub(crate) struct Client {
    link: Link,
    site: String,
    pub(crate) transport: Transport,
    quic: Option<crate::quic::QuicConnection>,
    /// The protocol version the sender chose (0 until welcomed).
    pub(crate) version: u16,
    /// How long an answer may take before the session counts as broken off.
    answer_timeout: Duration,
}

impl Client {
    /// The sender broke the protocol.
    pub(crate) fn protocol_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Session {
            site: self.site.clone(),
            fault: SessionFault::Protocol,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn broke_off(&self, reason: impl std::fmt::Display) -> Error {
        Error::Unreachable {
            site: self.site.clone(),
            reason: reason.to_string(),
        }
    }

    pub(crate) async fn send(&mut self, message: &Message) -> Result<()> {
        match self.link.send(message).await {
            Ok(_) => Ok(()),
            Err(reason) => Err(self.broke_off(reason)),
        }
    }

    pub(crate) async fn close(self) {
        self.link.close().await;
        if let Some(quic) = self.quic {
            quic.close().await;
        }
    }

    /// The next message and its size on the wire; a remote `Error` becomes [`Error::Remote`],
    /// and a row batch is not expected.
    pub(crate) async fn recv(&mut self) -> Result<(Message, usize)> {
        match self.recv_rows().await? {
            (Reply::Message(message), wire) => Ok((message, wire)),
            (Reply::Batch(_), _) => Err(self.protocol_error("unexpected RowBatch")),
        }
    }

    /// The next message or row batch and its size on the wire; a remote `Error` becomes
    /// [`Error::Remote`].
    pub(crate) async fn recv_rows(&mut self) -> Result<(Reply, usize)> {
        let next = tokio::time::timeout(self.answer_timeout, self.link.recv())
            .await
            .map_err(|_| {
                self.broke_off(format!(
                    "no answer for {} s (answer_timeout_secs)",
                    self.answer_timeout.as_secs()
                ))
            })?;
        match next {
            Some(Incoming::Message(Message::Error(error), _)) => {
                // The codes are part of the protocol version both sides agreed on.
                let (code, message) = match Code::parse(&error.code) {
                    Some(code) => (code, error.message),
                    None => (
                        Code::ProtocolError,
                        format!("unknown error code {:?}: {}", error.code, error.message),
                    ),
                };
                Err(Error::Remote {
                    site: self.site.clone(),
                    code,
                    message,
                    retry_after_ms: error.retry_after_ms,
                })
            }
            Some(Incoming::Message(message, wire)) => Ok((Reply::Message(message), wire)),
            Some(Incoming::Batch(batch, wire)) => Ok((Reply::Batch(batch), wire)),
            Some(Incoming::Malformed(reason)) => Err(self.protocol_error(reason)),
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
            fault: SessionFault::PeerNotAllowed,
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
                fault: SessionFault::PeerNotAllowed,
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
            version: 0,
            answer_timeout: self.config.answer_timeout(),
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
                version: 0,
                answer_timeout: self.config.answer_timeout(),
            }),
            Err(crate::quic::ConnectError::Unreachable(reason)) => {
                Err((true, Error::Unreachable { site, reason }))
            }
            Err(crate::quic::ConnectError::Refused(reason)) => Err((
                false,
                Error::Session {
                    site,
                    fault: SessionFault::TransportRefused,
                    reason,
                },
            )),
        }
    }

    /// Opens a session over the chosen transport and says Hello.
    pub(crate) async fn open_session(
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
                            fault: SessionFault::TransportRefused,
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
        let mut core = ReceiverCore::new(dbsync_protocol::SUPPORTED_VERSIONS);
        let (answer, _) = client.recv().await?;
        let welcome = core
            .on_welcome(&answer)
            .map_err(|violation| client.protocol_error(violation))?;
        let max_per_request = welcome.max_records_per_request.max(1);
        client.version = welcome.version;
        Ok((client, max_per_request))
    }
}
