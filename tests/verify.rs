//! `verify` between two agents on real sockets: identical copies are identical; a changed value,
//! a deleted row, an extra row and a changed key, in the first, middle and last page, are each
//! found with their key; `repair` moves only those rows; both histories keep the verification.

use dbsync_agent::connection::ConnectionSettings;
use dbsync_agent::pull::{PullOptions, TransportChoice};
use dbsync_agent::sync::verify::{TableVerdict, VerifyEvent, VerifyOptions, VerifySummary};
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};
use dbsync_protocol::Value;

use crate::pull::{exec, pair_with, rows};
use crate::support::agents::{Options, RunningAgent};

/// 300 users, and 120 rows of a table keyed by two columns.
fn statements() -> Vec<String> {
    let mut s = vec![
        "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, score REAL, seen TIMESTAMP, ok BOOLEAN)".to_owned(),
        "CREATE TABLE stock (site TEXT NOT NULL, sku BIGINT NOT NULL, qty BIGINT, PRIMARY KEY (site, sku))".to_owned(),
    ];
    for i in 1..=300 {
        s.push(format!(
            "INSERT INTO users VALUES ({i}, 'u{i}@example.com', {i}.5, '2026-01-0{} 10:00:0{}', {})",
            1 + i % 9,
            i % 10,
            if i % 2 == 0 { "TRUE" } else { "FALSE" }
        ));
    }
    for site in ["eu", "us", "ap"] {
        for sku in 1..=40 {
            s.push(format!(
                "INSERT INTO stock VALUES ('{site}', {sku}, {})",
                sku * 3
            ));
        }
    }
    s
}

fn options(repair: bool) -> VerifyOptions {
    VerifyOptions {
        repair,
        transport: TransportChoice::Ws,
        page_rows: 50,
        recheck: true,
        retry_for: std::time::Duration::from_secs(30),
        ..VerifyOptions::default()
    }
}

fn verdict<'a>(verdicts: &'a [TableVerdict], table: &str) -> &'a TableVerdict {
    verdicts.iter().find(|t| t.table == table).unwrap()
}

async fn pulled_pair(
    test: &str,
    a_pg: bool,
    b_pg: bool,
) -> Option<(RunningAgent, RunningAgent, String)> {
    let (a, b, receiver) = pair_with(
        test,
        Options {
            postgres: a_pg,
            ..Options::default()
        },
        Options {
            postgres: b_pg,
            ..Options::default()
        },
        ConnectionSettings {
            rate_limit_per_minute: 100_000,
            ..ConnectionSettings::default()
        },
    )
    .await?;
    exec(&a, &statements()).await;
    b.agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    Some((a, b, receiver))
}

/// The transfers the sender recorded.
async fn sent(a: &RunningAgent) -> Vec<dbsync_agent::transfer::Transfer> {
    a.agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            per_page: Some(500),
            ..TransferFilter::default()
        })
        .await
        .unwrap()
        .items
}

/// Rows the sender sent in pulls (not verifications).
async fn rows_sent_in_pulls(a: &RunningAgent) -> i64 {
    sent(a)
        .await
        .iter()
        .filter(|t| t.metadata.get("kind").is_none())
        .map(|t| t.records_transferred)
        .sum()
}

/// The status of each verification the sender recorded.
async fn verifications_sent(a: &RunningAgent) -> Vec<TransferStatus> {
    sent(a)
        .await
        .iter()
        .filter(|t| t.metadata["kind"] == "verify")
        .map(|t| t.status)
        .collect()
}

/// A diff pull as `dbsync pull --diff` runs it: its verdict, and how many tables it hashed
/// whole first.
async fn diff_pull(b: &RunningAgent, receiver: &str) -> (VerifySummary, usize) {
    let mut whole = 0;
    let summary = b
        .agent
        .verify(
            receiver,
            &VerifyOptions {
                recheck: false,
                ..options(true)
            },
            |event| whole += usize::from(matches!(event, VerifyEvent::WholeTable)),
        )
        .await
        .unwrap();
    (summary, whole)
}

