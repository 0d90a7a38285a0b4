//! The QEMU driver: `qemu-system-x86_64 -M microvm`, controlled over QMP.
//!
//! ```text
//! QemuVmm::new ── qemu --version, accelerator (Auto: KVM probe, cached) ──▶ QemuVmm
//! boot(spec):  validate ─ prepare run dir ─ kernel/initrd digests (cached) ─ spawn
//!              (hostsys Cmd: new session, netns) ─ connect QMP (bounded; an early exit
//!              is reported with stderr) ──▶ QemuVm
//! restore(spec, dir, memory): checks (before any process) ─ place RAM ─ spawn with
//!              `-incoming defer` ─ load state ─ cont ──▶ QemuVm   (see [`snapshot`])
//! QemuVm::save(dir, mode): stop ─ migrate state ─ RAM + freeze hook ─ cont | quit
//! QemuVm::stop: QMP quit ─ wait ≤ grace ─ SIGTERM/SIGKILL ─ reap ─ remove run files
//! ```
//!
//! Invariants: every QEMU we start is owned by exactly one [`QemuVm`] (its
//! `Supervised` child kills it on drop) or, during a restore, by the restore call, which
//! kills it before returning an error; its pid file lets [`reap_stale`] clean up after
//! an agent crash. A VM removes only the RAM file it owns ([`MemoryBacking::Owned`]).

pub mod accel;
pub mod argv;
pub mod jail;
pub mod record;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nestbox_hostsys::process::{Cmd, Supervised};
use tracing::Instrument;

use crate::qmp::QmpClient;
use crate::snapshot::files::Stamp;
use crate::snapshot::{DigestCache, ImageDigest, MachineConfig};
use crate::spec::{NetworkSpec, VmSpec};
use crate::{
    Accel, AccelChoice, BoxFuture, FreezeHook, RestoreMemory, Restored, SaveMode, SavedSnapshot,
    SnapshotManifest, StopReport, Vm, Vmm, VmmError, VmmInfo, console,
};
pub use accel::{ProbeImages, host_tsc_khz};
pub use argv::{
    MemoryBacking, RunPaths, TCG_CPU, TCG_TB_SIZE_MB, machine_argv, machine_config, qemu_argv,
};

/// QMP socket name in the run directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// Serial console log name in the run directory.
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU pid file name in the run directory.
pub const PID_FILE: &str = "qemu.pid";
/// QEMU's stdout/stderr log name in the run directory.
pub const STDERR_LOG: &str = "qemu.log";
/// How long QEMU may take to open its QMP socket.
const QMP_WAIT: Duration = Duration::from_secs(15);
/// Unix socket paths longer than this do not fit `sockaddr_un`.
pub const MAX_SOCKET_PATH: usize = 100;

const NAME: &str = "qemu";

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The emulator binary.
    pub binary: PathBuf,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Images the KVM probe boots (`Auto` only; without them `Auto` means TCG).
    pub probe: Option<ProbeImages>,
    /// Where the KVM probe verdict is cached.
    pub state_dir: Option<PathBuf>,
    /// Control groups for VMMs: each runs in `<parent>/<vm id>` with limits from its size
    /// (`None`: unconfined).
    pub cgroups: Option<Cgroups>,
    /// QEMU's seccomp filter ([`argv::SECCOMP`]); on unless turned off to measure what it
    /// costs.
    pub seccomp: bool,
    /// Each VMM in a jail of its own ([`jail`]): its own user ([`VmSpec::uid`]), a mount
    /// namespace holding only its files, no capabilities.
    pub jail: bool,
}

/// Where VMMs' control groups are made.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// The host's hierarchy.
    pub hierarchy: nestbox_hostsys::cgroup::Hierarchy,
    /// The parent group, relative to the hierarchy's root (`nestbox-<tag>`).
    pub parent: PathBuf,
}

/// Memory a VMM may use beyond its guest's RAM, MiB: under TCG the translated-code cache
/// (capped at [`argv::TCG_TB_SIZE_MB`]) and QEMU's own allocations, under KVM less.
fn vmm_overhead_mb(accel: Accel) -> u64 {
    match accel {
        Accel::Tcg => 1024,
        Accel::Kvm => 256,
    }
}

