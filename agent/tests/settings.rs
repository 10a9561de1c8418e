//! Incoming-registration settings.

use dbsync_agent::Error;
use dbsync_agent::settings::IncomingMode;

use crate::support::{TestDb, both_engines};

both_engines!(incoming_modes_and_password);

async fn incoming_modes_and_password(db: TestDb) {
    let initial = db.store.settings().await.unwrap();
    assert_eq!(initial.incoming_mode, IncomingMode::RequireApproval);
    assert!(initial.incoming_password_hash.is_none());

    // require_password needs a password.
    assert!(matches!(
        db.store
            .set_incoming(IncomingMode::RequirePassword, None, &db.actor, db.now())
            .await,
        Err(Error::Invalid {
            field: "password",
            ..
        })
    ));
    let set = db
        .store
        .set_incoming(
            IncomingMode::RequirePassword,
            Some("open sesame"),
            &db.actor,
            db.now(),
        )
        .await
        .unwrap();
    assert_eq!(set.incoming_mode, IncomingMode::RequirePassword);
    let hash = set.incoming_password_hash.clone().unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains("open sesame"));
    assert!(set.incoming_password_matches("open sesame"));
    assert!(!set.incoming_password_matches("open sesame!"));
    let json = serde_json::to_value(&set).unwrap();
    assert_eq!(json["incoming_password_set"], true);
    assert!(!json.to_string().contains("argon2"));

    // Switching modes keeps the password; every mode is accepted.
    for mode in IncomingMode::ALL {
        let changed = db
            .store
            .set_incoming(*mode, None, &db.actor, db.now())
            .await
            .unwrap();
        assert_eq!(changed.incoming_mode, *mode);
        assert_eq!(
            changed.incoming_password_hash.as_deref(),
            Some(hash.as_str())
        );
    }
    let events = db.store.audit_events(None, 100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "settings.incoming_changed")
            .count(),
        1 + IncomingMode::ALL.len()
    );
}
