//! The peer API other sites call (SPEC section 5), rate limited per client IP.

use std::net::IpAddr;
use std::num::NonZeroU32;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use dbsync_protocol::peer::ErrorBody;
use dbsync_protocol::peer::{
    ConnectionState, REDEEM_SHARE_PATH, REGISTER_PATH, ROTATE_TOKEN_PATH, RedeemShareRequest,
    RedeemShareResponse, RegisterRequest, RegisterResponse, RotateTokenRequest, STATUS_PATH,
    StatusResponse, UPDATE_STATUS_PATH, UpdateStatusRequest, VERIFY_PATH, VerifyRequest,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::client_ip::ClientIp;
use crate::error::ApiJson;
use crate::{ApiError, AppState};

/// Keyed limiter of peer API requests per client IP.
pub(crate) type PeerLimiter = DefaultKeyedRateLimiter<IpAddr>;

pub(crate) fn limiter(per_minute: u32) -> PeerLimiter {
    RateLimiter::keyed(Quota::per_minute(
        NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN),
    ))
}

/// Tag of the peer API in the OpenAPI document.
pub(crate) const TAG: &str = "peer";

/// The peer routes, with their OpenAPI description.
pub(crate) fn routes(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(register))
        .routes(routes!(update_status))
        .routes(routes!(verify))
        .routes(routes!(rotate_token))
        .routes(routes!(redeem_share))
        .route_layer(middleware::from_fn_with_state(state, rate_limit))
}

async fn rate_limit(
    State(state): State<AppState>,
    client: ClientIp,
    request: Request,
    next: Next,
) -> Response {
    match state.peer_limiter.check_key(&client.0) {
        Ok(()) => next.run(request).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            ApiError::rate_limited(wait.as_secs() + 1).into_response()
        }
    }
}

/// What this site is: identity, incoming mode, protocol versions and transports.
#[utoipa::path(get, path = STATUS_PATH, tag = TAG,
    responses((status = 200, body = StatusResponse), (status = 429, body = ErrorBody)))]
async fn status(State(state): State<AppState>) -> Result<axum::Json<StatusResponse>, ApiError> {
    let settings = state.agent.store.settings().await?;
    Ok(axum::Json(StatusResponse {
        enabled: settings.incoming_mode != dbsync_agent::settings::IncomingMode::DenyAll,
        incoming_mode: settings.incoming_mode.to_string(),
        password_required: settings.incoming_mode
            == dbsync_agent::settings::IncomingMode::RequirePassword,
        protocol_versions: dbsync_protocol::SUPPORTED_VERSIONS.to_vec(),
        transports: std::iter::once(dbsync_protocol::peer::TransportOffer {
            kind: "websocket".into(),
            port: None,
            cert_fingerprint: None,
        })
        .chain(state.agent.quic_offer().await)
        .collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        site_id: settings.site_id.to_string(),
        site_name: settings.site_name,
    }))
}

/// A sender site asks this site to hold the matching receiver connection.
#[utoipa::path(post, path = REGISTER_PATH, tag = TAG, request_body = RegisterRequest,
    responses(
        (status = 201, body = RegisterResponse),
        (status = 400, description = "malformed body or token", body = ErrorBody),
        (status = 401, description = "password_required or invalid_password", body = ErrorBody),
        (status = 403, description = "registration_disabled, self_connection", body = ErrorBody),
        (status = 409, description = "duplicate_connection", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    client: ClientIp,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, axum::Json<RegisterResponse>), ApiError> {
    let reply = state.agent.handle_register(request, client.0).await?;
    Ok((StatusCode::CREATED, axum::Json(reply)))
}

/// The bearer credential of a request, if any.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The peer's record of a connection changed status.
#[utoipa::path(post, path = UPDATE_STATUS_PATH, tag = TAG, request_body = UpdateStatusRequest,
    security(("connection_token" = [])),
    responses(
        (status = 200, description = "the status on this side after the change", body = ConnectionState),
        (status = 400, description = "invalid_status", body = ErrorBody),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn update_status(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(request): ApiJson<UpdateStatusRequest>,
) -> Result<axum::Json<ConnectionState>, ApiError> {
    let token = bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("a bearer connection token is required"))?;
    Ok(axum::Json(
        state.agent.handle_update_status(token, request).await?,
    ))
}

/// Whether the caller's connection still exists here; hands over a peer token.
#[utoipa::path(post, path = VERIFY_PATH, tag = TAG, request_body = VerifyRequest,
    security(("connection_token" = [])),
    responses(
        (status = 200, body = ConnectionState),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn verify(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(request): ApiJson<VerifyRequest>,
) -> Result<axum::Json<ConnectionState>, ApiError> {
    let token = bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("a bearer connection token is required"))?;
    Ok(axum::Json(state.agent.handle_verify(token, request).await?))
}

/// The sender hands over a regenerated connection token.
#[utoipa::path(post, path = ROTATE_TOKEN_PATH, tag = TAG, request_body = RotateTokenRequest,
    security(("connection_token" = [])),
    responses(
        (status = 200, body = ConnectionState),
        (status = 400, description = "invalid_token, wrong_direction", body = ErrorBody),
        (status = 401, description = "invalid_token", body = ErrorBody),
        (status = 409, description = "token_mismatch, connection_closed", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn rotate_token(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(request): ApiJson<RotateTokenRequest>,
) -> Result<axum::Json<ConnectionState>, ApiError> {
    let token = bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("a bearer connection token is required"))?;
    Ok(axum::Json(
        state.agent.handle_rotate_token(token, request).await?,
    ))
}

/// Trades a one-time share code for a connection token good for the shared tables.
#[utoipa::path(post, path = REDEEM_SHARE_PATH, tag = TAG, request_body = RedeemShareRequest,
    responses(
        (status = 200, body = RedeemShareResponse),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "invalid_share_code: unknown, used, expired or revoked", body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn redeem_share(
    State(state): State<AppState>,
    client: ClientIp,
    ApiJson(request): ApiJson<RedeemShareRequest>,
) -> Result<axum::Json<RedeemShareResponse>, ApiError> {
    Ok(axum::Json(
        state.agent.handle_redeem_share(request, client.0).await?,
    ))
}