async fn finds_and_repairs(test: &str, a_pg: bool, b_pg: bool) {
    let Some((a, b, receiver)) = pulled_pair(test, a_pg, b_pg).await else {
        return;
    };
    // A diff pull with no verification of the table before it expects changes: ranges from the
    // start (none found here).
    let (diffed, whole) = diff_pull(&b, &receiver).await;
    assert!(diffed.identical(), "{diffed:?}");
    assert_eq!(whole, 0);
    let mut events = Vec::new();
    let identical = b
        .agent
        .verify(&receiver, &options(false), |event| events.push(event))
        .await
        .unwrap();
    assert!(identical.identical(), "{identical:?}");
    // Progress: each table hashed whole in both databases (PostgreSQL on both sides), else
    // page by page; every row counted once either way.
    let whole = events
        .iter()
        .filter(|e| matches!(e, VerifyEvent::WholeTable))
        .count();
    assert_eq!(whole, if a_pg && b_pg { 2 } else { 0 }, "{events:?}");
    let counted: u64 = events
        .iter()
        .map(|e| match e {
            VerifyEvent::Page { rows } => *rows,
            _ => 0,
        })
        .sum();
    assert_eq!(counted, 420, "{events:?}");
    // Two PostgreSQL tables of the same types are hashed inside each database.
    let expected = if a_pg && b_pg { "database" } else { "rows" };
    assert!(identical.tables.iter().all(|t| t.hashed_in == expected));
    assert_eq!(verdict(&identical.tables, "users").rows_there, 300);
    assert_eq!(verdict(&identical.tables, "stock").rows_here, 120);
    // One verification transfer a table on the sender, completed, however it was asked for.
    let verifications = verifications_sent(&a).await;
    assert_eq!(verifications.len(), 4, "{verifications:?}");
    assert!(
        verifications
            .iter()
            .all(|s| *s == TransferStatus::Completed)
    );

    // A row the sender has past this side's last key (the rest alike) is found.
    exec(
        &a,
        &["INSERT INTO users VALUES (301, 'new', 1.0, NULL, NULL)".into()],
    )
    .await;
    let newer = b
        .agent
        .verify(&receiver, &options(false), |_| {})
        .await
        .unwrap();
    let users = verdict(&newer.tables, "users");
    assert_eq!(
        (users.missing_here, users.extra_here, users.different),
        (1, 0, 0),
        "{users:?}"
    );
    assert_eq!(users.first_missing, vec![vec![Value::Int(301)]]);
    assert!(verdict(&newer.tables, "stock").identical);
    assert_eq!(verifications_sent(&a).await.len(), 6);
    exec(&a, &["DELETE FROM users WHERE id = 301".into()]).await;

    // Here: a changed value in the first page, a deleted row in the middle, an extra row past
    // the last key, a changed key (row 250 now 1000), and a changed row of the composite key.
    exec(
        &b,
        &[
            "UPDATE users SET email = 'changed' WHERE id = 2".into(),
            "DELETE FROM users WHERE id = 151".into(),
            "INSERT INTO users VALUES (5000, 'extra', 1.0, NULL, NULL)".into(),
            "UPDATE users SET id = 1000 WHERE id = 250".into(),
            "UPDATE stock SET qty = 0 WHERE site = 'us' AND sku = 7".into(),
        ],
    )
    .await;
    let before = rows_sent_in_pulls(&a).await;
    let found = b
        .agent
        .verify(&receiver, &options(false), |_| {})
        .await
        .unwrap();
    assert!(!found.identical());
    let users = verdict(&found.tables, "users");
    assert_eq!(
        (users.missing_here, users.extra_here, users.different),
        (2, 2, 1),
        "{users:?}"
    );
    assert_eq!(users.first_different, vec![vec![Value::Int(2)]]);
    let mut missing = users.first_missing.clone();
    missing.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(missing, vec![vec![Value::Int(151)], vec![Value::Int(250)]]);
    let mut extra = users.first_extra.clone();
    extra.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(extra, vec![vec![Value::Int(1000)], vec![Value::Int(5000)]]);
    let stock = verdict(&found.tables, "stock");
    assert_eq!(
        (stock.missing_here, stock.extra_here, stock.different),
        (0, 0, 1)
    );
    assert_eq!(
        stock.first_different,
        vec![vec![Value::Text("us".into()), Value::Int(7)]]
    );
    assert_eq!(
        rows_sent_in_pulls(&a).await,
        before,
        "a verification moves no row"
    );

    // Repair moves exactly the missing and different rows and deletes the extra ones.
    let repaired = b
        .agent
        .verify(&receiver, &options(true), |_| {})
        .await
        .unwrap();
    assert!(repaired.identical(), "{repaired:?}");
    let users = verdict(&repaired.tables, "users");
    assert_eq!((users.repaired_rows, users.deleted_rows), (3, 2));
    assert_eq!(
        rows_sent_in_pulls(&a).await - before,
        4,
        "3 users and 1 stock row moved"
    );
    // Across engines the values are compared by the verification below, not as stored.
    if a_pg == b_pg {
        assert_eq!(
            rows(&a.agent.store, "users").await,
            rows(&b.agent.store, "users").await
        );
        assert_eq!(
            rows(&a.agent.store, "stock").await,
            rows(&b.agent.store, "stock").await
        );
    }
    let again = b
        .agent
        .verify(&receiver, &options(false), |_| {})
        .await
        .unwrap();
    assert!(again.identical(), "{again:?}");
    // The last verification found the tables alike and kept marks (PostgreSQL on both
    // sides): a diff pull now compares only the rows written since where the key is one
    // column (users), and hashes the rest whole first (stock, keyed by two columns).
    let (diffed, whole) = diff_pull(&b, &receiver).await;
    assert!(diffed.identical(), "{diffed:?}");
    assert_eq!(whole, if a_pg && b_pg { 1 } else { 0 });
    assert_eq!(verdict(&diffed.tables, "users").since_last, a_pg && b_pg);
    assert!(!verdict(&diffed.tables, "stock").since_last);

    // Both histories keep the verifications, as transfers of their own kind.
    for agent in [&a, &b] {
        let kinds = agent
            .agent
            .store
            .list_transfers(&TransferFilter {
                per_page: Some(500),
                ..TransferFilter::default()
            })
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|t| t.metadata["kind"] == "verify")
            .count();
        assert!(kinds >= 8, "{kinds} verification transfers");
    }
    // Each ended with the receiver's last question about its table.
    let sent = verifications_sent(&a).await;
    assert!(
        sent.iter().all(|s| *s == TransferStatus::Completed),
        "{sent:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_postgres_differences_are_found_and_repaired() {
    finds_and_repairs("verify::pg", true, true).await;
}

