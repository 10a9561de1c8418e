//! `validate_connection`: every error code, in order, with the clock set rather than slept; and
//! the atomic limit counters under concurrency.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{Duration, TimeZone, Utc};
use dbsync_agent::access::{AccessDenied, Validator};
use dbsync_agent::config::Secret;
use dbsync_agent::connection::ConnectionSettings;
use dbsync_agent::token::Token;
use dbsync_agent::{ConnectionStatus, ManualClock};

use crate::support::{TestDb, both_engines};

both_engines!(
    token_checks,
    status_and_expiry,
    lifetime_limits,
    ip_whitelist_v4_and_v6,
    allowed_hours_plain_wrapping_and_zoned,
    download_password,
    rate_limit_with_retry_after,
    checks_run_in_spec_order,
    concurrent_record_takes_never_exceed_the_limit,
    concurrent_download_takes_never_exceed_the_limit,
);

const HOME: &str = "203.0.113.7";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn validator(db: &TestDb) -> Validator {
    Validator::new(db.store.clone(), Arc::new(db.clock.clone()))
}

async fn code(
    db: &TestDb,
    v: &Validator,
    token: &str,
    from: &str,
    password: Option<&str>,
) -> Result<(), &'static str> {
    v.validate_connection(token, ip(from), db.now(), password)
        .await
        .map(|_| ())
        .map_err(|denied| denied.code())
}

async fn token_checks(db: TestDb) {
    let v = validator(&db);
    let created = db.active_sender("t", ConnectionSettings::default()).await;
    let token = created.token.expose();
    assert_eq!(code(&db, &v, token, HOME, None).await, Ok(()));
    assert_eq!(code(&db, &v, "", HOME, None).await, Err("invalid_token"));
    assert_eq!(
        code(&db, &v, &token[..token.len() - 1], HOME, None).await,
        Err("invalid_token")
    );
    assert_eq!(
        code(&db, &v, Token::generate().expose(), HOME, None).await,
        Err("invalid_token")
    );
    let connected = db.store.get_connection("t").await.unwrap();
    assert_eq!(connected.last_connected_at, Some(db.now()));

    // A broken checksum is refused before any query: with the database closed the answer is
    // still invalid_token, whereas a well-formed token needs the database.
    let mut broken = token.to_owned();
    broken.replace_range(20..21, if &broken[20..21] == "Q" { "R" } else { "Q" });
    db.store.close().await;
    assert_eq!(
        code(&db, &v, &broken, HOME, None).await,
        Err("invalid_token")
    );
    assert_eq!(
        code(&db, &v, token, HOME, None).await,
        Err("internal_error")
    );
}

async fn status_and_expiry(db: TestDb) {
    let v = validator(&db);
    let pending = db
        .store
        .create_sender(
            dbsync_agent::NewConnection {
                name: "p".into(),
                site_url: "https://p.example.com".into(),
                settings: ConnectionSettings::default(),
            },
            &db.actor,
            db.now(),
        )
        .await
        .unwrap();
    let denied = v
        .validate_connection(pending.token.expose(), ip(HOME), db.now(), None)
        .await
        .unwrap_err();
    assert!(matches!(
        denied,
        AccessDenied::ConnectionNotActive(ConnectionStatus::Pending)
    ));
    assert_eq!(denied.code(), "connection_not_active");

    let s = db.active_sender("s", ConnectionSettings::default()).await;
    db.store
        .suspend_connection("s", "maintenance", &db.actor, db.now())
        .await
        .unwrap();
    assert_eq!(
        code(&db, &v, s.token.expose(), HOME, None).await,
        Err("connection_not_active")
    );

    let e = db
        .active_sender(
            "e",
            ConnectionSettings {
                expires_at: Some(db.now() + Duration::minutes(30)),
                ..ConnectionSettings::default()
            },
        )
        .await;
    assert_eq!(code(&db, &v, e.token.expose(), HOME, None).await, Ok(()));
    db.clock.advance(Duration::minutes(30));
    assert_eq!(
        code(&db, &v, e.token.expose(), HOME, None).await,
        Err("connection_expired")
    );
    // Detected at validation: the connection is now expired for good.
    assert_eq!(
        db.store.get_connection("e").await.unwrap().status,
        ConnectionStatus::Expired
    );
    assert_eq!(
        code(&db, &v, e.token.expose(), HOME, None).await,
        Err("connection_expired")
    );
}

