//! Cross-site registration and status propagation (SPEC section 5).
//!
//! Credentials: the sender issues the connection token (the receiver keeps it encrypted and
//! presents it; the sender keeps its hash). At registration the receiver issues a *peer token*
//! the other way (the sender keeps it encrypted and presents it on status updates; the receiver
//! keeps its hash). No side ever stores a token in clear or authenticates with a hash.

use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use dbsync_protocol::peer::{
    ConnectionState, RegisterRequest, RegisterResponse, UpdateStatusRequest, VerifyRequest,
};
use serde::Serialize;
use serde_json::json;

use crate::agent::Agent;
use crate::audit::Actor;
use crate::connection::{
    Connection, ConnectionStatus, Direction, NewConnection, NewReceiver, normalize_site_url,
};
use crate::error::{Error, Result};
use crate::peer::PeerCallError;
use crate::settings::IncomingMode;
use crate::token::Token;

/// Why the peer API refused a request: an HTTP status and a stable code, or an internal error
/// (answered as a generic 500, never echoed).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A refusal the caller can act on.
    #[error("{message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// The agent failed.
    #[error("internal error")]
    Internal(#[from] Error),
}

impl PeerError {
    pub(super) fn refused(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self::Refused {
            status,
            code,
            message: message.into(),
        }
    }
}

/// What happened when a new sender connection was announced to the remote site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RegistrationOutcome {
    /// The remote site stored the receiver connection.
    Accepted {
        /// Its status there: active, or pending its admin's approval.
        remote_status: String,
        /// Its id there.
        remote_connection_id: String,
    },
    /// The remote site answered with a refusal.
    Rejected {
        /// HTTP status.
        http_status: u16,
        /// The remote's error code (password_required, invalid_password, registration_denied,
        /// duplicate_connection, ...).
        code: String,
        /// The remote's explanation.
        message: String,
    },
    /// The remote site could not be reached.
    Unreachable {
        /// What failed.
        error: String,
    },
    /// The remote URL is not allowed (outbound safety rules); nothing was sent.
    Refused {
        /// Why.
        reason: String,
    },
}

/// A new sender connection, its token (shown once) and the registration outcome.
#[derive(Debug)]
pub struct CreatedSender {
    /// The connection as stored after registration.
    pub connection: Connection,
    /// The token in clear.
    pub token: Token,
    /// What the remote site said.
    pub registration: RegistrationOutcome,
}

/// A lifecycle step an operator (or a peer) asks for.
#[derive(Debug, Clone)]
pub enum StatusChange {
    /// pending → active.
    Approve,
    /// → suspended, with a reason.
    Suspend(String),
    /// suspended → active.
    Reactivate,
    /// → revoked, with a reason.
    Revoke(String),
}

/// The state of telling the peer about this side's latest status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PushOutcome {
    /// delivered, pending (will be retried), failed (refused by the peer) or no_peer_credential
    /// (the peer never handed over a token to call it with).
    pub state: String,
    /// The status pushed.
    pub status: String,
    /// The reason pushed.
    pub reason: Option<String>,
    /// The peer's status after the push.
    pub remote_status: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next retry is due (pending only), RFC 3339.
    pub next_attempt_at: Option<String>,
}

impl RegistrationOutcome {
    /// One sentence for an operator: what happened to a new sender connection to `site_url`.
    pub fn headline(&self, site_url: &str) -> String {
        match self {
            Self::Accepted { remote_status, .. } if remote_status == "active" => {
                format!("Created sender connection; {site_url} accepted it and it is active.")
            }
            Self::Accepted { .. } => format!(
                "Created sender connection; {site_url} registered it and its admin must approve it there. It stays pending until then."
            ),
            Self::Rejected {
                http_status,
                code,
                message,
            } => format!(
                "Created sender connection, but {site_url} refused the registration ({http_status} {code}: {message}). It stays pending; hand the token over by hand."
            ),
            Self::Unreachable { error } => format!(
                "Created sender connection, but {site_url} could not be reached ({error}). It stays pending; hand the token over by hand."
            ),
            Self::Refused { reason } => format!(
                "Created sender connection, but the remote was not contacted ({reason}). It stays pending; hand the token over by hand."
            ),
        }
    }
}