/// A pair with one more table, made on the sender by `statements` and pulled; the table's
/// verdict is then checked by [`verify_one`].
async fn pulled_table(
    test: &str,
    (a_pg, b_pg): (bool, bool),
    statements: &[String],
    table: &str,
) -> Option<OneTable> {
    let (a, b, receiver) = pulled_pair(test, a_pg, b_pg).await?;
    exec(&a, statements).await;
    b.agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec![table.to_owned()]),
                ..PullOptions::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    Some(OneTable {
        a,
        b,
        receiver,
        table: table.to_owned(),
        same_engine: a_pg == b_pg,
    })
}

/// A pulled pair and the one table a test compares.
struct OneTable {
    a: RunningAgent,
    b: RunningAgent,
    receiver: String,
    table: String,
    same_engine: bool,
}

impl OneTable {
    /// Verifies the table: its verdict, and how many ranges and pages that took.
    async fn verify_one(&self, repair: bool) -> (TableVerdict, usize) {
        let mut pages = 0;
        let summary = self
            .b
            .agent
            .verify(
                &self.receiver,
                &VerifyOptions {
                    tables: Some(vec![self.table.clone()]),
                    ..options(repair)
                },
                |event| pages += usize::from(matches!(event, VerifyEvent::Page { .. })),
            )
            .await
            .unwrap();
        (verdict(&summary.tables, &self.table).clone(), pages)
    }

    /// Stops both agents and drops their scratch databases.
    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }

    /// Repairs the table, then checks both sides hold the same rows (across engines, as the
    /// verification after the repair compares them, not as stored).
    async fn repaired_alike(&self) {
        let (repaired, _) = self.verify_one(true).await;
        assert!(repaired.identical, "{repaired:?}");
        if self.same_engine {
            assert_eq!(
                rows(&self.a.agent.store, &self.table).await,
                rows(&self.b.agent.store, &self.table).await
            );
        }
    }
}

