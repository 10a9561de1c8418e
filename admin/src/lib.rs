//! dbsync HTTP surface: the peer API other sites call (registration, status updates), the admin
//! JSON API and the admin pages.
//!
//! Skeleton until `dbsync serve` lands: the router below answers only the health check, so the
//! binary and the tests can already mount it.

use axum::Router;
use axum::routing::get;

/// The agent's HTTP routes.
pub fn router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}
