//! Who may see the admin pages: login with an admin token, then a session cookie; a CSRF token on
//! every form; logout.
//!
//! Sessions live in the state database, shared by every agent of a site (sign in on one, act on
//! another) and kept across restarts. The cookie carries 32 random bytes; the store keeps only
//! their SHA-256, so a copy of the database does not hand out live cookies. Each request re-checks
//! that the admin token behind the session is still unrevoked.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use dbsync_agent::Store;
use dbsync_agent::audit::Actor;
use dbsync_agent::store::web_session::SessionLife;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::viewer::{CSRF_FIELD, Flash, Viewer};
use super::{PREFIX, layout};
use crate::AppState;

/// Name of the session cookie.
pub(crate) const SESSION_COOKIE: &str = "dbsync_session";
/// Name of the cookie that ties the login form to the browser that loaded it.
const LOGIN_COOKIE: &str = "dbsync_login";
/// A session ends after this long without a request.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after login, however busy.
pub(crate) const ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);
/// Most sessions kept at once; the oldest goes first beyond it.
const MAX_SESSIONS: i64 = 1_000;
/// Largest form body read for the CSRF check (the new-connection form is well under it).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub(crate) struct WebSession {
    /// The admin token this session was opened with.
    pub(crate) token_id: Uuid,
    /// Actions are audited as `admin:<name>`.
    pub(crate) token_name: String,
    /// The value every form must echo.
    pub(crate) csrf: String,
    /// One message for the next page (after a redirect).
    pub(crate) flash: Option<Flash>,
}

/// The sessions, kept in the state database (shared by every agent of the site).
#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    store: Store,
    clock: dbsync_agent::clock::SharedClock,
}

const LIFE: SessionLife = SessionLife {
    idle: chrono::Duration::seconds(IDLE_TIMEOUT.as_secs() as i64),
    absolute: chrono::Duration::seconds(ABSOLUTE_TIMEOUT.as_secs() as i64),
    max_sessions: MAX_SESSIONS,
};

fn random_hex() -> String {
    let mut bytes = [0_u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key_of(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    /// Sessions in `store`, timed by `clock`.
    pub(crate) fn new(store: Store, clock: dbsync_agent::clock::SharedClock) -> Self {
        Self { store, clock }
    }

    /// Opens a session for `token_id`/`token_name`; returns the cookie value.
    async fn open(&self, token_id: Uuid, token_name: &str) -> dbsync_agent::Result<String> {
        let cookie = random_hex();
        self.store
            .open_web_session(
                &key_of(&cookie),
                token_id,
                token_name,
                &random_hex(),
                self.clock.now(),
                LIFE,
            )
            .await?;
        Ok(cookie)
    }

    /// The live session behind `cookie`, touched; takes its flash message.
    async fn find(&self, cookie: &str) -> dbsync_agent::Result<Option<([u8; 32], WebSession)>> {
        let key = key_of(cookie);
        let Some(stored) = self
            .store
            .find_web_session(&key, self.clock.now(), LIFE)
            .await?
        else {
            return Ok(None);
        };
        let flash = stored.flash.and_then(|f| {
            Some(Flash {
                error: f.get("error")?.as_bool()?,
                text: f.get("text")?.as_str()?.to_owned(),
            })
        });
        Ok(Some((
            key,
            WebSession {
                token_id: stored.token_id,
                token_name: stored.token_name,
                csrf: stored.csrf,
                flash,
            },
        )))
    }

    async fn close(&self, key: &[u8; 32]) {
        if let Err(err) = self.store.close_web_session(key).await {
            tracing::warn!(error = %err, "could not end an admin page session");
        }
    }

    /// Leaves `flash` for the next page of the session.
    pub(crate) async fn flash(&self, viewer: &Viewer, error: bool, text: impl Into<String>) {
        let flash = serde_json::json!({ "error": error, "text": text.into() });
        if let Err(err) = self.store.flash_web_session(&viewer.key, flash).await {
            tracing::warn!(error = %err, "could not leave a message for the next page");
        }
    }
}

/// The value of cookie `name` in the request headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` value: HttpOnly, SameSite=Strict, scoped to the admin pages; Secure when the
/// site is served over https (its configured `site_url`).
fn set_cookie(state: &AppState, name: &str, value: &str, max_age: Option<Duration>) -> String {
    let secure = state
        .agent
        .config
        .site_url
        .as_deref()
        .is_some_and(|url| url.starts_with("https://"));
    let mut cookie = format!("{name}={value}; Path={PREFIX}; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// Whether `presented` equals `expected`, in constant time.
fn same(presented: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
}

/// A request from another origin (when the browser says so) is refused outright.
fn cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    origin_host != host
}

/// The `csrf` field of an urlencoded form body, and the body itself (to hand on).
async fn read_form(request: Request) -> Result<(Request, Option<String>), Response> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            layout::error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The form is larger than this agent accepts.",
            )
        })?;
    let token = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.into_owned());
    Ok((Request::from_parts(parts, Body::from(bytes)), token))
}

fn forbidden(message: &str) -> Response {
    layout::error_page(StatusCode::FORBIDDEN, message)
}

