//! The HTTP server of `dbsync serve`: hyper with a header-read timeout (closing slow-header
//! attacks), caps on open connections per agent and per client address, a timer on silent and
//! idle connections, the client address in each request, WebSocket upgrades, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use dbsync_agent::admission::{Admission, Permit};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

/// How long in-flight requests get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ConnectionRules {
    /// Time to the first byte, and to complete request headers.
    pub header_read_timeout: Duration,
    /// Silence allowed after the first byte (between requests, inside a WebSocket session).
    pub idle_timeout: Duration,
    /// Caps on open connections.
    pub admission: Admission,
}

/// Serves `app` on `listener` until `shutdown` completes, then drains connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    rules: ConnectionRules,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(rules.header_read_timeout);
    tokio::pin!(shutdown);
    let mut refused_logged = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, most likely: wait for some to come back
                        // rather than spin (and log it once a second at most).
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let permit = match rules.admission.admit(peer.ip()) {
                    Ok(permit) => {
                        refused_logged = false;
                        permit
                    }
                    Err(refusal) => {
                        // Closed at once: the descriptor comes back before it can pile up.
                        if !refused_logged {
                            tracing::warn!(peer = %peer, reason = %refusal, "connection refused");
                            refused_logged = true;
                        }
                        drop(stream);
                        continue;
                    }
                };
                let io = Watched::new(stream, permit, rules.header_read_timeout, rules.idle_timeout);
                let app = app.clone();
                let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    app.clone().oneshot(request)
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
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

/// A TCP connection on a timer: a read that waits longer than the connection's silence allowance
/// (`first` before any byte came, `idle` after) fails with `TimedOut`, which closes it, whether
/// hyper is reading the next request or an upgraded WebSocket session is. Holds the
/// connection's place under the caps until it is dropped.
struct Watched {
    stream: TcpStream,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    _permit: Permit,
}

impl Watched {
    fn new(stream: TcpStream, permit: Permit, first: Duration, idle: Duration) -> Self {
        Self {
            stream,
            idle,
            timer: Box::pin(tokio::time::sleep(first)),
            _permit: permit,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle;
                    self.timer.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client was silent for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Binds the site's QUIC endpoint when `quic.enabled` (the certificate is loaded or created).
pub async fn bind_quic(state: &crate::AppState) -> dbsync_agent::Result<Option<quinn::Endpoint>> {
    let agent = &state.agent;
    if !agent.config.quic.enabled {
        return Ok(None);
    }
    let identity = agent.quic_identity().await?;
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
    let server = &state.agent.config.server;
    let rules = ConnectionRules {
        header_read_timeout: Duration::from_secs(server.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(server.idle_timeout_secs),
        admission: state.connections.clone(),
    };
    let app = crate::router(state.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let quic_task = quic.map(|endpoint| {
        let mut stopped = stopped.clone();
        tokio::spawn(crate::quic::serve(endpoint, state.clone(), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }))
    });
    let outcome = serve(listener, app, rules, shutdown).await;
    state.stop_sessions();
    let _ = stop.send(true);
    if let Some(task) = quic_task {
        let _ = task.await;
    }
    outcome
}
