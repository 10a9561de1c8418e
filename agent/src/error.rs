//! The engine's error type.

/// Result alias for engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything an engine operation can fail with, other than an access check (see
/// [`crate::AccessDenied`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state database failed or refused a statement.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// Migrations could not be applied at start-up.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The addressed record does not exist.
    #[error("{kind} not found: {key}")]
    NotFound {
        /// What was looked up: "connection", "transfer".
        kind: &'static str,
        /// How it was addressed.
        key: String,
    },
    /// A lifecycle step that the current status does not allow.
    #[error("cannot {action} {kind} {name}: it is {status}")]
    IllegalTransition {
        /// "connection" or "transfer".
        kind: &'static str,
        /// Name or id of the record.
        name: String,
        /// The attempted step ("approve", "reactivate", ...).
        action: &'static str,
        /// The status that forbids it.
        status: String,
    },
    /// An input value was rejected before reaching the database.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field or argument.
        field: &'static str,
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// A unique property (name, or site URL and direction) is already taken.
    #[error("{0}")]
    Conflict(String),
    /// A stored receiver token could not be decrypted (wrong key, or tampered data).
    #[error("cannot decrypt the stored token: wrong encryption key or corrupted data")]
    Decrypt,
    /// Key file or config file trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not usable.
    #[error("configuration: {0}")]
    Config(String),
    /// Hashing a password failed (out of memory, or bad parameters).
    #[error("password hashing failed")]
    PasswordHash,
    /// A table needs a PostgreSQL extension this database lacks.
    #[error(
        "table {table:?} needs the PostgreSQL extension {extension:?}: run CREATE EXTENSION \"{extension}\"; in this database, then pull again"
    )]
    MissingExtension {
        /// The table.
        table: String,
        /// The extension.
        extension: String,
    },
    /// The sending site refused or failed a data-plane request, with its stable code.
    #[error("{site} refused: {code}: {message}")]
    Remote {
        /// The sending site.
        site: String,
        /// Its stable code (a code outside the protocol's is taken as `protocol_error`).
        code: dbsync_protocol::session::Code,
        /// Its explanation.
        message: String,
        /// For `rate_limited`: how long to wait before asking again.
        retry_after_ms: Option<u64>,
    },
    /// The data-plane session could not be held: the peer may not be dialed, its transport
    /// was refused, or it broke the protocol. Not worth retrying as it is.
    #[error("session with {site} failed: {reason}")]
    Session {
        /// The sending site.
        site: String,
        /// Which kind of failure.
        fault: SessionFault,
        /// What went wrong.
        reason: String,
    },
    /// The sending site could not be reached, or the session broke off: worth retrying.
    #[error("session with {site} broke off: {reason}")]
    Unreachable {
        /// The sending site.
        site: String,
        /// What went wrong.
        reason: String,
    },
}

/// Why a data-plane session failed for good ([`Error::Session`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFault {
    /// The peer's address is not one this agent may dial (private, unresolvable to an allowed
    /// address, not a URL of a site).
    PeerNotAllowed,
    /// The transport was refused: TLS or QUIC handshake, certificate, upgrade, or no QUIC
    /// offered when QUIC was asked for.
    TransportRefused,
    /// The peer broke the protocol: a frame that does not decode, a message out of place, a
    /// batch that does not answer the request.
    Protocol,
}

impl SessionFault {
    /// The stable code of [`Error::Session`] with this fault.
    pub fn code(self) -> &'static str {
        match self {
            Self::PeerNotAllowed => "peer_not_allowed",
            Self::TransportRefused => "transport_refused",
            Self::Protocol => "peer_protocol_error",
        }
    }
}

impl Error {
    /// A stable machine-readable code for this error (CLI `--json`, HTTP bodies).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Database(_) => "database_error",
            Self::Migrate(_) => "migration_failed",
            Self::NotFound { .. } => "not_found",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::Invalid { .. } => "invalid_input",
            Self::Conflict(_) => "conflict",
            Self::Decrypt => "decrypt_failed",
            Self::Io { .. } => "io_error",
            Self::Config(_) => "invalid_config",
            Self::PasswordHash => "password_hash_failed",
            Self::Remote { .. } => "remote_refused",
            Self::MissingExtension { .. } => "missing_extension",
            Self::Session { fault, .. } => fault.code(),
            Self::Unreachable { .. } => "peer_unreachable",
        }
    }

    /// Whether trying again later may succeed (a dropped or unreachable session).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. }
                | Self::Remote {
                    code: dbsync_protocol::session::Code::SnapshotGone,
                    ..
                }
        )
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn not_found(kind: &'static str, key: impl Into<String>) -> Self {
        Self::NotFound {
            kind,
            key: key.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn illegal_connection(
        name: &str,
        action: &'static str,
        status: impl std::fmt::Display,
    ) -> Self {
        Self::IllegalTransition {
            kind: "connection",
            name: name.to_owned(),
            action,
            status: status.to_string(),
        }
    }
}
