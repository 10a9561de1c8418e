//! The agent's Prometheus metrics, in one registry per agent (no global state: several agents in
//! one process keep theirs apart). Counters move where the work happens; the gauges of what the
//! state database holds (transfers by status, approvals waiting, pool use) are read when the
//! metrics are rendered. Every label takes a value from a fixed set (a transport, a wire code, a
//! status, an outcome), so the number of series stays bounded whatever peers do.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Result;
use crate::store::Store;

/// The transport of a session (`ws`, `quic`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `ws` or `quic`.
    pub transport: String,
}

/// Bytes of a transport, on the wire (compressed) or raw.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    /// `ws` or `quic`.
    pub transport: String,
    /// `wire` or `raw`.
    pub kind: String,
}

/// A wire code (`invalid_token`, `ip_not_whitelisted`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The code.
    pub code: String,
}

/// A status or an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status.
    pub status: String,
}

fn pull_histogram() -> Histogram {
    // 50 ms to ~7 hours.
    Histogram::new(exponential_buckets(0.05, 2.0, 19))
}

/// The agent's metrics ([`Metrics::render`] for `/metrics`).
pub struct Metrics {
    registry: Registry,
    sessions_opened: Family<TransportLabel, Counter>,
    sessions_refused: Family<CodeLabel, Counter>,
    rows_sent: Family<TransportLabel, Counter>,
    bytes_sent: Family<BytesLabel, Counter>,
    rows_received: Family<TransportLabel, Counter>,
    bytes_received: Family<TransportLabel, Counter>,
    table_pulls: Family<StatusLabel, Histogram, fn() -> Histogram>,
    rate_limited: Counter,
    scheduler_runs: Family<StatusLabel, Counter>,
    scheduler_lag: Histogram,
    transfers: Family<StatusLabel, Gauge>,
    approvals_waiting: Gauge,
    pool: Family<StatusLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (each documented in docs/operations.md).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dbsync");
        let metrics = Self {
            sessions_opened: Family::default(),
            sessions_refused: Family::default(),
            rows_sent: Family::default(),
            bytes_sent: Family::default(),
            rows_received: Family::default(),
            bytes_received: Family::default(),
            table_pulls: Family::new_with_constructor(pull_histogram),
            rate_limited: Counter::default(),
            scheduler_runs: Family::default(),
            // 100 ms to ~1.8 hours.
            scheduler_lag: Histogram::new(exponential_buckets(0.1, 2.0, 17)),
            transfers: Family::default(),
            approvals_waiting: Gauge::default(),
            pool: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sessions_opened",
            "Data-plane sessions this site served that passed the access checks",
            metrics.sessions_opened.clone(),
        );
        registry.register(
            "sessions_refused",
            "Data-plane sessions this site refused when they opened, by wire code",
            metrics.sessions_refused.clone(),
        );
        registry.register(
            "rows_sent",
            "Rows this site sent to receivers",
            metrics.rows_sent.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes of row batches this site sent, on the wire (compressed) and raw",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "rows_received",
            "Rows this site received and applied",
            metrics.rows_received.clone(),
        );
        registry.register(
            "bytes_received",
            "Wire bytes of the row batches this site applied",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "table_pull_seconds",
            "Time to pull one table, by outcome (completed, failed)",
            metrics.table_pulls.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests this site refused over a connection's rate limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "scheduler_runs",
            "Scheduled syncs run by this site, by outcome (completed, failed)",
            metrics.scheduler_runs.clone(),
        );
        registry.register(
            "scheduler_lag_seconds",
            "How long after its due time a scheduled sync started",
            metrics.scheduler_lag.clone(),
        );
        registry.register(
            "transfers",
            "Transfers in this site's history, by status",
            metrics.transfers.clone(),
        );
        registry.register(
            "approvals_waiting",
            "Transfers waiting for this site's admin to approve them",
            metrics.approvals_waiting.clone(),
        );
        registry.register(
            "state_pool_connections",
            "Connections of the state database pool, by state (idle, in_use)",
            metrics.pool.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A session passed the access checks.
    pub fn session_opened(&self, transport: &str) {
        self.sessions_opened
            .get_or_create(&TransportLabel {
                transport: transport.to_owned(),
            })
            .inc();
    }

    /// A session was refused when it opened.
    pub fn session_refused(&self, code: dbsync_protocol::session::Code) {
        self.sessions_refused
            .get_or_create(&CodeLabel {
                code: code.as_str().to_owned(),
            })
            .inc();
    }

    /// A request over a connection's rate limit was refused.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// A batch left this site.
    pub fn batch_sent(&self, transport: &str, rows: u64, wire: u64, raw: u64) {
        let label = |kind: &str| BytesLabel {
            transport: transport.to_owned(),
            kind: kind.to_owned(),
        };
        self.rows_sent
            .get_or_create(&TransportLabel {
                transport: transport.to_owned(),
            })
            .inc_by(rows);
        self.bytes_sent.get_or_create(&label("wire")).inc_by(wire);
        self.bytes_sent.get_or_create(&label("raw")).inc_by(raw);
    }

    /// A batch was applied here.
    pub fn batch_received(&self, transport: &str, rows: u64, wire: u64) {
        let label = TransportLabel {
            transport: transport.to_owned(),
        };
        self.rows_received.get_or_create(&label).inc_by(rows);
        self.bytes_received.get_or_create(&label).inc_by(wire);
    }

    /// A table's pull ended after `seconds`.
    pub fn table_pulled(&self, completed: bool, seconds: f64) {
        self.table_pulls
            .get_or_create(&StatusLabel {
                status: if completed { "completed" } else { "failed" }.to_owned(),
            })
            .observe(seconds);
    }

    /// A scheduled sync started `seconds` after it was due.
    pub fn scheduler_started(&self, seconds: f64) {
        self.scheduler_lag.observe(seconds.max(0.0));
    }

    /// A scheduled sync ran.
    pub fn scheduler_ran(&self, completed: bool) {
        self.scheduler_runs
            .get_or_create(&StatusLabel {
                status: if completed { "completed" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format, the state database's gauges read now.
    pub async fn render(&self, store: &Store) -> Result<String> {
        let counts = store.transfer_status_counts().await?;
        let mut waiting = 0;
        for status in crate::transfer::TransferStatus::ALL {
            let count = counts
                .iter()
                .find(|(s, _)| s == status.as_str())
                .map_or(0, |(_, n)| *n);
            if *status == crate::transfer::TransferStatus::PendingApproval {
                waiting = count;
            }
            self.transfers
                .get_or_create(&StatusLabel {
                    status: status.as_str().to_owned(),
                })
                .set(count);
        }
        self.approvals_waiting.set(waiting);
        let (size, idle) = store.pool_usage();
        let gauge = |status: &str| {
            self.pool.get_or_create(&StatusLabel {
                status: status.to_owned(),
            })
        };
        gauge("idle").set(i64::from(idle));
        gauge("in_use").set(i64::from(size.saturating_sub(idle)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|err| crate::Error::Config(format!("encoding the metrics: {err}")))?;
        Ok(out)
    }
}
