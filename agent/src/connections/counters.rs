//! A connection's counters, moved atomically so concurrent sessions never pass a limit: downloads,
//! records (reserved, given back), the last connection time and metadata.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::connection::Connection;
use crate::clock::to_micros;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};

impl Store {
    /// Counts one table transfer against `max_downloads`, atomically. Returns false when the
    /// limit is already reached.
    pub async fn take_download(&self, connection_id: Uuid) -> Result<bool> {
        let result = on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_connections SET downloads_used = downloads_used + 1 \
                 WHERE id = $1 AND (max_downloads IS NULL OR downloads_used < max_downloads)",
            )
            .bind(connection_id)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(result == 1)
    }

    /// Reserves up to `wanted` rows against `max_records_total`, atomically, and returns how many
    /// were granted: all of them, the remainder up to the limit, or 0. Concurrent callers can
    /// never overshoot the limit (compare-and-set on the counter).
    pub async fn take_records(&self, connection_id: Uuid, wanted: i64) -> Result<i64> {
        if wanted <= 0 {
            return Ok(0);
        }
        loop {
            let row: Option<(i64, Option<i64>)> = on_pool!(self, |pool| {
                sqlx::query_as("SELECT records_downloaded, max_records_total FROM dbsync_connections WHERE id = $1")
                    .bind(connection_id)
                    .fetch_optional(pool)
                    .await?
            });
            let (used, max) =
                row.ok_or_else(|| Error::not_found("connection", connection_id.to_string()))?;
            let granted = match max {
                Some(max) => wanted.min(max - used).max(0),
                None => wanted,
            };
            if granted == 0 {
                return Ok(0);
            }
            let swapped = on_pool!(self, |pool| {
                sqlx::query(
                    "UPDATE dbsync_connections SET records_downloaded = records_downloaded + $3 \
                     WHERE id = $1 AND records_downloaded = $2",
                )
                .bind(connection_id)
                .bind(used)
                .bind(granted)
                .execute(pool)
                .await?
                .rows_affected()
            });
            if swapped == 1 {
                return Ok(granted);
            }
            // Another session moved the counter between our read and write: read again.
            tokio::task::yield_now().await;
        }
    }

    /// Counts `rows` sent under a connection without a record limit (one with a limit counts
    /// them as it reserves them, [`Store::take_records`]).
    pub async fn count_records(&self, connection_id: Uuid, rows: i64) -> Result<()> {
        if rows > 0 {
            on_pool!(self, |pool| {
                sqlx::query(
                    "UPDATE dbsync_connections SET records_downloaded = records_downloaded + $2 \
                     WHERE id = $1",
                )
                .bind(connection_id)
                .bind(rows)
                .execute(pool)
                .await?;
            });
        }
        Ok(())
    }

    /// Returns rows reserved with [`Store::take_records`] but never sent (a pull that failed
    /// before sending them), so they do not count against the limit.
    pub async fn release_records(&self, connection_id: Uuid, unused: i64) -> Result<()> {
        if unused > 0 {
            on_pool!(self, |pool| {
                sqlx::query(
                    "UPDATE dbsync_connections SET records_downloaded = \
                     CASE WHEN records_downloaded > $2 THEN records_downloaded - $2 ELSE 0 END WHERE id = $1",
                )
                .bind(connection_id)
                .bind(unused)
                .execute(pool)
                .await?;
            });
        }
        Ok(())
    }

    /// Records a successful session open.
    pub async fn touch_connected(&self, connection_id: Uuid, now: DateTime<Utc>) -> Result<()> {
        on_pool!(self, |pool| {
            sqlx::query("UPDATE dbsync_connections SET last_connected_at = $2 WHERE id = $1")
                .bind(connection_id)
                .bind(to_micros(now))
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Merges `patch` into the connection's metadata object (top-level keys replaced).
    pub async fn merge_connection_metadata(
        &self,
        connection_id: Uuid,
        patch: serde_json::Value,
    ) -> Result<Connection> {
        self.update_connection_metadata(connection_id, |current| {
            crate::store::merge_json_object(current.clone(), patch.clone())
        })
        .await
    }

    /// Replaces a connection's metadata with `change` of it, atomically: written only if no
    /// one else wrote it since it was read (else read again and changed again), so two writers
    /// at once lose neither's change (a counter in it counts every increment).
    pub async fn update_connection_metadata(
        &self,
        connection_id: Uuid,
        change: impl Fn(&serde_json::Value) -> serde_json::Value,
    ) -> Result<Connection> {
        for _ in 0..100 {
            let current = self
                .find_connection(connection_id)
                .await?
                .ok_or_else(|| Error::not_found("connection", connection_id.to_string()))?;
            let metadata = change(&current.metadata);
            let updated: Option<Connection> = on_pool!(self, |pool| {
                sqlx::query_as(
                    "UPDATE dbsync_connections SET metadata = $2 WHERE id = $1 AND metadata = $3 \
                     RETURNING *",
                )
                .bind(connection_id)
                .bind(Json(&metadata))
                .bind(Json(&current.metadata))
                .fetch_optional(pool)
                .await?
            });
            if let Some(updated) = updated {
                return Ok(updated);
            }
        }
        Err(Error::Config(format!(
            "the metadata of connection {connection_id} kept changing while it was updated"
        )))
    }
}
