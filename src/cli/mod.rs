//! Command-line interface: argument parsing and dispatch to the engine.

mod admin_tokens;
pub(crate) mod connections;
mod demo;
pub(crate) mod output;
pub(crate) use verify::Differs;
mod pull;
mod schedule;
mod serve;
mod settings;
mod share;
mod transfers;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dbsync_agent::audit::Actor;
use dbsync_agent::clock::SharedClock;
use dbsync_agent::{Agent, Config, Store, SystemClock};

/// Sync database tables between sites over permanent, token-authenticated connections.
#[derive(Debug, Parser)]
#[command(name = "dbsync", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// State database: postgres://... or sqlite://path [default: sqlite://dbsync.db]
    #[arg(
        long,
        global = true,
        env = "DBSYNC_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Directory of the agent's own files (generated key, QUIC certificate) [default: beside a
    /// SQLite state database; per PostgreSQL database under $STATE_DIRECTORY or ~/.local/state/dbsync]
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Configuration file (TOML); DBSYNC_* variables and flags override it
    #[arg(long, global = true, env = "DBSYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Allow peers on loopback, private and link-local addresses (tests, demos, private networks)
    #[arg(long, global = true)]
    allow_private_peers: bool,
    /// Machine-readable JSON on stdout instead of tables
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Log filter (tracing syntax), e.g. "info" or "dbsync_agent=debug"
    #[arg(long, global = true, env = "DBSYNC_LOG", default_value = "warn")]
    log: String,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Two agents on SQLite in a temporary directory: seed one, register, pull,
    /// and check that both hold identical data
    Demo(demo::DemoArgs),
    /// Run the agent: the peer API, the admin JSON API, data-plane sessions (WebSocket and
    /// QUIC), and background work (status pushes to peers, expiry sweeps, scheduled syncs)
    Serve(serve::ServeArgs),
    /// Create, inspect and change connections to other sites
    #[command(subcommand)]
    Connections(connections::Command),
    /// Pull tables from the sending site of a receiver connection (QUIC or WebSocket), or once
    /// with a share code (--code CODE --from URL)
    Pull(pull::PullArgs),
    /// A one-time code another site pulls some tables with once, with no permanent connection
    Share(share::ShareArgs),
    /// Whether this site holds the sender's rows (hashes compared page by page, no row moved);
    /// --repair moves only the rows that differ. Exit code 0 only when identical
    Verify(verify::VerifyArgs),
    /// Transfer history
    #[command(subcommand)]
    Transfers(transfers::Command),
    /// Transfer statistics of one connection
    Stats {
        /// Connection id or name
        connection: String,
    },
    /// Site settings: how registrations from other sites are answered
    #[command(subcommand)]
    Settings(settings::Command),
    /// Bearer tokens for the admin JSON API
    #[command(subcommand)]
    AdminTokens(admin_tokens::Command),
    /// Auto-sync schedules of receiver connections
    #[command(subcommand)]
    Schedule(schedule::Command),
}

/// What every command needs: the agent (store, config, peers), who is acting, and the clock.
pub(crate) struct Context {
    pub(crate) agent: Agent,
    pub(crate) store: Store,
    pub(crate) actor: Actor,
    pub(crate) clock: SharedClock,
    pub(crate) json: bool,
}

impl Context {
    pub(crate) fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }
}

/// Sets up logging on stderr. Nothing secret is ever logged by the engine.
/// Log targets never shown, at any level: they print the payloads they carry.
const SILENCED_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

pub(crate) fn init_tracing(global: &GlobalArgs) {
    let mut filter = tracing_subscriber::EnvFilter::try_new(&global.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Libraries that trace the bytes they move: a WebSocket frame's payload is a Hello with its
    // token and password. Silenced whatever the filter asks for, so no level logs a secret.
    for target in SILENCED_TARGETS {
        if let Ok(directive) = format!("{target}=off").parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match global.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo(args) = cli.command {
        return demo::run(args, cli.global.json).await;
    }
    let mut config = Config::load(cli.global.config.as_deref())?;
    if let Some(url) = cli.global.database_url {
        config.database_url = Some(url);
    }
    if let Some(dir) = cli.global.data_dir {
        config.data_dir = Some(dir);
    }
    if cli.global.allow_private_peers {
        config.allow_private_peers = true;
    }
    let listener = match &cli.command {
        Command::Serve(args) => Some(serve::prepare(&mut config, args).await?),
        _ => None,
    };
    config.validate()?;
    let store = Store::connect(config.database_url())
        .await
        .with_context(|| {
            format!(
                "cannot open the state database ({})",
                redact_url(config.database_url())
            )
        })?;
    let clock: SharedClock = Arc::new(SystemClock);
    let agent = Agent::with_store(store.clone(), config, Arc::clone(&clock))?;
    let ctx = Context {
        agent,
        store: store.clone(),
        actor: Actor::current_cli_user(),
        clock,
        json: cli.global.json,
    };
    let result = match cli.command {
        Command::Demo(_) => unreachable!("handled before the state database is opened"),
        Command::Serve(_) => {
            let listener = listener.expect("serve binds before the agent is built");
            serve::run(ctx, listener).await
        }
        Command::AdminTokens(command) => admin_tokens::run(&ctx, command).await,
        Command::Connections(command) => connections::run(&ctx, command).await,
        Command::Pull(args) => pull::run(&ctx, args).await,
        Command::Share(args) => share::run(&ctx, args).await,
        Command::Verify(args) => verify::run(&ctx, args).await,
        Command::Transfers(command) => transfers::run(&ctx, command).await,
        Command::Stats { connection } => transfers::stats(&ctx, &connection).await,
        Command::Settings(command) => settings::run(&ctx, command).await,
        Command::Schedule(command) => schedule::run(&ctx, command).await,
    };
    store.close().await;
    result
}

/// A database URL with any password replaced, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Reads one secret line from stdin (for `--*-stdin` flags), without the newline.
pub(crate) fn read_secret_line(what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .with_context(|| format!("cannot read the {what} from stdin"))?;
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(!line.is_empty(), "no {what} on stdin");
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
