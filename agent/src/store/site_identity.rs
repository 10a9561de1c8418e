//! The site's QUIC certificate in the state database, so every agent on a PostgreSQL state
//! database presents the same one (a receiver pins one fingerprint for the site). Made once:
//! the first agent's insert wins, the others read it. The private key is sealed by the vault,
//! so agents sharing a state database must share the encryption key (they must anyway, to read
//! the receiver tokens).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::clock::to_micros;
use crate::error::Result;
use crate::store::{Store, on_pool};

/// What the site certificate's key is sealed under (not a connection id: its own binding).
pub fn key_binding() -> Uuid {
    Uuid::new_v5(&Uuid::nil(), b"dbsync site quic key")
}

impl Store {
    /// The stored certificate (DER) and sealed key, if any.
    pub async fn site_identity(&self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("SELECT cert_der, key_sealed FROM dbsync_site_identity WHERE id = 1")
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Stores the site certificate unless one is there already (another agent's wins).
    pub async fn insert_site_identity(
        &self,
        cert_der: &[u8],
        key_sealed: &[u8],
        now: DateTime<Utc>,
    ) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO dbsync_site_identity (id, cert_der, key_sealed, created_at) \
                 VALUES (1, $1, $2, $3) ON CONFLICT (id) DO NOTHING",
            )
            .bind(cert_der)
            .bind(key_sealed)
            .bind(to_micros(now))
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}
