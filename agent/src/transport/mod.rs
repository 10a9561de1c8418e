//! Moving bytes between sites: the transport-neutral session [`link`], QUIC ([`quic`]), the
//! guarded HTTP client that calls peers ([`peer`]), and `TCP_NODELAY` on sqlx's sockets.

pub mod link;
pub(crate) mod nodelay;
pub mod peer;
pub mod quic;
