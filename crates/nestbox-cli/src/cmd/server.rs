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
}

/// Runs the control plane until interrupted.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let secret = paths::master_secret(&args.secret_file)?;
    let mut cfg = nestbox_control::ControlConfig::new(args.listen, args.database_url, secret);
    cfg.proxy_domain = args.proxy_domain;
    let cp = nestbox_control::start(cfg)
        .await
        .context("starting the control plane")?;
    eprintln!("Nestbox control plane listening on {}", cp.url());
    shutdown_signal().await;
    cp.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    eprintln!("shutting down…");
}
