//! The HTTP edge of a data-plane session: the WebSocket upgrade at `GET /db-sync/ws` and the
//! halves that move frames over it. The session itself is the engine's
//! ([`dbsync_agent::session::sender`]), the same for QUIC streams.

use std::net::IpAddr;

use axum::extract::State;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use dbsync_agent::link::{FrameReader, FrameWriter, Link, LinkFailure};
use dbsync_agent::transfer::Transport;
use dbsync_protocol::codec::{HEADER_LEN, Limits};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};

use crate::AppState;
use crate::client_ip::ClientIp;

/// Time a receiver has to send `Hello`.
pub use dbsync_agent::session::sender::HELLO_TIMEOUT;

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
    link: Link,
    client_ip: IpAddr,
    user_agent: Option<String>,
    transport: Transport,
) {
    dbsync_agent::session::sender::serve(
        &state.agent,
        &state.sessions,
        link,
        client_ip,
        user_agent,
        transport,
        state.sessions_stopped(),
    )
    .await;
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
