//! The catalog on both engines: listing (internal tables hidden), describing tricky names,
//! foreign-key order, and keyset paging over a composite key.

use dbsync_agent::catalog::{fk_order, keyset_query};
use sqlx::Connection as _;

use crate::support::{TestDb, both_engines, exec};

both_engines!(
    tables_columns_keys_and_parents,
    keyset_pages_cover_a_composite_key_exactly
);

const SCHEMA: &[&str] = &[
    "CREATE TABLE \"UserAccounts\" (\"Id\" BIGINT PRIMARY KEY, \"select\" TEXT NOT NULL, email TEXT)",
    "CREATE TABLE \"Order Items\" (order_id BIGINT NOT NULL, line BIGINT NOT NULL, \
     user_id BIGINT REFERENCES \"UserAccounts\" (\"Id\"), qty INTEGER, PRIMARY KEY (order_id, line))",
    "CREATE TABLE logs (msg TEXT)",
];

async fn tables_columns_keys_and_parents(db: TestDb) {
    exec(
        &db,
        &SCHEMA.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .await;
    let tables = db.store.list_tables().await.unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["Order Items", "UserAccounts", "logs"],
        "no dbsync_* or migration tables"
    );

    let items = tables.iter().find(|t| t.name == "Order Items").unwrap();
    assert_eq!(items.primary_key, ["order_id", "line"]);
    assert_eq!(items.depends_on, ["UserAccounts"]);
    assert_eq!(
        fk_order(&tables).first().map(String::as_str),
        Some("UserAccounts")
    );

    let users = db.store.describe_table("UserAccounts").await.unwrap();
    assert_eq!(users.primary_key, ["Id"]);
    let columns: Vec<(&str, &str, bool)> = users
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.neutral_type.as_str(), c.nullable))
        .collect();
    assert_eq!(
        columns,
        [
            ("Id", "int", false),
            ("select", "text", false),
            ("email", "text", true)
        ]
    );
    assert!(
        db.store
            .describe_table("logs")
            .await
            .unwrap()
            .primary_key
            .is_empty()
    );
    assert!(db.store.describe_table("missing").await.is_err());
    // A table's row estimate is there before anything analyzed it (a progress bar's total).
    let mut rows = vec!["CREATE TABLE counted (id BIGINT PRIMARY KEY, pad TEXT)".to_owned()];
    rows.push(
        "INSERT INTO counted (id, pad) VALUES ".to_owned()
            + &(1..=2000)
                .map(|i| format!("({i}, 'row number {i} with some padding')"))
                .collect::<Vec<_>>()
                .join(", "),
    );
    exec(&db, &rows).await;
    let counted = db.store.list_tables().await.unwrap();
    let estimate = counted
        .iter()
        .find(|t| t.name == "counted")
        .unwrap()
        .estimated_rows;
    assert!((500..=10_000).contains(&estimate), "{estimate}");
    assert!(
        db.store.describe_table("dbsync_connections").await.is_err(),
        "internal tables are invisible"
    );
}

async fn keyset_pages_cover_a_composite_key_exactly(db: TestDb) {
    let mut statements: Vec<String> = SCHEMA.iter().map(|s| (*s).to_owned()).collect();
    statements.push("INSERT INTO \"UserAccounts\" (\"Id\", \"select\") VALUES (1, 'x')".into());
    // 5 orders x 5 lines, inserted out of order.
    for order_id in [3i64, 1, 5, 2, 4] {
        for line in [2i64, 5, 1, 4, 3] {
            statements.push(format!(
                "INSERT INTO \"Order Items\" (order_id, line, user_id, qty) VALUES ({order_id}, {line}, 1, {})",
                order_id * 10 + line
            ));
        }
    }
    exec(&db, &statements).await;

    let key = vec!["order_id".to_owned(), "line".to_owned()];
    let first = keyset_query("Order Items", &key, &key, false).unwrap();
    let next = keyset_query("Order Items", &key, &key, true).unwrap();
    let mut seen: Vec<(i64, i64)> = Vec::new();
    let mut pages = 0;
    loop {
        let page: Vec<(i64, i64)> = if db.url.starts_with("postgres") {
            let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
            match seen.last() {
                None => {
                    sqlx::query_as(sqlx::AssertSqlSafe(first.clone()))
                        .bind(10i64)
                        .fetch_all(&mut conn)
                        .await
                }
                Some((a, b)) => {
                    sqlx::query_as(sqlx::AssertSqlSafe(next.clone()))
                        .bind(a)
                        .bind(b)
                        .bind(10i64)
                        .fetch_all(&mut conn)
                        .await
                }
            }
            .unwrap()
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await.unwrap();
            match seen.last() {
                None => {
                    sqlx::query_as(sqlx::AssertSqlSafe(first.clone()))
                        .bind(10i64)
                        .fetch_all(&mut conn)
                        .await
                }
                Some((a, b)) => {
                    sqlx::query_as(sqlx::AssertSqlSafe(next.clone()))
                        .bind(a)
                        .bind(b)
                        .bind(10i64)
                        .fetch_all(&mut conn)
                        .await
                }
            }
            .unwrap()
        };
        if page.is_empty() {
            break;
        }
        pages += 1;
        seen.extend(page);
    }
    assert_eq!(pages, 3);
    let expected: Vec<(i64, i64)> = (1..=5).flat_map(|o| (1..=5).map(move |l| (o, l))).collect();
    assert_eq!(seen, expected, "every row once, in key order");
}
