//! dbsync wire protocol: frames, messages and their codec.
//!
//! Pure: no sockets, no database, no async runtime. The data-plane work (frames, MessagePack
//! payloads, zstd batches, bounded decoding) lands here; for now the crate holds the protocol
//! versions and the JSON bodies of the peer API ([`peer`]) that sites exchange over HTTP.

pub mod peer;

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
