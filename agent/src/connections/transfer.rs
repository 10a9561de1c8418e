//! Transfers: one table moving under one connection, on either side (`send` on the sender,
//! `receive` on the receiver), with their lifecycle and approval workflow.
//!
//! ```text
//! pending ──start──▶ in_progress ──▶ completed | failed | cancelled
//! pending_approval ──approve──▶ approved ──start──▶ in_progress ...
//!                  ──deny──▶ denied
//!                  ──(approval_expires_at passes)──▶ expired
//! ```

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use crate::audit::{self, Actor};
use crate::clock::to_micros;
use crate::connection::ConflictStrategy;
use crate::error::{Error, Result};
use crate::store::{Store, on_pool};

string_enum! {
    /// Which side recorded the transfer.
    pub enum TransferDirection {
        /// This site sent the rows.
        Send => "send",
        /// This site received the rows.
        Receive => "receive",
    }
}

string_enum! {
    /// Where a transfer is in its lifecycle.
    pub enum TransferStatus {
        /// Created, not started.
        Pending => "pending",
        /// Waiting for an admin to approve or deny it.
        PendingApproval => "pending_approval",
        /// Approved, not started.
        Approved => "approved",
        /// Refused by an admin (terminal).
        Denied => "denied",
        /// Rows are moving.
        InProgress => "in_progress",
        /// Finished (terminal).
        Completed => "completed",
        /// Stopped by an error (terminal).
        Failed => "failed",
        /// Stopped on request (terminal).
        Cancelled => "cancelled",
        /// Nobody approved it in time (terminal).
        Expired => "expired",
    }
}

string_enum! {
    /// The transport a transfer ran over.
    pub enum Transport {
        /// WebSocket on the HTTP port.
        Ws => "ws",
        /// QUIC over UDP.
        Quic => "quic",
    }
}

/// Largest page [`Store::list_transfers`] returns.
pub const MAX_PAGE_SIZE: i64 = 500;

/// A transfer record.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Transfer {
    /// Identifier.
    pub id: Uuid,
    /// The connection it ran under (none once that connection is deleted).
    pub connection_id: Option<Uuid>,
    /// Send or receive.
    #[sqlx(try_from = "String")]
    pub direction: TransferDirection,
    /// The table moved.
    pub table_name: String,
    /// Lifecycle status.
    #[sqlx(try_from = "String")]
    pub status: TransferStatus,
    /// Whether an admin had to approve it.
    pub requires_approval: bool,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// When.
    pub approved_at: Option<DateTime<Utc>>,
    /// Who denied it.
    pub denied_by: Option<String>,
    /// When.
    pub denied_at: Option<DateTime<Utc>>,
    /// Why.
    pub denial_reason: Option<String>,
    /// Deadline for approval.
    pub approval_expires_at: Option<DateTime<Utc>>,
    /// Rows asked for (0: the whole table).
    pub records_requested: i64,
    /// Rows moved.
    pub records_transferred: i64,
    /// Rows inserted (receiver).
    pub records_created: i64,
    /// Rows updated (receiver).
    pub records_updated: i64,
    /// Rows left alone (receiver, `skip`).
    pub records_skipped: i64,
    /// Rows that failed to apply.
    pub records_failed: i64,
    /// Bytes on the wire (compressed frames).
    pub bytes_wire: i64,
    /// Bytes before compression.
    pub bytes_raw: i64,
    /// Conflict strategy used.
    #[sqlx(try_from = "String")]
    pub conflict_strategy: ConflictStrategy,
    /// ws or quic.
    pub transport: Option<String>,
    /// Receiver's address as the sender saw it.
    pub requester_ip: Option<String>,
    /// Receiver's client name.
    pub requester_user_agent: Option<String>,
    /// Why it failed.
    pub error_message: Option<String>,
    /// Last key sent/applied, for resuming.
    #[sqlx(json(nullable))]
    pub resume_key: Option<serde_json::Value>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When rows started moving.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Free-form facts (truncated, filters, ...).
    #[sqlx(json)]
    pub metadata: serde_json::Value,
}