impl PushOutcome {
    /// One sentence for an operator: whether the peer at `site_url` learnt the new status.
    pub fn describe(&self, site_url: &str) -> String {
        let error = self.error.as_deref().unwrap_or("unknown error");
        match self.state.as_str() {
            "delivered" => format!(
                "{site_url} was told; its status is {}.",
                self.remote_status.as_deref().unwrap_or("unknown")
            ),
            "pending" => {
                format!(
                    "{site_url} could not be told ({error}); `dbsync serve` retries with backoff."
                )
            }
            "no_peer_credential" => {
                format!("{site_url} was not told: it never registered a way to reach it.")
            }
            _ => format!("{site_url} refused the update: {error}"),
        }
    }
}

impl Agent {
    /// Creates a sender connection and announces it to the remote site at once. The connection
    /// becomes active when the remote accepted it as active; it stays pending otherwise, and the
    /// outcome is kept in its metadata under `registration`.
    pub async fn create_sender(
        &self,
        new: NewConnection,
        remote_password: Option<&str>,
        actor: &Actor,
    ) -> Result<CreatedSender> {
        self.refuse_own_url(&new.site_url).await?;
        let created = self.store.create_sender(new, actor, self.now()).await?;
        let registration = self
            .register_with_peer(&created.connection, &created.token, remote_password)
            .await?;
        let connection = self
            .store
            .get_connection(&created.connection.id.to_string())
            .await?;
        Ok(CreatedSender {
            connection,
            token: created.token,
            registration,
        })
    }

    /// Refuses `site_url` when it is this site's own address (a connection joins two sites;
    /// one to itself would register with itself). Scheme and host compare without regard to
    /// case.
    pub(super) async fn refuse_own_url(&self, site_url: &str) -> Result<()> {
        let canonical = |url: &str| {
            crate::connection::normalize_site_url(url).map(|url| {
                let (scheme_host, path) = match url.split_once("://") {
                    Some((scheme, rest)) => match rest.split_once('/') {
                        Some((host, path)) => (format!("{scheme}://{host}"), path.to_owned()),
                        None => (url.clone(), String::new()),
                    },
                    None => (url.clone(), String::new()),
                };
                format!("{}/{path}", scheme_host.to_ascii_lowercase())
            })
        };
        let own = canonical(&self.site_url().await?)?;
        if canonical(site_url)? == own {
            return Err(Error::invalid(
                "site_url",
                format!("{site_url} is this site's own address: a connection joins two sites"),
            ));
        }
        Ok(())
    }

    async fn register_with_peer(
        &self,
        connection: &Connection,
        token: &Token,
        password: Option<&str>,
    ) -> Result<RegistrationOutcome> {
        let request = RegisterRequest {
            sender_url: self.site_url().await?,
            connection_name: connection.name.clone(),
            auth_token: token.expose().to_owned(),
            password: password.map(str::to_owned),
            protocol_version: dbsync_protocol::CURRENT_VERSION,
            quic: self.quic_offer().await,
        };
        let outcome = match self.peers.register(&connection.site_url, &request).await {
            Ok(reply) => {
                match Token::parse(&reply.peer_token) {
                    Ok(peer_token) => {
                        let sealed = self.vault.seal(connection.id, peer_token.expose())?;
                        self.store
                            .set_peer_secrets(connection.id, Some(sealed), None)
                            .await?;
                    }
                    Err(_) => {
                        tracing::warn!(connection_id = %connection.id, "peer sent a malformed peer token")
                    }
                }
                if reply.status == ConnectionStatus::Active.as_str() {
                    let remote = Actor::remote(&connection.site_url);
                    self.store
                        .approve_connection(&connection.id.to_string(), &remote, self.now())
                        .await?;
                }
                RegistrationOutcome::Accepted {
                    remote_status: reply.status,
                    remote_connection_id: reply.connection_id,
                }
            }
            Err(PeerCallError::Rejected {
                status,
                code,
                message,
            }) => RegistrationOutcome::Rejected {
                http_status: status,
                code,
                message,
            },
            Err(PeerCallError::Refused(reason)) => RegistrationOutcome::Refused { reason },
            Err(err @ (PeerCallError::Unreachable(_) | PeerCallError::BadResponse(_))) => {
                RegistrationOutcome::Unreachable {
                    error: err.to_string(),
                }
            }
        };
        tracing::info!(connection_id = %connection.id, outcome = ?outcome, "registration with peer");
        let mut recorded = serde_json::to_value(&outcome).unwrap_or_default();
        recorded["at"] = json!(self.now());
        self.store
            .merge_connection_metadata(connection.id, json!({ "registration": recorded }))
            .await?;
        Ok(outcome)
    }