/// Integer keys bunched at both ends of a span of billions, with thousands of keys apart in
/// the middle: ranges cut by how keys were spread so far still reach every row, and cross the
/// gaps in a few steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_unevenly_are_compared_to_the_last_row() {
    let keys: Vec<i64> = (1..=400)
        .chain((1..=300).map(|i| 1_000_000 + i * 7_919))
        .chain((1..=400).map(|i| 5_000_000_000 + i))
        .collect();
    let mut statements = vec!["CREATE TABLE events (id BIGINT PRIMARY KEY, v TEXT)".to_owned()];
    statements.extend(keys.chunks(100).map(|chunk| {
        let rows: Vec<String> = chunk.iter().map(|k| format!("({k}, 'e{k}')")).collect();
        format!("INSERT INTO events VALUES {}", rows.join(", "))
    }));
    let Some(pair) = pulled_table("verify::spread", (true, true), &statements, "events").await
    else {
        return;
    };
    // One difference in each part, and one row here only, in the widest gap.
    exec(
        &pair.b,
        &[
            "UPDATE events SET v = 'changed' WHERE id = 7".into(),
            format!("DELETE FROM events WHERE id = {}", 1_000_000 + 150 * 7_919),
            "INSERT INTO events VALUES (3000000000, 'extra')".into(),
            "UPDATE events SET v = 'changed' WHERE id = 5000000400".into(),
        ],
    )
    .await;
    let (verdict, pages) = pair.verify_one(false).await;
    assert_eq!(
        (verdict.missing_here, verdict.extra_here, verdict.different),
        (1, 1, 2),
        "{verdict:?}"
    );
    assert_eq!(verdict.rows_there, 1_100);
    assert!(pages < 200, "{pages} ranges and pages for 1,100 rows");
    pair.repaired_alike().await;
    pair.stop().await;
}

/// A UUID key is cut into ranges by its spread too (as the 128-bit number its bytes spell):
/// differences at both ends, in the middle and one row here only are found and repaired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_are_compared_by_their_spread() {
    let statements = [
        "CREATE TABLE devices (id UUID PRIMARY KEY, v TEXT)".to_owned(),
        "INSERT INTO devices SELECT md5(g::text)::uuid, 'd' || g FROM generate_series(1, 5000) g"
            .to_owned(),
    ];
    let Some(pair) =
        pulled_table("verify::uuid_spread", (true, true), &statements, "devices").await
    else {
        return;
    };
    exec(
        &pair.b,
        &[
            "UPDATE devices SET v = 'changed' WHERE id = (SELECT id FROM devices ORDER BY id LIMIT 1)"
                .into(),
            "DELETE FROM devices WHERE v = 'd2500'".into(),
            "INSERT INTO devices VALUES ('7fffffff-ffff-ffff-ffff-fffffffffff0', 'extra')".into(),
            "UPDATE devices SET v = 'changed' WHERE id = (SELECT id FROM devices ORDER BY id DESC LIMIT 1)"
                .into(),
        ],
    )
    .await;
    let (verdict, _) = pair.verify_one(false).await;
    assert_eq!(
        (verdict.missing_here, verdict.extra_here, verdict.different),
        (1, 1, 2),
        "{verdict:?}"
    );
    assert_eq!(verdict.rows_there, 5_000);
    pair.repaired_alike().await;
    pair.stop().await;
}

