//! `dbsync transfers ...` and `dbsync stats`.

use chrono::{DateTime, Utc};
use clap::Subcommand;
use dbsync_agent::Transfer;
use dbsync_agent::transfer::{TransferDirection, TransferFilter, TransferStatus};
use uuid::Uuid;

use super::Context;
use super::output;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List transfers, newest first
    List {
        /// Only transfers under this connection (id or name)
        #[arg(long)]
        connection: Option<String>,
        /// send or receive
        #[arg(long, value_parser = parse_enum::<TransferDirection>)]
        direction: Option<TransferDirection>,
        /// Only this status (pending, pending_approval, approved, denied, in_progress, completed, failed,
        /// cancelled, expired)
        #[arg(long, value_parser = parse_enum::<TransferStatus>)]
        status: Option<TransferStatus>,
        /// Only this table
        #[arg(long)]
        table: Option<String>,
        /// Created at or after (RFC 3339)
        #[arg(long, value_parser = parse_time)]
        since: Option<DateTime<Utc>>,
        /// Created before (RFC 3339)
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// Page number, from 1
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
        page: i64,
        /// Transfers per page (1 to 500)
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=500))]
        per_page: i64,
    },
    /// Show one transfer
    Show {
        /// Transfer id
        id: Uuid,
    },
    /// Approve a transfer waiting for approval
    Approve {
        /// Transfer id
        id: Uuid,
    },
    /// Deny a transfer waiting for approval
    Deny {
        /// Transfer id
        id: Uuid,
        /// Why (shown to the receiver and kept in the audit trail)
        #[arg(long)]
        reason: String,
    },
    /// Cancel a transfer that has not ended: a running pull stops at its next batch (what it
    /// applied stays, and a later pull resumes after it); a waiting one is not served
    Cancel {
        /// Transfer id
        id: Uuid,
    },
}

fn parse_enum<T: std::str::FromStr<Err = dbsync_agent::Error>>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|err: dbsync_agent::Error| err.to_string())
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("not an RFC 3339 timestamp ({err})"))
}

pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List {
            connection,
            direction,
            status,
            table,
            since,
            until,
            page,
            per_page,
        } => {
            let connection_id = match connection {
                Some(c) => Some(ctx.store.get_connection(&c).await?.id),
                None => None,
            };
            let page = ctx
                .store
                .list_transfers(&TransferFilter {
                    connection_id,
                    direction,
                    status,
                    table_name: table,
                    since,
                    until,
                    page: Some(page),
                    per_page: Some(per_page),
                })
                .await?;
            if ctx.json {
                return output::print_json(&page);
            }
            let rows = page
                .items
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        output::time(Some(t.created_at)),
                        t.direction.to_string(),
                        t.table_name.clone(),
                        t.status.to_string(),
                        t.records_transferred.to_string(),
                        output::bytes(t.bytes_wire),
                    ]
                })
                .collect();
            output::print_rows(
                &["ID", "CREATED", "DIR", "TABLE", "STATUS", "ROWS", "WIRE"],
                rows,
                "No transfers.",
            );
            if page.total > 0 {
                let pages = (page.total + page.per_page - 1) / page.per_page;
                println!("Page {} of {pages} ({} transfers)", page.page, page.total);
            }
            Ok(())
        }
        Command::Show { id } => print_transfer(ctx, &ctx.store.get_transfer(id).await?),
        Command::Approve { id } => print_transfer(
            ctx,
            &ctx.store
                .approve_transfer(id, &ctx.actor, ctx.now())
                .await?,
        ),
        Command::Deny { id, reason } => print_transfer(
            ctx,
            &ctx.store
                .deny_transfer(id, &reason, &ctx.actor, ctx.now())
                .await?,
        ),
        Command::Cancel { id } => print_transfer(
            ctx,
            &ctx.store.cancel_transfer(id, &ctx.actor, ctx.now()).await?,
        ),
    }
}

fn print_transfer(ctx: &Context, t: &Transfer) -> anyhow::Result<()> {
    if ctx.json {
        return output::print_json(t);
    }
    output::print_fields(&[
        ("id", t.id.to_string()),
        ("connection", output::opt(t.connection_id)),
        ("direction", t.direction.to_string()),
        ("table", t.table_name.clone()),
        ("status", t.status.to_string()),
        ("requires approval", t.requires_approval.to_string()),
        (
            "approved",
            format!(
                "{} by {}",
                output::time(t.approved_at),
                output::opt(t.approved_by.as_deref())
            ),
        ),
        (
            "denied",
            format!(
                "{} by {} ({})",
                output::time(t.denied_at),
                output::opt(t.denied_by.as_deref()),
                output::opt(t.denial_reason.as_deref())
            ),
        ),
        ("approval deadline", output::time(t.approval_expires_at)),
        ("rows requested", t.records_requested.to_string()),
        ("rows transferred", t.records_transferred.to_string()),
        (
            "rows created/updated/skipped/failed",
            format!(
                "{}/{}/{}/{}",
                t.records_created, t.records_updated, t.records_skipped, t.records_failed
            ),
        ),
        (
            "bytes",
            format!(
                "{} on the wire, {} raw",
                output::bytes(t.bytes_wire),
                output::bytes(t.bytes_raw)
            ),
        ),
        ("conflict strategy", t.conflict_strategy.to_string()),
        ("transport", output::opt(t.transport.as_deref())),
        (
            "requester",
            format!(
                "{} {}",
                output::opt(t.requester_ip.as_deref()),
                output::opt(t.requester_user_agent.as_deref())
            ),
        ),
        ("error", output::opt(t.error_message.as_deref())),
        ("created", output::time(Some(t.created_at))),
        ("started", output::time(t.started_at)),
        ("finished", output::time(t.completed_at)),
    ]);
    Ok(())
}

pub(crate) async fn stats(ctx: &Context, connection: &str) -> anyhow::Result<()> {
    let c = ctx.store.get_connection(connection).await?;
    let stats = ctx.store.connection_stats(c.id).await?;
    if ctx.json {
        return output::print_json(
            &serde_json::json!({ "connection_id": c.id, "name": c.name, "stats": stats }),
        );
    }
    output::print_fields(&[
        ("connection", format!("{} ({})", c.name, c.id)),
        ("transfers", stats.total_transfers.to_string()),
        ("completed", stats.completed_transfers.to_string()),
        ("failed", stats.failed_transfers.to_string()),
        ("awaiting approval", stats.pending_approval.to_string()),
        ("rows", stats.total_records.to_string()),
        ("bytes on the wire", output::bytes(stats.total_bytes)),
        ("bytes raw", output::bytes(stats.total_bytes_raw)),
    ]);
    Ok(())
}