    /// Answers `POST /db-sync/api/register-connection` according to the incoming mode.
    pub async fn handle_register(
        &self,
        request: RegisterRequest,
        client_ip: IpAddr,
    ) -> Result<RegisterResponse, PeerError> {
        if dbsync_protocol::negotiate(&[request.protocol_version]).is_none() {
            return Err(PeerError::refused(
                400,
                "unsupported_version",
                format!(
                    "protocol version {} is not supported; this site speaks {:?}",
                    request.protocol_version,
                    dbsync_protocol::SUPPORTED_VERSIONS
                ),
            ));
        }
        if self.refuse_own_url(&request.sender_url).await.is_err() {
            return Err(PeerError::refused(
                400,
                "self_connection",
                "a site cannot register a connection with itself",
            ));
        }
        let settings = self.store.settings().await?;
        match settings.incoming_mode {
            IncomingMode::DenyAll => {
                return Err(PeerError::refused(
                    403,
                    "registration_denied",
                    "this site accepts no incoming connections",
                ));
            }
            IncomingMode::RequirePassword => match request.password.as_deref() {
                None | Some("") => {
                    return Err(PeerError::refused(
                        401,
                        "password_required",
                        "this site requires a password to register",
                    ));
                }
                Some(password) if !settings.incoming_password_matches(password) => {
                    return Err(PeerError::refused(
                        401,
                        "invalid_password",
                        "wrong registration password",
                    ));
                }
                Some(_) => {}
            },
            IncomingMode::AutoAccept | IncomingMode::RequireApproval => {}
        }
        let sender_url = normalize_site_url(&request.sender_url)
            .map_err(|err| PeerError::refused(400, "invalid_request", err.to_string()))?;
        let token = Token::parse(&request.auth_token)
            .map_err(|err| PeerError::refused(400, "invalid_token", err.to_string()))?;
        if self
            .store
            .find_connection_for_site(&sender_url, Direction::Receiver)
            .await?
            .is_some()
        {
            return Err(PeerError::refused(
                409,
                "duplicate_connection",
                format!("a connection from {sender_url} already exists here"),
            ));
        }
        let status = if settings.incoming_mode == IncomingMode::RequireApproval {
            ConnectionStatus::Pending
        } else {
            ConnectionStatus::Active
        };
        let name = self.store.available_name(&request.connection_name).await?;
        let peer_token = Token::generate();
        let metadata = json!({ "registration": {
            "via": "api", "remote_ip": client_ip.to_string(), "remote_name": request.connection_name,
            "protocol_version": request.protocol_version, "quic": request.quic, "at": self.now(),
        }});
        let connection = self
            .store
            .add_receiver(
                NewReceiver {
                    name: &name,
                    site_url: &sender_url,
                    token: token.expose(),
                    status,
                    peer_token: Some(&peer_token),
                    metadata: Some(&metadata),
                },
                &self.vault,
                &Actor::remote(&sender_url),
                self.now(),
            )
            .await
            .map_err(|err| match err {
                Error::Conflict(message) => {
                    PeerError::refused(409, "duplicate_connection", message)
                }
                other => PeerError::Internal(other),
            })?;
        tracing::info!(connection_id = %connection.id, status = %status, "registered incoming connection");
        Ok(RegisterResponse {
            connection_id: connection.id.to_string(),
            status: status.to_string(),
            peer_token: peer_token.expose().to_owned(),
        })
    }

    /// The connection a peer's bearer credential belongs to.
    pub(super) async fn authenticate_peer(&self, bearer: &str) -> Result<Connection, PeerError> {
        let unknown = || {
            PeerError::refused(
                401,
                "invalid_token",
                "unknown or malformed connection token",
            )
        };
        let token = Token::parse(bearer).map_err(|_| unknown())?;
        self.store
            .find_by_credential(&token)
            .await?
            .ok_or_else(unknown)
    }

