//! `dbsync demo`: two agents in this process on SQLite files in a temporary directory. Site A is
//! seeded with a small shop (customers, products, orders, order lines), registers a connection
//! with site B, B pulls everything over WebSocket, and the demo checks that both sides hold the
//! same rows, value by value.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use clap::Args;
use dbsync_admin::{AppState, server};
use dbsync_agent::audit::Actor;
use dbsync_agent::connection::{ConnectionSettings, NewConnection};
use dbsync_agent::pull::PullOptions;
use dbsync_agent::registration::RegistrationOutcome;
use dbsync_agent::settings::IncomingMode;
use dbsync_agent::transfer::{TransferDirection, TransferFilter};
use dbsync_agent::{Agent, Config, Store, SystemClock};
use dbsync_protocol::Value;
use tokio::net::TcpListener;

use super::output;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Orders to generate (customers, products and order lines scale with it)
    #[arg(long, default_value_t = 10_000)]
    orders: i64,
    /// Keep the demo databases in this directory instead of a temporary one
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

const TABLES: [&str; 4] = ["customers", "products", "orders", "order_items"];

fn seed(orders: i64) -> Vec<String> {
    let customers = (orders / 4).max(10);
    let products = (orders / 20).max(10);
    let mut statements = vec![
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, \
         vip BOOLEAN NOT NULL, balance NUMERIC, signed_up DATETIME NOT NULL)"
            .to_owned(),
        "CREATE TABLE products (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, title TEXT NOT NULL, \
         price REAL NOT NULL, thumbnail BLOB)"
            .to_owned(),
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers (id), \
         placed_at DATETIME NOT NULL, status TEXT NOT NULL, total NUMERIC NOT NULL, note TEXT)"
            .to_owned(),
        "CREATE TABLE order_items (order_id INTEGER NOT NULL REFERENCES orders (id), line INTEGER NOT NULL, \
         product_id INTEGER NOT NULL REFERENCES products (id), qty INTEGER NOT NULL, PRIMARY KEY (order_id, line))"
            .to_owned(),
    ];
    let mut push_rows = |table: &str, rows: Vec<String>| {
        for chunk in rows.chunks(500) {
            statements.push(format!("INSERT INTO {table} VALUES {}", chunk.join(", ")));
        }
    };
    push_rows(
        "customers",
        (1..=customers)
            .map(|i| {
                format!(
                    "({i}, 'Customer {i} Ñoño', 'c{i}@example.com', {}, '{}.{:02}', '2026-{:02}-{:02} {:02}:{:02}:00')",
                    i % 7 == 0,
                    (i * 37) % 5000,
                    i % 100,
                    i % 12 + 1,
                    i % 28 + 1,
                    i % 24,
                    i % 60
                )
            })
            .collect(),
    );
    push_rows(
        "products",
        (1..=products)
            .map(|i| {
                let thumbnail = if i % 3 == 0 {
                    "NULL".to_owned()
                } else {
                    format!("X'{:08x}00ff'", i * 2_654_435_761 % 4_294_967_296)
                };
                format!(
                    "({i}, 'SKU-{i:05}', 'Product \"{i}\"', {}.{:02}, {thumbnail})",
                    i % 500 + 1,
                    (i * 13) % 100
                )
            })
            .collect(),
    );
    push_rows(
        "orders",
        (1..=orders)
            .map(|i| {
                let note = if i % 5 == 0 {
                    format!("'gift, wrap it ''nicely'' #{i}'")
                } else {
                    "NULL".into()
                };
                format!(
                    "({i}, {}, '2026-{:02}-{:02} 12:{:02}:{:02}', '{}', '{}.{:02}', {note})",
                    i % customers + 1,
                    i % 12 + 1,
                    i % 28 + 1,
                    i % 60,
                    (i * 7) % 60,
                    ["new", "paid", "shipped", "delivered"][(i % 4) as usize],
                    (i * 17) % 900 + 10,
                    i % 100
                )
            })
            .collect(),
    );
    push_rows(
        "order_items",
        (1..=orders)
            .flat_map(|o| {
                (1..=(o % 4 + 1)).map(move |line| {
                    format!("({o}, {line}, {}, {})", (o * line) % products + 1, line * 2)
                })
            })
            .collect(),
    );
    statements
}

/// Context of a failed QUIC bind (retried on another port).
const BIND_QUIC: &str = "binding the QUIC endpoint";

