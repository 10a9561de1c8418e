//! Transfer lifecycle, approvals, listing and statistics.

use chrono::Duration;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings};
use dbsync_agent::transfer::{
    NewTransfer, Progress, TransferDirection, TransferFilter, TransferStatus, Transport,
};
use dbsync_agent::{Error, Transfer};
use uuid::Uuid;

use crate::support::{TestDb, both_engines};

both_engines!(
    lifecycle_to_completion_updates_totals,
    failures_and_cancellation,
    approval_workflow_and_expiry,
    list_filters_and_pagination,
    stats_per_connection,
);

fn new_transfer(
    connection_id: Uuid,
    table: &str,
    direction: TransferDirection,
    requires_approval: bool,
) -> NewTransfer {
    NewTransfer {
        connection_id,
        direction,
        table_name: table.into(),
        requires_approval,
        records_requested: 0,
        conflict_strategy: ConflictStrategy::Overwrite,
        transport: Some(Transport::Ws),
        requester_ip: Some("203.0.113.7".into()),
        requester_user_agent: Some("dbsync/0.1".into()),
    }
}

async fn create(
    db: &TestDb,
    connection_id: Uuid,
    table: &str,
    direction: TransferDirection,
    approval: bool,
) -> Transfer {
    db.store
        .create_transfer(
            new_transfer(connection_id, table, direction, approval),
            Duration::hours(24),
            &db.actor,
            db.now(),
        )
        .await
        .unwrap()
}

async fn lifecycle_to_completion_updates_totals(db: TestDb) {
    let c = db
        .active_sender("life", ConnectionSettings::default())
        .await;
    let t = create(
        &db,
        c.connection.id,
        "users",
        TransferDirection::Send,
        false,
    )
    .await;
    assert_eq!(t.status, TransferStatus::Pending);
    assert_eq!(t.transport.as_deref(), Some("ws"));
    assert!(matches!(
        db.store.complete_transfer(t.id, db.now()).await,
        Err(Error::IllegalTransition { .. })
    ));

    db.clock.advance(Duration::seconds(5));
    let started = db.store.start_transfer(t.id, db.now()).await.unwrap();
    assert_eq!(started.status, TransferStatus::InProgress);
    assert_eq!(started.started_at, Some(db.now()));
    for batch in 0..3 {
        db.store
            .record_progress(
                t.id,
                &Progress {
                    records_transferred: 100,
                    records_created: 90,
                    records_updated: 10,
                    bytes_wire: 1_000,
                    bytes_raw: 8_000,
                    resume_key: Some(serde_json::json!([batch * 100 + 99])),
                    ..Progress::default()
                },
            )
            .await
            .unwrap();
    }
    db.clock.advance(Duration::seconds(5));
    let done = db.store.complete_transfer(t.id, db.now()).await.unwrap();
    assert_eq!(done.status, TransferStatus::Completed);
    assert_eq!(done.completed_at, Some(db.now()));
    assert_eq!(
        (
            done.records_transferred,
            done.records_created,
            done.records_updated
        ),
        (300, 270, 30)
    );
    assert_eq!((done.bytes_wire, done.bytes_raw), (3_000, 24_000));
    assert_eq!(done.resume_key, Some(serde_json::json!([299])));

    let connection = db.store.get_connection("life").await.unwrap();
    assert_eq!(
        (
            connection.total_transfers,
            connection.total_records,
            connection.total_bytes
        ),
        (1, 300, 3_000)
    );
    assert_eq!(connection.last_transfer_at, Some(db.now()));
    // Terminal: no more steps.
    assert!(matches!(
        db.store.start_transfer(t.id, db.now()).await,
        Err(Error::IllegalTransition { .. })
    ));
    assert!(matches!(
        db.store.record_progress(t.id, &Progress::default()).await,
        Err(Error::IllegalTransition { .. })
    ));
}

