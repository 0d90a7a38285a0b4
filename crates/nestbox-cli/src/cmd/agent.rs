//! `nestbox agent`: a host agent that registers with a control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nestbox_agent::{AccelChoice, AgentConfig};

/// Arguments of `agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// A TOML file of settings: its `[agent]` table's keys are this command's flags
    /// (command line and environment take precedence). `.env` in the working directory
    /// is read too.
    #[arg(long, env = "NESTBOX_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// The control plane's URL.
    #[arg(long, env = "NESTBOX_CONTROL_PLANE")]
    pub control_plane: String,
    /// One-time registration token (first start only).
    #[arg(long, env = "NESTBOX_REGISTER_TOKEN")]
    pub register_token: Option<String>,
    /// Where the agent keeps its state.
    #[arg(
        long,
        env = "NESTBOX_AGENT_DIR",
        default_value = "/var/lib/nestbox/agent"
    )]
    pub data_dir: PathBuf,
    /// Built guest images.
    #[arg(
        long,
        env = "NESTBOX_IMAGES_DIR",
        default_value = "/var/lib/nestbox/images"
    )]
    pub images_dir: PathBuf,
    /// Where the gRPC server listens.
    #[arg(long, env = "NESTBOX_AGENT_LISTEN", default_value = "0.0.0.0:7701")]
    pub listen: SocketAddr,
    /// URL the control plane dials (default: https://<listen>; served over TLS once
    /// registered, whatever the scheme given).
    #[arg(long, env = "NESTBOX_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Most sandboxes at once.
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: u32,
    /// After this many seconds without reaching the control plane, pause every running
    /// sandbox with its memory (they resume on request once it is back); 0: never.
    #[arg(long, env = "NESTBOX_PAUSE_ALL_AFTER_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=7 * 24 * 3600))]
    pub pause_all_after_secs: u64,
    /// Serve Prometheus metrics on this address (`/metrics`, plain HTTP); needs
    /// `--metrics-token-file`.
    #[arg(long, env = "NESTBOX_METRICS_LISTEN", requires = "metrics_token_file")]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token a metrics scrape must carry.
    #[arg(long, env = "NESTBOX_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub host: HostArgs,
}

/// How a host runs sandboxes (shared by `agent` and `up`).
#[derive(clap::Args, Clone)]
pub struct HostArgs {
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, env = "NESTBOX_ACCEL", default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// Let guests reach private and link-local networks.
    #[arg(long, env = "NESTBOX_ALLOW_PRIVATE_EGRESS")]
    pub allow_private_egress: bool,
    /// DNS servers for guests, and behind the resolver of sandboxes with domain egress
    /// rules (comma-separated IPv4 addresses; default: the host's, minus loopback ones).
    #[arg(long, env = "NESTBOX_DNS", value_delimiter = ',')]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// The QEMU system emulator.
    #[arg(long, env = "NESTBOX_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// How long a sandbox may take to boot, seconds.
    #[arg(long, env = "NESTBOX_BOOT_TIMEOUT", default_value_t = 90)]
    pub boot_timeout: u64,
    /// How long a paused sandbox keeps its VMM process, stopped, so that resuming it is a
    /// continue rather than a restore; seconds (0: never). Its snapshot is whole either way.
    #[arg(long, env = "NESTBOX_PAUSE_HOLD_SECS", default_value_t = 300)]
    pub pause_hold_secs: u64,
    /// Clones of each snapshot template in use to keep started, so that a create takes
    /// one over instead of restoring (each costs an idle sandbox's memory; 0: none).
    #[arg(long, env = "NESTBOX_CLONE_POOL", default_value_t = 1)]
    pub clone_pool: u32,
    /// Run VMMs without what the host cannot give them: their control groups where it
    /// has no usable cgroup hierarchy, their jails where it cannot make one (otherwise
    /// the agent refuses to start there).
    #[arg(long, env = "NESTBOX_UNCONFINED")]
    pub unconfined: bool,
    /// The memory filesystem (tmpfs) guest RAM lives on; its size bounds the guest
    /// memory the host admits.
    #[arg(long, env = "NESTBOX_MEMORY_DIR", default_value = "/dev/shm")]
    pub memory_dir: PathBuf,
    /// A registry (`host` or `host:port`) that template builds may pull images from over
    /// plain HTTP and at a private or loopback address (repeat, or comma-separate); any
    /// other registry is reached over HTTPS at public addresses only.
    #[arg(
        long = "insecure-registry",
        env = "NESTBOX_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
}

impl Default for HostArgs {
    fn default() -> Self {
        Self {
            accel: AccelChoice::Auto,
            allow_private_egress: false,
            dns: Vec::new(),
            qemu: "qemu-system-x86_64".into(),
            boot_timeout: 90,
            pause_hold_secs: 300,
            clone_pool: 1,
            unconfined: false,
            memory_dir: "/dev/shm".into(),
            insecure_registries: Vec::new(),
        }
    }
}

impl HostArgs {
    /// Sets these choices on an agent configuration.
    pub fn apply(&self, cfg: &mut AgentConfig) {
        cfg.accel = self.accel;
        cfg.allow_private_egress = self.allow_private_egress;
        if !self.dns.is_empty() {
            cfg.dns = Some(self.dns.clone());
        }
        cfg.qemu_binary = self.qemu.clone();
        cfg.boot_timeout = std::time::Duration::from_secs(self.boot_timeout.max(1));
        cfg.pause_hold = std::time::Duration::from_secs(self.pause_hold_secs);
        cfg.clone_pool = self.clone_pool;
        cfg.unconfined = self.unconfined;
        cfg.memory_root = self.memory_dir.clone();
        cfg.insecure_registries = self.insecure_registries.clone();
    }
}

/// Parses an accelerator name.
pub fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    match s {
        "auto" => Ok(AccelChoice::Auto),
        "kvm" => Ok(AccelChoice::Kvm),
        "tcg" => Ok(AccelChoice::Tcg),
        other => Err(format!("`{other}` is not one of auto, kvm, tcg")),
    }
}

/// Runs the agent until interrupted.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let mut cfg = AgentConfig::new(&args.data_dir, &args.images_dir, &args.control_plane);
    cfg.registration_token = args.register_token;
    cfg.listen = args.listen;
    cfg.advertise_url = args.advertise;
    cfg.max_sandboxes = args.max_sandboxes;
    cfg.metrics_listen = args.metrics_listen;
    cfg.metrics_token = match &args.metrics_token_file {
        Some(path) => Some(super::read_token_file(path)?),
        None => None,
    };
    cfg.pause_all_after = (args.pause_all_after_secs > 0)
        .then(|| std::time::Duration::from_secs(args.pause_all_after_secs));
    args.host.apply(&mut cfg);
    // Listening from the start: a stop during start-up is a clean stop once started.
    let stop = tokio::spawn(super::server::shutdown_signal());
    let agent = nestbox_agent::start(cfg)
        .await
        .context("starting the host agent")?;
    eprintln!(
        "Nestbox host agent {} serving on {}",
        agent.host_id, agent.url
    );
    match stop.await.unwrap_or(super::server::Stop::Full) {
        super::server::Stop::Full => {
            agent.shutdown().await;
        }
        super::server::Stop::Restart => agent.detach().await,
    }
    Ok(())
}