/// The limits of a VMM running `spec`: its vCPUs plus half a CPU for device emulation,
/// CPU weight by vCPUs, its guest RAM plus [`vmm_overhead_mb`], 512 threads.
pub fn vmm_limits(spec: &VmSpec, accel: Accel) -> nestbox_hostsys::cgroup::Limits {
    nestbox_hostsys::cgroup::Limits {
        cpu_millis: spec.vcpus.saturating_mul(1000).saturating_add(500),
        cpu_shares: spec.vcpus.saturating_mul(1024),
        memory_bytes: (u64::from(spec.memory_mb) + vmm_overhead_mb(accel)) << 20,
        pids: 512,
        io_weight: 100,
    }
}

impl Default for QemuOptions {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            accel: AccelChoice::Auto,
            probe: None,
            state_dir: None,
            cgroups: None,
            seccomp: true,
            jail: false,
        }
    }
}

/// The QEMU driver.
///
/// It keeps a cache of kernel and initramfs digests (snapshots record them; restores
/// compare them): a boot hashes its images in the background, and the first restore from
/// images this driver has not seen hashes them once (about 30 ms for a 50 MB kernel in a
/// release build). A host agent can warm it at start-up with [`Vmm::check_snapshot`].
#[derive(Debug)]
pub struct QemuVmm {
    binary: PathBuf,
    info: VmmInfo,
    tsc_khz: Option<u64>,
    /// The host CPU's model name (snapshots under KVM record it).
    host_cpu: Option<String>,
    digests: Arc<DigestCache>,
    cgroups: Option<Cgroups>,
    seccomp: bool,
    jail: bool,
    /// Templates' RAM as sealed copies for jailed clones.
    sealed: Arc<jail::SealedRam>,
}

/// The kernel and initramfs a VM booted: their paths and stamps, hashed (through the
/// driver's cache) when a snapshot records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuestImages {
    pub(crate) kernel: (PathBuf, Stamp),
    pub(crate) initrd: Option<(PathBuf, Stamp)>,
}

impl GuestImages {
    /// Stamps the spec's images (cheap: two `stat`s).
    fn of(spec: &VmSpec) -> Result<Self, VmmError> {
        let stamp = |p: &Path| {
            Stamp::read(p)
                .map(|s| (p.to_path_buf(), s))
                .map_err(|source| VmmError::Io {
                    op: "stat",
                    path: p.to_path_buf(),
                    source,
                })
        };
        Ok(Self {
            kernel: stamp(&spec.kernel)?,
            initrd: spec.initrd.as_deref().map(stamp).transpose()?,
        })
    }

    /// Their digests, as booted. Blocking (hashes unless cached).
    pub(crate) fn digests(
        &self,
        cache: &DigestCache,
    ) -> Result<(ImageDigest, Option<ImageDigest>), VmmError> {
        let digest = |(p, s): &(PathBuf, Stamp)| {
            cache
                .digest_unchanged(p, *s)
                .map_err(|source| VmmError::Io {
                    op: "hash",
                    path: p.clone(),
                    source,
                })
        };
        Ok((
            digest(&self.kernel)?,
            self.initrd.as_ref().map(digest).transpose()?,
        ))
    }
}

