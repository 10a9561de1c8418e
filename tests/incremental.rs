//! Incremental pulls: after the first one, only rows whose (cursor, key) moved past the saved
//! cursor travel, as the sender's transfer record shows; an incremental mirror deletes what the
//! sender deleted with a keys-only pass that is neither a download nor counted as rows.

use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings};
use dbsync_agent::pull::PullOptions;
use dbsync_agent::transfer::{TransferDirection, TransferFilter};

use crate::pull::{exec, pair, rows};

fn incremental(strategy: ConflictStrategy) -> PullOptions {
    PullOptions {
        tables: Some(vec!["accounts".into()]),
        strategy: Some(strategy),
        incremental: true,
        ..Default::default()
    }
}

async fn last_send(a: &crate::support::agents::RunningAgent) -> dbsync_agent::transfer::Transfer {
    a.agent
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            per_page: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .items
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_changed_rows_travel_and_deletes_follow_in_mirror() {
    for postgres in [true, false] {
        let Some((a, b, receiver)) = pair(
            "incremental::changed",
            postgres,
            ConnectionSettings::default(),
        )
        .await
        else {
            return;
        };
        let seed = if postgres {
            "INSERT INTO accounts SELECT g, 'name ' || g, TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * INTERVAL '1 millisecond' \
             FROM generate_series(1, 100000) g"
                .to_owned()
        } else {
            "WITH RECURSIVE n(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM n WHERE g < 100000) \
             INSERT INTO accounts SELECT g, 'name ' || g, printf('2024-01-01 00:00:%06d', g) FROM n"
                .to_owned()
        };
        let ts = if postgres { "TIMESTAMPTZ" } else { "TEXT" };
        exec(
            &a,
            &[
                format!("CREATE TABLE accounts (id BIGINT PRIMARY KEY, name TEXT NOT NULL, updated_at {ts} NOT NULL)"),
                seed,
            ],
        )
        .await;
        let first = b
            .agent
            .pull(&receiver, &incremental(ConflictStrategy::Overwrite), |_| {})
            .await
            .unwrap();
        assert_eq!(first.tables[0].rows, 100_000);

        // Change 1% of the rows (and move their cursor forward).
        let later = if postgres {
            "TIMESTAMPTZ '2025-01-01 00:00:00+00'"
        } else {
            "'2025-01-01 00:00:00'"
        };
        exec(
            &a,
            &[format!(
                "UPDATE accounts SET name = 'changed', updated_at = {later} WHERE id % 100 = 0"
            )],
        )
        .await;
        let second = b
            .agent
            .pull(&receiver, &incremental(ConflictStrategy::Overwrite), |_| {})
            .await
            .unwrap();
        assert_eq!(second.tables[0].rows, 1_000);
        let sent = last_send(&a).await;
        assert_eq!(
            sent.records_transferred, 1_000,
            "the sender sent exactly the changed rows"
        );
        assert_eq!(sent.metadata["incremental"]["cursor"], "updated_at");
        assert_eq!(
            rows(&a.agent.store, "accounts").await,
            rows(&b.agent.store, "accounts").await
        );

        // Nothing changed: nothing moves.
        let idle = b
            .agent
            .pull(&receiver, &incremental(ConflictStrategy::Overwrite), |_| {})
            .await
            .unwrap();
        assert_eq!(idle.tables[0].rows, 0);

        // Deletes on the sender reach the copy through the mirror's keys-only pass.
        exec(&a, &["DELETE FROM accounts WHERE id <= 10".into()]).await;
        let latest = later.replace("2025", "2026");
        exec(
            &a,
            &[format!(
                "UPDATE accounts SET name = 'again', updated_at = {latest} WHERE id = 500"
            )],
        )
        .await;
        let downloads_before = a
            .agent
            .store
            .get_connection("to-b")
            .await
            .unwrap()
            .downloads_used;
        let mirror = b
            .agent
            .pull(&receiver, &incremental(ConflictStrategy::Mirror), |_| {})
            .await
            .unwrap();
        assert_eq!(mirror.tables[0].deleted, 10);
        assert_eq!(
            mirror.tables[0].rows, 1,
            "only row 500 moved past the saved cursor"
        );
        assert_eq!(
            rows(&a.agent.store, "accounts").await,
            rows(&b.agent.store, "accounts").await
        );
        let on_a = a.agent.store.get_connection("to-b").await.unwrap();
        assert_eq!(
            on_a.downloads_used,
            downloads_before + 1,
            "the keys pass is not a download"
        );
        let keys = last_send(&a).await;
        assert_eq!(keys.metadata["keys_only"], true);
        assert_eq!(keys.records_transferred, 99_990);
        a.stop().await;
        b.stop().await;
    }
}
