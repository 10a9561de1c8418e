//! Connections: the permanent relationship with one remote site, and its lifecycle.
//!
//! Every status change is one conditional `UPDATE ... WHERE status IN (...)`, so two operators
//! racing cannot both win, followed by an audit event in the same transaction.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};
use crate::token::Token;
use crate::vault::Vault;

pub use super::controls::{
    ConnectionSettings, DEFAULT_AUTO_SYNC_INTERVAL_MINUTES, DEFAULT_MAX_RECORDS_PER_REQUEST,
    DEFAULT_RATE_LIMIT_PER_MINUTE, MAX_NAME_LEN, canonical_ip, parse_cidr,
};

string_enum! {
    /// Which side of the relationship this site is on.
    pub enum Direction {
        /// "I allow that site to pull from me."
        Sender => "sender",
        /// "I can pull from that site."
        Receiver => "receiver",
    }
}

string_enum! {
    /// Where a connection is in its lifecycle (SPEC section 4).
    pub enum ConnectionStatus {
        /// Created, not yet usable.
        Pending => "pending",
        /// Usable.
        Active => "active",
        /// Temporarily off.
        Suspended => "suspended",
        /// Permanently off.
        Revoked => "revoked",
        /// Past its expiry date or a lifetime limit; permanently off.
        Expired => "expired",
    }
}

string_enum! {
    /// How table transfers under a sender connection get approved.
    pub enum ApprovalMode {
        /// Every transfer goes at once.
        AutoApprove => "auto_approve",
        /// Every transfer waits for an admin.
        RequireApproval => "require_approval",
        /// Tables in `auto_approve_tables` go at once, others wait.
        PerTable => "per_table",
    }
}

string_enum! {
    /// What the receiver does with a row whose key it already holds.
    pub enum ConflictStrategy {
        /// Keep the local row.
        Skip => "skip",
        /// Sender wins.
        Overwrite => "overwrite",
        /// Sender wins except where it sends null.
        Merge => "merge",
        /// Insert without key (keyless logs).
        Append => "append",
        /// Overwrite, then delete local rows the sender no longer has.
        Mirror => "mirror",
        /// The whole table replaced in one transaction once every row is here (any table,
        /// keyless ones too); chosen per pull, never a connection's default.
        Replace => "replace",
    }
}