async fn start_site(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Arc<Agent>, String, tokio::sync::oneshot::Sender<()>)> {
    // QUIC listens on UDP at the TCP listener's port; another program may hold that UDP port,
    // so a few fresh ports are tried.
    for attempt in 1.. {
        match start_site_once(dir, name).await {
            Err(err) if attempt < 5 && err.to_string() == BIND_QUIC => continue,
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

async fn start_site_once(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Arc<Agent>, String, tokio::sync::oneshot::Sender<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = Config {
        database_url: Some(format!(
            "sqlite://{}",
            dir.join(format!("{name}.db")).display()
        )),
        key_file: Some(dir.join(format!("{name}.key"))),
        allow_private_peers: true,
        ..Config::default()
    };
    config.server.listen = addr;
    let store = Store::connect(config.database_url()).await?;
    let agent = Arc::new(Agent::with_store(store, config, Arc::new(SystemClock))?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::new(Arc::clone(&agent));
    let quic = server::bind_quic(&state).await.context(BIND_QUIC)?;
    tokio::spawn(async move {
        let _ = server::serve_site(listener, state, quic, async {
            let _ = stopped.await;
        })
        .await;
    });
    Ok((agent, format!("http://{addr}"), stop))
}

async fn all_rows(store: &Store, table: &str) -> anyhow::Result<Vec<Vec<Value>>> {
    let schema = store.describe_table(table).await?;
    let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    let mut rows = Vec::new();
    let mut after: Option<Vec<Value>> = None;
    loop {
        let page = store
            .read_page(&schema, &columns, after.as_deref(), 10_000)
            .await?;
        if page.rows.is_empty() {
            return Ok(rows);
        }
        after = page.last_key;
        rows.extend(page.rows);
    }
}

pub(crate) async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(args.orders > 0, "--orders must be positive");
    let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            anyhow::ensure!(
                std::fs::read_dir(dir)?.next().is_none(),
                "{} is not empty",
                dir.display()
            );
            dir.clone()
        }
        None => temp.path().to_owned(),
    };
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let (a, a_url, stop_a) = start_site(&dir, "site-a").await?;
    let (b, b_url, stop_b) = start_site(&dir, "site-b").await?;
    say(format!(
        "site A (sender)   {a_url}   {}",
        dir.join("site-a.db").display()
    ));
    say(format!(
        "site B (receiver) {b_url}   {}",
        dir.join("site-b.db").display()
    ));

    let seeding = Instant::now();
    a.store
        .execute_batch(&seed(args.orders))
        .await
        .context("seeding site A")?;
    say(format!(
        "seeded site A with a shop of {} orders in {:.1} s",
        args.orders,
        seeding.elapsed().as_secs_f64()
    ));

    let actor = Actor::cli("demo");
    b.store
        .set_incoming(IncomingMode::AutoAccept, None, &actor, b.now())
        .await?;
    let created = a
        .create_sender(
            NewConnection {
                name: "demo: A to B".into(),
                site_url: b_url.clone(),
                settings: ConnectionSettings::default(),
            },
            None,
            &actor,
        )
        .await?;
    if !matches!(&created.registration, RegistrationOutcome::Accepted { remote_status, .. } if remote_status == "active")
    {
        bail!(
            "registration with site B failed: {:?}",
            created.registration
        );
    }
    say(format!(
        "registered connection {:?} on both sites (auto_accept)",
        created.connection.name
    ));
    let receiver = b
        .store
        .list_connections(&Default::default())
        .await?
        .into_iter()
        .next()
        .context("site B holds no connection")?;

    let pulling = Instant::now();
    let summary = b
        .pull(&receiver.name, &PullOptions::default(), |_| {})
        .await
        .context("pull")?;
    let seconds = pulling.elapsed().as_secs_f64();

    let mut mismatches = Vec::new();
    for table in TABLES {
        let source = all_rows(&a.store, table).await?;
        let target = all_rows(&b.store, table).await?;
        if source != target {
            mismatches.push(format!(
                "{table}: {} rows on A, {} on B, contents differ",
                source.len(),
                target.len()
            ));
        }
    }
    let sent = a
        .store
        .list_transfers(&TransferFilter {
            direction: Some(TransferDirection::Send),
            per_page: Some(100),
            ..Default::default()
        })
        .await?;
    let wire: i64 = sent.items.iter().map(|t| t.bytes_wire).sum();
    let raw: i64 = sent.items.iter().map(|t| t.bytes_raw).sum();
    let rows: i64 = summary.tables.iter().map(|t| t.rows).sum();
    let identical = mismatches.is_empty();
    if json {
        output::print_json(&serde_json::json!({
            "identical": identical, "mismatches": mismatches, "tables": summary.tables,
            "rows": rows, "bytes_raw": raw, "bytes_wire": wire, "seconds": seconds,
            "rows_per_second": rows as f64 / seconds.max(1e-9),
        }))?;
    } else {
        let table_rows = summary
            .tables
            .iter()
            .map(|t| {
                vec![
                    t.table.clone(),
                    t.rows.to_string(),
                    output::bytes(t.bytes_wire),
                ]
            })
            .collect();
        println!();
        output::print_rows(
            &["TABLE (FK order)", "ROWS", "WIRE"],
            table_rows,
            "no tables",
        );
        let mut line = String::new();
        let _ = write!(
            line,
            "{rows} rows in {seconds:.2} s ({:.0} rows/s); {} raw MessagePack became {} on the wire ({:.1}x smaller)",
            rows as f64 / seconds.max(1e-9),
            output::bytes(raw),
            output::bytes(wire),
            raw as f64 / (wire.max(1) as f64)
        );
        println!("{line}");
        if identical {
            println!("both sites hold identical data, value by value: OK");
        }
    }
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    a.store.close().await;
    b.store.close().await;
    if !identical {
        bail!("the copy differs: {}", mismatches.join("; "));
    }
    Ok(())
}
