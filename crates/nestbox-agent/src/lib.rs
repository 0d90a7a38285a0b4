//! The Nestbox host agent: runs sandboxes as microVMs on one machine.
//!
//! One agent runs per host, as root. It owns the host's sandboxes (their VMM processes,
//! network namespaces and copy-on-write disks; see [`sandbox`]), serves the control plane
//! over gRPC ([`grpc`]), registers with it and heartbeats ([`register`]), samples running
//! sandboxes' CPU, memory and disk ([`metrics`]), and at start-up removes whatever a crash
//! left behind ([`cleanup`]).
//!
//! The agent's memory is the truth for what runs on this host; the control plane's
//! database is the truth for what should exist. The control plane reconciles the two.
//!
//! Several agents may share a machine (e.g. side-by-side `nestbox up` instances): each has
//! its own data directory, and an *instance tag* derived from it names its host firewall
//! table and guest memory directory; network slots are allocated machine-wide.

pub mod cleanup;
pub mod config;
pub mod error;
pub mod grpc;
pub mod guest;
pub mod host;
pub mod metrics;
pub mod oci;
pub mod processes;
pub mod proxy;
pub mod register;
pub mod sandbox;
pub mod telemetry;
pub mod templates;
pub mod transfer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nestbox_hostsys::disk::BaseImages;
use nestbox_hostsys::net::{EgressPolicy, HostFirewall, SlotAllocator, host_dns_servers};
use nestbox_image::ImageStore;
use nestbox_proto::hostagent::host_agent_server::HostAgentServer;
use nestbox_types::HostId;
use nestbox_types::api::RegisterHostRequest;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

pub use config::{AccelChoice, AgentConfig};
pub use error::AgentError;
pub use sandbox::Manager;

/// The agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid agent configuration: {0}")]
    Config(String),
    /// The host lacks privileges or tools.
    #[error("this host cannot run sandboxes: {0}")]
    Preflight(String),
    /// A start-up step failed.
    #[error("agent start-up: {what}")]
    Step {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn step(what: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> StartError {
    move |source| StartError::Step { what, source }
}

/// Short tag naming this agent instance's host-wide resources, derived from its data dir.
pub fn instance_tag(data_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    hex::encode(Sha256::digest(canonical.as_os_str().as_encoded_bytes()))[..8].to_string()
}

/// vCPUs, memory (MiB) and disk (MiB) of this host.
pub fn host_specs(cfg: &AgentConfig) -> (u32, u64, u64) {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    let disk_mb = nix::sys::statvfs::statvfs(&cfg.data_dir)
        .map(|s| s.blocks_available() * s.fragment_size() / (1 << 20))
        .unwrap_or(0);
    (vcpus, mem_kb / 1024, disk_mb)
}

fn which(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Checks privileges and tools before anything is touched.
pub fn preflight(cfg: &AgentConfig) -> Result<(), StartError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(StartError::Preflight(
            "the host agent must run as root (it creates network namespaces, TAP devices and nftables rules)".into(),
        ));
    }
    let qemu = cfg.qemu_binary.to_string_lossy().into_owned();
    let tools = [qemu.as_str(), "qemu-img", "ip", "nft", "resize2fs", "cp"];
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| !which(t))
        .map(|t| match nestbox_hostsys::process::package_hint(t) {
            Some(pkg) => format!("{t} (apt-get install {pkg})"),
            None => t.to_string(),
        })
        .collect();
    if !missing.is_empty() {
        return Err(StartError::Preflight(format!(
            "missing tools: {}",
            missing.join(", ")
        )));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(StartError::Preflight(
            "/dev/net/tun is missing (load the tun module)".into(),
        ));
    }
    Ok(())
}

/// What a clean shutdown did with the sandboxes.
#[derive(Debug, Clone, Default)]
pub struct ShutdownReport {
    /// Paused: they resume after the restart.
    pub paused: Vec<nestbox_types::SandboxId>,
    /// Destroyed because they could not be paused.
    pub destroyed: Vec<nestbox_types::SandboxId>,
}

