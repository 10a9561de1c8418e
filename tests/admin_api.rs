//! The admin JSON API over a real socket: authentication, connections, transfers, settings.

use chrono::Duration;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::ConflictStrategy;
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{NewTransfer, TransferDirection};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::agents::{Options, start};

/// `/healthz` says the process answers; `/readyz` that its state database does too, and stops
/// saying so when the database is gone. Neither needs a credential.
#[tokio::test]
async fn health_and_readiness() {
    let Some(a) = start("admin_api::health", Options::default()).await else {
        return;
    };
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", a.url)).send();
    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(ready.text().await.unwrap(), "ready");
    a.agent.store.close().await;
    let gone = get("/readyz").await.unwrap();
    assert_eq!(gone.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(gone.text().await.unwrap().contains("state database"));
    assert_eq!(get("/healthz").await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn admin_api_requires_a_live_admin_token() {
    let Some(a) = start("admin_api::auth", Options::default()).await else {
        return;
    };
    let store = &a.agent.store;
    let (_, token) = store
        .create_admin_token("ops", &Actor::cli("t"), a.agent.now())
        .await
        .unwrap();
    let (_, other) = store
        .create_admin_token("old", &Actor::cli("t"), a.agent.now())
        .await
        .unwrap();
    store
        .revoke_admin_token("old", &Actor::cli("t"), a.agent.now())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/admin/db-sync/api/connections", a.url);

    let none = client.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(
        none.json::<Value>().await.unwrap()["error"]["code"],
        "unauthorized"
    );
    for bad in [
        "dbsa_wrong",
        dbsync_agent::token::Token::generate_admin().expose(),
        other.expose(),
    ] {
        let response = client.get(&url).bearer_auth(bad).send().await.unwrap();
        assert_eq!(response.status(), 401, "{bad}");
    }
    // A connection token is not an admin token.
    let response = client
        .get(&url)
        .bearer_auth(dbsync_agent::token::Token::generate().expose())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let ok = client
        .get(&url)
        .bearer_auth(token.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().await.unwrap()["items"], json!([]));
    let used = store.list_admin_tokens().await.unwrap();
    assert!(
        used.iter()
            .any(|t| t.name == "ops" && t.last_used_at.is_some())
    );
    a.stop().await;
}

#[tokio::test]
async fn connections_transfers_and_settings_through_the_admin_api() {
    let Some(b) = start(
        "admin_api::flow",
        Options {
            postgres: true,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let Some(a) = start("admin_api::flow", Options::default()).await else {
        return;
    };
    b.agent
        .store
        .set_incoming(
            IncomingMode::AutoAccept,
            None,
            &Actor::cli("t"),
            b.agent.now(),
        )
        .await
        .unwrap();
    let (_, token) = a
        .agent
        .store
        .create_admin_token("ops", &Actor::cli("t"), a.agent.now())
        .await
        .unwrap();
    let api = format!("{}/admin/db-sync/api", a.url);
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut request = client
            .request(method, format!("{api}{path}"))
            .bearer_auth(token.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    let (status, created) = call(
        reqwest::Method::POST,
        "/connections",
        Some(json!({ "name": "to-b", "site_url": b.url, "max_downloads": 10, "allowed_tables": ["users"] })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("dbs_"));
    assert_eq!(created["registration"]["outcome"], "accepted");
    assert_eq!(created["connection"]["status"], "active");
    let id = created["connection"]["id"].as_str().unwrap().to_owned();

    let (status, shown) = call(reqwest::Method::GET, &format!("/connections/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !shown.to_string().contains(&secret[10..]),
        "the token is never shown again"
    );
    assert_eq!(shown["connection"]["allowed_tables"], json!(["users"]));

    let (status, patched) = call(
        reqwest::Method::PATCH,
        "/connections/to-b",
        Some(json!({ "max_downloads": null, "allowed_hours": [22, 5], "time_zone": "Europe/Berlin", "download_password": "pw-1" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["connection"]["max_downloads"], Value::Null);
    assert_eq!(patched["connection"]["allowed_hours_start"], 22);
    assert_eq!(patched["connection"]["download_password_set"], true);
    assert_eq!(
        patched["connection"]["allowed_tables"],
        json!(["users"]),
        "untouched fields keep their value"
    );
    let (status, bad) = call(
        reqwest::Method::PATCH,
        "/connections/to-b",
        Some(json!({ "rate_limit_per_minute": 0 })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad["error"]["code"], "invalid_input");

    let (status, suspended) = call(
        reqwest::Method::POST,
        "/connections/to-b/suspend",
        Some(json!({ "reason": "maintenance" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(suspended["connection"]["status"], "suspended");
    assert_eq!(suspended["connection"]["suspended_by"], "admin:ops");
    assert_eq!(suspended["peer_push"]["state"], "delivered");
    let on_b = b
        .agent
        .store
        .find_connection_for_site(&a.url, dbsync_agent::Direction::Receiver)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(on_b.status, dbsync_agent::ConnectionStatus::Suspended);

    let (status, illegal) = call(
        reqwest::Method::POST,
        "/connections/to-b/approve",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(illegal["error"]["code"], "illegal_transition");
    let (status, missing) = call(reqwest::Method::GET, "/connections/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");

    // Transfers waiting for approval, approved and denied through the API.
    let connection_id = uuid::Uuid::parse_str(&id).unwrap();
    let mut pending = Vec::new();
    for table in ["users", "orders"] {
        let t = a
            .agent
            .store
            .create_transfer(
                NewTransfer {
                    connection_id,
                    direction: TransferDirection::Send,
                    table_name: table.into(),
                    requires_approval: true,
                    records_requested: 0,
                    conflict_strategy: ConflictStrategy::Overwrite,
                    transport: None,
                    requester_ip: None,
                    requester_user_agent: None,
                },
                Duration::hours(24),
                &Actor::system(),
                a.agent.now(),
            )
            .await
            .unwrap();
        pending.push(t.id);
    }
    let (_, listed) = call(
        reqwest::Method::GET,
        "/transfers?status=pending_approval&connection=to-b",
        None,
    )
    .await;
    assert_eq!(listed["total"], 2);
    let (status, approved) = call(
        reqwest::Method::POST,
        &format!("/transfers/{}/approve", pending[0]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{approved}");
    assert_eq!(approved["transfer"]["status"], "approved");
    assert_eq!(approved["transfer"]["approved_by"], "admin:ops");
    let (status, denied) = call(
        reqwest::Method::POST,
        &format!("/transfers/{}/deny", pending[1]),
        Some(json!({ "reason": "PII" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(denied["transfer"]["denial_reason"], "PII");
    // The approved one is cancelled; a finished one cannot be.
    let (status, cancelled) = call(
        reqwest::Method::POST,
        &format!("/transfers/{}/cancel", pending[0]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["transfer"]["status"], "cancelled");
    let (status, again) = call(
        reqwest::Method::POST,
        &format!("/transfers/{}/cancel", pending[1]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["error"]["code"], "illegal_transition");
    let (_, page) = call(reqwest::Method::GET, "/transfers?per_page=1&page=2", None).await;
    assert_eq!(
        (
            page["total"].as_i64(),
            page["items"].as_array().map(Vec::len)
        ),
        (Some(2), Some(1))
    );
    let (status, bad_filter) = call(reqwest::Method::GET, "/transfers?status=nonsense", None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad_filter}");

    let (_, stats) = call(reqwest::Method::GET, "/connections/to-b/stats", None).await;
    assert_eq!(stats["stats"]["total_transfers"], 2);

    let (status, incoming) = call(
        reqwest::Method::PUT,
        "/settings/incoming",
        Some(json!({ "mode": "require_password", "password": "s3cret" })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{incoming}");
    assert_eq!(incoming["settings"]["incoming_mode"], "require_password");
    assert_eq!(incoming["settings"]["incoming_password_set"], true);
    assert!(!incoming.to_string().contains("s3cret"));

    let (status, regenerated) = call(
        reqwest::Method::POST,
        "/connections/to-b/regenerate-token",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(regenerated["token"].as_str().unwrap(), secret);
    let (status, deleted) = call(reqwest::Method::DELETE, "/connections/to-b", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(deleted["deleted"]["name"], "to-b");

    let events = a
        .agent
        .store
        .audit_events(Some(connection_id), 100)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.action == "connection.settings_changed" && e.actor == "admin:ops")
    );
    a.stop().await;
    b.stop().await;
}

/// The OpenAPI document is served without a credential, is OpenAPI 3.1, names every route
/// docs/api.md lists, and every operation it names is routed (no fallback 404, no 405).
#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let Some(a) = start("admin_api::openapi", Options::default()).await else {
        return;
    };
    let (_, token) = a
        .agent
        .store
        .create_admin_token("ops", &Actor::cli("t"), a.agent.now())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{}/admin/db-sync/api/openapi.json", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.unwrap();
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );
    let paths = document["paths"].as_object().unwrap();
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }

    // Every route docs/api.md names is in the document.
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let mut documented = Vec::new();
    for piece in docs.split('`') {
        let Some((method, path)) = piece.split_once(' ') else {
            continue;
        };
        if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) && path.starts_with('/') {
            let path = path.split('?').next().unwrap().to_owned();
            documented.push((method.to_owned(), path));
        }
    }
    assert!(documented.len() >= 25, "{documented:?}");
    for (method, path) in &documented {
        assert!(
            operations.contains(&(method.clone(), path.clone())),
            "docs/api.md names {method} {path}, the OpenAPI document does not"
        );
    }
    for expected in [
        ("POST", "/db-sync/api/rotate-token"),
        ("POST", "/admin/db-sync/api/transfers/{id}/cancel"),
        ("GET", "/metrics"),
        ("GET", "/readyz"),
    ] {
        assert!(
            operations.contains(&(expected.0.into(), expected.1.into())),
            "{expected:?}"
        );
    }

    // Every operation in the document is routed.
    for (method, path) in &operations {
        let path = path.replace("{id}", "00000000-0000-0000-0000-000000000000");
        let request = client
            .request(method.parse().unwrap(), format!("{}{path}", a.url))
            .bearer_auth(token.expose());
        let request = if method == "GET" || method == "DELETE" {
            request
        } else {
            request.json(&json!({}))
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body.contains("no such endpoint"),
            "{method} {path} is in the document but not routed"
        );
    }
}