/// A transfer to create.
#[derive(Debug, Clone)]
pub struct NewTransfer {
    /// The connection it runs under.
    pub connection_id: Uuid,
    /// Send or receive.
    pub direction: TransferDirection,
    /// The table.
    pub table_name: String,
    /// Whether it must wait for an admin (then it starts as `pending_approval`).
    pub requires_approval: bool,
    /// Rows asked for (0: the whole table).
    pub records_requested: i64,
    /// Conflict strategy.
    pub conflict_strategy: ConflictStrategy,
    /// ws or quic.
    pub transport: Option<Transport>,
    /// Receiver's address.
    pub requester_ip: Option<String>,
    /// Receiver's client name.
    pub requester_user_agent: Option<String>,
}

/// Adds a [`Progress`] to a running transfer: $1 the transfer, $2..$8 the counters in the
/// order of its fields, $9 the resume key (kept when null). Matches no row when the transfer is
/// no longer in progress.
pub(crate) const PROGRESS_UPDATE: &str = "UPDATE dbsync_transfers SET records_transferred = records_transferred + $2, \
     records_created = records_created + $3, records_updated = records_updated + $4, \
     records_skipped = records_skipped + $5, records_failed = records_failed + $6, \
     bytes_wire = bytes_wire + $7, bytes_raw = bytes_raw + $8, \
     resume_key = COALESCE($9, resume_key) \
     WHERE id = $1 AND status = 'in_progress'";

/// Counters added to a running transfer.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Rows moved.
    pub records_transferred: i64,
    /// Rows inserted.
    pub records_created: i64,
    /// Rows updated.
    pub records_updated: i64,
    /// Rows skipped.
    pub records_skipped: i64,
    /// Rows failed.
    pub records_failed: i64,
    /// Compressed bytes.
    pub bytes_wire: i64,
    /// Uncompressed bytes.
    pub bytes_raw: i64,
    /// New resume key, when it moved.
    pub resume_key: Option<serde_json::Value>,
}

/// Filters and page for [`Store::list_transfers`].
#[derive(Debug, Clone, Default)]
pub struct TransferFilter {
    /// Only this connection.
    pub connection_id: Option<Uuid>,
    /// Only this direction.
    pub direction: Option<TransferDirection>,
    /// Only this status.
    pub status: Option<TransferStatus>,
    /// Only this table.
    pub table_name: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// 1-based page (default 1).
    pub page: Option<i64>,
    /// Rows per page (default 50, at most [`MAX_PAGE_SIZE`]).
    pub per_page: Option<i64>,
}

/// One page of transfers.
#[derive(Debug, Clone, Serialize)]
pub struct TransferPage {
    /// The transfers on this page, newest first.
    pub items: Vec<Transfer>,
    /// Matches over all pages.
    pub total: i64,
    /// This page (1-based).
    pub page: i64,
    /// Page size.
    pub per_page: i64,
}

/// Totals for one connection.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Every transfer recorded.
    pub total_transfers: i64,
    /// Completed ones.
    pub completed_transfers: i64,
    /// Failed ones.
    pub failed_transfers: i64,
    /// Waiting for approval.
    pub pending_approval: i64,
    /// Rows moved by all transfers.
    pub total_records: i64,
    /// Wire bytes moved by all transfers.
    pub total_bytes: i64,
    /// Uncompressed bytes moved by all transfers.
    pub total_bytes_raw: i64,
}

const WHERE_FILTER: &str = "($1 IS NULL OR connection_id = $1) AND ($2 IS NULL OR direction = $2) \
     AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR table_name = $4) \
     AND ($5 IS NULL OR created_at >= $5) AND ($6 IS NULL OR created_at < $6)";

