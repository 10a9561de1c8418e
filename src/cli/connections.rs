//! `dbsync connections ...`

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use dbsync_agent::config::Secret;
use dbsync_agent::connection::{
    ApprovalMode, ConflictStrategy, ConnectionFilter, ConnectionSettings, CreatedConnection,
    NewConnection,
};
use dbsync_agent::registration::StatusChange;
use dbsync_agent::{ConnectionStatus, Direction};

use super::Context;
use super::output;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a sender connection: allow a remote site to pull from this one. Prints its token once.
    Create(CreateArgs),
    /// List connections
    List {
        /// Only connections with this status
        #[arg(long, value_parser = parse_enum::<ConnectionStatus>)]
        status: Option<ConnectionStatus>,
        /// Only sender or receiver connections
        #[arg(long, value_parser = parse_enum::<Direction>)]
        direction: Option<Direction>,
    },
    /// Show one connection with its limits, usage, statistics and audit trail
    Show {
        /// Connection id or name
        connection: String,
    },
    /// Activate a pending connection
    Approve {
        /// Connection id or name
        connection: String,
    },
    /// Switch a connection off for now (reactivate brings it back)
    Suspend {
        /// Connection id or name
        connection: String,
        /// Why (kept in the audit trail)
        #[arg(long)]
        reason: String,
    },
    /// Bring a suspended connection back
    Reactivate {
        /// Connection id or name
        connection: String,
    },
    /// Switch a connection off for good
    Revoke {
        /// Connection id or name
        connection: String,
        /// Why (kept in the audit trail)
        #[arg(long)]
        reason: String,
    },
    /// Delete a connection (its transfers stay in the history)
    Delete {
        /// Connection id or name
        connection: String,
        /// Confirm the deletion
        #[arg(long)]
        yes: bool,
    },
    /// Issue a new token for a sender connection; the old one stops working at once
    RegenerateToken {
        /// Connection id or name
        connection: String,
    },
    /// Store a receiver connection from a token the sending site handed over
    AddReceiver(AddReceiverArgs),
    /// Keep (or with --clear forget) the sending site's download password on a receiver
    /// connection, encrypted like its token, for pulls and schedules that give none
    SetPassword {
        /// Receiver connection id or name
        connection: String,
        /// Read the password from stdin
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        password_stdin: bool,
        /// Forget the stored password
        #[arg(long)]
        clear: bool,
    },
    /// Replace the token of a receiver connection (the sender regenerated it and handed the new
    /// one over), read from stdin
    SetToken {
        /// Receiver connection id or name
        connection: String,
        /// Read the token from stdin (the only way: it never goes on a command line)
        #[arg(long, required = true)]
        token_stdin: bool,
    },
    /// Expire connections past their expiry date or out of a lifetime limit
    Sweep,
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Unique name of the connection
    name: String,
    /// Base URL of the remote site that will pull from this one
    #[arg(long)]
    site_url: String,
    /// auto_approve, require_approval or per_table
    #[arg(long, value_parser = parse_enum::<ApprovalMode>, default_value = "auto_approve")]
    approval_mode: ApprovalMode,
    /// Only these tables are offered (comma-separated; default: all)
    #[arg(long, value_delimiter = ',')]
    allowed_tables: Vec<String>,
    /// These tables are never offered (comma-separated)
    #[arg(long, value_delimiter = ',')]
    excluded_tables: Vec<String>,
    /// Tables that skip approval in per_table mode (comma-separated)
    #[arg(long, value_delimiter = ',')]
    auto_approve_tables: Vec<String>,
    /// Table transfers allowed in total (default: unlimited)
    #[arg(long)]
    max_downloads: Option<i64>,
    /// Rows allowed in total (default: unlimited)
    #[arg(long)]
    max_records_total: Option<i64>,
    /// Rows in one pull request
    #[arg(long, default_value_t = dbsync_agent::connection::DEFAULT_MAX_RECORDS_PER_REQUEST)]
    max_records_per_request: i64,
    /// Requests per minute
    #[arg(long, default_value_t = dbsync_agent::connection::DEFAULT_RATE_LIMIT_PER_MINUTE)]
    rate_limit_per_minute: i64,
    /// Read a download password from stdin; receivers must give it on every session
    #[arg(long)]
    download_password_stdin: bool,
    /// Read the remote site's incoming password from stdin (after the download password, when
    /// both are given), for remotes in require_password mode
    #[arg(long)]
    remote_password_stdin: bool,
    /// Addresses or CIDR blocks allowed to connect (comma-separated; default: any)
    #[arg(long, value_delimiter = ',')]
    ip_whitelist: Vec<String>,
    /// Hours when pulls are allowed, START-END (0-23, end exclusive, may wrap midnight), e.g. 22-5
    #[arg(long, value_parser = parse_hours)]
    allowed_hours: Option<(u8, u8)>,
    /// IANA time zone of --allowed-hours
    #[arg(long, default_value = "UTC")]
    time_zone: String,
    /// Expiry as an RFC 3339 timestamp, e.g. 2027-01-31T00:00:00Z
    #[arg(long, value_parser = parse_time, conflicts_with = "expires_in")]
    expires_at: Option<DateTime<Utc>>,
    /// Expiry relative to now, e.g. 90m, 12h, 30d
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<chrono::Duration>,
    /// Conflict strategy receivers use when they name none: skip, overwrite, merge, append, mirror
    #[arg(long, value_parser = parse_enum::<ConflictStrategy>, default_value = "overwrite")]
    conflict_strategy: ConflictStrategy,
}

