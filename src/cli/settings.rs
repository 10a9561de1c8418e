//! `dbsync settings ...`

use clap::Subcommand;
use dbsync_agent::settings::{IncomingMode, Settings};

use super::Context;
use super::output;

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Show the site settings
    Show,
    /// Set how registrations from other sites are answered
    Incoming {
        /// auto_accept, require_approval, require_password or deny_all
        #[arg(value_parser = parse_mode)]
        mode: IncomingMode,
        /// Read a new incoming password from stdin (required for require_password unless one is set)
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set this site's name and public URL (used in hand-over instructions and registration)
    Site {
        /// Display name
        #[arg(long)]
        name: Option<String>,
        /// Public base URL of this site
        #[arg(long)]
        url: Option<String>,
    },
}

fn parse_mode(text: &str) -> Result<IncomingMode, String> {
    text.parse()
        .map_err(|err: dbsync_agent::Error| err.to_string())
}

pub(crate) async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let settings = match command {
        Command::Show => ctx.store.settings().await?,
        Command::Incoming {
            mode,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(super::read_secret_line("incoming password")?)
            } else {
                None
            };
            ctx.store
                .set_incoming(mode, password.as_deref(), &ctx.actor, ctx.now())
                .await?
        }
        Command::Site { name, url } => {
            anyhow::ensure!(
                name.is_some() || url.is_some(),
                "give --name, --url or both"
            );
            ctx.store
                .set_site_identity(name.as_deref(), url.as_deref(), &ctx.actor, ctx.now())
                .await?
        }
    };
    print(ctx, &settings)
}

fn print(ctx: &Context, s: &Settings) -> anyhow::Result<()> {
    if ctx.json {
        return output::print_json(s);
    }
    output::print_fields(&[
        ("incoming mode", s.incoming_mode.to_string()),
        (
            "incoming password",
            if s.incoming_password_hash.is_some() {
                "set"
            } else {
                "none"
            }
            .into(),
        ),
        ("site id", s.site_id.to_string()),
        ("site name", output::opt(s.site_name.as_deref())),
        ("site url", output::opt(s.site_url.as_deref())),
        (
            "updated",
            format!(
                "{} by {}",
                output::time(Some(s.updated_at)),
                output::opt(s.updated_by.as_deref())
            ),
        ),
        ("state database", ctx.store.engine_name().into()),
    ]);
    Ok(())
}
