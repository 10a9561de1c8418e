//! One-time shares, the seed's one-time transfers: `dbsync share --tables a,b` makes a short
//! code; `dbsync pull --code CODE --from URL` on another site trades it for a token good for those
//! tables, once each, and pulls them, with no registration and no permanent connection.
//!
//! A share is a sender connection (`share-<id>`, site `share:<ID>`) limited to the shared tables,
//! one download each, auto-approved, expiring with the code. The code is 16 Crockford base32
//! characters: 4 name the share, 12 (60 bits) are the secret, kept only as an argon2id hash. A
//! code is redeemed once (one conditional `UPDATE`); five wrong secrets revoke the share; the
//! peer API's per-address limit bounds guessing across shares, and an unknown share costs the
//! same argon2 work as a known one, so timing does not tell which exist. The receiving side keeps
//! the token in a receiver connection like any other (so a broken pull resumes) and revokes it
//! once the pull is done; both histories keep the transfers.

use std::net::IpAddr;
use std::sync::OnceLock;

use chrono::{DateTime, Duration, Utc};
use dbsync_protocol::peer::{RedeemShareRequest, RedeemShareResponse};
use rand::Rng;
use serde_json::json;

use super::registration::PeerError;
use crate::agent::Agent;
use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::connection::{
    ApprovalMode, Connection, ConnectionSettings, ConnectionStatus, Direction, NewConnection,
    NewReceiver, normalize_site_url,
};
use crate::error::{Error, Result};
use crate::peer::PeerCallError;
use crate::store::{Store, on_pool};
use crate::token::Token;

/// Wrong secrets a share takes before it is revoked.
pub const MAX_TRIES: i64 = 5;
/// The longest a share lives.
pub const MAX_LIFETIME: Duration = Duration::days(7);
/// Crockford's base32: no I, L, O or U, so a code read aloud or typed is not misread.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ID_LEN: usize = 4;
const CODE_LEN: usize = 16;

/// A share code in canonical form (16 characters, upper case). Its `Debug` shows only the id.
#[derive(Clone, PartialEq, Eq)]
pub struct ShareCode(String);

impl std::fmt::Debug for ShareCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShareCode({}-…)", self.id())
    }
}

impl ShareCode {
    fn generate() -> Self {
        let mut rng = rand::rng();
        Self(
            (0..CODE_LEN)
                .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
                .collect(),
        )
    }

    /// Reads a code as a person may type it: dashes and spaces ignored, any case, `O` for `0`
    /// and `I`/`L` for `1`.
    pub fn parse(text: &str) -> Result<Self> {
        let code: String = text
            .chars()
            .filter(|c| !matches!(c, '-' | ' ' | '\t'))
            .map(|c| match c.to_ascii_uppercase() {
                'O' => '0',
                'I' | 'L' => '1',
                other => other,
            })
            .collect();
        if code.len() != CODE_LEN || !code.bytes().all(|b| ALPHABET.contains(&b)) {
            return Err(Error::invalid(
                "code",
                "a share code is 16 letters and digits, e.g. K7QM-8H2D-X9PA-4RTB",
            ));
        }
        Ok(Self(code))
    }

    /// The part that names the share.
    pub fn id(&self) -> &str {
        &self.0[..ID_LEN]
    }

    fn secret(&self) -> &str {
        &self.0[ID_LEN..]
    }

    /// The code in groups of four, as shown to people.
    pub fn display(&self) -> String {
        self.0
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }
}

/// The name of the sender connection behind share `id`.
fn share_name(id: &str) -> String {
    format!("share-{}", id.to_ascii_lowercase())
}

/// An argon2id hash nothing matches, verified against when a share does not exist.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| crate::password::hash("no share has this secret").unwrap_or_default())
}

/// A share just made: its code (shown once) and connection.
#[derive(Debug)]
pub struct CreatedShare {
    /// The sender connection behind it.
    pub connection: Connection,
    /// The code, shown only now.
    pub code: ShareCode,
    /// The tables shared.
    pub tables: Vec<String>,
    /// When it dies.
    pub expires_at: DateTime<Utc>,
}

