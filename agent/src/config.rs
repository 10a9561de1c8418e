//! Agent configuration: `dbsync.toml`, overridden by `DBSYNC_*` environment variables, overridden
//! by command-line flags (applied by the binary).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The default state database: a SQLite file in the working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://dbsync.db";

/// Name of the key file created beside the state database when no key is configured.
pub const DEFAULT_KEY_FILE: &str = "dbsync.key";

/// A value that must never reach a log line or an error message.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call only where it is used, never to print.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Everything an agent reads at start-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// State database: `postgres://...` or `sqlite://path` (default [`DEFAULT_DATABASE_URL`]).
    pub database_url: Option<String>,
    /// 32-byte key, 64 hex characters, that encrypts the tokens this site holds as a receiver.
    /// When absent the key is read from (or created in) `key_file`.
    pub token_encryption_key: Option<Secret<String>>,
    /// Where the generated encryption key lives (mode 0600). Default: `dbsync.key` beside a SQLite
    /// state database, or in the working directory.
    pub key_file: Option<PathBuf>,
    /// Hours a transfer waiting for approval stays approvable (default 24).
    pub approval_ttl_hours: Option<i64>,
}

impl Config {
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
        if let Some(hours) = env("DBSYNC_APPROVAL_TTL_HOURS").and_then(|h| h.parse().ok()) {
            self.approval_ttl_hours = Some(hours);
        }
    }

    /// Refuses values that cannot work, with the field named.
    pub fn validate(&self) -> Result<()> {
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
        Ok(())
    }

    /// The state database URL in force.
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or(DEFAULT_DATABASE_URL)
    }

    /// The key file in force: the configured one, or `dbsync.key` beside a SQLite database file,
    /// or in the working directory.
    pub fn key_file(&self) -> PathBuf {
        if let Some(path) = &self.key_file {
            return path.clone();
        }
        let url = self.database_url();
        if let Some(file) = crate::store::sqlite_file(url)
            && let Some(dir) = file.parent()
            && !dir.as_os_str().is_empty()
        {
            return dir.join(DEFAULT_KEY_FILE);
        }
        PathBuf::from(DEFAULT_KEY_FILE)
    }

    /// How long a pending approval stays approvable.
    pub fn approval_ttl(&self) -> chrono::Duration {
        chrono::Duration::hours(self.approval_ttl_hours.unwrap_or(24))
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
            token_encryption_key: Some(Secret::new("00".repeat(32))),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("0000"));
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