#[derive(Debug, Args)]
pub(crate) struct AddReceiverArgs {
    /// Unique name of the connection
    name: String,
    /// Base URL of the sending site
    #[arg(long)]
    site_url: String,
    /// The token the sending site printed (prefer --token-stdin: arguments show up in `ps`)
    #[arg(
        long,
        env = "DBSYNC_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_stdin"
    )]
    token: Option<String>,
    /// Read the token from stdin
    #[arg(long, conflicts_with = "token")]
    token_stdin: bool,
}

fn parse_enum<T: std::str::FromStr<Err = dbsync_agent::Error>>(text: &str) -> Result<T, String> {
    text.parse().map_err(|err: dbsync_agent::Error| match err {
        dbsync_agent::Error::Invalid { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_hours(text: &str) -> Result<(u8, u8), String> {
    let (start, end) = text.split_once('-').ok_or("expected START-END, e.g. 2-5")?;
    let hour = |h: &str| {
        h.trim()
            .parse::<u8>()
            .ok()
            .filter(|h| *h <= 23)
            .ok_or(format!("{h:?} is not an hour 0-23"))
    };
    Ok((hour(start)?, hour(end)?))
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|err| format!("not an RFC 3339 timestamp ({err}), e.g. 2027-01-31T00:00:00Z"))
}

pub(crate) fn parse_duration(text: &str) -> Result<chrono::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (s, m, h, d)"))?;
    match unit {
        "" if n == 0 => Ok(chrono::Duration::zero()),
        "s" => Ok(chrono::Duration::seconds(n)),
        "m" => Ok(chrono::Duration::minutes(n)),
        "h" => Ok(chrono::Duration::hours(n)),
        "d" => Ok(chrono::Duration::days(n)),
        _ => Err(format!("{text:?}: unit must be s, m, h or d")),
    }
}

pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let store = &ctx.store;
    match command {
        Command::Create(args) => create(ctx, args).await,
        Command::List { status, direction } => {
            let connections = store
                .list_connections(&ConnectionFilter { status, direction })
                .await?;
            if ctx.json {
                return output::print_json(&connections);
            }
            let rows = connections
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.direction.to_string(),
                        c.status.to_string(),
                        c.site_url.clone(),
                        c.token_prefix
                            .as_deref()
                            .map_or_else(|| "-".into(), |p| format!("{p}…")),
                        output::usage(c.downloads_used, c.max_downloads),
                        output::usage(c.records_downloaded, c.max_records_total),
                        output::time(Some(c.created_at)),
                    ]
                })
                .collect();
            output::print_rows(
                &[
                    "NAME",
                    "DIRECTION",
                    "STATUS",
                    "SITE URL",
                    "TOKEN",
                    "DOWNLOADS",
                    "RECORDS",
                    "CREATED",
                ],
                rows,
                "No connections. Create one with: dbsync connections create <name> --site-url <url>",
            );
            Ok(())
        }
        Command::Show { connection } => show(ctx, &connection).await,
        Command::Approve { connection } => {
            status_change(ctx, &connection, StatusChange::Approve, "approved").await
        }
        Command::Suspend { connection, reason } => {
            status_change(ctx, &connection, StatusChange::Suspend(reason), "suspended").await
        }
        Command::Reactivate { connection } => {
            status_change(ctx, &connection, StatusChange::Reactivate, "reactivated").await
        }
        Command::Revoke { connection, reason } => {
            status_change(ctx, &connection, StatusChange::Revoke(reason), "revoked").await
        }
        Command::Delete { connection, yes } => {
            anyhow::ensure!(
                yes,
                "deleting {connection:?} cannot be undone; pass --yes to confirm"
            );
            let (c, push) = ctx.agent.delete_connection(&connection, &ctx.actor).await?;
            if ctx.json {
                return output::print_json(&serde_json::json!({ "deleted": c, "peer_push": push }));
            }
            println!(
                "Deleted {} connection {:?} ({}). Its transfers stay in the history.",
                c.direction, c.name, c.id
            );
            if push.state != "delivered" {
                println!(
                    "The peer was not told ({}): {}",
                    push.state,
                    push.error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::RegenerateToken { connection } => {
            let (created, push) = ctx.agent.regenerate_token(&connection, &ctx.actor).await?;
            let headline = format!(
                "New token issued; the old token no longer works. {}",
                push.describe(&created.connection.site_url)
                    .replace("NAME", &shell_quote(&created.connection.name))
            );
            print_token(
                ctx,
                &created,
                &headline,
                Issued::Regenerated(serde_json::to_value(&push)?),
            )
            .await
        }
        Command::SetPassword {
            connection, clear, ..
        } => {
            let password = if clear {
                None
            } else {
                Some(super::read_secret_line("download password")?)
            };
            let c = store
                .set_receiver_password(
                    &connection,
                    password.as_deref(),
                    &ctx.agent.vault,
                    &ctx.actor,
                    ctx.now(),
                )
                .await?;
            if ctx.json {
                return output::print_json(&c);
            }
            if clear {
                println!("Forgot the download password of {:?}.", c.name);
            } else {
                println!(
                    "Stored the download password of {:?} (encrypted); pulls that give none use it.",
                    c.name
                );
            }
            Ok(())
        }
        Command::SetToken { connection, .. } => {
            let token = super::read_secret_line("token")?;
            let c = store
                .set_receiver_token(&connection, &token, &ctx.agent.vault, &ctx.actor, ctx.now())
                .await?;
            if ctx.json {
                return output::print_json(&c);
            }
            println!(
                "Stored the new token of {:?} ({}...); the next pull uses it.",
                c.name,
                c.token_prefix.as_deref().unwrap_or("")
            );
            Ok(())
        }
        Command::AddReceiver(args) => {
            let token = match (args.token, args.token_stdin) {
                (_, true) => super::read_secret_line("token")?,
                (Some(token), false) => token,
                (None, false) => anyhow::bail!("give the token with --token-stdin or --token"),
            };
            let c = ctx
                .agent
                .add_receiver_by_hand(&args.name, &args.site_url, &token, &ctx.actor)
                .await?;
            if ctx.json {
                return output::print_json(&c);
            }
            println!(
                "Receiver connection {:?} added; status is {}.",
                c.name, c.status
            );
            let hand_over = &c.metadata["hand_over"];
            match hand_over["outcome"].as_str() {
                Some("confirmed") => println!(
                    "{} confirmed the connection (its status there: {}).",
                    c.site_url,
                    hand_over["remote_status"].as_str().unwrap_or("unknown")
                ),
                _ => println!(
                    "Could not confirm with {} ({}); status changes made there will not reach this site until it can.",
                    c.site_url,
                    hand_over["error"].as_str().unwrap_or("unknown error")
                ),
            }
            Ok(())
        }
        Command::Sweep => {
            let expired = store.expire_due_connections(ctx.now()).await?;
            let approvals = store.expire_due_approvals(ctx.now()).await?;
            if ctx.json {
                return output::print_json(&serde_json::json!({
                    "expired_connections": expired, "expired_approvals": approvals
                }));
            }
            for c in &expired {
                println!("Expired connection {:?} ({})", c.name, c.id);
            }
            println!(
                "{} connection(s) expired, {approvals} pending approval(s) expired.",
                expired.len()
            );
            Ok(())
        }
    }
}

async fn create(ctx: &Context, args: CreateArgs) -> anyhow::Result<()> {
    let download_password = if args.download_password_stdin {
        Some(Secret::new(super::read_secret_line("download password")?))
    } else {
        None
    };
    let remote_password = if args.remote_password_stdin {
        Some(super::read_secret_line("remote site's incoming password")?)
    } else {
        None
    };
    let expires_at = args.expires_at.or(args.expires_in.map(|d| ctx.now() + d));
    let new = NewConnection {
        name: args.name,
        site_url: args.site_url,
        settings: ConnectionSettings {
            approval_mode: args.approval_mode,
            allowed_tables: args.allowed_tables,
            excluded_tables: args.excluded_tables,
            auto_approve_tables: args.auto_approve_tables,
            max_downloads: args.max_downloads,
            max_records_total: args.max_records_total,
            max_records_per_request: args.max_records_per_request,
            rate_limit_per_minute: args.rate_limit_per_minute,
            download_password,
            ip_whitelist: args.ip_whitelist,
            allowed_hours: args.allowed_hours,
            time_zone: args.time_zone,
            expires_at,
            default_conflict_strategy: args.conflict_strategy,
            ..ConnectionSettings::default()
        },
    };
    let created = ctx
        .agent
        .create_sender(new, remote_password.as_deref(), &ctx.actor)
        .await?;
    let headline = created.registration.headline(&created.connection.site_url);
    let registration = serde_json::to_value(&created.registration)?;
    print_token(
        ctx,
        &CreatedConnection {
            connection: created.connection,
            token: created.token,
        },
        &headline,
        Issued::Registered(registration),
    )
    .await
}

/// Takes a lifecycle step here and tells the peer; says what the peer answered.
async fn status_change(
    ctx: &Context,
    connection: &str,
    change: StatusChange,
    verb: &str,
) -> anyhow::Result<()> {
    let (c, push) = ctx
        .agent
        .change_status(connection, change, &ctx.actor)
        .await?;
    if ctx.json {
        return output::print_json(&serde_json::json!({ "connection": c, "peer_push": push }));
    }
    println!(
        "Connection {:?} {verb}; status is now {}.",
        c.name, c.status
    );
    println!("{}", push.describe(&c.site_url));
    Ok(())
}

/// Why a token was just issued, with what the peer was told.
enum Issued {
    /// A new sender connection; how its registration went.
    Registered(serde_json::Value),
    /// A regenerated token; how handing it to the receiver went.
    Regenerated(serde_json::Value),
}

/// Prints a new token, the only time it is ever shown, with the command to run on the other side.
async fn print_token(
    ctx: &Context,
    created: &CreatedConnection,
    headline: &str,
    issued: Issued,
) -> anyhow::Result<()> {
    let c = &created.connection;
    let own_url = ctx.agent.site_url().await?;
    let (hand_over, told_key, told, delivered) = match issued {
        Issued::Registered(outcome) => (
            format!(
                "dbsync connections add-receiver {} --site-url {} --token-stdin",
                shell_quote(&c.name),
                shell_quote(&own_url)
            ),
            "registration",
            outcome,
            c.status == ConnectionStatus::Active,
        ),
        Issued::Regenerated(push) => (
            format!(
                "dbsync connections set-token {} --token-stdin",
                shell_quote(&c.name)
            ),
            "token_push",
            push.clone(),
            push["state"] == "delivered",
        ),
    };
    if ctx.json {
        let mut out = serde_json::json!({
            "connection": c,
            "token": created.token.expose(),
            "notice": "the token is shown only once; store it now",
            "hand_over_command": hand_over,
        });
        out[told_key] = told;
        return output::print_json(&out);
    }
    println!("{headline}");
    println!();
    output::print_fields(&[
        ("name", c.name.clone()),
        ("id", c.id.to_string()),
        ("status", c.status.to_string()),
        ("remote site", c.site_url.clone()),
    ]);
    println!();
    println!("Token (shown only this once; store it now):");
    println!();
    println!("    {}", created.token.expose());
    println!();
    if !delivered {
        println!(
            "If {} does not hold this token yet, run this there and paste the token when asked:",
            c.site_url
        );
        println!();
        println!("    {hand_over}");
    }
    Ok(())
}

fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

async fn show(ctx: &Context, id_or_name: &str) -> anyhow::Result<()> {
    let c = ctx.store.get_connection(id_or_name).await?;
    let stats = ctx
        .store
        .connection_stats(c.id)
        .await
        .context("reading statistics")?;
    let events = ctx.store.audit_events(Some(c.id), 1000).await?;
    if ctx.json {
        return output::print_json(
            &serde_json::json!({ "connection": c, "stats": stats, "audit_events": events }),
        );
    }
    let hours = match (c.allowed_hours_start, c.allowed_hours_end) {
        (Some(start), Some(end)) => format!("{start:02}:00-{end:02}:00 {}", c.time_zone),
        _ => "any time".into(),
    };
    output::print_fields(&[
        ("name", c.name.clone()),
        ("id", c.id.to_string()),
        ("direction", c.direction.to_string()),
        ("status", c.status.to_string()),
        ("site url", c.site_url.clone()),
        (
            "token",
            c.token_prefix
                .as_deref()
                .map_or_else(|| "-".into(), |p| format!("{p}…")),
        ),
        ("approval mode", c.approval_mode.to_string()),
        ("allowed tables", output::list(&c.allowed_tables, "all")),
        ("excluded tables", output::list(&c.excluded_tables, "none")),
        (
            "auto-approve tables",
            output::list(&c.auto_approve_tables, "none"),
        ),
        (
            "downloads",
            output::usage(c.downloads_used, c.max_downloads),
        ),
        (
            "records",
            output::usage(c.records_downloaded, c.max_records_total),
        ),
        ("records per request", c.max_records_per_request.to_string()),
        (
            "rate limit",
            format!("{} / minute", c.rate_limit_per_minute),
        ),
        (
            "download password",
            if c.download_password_hash.is_some() {
                "set"
            } else {
                "none"
            }
            .into(),
        ),
        ("ip whitelist", output::list(&c.ip_whitelist, "any address")),
        ("allowed hours", hours),
        (
            "expires",
            c.expires_at
                .map_or_else(|| "never".into(), |t| output::time(Some(t))),
        ),
        ("conflict strategy", c.default_conflict_strategy.to_string()),
        (
            "created",
            format!("{} by {}", output::time(Some(c.created_at)), c.created_by),
        ),
        (
            "approved",
            format!(
                "{} by {}",
                output::time(c.approved_at),
                output::opt(c.approved_by.as_deref())
            ),
        ),
        (
            "suspended",
            format!(
                "{} by {} ({})",
                output::time(c.suspended_at),
                output::opt(c.suspended_by.as_deref()),
                output::opt(c.suspended_reason.as_deref())
            ),
        ),
        (
            "revoked",
            format!(
                "{} by {} ({})",
                output::time(c.revoked_at),
                output::opt(c.revoked_by.as_deref()),
                output::opt(c.revoked_reason.as_deref())
            ),
        ),
        ("last connected", output::time(c.last_connected_at)),
        ("last transfer", output::time(c.last_transfer_at)),
        (
            "transfers",
            format!(
                "{} total, {} completed, {} failed, {} awaiting approval",
                stats.total_transfers,
                stats.completed_transfers,
                stats.failed_transfers,
                stats.pending_approval
            ),
        ),
        ("rows moved", stats.total_records.to_string()),
        (
            "bytes moved",
            format!(
                "{} on the wire, {} raw",
                output::bytes(stats.total_bytes),
                output::bytes(stats.total_bytes_raw)
            ),
        ),
    ]);
    println!();
    let rows = events
        .iter()
        .map(|e| {
            let reason = e
                .detail
                .get("reason")
                .and_then(|r| r.as_str())
                .unwrap_or("");
            vec![
                output::time(Some(e.occurred_at)),
                e.actor.clone(),
                e.action.clone(),
                reason.to_owned(),
            ]
        })
        .collect();
    output::print_rows(&["WHEN", "WHO", "WHAT", "REASON"], rows, "No audit events.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_and_durations() {
        assert_eq!(parse_hours("22-5"), Ok((22, 5)));
        assert!(parse_hours("22-24").is_err());
        assert!(parse_hours("22").is_err());
        assert_eq!(parse_duration("30d"), Ok(chrono::Duration::days(30)));
        assert_eq!(parse_duration("90m"), Ok(chrono::Duration::minutes(90)));
        assert!(parse_duration("3w").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("prod"), "prod");
        assert_eq!(shell_quote("prod to staging"), "'prod to staging'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
