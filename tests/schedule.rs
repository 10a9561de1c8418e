//! The auto-sync scheduler with its clock set, not slept: a job runs when due and not before,
//! not twice after a restart, backs off after failures, keeps a mirror copy converging through
//! inserts, updates and deletes, and two schedulers on one PostgreSQL state database never run
//! the same job.

use std::sync::Arc;

use chrono::{Duration, Utc};
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConflictStrategy, ConnectionSettings, PasswordChange};
use dbsync_agent::transfer::{TransferDirection, TransferFilter};
use dbsync_agent::{Agent, ManualClock};

use crate::pull::{exec, pair_with, rows};
use crate::support::agents::{Options, RunningAgent, start};

fn admin() -> Actor {
    Actor::admin("tester")
}

/// Sender A (system clock) and receiver B on a manual clock, with auto-sync of `accounts` every
/// 10 minutes on B's connection.
async fn scheduled_pair(
    test: &str,
    postgres: bool,
    strategy: ConflictStrategy,
) -> Option<(RunningAgent, RunningAgent, ManualClock, String)> {
    let clock = ManualClock::new(Utc::now());
    let (a, b, name) = pair_with(
        test,
        Options {
            postgres,
            ..Options::default()
        },
        Options {
            postgres,
            clock: Some(Arc::new(clock.clone())),
            ..Options::default()
        },
        ConnectionSettings::default(),
    )
    .await?;
    let receiver = b.agent.store.get_connection(&name).await.unwrap();
    let mut settings = receiver.settings();
    settings.auto_sync_enabled = true;
    settings.auto_sync_tables = vec!["accounts".into()];
    settings.auto_sync_interval_minutes = 10;
    settings.default_conflict_strategy = strategy;
    b.agent
        .store
        .update_connection_settings(
            &receiver.name,
            &settings,
            PasswordChange::Keep,
            &admin(),
            b.agent.now(),
        )
        .await
        .unwrap();
    let ts = if postgres { "TIMESTAMPTZ" } else { "TEXT" };
    exec(
        &a,
        &[
            format!("CREATE TABLE accounts (id BIGINT PRIMARY KEY, name TEXT NOT NULL, updated_at {ts} NOT NULL)"),
            "INSERT INTO accounts VALUES (1, 'one', '2024-01-01 00:00:01+00'), (2, 'two', '2024-01-01 00:00:02+00'), (3, 'three', '2024-01-01 00:00:03+00')".into(),
        ],
    )
    .await;
    Some((a, b, clock, receiver.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_when_due_not_before_and_not_twice_after_a_restart() {
    let Some((a, b, clock, _)) =
        scheduled_pair("schedule::due", false, ConflictStrategy::Overwrite).await
    else {
        return;
    };
    let first = b.agent.run_due_jobs("b-1").await.unwrap();
    assert_eq!(first.len(), 1, "a new schedule is due at once");
    assert_eq!((first[0].status.as_str(), first[0].rows), ("completed", 3));
    let metrics = b.agent.metrics.render(&b.agent.store).await.unwrap();
    assert!(
        metrics.contains("dbsync_scheduler_lag_seconds_count 1")
            && metrics.contains("dbsync_scheduler_runs_total{status=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(b.agent.run_due_jobs("b-1").await.unwrap().is_empty());
    clock.advance(Duration::minutes(9));
    assert!(
        b.agent.run_due_jobs("b-1").await.unwrap().is_empty(),
        "not before it is due"
    );

    // A restart: a new agent on the same state database and clock finds nothing due either.
    let restarted = Agent::with_store(
        b.agent.store.clone(),
        b.agent.config.clone(),
        Arc::new(clock.clone()),
    )
    .unwrap();
    assert!(restarted.run_due_jobs("b-2").await.unwrap().is_empty());

    // Past the interval and its jitter (at most a tenth): it runs once.
    clock.advance(Duration::minutes(2));
    let second = restarted.run_due_jobs("b-2").await.unwrap();
    assert_eq!(second.len(), 1);
    assert!(
        b.agent.run_due_jobs("b-1").await.unwrap().is_empty(),
        "and not twice"
    );
    let schedules = b.agent.store.list_schedules().await.unwrap();
    assert_eq!(schedules[0].runs, 2);
    assert!(schedules[0].next_run_at > clock_now(&clock) + Duration::minutes(9));

    // The history shows the scheduled runs, as `system`, and the rows each moved.
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
            .all(|t| t.metadata["scheduled"] == true)
    );
    let moved: Vec<i64> = received
        .items
        .iter()
        .map(|t| t.records_transferred)
        .collect();
    assert!(moved.contains(&3) && moved.contains(&0), "{moved:?}");
    a.stop().await;
    b.stop().await;
}

fn clock_now(clock: &ManualClock) -> chrono::DateTime<Utc> {
    use dbsync_agent::Clock;
    clock.now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_backs_off() {
    let Some((mut a, b, clock, _)) =
        scheduled_pair("schedule::backoff", false, ConflictStrategy::Overwrite).await
    else {
        return;
    };
    a.pause().await; // the sender is away
    let failed = b.agent.run_due_jobs("b").await.unwrap();
    assert_eq!(failed[0].status, "failed");
    assert_eq!(
        failed[0].next_run_at,
        clock_now(&clock) + Duration::minutes(1)
    );
    clock.advance(Duration::seconds(30));
    assert!(b.agent.run_due_jobs("b").await.unwrap().is_empty());
    clock.advance(Duration::seconds(31));
    let again = b.agent.run_due_jobs("b").await.unwrap();
    assert_eq!(again[0].status, "failed");
    assert_eq!(
        again[0].next_run_at,
        clock_now(&clock) + Duration::minutes(2),
        "doubled"
    );
    assert_eq!(b.agent.store.list_schedules().await.unwrap()[0].failures, 2);

    // Back again: the next run succeeds and the failures are forgotten.
    a.resume().await;
    clock.advance(Duration::minutes(2));
    let ok = b.agent.run_due_jobs("b").await.unwrap();
    assert_eq!(ok[0].status, "completed");
    assert_eq!(b.agent.store.list_schedules().await.unwrap()[0].failures, 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_copy_converges_through_inserts_updates_and_deletes() {
    for postgres in [false, true] {
        let Some((a, b, clock, _)) =
            scheduled_pair("schedule::converge", postgres, ConflictStrategy::Mirror).await
        else {
            return;
        };
        let steps = [
            "INSERT INTO accounts VALUES (4, 'four', '2024-02-01 00:00:00+00'), (5, 'five', '2024-02-01 00:00:01+00')",
            "UPDATE accounts SET name = 'ONE', updated_at = '2024-03-01 00:00:00+00' WHERE id = 1",
            "DELETE FROM accounts WHERE id IN (2, 4)",
        ];
        for step in [None].into_iter().chain(steps.iter().map(Some)) {
            if let Some(sql) = step {
                exec(&a, &[(*sql).to_owned()]).await;
            }
            let outcomes = b.agent.run_due_jobs("b").await.unwrap();
            assert_eq!(outcomes.len(), 1, "{step:?}");
            assert_eq!(outcomes[0].status, "completed", "{:?}", outcomes[0].error);
            assert_eq!(
                rows(&a.agent.store, "accounts").await,
                rows(&b.agent.store, "accounts").await,
                "after {step:?}"
            );
            clock.advance(Duration::minutes(11));
        }
        a.stop().await;
        b.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_postgres_database_never_run_the_same_job() {
    let Some((a, b, clock, _)) =
        scheduled_pair("schedule::shared", true, ConflictStrategy::Overwrite).await
    else {
        return;
    };
    // A second agent on the same PostgreSQL state database and clock.
    let twin = start(
        "schedule::shared",
        Options {
            database_url: Some(b.database_url.clone()),
            key_file: Some(b.key_file.clone()),
            clock: Some(Arc::new(clock.clone())),
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let mut total = 0;
    for _ in 0..4 {
        let (left, right) = tokio::join!(
            b.agent.run_due_jobs("scheduler-b"),
            twin.agent.run_due_jobs("scheduler-twin")
        );
        let outcomes: Vec<_> = left.unwrap().into_iter().chain(right.unwrap()).collect();
        let ran = outcomes.len();
        assert_eq!(ran, 1, "exactly one of them runs the due job");
        assert_eq!(outcomes[0].status, "completed", "{:?}", outcomes[0].error);
        total += ran;
        clock.advance(Duration::minutes(11));
    }
    assert_eq!(total, 4);
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
    twin.pause_only().await;
    a.stop().await;
    b.stop().await;
}

/// A running schedule's claim is renewed by its owner only.
#[tokio::test]
async fn a_claim_is_renewed_by_its_owner_only() {
    let Some((a, b, clock, _)) =
        scheduled_pair("schedule::renew", false, ConflictStrategy::Overwrite).await
    else {
        return;
    };
    let store = &b.agent.store;
    store.sync_schedules(clock_now(&clock)).await.unwrap();
    let now = clock_now(&clock);
    let claimed = store
        .claim_schedule("runner", now, now + Duration::minutes(60), None)
        .await
        .unwrap()
        .expect("a new schedule is due");
    let later = now + Duration::minutes(90);
    assert!(
        store
            .renew_schedule_claim(claimed.connection_id, "runner", later)
            .await
            .unwrap()
    );
    assert!(
        !store
            .renew_schedule_claim(claimed.connection_id, "intruder", later)
            .await
            .unwrap()
    );
    // Past the first lease but inside the renewed one, nobody else can claim it.
    let inside = now + Duration::minutes(75);
    assert!(
        store
            .claim_schedule("other", inside, inside + Duration::minutes(60), None)
            .await
            .unwrap()
            .is_none()
    );
    a.stop().await;
    b.stop().await;
}
