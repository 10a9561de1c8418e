//! `dbsync pull --parallel N`: a large table cut by the sender into key ranges, pulled over
//! several sessions side by side. The copy is exact, every range comes from the snapshot of
//! the session that cut the table, the sender counts one download and every row once, limits
//! hold, and a receiver killed with SIGKILL resumes every range where it stopped.

use std::time::Duration;

use dbsync_agent::connection::ConnectionSettings;
use dbsync_agent::pull::{PullEvent, PullOptions};
use dbsync_agent::transfer::{Transfer, TransferDirection, TransferFilter, TransferStatus};

use crate::kill::{kill_again_and_again, spawn_pull_with};
use crate::pull::{exec, pair, pair_with, parents_and_children};
use crate::support::agents::{Options, RunningAgent, pull_killed_after};

/// Every row of a PostgreSQL table as PostgreSQL prints it, in key order.
async fn as_text(agent: &RunningAgent, table: &str) -> Vec<String> {
    let pool = sqlx::PgPool::connect(&agent.database_url).await.unwrap();
    let sql = format!("SELECT CAST(t AS TEXT) FROM {table} t ORDER BY 1");
    let rows = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

async fn count(agent: &RunningAgent, table: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&agent.database_url).await.unwrap();
    let sql = format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}");
    let n = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
    pool.close().await;
    n
}

/// A table of `rows` rows with a text column and a JSON one, its statistics up to date (the
/// sender cuts by its row estimate).
async fn events(agent: &RunningAgent, rows: i64) {
    exec(
        agent,
        &[
            "CREATE TABLE events (id BIGINT PRIMARY KEY, kind TEXT NOT NULL, payload JSONB)".into(),
            format!(
                "INSERT INTO events SELECT g, 'kind-' || (g % 7), \
                 jsonb_build_object('n', g, 'tag', md5(g::text)) FROM generate_series(1, {rows}) g"
            ),
            "ANALYZE events".into(),
        ],
    )
    .await;
}

async fn sent(agent: &RunningAgent) -> Vec<Transfer> {
    agent
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            per_page: Some(100),
            ..Default::default()
        })
        .await
        .unwrap()
        .items
}

