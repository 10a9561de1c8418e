//! The admin JSON API under `/admin/db-sync/api/`, authenticated by admin bearer tokens
//! (`dbsync admin-tokens create <name>`). Actions are audited as `admin:<token name>`.

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use dbsync_agent::audit::Actor;
use dbsync_agent::config::Secret;
use dbsync_agent::connection::{
    ApprovalMode, ConflictStrategy, ConnectionFilter, ConnectionSettings, NewConnection,
    PasswordChange,
};
use dbsync_agent::registration::StatusChange;
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};
use dbsync_agent::{ConnectionStatus, Direction};
use dbsync_protocol::peer::ErrorBody;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::ApiJson;
use crate::peer_api::bearer;
use crate::{ApiError, AppState};

/// Prefix of every admin API path.
pub const PREFIX: &str = "/admin/db-sync/api";

/// Tag of the admin API in the OpenAPI document.
const TAG: &str = "admin";

/// The admin routes, behind admin-token authentication, with their OpenAPI description.
pub(crate) fn routes(state: AppState) -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(list_connections, create_connection))
        .routes(routes!(
            show_connection,
            update_connection,
            delete_connection
        ))
        .routes(routes!(approve_connection))
        .routes(routes!(suspend_connection))
        .routes(routes!(reactivate_connection))
        .routes(routes!(revoke_connection))
        .routes(routes!(regenerate_token))
        .routes(routes!(connection_stats))
        .routes(routes!(list_schedules))
        .routes(routes!(run_schedule))
        .routes(routes!(list_transfers))
        .routes(routes!(show_transfer))
        .routes(routes!(approve_transfer))
        .routes(routes!(deny_transfer))
        .routes(routes!(cancel_transfer))
        .routes(routes!(show_incoming, set_incoming))
        .route_layer(middleware::from_fn_with_state(state, authenticate));
    OpenApiRouter::new().nest(PREFIX, api)
}

/// `GET /metrics`: the agent's Prometheus metrics, behind an admin token like the admin API
/// (scrape with `authorization: { credentials: <token> }`).
pub(crate) fn metrics_routes(state: AppState) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(metrics))
        .route_layer(middleware::from_fn_with_state(state, authenticate))
}

/// The agent's Prometheus metrics (OpenMetrics text); see docs/operations.md.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(("admin_token" = [])),
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"),
        (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state.agent.metrics.render(&state.agent.store).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(presented) = bearer(request.headers()) else {
        return ApiError::unauthorized("an admin bearer token is required").into_response();
    };
    match state
        .agent
        .store
        .verify_admin_token(presented, state.agent.now())
        .await
    {
        Ok(Some(token)) => {
            request.extensions_mut().insert(Actor::admin(&token.name));
            next.run(request).await
        }
        Ok(None) => {
            ApiError::unauthorized("unknown, malformed or revoked admin token").into_response()
        }
        Err(err) => ApiError::from(err).into_response(),
    }
}

fn parse<T: std::str::FromStr<Err = dbsync_agent::Error>>(
    value: Option<&str>,
) -> Result<Option<T>, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .transpose()
        .map_err(ApiError::from)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConnectionQuery {
    /// pending, active, suspended, revoked or expired.
    status: Option<String>,
    /// sender or receiver.
    direction: Option<String>,
}

/// A connection named in a path: its id or its name.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct ConnectionPath {
    /// The connection's id or name.
    id: String,
}

/// A transfer named in a path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct TransferPath {
    /// The transfer's id.
    id: Uuid,
}

/// Every connection, filtered by status and direction.
#[utoipa::path(get, path = "/connections", tag = TAG, params(ConnectionQuery),
    security(("admin_token" = [])),
    responses((status = 200, description = "`{ \"items\": [connection, ...] }`", body = Object),
        (status = 422, description = "invalid_input: an unknown status or direction", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn list_connections(
    State(state): State<AppState>,
    Query(query): Query<ConnectionQuery>,
) -> Result<Json<Value>, ApiError> {
    let filter = ConnectionFilter {
        status: parse::<ConnectionStatus>(query.status.as_deref())?,
        direction: parse::<Direction>(query.direction.as_deref())?,
    };
    let connections = state.agent.store.list_connections(&filter).await?;
    Ok(Json(json!({ "items": connections })))
}

/// Deserializes a field that may be absent (keep), null (clear) or a value (set).
fn double_option<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Sender-side controls in a create or update body; absent fields keep their value (defaults on
/// create); `null` clears an optional limit.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    /// auto_approve, require_approval or per_table.
    #[schema(value_type = Option<String>)]
    approval_mode: Option<ApprovalMode>,
    allowed_tables: Option<Vec<String>>,
    excluded_tables: Option<Vec<String>>,
    auto_approve_tables: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    max_downloads: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    max_records_total: Option<Option<i64>>,
    max_records_per_request: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    download_password: Option<Option<String>>,
    ip_whitelist: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<[u8; 2]>)]
    allowed_hours: Option<Option<[u8; 2]>>,
    time_zone: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    expires_at: Option<Option<DateTime<Utc>>>,
    /// skip, overwrite, merge, append or mirror.
    #[schema(value_type = Option<String>)]
    default_conflict_strategy: Option<ConflictStrategy>,
    auto_sync_enabled: Option<bool>,
    auto_sync_tables: Option<Vec<String>>,
    auto_sync_interval_minutes: Option<i64>,
}

