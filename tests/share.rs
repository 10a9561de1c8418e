//! One-time shares between two agents on real sockets: a code pulls its tables once and dies;
//! wrong codes, a used code, an expired code and a table outside the share are refused.

use chrono::{Duration, Utc};
use dbsync_agent::audit::Actor;
use dbsync_agent::pull::PullOptions;
use dbsync_agent::transfer::{TransferDirection, TransferFilter};
use dbsync_agent::{ConnectionStatus, Error, ManualClock};

use crate::pull::{exec, rows, schema_statements};
use crate::support::agents::{Options, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

/// The code with its last character changed (same share, wrong secret).
fn wrong(code: &str) -> String {
    let mut wrong = code.to_owned();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_code_pulls_its_tables_once() {
    let clock = ManualClock::new(Utc::now());
    let Some(a) = start(
        "share::once",
        Options {
            clock: Some(std::sync::Arc::new(clock.clone())),
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let Some(b) = start(
        "share::once",
        Options {
            postgres: true,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    exec(&a, &schema_statements(20)).await;
    let missing = a
        .agent
        .create_share(&["nope".into()], Duration::minutes(15), &admin())
        .await;
    assert!(missing.is_err(), "{missing:?}");
    let share = a
        .agent
        .create_share(&["users".into()], Duration::minutes(15), &admin())
        .await
        .unwrap();
    let code = share.code.display();
    assert_eq!(share.connection.status, ConnectionStatus::Active);
    assert!(
        share.connection.token_hash.is_none(),
        "no token until redeemed"
    );
    let stored = serde_json::to_string(&share.connection.metadata).unwrap();
    assert!(!stored.contains(&code[5..]), "the code is stored hashed");

    // A wrong secret is refused and counted; the right code gives a connection for the share.
    let refused = b.agent.redeem_share(&a.url, &wrong(&code), &admin()).await;
    assert!(
        matches!(refused, Err(Error::Invalid { field: "code", .. })),
        "{refused:?}"
    );
    let (held, tables) = b
        .agent
        .redeem_share(&a.url, &code.to_lowercase(), &admin())
        .await
        .unwrap();
    assert_eq!(tables, ["users"]);
    // A table outside the share is refused.
    let outside = b
        .agent
        .pull(
            &held.name,
            &PullOptions {
                tables: Some(vec!["Order".into()]),
                ..PullOptions::default()
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&outside, Err(Error::Remote { code, .. }) if code.as_str() == "table_not_allowed"),
        "{outside:?}"
    );
    let summary = b
        .agent
        .pull(
            &held.name,
            &PullOptions {
                tables: Some(tables),
                ..PullOptions::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.tables[0].rows, 20);
    assert_eq!(
        rows(&a.agent.store, "users").await,
        rows(&b.agent.store, "users").await
    );
    // Both histories hold the transfer.
    let sent = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            connection_id: Some(share.connection.id),
            direction: Some(TransferDirection::Send),
            ..TransferFilter::default()
        })
        .await
        .unwrap();
    assert_eq!((sent.total, sent.items[0].records_transferred), (1, 20));
    let received = b
        .agent
        .store
        .list_transfers(&TransferFilter {
            connection_id: Some(held.id),
            ..TransferFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(received.items[0].records_transferred, 20);

    // Done: the receiver's connection is closed and off the site; the code does not work again.
    let closed = b.agent.finish_share(&held, &admin()).await.unwrap();
    assert_eq!(closed.status, ConnectionStatus::Revoked);
    let again = b.agent.redeem_share(&a.url, &code, &admin()).await;
    assert!(matches!(again, Err(Error::Invalid { .. })), "{again:?}");
    // The sender's share is spent (one download per table) and the sweep expires it.
    let expired = a
        .agent
        .store
        .expire_due_connections(a.agent.now())
        .await
        .unwrap();
    assert!(
        expired.iter().any(|c| c.id == share.connection.id),
        "{expired:?}"
    );
    let events = a
        .agent
        .store
        .audit_events(Some(share.connection.id), 100)
        .await
        .unwrap();
    for action in [
        "share.created",
        "share.refused",
        "share.redeemed",
        "connection.expired",
    ] {
        assert!(
            events.iter().any(|e| e.action == action),
            "{action}: {events:?}"
        );
    }

    // Five wrong secrets revoke a share: the right code is refused after.
    let guessed = a
        .agent
        .create_share(&["users".into()], Duration::minutes(15), &admin())
        .await
        .unwrap();
    let guessed_code = guessed.code.display();
    for _ in 0..dbsync_agent::sync::share::MAX_TRIES {
        assert!(
            b.agent
                .redeem_share(&a.url, &wrong(&guessed_code), &admin())
                .await
                .is_err()
        );
    }
    assert_eq!(
        a.agent
            .store
            .get_connection(&guessed.connection.name)
            .await
            .unwrap()
            .status,
        ConnectionStatus::Revoked
    );
    assert!(
        b.agent
            .redeem_share(&a.url, &guessed_code, &admin())
            .await
            .is_err()
    );

    // Wrong guesses at once each count (none lost to another's write).
    let raced = a
        .agent
        .create_share(&["users".into()], Duration::minutes(15), &admin())
        .await
        .unwrap();
    let raced_code = wrong(&raced.code.display());
    let guesses = (0..8).map(|_| {
        a.agent.handle_redeem_share(
            dbsync_protocol::peer::RedeemShareRequest {
                code: raced_code.clone(),
                site_url: b.url.clone(),
            },
            "127.0.0.1".parse().unwrap(),
        )
    });
    for refused in futures_util::future::join_all(guesses).await {
        assert!(refused.is_err());
    }
    let counted = a
        .agent
        .store
        .get_connection(&raced.connection.name)
        .await
        .unwrap();
    assert_eq!(
        counted.metadata["share"]["tries"], 8,
        "{:?}",
        counted.metadata
    );
    assert_eq!(counted.status, ConnectionStatus::Revoked);

    // A code past its time is refused.
    let late = a
        .agent
        .create_share(&["users".into()], Duration::minutes(15), &admin())
        .await
        .unwrap();
    clock.advance(Duration::minutes(16));
    assert!(
        b.agent
            .redeem_share(&a.url, &late.code.display(), &admin())
            .await
            .is_err()
    );
    assert_eq!(
        a.agent
            .store
            .get_connection(&late.connection.name)
            .await
            .unwrap()
            .status,
        ConnectionStatus::Expired
    );
    // Malformed codes never reach the sender.
    for bad in ["", "K7QM", "K7QM-8H2D-X9PA-4RTU"] {
        assert!(
            b.agent.redeem_share(&a.url, bad, &admin()).await.is_err(),
            "{bad}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// The peer endpoint answers every failure alike, and is rate limited like the rest.
#[tokio::test]
async fn the_redeem_endpoint_tells_nothing() {
    let Some(a) = start(
        "share::endpoint",
        Options {
            peer_rate_limit_per_minute: 4,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    exec(&a, &schema_statements(1)).await;
    let share = a
        .agent
        .create_share(&["users".into()], Duration::minutes(15), &admin())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    for code in [
        "ZZZZ-ZZZZ-ZZZZ-ZZZZ".to_owned(),
        wrong(&share.code.display()),
        "garbage".to_owned(),
    ] {
        let response = client
            .post(format!("{}/db-sync/api/redeem-share", a.url))
            .json(&serde_json::json!({ "code": code, "site_url": "https://b.example.com" }))
            .send()
            .await
            .unwrap();
        answers.push((response.status().as_u16(), response.text().await.unwrap()));
    }
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert_eq!(answers[0].0, 401);
    assert!(answers[0].1.contains("invalid_share_code"));
    let mut limited = false;
    for _ in 0..4 {
        let response = client
            .post(format!("{}/db-sync/api/redeem-share", a.url))
            .json(&serde_json::json!({ "code": "ZZZZ-ZZZZ-ZZZZ-ZZZZ", "site_url": "https://b.example.com" }))
            .send()
            .await
            .unwrap();
        limited |= response.status() == 429;
    }
    assert!(limited, "guessing is rate limited per address");
    a.stop().await;
}