impl Store {
    /// Turns a freshly created sender connection into share `code`: its site becomes
    /// `share:<ID>`, it has no token until redeemed, and it is active at once.
    async fn open_share(
        &self,
        connection: &Connection,
        code: &ShareCode,
        tables: &[String],
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let hash = crate::password::hash(code.secret())?;
        let now = to_micros(now);
        let metadata = json!({ "share": { "code_hash": hash, "tables": tables, "tries": 0 } });
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let opened: Connection = sqlx::query_as(
                "UPDATE dbsync_connections SET site_url = $2, status = 'active', token_hash = NULL, \
                 token_prefix = NULL, approved_by = $3, approved_at = $4, updated_at = $4, \
                 metadata = $5 WHERE id = $1 RETURNING *",
            )
            .bind(connection.id)
            .bind(format!("share:{}", code.id()))
            .bind(actor.as_str())
            .bind(now)
            .bind(sqlx::types::Json(&metadata))
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "share.created", connection.id, now)
                    .detail(json!({ "tables": tables, "expires_at": connection.expires_at })),
            )
            .await?;
            tx.commit().await?;
            opened
        }))
    }

    /// Gives share `connection` its token, if nobody redeemed it yet; `None` if somebody did.
    async fn find_share(&self, name: &str) -> Result<Option<Connection>> {
        match self.get_connection(name).await {
            Ok(found) => Ok(Some(found)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn redeem_share_once(
        &self,
        connection: &Connection,
        token: &Token,
        caller: &str,
        ip: IpAddr,
        now: DateTime<Utc>,
    ) -> Result<Option<Connection>> {
        let now = to_micros(now);
        let mut metadata = connection.metadata.clone();
        metadata["share"]["redeemed"] =
            json!({ "at": now, "site_url": caller, "ip": ip.to_string() });
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let redeemed: Option<Connection> = sqlx::query_as(
                "UPDATE dbsync_connections SET token_hash = $2, token_prefix = $3, metadata = $4, \
                 updated_at = $5 WHERE id = $1 AND status = 'active' AND token_hash IS NULL \
                 RETURNING *",
            )
            .bind(connection.id)
            .bind(token.hash())
            .bind(token.display_prefix())
            .bind(sqlx::types::Json(&metadata))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if redeemed.is_some() {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::connection(
                        &Actor::remote(caller),
                        "share.redeemed",
                        connection.id,
                        now
                    )
                    .detail(
                        json!({ "ip": ip.to_string(), "token_prefix": token.display_prefix() })
                    ),
                )
                .await?;
            }
            tx.commit().await?;
            redeemed
        }))
    }
}

