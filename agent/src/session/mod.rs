//! Both halves of a data-plane session, side by side, over the transport-neutral
//! [`crate::link::Link`] and the pure rules of [`dbsync_protocol::session`]: the receiver's
//! client ([`receiver`]) and the sender's server side ([`sender`]).

pub mod receiver;
pub mod sender;
