//! Outbound calls to peer sites, with the safety rules of SPEC section 5: http(s) only; hosts
//! that are (or resolve to) loopback, private, link-local, unique-local or unspecified addresses
//! refused unless `allow_private_peers` is set; IPv4 literals in every encoding (decimal, hex,
//! octal, IPv4-mapped IPv6) normalised before the check; no redirects; 10 s timeouts; bounded
//! response bodies.
//!
//! Names are checked where they are resolved (a custom resolver), so a name that resolves to a
//! forbidden address is refused at connect time, whatever it resolved to before.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dbsync_protocol::peer::{
    ConnectionState, ErrorBody, REDEEM_SHARE_PATH, REGISTER_PATH, ROTATE_TOKEN_PATH,
    RedeemShareRequest, RedeemShareResponse, RegisterRequest, RegisterResponse, RotateTokenRequest,
    STATUS_PATH, StatusResponse, UPDATE_STATUS_PATH, UpdateStatusRequest, VERIFY_PATH,
    VerifyRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::{Host, Url};

/// Timeout of every outbound call (connect and whole request).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read from a peer.
pub const MAX_PEER_RESPONSE_BYTES: usize = 256 * 1024;

/// Why an outbound call did not produce the expected answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCallError {
    /// The URL is not allowed (scheme, or a forbidden address): nothing was sent.
    #[error("refused to call {0}")]
    Refused(String),
    /// The peer could not be reached (DNS, connect, TLS, timeout).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer answered with an error.
    #[error("peer answered {status} {code}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The peer's stable error code.
        code: String,
        /// The peer's explanation.
        message: String,
    },
    /// The peer answered something that is not the expected JSON.
    #[error("unexpected answer from peer: {0}")]
    BadResponse(String),
}

impl PeerCallError {
    /// Whether trying again later may succeed (unreachable, or a server-side error).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::BadResponse(_) => true,
            Self::Rejected { status, .. } => *status >= 500 || *status == 429,
            Self::Refused(_) => false,
        }
    }
}

/// Whether `ip` is loopback, private, link-local, unique-local, unspecified, or otherwise not a
/// public unicast address (CGNAT, multicast, broadcast, documentation ranges).
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    ip.is_multicast()
        // ::, ::1 and the deprecated IPv4-compatible ::a.b.c.d
        || segments[..6] == [0; 6]
        // unique local fc00::/7
        || (segments[0] & 0xfe00) == 0xfc00
        // link-local fe80::/10
        || (segments[0] & 0xffc0) == 0xfe80
        // documentation 2001:db8::/32
        || (segments[0] == 0x2001 && segments[1] == 0x0db8)
}