/// SQLite keeps UUIDs as text, PostgreSQL as `uuid`. Each side's range ends and page ends are
/// its own keys (or keys between them), and the other side compares them as the hyphenated
/// text a copy is made from: a UUID-keyed table verifies across engines, both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_are_verified_across_engines() {
    let mut statements = vec!["CREATE TABLE devices (id UUID PRIMARY KEY, v TEXT)".to_owned()];
    statements.extend((0..6).map(|chunk| {
        let rows: Vec<String> = (chunk * 500..(chunk + 1) * 500)
            .map(|i: u32| {
                let id = uuid::Uuid::from_u128(
                    u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                );
                format!("('{id}', 'd{i}')")
            })
            .collect();
        format!("INSERT INTO devices VALUES {}", rows.join(", "))
    }));
    for (engines, test) in [
        ((false, true), "verify::uuid_sqlite_pg"),
        ((true, false), "verify::uuid_pg_sqlite"),
    ] {
        let Some(pair) = pulled_table(test, engines, &statements, "devices").await else {
            continue;
        };
        exec(
            &pair.b,
            &[
                "UPDATE devices SET v = 'changed' WHERE v = 'd1234'".into(),
                "DELETE FROM devices WHERE v = 'd2999'".into(),
            ],
        )
        .await;
        let (verdict, _) = pair.verify_one(false).await;
        assert_eq!(
            (verdict.missing_here, verdict.extra_here, verdict.different),
            (1, 0, 1),
            "{test}: {verdict:?}"
        );
        assert_eq!(verdict.rows_there, 3_000, "{test}");
        pair.repaired_alike().await;
        pair.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_sqlite_differences_are_found_and_repaired() {
    finds_and_repairs("verify::sqlite", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_sqlite_differences_are_found_and_repaired() {
    finds_and_repairs("verify::pg_sqlite", true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres_differences_are_found_and_repaired() {
    finds_and_repairs("verify::sqlite_pg", false, true).await;
}

/// `dbsync` run on the receiving site: its output and exit codes.
fn dbsync(agent: &RunningAgent, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dbsync"))
        .args(args)
        .env("DBSYNC_DATABASE_URL", &agent.database_url)
        .env("DBSYNC_KEY_FILE", &agent.key_file)
        .env("DBSYNC_LOG", "warn")
        .env("DBSYNC_ALLOW_PRIVATE_PEERS", "true")
        .env_remove("DBSYNC_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_verifies_diffs_and_schedules_diff_pulls() {
    let Some((a, b, receiver)) = pulled_pair("verify::cli", false, false).await else {
        return;
    };
    let (code, out, err) = dbsync(&b, &["--json", "verify", &receiver, "--transport", "ws"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], true);

    exec(&b, &["DELETE FROM users WHERE id = 7".into()]).await;
    let (code, out, _) = dbsync(&b, &["verify", &receiver, "--tables", "users"]);
    assert_eq!(code, 1, "a difference is exit code 1");
    assert!(
        out.contains("differs") && out.contains("missing here: Int(7)"),
        "{out}"
    );

    let (code, out, err) = dbsync(&b, &["--json", "pull", &receiver, "--diff"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], true, "{report}");
    assert_eq!(
        rows(&a.agent.store, "users").await,
        rows(&b.agent.store, "users").await
    );

    let (code, out, err) = dbsync(
        &b,
        &[
            "--json",
            "schedule",
            "set",
            &receiver,
            "--tables",
            "users",
            "--interval",
            "15m",
            "--diff",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["auto_sync_mode"],
        "diff"
    );
    exec(&b, &["UPDATE users SET email = 'x' WHERE id = 9".into()]).await;
    let (code, out, err) = dbsync(&b, &["--json", "schedule", "run", &receiver]);
    assert_eq!(code, 0, "{err}");
    let outcome: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(outcome["status"], "completed", "{outcome}");
    assert_eq!(outcome["rows"], 1, "{outcome}");
    assert_eq!(
        rows(&a.agent.store, "users").await,
        rows(&b.agent.store, "users").await
    );
    a.stop().await;
    b.stop().await;
}

/// A verification with repair killed after its `pages`-th page (its task dies there, as a
/// process killed there would), then run again: the copy ends identical to the sender's.
async fn killed_and_run_again(test: &str, postgres: bool) {
    let Some((a, b, receiver)) = pulled_pair(test, postgres, postgres).await else {
        return;
    };
    exec(
        &b,
        &[
            "UPDATE users SET email = 'changed' WHERE id IN (3, 120, 290)".into(),
            "DELETE FROM users WHERE id IN (60, 200)".into(),
            "INSERT INTO users VALUES (7000, 'extra', 1.0, NULL, NULL)".into(),
        ],
    )
    .await;
    let agent = std::sync::Arc::clone(&b.agent);
    let name = receiver.clone();
    let killed = tokio::spawn(async move {
        let mut pages = 0;
        agent
            .verify(&name, &options(true), move |event| {
                if matches!(event, dbsync_agent::sync::verify::VerifyEvent::Page { .. }) {
                    pages += 1;
                    if pages == 3 {
                        std::panic::resume_unwind(Box::new("killed by the test"));
                    }
                }
            })
            .await
    })
    .await;
    assert!(
        killed.is_err_and(|err| err.is_panic()),
        "{postgres}: killed"
    );
    let again = b
        .agent
        .verify(&receiver, &options(true), |_| {})
        .await
        .unwrap();
    assert!(again.identical(), "{postgres}: {again:?}");
    let stuck: Vec<_> = b
        .agent
        .store
        .list_transfers(&TransferFilter {
            per_page: Some(500),
            ..TransferFilter::default()
        })
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|t| t.metadata["kind"] == "verify" && t.status == TransferStatus::InProgress)
        .collect();
    assert!(
        stuck.is_empty(),
        "{postgres}: the cut-off verification is over: {stuck:?}"
    );
    for table in ["users", "stock"] {
        assert_eq!(
            rows(&a.agent.store, table).await,
            rows(&b.agent.store, table).await,
            "{postgres}: {table}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_killed_mid_way_runs_again_to_the_end() {
    killed_and_run_again("verify::killed_pg", true).await;
    killed_and_run_again("verify::killed_sqlite", false).await;
}

/// A diff pull after a comparison that left both sides alike compares only the rows written
/// since on either side (protocol 9): rows changed there, here and on both sides are found
/// and repaired; a row deleted shows in the keys and every row is compared again; a table
/// rewritten here, or a comparison that ended with differences, makes the next one compare
/// every row too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_pulls_compare_the_rows_written_since_the_last_alike() {
    let statements = [
        "CREATE TABLE events (id BIGINT PRIMARY KEY, v TEXT, n INTEGER)".to_owned(),
        "INSERT INTO events SELECT g, 'e' || g, g FROM generate_series(1, 2000) g".to_owned(),
    ];
    let Some(pair) = pulled_table("verify::since", (true, true), &statements, "events").await
    else {
        return;
    };
    let diff = || async {
        let (summary, _) = diff_pull(&pair.b, &pair.receiver).await;
        verdict(&summary.tables, "events").clone()
    };
    let alike = || async {
        assert_eq!(
            rows(&pair.a.agent.store, "events").await,
            rows(&pair.b.agent.store, "events").await
        );
    };
    // No comparison yet: every row.
    let first = diff().await;
    assert!(first.identical && !first.since_last, "{first:?}");
    // Changed there (first, middle, last), here, and on both sides.
    exec(
        &pair.a,
        &[
            "UPDATE events SET v = 'there' WHERE id IN (1, 1000, 2000)".into(),
            "UPDATE events SET n = -1 WHERE id = 500".into(),
        ],
    )
    .await;
    exec(
        &pair.b,
        &[
            "UPDATE events SET v = 'here' WHERE id IN (7, 1500)".into(),
            "UPDATE events SET n = -2 WHERE id = 500".into(),
            // Written here, and alike all the same.
            "UPDATE events SET v = v WHERE id = 42".into(),
        ],
    )
    .await;
    let found = diff().await;
    assert!(found.since_last, "{found:?}");
    assert_eq!(
        (found.missing_here, found.extra_here, found.different),
        (0, 0, 6),
        "{found:?}"
    );
    assert_eq!(found.repaired_rows, 6);
    assert!(found.identical, "{found:?}");
    alike().await;
    // The rows the repair wrote here are compared again, and are alike.
    let again = diff().await;
    assert!(again.since_last && again.identical, "{again:?}");
    assert_eq!((again.different, again.repaired_rows), (0, 0), "{again:?}");
    // A row deleted there leaves no row to find: the keys differ, every row is compared.
    exec(&pair.a, &["DELETE FROM events WHERE id = 1234".into()]).await;
    let deleted = diff().await;
    assert!(!deleted.since_last, "{deleted:?}");
    assert_eq!(
        (deleted.extra_here, deleted.deleted_rows),
        (1, 1),
        "{deleted:?}"
    );
    assert!(deleted.identical, "{deleted:?}");
    alike().await;
    // The table here emptied and filled again with the same rows (a new file): its marks no
    // longer hold.
    exec(
        &pair.b,
        &[
            "CREATE TABLE events_kept AS SELECT * FROM events".into(),
            "TRUNCATE events".into(),
            "INSERT INTO events SELECT * FROM events_kept".into(),
            "DROP TABLE events_kept".into(),
        ],
    )
    .await;
    let rewritten = diff().await;
    assert!(
        rewritten.identical && !rewritten.since_last,
        "{rewritten:?}"
    );
    let tracked = diff().await;
    assert!(tracked.identical && tracked.since_last, "{tracked:?}");
    // A verification that found a difference and left it keeps no marks, and takes nothing
    // from the last ones: the next diff pull finds the row by them.
    exec(
        &pair.a,
        &["UPDATE events SET v = 'late' WHERE id = 3".into()],
    )
    .await;
    let (left, _) = pair.verify_one(false).await;
    assert_eq!(left.different, 1, "{left:?}");
    assert!(!left.since_last, "verify compares every row: {left:?}");
    let after_left = diff().await;
    assert!(
        after_left.since_last && after_left.identical,
        "{after_left:?}"
    );
    assert_eq!(after_left.repaired_rows, 1);
    alike().await;
    pair.stop().await;
}