/// A fresh random token (hex of 32 bytes).
pub fn random_token() -> Result<String, AgentError> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| AgentError::Internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(buf))
}

/// A running agent.
pub struct RunningAgent {
    /// Where its gRPC server listens.
    pub addr: SocketAddr,
    /// The URL it registered (what the control plane dials).
    pub url: String,
    /// Its host id.
    pub host_id: HostId,
    /// Its sandboxes.
    pub manager: Manager,
    firewall: HostFirewall,
    mem_root: PathBuf,
    cgroups: Option<nestbox_vmm::qemu::Cgroups>,
    server: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    metrics: Option<JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("addr", &self.addr)
            .field("host_id", &self.host_id)
            .finish()
    }
}

impl RunningAgent {
    /// Removes the instance's control groups once no VMM is left in them.
    fn remove_cgroups(&self) {
        if let Some(c) = &self.cgroups {
            c.hierarchy
                .sweep(&c.parent, &std::collections::HashSet::new());
            if let Err(e) = c.hierarchy.group(&c.parent).remove() {
                tracing::warn!(error = %e, "removing the instance's cgroup");
            }
        }
    }

    /// Stops serving, pauses every running sandbox (they survive the restart; one that
    /// cannot be paused is destroyed) and removes the host firewall table.
    pub async fn shutdown(mut self) -> ShutdownReport {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.heartbeat.abort();
        if let Some(m) = &self.metrics {
            m.abort();
        }
        let (paused, destroyed) = self.manager.pause_all().await;
        let _ = (&mut self.server).await;
        // Paused sandboxes keep their tmpfs snapshots; remove the directory only if empty.
        let _ = std::fs::remove_dir(&self.mem_root);
        self.remove_cgroups();
        if let Err(e) = self.firewall.remove().await {
            tracing::warn!(error = %e, "removing the host firewall table");
        }
        tracing::info!(
            paused = paused.len(),
            destroyed = destroyed.len(),
            "host agent stopped"
        );
        ShutdownReport { paused, destroyed }
    }

    /// Stops serving and leaves every sandbox exactly as it is — running VMMs, held ones,
    /// pooled clones, their networks and the host firewall — for the next run of the agent
    /// to take back (an upgrade: replace the binary, stop the agent this way, start it
    /// again). A crash leaves the same behind; this only skips the wait for nothing.
    pub async fn detach(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.heartbeat.abort();
        if let Some(m) = &self.metrics {
            m.abort();
        }
        self.manager.detach_all().await;
        let _ = (&mut self.server).await;
        tracing::info!("host agent stopped; its sandboxes run on for the next start");
    }

    /// Stops serving and destroys every sandbox, paused ones included, leaving nothing on
    /// the host (used by throwaway installations such as the benchmark).
    pub async fn shutdown_and_destroy(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.heartbeat.abort();
        if let Some(m) = &self.metrics {
            m.abort();
        }
        self.manager.destroy_all().await;
        let _ = (&mut self.server).await;
        let _ = std::fs::remove_dir_all(&self.mem_root);
        self.remove_cgroups();
        if let Err(e) = self.firewall.remove().await {
            tracing::warn!(error = %e, "removing the host firewall table");
        }
    }
}

/// A directory start-up made, removed (if still empty) unless start-up succeeds.
struct MadeDir(Option<PathBuf>);

