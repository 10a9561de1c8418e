//! A parallel pull's cut (protocol 6): the sender cuts a table into key ranges, counts one
//! download for all of them, and keeps a grant the parts name from any session of the same
//! connection. Each part reads from the snapshot of the session that cut the table, so the
//! parts of a table (and the other tables of the pull) show one moment.
//! When that session ends the grant keeps its ranges (not its snapshot) for an hour, so a pull
//! resumed after a kill takes up the ranges that never reached the sender under the same cut.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dbsync_protocol::Message;
use dbsync_protocol::Value;
use dbsync_protocol::message::{KeyFilter, MAX_PARTS, Pull, Split, SplitDone};
use dbsync_protocol::session::Code;
use uuid::Uuid;

use super::{Session, SessionResult};
use crate::access::AccessDenied;
use crate::connection::Connection;
use crate::source::ExportedSnapshot;
use crate::store::Engine;

/// Fewest rows worth a part of their own: a smaller table is pulled in one piece.
pub const MIN_PART_ROWS: u64 = 10_000;
/// Most grants kept per connection (the oldest goes first).
const GRANTS_PER_CONNECTION: usize = 16;
/// How long a grant outlives the session that made it (without its snapshot): a receiver killed
/// mid-pull and run again resumes the parts that had not started under the cut that counted
/// their download, instead of counting another.
const GRANT_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The grants of every session of this sender, by token.
#[derive(Default)]
pub struct Splits(Mutex<HashMap<String, Grant>>);

/// One table's cut, as a [`SplitDone`] gave it.
struct Grant {
    connection_id: Uuid,
    table: String,
    /// Each part's bounds.
    ranges: Vec<Range>,
    /// Each part's transfer here, once it started one under the grant (nil while it is being
    /// made).
    started: Vec<Option<Uuid>>,
    snapshot: Option<Arc<ExportedSnapshot>>,
    made: Instant,
    /// When the session that made it ended.
    ended: Option<Instant>,
}

impl Grant {
    fn expired(&self) -> bool {
        self.ended.is_some_and(|ended| ended.elapsed() > GRANT_KEPT)
    }
}

/// A part's lower bound (exclusive) and upper bound (inclusive); `None` is open.
type Range = (Option<Vec<Value>>, Option<Vec<Value>>);

/// What a pull gets from the grant it names.
pub(super) struct PartOf {
    /// The cut's snapshot, to read from.
    pub(super) snapshot: Option<Arc<ExportedSnapshot>>,
    /// Which part of how many, when the pull is a new part (its download was the cut's).
    pub(super) new_part: Option<(usize, usize)>,
    /// The transfer this exact part started before, when it did: a receiver that never heard
    /// of it (killed before the part's first batch came) goes on under it.
    pub(super) started_as: Option<Uuid>,
}

impl Splits {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, token: String, grant: Grant) {
        let mut grants = self.lock();
        grants.retain(|_, g| !g.expired());
        let connection = grant.connection_id;
        while grants
            .values()
            .filter(|g| g.connection_id == connection)
            .count()
            >= GRANTS_PER_CONNECTION
        {
            let oldest = grants
                .iter()
                .filter(|(_, g)| g.connection_id == connection)
                .min_by_key(|(_, g)| g.made)
                .map(|(t, _)| t.clone());
            match oldest {
                Some(token) => grants.remove(&token),
                None => break,
            };
        }
        grants.insert(token, grant);
    }

    /// The session that made a grant ended: its snapshot goes (parts already reading keep
    /// it), its ranges stay for [`GRANT_KEPT`], for the parts a resumed pull takes up.
    pub(super) fn session_ended(&self, token: &str) {
        if let Some(grant) = self.lock().get_mut(token) {
            grant.snapshot = None;
            grant.ended = Some(Instant::now());
        }
    }

    /// Records the transfer a new part started (see [`Splits::part`]), or with `None` that it
    /// could not start one: the range is new again for the next pull that asks for it (instead
    /// of a pull of its own, and a download).
    pub(super) fn part_started(&self, pull: &Pull, index: usize, transfer: Option<Uuid>) {
        let Some(token) = pull.split.as_deref() else {
            return;
        };
        if let Some(slot) = self
            .lock()
            .get_mut(token)
            .and_then(|grant| grant.started.get_mut(index))
        {
            *slot = transfer;
        }
    }

    /// The grant `pull` names, when it is one of `connection`'s for the same table. `new`: the
    /// pull starts a transfer of its own, which it may do once per range, and only for exactly
    /// one of the grant's ranges (anything else is a pull of its own, and a download); a range
    /// that started already names the transfer it started (`started_as`).
    pub(super) fn part(&self, connection: Uuid, pull: &Pull, new: bool) -> Option<PartOf> {
        let token = pull.split.as_deref()?;
        let mut grants = self.lock();
        let grant = grants.get_mut(token)?;
        if grant.connection_id != connection || grant.table != pull.table || grant.expired() {
            return None;
        }
        let mut part = PartOf {
            snapshot: grant.snapshot.clone(),
            new_part: None,
            started_as: None,
        };
        if new && !pull.keys_only && pull.cursor_column.is_none() {
            let parts = grant.ranges.len();
            let index = grant.ranges.iter().position(|(after, upto)| {
                pull.after_key == *after
                    && pull.key_filter
                        == Some(KeyFilter::Range {
                            from: None,
                            to: upto.clone(),
                        })
            });
            if let Some(index) = index {
                match grant.started[index] {
                    None => {
                        grant.started[index] = Some(Uuid::nil());
                        part.new_part = Some((index, parts));
                    }
                    Some(id) if !id.is_nil() => part.started_as = Some(id),
                    Some(_) => {}
                }
            }
        }
        Some(part)
    }
}