async fn lifetime_limits(db: TestDb) {
    let v = validator(&db);
    let d = db
        .active_sender(
            "d",
            ConnectionSettings {
                max_downloads: Some(2),
                ..ConnectionSettings::default()
            },
        )
        .await;
    assert!(db.store.take_download(d.connection.id).await.unwrap());
    assert_eq!(code(&db, &v, d.token.expose(), HOME, None).await, Ok(()));
    assert!(db.store.take_download(d.connection.id).await.unwrap());
    assert!(!db.store.take_download(d.connection.id).await.unwrap());
    assert_eq!(
        code(&db, &v, d.token.expose(), HOME, None).await,
        Err("download_limit_exceeded")
    );

    let r = db
        .active_sender(
            "r",
            ConnectionSettings {
                max_records_total: Some(100),
                ..ConnectionSettings::default()
            },
        )
        .await;
    assert_eq!(
        db.store.take_records(r.connection.id, 60).await.unwrap(),
        60
    );
    assert_eq!(code(&db, &v, r.token.expose(), HOME, None).await, Ok(()));
    assert_eq!(
        db.store.take_records(r.connection.id, 60).await.unwrap(),
        40
    );
    assert_eq!(db.store.take_records(r.connection.id, 1).await.unwrap(), 0);
    assert_eq!(
        code(&db, &v, r.token.expose(), HOME, None).await,
        Err("record_limit_exceeded")
    );
    // Rows reserved but never sent go back.
    db.store.release_records(r.connection.id, 10).await.unwrap();
    assert_eq!(code(&db, &v, r.token.expose(), HOME, None).await, Ok(()));
}