impl Drop for MadeDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            // Only when empty: RAM files of VMMs a previous run left stay.
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Starts the agent: preflight, cleanup, firewall, VMM, images, gRPC server, registration
/// and heartbeats.
pub async fn start(mut cfg: AgentConfig) -> Result<RunningAgent, StartError> {
    cfg.validate().map_err(StartError::Config)?;
    preflight(&cfg)?;
    // Sandbox files and guest RAM live in directories nobody else may own, replace or read.
    nestbox_hostsys::dirs::private_dir(&cfg.data_dir)
        .and_then(|()| nestbox_hostsys::dirs::private_dir(&cfg.data_dir.join("sandboxes")))
        .map_err(|e| step("preparing the data directory")(Box::new(e)))?;
    // Absolute from here on: every path a VMM's command line names starts with it, which
    // is how start-up recovery tells this instance's VMMs from another's.
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)
        .map_err(|e| step("resolving the data directory")(Box::new(e)))?;
    cfg.validate().map_err(StartError::Config)?;
    let cfg = Arc::new(cfg);
    let tag = instance_tag(&cfg.data_dir);
    let mem_root = sandbox::mem_root(&cfg.memory_root, &tag);
    nestbox_hostsys::dirs::private_dir(&mem_root)
        .map_err(|e| step("preparing the guest memory directory")(Box::new(e)))?;
    // A start that fails from here on leaves no empty memory directory behind.
    let mut made = MadeDir(Some(mem_root.clone()));
    let slots = SlotAllocator::new(&cfg.slots_dir, tag.clone())
        .map_err(|e| step("opening the slot directory")(Box::new(e)))?;

    let cgroups = confinement(&cfg, &tag)?;
    let images = ImageStore::new(&cfg.images_dir);
    let jail = jail_works(&cfg).await?;
    let vmm = crate::vmm_for(&cfg, &images, cgroups.clone(), jail).await?;
    tracing::info!(vmm = %vmm.info(), "VMM ready");

    let host = host::Host::real(vmm);
    let (_, recovered) = cleanup::run(&cfg.data_dir, &mem_root, &slots, &host).await;
    if let Some(c) = &cgroups {
        // Groups of VMMs that are gone (the ones taken back keep theirs).
        let keep = recovered
            .live
            .iter()
            .map(|(_, vm)| vm.id().to_string())
            .collect();
        let removed = c.hierarchy.sweep(&c.parent, &keep);
        if removed > 0 {
            tracing::info!(removed, "removed the cgroups of VMMs a previous run left");
        }
    }

    let dns = cfg.dns.clone().unwrap_or_else(host_dns_servers);
    let firewall = HostFirewall::new(&tag);
    firewall
        .install(&EgressPolicy {
            dns: dns.clone(),
            allow_private: cfg.allow_private_egress,
        })
        .await
        .map_err(|e| step("installing the host firewall")(Box::new(e)))?;

    let bases = BaseImages::new(cfg.data_dir.join("bases"))
        .map_err(|e| step("opening the base image directory")(Box::new(e)))?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| step("building the HTTP client")(Box::new(e)))?;
    let manager = Manager::new(sandbox::ManagerParts {
        cfg: cfg.clone(),
        tag: tag.clone(),
        host,
        images,
        bases,
        slots,
        http: http.clone(),
        dns,
        templates: templates::TemplateStore::new(cfg.data_dir.join("templates"))
            .map_err(|e| step("opening the template store")(Box::new(e)))?,
        warm: templates::TemplateStore::new(&cfg.warm_dir)
            .map_err(|e| step("opening the warm snapshot store")(Box::new(e)))?,
    });
    for st in recovered.paused {
        manager.adopt_paused(st);
    }
    for (st, vm) in recovered.live {
        manager.adopt_live(st, vm).await;
    }
    if manager.templates().is_empty() {
        tracing::warn!(images = %cfg.images_dir.display(), "no templates found; build them with `nestbox image build`");
    }
    manager
        .prepare_images()
        .await
        .map_err(|e| step("preparing base images")(Box::new(e)))?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| step("binding the gRPC listener")(Box::new(e)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| step("binding the gRPC listener")(Box::new(e)))?;
    // New registrations get a TLS certificate: advertise https (an advertised http URL is
    // upgraded once the certificate is there).
    let advertised = |tls: bool| {
        let url = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        match (tls, url.strip_prefix("http://")) {
            (true, Some(rest)) => format!("https://{rest}"),
            _ => url,
        }
    };

    let (vcpus, memory_mb, disk_mb) = host_specs(&cfg);
    let creds_path = cfg.data_dir.join("credentials.json");
    let creds = register::ensure(
        &http,
        &creds_path,
        &cfg.control_plane_url,
        cfg.registration_token.as_deref(),
        RegisterHostRequest {
            token: String::new(),
            address: advertised(true),
            version: VERSION.to_string(),
            vcpus,
            memory_mb,
            disk_mb,
            max_sandboxes: cfg.max_sandboxes,
        },
    )
    .await
    .map_err(|e| step("registering with the control plane")(Box::new(e)))?;
    let tls = match &creds.tls {
        Some(bundle) => Some(
            nestbox_pki::server_config(bundle)
                .map_err(|e| step("loading the TLS certificate")(Box::new(e)))?,
        ),
        None => {
            tracing::warn!(
                "registered without a TLS certificate: serving plain HTTP/2 (register again to get one)"
            );
            None
        }
    };
    let url = advertised(tls.is_some());

    let service = grpc::Service::new(manager.clone(), creds.host_id);
    let auth = grpc::Authenticator::new(creds.host_id, creds.host_key.clone());
    let proxy = proxy::ProxyState::new(manager.clone(), creds.host_id, creds.host_key.clone());
    // One listener: gRPC calls go to the service, every other request is a proxied request
    // for a port inside a sandbox (HTTP/1.1, upgrades included).
    let app = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        HostAgentServer::new(service).max_decoding_message_size(8 << 20),
        auth,
    ))
    .into_axum_router()
    .fallback(move |request: axum::extract::Request| {
        let state = proxy.clone();
        async move { proxy::handle(axum::extract::State(state), request).await }
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt as _;
        if let Some(tls) = tls {
            nestbox_forward::serve_tls(listener, app, tls, async {
                let _ = rx.await;
            })
            .await;
            return;
        }
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        });
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "agent server failed");
        }
    });
    // The control plane must know where the agent listens now before anyone is told it
    // is up (a restart may have moved it).
    let session = Arc::new(register::HostSession::new(
        http,
        &cfg.control_plane_url,
        &creds_path,
        creds.clone(),
    ));
    let report = {
        let manager = manager.clone();
        move || register::HostReport {
            sandboxes: u32::try_from(manager.count()).unwrap_or(u32::MAX),
            guest_memory_mb: Some(manager.guest_memory_mb()),
        }
    };
    if let Err(e) = session.heartbeat(&url, report()).await {
        tracing::warn!(error = %e, "first heartbeat failed; retrying in the background");
    }
    let lost = cfg.pause_all_after.map(|after| {
        let manager = manager.clone();
        register::LostContact {
            after,
            pause: Box::new(move || {
                let manager = manager.clone();
                Box::pin(async move {
                    let paused = manager.pause_running().await;
                    tracing::warn!(
                        paused = paused.len(),
                        "sandboxes paused while the control plane is away"
                    );
                })
            }),
        }
    });
    let metrics = match (cfg.metrics_listen, cfg.metrics_token.clone()) {
        (Some(at), Some(token)) => {
            let listener = telemetry::bind(at)
                .await
                .map_err(|e| step("binding the metrics listener")(Box::new(e)))?;
            tracing::info!(addr = %at, "serving metrics");
            Some(tokio::spawn(telemetry::serve(
                listener,
                token,
                manager.clone(),
                session.clone(),
            )))
        }
        _ => None,
    };
    let heartbeat =
        tokio::spawn(session.heartbeat_loop(url.clone(), cfg.heartbeat_interval, report, lost));
    manager.warm_up();
    tracing::info!(%addr, host = %creds.host_id, "host agent serving");
    made.0 = None;
    Ok(RunningAgent {
        addr,
        url,
        host_id: creds.host_id,
        manager,
        firewall,
        mem_root,
        cgroups,
        server,
        heartbeat,
        metrics,
        shutdown: Some(tx),
    })
}

