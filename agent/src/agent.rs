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
    /// The tables cut for parallel pulls, by grant token (sender side).
    pub(crate) splits: crate::session::sender::Splits,
    /// The pulls reading pages now (sender side), which size the pages.
    pub(crate) readers: Arc<crate::session::sender::Readers>,
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
            splits: Default::default(),
            readers: Default::default(),
            quic_identity: std::sync::OnceLock::new(),
        })
    }

    /// The site's QUIC certificate: the configured one; on a PostgreSQL state database the
    /// site's, kept in it (every agent of the site presents the same); on SQLite the self-signed
    /// one beside the key file. Made on first use.
    pub async fn quic_identity(&self) -> Result<Arc<crate::quic::Identity>> {
        use crate::quic::Identity;
        if let Some(identity) = self.quic_identity.get() {
            return Ok(Arc::clone(identity));
        }
        let identity = match Identity::configured(&self.config.quic)? {
            Some(configured) => configured,
            None if self.store.engine() == crate::store::Engine::Postgres => {
                self.site_identity().await?
            }
            None => Identity::load_or_create(&self.config.quic, &self.config.key_file())?,
        };
        let identity = Arc::new(identity);
        Ok(Arc::clone(self.quic_identity.get_or_init(|| identity)))
    }

    /// The site certificate in the state database: stored by the first agent (from the files an
    /// earlier version left beside the key file, so a pinned fingerprint stays good, else new),
    /// read by every other.
    async fn site_identity(&self) -> Result<crate::quic::Identity> {
        use crate::quic::Identity;
        use crate::store::site_identity::key_binding;
        if self.store.site_identity().await?.is_none() {
            let (cert_path, key_path) = Identity::files_beside(&self.config.key_file());
            let (cert, key) = match (std::fs::read(&cert_path), std::fs::read(&key_path)) {
                (Ok(cert), Ok(key)) => {
                    tracing::info!(path = %cert_path.display(), "keeping the site's QUIC certificate in the state database");
                    (cert, key)
                }
                _ => Identity::generate()?,
            };
            let sealed = self.vault.seal(key_binding(), &hex::encode(&key))?;
            self.store
                .insert_site_identity(&cert, &sealed, self.now())
                .await?;
        }
        let (cert, sealed) = self.store.site_identity().await?.ok_or_else(|| {
            crate::Error::Config("the site certificate vanished from the state database".into())
        })?;
        let key = self
            .vault
            .open(key_binding(), &sealed)
            .ok()
            .and_then(|hex_key| hex::decode(hex_key).ok())
            .ok_or_else(|| {
                crate::Error::Config(
                    "cannot open the site's QUIC key in the state database: every agent on one \
                     state database needs the same token_encryption_key (or key file)"
                        .into(),
                )
            })?;
        Ok(Identity::from_der(cert, key))
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
        match self.quic_identity().await {
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
