//! Sinks: a table copied through source → sink comes out identical on the same engine, maps by
//! the documented table across engines, and each conflict strategy does what it says, with the
//! checkpoint written in the same transaction.

use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings, NewConnection};
use dbsync_agent::sink::{Applied, Batch, Rows};
use dbsync_agent::{Error, Store};
use dbsync_protocol::Value;
use dbsync_protocol::message::TableSchema;
use uuid::Uuid;

use crate::support::{Engine, Sibling, TestDb, both_engines, exec};

both_engines!(
    sqlite_stores_encoded_rows_as_it_stores_values,
    a_batch_commits_only_after_the_one_before,
    a_batch_dropped_mid_copy_leaves_the_pool_usable,
    batches_read_in_place_and_bad_ones_change_nothing,
    conflict_strategies_and_checkpoints,
    schema_drift_is_named,
    a_column_type_that_is_not_a_type_is_refused,
    hostile_schema_parts_are_reported_not_run,
    copy_to_the_other_engine
);

async fn connection_in(store: &Store, db: &TestDb) -> Uuid {
    store
        .create_sender(
            NewConnection {
                name: format!("c{}", Uuid::new_v4().simple()),
                site_url: format!("https://{}.example.com", Uuid::new_v4().simple()),
                settings: ConnectionSettings::default(),
            },
            &db.actor,
            db.now(),
        )
        .await
        .unwrap()
        .connection
        .id
}

/// A sender connection and a new table made by `ddl`: the connection, the table's schema and
/// its columns in order.
async fn connection_and_table(
    db: &TestDb,
    table: &str,
    ddl: &str,
) -> (Uuid, TableSchema, Vec<String>) {
    let connection = connection_in(&db.store, db).await;
    exec(db, &[ddl.to_owned()]).await;
    let schema = db.store.describe_table(table).await.unwrap();
    let columns = schema.columns.iter().map(|c| c.name.clone()).collect();
    (connection, schema, columns)
}

/// Copies every row of `table` from `from` to `to` in pages of `page` rows.
async fn copy(
    from: &Store,
    to: &Store,
    connection: Uuid,
    table: &str,
    page: i64,
) -> (TableSchema, Applied) {
    let schema = from.describe_table(table).await.unwrap();
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    to.ensure_table(&schema, &columns, false).await.unwrap();
    let mut after: Option<Vec<Value>> = None;
    let mut total = Applied::default();
    loop {
        let rows = from
            .read_page(&schema, &columns, after.as_deref(), page)
            .await
            .unwrap();
        if rows.rows.is_empty() {
            break;
        }
        let applied = to
            .apply_batch(Batch {
                into: None,
                checkpoint: None,
                changed: false,
                connection_id: connection,
                batch_of: None,
                schema: &schema,
                columns: &columns,
                rows: Rows::Values(&rows.rows),
                strategy: ConflictStrategy::Overwrite,
                last_key: rows.last_key.as_deref(),
            })
            .await
            .unwrap();
        total.created += applied.created;
        total.updated += applied.updated;
        after = rows.last_key;
    }
    (schema, total)
}

async fn all_rows(store: &Store, table: &str) -> Vec<Vec<Value>> {
    let schema = store.describe_table(table).await.unwrap();
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    store
        .read_page(&schema, &columns, None, 10_000)
        .await
        .unwrap()
        .rows
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_postgres_is_exact_for_every_type() {
    crate::support::run(Engine::Postgres, "sink::pg_to_pg", |db| async move {
        exec(&db, &crate::source::every_type_statements()).await;
        let target = Sibling::new(&db).await;
        let connection = connection_in(&target.store, &db).await;
        let (schema, applied) = copy(&db.store, &target.store, connection, "Every Type", 2).await;
        assert_eq!(
            applied,
            Applied {
                created: 3,
                updated: 0,
                skipped: 0
            }
        );
        let copied = target.store.describe_table("Every Type").await.unwrap();
        let native = |s: &TableSchema| {
            s.columns
                .iter()
                .map(|c| (c.name.clone(), c.native_type.clone(), c.nullable))
                .collect::<Vec<_>>()
        };
        assert_eq!(native(&copied), native(&schema), "same column types");
        assert_eq!(copied.primary_key, schema.primary_key);
        let source_rows = all_rows(&db.store, "Every Type").await;
        let target_rows = all_rows(&target.store, "Every Type").await;
        assert_eq!(source_rows.len(), target_rows.len());
        for (s, t) in source_rows.iter().zip(&target_rows) {
            for ((a, b), column) in s.iter().zip(t).zip(&schema.columns) {
                assert!(same(a, b), "{}: {a:?} became {b:?}", column.name);
            }
        }
        let checkpoint = target
            .store
            .checkpoint(connection, "Every Type")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.last_key, Some(vec![Value::Int(3)]));
        assert_eq!(checkpoint.rows_applied, 3);
        target.cleanup().await;
    })
    .await;
}