impl Session<'_> {
    /// Answers a [`Split`]: the table's cut into at most `parts` key ranges of about the same
    /// number of rows, and the grant its parts name. One piece (no bound, no grant) when the
    /// table is small, has no key, waits for approval (keys are data, and the bounds are keys),
    /// or lives in SQLite (whose reads go one at a time anyway). One part asked: no bound and a
    /// grant of the whole table, which another session of the same pull then reads from this
    /// session's snapshot. A cut counts as the download of every part; a connection past its
    /// download limit is refused as a pull would be.
    pub(super) async fn split(
        &mut self,
        connection: &Connection,
        request: Split,
        version: u16,
    ) -> SessionResult<()> {
        if version < dbsync_protocol::SPLIT_VERSION {
            return self
                .refuse(
                    Code::ProtocolError,
                    format!(
                        "Split needs protocol {}; this session speaks {version}",
                        dbsync_protocol::SPLIT_VERSION
                    ),
                    None,
                )
                .await;
        }
        let Some(schema) = self.offered_schema(connection, &request.table).await? else {
            return Ok(());
        };
        let store = &self.agent.store;
        let mut bounds: Vec<Vec<Value>> = Vec::new();
        let grantable = !schema.primary_key.is_empty()
            && !connection.table_requires_approval(&request.table)
            && store.engine() == Engine::Postgres;
        // One part asked: the whole table under a grant, so another session of the pull can
        // read it from this session's snapshot (small tables side by side).
        let whole = grantable && request.parts == 1;
        if grantable && !whole {
            let rows = store.row_estimate(&request.table).await?.unwrap_or(0);
            let parts = u64::from(request.parts.clamp(1, MAX_PARTS)).min(rows / MIN_PART_ROWS);
            if parts >= 2 {
                let step = rows / parts;
                let mut after: Option<Vec<Value>> = None;
                for _ in 1..parts {
                    match store.range_end(&schema, after.as_deref(), step).await? {
                        Some(key) => {
                            after = Some(key.clone());
                            bounds.push(key);
                        }
                        None => break,
                    }
                }
            }
        }
        if bounds.is_empty() && !whole {
            return self
                .send(&Message::SplitDone(SplitDone {
                    request_id: request.request_id,
                    bounds,
                    token: None,
                }))
                .await
                .map(drop);
        }
        if !store.take_download(connection.id).await? {
            return self.denied(AccessDenied::DownloadLimitExceeded).await;
        }
        if self.exported.is_none() {
            match store.export_snapshot().await {
                Ok(exported) => self.exported = exported.map(Arc::new),
                Err(err) => {
                    tracing::warn!(error = %err, "exporting a snapshot for the pull failed")
                }
            }
        }
        let mut ranges = Vec::with_capacity(bounds.len() + 1);
        let mut after = None;
        for bound in &bounds {
            ranges.push((after, Some(bound.clone())));
            after = Some(bound.clone());
        }
        ranges.push((after, None));
        let token = hex::encode(rand::random::<[u8; 16]>());
        let parts = ranges.len();
        self.agent.splits.insert(
            token.clone(),
            Grant {
                connection_id: connection.id,
                table: request.table.clone(),
                started: vec![None; ranges.len()],
                ranges,
                snapshot: self.exported.clone(),
                made: Instant::now(),
                ended: None,
            },
        );
        self.splits_made.push(token.clone());
        tracing::info!(connection_id = %connection.id, table = %request.table, parts, "table cut for a parallel pull");
        self.send(&Message::SplitDone(SplitDone {
            request_id: request.request_id,
            bounds,
            token: Some(token),
        }))
        .await
        .map(drop)
    }
}

impl std::fmt::Debug for Splits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splits")
            .field("grants", &self.lock().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_new_once_and_new_again_when_its_transfer_could_not_start() {
        let splits = Splits::default();
        let connection = Uuid::new_v4();
        let bound = vec![Value::Int(100)];
        splits.insert(
            "grant".into(),
            Grant {
                connection_id: connection,
                table: "t".into(),
                ranges: vec![(None, Some(bound.clone())), (Some(bound.clone()), None)],
                started: vec![None, None],
                snapshot: None,
                made: Instant::now(),
                ended: None,
            },
        );
        let second = Pull {
            request_id: 1,
            table: "t".into(),
            after_key: Some(bound),
            limit: 1_000,
            exclude_columns: Vec::new(),
            credits: 8,
            transfer_id: None,
            key_filter: Some(KeyFilter::Range {
                from: None,
                to: None,
            }),
            cursor_column: None,
            keys_only: false,
            split: Some("grant".into()),
        };
        let new_part = |pull: &Pull| splits.part(connection, pull, true).unwrap().new_part;
        assert_eq!(new_part(&second), Some((1, 2)));
        // While its transfer is being made, the range is no one else's new part.
        assert_eq!(new_part(&second), None);
        splits.part_started(&second, 1, None);
        assert_eq!(new_part(&second), Some((1, 2)));
        let transfer = Uuid::new_v4();
        splits.part_started(&second, 1, Some(transfer));
        let again = splits.part(connection, &second, true).unwrap();
        assert_eq!((again.new_part, again.started_as), (None, Some(transfer)));
        // Another connection, another table, or a range that is none of the cut's: no part.
        assert!(splits.part(Uuid::new_v4(), &second, true).is_none());
        let other_table = Pull {
            table: "u".into(),
            ..second.clone()
        };
        assert!(splits.part(connection, &other_table, true).is_none());
        let elsewhere = Pull {
            after_key: Some(vec![Value::Int(5)]),
            ..second
        };
        assert_eq!(new_part(&elsewhere), None);
    }
}
