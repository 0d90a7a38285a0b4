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
    /// Host agent clients.
    pub pool: HostPool,
    /// Placement policy.
    pub scheduler: Box<dyn Scheduler>,
    /// Forwards proxied requests to host agents.
    pub forwarder: nestbox_forward::Forwarder,
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
