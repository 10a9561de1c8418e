//! The state store: one sqlx pool on PostgreSQL or SQLite, chosen by the database URL.
//!
//! Queries are written once in the SQL both engines accept (`$1` placeholders, `RETURNING`,
//! `ON CONFLICT`, `CAST(... AS BIGINT)`) and run on either pool through [`on_pool!`]; the schema
//! differs only in column types (see `migrations/`).

pub mod admin_token;
pub mod audit;
pub mod site_identity;
pub mod web_session;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool, SqlitePool};

use crate::error::{Error, Result};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/sqlite");

/// Which database engine holds the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL (production).
    Postgres,
    /// SQLite (embedded default).
    Sqlite,
}

impl Engine {
    /// The engine a URL names, or a clear error for anything else.
    pub fn from_url(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err(Error::Config(
                "database URL must start with postgres://, postgresql:// or sqlite:".into(),
            ))
        }
    }
}

/// The SQLite file a `sqlite:` URL points at, if any.
pub(crate) fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
}

#[derive(Debug, Clone)]
pub(crate) enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the concrete pool, so one query text serves both engines.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store.pool() {
            $crate::store::Pool::Postgres($pool) => $body,
            $crate::store::Pool::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// `current` with the top-level keys of `patch` set (a non-object `current` starts empty).
pub(crate) fn merge_json_object(
    current: serde_json::Value,
    patch: serde_json::Value,
) -> serde_json::Value {
    let mut merged = match current {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    if let serde_json::Value::Object(patch) = patch {
        merged.extend(patch);
    }
    serde_json::Value::Object(merged)
}

/// Handle to the state database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// Tables whose last batch met keys it already held: the sink goes straight to its
    /// `ON CONFLICT` statement for them (see `sink::insert_columns`).
    pub(crate) conflicting: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Target tables as described for the current pull (emptied for a table by
    /// [`Store::ensure_table`], filled by its first batch), so each batch does not ask the
    /// catalog again for the column types.
    pub(crate) described: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<String, dbsync_protocol::message::TableSchema>>,
    >,
    /// Whether a background WAL checkpoint is running (SQLite; see [`Store::checkpoint_wal`]).
    checkpointing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `options` without TLS when `url` names a server on this machine (a loopback address,
/// `localhost`, or a Unix socket) and neither the URL nor `PGSSLMODE` chooses an sslmode.
fn plain_loopback(url: &str, options: &PgConnectOptions) -> Option<PgConnectOptions> {
    let chosen = url.contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    let host = options.get_host();
    let loopback = host == "localhost"
        || host.starts_with('/')
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!chosen && loopback).then(|| options.clone().ssl_mode(PgSslMode::Disable))
}

impl Store {
    /// SQLite: copies the write-ahead log into the database file on another connection, in
    /// the background, unless a copy is already running. A bulk load calls this after each
    /// batch commit, so the copying (and its fsync) runs beside the next batch instead of
    /// inside a commit: SQLite's own automatic checkpoint, which stays on as the safety net,
    /// then finds little or nothing left to copy. PASSIVE never waits for readers or writers.
    pub(crate) fn checkpoint_wal(&self) {
        use std::sync::atomic::Ordering;
        let Pool::Sqlite(pool) = &self.pool else {
            return;
        };
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, running) = (pool.clone(), self.checkpointing.clone());
        tokio::spawn(async move {
            if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(error = %err, "background WAL checkpoint failed");
            }
            running.store(false, Ordering::Release);
        });
    }

    /// Connects to `url` and applies pending migrations (a no-op when there are none). A SQLite
    /// file is created if missing.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = match Engine::from_url(url)? {
            Engine::Postgres => {
                // A range hash or a large page may take seconds by design: sqlx's note of a
                // slow statement (its text, at `warn` by default) goes to debug logs only.
                let options = PgConnectOptions::from_str(url)?
                    .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
                let pool_options = || {
                    PgPoolOptions::new()
                        .max_connections(16)
                        .acquire_timeout(Duration::from_secs(30))
                        .after_connect(|conn, _| Box::pin(crate::nodelay::disable_nagle(conn)))
                };
                // TLS to a server on this machine protects nothing, and with sqlx 0.9 each TLS
                // handshake also waits out delayed ACKs (its sockets have no TCP_NODELAY until
                // `nodelay` sets it, after the handshake): ~90 ms a connection. So a loopback URL
                // that does not choose an sslmode connects in plain text first, and as written
                // when the server refuses that (a `hostssl`-only pg_hba.conf).
                let pool = match plain_loopback(url, &options) {
                    Some(plain) => match pool_options().connect_with(plain).await {
                        Ok(pool) => pool,
                        Err(_) => pool_options().connect_with(options).await?,
                    },
                    None => pool_options().connect_with(options).await?,
                };
                POSTGRES_MIGRATIONS.run(&pool).await?;
                Pool::Postgres(pool)
            }
            Engine::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .page_size(16384)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(30))
                    // sqlx hands rows from SQLite's worker thread over a channel of 50 by
                    // default: a 5,000-row page then costs thousands of thread wake-ups.
                    .row_buffer_size(1024)
                    .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(30))
                    // A file does not go stale like a server connection: no ping (a round trip
                    // to the connection's worker thread) before each use.
                    .test_before_acquire(false)
                    .connect_with(options)
                    .await?;
                SQLITE_MIGRATIONS.run(&pool).await?;
                Pool::Sqlite(pool)
            }
        };
        let store = Self {
            pool,
            conflicting: std::sync::Arc::default(),
            described: std::sync::Arc::default(),
            checkpointing: std::sync::Arc::default(),
        };
        store.ensure_settings_row().await?;
        Ok(store)
    }

    /// The engine behind this store.
    pub fn engine(&self) -> Engine {
        match self.pool {
            Pool::Postgres(_) => Engine::Postgres,
            Pool::Sqlite(_) => Engine::Sqlite,
        }
    }

    /// "postgres" or "sqlite".
    pub fn engine_name(&self) -> &'static str {
        match self.engine() {
            Engine::Postgres => "postgres",
            Engine::Sqlite => "sqlite",
        }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Applies migrations again; returns how many were newly applied (0 on an up-to-date store).
    pub async fn migrate(&self) -> Result<usize> {
        let before = self.applied_migrations().await?;
        match &self.pool {
            Pool::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
            Pool::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(self.applied_migrations().await? - before)
    }

    /// Transfers in the history by status (status, count).
    pub async fn transfer_status_counts(&self) -> Result<Vec<(String, i64)>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT status, COUNT(*) FROM dbsync_transfers GROUP BY status")
                .fetch_all(pool)
                .await?
        }))
    }

    /// The state database pool's connections: (open, idle).
    pub fn pool_usage(&self) -> (u32, u32) {
        let idle = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        match &self.pool {
            Pool::Postgres(pool) => (pool.size(), idle(pool.num_idle())),
            Pool::Sqlite(pool) => (pool.size(), idle(pool.num_idle())),
        }
    }

    /// Whether the state database answers (`SELECT 1`): what `/readyz` reports.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(pool)
                .await?
        });
        Ok(())
    }

    async fn applied_migrations(&self) -> Result<usize> {
        let count: i64 = on_pool!(self, |pool| {
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
                .fetch_one(pool)
                .await?
        });
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Runs statements in one transaction: for seeding demo data and test fixtures, never with
    /// input from a peer.
    pub async fn execute_batch(&self, statements: &[String]) -> Result<()> {
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            for statement in statements {
                sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Closes every pooled connection.
    pub async fn close(&self) {
        match &self.pool {
            Pool::Postgres(pool) => pool.close().await,
            Pool::Sqlite(pool) => pool.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_from_url() {
        assert_eq!(
            Engine::from_url("postgres://x/y").unwrap(),
            Engine::Postgres
        );
        assert_eq!(Engine::from_url("sqlite://a.db").unwrap(), Engine::Sqlite);
        assert!(Engine::from_url("mysql://x").is_err());
    }

    #[test]
    fn sqlite_file_paths() {
        assert_eq!(sqlite_file("sqlite://a.db"), Some(PathBuf::from("a.db")));
        assert_eq!(
            sqlite_file("sqlite:///tmp/a.db?mode=rwc"),
            Some(PathBuf::from("/tmp/a.db"))
        );
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("postgres://x"), None);
    }

    #[test]
    fn loopback_urls_without_an_sslmode_skip_tls() {
        let plain = |url: &str| {
            let options = PgConnectOptions::from_str(url).unwrap();
            plain_loopback(url, &options).map(|o| o.get_ssl_mode())
        };
        if std::env::var_os("PGSSLMODE").is_some() {
            return;
        }
        for url in [
            "postgres://u@127.0.0.1/db",
            "postgres://u@localhost:5433/db",
            "postgres://u@[::1]/db",
            "postgres://u@127.0.0.2/db",
        ] {
            assert!(matches!(plain(url), Some(PgSslMode::Disable)), "{url}");
        }
        assert!(plain("postgres://u@db.example.com/db").is_none());
        assert!(plain("postgres://u@10.0.0.5/db").is_none());
        assert!(plain("postgres://u@127.0.0.1/db?sslmode=require").is_none());
    }
}