/// A connection as stored. Secrets (token hash, encrypted token, password hash) are never
/// serialized; the JSON carries only whether they are set.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Connection {
    /// Stable identifier.
    pub id: Uuid,
    /// Unique human name; connections are addressed by id or by name.
    pub name: String,
    /// Sender or receiver.
    #[sqlx(try_from = "String")]
    pub direction: Direction,
    /// The remote site's base URL.
    pub site_url: String,
    /// Lifecycle status.
    #[sqlx(try_from = "String")]
    pub status: ConnectionStatus,
    /// SHA-256 of the token (sender side). Never serialized.
    #[serde(skip)]
    pub token_hash: Option<Vec<u8>>,
    /// First characters of the token, for display.
    pub token_prefix: Option<String>,
    /// The receiver's copy of the token, encrypted. Serialized only as "is it stored".
    #[serde(rename = "token_stored", serialize_with = "is_set")]
    pub token_ciphertext: Option<Vec<u8>>,
    /// The receiver's copy of the sender's download password, encrypted (pulls without a
    /// password given use it). Serialized only as "is it stored".
    #[serde(rename = "download_password_stored", serialize_with = "is_set")]
    #[sqlx(default)]
    pub download_password_ciphertext: Option<Vec<u8>>,
    /// Approval mode for table transfers.
    #[sqlx(try_from = "String")]
    pub approval_mode: ApprovalMode,
    /// Tables offered (empty: all not excluded).
    #[sqlx(json)]
    pub allowed_tables: Vec<String>,
    /// Tables never offered.
    #[sqlx(json)]
    pub excluded_tables: Vec<String>,
    /// Tables that skip approval in `per_table` mode.
    #[sqlx(json)]
    pub auto_approve_tables: Vec<String>,
    /// Table transfers allowed in total (none: unlimited).
    pub max_downloads: Option<i64>,
    /// Table transfers started so far.
    pub downloads_used: i64,
    /// Rows allowed in total (none: unlimited).
    pub max_records_total: Option<i64>,
    /// Rows sent so far.
    pub records_downloaded: i64,
    /// Rows in one pull request.
    pub max_records_per_request: i64,
    /// Requests per minute.
    pub rate_limit_per_minute: i64,
    /// argon2id hash of the download password. Serialized only as "is it set".
    #[serde(rename = "download_password_set", serialize_with = "is_set")]
    pub download_password_hash: Option<String>,
    /// CIDR blocks allowed to connect (empty: all).
    #[sqlx(json)]
    pub ip_whitelist: Vec<String>,
    /// First allowed hour (0-23) in `time_zone`.
    pub allowed_hours_start: Option<i64>,
    /// Hour the window closes (0-23, exclusive) in `time_zone`; may be before the start (wraps
    /// midnight).
    pub allowed_hours_end: Option<i64>,
    /// IANA time zone of the allowed hours.
    pub time_zone: String,
    /// When the connection stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// Strategy used when a pull names none.
    #[sqlx(try_from = "String")]
    pub default_conflict_strategy: ConflictStrategy,
    /// Whether the scheduler pulls on its own.
    pub auto_sync_enabled: bool,
    /// Tables the scheduler pulls.
    #[sqlx(json)]
    pub auto_sync_tables: Vec<String>,
    /// Minutes between scheduled pulls.
    pub auto_sync_interval_minutes: i64,
    /// Actor that created it.
    pub created_by: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Actor that approved it.
    pub approved_by: Option<String>,
    /// When it was approved.
    pub approved_at: Option<DateTime<Utc>>,
    /// Actor that suspended it.
    pub suspended_by: Option<String>,
    /// When it was suspended.
    pub suspended_at: Option<DateTime<Utc>>,
    /// Why it was suspended.
    pub suspended_reason: Option<String>,
    /// Actor that revoked it.
    pub revoked_by: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Why it was revoked.
    pub revoked_reason: Option<String>,
    /// Last successful session open.
    pub last_connected_at: Option<DateTime<Utc>>,
    /// Last transfer completion.
    pub last_transfer_at: Option<DateTime<Utc>>,
    /// Completed transfers.
    pub total_transfers: i64,
    /// Rows moved by completed transfers.
    pub total_records: i64,
    /// Wire bytes moved by completed transfers.
    pub total_bytes: i64,
    /// Free-form facts (registration outcome, peer notifications).
    #[sqlx(json)]
    pub metadata: serde_json::Value,
}

/// What a stored download password is bound to: not the connection's id itself (its token's
/// binding), so neither ciphertext opens in the other's place.
fn password_binding(connection_id: Uuid) -> Uuid {
    Uuid::new_v5(&connection_id, b"dbsync download password")
}

fn is_set<T, S: serde::Serializer>(value: &Option<T>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bool(value.is_some())
}

impl Connection {
    /// The sender-side controls as settings (the download password is not recoverable and is
    /// left unset; see [`PasswordChange`]).
    pub fn settings(&self) -> ConnectionSettings {
        ConnectionSettings {
            approval_mode: self.approval_mode,
            allowed_tables: self.allowed_tables.clone(),
            excluded_tables: self.excluded_tables.clone(),
            auto_approve_tables: self.auto_approve_tables.clone(),
            max_downloads: self.max_downloads,
            max_records_total: self.max_records_total,
            max_records_per_request: self.max_records_per_request,
            rate_limit_per_minute: self.rate_limit_per_minute,
            download_password: None,
            ip_whitelist: self.ip_whitelist.clone(),
            allowed_hours: match (self.allowed_hours_start, self.allowed_hours_end) {
                (Some(start), Some(end)) => Some((start as u8, end as u8)),
                _ => None,
            },
            time_zone: self.time_zone.clone(),
            expires_at: self.expires_at,
            default_conflict_strategy: self.default_conflict_strategy,
            auto_sync_enabled: self.auto_sync_enabled,
            auto_sync_tables: self.auto_sync_tables.clone(),
            auto_sync_interval_minutes: self.auto_sync_interval_minutes,
        }
    }

