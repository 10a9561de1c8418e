//! Faults a real receiver meets: the `dbsync pull` process killed with SIGKILL at several points
//! of a large pull and run again, converging to an exact copy with no row lost, none twice, and
//! the sender's counters exact; and every PostgreSQL type under tricky names arriving exactly.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dbsync_agent::connection::ConnectionSettings;
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};

use crate::pull::{exec, pair};
use crate::support::agents::RunningAgent;

fn spawn_pull(agent: &RunningAgent, connection: &str, table: &str, transport: &str) -> Child {
    spawn_pull_with(
        agent,
        &[connection, "--tables", table, "--transport", transport],
    )
}

/// `dbsync --json pull ARGS` against `agent`'s state database.
pub(crate) fn spawn_pull_with(agent: &RunningAgent, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dbsync"))
        .args(["--json", "pull"])
        .args(args)
        .env("DBSYNC_DATABASE_URL", &agent.database_url)
        .env("DBSYNC_KEY_FILE", &agent.key_file)
        .env("DBSYNC_LOG", "warn")
        .env("DBSYNC_ALLOW_PRIVATE_PEERS", "true")
        .env_remove("DBSYNC_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    let sql = format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}");
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Every row of a PostgreSQL table as PostgreSQL prints it, in key order.
async fn as_text(agent: &RunningAgent, table: &str, key: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&agent.database_url).await.unwrap();
    let sql = format!("SELECT CAST(t AS TEXT) FROM {table} t ORDER BY {key}");
    let rows = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_with_sigkill_again_and_again_converges_to_an_exact_copy() {
    for transport in ["ws", "quic"] {
        killed_again_and_again(transport).await;
    }
}

async fn killed_again_and_again(transport: &str) {
    const ROWS: i64 = 150_000;
    let Some((a, b, receiver)) = pair("kill::sigkill", true, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE events (id BIGINT PRIMARY KEY, kind TEXT NOT NULL, at TIMESTAMPTZ, payload JSONB)".into(),
            format!(
                "INSERT INTO events SELECT g, 'kind-' || (g % 7), \
                 TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 second', \
                 jsonb_build_object('n', g, 'tag', md5(g::text)) FROM generate_series(1, {ROWS}) g"
            ),
        ],
    )
    .await;

    let kills = kill_again_and_again(
        &b,
        &[&receiver, "--tables", "events", "--transport", transport],
        "events",
        ROWS,
        4,
    )
    .await;
    let out = spawn_pull(&b, &receiver, "events", transport)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["tables"][0]["resumed"], true);
    assert_eq!(summary["tables"][0]["transport"], transport);
    assert_eq!(
        summary["tables"][0]["rows"].as_i64().unwrap() + kills.last().copied().unwrap_or(0),
        ROWS,
        "the last run moved exactly the rows still missing (kills at {kills:?})"
    );
    assert_eq!(
        as_text(&a, "events", "id").await,
        as_text(&b, "events", "id").await
    );

    // The sender counted one download and every row exactly once.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1);
    let sent = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sent.total, 1, "one transfer, resumed each time");
    assert_eq!(sent.items[0].status, TransferStatus::Completed);
    assert_eq!(sent.items[0].records_transferred, ROWS);
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.total_records, ROWS);
    a.stop().await;
    b.stop().await;
}