    /// Answers `POST /db-sync/api/update-status`: applies the peer's status change to this side's
    /// record of the connection (without pushing it back). A peer cannot lift a suspension this
    /// site imposed itself, nor activate a receiver connection that waits for this site's admin.
    pub async fn handle_update_status(
        &self,
        bearer: &str,
        request: UpdateStatusRequest,
    ) -> Result<ConnectionState, PeerError> {
        let connection = self.authenticate_peer(bearer).await?;
        let target: ConnectionStatus = request.status.parse().map_err(|_| {
            PeerError::refused(
                400,
                "invalid_status",
                format!("unknown status {:?}", request.status),
            )
        })?;
        let actor = Actor::remote(&connection.site_url);
        let reason = request
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .unwrap_or("no reason given");
        let reason = format!("{} by {}: {reason}", target, connection.site_url);
        let id = connection.id.to_string();
        let now = self.now();
        let suspended_by_peer = connection.suspended_by.as_deref() == Some(actor.as_str());
        let step = match (target, connection.status) {
            (ConnectionStatus::Active, ConnectionStatus::Pending)
                if connection.direction == Direction::Sender =>
            {
                Some(self.store.approve_connection(&id, &actor, now).await)
            }
            (ConnectionStatus::Active, ConnectionStatus::Suspended) if suspended_by_peer => {
                Some(self.store.reactivate_connection(&id, &actor, now).await)
            }
            (ConnectionStatus::Suspended, ConnectionStatus::Pending | ConnectionStatus::Active) => {
                Some(
                    self.store
                        .suspend_connection(&id, &reason, &actor, now)
                        .await,
                )
            }
            (
                ConnectionStatus::Revoked,
                ConnectionStatus::Pending | ConnectionStatus::Active | ConnectionStatus::Suspended,
            ) => Some(
                self.store
                    .revoke_connection(&id, &reason, &actor, now)
                    .await,
            ),
            (
                ConnectionStatus::Expired,
                ConnectionStatus::Pending | ConnectionStatus::Active | ConnectionStatus::Suspended,
            ) => Some(self.store.expire_connection(&id, &actor, now).await),
            _ => None,
        };
        let status = match step {
            Some(Ok(updated)) => updated.status,
            // Changed concurrently: report what holds now.
            Some(Err(Error::IllegalTransition { .. })) | None => {
                self.store.get_connection(&id).await?.status
            }
            Some(Err(err)) => return Err(err.into()),
        };
        Ok(ConnectionState {
            connection_id: id,
            status: status.to_string(),
        })
    }

    /// Answers `POST /db-sync/api/verify-connection`; a receiver that stored its token by hand
    /// hands over its peer token this way.
    pub async fn handle_verify(
        &self,
        bearer: &str,
        request: VerifyRequest,
    ) -> Result<ConnectionState, PeerError> {
        let connection = self.authenticate_peer(bearer).await?;
        if let Some(peer_token) = request.peer_token.as_deref()
            && connection.direction == Direction::Sender
        {
            let peer_token = Token::parse(peer_token).map_err(|err| {
                PeerError::refused(400, "invalid_token", format!("peer token: {err}"))
            })?;
            let sealed = self.vault.seal(connection.id, peer_token.expose())?;
            self.store
                .set_peer_secrets(connection.id, Some(sealed), None)
                .await?;
            self.store
                .merge_connection_metadata(
                    connection.id,
                    json!({ "receiver_confirmed": { "at": self.now(), "site_url": request.site_url } }),
                )
                .await?;
        }
        Ok(ConnectionState {
            connection_id: connection.id.to_string(),
            status: connection.status.to_string(),
        })
    }

