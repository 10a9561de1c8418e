//! Sources: every PostgreSQL type decoded exactly, SQLite storage classes kept, and keyset pages
//! over a composite key covering a table exactly once, on both engines.

use dbsync_agent::source::Bounds;
use dbsync_protocol::codec::{self, Limits};
use dbsync_protocol::message::RowBatch;
use dbsync_protocol::{Message, Value};

use crate::support::{Engine, TestDb, both_engines, exec};

both_engines!(composite_key_pages_cover_the_table_exactly_once);

async fn composite_key_pages_cover_the_table_exactly_once(db: TestDb) {
    let mut statements = vec![
        "CREATE TABLE \"Pages\" (k TEXT NOT NULL, n BIGINT NOT NULL, v TEXT, PRIMARY KEY (k, n))"
            .to_owned(),
    ];
    for k in ["b", "a", "c"] {
        for n in (1..=10).rev() {
            statements.push(format!(
                "INSERT INTO \"Pages\" VALUES ('{k}', {n}, 'v{k}{n}')"
            ));
        }
    }
    exec(&db, &statements).await;
    let schema = db.store.describe_table("Pages").await.unwrap();
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    let mut after: Option<Vec<Value>> = None;
    let mut rows = Vec::new();
    let mut pages = 0;
    loop {
        let page = db
            .store
            .read_page(&schema, &columns, after.as_deref(), 7)
            .await
            .unwrap();
        if page.rows.is_empty() {
            assert!(page.last_key.is_none());
            break;
        }
        pages += 1;
        after = page.last_key.clone();
        rows.extend(page.rows);
    }
    assert_eq!(pages, 5);
    let expected: Vec<Vec<Value>> = ["a", "b", "c"]
        .iter()
        .flat_map(|k| {
            (1..=10).map(move |n| {
                vec![
                    Value::Text((*k).into()),
                    Value::Int(n),
                    Value::Text(format!("v{k}{n}")),
                ]
            })
        })
        .collect();
    assert_eq!(rows, expected);

    // Excluding a key column is refused; excluding another column works.
    assert!(
        db.store
            .read_page(&schema, &["v".into()], None, 5)
            .await
            .is_err()
    );
    let narrow = db
        .store
        .read_page(&schema, &["k".into(), "n".into()], None, 1)
        .await
        .unwrap();
    assert_eq!(
        narrow.rows,
        vec![vec![Value::Text("a".into()), Value::Int(1)]]
    );
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => {
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
        }
        _ => a == b,
    }
}