/// The host CPU's model name from /proc/cpuinfo.
fn host_cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Parses `QEMU emulator version 7.2.22 (Debian …)`.
fn parse_version(text: &str) -> Option<String> {
    let rest = text.lines().next()?.split("version").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

impl QemuVmm {
    /// Checks the binary, reads its version and settles the accelerator.
    pub async fn new(opts: QemuOptions) -> Result<Self, VmmError> {
        let out = Cmd::new(&opts.binary)
            .arg("--version")
            .timeout(Duration::from_secs(10))
            .run()
            .await
            .map_err(|source| VmmError::Spawn {
                id: "version".into(),
                source,
            })?;
        let version = parse_version(&out.stdout_text()).ok_or_else(|| VmmError::Binary {
            binary: opts.binary.display().to_string(),
            detail: format!("unrecognised --version output: {}", out.stdout_text()),
        })?;
        let accel = match opts.accel {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                accel::auto_accel(
                    &opts.binary,
                    &version,
                    opts.probe.as_ref(),
                    opts.state_dir.as_deref(),
                )
                .await?
            }
        };
        let tsc_khz = if accel == Accel::Tcg {
            host_tsc_khz()
        } else {
            None
        };
        if accel == Accel::Tcg && tsc_khz.is_none() {
            tracing::warn!(
                "no `cpu MHz` in /proc/cpuinfo: TCG guests may hang calibrating the TSC"
            );
        }
        tracing::info!(%version, accel = accel.as_str(), "qemu driver ready");
        Ok(Self {
            binary: opts.binary,
            info: VmmInfo {
                name: NAME,
                version,
                accel,
                cpu: match accel {
                    Accel::Kvm => "host",
                    Accel::Tcg => argv::TCG_CPU,
                },
            },
            tsc_khz,
            host_cpu: host_cpu_model(),
            digests: Arc::new(DigestCache::default()),
            cgroups: opts.cgroups,
            seccomp: opts.seccomp,
            jail: opts.jail,
            sealed: Arc::default(),
        })
    }

    /// `spec` with its image and disk paths resolved, when VMMs are jailed: a jail binds
    /// files at their real paths, and QEMU must name them the same way.
    pub(crate) fn resolved(&self, mut spec: VmSpec) -> Result<VmSpec, VmmError> {
        if !self.jail {
            return Ok(spec);
        }
        let real = |p: &Path| {
            std::fs::canonicalize(p).map_err(|source| VmmError::Io {
                op: "resolve",
                path: p.to_path_buf(),
                source,
            })
        };
        spec.kernel = real(&spec.kernel)?;
        spec.initrd = spec.initrd.as_deref().map(real).transpose()?;
        spec.root_disk.path = real(&spec.root_disk.path)?;
        spec.root_disk.backing = spec.root_disk.backing.as_deref().map(real).transpose()?;
        Ok(spec)
    }

    /// The control group of VM `id`, if VMMs are confined (not created here).
    pub(crate) fn cgroup_of(&self, id: &str) -> Option<nestbox_hostsys::cgroup::Group> {
        self.cgroups
            .as_ref()
            .map(|c| c.hierarchy.group(&c.parent.join(id)))
    }

    /// The machine `spec` describes on this host.
    pub fn machine_config(&self, spec: &VmSpec) -> MachineConfig {
        machine_config(spec, self.info.accel, self.host_cpu.as_deref())
    }

    /// Hashes the images in the background, so the first snapshot does not wait for the
    /// 50 MB kernel; a failure here only means the save hashes them itself.
    fn warm_digests(&self, images: &GuestImages) {
        let cache = self.digests.clone();
        let images = images.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = images.digests(&cache) {
                tracing::debug!(%error, "cannot hash the guest images yet");
            }
        });
    }

    async fn boot_vm(&self, spec: VmSpec) -> Result<QemuVm, VmmError> {
        spec.validate()?;
        let spec = self.resolved(spec)?;
        let paths = prepare_run_dir(&spec)?;
        let images = GuestImages::of(&spec)?;
        let clock_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let cmdline = spec.kernel_cmdline(self.tsc_khz, clock_ms);
        let memory = MemoryBacking::Owned(paths.memory_file.clone());
        let argv = machine_argv(&spec, self.info.accel, &paths, &cmdline, &memory, false);
        let ram = GuestRam {
            backing: &memory,
            sealed: None,
        };
        let launched = self.launch(&spec, &paths, argv, ram).await;
        let (child, qmp) = match launched {
            Ok(x) => x,
            Err(e) => {
                // QEMU created the RAM file; it is ours to remove.
                let _ = std::fs::remove_file(&paths.memory_file);
                return Err(e);
            }
        };
        tracing::info!(id = %spec.id, pid = child.pid(), "vm started");
        self.warm_digests(&images);
        let machine = self.machine_config(&spec);
        let vm = QemuVm {
            id: spec.id.clone(),
            run_dir: spec.run_dir.clone(),
            paths,
            start_time: nestbox_hostsys::process::start_time(child.pid()).unwrap_or(0),
            child,
            qmp,
            stopped: false,
            saving: None,
            cgroup: self.cgroup_of(&spec.id),
            held: None,
            info: self.info.clone(),
            spec,
            cmdline,
            images,
            digests: self.digests.clone(),
            memory,
            machine,
            _template_ram: None,
        };
        vm.write_record();
        Ok(vm)
    }

    /// Starts QEMU with `argv` and its guest RAM and connects QMP. On failure the process
    /// is killed and reaped and the QMP socket and pid file removed (the RAM file is the
    /// caller's).
    async fn launch(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        argv: Vec<String>,
        ram: GuestRam<'_>,
    ) -> Result<(Supervised, QmpClient), VmmError> {
        let GuestRam {
            backing: memory,
            sealed: template_ram,
        } = ram;
        let argv = if self.seccomp {
            argv
        } else {
            without_seccomp(argv)
        };
        let mut cmd = Cmd::new(&self.binary).args(argv).new_session();
        if self.jail {
            let ram = match memory {
                MemoryBacking::Owned(p) => Some(p.as_path()),
                MemoryBacking::Private(_) | MemoryBacking::Anonymous => None,
            };
            cmd = cmd.jail(jail::vmm_jail(
                spec,
                paths,
                &self.binary,
                self.info.accel,
                ram,
            )?);
        }
        if let NetworkSpec::Tap { netns, ifname, .. } = &spec.network {
            cmd = cmd.netns(netns).open_tap(ifname.as_str(), jail::TAP_FD);
        }
        if let Some(fd) = template_ram {
            let fd = fd.try_clone().map_err(|source| VmmError::Io {
                op: "pass the template ram",
                path: paths.memory_file.clone(),
                source,
            })?;
            cmd = cmd.pass_fd(fd, jail::RAM_FD);
        }
        // Its control group first: the VMM joins it before it runs anything.
        let group = match &self.cgroups {
            Some(c) => Some(
                c.hierarchy
                    .create(&c.parent.join(&spec.id), &vmm_limits(spec, self.info.accel))
                    .map_err(|e| VmmError::Confine {
                        id: spec.id.clone(),
                        reason: e.to_string(),
                    })?,
            ),
            None => None,
        };
        if let Some(g) = &group {
            cmd = cmd.join_cgroups(g.procs_files());
        }
        // Bound last: nothing before the spawn can fail with the socket left behind.
        let qmp = match jail::qmp_listener(&paths.qmp_socket) {
            Ok(fd) => fd,
            Err(e) => {
                if let Some(g) = &group {
                    let _ = g.remove();
                }
                return Err(e);
            }
        };
        cmd = cmd.pass_fd(qmp, jail::QMP_FD);
        tracing::debug!(id = %spec.id, argv = %cmd.argv(), "starting qemu");
        let spawned = cmd.spawn(Some(&paths.stderr_log));
        drop(cmd);
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                if let Some(g) = &group {
                    let _ = g.remove();
                }
                remove_run_files(paths, None);
                return Err(VmmError::Spawn {
                    id: spec.id.clone(),
                    source,
                });
            }
        };
        if let Err(error) = std::fs::write(&paths.pid_file, child.pid().to_string()) {
            // Only crash clean-up reads it, and that also finds VMMs by command line.
            tracing::warn!(%error, "cannot write the vmm's pid file");
        }
        let result = self.connect(spec, paths, &mut child).await;
        if result.is_err()
            && let Some(g) = &group
        {
            let _ = g.remove();
        }
        result.map(|qmp| (child, qmp))
    }

    /// Connects QMP to a VMM just started. On failure the process is killed and reaped and
    /// the QMP socket and pid file removed.
    async fn connect(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        child: &mut Supervised,
    ) -> Result<QmpClient, VmmError> {
        // Connect QMP, noticing an early exit (bad arguments, missing files) at once.
        let deadline = tokio::time::Instant::now() + QMP_WAIT;
        let stream = loop {
            if let Some(status) = child.try_status() {
                let err = exited_error(&spec.id, &status.to_string(), paths);
                remove_run_files(paths, None);
                return Err(err);
            }
            match tokio::net::UnixStream::connect(&paths.qmp_socket).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => {
                    let _ = child.kill().await;
                    remove_run_files(paths, None);
                    let source = crate::qmp::QmpError::Connect {
                        path: paths.qmp_socket.clone(),
                        waited: QMP_WAIT,
                        source: e,
                    };
                    return Err(VmmError::Qmp {
                        id: spec.id.clone(),
                        source,
                    });
                }
            }
        };
        match QmpClient::handshake(stream, QMP_WAIT).await {
            Ok(q) => Ok(q),
            Err(source) => {
                let _ = child.kill().await;
                remove_run_files(paths, None);
                Err(VmmError::Qmp {
                    id: spec.id.clone(),
                    source,
                })
            }
        }
    }
}

