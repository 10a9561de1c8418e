//! dbsync HTTP surface: the peer API other sites call ([`peer_api`]), the admin JSON API
//! ([`admin_api`]) and the server that runs them with inbound limits ([`server`]).

pub mod admin_api;
mod client_ip;
mod error;
mod health;
mod openapi;
pub mod pages;
pub mod peer_api;
pub mod quic;
pub mod server;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use dbsync_agent::Agent;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use client_ip::TrustedProxies;
pub use error::ApiError;

/// What every handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The site's engine.
    pub agent: Arc<Agent>,
    /// Which peers' `X-Forwarded-For` is believed.
    pub proxies: Arc<TrustedProxies>,
    /// Per-client-IP limiter of the peer API.
    pub(crate) peer_limiter: Arc<peer_api::PeerLimiter>,
    /// Signed-in browsers of the admin pages.
    pub(crate) web_sessions: Arc<pages::auth::Sessions>,
    /// Per-client-IP limiter of admin-page sign-in attempts.
    pub(crate) login_limiter: Arc<peer_api::PeerLimiter>,
    /// Set when the server shuts down: running sessions end.
    sessions_stop: Arc<tokio::sync::watch::Sender<bool>>,
    /// Caps on open connections (TCP and QUIC), per agent and per client address.
    pub connections: dbsync_agent::admission::Admission,
    /// Caps on open data-plane sessions (both transports), per agent and per client address.
    pub sessions: dbsync_agent::admission::Admission,
}

impl AppState {
    /// State for `agent`, with limits from its configuration.
    pub fn new(agent: Arc<Agent>) -> Self {
        let server = &agent.config.server;
        let proxies = Arc::new(TrustedProxies::parse(&server.trusted_proxies));
        let peer_limiter = Arc::new(peer_api::limiter(server.peer_rate_limit_per_minute));
        let connections = dbsync_agent::admission::Admission::new(
            server.connection_cap(),
            server.max_connections_per_ip,
        );
        let sessions = dbsync_agent::admission::Admission::new(
            server.session_cap(),
            server.max_sessions_per_ip,
        );
        let web_sessions = Arc::new(pages::auth::Sessions::new(
            agent.store.clone(),
            Arc::clone(&agent.clock),
        ));
        Self {
            agent,
            proxies,
            peer_limiter,
            web_sessions,
            login_limiter: Arc::new(peer_api::limiter(pages::LOGIN_ATTEMPTS_PER_MINUTE)),
            sessions_stop: Arc::new(tokio::sync::watch::channel(false).0),
            connections,
            sessions,
        }
    }

    /// Ends every running data-plane session (at shutdown: upgraded WebSockets and QUIC
    /// streams outlive the HTTP server's graceful shutdown otherwise). Receivers resume later.
    pub fn stop_sessions(&self) {
        self.sessions_stop.send_replace(true);
    }

    /// Resolves once [`AppState::stop_sessions`] was called.
    pub(crate) fn sessions_stopped(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut stop = self.sessions_stop.subscribe();
        async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
    }
}

/// Every route of the agent, with the body limit and request timeout from the configuration.
pub fn router(state: AppState) -> Router {
    let server = &state.agent.config.server;
    let body_limit = server.max_body_bytes;
    let timeout = Duration::from_secs(server.request_timeout_secs);
    let (apis, document) = openapi::routes(state.clone()).split_for_parts();
    Router::new()
        .merge(apis.layer(axum::Extension(Arc::new(document))))
        .route("/db-sync/ws", axum::routing::get(session::upgrade))
        .merge(pages::routes(state.clone()))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Method, path, status and latency at debug level; headers (credentials) are never logged.
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