/// Builds the VMM driver for this host. The KVM probe (accelerator `auto`) boots the first
/// template's kernel; its verdict is cached machine-wide until the next reboot.
/// How VMMs are confined on this host: their control groups, found now; a host without a
/// usable hierarchy is refused unless the configuration says to run unconfined.
fn confinement(
    cfg: &AgentConfig,
    tag: &str,
) -> Result<Option<nestbox_vmm::qemu::Cgroups>, StartError> {
    match nestbox_hostsys::cgroup::Hierarchy::detect() {
        Some(hierarchy) => {
            tracing::info!(cgroups = hierarchy.describe(), "VMMs run in control groups");
            Ok(Some(nestbox_vmm::qemu::Cgroups {
                hierarchy,
                parent: PathBuf::from(format!("nestbox-{tag}")),
            }))
        }
        None if cfg.unconfined => {
            tracing::warn!("no usable cgroup hierarchy: VMMs run without CPU, memory and process limits (--unconfined)");
            Ok(None)
        }
        None => Err(StartError::Preflight(
            "no usable cgroup hierarchy (the cpu, memory and pids controllers, v2 or v1): sandboxes could not be held to their limits; enable them, or pass --unconfined to run without".into(),
        )),
    }
}

/// Whether VMMs can run jailed here (a private mount namespace, their own user, no
/// capabilities): tried once with a jailed `true`. A host where it fails is refused unless
/// the configuration says to run unconfined.
async fn jail_works(cfg: &AgentConfig) -> Result<bool, StartError> {
    let probe = async {
        let root = cfg.data_dir.join(".jail-probe");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        // Above every slot's user: no VMM runs as it.
        let uid = nestbox_vmm::qemu::jail::VMM_UID_BASE + 65_535;
        let ran = nestbox_hostsys::process::Cmd::new("true")
            .jail(nestbox_hostsys::jail::Jail::new(&root, uid, uid).with_system())
            .timeout(std::time::Duration::from_secs(10))
            .run()
            .await;
        let _ = std::fs::remove_dir(&root);
        ran.map(drop).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
            format!("{e}{}", cause.unwrap_or_default())
        })
    };
    match probe.await {
        Ok(()) => {
            tracing::info!("VMMs run jailed: own user, private mount namespace, no capabilities");
            Ok(true)
        }
        Err(reason) if cfg.unconfined => {
            tracing::warn!(%reason, "VMMs cannot be jailed here: they run as root and see the host's files (--unconfined)");
            Ok(false)
        }
        Err(reason) => Err(StartError::Preflight(format!(
            "VMMs cannot be jailed on this host ({reason}): a VMM bug would reach the host as root; fix that, or pass --unconfined to run without"
        ))),
    }
}

