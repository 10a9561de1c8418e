//! Several agents, one site: two agents on one PostgreSQL state database share the rate limits,
//! the admin sign-in sessions and the QUIC certificate, and deliver a status push once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConnectionSettings, NewConnection};
use dbsync_agent::pull::{PullOptions, TransportChoice};
use dbsync_agent::registration::StatusChange;
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::token::Token;

use crate::pull::{exec, rows, schema_statements};
use crate::support::agents::{Options, RunningAgent, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

/// Agent one on a new PostgreSQL state database and agent two on the same one (and key).
async fn two_agents(test: &str, options: Options) -> Option<(RunningAgent, RunningAgent)> {
    let one = start(
        test,
        Options {
            postgres: true,
            ..options.clone()
        },
    )
    .await?;
    let two = start(
        test,
        Options {
            database_url: Some(one.database_url.clone()),
            key_file: Some(one.key_file.clone()),
            ..options
        },
    )
    .await?;
    Some((one, two))
}

/// The value of `name="csrf"` in a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..at + page[at..].find('"').unwrap()].to_owned()
}

/// The session cookie after signing in to `agent`'s pages with an admin token.
async fn sign_in(client: &reqwest::Client, agent: &RunningAgent, token: &str) -> String {
    let form = client
        .get(format!("{}/admin/db-sync/login", agent.url))
        .send()
        .await
        .unwrap();
    let login_cookie = form
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| v.to_str().ok()?.strip_prefix("dbsync_login="))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .unwrap();
    let nonce = csrf_of(&form.text().await.unwrap());
    let signed_in = client
        .post(format!("{}/admin/db-sync/login", agent.url))
        .header("cookie", format!("dbsync_login={login_cookie}"))
        .form(&[("csrf", nonce.as_str()), ("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "signed in");
    signed_in
        .headers()
        .get_all("set-cookie")
        .iter()
        .find_map(|v| v.to_str().ok()?.strip_prefix("dbsync_session="))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_on_one_state_database_act_as_one_site() {
    let Some((one, two)) = two_agents("site::shared", Options::default()).await else {
        return;
    };
    let b = start("site::shared", Options::default()).await.unwrap();
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
        .await
        .unwrap();

    // One certificate for the site: both agents present it.
    let (cert_one, cert_two) = (
        one.agent.quic_identity().await.unwrap(),
        two.agent.quic_identity().await.unwrap(),
    );
    assert_eq!(cert_one.fingerprint, cert_two.fingerprint);

    // A pull pinned to the certificate learnt from agent one works through agent two.
    exec(&one, &schema_statements(50)).await;
    one.agent
        .create_sender(
            NewConnection {
                name: "to-b".into(),
                site_url: b.url.clone(),
                settings: ConnectionSettings::default(),
            },
            None,
            &admin(),
        )
        .await
        .unwrap();
    let receiver = b
        .agent
        .store
        .list_connections(&Default::default())
        .await
        .unwrap()
        .remove(0);
    let two_quic = two.agent.quic_offer().await.unwrap();
    b.agent
        .store
        .execute_batch(&[format!(
            "UPDATE dbsync_connections SET site_url = '{}' WHERE id = X'{}'",
            two.url,
            receiver.id.simple()
        )])
        .await
        .unwrap();
    b.agent
        .store
        .merge_connection_metadata(
            receiver.id,
            serde_json::json!({ "quic": {
                "kind": "quic", "port": two_quic.port, "cert_fingerprint": cert_one.fingerprint,
            }}),
        )
        .await
        .unwrap();
    let pulled = b
        .agent
        .pull(
            &receiver.name,
            &PullOptions {
                tables: Some(vec!["users".into()]),
                transport: TransportChoice::Quic,
                ..PullOptions::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(pulled.tables[0].transport, "quic");
    assert_eq!(
        rows(&one.agent.store, "users").await,
        rows(&b.agent.store, "users").await
    );

    // A limit of 3 a minute admits 3 in all, whichever agent takes the requests.
    let limited = one
        .agent
        .store
        .create_sender(
            NewConnection {
                name: "limited".into(),
                site_url: "https://c.example.com".into(),
                settings: ConnectionSettings {
                    rate_limit_per_minute: 3,
                    ..ConnectionSettings::default()
                },
            },
            &admin(),
            one.agent.now(),
        )
        .await
        .unwrap()
        .connection;
    let mut admitted = 0;
    for i in 0..8 {
        let agent = if i % 2 == 0 { &one } else { &two };
        match agent.agent.validator.check_rate(&limited).await {
            Ok(()) => admitted += 1,
            Err(dbsync_agent::AccessDenied::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(20));
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(admitted, 3);

    // Download and record limits hold under requests racing through both agents.
    let counted = one
        .agent
        .store
        .create_sender(
            NewConnection {
                name: "counted".into(),
                site_url: "https://d.example.com".into(),
                settings: ConnectionSettings {
                    max_downloads: Some(3),
                    max_records_total: Some(1_000),
                    ..ConnectionSettings::default()
                },
            },
            &admin(),
            one.agent.now(),
        )
        .await
        .unwrap()
        .connection;
    let mut races = Vec::new();
    for i in 0..10 {
        let store = if i % 2 == 0 {
            one.agent.store.clone()
        } else {
            two.agent.store.clone()
        };
        races.push(tokio::spawn(async move {
            let download = store.take_download(counted.id).await.unwrap();
            let records = store.take_records(counted.id, 300).await.unwrap();
            (download, records)
        }));
    }
    let mut downloads = 0;
    let mut records = 0;
    for race in races {
        let (download, taken) = race.await.unwrap();
        downloads += i64::from(download);
        records += taken;
    }
    assert_eq!((downloads, records), (3, 1_000));

    // Sign in on one agent, act on the other; the message left by the action shows on the first.
    let (_, admin_token) = one
        .agent
        .store
        .create_admin_token("ops", &admin(), one.agent.now())
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let session = sign_in(&client, &one, admin_token.expose()).await;
    let cookie = format!("dbsync_session={session}");
    let page = client
        .get(format!("{}/admin/db-sync/connections/limited", two.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "the session is known to agent two");
    let csrf = csrf_of(&page.text().await.unwrap());
    let suspended = client
        .post(format!(
            "{}/admin/db-sync/connections/limited/suspend",
            two.url
        ))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("reason", "audit")])
        .send()
        .await
        .unwrap();
    assert_eq!(suspended.status(), 303);
    let after = client
        .get(format!("{}/admin/db-sync/connections/limited", one.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        after.contains("now suspended"),
        "the flash travels with the session"
    );
    // Signing out on agent two ends the session on agent one.
    let logout = client
        .post(format!("{}/admin/db-sync/logout", two.url))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    let gone = client
        .get(format!("{}/admin/db-sync/connections", one.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 303, "signed out everywhere");
    one.stop().await;
    two.stop().await;
    b.stop().await;
}

/// A stand-in peer that registers anything and counts the status updates it is sent; the first
/// one fails (so the push is retried), later ones answer slowly (so two agents overlap).
async fn counting_peer() -> (String, Arc<AtomicUsize>) {
    use axum::routing::post;
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    let app = axum::Router::new()
        .route(
            "/db-sync/api/register-connection",
            post(|| async {
                axum::Json(serde_json::json!({
                    "connection_id": uuid::Uuid::new_v4().to_string(),
                    "status": "active",
                    "peer_token": Token::generate().expose(),
                }))
            }),
        )
        .route(
            "/db-sync/api/update-status",
            post(move || {
                let seen = Arc::clone(&seen);
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy")
                            .into_response();
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    axum::Json(serde_json::json!({ "connection_id": "x", "status": "suspended" }))
                        .into_response()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, count)
}

use axum::response::IntoResponse as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_status_push_is_delivered_once_by_two_agents() {
    let options = Options {
        push_retry_secs: 1,
        ..Options::default()
    };
    let Some((one, two)) = two_agents("site::push", options).await else {
        return;
    };
    let (peer, updates) = counting_peer().await;
    one.agent
        .create_sender(
            NewConnection {
                name: "to-peer".into(),
                site_url: peer,
                settings: ConnectionSettings::default(),
            },
            None,
            &admin(),
        )
        .await
        .unwrap();
    let (_, push) = one
        .agent
        .change_status("to-peer", StatusChange::Suspend("night".into()), &admin())
        .await
        .unwrap();
    assert_eq!(push.state, "pending", "{push:?}");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (left, right) = tokio::join!(
        one.agent.retry_pending_pushes(),
        two.agent.retry_pending_pushes()
    );
    assert_eq!(left.unwrap() + right.unwrap(), 1, "one agent took the push");
    assert_eq!(
        updates.load(Ordering::SeqCst),
        2,
        "the failed try and one delivery"
    );
    let connection = one.agent.store.get_connection("to-peer").await.unwrap();
    assert_eq!(connection.metadata["peer_push"]["state"], "delivered");
    // Nothing left to do for either.
    assert_eq!(one.agent.retry_pending_pushes().await.unwrap(), 0);
    assert_eq!(two.agent.retry_pending_pushes().await.unwrap(), 0);
    one.stop().await;
    two.stop().await;
}