    /// Whether `table` is offered to the receiver (not excluded, and allowed when a list is set).
    pub fn offers_table(&self, table: &str) -> bool {
        !crate::catalog::is_internal_table(table)
            && !self.excluded_tables.iter().any(|t| t == table)
            && (self.allowed_tables.is_empty() || self.allowed_tables.iter().any(|t| t == table))
    }

    /// Whether a transfer of `table` must wait for an admin.
    pub fn table_requires_approval(&self, table: &str) -> bool {
        match self.approval_mode {
            ApprovalMode::AutoApprove => false,
            ApprovalMode::RequireApproval => true,
            ApprovalMode::PerTable => !self.auto_approve_tables.iter().any(|t| t == table),
        }
    }

    /// Whether `ip` falls inside the whitelist (an empty whitelist allows every address).
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.ip_whitelist.is_empty()
            || self
                .ip_whitelist
                .iter()
                .filter_map(|cidr| cidr.parse::<IpNet>().ok())
                .any(|net| net.contains(&ip))
    }

    /// Whether `now` is inside the allowed hours, read in the connection's time zone. The window
    /// is `[start, end)` and wraps midnight when `end < start`.
    pub fn within_allowed_hours(&self, now: DateTime<Utc>) -> bool {
        let (Some(start), Some(end)) = (self.allowed_hours_start, self.allowed_hours_end) else {
            return true;
        };
        let tz: chrono_tz::Tz = self.time_zone.parse().unwrap_or(chrono_tz::UTC);
        let hour = i64::from(chrono::Timelike::hour(&now.with_timezone(&tz)));
        if start <= end {
            (start..end).contains(&hour)
        } else {
            hour >= start || hour < end
        }
    }
}

/// What to do with the download password when settings change.
#[derive(Debug, Clone)]
pub enum PasswordChange {
    /// Leave it as it is.
    Keep,
    /// Set a new one (hashed before storing).
    Set(crate::secret::Secret<String>),
    /// Remove it.
    Clear,
}

/// A sender connection to create.
#[derive(Debug, Clone)]
pub struct NewConnection {
    /// Unique name.
    pub name: String,
    /// The remote site's base URL (http or https).
    pub site_url: String,
    /// Sender-side controls.
    pub settings: ConnectionSettings,
}

/// Validates a name: non-empty, bounded, no control characters, not a UUID (ids and names must
/// not be confusable).
fn validate_name(name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            format!("must be 1-{MAX_NAME_LEN} printable characters"),
        ));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err(Error::invalid("name", "must not look like a connection id"));
    }
    Ok(())
}

/// Normalizes a site URL: http(s) only, no query or fragment, no trailing slash.
pub fn normalize_site_url(url: &str) -> Result<String> {
    let url = url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::invalid("site_url", "must start with http:// or https://"))?;
    if rest.is_empty()
        || rest.starts_with('/')
        || rest.contains(['?', '#', ' '])
        || rest.contains('@')
    {
        return Err(Error::invalid(
            "site_url",
            "must be a base URL with a host and no credentials, query or fragment",
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A receiver connection to store: "I can pull from that site with this token".
#[derive(Debug, Clone, Copy)]
pub struct NewReceiver<'a> {
    /// Unique name.
    pub name: &'a str,
    /// The sending site's base URL.
    pub site_url: &'a str,
    /// The token in clear, as the sender issued it; checked and encrypted before storing.
    pub token: &'a str,
    /// `Active` for a manual hand-over, `Pending` when registration awaits approval.
    pub status: ConnectionStatus,
    /// The token the sending site will present on status updates (only its hash is kept).
    pub peer_token: Option<&'a Token>,
    /// Facts to keep in the connection's metadata.
    pub metadata: Option<&'a serde_json::Value>,
}

/// A freshly created sender connection and its token, which is never retrievable again.
#[derive(Debug)]
pub struct CreatedConnection {
    /// The stored connection.
    pub connection: Connection,
    /// The token in clear, to show once.
    pub token: Token,
}

/// Filter for [`Store::list_connections`].
#[derive(Debug, Clone, Default)]
pub struct ConnectionFilter {
    /// Only this status.
    pub status: Option<ConnectionStatus>,
    /// Only this direction.
    pub direction: Option<Direction>,
}

fn unique_violation(err: sqlx::Error, name: &str, site_url: &str, direction: Direction) -> Error {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let message = db.message();
            if message.contains("name") {
                Error::Conflict(format!("a connection named {name:?} already exists"))
            } else {
                Error::Conflict(format!(
                    "a {direction} connection to {site_url} already exists"
                ))
            }
        }
        _ => Error::Database(err),
    }
}