async fn ip_whitelist_v4_and_v6(db: TestDb) {
    let v = validator(&db);
    let open = db
        .active_sender("open", ConnectionSettings::default())
        .await;
    for from in ["10.1.2.3", "2001:db8::1", "127.0.0.1"] {
        assert_eq!(
            code(&db, &v, open.token.expose(), from, None).await,
            Ok(()),
            "empty list allows {from}"
        );
    }
    let listed = db
        .active_sender(
            "listed",
            ConnectionSettings {
                ip_whitelist: vec![
                    "10.0.0.0/8".into(),
                    "192.0.2.10".into(),
                    "2001:db8:abcd::/48".into(),
                ],
                ..ConnectionSettings::default()
            },
        )
        .await;
    let t = listed.token.expose();
    for from in [
        "10.255.0.1",
        "192.0.2.10",
        "2001:db8:abcd:12::5",
        "::ffff:10.9.9.9",
    ] {
        assert_eq!(
            code(&db, &v, t, from, None).await,
            Ok(()),
            "{from} is listed"
        );
    }
    for from in ["11.0.0.1", "192.0.2.11", "2001:db8:abce::1", "::1"] {
        assert_eq!(
            code(&db, &v, t, from, None).await,
            Err("ip_not_whitelisted"),
            "{from} is not listed"
        );
    }
    // The refusal names the address seen, and each one is in the audit trail with it.
    let refused = v
        .validate_connection(t, ip("11.0.0.1"), db.now(), None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("11.0.0.1"), "{refused}");
    let events = db
        .store
        .audit_events(Some(listed.connection.id), 100)
        .await
        .unwrap();
    let seen: Vec<String> = events
        .iter()
        .filter(|e| e.action == "session.refused")
        .map(|e| {
            e.detail["client_ip"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.contains(&"2001:db8:abce::1".to_owned()), "{seen:?}");
    assert!(
        events
            .iter()
            .filter(|e| e.action == "session.refused")
            .all(|e| e.detail["code"] == "ip_not_whitelisted")
    );
}

async fn allowed_hours_plain_wrapping_and_zoned(db: TestDb) {
    let v = validator(&db);
    // Each connection's checks move forward in time (its rate limiter sees the same clock).
    let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 11, 25, h, m, 0).unwrap();
    let next_day = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 11, 26, h, m, 0).unwrap();
    let night = db
        .active_sender(
            "night",
            ConnectionSettings {
                allowed_hours: Some((2, 5)),
                ..ConnectionSettings::default()
            },
        )
        .await;
    let wrap = db
        .active_sender(
            "wrap",
            ConnectionSettings {
                allowed_hours: Some((22, 3)),
                ..ConnectionSettings::default()
            },
        )
        .await;
    // 09:00-17:00 in Tokyo (UTC+9, no DST) is 00:00-08:00 UTC.
    let tokyo = db
        .active_sender(
            "tokyo",
            ConnectionSettings {
                allowed_hours: Some((9, 17)),
                time_zone: "Asia/Tokyo".into(),
                ..ConnectionSettings::default()
            },
        )
        .await;
    let cases = [
        (&night, at(1, 59), false),
        (&night, at(2, 0), true),
        (&night, at(4, 59), true),
        (&night, at(5, 0), false),
        (&wrap, at(21, 59), false),
        (&wrap, at(22, 0), true),
        (&wrap, at(23, 30), true),
        (&wrap, next_day(0, 30), true),
        (&wrap, next_day(2, 59), true),
        (&wrap, next_day(3, 0), false),
        (&wrap, next_day(12, 0), false),
        (&tokyo, at(0, 0), true),
        (&tokyo, at(7, 59), true),
        (&tokyo, at(8, 0), false),
        (&tokyo, at(23, 59), false),
    ];
    for (connection, when, allowed) in cases {
        db.clock.set(when);
        let expected = if allowed {
            Ok(())
        } else {
            Err("outside_allowed_hours")
        };
        assert_eq!(
            code(&db, &v, connection.token.expose(), HOME, None).await,
            expected,
            "{} at {when}",
            connection.connection.name
        );
    }
    // A window that is empty or out of range is refused when configured.
    let err = db
        .store
        .create_sender(
            dbsync_agent::NewConnection {
                name: "bad-hours".into(),
                site_url: "https://bad-hours.example.com".into(),
                settings: ConnectionSettings {
                    allowed_hours: Some((4, 4)),
                    ..ConnectionSettings::default()
                },
            },
            &db.actor,
            db.now(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("allowed_hours"), "{err}");
}

async fn download_password(db: TestDb) {
    let v = validator(&db);
    let locked = db
        .active_sender(
            "locked",
            ConnectionSettings {
                download_password: Some(Secret::new("hunter22".into())),
                ..ConnectionSettings::default()
            },
        )
        .await;
    let stored = locked.connection.download_password_hash.clone().unwrap();
    assert!(stored.starts_with("$argon2id$"));
    let t = locked.token.expose();
    assert_eq!(code(&db, &v, t, HOME, None).await, Err("password_required"));
    assert_eq!(
        code(&db, &v, t, HOME, Some("")).await,
        Err("password_required")
    );
    assert_eq!(
        code(&db, &v, t, HOME, Some("hunter2")).await,
        Err("invalid_password")
    );
    assert_eq!(code(&db, &v, t, HOME, Some("hunter22")).await, Ok(()));
}

async fn rate_limit_with_retry_after(db: TestDb) {
    let v = validator(&db);
    let c = db
        .active_sender(
            "rl",
            ConnectionSettings {
                rate_limit_per_minute: 3,
                ..ConnectionSettings::default()
            },
        )
        .await;
    let t = c.token.expose();
    for _ in 0..3 {
        assert_eq!(code(&db, &v, t, HOME, None).await, Ok(()));
    }
    match v.validate_connection(t, ip(HOME), db.now(), None).await {
        Err(AccessDenied::RateLimited { retry_after }) => {
            assert!(
                retry_after.as_secs_f64() > 19.0 && retry_after.as_secs_f64() <= 20.0,
                "{retry_after:?}"
            );
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    db.clock.advance(Duration::seconds(20));
    assert_eq!(code(&db, &v, t, HOME, None).await, Ok(()));
    assert_eq!(code(&db, &v, t, HOME, None).await, Err("rate_limited"));
}

async fn checks_run_in_spec_order(db: TestDb) {
    // A connection failing several checks reports the first one in SPEC order; fixing each
    // failure in turn reveals the next.
    let v = validator(&db);
    let c = db
        .active_sender(
            "order",
            ConnectionSettings {
                max_downloads: Some(1),
                max_records_total: Some(1),
                ip_whitelist: vec!["10.0.0.0/8".into()],
                allowed_hours: Some((1, 2)),
                download_password: Some(Secret::new("pw".into())),
                rate_limit_per_minute: 1,
                ..ConnectionSettings::default()
            },
        )
        .await;
    let t = c.token.expose();
    let id = c.connection.id;
    db.store.take_download(id).await.unwrap();
    db.store.take_records(id, 1).await.unwrap();
    assert_eq!(
        code(&db, &v, t, HOME, None).await,
        Err("download_limit_exceeded")
    );
    db.store
        .suspend_connection("order", "x", &db.actor, db.now())
        .await
        .unwrap();
    assert_eq!(
        code(&db, &v, t, HOME, None).await,
        Err("connection_not_active")
    );
    db.store
        .reactivate_connection("order", &db.actor, db.now())
        .await
        .unwrap();

    // Lift limits one by one through a fresh connection with the same later checks.
    let c2 = db
        .active_sender(
            "order2",
            ConnectionSettings {
                max_records_total: Some(1),
                ip_whitelist: vec!["10.0.0.0/8".into()],
                allowed_hours: Some((1, 2)),
                download_password: Some(Secret::new("pw".into())),
                rate_limit_per_minute: 1,
                ..ConnectionSettings::default()
            },
        )
        .await;
    let t2 = c2.token.expose();
    db.store.take_records(c2.connection.id, 1).await.unwrap();
    assert_eq!(
        code(&db, &v, t2, HOME, None).await,
        Err("record_limit_exceeded")
    );
    db.store.release_records(c2.connection.id, 1).await.unwrap();
    assert_eq!(
        code(&db, &v, t2, HOME, None).await,
        Err("ip_not_whitelisted")
    );
    assert_eq!(
        code(&db, &v, t2, "10.0.0.1", None).await,
        Err("outside_allowed_hours")
    );
    db.clock
        .set(Utc.with_ymd_and_hms(2026, 11, 26, 1, 30, 0).unwrap());
    assert_eq!(
        code(&db, &v, t2, "10.0.0.1", None).await,
        Err("password_required")
    );
    assert_eq!(code(&db, &v, t2, "10.0.0.1", Some("pw")).await, Ok(()));
    assert_eq!(
        code(&db, &v, t2, "10.0.0.1", Some("pw")).await,
        Err("rate_limited")
    );
}

async fn concurrent_record_takes_never_exceed_the_limit(db: TestDb) {
    let c = db
        .active_sender(
            "race",
            ConnectionSettings {
                max_records_total: Some(1_000),
                ..ConnectionSettings::default()
            },
        )
        .await;
    let id = c.connection.id;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            store.take_records(id, 30).await.unwrap()
        }));
    }
    let mut grants = Vec::new();
    for task in tasks {
        grants.push(task.await.unwrap());
    }
    assert_eq!(grants.iter().sum::<i64>(), 1_000);
    assert_eq!(grants.iter().filter(|&&g| g == 30).count(), 33);
    assert_eq!(
        grants.iter().filter(|&&g| g == 10).count(),
        1,
        "the last grant is cut to fit"
    );
    assert_eq!(grants.iter().filter(|&&g| g == 0).count(), 16);
    assert_eq!(
        db.store
            .get_connection("race")
            .await
            .unwrap()
            .records_downloaded,
        1_000
    );
}

async fn concurrent_download_takes_never_exceed_the_limit(db: TestDb) {
    let c = db
        .active_sender(
            "dl-race",
            ConnectionSettings {
                max_downloads: Some(7),
                ..ConnectionSettings::default()
            },
        )
        .await;
    let id = c.connection.id;
    let tasks: Vec<_> = (0..25)
        .map(|_| {
            let store = db.store.clone();
            tokio::spawn(async move { store.take_download(id).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += usize::from(task.await.unwrap());
    }
    assert_eq!(granted, 7);
    assert_eq!(
        db.store
            .get_connection("dl-race")
            .await
            .unwrap()
            .downloads_used,
        7
    );
}

#[test]
fn manual_clock_is_shared_between_clones() {
    let clock = ManualClock::new(crate::support::start_time());
    let other = clock.clone();
    clock.advance(Duration::hours(1));
    assert_eq!(
        dbsync_agent::Clock::now(&other),
        crate::support::start_time() + Duration::hours(1)
    );
}
