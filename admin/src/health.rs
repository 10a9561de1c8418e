//! Liveness and readiness, for load balancers and service managers (no credential).

use std::time::Duration;

use axum::http::StatusCode;

use crate::AppState;

/// `200 ok` while the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "alive", content_type = "text/plain")))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// `200 ready` when the state database answers within 5 s, else `503` naming what failed (no
/// detail of the database: the route needs no credential).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready", content_type = "text/plain"),
        (status = 503, description = "the state database does not answer", content_type = "text/plain")))]
pub(crate) async fn readyz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> (StatusCode, &'static str) {
    let ping = tokio::time::timeout(Duration::from_secs(5), state.agent.store.ping()).await;
    match ping {
        Ok(Ok(())) => (StatusCode::OK, "ready"),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness: the state database does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the state database does not answer",
            )
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the state database did not answer within 5 s",
        ),
    }
}
