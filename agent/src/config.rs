//! Agent configuration: `dbsync.toml`, overridden by `DBSYNC_*` environment variables, overridden
//! by command-line flags (applied by the binary).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The default state database: a SQLite file in the working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://dbsync.db";

/// Name of the key file created beside the state database when no key is configured.
pub const DEFAULT_KEY_FILE: &str = "dbsync.key";

pub use crate::secret::Secret;

/// Everything an agent reads at start-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// State database: `postgres://...` or `sqlite://path` (default [`DEFAULT_DATABASE_URL`]).
    pub database_url: Option<String>,
    /// 32-byte key, 64 hex characters, that encrypts the tokens this site holds as a receiver.
    /// When absent the key is read from (or created in) `key_file`.
    pub token_encryption_key: Option<Secret<String>>,
    /// Where the generated encryption key lives (mode 0600). Default: `dbsync.key` in
    /// [`Config::data_dir`].
    pub key_file: Option<PathBuf>,
    /// The directory of the agent's own files (the generated key, the self-signed QUIC
    /// certificate). Default: beside a SQLite state database; with a PostgreSQL one,
    /// `$STATE_DIRECTORY` (systemd) or `$XDG_STATE_HOME/dbsync/<database>`
    /// (`~/.local/state/dbsync/<database>`), one directory per state database.
    pub data_dir: Option<PathBuf>,
    /// Hours a transfer waiting for approval stays approvable (default 24).
    pub approval_ttl_hours: Option<i64>,
    /// Public base URL of this site, as peers reach it (default: `http://` + the listen
    /// address, or the site URL stored with `dbsync settings site`).
    pub site_url: Option<String>,
    /// Allow peers on loopback, private and link-local addresses (tests, demos, private networks).
    pub allow_private_peers: bool,
    /// Seconds this site, pulling or verifying, waits for a sender's next message before it
    /// counts the session as broken off (default 300): a sender that stops answering ends the
    /// pull with `unreachable` (retried within `--retry-for`), never a hang.
    pub answer_timeout_secs: Option<u64>,
    /// The HTTP server of `dbsync serve`.
    pub server: ServerConfig,
    /// The QUIC transport.
    pub quic: crate::quic::QuicConfig,
}

/// `[server]`: the HTTP surface of `dbsync serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDR blocks).
    pub trusted_proxies: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Seconds a client has to send its request headers (closes slow-header attacks).
    pub header_read_timeout_secs: u64,
    /// Seconds a request may take in all.
    pub request_timeout_secs: u64,
    /// Requests per minute per client IP on the peer API.
    pub peer_rate_limit_per_minute: u32,
    /// Seconds between retries of status changes a peer has not acknowledged yet (first retry;
    /// later ones back off exponentially up to an hour).
    pub push_retry_secs: u64,
    /// zstd level of the row batches this site sends (1 fastest .. 19 smallest); 0 (the
    /// default, `auto`): chosen batch by batch from the link's drain rate against compression
    /// speed (`link::AdaptiveLevel`).
    pub zstd_level: i32,
    /// Most rows per batch this site sends (a batch also stops near 4 MiB of values). 20,000:
    /// on a users-like table, pulls took ~20 % less time than at 5,000, for ~30 MiB more peak
    /// memory on the sender (docs/performance.md).
    pub batch_rows: i64,
    /// Connections (TCP and QUIC) open at once; more are closed as they arrive. 0: a quarter of
    /// the process's open-file limit (at least 16, at most 4,096).
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// Data-plane sessions open at once (both transports); more are refused with
    /// `too_many_sessions`. 0: like `max_connections`.
    pub max_sessions: usize,
    /// Data-plane sessions open at once from one client address.
    pub max_sessions_per_ip: usize,
    /// Seconds a connection may stay silent once it has sent its first byte (between requests,
    /// or inside a WebSocket session) before it is closed. Before the first byte the limit is
    /// `header_read_timeout_secs`. Longer than a session's own idle limit (300 s), which ends
    /// a session first with a `timeout` error.
    pub idle_timeout_secs: u64,
    /// Seconds a data-plane session may go without a request (pings do not count) before the
    /// sender ends it with `timeout`; a sender waiting for a credit waits as long.
    pub session_idle_timeout_secs: u64,
}

impl ServerConfig {
    /// `max_connections`, with 0 resolved from the open-file limit.
    pub fn connection_cap(&self) -> usize {
        resolve_cap(self.max_connections)
    }

    /// `max_sessions`, with 0 resolved from the open-file limit.
    pub fn session_cap(&self) -> usize {
        resolve_cap(self.max_sessions)
    }
}

