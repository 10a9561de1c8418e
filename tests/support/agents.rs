//! Agents running in this process on real sockets (port 0), each with its own state database.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dbsync_admin::{AppState, server};
use dbsync_agent::{Agent, Config, Store, SystemClock};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{PgScratch, postgres_base_url};

/// A running agent.
pub struct RunningAgent {
    pub agent: Arc<Agent>,
    pub url: String,
    pub addr: SocketAddr,
    /// The state database (for running the binary on this agent's site).
    pub database_url: String,
    /// The agent's key file (likewise).
    pub key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
    scratch: Option<PgScratch>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Options for [`start`].
#[derive(Clone)]
pub struct Options {
    pub postgres: bool,
    pub allow_private_peers: bool,
    pub header_read_timeout_secs: u64,
    pub peer_rate_limit_per_minute: u32,
    pub max_body_bytes: usize,
    /// Bind this address instead of an ephemeral port.
    pub addr: Option<SocketAddr>,
    pub push_retry_secs: u64,
    /// The agent's clock (default: the system clock).
    pub clock: Option<dbsync_agent::clock::SharedClock>,
    /// Use this state database instead of a new one (a second agent on a shared database).
    pub database_url: Option<String>,
    /// And this key file (to read the tokens stored in it).
    pub key_file: Option<std::path::PathBuf>,
    /// Most rows per batch this agent sends (default: the config's).
    pub batch_rows: Option<i64>,
    /// Changes the agent's configuration before it starts.
    pub tweak: Option<fn(&mut Config)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            postgres: false,
            allow_private_peers: true,
            header_read_timeout_secs: 10,
            peer_rate_limit_per_minute: 1_000,
            max_body_bytes: 64 * 1024,
            addr: None,
            push_retry_secs: 30,
            clock: None,
            database_url: None,
            key_file: None,
            batch_rows: None,
            tweak: None,
        }
    }
}

/// Starts an agent, or returns `None` when it needs PostgreSQL and PostgreSQL tests are skipped.
pub async fn start(test: &str, options: Options) -> Option<RunningAgent> {
    let dir = tempfile::tempdir().unwrap();
    let (url, scratch) = if let Some(url) = &options.database_url {
        (url.clone(), None)
    } else if options.postgres {
        let base = postgres_base_url(test)?;
        let scratch = PgScratch::create(&base).await;
        (scratch.url.clone(), Some(scratch))
    } else {
        (
            format!("sqlite://{}", dir.path().join("state.db").display()),
            None,
        )
    };
    let listener = match options.addr {
        Some(addr) => TcpListener::bind(addr).await.unwrap(),
        None => free_tcp_and_udp_port().await,
    };
    let addr = listener.local_addr().unwrap();
    let mut config = Config {
        database_url: Some(url.clone()),
        key_file: Some(
            options
                .key_file
                .clone()
                .unwrap_or_else(|| dir.path().join("dbsync.key")),
        ),
        allow_private_peers: options.allow_private_peers,
        ..Config::default()
    };
    config.server.listen = addr;
    config.server.header_read_timeout_secs = options.header_read_timeout_secs;
    config.server.peer_rate_limit_per_minute = options.peer_rate_limit_per_minute;
    config.server.max_body_bytes = options.max_body_bytes;
    config.server.push_retry_secs = options.push_retry_secs;
    if let Some(rows) = options.batch_rows {
        config.server.batch_rows = rows;
    }
    if let Some(tweak) = options.tweak {
        tweak(&mut config);
    }
    let store = Store::connect(&url).await.unwrap();
    let url = url.clone();
    let clock = options
        .clock
        .clone()
        .unwrap_or_else(|| Arc::new(SystemClock));
    let agent = Arc::new(Agent::with_store(store, config, clock).unwrap());
    let (stop, task) = spawn_server(Arc::clone(&agent), listener).await;
    Some(RunningAgent {
        agent,
        url: format!("http://{addr}"),
        addr,
        database_url: url,
        key_file: dir.path().join("dbsync.key"),
        _dir: dir,
        scratch,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A listener on a port of loopback whose UDP twin is free too (QUIC binds it next): the
/// system picks a free TCP port, and another test's QUIC endpoint may hold the same number.
async fn free_tcp_and_udp_port() -> TcpListener {
    for _ in 0..50 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        if std::net::UdpSocket::bind(addr).is_ok() {
            return listener;
        }
    }
    panic!("no loopback port free for both TCP and UDP in 50 tries");
}

async fn spawn_server(
    agent: Arc<Agent>,
    listener: TcpListener,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let state = AppState::new(agent);
    let quic = server::bind_quic(&state).await.unwrap();
    let task = tokio::spawn(async move {
        server::serve_site(listener, state, quic, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (stop, task)
}

impl RunningAgent {
    /// Stops serving HTTP (the agent and its database stay).
    pub async fn pause(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    /// Serves HTTP again on the same address.
    pub async fn resume(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        let (stop, task) = spawn_server(Arc::clone(&self.agent), listener).await;
        self.stop = Some(stop);
        self.task = Some(task);
    }

    /// Stops the server, leaving a shared database to its owner.
    pub async fn pause_only(mut self) {
        self.pause().await;
        self.agent.store.close().await;
    }

    /// Stops the server and drops the scratch database.
    pub async fn stop(mut self) {
        self.pause().await;
        self.agent.store.close().await;
        if let Some(scratch) = self.scratch.take() {
            scratch.drop_database().await;
        }
    }
}

/// Runs `agent.pull(connection, options)` in a task that dies right after its `batches`-th batch
/// is committed, as a receiver killed there would (its sockets and transactions go with it).
/// Returns once the task is gone. (Aborting the task instead would stop it only at a later
/// await, by which time a fast pull may have finished.)
pub async fn pull_killed_after(
    agent: &Arc<Agent>,
    connection: &str,
    options: &dbsync_agent::pull::PullOptions,
    batches: usize,
) {
    let agent = Arc::clone(agent);
    let (connection, options) = (connection.to_owned(), options.clone());
    let task = tokio::spawn(async move {
        let mut seen = 0;
        agent
            .pull(&connection, &options, move |event| {
                if matches!(event, dbsync_agent::pull::PullEvent::Batch { .. }) {
                    seen += 1;
                    if seen == batches {
                        // Unwinds without the panic hook's report: this is the planned kill.
                        std::panic::resume_unwind(Box::new("killed by the test"));
                    }
                }
            })
            .await
    });
    let outcome = task.await;
    assert!(
        outcome.as_ref().is_err_and(|err| err.is_panic()),
        "the pull ended before its {batches}th batch: {outcome:?}"
    );
}
