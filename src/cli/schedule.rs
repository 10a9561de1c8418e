//! `dbsync schedule`: auto-sync of receiver connections (`dbsync serve` runs due jobs).

use clap::Subcommand;
use dbsync_agent::Agent;
use dbsync_agent::connection::PasswordChange;

use super::Context;
use super::output;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Every auto-sync schedule: next run, last result
    List,
    /// Turn auto-sync of a receiver connection on (with tables and interval) or off
    Set {
        /// Receiver connection id or name
        connection: String,
        /// Tables to keep in step (comma-separated; empty: every offered table)
        #[arg(long, value_delimiter = ',')]
        tables: Option<Vec<String>>,
        /// Time between runs (e.g. 15m, 1h)
        #[arg(long, value_parser = super::connections::parse_duration)]
        interval: Option<chrono::Duration>,
        /// Turn auto-sync off
        #[arg(long)]
        disable: bool,
        /// Run each time as a diff pull (verify, then move only the rows that differ and
        /// delete the extra ones) instead of an incremental pull
        #[arg(long, conflicts_with = "incremental")]
        diff: bool,
        /// Back to incremental pulls (the default)
        #[arg(long)]
        incremental: bool,
    },
    /// Run a connection's scheduled sync now, here
    Run {
        /// Receiver connection id or name
        connection: String,
    },
}

pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List => list(ctx).await,
        Command::Set {
            connection,
            tables,
            interval,
            disable,
            diff,
            incremental,
        } => {
            let current = ctx.store.get_connection(&connection).await?;
            if current.direction != dbsync_agent::Direction::Receiver {
                anyhow::bail!(
                    "{} is a sender connection; auto-sync runs on the receiving site",
                    current.name
                );
            }
            let mut settings = current.settings();
            settings.auto_sync_enabled = !disable;
            if let Some(tables) = tables {
                settings.auto_sync_tables = tables;
            }
            if let Some(interval) = interval {
                // Runs are minutes apart: anything shorter, or not whole minutes, is said,
                // not rounded silently.
                if interval.num_minutes() < 1
                    || interval != chrono::Duration::minutes(interval.num_minutes())
                {
                    anyhow::bail!(
                        "invalid interval: runs are whole minutes apart, at least 1 (e.g. 15m, 1h)"
                    );
                }
                settings.auto_sync_interval_minutes = interval.num_minutes();
            }
            let updated = ctx
                .store
                .update_connection_settings(
                    &connection,
                    &settings,
                    PasswordChange::Keep,
                    &ctx.actor,
                    ctx.now(),
                )
                .await?;
            let updated = if diff || incremental {
                ctx.store
                    .merge_connection_metadata(
                        updated.id,
                        serde_json::json!({ "auto_sync_mode": if diff { "diff" } else { "incremental" } }),
                    )
                    .await?
            } else {
                updated
            };
            let mode = dbsync_agent::sync::schedule::mode_of(&updated);
            ctx.store.sync_schedules(ctx.now()).await?;
            if ctx.json {
                return output::print_json(&serde_json::json!({
                    "connection": updated.name,
                    "auto_sync_mode": mode,
                    "auto_sync_enabled": updated.auto_sync_enabled,
                    "auto_sync_tables": updated.auto_sync_tables,
                    "auto_sync_interval_minutes": updated.auto_sync_interval_minutes,
                }));
            }
            if updated.auto_sync_enabled {
                println!(
                    "Auto-sync of {} is on: {} every {} min as {mode} pulls (dbsync serve runs it).",
                    updated.name,
                    output::list(&updated.auto_sync_tables, "every offered table"),
                    updated.auto_sync_interval_minutes
                );
            } else {
                println!("Auto-sync of {} is off.", updated.name);
            }
            Ok(())
        }
        Command::Run { connection } => {
            let outcome = ctx
                .agent
                .run_schedule_now(&connection, &Agent::scheduler_name())
                .await?;
            if ctx.json {
                return output::print_json(&outcome);
            }
            match &outcome.error {
                None => println!(
                    "{}: {} rows moved; next run {}",
                    outcome.connection_name,
                    outcome.rows,
                    output::time(Some(outcome.next_run_at))
                ),
                Some(err) => {
                    anyhow::bail!("{}: scheduled sync failed: {err}", outcome.connection_name)
                }
            }
            Ok(())
        }
    }
}

async fn list(ctx: &Context) -> anyhow::Result<()> {
    ctx.store.sync_schedules(ctx.now()).await?;
    let schedules = ctx.store.list_schedules().await?;
    let mut entries = Vec::new();
    for schedule in schedules {
        let connection = ctx
            .store
            .get_connection(&schedule.connection_id.to_string())
            .await?;
        entries.push((connection, schedule));
    }
    if ctx.json {
        let items: Vec<serde_json::Value> = entries
            .iter()
            .map(|(c, s)| {
                serde_json::json!({
                    "connection": c.name,
                    "tables": c.auto_sync_tables,
                    "interval_minutes": c.auto_sync_interval_minutes,
                    "schedule": s,
                })
            })
            .collect();
        return output::print_json(&items);
    }
    let rows = entries
        .iter()
        .map(|(c, s)| {
            vec![
                c.name.clone(),
                output::list(&c.auto_sync_tables, "all"),
                format!("{} min", c.auto_sync_interval_minutes),
                output::time(Some(s.next_run_at)),
                s.last_status.clone().unwrap_or_else(|| "never run".into()),
                s.last_rows.to_string(),
                s.failures.to_string(),
                s.claimed_by
                    .clone()
                    .map_or_else(String::new, |by| format!("running on {by}")),
            ]
        })
        .collect();
    output::print_rows(
        &[
            "CONNECTION",
            "TABLES",
            "EVERY",
            "NEXT RUN",
            "LAST",
            "ROWS",
            "FAILURES",
            "",
        ],
        rows,
        "No connection has auto-sync; turn it on with `dbsync schedule set <connection>`.",
    );
    Ok(())
}
