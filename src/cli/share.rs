//! `dbsync share`: a one-time code for pulling some tables once, with no permanent connection.

use clap::Args;

use super::{Context, output};

#[derive(Debug, Args)]
pub(crate) struct ShareArgs {
    /// Tables to share (comma-separated)
    #[arg(long, value_delimiter = ',', required = true)]
    tables: Vec<String>,
    /// How long the code stays usable (e.g. 15m, 2h; at most 7d)
    #[arg(long, default_value = "15m", value_parser = super::connections::parse_duration)]
    expires_in: chrono::Duration,
}

pub(crate) async fn run(ctx: &Context, args: ShareArgs) -> anyhow::Result<()> {
    let share = ctx
        .agent
        .create_share(&args.tables, args.expires_in, &ctx.actor)
        .await?;
    let own_url = ctx.agent.site_url().await?;
    let command = format!(
        "dbsync pull --code {} --from {own_url}",
        share.code.display()
    );
    if ctx.json {
        return output::print_json(&serde_json::json!({
            "code": share.code.display(),
            "connection": share.connection.name,
            "tables": share.tables,
            "expires_at": share.expires_at,
            "pull_command": command,
            "notice": "the code is shown only once and works once",
        }));
    }
    println!(
        "Share {} of {} until {} (shown only this once; it works once):",
        share.connection.name,
        share.tables.join(", "),
        share.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!();
    println!("    {}", share.code.display());
    println!();
    println!("On the receiving site:");
    println!();
    println!("    {command}");
    Ok(())
}