impl Store {
    /// Creates a sender connection (status `pending` until the remote confirms or an operator
    /// approves it) and returns its token, shown once.
    pub async fn create_sender(
        &self,
        new: NewConnection,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<CreatedConnection> {
        validate_name(&new.name)?;
        let site_url = normalize_site_url(&new.site_url)?;
        let whitelist = new.settings.validate()?;
        let password_hash = match &new.settings.download_password {
            Some(password) => Some(crate::password::hash(password.expose())?),
            None => None,
        };
        let token = Token::generate();
        let id = Uuid::new_v4();
        let now = to_micros(now);
        let s = &new.settings;
        let (hours_start, hours_end) = match s.allowed_hours {
            Some((start, end)) => (Some(i64::from(start)), Some(i64::from(end))),
            None => (None, None),
        };
        let connection = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let connection: Connection = sqlx::query_as(
                "INSERT INTO dbsync_connections (id, name, direction, site_url, status, token_hash, token_prefix, \
                 approval_mode, allowed_tables, excluded_tables, auto_approve_tables, max_downloads, \
                 max_records_total, max_records_per_request, rate_limit_per_minute, download_password_hash, \
                 ip_whitelist, allowed_hours_start, allowed_hours_end, time_zone, expires_at, \
                 default_conflict_strategy, auto_sync_enabled, auto_sync_tables, auto_sync_interval_minutes, \
                 created_by, created_at, updated_at) \
                 VALUES ($1, $2, 'sender', $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $25) RETURNING *",
            )
            .bind(id)
            .bind(&new.name)
            .bind(&site_url)
            .bind(token.hash())
            .bind(token.display_prefix())
            .bind(s.approval_mode.as_str())
            .bind(Json(&s.allowed_tables))
            .bind(Json(&s.excluded_tables))
            .bind(Json(&s.auto_approve_tables))
            .bind(s.max_downloads)
            .bind(s.max_records_total)
            .bind(s.max_records_per_request)
            .bind(s.rate_limit_per_minute)
            .bind(&password_hash)
            .bind(Json(&whitelist))
            .bind(hours_start)
            .bind(hours_end)
            .bind(&s.time_zone)
            .bind(s.expires_at.map(to_micros))
            .bind(s.default_conflict_strategy.as_str())
            .bind(s.auto_sync_enabled)
            .bind(Json(&s.auto_sync_tables))
            .bind(s.auto_sync_interval_minutes)
            .bind(actor.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| unique_violation(err, &new.name, &site_url, Direction::Sender))?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.created", id, now)
                    .detail(serde_json::json!({ "name": new.name, "direction": "sender", "site_url": site_url })),
            )
            .await?;
            tx.commit().await?;
            connection
        });
        Ok(CreatedConnection { connection, token })
    }

    /// Stores a receiver connection with a token handed over manually (or received at
    /// registration). The token is checked for shape and checksum, then encrypted at rest.
    pub async fn add_receiver(
        &self,
        new: NewReceiver<'_>,
        vault: &Vault,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let NewReceiver {
            name,
            site_url,
            token,
            status,
            peer_token,
            metadata,
        } = new;
        validate_name(name)?;
        let site_url = normalize_site_url(site_url)?;
        let token = Token::parse(token).map_err(|err| Error::invalid("token", err.to_string()))?;
        if !matches!(status, ConnectionStatus::Pending | ConnectionStatus::Active) {
            return Err(Error::invalid(
                "status",
                "a new connection is pending or active",
            ));
        }
        let id = Uuid::new_v4();
        let sealed = vault.seal(id, token.expose())?;
        let now = to_micros(now);
        let connection = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let connection: Connection = sqlx::query_as(
                "INSERT INTO dbsync_connections (id, name, direction, site_url, status, token_prefix, \
                 token_ciphertext, created_by, created_at, updated_at, approved_by, approved_at, token_hash, metadata) \
                 VALUES ($1, $2, 'receiver', $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12) RETURNING *",
            )
            .bind(id)
            .bind(name)
            .bind(&site_url)
            .bind(status.as_str())
            .bind(token.display_prefix())
            .bind(&sealed)
            .bind(actor.as_str())
            .bind(now)
            .bind((status == ConnectionStatus::Active).then(|| actor.as_str()))
            .bind((status == ConnectionStatus::Active).then_some(now))
            .bind(peer_token.map(Token::hash))
            .bind(Json(metadata.cloned().unwrap_or_else(|| serde_json::json!({}))))
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| unique_violation(err, name, &site_url, Direction::Receiver))?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.created", id, now).detail(serde_json::json!({
                    "name": name, "direction": "receiver", "site_url": site_url, "status": status
                })),
            )
            .await?;
            tx.commit().await?;
            connection
        });
        Ok(connection)
    }

    /// The receiver connection `id_or_name`; a sender connection is refused, saying `instead`.
    async fn receiver_connection(&self, id_or_name: &str, instead: &str) -> Result<Connection> {
        let connection = self.get_connection(id_or_name).await?;
        if connection.direction != Direction::Receiver {
            return Err(Error::invalid(
                "connection",
                format!("{} is a sender connection: {instead}", connection.name),
            ));
        }
        Ok(connection)
    }

    /// Replaces the token a receiver connection holds (the sender regenerated it and handed
    /// the new one over by hand), encrypted like the first; audited without the token.
    pub async fn set_receiver_token(
        &self,
        id_or_name: &str,
        token: &str,
        vault: &Vault,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let connection = self
            .receiver_connection(id_or_name, "its token is made here (regenerate-token)")
            .await?;
        let token = Token::parse(token).map_err(|err| Error::invalid("token", err.to_string()))?;
        let sealed = vault.seal(connection.id, token.expose())?;
        let now = to_micros(now);
        let updated = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Connection = sqlx::query_as(
                "UPDATE dbsync_connections SET token_ciphertext = $2, token_prefix = $3, \
                 updated_at = $4 WHERE id = $1 RETURNING *",
            )
            .bind(connection.id)
            .bind(&sealed)
            .bind(token.display_prefix())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.token_set", connection.id, now)
                    .detail(serde_json::json!({ "token_prefix": token.display_prefix() })),
            )
            .await?;
            tx.commit().await?;
            updated
        });
        Ok(updated)
    }

    /// Stores (or with `None` forgets) the sender's download password on a receiver
    /// connection, encrypted under a key bound to the connection and to this use; audited
    /// without the password.
    pub async fn set_receiver_password(
        &self,
        id_or_name: &str,
        password: Option<&str>,
        vault: &Vault,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let connection = self
            .receiver_connection(
                id_or_name,
                "its download password is set with `connections update --download-password-stdin`",
            )
            .await?;
        let sealed = match password {
            Some("") => return Err(Error::invalid("password", "an empty password")),
            Some(password) => Some(vault.seal(password_binding(connection.id), password)?),
            None => None,
        };
        let now = to_micros(now);
        let stored = sealed.is_some();
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Connection = sqlx::query_as(
                "UPDATE dbsync_connections SET download_password_ciphertext = $2, updated_at = $3 \
                 WHERE id = $1 RETURNING *",
            )
            .bind(connection.id)
            .bind(&sealed)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.password_set", connection.id, now)
                    .detail(serde_json::json!({ "stored": stored })),
            )
            .await?;
            tx.commit().await?;
            updated
        }))
    }

    /// The sender's download password a receiver connection keeps, decrypted, if any.
    pub fn receiver_password(
        &self,
        connection: &Connection,
        vault: &Vault,
    ) -> Result<Option<dbsync_protocol::Secret>> {
        connection
            .download_password_ciphertext
            .as_deref()
            .map(|sealed| {
                vault
                    .open(password_binding(connection.id), sealed)
                    .map(dbsync_protocol::Secret::new)
            })
            .transpose()
    }

    /// The token a receiver connection holds, decrypted.
    pub fn receiver_token(&self, connection: &Connection, vault: &Vault) -> Result<Token> {
        let sealed = connection.token_ciphertext.as_deref().ok_or_else(|| {
            Error::invalid("connection", format!("{} holds no token", connection.name))
        })?;
        let text = vault.open(connection.id, sealed)?;
        Token::parse(&text).map_err(|_| Error::Decrypt)
    }

    /// Looks a connection up by id or by name.
    pub async fn get_connection(&self, id_or_name: &str) -> Result<Connection> {
        let found: Option<Connection> = match Uuid::parse_str(id_or_name) {
            Ok(id) => self.find_connection(id).await?,
            Err(_) => on_pool!(self, |pool| {
                sqlx::query_as("SELECT * FROM dbsync_connections WHERE name = $1")
                    .bind(id_or_name)
                    .fetch_optional(pool)
                    .await?
            }),
        };
        found.ok_or_else(|| Error::not_found("connection", id_or_name))
    }

    /// Looks a connection up by id.
    pub async fn find_connection(&self, id: Uuid) -> Result<Option<Connection>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_connections WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// The sender connection a token belongs to, looked up by the token's SHA-256.
    pub async fn find_sender_by_token(&self, token: &Token) -> Result<Option<Connection>> {
        let hash = token.hash();
        let found: Option<Connection> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT * FROM dbsync_connections WHERE token_hash = $1 AND direction = 'sender'",
            )
            .bind(&hash)
            .fetch_optional(pool)
            .await?
        });
        // The index lookup already matched; compare again in constant time so no code path
        // depends on a variable-time byte comparison of secrets.
        Ok(found.filter(|c| {
            c.token_hash
                .as_deref()
                .is_some_and(|h| crate::token::hashes_equal(h, &hash))
        }))
    }

    /// The connection a peer credential belongs to, in either direction: a sender connection
    /// by its connection token, a receiver connection by its peer token.
    pub async fn find_by_credential(&self, token: &Token) -> Result<Option<Connection>> {
        let hash = token.hash();
        let found: Option<Connection> = on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_connections WHERE token_hash = $1")
                .bind(&hash)
                .fetch_optional(pool)
                .await?
        });
        Ok(found.filter(|c| {
            c.token_hash
                .as_deref()
                .is_some_and(|h| crate::token::hashes_equal(h, &hash))
        }))
    }

    /// Stores the credential this site presents to the peer (encrypted) and/or the hash of the
    /// credential it accepts from the peer.
    pub async fn set_peer_secrets(
        &self,
        connection_id: Uuid,
        presents: Option<Vec<u8>>,
        accepts_hash: Option<Vec<u8>>,
    ) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_connections SET token_ciphertext = COALESCE($2, token_ciphertext), \
                 token_hash = COALESCE($3, token_hash) WHERE id = $1",
            )
            .bind(connection_id)
            .bind(presents)
            .bind(accepts_hash)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// `base` if no connection has that name, else `base-2`, `base-3`, ...
    pub async fn available_name(&self, base: &str) -> Result<String> {
        let base: String = base
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_NAME_LEN - 8)
            .collect();
        let base = if base.trim().is_empty() || Uuid::parse_str(&base).is_ok() {
            "peer".to_owned()
        } else {
            base
        };
        for n in 1..1000 {
            let candidate = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if matches!(
                self.get_connection(&candidate).await,
                Err(Error::NotFound { .. })
            ) {
                return Ok(candidate);
            }
        }
        Ok(format!("{base}-{}", Uuid::new_v4().simple()))
    }

    /// The connection with a site in one direction, if any (unique by schema).
    pub async fn find_connection_for_site(
        &self,
        site_url: &str,
        direction: Direction,
    ) -> Result<Option<Connection>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT * FROM dbsync_connections WHERE site_url = $1 AND direction = $2",
            )
            .bind(site_url)
            .bind(direction.as_str())
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Replaces a connection's sender-side controls, audited as `connection.settings_changed`
    /// with the names of the fields that changed.
    pub async fn update_connection_settings(
        &self,
        id_or_name: &str,
        settings: &ConnectionSettings,
        password: PasswordChange,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let current = self.get_connection(id_or_name).await?;
        let whitelist = settings.validate()?;
        let password_hash = match &password {
            PasswordChange::Keep => current.download_password_hash.clone(),
            PasswordChange::Set(secret) => Some(crate::password::hash(secret.expose())?),
            PasswordChange::Clear => None,
        };
        let before = serde_json::to_value(&current).unwrap_or_default();
        let (hours_start, hours_end) = match settings.allowed_hours {
            Some((start, end)) => (Some(i64::from(start)), Some(i64::from(end))),
            None => (None, None),
        };
        let now = to_micros(now);
        let s = settings;
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Connection = sqlx::query_as(
                "UPDATE dbsync_connections SET approval_mode = $2, allowed_tables = $3, excluded_tables = $4, \
                 auto_approve_tables = $5, max_downloads = $6, max_records_total = $7, max_records_per_request = $8, \
                 rate_limit_per_minute = $9, download_password_hash = $10, ip_whitelist = $11, \
                 allowed_hours_start = $12, allowed_hours_end = $13, time_zone = $14, expires_at = $15, \
                 default_conflict_strategy = $16, auto_sync_enabled = $17, auto_sync_tables = $18, \
                 auto_sync_interval_minutes = $19, updated_at = $20 WHERE id = $1 RETURNING *",
            )
            .bind(current.id)
            .bind(s.approval_mode.as_str())
            .bind(Json(&s.allowed_tables))
            .bind(Json(&s.excluded_tables))
            .bind(Json(&s.auto_approve_tables))
            .bind(s.max_downloads)
            .bind(s.max_records_total)
            .bind(s.max_records_per_request)
            .bind(s.rate_limit_per_minute)
            .bind(&password_hash)
            .bind(Json(&whitelist))
            .bind(hours_start)
            .bind(hours_end)
            .bind(&s.time_zone)
            .bind(s.expires_at.map(to_micros))
            .bind(s.default_conflict_strategy.as_str())
            .bind(s.auto_sync_enabled)
            .bind(Json(&s.auto_sync_tables))
            .bind(s.auto_sync_interval_minutes)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let after = serde_json::to_value(&updated).unwrap_or_default();
            let changed: Vec<&String> = after
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(key, value)| {
                    key.as_str() != "updated_at" && before.get(key.as_str()) != Some(value)
                })
                .map(|(key, _)| key)
                .collect();
            let password_changed = !matches!(password, PasswordChange::Keep);
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.settings_changed", current.id, now)
                    .detail(serde_json::json!({ "changed": changed, "password_changed": password_changed }))
            )
            .await?;
            tx.commit().await?;
            updated
        }))
    }

    /// Connections, newest first.
    pub async fn list_connections(&self, filter: &ConnectionFilter) -> Result<Vec<Connection>> {
        let status = filter.status.map(ConnectionStatus::as_str);
        let direction = filter.direction.map(Direction::as_str);
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT * FROM dbsync_connections \
                 WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR direction = $2) \
                 ORDER BY created_at DESC, name",
            )
            .bind(status)
            .bind(direction)
            .fetch_all(pool)
            .await?
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_canonicalizes() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.168.1.7").unwrap(), "192.168.1.7/32");
        assert_eq!(parse_cidr("2001:db8::1/32").unwrap(), "2001:db8::/32");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope").is_err());
    }

    #[test]
    fn site_urls() {
        assert_eq!(
            normalize_site_url("https://b.example.com/kit/").unwrap(),
            "https://b.example.com/kit"
        );
        assert!(normalize_site_url("ftp://b.example.com").is_err());
        assert!(normalize_site_url("https://user:pw@b.example.com").is_err());
        assert!(normalize_site_url("https://").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("prod to staging").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&Uuid::new_v4().to_string()).is_err());
        assert!(validate_name("a\nb").is_err());
    }

    #[test]
    fn status_text_round_trips() {
        for status in ConnectionStatus::ALL {
            assert_eq!(
                status.as_str().parse::<ConnectionStatus>().unwrap(),
                *status
            );
        }
        let err = "paused"
            .parse::<ConnectionStatus>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pending, active, suspended, revoked, expired"),
            "{err}"
        );
    }
}
