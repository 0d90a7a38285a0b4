//! Shared state of the control plane's handlers and background jobs.

use std::sync::Arc;

use nestbox_db::Db;

use crate::auth::Sessions;
use crate::config::ControlConfig;
use crate::hostpool::HostPool;
use crate::scheduler::Scheduler;

/// The service layer's dependencies. One per process; shared by reference.
pub struct Services {
    /// The database.
    pub db: Db,
    /// Configuration.
    pub cfg: Arc<ControlConfig>,
    /// Session tokens.
    pub sessions: Sessions,
    /// Host access tokens.
    pub host_tokens: crate::auth::HostTokens,
    /// Host agent clients.
    pub pool: HostPool,
    /// Placement policy.
    pub scheduler: Box<dyn Scheduler>,
    /// Forwards proxied requests to host agents.
    pub forwarder: nestbox_forward::Forwarder,
    /// When this process last recorded each API key's use: a key used many times a
    /// second (a busy proxy client) costs one database write a minute, not one a request.
    pub key_uses:
        std::sync::Mutex<std::collections::HashMap<nestbox_types::ApiKeyId, std::time::Instant>>,
    /// Login rate limits and the password-hashing slots.
    pub login: crate::throttle::LoginThrottle,
    /// Prometheus metrics of this process.
    pub telemetry: crate::telemetry::Telemetry,
    /// Template copies between hosts under way in this process.
    pub copies: Arc<crate::service::copies::Copies>,
    /// Placement's view of the fleet.
    pub fleet: crate::fleet_view::FleetView,
}

/// How often an API key's `last_used_at` is written.
pub const KEY_USE_RESOLUTION: std::time::Duration = std::time::Duration::from_secs(60);

impl Services {
    /// Whether an API key's use should be written now (at most once per
    /// [`KEY_USE_RESOLUTION`] per key and process).
    pub fn should_record_key_use(&self, key: nestbox_types::ApiKeyId) -> bool {
        let Ok(mut uses) = self.key_uses.lock() else {
            return true;
        };
        let now = std::time::Instant::now();
        if uses
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < KEY_USE_RESOLUTION)
        {
            return false;
        }
        if uses.len() > 100_000 {
            uses.retain(|_, at| now.duration_since(*at) < KEY_USE_RESOLUTION);
        }
        uses.insert(key, now);
        true
    }
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("engine", &self.db.engine())
            .finish_non_exhaustive()
    }
}

/// Axum state: a handle on the services.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The services.
    pub services: Arc<Services>,
}
