//! The Nestbox control plane.
//!
//! Stateless: all state is in the database (SQLite on one box, PostgreSQL for a fleet).
//! It serves the REST API ([`api`]), holds the business rules ([`service`]), places
//! sandboxes on hosts ([`scheduler`]), calls host agents over gRPC ([`hostpool`]) and
//! reconciles the fleet ([`monitor`]) and ends sandboxes whose lifetime is over
//! ([`expiry`]).

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod expiry;
pub mod extract;
pub mod hostpool;
pub mod leader;
pub mod monitor;
pub mod proxy;
pub mod scheduler;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use nestbox_db::Db;
use tokio::task::JoinHandle;

pub use config::{ControlConfig, Limits};
pub use state::{AppState, Services};

/// The control plane's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration.
    #[error("invalid control plane configuration: {0}")]
    Config(String),
    /// The database could not be opened or migrated.
    #[error("database {url}")]
    Database {
        /// The URL, without credentials.
        url: String,
        /// Why.
        #[source]
        source: nestbox_db::DbError,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Hides the password of a database URL.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A running control plane.
pub struct RunningControlPlane {
    /// Where the API listens.
    pub addr: SocketAddr,
    /// The services (for in-process callers such as `nestbox up`).
    pub services: Arc<Services>,
    server: JoinHandle<()>,
    monitor: JoinHandle<()>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for RunningControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningControlPlane")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RunningControlPlane {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving (in-flight requests finish) and stops background jobs.
    pub async fn shutdown(mut self) {
        self.monitor.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.server).await;
        self.services.db.close().await;
    }
}

/// Opens the database and builds the services (no listener, no background jobs).
pub async fn services(cfg: ControlConfig) -> Result<Arc<Services>, StartError> {
    cfg.validate().map_err(StartError::Config)?;
    let db = Db::connect(&cfg.database_url)
        .await
        .map_err(|source| StartError::Database {
            url: redact_url(&cfg.database_url),
            source,
        })?;
    let sessions = auth::Sessions::new(&cfg.master_secret, cfg.session_ttl);
    let pool = hostpool::HostPool::new(cfg.master_secret.clone())
        .map_err(|e| StartError::Config(format!("the host certificate authority: {e}")))?;
    Ok(Arc::new(Services {
        db,
        cfg: Arc::new(cfg),
        sessions,
        pool,
        scheduler: Box::new(scheduler::LeastLoaded),
        forwarder: nestbox_forward::Forwarder::new(),
        key_uses: Default::default(),
    }))
}

/// Starts the API server and the host monitor.
pub async fn start(cfg: ControlConfig) -> Result<RunningControlPlane, StartError> {
    let listen = cfg.listen;
    let services = services(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let app = api::router(AppState {
        services: services.clone(),
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "API server failed");
        }
    });
    let background = services.clone();
    let monitor = tokio::spawn(async move {
        tokio::join!(
            monitor::run(background.clone()),
            expiry::run(background.clone())
        );
    });
    tracing::info!(%addr, "control plane listening");
    Ok(RunningControlPlane {
        addr,
        services,
        server,
        monitor,
        shutdown: Some(tx),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("sqlite:///x/y.db"), "sqlite:///x/y.db");
    }
}
