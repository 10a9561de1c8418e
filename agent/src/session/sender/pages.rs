//! The page reader of a pull: pages read in key order by their own task, a page ahead of the
//! session, with records reserved against the connection's limit as they are read.

use dbsync_protocol::message::TableSchema;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Store;
use crate::source::{Bounds, EncodedPage, Window};

/// Pages read ahead of the encoder (besides the one being read).
pub(super) const PAGES_AHEAD: usize = 1;
/// Uncompressed bytes a batch aims at: wide rows make pages shorter than `server.batch_rows`,
/// which bounds the memory of both agents and keeps batches far under the frame limit.
const TARGET_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// The same for SQLite sources, read into one buffer per page and encoded from it: ~11,000 rows
/// of the bench's users table, sender peak 69-73 MiB. (At 1 MiB, ~17,000 rows, the peak was
/// 93-120 MiB for no clear gain in time; at 384 KiB, ~6,000 rows, pulls took ~10 % longer.)
const TARGET_SQLITE_BATCH_BYTES: usize = 640 * 1024;
/// Rows of a pull's first page, before the width of a row is known.
const FIRST_PAGE_ROWS: i64 = 100;
/// The least a page aims at however many pulls read at once.
const MIN_BATCH_BYTES: usize = 512 * 1024;

/// How many pulls of this sender are reading pages now, over all sessions and streams. Each
/// holds up to three pages (one being read, one waiting, one being sent), so a page aims at
/// the target batch size divided by the pulls reading: the sender's memory for pages stays
/// about one pull's however many streams a parallel pull opens.
#[derive(Debug, Default)]
pub struct Readers(std::sync::atomic::AtomicUsize);

impl Readers {
    /// Counts a reader for as long as the returned guard lives.
    fn enter(&self) -> Reading<'_> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reading(self)
    }

    /// Bytes a page aims at now, for a source whose one-reader target is `target`.
    fn page_bytes(&self, target: usize) -> usize {
        let readers = self.0.load(std::sync::atomic::Ordering::Relaxed).max(1);
        (target / readers).max(MIN_BATCH_BYTES.min(target))
    }
}

/// A reader counted in [`Readers`].
struct Reading<'a>(&'a Readers);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
/// About how many bytes a row of `page` takes encoded (to size the next page).
fn bytes_per_row(page: &EncodedPage) -> usize {
    (page.columns.len() - page.room) / page.rows.max(1)
}

/// What the page reader hands the session.
pub(super) enum Produced {
    /// Rows to send, with the record reservation taken for them (0 when unlimited or when they
    /// were sent before), and whether they are rows this transfer never sent (`fresh`).
    Page {
        page: EncodedPage,
        reserved: i64,
        fresh: bool,
    },
    /// Nothing more to read: the table is done (`exhausted`) or the record limit cut it.
    End { exhausted: bool, truncated: bool },
    /// Reading failed.
    Failed(crate::Error),
}

/// One pull's reading job.
pub(super) struct ProduceJob {
    pub(super) connection_id: Uuid,
    pub(super) limited: bool,
    pub(super) schema: TableSchema,
    pub(super) columns: Vec<String>,
    /// The receiver's resume key.
    pub(super) after: Option<Vec<dbsync_protocol::Value>>,
    /// Where the transfer started: nothing at or below it is read.
    pub(super) start_key: Option<Vec<dbsync_protocol::Value>>,
    /// The furthest key the transfer sent: rows up to it were counted when they first left.
    pub(super) sent_up_to: Option<Vec<dbsync_protocol::Value>>,
    pub(super) filter: Option<dbsync_protocol::message::KeyFilter>,
    pub(super) limit: i64,
    pub(super) batch_rows: i64,
    /// A table without a primary key: read from this snapshot (after, the window and the
    /// filter do not apply).
    pub(super) snapshot: Option<crate::source::Snapshot>,
    /// The pull's exported snapshot (PostgreSQL): every page is read from it.
    pub(super) exported: Option<crate::source::PullSnapshot>,
    /// Columns of integers may go as differences (the session speaks
    /// [`dbsync_protocol::COMPACT_VERSION`]).
    pub(super) compact: bool,
}

