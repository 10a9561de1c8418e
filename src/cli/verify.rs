//! `dbsync verify`: whether this site holds the sender's rows, moving hashes instead of rows;
//! `--repair` moves only the rows that differ. Exit code 0 only when every table is identical.

use clap::Args;
use dbsync_agent::pull::TransportChoice;
use dbsync_agent::sync::verify::{VerifyEvent, VerifyOptions, VerifySummary};
use indicatif::{ProgressBar, ProgressStyle};

use super::{Context, output};

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Receiver connection id or name
    connection: String,
    /// Tables to verify (comma-separated) [default: every offered table with a primary key]
    #[arg(long, value_delimiter = ',')]
    tables: Vec<String>,
    /// Pull the rows that differ or are missing here (overwrite) and delete the extra ones,
    /// then verify again
    #[arg(long)]
    repair: bool,
    /// Read the sender's download password from stdin
    #[arg(long)]
    password_stdin: bool,
    /// ws, quic, or auto
    #[arg(long, default_value = "auto", value_parser = parse_transport)]
    transport: TransportChoice,
    /// Keep reconnecting after a session breaks off for this long (e.g. 10m; 0 gives up at once)
    #[arg(long, default_value = "2m", value_parser = super::connections::parse_duration)]
    retry_for: chrono::Duration,
}

fn parse_transport(text: &str) -> Result<TransportChoice, String> {
    text.parse()
        .map_err(|err: dbsync_agent::Error| err.to_string())
}

/// A verification found differences (the report is printed; the exit code says it).
#[derive(Debug)]
pub(crate) struct Differs;

impl std::fmt::Display for Differs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the tables differ")
    }
}

impl std::error::Error for Differs {}

pub(crate) async fn run(ctx: &Context, args: VerifyArgs) -> anyhow::Result<()> {
    let password = if args.password_stdin {
        Some(dbsync_protocol::Secret::new(super::read_secret_line(
            "download password",
        )?))
    } else {
        None
    };
    let options = VerifyOptions {
        tables: (!args.tables.is_empty()).then_some(args.tables),
        repair: args.repair,
        password,
        transport: args.transport,
        retry_for: args.retry_for.to_std().unwrap_or_default(),
        page_rows: 0,
        recheck: true,
    };
    let summary = run_with_progress(ctx, &args.connection, &options).await?;
    report(ctx, &summary)?;
    if summary.identical() {
        Ok(())
    } else {
        Err(Differs.into())
    }
}

/// Runs a verification with a progress bar on a terminal.
pub(crate) async fn run_with_progress(
    ctx: &Context,
    connection: &str,
    options: &VerifyOptions,
) -> anyhow::Result<VerifySummary> {
    let terminal = !ctx.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let style = ProgressStyle::with_template(
        "{prefix:>16} [{bar:30}] {percent:>3}% {human_pos}/{human_len} rows compared  eta {eta} {msg}",
    )?
    .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let summary = ctx
        .agent
        .verify(connection, options, |event| match event {
            VerifyEvent::TableStarted {
                table,
                estimated_rows,
            } => {
                if let Some(done) = bar.take() {
                    done.finish();
                }
                if terminal {
                    let next = ProgressBar::new(estimated_rows.max(1));
                    next.set_style(style.clone());
                    next.set_prefix(table);
                    bar = Some(next);
                }
            }
            VerifyEvent::WholeTable => {
                if let Some(bar) = &bar {
                    bar.set_message("(hashing the whole table on both sides)");
                    bar.enable_steady_tick(std::time::Duration::from_millis(250));
                }
            }
            VerifyEvent::Page { rows } => {
                if let Some(bar) = &bar {
                    bar.set_message("");
                    if bar.position() + rows > bar.length().unwrap_or(0) {
                        bar.set_length(bar.position() + rows);
                    }
                    bar.inc(rows);
                }
            }
        })
        .await;
    if let Some(bar) = bar.take() {
        bar.finish();
    }
    Ok(summary?)
}

/// Prints a verification: one line per table, then the first keys of each kind.
pub(crate) fn report(ctx: &Context, summary: &VerifySummary) -> anyhow::Result<()> {
    if ctx.json {
        return output::print_json(&serde_json::json!({
            "identical": summary.identical(),
            "tables": summary.tables,
            "seconds": summary.seconds,
        }));
    }
    let rows = summary
        .tables
        .iter()
        .map(|t| {
            let verdict = match (&t.error, t.identical) {
                (Some(error), _) => format!("not compared: {error}"),
                (None, true) if t.missing_here + t.extra_here + t.different == 0 => {
                    "identical".to_owned()
                }
                (None, true) => "repaired, identical".to_owned(),
                (None, false) => "differs".to_owned(),
            };
            vec![
                t.table.clone(),
                verdict,
                t.rows_there.to_string(),
                t.rows_here.to_string(),
                t.missing_here.to_string(),
                t.extra_here.to_string(),
                t.different.to_string(),
            ]
        })
        .collect();
    output::print_rows(
        &[
            "TABLE",
            "VERDICT",
            "THERE",
            "HERE",
            "MISSING",
            "EXTRA",
            "DIFFERENT",
        ],
        rows,
        "No table to verify.",
    );
    for t in &summary.tables {
        let keys = |list: &[Vec<dbsync_protocol::Value>]| {
            list.iter()
                .map(|k| {
                    k.iter()
                        .map(|v| format!("{v:?}"))
                        .collect::<Vec<_>>()
                        .join(":")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (what, list) in [
            ("missing here", &t.first_missing),
            ("extra here", &t.first_extra),
            ("different", &t.first_different),
        ] {
            if !list.is_empty() {
                println!("{}: {what}: {}", t.table, keys(list));
            }
        }
        if t.since_last {
            println!(
                "{}: only the rows written since the last comparison that left both alike were compared",
                t.table
            );
        }
        if t.repaired_rows > 0 || t.deleted_rows > 0 {
            println!(
                "{}: repaired {} rows, deleted {} extra",
                t.table, t.repaired_rows, t.deleted_rows
            );
        }
    }
    println!("{:.1} s", summary.seconds);
    Ok(())
}
