//! A connection's lifecycle: approve, suspend, reactivate, revoke, expire, delete, regenerate
//! its token, and the expiry sweep. Every status change is one conditional `UPDATE ... WHERE
//! status IN (...)`, so two operators racing cannot both win, followed by an audit event in the
//! same transaction.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::connection::{Connection, CreatedConnection, Direction};
use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};
use crate::token::Token;

impl Store {
    /// pending → active.
    pub async fn approve_connection(
        &self,
        id_or_name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        self.transition(id_or_name, Transition::Approve, None, actor, now)
            .await
    }

    /// pending | active → suspended, with a reason.
    pub async fn suspend_connection(
        &self,
        id_or_name: &str,
        reason: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        self.transition(id_or_name, Transition::Suspend, Some(reason), actor, now)
            .await
    }

    /// suspended → active.
    pub async fn reactivate_connection(
        &self,
        id_or_name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        self.transition(id_or_name, Transition::Reactivate, None, actor, now)
            .await
    }

    /// pending | active | suspended → revoked (terminal), with a reason.
    pub async fn revoke_connection(
        &self,
        id_or_name: &str,
        reason: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        self.transition(id_or_name, Transition::Revoke, Some(reason), actor, now)
            .await
    }

    /// pending | active | suspended → expired (terminal); used by the sweep and by validation.
    pub async fn expire_connection(
        &self,
        id_or_name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let expired = self
            .transition(id_or_name, Transition::Expire, None, actor, now)
            .await?;
        // The peer is told like any status change: `dbsync serve` delivers the push at its next
        // round (`Agent::retry_pending_pushes`), wherever the expiry happened (a sweep, or a
        // session finding the connection past its date).
        let push = serde_json::json!({ "peer_push": {
            "state": "pending",
            "status": "expired",
            "reason": "expired",
            "remote_status": null,
            "error": null,
            "attempts": 0,
            "next_attempt_at": crate::clock::to_micros(now).to_rfc3339(),
        }});
        self.merge_connection_metadata(expired.id, push).await
    }