/// A PostgreSQL table with every supported type and tricky values (shared with the sink tests).
pub(crate) fn every_type_statements() -> Vec<String> {
    vec![
        "CREATE TABLE \"Every Type\" (id BIGINT PRIMARY KEY, b BOOLEAN, i2 SMALLINT, i4 INTEGER, \
         f4 REAL, f8 DOUBLE PRECISION, n NUMERIC, n2 NUMERIC(12,2), t TEXT, v VARCHAR(10), c CHAR(4), \
         by BYTEA, u UUID, j JSON, jb JSONB, d DATE, tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ, \
         iv INTERVAL, ai INTEGER[], at TEXT[][])"
            .into(),
        "INSERT INTO \"Every Type\" VALUES (1, true, -32768, 2147483647, 'NaN', '-Infinity', \
         123456789012345678901234567890123456789012.000000000000000000001, -12.30, 'héllo', 'x', 'ab', \
         '\\x00ff80', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '{\"b\": null}', \
         'infinity', '23:59:59.999999', '2000-01-01 00:00:00', '1970-01-01 00:00:01+00', \
         '1 year 2 mons 3 days 04:05:06.000007', '{1,NULL,3}', '{{\"a\",\"b\"},{\"c\",NULL}}')"
            .into(),
        "INSERT INTO \"Every Type\" (id, n) VALUES (2, 'NaN')".into(),
        "INSERT INTO \"Every Type\" (id, d, ts, tz, f8, n, by, at) VALUES (3, '0044-03-15 BC', \
         '-infinity', '2262-04-11 23:47:16.854775+05:30', 1e-300, -0.000000000000000000000000000001, '\\x', \
         '{{\"quote\\\"d\",\"back\\\\slash\"}}')"
            .into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_postgres_type_is_decoded_exactly() {
    crate::support::run(
        Engine::Postgres,
        "source::every_postgres_type",
        |db| async move {
            exec(&db, &every_type_statements()).await;
            let schema = db.store.describe_table("Every Type").await.unwrap();
            let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
            let page = db
                .store
                .read_page(&schema, &columns, None, 10)
                .await
                .unwrap();
            let expected = vec![
                Value::Int(1),
                Value::Bool(true),
                Value::Int(-32768),
                Value::Int(2_147_483_647),
                Value::Float(f64::NAN),
                Value::Float(f64::NEG_INFINITY),
                Value::Numeric(
                    "123456789012345678901234567890123456789012.000000000000000000001".into(),
                ),
                Value::Numeric("-12.30".into()),
                Value::Text("héllo".into()),
                Value::Text("x".into()),
                Value::Text("ab  ".into()),
                Value::Bytes(vec![0x00, 0xff, 0x80]),
                Value::Uuid(
                    *uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
                        .unwrap()
                        .as_bytes(),
                ),
                Value::Json("{\"a\": [1, 2]}".into()),
                Value::Json("{\"b\": null}".into()),
                Value::Date(i32::MAX),
                Value::Time(86_399_999_999),
                Value::Timestamp(946_684_800_000_000),
                Value::TimestampTz(1_000_000),
                Value::Interval {
                    months: 14,
                    days: 3,
                    micros: 14_706_000_007,
                },
                Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
                Value::Array(vec![
                    Value::Array(vec![Value::Text("a".into()), Value::Text("b".into())]),
                    Value::Array(vec![Value::Text("c".into()), Value::Null]),
                ]),
            ];
            let row = &page.rows[0];
            assert_eq!(row.len(), expected.len());
            for ((column, got), want) in columns.iter().zip(row).zip(&expected) {
                assert!(same(got, want), "{column}: got {got:?}, want {want:?}");
            }
            assert_eq!(page.rows[1][6], Value::Numeric("NaN".into()));
            assert!(
                page.rows[1]
                    .iter()
                    .enumerate()
                    .all(|(i, v)| i == 0 || i == 6 || *v == Value::Null)
            );

            // The same page encoded for the wire as it is read (no values on the way) arrives
            // as the same rows, NULLs, intervals and arrays included, in plain and compact
            // forms. (Behind room for the frame's fields before the rows, as a sender reads it.)
            let room = codec::row_batch_room(&columns);
            for compact in [false, true] {
                let mut encoded = db
                    .store
                    .read_page_encoded(&schema, &columns, Default::default(), 10, room, compact)
                    .await
                    .unwrap();
                assert_eq!(encoded.room, room);
                assert_eq!(encoded.rows, page.rows.len());
                assert_eq!(encoded.last_key, page.last_key);
                let arrived = encoded_rows(&columns, &mut encoded);
                assert_eq!(arrived.len(), page.rows.len());
                for (got_row, want_row) in arrived.iter().zip(&page.rows) {
                    for ((column, got), want) in columns.iter().zip(got_row).zip(want_row) {
                        assert!(
                            same(got, want),
                            "{column} ({compact}): got {got:?}, want {want:?}"
                        );
                    }
                }
            }
            // A page after the last row is empty, with no key.
            let past = db
                .store
                .read_page_encoded(
                    &schema,
                    &columns,
                    Bounds {
                        after: Some(&[Value::Int(3)]),
                        ..Default::default()
                    },
                    10,
                    0,
                    true,
                )
                .await
                .unwrap();
            assert_eq!((past.rows, past.last_key), (0, None));
            let batch = RowBatch {
                request_id: 1,
                seq: 0,
                columns: columns.clone(),
                rows: Vec::new(),
                last_key: Vec::new(),
                transfer_id: "t".into(),
            };
            let Message::RowBatch(empty) = codec::decode_exact(
                &codec::encode_row_batch_columns(&batch, &past.columns, 1)
                    .unwrap()
                    .0,
                &Limits::default(),
            )
            .unwrap() else {
                panic!("not a row batch");
            };
            assert!(empty.rows.is_empty());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_storage_classes_are_kept() {
    crate::support::run(Engine::Sqlite, "source::sqlite_storage_classes", |db| async move {
        exec(
            &db,
            &[
                "CREATE TABLE things (id INTEGER PRIMARY KEY, r REAL, t TEXT, b BLOB, flag BOOLEAN, at DATETIME, anything)"
                    .into(),
                "INSERT INTO things VALUES (1, 1.5, 'x', X'00FF', 1, '2026-01-01 00:00:00', 'text in an untyped column')"
                    .into(),
                "INSERT INTO things VALUES (2, NULL, 7, NULL, 0, NULL, 3.25)".into(),
            ],
        )
        .await;
        let schema = db.store.describe_table("things").await.unwrap();
        let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let page = db.store.read_page(&schema, &columns, None, 10).await.unwrap();
        assert_eq!(
            page.rows,
            vec![
                vec![
                    Value::Int(1),
                    Value::Float(1.5),
                    Value::Text("x".into()),
                    Value::Bytes(vec![0, 255]),
                    Value::Int(1),
                    Value::Text("2026-01-01 00:00:00".into()),
                    Value::Text("text in an untyped column".into()),
                ],
                vec![
                    Value::Int(2),
                    Value::Null,
                    // TEXT affinity turns the 7 into '7', as SQLite stores it.
                    Value::Text("7".into()),
                    Value::Null,
                    Value::Int(0),
                    Value::Null,
                    Value::Float(3.25),
                ],
            ]
        );
        assert_eq!(page.last_key, Some(vec![Value::Int(2)]));
    })
    .await;
}

/// The rows of an encoded page, decoded as a receiver would.
fn encoded_rows(
    columns: &[String],
    page: &mut dbsync_agent::source::EncodedPage,
) -> Vec<Vec<Value>> {
    let batch = RowBatch {
        request_id: 1,
        seq: 0,
        columns: columns.to_vec(),
        rows: Vec::new(),
        last_key: page.last_key.clone().unwrap_or_default(),
        transfer_id: "t".into(),
    };
    let (frame, _) =
        codec::encode_row_batch_in_place(&batch, &mut page.columns, page.room, 1).unwrap();
    let Message::RowBatch(arrived) = codec::decode_exact(&frame, &Limits::default()).unwrap()
    else {
        panic!("not a row batch");
    };
    arrived.rows
}

/// A PostgreSQL page is read as a binary `COPY` with its key bounds written into it as
/// literals: a bound of text a peer chose (quotes, backslashes, SQL) reads as the same value it
/// does bound as a parameter, and a UUID key given as text too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pages_after_hostile_text_keys_read_alike() {
    crate::support::run(
        Engine::Postgres,
        "source::hostile_text_keys",
        |db| async move {
            let keys = [
                "a'b",
                "a\\'; DROP TABLE t; --",
                "E'x",
                "\\\\",
                "\\",
                "ü\"q",
                "$1",
                "'",
                "''",
                "x'::text OR true --",
            ];
            let mut statements = vec![
                "CREATE TABLE t (k TEXT PRIMARY KEY, v INT)".to_owned(),
                "CREATE TABLE u (id UUID PRIMARY KEY, v INT)".to_owned(),
                "INSERT INTO u SELECT md5(g::text)::uuid, g FROM generate_series(1, 50) g"
                    .to_owned(),
            ];
            for (i, k) in keys.iter().enumerate() {
                statements.push(format!(
                    "INSERT INTO t VALUES ('{}', {i})",
                    k.replace('\'', "''")
                ));
            }
            exec(&db, &statements).await;
            for (table, afters) in [
                (
                    "t",
                    keys.iter()
                        .map(|k| Value::Text((*k).into()))
                        .chain([Value::Text("zz\\".into()), Value::Text(String::new())])
                        .collect::<Vec<_>>(),
                ),
                (
                    "u",
                    vec![
                        Value::Text("6512BD43-D9CA-A6E0-2C99-0B0A82652DCA".into()),
                        Value::Uuid(*uuid::Uuid::nil().as_bytes()),
                    ],
                ),
            ] {
                let schema = db.store.describe_table(table).await.unwrap();
                let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
                for after in afters {
                    let after = [after];
                    let plain = db
                        .store
                        .read_page(&schema, &columns, Some(&after), 100)
                        .await
                        .unwrap();
                    let mut encoded = db
                        .store
                        .read_page_encoded(
                            &schema,
                            &columns,
                            Bounds {
                                after: Some(&after),
                                ..Default::default()
                            },
                            100,
                            codec::row_batch_room(&columns),
                            false,
                        )
                        .await
                        .unwrap();
                    assert_eq!(encoded.last_key, plain.last_key, "after {after:?}");
                    assert_eq!(
                        encoded_rows(&columns, &mut encoded),
                        plain.rows,
                        "after {after:?}"
                    );
                }
            }
            // Both tables still hold every row.
            let rows = db.store.describe_table("t").await.unwrap();
            assert_eq!(rows.name, "t");
            let page = db
                .store
                .read_page(&rows, &["k".to_owned(), "v".to_owned()], None, 100)
                .await
                .unwrap();
            assert_eq!(page.rows.len(), keys.len());
        },
    )
    .await;
}
