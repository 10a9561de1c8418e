//! `dbsync pull` over WebSocket between two agents on real sockets: copies that compare equal
//! value by value, and the sender's controls observed by a real receiver.

use std::time::Duration;

use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ApprovalMode, ConnectionSettings, NewConnection};
use dbsync_agent::pull::{PullOptions, TransportChoice};
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};
use dbsync_agent::{Error, Store};
use dbsync_protocol::Value;

use crate::support::agents::{Options, RunningAgent, pull_killed_after, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

/// The value of the first series starting with `series` in a `/metrics` text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{series} in\n{text}"))
}

pub(crate) async fn exec(agent: &RunningAgent, statements: &[String]) {
    agent.agent.store.execute_batch(statements).await.unwrap();
}

/// Sender A and receiver B (auto_accept), connected by a registered connection with `settings`.
pub(crate) async fn pair(
    test: &str,
    postgres: bool,
    settings: ConnectionSettings,
) -> Option<(RunningAgent, RunningAgent, String)> {
    let options = Options {
        postgres,
        ..Options::default()
    };
    pair_with(test, options.clone(), options, settings).await
}

/// [`pair`] with each agent's options.
pub(crate) async fn pair_with(
    test: &str,
    a_options: Options,
    b_options: Options,
    settings: ConnectionSettings,
) -> Option<(RunningAgent, RunningAgent, String)> {
    let a = start(test, a_options).await?;
    let b = start(test, b_options).await?;
    b.agent
        .store
        .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
        .await
        .unwrap();
    a.agent
        .create_sender(
            NewConnection {
                name: "to-b".into(),
                site_url: b.url.clone(),
                settings,
            },
            None,
            &admin(),
        )
        .await
        .unwrap();
    let receiver = b
        .agent
        .store
        .list_connections(&Default::default())
        .await
        .unwrap()
        .remove(0);
    Some((a, b, receiver.name))
}

pub(crate) async fn rows(store: &Store, table: &str) -> Vec<Vec<Value>> {
    let schema = store.describe_table(table).await.unwrap();
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    store
        .read_page(&schema, &columns, None, 100_000)
        .await
        .unwrap()
        .rows
}

pub(crate) fn schema_statements(n: i64) -> Vec<String> {
    let mut statements = vec![
        "CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, score REAL)".to_owned(),
        "CREATE TABLE \"Order\" (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL REFERENCES users (id), \"select\" TEXT)".to_owned(),
    ];
    for i in 1..=n {
        statements.push(format!(
            "INSERT INTO users VALUES ({i}, 'u{i}@example.com', {i}.5)"
        ));
        statements.push(format!("INSERT INTO \"Order\" VALUES ({i}, {i}, 'o{i}')"));
    }
    statements
}