/// Reads the pages of one pull in key order: first, on a resume, the rows between the
/// receiver's key and the furthest key sent (sent before, not counted again), then the rows
/// past it, reserving records against the connection's total when it has one. Stops when the
/// session stops listening, giving back the reservation of a page it could not hand over.
///
/// A snapshot's pages come from the snapshot; it is handed back when the request's limit ended
/// the reading with rows left (the next request of the pull goes on from it).
pub(super) async fn produce(
    store: Store,
    readers: std::sync::Arc<Readers>,
    mut job: ProduceJob,
    to_session: mpsc::Sender<Produced>,
) -> Option<crate::source::Snapshot> {
    let reading = readers.enter();
    let mut snapshot = job.snapshot.take();
    let mut after = job.after;
    let mut sent: i64 = 0;
    // Re-sending what the transfer sent before, while there is any between the receiver's key
    // and the furthest key sent.
    let mut resending = job.sent_up_to.is_some() && after != job.sent_up_to;
    // Slow start: the first page is small; later pages hold as many rows as fit the target
    // batch size, up to `batch_rows`.
    let mut page_rows = job.batch_rows.min(FIRST_PAGE_ROWS);
    let target = match store.engine() {
        crate::store::Engine::Postgres => TARGET_BATCH_BYTES,
        crate::store::Engine::Sqlite => TARGET_SQLITE_BATCH_BYTES,
    };
    // Each page is read behind room for the frame fields before its rows, so it is sent from
    // where it lies (`codec::encode_row_batch_in_place`).
    let room = dbsync_protocol::codec::row_batch_room(&job.columns);
    let end = loop {
        if sent >= job.limit {
            break Produced::End {
                exhausted: false,
                truncated: false,
            };
        }
        let want = page_rows.min(job.limit - sent);
        let charged = job.limited && !resending;
        let granted = if charged {
            match store.take_records(job.connection_id, want).await {
                Ok(granted) => granted,
                Err(err) => break Produced::Failed(err),
            }
        } else {
            want
        };
        if granted == 0 {
            break Produced::End {
                exhausted: false,
                truncated: true,
            };
        }
        let window = if resending {
            Window {
                above: job.start_key.as_deref(),
                at_most: job.sent_up_to.as_deref(),
            }
        } else {
            Window {
                above: job.sent_up_to.as_deref().or(job.start_key.as_deref()),
                at_most: None,
            }
        };
        let bounds = Bounds {
            after: after.as_deref(),
            window,
            filter: job.filter.as_ref(),
            snapshot: job.exported.as_ref(),
        };
        let read = match &mut snapshot {
            Some(snapshot) => snapshot.next_page(granted, room, job.compact).await,
            None => {
                store
                    .read_page_encoded(
                        &job.schema,
                        &job.columns,
                        bounds,
                        granted,
                        room,
                        job.compact,
                    )
                    .await
            }
        };
        let page = match read {
            Ok(page) => page,
            Err(err) => {
                if charged {
                    let _ = store.release_records(job.connection_id, granted).await;
                }
                break Produced::Failed(err);
            }
        };
        let got = page.rows as i64;
        if charged
            && got < granted
            && let Err(err) = store
                .release_records(job.connection_id, granted - got)
                .await
        {
            break Produced::Failed(err);
        }
        if got == 0 {
            if resending {
                // Everything sent before is sent again: on to the rows past it.
                resending = false;
                continue;
            }
            break Produced::End {
                exhausted: true,
                truncated: false,
            };
        }
        after = page.last_key.clone();
        sent += got;
        let per_row = bytes_per_row(&page).max(1);
        page_rows = i64::try_from(reading.0.page_bytes(target) / per_row)
            .unwrap_or(i64::MAX)
            .clamp(1, job.batch_rows);
        let reserved = if charged { got } else { 0 };
        let fresh = !resending;
        if let Err(mpsc::error::SendError(unsent)) = to_session
            .send(Produced::Page {
                page,
                reserved,
                fresh,
            })
            .await
        {
            if let Produced::Page { reserved, .. } = unsent
                && reserved > 0
            {
                let _ = store.release_records(job.connection_id, reserved).await;
            }
            return None;
        }
        if got < granted {
            if resending {
                resending = false;
                continue;
            }
            // Fewer rows than asked for: the table is done.
            break Produced::End {
                exhausted: true,
                truncated: false,
            };
        }
        if granted < want {
            // The record limit cut this page: the connection has no rows left to give.
            break Produced::End {
                exhausted: false,
                truncated: true,
            };
        }
    };
    let more = matches!(
        end,
        Produced::End {
            exhausted: false,
            truncated: false
        }
    );
    let _ = to_session.send(end).await;
    snapshot.filter(|_| more)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_shrink_with_the_pulls_reading_down_to_a_floor() {
        let readers = Readers::default();
        let target = TARGET_BATCH_BYTES;
        assert_eq!(readers.page_bytes(target), target, "nobody reading yet");
        let first = readers.enter();
        assert_eq!(readers.page_bytes(target), target);
        let others: Vec<_> = (0..3).map(|_| readers.enter()).collect();
        assert_eq!(readers.page_bytes(target), target / 4);
        let many: Vec<_> = (0..60).map(|_| readers.enter()).collect();
        assert_eq!(readers.page_bytes(target), MIN_BATCH_BYTES);
        // A target under the floor is kept as it is.
        assert_eq!(readers.page_bytes(64 * 1024), 64 * 1024);
        drop(many);
        drop(others);
        assert_eq!(readers.page_bytes(target), target);
        drop(first);
        assert_eq!(readers.0.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
