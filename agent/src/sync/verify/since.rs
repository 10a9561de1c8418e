//! A diff pull after a comparison that left both sides alike (protocol 9): only the rows written
//! on either side since are compared.
//!
//! Every PostgreSQL row records the transaction that wrote it (`xmin`). Before a comparison
//! reads a table, each side takes a [`Mark`]: the oldest transaction then in progress or yet to
//! start. When the comparison ends with both sides alike (repaired or found so), the receiver
//! keeps both marks with its record of the comparison. A row that neither side wrote since its
//! mark was compared then (as it stood, or as the repair wrote it) and is still alike; so the
//! next diff pull sets beside each other only the rows written at or after the marks, on
//! either side. What no row records, deletions, shows in the keys: both sides hash their whole
//! table's keys first (one scan each, no row read beyond its key), and when the keys differ
//! every row is compared as before.
//!
//! The marks hold only for the same table: each names its cluster, database, table and the
//! table's file (a rewrite or `TRUNCATE` makes a new one), the columns compared are kept beside
//! them, and a mark older than 2^30 transactions is not used. A change that alters values
//! without writing rows (renaming an enum's label) is not seen here; `verify` compares every
//! row.

use dbsync_protocol::Value;
use dbsync_protocol::message::{
    MAX_FILTER_KEYS, Mark, Since, TableSchema, VerifyPage, VerifyRange,
};
use serde::{Deserialize, Serialize};

use super::{FIRST_KEYS, KeyId, TableVerdict, VerifyEvent, Walk, check_detail, index_detail};
use crate::agent::Agent;
use crate::error::Result;
use crate::session::receiver::Client;
use crate::source::RowHashes;

/// Most transactions between a mark and now for the mark to be used: well within the 2^31
/// that 32-bit transaction numbers compare over.
const MARK_REACH: u64 = 1 << 30;

/// Where both tables stood before a comparison that left them alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Marks {
    /// The sender's.
    pub there: Mark,
    /// This side's.
    pub here: Mark,
    /// The columns compared, with their types ([`columns_named`]).
    pub columns: String,
}

