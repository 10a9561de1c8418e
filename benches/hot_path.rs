//! Micro-benches of the hot path: encoding and decoding a row batch (MessagePack + zstd at
//! several levels; decoding into values, and checked in place as a receiver does), and applying
//! a batch of values on each engine. `cargo bench --bench hot_path`;
//! the PostgreSQL group runs when DBSYNC_TEST_PG_URL (or the local default) answers.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dbsync_agent::Store;
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings, NewConnection};
use dbsync_agent::sink::{Batch, Rows};
use dbsync_protocol::codec::{self, Limits};
use dbsync_protocol::message::RowBatch;
use dbsync_protocol::{Message, Value};

const ROWS: usize = 1_000;

/// A batch shaped like a users table: bigint, uuid, two texts, bool, int, numeric, json, two
/// timestamptz.
fn batch(start: i64) -> RowBatch {
    let rows: Vec<Vec<Value>> = (start..start + ROWS as i64)
        .map(|i| {
            vec![
                Value::Int(i),
                Value::Uuid(*uuid::Uuid::from_u128(i as u128 * 7_919).as_bytes()),
                Value::Text(format!("user{i}@example.com")),
                Value::Text(format!("User Number {i}")),
                Value::Bool(i % 3 == 0),
                Value::Int(i % 1_000),
                Value::Numeric(format!("{}.{:02}", i * 3, i % 100)),
                Value::Json(format!(
                    "{{\"plan\":\"p{}\",\"tags\":[\"a\",\"b\"]}}",
                    i % 5
                )),
                Value::TimestampTz(1_700_000_000_000_000 + i * 1_000_000),
                Value::TimestampTz(1_700_000_000_000_000 + i * 2_000_000),
            ]
        })
        .collect();
    RowBatch {
        request_id: 1,
        seq: 0,
        columns: [
            "id",
            "uuid",
            "email",
            "name",
            "active",
            "score",
            "balance",
            "profile",
            "created_at",
            "updated_at",
        ]
        .map(str::to_owned)
        .to_vec(),
        last_key: vec![Value::Int(start + ROWS as i64 - 1)],
        rows,
        transfer_id: uuid::Uuid::nil().to_string(),
    }
}

fn codec_benches(c: &mut Criterion) {
    let message = Message::RowBatch(batch(1));
    let mut group = c.benchmark_group("row_batch");
    group.throughput(Throughput::Elements(ROWS as u64));
    for level in [1, 3, 9] {
        let encoded = codec::encode(&message, level).unwrap();
        group.bench_function(format!("encode_zstd{level}"), |b| {
            b.iter(|| codec::encode(black_box(&message), level).unwrap())
        });
        group.bench_function(format!("decode_zstd{level}"), |b| {
            b.iter(|| codec::decode_exact(black_box(&encoded), &Limits::default()).unwrap())
        });
        // What a receiver does: the batch checked, its rows left in place.
        group.bench_function(format!("decode_in_place_zstd{level}"), |b| {
            b.iter(|| codec::decode_batch_exact(black_box(&encoded), &Limits::default()).unwrap())
        });
        let (_, raw) = codec::encode_sized(&message, level).unwrap();
        eprintln!(
            "zstd level {level}: {raw} bytes of MessagePack -> {} on the wire ({:.1}%)",
            encoded.len(),
            100.0 * encoded.len() as f64 / raw as f64
        );
    }
    group.bench_function("build", |b| b.iter(|| batch(black_box(1))));
    group.finish();
}

fn apply_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut targets = vec![(
        "sqlite",
        format!("sqlite://{}", dir.path().join("b.db").display()),
    )];
    let pg = std::env::var("DBSYNC_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let scratch = format!("dbsync_bench_{}", std::process::id());
    let pg_ok = runtime.block_on(async {
        let Ok(pool) = sqlx::PgPool::connect(&pg).await else {
            return false;
        };
        let ok = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {scratch}")))
            .execute(&pool)
            .await
            .is_ok();
        pool.close().await;
        ok
    });
    if pg_ok {
        let base = pg.rsplit_once('/').map_or(pg.as_str(), |(b, _)| b);
        targets.push(("postgres", format!("{base}/{scratch}")));
    } else {
        eprintln!("*** PostgreSQL not reachable: the postgres apply bench is skipped");
    }
    let mut group = c.benchmark_group("apply_batch");
    group.throughput(Throughput::Elements(ROWS as u64));
    for (engine, url) in &targets {
        let (store, connection, schema) = runtime.block_on(async {
            let store = Store::connect(url).await.unwrap();
            let connection = store
                .create_sender(
                    NewConnection {
                        name: "bench".into(),
                        site_url: "https://bench.example.com".into(),
                        settings: ConnectionSettings::default(),
                    },
                    &Actor::system(),
                    chrono::Utc::now(),
                )
                .await
                .unwrap()
                .connection
                .id;
            let ddl = if *engine == "postgres" {
                "CREATE TABLE users (id BIGINT PRIMARY KEY, uuid UUID, email TEXT, name TEXT, active BOOLEAN, \
                 score INTEGER, balance NUMERIC(12,2), profile JSONB, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ)"
            } else {
                "CREATE TABLE users (id INTEGER PRIMARY KEY, uuid BLOB, email TEXT, name TEXT, active INTEGER, \
                 score INTEGER, balance TEXT, profile TEXT, created_at TEXT, updated_at TEXT)"
            };
            store.execute_batch(&[ddl.to_owned()]).await.unwrap();
            let schema = store.describe_table("users").await.unwrap();
            (store, connection, schema)
        });
        let rows = batch(1);
        let mut next = 0i64;
        for strategy in [ConflictStrategy::Overwrite, ConflictStrategy::Skip] {
            group.bench_function(format!("{engine}_{strategy}"), |b| {
                b.iter(|| {
                    // New keys each time for inserts under overwrite; the same keys under skip.
                    if strategy == ConflictStrategy::Overwrite {
                        next += ROWS as i64;
                    }
                    let mut shifted = rows.rows.clone();
                    for row in &mut shifted {
                        if let Value::Int(id) = &mut row[0] {
                            *id += next;
                        }
                    }
                    runtime
                        .block_on(store.apply_batch(Batch {
                            into: None,
                            checkpoint: None,
                            changed: false,
                            connection_id: connection,
                            batch_of: None,
                            schema: &schema,
                            columns: &rows.columns,
                            rows: Rows::Values(&shifted),
                            strategy,
                            last_key: None,
                        }))
                        .unwrap()
                })
            });
        }
        runtime.block_on(store.close());
    }
    group.finish();
    if pg_ok {
        runtime.block_on(async {
            let pool = sqlx::PgPool::connect(&pg).await.unwrap();
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"
            )))
            .execute(&pool)
            .await;
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = codec_benches, apply_benches
}
criterion_main!(benches);