impl SettingsBody {
    fn apply(self, mut s: ConnectionSettings) -> (ConnectionSettings, PasswordChange) {
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(value) = self.$field { s.$field = value; })* };
        }
        set!(
            approval_mode,
            allowed_tables,
            excluded_tables,
            auto_approve_tables,
            max_downloads,
            max_records_total,
            max_records_per_request,
            rate_limit_per_minute,
            ip_whitelist,
            time_zone,
            expires_at,
            default_conflict_strategy,
            auto_sync_enabled,
            auto_sync_tables,
            auto_sync_interval_minutes
        );
        if let Some(hours) = self.allowed_hours {
            s.allowed_hours = hours.map(|[start, end]| (start, end));
        }
        let password = match self.download_password {
            None => PasswordChange::Keep,
            Some(None) => PasswordChange::Clear,
            Some(Some(password)) => PasswordChange::Set(Secret::new(password)),
        };
        (s, password)
    }
}

#[derive(Debug, Deserialize, ToSchema)]
struct CreateBody {
    name: String,
    site_url: String,
    /// The remote site's incoming password, when it requires one.
    remote_password: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = SettingsBody)]
    settings: Value,
}

/// Creates a sender connection (its token shown once) and registers it with the remote site.
#[utoipa::path(post, path = "/connections", tag = TAG, request_body = CreateBody,
    security(("admin_token" = [])),
    responses((status = 201, description = "`connection`, `token` (shown once), `registration`", body = Object),
        (status = 422, description = "invalid_input", body = ErrorBody),
        (status = 409, description = "conflict: the name or site is taken", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn create_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiJson(body): ApiJson<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let settings: SettingsBody = serde_json::from_value(body.settings).map_err(|err| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            err.to_string(),
        )
    })?;
    let (mut settings, password) = settings.apply(ConnectionSettings::default());
    if let PasswordChange::Set(secret) = password {
        settings.download_password = Some(secret);
    }
    let created = state
        .agent
        .create_sender(
            NewConnection {
                name: body.name,
                site_url: body.site_url,
                settings,
            },
            body.remote_password.as_deref(),
            &actor,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "connection": created.connection,
            "token": created.token.expose(),
            "notice": "the token is shown only once; store it now",
            "registration": created.registration,
        })),
    ))
}

/// One connection with its statistics.
#[utoipa::path(get, path = "/connections/{id}", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`connection`, `stats`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn show_connection(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let connection = state.agent.store.get_connection(&id).await?;
    let stats = state.agent.store.connection_stats(connection.id).await?;
    Ok(Json(json!({ "connection": connection, "stats": stats })))
}

/// Changes a connection's controls; absent fields keep their value, `null` clears a limit.
#[utoipa::path(patch, path = "/connections/{id}", tag = TAG, params(ConnectionPath), security(("admin_token" = [])), request_body = SettingsBody,
    responses((status = 200, description = "`connection`", body = Object),
        (status = 422, description = "invalid_input", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn update_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let patch: SettingsBody = serde_json::from_value(body).map_err(|err| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            err.to_string(),
        )
    })?;
    let store = &state.agent.store;
    let current = store.get_connection(&id).await?;
    let (settings, password) = patch.apply(current.settings());
    let updated = store
        .update_connection_settings(&id, &settings, password, &actor, state.agent.now())
        .await?;
    Ok(Json(json!({ "connection": updated })))
}

/// Deletes a connection after telling the peer; its transfers stay in the history.
#[utoipa::path(delete, path = "/connections/{id}", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`deleted`, `peer_push`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn delete_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (deleted, push) = state.agent.delete_connection(&id, &actor).await?;
    state.agent.validator.forget(deleted.id);
    Ok(Json(json!({ "deleted": deleted, "peer_push": push })))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
struct ReasonBody {
    /// Why (required to suspend and revoke).
    reason: Option<String>,
}

