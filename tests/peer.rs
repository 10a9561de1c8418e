//! Two agents on real sockets: registration in every incoming mode, status changes both ways,
//! the manual hand-over, and the inbound and outbound safety rules. The sender runs on SQLite,
//! the receiver on PostgreSQL.

use std::time::Duration;

use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConnectionSettings, NewConnection};
use dbsync_agent::registration::{RegistrationOutcome, StatusChange};
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::token::Token;
use dbsync_agent::{Connection, ConnectionStatus, Direction};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::agents::{Options, RunningAgent, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

/// Sender A on SQLite, receiver B on PostgreSQL in `mode`.
async fn pair(
    test: &str,
    mode: IncomingMode,
    password: Option<&str>,
) -> Option<(RunningAgent, RunningAgent)> {
    let b = start(
        test,
        Options {
            postgres: true,
            ..Options::default()
        },
    )
    .await?;
    let a = start(test, Options::default()).await?;
    b.agent
        .store
        .set_incoming(mode, password, &admin(), b.agent.now())
        .await
        .unwrap();
    Some((a, b))
}

fn new_sender(name: &str, site_url: &str) -> NewConnection {
    NewConnection {
        name: name.into(),
        site_url: site_url.into(),
        settings: ConnectionSettings::default(),
    }
}

async fn receiver_for(b: &RunningAgent, a: &RunningAgent) -> Option<Connection> {
    b.agent
        .store
        .find_connection_for_site(&a.url, Direction::Receiver)
        .await
        .unwrap()
}

async fn sender(a: &RunningAgent, name: &str) -> Connection {
    a.agent.store.get_connection(name).await.unwrap()
}

#[tokio::test]
async fn auto_accept_makes_both_sides_active() {
    let Some((a, b)) = pair("peer::auto_accept", IncomingMode::AutoAccept, None).await else {
        return;
    };
    let created = a
        .agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    assert!(
        matches!(&created.registration, RegistrationOutcome::Accepted { remote_status, .. } if remote_status == "active"),
        "{:?}",
        created.registration
    );
    assert_eq!(created.connection.status, ConnectionStatus::Active);
    assert_eq!(
        created.connection.approved_by.as_deref(),
        Some(format!("remote:{}", b.url).as_str())
    );
    assert_eq!(
        created.connection.metadata["registration"]["outcome"],
        "accepted"
    );
    assert!(
        created.connection.token_ciphertext.is_some(),
        "the peer token is kept (encrypted)"
    );

    let receiver = receiver_for(&b, &a)
        .await
        .expect("B holds the receiver connection");
    assert_eq!(receiver.status, ConnectionStatus::Active);
    assert_eq!(receiver.name, "to-b");
    assert_eq!(receiver.created_by, format!("remote:{}", a.url));
    assert_eq!(
        b.agent
            .store
            .receiver_token(&receiver, &b.agent.vault)
            .unwrap(),
        created.token
    );
    assert_eq!(receiver.metadata["registration"]["via"], "api");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn require_approval_then_approving_activates_both_sides() {
    let Some((a, b)) = pair(
        "peer::require_approval",
        IncomingMode::RequireApproval,
        None,
    )
    .await
    else {
        return;
    };
    let created = a
        .agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    assert!(
        matches!(&created.registration, RegistrationOutcome::Accepted { remote_status, .. } if remote_status == "pending")
    );
    assert_eq!(created.connection.status, ConnectionStatus::Pending);
    let receiver = receiver_for(&b, &a).await.unwrap();
    assert_eq!(
        receiver.status,
        ConnectionStatus::Pending,
        "a pending receiver connection, not an active one"
    );

    let (approved, push) = b
        .agent
        .change_status(&receiver.name, StatusChange::Approve, &admin())
        .await
        .unwrap();
    assert_eq!(approved.status, ConnectionStatus::Active);
    assert_eq!(push.state, "delivered", "{push:?}");
    assert_eq!(push.remote_status.as_deref(), Some("active"));
    let on_a = sender(&a, "to-b").await;
    assert_eq!(on_a.status, ConnectionStatus::Active);
    assert_eq!(
        on_a.approved_by.as_deref(),
        Some(format!("remote:{}", b.url).as_str())
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn require_password_needs_the_right_password() {
    let Some((a, b)) = pair(
        "peer::require_password",
        IncomingMode::RequirePassword,
        Some("letmein-42"),
    )
    .await
    else {
        return;
    };
    for (password, code) in [
        (None, "password_required"),
        (Some("wrong"), "invalid_password"),
    ] {
        let created = a
            .agent
            .create_sender(new_sender("to-b", &b.url), password, &admin())
            .await
            .unwrap();
        match &created.registration {
            RegistrationOutcome::Rejected {
                http_status,
                code: got,
                ..
            } => {
                assert_eq!((*http_status, got.as_str()), (401, code));
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(created.connection.status, ConnectionStatus::Pending);
        assert_eq!(created.connection.metadata["registration"]["code"], code);
        assert!(receiver_for(&b, &a).await.is_none());
        a.agent
            .store
            .delete_connection("to-b", &admin(), a.agent.now())
            .await
            .unwrap();
    }
    let created = a
        .agent
        .create_sender(new_sender("to-b", &b.url), Some("letmein-42"), &admin())
        .await
        .unwrap();
    assert_eq!(created.connection.status, ConnectionStatus::Active);
    assert_eq!(
        receiver_for(&b, &a).await.unwrap().status,
        ConnectionStatus::Active
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn deny_all_refuses_and_stores_nothing() {
    let Some((a, b)) = pair("peer::deny_all", IncomingMode::DenyAll, None).await else {
        return;
    };
    let created = a
        .agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    assert!(matches!(
        &created.registration,
        RegistrationOutcome::Rejected { http_status: 403, code, .. } if code == "registration_denied"
    ));
    assert_eq!(created.connection.status, ConnectionStatus::Pending);
    assert!(
        b.agent
            .store
            .list_connections(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    a.stop().await;
    b.stop().await;
}

/// Expiry and deletion reach the peer like the other status changes: an expired sender
/// connection's receiver becomes expired at the next push round; a deleted one's is revoked,
/// with a reason saying so.
#[tokio::test]
async fn expiry_and_deletion_are_told_to_the_peer() {
    let Some((a, b)) = pair("peer::expiry", IncomingMode::AutoAccept, None).await else {
        return;
    };
    a.agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    assert_eq!(
        receiver_for(&b, &a).await.unwrap().status,
        ConnectionStatus::Active
    );
    a.agent
        .store
        .expire_connection("to-b", &Actor::system(), a.agent.now())
        .await
        .unwrap();
    assert_eq!(a.agent.retry_pending_pushes().await.unwrap(), 1);
    assert_eq!(
        receiver_for(&b, &a).await.unwrap().status,
        ConnectionStatus::Expired
    );
    assert_eq!(
        sender(&a, "to-b").await.metadata["peer_push"]["state"],
        "delivered"
    );
    a.stop().await;
    b.stop().await;

    let Some((a, b)) = pair("peer::deletion", IncomingMode::AutoAccept, None).await else {
        return;
    };
    a.agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    let (deleted, push) = a.agent.delete_connection("to-b", &admin()).await.unwrap();
    assert_eq!(deleted.name, "to-b");
    assert_eq!(push.state, "delivered", "{push:?}");
    let on_b = receiver_for(&b, &a).await.unwrap();
    assert_eq!(on_b.status, ConnectionStatus::Revoked);
    assert!(
        on_b.revoked_reason
            .as_deref()
            .is_some_and(|r| r.contains("deleted")),
        "{:?}",
        on_b.revoked_reason
    );
    assert!(a.agent.store.get_connection("to-b").await.is_err());
    a.stop().await;
    b.stop().await;
}

/// A connection to this site's own address is refused on both paths, and nothing is stored.
#[tokio::test]
async fn a_site_cannot_connect_to_itself() {
    let Some(a) = start("peer::self", Options::default()).await else {
        return;
    };
    let own = a.agent.site_url().await.unwrap();
    for url in [
        own.clone(),
        format!("{}/", own.to_uppercase().replacen("HTTP", "http", 1)),
    ] {
        let refused = a
            .agent
            .create_sender(new_sender("to-me", &url), None, &admin())
            .await;
        assert!(
            matches!(
                &refused,
                Err(dbsync_agent::Error::Invalid {
                    field: "site_url",
                    ..
                })
            ),
            "{url}: {refused:?}"
        );
        let by_hand = a
            .agent
            .add_receiver_by_hand("from-me", &url, Token::generate().expose(), &admin())
            .await;
        assert!(by_hand.is_err(), "{url}");
    }
    assert!(
        a.agent
            .store
            .list_connections(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    a.stop().await;
}

#[tokio::test]
async fn a_second_registration_from_the_same_site_is_409() {
    let Some((a, b)) = pair("peer::duplicate", IncomingMode::AutoAccept, None).await else {
        return;
    };
    a.agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/db-sync/api/register-connection", b.url))
        .json(&json!({
            "sender_url": a.url, "connection_name": "again", "auth_token": Token::generate().expose(),
            "password": null, "protocol_version": 2, "quic": null
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "duplicate_connection");
    // An unsupported protocol version is refused with its own code.
    let response = client
        .post(format!("{}/db-sync/api/register-connection", b.url))
        .json(&json!({
            "sender_url": "https://c.example.com", "connection_name": "c", "auth_token": Token::generate().expose(),
            "password": null, "protocol_version": 99, "quic": null
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "unsupported_version"
    );
    // A registration missing fields is a malformed request: 400, as documented.
    let response = client
        .post(format!("{}/db-sync/api/register-connection", b.url))
        .json(&json!({ "sender_url": "https://d.example.com" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn unreachable_remote_stays_pending_then_manual_hand_over_works() {
    // Reserve an address for B, but do not serve on it yet.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let Some(a) = start("peer::manual", Options::default()).await else {
        return;
    };
    let b_url = format!("http://{reserved}");
    let created = a
        .agent
        .create_sender(new_sender("to-b", &b_url), None, &admin())
        .await
        .unwrap();
    assert!(
        matches!(
            &created.registration,
            RegistrationOutcome::Unreachable { .. }
        ),
        "{:?}",
        created.registration
    );
    assert_eq!(created.connection.status, ConnectionStatus::Pending);
    assert_eq!(
        created.connection.metadata["registration"]["outcome"],
        "unreachable"
    );

    // B comes up and its operator stores the token by hand.
    let Some(b) = start(
        "peer::manual",
        Options {
            postgres: true,
            addr: Some(reserved),
            ..Options::default()
        },
    )
    .await
    else {
        a.stop().await;
        return;
    };
    let receiver = b
        .agent
        .add_receiver_by_hand("from-a", &a.url, created.token.expose(), &admin())
        .await
        .unwrap();
    assert_eq!(receiver.status, ConnectionStatus::Active);
    assert_eq!(
        receiver.metadata["hand_over"]["outcome"], "confirmed",
        "{}",
        receiver.metadata
    );
    let on_a = sender(&a, "to-b").await;
    assert!(on_a.metadata.get("receiver_confirmed").is_some());
    assert!(on_a.token_ciphertext.is_some(), "A can now reach B");

    // A's operator approves; later changes reach B.
    let (_, push) = a
        .agent
        .change_status("to-b", StatusChange::Approve, &admin())
        .await
        .unwrap();
    assert_eq!(push.state, "delivered");
    a.agent
        .change_status(
            "to-b",
            StatusChange::Suspend("rotating keys".into()),
            &admin(),
        )
        .await
        .unwrap();
    let on_b = b.agent.store.get_connection("from-a").await.unwrap();
    assert_eq!(on_b.status, ConnectionStatus::Suspended);
    assert!(on_b.suspended_reason.unwrap().contains("rotating keys"));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn status_changes_travel_both_ways() {
    let Some((a, b)) = pair("peer::both_ways", IncomingMode::AutoAccept, None).await else {
        return;
    };
    a.agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();
    let on_b = || async { receiver_for(&b, &a).await.unwrap() };
    let on_a = || async { sender(&a, "to-b").await };

    a.agent
        .change_status("to-b", StatusChange::Suspend("audit".into()), &admin())
        .await
        .unwrap();
    let r = on_b().await;
    assert_eq!(r.status, ConnectionStatus::Suspended);
    assert_eq!(
        r.suspended_by.as_deref(),
        Some(format!("remote:{}", a.url).as_str())
    );
    a.agent
        .change_status("to-b", StatusChange::Reactivate, &admin())
        .await
        .unwrap();
    assert_eq!(on_b().await.status, ConnectionStatus::Active);

    // The receiver suspends; the sender follows; the receiver lifts it; the sender follows.
    let name = on_b().await.name;
    b.agent
        .change_status(
            &name,
            StatusChange::Suspend("quiet period".into()),
            &admin(),
        )
        .await
        .unwrap();
    assert_eq!(on_a().await.status, ConnectionStatus::Suspended);
    b.agent
        .change_status(&name, StatusChange::Reactivate, &admin())
        .await
        .unwrap();
    assert_eq!(on_a().await.status, ConnectionStatus::Active);

    // A suspension a site imposed itself is not lifted by its peer.
    a.agent
        .change_status("to-b", StatusChange::Suspend("ours".into()), &admin())
        .await
        .unwrap();
    let (_, push) = b
        .agent
        .change_status(&name, StatusChange::Reactivate, &admin())
        .await
        .unwrap();
    assert_eq!(push.remote_status.as_deref(), Some("suspended"));
    assert_eq!(on_a().await.status, ConnectionStatus::Suspended);

    b.agent
        .change_status(&name, StatusChange::Revoke("closing".into()), &admin())
        .await
        .unwrap();
    let revoked = on_a().await;
    assert_eq!(revoked.status, ConnectionStatus::Revoked);
    assert!(revoked.revoked_reason.unwrap().contains("closing"));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_push_to_an_unreachable_peer_is_retried() {
    let Some(mut b) = start(
        "peer::retry",
        Options {
            postgres: true,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let Some(a) = start(
        "peer::retry",
        Options {
            push_retry_secs: 1,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
        .await
        .unwrap();
    a.agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap();

    b.pause().await;
    let (_, push) = a
        .agent
        .change_status("to-b", StatusChange::Suspend("night".into()), &admin())
        .await
        .unwrap();
    assert_eq!(push.state, "pending", "{push:?}");
    assert_eq!(push.attempts, 1);
    assert!(push.next_attempt_at.is_some());
    assert_eq!(
        sender(&a, "to-b").await.metadata["peer_push"]["state"],
        "pending"
    );
    assert_eq!(
        a.agent.retry_pending_pushes().await.unwrap(),
        0,
        "not due yet"
    );

    b.resume().await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(a.agent.retry_pending_pushes().await.unwrap(), 1);
    let metadata = sender(&a, "to-b").await.metadata;
    assert_eq!(metadata["peer_push"]["state"], "delivered");
    assert_eq!(metadata["peer_push"]["attempts"], 2);
    assert_eq!(
        receiver_for(&b, &a).await.unwrap().status,
        ConnectionStatus::Suspended
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn private_targets_are_refused_without_a_request() {
    let Some(b) = start("peer::ssrf", Options::default()).await else {
        return;
    };
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
        .await
        .unwrap();
    let Some(a) = start(
        "peer::ssrf",
        Options {
            allow_private_peers: false,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let port = b.addr.port();
    let targets = [
        format!("http://127.0.0.1:{port}"),
        format!("http://2130706433:{port}"),
        format!("http://0x7f000001:{port}"),
        format!("http://0177.0.0.1:{port}"),
        format!("http://[::1]:{port}"),
        format!("http://[::ffff:127.0.0.1]:{port}"),
        format!("http://localhost:{port}"),
        "http://169.254.169.254".to_owned(),
    ];
    for (i, target) in targets.iter().enumerate() {
        let created = a
            .agent
            .create_sender(new_sender(&format!("t{i}"), target), None, &admin())
            .await
            .unwrap();
        assert!(
            matches!(&created.registration, RegistrationOutcome::Refused { .. }),
            "{target}: {:?}",
            created.registration
        );
        assert_eq!(created.connection.status, ConnectionStatus::Pending);
    }
    // Nothing reached B.
    assert!(
        b.agent
            .store
            .list_connections(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let Some(b) = start(
        "peer::body",
        Options {
            max_body_bytes: 4 * 1024,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let response = reqwest::Client::new()
        .post(format!("{}/db-sync/api/register-connection", b.url))
        .header("content-type", "application/json")
        .body(format!("{{\"sender_url\":\"{}\"}}", "x".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    b.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let Some(b) = start(
        "peer::slow",
        Options {
            header_read_timeout_secs: 1,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let mut stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    stream
        .write_all(b"GET /db-sync/api/status HTTP/1.1\r\nHost: b\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Trickle one header byte every 300 ms; the server must close the connection anyway.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 512];
        loop {
            if stream.write_all(b"X").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => {} // a 408 response may come first; the close follows
                Err(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow client was not cut off");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    b.stop().await;
}

#[tokio::test]
async fn the_peer_api_is_rate_limited_per_client() {
    let Some(b) = start(
        "peer::rate",
        Options {
            peer_rate_limit_per_minute: 3,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client
            .get(format!("{}/db-sync/api/status", b.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let limited = client
        .get(format!("{}/db-sync/api/status", b.url))
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=21).contains(&retry_after), "{retry_after}");
    assert_eq!(
        limited.json::<Value>().await.unwrap()["error"]["code"],
        "rate_limited"
    );
    b.stop().await;
}

#[tokio::test]
async fn peer_calls_need_a_known_bearer_token() {
    let Some(b) = start("peer::bearer", Options::default()).await else {
        return;
    };
    let client = reqwest::Client::new();
    let body = json!({ "status": "suspended", "reason": "x", "site_url": "https://a.example.com" });
    let missing = client
        .post(format!("{}/db-sync/api/update-status", b.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let unknown = client
        .post(format!("{}/db-sync/api/update-status", b.url))
        .bearer_auth(Token::generate().expose())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 401);
    assert_eq!(
        unknown.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_token"
    );
    let verify = client
        .post(format!("{}/db-sync/api/verify-connection", b.url))
        .bearer_auth("dbs_garbage")
        .json(&json!({ "site_url": "https://a.example.com", "peer_token": null }))
        .send()
        .await
        .unwrap();
    assert_eq!(verify.status(), 401);
    let status: Value = client
        .get(format!("{}/db-sync/api/status", b.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["incoming_mode"], "require_approval");
    assert_eq!(status["protocol_versions"], json!([2, 3, 4, 5, 6, 7, 8, 9]));
    b.stop().await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    // A "peer" that answers every request with a redirect to somewhere else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let redirector = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    let Some(a) = start("peer::redirect", Options::default()).await else {
        return;
    };
    let created = a
        .agent
        .create_sender(
            new_sender("to-redirector", &format!("http://{addr}")),
            None,
            &admin(),
        )
        .await
        .unwrap();
    match &created.registration {
        RegistrationOutcome::Rejected {
            http_status, code, ..
        } => assert_eq!((*http_status, code.as_str()), (307, "redirect")),
        other => panic!("expected the redirect to be refused, got {other:?}"),
    }
    assert_eq!(created.connection.status, ConnectionStatus::Pending);
    redirector.abort();
    a.stop().await;
}

#[tokio::test]
async fn a_regenerated_token_reaches_the_receiver() {
    let Some(mut b) = start(
        "peer::rotate",
        Options {
            postgres: true,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let Some(a) = start(
        "peer::rotate",
        Options {
            push_retry_secs: 1,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
        .await
        .unwrap();
    let first = a
        .agent
        .create_sender(new_sender("to-b", &b.url), None, &admin())
        .await
        .unwrap()
        .token;
    let held = |b: &RunningAgent, a: &RunningAgent| {
        let (b, a) = (b.agent.clone(), a.url.clone());
        async move {
            let receiver = b
                .store
                .find_connection_for_site(&a, Direction::Receiver)
                .await
                .unwrap()
                .unwrap();
            b.store.receiver_token(&receiver, &b.vault).unwrap()
        }
    };
    assert_eq!(held(&b, &a).await, first);

    // Delivered at once: the receiver holds the new token, both sides audited.
    let (second, push) = a.agent.regenerate_token("to-b", &admin()).await.unwrap();
    assert_eq!(push.state, "delivered", "{push:?}");
    assert_eq!(held(&b, &a).await, second.token);
    let receiver = receiver_for(&b, &a).await.unwrap();
    let events = b
        .agent
        .store
        .audit_events(Some(receiver.id), 100)
        .await
        .unwrap();
    let set = events
        .iter()
        .find(|e| e.action == "connection.token_set")
        .expect("the receiver audits the new token");
    assert_eq!(set.actor, format!("remote:{}", a.url));
    let events = a
        .agent
        .store
        .audit_events(Some(second.connection.id), 100)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.action == "connection.token_pushed" && e.detail["state"] == "delivered")
    );
    assert!(!format!("{events:?}").contains(&second.token.expose()[10..]));

    // The receiver is away: kept sealed and retried; a regeneration meanwhile replaces it, and
    // the receiver, still holding the second token, takes the third.
    b.pause().await;
    let (_, push) = a.agent.regenerate_token("to-b", &admin()).await.unwrap();
    assert_eq!(push.state, "pending", "{push:?}");
    assert!(
        push.sealed_token.is_none(),
        "the sealed token is not handed out"
    );
    let (third, push) = a.agent.regenerate_token("to-b", &admin()).await.unwrap();
    assert_eq!(push.state, "pending");
    let metadata = sender(&a, "to-b").await.metadata;
    assert!(metadata["token_push"]["sealed_token"].is_string());
    assert!(!metadata.to_string().contains(&third.token.expose()[10..]));
    b.resume().await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(a.agent.retry_pending_pushes().await.unwrap(), 1);
    let metadata = sender(&a, "to-b").await.metadata;
    assert_eq!(metadata["token_push"]["state"], "delivered", "{metadata}");
    assert!(metadata["token_push"].get("sealed_token").is_none());
    assert_eq!(held(&b, &a).await, third.token);
    assert_eq!(a.agent.retry_pending_pushes().await.unwrap(), 0);

    // Hostile callers: the right bearer with a wrong previous token, an unknown bearer, a
    // sender connection's token, a malformed new token. The receiver's token stays.
    let connection = sender(&a, "to-b").await;
    let peer_token = a
        .agent
        .vault
        .open(
            connection.id,
            connection.token_ciphertext.as_deref().unwrap(),
        )
        .unwrap();
    let client = reqwest::Client::new();
    let rotate = |bearer: String, previous: String, token: String| {
        let (client, url) = (client.clone(), b.url.clone());
        async move {
            let response = client
                .post(format!("{url}/db-sync/api/rotate-token"))
                .bearer_auth(bearer)
                .json(&json!({
                    "site_url": "https://a.example.com",
                    "previous_token_sha256": previous,
                    "token": token,
                }))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let stolen = Token::generate();
    let (status, body) = rotate(
        peer_token.clone(),
        hex::encode(first.hash()),
        stolen.expose().to_owned(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("token_mismatch"))
    );
    let (status, _) = rotate(
        Token::generate().expose().to_owned(),
        hex::encode(third.token.hash()),
        stolen.expose().to_owned(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = rotate(
        peer_token.clone(),
        hex::encode(third.token.hash()),
        "dbs_short".into(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_token"))
    );
    let (status, body) = a_side_rotate(&a, &third.token).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("wrong_direction"))
    );
    assert_eq!(held(&b, &a).await, third.token);
    a.stop().await;
    b.stop().await;
}

/// The sender's own connection token sent to the sender's rotate-token.
async fn a_side_rotate(a: &RunningAgent, token: &Token) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/db-sync/api/rotate-token", a.url))
        .bearer_auth(token.expose())
        .json(&json!({
            "site_url": "https://b.example.com",
            "previous_token_sha256": hex::encode(token.hash()),
            "token": Token::generate().expose(),
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}
