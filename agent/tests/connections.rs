//! Connection lifecycle, tokens and the audit trail.

use chrono::Duration;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConnectionFilter, ConnectionSettings, NewConnection, NewReceiver};
use dbsync_agent::token::Token;
use dbsync_agent::vault::Vault;
use dbsync_agent::{ConnectionStatus, Direction, Error};
use sha2::{Digest, Sha256};

use crate::support::{TestDb, both_engines};

both_engines!(
    create_stores_only_hash_and_prefix,
    legal_transitions_write_audit_columns_and_events,
    illegal_transitions_are_refused,
    regenerated_token_replaces_the_old_one,
    receiver_token_is_encrypted_at_rest,
    duplicates_are_refused,
    delete_keeps_history,
    expiry_sweep_expires_due_connections,
    connections_are_addressed_by_id_or_name,
);

fn new_sender(name: &str) -> NewConnection {
    NewConnection {
        name: name.into(),
        site_url: format!("https://{name}.example.com/"),
        settings: ConnectionSettings::default(),
    }
}

async fn create_stores_only_hash_and_prefix(db: TestDb) {
    let created = db
        .store
        .create_sender(new_sender("staging"), &db.actor, db.now())
        .await
        .unwrap();
    let token = created.token.expose().to_owned();
    let connection = &created.connection;
    assert_eq!(connection.status, ConnectionStatus::Pending);
    assert_eq!(connection.direction, Direction::Sender);
    assert_eq!(connection.site_url, "https://staging.example.com");
    assert_eq!(connection.max_records_per_request, 10_000);
    assert_eq!(connection.rate_limit_per_minute, 60);
    assert_eq!(
        connection.token_hash.as_deref(),
        Some(Sha256::digest(token.as_bytes()).as_slice())
    );
    assert!(token.starts_with(connection.token_prefix.as_deref().unwrap()));
    assert!(connection.token_prefix.as_deref().unwrap().len() < 16);

    // Nothing serialized carries the token or its hash.
    let hash_hex = hex::encode(Sha256::digest(token.as_bytes()));
    let stored = db.store.get_connection("staging").await.unwrap();
    let json = serde_json::to_string(&stored).unwrap();
    assert!(!json.contains(&token) && !json.contains(&token[10..]));
    assert!(!json.contains(&hash_hex));
    assert!(!json.contains("token_hash"));
    let events = db
        .store
        .audit_events(Some(connection.id), 100)
        .await
        .unwrap();
    let events_json = serde_json::to_string(&events).unwrap();
    assert!(!events_json.contains(&token[10..]) && !events_json.contains(&hash_hex));

    // The token finds its connection; another token does not.
    let found = db
        .store
        .find_sender_by_token(&created.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, connection.id);
    assert!(
        db.store
            .find_sender_by_token(&Token::generate())
            .await
            .unwrap()
            .is_none()
    );
}

async fn legal_transitions_write_audit_columns_and_events(db: TestDb) {
    let created = db
        .store
        .create_sender(new_sender("prod"), &db.actor, db.now())
        .await
        .unwrap();
    let id = created.connection.id;
    let admin = Actor::admin("ops");

    db.clock.advance(Duration::minutes(1));
    let approved = db
        .store
        .approve_connection("prod", &admin, db.now())
        .await
        .unwrap();
    assert_eq!(approved.status, ConnectionStatus::Active);
    assert_eq!(approved.approved_by.as_deref(), Some("admin:ops"));
    assert_eq!(approved.approved_at, Some(db.now()));

    db.clock.advance(Duration::minutes(1));
    let suspended = db
        .store
        .suspend_connection("prod", "security audit", &db.actor, db.now())
        .await
        .unwrap();
    assert_eq!(suspended.status, ConnectionStatus::Suspended);
    assert_eq!(suspended.suspended_by.as_deref(), Some("cli:tester"));
    assert_eq!(suspended.suspended_at, Some(db.now()));
    assert_eq!(
        suspended.suspended_reason.as_deref(),
        Some("security audit")
    );

    db.clock.advance(Duration::minutes(1));
    let reactivated = db
        .store
        .reactivate_connection(&id.to_string(), &admin, db.now())
        .await
        .unwrap();
    assert_eq!(reactivated.status, ConnectionStatus::Active);
    assert_eq!(reactivated.updated_at, db.now());
    // An active connection carries no old suspension (the audit trail keeps it).
    assert_eq!(reactivated.suspended_at, None);
    assert_eq!(reactivated.suspended_by, None);
    assert_eq!(reactivated.suspended_reason, None);

    db.clock.advance(Duration::minutes(1));
    let revoked = db
        .store
        .revoke_connection(
            "prod",
            "no longer needed",
            &Actor::remote("https://b.example.com"),
            db.now(),
        )
        .await
        .unwrap();
    assert_eq!(revoked.status, ConnectionStatus::Revoked);
    assert_eq!(
        revoked.revoked_by.as_deref(),
        Some("remote:https://b.example.com")
    );
    assert_eq!(revoked.revoked_reason.as_deref(), Some("no longer needed"));
    assert_eq!(revoked.revoked_at, Some(db.now()));

    let events = db.store.audit_events(Some(id), 100).await.unwrap();
    let summary: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("connection.created", "cli:tester"),
            ("connection.approved", "admin:ops"),
            ("connection.suspended", "cli:tester"),
            ("connection.reactivated", "admin:ops"),
            ("connection.revoked", "remote:https://b.example.com"),
        ]
    );
    assert_eq!(events[2].detail["reason"], "security audit");
    assert_eq!(events[2].detail["from"], "active");
    assert_eq!(events[2].detail["to"], "suspended");
}

