//! The dbsync engine.
//!
//! Everything an agent knows lives in its [`Store`]: connections to other sites, the transfers that
//! ran under them, the incoming-registration settings, an audit trail and per-table checkpoints.
//! The store runs on PostgreSQL or SQLite, chosen by the database URL, with one code path for both.
//!
//! The crate is in wings, a folder each with one job; no module imports one that imports it back:
//!
//! - [`secrets`]: connection tokens, argon2id passwords, the vault for tokens held as a receiver,
//!   and `Secret`, which never prints.
//! - [`store`]: the pool on either engine and its migrations, the audit trail, admin tokens.
//! - [`connections`]: connections and their lifecycle, transfers and approvals, incoming
//!   settings, the access gate (`validate_connection`), rate limits, caps on open connections
//!   and sessions.
//! - [`data`]: the synced tables (catalog, key filters), rows read by keyset (`source`) and
//!   written with their checkpoint (`sink`, with PostgreSQL `COPY` and SQLite's raw handle).
//! - [`transport`]: the transport-neutral link, QUIC, the guarded client that calls peers.
//! - [`session`]: both halves of a data-plane session over the protocol's state machine.
//! - [`sync`]: `dbsync pull` (tables, resume, mirror, backoff), the auto-sync scheduler,
//!   registration with other sites.
//! - [`Agent`], [`clock`], [`config`]: one site's engine, injectable time, configuration.
//!
//! Each wing's modules are also reachable by their own names (`dbsync_agent::connection`,
//! `dbsync_agent::catalog`, ...).

/// Declares a fieldless enum stored and shown as snake_case text: `as_str`, `Display`, `FromStr`
/// (with the accepted values in the error), serde, and `TryFrom<String>` for sqlx rows.
macro_rules! string_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The stored and displayed text.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::Error;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(crate::Error::Invalid {
                        field: stringify!($name),
                        reason: format!(
                            "{text:?} is not one of: {}",
                            [$($text),+].join(", ")
                        ),
                    }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = crate::Error;
            fn try_from(text: String) -> Result<Self, Self::Error> {
                text.parse()
            }
        }
    };
}

mod agent;
pub mod clock;
pub mod config;
pub mod connections;
pub mod data;
mod error;
pub mod metrics;
pub mod secrets;
pub mod session;
pub mod store;
pub mod sync;
pub mod transport;

// Each wing's modules by their own names too (`dbsync_agent::connection`, `crate::catalog`, ...).
pub use connections::{access, admission, connection, rate_limit, settings, transfer};
pub(crate) use data::{batch, pg_copy, sqlite_raw};
pub use data::{catalog, key_filter, pg_expr, pg_schema, sink, source};
pub use secrets::{password, secret, token, vault};
pub use store::{admin_token, audit};
pub use sync::{registration, schedule};
pub(crate) use transport::nodelay;
pub use transport::{link, peer, quic};

pub use access::{AccessDenied, Validator};
pub use agent::Agent;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
pub use connection::{Connection, ConnectionStatus, Direction, NewConnection};
pub use error::{Error, Result, SessionFault};
pub use store::Store;
pub use sync::pull;
pub use transfer::{Transfer, TransferStatus};