async fn failures_and_cancellation(db: TestDb) {
    let c = db
        .active_sender("fail", ConnectionSettings::default())
        .await;
    let a = create(&db, c.connection.id, "a", TransferDirection::Receive, false).await;
    db.store.start_transfer(a.id, db.now()).await.unwrap();
    let failed = db
        .store
        .fail_transfer(a.id, "connection reset by peer", db.now())
        .await
        .unwrap();
    assert_eq!(failed.status, TransferStatus::Failed);
    assert_eq!(
        failed.error_message.as_deref(),
        Some("connection reset by peer")
    );

    let b = create(&db, c.connection.id, "b", TransferDirection::Receive, true).await;
    let cancelled = db
        .store
        .cancel_transfer(b.id, &db.actor, db.now())
        .await
        .unwrap();
    assert_eq!(cancelled.status, TransferStatus::Cancelled);
    assert!(matches!(
        db.store.cancel_transfer(b.id, &db.actor, db.now()).await,
        Err(Error::IllegalTransition { .. })
    ));
    assert!(matches!(
        db.store.get_transfer(Uuid::new_v4()).await,
        Err(Error::NotFound { .. })
    ));
}

async fn approval_workflow_and_expiry(db: TestDb) {
    let c = db
        .active_sender("appr", ConnectionSettings::default())
        .await;
    let admin = Actor::admin("ops");

    let a = create(&db, c.connection.id, "users", TransferDirection::Send, true).await;
    assert_eq!(a.status, TransferStatus::PendingApproval);
    assert!(a.requires_approval);
    assert_eq!(a.approval_expires_at, Some(db.now() + Duration::hours(24)));
    // Waiting for approval: it cannot start.
    assert!(matches!(
        db.store.start_transfer(a.id, db.now()).await,
        Err(Error::IllegalTransition { .. })
    ));
    let approved = db
        .store
        .approve_transfer(a.id, &admin, db.now())
        .await
        .unwrap();
    assert_eq!(approved.status, TransferStatus::Approved);
    assert_eq!(approved.approved_by.as_deref(), Some("admin:ops"));
    assert_eq!(
        db.store
            .start_transfer(a.id, db.now())
            .await
            .unwrap()
            .status,
        TransferStatus::InProgress
    );

    let b = create(
        &db,
        c.connection.id,
        "orders",
        TransferDirection::Send,
        true,
    )
    .await;
    assert!(matches!(
        db.store.deny_transfer(b.id, "", &admin, db.now()).await,
        Err(Error::Invalid {
            field: "reason",
            ..
        })
    ));
    let denied = db
        .store
        .deny_transfer(b.id, "contains PII", &admin, db.now())
        .await
        .unwrap();
    assert_eq!(denied.status, TransferStatus::Denied);
    assert_eq!(denied.denial_reason.as_deref(), Some("contains PII"));
    assert!(matches!(
        db.store.approve_transfer(b.id, &admin, db.now()).await,
        Err(Error::IllegalTransition { .. })
    ));

    // Nobody approves within 24 h: it expires and can no longer be approved.
    let late = create(
        &db,
        c.connection.id,
        "events",
        TransferDirection::Send,
        true,
    )
    .await;
    db.clock
        .advance(Duration::hours(23) + Duration::minutes(59));
    assert_eq!(db.store.expire_due_approvals(db.now()).await.unwrap(), 0);
    db.clock.advance(Duration::minutes(1));
    match db.store.approve_transfer(late.id, &admin, db.now()).await {
        Err(Error::IllegalTransition { status, .. }) => assert_eq!(status, "expired"),
        other => panic!("expected expiry, got {other:?}"),
    }
    assert_eq!(
        db.store.get_transfer(late.id).await.unwrap().status,
        TransferStatus::Expired
    );

    let actions: Vec<String> = db
        .store
        .audit_events(Some(c.connection.id), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.transfer_id.is_some())
        .map(|e| format!("{} {}", e.action, e.actor))
        .collect();
    assert!(
        actions.contains(&"transfer.approved admin:ops".to_string()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"transfer.denied admin:ops".to_string()),
        "{actions:?}"
    );
}