async fn illegal_transitions_are_refused(db: TestDb) {
    db.store
        .create_sender(new_sender("a"), &db.actor, db.now())
        .await
        .unwrap();
    let refuse = |result: Result<_, Error>, action: &str, status: &str| match result {
        Err(Error::IllegalTransition {
            action: a,
            status: s,
            ..
        }) => {
            assert_eq!((a, s.as_str()), (action, status));
        }
        other => panic!("expected illegal transition, got {other:?}"),
    };
    // pending cannot be reactivated.
    refuse(
        db.store
            .reactivate_connection("a", &db.actor, db.now())
            .await,
        "reactivate",
        "pending",
    );
    db.store
        .approve_connection("a", &db.actor, db.now())
        .await
        .unwrap();
    refuse(
        db.store.approve_connection("a", &db.actor, db.now()).await,
        "approve",
        "active",
    );
    refuse(
        db.store
            .reactivate_connection("a", &db.actor, db.now())
            .await,
        "reactivate",
        "active",
    );
    // Reasons are required.
    assert!(matches!(
        db.store
            .suspend_connection("a", "  ", &db.actor, db.now())
            .await,
        Err(Error::Invalid {
            field: "reason",
            ..
        })
    ));
    db.store
        .revoke_connection("a", "done", &db.actor, db.now())
        .await
        .unwrap();
    refuse(
        db.store
            .reactivate_connection("a", &db.actor, db.now())
            .await,
        "reactivate",
        "revoked",
    );
    refuse(
        db.store.approve_connection("a", &db.actor, db.now()).await,
        "approve",
        "revoked",
    );
    refuse(
        db.store
            .suspend_connection("a", "x", &db.actor, db.now())
            .await,
        "suspend",
        "revoked",
    );
    refuse(
        db.store
            .revoke_connection("a", "x", &db.actor, db.now())
            .await,
        "revoke",
        "revoked",
    );
    refuse(
        db.store
            .regenerate_token("a", &db.actor, db.now())
            .await
            .map(|c| c.connection),
        "regenerate the token of",
        "revoked",
    );
    // Nothing was written for the refused attempts.
    let id = db.store.get_connection("a").await.unwrap().id;
    let actions: Vec<String> = db
        .store
        .audit_events(Some(id), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "connection.created",
            "connection.approved",
            "connection.revoked"
        ]
    );
    assert!(matches!(
        db.store
            .approve_connection("missing", &db.actor, db.now())
            .await,
        Err(Error::NotFound { .. })
    ));
}