async fn copy_is_identical(postgres: bool, test: &str) {
    let Some((a, b, receiver)) = pair(test, postgres, ConnectionSettings::default()).await else {
        return;
    };
    exec(&a, &schema_statements(2_500)).await;
    let summary = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    let order: Vec<&str> = summary.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(order, ["users", "Order"], "parents first");
    for table in ["users", "Order"] {
        assert_eq!(
            rows(&a.agent.store, table).await,
            rows(&b.agent.store, table).await,
            "{table}"
        );
    }
    assert!(
        summary
            .tables
            .iter()
            .all(|t| t.created_table && t.rows == 2_500 && t.created == 2_500)
    );

    // Both sides recorded the transfers.
    let sent = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sent.total, 2);
    assert!(
        sent.items
            .iter()
            .all(|t| t.status == TransferStatus::Completed
                && t.records_transferred == 2_500
                && t.bytes_wire > 0
                && t.bytes_raw > t.bytes_wire)
    );
    // The connection counts the rows it sent, with no record limit set too.
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.max_records_total, None);
    assert_eq!(on_a.records_downloaded, 5_000);
    let received = b
        .agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Receive),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(received.total, 2);
    assert!(
        received
            .items
            .iter()
            .all(|t| t.status == TransferStatus::Completed && t.records_created == 2_500)
    );

    // Pulling again overwrites in place: nothing new, everything updated.
    exec(
        &a,
        &["UPDATE users SET email = 'changed' WHERE id = 7".into()],
    )
    .await;
    let again = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["users".into()]),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(
        (again.tables[0].created, again.tables[0].updated),
        (0, 2_500)
    );
    assert_eq!(
        rows(&b.agent.store, "users").await[6][1],
        Value::Text("changed".into())
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_sqlite_copy_is_identical() {
    copy_is_identical(false, "pull::sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_postgres_copy_is_identical() {
    copy_is_identical(true, "pull::postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_limits_and_requests_are_enforced() {
    for transport in [TransportChoice::Ws, TransportChoice::Quic] {
        record_limits_and_requests_are_enforced_over(transport).await;
    }
}

async fn record_limits_and_requests_are_enforced_over(transport: TransportChoice) {
    let settings = ConnectionSettings {
        max_records_per_request: 7,
        max_records_total: Some(2_010),
        // 288 requests: above the default 60 per minute (the receiver would wait, as told).
        rate_limit_per_minute: 100_000,
        excluded_tables: vec!["Order".into()],
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) = pair("pull::limits", false, settings).await else {
        return;
    };
    exec(&a, &schema_statements(2_500)).await;

    // An excluded table is invisible.
    let refused = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["Order".into()]),
                transport,
                ..Default::default()
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&refused, Err(Error::Remote { code, .. }) if code == "table_not_allowed"),
        "{refused:?}"
    );

    // 7 rows per request, cut exactly at 2,010 rows in all.
    let summary = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                transport,
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.tables.len(), 1);
    assert_eq!(summary.tables[0].rows, 2_010);
    assert!(summary.tables[0].truncated);
    assert_eq!(rows(&b.agent.store, "users").await.len(), 2_010);
    let on_a = a.agent.store.get_connection("to-b").await.unwrap();
    assert_eq!(on_a.records_downloaded, 2_010);
    assert_eq!(
        on_a.downloads_used, 1,
        "one download for the whole multi-request pull"
    );

    let again = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                transport,
                ..Default::default()
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&again, Err(Error::Remote { code, .. }) if code == "record_limit_exceeded"),
        "{again:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_hold_pulls_until_an_admin_decides() {
    for transport in [TransportChoice::Ws, TransportChoice::Quic] {
        approvals_hold_pulls_until_an_admin_decides_over(transport).await;
    }
}

async fn approvals_hold_pulls_until_an_admin_decides_over(transport: TransportChoice) {
    let settings = ConnectionSettings {
        approval_mode: ApprovalMode::RequireApproval,
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) = pair("pull::approval", false, settings).await else {
        return;
    };
    exec(&a, &schema_statements(20)).await;
    let options = PullOptions {
        tables: Some(vec!["users".into()]),
        approval_wait: Some(Duration::from_millis(200)),
        transport,
        ..Default::default()
    };
    let waiting = b.agent.pull(&receiver, &options, |_| {}).await;
    assert!(
        matches!(&waiting, Err(Error::Remote { code, .. }) if code == "approval_pending"),
        "{waiting:?}"
    );
    let pending = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::PendingApproval),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.total, 1);
    let transfer = pending.items[0].id;
    assert_eq!(
        a.agent
            .store
            .get_connection("to-b")
            .await
            .unwrap()
            .downloads_used,
        0,
        "not a download yet"
    );

    a.agent
        .store
        .approve_transfer(transfer, &admin(), a.agent.now())
        .await
        .unwrap();
    let done = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
    assert_eq!(done.tables[0].rows, 20);
    assert!(
        done.tables[0].resumed,
        "the pull picks up the approved transfer"
    );
    let sent = a.agent.store.get_transfer(transfer).await.unwrap();
    assert_eq!(sent.status, TransferStatus::Completed);
    assert_eq!(sent.records_transferred, 20);

    // A denied transfer ends the pull with approval_denied.
    let waiting = b.agent.pull(&receiver, &options, |_| {}).await;
    assert!(waiting.is_err());
    let pending = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::PendingApproval),
            ..Default::default()
        })
        .await
        .unwrap();
    a.agent
        .store
        .deny_transfer(pending.items[0].id, "not today", &admin(), a.agent.now())
        .await
        .unwrap();
    let denied = b.agent.pull(&receiver, &options, |_| {}).await;
    assert!(
        matches!(&denied, Err(Error::Remote { code, message, .. }) if code == "approval_denied" && message == "not today"),
        "{denied:?}"
    );
    // A denial ends that transfer, not the table: the next pull asks again, as a new transfer
    // waiting for a new approval.
    let again = b.agent.pull(&receiver, &options, |_| {}).await;
    assert!(
        matches!(&again, Err(Error::Remote { code, .. }) if code == "approval_pending"),
        "{again:?}"
    );
    let waiting = a
        .agent
        .store
        .list_transfers(&TransferFilter {
            status: Some(TransferStatus::PendingApproval),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(waiting.total, 1);
    assert_ne!(waiting.items[0].id, pending.items[0].id);
    a.stop().await;
    b.stop().await;
}

/// Every row of `table`, duplicates too, ordered by all its columns (a table without a key).
async fn all_rows(store: &Store, table: &str) -> Vec<Vec<Value>> {
    let mut schema = store.describe_table(table).await.unwrap();
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    schema.primary_key = columns.clone();
    store
        .read_page(&schema, &columns, None, 100_000)
        .await
        .unwrap()
        .rows
}

/// A keyless table (an event log, with duplicate rows) comes whole from one snapshot read over
/// several requests: `replace` by default (a second pull does not double it, and rows gone on
/// the sender go here), `append` when asked; a strategy that matches by key leaves it out of a
/// pull of several, named in the summary, and the other tables arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_table_comes_whole() {
    for postgres in [false, true] {
        a_keyless_table_comes_whole_on(postgres).await;
    }
}

