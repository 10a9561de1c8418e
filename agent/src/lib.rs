//! The dbsync engine.
//!
//! Everything an agent knows lives in its [`Store`]: connections to other sites, the transfers that
//! ran under them, the incoming-registration settings, an audit trail and per-table checkpoints.
//! The store runs on PostgreSQL or SQLite, chosen by the database URL, with one code path for both.
//!
//! - [`connection`]: the connection lifecycle (create, approve, suspend, reactivate, revoke, ...).
//! - [`access`]: `validate_connection`, the gate every session from a receiver passes through.
//! - [`transfer`]: transfer records, their lifecycle and approval workflow, statistics.
//! - [`settings`]: how this site answers registrations from other sites.
//! - [`token`], [`password`], [`vault`]: secrets: connection tokens, argon2id hashes, encryption at
//!   rest of the tokens a receiver holds.
//! - [`clock`]: injectable time, so expiry, allowed hours and rate limits are testable.
//! - [`Agent`], [`registration`], [`peer`]: one site's engine, cross-site registration and status
//!   propagation, and the guarded client that calls peers.
//! - [`admin_token`]: bearer tokens of the admin JSON API.
//! - [`catalog`], [`source`]: the synced tables: list, describe, foreign-key order, and rows
//!   read a keyset page at a time as engine-neutral values.

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

pub mod access;
pub mod admin_token;
pub mod admission;
mod agent;
pub mod audit;
mod batch;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod connection;
mod error;
pub mod key_filter;
pub mod link;
mod nodelay;
pub mod password;
pub mod peer;
mod pg_copy;
pub mod quic;
pub mod rate_limit;
pub mod registration;
pub mod schedule;
pub mod secret;
pub mod session;
pub mod settings;
pub mod sink;
pub mod source;
mod sqlite_raw;
pub mod store;
pub mod sync;
pub mod token;
pub mod transfer;
pub mod vault;

pub use access::{AccessDenied, Validator};
pub use agent::Agent;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::Config;
pub use connection::{Connection, ConnectionStatus, Direction, NewConnection};
pub use error::{Error, Result};
pub use store::Store;
pub use sync::pull;
pub use transfer::{Transfer, TransferStatus};