async fn status_change(
    state: &AppState,
    actor: &Actor,
    id: &str,
    change: StatusChange,
) -> Result<Json<Value>, ApiError> {
    let (connection, push) = state.agent.change_status(id, change, actor).await?;
    Ok(Json(json!({ "connection": connection, "peer_push": push })))
}

fn reason(body: ReasonBody) -> String {
    body.reason.unwrap_or_default()
}

/// Pending → active, pushed to the peer.
#[utoipa::path(post, path = "/connections/{id}/approve", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`connection`, `peer_push`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn approve_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    status_change(&state, &actor, &id, StatusChange::Approve).await
}

/// Pending | active → suspended, with a reason, pushed to the peer.
#[utoipa::path(post, path = "/connections/{id}/suspend", tag = TAG, params(ConnectionPath), security(("admin_token" = [])), request_body = ReasonBody,
    responses((status = 200, description = "`connection`, `peer_push`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn suspend_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    status_change(&state, &actor, &id, StatusChange::Suspend(reason(body))).await
}

/// Suspended → active, pushed to the peer.
#[utoipa::path(post, path = "/connections/{id}/reactivate", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`connection`, `peer_push`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn reactivate_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    status_change(&state, &actor, &id, StatusChange::Reactivate).await
}

/// → revoked (terminal), with a reason, pushed to the peer.
#[utoipa::path(post, path = "/connections/{id}/revoke", tag = TAG, params(ConnectionPath), security(("admin_token" = [])), request_body = ReasonBody,
    responses((status = 200, description = "`connection`, `peer_push`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn revoke_connection(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    status_change(&state, &actor, &id, StatusChange::Revoke(reason(body))).await
}

/// A new token for a sender connection (shown once), handed to the receiver.
#[utoipa::path(post, path = "/connections/{id}/regenerate-token", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`connection`, `token` (shown once), `token_push`", body = Object),
        (status = 422, description = "invalid_input: a receiver connection", body = ErrorBody),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn regenerate_token(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (created, push) = state.agent.regenerate_token(&id, &actor).await?;
    Ok(Json(json!({
        "connection": created.connection,
        "token": created.token.expose(),
        "token_push": push,
        "notice": "the token is shown only once; the old token no longer works",
    })))
}

/// Totals of a connection's transfers.
#[utoipa::path(get, path = "/connections/{id}/stats", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 200, description = "`connection_id`, `stats`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn connection_stats(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let connection = state.agent.store.get_connection(&id).await?;
    let stats = state.agent.store.connection_stats(connection.id).await?;
    Ok(Json(
        json!({ "connection_id": connection.id, "stats": stats }),
    ))
}