    async fn transition(
        &self,
        id_or_name: &str,
        step: Transition,
        reason: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let current = self.get_connection(id_or_name).await?;
        let reason = match (step.needs_reason(), reason.map(str::trim)) {
            (true, Some(reason)) if !reason.is_empty() => Some(reason.to_owned()),
            (true, _) => {
                return Err(Error::invalid(
                    "reason",
                    format!("a reason is required to {}", step.verb()),
                ));
            }
            (false, _) => None,
        };
        let now = to_micros(now);
        let updated: Option<Connection> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Connection> = sqlx::query_as(step.sql())
                .bind(current.id)
                .bind(actor.as_str())
                .bind(now)
                .bind(&reason)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(connection) = &updated {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::connection(actor, step.action(), connection.id, now).detail(
                        serde_json::json!({
                            "from": current.status, "to": connection.status, "reason": reason,
                        })
                    ),
                )
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(connection) => Ok(connection),
            None => {
                // The conditional update matched nothing: report the status that forbade it.
                let now_status = self
                    .find_connection(current.id)
                    .await?
                    .ok_or_else(|| Error::not_found("connection", id_or_name))?
                    .status;
                Err(Error::illegal_connection(
                    &current.name,
                    step.verb(),
                    now_status,
                ))
            }
        }
    }

    /// Deletes a connection and its checkpoints. Its transfers stay in the history (with no
    /// connection) and an audit event records who deleted what.
    pub async fn delete_connection(
        &self,
        id_or_name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Connection> {
        let current = self.get_connection(id_or_name).await?;
        let now = to_micros(now);
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let deleted = sqlx::query("DELETE FROM dbsync_connections WHERE id = $1")
                .bind(current.id)
                .execute(&mut *tx)
                .await?;
            if deleted.rows_affected() == 0 {
                return Err(Error::not_found("connection", id_or_name));
            }
            audit::insert!(
                &mut *tx,
                audit::NewEvent::connection(actor, "connection.deleted", current.id, now).detail(serde_json::json!({
                    "name": current.name, "direction": current.direction, "site_url": current.site_url,
                    "status": current.status,
                })),
            )
            .await?;
            tx.commit().await?;
        });
        Ok(current)
    }

    /// Replaces a sender connection's token; the old one stops working at once. Refused on
    /// revoked and expired connections.
    pub async fn regenerate_token(
        &self,
        id_or_name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<CreatedConnection> {
        let current = self.get_connection(id_or_name).await?;
        if current.direction != Direction::Sender {
            return Err(Error::invalid(
                "connection",
                format!(
                    "{} is a receiver connection; only the sending site issues tokens",
                    current.name
                ),
            ));
        }
        let token = Token::generate();
        let now = to_micros(now);
        let updated: Option<Connection> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Connection> = sqlx::query_as(
                "UPDATE dbsync_connections SET token_hash = $2, token_prefix = $3, updated_at = $4 \
                 WHERE id = $1 AND status IN ('pending', 'active', 'suspended') RETURNING *",
            )
            .bind(current.id)
            .bind(token.hash())
            .bind(token.display_prefix())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if updated.is_some() {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::connection(
                        actor,
                        "connection.token_regenerated",
                        current.id,
                        now
                    )
                    .detail(serde_json::json!({ "token_prefix": token.display_prefix() })),
                )
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(connection) => Ok(CreatedConnection { connection, token }),
            None => Err(Error::illegal_connection(
                &current.name,
                "regenerate the token of",
                current.status,
            )),
        }
    }

    /// Expires every live connection past its `expires_at` or out of a lifetime limit (downloads
    /// or records), as actor `system`. Returns the connections expired.
    pub async fn expire_due_connections(&self, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        let now = to_micros(now);
        let due: Vec<Uuid> = on_pool!(self, |pool| {
            sqlx::query_scalar(
                "SELECT id FROM dbsync_connections WHERE status IN ('pending', 'active', 'suspended') AND \
                 ((expires_at IS NOT NULL AND expires_at <= $1) \
                  OR (max_downloads IS NOT NULL AND downloads_used >= max_downloads) \
                  OR (max_records_total IS NOT NULL AND records_downloaded >= max_records_total))",
            )
            .bind(now)
            .fetch_all(pool)
            .await?
        });
        let mut expired = Vec::with_capacity(due.len());
        for id in due {
            match self
                .expire_connection(&id.to_string(), &Actor::system(), now)
                .await
            {
                Ok(connection) => expired.push(connection),
                // Changed or removed since the scan: nothing to expire.
                Err(Error::IllegalTransition { .. } | Error::NotFound { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(expired)
    }
}

/// A lifecycle step and the SQL that takes it only from the statuses that allow it.
/// Parameters: $1 id, $2 actor, $3 now, $4 reason (a step may leave some unused; the
/// actor of every step is in its audit event).
#[derive(Debug, Clone, Copy)]
enum Transition {
    Approve,
    Suspend,
    Reactivate,
    Revoke,
    Expire,
}

impl Transition {
    fn sql(self) -> &'static str {
        match self {
            Self::Approve => {
                "UPDATE dbsync_connections SET status = 'active', approved_by = $2, approved_at = $3, \
                 updated_at = $3 WHERE id = $1 AND status = 'pending' RETURNING *"
            }
            Self::Suspend => {
                "UPDATE dbsync_connections SET status = 'suspended', suspended_by = $2, suspended_at = $3, \
                 suspended_reason = $4, updated_at = $3 \
                 WHERE id = $1 AND status IN ('pending', 'active') RETURNING *"
            }
            Self::Reactivate => {
                // The suspension is over: its time, actor and reason stay in the audit trail,
                // not on an active connection.
                "UPDATE dbsync_connections SET status = 'active', suspended_by = NULL, \
                 suspended_at = NULL, suspended_reason = NULL, updated_at = $3 \
                 WHERE id = $1 AND status = 'suspended' RETURNING *"
            }
            Self::Revoke => {
                "UPDATE dbsync_connections SET status = 'revoked', revoked_by = $2, revoked_at = $3, \
                 revoked_reason = $4, updated_at = $3 \
                 WHERE id = $1 AND status IN ('pending', 'active', 'suspended') RETURNING *"
            }
            Self::Expire => {
                "UPDATE dbsync_connections SET status = 'expired', updated_at = $3 \
                 WHERE id = $1 AND status IN ('pending', 'active', 'suspended') RETURNING *"
            }
        }
    }

    fn needs_reason(self) -> bool {
        matches!(self, Self::Suspend | Self::Revoke)
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Suspend => "suspend",
            Self::Reactivate => "reactivate",
            Self::Revoke => "revoke",
            Self::Expire => "expire",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Self::Approve => "connection.approved",
            Self::Suspend => "connection.suspended",
            Self::Reactivate => "connection.reactivated",
            Self::Revoke => "connection.revoked",
            Self::Expire => "connection.expired",
        }
    }
}