    /// Stores a receiver connection from a token handed over by hand, then tells the sending site
    /// (verify-connection) and hands it a peer token, so later status changes travel both ways.
    /// An unreachable sender is recorded in the metadata under `hand_over`; the connection is
    /// stored either way.
    pub async fn add_receiver_by_hand(
        &self,
        name: &str,
        site_url: &str,
        token: &str,
        actor: &Actor,
    ) -> Result<Connection> {
        self.refuse_own_url(site_url).await?;
        let peer_token = Token::generate();
        let metadata = json!({ "registration": { "via": "manual", "at": self.now() } });
        let connection = self
            .store
            .add_receiver(
                NewReceiver {
                    name,
                    site_url,
                    token,
                    status: ConnectionStatus::Active,
                    peer_token: Some(&peer_token),
                    metadata: Some(&metadata),
                },
                &self.vault,
                actor,
                self.now(),
            )
            .await?;
        let request = VerifyRequest {
            site_url: self.site_url().await?,
            peer_token: Some(peer_token.expose().to_owned()),
        };
        let hand_over = match self
            .peers
            .verify(&connection.site_url, token.trim(), &request)
            .await
        {
            Ok(state) => {
                json!({ "outcome": "confirmed", "remote_status": state.status, "at": self.now() })
            }
            Err(err) => {
                json!({ "outcome": "unconfirmed", "error": err.to_string(), "at": self.now() })
            }
        };
        self.store
            .merge_connection_metadata(connection.id, json!({ "hand_over": hand_over }))
            .await
    }

    /// Takes a lifecycle step on this side and tells the peer at once. A peer that cannot be
    /// reached is retried later by `dbsync serve` (see [`Agent::retry_pending_pushes`]); the
    /// state of the push is in the connection's metadata under `peer_push`.
    pub async fn change_status(
        &self,
        id_or_name: &str,
        change: StatusChange,
        actor: &Actor,
    ) -> Result<(Connection, PushOutcome)> {
        let now = self.now();
        let (connection, reason) = match &change {
            StatusChange::Approve => (
                self.store
                    .approve_connection(id_or_name, actor, now)
                    .await?,
                None,
            ),
            StatusChange::Suspend(reason) => (
                self.store
                    .suspend_connection(id_or_name, reason, actor, now)
                    .await?,
                Some(reason.clone()),
            ),
            StatusChange::Reactivate => (
                self.store
                    .reactivate_connection(id_or_name, actor, now)
                    .await?,
                None,
            ),
            StatusChange::Revoke(reason) => (
                self.store
                    .revoke_connection(id_or_name, reason, actor, now)
                    .await?,
                Some(reason.clone()),
            ),
        };
        let push = self.push_status(&connection, reason, 0).await?;
        let connection = self
            .store
            .get_connection(&connection.id.to_string())
            .await?;
        Ok((connection, push))
    }

    /// Deletes a connection (its transfers stay in the history) after telling the peer, once,
    /// that it is revoked (there is nothing left to retry from once the row is gone). Returns
    /// the deleted connection and how the telling went.
    pub async fn delete_connection(
        &self,
        id_or_name: &str,
        actor: &Actor,
    ) -> Result<(Connection, PushOutcome)> {
        let connection = self.store.get_connection(id_or_name).await?;
        let push = if connection.status == ConnectionStatus::Revoked {
            // Revoked before: the peer was told then.
            PushOutcome {
                state: "delivered".into(),
                status: connection.status.to_string(),
                reason: None,
                remote_status: None,
                error: None,
                attempts: 0,
                next_attempt_at: None,
            }
        } else {
            let mut told = connection.clone();
            told.status = ConnectionStatus::Revoked;
            let reason = format!("connection deleted on {}", self.site_url().await?);
            self.push_status(&told, Some(reason), 0).await?
        };
        let deleted = self
            .store
            .delete_connection(&connection.id.to_string(), actor, self.now())
            .await?;
        Ok((deleted, push))
    }

    /// Tells the peer this side's current status of `connection`.
    async fn push_status(
        &self,
        connection: &Connection,
        reason: Option<String>,
        previous_attempts: u32,
    ) -> Result<PushOutcome> {
        let status = connection.status.to_string();
        let attempts = previous_attempts + 1;
        let mut outcome = PushOutcome {
            state: String::new(),
            status: status.clone(),
            reason: reason.clone(),
            remote_status: None,
            error: None,
            attempts,
            next_attempt_at: None,
        };
        let bearer = match connection.token_ciphertext.as_deref() {
            None => {
                outcome.state = "no_peer_credential".into();
                outcome.error = Some("the peer never handed over a token to call it with".into());
                None
            }
            Some(sealed) => match self.vault.open(connection.id, sealed) {
                Ok(bearer) => Some(bearer),
                Err(err) => {
                    outcome.state = "failed".into();
                    outcome.error = Some(err.to_string());
                    None
                }
            },
        };
        if let Some(bearer) = bearer {
            let request = UpdateStatusRequest {
                status,
                reason,
                site_url: self.site_url().await?,
            };
            match self
                .peers
                .update_status(&connection.site_url, &bearer, &request)
                .await
            {
                Ok(state) => {
                    outcome.state = "delivered".into();
                    outcome.remote_status = Some(state.status);
                }
                Err(err) if err.is_transient() => {
                    let delay = self.retry_delay(attempts);
                    outcome.state = "pending".into();
                    outcome.error = Some(err.to_string());
                    outcome.next_attempt_at = Some((self.now() + delay).to_rfc3339());
                }
                Err(err) => {
                    outcome.state = "failed".into();
                    outcome.error = Some(err.to_string());
                }
            }
        }
        tracing::info!(connection_id = %connection.id, state = %outcome.state, attempts, "status push to peer");
        self.store
            .merge_connection_metadata(connection.id, json!({ "peer_push": outcome }))
            .await?;
        Ok(outcome)
    }

