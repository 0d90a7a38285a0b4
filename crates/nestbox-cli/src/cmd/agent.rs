//! `nestbox agent`: a host agent that registers with a control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use nestbox_agent::{AccelChoice, AgentConfig};

/// Arguments of `agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
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
    /// URL the control plane dials (default: http://<listen>).
    #[arg(long, env = "NESTBOX_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, env = "NESTBOX_ACCEL", default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// Most sandboxes at once.
    #[arg(long, default_value_t = 64)]
    pub max_sandboxes: u32,
    /// Let guests reach private and link-local networks.
    #[arg(long)]
    pub allow_private_egress: bool,
    /// The QEMU system emulator.
    #[arg(long, env = "NESTBOX_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// How long a sandbox may take to boot, seconds.
    #[arg(long, env = "NESTBOX_BOOT_TIMEOUT", default_value_t = 90)]
    pub boot_timeout: u64,
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
    cfg.accel = args.accel;
    cfg.max_sandboxes = args.max_sandboxes;
    cfg.allow_private_egress = args.allow_private_egress;
    cfg.qemu_binary = args.qemu;
    cfg.boot_timeout = std::time::Duration::from_secs(args.boot_timeout.max(1));
    let agent = nestbox_agent::start(cfg)
        .await
        .context("starting the host agent")?;
    eprintln!(
        "Nestbox host agent {} serving on {}",
        agent.host_id, agent.url
    );
    super::server::shutdown_signal().await;
    agent.shutdown().await;
    Ok(())
}
