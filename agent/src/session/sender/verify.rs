//! Serving `Verify` (protocol 4): a page of a table's rows as hashes, never their values.
//!
//! The same access checks as any request hold (the session's, the offered tables, the rate
//! limit); a verification counts against no download or record limit. Each table verified in a
//! session is a transfer of its own (`metadata.kind = "verify"`) that counts the rows hashed.

use dbsync_protocol::Message;
use dbsync_protocol::message::{MAX_BUCKETS, TableSchema, Verify, VerifyPage, VerifyRange};
use dbsync_protocol::session::Code;
use serde_bytes::ByteBuf;

use super::{Session, SessionResult};
use crate::audit::Actor;
use crate::connection::Connection;
use crate::data::row_hash::{PageHasher, row_hash};
use crate::transfer::{NewTransfer, Progress, TransferDirection};

/// Most rows in one page of hashes.
pub(crate) const MAX_VERIFY_PAGE: u64 = 10_000;

impl Session<'_> {
    pub(super) async fn verify(
        &mut self,
        connection: &Connection,
        request: Verify,
        version: u16,
    ) -> SessionResult<()> {
        if version < dbsync_protocol::VERIFY_VERSION {
            return self
                .refuse(
                    Code::ProtocolError,
                    "Verify needs protocol 4; this session speaks an older one",
                    None,
                )
                .await;
        }
        let Some(schema) = self.offered_schema(connection, &request.table).await? else {
            return Ok(());
        };
        if schema.primary_key.is_empty() {
            return self
                .refuse(
                    Code::InvalidRequest,
                    format!("{:?} has no primary key to verify by", request.table),
                    None,
                )
                .await;
        }
        if request
            .after
            .as_ref()
            .is_some_and(|k| k.len() != schema.primary_key.len())
        {
            return self
                .refuse(
                    Code::InvalidRequest,
                    "`after` does not have the key's columns",
                    None,
                )
                .await;
        }
        let store = &self.agent.store;
        let columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let per_request = u64::try_from(connection.max_records_per_request).unwrap_or(1);
        let limit = request
            .limit
            .clamp(1, per_request.clamp(1, MAX_VERIFY_PAGE));
        if let Some(range) = &request.range {
            return self
                .verify_range(
                    connection, &request, range, &schema, &columns, limit, version,
                )
                .await;
        }
        let page = store
            .read_page(&schema, &columns, request.after.as_deref(), limit as i64)
            .await?;
        let key_positions: Vec<usize> = schema
            .primary_key
            .iter()
            .filter_map(|k| columns.iter().position(|c| c == k))
            .collect();
        let types: Vec<&str> = schema
            .columns
            .iter()
            .map(|c| c.neutral_type.as_str())
            .collect();
        let mut hasher = PageHasher::default();
        let mut keys = Vec::new();
        let mut hashes = Vec::new();
        for row in &page.rows {
            let hash = row_hash(row, &types)?;
            hasher.add(&hash);
            if request.detail {
                keys.push(key_positions.iter().map(|i| row[*i].clone()).collect());
                hashes.push(ByteBuf::from(hash.to_vec()));
            }
        }
        let (rows, hash) = hasher.finish();
        let more = rows == limit;
        if !request.detail {
            self.record_verification(connection, &request, rows, more)
                .await?;
        } else if !more {
            // The last page asked for with its rows' hashes (its summary was not asked for).
            self.finish_verification(&request.table).await?;
        }
        self.send(&Message::VerifyPage(VerifyPage {
            request_id: request.request_id,
            rows,
            hash,
            last_key: page.last_key,
            more,
            keys,
            hashes,
            buckets: None,
            mark: None,
        }))
        .await
        .map(|_| ())
    }

    /// A key range hashed in the database (protocol 5): the whole range's count and hash, or
    /// with `detail` a page of its rows' keys and hashes; on protocol 8 its buckets' counts and
    /// hashes, or a page of only some buckets' rows.
    #[allow(clippy::too_many_arguments)]
    async fn verify_range(
        &mut self,
        connection: &Connection,
        request: &Verify,
        range: &VerifyRange,
        schema: &TableSchema,
        columns: &[String],
        limit: u64,
        version: u16,
    ) -> SessionResult<()> {
        if version < dbsync_protocol::RANGE_HASH_VERSION {
            return self
                .refuse(
                    Code::ProtocolError,
                    "a range hash needs protocol 5; this session speaks an older one",
                    None,
                )
                .await;
        }
        if schema.engine != "postgres" {
            return self
                .refuse(
                    Code::InvalidRequest,
                    "this sender's tables are not in PostgreSQL: ask for pages of row hashes",
                    None,
                )
                .await;
        }
        if range
            .upto
            .as_ref()
            .is_some_and(|k| k.len() != schema.primary_key.len())
        {
            return self
                .refuse(
                    Code::InvalidRequest,
                    "`upto` does not have the key's columns",
                    None,
                )
                .await;
        }
        if let Some(buckets) = &range.buckets {
            if version < dbsync_protocol::BUCKET_VERSION {
                return self
                    .refuse(
                        Code::ProtocolError,
                        "buckets need protocol 8; this session speaks an older one",
                        None,
                    )
                    .await;
            }
            if !buckets.is_well_formed(request.detail) {
                return self
                    .refuse(
                        Code::InvalidRequest,
                        format!(
                            "buckets: a power of two up to {MAX_BUCKETS}, with a bitmap of as \
                             many bits for a page of rows and none for a summary"
                        ),
                        None,
                    )
                    .await;
            }
        }
        let tracked = range.keys_only || range.since.is_some() || range.keys.is_some();
        if tracked && version < dbsync_protocol::MARK_VERSION {
            return self
                .refuse(
                    Code::ProtocolError,
                    "keys-only summaries, marks and listed keys need protocol 9; this session \
                     speaks an older one",
                    None,
                )
                .await;
        }
        let misfit = if range.keys_only && (request.detail || range.buckets.is_some()) {
            Some("a keys-only summary is a summary, without buckets")
        } else if range.since.is_some() && (!request.detail || range.buckets.is_some()) {
            Some("rows written since a mark come as a page of rows, without buckets")
        } else if range.keys.is_some()
            && (range.since.is_none() || request.after.is_some() || range.upto.is_some())
        {
            Some("listed keys go with a mark and without a range")
        } else if range.keys.as_ref().is_some_and(|k| k.len() as u64 > limit) {
            Some("more keys listed than a page's rows")
        } else {
            None
        };
        if let Some(misfit) = misfit {
            return self.refuse(Code::InvalidRequest, misfit, None).await;
        }
        let store = &self.agent.store;
        // Taken before the range is read: a row written after it was written by a
        // transaction numbered at or after it.
        let mark = if version >= dbsync_protocol::MARK_VERSION && !request.detail {
            store.change_mark(schema).await.ok()
        } else {
            None
        };
        let (after, upto) = (request.after.as_deref(), range.upto.as_deref());
        let only = range.buckets.as_ref().map(|b| (b.count, b.only.as_slice()));
        let answer = if request.detail {
            // One row past the page says whether the range goes on.
            let mut rows = match (&range.keys, range.since) {
                (Some(keys), Some(since)) => {
                    store
                        .listed_row_hashes(schema, columns, keys, Some((since.xid, since.written)))
                        .await?
                }
                (None, Some(since)) => {
                    store
                        .written_row_hashes(
                            schema,
                            columns,
                            after,
                            upto,
                            since.xid,
                            since.written,
                            limit as i64 + 1,
                        )
                        .await?
                }
                _ => {
                    store
                        .range_row_hashes(schema, columns, after, upto, only, limit as i64 + 1)
                        .await?
                }
            };
            let more = rows.keys.len() as u64 > limit;
            rows.keys.truncate(limit as usize);
            rows.hashes.truncate(limit as usize);
            let count = rows.keys.len() as u64;
            let mut hash = [0u8; 8];
            for row in &rows.hashes {
                for (h, r) in hash.iter_mut().zip(row) {
                    *h ^= r;
                }
            }
            VerifyPage {
                request_id: request.request_id,
                rows: count,
                hash: hash.to_vec(),
                last_key: rows.keys.last().cloned(),
                more,
                keys: rows.keys,
                hashes: rows
                    .hashes
                    .iter()
                    .map(|h| ByteBuf::from(h.to_vec()))
                    .collect(),
                buckets: None,
                mark: None,
            }
        } else {
            // The whole range's count and hash, and on protocol 8 its buckets'.
            let (rows, hash, buckets) = match &range.buckets {
                Some(buckets) => {
                    let (rows, hash, buckets) = store
                        .range_buckets(schema, columns, after, upto, buckets.count)
                        .await?;
                    (rows, hash, Some(buckets))
                }
                None if range.keys_only => {
                    let (rows, hash) = store.range_keys_hash(schema, after, upto).await?;
                    (rows, hash, None)
                }
                None => {
                    let (rows, hash) = store.range_hash(schema, columns, after, upto).await?;
                    (rows, hash, None)
                }
            };
            self.record_verification(connection, request, rows, upto.is_some())
                .await?;
            VerifyPage {
                request_id: request.request_id,
                rows,
                hash: hash.to_vec(),
                last_key: None,
                more: false,
                keys: Vec::new(),
                hashes: Vec::new(),
                buckets,
                mark,
            }
        };
        self.send(&Message::VerifyPage(answer)).await.map(|_| ())
    }

    /// Counts a page in the table's verification transfer (made at its first page, completed
    /// at its last).
    async fn record_verification(
        &mut self,
        connection: &Connection,
        request: &Verify,
        rows: u64,
        more: bool,
    ) -> SessionResult<()> {
        let store = &self.agent.store;
        let now = self.agent.now();
        let known = self
            .verifying
            .iter()
            .find(|(table, _)| *table == request.table)
            .map(|(_, id)| *id);
        // A table's verification is one transfer, however its ranges are asked for (a whole
        // table that differs is asked for again range by range from its start).
        let id = match known {
            Some(id) => id,
            None => {
                let created = store
                    .create_transfer(
                        NewTransfer {
                            connection_id: connection.id,
                            direction: TransferDirection::Send,
                            table_name: request.table.clone(),
                            requires_approval: false,
                            records_requested: 0,
                            conflict_strategy: connection.default_conflict_strategy,
                            transport: Some(self.transport),
                            requester_ip: Some(self.client_ip.to_string()),
                            requester_user_agent: self.user_agent.clone(),
                        },
                        self.agent.config.approval_ttl(),
                        &Actor::remote(&connection.site_url),
                        now,
                    )
                    .await?;
                store
                    .merge_transfer_metadata(created.id, serde_json::json!({ "kind": "verify" }))
                    .await?;
                store.start_transfer(created.id, now).await?;
                self.verifying.retain(|(table, _)| *table != request.table);
                self.verifying.push((request.table.clone(), created.id));
                created.id
            }
        };
        store
            .record_progress(
                id,
                &Progress {
                    records_transferred: i64::try_from(rows).unwrap_or(i64::MAX),
                    ..Progress::default()
                },
            )
            .await?;
        if !more {
            self.finish_verification(&request.table).await?;
        }
        Ok(())
    }

    /// Completes the table's verification, if one is under way.
    async fn finish_verification(&mut self, table: &str) -> SessionResult<()> {
        let Some(at) = self.verifying.iter().position(|(t, _)| t == table) else {
            return Ok(());
        };
        let (_, id) = self.verifying.remove(at);
        self.agent
            .store
            .complete_transfer(id, self.agent.now())
            .await?;
        Ok(())
    }
}