impl Store {
    /// Records a new transfer: `pending`, or `pending_approval` with a deadline `approval_ttl`
    /// from now.
    pub async fn create_transfer(
        &self,
        new: NewTransfer,
        approval_ttl: chrono::Duration,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        if new.table_name.is_empty() {
            return Err(Error::invalid("table_name", "must not be empty"));
        }
        let now = to_micros(now);
        let (status, deadline) = if new.requires_approval {
            (
                TransferStatus::PendingApproval,
                Some(to_micros(now + approval_ttl)),
            )
        } else {
            (TransferStatus::Pending, None)
        };
        let id = Uuid::now_v7();
        Ok(on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let transfer: Transfer = sqlx::query_as(
                "INSERT INTO dbsync_transfers (id, connection_id, direction, table_name, status, requires_approval, \
                 approval_expires_at, records_requested, conflict_strategy, transport, requester_ip, \
                 requester_user_agent, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING *",
            )
            .bind(id)
            .bind(new.connection_id)
            .bind(new.direction.as_str())
            .bind(&new.table_name)
            .bind(status.as_str())
            .bind(new.requires_approval)
            .bind(deadline)
            .bind(new.records_requested)
            .bind(new.conflict_strategy.as_str())
            .bind(new.transport.map(Transport::as_str))
            .bind(&new.requester_ip)
            .bind(&new.requester_user_agent)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            audit::insert!(
                &mut *tx,
                audit::NewEvent::transfer(
                    actor,
                    "transfer.created",
                    Some(new.connection_id),
                    id,
                    now
                )
                .detail(serde_json::json!({ "table": new.table_name, "status": status }))
            )
            .await?;
            tx.commit().await?;
            transfer
        }))
    }

    /// Looks a transfer up by id.
    pub async fn get_transfer(&self, id: Uuid) -> Result<Transfer> {
        let found: Option<Transfer> = on_pool!(self, |pool| {
            sqlx::query_as("SELECT * FROM dbsync_transfers WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        found.ok_or_else(|| Error::not_found("transfer", id.to_string()))
    }

    /// pending | approved → in_progress.
    pub async fn start_transfer(&self, id: Uuid, now: DateTime<Utc>) -> Result<Transfer> {
        self.transfer_step(
            id,
            "start",
            "UPDATE dbsync_transfers SET status = 'in_progress', started_at = COALESCE(started_at, $2) \
             WHERE id = $1 AND status IN ('pending', 'approved') RETURNING *",
            None,
            None,
            now,
        )
        .await
    }

    /// Adds counters to an in-progress transfer.
    pub async fn record_progress(&self, id: Uuid, progress: &Progress) -> Result<Transfer> {
        let updated: Option<Transfer> = on_pool!(self, |pool| {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{PROGRESS_UPDATE} RETURNING *"
            )))
            .bind(id)
            .bind(progress.records_transferred)
            .bind(progress.records_created)
            .bind(progress.records_updated)
            .bind(progress.records_skipped)
            .bind(progress.records_failed)
            .bind(progress.bytes_wire)
            .bind(progress.bytes_raw)
            .bind(progress.resume_key.as_ref().map(Json))
            .fetch_optional(pool)
            .await?
        });
        match updated {
            Some(transfer) => Ok(transfer),
            None => Err(self.illegal_transfer(id, "record progress on").await),
        }
    }

    /// in_progress → completed; adds the transfer's rows and bytes to its connection's totals.
    pub async fn complete_transfer(&self, id: Uuid, now: DateTime<Utc>) -> Result<Transfer> {
        let now = to_micros(now);
        let updated: Option<Transfer> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Transfer> = sqlx::query_as(
                "UPDATE dbsync_transfers SET status = 'completed', completed_at = $2 \
                 WHERE id = $1 AND status = 'in_progress' RETURNING *",
            )
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(transfer) = &updated {
                sqlx::query(
                    "UPDATE dbsync_connections SET total_transfers = total_transfers + 1, \
                     total_records = total_records + $2, total_bytes = total_bytes + $3, last_transfer_at = $4 \
                     WHERE id = $1",
                )
                .bind(transfer.connection_id)
                .bind(transfer.records_transferred)
                .bind(transfer.bytes_wire)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(transfer) => Ok(transfer),
            None => Err(self.illegal_transfer(id, "complete").await),
        }
    }

    /// pending | pending_approval | approved | in_progress → failed, with the error.
    pub async fn fail_transfer(
        &self,
        id: Uuid,
        message: &str,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        self.transfer_step(
            id,
            "fail",
            "UPDATE dbsync_transfers SET status = 'failed', error_message = $3, completed_at = $2 \
             WHERE id = $1 AND status IN ('pending', 'pending_approval', 'approved', 'in_progress') RETURNING *",
            Some(message),
            None,
            now,
        )
        .await
    }

    /// pending | pending_approval | approved | in_progress → cancelled.
    pub async fn cancel_transfer(
        &self,
        id: Uuid,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        self.transfer_step(
            id,
            "cancel",
            "UPDATE dbsync_transfers SET status = 'cancelled', completed_at = $2 \
             WHERE id = $1 AND status IN ('pending', 'pending_approval', 'approved', 'in_progress') RETURNING *",
            None,
            Some((actor, "transfer.cancelled")),
            now,
        )
        .await
    }

    /// pending_approval → approved, while the approval deadline has not passed (past it the
    /// transfer becomes `expired` and the approval is refused).
    pub async fn approve_transfer(
        &self,
        id: Uuid,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        self.expire_due_approvals(now).await?;
        let now = to_micros(now);
        let updated: Option<Transfer> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Transfer> = sqlx::query_as(
                "UPDATE dbsync_transfers SET status = 'approved', approved_by = $2, approved_at = $3 \
                 WHERE id = $1 AND status = 'pending_approval' RETURNING *",
            )
            .bind(id)
            .bind(actor.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(transfer) = &updated {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::transfer(
                        actor,
                        "transfer.approved",
                        transfer.connection_id,
                        id,
                        now
                    )
                    .detail(serde_json::json!({ "table": transfer.table_name }))
                )
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(transfer) => Ok(transfer),
            None => Err(self.illegal_transfer(id, "approve").await),
        }
    }

    /// pending_approval → denied, with a reason.
    pub async fn deny_transfer(
        &self,
        id: Uuid,
        reason: &str,
        actor: &Actor,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(Error::invalid(
                "reason",
                "a reason is required to deny a transfer",
            ));
        }
        let now = to_micros(now);
        let updated: Option<Transfer> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Transfer> = sqlx::query_as(
                "UPDATE dbsync_transfers SET status = 'denied', denied_by = $2, denied_at = $3, denial_reason = $4, \
                 completed_at = $3 WHERE id = $1 AND status = 'pending_approval' RETURNING *",
            )
            .bind(id)
            .bind(actor.as_str())
            .bind(now)
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(transfer) = &updated {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::transfer(
                        actor,
                        "transfer.denied",
                        transfer.connection_id,
                        id,
                        now
                    )
                    .detail(serde_json::json!({ "table": transfer.table_name, "reason": reason }))
                )
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(transfer) => Ok(transfer),
            None => Err(self.illegal_transfer(id, "deny").await),
        }
    }

    /// Marks every approval whose deadline has passed as `expired`; returns how many.
    pub async fn expire_due_approvals(&self, now: DateTime<Utc>) -> Result<u64> {
        Ok(on_pool!(self, |pool| {
            sqlx::query(
                "UPDATE dbsync_transfers SET status = 'expired', completed_at = $1 \
                 WHERE status = 'pending_approval' AND approval_expires_at <= $1",
            )
            .bind(to_micros(now))
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Transfers matching `filter`, newest first, one page at a time.
    pub async fn list_transfers(&self, filter: &TransferFilter) -> Result<TransferPage> {
        let per_page = filter.per_page.unwrap_or(50).clamp(1, MAX_PAGE_SIZE);
        let page = filter.page.unwrap_or(1).max(1);
        let offset = (page - 1).saturating_mul(per_page);
        let direction = filter.direction.map(TransferDirection::as_str);
        let status = filter.status.map(TransferStatus::as_str);
        let since = filter.since.map(to_micros);
        let until = filter.until.map(to_micros);
        let list_sql = sqlx::AssertSqlSafe(format!(
            "SELECT * FROM dbsync_transfers WHERE {WHERE_FILTER} ORDER BY created_at DESC, id DESC LIMIT $7 OFFSET $8"
        ));
        let count_sql = sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM dbsync_transfers WHERE {WHERE_FILTER}"
        ));
        let (items, total): (Vec<Transfer>, i64) = on_pool!(self, |pool| {
            let items = sqlx::query_as(list_sql)
                .bind(filter.connection_id)
                .bind(direction)
                .bind(status)
                .bind(&filter.table_name)
                .bind(since)
                .bind(until)
                .bind(per_page)
                .bind(offset)
                .fetch_all(pool)
                .await?;
            let total = sqlx::query_scalar(count_sql)
                .bind(filter.connection_id)
                .bind(direction)
                .bind(status)
                .bind(&filter.table_name)
                .bind(since)
                .bind(until)
                .fetch_one(pool)
                .await?;
            (items, total)
        });
        Ok(TransferPage {
            items,
            total,
            page,
            per_page,
        })
    }

    /// Merges `patch` into a transfer's metadata object.
    pub async fn merge_transfer_metadata(
        &self,
        id: Uuid,
        patch: serde_json::Value,
    ) -> Result<Transfer> {
        let current = self.get_transfer(id).await?;
        let metadata = crate::store::merge_json_object(current.metadata, patch);
        Ok(on_pool!(self, |pool| {
            sqlx::query_as("UPDATE dbsync_transfers SET metadata = $2 WHERE id = $1 RETURNING *")
                .bind(id)
                .bind(Json(metadata))
                .fetch_one(pool)
                .await?
        }))
    }

    /// Totals over every transfer recorded under a connection.
    pub async fn connection_stats(&self, connection_id: Uuid) -> Result<ConnectionStats> {
        Ok(on_pool!(self, |pool| {
            sqlx::query_as(
                "SELECT CAST(COUNT(*) AS BIGINT) AS total_transfers, \
                 CAST(COALESCE(SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END), 0) AS BIGINT) AS completed_transfers, \
                 CAST(COALESCE(SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT) AS failed_transfers, \
                 CAST(COALESCE(SUM(CASE WHEN status = 'pending_approval' THEN 1 ELSE 0 END), 0) AS BIGINT) AS pending_approval, \
                 CAST(COALESCE(SUM(records_transferred), 0) AS BIGINT) AS total_records, \
                 CAST(COALESCE(SUM(bytes_wire), 0) AS BIGINT) AS total_bytes, \
                 CAST(COALESCE(SUM(bytes_raw), 0) AS BIGINT) AS total_bytes_raw \
                 FROM dbsync_transfers WHERE connection_id = $1",
            )
            .bind(connection_id)
            .fetch_one(pool)
            .await?
        }))
    }

    /// One conditional status update ($1 id, $2 now, $3 message), audited when `audit` is given.
    async fn transfer_step(
        &self,
        id: Uuid,
        verb: &'static str,
        sql: &'static str,
        message: Option<&str>,
        audit: Option<(&Actor, &'static str)>,
        now: DateTime<Utc>,
    ) -> Result<Transfer> {
        let now = to_micros(now);
        let updated: Option<Transfer> = on_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let updated: Option<Transfer> = sqlx::query_as(sql)
                .bind(id)
                .bind(now)
                .bind(message)
                .fetch_optional(&mut *tx)
                .await?;
            if let (Some(transfer), Some((actor, action))) = (&updated, audit) {
                audit::insert!(
                    &mut *tx,
                    audit::NewEvent::transfer(actor, action, transfer.connection_id, id, now)
                        .detail(serde_json::json!({ "table": transfer.table_name }))
                )
                .await?;
            }
            tx.commit().await?;
            updated
        });
        match updated {
            Some(transfer) => Ok(transfer),
            None => Err(self.illegal_transfer(id, verb).await),
        }
    }

    pub(crate) async fn illegal_transfer(&self, id: Uuid, action: &'static str) -> Error {
        match self.get_transfer(id).await {
            Ok(transfer) => Error::IllegalTransition {
                kind: "transfer",
                name: id.to_string(),
                action,
                status: transfer.status.to_string(),
            },
            Err(err) => err,
        }
    }
}
