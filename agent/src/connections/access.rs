//! `validate_connection`: the gate every receiver session passes through on the sender.
//!
//! Checks run in the order of SPEC section 4, each with its stable error code: token well-formed
//! and known → status active → not expired → download limit → record limit → IP whitelist →
//! allowed hours → download password → rate limit. A malformed token is refused before any
//! database query.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dbsync_protocol::session::Code;

use crate::audit::Actor;
use crate::clock::SharedClock;
use crate::connection::{Connection, ConnectionStatus};
use crate::error::Error;
use crate::rate_limit::RateLimits;
use crate::store::Store;
use crate::token::Token;
use uuid::Uuid;

/// Why a session was refused. [`AccessDenied::code`] is the stable wire code.
#[derive(Debug, thiserror::Error)]
pub enum AccessDenied {
    /// The token is malformed or unknown.
    #[error("invalid token")]
    InvalidToken,
    /// The connection is not active.
    #[error("connection is {0}")]
    ConnectionNotActive(ConnectionStatus),
    /// The connection is past its expiry date (or was expired).
    #[error("connection has expired")]
    ConnectionExpired,
    /// `max_downloads` reached.
    #[error("download limit reached")]
    DownloadLimitExceeded,
    /// `max_records_total` reached.
    #[error("record limit reached")]
    RecordLimitExceeded,
    /// The client address is outside every whitelisted block.
    #[error("client address {0} is not whitelisted")]
    IpNotWhitelisted(IpAddr),
    /// Now is outside the connection's allowed hours.
    #[error("outside the allowed hours")]
    OutsideAllowedHours,
    /// A download password is set and none was given.
    #[error("a download password is required")]
    PasswordRequired,
    /// The download password given is wrong.
    #[error("wrong download password")]
    InvalidPassword,
    /// Too many requests; retry after the given time.
    #[error("rate limited; retry in {} s", .retry_after.as_secs_f64().ceil())]
    RateLimited {
        /// Time until the next request would pass.
        retry_after: Duration,
    },
    /// The state database failed while checking.
    #[error("internal error")]
    Internal(#[source] Error),
}

impl AccessDenied {
    /// The protocol's code for this refusal.
    pub fn wire_code(&self) -> Code {
        match self {
            Self::InvalidToken => Code::InvalidToken,
            Self::ConnectionNotActive(_) => Code::ConnectionNotActive,
            Self::ConnectionExpired => Code::ConnectionExpired,
            Self::DownloadLimitExceeded => Code::DownloadLimitExceeded,
            Self::RecordLimitExceeded => Code::RecordLimitExceeded,
            Self::IpNotWhitelisted(_) => Code::IpNotWhitelisted,
            Self::OutsideAllowedHours => Code::OutsideAllowedHours,
            Self::PasswordRequired => Code::PasswordRequired,
            Self::InvalidPassword => Code::InvalidPassword,
            Self::RateLimited { .. } => Code::RateLimited,
            Self::Internal(_) => Code::InternalError,
        }
    }

    /// The stable error code of SPEC section 4.
    pub fn code(&self) -> &'static str {
        self.wire_code().as_str()
    }
}

impl From<Error> for AccessDenied {
    fn from(err: Error) -> Self {
        Self::Internal(err)
    }
}

/// Download-password guesses allowed per connection in a minute (a burst of this many, then one
/// every 60 / N seconds), checked before any argon2 work.
pub const PASSWORD_GUESSES_PER_MINUTE: i64 = 5;
/// Wrong passwords in a row after which a connection refuses every guess for
/// [`PASSWORD_LOCKOUT`].
pub const PASSWORD_LOCKOUT_AFTER: u32 = 10;
/// How long a connection refuses password guesses after [`PASSWORD_LOCKOUT_AFTER`] wrong ones.
pub const PASSWORD_LOCKOUT: Duration = Duration::from_secs(15 * 60);

/// Wrong guesses in a row, and the end of the lockout they started (if any).
type Failures = (u32, Option<DateTime<Utc>>);

/// Wrong download passwords per connection: consecutive failures and a lockout.
#[derive(Debug, Default)]
struct PasswordFailures {
    by_connection: std::sync::Mutex<std::collections::HashMap<uuid::Uuid, Failures>>,
}