/// `argv` without its `-sandbox` option (only to measure what the filter costs).
fn without_seccomp(argv: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip = false;
    for a in argv {
        if skip {
            skip = false;
        } else if a == "-sandbox" {
            skip = true;
        } else {
            out.push(a);
        }
    }
    out
}

/// Creates the run and memory directories and removes a previous VM's files there.
fn prepare_run_dir(spec: &VmSpec) -> Result<RunPaths, VmmError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| VmmError::Io { op, path, source }
    };
    for dir in [&spec.run_dir, &spec.memory_dir] {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let paths = RunPaths::new(&spec.run_dir, &spec.memory_dir, &spec.id);
    if paths.qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmmError::InvalidSpec {
            field: "run_dir",
            reason: format!(
                "{} is too long for a unix socket path",
                paths.qmp_socket.display()
            ),
        });
    }
    for f in [
        &paths.qmp_socket,
        &paths.pid_file,
        &paths.record,
        &paths.console_log,
        &paths.stderr_log,
        &paths.memory_file,
    ] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove stale", f)(e)),
        }
    }
    Ok(paths)
}

/// Runs blocking file work off the async runtime; a panicked task becomes an I/O error
/// on `path`.
pub(crate) async fn blocking<T, F>(op: &'static str, path: &Path, f: F) -> Result<T, VmmError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, VmmError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VmmError::Io {
            op,
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?
}

