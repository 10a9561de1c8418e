//! `dbsync serve`: the agent's HTTP surface and its background work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use dbsync_admin::{AppState, server};
use dbsync_agent::Config;
use tokio::net::TcpListener;

use super::Context;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:4860, or server.listen from the config]
    #[arg(long, env = "DBSYNC_LISTEN")]
    listen: Option<SocketAddr>,
    /// Public base URL of this site as peers reach it [default: http://<listen address>]
    #[arg(long, env = "DBSYNC_SITE_URL")]
    site_url: Option<String>,
}

/// Applies the flags and binds the listener (so port 0 resolves before the agent derives its
/// site URL from the address).
pub(crate) async fn prepare(config: &mut Config, args: &ServeArgs) -> anyhow::Result<TcpListener> {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(url) = &args.site_url {
        config.site_url = Some(url.clone());
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    config.server.listen = listener.local_addr()?;
    Ok(listener)
}

pub(crate) async fn run(ctx: Context, listener: TcpListener) -> anyhow::Result<()> {
    let agent = Arc::new(ctx.agent);
    let address = listener.local_addr()?;
    // An explicitly configured site URL is recorded in the settings, so CLI commands run beside
    // this agent (without the same configuration) announce the same URL to peers.
    if let Some(url) = &agent.config.site_url {
        let stored = agent.store.settings().await?.site_url;
        if stored.as_deref() != Some(url.trim_end_matches('/')) {
            agent
                .store
                .set_site_identity(None, Some(url), &ctx.actor, agent.now())
                .await?;
        }
    }
    let site_url = agent.site_url().await?;
    tracing::info!(%address, %site_url, engine = agent.store.engine_name(), "dbsync serving");
    let state = AppState::new(Arc::clone(&agent));
    let quic = server::bind_quic(&state).await?;
    let quic_port = match &quic {
        Some(endpoint) => Some(endpoint.local_addr()?.port()),
        None => None,
    };
    agent.store.set_quic_port(quic_port).await?;
    // One line on stdout that scripts (and tests) can wait for.
    match &quic {
        Some(endpoint) => println!(
            "dbsync listening on http://{address} (site url {site_url}) and quic udp://{} (certificate sha256 {})",
            endpoint.local_addr()?,
            agent.quic_identity().await?.fingerprint
        ),
        None => println!("dbsync listening on http://{address} (site url {site_url})"),
    }

    let background = tokio::spawn(background_work(Arc::clone(&agent)));
    let scheduler = tokio::spawn(scheduler(Arc::clone(&agent)));
    server::serve_site(listener, state, quic, shutdown_signal()).await?;
    background.abort();
    scheduler.abort();
    tracing::info!("dbsync stopped");
    Ok(())
}

/// Retries status pushes that peers have not acknowledged, and expires connections and
/// approvals that are due.
async fn background_work(agent: Arc<dbsync_agent::Agent>) {
    let every = Duration::from_secs(agent.config.server.push_retry_secs.clamp(1, 60));
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        if let Err(err) = agent.retry_pending_pushes().await {
            tracing::warn!(error = %err, "retrying status pushes failed");
        }
        let now = agent.now();
        match agent.store.expire_due_connections(now).await {
            Ok(expired) => {
                for connection in expired {
                    tracing::info!(connection_id = %connection.id, name = %connection.name, "connection expired");
                }
            }
            Err(err) => tracing::warn!(error = %err, "expiry sweep failed"),
        }
        if let Err(err) = agent.store.expire_due_approvals(now).await {
            tracing::warn!(error = %err, "approval expiry failed");
        }
    }
}

/// Runs due auto-sync jobs. Several agents may share a state database: each due job is claimed
/// by exactly one of them.
async fn scheduler(agent: Arc<dbsync_agent::Agent>) {
    let owner = dbsync_agent::Agent::scheduler_name();
    let mut ticker = tokio::time::interval(dbsync_agent::schedule::TICK);
    loop {
        ticker.tick().await;
        if let Err(err) = agent.run_due_jobs(&owner).await {
            tracing::warn!(error = %err, "the scheduler could not run");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupt received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
