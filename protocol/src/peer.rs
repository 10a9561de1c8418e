//! JSON bodies of the peer API (SPEC section 5), shared by the side that calls and the side that
//! answers. All paths are relative to a site's `site_url`.

use serde::{Deserialize, Serialize};

/// `GET /db-sync/api/status`.
pub const STATUS_PATH: &str = "/db-sync/api/status";
/// `POST /db-sync/api/register-connection`.
pub const REGISTER_PATH: &str = "/db-sync/api/register-connection";
/// `POST /db-sync/api/update-status`.
pub const UPDATE_STATUS_PATH: &str = "/db-sync/api/update-status";
/// `POST /db-sync/api/verify-connection`.
pub const VERIFY_PATH: &str = "/db-sync/api/verify-connection";
/// `POST /db-sync/api/redeem-share`.
pub const REDEEM_SHARE_PATH: &str = "/db-sync/api/redeem-share";
/// `POST /db-sync/api/rotate-token`.
pub const ROTATE_TOKEN_PATH: &str = "/db-sync/api/rotate-token";

/// What a site says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusResponse {
    /// Whether the site takes part in dbsync at all.
    pub enabled: bool,
    /// auto_accept, require_approval, require_password or deny_all.
    pub incoming_mode: String,
    /// Whether registration needs the incoming password.
    pub password_required: bool,
    /// Data-plane protocol versions this site speaks.
    pub protocol_versions: Vec<u16>,
    /// Data-plane transports offered (empty until the data plane is served).
    pub transports: Vec<TransportOffer>,
    /// Agent version.
    pub agent_version: String,
    /// The site's stable identity.
    pub site_id: String,
    /// The site's display name.
    pub site_name: Option<String>,
}

/// One data-plane transport a site offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TransportOffer {
    /// "ws" or "quic".
    pub kind: String,
    /// UDP port (quic).
    pub port: Option<u16>,
    /// SHA-256 fingerprint of the certificate to pin (quic).
    pub cert_fingerprint: Option<String>,
}

/// A sender site asks the receiving site to hold the matching receiver connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    /// The sender's `site_url`.
    pub sender_url: String,
    /// Name of the connection on the sender.
    pub connection_name: String,
    /// The connection token (the receiver authenticates its sessions with it).
    pub auth_token: String,
    /// The receiving site's incoming password, when it requires one.
    pub password: Option<String>,
    /// Protocol version the sender speaks.
    pub protocol_version: u16,
    /// The sender's QUIC endpoint, when it offers one.
    pub quic: Option<TransportOffer>,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("sender_url", &self.sender_url)
            .field("connection_name", &self.connection_name)
            .field("protocol_version", &self.protocol_version)
            .finish_non_exhaustive()
    }
}

/// The receiving site's answer to a registration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    /// Id of the receiver connection on the receiving site.
    pub connection_id: String,
    /// Its status: "active" or "pending".
    pub status: String,
    /// A token the sender presents when it tells the receiver of status changes (the sender
    /// keeps it encrypted; the receiver keeps only its hash).
    pub peer_token: String,
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("connection_id", &self.connection_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A peer tells the other side that its record of their connection changed status. The bearer
/// credential says which connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateStatusRequest {
    /// active, suspended, revoked or expired.
    pub status: String,
    /// Why (suspend, revoke).
    pub reason: Option<String>,
    /// The caller's `site_url`.
    pub site_url: String,
}

/// A peer asks whether its connection still exists on the other side; a receiver that stored a
/// token by hand also hands over its peer token this way.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VerifyRequest {
    /// The caller's `site_url`.
    pub site_url: String,
    /// A peer token for the other side to present on later status updates.
    pub peer_token: Option<String>,
}

impl std::fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("site_url", &self.site_url)
            .finish_non_exhaustive()
    }
}

/// A sender that regenerated a connection's token hands the new one to the receiver. The bearer
/// credential (the peer token the receiver issued) says which connection; the SHA-256 of the
/// token being replaced shows the caller is the site that issued it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotateTokenRequest {
    /// The caller's `site_url`.
    pub site_url: String,
    /// Lower-case hex SHA-256 of the token the receiver holds now.
    pub previous_token_sha256: String,
    /// The new connection token.
    pub token: String,
}

impl std::fmt::Debug for RotateTokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateTokenRequest")
            .field("site_url", &self.site_url)
            .finish_non_exhaustive()
    }
}

/// A receiving site exchanges a one-time share code for the token of the share's connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RedeemShareRequest {
    /// The code `dbsync share` printed, e.g. `K7QM-8H2D-X9PA-4RTB` (dashes, spaces and case do
    /// not matter).
    pub code: String,
    /// The caller's `site_url`, recorded with the share.
    pub site_url: String,
}

impl std::fmt::Debug for RedeemShareRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedeemShareRequest")
            .field("site_url", &self.site_url)
            .finish_non_exhaustive()
    }
}

/// What a redeemed share gives: a connection token good for the shared tables, once each, until
/// the share expires.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RedeemShareResponse {
    /// Name of the share's connection on the sending site.
    pub connection_name: String,
    /// The connection token for the data plane.
    pub token: String,
    /// The tables shared.
    pub tables: Vec<String>,
    /// When the share dies (RFC 3339).
    pub expires_at: Option<String>,
}

impl std::fmt::Debug for RedeemShareResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedeemShareResponse")
            .field("connection_name", &self.connection_name)
            .field("tables", &self.tables)
            .finish_non_exhaustive()
    }
}

/// The state of one connection as the answering side holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectionState {
    /// Id on the answering side.
    pub connection_id: String,
    /// Status on the answering side.
    pub status: String,
}

/// Every error body of the peer and admin APIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A stable code and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `password_required`.
    pub code: String,
    /// Human explanation.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let request = RegisterRequest {
            sender_url: "https://a.example.com".into(),
            connection_name: "a".into(),
            auth_token: "dbs_secret".into(),
            password: Some("pw-secret".into()),
            protocol_version: 1,
            quic: None,
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let reply = RegisterResponse {
            connection_id: "x".into(),
            status: "active".into(),
            peer_token: "dbs_secret".into(),
        };
        assert!(!format!("{reply:?}").contains("secret"));
    }

    #[test]
    fn register_request_round_trips() {
        let json = r#"{"sender_url":"https://a","connection_name":"n","auth_token":"t","password":null,"protocol_version":1,"quic":null}"#;
        let parsed: RegisterRequest = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
    }
}
