//! The client address of a request: the socket peer, or the right-most untrusted address of
//! `X-Forwarded-For` when the peer is a configured trusted proxy.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use dbsync_agent::connection::canonical_ip;
use ipnet::IpNet;

use crate::{ApiError, AppState};

/// Proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses addresses and CIDR blocks (already validated with the configuration; invalid
    /// entries are dropped).
    pub fn parse(entries: &[String]) -> Self {
        Self(
            entries
                .iter()
                .filter_map(|entry| dbsync_agent::connection::parse_cidr(entry).ok())
                .filter_map(|cidr| cidr.parse().ok())
                .collect(),
        )
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address for a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical_ip(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|hop| hop.trim().parse::<IpAddr>().map(canonical_ip))
            .collect::<Result<_, _>>()
            .unwrap_or_default();
        // Right to left: the first address not added by a trusted proxy is the client.
        hops.iter()
            .rev()
            .copied()
            .find(|hop| !self.trusts(*hop))
            .or(hops.first().copied())
            .unwrap_or(peer)
    }
}

/// Extractor for the client address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub(crate) IpAddr);

impl<S> FromRequestParts<S> for ClientIp
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "no peer address",
                )
            })?;
        Ok(Self(state.proxies.client_ip(peer, &parts.headers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", xff.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(proxies.client_ip(peer, &headers("198.51.100.1")), peer);
    }

    #[test]
    fn forwarded_for_is_read_right_to_left_past_trusted_hops() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]);
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // A client may forge the left part; the right-most untrusted hop is what the proxy saw.
        let client = proxies.client_ip(peer, &headers("1.1.1.1, 198.51.100.7, 10.0.0.5"));
        assert_eq!(client, "198.51.100.7".parse::<IpAddr>().unwrap());
        // Malformed headers fall back to the socket peer.
        assert_eq!(proxies.client_ip(peer, &headers("not-an-ip")), peer);
        assert_eq!(proxies.client_ip(peer, &HeaderMap::new()), peer);
    }
}
