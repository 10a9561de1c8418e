//! Test support: a fresh state store per test on SQLite (temp file) or PostgreSQL (a uniquely
//! named database created from `DBSYNC_TEST_PG_URL` and dropped afterwards).

#![allow(dead_code, unreachable_pub)]

mod postgres;

use std::future::Future;

use chrono::{DateTime, TimeZone, Utc};
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConnectionSettings, CreatedConnection, NewConnection};
use dbsync_agent::{ManualClock, Store};
pub use postgres::{PgScratch, postgres_base_url};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// One test's database.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    pub clock: ManualClock,
    pub actor: Actor,
}

impl TestDb {
    pub fn now(&self) -> DateTime<Utc> {
        dbsync_agent::Clock::now(&self.clock)
    }

    /// Creates a sender connection with `settings` and approves it.
    pub async fn active_sender(
        &self,
        name: &str,
        settings: ConnectionSettings,
    ) -> CreatedConnection {
        let created = self
            .store
            .create_sender(
                NewConnection {
                    name: name.into(),
                    site_url: format!("https://{}.example.com", name.replace(' ', "-")),
                    settings,
                },
                &self.actor,
                self.now(),
            )
            .await
            .expect("create sender");
        let connection = self
            .store
            .approve_connection(&created.connection.name, &self.actor, self.now())
            .await
            .expect("approve");
        CreatedConnection {
            connection,
            token: created.token,
        }
    }
}

/// The fixed start of every test clock: a Wednesday, 12:00 UTC.
pub fn start_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
}

/// Runs `body` against a fresh store on `engine`, then removes the database, even when the
/// body panics (the panic is re-raised afterwards).
pub async fn run<F, Fut>(engine: Engine, test: &str, body: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let clock = ManualClock::new(start_time());
    let actor = Actor::cli("tester");
    match engine {
        Engine::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("state.db").display());
            let store = Store::connect(&url).await.expect("connect sqlite");
            let outcome = tokio::spawn(body(TestDb {
                store: store.clone(),
                url,
                clock,
                actor,
            }))
            .await;
            store.close().await;
            drop(dir);
            if let Err(err) = outcome {
                std::panic::resume_unwind(err.into_panic());
            }
        }
        Engine::Postgres => {
            let Some(base) = postgres_base_url(test) else {
                return;
            };
            let scratch = PgScratch::create(&base).await;
            let store = Store::connect(&scratch.url)
                .await
                .expect("connect postgres");
            let outcome = tokio::spawn(body(TestDb {
                store: store.clone(),
                url: scratch.url.clone(),
                clock,
                actor,
            }))
            .await;
            store.close().await;
            scratch.drop_database().await;
            if let Err(err) = outcome {
                std::panic::resume_unwind(err.into_panic());
            }
        }
    }
}

/// Declares each listed `async fn name(db: TestDb)` as two tests, `sqlite::name` and
/// `postgres::name`: the same body on both engines.
macro_rules! both_engines {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::run(
                        $crate::support::Engine::Sqlite,
                        concat!(module_path!(), "::", stringify!($name)),
                        super::$name,
                    )
                    .await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::support::run(
                        $crate::support::Engine::Postgres,
                        concat!(module_path!(), "::", stringify!($name)),
                        super::$name,
                    )
                    .await;
                }
            )+
        }
    };
}
pub(crate) use both_engines;

/// Runs statements on the test database over a connection of its own (setting up tables to
/// sync, as an application would).
pub async fn exec(db: &TestDb, statements: &[String]) {
    db.store
        .execute_batch(statements)
        .await
        .unwrap_or_else(|e| panic!("{statements:?}: {e:?}"));
}

/// A second, empty store on the same engine as `db` (the receiving site of a copy).
pub struct Sibling {
    pub store: Store,
    scratch: Option<PgScratch>,
    _dir: tempfile::TempDir,
}

impl Sibling {
    pub async fn new(db: &TestDb) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if db.url.starts_with("postgres") {
            let base = postgres_base_url("sibling")
                .expect("PostgreSQL is available: the test itself runs on it");
            let scratch = PgScratch::create(&base).await;
            let store = Store::connect(&scratch.url).await.unwrap();
            Self {
                store,
                scratch: Some(scratch),
                _dir: dir,
            }
        } else {
            let url = format!("sqlite://{}", dir.path().join("target.db").display());
            Self {
                store: Store::connect(&url).await.unwrap(),
                scratch: None,
                _dir: dir,
            }
        }
    }

    /// The PostgreSQL URL of this store, when it is on PostgreSQL.
    pub fn postgres_url(&self) -> Option<&str> {
        self.scratch.as_ref().map(|s| s.url.as_str())
    }

    /// A second store on the other engine, or `None` when PostgreSQL tests are skipped.
    pub async fn other_engine(db: &TestDb) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        if db.url.starts_with("postgres") {
            let url = format!("sqlite://{}", dir.path().join("target.db").display());
            Some(Self {
                store: Store::connect(&url).await.unwrap(),
                scratch: None,
                _dir: dir,
            })
        } else {
            let base = postgres_base_url("other engine")?;
            let scratch = PgScratch::create(&base).await;
            let store = Store::connect(&scratch.url).await.unwrap();
            Some(Self {
                store,
                scratch: Some(scratch),
                _dir: dir,
            })
        }
    }

    pub async fn cleanup(self) {
        self.store.close().await;
        if let Some(scratch) = &self.scratch {
            scratch.drop_database().await;
        }
    }
}