/// Middleware of every page but the login page: a live session (else a redirect to the login
/// page), and on a POST the session's CSRF token in the form (else 403).
pub(crate) async fn require_session(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let found = match cookie(request.headers(), SESSION_COOKIE) {
        Some(c) => match state.web_sessions.find(c).await {
            Ok(found) => found,
            Err(err) => return layout::agent_error(err),
        },
        None => None,
    };
    let Some((key, session)) = found else {
        return if request.method() == Method::GET {
            Redirect::to(&format!("{PREFIX}/login")).into_response()
        } else {
            layout::error_page(
                StatusCode::UNAUTHORIZED,
                "Your session has ended. Sign in again.",
            )
        };
    };
    match state.agent.store.admin_token_active(session.token_id).await {
        Ok(true) => {}
        Ok(false) => {
            state.web_sessions.close(&key).await;
            return Redirect::to(&format!("{PREFIX}/login")).into_response();
        }
        Err(err) => return layout::agent_error(err),
    }
    let mut request = request;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if cross_origin(request.headers()) {
            return forbidden("Cross-origin form posts are refused.");
        }
        let (rebuilt, token) = match read_form(request).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        if !token.is_some_and(|t| same(&t, &session.csrf)) {
            tracing::warn!(admin = %session.token_name, "admin page form without a valid CSRF token refused");
            return forbidden(
                "This form has expired or did not come from this site. Reload the page and try again.",
            );
        }
        request = rebuilt;
    }
    request.extensions_mut().insert(Viewer {
        key,
        actor: Actor::admin(&session.token_name),
        csrf: session.csrf.clone(),
        name: session.token_name.clone(),
        flash: session.flash.clone(),
    });
    let mut response = next.run(request).await;
    no_store(response.headers_mut());
    response
}

/// Pages show tokens and connection details: never cached.
pub(crate) fn no_store(headers: &mut HeaderMap) {
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

/// `GET /login`: the form, with a fresh login cookie echoed in a hidden field.
pub(crate) async fn login_form(State(state): State<AppState>) -> Response {
    login_page(&state, None, StatusCode::OK)
}

fn login_page(state: &AppState, error: Option<&str>, status: StatusCode) -> Response {
    let nonce = random_hex();
    let mut response = (status, layout::login(&nonce, error)).into_response();
    if let Ok(value) =
        set_cookie(state, LOGIN_COOKIE, &nonce, Some(Duration::from_secs(3600))).parse()
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    no_store(response.headers_mut());
    response
}

/// `POST /login`: checks the login cookie against the form (login CSRF), the per-IP attempt
/// limit, then the admin token; opens a session.
pub(crate) async fn login(
    State(state): State<AppState>,
    client: crate::client_ip::ClientIp,
    request: Request,
) -> Response {
    if cross_origin(request.headers()) {
        return forbidden("Cross-origin sign-in is refused.");
    }
    let expected = cookie(request.headers(), LOGIN_COOKIE)
        .unwrap_or_default()
        .to_owned();
    let (_, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
        return forbidden("The sign-in form is too large.");
    };
    let mut nonce = String::new();
    let mut presented = String::new();
    for (k, v) in url::form_urlencoded::parse(&bytes) {
        match k.as_ref() {
            CSRF_FIELD => nonce = v.into_owned(),
            "token" => presented = v.trim().to_owned(),
            _ => {}
        }
    }
    if !same(&nonce, &expected) {
        return login_page(
            &state,
            Some("The sign-in form expired. Try again."),
            StatusCode::FORBIDDEN,
        );
    }
    if state.login_limiter.check_key(&client.0).is_err() {
        return login_page(
            &state,
            Some("Too many sign-in attempts from this address. Wait a minute."),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    match state
        .agent
        .store
        .verify_admin_token(&presented, state.agent.now())
        .await
    {
        Ok(Some(token)) => {
            tracing::info!(admin = %token.name, ip = %client.0, "admin pages: signed in");
            let session = match state.web_sessions.open(token.id, &token.name).await {
                Ok(session) => session,
                Err(err) => return layout::agent_error(err),
            };
            let mut response = Redirect::to(PREFIX).into_response();
            let headers = response.headers_mut();
            for value in [
                set_cookie(&state, SESSION_COOKIE, &session, None),
                set_cookie(&state, LOGIN_COOKIE, "", Some(Duration::ZERO)),
            ] {
                if let Ok(value) = value.parse() {
                    headers.append(header::SET_COOKIE, value);
                }
            }
            response
        }
        Ok(None) => {
            tracing::warn!(ip = %client.0, "admin pages: sign-in with an unknown or revoked token");
            login_page(
                &state,
                Some("That admin token is unknown, malformed or revoked."),
                StatusCode::UNAUTHORIZED,
            )
        }
        Err(err) => layout::agent_error(err),
    }
}

/// `POST /logout` (behind the session and CSRF check): ends the session, clears the cookie.
pub(crate) async fn logout(
    State(state): State<AppState>,
    axum::Extension(viewer): axum::Extension<Viewer>,
) -> Response {
    state.web_sessions.close(&viewer.key).await;
    let mut response = Redirect::to(&format!("{PREFIX}/login")).into_response();
    if let Ok(value) = set_cookie(&state, SESSION_COOKIE, "", Some(Duration::ZERO)).parse() {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=1; dbsync_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "missing"), None);
    }

    #[test]
    fn csrf_comparison_refuses_empty_and_different_tokens() {
        assert!(same("abc", "abc"));
        assert!(!same("abd", "abc"));
        assert!(!same("", ""));
    }

    #[test]
    fn origin_must_match_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(!cross_origin(&headers));
        headers.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(!cross_origin(&headers));
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(cross_origin(&headers));
    }
}
