//! Admin page sign-in sessions, kept in the state database so that every agent of a site knows
//! them (sign in on one, act on another) and a restart signs nobody out. Only the SHA-256 of a
//! session cookie is stored; each agent re-checks the admin token behind a session on every
//! request.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::clock::to_micros;
use crate::error::Result;
use crate::store::{Store, on_pool};

/// A signed-in browser, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredWebSession {
    /// The admin token it was opened with.
    pub token_id: Uuid,
    /// That token's name (actions are audited as `admin:<name>`).
    pub token_name: String,
    /// The value every form must echo.
    pub csrf: String,
    /// One message for the next page: `{ "error": bool, "text": "..." }`.
    #[sqlx(json(nullable))]
    pub flash: Option<serde_json::Value>,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// Its last request.
    pub last_seen_at: DateTime<Utc>,
}

/// How long sessions live: after the last request, and after sign-in however busy.
#[derive(Debug, Clone, Copy)]
pub struct SessionLife {
    /// Idle limit.
    pub idle: Duration,
    /// Absolute limit.
    pub absolute: Duration,
    /// Most sessions kept; the oldest goes first beyond it.
    pub max_sessions: i64,
}

impl StoredWebSession {
    fn alive(&self, now: DateTime<Utc>, life: SessionLife) -> bool {
        now - self.last_seen_at < life.idle && now - self.created_at < life.absolute
    }
}

impl Store {
    /// Stores a new session under `key_hash`, after dropping dead ones and, at the cap, the
    /// oldest.
    pub async fn open_web_session(
        &self,
        key_hash: &[u8],
        token_id: Uuid,
        token_name: &str,
        csrf: &str,
        now: DateTime<Utc>,
        life: SessionLife,
    ) -> Result<()> {
        let now = to_micros(now);
        on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "DELETE FROM dbsync_web_sessions WHERE last_seen_at <= $1 OR created_at <= $2",
            )
            .bind(now - life.idle)
            .bind(now - life.absolute)
            .execute(&mut *tx)
            .await?;
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dbsync_web_sessions")
                .fetch_one(&mut *tx)
                .await?;
            if count >= life.max_sessions {
                sqlx::query(
                    "DELETE FROM dbsync_web_sessions WHERE key_hash IN \
                     (SELECT key_hash FROM dbsync_web_sessions ORDER BY created_at LIMIT $1)",
                )
                .bind(count - life.max_sessions + 1)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "INSERT INTO dbsync_web_sessions (key_hash, token_id, token_name, csrf, flash, \
                 created_at, last_seen_at) VALUES ($1, $2, $3, $4, NULL, $5, $5)",
            )
            .bind(key_hash)
            .bind(token_id)
            .bind(token_name)
            .bind(csrf)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The live session under `key_hash`, touched, with its flash message taken; a dead one is
    /// removed.
    pub async fn find_web_session(
        &self,
        key_hash: &[u8],
        now: DateTime<Utc>,
        life: SessionLife,
    ) -> Result<Option<StoredWebSession>> {
        let now = to_micros(now);
        let found: Option<StoredWebSession> = on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT token_id, token_name, csrf, flash, created_at, last_seen_at \
                 FROM dbsync_web_sessions WHERE key_hash = $1",
            )
            .bind(key_hash)
            .fetch_optional(pool)
            .await?
        });
        let Some(session) = found else {
            return Ok(None);
        };
        if !session.alive(now, life) {
            self.close_web_session(key_hash).await?;
            return Ok(None);
        }
        on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_web_sessions SET last_seen_at = $2, flash = NULL WHERE key_hash = $1",
            )
            .bind(key_hash)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(Some(session))
    }

    /// Ends a session.
    pub async fn close_web_session(&self, key_hash: &[u8]) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query("DELETE FROM dbsync_web_sessions WHERE key_hash = $1")
                .bind(key_hash)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Leaves a message for the session's next page.
    pub async fn flash_web_session(&self, key_hash: &[u8], flash: serde_json::Value) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query("UPDATE dbsync_web_sessions SET flash = $2 WHERE key_hash = $1")
                .bind(key_hash)
                .bind(sqlx::types::Json(flash))
                .execute(pool)
                .await?;
        });
        Ok(())
    }
}