/// The types of a real application's schema that dbsync does not model travel in their text
/// form and come back as the same values of the same types: enums, domains, ranges, network
/// and text-search types, `timetz`, `money`, bit strings, extension types, and arrays of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_types_dbsync_does_not_model_arrive_exactly() {
    crate::support::run(Engine::Postgres, "sink::pg_app_types", |db| async move {
        let types: Vec<String> = [
            "CREATE EXTENSION IF NOT EXISTS citext",
            "CREATE EXTENSION IF NOT EXISTS hstore",
            "CREATE EXTENSION IF NOT EXISTS ltree",
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
            "CREATE DOMAIN year AS integer CHECK (VALUE BETWEEN 1900 AND 2100)",
            "CREATE DOMAIN email AS citext CHECK (VALUE LIKE '%@%')",
        ]
        .map(String::from)
        .to_vec();
        let table = "CREATE TABLE \"App Types\" (id BIGINT PRIMARY KEY, feeling mood, feelings mood[], \
             born year, mail email, nick citext, attrs hstore, path ltree, during int4range, \
             spans tstzrange, at_zone timetz, price money, prices money[], addr inet, net cidr, \
             mac macaddr, flags bit(4), vflags varbit, doc tsvector, query tsquery, body xml, \
             lsn pg_lsn, pt point, tags text[], letter \"char\")";
        let rows = [
            "INSERT INTO \"App Types\" VALUES (1, 'happy', '{sad,ok}', 1999, 'A@b.c', 'MiXed', \
             'a=>1, b=>NULL', 'top.mid.leaf', '[1,10)', '[2020-01-01 00:00+00,2021-01-01 00:00+00)', \
             '12:34:56.789+05:30', 12.34, '{1.50,-2.25}', '10.0.0.1/8', '192.168.0.0/16', \
             '08:00:2b:01:02:03', B'1010', B'101', 'the quick:1 fox', 'fat & rat', '<a>x</a>', \
             '16/B374D848', '(1.5,-2)', '{\"a b\",NULL}', 'x')",
            "INSERT INTO \"App Types\" (id) VALUES (2)",
        ];
        let mut sender: Vec<String> = types.clone();
        sender.push(table.into());
        sender.extend(rows.map(String::from));
        exec(&db, &sender).await;
        let target = Sibling::new(&db).await;
        // The types themselves are the receiver's (schema travel creates them: issue 23).
        target.store.execute_batch(&types).await.unwrap();
        let connection = connection_in(&target.store, &db).await;
        let (schema, applied) = copy(&db.store, &target.store, connection, "App Types", 1).await;
        assert_eq!(applied.created, 2);
        let copied = target.store.describe_table("App Types").await.unwrap();
        let native = |s: &TableSchema| {
            s.columns
                .iter()
                .map(|c| c.native_type.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(native(&copied), native(&schema), "same column types");
        let text = |url: String| async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let rows = sqlx::query_scalar::<_, String>(
                "SELECT t::text FROM \"App Types\" t ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        };
        let (sent, arrived) = (
            text(db.url.clone()).await,
            text(target.postgres_url().unwrap().to_owned()).await,
        );
        assert_eq!(sent, arrived);
        assert!(sent[0].contains("happy") && sent[0].contains("MiXed"), "{sent:?}");
        target.cleanup().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_sqlite_is_exact() {
    crate::support::run(Engine::Sqlite, "sink::sqlite_to_sqlite", |db| async move {
        exec(
            &db,
            &[
                "CREATE TABLE \"select\" (\"Id\" INTEGER PRIMARY KEY, r REAL, t TEXT, b BLOB, flag BOOLEAN, at DATETIME, anything)".into(),
                "INSERT INTO \"select\" VALUES (1, 1.5, 'x', X'00FF', 1, '2026-01-01 00:00:00', 'text')".into(),
                "INSERT INTO \"select\" VALUES (2, -0.0, '', X'', 0, NULL, 3.25)".into(),
                "INSERT INTO \"select\" VALUES (3, 1e308, 'ünï', NULL, NULL, 'not a date', X'01')".into(),
            ],
        )
        .await;
        let target = Sibling::new(&db).await;
        let connection = connection_in(&target.store, &db).await;
        copy(&db.store, &target.store, connection, "select", 2).await;
        assert_eq!(all_rows(&db.store, "select").await, all_rows(&target.store, "select").await);
        target.cleanup().await;
    })
    .await;
}

async fn conflict_strategies_and_checkpoints(db: TestDb) {
    exec(
        &db,
        &["CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, qty BIGINT)".into()],
    )
    .await;
    let schema = db.store.describe_table("items").await.unwrap();
    let columns: Vec<String> = vec!["id".into(), "name".into(), "qty".into()];
    let connection = connection_in(&db.store, &db).await;
    let row = |id: i64, name: Option<&str>, qty: Option<i64>| {
        vec![
            Value::Int(id),
            name.map_or(Value::Null, |n| Value::Text(n.into())),
            qty.map_or(Value::Null, Value::Int),
        ]
    };
    let apply = |rows: Vec<Vec<Value>>, strategy: ConflictStrategy| {
        let store = db.store.clone();
        let schema = schema.clone();
        let columns = columns.clone();
        async move {
            let last = rows.last().map(|r| vec![r[0].clone()]);
            store
                .apply_batch(Batch {
                    into: None,
                    checkpoint: None,
                    changed: false,
                    connection_id: connection,
                    batch_of: None,
                    schema: &schema,
                    columns: &columns,
                    rows: Rows::Values(&rows),
                    strategy,
                    last_key: last.as_deref(),
                })
                .await
                .unwrap()
        }
    };

    let first = apply(
        vec![row(1, Some("a"), Some(1)), row(2, Some("b"), Some(2))],
        ConflictStrategy::Overwrite,
    )
    .await;
    assert_eq!(
        first,
        Applied {
            created: 2,
            updated: 0,
            skipped: 0
        }
    );

    let skipped = apply(
        vec![row(1, Some("A"), Some(10)), row(3, Some("c"), Some(3))],
        ConflictStrategy::Skip,
    )
    .await;
    assert_eq!(
        skipped,
        Applied {
            created: 1,
            updated: 0,
            skipped: 1
        }
    );
    assert_eq!(
        all_rows(&db.store, "items").await[0],
        row(1, Some("a"), Some(1)),
        "skip keeps the local row"
    );

    let overwritten = apply(vec![row(1, Some("A"), None)], ConflictStrategy::Overwrite).await;
    assert_eq!(
        overwritten,
        Applied {
            created: 0,
            updated: 1,
            skipped: 0
        }
    );
    assert_eq!(
        all_rows(&db.store, "items").await[0],
        row(1, Some("A"), None),
        "the sender wins, nulls included"
    );

    let merged = apply(vec![row(2, None, Some(20))], ConflictStrategy::Merge).await;
    assert_eq!(merged.updated, 1);
    assert_eq!(
        all_rows(&db.store, "items").await[1],
        row(2, Some("b"), Some(20)),
        "merge keeps what the sender sends as null"
    );

    let checkpoint = db
        .store
        .checkpoint(connection, "items")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.last_key, Some(vec![Value::Int(2)]));
    assert_eq!(checkpoint.rows_applied, 6);
    db.store
        .clear_checkpoint(connection, "items")
        .await
        .unwrap();
    // Cleared: nothing to resume (an incremental cursor, were there one, would stay).
    let cleared = db
        .store
        .checkpoint(connection, "items")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (cleared.last_key, cleared.rows_applied, cleared.transfer_id),
        (None, 0, None)
    );

    // A keyless table takes only append.
    exec(&db, &["CREATE TABLE events (at TEXT, what TEXT)".into()]).await;
    let events = db.store.describe_table("events").await.unwrap();
    let cols: Vec<String> = vec!["at".into(), "what".into()];
    let rows = vec![vec![Value::Text("t1".into()), Value::Text("boot".into())]; 2];
    let appended = db
        .store
        .apply_batch(Batch {
            into: None,
            checkpoint: None,
            changed: false,
            connection_id: connection,
            batch_of: None,
            schema: &events,
            columns: &cols,
            rows: Rows::Values(&rows),
            strategy: ConflictStrategy::Append,
            last_key: None,
        })
        .await
        .unwrap();
    assert_eq!(appended.created, 2);
    let refused = db
        .store
        .apply_batch(Batch {
            into: None,
            checkpoint: None,
            changed: false,
            connection_id: connection,
            batch_of: None,
            schema: &events,
            columns: &cols,
            rows: Rows::Values(&rows),
            strategy: ConflictStrategy::Overwrite,
            last_key: None,
        })
        .await;
    assert!(matches!(
        refused,
        Err(Error::Invalid {
            field: "strategy",
            ..
        })
    ));
}

/// A batch as a receiver gets it: encoded into a frame (uncompressed, so a test can break its
/// bytes with `patch`), then read back with its rows left in place.
fn received(
    batch: &dbsync_protocol::message::RowBatch,
    patch: impl FnOnce(&mut Vec<u8>),
) -> dbsync_protocol::columns::ReceivedBatch {
    let mut payload = rmp_serde::to_vec(batch).unwrap();
    patch(&mut payload);
    let mut frame = vec![0xDB, dbsync_protocol::Kind::RowBatch as u8, 0, 0];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    dbsync_protocol::codec::decode_batch_exact(&frame, &Default::default()).unwrap()
}

/// SQLite binds most of a batch's encoded values as they are read, and builds a value only for
/// the kinds it stores as text (UUIDs, dates and times): every kind must come out as the same
/// stored value either way.
async fn sqlite_stores_encoded_rows_as_it_stores_values(db: TestDb) {
    if db.url.starts_with("postgres") {
        return; // PostgreSQL's `COPY` of both is compared byte for byte in `pg_copy`.
    }
    let connection = connection_in(&db.store, &db).await;
    let kinds = "id INTEGER PRIMARY KEY, b BOOLEAN, f REAL, n NUMERIC, t TEXT, j TEXT, \
                 raw BLOB, u TEXT, d DATE, tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ";
    exec(
        &db,
        &[
            format!("CREATE TABLE encoded ({kinds})"),
            format!("CREATE TABLE valued ({kinds})"),
        ],
    )
    .await;
    let columns: Vec<String> = [
        "id", "b", "f", "n", "t", "j", "raw", "u", "d", "tm", "ts", "tz",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<Value>> = vec![
        vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Float(2.5),
            Value::Numeric("-12.3400".into()),
            Value::Text("é\u{0}x".into()),
            Value::Json("{\"a\": [1, null]}".into()),
            Value::Bytes(vec![0, 255, 7]),
            Value::Uuid(*Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0).as_bytes()),
            Value::Date(-1),
            Value::Time(86_399_999_999),
            Value::Timestamp(1_000_001),
            Value::TimestampTz(-62_135_596_800_000_000),
        ],
        vec![
            Value::Int(2),
            Value::Bool(false),
            Value::Float(f64::NAN),
            Value::Null,
            Value::Text(String::new()),
            Value::Null,
            Value::Bytes(Vec::new()),
            Value::Null,
            Value::Date(0),
            Value::Null,
            Value::Null,
            Value::TimestampTz(0),
        ],
    ];
    let batch = dbsync_protocol::message::RowBatch {
        request_id: 1,
        seq: 0,
        columns: columns.clone(),
        rows: rows.clone(),
        last_key: vec![Value::Int(2)],
        transfer_id: String::new(),
    };
    let arrived = received(&batch, |_| {});
    for (table, rows) in [
        ("encoded", Rows::Encoded(&arrived.rows)),
        ("valued", Rows::Values(&rows)),
    ] {
        let schema = db.store.describe_table(table).await.unwrap();
        let applied = db
            .store
            .apply_batch(Batch {
                into: None,
                checkpoint: None,
                changed: false,
                connection_id: connection,
                batch_of: None,
                schema: &schema,
                columns: &columns,
                rows,
                strategy: ConflictStrategy::Overwrite,
                last_key: Some(&[Value::Int(2)]),
            })
            .await
            .unwrap();
        assert_eq!(applied.created, 2, "{table}");
    }
    let (encoded, valued) = (
        all_rows(&db.store, "encoded").await,
        all_rows(&db.store, "valued").await,
    );
    assert_eq!(encoded.len(), 2);
    assert_eq!(format!("{encoded:?}"), format!("{valued:?}"));
}

/// Rows that arrive encoded go in as they are read (PostgreSQL: transcoded into `COPY`); a batch
/// whose values break the rules (text that is not UTF-8, an integer too wide for its column) is
/// an error, and neither its rows nor the checkpoint move.
async fn batches_read_in_place_and_bad_ones_change_nothing(db: TestDb) {
    let (connection, schema, columns) = connection_and_table(
        &db,
        "people",
        "CREATE TABLE people (id BIGINT PRIMARY KEY, name TEXT, score INTEGER)",
    )
    .await;
    let batch = |from: i64, name: &str, score: i64| dbsync_protocol::message::RowBatch {
        request_id: 1,
        seq: 0,
        columns: columns.clone(),
        rows: (from..from + 3)
            .map(|i| {
                vec![
                    Value::Int(i),
                    Value::Text(format!("{name}{i}")),
                    Value::Int(score),
                ]
            })
            .collect(),
        last_key: vec![Value::Int(from + 2)],
        transfer_id: String::new(),
    };
    let apply = async |received: &dbsync_protocol::columns::ReceivedBatch| {
        db.store
            .apply_batch(Batch {
                into: None,
                checkpoint: None,
                changed: false,
                connection_id: connection,
                batch_of: None,
                schema: &schema,
                columns: &received.columns,
                rows: Rows::Encoded(&received.rows),
                strategy: ConflictStrategy::Overwrite,
                last_key: Some(&received.last_key),
            })
            .await
    };
    let good = received(&batch(1, "ann", 7), |_| {});
    assert_eq!(apply(&good).await.unwrap().created, 3);
    assert_eq!(
        all_rows(&db.store, "people").await[2],
        vec![Value::Int(3), Value::Text("ann3".into()), Value::Int(7)]
    );

    let broken = received(&batch(10, "bob", 7), |payload| {
        let at = payload.windows(5).position(|w| w == b"bob11").unwrap();
        payload[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    });
    // (PostgreSQL: refused by the server in the `COPY`, which verifies every text's encoding.)
    let mut bad = vec![broken];
    // A 64-bit integer into PostgreSQL's 32-bit `integer` (SQLite's integers take 64 bits).
    if db.url.starts_with("postgres") {
        bad.push(received(&batch(20, "cy", 1 << 40), |_| {}));
    }
    for bad in &bad {
        assert!(apply(bad).await.is_err());
        assert_eq!(all_rows(&db.store, "people").await.len(), 3);
        let checkpoint = db
            .store
            .checkpoint(connection, "people")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(checkpoint.last_key, Some(vec![Value::Int(3)]));
    }
    // Again, onto the rows it made: the upsert path reads the same batch column by column.
    assert_eq!(apply(&good).await.unwrap().updated, 3);
    // Text that is not UTF-8 on that path (on PostgreSQL each text is borrowed from the batch
    // as received, checked here, not by the server): refused, and nothing changes.
    let broken_upsert = received(&batch(1, "dan", 8), |payload| {
        let at = payload.windows(4).position(|w| w == b"dan2").unwrap();
        payload[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    });
    let err = apply(&broken_upsert).await.unwrap_err().to_string();
    assert!(err.contains("UTF-8"), "{err}");
    assert_eq!(
        all_rows(&db.store, "people").await[..3],
        [1, 2, 3].map(|i| vec![Value::Int(i), Value::Text(format!("ann{i}")), Value::Int(7)])
    );

    // PostgreSQL's `COPY` goes a chunk at a time; a value past the first chunk with no exact
    // binary form (0.1 into a `real`) aborts it, and the batch goes in the way an INSERT does.
    if db.url.starts_with("postgres") {
        exec(
            &db,
            &["CREATE TABLE readings (id BIGINT PRIMARY KEY, r REAL)".into()],
        )
        .await;
        let readings = db.store.describe_table("readings").await.unwrap();
        let names: Vec<String> = ["id", "r"].map(String::from).to_vec();
        let rows: Vec<Vec<Value>> = (0..2_500)
            .map(|i| {
                vec![
                    Value::Int(i),
                    Value::Float(if i == 2_300 { 0.1 } else { 0.5 }),
                ]
            })
            .collect();
        let batch = received(
            &dbsync_protocol::message::RowBatch {
                request_id: 1,
                seq: 0,
                columns: names.clone(),
                rows,
                last_key: vec![Value::Int(2_499)],
                transfer_id: String::new(),
            },
            |_| {},
        );
        let applied = db
            .store
            .apply_batch(Batch {
                into: None,
                checkpoint: None,
                changed: false,
                connection_id: connection,
                batch_of: None,
                schema: &readings,
                columns: &names,
                rows: Rows::Encoded(&batch.rows),
                strategy: ConflictStrategy::Overwrite,
                last_key: Some(&batch.last_key),
            })
            .await
            .unwrap();
        assert_eq!(applied.created, 2_500);
        let stored = all_rows(&db.store, "readings").await;
        assert_eq!(stored.len(), 2_500);
        assert_eq!(stored[2_300][1], Value::Float(f64::from(0.1f32)));
    }
}

/// Two batches at once: the later one's rows and checkpoint become visible only after the batch
/// before it says it committed; if that one failed, so does the later one, leaving nothing.
async fn a_batch_commits_only_after_the_one_before(db: TestDb) {
    let (connection, schema, columns) = connection_and_table(
        &db,
        "seq",
        "CREATE TABLE seq (id BIGINT PRIMARY KEY, v TEXT)",
    )
    .await;
    let schema = std::sync::Arc::new(schema);
    let later = |from: i64| {
        let (store, schema, columns) = (db.store.clone(), schema.clone(), columns.clone());
        let (before, gate) = tokio::sync::oneshot::channel::<bool>();
        let rows: Vec<Vec<Value>> = (from..from + 10)
            .map(|i| vec![Value::Int(i), Value::Text(format!("v{i}"))])
            .collect();
        let task = tokio::spawn(async move {
            store
                .apply_batch_after(
                    Some(gate),
                    Batch {
                        into: None,
                        checkpoint: None,
                        changed: false,
                        connection_id: connection,
                        batch_of: None,
                        schema: &schema,
                        columns: &columns,
                        rows: Rows::Values(&rows),
                        strategy: ConflictStrategy::Overwrite,
                        last_key: Some(&[Value::Int(from + 9)]),
                    },
                )
                .await
        });
        (before, task)
    };
    let resume_key = async |db: &TestDb| {
        let checkpoint = db.store.checkpoint(connection, "seq").await.unwrap();
        checkpoint.unwrap().last_key
    };
    let (before, task) = later(1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "the batch waits for the one before");
    assert!(all_rows(&db.store, "seq").await.is_empty());
    assert_eq!(db.store.checkpoint(connection, "seq").await.unwrap(), None);
    before.send(true).unwrap();
    assert_eq!(task.await.unwrap().unwrap().created, 10);
    assert_eq!(all_rows(&db.store, "seq").await.len(), 10);
    assert_eq!(resume_key(&db).await, Some(vec![Value::Int(10)]));

    let (before, task) = later(11);
    drop(before);
    assert!(task.await.unwrap().is_err());
    assert_eq!(all_rows(&db.store, "seq").await.len(), 10);
    assert_eq!(resume_key(&db).await, Some(vec![Value::Int(10)]));
}

/// A pull dropped in the middle of a batch's `COPY` (cancelled, or its task killed) must not hand
/// the pool a connection that still owes replies to that `COPY`: its next user would read them
/// as its own. The `COPY` here is held at its fifth row by another session's uncommitted insert
/// of the same key, then given up on while sqlx waits for the server's answer to its end; every
/// later statement on the pool must still work and see the right results.
async fn a_batch_dropped_mid_copy_leaves_the_pool_usable(db: TestDb) {
    if !db.url.starts_with("postgres") {
        return; // `COPY` is PostgreSQL's.
    }
    let (connection, schema, columns) = connection_and_table(
        &db,
        "held",
        "CREATE TABLE held (id BIGINT PRIMARY KEY, v TEXT)",
    )
    .await;
    let rows: Vec<Vec<Value>> = (1..=10)
        .map(|i| vec![Value::Int(i), Value::Text(format!("v{i}"))])
        .collect();
    let apply = || {
        db.store.apply_batch(Batch {
            into: None,
            checkpoint: None,
            changed: false,
            connection_id: connection,
            batch_of: None,
            schema: &schema,
            columns: &columns,
            rows: Rows::Values(&rows),
            strategy: ConflictStrategy::Overwrite,
            last_key: Some(&[Value::Int(10)]),
        })
    };
    let locker = sqlx::PgPool::connect(&db.url).await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("INSERT INTO held VALUES (5, 'theirs')")
        .execute(&mut *lock)
        .await
        .unwrap();
    let given_up = tokio::time::timeout(std::time::Duration::from_millis(500), apply()).await;
    assert!(given_up.is_err(), "the COPY waits for the other insert");
    lock.rollback().await.unwrap();
    locker.close().await;
    // Round the pool's idle connections several times.
    for _ in 0..20 {
        assert_eq!(db.store.checkpoint(connection, "held").await.unwrap(), None);
        assert!(all_rows(&db.store, "held").await.is_empty());
    }
    assert_eq!(apply().await.unwrap().created, 10);
    assert_eq!(all_rows(&db.store, "held").await.len(), 10);
}

async fn schema_drift_is_named(db: TestDb) {
    exec(
        &db,
        &["CREATE TABLE drift (id BIGINT PRIMARY KEY, a TEXT)".into()],
    )
    .await;
    let mut schema = db.store.describe_table("drift").await.unwrap();
    schema.columns.push(dbsync_protocol::message::ColumnInfo {
        name: "b".into(),
        native_type: "TEXT".into(),
        neutral_type: "text".into(),
        nullable: true,
    });
    let columns: Vec<String> = vec!["id".into(), "a".into(), "b".into()];
    let err = db
        .store
        .ensure_table(&schema, &columns, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lacks the columns b"), "{err}");
    assert!(
        !db.store
            .ensure_table(&schema, &columns[..2], false)
            .await
            .unwrap(),
        "exists already"
    );
}

/// A sender's column types are written into the receiver's `CREATE TABLE`: one that is more
/// than a type name is refused, and nothing runs.
async fn a_column_type_that_is_not_a_type_is_refused(db: TestDb) {
    exec(&db, &["CREATE TABLE keep (id BIGINT PRIMARY KEY)".into()]).await;
    let engine = if db.url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    for evil in [
        "TEXT); DROP TABLE keep; CREATE TABLE x (y TEXT",
        "INTEGER DEFAULT (random())",
        "TEXT CHECK (length(id) > 0)",
    ] {
        let schema = TableSchema {
            name: "fresh".into(),
            engine: engine.into(),
            columns: vec![
                dbsync_protocol::message::ColumnInfo {
                    name: "id".into(),
                    native_type: "BIGINT".into(),
                    neutral_type: "int".into(),
                    nullable: false,
                },
                dbsync_protocol::message::ColumnInfo {
                    name: "evil".into(),
                    native_type: evil.into(),
                    neutral_type: "text".into(),
                    nullable: true,
                },
            ],
            primary_key: vec!["id".into()],
            postgres: None,
        };
        let columns: Vec<String> = vec!["id".into(), "evil".into()];
        let err = db
            .store
            .ensure_table(&schema, &columns, false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is not a type name"), "{err}");
        assert!(db.store.describe_table("fresh").await.is_err());
        db.store.describe_table("keep").await.unwrap();
    }
}

async fn copy_to_the_other_engine(db: TestDb) {
    let Some(target) = Sibling::other_engine(&db).await else {
        return;
    };
    exec(
        &db,
        &[
            "CREATE TABLE \"Mixed\" (id BIGINT PRIMARY KEY, flag BOOLEAN, qty INTEGER, price REAL, label TEXT, data BLOB_OR_BYTEA)"
                .replace("BLOB_OR_BYTEA", if db.url.starts_with("postgres") { "BYTEA" } else { "BLOB" }),
            "INSERT INTO \"Mixed\" VALUES (1, true, 7, 2.5, 'one', NULL)".into(),
            "INSERT INTO \"Mixed\" VALUES (2, false, -3, -0.25, 'twö', NULL)".into(),
        ],
    )
    .await;
    let connection = connection_in(&target.store, &db).await;
    let (_, applied) = copy(&db.store, &target.store, connection, "Mixed", 10).await;
    assert_eq!(applied.created, 2);
    let rows = all_rows(&target.store, "Mixed").await;
    let flag = |b: bool| {
        if target.store.engine_name() == "sqlite" {
            Value::Int(i64::from(b))
        } else {
            Value::Bool(b)
        }
    };
    let as_float = |f: f64| Value::Float(f);
    assert_eq!(rows[0][0], Value::Int(1));
    assert_eq!(rows[0][1], flag(true));
    assert_eq!(rows[0][2], Value::Int(7));
    assert_eq!(rows[0][3], as_float(2.5));
    assert_eq!(rows[1][4], Value::Text("twö".into()));
    assert_eq!(rows[1][1], flag(false));
    target.cleanup().await;
}

/// A sender's expressions that call what no peer may run (a check that sleeps, a default that
/// reads a file, an index predicate that kills backends), and a sequence value past this
/// sequence's bounds: each is reported, nothing of it runs, and the pull's table stays usable.
async fn hostile_schema_parts_are_reported_not_run(db: TestDb) {
    use dbsync_protocol::message::{
        CheckDef, ColumnDefault, ColumnSequence, IndexDef, PostgresSchema,
    };
    if !db.url.starts_with("postgres") {
        // SQLite receivers make none of the PostgreSQL parts.
        return;
    }
    exec(
        &db,
        &["CREATE TABLE target (id SERIAL PRIMARY KEY, n INTEGER, body TEXT)".into()],
    )
    .await;
    let mut schema = db.store.describe_table("target").await.unwrap();
    schema.postgres = Some(PostgresSchema {
        checks: vec![CheckDef {
            name: "sleepy".into(),
            expression: "(pg_sleep((n)::double precision) IS NOT NULL)".into(),
            validated: true,
        }],
        defaults: vec![ColumnDefault {
            column: "body".into(),
            expression: "pg_read_file('/etc/passwd'::text)".into(),
        }],
        indexes: vec![IndexDef {
            name: "killer".into(),
            method: "btree".into(),
            columns: vec!["n".into()],
            unique: false,
            constraint: false,
            keys: vec![],
            include: vec![],
            predicate: Some("(pg_terminate_backend(n) OR true)".into()),
            exclude: vec![],
        }],
        sequences: vec![ColumnSequence {
            column: "id".into(),
            identity: None,
            data_type: "integer".into(),
            increment: 1,
            min_value: 1,
            max_value: i64::MAX,
            start: 1,
            cycle: false,
            last_value: Some(i64::MAX),
        }],
        ..PostgresSchema::default()
    });
    let warnings = db.store.complete_schema(&schema).await.unwrap();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    for (warning, name) in warnings
        .iter()
        .zip(["pg_read_file", "pg_sleep", "pg_terminate_backend"])
    {
        assert!(warning.contains(name), "{warning}");
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let made: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_constraint WHERE conname = 'sleepy') \
         + (SELECT count(*) FROM pg_class WHERE relname = 'killer') \
         + (SELECT count(*) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid \
            AND a.attnum = d.adnum WHERE a.attname = 'body')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(made, 0);
    // The sender's sequence value is kept within this sequence's bounds.
    let warnings = db.store.follow_sequences(&schema).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let value: i64 = sqlx::query_scalar("SELECT last_value FROM target_id_seq")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(value, i64::from(i32::MAX));
    pool.close().await;
}