async fn a_keyless_table_comes_whole_on(postgres: bool) {
    // Seven rows a request: the snapshot is read over four requests.
    let settings = ConnectionSettings {
        max_records_per_request: 7,
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) =
        pair(&format!("pull::keyless_{postgres}"), postgres, settings).await
    else {
        return;
    };
    let mut statements = vec![
        "CREATE TABLE kept (id INTEGER PRIMARY KEY, v TEXT)".to_owned(),
        "INSERT INTO kept VALUES (1, 'a'), (2, 'b')".to_owned(),
        "CREATE TABLE event_log (at TEXT, what TEXT)".to_owned(),
    ];
    for i in 0..25 {
        // Every fifth row twice: a keyless table may hold the same row more than once.
        statements.push(format!(
            "INSERT INTO event_log VALUES ('t{}', 'e{i}')",
            i / 5
        ));
    }
    statements.push("INSERT INTO event_log VALUES ('t0', 'e0')".to_owned());
    exec(&a, &statements).await;
    let summary = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    let pulled: Vec<(&str, i64)> = summary
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.rows))
        .collect();
    assert_eq!(pulled, vec![("event_log", 26), ("kept", 2)], "{postgres}");
    assert!(summary.skipped.is_empty());
    let expected = all_rows(&a.agent.store, "event_log").await;
    assert_eq!(expected.len(), 26);
    assert_eq!(all_rows(&b.agent.store, "event_log").await, expected);

    // Again, after the sender lost rows and gained others: the copy is the sender's table.
    exec(
        &a,
        &[
            "DELETE FROM event_log WHERE at = 't1'".to_owned(),
            "INSERT INTO event_log VALUES ('t9', 'late')".to_owned(),
        ],
    )
    .await;
    let again = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    let log = again
        .tables
        .iter()
        .find(|t| t.table == "event_log")
        .unwrap();
    assert_eq!((log.created, log.deleted), (22, 26));
    let expected = all_rows(&a.agent.store, "event_log").await;
    assert_eq!(all_rows(&b.agent.store, "event_log").await, expected);

    // A pull killed halfway leaves the table as it was (its stage stays until the next pull of
    // the table, which starts over).
    exec(
        &a,
        &["INSERT INTO event_log VALUES ('t8', 'later')".to_owned()],
    )
    .await;
    let only_log = PullOptions {
        tables: Some(vec!["event_log".into()]),
        ..Default::default()
    };
    pull_killed_after(&b.agent, &receiver, &only_log, 2).await;
    assert_eq!(all_rows(&b.agent.store, "event_log").await, expected);
    let connection = b.agent.store.get_connection(&receiver).await.unwrap();
    assert!(
        b.agent
            .store
            .stage_exists(connection.id, "event_log")
            .await
            .unwrap()
    );
    let resumed = b.agent.pull(&receiver, &only_log, |_| {}).await.unwrap();
    assert_eq!(resumed.tables[0].created, 23);
    let expected = all_rows(&a.agent.store, "event_log").await;
    assert_eq!(all_rows(&b.agent.store, "event_log").await, expected);

    // append adds the sender's rows to those here.
    let appended = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["event_log".into()]),
                strategy: Some(dbsync_agent::connection::ConflictStrategy::Append),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(appended.tables[0].created, 23);
    assert_eq!(all_rows(&b.agent.store, "event_log").await.len(), 46);

    // A strategy that matches rows by key, named by the operator: left out, the others go on.
    let overwrite = PullOptions {
        strategy: Some(dbsync_agent::connection::ConflictStrategy::Overwrite),
        ..Default::default()
    };
    let summary = b.agent.pull(&receiver, &overwrite, |_| {}).await.unwrap();
    let pulled: Vec<&str> = summary.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(pulled, vec!["kept"]);
    assert_eq!(summary.skipped.len(), 1);
    assert_eq!(summary.skipped[0].table, "event_log");
    assert_eq!(summary.skipped[0].code, "no_primary_key");
    assert!(
        summary.skipped[0].reason.contains("--strategy replace"),
        "{}",
        summary.skipped[0].reason
    );
    let alone = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["event_log".into()]),
                ..overwrite
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&alone, Err(Error::Invalid { reason, .. }) if reason.contains("no primary key")),
        "{alone:?}"
    );
    // No stage is left behind.
    assert!(
        !b.agent
            .store
            .stage_exists(connection.id, "event_log")
            .await
            .unwrap()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_or_a_suspended_connection_is_refused() {
    for transport in [TransportChoice::Ws, TransportChoice::Quic] {
        a_wrong_token_or_a_suspended_connection_is_refused_over(transport).await;
    }
}

async fn a_wrong_token_or_a_suspended_connection_is_refused_over(transport: TransportChoice) {
    let Some((a, b, receiver)) = pair("pull::refused", false, ConnectionSettings::default()).await
    else {
        return;
    };
    a.agent
        .store
        .suspend_connection("to-b", "maintenance", &admin(), a.agent.now())
        .await
        .unwrap();
    let refused = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                transport,
                ..Default::default()
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&refused, Err(Error::Remote { code, .. }) if code == "connection_not_active"),
        "{refused:?}"
    );
    a.agent
        .store
        .reactivate_connection("to-b", &admin(), a.agent.now())
        .await
        .unwrap();
    a.agent
        .store
        .regenerate_token("to-b", &admin(), a.agent.now())
        .await
        .unwrap();
    let refused = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                transport,
                ..Default::default()
            },
            |_| {},
        )
        .await;
    assert!(
        matches!(&refused, Err(Error::Remote { code, .. }) if code == "invalid_token"),
        "{refused:?}"
    );
    // Both refusals are counted by code in the sender's metrics.
    let metrics = a.agent.metrics.render(&a.agent.store).await.unwrap();
    for code in ["connection_not_active", "invalid_token"] {
        assert!(
            metrics.contains(&format!(
                "dbsync_sessions_refused_total{{code=\"{code}\"}} 1"
            )),
            "{code} in {metrics}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_killed_mid_way_resumes_without_loss_or_duplicates() {
    for postgres in [false, true] {
        // Batches of at most 2,000 rows, so two of them leave part of the table to resume.
        let sender = Options {
            postgres,
            batch_rows: Some(2_000),
            ..Options::default()
        };
        let receiver_options = Options {
            postgres,
            ..Options::default()
        };
        let Some((a, b, receiver)) = pair_with(
            "pull::resume",
            sender,
            receiver_options,
            ConnectionSettings::default(),
        )
        .await
        else {
            return;
        };
        exec(&a, &schema_statements(6_000)).await;
        let options = PullOptions {
            tables: Some(vec!["users".into()]),
            ..Default::default()
        };

        // Kill the pull (drop it, socket and all) as soon as two batches are applied.
        pull_killed_after(&b.agent, &receiver, &options, 2).await;
        let partial = rows(&b.agent.store, "users").await.len();
        assert!(
            (2_000..6_000).contains(&partial),
            "killed mid-way: {partial} rows"
        );

        // Run again: it resumes after the checkpoint under the same sender transfer.
        let summary = b.agent.pull(&receiver, &options, |_| {}).await.unwrap();
        assert!(summary.tables[0].resumed);
        assert_eq!(
            summary.tables[0].rows as usize + partial,
            6_000,
            "no row sent twice"
        );
        assert_eq!(
            rows(&a.agent.store, "users").await,
            rows(&b.agent.store, "users").await
        );
        let on_a = a.agent.store.get_connection("to-b").await.unwrap();
        let debug = a
            .agent
            .store
            .list_transfers(&TransferFilter::default())
            .await
            .unwrap();
        let received = b
            .agent
            .store
            .list_transfers(&TransferFilter::default())
            .await
            .unwrap();
        assert_eq!(
            on_a.downloads_used,
            1,
            "a resume is not a new download: {:?} {:?}",
            debug
                .items
                .iter()
                .map(|t| (t.status, t.records_transferred))
                .collect::<Vec<_>>(),
            received
                .items
                .iter()
                .map(|t| (t.status, t.metadata.clone()))
                .collect::<Vec<_>>()
        );
        let sent = a
            .agent
            .store
            .list_transfers(&TransferFilter::default())
            .await
            .unwrap();
        assert_eq!(sent.total, 1);
        assert_eq!(sent.items[0].status, TransferStatus::Completed);
        assert_eq!(sent.items[0].records_transferred, 6_000);
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_cross_engines_in_both_directions() {
    for (sender_on_postgres, receiver_on_postgres) in [(true, false), (false, true)] {
        let Some(a) = start(
            "pull::cross",
            Options {
                postgres: sender_on_postgres,
                ..Options::default()
            },
        )
        .await
        else {
            return;
        };
        let Some(b) = start(
            "pull::cross",
            Options {
                postgres: receiver_on_postgres,
                ..Options::default()
            },
        )
        .await
        else {
            return;
        };
        b.agent
            .store
            .set_incoming(IncomingMode::AutoAccept, None, &admin(), b.agent.now())
            .await
            .unwrap();
        a.agent
            .create_sender(
                NewConnection {
                    name: "to-b".into(),
                    site_url: b.url.clone(),
                    settings: ConnectionSettings::default(),
                },
                None,
                &admin(),
            )
            .await
            .unwrap();
        let receiver = b
            .agent
            .store
            .list_connections(&Default::default())
            .await
            .unwrap()
            .remove(0)
            .name;
        exec(&a, &schema_statements(1_200)).await;
        let summary = b
            .agent
            .pull(&receiver, &PullOptions::default(), |_| {})
            .await
            .unwrap();
        assert_eq!(summary.tables.iter().map(|t| t.rows).sum::<i64>(), 2_400);
        let users = rows(&b.agent.store, "users").await;
        assert_eq!(users.len(), 1_200);
        assert_eq!(
            users[41],
            vec![
                Value::Int(42),
                Value::Text("u42@example.com".into()),
                Value::Float(42.5)
            ]
        );
        let orders = rows(&b.agent.store, "Order").await;
        assert_eq!(
            orders[0],
            vec![Value::Int(1), Value::Int(1), Value::Text("o1".into())]
        );
        a.stop().await;
        b.stop().await;
    }
}

/// `/metrics` on both agents after a pull: the rows and bytes each side moved, the session the
/// sender opened, transfers by status, pull durations; only with an admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_a_pull_moved() {
    let Some((a, b, receiver)) = pair("pull::metrics", false, ConnectionSettings::default()).await
    else {
        return;
    };
    exec(&a, &schema_statements(300)).await;
    let ws = PullOptions {
        transport: TransportChoice::Ws,
        ..Default::default()
    };
    b.agent.pull(&receiver, &ws, |_| {}).await.unwrap();
    let client = reqwest::Client::new();
    let scrape = |agent: &crate::support::agents::RunningAgent| {
        let (url, store, now) = (
            agent.url.clone(),
            agent.agent.store.clone(),
            agent.agent.now(),
        );
        let client = client.clone();
        async move {
            let (_, token) = store
                .create_admin_token(&format!("scrape-{}", uuid::Uuid::new_v4()), &admin(), now)
                .await
                .unwrap();
            let anonymous = client.get(format!("{url}/metrics")).send().await.unwrap();
            assert_eq!(anonymous.status(), 401);
            let response = client
                .get(format!("{url}/metrics"))
                .bearer_auth(token.expose())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap()
        }
    };
    let on_a = scrape(&a).await;
    let on_b = scrape(&b).await;
    assert_eq!(
        metric(&on_a, "dbsync_rows_sent_total{transport=\"ws\"}"),
        600.0
    );
    assert!(
        metric(
            &on_a,
            "dbsync_bytes_sent_total{transport=\"ws\",kind=\"wire\"}"
        ) > 0.0
    );
    assert!(metric(&on_a, "dbsync_sessions_opened_total{transport=\"ws\"}") >= 1.0);
    assert_eq!(metric(&on_a, "dbsync_transfers{status=\"completed\"}"), 2.0);
    assert_eq!(metric(&on_a, "dbsync_approvals_waiting"), 0.0);
    assert_eq!(
        metric(&on_b, "dbsync_rows_received_total{transport=\"ws\"}"),
        600.0
    );
    assert!(
        metric(
            &on_b,
            "dbsync_table_pull_seconds_count{status=\"completed\"}"
        ) >= 2.0
    );
    assert!(on_a.contains("dbsync_state_pool_connections"));
    a.stop().await;
    b.stop().await;
}

/// `/metrics` scraped while a pull is between two batches shows it in flight, and both sides
/// recorded the sender's row estimate that the pages show progress against.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scrape_during_a_pull_sees_it_in_flight() {
    let settings = ConnectionSettings {
        max_records_per_request: 100,
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) = pair("pull::metrics_in_flight", true, settings).await else {
        return;
    };
    exec(&a, &schema_statements(300)).await;
    exec(
        &a,
        &["ANALYZE users".to_owned(), "ANALYZE \"Order\"".to_owned()],
    )
    .await;
    let (batch_seen, at_batch) = tokio::sync::oneshot::channel::<()>();
    let (go_on, wait) = std::sync::mpsc::channel::<()>();
    let mut batch_seen = Some(batch_seen);
    let scraper = {
        let (a_url, b_url) = (a.url.clone(), b.url.clone());
        let (a_store, b_store) = (a.agent.store.clone(), b.agent.store.clone());
        let now = a.agent.now();
        tokio::spawn(async move {
            at_batch.await.unwrap();
            let client = reqwest::Client::new();
            let mut texts = Vec::new();
            for (url, store) in [(a_url, &a_store), (b_url, &b_store)] {
                let (_, token) = store
                    .create_admin_token("scrape", &admin(), now)
                    .await
                    .unwrap();
                let response = client
                    .get(format!("{url}/metrics"))
                    .bearer_auth(token.expose())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                texts.push(response.text().await.unwrap());
            }
            let running = b_store
                .list_transfers(&TransferFilter {
                    status: Some(TransferStatus::InProgress),
                    ..TransferFilter::default()
                })
                .await
                .unwrap()
                .items;
            let sent = a_store
                .list_transfers(&TransferFilter {
                    status: Some(TransferStatus::InProgress),
                    ..TransferFilter::default()
                })
                .await
                .unwrap()
                .items;
            go_on.send(()).unwrap();
            (texts, running, sent)
        })
    };
    b.agent
        .pull(&receiver, &PullOptions::default(), |event| {
            if let dbsync_agent::pull::PullEvent::Batch { .. } = event
                && let Some(seen) = batch_seen.take()
            {
                seen.send(()).unwrap();
                // Hold the pull between batches until the scrape is done.
                wait.recv_timeout(Duration::from_secs(30)).unwrap();
            }
        })
        .await
        .unwrap();
    let (texts, running, sent) = scraper.await.unwrap();
    assert_eq!(
        metric(&texts[0], "dbsync_transfers{status=\"in_progress\"}"),
        1.0
    );
    assert_eq!(
        metric(&texts[1], "dbsync_transfers{status=\"in_progress\"}"),
        1.0
    );
    let received = metric(&texts[1], "dbsync_rows_received_total{transport=");
    assert!(received > 0.0 && received < 600.0, "{received}");
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].table_name, "users");
    assert_eq!(
        running[0].metadata["estimated_rows"], 300,
        "{:?}",
        running[0].metadata
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].metadata["estimated_rows"], 300,
        "{:?}",
        sent[0].metadata
    );
    a.stop().await;
    b.stop().await;
}

