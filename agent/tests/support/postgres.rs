//! PostgreSQL for tests: find a server (from `DBSYNC_TEST_PG_URL`, else the local default), and
//! create and drop uniquely named scratch databases. Shared by the engine tests and the
//! end-to-end tests of the binary.

#![allow(dead_code, unreachable_pub)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use sqlx::Connection as _;

/// Where the PostgreSQL tests find a server when `DBSYNC_TEST_PG_URL` is unset.
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The PostgreSQL server URL, or `None` when the tests should be skipped (never under CI).
pub fn postgres_base_url(test: &str) -> Option<String> {
    if let Ok(url) = std::env::var("DBSYNC_TEST_PG_URL") {
        return Some(url);
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if reachable(DEFAULT_PG_URL) {
        return Some(DEFAULT_PG_URL.into());
    }
    if ci {
        panic!(
            "{test}: PostgreSQL is required under CI but {DEFAULT_PG_URL} is unreachable; \
             start it or set DBSYNC_TEST_PG_URL"
        );
    }
    // Written straight to stderr so the test harness does not swallow it.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {test}: no PostgreSQL at {DEFAULT_PG_URL}. \
         Run with DBSYNC_TEST_PG_URL=postgres://user@host:5432/postgres to include it. ***"
    );
    None
}

fn reachable(url: &str) -> bool {
    let Some(rest) = url.split("://").nth(1) else {
        return false;
    };
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = host_port.rsplit('@').next().unwrap_or(host_port);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    addrs
        .iter()
        .any(|addr| TcpStream::connect_timeout(addr, Duration::from_secs(2)).is_ok())
}

/// `base` with its database name replaced by `database`.
pub fn with_database(base: &str, database: &str) -> String {
    let (head, query) = match base.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (base, None),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    let mut url = format!("{}/{}", &head[..path_start], database);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// A scratch PostgreSQL database, dropped by [`PgScratch::drop_database`].
pub struct PgScratch {
    pub base: String,
    pub name: String,
    pub url: String,
}

impl PgScratch {
    pub async fn create(base: &str) -> Self {
        let name = format!("dbsync_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(base)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to PostgreSQL at {base}: {err}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        Self {
            base: base.to_owned(),
            url: with_database(base, &name),
            name,
        }
    }

    pub async fn drop_database(&self) {
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
            admin.close().await.ok();
        }
    }
}

#[test]
fn database_name_replacement() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
        "postgres://u@h:5432/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}