/// The columns compared and their types, as one string: the marks hold only for these.
pub(super) fn columns_named(here: &TableSchema, columns: &[String]) -> String {
    columns
        .iter()
        .map(|name| {
            let native = here
                .columns
                .iter()
                .find(|c| &c.name == name)
                .map_or("", |c| c.native_type.as_str());
            format!("{name:?} {native}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a table now at `now` may be read for rows written since `then`: the same table,
/// no further than [`MARK_REACH`] on.
fn still_holds(then: &Mark, now: &Mark) -> bool {
    then.table == now.table && now.xid >= then.xid && now.xid - then.xid < MARK_REACH
}

/// The marks the latest of the verifications that `ended` (newest first) kept: the latest
/// that left both sides alike. Later ones that did not (a verification that found differences
/// and left them) take nothing from them: a row neither side wrote since is still alike.
pub(super) fn last_marks(ended: &[crate::transfer::Transfer]) -> Option<Marks> {
    ended
        .iter()
        .find_map(|done| serde_json::from_value(done.metadata["marks"].clone()).ok())
}

impl Agent {
    /// Compares only the rows written since `last` on either side, when `last` still holds
    /// for both tables and their keys are alike; whether it did (else every row is compared).
    pub(super) async fn compare_since(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        last: &Marks,
        verdict: &mut TableVerdict,
        on_event: &mut impl FnMut(VerifyEvent),
    ) -> Result<bool> {
        let here = walk.here;
        let holds_here = walk
            .mark_here
            .as_ref()
            .is_some_and(|now| still_holds(&last.here, now));
        if !holds_here
            || !crate::source::keys_listable(here)
            || last.columns != columns_named(here, walk.columns)
        {
            return Ok(false);
        }
        // Both tables' keys at once, and this side's rows written since its mark meanwhile.
        let request_id = walk.next_id();
        let (keys_here, written_here, answer) = tokio::join!(
            self.store.range_keys_hash(here, None, None),
            self.written_page(walk, &last.here, None),
            self.ask_page(
                client,
                walk.table,
                None,
                false,
                request_id,
                walk.options,
                Some(VerifyRange {
                    keys_only: true,
                    ..super::range_of(None)
                }),
            )
        );
        let ((rows_here, keys_here), mut answer) = (keys_here?, answer?);
        if answer.hash.len() != 8 || answer.more || !answer.keys.is_empty() {
            return Err(client.protocol_error("a range's answer is not one 8-byte hash"));
        }
        let now_there = answer.mark.take();
        let holds_there = now_there
            .as_ref()
            .is_some_and(|now| still_holds(&last.there, now));
        walk.saw_mark(now_there);
        if !holds_there || answer.rows != rows_here || answer.hash[..] != keys_here[..] {
            return Ok(false);
        }
        verdict.since_last = true;
        verdict.rows_there = answer.rows;
        verdict.rows_here = rows_here;
        self.written_there(client, walk, &last.there, verdict)
            .await?;
        let mut page = written_here?;
        loop {
            let more = page.keys.len() as u64 > super::page_rows(walk.options);
            page.keys.truncate(super::page_rows(walk.options) as usize);
            page.hashes.truncate(page.keys.len());
            let after = page.keys.last().cloned();
            self.beside_unwritten_there(client, walk, &last.there, page, verdict)
                .await?;
            if !more {
                break;
            }
            page = self
                .written_page(walk, &last.here, after.as_deref())
                .await?;
        }
        on_event(VerifyEvent::Page { rows: answer.rows });
        Ok(true)
    }

    /// Up to a page and one of this side's rows written since `mark`, after `after`.
    async fn written_page(
        &self,
        walk: &Walk<'_>,
        mark: &Mark,
        after: Option<&[Value]>,
    ) -> Result<RowHashes> {
        let rows = super::page_rows(walk.options);
        self.store
            .written_row_hashes(
                walk.here,
                walk.columns,
                after,
                None,
                mark.xid,
                true,
                i64::try_from(rows + 1).unwrap_or(i64::MAX),
            )
            .await
    }

    /// The sender's rows written since its mark, page by page, beside this side's rows of the
    /// same keys.
    async fn written_there(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        mark: &Mark,
        verdict: &mut TableVerdict,
    ) -> Result<()> {
        let mut after: Option<Vec<Value>> = None;
        loop {
            let request_id = walk.next_id();
            let page = self
                .ask_page(
                    client,
                    walk.table,
                    after.clone(),
                    true,
                    request_id,
                    walk.options,
                    Some(VerifyRange {
                        since: Some(Since {
                            xid: mark.xid,
                            written: true,
                        }),
                        ..super::range_of(None)
                    }),
                )
                .await?;
            check_detail(client, &page, 1, 8)?;
            let (more, last_key) = (page.more, page.last_key.clone());
            if more {
                // A page that says more follows ends on a key not seen before.
                let progressed = match &last_key {
                    Some(key) if page.keys.last() == Some(key) => {
                        walk.ends_seen.insert(KeyId::Exact.id(key)?)
                    }
                    _ => false,
                };
                if !progressed {
                    return Err(client.protocol_error(
                        "a page of written rows says more follow but ends on no new key",
                    ));
                }
            }
            let keys = page.keys.clone();
            let there = index_detail(page, &KeyId::Exact)?
                .ok_or_else(|| client.protocol_error("a page lists one key twice"))?;
            let mut mine = RowHashes::default();
            for chunk in keys.chunks(MAX_FILTER_KEYS) {
                let part = self
                    .store
                    .listed_row_hashes(walk.here, walk.columns, chunk, None)
                    .await?;
                mine.keys.extend(part.keys);
                mine.hashes.extend(part.hashes);
            }
            set_beside(walk, mine, there, true, verdict)?;
            self.settle_pending(walk, verdict).await?;
            if !more {
                return Ok(());
            }
            after = last_key;
        }
    }

    /// This side's rows written since its mark (`page`) beside the sender's rows of the same
    /// keys that it did not write since its own mark (those it did were set beside already).
    async fn beside_unwritten_there(
        &self,
        client: &mut Client,
        walk: &mut Walk<'_>,
        mark: &Mark,
        page: RowHashes,
        verdict: &mut TableVerdict,
    ) -> Result<()> {
        if page.keys.is_empty() {
            return Ok(());
        }
        let request_id = walk.next_id();
        let answer: VerifyPage = self
            .ask_page(
                client,
                walk.table,
                None,
                true,
                request_id,
                walk.options,
                Some(VerifyRange {
                    since: Some(Since {
                        xid: mark.xid,
                        written: false,
                    }),
                    keys: Some(page.keys.clone()),
                    ..super::range_of(None)
                }),
            )
            .await?;
        check_detail(client, &answer, 1, 8)?;
        let there = index_detail(answer, &KeyId::Exact)?
            .ok_or_else(|| client.protocol_error("a page lists one key twice"))?;
        let asked = there.len();
        let answered = set_beside(walk, page, there, false, verdict)?;
        if answered != asked {
            return Err(client.protocol_error("an answer holds rows of keys not asked for"));
        }
        self.settle_pending(walk, verdict).await
    }
}

/// Sets rows here (`mine`) beside the sender's rows of the same keys (`there`): a key with
/// another hash differs; with `all_there` (the sender's page is what is compared) a key only
/// there is missing here, else a key only here was written there since its mark and is
/// compared with those. How many of `there`'s rows had a row here.
fn set_beside(
    walk: &mut Walk<'_>,
    mine: RowHashes,
    mut there: super::RowsThere,
    all_there: bool,
    verdict: &mut TableVerdict,
) -> Result<usize> {
    let pending = &mut walk.pending;
    let note = |list: &mut Vec<Vec<Value>>, key: &Vec<Value>| {
        if list.len() < FIRST_KEYS {
            list.push(key.clone());
        }
    };
    let mut matched = 0;
    for (key, hash) in mine.keys.into_iter().zip(mine.hashes) {
        if let Some((hash_there, key_there)) = there.remove(&KeyId::Exact.id(&key)?) {
            matched += 1;
            if hash_there[..] != hash[..] {
                verdict.different += 1;
                note(&mut verdict.first_different, &key_there);
                pending.pull.push(key_there);
            }
        }
    }
    if all_there {
        let mut missing: Vec<Vec<Value>> = there.into_values().map(|(_, key)| key).collect();
        missing.sort_by_key(|key| format!("{key:?}"));
        for key in missing {
            verdict.missing_here += 1;
            note(&mut verdict.first_missing, &key);
            pending.pull.push(key);
        }
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(xid: u64, table: &str) -> Mark {
        Mark {
            xid,
            table: table.into(),
        }
    }

    #[test]
    fn a_mark_holds_for_the_same_table_within_reach() {
        let then = mark(1_000, "1/2/3/4");
        assert!(still_holds(&then, &mark(1_000, "1/2/3/4")));
        assert!(still_holds(&then, &mark(1_000 + MARK_REACH - 1, "1/2/3/4")));
        assert!(!still_holds(&then, &mark(1_000 + MARK_REACH, "1/2/3/4")));
        // Another file (rewritten, truncated), another table, another cluster.
        assert!(!still_holds(&then, &mark(2_000, "1/2/3/5")));
        assert!(!still_holds(&then, &mark(2_000, "9/2/3/4")));
        // A counter behind the mark: not the same history.
        assert!(!still_holds(&then, &mark(999, "1/2/3/4")));
    }
}
