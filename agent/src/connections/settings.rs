//! Site-wide settings: how this site answers registrations from other sites, and its identity.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};

string_enum! {
    /// What happens when another site registers a connection here (SPEC section 5).
    pub enum IncomingMode {
        /// Receiver connection created active.
        AutoAccept => "auto_accept",
        /// Receiver connection created pending; an admin approves it.
        RequireApproval => "require_approval",
        /// Accepted only with the incoming password.
        RequirePassword => "require_password",
        /// Refused; nothing stored.
        DenyAll => "deny_all",
    }
}

/// The settings row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Settings {
    /// How registrations are answered.
    #[sqlx(try_from = "String")]
    pub incoming_mode: IncomingMode,
    /// argon2id hash of the incoming password. Serialized only as "is it set".
    #[serde(rename = "incoming_password_set", serialize_with = "password_set")]
    pub incoming_password_hash: Option<String>,
    /// This site's stable identity.
    pub site_id: Uuid,
    /// Display name of this site.
    pub site_name: Option<String>,
    /// Public base URL of this site.
    pub site_url: Option<String>,
    /// The UDP port `dbsync serve` serves QUIC on (recorded at start-up).
    pub quic_port: Option<i32>,
    /// Who changed the settings last.
    pub updated_by: Option<String>,
    /// When.
    pub updated_at: DateTime<Utc>,
}

fn password_set<S: serde::Serializer>(
    value: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_bool(value.is_some())
}

impl Settings {
    /// Whether `password` passes the incoming-password check (false when none is set).
    pub fn incoming_password_matches(&self, password: &str) -> bool {
        self.incoming_password_hash
            .as_deref()
            .is_some_and(|hash| crate::password::verify(password, hash))
    }
}

impl Store {
    /// Creates the settings row on first start (default mode: require_approval).
    pub(crate) async fn ensure_settings_row(&self) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_settings (id, incoming_mode, site_id, updated_at) \
                 VALUES (1, 'require_approval', $1, $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(Uuid::new_v4())
            .bind(to_micros(Utc::now()))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// The current settings.
    pub async fn settings(&self) -> Result<Settings> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_settings WHERE id = 1")
                .fetch_one(pool)
                .await?
        }))
    }

    /// Sets the incoming mode, and the incoming password when given. `require_password` needs a
    /// password, given now or set before.
    pub async fn set_incoming(
        &self,
        mode: IncomingMode,
        password: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Settings> {
        let current = self.settings().await?;
        let new_hash = match password {
            Some(password) => Some(crate::password::hash(password)?),
            None => None,
        };
        if mode == IncomingMode::RequirePassword
            && new_hash.is_none()
            && current.incoming_password_hash.is_none()
        {
            return Err(Error::invalid(
                "password",
                "require_password mode needs an incoming password: give one with \
                 --password-stdin (the API: \"password\")",
            ));
        }
        let now = to_micros(now);
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let settings: Settings = sqlx::query_as(
                "UPDATE dbsync_settings SET incoming_mode = $1, \
                 incoming_password_hash = COALESCE($2, incoming_password_hash), updated_by = $3, updated_at = $4 \
                 WHERE id = 1 RETURNING *",
            )
            .bind(mode.as_str())
            .bind(&new_hash)
            .bind(actor.as_str())
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::site(actor, "settings.incoming_changed", now).detail(serde_json::json!({
                    "from": current.incoming_mode, "to": mode, "password_changed": new_hash.is_some(),
                }))
            )
            .await?;
            tx.commit().await?;
            settings
        }))
    }

    /// Sets this site's display name and public URL.
    /// Records the UDP port QUIC sessions are served on (by `dbsync serve` at start-up).
    pub async fn set_quic_port(&self, port: Option<u16>) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query("UPDATE dbsync_settings SET quic_port = $1 WHERE id = 1")
                .bind(port.map(i32::from))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    pub async fn set_site_identity(
        &self,
        site_name: Option<&str>,
        site_url: Option<&str>,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Settings> {
        let site_url = site_url
            .map(crate::connection::normalize_site_url)
            .transpose()?;
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "UPDATE dbsync_settings SET site_name = COALESCE($1, site_name), site_url = COALESCE($2, site_url), \
                 updated_by = $3, updated_at = $4 WHERE id = 1 RETURNING *",
            )
            .bind(site_name)
            .bind(&site_url)
            .bind(actor.as_str())
            .bind(to_micros(now))
            .fetch_one(pool)
            .await?
        }))
    }
}
