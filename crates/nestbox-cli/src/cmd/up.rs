//! `nestbox up`: the whole platform on one machine.
//!
//! Control plane and host agent run in one process; the agent still registers with the
//! control plane over loopback with a one-time token, exactly like a remote host. First
//! run: creates the data directory, the master secret, the admin user, their team and an
//! API key (printed once and saved to `admin.env`, mode 0600), and builds the guest images
//! if they are missing.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nestbox_agent::AgentConfig;
use nestbox_control::ControlConfig;

use super::agent::HostArgs;

/// Prints a line to stdout; a closed stdout (e.g. a supervisor that stopped reading) must
/// not bring the platform down.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
use crate::paths;

/// Arguments of `up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// A TOML file of settings: its `[up]` table's keys are this command's flags
    /// (command line and environment take precedence). `.env` in the working directory
    /// is read too.
    #[arg(long, env = "NESTBOX_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// Where all state lives.
    #[arg(long, env = "NESTBOX_DATA_DIR", default_value = paths::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Where the REST API listens.
    #[arg(long, env = "NESTBOX_LISTEN", default_value = paths::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Database URL (default: SQLite in the data directory).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Guest images (default: <data-dir>/images; built if missing).
    #[arg(long, env = "NESTBOX_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Templates to have: the ones missing are built on start (minimal, python, node).
    #[arg(
        long,
        env = "NESTBOX_TEMPLATES",
        value_delimiter = ',',
        default_value = "minimal"
    )]
    pub templates: Vec<String>,
    /// Static guest agent binary used when images must be built.
    #[arg(long, env = "NESTBOX_GUEST_BIN")]
    pub guest_bin: Option<PathBuf>,
    /// Email of the admin created on first run.
    #[arg(
        long,
        env = "NESTBOX_ADMIN_EMAIL",
        default_value = "admin@nestbox.local"
    )]
    pub admin_email: String,
    /// Domain for reaching sandbox ports as `{port}-{sandbox_id}.{domain}` (needs a
    /// wildcard DNS record pointing here); the path and header forms work without it.
    #[arg(long, env = "NESTBOX_PROXY_DOMAIN")]
    pub proxy_domain: Option<String>,
    #[command(flatten)]
    pub tls: super::server::TlsArgs,
    /// How long a create may take on its host, in seconds; a create left unfinished
    /// (a restart in the middle) is settled after twice that.
    #[arg(long, env = "NESTBOX_CREATE_TIMEOUT_SECS", default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub create_timeout: u64,
    /// How sandboxes are placed on hosts: `least-loaded` or `round-robin`.
    #[arg(long, env = "NESTBOX_SCHEDULER", default_value = "least-loaded")]
    pub scheduler: nestbox_control::scheduler::Policy,
    #[command(flatten)]
    pub host: HostArgs,
}

/// A running one-box platform.
pub struct Launched {
    /// The control plane.
    pub cp: nestbox_control::RunningControlPlane,
    /// The host agent.
    pub agent: nestbox_agent::RunningAgent,
    /// The API's base URL.
    pub url: String,
    /// What the first run created (only on the first run).
    pub first_run: Option<nestbox_control::bootstrap::FirstRun>,
    /// The data directory.
    pub data_dir: PathBuf,
}

impl Launched {
    /// Stops the agent, which pauses its running sandboxes (they resume after the next
    /// start), records that, and stops the control plane.
    pub async fn shutdown(self) {
        let report = self.agent.shutdown().await;
        let db = &self.cp.services.db;
        use nestbox_types::SandboxStatus::{Missing, Paused, Running, Stopped};
        for id in &report.paused {
            if let Err(e) =
                nestbox_db::sandboxes::transition(db, *id, &[Running, Missing], Paused, None).await
            {
                tracing::warn!(sandbox = %id, error = %e, "recording a sandbox paused at shutdown");
            }
        }
        for id in &report.destroyed {
            let reason = Some("it could not be paused when its host shut down");
            if let Err(e) =
                nestbox_db::sandboxes::transition(db, *id, &[Running, Missing], Stopped, reason)
                    .await
            {
                tracing::warn!(sandbox = %id, error = %e, "recording a sandbox destroyed at shutdown");
            }
        }
        if !report.paused.is_empty() {
            eprintln!(
                "paused {} sandboxes; they resume on request after the next start",
                report.paused.len()
            );
        }
        self.cp.shutdown().await;
    }

    /// Stops the platform for a restart (an upgrade): the agent leaves every sandbox
    /// running, held or pooled as it is, and the next start takes them back.
    pub async fn detach(self) {
        self.agent.detach().await;
        self.cp.shutdown().await;
    }

    /// Stops everything and destroys every sandbox (throwaway installations).
    pub async fn shutdown_and_destroy(self) {
        let host = self.agent.host_id;
        self.agent.shutdown_and_destroy().await;
        if let Err(e) = self.cp.services.host_shut_down(host).await {
            tracing::warn!(error = %e, "recording destroyed sandboxes");
        }
        self.cp.shutdown().await;
    }
}

