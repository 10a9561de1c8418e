//! Bearer tokens for the admin JSON API: created (shown once), listed, revoked, verified. Only
//! the SHA-256 of a token is stored.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};
use crate::token::Token;

/// A stored admin token (never the token itself).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AdminToken {
    /// Identifier.
    pub id: Uuid,
    /// Unique name; actions taken with the token are audited as `admin:<name>`.
    pub name: String,
    /// SHA-256 of the token. Never serialized.
    #[serde(skip)]
    pub token_hash: Vec<u8>,
    /// First characters, for telling tokens apart.
    pub token_prefix: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Last successful use.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    pub revoked_by: Option<String>,
    /// When (a revoked token authenticates nothing).
    pub revoked_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Creates an admin token named `name`; the returned token is never retrievable again.
    pub async fn create_admin_token(
        &self,
        name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<(AdminToken, Token)> {
        let name = name.trim();
        if name.is_empty()
            || name.len() > 100
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::invalid(
                "name",
                "must be 1-100 characters without spaces",
            ));
        }
        let token = Token::generate_admin();
        let now = to_micros(now);
        let id = Uuid::new_v4();
        let created = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let created: AdminToken = sqlx::query_as(
                "INSERT INTO dbsync_admin_tokens (id, name, token_hash, token_prefix, created_by, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            )
            .bind(id)
            .bind(name)
            .bind(token.hash())
            .bind(token.display_prefix())
            .bind(actor.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| match &err {
                sqlx::Error::Database(db) if db.is_unique_violation() => {
                    Error::Conflict(format!("an admin token named {name:?} already exists"))
                }
                _ => Error::Database(err),
            })?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::site(actor, "admin_token.created", now)
                    .detail(serde_json::json!({ "name": name }))
            )
            .await?;
            tx.commit().await?;
            created
        });
        Ok((created, token))
    }

    /// Every admin token, newest first.
    pub async fn list_admin_tokens(&self) -> Result<Vec<AdminToken>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_admin_tokens ORDER BY created_at DESC, name")
                .fetch_all(pool)
                .await?
        }))
    }

    /// Revokes the named admin token.
    pub async fn revoke_admin_token(
        &self,
        name: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<AdminToken> {
        let now = to_micros(now);
        let revoked: Option<AdminToken> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let revoked: Option<AdminToken> = sqlx::query_as(
                "UPDATE dbsync_admin_tokens SET revoked_by = $2, revoked_at = $3 \
                 WHERE name = $1 AND revoked_at IS NULL RETURNING *",
            )
            .bind(name)
            .bind(actor.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if revoked.is_some() {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::site(actor, "admin_token.revoked", now)
                        .detail(serde_json::json!({ "name": name }))
                )
                .await?;
            }
            tx.commit().await?;
            revoked
        });
        revoked.ok_or_else(|| Error::not_found("active admin token", name))
    }

    /// Whether the admin token `id` exists and is not revoked (sessions opened with it end when
    /// it is revoked).
    pub async fn admin_token_active(&self, id: Uuid) -> Result<bool> {
        let found: Option<(Uuid,)> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT id FROM dbsync_admin_tokens WHERE id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        Ok(found.is_some())
    }

    /// The live admin token matching `presented`, if any (and records its use). A malformed
    /// token is refused without a query.
    pub async fn verify_admin_token(
        &self,
        presented: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<AdminToken>> {
        let Ok(token) = Token::parse_admin(presented) else {
            return Ok(None);
        };
        let hash = token.hash();
        let found: Option<AdminToken> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT * FROM dbsync_admin_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
            )
            .bind(&hash)
            .fetch_optional(pool)
            .await?
        });
        let Some(found) = found.filter(|t| crate::token::hashes_equal(&t.token_hash, &hash)) else {
            return Ok(None);
        };
        on_pool!(self, |pool| {
            sqlx::query("UPDATE dbsync_admin_tokens SET last_used_at = $2 WHERE id = $1")
                .bind(found.id)
                .bind(to_micros(now))
                .execute(pool)
                .await?;
        });
        Ok(Some(found))
    }
}