impl Agent {
    /// Makes a one-time share of `tables`, alive for `lifetime` (a minute to seven days).
    pub async fn create_share(
        &self,
        tables: &[String],
        lifetime: Duration,
        actor: &Actor,
    ) -> Result<CreatedShare> {
        if tables.is_empty() {
            return Err(Error::invalid("tables", "name at least one table to share"));
        }
        if lifetime < Duration::minutes(1) || lifetime > MAX_LIFETIME {
            return Err(Error::invalid(
                "expires_in",
                "a share lives between 1 minute and 7 days",
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for table in tables {
            // Refuses a table this site does not have (or may never offer) before any code exists.
            let schema = self.store.describe_table(table).await?;
            if !names.contains(&schema.name) {
                names.push(schema.name);
            }
        }
        let now = self.now();
        let expires_at = to_micros(now + lifetime);
        let settings = ConnectionSettings {
            approval_mode: ApprovalMode::AutoApprove,
            allowed_tables: names.clone(),
            max_downloads: Some(i64::try_from(names.len()).unwrap_or(i64::MAX)),
            expires_at: Some(expires_at),
            ..ConnectionSettings::default()
        };
        // A fresh id; on the rare clash with a live share's name, draw again.
        for _ in 0..8 {
            let code = ShareCode::generate();
            let name = share_name(code.id());
            if self.store.find_share(&name).await?.is_some() {
                continue;
            }
            let created = self
                .store
                .create_sender(
                    NewConnection {
                        name,
                        site_url: format!(
                            "https://share-{}.invalid",
                            code.id().to_ascii_lowercase()
                        ),
                        settings: settings.clone(),
                    },
                    actor,
                    now,
                )
                .await?;
            let connection = self
                .store
                .open_share(&created.connection, &code, &names, actor, now)
                .await?;
            return Ok(CreatedShare {
                connection,
                code,
                tables: names,
                expires_at,
            });
        }
        Err(Error::Conflict(
            "could not draw a free share id; delete old shares (`dbsync connections list`)".into(),
        ))
    }

    /// Answers `POST /db-sync/api/redeem-share`. Every failure (no such share, wrong secret,
    /// redeemed, expired, revoked) is the same `401 invalid_share_code`.
    pub async fn handle_redeem_share(
        &self,
        request: RedeemShareRequest,
        ip: IpAddr,
    ) -> Result<RedeemShareResponse, PeerError> {
        let refused = || {
            PeerError::refused(
                401,
                "invalid_share_code",
                "unknown, used or expired share code",
            )
        };
        let code = ShareCode::parse(&request.code).map_err(|_| refused())?;
        let caller = normalize_site_url(&request.site_url).map_err(|err| {
            PeerError::refused(400, "invalid_request", format!("site_url: {err}"))
        })?;
        let now = self.now();
        let share = self
            .store
            .find_share(&share_name(code.id()))
            .await?
            .filter(|c| c.direction == Direction::Sender && c.metadata.get("share").is_some());
        let Some(share) = share else {
            crate::password::verify(code.secret(), decoy_hash());
            tracing::info!(%ip, "share code refused: no such share");
            return Err(refused());
        };
        let stored = share.metadata["share"]["code_hash"].as_str().unwrap_or("");
        if !crate::password::verify(code.secret(), stored) {
            // Counted atomically: guesses at once each count.
            let counted = self
                .store
                .update_connection_metadata(share.id, |metadata| {
                    let mut metadata = metadata.clone();
                    let tries = metadata["share"]["tries"].as_i64().unwrap_or(0) + 1;
                    metadata["share"]["tries"] = tries.into();
                    metadata
                })
                .await?;
            let tries = counted.metadata["share"]["tries"].as_i64().unwrap_or(0);
            self.store
                .record_event(
                    audit::NewEvent::connection(
                        &Actor::remote(&caller),
                        "share.refused",
                        share.id,
                        to_micros(now),
                    )
                    .detail(json!({ "ip": ip.to_string(), "tries": tries })),
                )
                .await?;
            tracing::warn!(share = %share.name, %ip, tries, "share code refused: wrong secret");
            if tries >= MAX_TRIES && share.status == ConnectionStatus::Active {
                let _ = self
                    .store
                    .revoke_connection(
                        &share.id.to_string(),
                        "too many wrong share codes",
                        &Actor::system(),
                        now,
                    )
                    .await;
            }
            return Err(refused());
        }
        if share.status != ConnectionStatus::Active || share.token_hash.is_some() {
            tracing::info!(share = %share.name, %ip, "share code refused: used or closed");
            return Err(refused());
        }
        if share.expires_at.is_some_and(|at| at <= now) {
            let _ = self
                .store
                .expire_connection(&share.id.to_string(), &Actor::system(), now)
                .await;
            return Err(refused());
        }
        let token = Token::generate();
        let Some(redeemed) = self
            .store
            .redeem_share_once(&share, &token, &caller, ip, now)
            .await?
        else {
            return Err(refused());
        };
        tracing::info!(share = %redeemed.name, %ip, "share redeemed");
        Ok(RedeemShareResponse {
            connection_name: redeemed.name.clone(),
            token: token.expose().to_owned(),
            tables: redeemed.allowed_tables.clone(),
            expires_at: redeemed.expires_at.map(|t| t.to_rfc3339()),
        })
    }

    /// Trades `code` at `from` for a receiver connection holding the share's token, and returns
    /// it with the shared tables. Refused, before the code is spent, when this site already holds
    /// a connection to `from` (pull through that one).
    pub async fn redeem_share(
        &self,
        from: &str,
        code: &str,
        actor: &Actor,
    ) -> Result<(Connection, Vec<String>)> {
        let code = ShareCode::parse(code)?;
        let site_url = normalize_site_url(from)?;
        self.refuse_own_url(&site_url).await?;
        if let Some(held) = self
            .store
            .find_connection_for_site(&site_url, Direction::Receiver)
            .await?
        {
            return Err(Error::Conflict(format!(
                "this site already holds connection {} to {site_url}: pull through it (`dbsync pull {}`)",
                held.name, held.name
            )));
        }
        let request = RedeemShareRequest {
            code: code.display(),
            site_url: self.site_url().await?,
        };
        let answer =
            self.peers
                .redeem_share(&site_url, &request)
                .await
                .map_err(|err| match err {
                    PeerCallError::Rejected { message, .. } => Error::Invalid {
                        field: "code",
                        reason: format!("{site_url} refused it: {message}"),
                    },
                    other if other.is_transient() => Error::Unreachable {
                        site: site_url.clone(),
                        reason: other.to_string(),
                    },
                    other => Error::Conflict(format!("{site_url}: {other}")),
                })?;
        let name = self.store.available_name(&answer.connection_name).await?;
        let metadata = json!({ "share": {
            "code_id": code.id(), "tables": answer.tables, "expires_at": answer.expires_at,
            "redeemed_at": self.now(),
        }});
        let connection = self
            .store
            .add_receiver(
                NewReceiver {
                    name: &name,
                    site_url: &site_url,
                    token: &answer.token,
                    status: ConnectionStatus::Active,
                    peer_token: None,
                    metadata: Some(&metadata),
                },
                &self.vault,
                actor,
                self.now(),
            )
            .await?;
        Ok((connection, answer.tables))
    }
}

impl Agent {
    /// Closes the receiver connection of a share whose pull is done: revoked, and moved off the
    /// sender's site (to `share:<ID>`) so a later share or a permanent connection from that site
    /// can be stored; its transfers keep its name in the history.
    pub async fn finish_share(&self, connection: &Connection, actor: &Actor) -> Result<Connection> {
        let code_id = connection
            .metadata
            .pointer("/share/code_id")
            .and_then(serde_json::Value::as_str)
            .filter(|_| connection.direction == Direction::Receiver)
            .ok_or_else(|| {
                Error::invalid("connection", format!("{} is not a share", connection.name))
            })?;
        let now = to_micros(self.now());
        let reason = "one-time share: pulled";
        Ok(on_pool!(self.store, |pool| {
            let mut tx = pool.begin().await?;
            let closed: Connection = sqlx::query_as(
                "UPDATE dbsync_connections SET site_url = $2, status = 'revoked', revoked_by = $3, \
                 revoked_at = $4, revoked_reason = $5, updated_at = $4 WHERE id = $1 RETURNING *",
            )
            .bind(connection.id)
            .bind(format!("share:{code_id}@{}", connection.site_url))
            .bind(actor.as_str())
            .bind(now)
            .bind(reason)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.revoked", connection.id, now)
                    .detail(
                        json!({ "from": connection.status, "to": "revoked", "reason": reason })
                    ),
            )
            .await?;
            tx.commit().await?;
            closed
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_typed() {
        let code = ShareCode::generate();
        assert_eq!(code.0.len(), CODE_LEN);
        let shown = code.display();
        assert_eq!(shown.len(), CODE_LEN + 3);
        assert_eq!(ShareCode::parse(&shown.to_lowercase()).unwrap(), code);
        assert_eq!(
            ShareCode::parse("k7qm 8h2d-x9pa-4rtb").unwrap().display(),
            "K7QM-8H2D-X9PA-4RTB"
        );
        assert_eq!(
            ShareCode::parse("O0IL-0000-0000-0000").unwrap().0,
            "0011000000000000"
        );
        for bad in [
            "",
            "K7QM-8H2D-X9PA",
            "K7QM-8H2D-X9PA-4RTBX",
            "K7QM-8H2D-X9PA-4RTU",
        ] {
            assert!(ShareCode::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{code:?}").contains(code.secret()));
    }
}
