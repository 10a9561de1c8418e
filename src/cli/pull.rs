//! `dbsync pull`: pull tables from the sending site of a receiver connection.

use std::collections::HashMap;

use clap::Args;
use dbsync_agent::connection::ConflictStrategy;
use dbsync_agent::pull::{PullEvent, PullOptions, TransportChoice};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::Context;
use super::output;

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Receiver connection id or name
    #[arg(required_unless_present = "code")]
    connection: Option<String>,
    /// A one-time share code from `dbsync share` on the sending site (with --from): pulls the
    /// shared tables once, with no permanent connection
    #[arg(long, requires = "from", conflicts_with = "connection")]
    code: Option<String>,
    /// The sending site of --code (its site URL)
    #[arg(long, value_name = "URL", requires = "code")]
    from: Option<String>,
    /// Tables to pull (comma-separated)
    #[arg(long, value_delimiter = ',', conflicts_with = "all")]
    tables: Vec<String>,
    /// Pull every table the sender offers (the default when --tables is absent)
    #[arg(long)]
    all: bool,
    /// skip, overwrite, merge, append, mirror (overwrite, then delete the local rows the
    /// sender no longer has) or replace (the whole table, swapped in at the end in one
    /// transaction) [default: the connection's; replace for tables without a primary key]
    #[arg(long, value_parser = parse_strategy)]
    strategy: Option<ConflictStrategy>,
    /// Columns to leave out (comma-separated; key columns cannot be left out)
    #[arg(long, value_delimiter = ',')]
    exclude_columns: Vec<String>,
    /// Read the sender's download password from stdin
    #[arg(long)]
    password_stdin: bool,
    /// Only these keys of one table: a range FROM..TO (both included, either end may be empty)
    /// or a list k1,k2,...; a composite key's values are joined with ':'
    #[arg(long, value_name = "KEYS")]
    where_key: Option<String>,
    /// Move only rows changed since the last incremental pull (by a cursor column, then the key)
    #[arg(long)]
    incremental: bool,
    /// Cursor column of --incremental [default: updated_at, else inserted_at]
    #[arg(long, requires = "incremental")]
    cursor_column: Option<String>,
    /// Row batches the sender may have in flight before this side acknowledges (pipeline depth)
    #[arg(long, default_value_t = dbsync_agent::pull::CREDITS, value_parser = clap::value_parser!(u32).range(1..=i64::from(dbsync_protocol::message::MAX_CREDITS)))]
    pipeline_depth: u32,
    /// ws, quic, or auto (QUIC when the sender offers it and UDP gets through, else WebSocket)
    #[arg(long, default_value = "auto", value_parser = parse_transport)]
    transport: TransportChoice,
    /// Keep reconnecting after a session breaks off for this long (e.g. 10m; 0 gives up at once)
    #[arg(long, default_value = "2m", value_parser = super::connections::parse_duration)]
    retry_for: chrono::Duration,
    /// Give up waiting for the sender's approval after this long (e.g. 10m) [default: wait]
    #[arg(long, value_parser = super::connections::parse_duration)]
    approval_wait: Option<chrono::Duration>,
    /// Create the missing tables (types, sequences, indexes, foreign keys) and move no row
    #[arg(long, conflicts_with_all = ["incremental", "where_key"])]
    schema_only: bool,
    /// Add to existing tables the columns the sender declares and they lack (a changed column
    /// type is refused)
    #[arg(long)]
    add_columns: bool,
    /// Pull each large table over up to N sessions side by side, each a key range the sender
    /// cuts, and small tables up to N at a time (PostgreSQL on both sides, protocol 6; a kill
    /// resumes every range and table where it stopped)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(dbsync_protocol::message::MAX_PARTS)))]
    parallel: u32,
    /// Move only the rows that differ: compare row hashes page by page (protocol 4), pull the
    /// missing and changed rows by key, delete the extra ones, verify again
    #[arg(long, conflicts_with_all = ["incremental", "where_key", "schema_only", "strategy", "exclude_columns", "code"])]
    diff: bool,
}

fn parse_transport(text: &str) -> Result<TransportChoice, String> {
    text.parse()
        .map_err(|err: dbsync_agent::Error| err.to_string())
}

fn parse_strategy(text: &str) -> Result<ConflictStrategy, String> {
    text.parse()
        .map_err(|err: dbsync_agent::Error| err.to_string())
}