/// Parses `site_url` + `path` and applies the URL rules (scheme, literal addresses). Names are
/// checked later, at resolution.
pub fn checked_url(site_url: &str, path: &str, allow_private: bool) -> Result<Url, PeerCallError> {
    let joined = format!("{}{}", site_url.trim_end_matches('/'), path);
    let url =
        Url::parse(&joined).map_err(|err| PeerCallError::Refused(format!("{site_url}: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(PeerCallError::Refused(format!(
            "{site_url}: only http and https are allowed"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(PeerCallError::Refused(format!(
            "{site_url}: credentials in the URL are not allowed"
        )));
    }
    if allow_private {
        return Ok(url);
    }
    let forbidden = match url.host() {
        Some(Host::Ipv4(ip)) => is_forbidden(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => is_forbidden(IpAddr::V6(ip)),
        Some(Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        None => true,
    };
    if forbidden {
        return Err(PeerCallError::Refused(format!(
            "{site_url}: private, loopback and link-local addresses are not allowed (set allow_private_peers to permit them)"
        )));
    }
    Ok(url)
}

/// A resolver that drops forbidden addresses, so a name pointing at one cannot be called.
#[derive(Debug)]
struct GuardedResolver;

#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to private, loopback or link-local addresses")]
struct ForbiddenName(String);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| !is_forbidden(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    Box::new(ForbiddenName(host)) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// HTTP client for the peer API.
#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    allow_private: bool,
}

impl PeerClient {
    /// A client; with `allow_private` false, private and loopback peers are refused.
    pub fn new(allow_private: bool) -> Self {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(PEER_TIMEOUT)
            .connect_timeout(PEER_TIMEOUT)
            .no_proxy()
            .user_agent(concat!("dbsync/", env!("CARGO_PKG_VERSION")));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let http = builder
            .build()
            .expect("static HTTP client configuration is valid");
        Self {
            http,
            allow_private,
        }
    }

    /// `GET /db-sync/api/status`.
    pub async fn status(&self, site_url: &str) -> Result<StatusResponse, PeerCallError> {
        let url = checked_url(site_url, STATUS_PATH, self.allow_private)?;
        self.send(self.http.get(url)).await
    }

    /// `POST /db-sync/api/register-connection`.
    pub async fn register(
        &self,
        site_url: &str,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, PeerCallError> {
        self.post(site_url, REGISTER_PATH, None, request).await
    }

    /// `POST /db-sync/api/update-status`, authenticated by `bearer`.
    pub async fn update_status(
        &self,
        site_url: &str,
        bearer: &str,
        request: &UpdateStatusRequest,
    ) -> Result<ConnectionState, PeerCallError> {
        self.post(site_url, UPDATE_STATUS_PATH, Some(bearer), request)
            .await
    }

    /// `POST /db-sync/api/verify-connection`, authenticated by `bearer`.
    pub async fn verify(
        &self,
        site_url: &str,
        bearer: &str,
        request: &VerifyRequest,
    ) -> Result<ConnectionState, PeerCallError> {
        self.post(site_url, VERIFY_PATH, Some(bearer), request)
            .await
    }

    /// `POST /db-sync/api/redeem-share`.
    pub async fn redeem_share(
        &self,
        site_url: &str,
        request: &RedeemShareRequest,
    ) -> Result<RedeemShareResponse, PeerCallError> {
        self.post(site_url, REDEEM_SHARE_PATH, None, request).await
    }

    /// `POST /db-sync/api/rotate-token`, authenticated by `bearer`.
    pub async fn rotate_token(
        &self,
        site_url: &str,
        bearer: &str,
        request: &RotateTokenRequest,
    ) -> Result<ConnectionState, PeerCallError> {
        self.post(site_url, ROTATE_TOKEN_PATH, Some(bearer), request)
            .await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        site_url: &str,
        path: &str,
        bearer: Option<&str>,
        body: &B,
    ) -> Result<T, PeerCallError> {
        let url = checked_url(site_url, path, self.allow_private)?;
        let mut request = self.http.post(url).json(body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, PeerCallError> {
        let mut response = request.send().await.map_err(describe_send_error)?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| PeerCallError::Unreachable(err.to_string()))?
        {
            if body.len() + chunk.len() > MAX_PEER_RESPONSE_BYTES {
                return Err(PeerCallError::BadResponse(format!(
                    "body larger than {MAX_PEER_RESPONSE_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|err| PeerCallError::BadResponse(err.to_string()));
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(parsed) => (parsed.error.code, parsed.error.message),
            Err(_) if status.is_redirection() => {
                ("redirect".into(), "redirects are not followed".into())
            }
            Err(_) => (
                "http_error".into(),
                status.canonical_reason().unwrap_or("error").into(),
            ),
        };
        Err(PeerCallError::Rejected {
            status: status.as_u16(),
            code,
            message,
        })
    }
}

fn describe_send_error(err: reqwest::Error) -> PeerCallError {
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(cause) = source {
        if let Some(forbidden) = cause.downcast_ref::<ForbiddenName>() {
            return PeerCallError::Refused(forbidden.to_string());
        }
        source = cause.source();
    }
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let detail = std::iter::successors(std::error::Error::source(&err), |e| e.source())
        .last()
        .map(ToString::to_string)
        .unwrap_or_else(|| err.to_string());
    PeerCallError::Unreachable(format!("{kind}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> bool {
        matches!(
            checked_url(url, STATUS_PATH, false),
            Err(PeerCallError::Refused(_))
        )
    }

    #[test]
    fn literal_addresses_in_every_encoding_are_refused() {
        for url in [
            "http://127.0.0.1",
            "http://127.1",
            "http://2130706433",
            "http://0x7f000001",
            "http://0x7f.0.0.1",
            "http://0177.0.0.1",
            "http://017700000001",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.8",
            "http://172.16.3.4",
            "http://192.168.1.1:8080",
            "http://100.64.0.1",
            "http://0.0.0.0",
            "http://[::1]",
            "http://[::]",
            "http://[::ffff:127.0.0.1]",
            "http://[::ffff:7f00:1]",
            "http://[fe80::1]",
            "http://[fd00::1]",
            "http://localhost:4860",
            "http://api.localhost",
        ] {
            assert!(refused(url), "{url} must be refused");
        }
    }

    #[test]
    fn public_addresses_and_names_pass_the_url_check() {
        for url in [
            "https://b.example.com",
            "http://8.8.8.8",
            "https://[2606:4700::1111]",
            "https://a.example.com/kit",
        ] {
            assert!(checked_url(url, STATUS_PATH, false).is_ok(), "{url}");
        }
        assert_eq!(
            checked_url("https://a.example.com/kit/", STATUS_PATH, false)
                .unwrap()
                .as_str(),
            "https://a.example.com/kit/db-sync/api/status"
        );
    }

    #[test]
    fn other_schemes_and_credentials_are_refused_even_when_private_is_allowed() {
        for url in [
            "ftp://b.example.com",
            "file:///etc/passwd",
            "gopher://x",
            "https://u:p@b.example.com",
        ] {
            assert!(
                matches!(
                    checked_url(url, STATUS_PATH, true),
                    Err(PeerCallError::Refused(_))
                ),
                "{url}"
            );
        }
        assert!(checked_url("http://127.0.0.1:4860", STATUS_PATH, true).is_ok());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_resolution() {
        let client = PeerClient::new(false);
        // "localhost." with a trailing dot is caught by the URL check; a name that only the
        // resolver can judge is exercised through the resolver directly.
        let resolver = GuardedResolver;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let result = reqwest::dns::Resolve::resolve(&resolver, name).await;
        assert!(result.is_err());
        assert!(matches!(
            client.status("http://localhost").await,
            Err(PeerCallError::Refused(_))
        ));
    }
}