async fn vmm_for(
    cfg: &AgentConfig,
    images: &ImageStore,
    cgroups: Option<nestbox_vmm::qemu::Cgroups>,
    jail: bool,
) -> Result<Arc<dyn nestbox_vmm::Vmm>, StartError> {
    let accel = match cfg.accel {
        AccelChoice::Auto => nestbox_vmm::AccelChoice::Auto,
        AccelChoice::Kvm => nestbox_vmm::AccelChoice::Kvm,
        AccelChoice::Tcg => nestbox_vmm::AccelChoice::Tcg,
    };
    let probe = first_template(images)
        .and_then(|name| images.template_with_kernel(&name).ok())
        .map(|(_, k)| nestbox_vmm::qemu::ProbeImages {
            kernel: k.kernel,
            initrd: k.initramfs,
        });
    let qemu = nestbox_vmm::qemu::QemuVmm::new(nestbox_vmm::qemu::QemuOptions {
        binary: cfg.qemu_binary.clone(),
        accel,
        probe,
        state_dir: Some(PathBuf::from("/run/nestbox")),
        cgroups,
        seccomp: true,
        jail,
    })
    .await
    .map_err(|e| step("starting the QEMU driver")(Box::new(e)))?;
    Ok(Arc::new(qemu))
}

fn first_template(images: &ImageStore) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(images.root().join("templates"))
        .ok()?
        .flatten()
        .filter(|e| e.path().join("template.json").exists())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    names.sort();
    names.into_iter().next()
}
