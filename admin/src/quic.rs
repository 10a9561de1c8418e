//! The sender's QUIC endpoint: each bidirectional stream a receiver opens carries one session,
//! served by the same [`Session`] as the WebSocket endpoint. A connection may have at most
//! `quic.max_streams` streams open (the transport refuses more), and the client address is the
//! UDP source (QUIC has no forwarding proxies to believe).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dbsync_agent::link::Link;
use dbsync_agent::quic::{QuicReader, QuicWriter};
use dbsync_agent::transfer::Transport;
use dbsync_protocol::codec::Limits;
use quinn::Endpoint;

use crate::AppState;

/// Accepts connections on `endpoint` until `shutdown` resolves, then closes it.
pub async fn serve(endpoint: Endpoint, state: AppState, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let state = state.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(connection) => serve_connection(connection, state).await,
                        Err(err) => tracing::debug!(error = %err, "QUIC handshake failed"),
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    state.stop_sessions();
    endpoint.close(0u32.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
}

async fn serve_connection(connection: quinn::Connection, state: AppState) {
    let client_ip = connection.remote_address().ip();
    tracing::debug!(client = %client_ip, "QUIC connection");
    let connection = Arc::new(connection);
    while let Ok((send, recv)) = connection.accept_bi().await {
        let state = state.clone();
        tokio::spawn(async move {
            let limits = Limits::default();
            let link = Link::spawn(QuicReader::new(recv, limits), QuicWriter::new(send), limits);
            crate::session::serve(&state, link, limits, client_ip, None, Transport::Quic).await;
        });
    }
}