fn exited_error(id: &str, status: &str, paths: &RunPaths) -> VmmError {
    VmmError::Exited {
        id: id.into(),
        status: status.into(),
        stderr: console::tail_lines(&paths.stderr_log, 10),
        console: console::tail_lines(&paths.console_log, 20),
    }
}

/// Removes a VM's run files (not the console log or QEMU's log) and the RAM file it
/// owns, if any.
fn remove_run_files(paths: &RunPaths, memory: Option<&Path>) {
    for f in [&paths.qmp_socket, &paths.pid_file, &paths.record]
        .into_iter()
        .map(PathBuf::as_path)
        .chain(memory)
    {
        let _ = std::fs::remove_file(f);
    }
}

impl Vmm for QemuVmm {
    fn info(&self) -> &VmmInfo {
        &self.info
    }

    fn boot(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>> {
        let span = tracing::info_span!("boot", id = %spec.id);
        Box::pin(
            async move {
                self.boot_vm(spec)
                    .await
                    .map(|vm| Box::new(vm) as Box<dyn Vm>)
            }
            .instrument(span),
        )
    }

    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
        memory: RestoreMemory,
    ) -> BoxFuture<'a, Result<Restored, VmmError>> {
        Box::pin(self.restore_vm(spec, snapshot, memory))
    }

    fn adopt<'a>(&'a self, run_dir: &'a Path) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>> {
        Box::pin(async move {
            self.adopt_vm(run_dir)
                .await
                .map(|vm| Box::new(vm) as Box<dyn Vm>)
        })
    }

    fn check_snapshot<'a>(
        &'a self,
        spec: &'a VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<SnapshotManifest, VmmError>> {
        Box::pin(async move {
            spec.validate()?;
            let dir = snapshot::absolute(snapshot)?;
            self.check_snapshot_dir(spec, &dir).await
        })
    }
}

/// A VMM's guest RAM: its backing and, for a jailed clone, the sealed copy of its
/// template's RAM that is handed in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuestRam<'a> {
    pub(crate) backing: &'a MemoryBacking,
    pub(crate) sealed: Option<&'a Arc<std::os::fd::OwnedFd>>,
}

/// A held VM's snapshot: where it is and how its RAM file got there.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Held {
    pub(crate) dir: PathBuf,
    /// The VM's RAM file and how it was placed into the snapshot (`None`: in the state).
    pub(crate) ram: Option<(PathBuf, crate::snapshot::files::Placement)>,
}