impl PasswordFailures {
    /// When the connection refuses guesses until, if it does now.
    fn locked_until(&self, id: uuid::Uuid, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let map = self.by_connection.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&id)
            .and_then(|(_, until)| *until)
            .filter(|until| *until > now)
    }

    /// Counts a wrong guess; returns the lockout's end when this one starts it.
    fn failed(&self, id: uuid::Uuid, now: DateTime<Utc>) -> (u32, Option<DateTime<Utc>>) {
        let mut map = self.by_connection.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(id).or_insert((0, None));
        if entry.1.is_some_and(|until| until <= now) {
            *entry = (0, None);
        }
        entry.0 += 1;
        if entry.0 >= PASSWORD_LOCKOUT_AFTER {
            let until = now
                + chrono::Duration::from_std(PASSWORD_LOCKOUT).unwrap_or(chrono::Duration::zero());
            *entry = (0, Some(until));
            return (PASSWORD_LOCKOUT_AFTER, Some(until));
        }
        (entry.0, None)
    }

    fn succeeded(&self, id: uuid::Uuid) {
        self.by_connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Validates receivers' requests against their sender connection.
#[derive(Debug, Clone)]
pub struct Validator {
    store: Store,
    clock: SharedClock,
    rate_limits: Arc<RateLimits>,
    /// Download-password guesses, a limiter per connection (its own, not the request limit).
    password_guesses: Arc<RateLimits>,
    password_failures: Arc<PasswordFailures>,
}

impl Validator {
    /// A validator over `store` whose rate limits read time from `clock`.
    pub fn new(store: Store, clock: SharedClock) -> Self {
        Self {
            store,
            clock: Arc::clone(&clock),
            rate_limits: Arc::new(RateLimits::new(Arc::clone(&clock))),
            password_guesses: Arc::new(RateLimits::new(clock)),
            password_failures: Arc::default(),
        }
    }

    /// Runs every check for a session opened with `token` from `client_ip` at `now`, with the
    /// download password the receiver offered (if any). On success the connection's
    /// `last_connected_at` is updated and the connection returned.
    pub async fn validate_connection(
        &self,
        token: &str,
        client_ip: IpAddr,
        now: DateTime<Utc>,
        password: Option<&str>,
    ) -> Result<Connection, AccessDenied> {
        let token = Token::parse(token).map_err(|_| AccessDenied::InvalidToken)?;
        let connection = self
            .store
            .find_sender_by_token(&token)
            .await?
            .ok_or(AccessDenied::InvalidToken)?;
        match connection.status {
            ConnectionStatus::Active => {}
            ConnectionStatus::Expired => return Err(AccessDenied::ConnectionExpired),
            other => return Err(AccessDenied::ConnectionNotActive(other)),
        }
        if connection.expires_at.is_some_and(|at| at <= now) {
            match self
                .store
                .expire_connection(&connection.id.to_string(), &Actor::system(), now)
                .await
            {
                Ok(_) | Err(Error::IllegalTransition { .. }) => {}
                Err(err) => return Err(err.into()),
            }
            return Err(AccessDenied::ConnectionExpired);
        }
        if connection
            .max_downloads
            .is_some_and(|max| connection.downloads_used >= max)
        {
            return Err(AccessDenied::DownloadLimitExceeded);
        }
        if connection
            .max_records_total
            .is_some_and(|max| connection.records_downloaded >= max)
        {
            return Err(AccessDenied::RecordLimitExceeded);
        }
        let refused = if !connection.ip_allowed(client_ip) {
            Some(AccessDenied::IpNotWhitelisted(client_ip))
        } else if !connection.within_allowed_hours(now) {
            Some(AccessDenied::OutsideAllowedHours)
        } else if connection.download_password_hash.is_some() && password.is_none_or(str::is_empty)
        {
            Some(AccessDenied::PasswordRequired)
        } else {
            None
        };
        if let Some(denied) = refused {
            self.record_refusal(&connection, &denied, client_ip, now)
                .await;
            return Err(denied);
        }
        if let Some(hash) = &connection.download_password_hash {
            let Some(given) = password.filter(|p| !p.is_empty()) else {
                return Err(AccessDenied::PasswordRequired);
            };
            self.check_password(&connection, given, hash, client_ip, now)
                .await?;
        }
        self.check_rate(&connection).await?;
        self.store.touch_connected(connection.id, now).await?;
        Ok(connection)
    }

    /// A session the connection's own rules refused (address, hours, password missing): logged
    /// at the default level and audited, with the address seen.
    async fn record_refusal(
        &self,
        connection: &Connection,
        denied: &AccessDenied,
        client_ip: IpAddr,
        now: DateTime<Utc>,
    ) {
        let code = denied.wire_code();
        tracing::warn!(connection_id = %connection.id, client = %client_ip, code = %code.as_str(), "session refused");
        let event = crate::audit::NewEvent::connection(
            &Actor::remote(&connection.site_url),
            "session.refused",
            connection.id,
            now,
        )
        .detail(serde_json::json!({ "code": code.as_str(), "client_ip": client_ip.to_string() }));
        if let Err(err) = self.store.record_event(event).await {
            tracing::warn!(error = %err, "could not audit a refused session");
        }
    }

    /// Checks a download password guess: refused without hashing while the connection is locked
    /// out or over [`PASSWORD_GUESSES_PER_MINUTE`]; a wrong guess is audited, and the
    /// [`PASSWORD_LOCKOUT_AFTER`]th in a row locks the connection's password for
    /// [`PASSWORD_LOCKOUT`].
    async fn check_password(
        &self,
        connection: &Connection,
        given: &str,
        hash: &str,
        client_ip: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<(), AccessDenied> {
        if let Some(until) = self.password_failures.locked_until(connection.id, now) {
            let retry_after = (until - now).to_std().unwrap_or(PASSWORD_LOCKOUT);
            return Err(AccessDenied::RateLimited { retry_after });
        }
        let guesses = uuid::Uuid::new_v5(&connection.id, b"dbsync password guesses");
        self.take(&self.password_guesses, guesses, PASSWORD_GUESSES_PER_MINUTE)
            .await?;
        // argon2 takes tens of milliseconds of CPU: off the async workers.
        let (given, hash) = (given.to_owned(), hash.to_owned());
        let right = tokio::task::spawn_blocking(move || crate::password::verify(&given, &hash))
            .await
            .unwrap_or(false);
        if right {
            self.password_failures.succeeded(connection.id);
            return Ok(());
        }
        let (in_a_row, locked_until) = self.password_failures.failed(connection.id, now);
        let action = if locked_until.is_some() {
            "password_locked"
        } else {
            "password_failed"
        };
        let event = crate::audit::NewEvent::connection(
            &Actor::remote(&connection.site_url),
            action,
            connection.id,
            now,
        )
        .detail(serde_json::json!({
            "client_ip": client_ip.to_string(),
            "failures_in_a_row": in_a_row,
            "locked_until": locked_until,
        }));
        if let Err(err) = self.store.record_event(event).await {
            tracing::warn!(error = %err, "could not audit a wrong download password");
        }
        if locked_until.is_some() {
            tracing::warn!(connection_id = %connection.id, client = %client_ip, "download password locked after repeated wrong guesses");
        }
        Err(AccessDenied::InvalidPassword)
    }

    /// Drops the rate-limit state of a deleted connection.
    pub fn forget(&self, connection_id: uuid::Uuid) {
        self.rate_limits.forget(connection_id);
    }

    /// Counts one request (list, describe, pull) against the connection's rate limit.
    pub async fn check_rate(&self, connection: &Connection) -> Result<(), AccessDenied> {
        self.take(
            &self.rate_limits,
            connection.id,
            connection.rate_limit_per_minute,
        )
        .await
    }

    /// One request for `key`: in the state database on PostgreSQL (shared by every agent of
    /// the site), in `local` on SQLite.
    async fn take(
        &self,
        local: &RateLimits,
        key: Uuid,
        per_minute: i64,
    ) -> Result<(), AccessDenied> {
        let outcome = match self.store.engine() {
            crate::store::Engine::Postgres => {
                self.store
                    .take_rate(key, per_minute, self.clock.now())
                    .await?
            }
            crate::store::Engine::Sqlite => local.check(key, per_minute),
        };
        outcome.map_err(|retry_after| AccessDenied::RateLimited { retry_after })
    }
}