async fn regenerated_token_replaces_the_old_one(db: TestDb) {
    let created = db.active_sender("c", ConnectionSettings::default()).await;
    let renewed = db
        .store
        .regenerate_token("c", &db.actor, db.now())
        .await
        .unwrap();
    assert_ne!(renewed.token, created.token);
    assert!(
        db.store
            .find_sender_by_token(&created.token)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        db.store
            .find_sender_by_token(&renewed.token)
            .await
            .unwrap()
            .unwrap()
            .id,
        created.connection.id
    );
    let actions: Vec<String> = db
        .store
        .audit_events(Some(created.connection.id), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(actions.contains(&"connection.token_regenerated".to_string()));
}

async fn receiver_token_is_encrypted_at_rest(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let vault = Vault::with_key_file(dir.path().join("dbsync.key"));
    let token = Token::generate();
    let connection = db
        .store
        .add_receiver(
            NewReceiver {
                name: "from-prod",
                site_url: "https://prod.example.com",
                token: token.expose(),
                status: ConnectionStatus::Active,
                peer_token: None,
                metadata: None,
            },
            &vault,
            &db.actor,
            db.now(),
        )
        .await
        .unwrap();
    assert_eq!(connection.direction, Direction::Receiver);
    assert_eq!(connection.status, ConnectionStatus::Active);
    assert!(connection.token_hash.is_none());
    let sealed = connection.token_ciphertext.clone().unwrap();
    assert!(
        !sealed
            .windows(20)
            .any(|w| w == &token.expose().as_bytes()[4..24])
    );
    assert_eq!(db.store.receiver_token(&connection, &vault).unwrap(), token);
    let json = serde_json::to_value(&connection).unwrap();
    assert_eq!(json["token_stored"], true);

    // A token with a broken checksum is refused.
    let mut broken = token.expose().to_owned();
    broken.replace_range(8..9, if &broken[8..9] == "x" { "y" } else { "x" });
    let err = db
        .store
        .add_receiver(
            NewReceiver {
                name: "other",
                site_url: "https://other.example.com",
                token: &broken,
                status: ConnectionStatus::Active,
                peer_token: None,
                metadata: None,
            },
            &vault,
            &db.actor,
            db.now(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // A receiver connection does not authenticate incoming sessions.
    assert!(
        db.store
            .find_sender_by_token(&token)
            .await
            .unwrap()
            .is_none()
    );
}

async fn duplicates_are_refused(db: TestDb) {
    db.store
        .create_sender(new_sender("dup"), &db.actor, db.now())
        .await
        .unwrap();
    let same_name = NewConnection {
        site_url: "https://elsewhere.example.com".into(),
        ..new_sender("dup")
    };
    let err = db
        .store
        .create_sender(same_name, &db.actor, db.now())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    let same_site = NewConnection {
        name: "dup2".into(),
        ..new_sender("dup")
    };
    let err = db
        .store
        .create_sender(same_site, &db.actor, db.now())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict(m) if m.contains("sender connection to https://dup.example.com")),
        "{err:?}"
    );
    // Bad settings are refused before the database.
    let bad = NewConnection {
        name: "bad".into(),
        site_url: "https://bad.example.com".into(),
        settings: ConnectionSettings {
            max_records_per_request: 0,
            ..ConnectionSettings::default()
        },
    };
    assert!(matches!(
        db.store.create_sender(bad, &db.actor, db.now()).await,
        Err(Error::Invalid {
            field: "max_records_per_request",
            ..
        })
    ));
}

async fn delete_keeps_history(db: TestDb) {
    let created = db
        .active_sender("gone", ConnectionSettings::default())
        .await;
    let transfer = db
        .store
        .create_transfer(
            dbsync_agent::transfer::NewTransfer {
                connection_id: created.connection.id,
                direction: dbsync_agent::transfer::TransferDirection::Send,
                table_name: "users".into(),
                requires_approval: false,
                records_requested: 0,
                conflict_strategy: dbsync_agent::connection::ConflictStrategy::Overwrite,
                transport: None,
                requester_ip: None,
                requester_user_agent: None,
            },
            Duration::hours(24),
            &db.actor,
            db.now(),
        )
        .await
        .unwrap();
    db.store
        .delete_connection("gone", &db.actor, db.now())
        .await
        .unwrap();
    assert!(matches!(
        db.store.get_connection("gone").await,
        Err(Error::NotFound { .. })
    ));
    let kept = db.store.get_transfer(transfer.id).await.unwrap();
    assert_eq!(kept.connection_id, None);
    let events = db
        .store
        .audit_events(Some(created.connection.id), 100)
        .await
        .unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.action, "connection.deleted");
    assert_eq!(last.detail["name"], "gone");
}

async fn expiry_sweep_expires_due_connections(db: TestDb) {
    let soon = ConnectionSettings {
        expires_at: Some(db.now() + Duration::hours(1)),
        ..ConnectionSettings::default()
    };
    db.active_sender("soon", soon).await;
    let limited = db
        .active_sender(
            "limited",
            ConnectionSettings {
                max_downloads: Some(1),
                ..ConnectionSettings::default()
            },
        )
        .await;
    db.active_sender("forever", ConnectionSettings::default())
        .await;

    assert!(
        db.store
            .expire_due_connections(db.now())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(db.store.take_download(limited.connection.id).await.unwrap());
    db.clock.advance(Duration::hours(2));
    let mut expired: Vec<String> = db
        .store
        .expire_due_connections(db.now())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    expired.sort();
    assert_eq!(expired, ["limited", "soon"]);
    assert_eq!(
        db.store.get_connection("soon").await.unwrap().status,
        ConnectionStatus::Expired
    );
    assert_eq!(
        db.store.get_connection("forever").await.unwrap().status,
        ConnectionStatus::Active
    );
    let events = db
        .store
        .audit_events(Some(limited.connection.id), 100)
        .await
        .unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.action.as_str(), last.actor.as_str()),
        ("connection.expired", "system")
    );
    // Expired is terminal.
    assert!(matches!(
        db.store
            .reactivate_connection("soon", &db.actor, db.now())
            .await,
        Err(Error::IllegalTransition { .. })
    ));
}

async fn connections_are_addressed_by_id_or_name(db: TestDb) {
    let a = db
        .active_sender("alpha", ConnectionSettings::default())
        .await;
    db.store
        .create_sender(new_sender("beta"), &db.actor, db.now())
        .await
        .unwrap();
    assert_eq!(
        db.store
            .get_connection(&a.connection.id.to_string())
            .await
            .unwrap()
            .name,
        "alpha"
    );
    assert_eq!(
        db.store.get_connection("alpha").await.unwrap().id,
        a.connection.id
    );
    let all = db
        .store
        .list_connections(&ConnectionFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let active = db
        .store
        .list_connections(&ConnectionFilter {
            status: Some(ConnectionStatus::Active),
            direction: Some(Direction::Sender),
        })
        .await
        .unwrap();
    assert_eq!(
        active.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["alpha"]
    );
}