/// A running QEMU.
#[derive(Debug)]
pub struct QemuVm {
    id: String,
    run_dir: PathBuf,
    paths: RunPaths,
    child: Supervised,
    /// When its process started ([`nestbox_hostsys::process::start_time`]): with the pid,
    /// what names this process in its record.
    start_time: u64,
    qmp: QmpClient,
    /// Set once the process is reaped and the run files are gone (stop, suspend).
    stopped: bool,
    /// The snapshot directory of a save in progress (recorded: a later process that takes
    /// the VM over undoes it).
    saving: Option<PathBuf>,
    /// Its control group, removed once the process has exited.
    cgroup: Option<nestbox_hostsys::cgroup::Group>,
    /// Suspended but kept: the snapshot it was saved into.
    held: Option<Held>,
    info: VmmInfo,
    /// The spec it runs (snapshots record its machine and disk).
    spec: VmSpec,
    /// The kernel command line the guest booted with.
    cmdline: String,
    images: GuestImages,
    /// The driver's digest cache (snapshots hash `images` through it).
    digests: Arc<DigestCache>,
    memory: MemoryBacking,
    machine: MachineConfig,
    /// A jailed clone's sealed template RAM: held while it runs, so later clones of the
    /// same template share its pages.
    _template_ram: Option<Arc<std::os::fd::OwnedFd>>,
}

impl QemuVm {
    /// The QMP session (for callers that need more than the [`Vm`] trait).
    pub fn qmp(&self) -> &QmpClient {
        &self.qmp
    }

    /// The VM's files.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// Where its RAM lives.
    pub fn memory(&self) -> &MemoryBacking {
        &self.memory
    }

    /// Removes the VM's control group (its process has exited).
    pub(crate) fn remove_cgroup(&mut self) {
        if let Some(g) = self.cgroup.take()
            && let Err(error) = g.remove()
        {
            tracing::warn!(id = %self.id, %error, "removing the vm's cgroup");
        }
    }

    /// The RAM file this VM owns and removes when it stops (not a held VM's moved file:
    /// the snapshot owns it).
    fn owned_memory(&self) -> Option<&Path> {
        match (&self.memory, &self.held) {
            (
                _,
                Some(Held {
                    ram: Some((_, crate::snapshot::files::Placement::Moved)),
                    ..
                }),
            ) => None,
            (MemoryBacking::Owned(p), _) => Some(p),
            _ => None,
        }
    }

    async fn stop_vm(&mut self, grace: Duration) -> Result<StopReport, VmmError> {
        if self.stopped {
            // Suspended or stopped before: the files in the run and memory directories
            // may belong to a VM restored there since.
            let status = self.child.wait().await.map_err(|source| VmmError::Spawn {
                id: self.id.clone(),
                source,
            })?;
            return Ok(StopReport {
                exit_code: status.code(),
                forced: false,
            });
        }
        let mut forced = false;
        let status = match self.child.try_status() {
            Some(s) => s,
            None => {
                // Graceful: QEMU flushes its block layer and exits.
                let _ = self.qmp.quit().await;
                match tokio::time::timeout(grace, self.child.wait()).await {
                    Ok(res) => res.map_err(|source| VmmError::Spawn {
                        id: self.id.clone(),
                        source,
                    })?,
                    Err(_) => {
                        forced = true;
                        tracing::warn!(id = %self.id, "qemu ignored quit; killing it");
                        self.child
                            .terminate(Duration::from_secs(2))
                            .await
                            .map_err(|source| VmmError::Spawn {
                                id: self.id.clone(),
                                source,
                            })?
                    }
                }
            }
        };
        self.stopped = true;
        remove_run_files(&self.paths, self.owned_memory());
        self.remove_cgroup();
        tracing::info!(id = %self.id, %status, forced, "vm stopped");
        Ok(StopReport {
            exit_code: status.code(),
            forced,
        })
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if !self.stopped {
            // The Supervised child is killed (SIGKILL) as it drops; the RAM file must not
            // outlive it on tmpfs.
            remove_run_files(&self.paths, self.owned_memory());
        }
    }
}

impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn console_log(&self) -> &Path {
        &self.paths.console_log
    }

    fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn exited(&mut self) -> Option<String> {
        self.child.try_status().map(|s| s.to_string())
    }

    fn run_state(&self) -> BoxFuture<'_, Result<String, VmmError>> {
        Box::pin(async move {
            self.qmp
                .query_status()
                .await
                .map_err(|source| VmmError::Qmp {
                    id: self.id.clone(),
                    source,
                })
        })
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Result<StopReport, VmmError>> {
        Box::pin(self.stop_vm(grace))
    }

    fn save<'a>(
        &'a mut self,
        dir: &'a Path,
        mode: SaveMode,
        freeze: Option<&'a mut dyn FreezeHook>,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>> {
        Box::pin(self.save_vm(dir, mode, freeze))
    }

    fn suspend_held<'a>(
        &'a mut self,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>> {
        Box::pin(self.suspend_held_vm(dir))
    }

    fn resume_held(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(self.resume_held_vm())
    }

    fn retry_io(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            self.qmp.cont().await.map_err(|source| VmmError::Qmp {
                id: self.id.clone(),
                source,
            })
        })
    }

    fn is_held(&self) -> bool {
        self.held.is_some()
    }

    fn relocate(&mut self, run_dir: &Path, memory_dir: &Path) {
        let moved = |p: &Path, from: &Path, to: &Path| match p.strip_prefix(from) {
            Ok(rest) => to.join(rest),
            Err(_) => p.to_path_buf(),
        };
        let (old_run, old_memory) = (self.run_dir.clone(), self.spec.memory_dir.clone());
        self.paths = RunPaths::new(run_dir, memory_dir, &self.id);
        self.run_dir = run_dir.to_path_buf();
        self.spec.root_disk.path = moved(&self.spec.root_disk.path, &old_run, run_dir);
        self.spec.run_dir = run_dir.to_path_buf();
        self.spec.memory_dir = memory_dir.to_path_buf();
        if let MemoryBacking::Owned(p) = &mut self.memory {
            *p = moved(p, &old_memory, memory_dir);
        }
        if let Some(held) = &mut self.held {
            held.dir = moved(&held.dir, &old_memory, memory_dir);
            if let Some((src, _)) = &mut held.ram {
                *src = moved(src, &old_memory, memory_dir);
            }
        }
        self.write_record();
    }
}

/// Kills a QEMU left behind by a crashed agent (found through the pid file in
/// `run_dir`) and removes its run files. Returns the pid it killed. Only a process whose
/// command line is a QEMU mentioning `run_dir` is touched.
pub async fn reap_stale(
    run_dir: &Path,
    memory_dir: &Path,
    id: &str,
) -> Result<Option<u32>, VmmError> {
    let paths = RunPaths::new(run_dir, memory_dir, id);
    let pid = std::fs::read_to_string(&paths.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let mut killed = None;
    if let Some(pid) = pid.filter(|p| *p > 1) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu") && cmdline.contains(&*run_dir.to_string_lossy()) {
            // SAFETY: kill(2) on a pid whose command line we just checked.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists()
                && tokio::time::Instant::now() < deadline
            {
                // A zombie still has /proc/<pid>; it is gone for our purposes once dead.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                if stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            killed = Some(pid as u32);
        }
    }
    remove_run_files(&paths, Some(&paths.memory_file));
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_is_parsed() {
        assert_eq!(
            parse_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[tokio::test]
    async fn stale_cleanup_ignores_foreign_pids_and_removes_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths::new(dir.path(), dir.path(), "x");
        // Our own pid: not a qemu, must survive.
        std::fs::write(&paths.pid_file, std::process::id().to_string()).unwrap();
        std::fs::write(&paths.memory_file, b"ram").unwrap();
        assert_eq!(reap_stale(dir.path(), dir.path(), "x").await.unwrap(), None);
        assert!(!paths.pid_file.exists() && !paths.memory_file.exists());
    }

    #[tokio::test]
    async fn restore_refuses_a_directory_without_a_snapshot_before_starting_qemu() {
        let Ok(vmm) = QemuVmm::new(QemuOptions {
            accel: AccelChoice::Tcg,
            ..Default::default()
        })
        .await
        else {
            eprintln!("skipped: qemu-system-x86_64 not installed");
            return;
        };
        assert_eq!(vmm.info().name, "qemu");
        assert_eq!(vmm.info().accel, Accel::Tcg);
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let disk = dir.path().join("root.raw");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&disk, b"disk").unwrap();
        let spec = VmSpec {
            id: "x".into(),
            vcpus: 1,
            memory_mb: 128,
            kernel,
            initrd: None,
            cmdline_extra: vec![],
            root_disk: crate::Disk {
                path: disk,
                format: crate::DiskFormat::Raw,
                backing: None,
            },
            network: NetworkSpec::None,
            guest: Default::default(),
            run_dir: dir.path().join("run"),
            memory_dir: dir.path().join("mem"),
            uid: None,
        };
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let err = vmm
            .restore(spec, &snap, RestoreMemory::Clone)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, VmmError::CorruptSnapshot { path, .. } if path.ends_with("snapshot.json")),
            "{err}"
        );
        assert!(!dir.path().join("run").join(PID_FILE).exists());
    }
}