async fn list_filters_and_pagination(db: TestDb) {
    let one = db
        .active_sender("one", ConnectionSettings::default())
        .await
        .connection
        .id;
    let two = db
        .active_sender("two", ConnectionSettings::default())
        .await
        .connection
        .id;
    let start = db.now();
    let mut created = Vec::new();
    for i in 0..12 {
        db.clock.advance(Duration::minutes(10));
        let connection = if i % 3 == 0 { two } else { one };
        let direction = if i % 2 == 0 {
            TransferDirection::Send
        } else {
            TransferDirection::Receive
        };
        let table = if i < 6 { "users" } else { "orders" };
        let t = create(&db, connection, table, direction, false).await;
        if i % 4 == 0 {
            db.store.start_transfer(t.id, db.now()).await.unwrap();
        }
        created.push(t);
    }
    let list = |filter: TransferFilter| {
        let store = db.store.clone();
        async move { store.list_transfers(&filter).await.unwrap() }
    };

    let all = list(TransferFilter::default()).await;
    assert_eq!(all.total, 12);
    assert_eq!(
        all.items.first().unwrap().id,
        created.last().unwrap().id,
        "newest first"
    );

    let by_connection = list(TransferFilter {
        connection_id: Some(two),
        ..Default::default()
    })
    .await;
    assert_eq!(by_connection.total, 4);
    assert!(
        by_connection
            .items
            .iter()
            .all(|t| t.connection_id == Some(two))
    );

    let sends = list(TransferFilter {
        direction: Some(TransferDirection::Send),
        ..Default::default()
    })
    .await;
    assert_eq!(sends.total, 6);

    let running = list(TransferFilter {
        status: Some(TransferStatus::InProgress),
        ..Default::default()
    })
    .await;
    assert_eq!(running.total, 3);

    let orders = list(TransferFilter {
        table_name: Some("orders".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(orders.total, 6);

    // Item i is created at start + 10 (i + 1) min, so [start+30, start+60) holds items 2, 3, 4.
    let window = list(TransferFilter {
        since: Some(start + Duration::minutes(30)),
        until: Some(start + Duration::minutes(60)),
        ..Default::default()
    })
    .await;
    let ids: Vec<Uuid> = window.items.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![created[4].id, created[3].id, created[2].id]);

    let combined = list(TransferFilter {
        connection_id: Some(one),
        direction: Some(TransferDirection::Receive),
        table_name: Some("users".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(combined.total, 2); // items 1 and 5

    let mut seen = Vec::new();
    for page in 1..=3 {
        let p = list(TransferFilter {
            page: Some(page),
            per_page: Some(5),
            ..Default::default()
        })
        .await;
        assert_eq!((p.total, p.page, p.per_page), (12, page, 5));
        seen.extend(p.items.into_iter().map(|t| t.id));
    }
    assert_eq!(seen.len(), 12);
    let mut expected: Vec<Uuid> = created.iter().rev().map(|t| t.id).collect();
    assert_eq!(seen, expected);
    expected.dedup();
    assert_eq!(expected.len(), 12);
    let beyond = list(TransferFilter {
        page: Some(4),
        per_page: Some(5),
        ..Default::default()
    })
    .await;
    assert!(beyond.items.is_empty());
    assert_eq!(beyond.total, 12);
}

async fn stats_per_connection(db: TestDb) {
    let c = db
        .active_sender("stats", ConnectionSettings::default())
        .await
        .connection
        .id;
    let other = db
        .active_sender("other", ConnectionSettings::default())
        .await
        .connection
        .id;
    let empty = db.store.connection_stats(c).await.unwrap();
    assert_eq!(empty.total_transfers, 0);
    assert_eq!(empty.total_records, 0);

    for (records, bytes, outcome) in [
        (10, 100, "complete"),
        (20, 200, "complete"),
        (5, 50, "fail"),
    ] {
        let t = create(&db, c, "t", TransferDirection::Send, false).await;
        db.store.start_transfer(t.id, db.now()).await.unwrap();
        db.store
            .record_progress(
                t.id,
                &Progress {
                    records_transferred: records,
                    bytes_wire: bytes,
                    bytes_raw: bytes * 4,
                    ..Progress::default()
                },
            )
            .await
            .unwrap();
        if outcome == "complete" {
            db.store.complete_transfer(t.id, db.now()).await.unwrap();
        } else {
            db.store
                .fail_transfer(t.id, "boom", db.now())
                .await
                .unwrap();
        }
    }
    create(&db, c, "t", TransferDirection::Send, true).await;
    create(&db, other, "t", TransferDirection::Send, false).await;

    let stats = db.store.connection_stats(c).await.unwrap();
    assert_eq!(stats.total_transfers, 4);
    assert_eq!(stats.completed_transfers, 2);
    assert_eq!(stats.failed_transfers, 1);
    assert_eq!(stats.pending_approval, 1);
    assert_eq!(stats.total_records, 35);
    assert_eq!(stats.total_bytes, 350);
    assert_eq!(stats.total_bytes_raw, 1_400);
}
