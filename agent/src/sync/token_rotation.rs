//! A regenerated connection token reaches the receiver over the peer API.
//!
//! The sender regenerates (the old token stops working at once), then calls the receiver's
//! `rotate-token` with the peer token the receiver issued at registration as bearer and the
//! SHA-256 of the token being replaced in the body: the bearer says which connection, the hash
//! shows the caller is the site that issued the token the receiver holds. A receiver that cannot
//! be reached is retried by `dbsync serve` with the new token kept sealed in the connection's
//! metadata (`token_push`) until delivered; `connections set-token --token-stdin` is the
//! manual path. Both sides audit the hand-over (without the token).

use dbsync_protocol::peer::{ConnectionState, RotateTokenRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::registration::PeerError;
use crate::agent::Agent;
use crate::audit::{Actor, NewEvent};
use crate::connection::{Connection, ConnectionStatus, CreatedConnection, Direction};
use crate::error::Result;
use crate::token::Token;

/// The state of handing a regenerated token to the receiver (metadata key `token_push`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPush {
    /// delivered, pending (retried by `dbsync serve`), failed (refused by the receiver) or
    /// no_peer_credential (the receiver never handed over a way to call it).
    pub state: String,
    /// The last error.
    pub error: Option<String>,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next retry is due (pending only), RFC 3339.
    pub next_attempt_at: Option<String>,
    /// Hex SHA-256 of the token the receiver held before (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_sha256: Option<String>,
    /// The new token sealed by the vault under this use's binding, hex (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_token: Option<String>,
}

impl TokenPush {
    /// One sentence for an operator: whether the receiver at `site_url` got the new token.
    pub fn describe(&self, site_url: &str) -> String {
        let error = self.error.as_deref().unwrap_or("unknown error");
        match self.state.as_str() {
            "delivered" => format!("{site_url} received the new token; nothing to hand over."),
            "pending" => format!(
                "{site_url} could not be reached ({error}); `dbsync serve` retries with backoff, \
                 or run `dbsync connections set-token NAME --token-stdin` there."
            ),
            "no_peer_credential" => format!(
                "{site_url} never registered a way to reach it: run `dbsync connections set-token \
                 NAME --token-stdin` there."
            ),
            _ => format!(
                "{site_url} refused the new token ({error}): run `dbsync connections set-token \
                 NAME --token-stdin` there."
            ),
        }
    }

    /// The outcome without what only the retry needs.
    fn public(mut self) -> Self {
        self.previous_sha256 = None;
        self.sealed_token = None;
        self
    }
}

/// What a pending token push is sealed under: bound to the connection and to this use.
fn token_push_binding(connection_id: Uuid) -> Uuid {
    Uuid::new_v5(&connection_id, b"dbsync token push")
}

fn token_push_of(connection: &Connection) -> Option<TokenPush> {
    connection
        .metadata
        .get("token_push")
        .and_then(|p| serde_json::from_value(p.clone()).ok())
}

impl Agent {
    /// Regenerates a sender connection's token (the old one stops working at once) and hands
    /// the new one to the receiver.
    pub async fn regenerate_token(
        &self,
        id_or_name: &str,
        actor: &Actor,
    ) -> Result<(CreatedConnection, TokenPush)> {
        let before = self.store.get_connection(id_or_name).await?;
        // A push still pending since an earlier regeneration: the receiver holds the token
        // from before that one.
        let previous = token_push_of(&before)
            .filter(|p| p.state == "pending")
            .and_then(|p| p.previous_sha256)
            .or_else(|| before.token_hash.as_deref().map(hex::encode))
            .unwrap_or_default();
        let created = self
            .store
            .regenerate_token(id_or_name, actor, self.now())
            .await?;
        let push = self
            .push_token(&created.connection, &created.token, previous, 0)
            .await?;
        Ok((created, push.public()))
    }