fn parallel(n: usize) -> PullOptions {
    PullOptions {
        parallel: n,
        ..PullOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_pulled_over_four_sessions_arrives_exactly_for_one_download() {
    const ROWS: i64 = 80_000;
    let Some((a, b, receiver)) = pair(
        "parallel::four",
        true,
        ConnectionSettings {
            max_records_per_request: 5_000,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    events(&a, ROWS).await;
    let summary = b.agent.pull(&receiver, &parallel(4), |_| {}).await.unwrap();
    let table = &summary.tables[0];
    assert_eq!(table.parts, 4, "{table:?}");
    assert_eq!(table.rows, ROWS);
    assert_eq!(table.created, ROWS);
    assert_eq!(as_text(&a, "events").await, as_text(&b, "events").await);

    // On the sender: one download, four transfers (one per range), each row sent once.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1);
    assert_eq!(on_a.total_records, ROWS);
    let parts = sent(&a).await;
    assert_eq!(parts.len(), 4);
    assert!(parts.iter().all(|t| t.status == TransferStatus::Completed));
    assert_eq!(
        parts.iter().map(|t| t.records_transferred).sum::<i64>(),
        ROWS
    );
    let mut named: Vec<String> = parts
        .iter()
        .map(|t| t.metadata["part"].as_str().unwrap().to_owned())
        .collect();
    named.sort();
    assert_eq!(named, ["1/4", "2/4", "3/4", "4/4"]);
    // On the receiver: a transfer per range, no checkpoint of a range left behind.
    let received = b
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Receive),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(received.total, 4);
    assert_eq!(
        received
            .items
            .iter()
            .map(|t| t.records_transferred)
            .sum::<i64>(),
        ROWS
    );
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    assert!(
        b.agent
            .store
            .part_checkpoints(connection.id, "events")
            .await
            .unwrap()
            .is_empty()
    );

    // A table too small to cut comes in one piece; so does a pull with --parallel 1.
    exec(
        &a,
        &[
            "CREATE TABLE small (id INT PRIMARY KEY)".into(),
            "INSERT INTO small SELECT generate_series(1, 500)".into(),
            "ANALYZE small".into(),
        ],
    )
    .await;
    let summary = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["small".into()]),
                ..parallel(4)
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.tables[0].parts, 0);
    assert_eq!(summary.tables[0].rows, 500);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_limit_holds_exactly_under_parallel_streams() {
    const ROWS: i64 = 60_000;
    const LIMIT: i64 = 25_000;
    let Some((a, b, receiver)) = pair(
        "parallel::limit",
        true,
        ConnectionSettings {
            max_records_per_request: 2_000,
            max_records_total: Some(LIMIT),
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    events(&a, ROWS).await;
    let summary = b.agent.pull(&receiver, &parallel(4), |_| {}).await.unwrap();
    let table = &summary.tables[0];
    assert_eq!(table.parts, 4);
    assert!(table.truncated);
    assert_eq!(table.rows, LIMIT);
    assert_eq!(count(&b, "events").await, LIMIT);
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.total_records, LIMIT);
    assert_eq!(
        sent(&a)
            .await
            .iter()
            .map(|t| t.records_transferred)
            .sum::<i64>(),
        LIMIT
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_parts_of_parents_and_children_come_from_one_moment() {
    let Some((a, b, receiver)) = pair(
        "parallel::one_moment",
        true,
        ConnectionSettings {
            max_records_per_request: 1_000,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    exec(
        &a,
        &[
            "CREATE TABLE parent (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".into(),
            "CREATE TABLE child (id BIGINT PRIMARY KEY, parent_id BIGINT NOT NULL REFERENCES parent (id))"
                .into(),
            "INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 40000) g".into(),
            "INSERT INTO child SELECT id, id FROM parent".into(),
            "ANALYZE parent".into(),
            "ANALYZE child".into(),
        ],
    )
    .await;
    // Another session writes a parent and its child, in one transaction, again and again,
    // and moves an older child to the new parent.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = parents_and_children(&a.agent.store, &stop, true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary = b.agent.pull(&receiver, &parallel(4), |_| {}).await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(summary.tables.iter().all(|t| t.parts >= 2), "{summary:?}");
    let pool = sqlx::PgPool::connect(&b.database_url).await.unwrap();
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM child c WHERE NOT EXISTS (SELECT 1 FROM parent p WHERE p.id = c.parent_id)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "children whose parent did not come");
    let (parents, children): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM parent WHERE id > 100000), (SELECT count(*) FROM child WHERE id > 100000)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(parents, children, "new parents and new children");
    pool.close().await;
    a.stop().await;
    b.stop().await;
}

fn parallel_pull_args<'a>(connection: &'a str, transport: &'a str) -> [&'a str; 7] {
    [
        connection,
        "--tables",
        "events",
        "--parallel",
        "4",
        "--transport",
        transport,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_pull_killed_again_and_again_converges_to_an_exact_copy() {
    for transport in ["ws", "quic"] {
        killed_again_and_again(transport).await;
    }
}

async fn killed_again_and_again(transport: &str) {
    const ROWS: i64 = 160_000;
    let Some((a, b, receiver)) = pair(
        &format!("parallel::kill_{transport}"),
        true,
        ConnectionSettings {
            max_records_per_request: 5_000,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    events(&a, ROWS).await;
    let args = parallel_pull_args(&receiver, transport);
    let kills = kill_again_and_again(&b, &args, "events", ROWS, 3).await;
    let out = spawn_pull_with(&b, &args).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = &summary["tables"][0];
    assert_eq!(table["resumed"], true, "{summary}");
    assert_eq!(table["parts"], 4, "{summary}");
    assert_eq!(
        table["rows"].as_i64().unwrap() + kills.last().copied().unwrap_or(0),
        ROWS,
        "the last run moved exactly the rows still missing (kills at {kills:?})"
    );
    assert_eq!(as_text(&a, "events").await, as_text(&b, "events").await);
    // The sender counted one download and every row once, over one transfer per range.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1);
    assert_eq!(on_a.total_records, ROWS);
    let parts = sent(&a).await;
    assert_eq!(parts.len(), 4, "one transfer per range, resumed each time");
    assert!(parts.iter().all(|t| t.status == TransferStatus::Completed));
    assert_eq!(
        parts.iter().map(|t| t.records_transferred).sum::<i64>(),
        ROWS
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_whose_record_cannot_be_read_back_makes_the_pull_start_over() {
    const ROWS: i64 = 60_000;
    let Some((a, b, receiver)) = pair(
        "parallel::unreadable",
        true,
        ConnectionSettings {
            max_records_per_request: 2_000,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    events(&a, ROWS).await;
    pull_killed_after(&b.agent, &receiver, &parallel(4), 5).await;
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    let parts = b
        .agent
        .store
        .part_checkpoints(connection.id, "events")
        .await
        .unwrap();
    assert_eq!(parts.len(), 4, "{parts:?}");
    // One range's record loses its bounds (edited by hand, restored from an older backup):
    // rather than leave that range out, the pull cuts the table again and starts over.
    let transfer = parts[0].1.transfer_id.unwrap();
    exec(
        &b,
        &[format!(
            "UPDATE dbsync_transfers SET metadata = metadata - 'range' WHERE id = '{transfer}'"
        )],
    )
    .await;
    let summary = b.agent.pull(&receiver, &parallel(4), |_| {}).await.unwrap();
    let table = &summary.tables[0];
    assert_eq!(table.parts, 4, "{table:?}");
    assert!(!table.resumed, "{table:?}");
    assert_eq!(table.rows, ROWS);
    assert_eq!(as_text(&a, "events").await, as_text(&b, "events").await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_pull_is_one_download_under_the_download_limit() {
    let Some((a, b, receiver)) = pair(
        "parallel::downloads",
        true,
        ConnectionSettings {
            max_records_per_request: 5_000,
            max_downloads: Some(1),
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    events(&a, 40_000).await;
    // Four ranges over four sessions: the one download the connection has.
    let summary = b.agent.pull(&receiver, &parallel(4), |_| {}).await.unwrap();
    assert_eq!(summary.tables[0].parts, 4);
    assert_eq!(summary.tables[0].rows, 40_000);
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1);
    // None left: the next cut is refused as a pull would be, and nothing more is counted.
    let err = b
        .agent
        .pull(&receiver, &parallel(4), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            dbsync_agent::Error::Remote { code, .. }
                if *code == dbsync_protocol::session::Code::DownloadLimitExceeded
        ),
        "{err}"
    );
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1);
    assert_eq!(on_a.total_records, 40_000);
    a.stop().await;
    b.stop().await;
}

/// `tables` small tables `s1`, `s2`, ... of `rows` rows each, and two more, `left_side` and
/// `right_side`, that another session writes in one transaction (see [`both_sides`]).
async fn small_tables(agent: &RunningAgent, tables: usize, rows: i64) {
    let mut statements = vec![
        "CREATE TABLE left_side (id BIGINT PRIMARY KEY, note TEXT NOT NULL)".to_owned(),
        "CREATE TABLE right_side (id BIGINT PRIMARY KEY, note TEXT NOT NULL)".to_owned(),
        format!("INSERT INTO left_side SELECT g, 'l' || g FROM generate_series(1, {rows}) g"),
        format!("INSERT INTO right_side SELECT g, 'r' || g FROM generate_series(1, {rows}) g"),
    ];
    for i in 1..=tables {
        statements.push(format!(
            "CREATE TABLE s{i} (id BIGINT PRIMARY KEY, kind TEXT NOT NULL, payload JSONB)"
        ));
        statements.push(format!(
            "INSERT INTO s{i} SELECT g, 'kind-' || (g % 7), jsonb_build_object('n', g, 't', {i}) \
             FROM generate_series(1, {rows}) g"
        ));
    }
    statements.push("ANALYZE".into());
    exec(agent, &statements).await;
}

/// Writes a row into `left_side` and the same key into `right_side`, in one transaction, again
/// and again until `stop`: a copy of the two read at one moment holds the same keys in both.
fn both_sides(
    store: &dbsync_agent::store::Store,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<i64> {
    let (store, stop) = (store.clone(), stop.clone());
    tokio::spawn(async move {
        let mut id = 1_000_000;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            id += 1;
            store
                .execute_batch(&[
                    format!("INSERT INTO left_side VALUES ({id}, 'new')"),
                    format!("INSERT INTO right_side VALUES ({id}, 'new')"),
                ])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        id - 1_000_000
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_tables_go_side_by_side_from_one_moment_for_a_download_each() {
    const ROWS: i64 = 6_000;
    let Some((a, b, receiver)) = pair(
        "parallel::side_by_side",
        true,
        ConnectionSettings {
            max_records_per_request: 500,
            rate_limit_per_minute: 6_000,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    small_tables(&a, 4, ROWS).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = both_sides(&a.agent.store, &stop);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Which table each batch belonged to, in the order applied.
    let mut order: Vec<String> = Vec::new();
    let summary = b
        .agent
        .pull(&receiver, &parallel(4), |event| {
            if let dbsync_agent::pull::PullEvent::Batch { table, .. } = event {
                order.push(table);
            }
        })
        .await
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert_eq!(summary.tables.len(), 6, "{summary:?}");
    // Side by side: batches of different tables interleave (one at a time, each table's
    // batches would come in one run, five changes of table in all).
    let changes = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(changes > 5, "batches by table: {order:?}");
    for i in 1..=4 {
        let table = format!("s{i}");
        assert_eq!(
            as_text(&a, &table).await,
            as_text(&b, &table).await,
            "{table}"
        );
    }
    // The two tables the writer kept changing were read at one moment.
    let pool = sqlx::PgPool::connect(&b.database_url).await.unwrap();
    let unmatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM left_side l FULL JOIN right_side r USING (id) \
         WHERE l.id IS NULL OR r.id IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!(unmatched, 0, "a key in one side and not the other");
    // On the sender: one download per table, one transfer per table named its one part, and
    // every row counted once.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 6);
    let parts = sent(&a).await;
    assert_eq!(parts.len(), 6);
    assert!(
        parts
            .iter()
            .all(|t| t.status == TransferStatus::Completed && t.metadata["part"] == "1/1"),
        "{parts:?}"
    );
    let moved: i64 = summary.tables.iter().map(|t| t.rows).sum();
    assert_eq!(on_a.total_records, moved);
    assert_eq!(
        parts.iter().map(|t| t.records_transferred).sum::<i64>(),
        moved
    );
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    for table in &summary.tables {
        assert!(
            b.agent
                .store
                .part_checkpoints(connection.id, &table.table)
                .await
                .unwrap()
                .is_empty()
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_tables_side_by_side_killed_with_sigkill_converge_to_exact_copies() {
    const ROWS: i64 = 15_000;
    let Some((a, b, receiver)) = pair(
        "parallel::side_by_side_kill",
        true,
        ConnectionSettings {
            max_records_per_request: 1_000,
            rate_limit_per_minute: 600,
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    small_tables(&a, 4, ROWS).await;
    const TABLES: [&str; 6] = ["left_side", "right_side", "s1", "s2", "s3", "s4"];
    let args = [receiver.as_str(), "--parallel", "4"];
    // `s4` is among the last taken off the queue: a kill when it has rows lands mid-pull (a
    // second run would pull again whole what the first finished).
    let kills = kill_again_and_again(&b, &args, "s4", ROWS, 1).await;
    let out = spawn_pull_with(&b, &args).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = summary["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 6, "{summary}");
    // A table the kill interrupted goes on after its last applied key; one that had finished
    // is pulled again whole, as any pull would.
    assert!(
        tables
            .iter()
            .any(|t| t["table"] == "s4" && t["resumed"] == true),
        "{summary} (kills at {kills:?})"
    );
    for table in tables.iter().filter(|t| t["resumed"] != true) {
        assert_eq!(table["rows"], ROWS, "{summary}");
    }
    for table in TABLES {
        assert_eq!(
            as_text(&a, table).await,
            as_text(&b, table).await,
            "{table}"
        );
    }
    // On the sender: every transfer finished; a resumed one carried its table's rows once
    // across the runs (a row sent twice would be counted twice); the counter says what the
    // history says.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    let sent = sent(&a).await;
    assert!(
        sent.iter().all(|t| t.status == TransferStatus::Completed),
        "{sent:?}"
    );
    for table in TABLES {
        let last = sent
            .iter()
            .filter(|t| t.table_name == table)
            .max_by_key(|t| t.created_at)
            .unwrap();
        assert_eq!(last.records_transferred, ROWS, "{table}: {last:?}");
    }
    assert_eq!(
        sent.iter().map(|t| t.records_transferred).sum::<i64>(),
        on_a.total_records
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_tables_side_by_side_stop_at_the_download_limit_with_every_granted_table_in() {
    const ROWS: i64 = 2_000;
    let Some((a, b, receiver)) = pair(
        "parallel::side_by_side_downloads",
        true,
        ConnectionSettings {
            max_records_per_request: 500,
            rate_limit_per_minute: 6_000,
            max_downloads: Some(3),
            ..ConnectionSettings::default()
        },
    )
    .await
    else {
        return;
    };
    small_tables(&a, 4, ROWS).await;
    // Six small tables, three downloads: the fourth grant is refused as a pull would be.
    let err = b
        .agent
        .pull(&receiver, &parallel(4), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            dbsync_agent::Error::Remote { code, .. }
                if *code == dbsync_protocol::session::Code::DownloadLimitExceeded
        ),
        "{err}"
    );
    // The three tables granted came whole, and nothing more was counted.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 3);
    assert_eq!(on_a.total_records, 3 * ROWS);
    let mut whole = 0;
    for table in ["left_side", "right_side", "s1", "s2", "s3", "s4"] {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&sqlx::PgPool::connect(&b.database_url).await.unwrap())
            .await
            .unwrap();
        if exists && count(&b, table).await == ROWS {
            whole += 1;
        }
    }
    assert_eq!(whole, 3);
    let sent = sent(&a).await;
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|t| t.status == TransferStatus::Completed));
    a.stop().await;
    b.stop().await;
}

/// A parallel pull stopped dead at its first batch, while one session (all the sender allows
/// here) had started only the first range: the next run takes the other three up under the cut
/// that counted their download, and the sender counts one download and every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_that_never_reached_the_sender_resume_under_their_cut() {
    const ROWS: i64 = 80_000;
    fn one_session(config: &mut dbsync_agent::Config) {
        config.server.max_sessions_per_ip = 1;
    }
    let a_options = Options {
        postgres: true,
        tweak: Some(one_session),
        ..Options::default()
    };
    let b_options = Options {
        postgres: true,
        ..Options::default()
    };
    let settings = ConnectionSettings {
        max_records_per_request: 5_000,
        rate_limit_per_minute: 10_000,
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) =
        pair_with("parallel::never_started", a_options, b_options, settings).await
    else {
        return;
    };
    events(&a, ROWS).await;
    let options = PullOptions {
        tables: Some(vec!["events".into()]),
        parallel: 4,
        retry_for: Duration::from_secs(20),
        ..PullOptions::default()
    };
    // The first run's future is dropped at its first applied batch, as a kill would leave it.
    let first_batch = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = std::sync::Arc::clone(&first_batch);
    tokio::select! {
        outcome = b.agent.pull(&receiver, &options, move |event| {
            if matches!(event, PullEvent::Batch { .. }) {
                notify.notify_one();
            }
        }) => panic!("the pull ended before it was stopped: {outcome:?}"),
        () = first_batch.notified() => {}
    }
    let started = sent(&a).await;
    assert_eq!(
        started.len(),
        1,
        "one range reached the sender: {started:?}"
    );
    assert_eq!(
        a.agent
            .store
            .get_connection("to-b")
            .await
            .unwrap()
            .downloads_used,
        1
    );

    let summary = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    let table = &summary.tables[0];
    assert!(table.resumed, "{table:?}");
    assert_eq!(table.parts, 4, "{table:?}");
    assert_eq!(count(&b, "events").await, ROWS);
    assert_eq!(as_text(&a, "events").await, as_text(&b, "events").await);
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.downloads_used, 1, "the cut's download, once");
    assert_eq!(on_a.total_records, ROWS);
    let parts = sent(&a).await;
    assert_eq!(parts.len(), 4, "one transfer per range: {parts:?}");
    assert!(parts.iter().all(|t| t.status == TransferStatus::Completed));
    a.stop().await;
    b.stop().await;
}
