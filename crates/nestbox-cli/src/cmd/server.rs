//! `nestbox server`: the control plane alone (a fleet's stateless API replicas).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::paths;

/// Arguments of `server`.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// Where the REST API listens.
    #[arg(long, env = "NESTBOX_LISTEN", default_value = paths::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Database URL: `sqlite://PATH` or `postgres://…`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// File holding the master secret (created if missing); `NESTBOX_SECRET` overrides it.
    #[arg(
        long,
        env = "NESTBOX_SECRET_FILE",
        default_value = "/var/lib/nestbox/secret.key"
    )]
    pub secret_file: PathBuf,
    /// Domain for reaching sandbox ports as `{port}-{sandbox_id}.{domain}` (needs a
    /// wildcard DNS record pointing here).
    #[arg(long, env = "NESTBOX_PROXY_DOMAIN")]
    pub proxy_domain: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// How long a create may take on its host, in seconds; a create left unfinished
    /// (the control plane restarted in the middle) is settled after twice that.
    #[arg(long, env = "NESTBOX_CREATE_TIMEOUT_SECS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub create_timeout: u64,
}

/// Serving the API over HTTPS (shared by `server` and `up`).
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM). For E2B's SDKs without
    /// `E2B_SANDBOX_URL`: a wildcard certificate for `*.{proxy-domain}`, on port 443.
    #[arg(long, env = "NESTBOX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "NESTBOX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// The control plane's setting.
    pub fn files(&self) -> Option<nestbox_control::config::TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(nestbox_control::config::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

/// Runs the control plane until interrupted.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let secret = paths::master_secret(&args.secret_file)?;
    let mut cfg = nestbox_control::ControlConfig::new(args.listen, args.database_url, secret);
    cfg.proxy_domain = args.proxy_domain;
    cfg.tls = args.tls.files();
    cfg.create_timeout = std::time::Duration::from_secs(args.create_timeout);
    let cp = nestbox_control::start(cfg)
        .await
        .context("starting the control plane")?;
    eprintln!("Nestbox control plane listening on {}", cp.url());
    // The control plane holds no sandbox: both ways of stopping are the same.
    let _ = shutdown_signal().await;
    cp.shutdown().await;
    Ok(())
}

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT or SIGTERM: a full stop (a host agent pauses its sandboxes).
    Full,
    /// SIGUSR2: a restart, e.g. onto a new binary (a host agent leaves its sandboxes
    /// running for its next start to take back).
    Restart,
}

/// Resolves on SIGINT or SIGTERM ([`Stop::Full`]) or SIGUSR2 ([`Stop::Restart`]).
pub async fn shutdown_signal() -> Stop {
    let wait = |kind: tokio::signal::unix::SignalKind| async move {
        match tokio::signal::unix::signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    let stop = tokio::select! {
        _ = tokio::signal::ctrl_c() => Stop::Full,
        _ = wait(tokio::signal::unix::SignalKind::terminate()) => Stop::Full,
        _ = wait(tokio::signal::unix::SignalKind::user_defined2()) => Stop::Restart,
    };
    match stop {
        Stop::Full => eprintln!("shutting down…"),
        Stop::Restart => eprintln!("stopping for a restart; sandboxes keep running…"),
    }
    stop
}