/// A configured cap, or a quarter of the open-file limit (16..=4,096) when it is 0.
fn resolve_cap(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let files = crate::admission::open_files_limit().unwrap_or(1024);
    usize::try_from(files / 4).unwrap_or(4096).clamp(16, 4096)
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 4860)),
            trusted_proxies: Vec::new(),
            max_body_bytes: 64 * 1024,
            header_read_timeout_secs: 10,
            request_timeout_secs: 30,
            peer_rate_limit_per_minute: 120,
            push_retry_secs: 30,
            zstd_level: 0,
            batch_rows: 20_000,
            max_connections: 0,
            max_connections_per_ip: 64,
            max_sessions: 0,
            max_sessions_per_ip: 16,
            idle_timeout_secs: 330,
            session_idle_timeout_secs: 300,
        }
    }
}

impl Config {
    /// [`Config::answer_timeout_secs`], or its default.
    pub fn answer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.answer_timeout_secs.unwrap_or(300))
    }

    /// Reads `path` when given (a missing explicit file is an error), then applies `DBSYNC_*`
    /// environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|err| {
                    Error::Config(format!("{}: {}", path.display(), err.message()))
                })?
            }
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok());
        config.validate()?;
        Ok(config)
    }

    /// Applies `DBSYNC_DATABASE_URL`, `DBSYNC_TOKEN_ENCRYPTION_KEY`, `DBSYNC_KEY_FILE` and
    /// `DBSYNC_APPROVAL_TTL_HOURS` from `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(url) = env("DBSYNC_DATABASE_URL") {
            self.database_url = Some(url);
        }
        if let Some(key) = env("DBSYNC_TOKEN_ENCRYPTION_KEY") {
            self.token_encryption_key = Some(Secret::new(key));
        }
        if let Some(path) = env("DBSYNC_KEY_FILE") {
            self.key_file = Some(PathBuf::from(path));
        }
        if let Some(path) = env("DBSYNC_DATA_DIR") {
            self.data_dir = Some(PathBuf::from(path));
        }
        if let Some(hours) = env("DBSYNC_APPROVAL_TTL_HOURS").and_then(|h| h.parse().ok()) {
            self.approval_ttl_hours = Some(hours);
        }
        if let Some(url) = env("DBSYNC_SITE_URL") {
            self.site_url = Some(url);
        }
        if let Some(listen) = env("DBSYNC_LISTEN").and_then(|l| l.parse().ok()) {
            self.server.listen = listen;
        }
        if let Some(level) = env("DBSYNC_ZSTD_LEVEL")
            .and_then(|l| if l == "auto" { Some(0) } else { l.parse().ok() })
        {
            self.server.zstd_level = level;
        }
        if let Some(rows) = env("DBSYNC_BATCH_ROWS").and_then(|r| r.parse().ok()) {
            self.server.batch_rows = rows;
        }
        if let Some(secs) = env("DBSYNC_ANSWER_TIMEOUT_SECS").and_then(|s| s.parse().ok()) {
            self.answer_timeout_secs = Some(secs);
        }
        if let Some(allow) = env("DBSYNC_ALLOW_PRIVATE_PEERS") {
            self.allow_private_peers = matches!(allow.as_str(), "1" | "true" | "yes");
        }
    }

    /// Refuses values that cannot work, with the field named.
    pub fn validate(&self) -> Result<()> {
        if !(0..=19).contains(&self.server.zstd_level) {
            return Err(Error::Config(
                "server.zstd_level must be between 1 and 19, or 0 (chosen as the link allows)"
                    .into(),
            ));
        }
        if !(1..=100_000).contains(&self.server.batch_rows) {
            return Err(Error::Config(
                "server.batch_rows must be between 1 and 100000".into(),
            ));
        }
        if let Some(key) = &self.token_encryption_key {
            crate::vault::parse_key(key.expose())?;
        }
        if let Some(url) = &self.database_url {
            crate::store::Engine::from_url(url)?;
        }
        if let Some(hours) = self.approval_ttl_hours
            && hours <= 0
        {
            return Err(Error::Config("approval_ttl_hours must be > 0".into()));
        }
        if self.answer_timeout_secs == Some(0) {
            return Err(Error::Config("answer_timeout_secs must be > 0".into()));
        }
        if let Some(url) = &self.site_url {
            crate::connection::normalize_site_url(url)
                .map_err(|err| Error::Config(format!("site_url: {err}")))?;
        }
        for proxy in &self.server.trusted_proxies {
            crate::connection::parse_cidr(proxy)
                .map_err(|err| Error::Config(format!("server.trusted_proxies: {err}")))?;
        }
        let server = &self.server;
        if server.max_body_bytes == 0
            || server.header_read_timeout_secs == 0
            || server.request_timeout_secs == 0
            || server.peer_rate_limit_per_minute == 0
            || server.push_retry_secs == 0
            || server.max_connections_per_ip == 0
            || server.max_sessions_per_ip == 0
            || server.idle_timeout_secs == 0
            || server.session_idle_timeout_secs == 0
        {
            return Err(Error::Config(
                "server limits and timeouts must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// The state database URL in force.
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    /// The key file in force: the configured one, or `dbsync.key` in [`Config::data_dir`]. An
    /// agent on PostgreSQL whose key an earlier version made in the working directory keeps
    /// using it (with a warning) until it is moved.
    pub fn key_file(&self) -> PathBuf {
        if let Some(path) = &self.key_file {
            return path.clone();
        }
        let dir = self.data_dir_with(|name| std::env::var_os(name));
        let file = dir.join(DEFAULT_KEY_FILE);
        let legacy = Path::new(DEFAULT_KEY_FILE);
        if self.data_dir.is_none()
            && crate::store::sqlite_file(self.database_url()).is_none()
            && !file.exists()
            && legacy.exists()
        {
            tracing::warn!(
                "using ./{DEFAULT_KEY_FILE} from the working directory; move it to {} or set data_dir",
                dir.display()
            );
            return legacy.to_path_buf();
        }
        file
    }

    /// The directory of the agent's own files in force (see the field).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir_with(|name| std::env::var_os(name))
    }

    fn data_dir_with(&self, env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let url = self.database_url();
        if let Some(file) = crate::store::sqlite_file(url) {
            return match file.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            };
        }
        // systemd's StateDirectory= (several are separated by ':'; the first is ours).
        if let Some(dirs) = env("STATE_DIRECTORY")
            && let Some(first) = dirs.to_string_lossy().split(':').next()
            && !first.is_empty()
        {
            return PathBuf::from(first);
        }
        let base = env("XDG_STATE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| Path::new(&home).join(".local/state")));
        match base {
            Some(base) => base.join("dbsync").join(database_label(url)),
            None => PathBuf::from("."),
        }
    }

    /// The site URL in force when none is stored in the settings: configured, or derived from
    /// the listen address.
    pub fn default_site_url(&self) -> String {
        match &self.site_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.server.listen),
        }
    }

    /// How long a pending approval stays approvable.
    pub fn approval_ttl(&self) -> chrono::Duration {
        chrono::Duration::hours(self.approval_ttl_hours.unwrap_or(24))
    }
}