/// A receiver keeps the sender's download password (encrypted, never shown), so a pull (or a
/// scheduled run) that gives none still gets in; forgetting it brings back `password_required`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_download_password_opens_pulls_that_give_none() {
    let settings = ConnectionSettings {
        download_password: Some(dbsync_agent::config::Secret::new("open-sesame".into())),
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) = pair("pull::stored_password", false, settings).await else {
        return;
    };
    exec(&a, &schema_statements(5)).await;
    let refused = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await;
    assert!(
        matches!(&refused, Err(Error::Remote { code, .. }) if code == "password_required"),
        "{refused:?}"
    );
    let stored = b
        .agent
        .store
        .set_receiver_password(
            &receiver,
            Some("open-sesame"),
            &b.agent.vault,
            &admin(),
            b.agent.now(),
        )
        .await
        .unwrap();
    let shown = serde_json::to_string(&stored).unwrap();
    assert!(
        shown.contains("\"download_password_stored\":true"),
        "{shown}"
    );
    assert!(!shown.contains("open-sesame"));
    let pulled = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(pulled.tables.len(), 2);
    b.agent
        .store
        .set_receiver_password(&receiver, None, &b.agent.vault, &admin(), b.agent.now())
        .await
        .unwrap();
    let again = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await;
    assert!(
        matches!(&again, Err(Error::Remote { code, .. }) if code == "password_required"),
        "{again:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// `replace` of a table with a key that other tables reference with `ON DELETE CASCADE`: only the
/// rows the sender no longer has go (and their dependents with them); the rows it still has are
/// updated in place, so the rows that reference them stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_keeps_what_references_the_rows_that_stay() {
    for postgres in [false, true] {
        let Some((a, b, receiver)) = pair(
            &format!("pull::replace_cascade_{postgres}"),
            postgres,
            ConnectionSettings::default(),
        )
        .await
        else {
            continue;
        };
        let schema = [
            "CREATE TABLE teams (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
            "CREATE TABLE members (id INTEGER PRIMARY KEY, \
             team_id INTEGER NOT NULL REFERENCES teams (id) ON DELETE CASCADE)",
            "INSERT INTO teams VALUES (1, 'one'), (2, 'two')",
            "INSERT INTO members VALUES (10, 1), (11, 1), (20, 2)",
        ]
        .map(String::from);
        exec(&a, &schema).await;
        b.agent
            .pull(&receiver, &PullOptions::default(), |_| {})
            .await
            .unwrap();
        exec(
            &a,
            &[
                "DELETE FROM members WHERE team_id = 2".to_owned(),
                "DELETE FROM teams WHERE id = 2".to_owned(),
                "UPDATE teams SET name = 'uno' WHERE id = 1".to_owned(),
            ],
        )
        .await;
        let replaced = b
            .agent
            .pull(
                &receiver,
                &PullOptions {
                    tables: Some(vec!["teams".into()]),
                    strategy: Some(dbsync_agent::connection::ConflictStrategy::Replace),
                    ..Default::default()
                },
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(replaced.tables[0].deleted, 1, "{postgres}");
        assert_eq!(
            rows(&b.agent.store, "teams").await,
            rows(&a.agent.store, "teams").await
        );
        let members: Vec<i64> = rows(&b.agent.store, "members")
            .await
            .iter()
            .map(|r| match r[0] {
                Value::Int(id) => id,
                ref other => panic!("{other:?}"),
            })
            .collect();
        // Team 1's members stay. On PostgreSQL the copy has the sender's foreign key, so team
        // 2's member went with its team; a SQLite copy is made without foreign keys.
        let expected: &[i64] = if postgres { &[10, 11] } else { &[10, 11, 20] };
        assert_eq!(members, expected, "{postgres}");
        a.stop().await;
        b.stop().await;
    }
}

/// A rate limit met when the session opens is waited out (within `--retry-for`), not the end of
/// the pull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_at_session_open_is_waited_out() {
    let settings = ConnectionSettings {
        rate_limit_per_minute: 120,
        ..ConnectionSettings::default()
    };
    let Some((a, b, receiver)) = pair("pull::rate_open", false, settings).await else {
        return;
    };
    exec(&a, &schema_statements(10)).await;
    let sender = a.agent.store.get_connection("to-b").await.unwrap();
    // Spend the whole burst: the next session open is refused for about half a second.
    let mut spent = 0;
    while a.agent.validator.check_rate(&sender).await.is_ok() {
        spent += 1;
        assert!(spent <= 120, "the limit never bit");
    }
    let started = std::time::Instant::now();
    let summary = b
        .agent
        .pull(
            &receiver,
            &PullOptions {
                tables: Some(vec!["users".into()]),
                transport: TransportChoice::Ws,
                retry_for: Duration::from_secs(30),
                ..PullOptions::default()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(summary.tables[0].rows, 10);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the pull waited for the limit: {:?}",
        started.elapsed()
    );
    a.stop().await;
    b.stop().await;
}

/// The ids of `table` (its first column) above `floor`.
async fn ids_above(store: &Store, table: &str, floor: i64) -> Vec<i64> {
    rows(store, table)
        .await
        .iter()
        .filter_map(|row| match row.first() {
            Some(Value::Int(id)) if *id > floor => Some(*id),
            _ => None,
        })
        .collect()
}

/// Another session writing into `parent (id, name)` and `child (id, parent_id)` until `stop`:
/// a parent and its child in one transaction, ids from 100,001, again and again; with `moves`,
/// the same transaction moves an older child (id 99,000 lower) to the new parent. Returns the
/// pairs written.
pub(crate) fn parents_and_children(
    store: &Store,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    moves: bool,
) -> tokio::task::JoinHandle<i64> {
    let (store, stop) = (store.clone(), stop.clone());
    tokio::spawn(async move {
        let mut id = 100_000;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            id += 1;
            let mut statements = vec![
                format!("INSERT INTO parent VALUES ({id}, 'new')"),
                format!("INSERT INTO child VALUES ({id}, {id})"),
            ];
            if moves {
                statements.push(format!(
                    "UPDATE child SET parent_id = {id} WHERE id = {}",
                    id - 99_000
                ));
            }
            store.execute_batch(&statements).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        id - 100_000
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_table_of_a_pull_comes_from_one_moment() {
    for postgres in [true, false] {
        every_table_of_a_pull_comes_from_one_moment_on(postgres).await;
    }
}

async fn every_table_of_a_pull_comes_from_one_moment_on(postgres: bool) {
    // Small batches: the pull takes long enough for the writer below to go on meanwhile.
    let options = Options {
        postgres,
        batch_rows: Some(100),
        ..Options::default()
    };
    let Some((a, b, receiver)) = pair_with(
        "pull::one_snapshot",
        options.clone(),
        options,
        ConnectionSettings {
            max_records_per_request: 1_000_000,
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
            "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < 20000) \
             INSERT INTO parent SELECT g, 'p' || g FROM n"
                .into(),
            "INSERT INTO child SELECT id, id FROM parent".into(),
        ],
    )
    .await;
    // Another session writes a parent and its child, in one statement, again and again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = parents_and_children(&a.agent.store, &stop, false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let written_before = ids_above(&a.agent.store, "child", 100_000).await.len();
    let summary = b
        .agent
        .pull(&receiver, &PullOptions::default(), |_| {})
        .await
        .unwrap();
    let written_after = ids_above(&a.agent.store, "child", 100_000).await.len();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        written_after > written_before,
        "the writer went on during the pull ({written_before} then {written_after})"
    );
    let order: Vec<&str> = summary.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(order, ["parent", "child"]);
    // Every child here has its parent, and the pairs written meanwhile came whole or not at
    // all: both tables as they were at one moment.
    let store = &b.agent.store;
    let parents: std::collections::HashSet<i64> =
        ids_above(store, "parent", 0).await.into_iter().collect();
    let orphans = rows(store, "child")
        .await
        .iter()
        .filter(|row| !matches!(row.get(1), Some(Value::Int(p)) if parents.contains(p)))
        .count();
    assert_eq!(orphans, 0, "{postgres}: children whose parent did not come");
    let parents = ids_above(store, "parent", 100_000).await.len();
    let children = ids_above(store, "child", 100_000).await.len();
    assert_eq!(
        parents, children,
        "{postgres}: new parents and new children"
    );
    assert!(parents >= written_before, "{parents} < {written_before}");
    a.stop().await;
    b.stop().await;
}
