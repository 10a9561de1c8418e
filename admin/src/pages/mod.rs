//! The admin web pages under `/admin/db-sync`: server-rendered HTML (maud, compiled into the
//! binary), one stylesheet and one small script served by the agent itself, nothing from the
//! network and no build step.
//!
//! - [`overview`]: connections by status, transfers today, pending approvals, incoming settings.
//! - [`connections`]: the list with usage against limits, the new-connection form, one
//!   connection's settings, stats and lifecycle actions.
//! - [`history`]: transfers with filters and pages, approve/deny, in-flight pulls with progress.
//!
//! [`auth`] guards them: admin-token sign-in, an HttpOnly SameSite=Strict session cookie, a CSRF
//! token on every form, logout.

pub(crate) mod auth;
mod chart;
mod connections;
mod forms;
mod history;
pub(crate) mod layout;
mod overview;
pub(crate) mod viewer;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;

/// Prefix of every admin page.
pub const PREFIX: &str = "/admin/db-sync";
/// Sign-in attempts per minute per client IP.
pub(crate) const LOGIN_ATTEMPTS_PER_MINUTE: u32 = 10;
/// Bumped when the stylesheet or script changes (their URLs carry it, so caches refresh).
const ASSET_VERSION: &str = "1";

const STYLESHEET: &str = include_str!("../../assets/admin.css");
const SCRIPT: &str = include_str!("../../assets/admin.js");

/// The page routes: sign-in and assets open, everything else behind a session.
pub(crate) fn routes(state: AppState) -> Router<AppState> {
    let guarded = Router::new()
        .route(PREFIX, get(overview::show))
        .route(&format!("{PREFIX}/"), get(overview::show))
        .route(
            &format!("{PREFIX}/settings/incoming"),
            post(overview::set_incoming),
        )
        .route(&format!("{PREFIX}/logout"), post(auth::logout))
        .route(
            &format!("{PREFIX}/connections"),
            get(connections::list).post(connections::create),
        )
        .route(
            &format!("{PREFIX}/connections/{{id}}"),
            get(connections::show),
        )
        .route(
            &format!("{PREFIX}/connections/{{id}}/settings"),
            post(connections::update),
        )
        .route(
            &format!("{PREFIX}/connections/{{id}}/{{action}}"),
            post(connections::act),
        )
        .route(&format!("{PREFIX}/history"), get(history::list))
        .route(&format!("{PREFIX}/history/live"), get(history::live))
        .route(
            &format!("{PREFIX}/history/{{id}}/{{action}}"),
            post(history::act),
        )
        .route_layer(middleware::from_fn_with_state(state, auth::require_session));
    Router::new()
        .route(
            &format!("{PREFIX}/login"),
            get(auth::login_form).post(auth::login),
        )
        .route(&format!("{PREFIX}/assets/admin.css"), get(stylesheet))
        .route(&format!("{PREFIX}/assets/admin.js"), get(script))
        .merge(guarded)
        .route_layer(middleware::from_fn(security_headers))
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// Headers every page carries: scripts and styles only from this agent (no inline script), no
/// framing, no referrer, no content sniffing.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
