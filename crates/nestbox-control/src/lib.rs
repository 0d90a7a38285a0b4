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
pub mod browser;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod expiry;
pub mod extract;
pub mod fleet_view;
pub mod hostpool;
pub mod leader;
pub mod monitor;
pub mod proxy;
pub mod request_id;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod telemetry;
pub mod throttle;

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
    /// The TLS certificate or key could not be used.
    #[error("TLS certificate {}", path.display())]
    Tls {
        /// The certificate (or key) file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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
    /// Where the plain-HTTP loopback listener for an in-process agent listens, if any.
    pub local_addr: Option<SocketAddr>,
    /// The public listener serves HTTPS.
    pub tls: bool,
    /// The services (for in-process callers such as `nestbox up`).
    pub services: Arc<Services>,
    server: JoinHandle<()>,
    monitor: JoinHandle<()>,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
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
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The URL a host agent in the same process uses: the loopback listener if there is
    /// one, else [`Self::url`].
    pub fn local_url(&self) -> String {
        match self.local_addr {
            Some(addr) => format!("http://{addr}"),
            None => self.url(),
        }
    }

    /// Stops serving (in-flight requests finish) and stops background jobs.
    pub async fn shutdown(mut self) {
        self.monitor.abort();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
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
    let cfg_secret = cfg.master_secret.clone();
    let scheduler_policy = cfg.scheduler;
    let login_limits = cfg.login_limits;
    let placement_refresh = cfg.placement_refresh;
    let pool = hostpool::HostPool::new(cfg.master_secret.clone())
        .map_err(|e| StartError::Config(format!("the host certificate authority: {e}")))?;
    Ok(Arc::new(Services {
        db,
        cfg: Arc::new(cfg),
        sessions,
        host_tokens: auth::HostTokens::new(&cfg_secret),
        pool,
        scheduler: scheduler_policy.scheduler(),
        forwarder: nestbox_forward::Forwarder::new(),
        key_uses: Default::default(),
        copies: Default::default(),
        fleet: fleet_view::FleetView::new(placement_refresh),
        telemetry: Default::default(),
        login: throttle::LoginThrottle::new(login_limits),
    }))
}

async fn bind(at: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Listen { addr: at, source };
    let listener = tokio::net::TcpListener::bind(at).await.map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok((listener, addr))
}

/// The public listener's TLS configuration from the operator's files.
async fn load_tls(
    files: &config::TlsFiles,
) -> Result<Arc<nestbox_pki::rustls::ServerConfig>, StartError> {
    let read = |path: std::path::PathBuf| async move {
        tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| StartError::Tls {
                path,
                source: Box::new(e),
            })
    };
    let cert = read(files.cert.clone()).await?;
    let key = read(files.key.clone()).await?;
    nestbox_pki::public_server_config(&cert, &key).map_err(|e| StartError::Tls {
        path: files.cert.clone(),
        source: Box::new(e),
    })
}

/// Starts the API server and the host monitor.
pub async fn start(cfg: ControlConfig) -> Result<RunningControlPlane, StartError> {
    let listen = cfg.listen;
    let services = services(cfg).await?;
    let tls = match &services.cfg.tls {
        Some(files) => Some(load_tls(files).await?),
        None => None,
    };
    let (listener, addr) = bind(listen).await?;
    let local = match services.cfg.local_listen {
        Some(at) => Some(bind(at).await?),
        None => None,
    };
    let local_addr = local.as_ref().map(|(_, a)| *a);
    let app = api::router(AppState {
        services: services.clone(),
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Small writes go out at once (streamed events would otherwise wait on delayed ACKs).
    let serve_plain = |listener: tokio::net::TcpListener, rx| {
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        axum::serve(
            listener,
            app.clone()
                .into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(stopped(rx))
    };
    let public: futures::future::BoxFuture<'static, ()> = match tls.clone() {
        Some(tls) => Box::pin(nestbox_forward::serve_tls(
            listener,
            app.clone(),
            tls,
            stopped(rx.clone()),
        )),
        None => {
            let serving = serve_plain(listener, rx.clone());
            Box::pin(async move {
                if let Err(e) = serving.await {
                    tracing::error!(error = %e, "API server failed");
                }
            })
        }
    };
    let internal: futures::future::BoxFuture<'static, ()> = match local {
        Some((listener, _)) => {
            let serving = serve_plain(listener, rx.clone());
            Box::pin(async move {
                if let Err(e) = serving.await {
                    tracing::error!(error = %e, "local API listener failed");
                }
            })
        }
        None => Box::pin(std::future::ready(())),
    };
    let server = tokio::spawn(async move {
        tokio::join!(public, internal);
    });
    let background = services.clone();
    let monitor = tokio::spawn(async move {
        tokio::join!(
            monitor::run(background.clone()),
            expiry::run(background.clone()),
            fleet_view::run(background.clone())
        );
    });
    tracing::info!(%addr, tls = tls.is_some(), ?local_addr, "control plane listening");
    Ok(RunningControlPlane {
        addr,
        local_addr,
        tls: tls.is_some(),
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
