//! The HTTP edge cases, through the router alone (`tower::ServiceExt::oneshot`, no listener):
//! authentication, body limits, malformed bodies, error bodies and codes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use dbsync_admin::{AppState, router};
use dbsync_agent::audit::Actor;
use dbsync_agent::{Agent, Config, Store, SystemClock};
use tower::ServiceExt;

struct Site {
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let mut config = Config {
        database_url: Some(url.clone()),
        key_file: Some(dir.path().join("dbsync.key")),
        ..Config::default()
    };
    config.server.max_body_bytes = 1024;
    config.server.peer_rate_limit_per_minute = 3;
    let store = Store::connect(&url).await.unwrap();
    let agent = Arc::new(Agent::with_store(store, config, Arc::new(SystemClock)).unwrap());
    Site {
        state: AppState::new(agent),
        _dir: dir,
    }
}

fn from(request: Request<Body>, ip: [u8; 4]) -> Request<Body> {
    let mut request = request;
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40_000))));
    request
}

async fn call(site: &Site, request: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = router(site.state.clone())
        .oneshot(from(request, [192, 0, 2, 1]))
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn post_json(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

#[tokio::test]
async fn the_admin_api_needs_a_known_bearer_token() {
    let site = site().await;
    let (status, body) = call(&site, get("/admin/db-sync/api/connections")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["code"].is_string(), "{body}");
    let wrong = Request::get("/admin/db-sync/api/connections")
        .header(header::AUTHORIZATION, "Bearer dbsa_not_a_real_token")
        .body(Body::empty())
        .unwrap();
    let (status, _) = call(&site, wrong).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (_, token) = site
        .state
        .agent
        .store
        .create_admin_token("ops", &Actor::admin("test"), site.state.agent.now())
        .await
        .unwrap();
    let right = Request::get("/admin/db-sync/api/connections")
        .header(header::AUTHORIZATION, format!("Bearer {}", token.expose()))
        .body(Body::empty())
        .unwrap();
    let (status, body) = call(&site, right).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn peer_bodies_are_bounded_and_checked() {
    let site = site().await;
    // Over the body limit: 413, before any parsing.
    let (status, _) = call(
        &site,
        post_json("/db-sync/api/register-connection", vec![b'{'; 4096]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Malformed JSON: a client error with a code, never a 500.
    let (status, body) = call(
        &site,
        post_json("/db-sync/api/register-connection", "{\"sender_url\": 5}"),
    )
    .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    // A peer call without its bearer token.
    let (status, body) = call(
        &site,
        post_json(
            "/db-sync/api/update-status",
            r#"{"status":"suspended","reason":null,"site_url":"https://a.example"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn unknown_paths_and_the_status_answer_as_documented() {
    let site = site().await;
    let (status, body) = call(&site, get("/no/such/path")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = call(&site, get("/db-sync/api/status")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["protocol_versions"],
        serde_json::json!([2, 3, 4, 5, 6, 7, 8, 9])
    );
}

#[tokio::test]
async fn the_peer_api_is_rate_limited_per_client_address() {
    let site = site().await;
    let app = router(site.state.clone());
    let mut codes = Vec::new();
    for _ in 0..5 {
        let response = app
            .clone()
            .oneshot(from(get("/db-sync/api/status"), [192, 0, 2, 7]))
            .await
            .unwrap();
        codes.push(response.status());
    }
    assert!(codes[..3].iter().all(|s| s.is_success()), "{codes:?}");
    assert_eq!(codes[4], StatusCode::TOO_MANY_REQUESTS);
    // Another address has its own budget.
    let other = app
        .oneshot(from(get("/db-sync/api/status"), [192, 0, 2, 8]))
        .await
        .unwrap();
    assert!(other.status().is_success());
}