/// Every auto-sync schedule with its last run and next due time.
#[utoipa::path(get, path = "/schedules", tag = TAG, security(("admin_token" = [])),
    responses((status = 200, description = "`{ \"items\": [...] }`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn list_schedules(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = &state.agent.store;
    store.sync_schedules(state.agent.now()).await?;
    let mut items = Vec::new();
    for schedule in store.list_schedules().await? {
        let connection = store
            .get_connection(&schedule.connection_id.to_string())
            .await?;
        items.push(json!({
            "connection": connection.name,
            "tables": connection.auto_sync_tables,
            "interval_minutes": connection.auto_sync_interval_minutes,
            "schedule": schedule,
        }));
    }
    Ok(Json(json!({ "items": items })))
}

/// Starts a connection's scheduled sync now (202); its outcome shows in the schedules and the
/// transfer history.
/// Starts a connection's scheduled sync now.
#[utoipa::path(post, path = "/schedules/{id}/run", tag = TAG, params(ConnectionPath), security(("admin_token" = [])),
    responses((status = 202, description = "`connection`, `started`", body = Object),
        (status = 422, description = "invalid_input: no auto-sync", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn run_schedule(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let connection = state.agent.store.get_connection(&id).await?;
    if !connection.auto_sync_enabled {
        return Err(dbsync_agent::Error::Invalid {
            field: "connection",
            reason: format!("{} has no auto-sync", connection.name),
        }
        .into());
    }
    let agent = std::sync::Arc::clone(&state.agent);
    let name = connection.name.clone();
    tokio::spawn(async move {
        if let Err(err) = agent
            .run_schedule_now(&name, &dbsync_agent::Agent::scheduler_name())
            .await
        {
            tracing::warn!(connection = %name, error = %err, "scheduled sync could not start");
        }
    });
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(json!({ "connection": connection.name, "started": true })),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TransferQuery {
    /// A connection's id or name.
    connection: Option<String>,
    /// incoming or outgoing.
    direction: Option<String>,
    /// pending_approval, approved, in_progress, completed, failed, denied, cancelled, expired.
    status: Option<String>,
    /// A table name.
    table: Option<String>,
    /// Started at or after (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Started before (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// Page number from 1.
    page: Option<i64>,
    /// Items per page, 1 to 500.
    per_page: Option<i64>,
}

/// The transfer history, newest first, filtered and paged.
#[utoipa::path(get, path = "/transfers", tag = TAG, params(TransferQuery),
    security(("admin_token" = [])),
    responses((status = 200, description = "`items`, `total`, `page`, `per_page`", body = Object),
        (status = 422, description = "invalid_input", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn list_transfers(
    State(state): State<AppState>,
    Query(query): Query<TransferQuery>,
) -> Result<Json<Value>, ApiError> {
    let connection_id = match query.connection.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => Some(state.agent.store.get_connection(c).await?.id),
        None => None,
    };
    let page = state
        .agent
        .store
        .list_transfers(&TransferFilter {
            connection_id,
            direction: parse::<TransferDirection>(query.direction.as_deref())?,
            status: parse::<TransferStatus>(query.status.as_deref())?,
            table_name: query.table.filter(|t| !t.is_empty()),
            since: query.since,
            until: query.until,
            page: query.page,
            per_page: query.per_page,
        })
        .await?;
    Ok(Json(serde_json::to_value(page).unwrap_or_default()))
}

/// One transfer.
#[utoipa::path(get, path = "/transfers/{id}", tag = TAG, params(TransferPath), security(("admin_token" = [])),
    responses((status = 200, description = "`transfer`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn show_transfer(
    State(state): State<AppState>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let transfer = state.agent.store.get_transfer(id).await?;
    Ok(Json(json!({ "transfer": transfer })))
}

/// Approves a transfer waiting for approval.
#[utoipa::path(post, path = "/transfers/{id}/approve", tag = TAG, params(TransferPath), security(("admin_token" = [])),
    responses((status = 200, description = "`transfer`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn approve_transfer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let transfer = state
        .agent
        .store
        .approve_transfer(id, &actor, state.agent.now())
        .await?;
    Ok(Json(json!({ "transfer": transfer })))
}

/// Denies a transfer waiting for approval, with a reason.
#[utoipa::path(post, path = "/transfers/{id}/deny", tag = TAG, params(TransferPath), security(("admin_token" = [])), request_body = ReasonBody,
    responses((status = 200, description = "`transfer`", body = Object),
        (status = 409, description = "illegal_transition", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn deny_transfer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<Uuid>,
    ApiJson(body): ApiJson<ReasonBody>,
) -> Result<Json<Value>, ApiError> {
    let transfer = state
        .agent
        .store
        .deny_transfer(id, &reason(body), &actor, state.agent.now())
        .await?;
    Ok(Json(json!({ "transfer": transfer })))
}

/// Cancels a transfer that has not finished; a running pull stops at its next batch and can be
/// resumed.
#[utoipa::path(post, path = "/transfers/{id}/cancel", tag = TAG, params(TransferPath), security(("admin_token" = [])),
    responses((status = 200, description = "`transfer`", body = Object),
        (status = 409, description = "illegal_transition: already finished", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody), (status = 404, description = "not_found", body = ErrorBody)))]
async fn cancel_transfer(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let transfer = state
        .agent
        .store
        .cancel_transfer(id, &actor, state.agent.now())
        .await?;
    Ok(Json(json!({ "transfer": transfer })))
}

/// How this site answers registrations from other sites.
#[utoipa::path(get, path = "/settings/incoming", tag = TAG, security(("admin_token" = [])),
    responses((status = 200, description = "`settings`", body = Object), (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn show_incoming(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let settings = state.agent.store.settings().await?;
    Ok(Json(json!({ "settings": settings })))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct IncomingBody {
    /// auto_accept, require_approval, require_password or deny_all.
    #[schema(value_type = String)]
    mode: IncomingMode,
    password: Option<String>,
}

/// Sets the incoming mode (and password for require_password).
#[utoipa::path(put, path = "/settings/incoming", tag = TAG, request_body = IncomingBody,
    security(("admin_token" = [])),
    responses((status = 200, description = "`settings`", body = Object),
        (status = 422, description = "invalid_input", body = ErrorBody), (status = 401, description = "unauthorized", body = ErrorBody)))]
async fn set_incoming(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    ApiJson(body): ApiJson<IncomingBody>,
) -> Result<Json<Value>, ApiError> {
    let settings = state
        .agent
        .store
        .set_incoming(
            body.mode,
            body.password.as_deref(),
            &actor,
            state.agent.now(),
        )
        .await?;
    Ok(Json(json!({ "settings": settings })))
}