    /// Calls the receiver's `rotate-token` and records the outcome in the metadata.
    async fn push_token(
        &self,
        connection: &Connection,
        token: &Token,
        previous_sha256: String,
        previous_attempts: u32,
    ) -> Result<TokenPush> {
        let attempts = previous_attempts + 1;
        let mut push = TokenPush {
            state: String::new(),
            error: None,
            attempts,
            next_attempt_at: None,
            previous_sha256: None,
            sealed_token: None,
        };
        let bearer = match connection.token_ciphertext.as_deref() {
            None => {
                push.state = "no_peer_credential".into();
                None
            }
            Some(sealed) => match self.vault.open(connection.id, sealed) {
                Ok(bearer) => Some(bearer),
                Err(err) => {
                    push.state = "failed".into();
                    push.error = Some(err.to_string());
                    None
                }
            },
        };
        if let Some(bearer) = bearer {
            let request = RotateTokenRequest {
                site_url: self.site_url().await?,
                previous_token_sha256: previous_sha256.clone(),
                token: token.expose().to_owned(),
            };
            match self
                .peers
                .rotate_token(&connection.site_url, &bearer, &request)
                .await
            {
                Ok(_) => push.state = "delivered".into(),
                Err(err) if err.is_transient() => {
                    push.state = "pending".into();
                    push.error = Some(err.to_string());
                    push.next_attempt_at =
                        Some((self.now() + self.retry_delay(attempts)).to_rfc3339());
                    let sealed = self
                        .vault
                        .seal(token_push_binding(connection.id), token.expose())?;
                    push.sealed_token = Some(hex::encode(sealed));
                    push.previous_sha256 = Some(previous_sha256);
                }
                Err(err) => {
                    push.state = "failed".into();
                    push.error = Some(err.to_string());
                }
            }
        }
        tracing::info!(connection_id = %connection.id, state = %push.state, attempts, "token push to peer");
        if push.state != "pending" {
            self.store
                .record_event(
                    NewEvent::connection(
                        &Actor::system(),
                        "connection.token_pushed",
                        connection.id,
                        crate::clock::to_micros(self.now()),
                    )
                    .detail(json!({
                        "state": push.state, "error": push.error, "attempts": attempts,
                        "token_prefix": token.display_prefix(),
                    })),
                )
                .await?;
        }
        self.store
            .merge_connection_metadata(connection.id, json!({ "token_push": push }))
            .await?;
        Ok(push)
    }

    /// Retries a token push that is due on `connection`; true when one was attempted.
    pub(super) async fn retry_token_push(&self, connection: &Connection) -> Result<bool> {
        let Some(push) = token_push_of(connection)
            .filter(|_| super::registration::pending_push(connection, "token_push", self.now()))
        else {
            return Ok(false);
        };
        let token = push
            .sealed_token
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|sealed| {
                self.vault
                    .open(token_push_binding(connection.id), &sealed)
                    .ok()
            })
            .and_then(|t| Token::parse(&t).ok());
        let Some(token) = token else {
            let failed = TokenPush {
                state: "failed".into(),
                error: Some("the pending token could not be opened".into()),
                ..push.public()
            };
            self.store
                .merge_connection_metadata(connection.id, json!({ "token_push": failed }))
                .await?;
            return Ok(true);
        };
        // Regenerated since (the hash on record moved on) without this push being replaced:
        // nothing of ours to deliver.
        if connection.token_hash.as_deref() != Some(token.hash().as_slice()) {
            return Ok(false);
        }
        let previous = push.previous_sha256.unwrap_or_default();
        self.push_token(connection, &token, previous, push.attempts)
            .await?;
        Ok(true)
    }

    /// Answers `POST /db-sync/api/rotate-token` on the receiving side: replaces the token a
    /// receiver connection holds when the caller shows the hash of the one it replaces. Asked
    /// again with the token already in place, it answers the same (a retry whose reply was lost).
    pub async fn handle_rotate_token(
        &self,
        bearer: &str,
        request: RotateTokenRequest,
    ) -> Result<ConnectionState, PeerError> {
        let connection = self.authenticate_peer(bearer).await?;
        if connection.direction != Direction::Receiver {
            return Err(PeerError::refused(
                400,
                "wrong_direction",
                "only a receiver connection takes a token from its sender",
            ));
        }
        if matches!(
            connection.status,
            ConnectionStatus::Revoked | ConnectionStatus::Expired
        ) {
            return Err(PeerError::refused(
                409,
                "connection_closed",
                format!("the connection is {}", connection.status),
            ));
        }
        let token = Token::parse(&request.token)
            .map_err(|err| PeerError::refused(400, "invalid_token", format!("new token: {err}")))?;
        let held = connection
            .token_ciphertext
            .as_deref()
            .map(|sealed| self.vault.open(connection.id, sealed))
            .transpose()?;
        let state = |status: ConnectionStatus| ConnectionState {
            connection_id: connection.id.to_string(),
            status: status.to_string(),
        };
        if held.as_deref() == Some(token.expose()) {
            return Ok(state(connection.status));
        }
        let shown = hex::decode(request.previous_token_sha256.trim()).unwrap_or_default();
        let held_hash = held
            .as_deref()
            .and_then(|t| Token::parse(t).ok())
            .map(|t| t.hash());
        if !held_hash.is_some_and(|h| crate::token::hashes_equal(&h, &shown)) {
            tracing::warn!(connection_id = %connection.id, "token rotation refused: previous token does not match");
            return Err(PeerError::refused(
                409,
                "token_mismatch",
                "the token being replaced is not the one this site holds",
            ));
        }
        let updated = self
            .store
            .set_receiver_token(
                &connection.id.to_string(),
                token.expose(),
                &self.vault,
                &Actor::remote(&connection.site_url),
                self.now(),
            )
            .await?;
        tracing::info!(connection_id = %connection.id, "connection token replaced by its sender");
        Ok(state(updated.status))
    }
}
