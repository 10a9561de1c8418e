//! The sender's QUIC endpoint: each bidirectional stream a receiver opens carries one session,
//! served by the same [`Session`](crate::session) as the WebSocket endpoint. A connection may
//! have at most `quic.max_streams` streams open (the transport refuses more), counts against the
//! agent's connection caps, and is closed when it has no session for [`STREAMLESS_TIMEOUT`]
//! (the server sends no keep-alives of its own, so an idle connection also ends at the
//! transport's idle timeout). The client address is the UDP source (QUIC has no forwarding
//! proxies to believe).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dbsync_agent::link::Link;
use dbsync_agent::quic::{QuicReader, QuicWriter};
use dbsync_agent::transfer::Transport;
use dbsync_protocol::codec::Limits;
use quinn::Endpoint;

use crate::AppState;

/// How long a QUIC connection may stay open without a session stream: from the handshake to
/// its first stream, and after its last session ended.
pub const STREAMLESS_TIMEOUT: Duration = crate::session::HELLO_TIMEOUT;

/// Accepts connections on `endpoint` until `shutdown` resolves, then closes it.
pub async fn serve(endpoint: Endpoint, state: AppState, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let permit = match state.connections.admit(incoming.remote_address().ip()) {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        tracing::debug!(client = %incoming.remote_address(), reason = %refusal, "QUIC connection refused");
                        incoming.refuse();
                        continue;
                    }
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let _permit = permit;
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
    let running = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(tokio::sync::Notify::new());
    loop {
        // With no session running, the next stream must come soon.
        let accepted = if running.load(Ordering::Acquire) == 0 {
            match tokio::time::timeout(STREAMLESS_TIMEOUT, connection.accept_bi()).await {
                Ok(accepted) => accepted,
                Err(_) => {
                    if running.load(Ordering::Acquire) > 0 {
                        continue;
                    }
                    connection.close(0u32.into(), b"no session");
                    break;
                }
            }
        } else {
            tokio::select! {
                accepted = connection.accept_bi() => accepted,
                () = ended.notified() => continue,
            }
        };
        let Ok((send, recv)) = accepted else { break };
        running.fetch_add(1, Ordering::AcqRel);
        let (state, running, ended) = (state.clone(), Arc::clone(&running), Arc::clone(&ended));
        tokio::spawn(async move {
            let limits = Limits::requests();
            let link = Link::spawn(QuicReader::new(recv, limits), QuicWriter::new(send), limits);
            crate::session::serve(&state, link, client_ip, None, Transport::Quic).await;
            running.fetch_sub(1, Ordering::AcqRel);
            ended.notify_one();
        });
    }
}
