//! dbsync wire protocol: frames, messages and their codec.
//!
//! Pure: no sockets, no database, no async runtime.
//!
//! - [`codec`]: frames (header + MessagePack payload, row batches zstd-compressed) with every
//!   decoding limit explicit ([`codec::Limits`]).
//! - [`message`]: the messages of a data-plane session, with explicit numeric kinds.
//! - [`columns`]: a received row batch read in place, column by column.
//! - [`value`]: the engine-neutral value model.
//! - [`msgpack`]: the pre-scan that bounds depth and declared lengths before parsing.
//! - [`peer`]: the JSON bodies of the peer API that sites exchange over HTTP.
//! - [`session`]: the session's rules as a pure state machine (both halves), driven with `now`.
//! - [`secret`]: tokens and passwords in a type that never prints them.

pub mod codec;
pub mod columns;
pub mod error;
pub mod message;
pub mod msgpack;
pub mod peer;
pub mod secret;
pub mod session;
pub mod value;

pub use error::ProtocolError;
pub use message::{Kind, Message};
pub use secret::Secret;
pub use value::Value;

/// Protocol versions this build speaks, oldest first. Version 2 sends a row batch's rows
/// column-major (`message::columnar`); version 1 sent them row by row and is no longer spoken.
/// Version 3 adds `TableSchema::postgres` (types, extensions, sequences); a version 2 session
/// never carries it. Version 4 adds `Verify`/`VerifyPage` (row hashes); a sender refuses them
/// on an older session. Version 5 adds `Verify::range`: a key range hashed inside a PostgreSQL
/// sender's database. Version 6 adds `Split`/`SplitDone` and `Pull::split`: a table pulled as
/// key ranges side by side. Version 7 lets a batch carry columns in compact forms: integers as
/// differences (`message::columnar::DELTAS`), UUIDs packed (`message::columnar::PACKED`); a
/// sender writes them only on a version 7 session. Version 8 adds `VerifyRange::buckets`: a
/// range's rows hashed in buckets by key, and a page of only some buckets' rows. Version 9 adds
/// change marks (`VerifyPage::mark`, `VerifyRange::since`), a summary of a range's keys only
/// (`VerifyRange::keys_only`) and hashes of listed keys (`VerifyRange::keys`): a diff pull finds
/// the rows written on either side since the last comparison that left both alike.
pub const SUPPORTED_VERSIONS: &[u16] = &[2, 3, 4, 5, 6, 7, 8, 9];

/// The newest protocol version this build speaks.
pub const CURRENT_VERSION: u16 = 9;

/// The first version with `Verify`.
pub const VERIFY_VERSION: u16 = 4;

/// The first version with `Verify::range` (key ranges hashed in the database).
pub const RANGE_HASH_VERSION: u16 = 5;

/// The first version with `Split` (parallel pulls).
pub const SPLIT_VERSION: u16 = 6;

/// The first version whose batches may hold columns in compact forms.
pub const COMPACT_VERSION: u16 = 7;

/// The first version with `VerifyRange::buckets`.
pub const BUCKET_VERSION: u16 = 8;

/// The first version with change marks (`VerifyPage::mark`, `VerifyRange::since`).
pub const MARK_VERSION: u16 = 9;

/// Picks the highest version both sides speak, if any.
pub fn negotiate(offered: &[u16]) -> Option<u16> {
    offered
        .iter()
        .copied()
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(&[2]), Some(2));
        assert_eq!(negotiate(&[1, 2, 99]), Some(2));
        assert_eq!(negotiate(&[2, 3]), Some(3));
        assert_eq!(negotiate(&[2, 3, 4]), Some(4));
        assert_eq!(negotiate(&[2, 3, 4, 5]), Some(5));
        assert_eq!(negotiate(&[2, 3, 4, 5, 6]), Some(6));
        assert_eq!(negotiate(&[2, 3, 4, 5, 6, 7]), Some(7));
        assert_eq!(negotiate(&[2, 3, 4, 5, 6, 7, 8]), Some(8));
        assert_eq!(negotiate(&[2, 3, 4, 5, 6, 7, 8, 9]), Some(9));
        assert_eq!(negotiate(&[1, 10]), None);
        assert_eq!(negotiate(&[]), None);
    }
}