    /// Exponential backoff from `server.push_retry_secs`, capped at an hour.
    pub(super) fn retry_delay(&self, attempts: u32) -> Duration {
        let base = i64::try_from(self.config.server.push_retry_secs).unwrap_or(30);
        let factor = 1_i64 << attempts.saturating_sub(1).min(16);
        Duration::seconds(base.saturating_mul(factor).min(3600))
    }

    /// Retries every status push that is due; returns how many were attempted.
    pub async fn retry_pending_pushes(&self) -> Result<usize> {
        let now = self.now();
        let mut attempted = 0;
        for listed in self.store.list_connections(&Default::default()).await? {
            if !pending_push(&listed, "peer_push", now) && !pending_push(&listed, "token_push", now)
            {
                continue;
            }
            // One agent of the site at a time: claimed, then read again (another agent may have
            // delivered it meanwhile), pushed, released.
            if !self
                .store
                .claim_push(listed.id, now, now + PUSH_CLAIM)
                .await?
            {
                continue;
            }
            let outcome = self.retry_claimed_push(listed.id, now).await;
            self.store.release_push(listed.id).await?;
            attempted += outcome?;
        }
        Ok(attempted)
    }

    async fn retry_claimed_push(&self, id: uuid::Uuid, now: DateTime<Utc>) -> Result<usize> {
        let Some(connection) = self.store.find_connection(id).await? else {
            return Ok(0);
        };
        let mut attempted = 0;
        if self.retry_token_push(&connection).await? {
            attempted += 1;
        }
        if pending_push(&connection, "peer_push", now)
            && let Some(push) = connection
                .metadata
                .get("peer_push")
                .and_then(|p| serde_json::from_value::<PushOutcome>(p.clone()).ok())
        {
            let reason = if push.status == connection.status.as_str() {
                push.reason
            } else {
                None
            };
            self.push_status(&connection, reason, push.attempts).await?;
            attempted += 1;
        }
        Ok(attempted)
    }
}

/// How long an agent holds a connection's push while it tries it.
const PUSH_CLAIM: Duration = Duration::minutes(2);

/// Whether the push under metadata `key` (`peer_push`, `token_push`) is pending and due.
pub(super) fn pending_push(connection: &Connection, key: &str, now: DateTime<Utc>) -> bool {
    let Some(push) = connection.metadata.get(key) else {
        return false;
    };
    push.get("state").and_then(serde_json::Value::as_str) == Some("pending")
        && push
            .get("next_attempt_at")
            .and_then(serde_json::Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t <= now)
}

impl crate::Store {
    /// Claims a connection's pending push for this agent until `until`; false when another
    /// agent holds it.
    pub async fn claim_push(
        &self,
        id: uuid::Uuid,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let claimed = crate::store::on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_connections SET push_claimed_until = $3 \
                 WHERE id = $1 AND (push_claimed_until IS NULL OR push_claimed_until < $2)",
            )
            .bind(id)
            .bind(crate::clock::to_micros(now))
            .bind(crate::clock::to_micros(until))
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(claimed == 1)
    }

    /// Releases a push claim.
    pub async fn release_push(&self, id: uuid::Uuid) -> Result<()> {
        crate::store::on_pool!(self, |pool| {
            sqlx::query("UPDATE dbsync_connections SET push_claimed_until = NULL WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
