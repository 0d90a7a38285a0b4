//! `nestbox server`: the control plane alone (a fleet's stateless API replicas).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::paths;

/// Arguments of `server`.
#[derive(clap::Args)]
pub struct ServerArgs {
    /// A TOML file of settings: its `[server]` table's keys are this command's flags
    /// (command line and environment take precedence). `.env` in the working directory
    /// is read too.
    #[arg(long, env = "NESTBOX_CONFIG_FILE")]
    pub config: Option<PathBuf>,
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
    /// How sandboxes are placed on hosts: `least-loaded` or `round-robin`.
    #[arg(long, env = "NESTBOX_SCHEDULER", default_value = "least-loaded")]
    pub scheduler: nestbox_control::scheduler::Policy,
    /// Lifetime of a host's access token, in seconds (its agent trades it for the next
    /// pair after three quarters of it).
    #[arg(long, env = "NESTBOX_HOST_ACCESS_TTL_SECS", default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(10..))]
    pub host_access_ttl: u64,
    /// Lifetime of a host's refresh token, in seconds (longer than the access token's).
    #[arg(long, env = "NESTBOX_HOST_REFRESH_TTL_SECS", default_value_t = 60 * 24 * 3600, value_parser = clap::value_parser!(u64).range(20..))]
    pub host_refresh_ttl: u64,
    /// How long a host may go without a heartbeat before it is `unreachable` and its
    /// sandboxes `missing`, in seconds.
    #[arg(long, env = "NESTBOX_HOST_GRACE_SECS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(5..=86400))]
    pub host_grace: u64,
    /// How often the host monitor reconciles the fleet, in seconds.
    #[arg(long, env = "NESTBOX_MONITOR_INTERVAL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub monitor_interval: u64,
    /// A file holding a bearer token that may read `/metrics` (for a Prometheus
    /// scraper; platform admins may read it either way).
    #[arg(long, env = "NESTBOX_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<std::path::PathBuf>,
    /// Email of the platform admin created when the database has no user yet.
    #[arg(
        long,
        env = "NESTBOX_ADMIN_EMAIL",
        default_value = "admin@nestbox.local"
    )]
    pub admin_email: String,
    /// Where that first admin's credentials are written (0600, once); without it a new
    /// database gets no admin and the server refuses to start on one.
    #[arg(long, env = "NESTBOX_ADMIN_ENV")]
    pub admin_env: Option<PathBuf>,
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
    let mut cfg =
        nestbox_control::ControlConfig::new(args.listen, args.database_url.clone(), secret);
    cfg.proxy_domain = args.proxy_domain.clone();
    cfg.tls = args.tls.files();
    cfg.create_timeout = std::time::Duration::from_secs(args.create_timeout);
    cfg.host_grace = std::time::Duration::from_secs(args.host_grace);
    cfg.monitor_interval = std::time::Duration::from_secs(args.monitor_interval);
    cfg.metrics_token = match &args.metrics_token_file {
        Some(path) => Some(super::read_token_file(path)?),
        None => None,
    };
    cfg.scheduler = args.scheduler;
    cfg.host_access_ttl = std::time::Duration::from_secs(args.host_access_ttl);
    cfg.host_refresh_ttl = std::time::Duration::from_secs(args.host_refresh_ttl);
    let cp = nestbox_control::start(cfg)
        .await
        .context("starting the control plane")?;
    if let Err(e) = first_admin(&cp, &args).await {
        cp.shutdown().await;
        return Err(e);
    }
    eprintln!("Nestbox control plane listening on {}", cp.url());
    // The control plane holds no sandbox: both ways of stopping are the same.
    let _ = shutdown_signal().await;
    cp.shutdown().await;
    Ok(())
}

/// Creates the first platform admin of a database without users, and writes their
/// credentials to `--admin-env`. Replicas starting together on a new database may race:
/// the one that loses finds the admin made (its create fails on the unique email) and
/// goes on.
async fn first_admin(
    cp: &nestbox_control::RunningControlPlane,
    args: &ServerArgs,
) -> anyhow::Result<()> {
    let users = nestbox_db::users::count(&cp.services.db)
        .await
        .context("counting users")?;
    if users > 0 {
        return Ok(());
    }
    let Some(path) = &args.admin_env else {
        anyhow::bail!(
            "the database has no user yet: give --admin-env FILE (NESTBOX_ADMIN_ENV) to create \
             the first platform admin and write their credentials there"
        );
    };
    // The password is shown only once: the file's directory must take it before the
    // admin exists (probed beside it, so a file another replica wrote stays whole).
    let mut probe = path.as_os_str().to_os_string();
    probe.push(".probe");
    let probe = PathBuf::from(probe);
    paths::write_private(&probe, b"").with_context(|| format!("preparing {}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    match nestbox_control::bootstrap::first_run(&cp.services, &args.admin_email).await {
        Ok(Some(first)) => {
            let body = format!(
                "# Created by `nestbox server` on a new database. Keep it secret.\nNESTBOX_URL={}\nNESTBOX_API_KEY={}\nNESTBOX_ADMIN_EMAIL={}\nNESTBOX_ADMIN_PASSWORD={}\n",
                cp.url(),
                first.api_key,
                first.email,
                first.password
            );
            if let Err(e) = paths::write_private(path, body.as_bytes()) {
                // Never lose them: the operator's terminal is the last place left.
                eprintln!(
                    "could not write {} ({e:#}); the first admin's credentials:\n{body}",
                    path.display()
                );
                return Err(e);
            }
            eprintln!(
                "created the first platform admin; credentials in {}",
                path.display()
            );
            Ok(())
        }
        Ok(None) => Ok(()),
        // Another replica made the admin first (the email is taken).
        Err(e) if e.code == nestbox_types::ErrorCode::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow::anyhow!("creating the first admin: {e}")),
    }
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
