//! Conflict strategies and key filters through real pulls: skip, merge, overwrite and mirror
//! against local changes, a mirror pull interrupted and resumed, `--where-key` ranges and lists,
//! and a composite key paged across many batches.

use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings};
use dbsync_agent::pull::PullOptions;
use dbsync_protocol::Value;

use crate::pull::{exec, pair, rows, schema_statements};
use crate::support::agents::pull_killed_after;

fn options(strategy: ConflictStrategy) -> PullOptions {
    PullOptions {
        tables: Some(vec!["users".into()]),
        strategy: Some(strategy),
        ..Default::default()
    }
}

fn email(rows: &[Vec<Value>], id: i64) -> Option<Value> {
    rows.iter()
        .find(|r| r[0] == Value::Int(id))
        .map(|r| r[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_merge_overwrite_and_mirror_against_local_changes() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) =
            pair("strategies::each", postgres, ConnectionSettings::default()).await
        else {
            return;
        };
        exec(&a, &schema_statements(100)).await;
        b.agent
            .pull(&receiver, &options(ConflictStrategy::Overwrite), |_| {})
            .await
            .unwrap();
        // Local changes on the receiver, then changes on the sender.
        exec(
            &b,
            &[
                "UPDATE users SET email = 'local' WHERE id = 1".into(),
                "UPDATE users SET score = 99.5 WHERE id = 3".into(),
                "INSERT INTO users VALUES (1000, 'only-here', NULL)".into(),
            ],
        )
        .await;
        exec(
            &a,
            &[
                "UPDATE users SET email = 'sender' WHERE id = 2".into(),
                "UPDATE users SET score = NULL WHERE id = 3".into(),
                "DELETE FROM \"Order\" WHERE user_id = 4".into(),
                "DELETE FROM users WHERE id = 4".into(),
            ],
        )
        .await;

        // skip keeps every local row as it is.
        let skip = b
            .agent
            .pull(&receiver, &options(ConflictStrategy::Skip), |_| {})
            .await
            .unwrap();
        assert_eq!((skip.tables[0].created, skip.tables[0].skipped), (0, 99));
        let here = rows(&b.agent.store, "users").await;
        assert_eq!(email(&here, 1), Some(Value::Text("local".into())));
        assert_eq!(email(&here, 2), Some(Value::Text("u2@example.com".into())));

        // merge takes the sender's values except its NULLs.
        b.agent
            .pull(&receiver, &options(ConflictStrategy::Merge), |_| {})
            .await
            .unwrap();
        let here = rows(&b.agent.store, "users").await;
        assert_eq!(email(&here, 1), Some(Value::Text("u1@example.com".into())));
        assert_eq!(email(&here, 2), Some(Value::Text("sender".into())));
        let three = here.iter().find(|r| r[0] == Value::Int(3)).unwrap();
        assert_eq!(
            three[2],
            Value::Float(99.5),
            "merge keeps a value the sender sends as NULL"
        );
        assert!(email(&here, 4).is_some() && email(&here, 1000).is_some());

        // overwrite takes the sender's row whole, NULLs included; deletes nothing.
        b.agent
            .pull(&receiver, &options(ConflictStrategy::Overwrite), |_| {})
            .await
            .unwrap();
        let here = rows(&b.agent.store, "users").await;
        let three = here.iter().find(|r| r[0] == Value::Int(3)).unwrap();
        assert_eq!(three[2], Value::Null);
        assert_eq!(here.len(), 101);

        // mirror: overwrite, then delete what the sender no longer has.
        let mirror = b
            .agent
            .pull(&receiver, &options(ConflictStrategy::Mirror), |_| {})
            .await
            .unwrap();
        assert_eq!(
            mirror.tables[0].deleted, 2,
            "row 4 and the local-only row 1000"
        );
        assert_eq!(
            rows(&a.agent.store, "users").await,
            rows(&b.agent.store, "users").await
        );
        // No staging table is left behind, and none is offered.
        let tables: Vec<String> = b
            .agent
            .store
            .list_tables()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(tables, ["users"]);

        // A mirror of an emptied table empties the copy.
        exec(
            &a,
            &["DELETE FROM \"Order\"".into(), "DELETE FROM users".into()],
        )
        .await;
        let emptied = b
            .agent
            .pull(&receiver, &options(ConflictStrategy::Mirror), |_| {})
            .await
            .unwrap();
        assert_eq!(emptied.tables[0].deleted, 99);
        assert!(rows(&b.agent.store, "users").await.is_empty());
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_mirror_pull_resumes_and_still_deletes_exactly() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) = pair(
            "strategies::mirror_resume",
            postgres,
            ConnectionSettings::default(),
        )
        .await
        else {
            return;
        };
        exec(&a, &schema_statements(5_000)).await;
        // The receiver holds rows the sender never had, spread over the key range.
        exec(
            &b,
            &[
                "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, score REAL)"
                    .into(),
                "INSERT INTO users VALUES (-5, 'gone', NULL), (2500, 'x', NULL), (7000, 'gone', NULL)"
                    .into(),
            ],
        )
        .await;
        exec(
            &a,
            &[
                "DELETE FROM \"Order\" WHERE user_id = 2500".into(),
                "DELETE FROM users WHERE id = 2500".into(),
            ],
        )
        .await;
        pull_killed_after(&b.agent, &receiver, &options(ConflictStrategy::Mirror), 2).await;
        let summary = b
            .agent
            .pull(&receiver, &options(ConflictStrategy::Mirror), |_| {})
            .await
            .unwrap();
        assert!(summary.tables[0].resumed);
        assert_eq!(summary.tables[0].deleted, 3);
        assert_eq!(
            rows(&a.agent.store, "users").await,
            rows(&b.agent.store, "users").await
        );
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_key_ranges_lists_and_composite_keys() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) = pair(
            "strategies::where_key",
            postgres,
            ConnectionSettings::default(),
        )
        .await
        else {
            return;
        };
        exec(&a, &schema_statements(300)).await;
        let mut statements = vec![
            "CREATE TABLE \"Stock\" (\"Region\" TEXT NOT NULL, n BIGINT NOT NULL, qty BIGINT, \
             PRIMARY KEY (\"Region\", n))"
                .to_owned(),
        ];
        for region in ["eu", "us", "ap"] {
            let values: Vec<String> = (1..=1_700)
                .map(|n| format!("('{region}', {n}, {})", n * 3))
                .collect();
            statements.push(format!(
                "INSERT INTO \"Stock\" VALUES {}",
                values.join(", ")
            ));
        }
        exec(&a, &statements).await;
        let pull = |table: &str, filter: Option<&str>| PullOptions {
            tables: Some(vec![table.into()]),
            where_key: filter.map(str::to_owned),
            ..Default::default()
        };

        let range = b
            .agent
            .pull(&receiver, &pull("users", Some("10..19")), |_| {})
            .await
            .unwrap();
        assert_eq!(range.tables[0].rows, 10);
        let here = rows(&b.agent.store, "users").await;
        let ids: Vec<&Value> = here.iter().map(|r| &r[0]).collect();
        assert_eq!(
            ids,
            (10..=19)
                .map(Value::Int)
                .collect::<Vec<_>>()
                .iter()
                .collect::<Vec<_>>()
        );

        let open = b
            .agent
            .pull(&receiver, &pull("users", Some("295..")), |_| {})
            .await
            .unwrap();
        assert_eq!(open.tables[0].rows, 6);

        let list = b
            .agent
            .pull(&receiver, &pull("users", Some("5,7,9000")), |_| {})
            .await
            .unwrap();
        assert_eq!(list.tables[0].rows, 2, "9000 is not on the sender");
        assert_eq!(rows(&b.agent.store, "users").await.len(), 18);

        // A long list of text keys, over more than one page (on PostgreSQL one array).
        exec(
            &a,
            &[
                "CREATE TABLE tags (name TEXT PRIMARY KEY, n BIGINT)".to_owned(),
                format!(
                    "INSERT INTO tags VALUES {}",
                    (0..600)
                        .map(|n| format!("('tag-{n:04}', {n})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ],
        )
        .await;
        let wanted: Vec<String> = (0..600)
            .step_by(2)
            .map(|n| format!("tag-{n:04}"))
            .chain(["tag-9999".to_owned()])
            .collect();
        let tags = b
            .agent
            .pull(&receiver, &pull("tags", Some(&wanted.join(","))), |_| {})
            .await
            .unwrap();
        assert_eq!(tags.tables[0].rows, 300, "tag-9999 is not on the sender");
        let here = rows(&b.agent.store, "tags").await;
        assert_eq!(here.len(), 300);
        assert!(
            here.iter()
                .all(|r| matches!(&r[1], Value::Int(n) if n % 2 == 0)),
            "only the listed keys: {here:?}"
        );

        let composite = b
            .agent
            .pull(
                &receiver,
                &pull("Stock", Some("eu:3,us:1700,ap:1701")),
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(composite.tables[0].rows, 2);
        let composite_range = b
            .agent
            .pull(&receiver, &pull("Stock", Some("eu:1600..us:5")), |_| {})
            .await
            .unwrap();
        // Key order: ("eu", 1600..=1700) then ("us", 1..=5); "ap" sorts before "eu".
        assert_eq!(composite_range.tables[0].rows, 101 + 5);

        // Bad filters are refused before anything moves.
        for (filter, expected) in [("abc", "not an integer"), ("eu", "separate their values")] {
            let table = if filter == "eu" { "Stock" } else { "users" };
            let err = b
                .agent
                .pull(&receiver, &pull(table, Some(filter)), |_| {})
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{filter}: {err}");
        }
        let err = b
            .agent
            .pull(
                &receiver,
                &PullOptions {
                    where_key: Some("1".into()),
                    strategy: Some(ConflictStrategy::Mirror),
                    ..pull("users", None)
                },
                |_| {},
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("full pull"), "{err}");

        // The whole composite-key table across many batches (5,100 rows, 1,000 per batch).
        let full = b
            .agent
            .pull(&receiver, &pull("Stock", None), |_| {})
            .await
            .unwrap();
        assert_eq!(full.tables[0].rows, 5_100);
        assert_eq!(
            rows(&a.agent.store, "Stock").await,
            rows(&b.agent.store, "Stock").await
        );
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwrite_leaves_identical_rows_alone_but_not_equal_looking_ones() {
    let Some((a, b, receiver)) =
        pair("strategies::identical", true, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE prices (id BIGINT PRIMARY KEY, amount NUMERIC, label TEXT)".into(),
            "INSERT INTO prices SELECT g, g * 1.50, CASE WHEN g % 10 <> 0 THEN 'p' || g END \
             FROM generate_series(1, 50) g"
                .into(),
        ],
    )
    .await;
    let options = PullOptions {
        tables: Some(vec!["prices".into()]),
        strategy: Some(ConflictStrategy::Overwrite),
        ..Default::default()
    };
    b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    // Equal to the sender's values under `=` but not the same: 3.0 against 3.00.
    exec(&b, &["UPDATE prices SET amount = 3.0 WHERE id = 2".into()]).await;
    let xmin = |agent| {
        let url = agent;
        async move {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            // `xmax` is set by a row lock too: an identical row must not even be locked.
            let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
                "SELECT id, CAST(amount AS TEXT), CAST(xmin AS TEXT), CAST(xmax AS TEXT) \
                 FROM prices ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
    };
    let before = xmin(&b.database_url).await;
    let again = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    // Every row met its key: all count as updated, as before.
    assert_eq!((again.tables[0].created, again.tables[0].updated), (0, 50));
    let after = xmin(&b.database_url).await;
    for (old, new) in before.iter().zip(&after) {
        if old.0 == 2 {
            assert_eq!(new.1, "3.00", "the sender's exact value is back");
            assert_ne!(old.2, new.2, "row 2 was rewritten");
        } else {
            assert_eq!(old, new, "an identical row is left alone (same xmin)");
            assert_eq!(new.3, "0", "an identical row is not locked (no xmax)");
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_pull_of_changed_rows_upserts_large_batches_exactly() {
    let Some((a, b, receiver)) =
        pair("strategies::halves", true, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE events (id BIGINT PRIMARY KEY, kind TEXT, n INTEGER)".into(),
            "INSERT INTO events SELECT g, 'k' || (g % 7), g FROM generate_series(1, 12000) g"
                .into(),
        ],
    )
    .await;
    let options = PullOptions {
        tables: Some(vec!["events".into()]),
        strategy: Some(ConflictStrategy::Overwrite),
        ..Default::default()
    };
    let first = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    assert_eq!(first.tables[0].created, 12_000);
    // Every row changes, plus new ones: batches of thousands of rows onto existing keys go in as
    // two halves on two connections (agent/src/sink.rs).
    exec(
        &a,
        &[
            "UPDATE events SET n = -n, kind = kind || '!'".into(),
            "INSERT INTO events SELECT g, 'new', g FROM generate_series(12001, 12500) g".into(),
        ],
    )
    .await;
    let again = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    assert_eq!(
        (again.tables[0].created, again.tables[0].updated),
        (500, 12_000)
    );
    assert_eq!(
        rows(&a.agent.store, "events").await,
        rows(&b.agent.store, "events").await
    );
    a.stop().await;
    b.stop().await;
}
