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
        })
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
