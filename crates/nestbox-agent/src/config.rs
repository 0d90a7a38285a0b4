//! The host agent's configuration: one typed struct, validated at start-up.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use nestbox_types::limits::DEFAULT_DISK_SIZE_MB;

/// Which accelerator VMs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when a probe shows a KVM guest really runs, else TCG.
    Auto,
    /// KVM; fail if unusable.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the agent keeps its state (`sandboxes/`, `bases/`, credentials).
    pub data_dir: PathBuf,
    /// Built guest images (`kernels/`, `templates/`), from `nestbox image build`.
    pub images_dir: PathBuf,
    /// Address the gRPC server binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// URL the control plane should dial; default `http://<bound address>`.
    pub advertise_url: Option<String>,
    /// The control plane's base URL, for registration and heartbeats.
    pub control_plane_url: String,
    /// One-time registration token, needed until the agent has credentials.
    pub registration_token: Option<String>,
    /// Most sandboxes at once.
    pub max_sandboxes: u32,
    /// Disk size that base images are prepared at on start-up, MiB.
    pub default_disk_mb: u64,
    /// How long a sandbox may take to boot before the create fails.
    pub boot_timeout: Duration,
    /// Default exec timeout when a request gives none.
    pub exec_timeout: Duration,
    /// Per-stream limit of collected exec output.
    pub exec_max_output: u64,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// The QEMU system emulator.
    pub qemu_binary: PathBuf,
    /// DNS servers for guests; default: the host's, minus loopback ones.
    pub dns: Option<Vec<Ipv4Addr>>,
    /// Let guests reach private and link-local ranges.
    pub allow_private_egress: bool,
    /// Run VMMs without control groups where the host has no usable hierarchy, and
    /// unjailed where it cannot jail them (else the agent refuses to start).
    pub unconfined: bool,
    /// Where slot files live (machine-wide, shared by agents on one host).
    pub slots_dir: PathBuf,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// Where to serve Prometheus metrics (plain HTTP; `None`: nowhere).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The bearer token a metrics scrape must carry (needed with `metrics_listen`).
    pub metrics_token: Option<String>,
    /// How long without reaching the control plane before every running sandbox is
    /// paused with its memory; `None`: never.
    pub pause_all_after: Option<Duration>,
    /// Built-in templates to keep a warm snapshot of (default creates restore from it).
    pub warm_templates: Vec<String>,
    /// Where warm snapshots live (machine-wide, shared by every agent on the host).
    pub warm_dir: PathBuf,
    /// The memory filesystem guest RAM lives on (the instance's directory is made in it):
    /// tmpfs, whose size bounds the guest memory this host admits.
    pub memory_root: PathBuf,
    /// How long a paused sandbox keeps its VMM (stopped) for a fast resume; zero: never.
    pub pause_hold: Duration,
    /// Most paused sandboxes holding their VMM at once (each costs the VMM's own memory,
    /// tens of MiB; the guest RAM is the snapshot's either way).
    pub max_held: u32,
    /// Clones kept started, per snapshot template in use, for creates to take over
    /// (see `sandbox::pool`); zero: none.
    pub clone_pool: u32,
    /// Registries (`host` or `host:port`) that template builds pull OCI images from over
    /// plain HTTP, and that may be on private or loopback addresses; every other registry
    /// is reached over HTTPS at public addresses only.
    pub insecure_registries: Vec<String>,
}

impl AgentConfig {
    /// Defaults for an agent keeping state in `data_dir` and talking to `control_plane_url`.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        images_dir: impl Into<PathBuf>,
        control_plane_url: impl Into<String>,
    ) -> Self {
        Self {
            data_dir: data_dir.into(),
            images_dir: images_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_url: None,
            control_plane_url: control_plane_url.into(),
            registration_token: None,
            max_sandboxes: 64,
            default_disk_mb: u64::from(DEFAULT_DISK_SIZE_MB),
            boot_timeout: Duration::from_secs(90),
            exec_timeout: Duration::from_secs(60),
            exec_max_output: 16 << 20,
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            dns: None,
            allow_private_egress: false,
            unconfined: false,
            slots_dir: PathBuf::from("/run/nestbox/slots"),
            heartbeat_interval: Duration::from_secs(15),
            pause_all_after: Some(Duration::from_secs(300)),
            metrics_listen: None,
            metrics_token: None,
            warm_templates: vec![nestbox_types::limits::DEFAULT_TEMPLATE.to_string()],
            warm_dir: PathBuf::from("/var/cache/nestbox/warm"),
            memory_root: PathBuf::from("/dev/shm"),
            pause_hold: Duration::from_secs(300),
            max_held: 16,
            clone_pool: 1,
            insecure_registries: Vec::new(),
        }
    }

    /// Checks values that would only fail later.
    pub fn validate(&self) -> Result<(), String> {
        if self.metrics_listen.is_some()
            && self.metrics_token.as_deref().is_none_or(|t| t.len() < 16)
        {
            return Err(
                "serving metrics needs a token of at least 16 characters (nothing is served unauthenticated)"
                    .into(),
            );
        }
        if self.max_sandboxes == 0 {
            return Err("max_sandboxes must be at least 1".into());
        }
        if self.default_disk_mb < 256 {
            return Err("default_disk_mb must be at least 256".into());
        }
        // Unix socket paths (QMP) live in each sandbox's directory and must fit what the
        // VMM driver accepts: `<data>/sandboxes/sb-<36>/qmp.sock`.
        let longest = self
            .data_dir
            .join("sandboxes")
            .join(format!("sb-{}", "0".repeat(36)))
            .join(nestbox_vmm::qemu::QMP_SOCKET);
        if longest.as_os_str().len() > nestbox_vmm::qemu::MAX_SOCKET_PATH {
            return Err(format!(
                "data directory {} is too long for unix sockets; use a shorter path",
                self.data_dir.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_whose_sockets_the_vmm_refuses_is_refused() {
        let cfg = |dir: &str| AgentConfig::new(dir, "/images", "http://cp");
        cfg("/var/lib/nestbox/agent").validate().unwrap();
        // The longest that fits: its sockets are exactly as long as the VMM accepts.
        let fits = format!("/{}", "d".repeat(nestbox_vmm::qemu::MAX_SOCKET_PATH - 60));
        cfg(&fits).validate().unwrap();
        let err = cfg(&format!("{fits}x")).validate().unwrap_err();
        assert!(err.contains("too long"), "{err}");
    }
}