/// A directory name for a server state database: host, port and database of its URL, without
/// user, password or options.
fn database_label(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let label: String = rest
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "default".to_owned()
    } else {
        label.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values() {
        let mut config: Config = toml::from_str("database_url = \"sqlite://a.db\"").unwrap();
        config.apply_env(|name| (name == "DBSYNC_DATABASE_URL").then(|| "sqlite://b.db".into()));
        assert_eq!(config.database_url(), "sqlite://b.db");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("databse_url = \"x\"").is_err());
    }

    #[test]
    fn secret_never_prints() {
        let config = Config {
            token_encryption_key: Some(Secret::new("ab".repeat(32))),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("abab"));
    }

    #[test]
    fn a_postgres_state_database_has_a_directory_of_its_own() {
        let config = |url: &str| Config {
            database_url: Some(url.into()),
            ..Config::default()
        };
        let home = |name: &str| (name == "HOME").then(|| "/home/op".into());
        let a = config("postgres://sync:pw@db.example:5432/site_a?sslmode=require");
        let b = config("postgres://sync:pw@db.example:5432/site_b");
        let dir_a = a.data_dir_with(home);
        assert_eq!(
            dir_a,
            PathBuf::from("/home/op/.local/state/dbsync/db-example-5432-site_a".replace('_', "-"))
        );
        assert_ne!(
            dir_a,
            b.data_dir_with(home),
            "one directory per state database"
        );
        assert!(!dir_a.to_string_lossy().contains("pw"));
        let systemd = |name: &str| (name == "STATE_DIRECTORY").then(|| "/var/lib/dbsync".into());
        assert_eq!(a.data_dir_with(systemd), PathBuf::from("/var/lib/dbsync"));
        let configured = Config {
            data_dir: Some("/srv/dbsync".into()),
            ..a.clone()
        };
        assert_eq!(
            configured.key_file(),
            PathBuf::from("/srv/dbsync/dbsync.key")
        );
        let sqlite = config("sqlite://dbsync.db");
        assert_eq!(sqlite.data_dir_with(home), PathBuf::from("."));
    }

    #[test]
    fn key_file_sits_beside_sqlite_database() {
        let config = Config {
            database_url: Some("sqlite:///var/lib/dbsync/state.db".into()),
            ..Config::default()
        };
        assert_eq!(
            config.key_file(),
            PathBuf::from("/var/lib/dbsync/dbsync.key")
        );
    }
}
