//! The audit trail: who did what to which connection or transfer, when.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::clock::to_micros;
use crate::error::Result;
use crate::store::{Store, on_pool};

/// Who acted: `cli:<os user>`, `admin:<admin token name>`, `remote:<site_url>` or `system`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    /// An operator at the command line.
    pub fn cli(os_user: &str) -> Self {
        Self(format!("cli:{os_user}"))
    }

    /// The operator running this process: the OS account name (`$USER` when the account
    /// database has no entry).
    pub fn current_cli_user() -> Self {
        let user = whoami::username()
            .ok()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into());
        Self::cli(&user)
    }

    /// A holder of the named admin token.
    pub fn admin(token_name: &str) -> Self {
        Self(format!("admin:{token_name}"))
    }

    /// A peer site.
    pub fn remote(site_url: &str) -> Self {
        Self(format!("remote:{site_url}"))
    }

    /// The agent itself (expiry sweep, scheduler).
    pub fn system() -> Self {
        Self("system".into())
    }

    /// The stored form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event about to be written.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub(crate) id: Uuid,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) actor: String,
    pub(crate) action: &'static str,
    pub(crate) connection_id: Option<Uuid>,
    pub(crate) transfer_id: Option<Uuid>,
    pub(crate) detail: serde_json::Value,
}

impl NewEvent {
    /// An event about a connection.
    pub fn connection(
        actor: &Actor,
        action: &'static str,
        connection_id: Uuid,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            // Time-ordered, so events written in the same microsecond keep their order.
            id: Uuid::now_v7(),
            occurred_at: to_micros(now),
            actor: actor.as_str().to_owned(),
            action,
            connection_id: Some(connection_id),
            transfer_id: None,
            detail: serde_json::json!({}),
        }
    }

    /// An event about a transfer (under a connection, when it still has one).
    pub fn transfer(
        actor: &Actor,
        action: &'static str,
        connection_id: Option<Uuid>,
        transfer_id: Uuid,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            transfer_id: Some(transfer_id),
            connection_id,
            ..Self::connection(actor, action, Uuid::nil(), now)
        }
    }

    /// A site-wide event (settings).
    pub fn site(actor: &Actor, action: &'static str, now: DateTime<Utc>) -> Self {
        Self {
            connection_id: None,
            ..Self::connection(actor, action, Uuid::nil(), now)
        }
    }

    /// Attaches structured detail.
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// Writes an event with the given executor (usually the transaction of the change it records).
macro_rules! insert {
    ($executor:expr, $event:expr $(,)?) => {{
        let event: $crate::audit::NewEvent = $event;
        sqlx::query(
            "INSERT INTO dbsync_audit_events (id, occurred_at, actor, action, connection_id, transfer_id, detail) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(event.id)
        .bind(event.occurred_at)
        .bind(event.actor)
        .bind(event.action)
        .bind(event.connection_id)
        .bind(event.transfer_id)
        .bind(sqlx::types::Json(event.detail))
        .execute($executor)
    }};
}
pub(crate) use insert;

/// A stored audit event.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEvent {
    /// Identifier.
    pub id: Uuid,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Who did it.
    pub actor: String,
    /// What was done, e.g. `connection.suspended`.
    pub action: String,
    /// The connection concerned.
    pub connection_id: Option<Uuid>,
    /// The transfer concerned.
    pub transfer_id: Option<Uuid>,
    /// Structured detail (reason, from/to status, ...).
    #[sqlx(json)]
    pub detail: serde_json::Value,
}

impl Store {
    /// Audit events about a connection (or every event when `connection_id` is none), oldest
    /// first, at most `limit`.
    pub async fn audit_events(
        &self,
        connection_id: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<AuditEvent>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT * FROM dbsync_audit_events WHERE ($1 IS NULL OR connection_id = $1) \
                 ORDER BY occurred_at, id LIMIT $2",
            )
            .bind(connection_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Writes a standalone event (one not tied to a state change in the same transaction).
    pub async fn record_event(&self, event: NewEvent) -> Result<()> {
        on_pool!(self, |pool| {
            insert!(pool, event).await?;
        });
        Ok(())
    }
}
