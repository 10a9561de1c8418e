//! Connections and what governs them: the connection record and its lifecycle
//! ([`connection`], its controls in `controls`), transfers and approvals ([`transfer`]), how this site answers registrations
//! ([`settings`]), the access gate every session passes ([`access`]), request rate limits
//! ([`rate_limit`]) and the caps on open connections and sessions ([`admission`]).

pub mod access;
pub mod admission;
pub mod connection;
mod controls;
mod counters;
mod lifecycle;
pub mod rate_limit;
pub mod settings;
pub mod transfer;
