//! The agent: everything one site needs to act, bundled (store, configuration, clock, the
//! vault for stored tokens, access validation, and the client that calls peers).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::access::Validator;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::error::Result;
use crate::peer::PeerClient;
use crate::store::Store;
use crate::vault::Vault;

/// One site's engine. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Agent {
    /// The state database.
    pub store: Store,
    /// Configuration in force.
    pub config: Config,
    /// Where "now" comes from.
    pub clock: SharedClock,
    /// Encryption at rest of the tokens this site presents to peers.
    pub vault: Arc<Vault>,
    /// Access checks for receivers' sessions.
    pub validator: Validator,
    /// Outbound calls to peers.
    pub peers: PeerClient,
    /// Prometheus metrics (`/metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The site's QUIC certificate, loaded (or created) on first use.
    quic_identity: std::sync::OnceLock<Arc<crate::quic::Identity>>,
}

impl Agent {
    /// Opens the state database named by `config` (migrating it) and assembles the agent.
    pub async fn open(config: Config, clock: SharedClock) -> Result<Self> {
        let store = Store::connect(config.database_url()).await?;
        Self::with_store(store, config, clock)
    }

    /// Assembles an agent around an open store.
    pub fn with_store(store: Store, config: Config, clock: SharedClock) -> Result<Self> {
        config.validate()?;
        let vault = Arc::new(Vault::from_config(&config)?);
        let validator = Validator::new(store.clone(), Arc::clone(&clock));
        let peers = PeerClient::new(config.allow_private_peers);
        Ok(Self {
            store,
            config,
            clock,
            vault,
            validator,
            peers,
            metrics: crate::metrics::Metrics::new(),
            quic_identity: std::sync::OnceLock::new(),
        })
    }

    /// The site's QUIC certificate: the configured one, or the self-signed one kept beside the
    /// key file (created on first use).
    pub fn quic_identity(&self) -> Result<Arc<crate::quic::Identity>> {
        if let Some(identity) = self.quic_identity.get() {
            return Ok(Arc::clone(identity));
        }
        let identity = Arc::new(crate::quic::Identity::load_or_create(
            &self.config.quic,
            &self.config.key_file(),
        )?);
        Ok(Arc::clone(self.quic_identity.get_or_init(|| identity)))
    }

    /// The UDP address QUIC sessions are served on.
    pub fn quic_listen(&self) -> std::net::SocketAddr {
        self.config.quic.listen.unwrap_or(self.config.server.listen)
    }

    /// What this site offers peers over QUIC (port and certificate fingerprint), if enabled. The
    /// port is `quic.listen`'s when configured, else the one `dbsync serve` recorded, else the
    /// HTTP listen port.
    pub async fn quic_offer(&self) -> Option<dbsync_protocol::peer::TransportOffer> {
        if !self.config.quic.enabled {
            return None;
        }
        let port = match self.config.quic.listen {
            Some(listen) => listen.port(),
            None => match self.store.settings().await {
                Ok(settings) => settings
                    .quic_port
                    .and_then(|p| u16::try_from(p).ok())
                    .unwrap_or_else(|| self.quic_listen().port()),
                Err(_) => self.quic_listen().port(),
            },
        };
        match self.quic_identity() {
            Ok(identity) => Some(dbsync_protocol::peer::TransportOffer {
                kind: "quic".into(),
                port: Some(port),
                cert_fingerprint: Some(identity.fingerprint.clone()),
            }),
            Err(err) => {
                tracing::warn!(error = %err, "QUIC is enabled but the certificate is unusable");
                None
            }
        }
    }

    /// The current time.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// This site's public base URL: configured, else stored in the settings, else derived from
    /// the listen address.
    pub async fn site_url(&self) -> Result<String> {
        if let Some(url) = &self.config.site_url {
            return Ok(url.trim_end_matches('/').to_owned());
        }
        Ok(match self.store.settings().await?.site_url {
            Some(url) => url,
            None => self.config.default_site_url(),
        })
    }
}
