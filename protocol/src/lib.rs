//! dbsync wire protocol: frames, messages and their codec.
//!
//! Pure: no sockets, no database, no async runtime.
//!
//! - [`codec`]: frames (header + MessagePack payload, row batches zstd-compressed) with every
//!   decoding limit explicit ([`codec::Limits`]).
//! - [`message`]: the messages of a data-plane session, with explicit numeric kinds.
//! - [`value`]: the engine-neutral value model.
//! - [`msgpack`]: the pre-scan that bounds depth and declared lengths before parsing.
//! - [`peer`]: the JSON bodies of the peer API that sites exchange over HTTP.

pub mod codec;
pub mod error;
pub mod message;
pub mod msgpack;
pub mod peer;
pub mod value;

pub use error::ProtocolError;
pub use message::{Kind, Message};
pub use value::Value;

/// Protocol versions this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

/// The newest protocol version this build speaks.
pub const CURRENT_VERSION: u16 = 1;

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
        assert_eq!(negotiate(&[1]), Some(1));
        assert_eq!(negotiate(&[1, 99]), Some(1));
        assert_eq!(negotiate(&[2, 3]), None);
        assert_eq!(negotiate(&[]), None);
    }
}