pub(crate) async fn run(ctx: &Context, args: PullArgs) -> anyhow::Result<()> {
    let password = if args.password_stdin {
        Some(dbsync_protocol::Secret::new(super::read_secret_line(
            "download password",
        )?))
    } else {
        None
    };
    // A share code becomes a receiver connection holding the share's token (so a broken pull
    // resumes with `dbsync pull <name>`), revoked here once the pull is done.
    let (connection, share) = match (args.connection, args.code, args.from) {
        (Some(connection), None, None) => (connection, None),
        (None, Some(code), Some(from)) => {
            let (held, tables) = ctx.agent.redeem_share(&from, &code, &ctx.actor).await?;
            if !ctx.json {
                eprintln!(
                    "share code accepted: {} ({}) from {from}",
                    held.name,
                    tables.join(", ")
                );
            }
            (held.name.clone(), Some(held))
        }
        _ => anyhow::bail!("name a connection, or give --code and --from"),
    };
    if args.diff {
        let options = dbsync_agent::sync::verify::VerifyOptions {
            tables: (!args.tables.is_empty()).then_some(args.tables),
            repair: true,
            password,
            transport: args.transport,
            retry_for: args.retry_for.to_std().unwrap_or_default(),
            page_rows: 0,
            recheck: false,
        };
        let summary = super::verify::run_with_progress(ctx, &connection, &options).await?;
        super::verify::report(ctx, &summary)?;
        return if summary.identical() {
            Ok(())
        } else {
            Err(super::Differs.into())
        };
    }
    let options = PullOptions {
        tables: (!args.tables.is_empty()).then_some(args.tables),
        strategy: args.strategy,
        exclude_columns: args.exclude_columns,
        password,
        approval_wait: args.approval_wait.and_then(|d| d.to_std().ok()),
        where_key: args.where_key,
        key_list: None,
        transport: args.transport,
        incremental: args.incremental,
        cursor_column: args.cursor_column,
        scheduled: false,
        schema_only: args.schema_only,
        add_columns: args.add_columns,
        parallel: args.parallel as usize,
        credits: Some(args.pipeline_depth),
        retry_for: args.retry_for.to_std().unwrap_or_default(),
    };
    let json = ctx.json;
    // A progress bar on a terminal; plain lines otherwise; nothing with --json.
    let terminal = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The total is the sender's estimate (grown only if the table holds more); the rate is
    // whole rows a second.
    let style = ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {percent:>3}% {human_pos}/{human_len} rows  {msg}  eta {eta}",
    )?
    .progress_chars("=> ");
    // One bar per table in flight (several when small tables go side by side), with the wire
    // bytes it took.
    let bars = MultiProgress::new();
    let mut in_flight: HashMap<String, (ProgressBar, i64)> = HashMap::new();
    let summary = ctx
        .agent
        .pull(&connection, &options, |event| {
            if json {
                return;
            }
            match event {
                PullEvent::TableStarted {
                    table,
                    estimated_rows,
                } => {
                    if terminal {
                        in_flight.entry(table.clone()).or_insert_with(|| {
                            let bar = bars.add(ProgressBar::new(estimated_rows.max(1)));
                            bar.set_style(style.clone());
                            bar.set_prefix(table);
                            (bar, 0)
                        });
                    } else {
                        eprintln!("pulling {table} (about {estimated_rows} rows)");
                    }
                }
                PullEvent::TableDone { table } => {
                    if let Some((bar, _)) = in_flight.remove(&table) {
                        bar.finish();
                    }
                }
                PullEvent::TableSkipped { table, reason } => {
                    if let Some((bar, _)) = in_flight.remove(&table) {
                        bar.finish_and_clear();
                    }
                    let line = format!("skipped {table}: {reason}");
                    if terminal {
                        let _ = bars.println(line);
                    } else {
                        eprintln!("{line}");
                    }
                }
                PullEvent::WaitingForApproval { table, transfer_id } => {
                    let line = format!(
                        "{table}: waiting for the sender's admin to approve transfer {transfer_id}"
                    );
                    match in_flight.get(&table) {
                        Some((bar, _)) => bar.set_message(line),
                        None => eprintln!("{line}"),
                    }
                }
                PullEvent::Batch {
                    table,
                    rows,
                    bytes_wire,
                } => {
                    if let Some((bar, wire)) = in_flight.get_mut(&table) {
                        *wire += bytes_wire;
                        let rows = u64::try_from(rows).unwrap_or(0);
                        if bar.position() + rows > bar.length().unwrap_or(0) {
                            bar.set_length(bar.position() + rows);
                        }
                        bar.inc(rows);
                        let rate = bar.per_sec();
                        bar.set_message(format!(
                            "{} wire  {} rows/s",
                            output::bytes(*wire),
                            rate.round() as u64
                        ));
                    }
                }
            }
        })
        .await;
    for (_, (bar, _)) in in_flight.drain() {
        if summary.is_ok() {
            bar.finish();
        } else {
            bar.abandon();
        }
    }
    let summary = match (summary, &share) {
        (Ok(summary), _) => summary,
        (Err(err), Some(held)) => {
            return Err(anyhow::Error::new(err).context(format!(
                "the share's pull stopped; run `dbsync pull {}` to resume it before the share expires",
                held.name
            )));
        }
        (Err(err), None) => return Err(err.into()),
    };
    // A share's connection (this run's, or one a broken run left to resume) is done with.
    let pulled = ctx.store.get_connection(&connection).await?;
    if pulled.metadata.pointer("/share/code_id").is_some() && summary.skipped.is_empty() {
        ctx.agent.finish_share(&pulled, &ctx.actor).await?;
    }
    if json {
        return output::print_json(&summary);
    }
    let rows = summary
        .tables
        .iter()
        .map(|t| {
            vec![
                t.table.clone(),
                t.rows.to_string(),
                t.created.to_string(),
                t.updated.to_string(),
                t.skipped.to_string(),
                t.deleted.to_string(),
                output::bytes(t.bytes_wire),
                if t.parts > 0 {
                    format!("{}, {} ranges", t.transport, t.parts)
                } else if t.reconnects > 0 {
                    format!("{}, {} reconnects", t.transport, t.reconnects)
                } else if t.resumed {
                    format!("{}, resumed", t.transport)
                } else if t.truncated {
                    format!("{}, truncated", t.transport)
                } else {
                    t.transport.clone()
                },
            ]
        })
        .collect();
    output::print_rows(
        &[
            "TABLE", "ROWS", "CREATED", "UPDATED", "SKIPPED", "DELETED", "WIRE", "",
        ],
        rows,
        "Nothing to pull.",
    );
    let total: i64 = summary.tables.iter().map(|t| t.rows).sum();
    println!("{total} rows in {:.1} s", summary.seconds);
    for warning in &summary.warnings {
        println!("warning: {warning}");
    }
    for skipped in &summary.skipped {
        println!(
            "skipped {} ({}): {}",
            skipped.table, skipped.code, skipped.reason
        );
    }
    Ok(())
}
