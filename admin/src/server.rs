//! The HTTP server of `dbsync serve`: hyper with a header-read timeout (closing slow-header
//! attacks), the client address in each request, WebSocket upgrades, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

/// How long in-flight requests get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` completes, then drains connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    app.clone().oneshot(request)
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, peer = %peer, "connection closed with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over; closing remaining connections"),
    }
    Ok(())
}

/// Binds the site's QUIC endpoint when `quic.enabled` (the certificate is loaded or created).
pub fn bind_quic(state: &crate::AppState) -> dbsync_agent::Result<Option<quinn::Endpoint>> {
    let agent = &state.agent;
    if !agent.config.quic.enabled {
        return Ok(None);
    }
    let identity = agent.quic_identity()?;
    dbsync_agent::quic::server_endpoint(agent.quic_listen(), &identity, &agent.config.quic)
        .map(Some)
}

/// Serves a whole site until `shutdown` completes: HTTP (peer API, admin API, WebSocket
/// sessions) on `listener`, and QUIC sessions on `quic` when given. At shutdown the HTTP server
/// drains, running sessions end, and the QUIC endpoint closes.
pub async fn serve_site(
    listener: TcpListener,
    state: crate::AppState,
    quic: Option<quinn::Endpoint>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let header_timeout = Duration::from_secs(state.agent.config.server.header_read_timeout_secs);
    let app = crate::router(state.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let quic_task = quic.map(|endpoint| {
        let mut stopped = stopped.clone();
        tokio::spawn(crate::quic::serve(endpoint, state.clone(), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }))
    });
    let outcome = serve(listener, app, header_timeout, shutdown).await;
    state.stop_sessions();
    let _ = stop.send(true);
    if let Some(task) = quic_task {
        let _ = task.await;
    }
    outcome
}
