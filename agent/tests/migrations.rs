//! Migrations: idempotent, and the agent starts on an empty database.

use dbsync_agent::Store;
use dbsync_agent::connection::{ConnectionSettings, NewConnection};

use crate::support::{TestDb, both_engines};

both_engines!(migrating_twice_is_a_no_op);

async fn migrating_twice_is_a_no_op(db: TestDb) {
    // `run` already connected (and migrated) an empty database.
    assert_eq!(db.store.migrate().await.unwrap(), 0);
    db.store
        .create_sender(
            NewConnection {
                name: "kept".into(),
                site_url: "https://kept.example.com".into(),
                settings: ConnectionSettings::default(),
            },
            &db.actor,
            db.now(),
        )
        .await
        .unwrap();
    let site_id = db.store.settings().await.unwrap().site_id;
    // A second agent start on the same database applies nothing and keeps the data.
    let again = Store::connect(&db.url).await.unwrap();
    assert_eq!(again.migrate().await.unwrap(), 0);
    assert_eq!(again.get_connection("kept").await.unwrap().name, "kept");
    assert_eq!(again.settings().await.unwrap().site_id, site_id);
    again.close().await;
}