/// Runs `dbsync pull ARGS` on `agent` again and again (at most `runs` times), each run killed
/// with SIGKILL once it has applied rows of `table` beyond the last kill; stops past half of the
/// table's `rows`, so the run after still has rows to resume however fast this machine moves
/// them. Returns the rows here at each kill, at least one of them mid-pull.
pub(crate) async fn kill_again_and_again(
    agent: &RunningAgent,
    args: &[&str],
    table: &str,
    rows: i64,
    runs: usize,
) -> Vec<i64> {
    let copy = sqlx::PgPool::connect(&agent.database_url).await.unwrap();
    let mut kills = Vec::new();
    let mut last = 0;
    for _ in 0..runs {
        let mut child = spawn_pull_with(agent, args);
        let deadline = Instant::now() + Duration::from_secs(120);
        // Kill once this run has applied something new.
        loop {
            let now = count(&copy, table).await;
            if now > last || child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A COMMIT the pull sent just before it died still completes on its server: counted
        // too soon, those rows would look moved by the next run.
        tokio::time::sleep(Duration::from_millis(300)).await;
        last = count(&copy, table).await;
        kills.push(last);
        if last >= rows / 2 {
            break;
        }
    }
    copy.close().await;
    assert!(
        kills.iter().any(|n| (1..rows).contains(n)),
        "at least one kill landed mid-pull: {kills:?}"
    );
    kills
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_postgres_type_under_tricky_names_arrives_exactly() {
    let Some((a, b, receiver)) =
        pair("kill::every_type", true, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE \"Select\" (\"Order\" BIGINT PRIMARY KEY, \"user\" TEXT, \"MixedCase\" INTEGER, \
             \"with space\" TEXT, \"quo\"\"te\" TEXT, b BOOLEAN, i2 SMALLINT, f4 REAL, f8 DOUBLE PRECISION, \
             n NUMERIC, n2 NUMERIC(12,2), v VARCHAR(10), c CHAR(4), by BYTEA, u UUID, j JSON, jb JSONB, \
             d DATE, tm TIME, ts TIMESTAMP, tz TIMESTAMPTZ, iv INTERVAL, ai INTEGER[], at TEXT[][], \
             af FLOAT8[])"
                .into(),
            "INSERT INTO \"Select\" VALUES (1, 'select', -1, 'a b', 'q\"', true, -32768, 'NaN', '-Infinity', \
             123456789012345678901234567890123456789012.000000000000000000001, -12.30, 'x', 'ab', \
             '\\x00ff80fe', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.50]}', '{\"b\": null}', \
             'infinity', '23:59:59.999999', '2000-01-01 00:00:00', '1970-01-01 00:00:01+00', \
             '1 year 2 mons 3 days 04:05:06.000007', '{1,NULL,3}', '{{\"a\",\"b\"},{\"c\",NULL}}', \
             '{NaN,Infinity,-0,1e-300}')"
                .into(),
            "INSERT INTO \"Select\" (\"Order\", n, f4) VALUES (2, 'NaN', 'Infinity')".into(),
            "INSERT INTO \"Select\" (\"Order\", d, ts, tz, f8, n, by, at, iv) VALUES (3, '0044-03-15 BC', \
             '-infinity', '2262-04-11 23:47:16.854775+05:30', 1e-300, -0.000000000000000000000000000001, \
             '\\x', '{{\"quote\\\"d\",\"back\\\\slash\"}}', '-178000000 years')"
                .into(),
            "INSERT INTO \"Select\" (\"Order\", \"user\") SELECT g, repeat('é', g % 50) FROM generate_series(4, 3000) g"
                .into(),
        ],
    )
    .await;
    let out = spawn_pull(&b, &receiver, "Select", "auto")
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = as_text(&a, "\"Select\"", "\"Order\"").await;
    let copy = as_text(&b, "\"Select\"", "\"Order\"").await;
    assert_eq!(source.len(), 3_000);
    assert_eq!(source, copy);
    // Same column types, as PostgreSQL names them.
    let types = |agent: &RunningAgent| {
        let url = agent.database_url.clone();
        async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = '\"Select\"'::regclass AND attnum > 0 ORDER BY attnum",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        }
    };
    assert_eq!(types(&a).await, types(&b).await);
    // The same values without the interval and array columns: every batch of this table goes in
    // by binary COPY (agent/src/pg_copy.rs), which must be exactly as faithful.
    exec(
        &a,
        &[
            "CREATE TABLE \"Copied\" AS SELECT \"Order\", \"user\", \"MixedCase\", \"with space\", \
             \"quo\"\"te\", b, i2, f4, f8, n, n2, v, c, by, u, j, jb, d, tm, ts, tz FROM \"Select\""
                .into(),
            "ALTER TABLE \"Copied\" ADD PRIMARY KEY (\"Order\")".into(),
        ],
    )
    .await;
    let out = spawn_pull(&b, &receiver, "Copied", "auto")
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = as_text(&a, "\"Copied\"", "\"Order\"").await;
    assert_eq!(source.len(), 3_000);
    assert_eq!(source, as_text(&b, "\"Copied\"", "\"Order\"").await);
    a.stop().await;
    b.stop().await;
}