/// How long `up` waits for its host to be online with its templates.
const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Starts control plane and host agent in this process (first-run bootstrap included).
/// Returns once sandboxes can be created (`/health/ready`); only then is `admin.env`
/// written.
pub async fn launch(args: &UpArgs) -> anyhow::Result<Launched> {
    paths::private_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir).context("resolving the data directory")?;
    let images_dir = args
        .images_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("images"));
    let secret = paths::master_secret(&data_dir.join("secret.key"))?;

    // Guest images: build what is missing (cached by content; instant when up to date).
    let mut wanted = args.templates.clone();
    if !wanted.iter().any(|t| t == "minimal") {
        // The default template of every create; always present.
        wanted.insert(0, "minimal".into());
    }
    let missing = wanted.iter().any(|t| {
        !images_dir
            .join("templates")
            .join(t)
            .join("template.json")
            .exists()
    });
    if missing {
        eprintln!(
            "Building guest images into {} (first run; this takes a few minutes)…",
            images_dir.display()
        );
        let build = super::image::BuildArgs {
            out: images_dir.clone(),
            cache: Some(data_dir.join("image-cache")),
            guest_bin: args.guest_bin.clone(),
            mirror: std::env::var("NESTBOX_MIRROR")
                .unwrap_or_else(|_| nestbox_image::DEFAULT_MIRROR.into()),
            suite: nestbox_image::DEFAULT_SUITE.into(),
            templates: wanted,
            kernel: None,
            modules: None,
            force: false,
        };
        super::image::build(&build).await?;
    }

    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("nestbox.db").display()));
    let mut cp_cfg = ControlConfig::new(args.listen, database_url, secret);
    cp_cfg.proxy_domain = args.proxy_domain.clone();
    cp_cfg.tls = args.tls.files();
    cp_cfg.create_timeout = std::time::Duration::from_secs(args.create_timeout);
    cp_cfg.scheduler = args.scheduler;
    if cp_cfg.tls.is_some() {
        // The host agent here reaches the control plane on loopback, without TLS: the
        // public certificate names the proxy domain, not this address.
        cp_cfg.local_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let cp = nestbox_control::start(cp_cfg)
        .await
        .context("starting the control plane")?;
    let url = cp.url();
    let first_run =
        match nestbox_control::bootstrap::first_run(&cp.services, &args.admin_email).await {
            Ok(f) => f,
            Err(e) => {
                cp.shutdown().await;
                anyhow::bail!("creating the first admin: {e}");
            }
        };
    // `admin.env` is written once the platform is ready (scripts wait for it), or when
    // start-up fails after the admin was created (its password is shown only once).
    let save_admin = || -> anyhow::Result<()> {
        if let Some(first) = &first_run {
            let body = format!(
                "# Created by `nestbox up` on first run. Keep it secret.\nNESTBOX_URL={url}\nNESTBOX_API_KEY={}\nNESTBOX_ADMIN_EMAIL={}\nNESTBOX_ADMIN_PASSWORD={}\n",
                first.api_key, first.email, first.password
            );
            paths::write_private(&data_dir.join("admin.env"), body.as_bytes())?;
        }
        Ok(())
    };

    let agent_dir = data_dir.join("agent");
    let registration_token = if agent_dir.join("credentials.json").exists() {
        None
    } else {
        match cp.services.create_host_unchecked("local").await {
            Ok(host) => Some(host.registration_token),
            Err(e) => {
                save_admin()?;
                cp.shutdown().await;
                anyhow::bail!("creating the local host: {e}");
            }
        }
    };
    let mut agent_cfg = AgentConfig::new(&agent_dir, &images_dir, cp.local_url());
    agent_cfg.registration_token = registration_token;
    args.host.apply(&mut agent_cfg);
    let agent = match nestbox_agent::start(agent_cfg).await {
        Ok(a) => a,
        Err(e) => {
            save_admin()?;
            cp.shutdown().await;
            return Err(e).context("starting the host agent");
        }
    };
    // Ready means ready: the host is online with its templates before anyone is told.
    let deadline = std::time::Instant::now() + READY_WAIT;
    loop {
        if let Err(e) = cp
            .services
            .sync_host_templates(agent.host_id, &agent.url)
            .await
        {
            tracing::warn!(error = %e, "reading the host's templates");
        }
        match cp.services.readiness().await {
            Ok(()) => break,
            Err(reason) if std::time::Instant::now() < deadline => {
                tracing::debug!(%reason, "waiting for the platform to be ready");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(reason) => {
                tracing::warn!(%reason, "the platform is not ready yet; carrying on");
                break;
            }
        }
    }
    save_admin()?;
    Ok(Launched {
        cp,
        agent,
        url,
        first_run,
        data_dir,
    })
}

/// Runs the platform until interrupted.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Listening from the start: a stop asked for while the platform starts (its warm-up
    // boot, its pool) is a clean stop once it has started, never a kill in the middle
    // that would strand its VMs and namespaces.
    let stop = tokio::spawn(super::server::shutdown_signal());
    let launched = launch(&args).await?;
    let url = launched.url.clone();
    if let Some(first) = &launched.first_run {
        say!(
            "First run: created the admin user and an API key (saved to {}):",
            launched.data_dir.join("admin.env").display()
        );
        say!("  admin email     {}", first.email);
        say!("  admin password  {}", first.password);
        say!("  API key         {}", first.api_key);
    }
    say!("Nestbox is up.");
    say!("  dashboard  {url}/  (sign in as the admin)");
    say!("  API        {url}/v1  (reference: {url}/docs)");
    say!(
        "  host  {} ({})",
        launched.agent.host_id,
        launched.agent.url
    );
    match stop.await.unwrap_or(super::server::Stop::Full) {
        super::server::Stop::Full => launched.shutdown().await,
        super::server::Stop::Restart => launched.detach().await,
    }
    Ok(())
}
