//! Protocol errors: malformed input and the wire error codes.

/// Why bytes could not become a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The input ended inside a header or value.
    #[error("truncated input")]
    Truncated,
    /// The header is not a dbsync frame header.
    #[error("bad frame header: {0}")]
    BadHeader(String),
    /// The header names a message kind this version does not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The frame is larger than allowed.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    FrameTooLarge {
        /// Declared payload size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The payload decompresses to more than allowed (or says it would).
    #[error("payload decompresses beyond the limit of {limit} bytes")]
    DecompressedTooLarge {
        /// The limit.
        limit: u64,
    },
    /// zstd refused the payload.
    #[error("cannot decompress payload: {0}")]
    Decompress(String),
    /// A declared length runs past the input.
    #[error("declared length {declared} exceeds the {available} bytes available")]
    LengthOutOfBounds {
        /// What the input claimed.
        declared: u64,
        /// What was there.
        available: u64,
    },
    /// Nesting deeper than allowed.
    #[error("nesting deeper than {limit}")]
    TooDeep {
        /// The limit.
        limit: usize,
    },
    /// The payload is not the message the header announced.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// The error codes a sender puts in an `Error` frame (SPEC section 4 and the data plane).
pub mod codes {
    /// Token malformed or unknown.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// Connection not active.
    pub const CONNECTION_NOT_ACTIVE: &str = "connection_not_active";
    /// Connection expired.
    pub const CONNECTION_EXPIRED: &str = "connection_expired";
    /// max_downloads reached.
    pub const DOWNLOAD_LIMIT_EXCEEDED: &str = "download_limit_exceeded";
    /// max_records_total reached.
    pub const RECORD_LIMIT_EXCEEDED: &str = "record_limit_exceeded";
    /// Client IP outside the whitelist.
    pub const IP_NOT_WHITELISTED: &str = "ip_not_whitelisted";
    /// Outside allowed hours.
    pub const OUTSIDE_ALLOWED_HOURS: &str = "outside_allowed_hours";
    /// Download password missing.
    pub const PASSWORD_REQUIRED: &str = "password_required";
    /// Download password wrong.
    pub const INVALID_PASSWORD: &str = "invalid_password";
    /// Too many requests.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// No common protocol version.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// The table is not offered.
    pub const TABLE_NOT_ALLOWED: &str = "table_not_allowed";
    /// The transfer waits for an admin.
    pub const APPROVAL_PENDING: &str = "approval_pending";
    /// An admin denied the transfer.
    pub const APPROVAL_DENIED: &str = "approval_denied";
    /// The peer sent something malformed.
    pub const PROTOCOL_ERROR: &str = "protocol_error";
    /// A well-formed request the sender will not serve as asked: a key of the wrong shape, a
    /// key filter over its bound, a resume that changes what its transfer covers.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The agent or this client address has as many sessions (or connections) open as allowed.
    pub const TOO_MANY_SESSIONS: &str = "too_many_sessions";
    /// The peer said nothing for too long.
    pub const TIMEOUT: &str = "timeout";
    /// A whole-table pull's snapshot is gone; pull the table again.
    pub const SNAPSHOT_GONE: &str = "snapshot_gone";
    /// The sender failed.
    pub const INTERNAL_ERROR: &str = "internal_error";
}
