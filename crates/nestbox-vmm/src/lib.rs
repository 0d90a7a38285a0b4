//! The VM runtime: one trait for microVM monitors ([`Vmm`]), a handle per running VM
//! ([`Vm`]), the QEMU driver ([`qemu::QemuVmm`]) and VM snapshots ([`snapshot`]).
//!
//! ```text
//!                        ┌──────── save(dir, Checkpoint) ─────────┐ (guest keeps running;
//!                        ▼                                        │  dir holds a template)
//! Vmm::boot(spec) ──▶ running ────────────────────────────────────┘
//!                        │ │
//!                        │ ├─ save(dir, Suspend) ──▶ finished (VMM gone, RAM moved into dir)
//!                        │ └─ suspend_held(dir) ──▶ held (stopped; RAM moved into dir)
//!                        │        resume_held() ──▶ running (dir consumed)
//!                        │        stop(grace) ────▶ finished (dir stays whole)
//!                        └─── stop(grace) ─────────▶ finished (process reaped, files removed)
//!
//! Vmm::restore(spec, dir, Resume) ──▶ running   (takes the RAM file over; dir is consumed)
//! Vmm::restore(spec, dir, Clone)  ──▶ running   (maps dir's RAM copy-on-write; dir unchanged)
//! Vmm::restore(spec, dir, Copy)   ──▶ running   (its own copy of dir's RAM; dir unchanged)
//! ```
//!
//! Invariants: a [`Vm`] owns its VMM process. Dropping the handle kills it; `stop` kills
//! it gracefully and always reaps it. Its run files (QMP socket, pid file, its own guest
//! RAM file) are removed when it stops; the console log stays for post-mortems until the
//! owner removes the run directory. A snapshot's files are never removed by a VM that
//! maps them (`Clone`).
//!
//! # Snapshots (RUNTIME-FACTS §4)
//!
//! Guest RAM is a file (`memory-backend-file,share=on`) in the VM's `memory_dir`, normally
//! on tmpfs. QEMU's `x-ignore-shared` leaves shared RAM out of the migration stream, so
//! saving a VM writes only its device state (~100 KiB) and the RAM file *is* the memory
//! snapshot: [`SaveMode::Suspend`] renames it into the snapshot (no copy),
//! [`SaveMode::Checkpoint`] copies it sparsely while the guest is stopped. A
//! [`FreezeHook`] lets the caller freeze the disk at the same instant. Every snapshot
//! carries a versioned manifest ([`snapshot::SnapshotManifest`]); [`Vmm::restore`]
//! refuses an incompatible or damaged snapshot before it starts a VMM, and never leaves a
//! half-restored VM behind: if loading fails, the VMM is killed and the error returned.
//!
//! Restoring starts the VMM with the same machine (type, CPU, vCPUs, memory, devices in
//! the same order with the same ids) plus `-incoming defer`, loads the state with
//! `x-ignore-shared`, and sends `cont` (the migrated run state is `paused`). Backends may
//! differ: network (TAP in another namespace, slirp on another port, but not TAP → slirp),
//! disk path and format, run directory, sockets. The guest keeps what it booted with
//! (kernel command line, addresses, host name, access-token hash, MAC); the host agent
//! re-initialises a clone through the guest agent's `/init`.
//!
//! **Clock**: the guest's clocks stop while it is saved (under TCG the TSC is part of the
//! frozen VM clock), so after a restore its wall clock is behind by the time spent saved.
//! Nothing here touches it; the host agent calls the guest agent's `/init` with
//! `timestamp` right after a restore, which sets `CLOCK_REALTIME` (monotonic clocks stay
//! continuous, so timers in the guest are unaffected).
//!
//! **Clones and their snapshots** (measured, 512 MiB guest, TCG, this machine): a
//! [`RestoreMemory::Clone`] maps its template `share=off`, so its RAM is private, not
//! shared: `x-ignore-shared` does not skip it, and saving a clone streams all its RAM
//! into the state file ([`snapshot::SavedMemory::InState`]: about 70 MiB and 0.6–1 s,
//! since QEMU reads every page); resuming that loads it into anonymous memory (about
//! 0.6 s to an answering agent), and that VM's next save streams again. A VM that will
//! likely be paused can start with [`RestoreMemory::Copy`] instead (its own sparse copy
//! of the template's RAM: about +60 ms to start, no page sharing, fast suspends).
//! Note that tmpfs fills a file's holes when a `MAP_PRIVATE` mapping faults on them, so a
//! template's RAM file on /dev/shm grows towards the full guest size as clones (and
//! clone saves) touch memory: budget the guest size per template there, or keep
//! templates on a disk filesystem (XFS), whose clean page cache is reclaimable.
//!
//! The host agent owns one `Box<dyn Vm>` per sandbox inside that sandbox's task; tests and
//! benchmarks use [`boot_and_wait_ready`].

pub mod console;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
pub mod spec;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

pub use snapshot::{
    BoxError, FreezeHook, RestoreMemory, RestoreTimings, Restored, SaveMode, SaveTimings,
    SavedMemory, SavedSnapshot, SnapshotManifest,
};
pub use spec::{Disk, DiskFormat, GUEST_AGENT_PORT, GuestConfig, NetworkSpec, VmSpec};

/// A boxed, sendable future (the traits are object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Printed by the guest once its agent accepts connections.
pub const READY_MARKER: &str = "NESTBOX-READY";
/// Printed by the guest in KVM probe mode (`nbx.probe=1`).
pub const PROBE_MARKER: &str = "NESTBOX-PROBE-OK";

/// How the VMM executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's binary translator.
    Tcg,
}

impl Accel {
    /// QEMU's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if a probe guest really boots under it, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG.
    Tcg,
}

/// What a driver is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmInfo {
    /// Driver name (`qemu`).
    pub name: &'static str,
    /// VMM version (`7.2.22`).
    pub version: String,
    /// The accelerator VMs run under.
    pub accel: Accel,
    /// The CPU model VMs get (`host` under KVM); snapshots restore only on the same.
    pub cpu: &'static str,
}

impl std::fmt::Display for VmmInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({})",
            self.name,
            self.version,
            self.accel.as_str()
        )
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The VMM's exit code, if it exited normally.
    pub exit_code: Option<i32>,
    /// True if it had to be killed.
    pub forced: bool,
}

/// A guest that reached the ready marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyInfo {
    /// From the boot call to the marker on the console.
    pub elapsed: Duration,
    /// The guest's uptime in the marker (`t=`), in ms.
    pub guest_uptime_ms: Option<u64>,
}

/// A VM runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The spec is invalid.
    #[error("invalid vm spec: {field}: {reason}")]
    InvalidSpec {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The VMM could not be started (or a tool it needs failed).
    #[error("vm {id}: cannot start the vmm")]
    Spawn {
        /// VM id.
        id: String,
        /// Why.
        #[source]
        source: nestbox_hostsys::process::ProcessError,
    },
    /// The VMM process exited while we needed it.
    #[error("vm {id}: the vmm exited ({status}); stderr: {stderr}; console: {console}")]
    Exited {
        /// VM id.
        id: String,
        /// Exit status.
        status: String,
        /// Tail of the VMM's stderr.
        stderr: String,
        /// Tail of the guest console.
        console: String,
    },
    /// QMP failed.
    #[error("vm {id}: qmp")]
    Qmp {
        /// VM id.
        id: String,
        /// Why.
        #[source]
        source: qmp::QmpError,
    },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What we tried.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not print the ready marker in time.
    #[error("vm {id}: no {marker} within {waited:?}; console tail:\n{console}")]
    NotReady {
        /// VM id.
        id: String,
        /// The marker.
        marker: &'static str,
        /// How long we waited.
        waited: Duration,
        /// Tail of the guest console.
        console: String,
    },
    /// The driver cannot do this (yet).
    #[error("{vmm} does not support {operation} yet")]
    NotSupported {
        /// Driver name.
        vmm: &'static str,
        /// The operation.
        operation: &'static str,
    },
    /// The snapshot cannot be restored here (format version, VMM, kernel, machine).
    #[error("snapshot {}: incompatible: {reason}", dir.display())]
    IncompatibleSnapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// What differs.
        reason: String,
    },
    /// A snapshot file is missing, truncated, or differs from the manifest.
    #[error("snapshot file {}: {reason}", path.display())]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A directory cannot take a snapshot (it already holds one, or its path is unusable).
    #[error("snapshot directory {}: {reason}", dir.display())]
    SnapshotDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Saving or loading the VM state (a QEMU migration) failed.
    #[error("vm {id}: {phase} failed: {detail}")]
    Migration {
        /// VM id.
        id: String,
        /// `save` or `load`.
        phase: &'static str,
        /// QEMU's description, or the tail of its log.
        detail: String,
    },
    /// The caller's freeze hook failed; the save was undone and the guest resumed.
    #[error("vm {id}: the freeze hook failed; the guest was resumed")]
    Freeze {
        /// VM id.
        id: String,
        /// The hook's error.
        #[source]
        source: BoxError,
    },
    /// A held VM was asked to suspend again, or one not held to resume in place.
    #[error("vm {id}: {}", if *held { "already held after a suspend" } else { "not held" })]
    Held {
        /// VM id.
        id: String,
        /// Whether it was held.
        held: bool,
    },
    /// A VM found after a restart cannot be taken over (its process is gone or another
    /// one, its record or monitor is unusable).
    #[error("vm in {}: cannot be adopted: {reason}", run_dir.display())]
    NotAdoptable {
        /// Its run directory.
        run_dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The VMM's confinement (its control group) could not be set up.
    #[error("vm {id}: cannot confine the vmm: {reason}")]
    Confine {
        /// VM id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The VMM binary is unusable.
    #[error("vmm binary {binary}: {detail}")]
    Binary {
        /// The binary.
        binary: String,
        /// What is wrong.
        detail: String,
    },
}

/// A running VM. Owned by one task; dropping it kills the VMM.
pub trait Vm: Send + Sync {
    /// The spec's id.
    fn id(&self) -> &str;
    /// The VMM process id.
    fn pid(&self) -> u32;
    /// The serial console log.
    fn console_log(&self) -> &Path;
    /// The run directory.
    fn run_dir(&self) -> &Path;
    /// The exit status string if the VMM has exited (without waiting).
    fn exited(&mut self) -> Option<String>;
    /// The guest run state as the VMM reports it (`running`, `paused`, …).
    fn run_state(&self) -> BoxFuture<'_, Result<String, VmmError>>;
    /// Stops the VM: graceful quit, then SIGTERM, then SIGKILL after `grace`; always
    /// reaps the process and removes the run files (not the console log).
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, Result<StopReport, VmmError>>;
    /// Saves the VM into `dir` (created if missing; it must not hold a snapshot yet).
    /// See [`SaveMode`]: `Suspend` ends the VM, `Checkpoint` leaves it running.
    /// `freeze` runs while the guest is stopped (see [`FreezeHook`]).
    ///
    /// On failure nothing is left in `dir` and the guest runs again, except when the VMM
    /// itself failed (then it is gone, as after [`Vm::stop`]).
    fn save<'a>(
        &'a mut self,
        dir: &'a Path,
        mode: SaveMode,
        freeze: Option<&'a mut dyn FreezeHook>,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>>;
    /// Saves the VM into `dir` like `save(dir, Suspend)`, but the VMM stays: stopped,
    /// mapping the RAM file that is the snapshot's now. The snapshot is whole, as after a
    /// suspend. Then either [`Vm::resume_held`] runs the guest again in this process (no
    /// restore: under TCG its translated code stays warm), or [`Vm::stop`] ends the VMM
    /// and leaves the snapshot for a [`Vmm::restore`].
    fn suspend_held<'a>(
        &'a mut self,
        dir: &'a Path,
    ) -> BoxFuture<'a, Result<SavedSnapshot, VmmError>>;
    /// Tells the VM that the caller renamed its run and memory directories (with every
    /// file in them): the VMM keeps its open files and mappings, and later operations
    /// (saves, stop) use the new paths. Its id stays the one it was started under.
    fn relocate(&mut self, run_dir: &Path, memory_dir: &Path);
    /// Whether the VM is held (stopped after [`Vm::suspend_held`], its snapshot whole).
    fn is_held(&self) -> bool;
    /// Runs a held VM again. The snapshot is consumed (its manifest first, so it never
    /// looks restorable half-consumed; the RAM file goes back to the VM). If the VMM had
    /// exited, nothing is touched and the error says so.
    fn resume_held(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Runs again a VM that its VMM stopped because the host could not write its disk
    /// (run state `io-error`: the host filesystem is full). The VMM retries the failed
    /// writes, and stops the guest again if they still fail; nothing is lost meanwhile.
    fn retry_io(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
}

/// The run state of a VM its VMM stopped after a failed disk write (see [`Vm::retry_io`]).
pub const RUN_STATE_IO_ERROR: &str = "io-error";

/// A microVM monitor driver.
pub trait Vmm: Send + Sync {
    /// Name, version and accelerator.
    fn info(&self) -> &VmmInfo;
    /// Boots a VM from a spec. Returns once the VMM is up and controllable (the guest
    /// is still booting).
    fn boot(&self, spec: VmSpec) -> BoxFuture<'_, Result<Box<dyn Vm>, VmmError>>;
    /// Starts a VM from a snapshot directory written by [`Vm::save`], with `spec`'s paths
    /// and backends (run dir, memory dir, disk, network) and the snapshot's machine, which
    /// must match the spec's (see [`snapshot::check_compatible`]). Returns once the guest
    /// runs (its agent answers moments later). Refuses an incompatible or damaged snapshot
    /// before starting a VMM; kills the VMM and restores the snapshot if loading fails.
    fn restore<'a>(
        &'a self,
        spec: VmSpec,
        snapshot: &'a Path,
        memory: RestoreMemory,
    ) -> BoxFuture<'a, Result<Restored, VmmError>>;
    /// Takes over a VM that an earlier process started and left running (after a crash or
    /// an upgrade restart), from the record in its run directory: the same process (pid
    /// and start time), its monitor reconnected. A save that process left half done is
    /// undone (the guest runs again); a held VM stays held. The VM is then owned as if
    /// this driver had started it.
    fn adopt<'a>(&'a self, run_dir: &'a Path) -> BoxFuture<'a, Result<Box<dyn Vm>, VmmError>>;
    /// Runs restore's checks (manifest, compatibility with `spec`, files) without starting
    /// anything; returns the manifest.
    fn check_snapshot<'a>(
        &'a self,
        spec: &'a VmSpec,
        snapshot: &'a Path,
    ) -> BoxFuture<'a, Result<SnapshotManifest, VmmError>>;
}

/// Boots a VM and waits (polling its console, bounded by `limit`) for
/// `NESTBOX-READY t=<ms>`. On time-out or early exit the VM is stopped and the error
/// carries the console tail.
pub async fn boot_and_wait_ready(
    vmm: &dyn Vmm,
    spec: VmSpec,
    limit: Duration,
) -> Result<(Box<dyn Vm>, ReadyInfo), VmmError> {
    let started = Instant::now();
    let id = spec.id.clone();
    let mut vm = vmm.boot(spec).await?;
    let mut watcher = console::ConsoleWatcher::new(vm.console_log());
    let found = {
        let vm_ref = &mut vm;
        watcher
            .wait_for(READY_MARKER, limit, || vm_ref.exited().is_none())
            .await
    };
    match found {
        Ok(Some(line)) => {
            let guest_uptime_ms = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("t="))
                .and_then(|t| t.parse().ok());
            Ok((
                vm,
                ReadyInfo {
                    elapsed: started.elapsed(),
                    guest_uptime_ms,
                },
            ))
        }
        Ok(None) => {
            let status = vm.exited().unwrap_or_default();
            let console = console::tail_lines(vm.console_log(), 30);
            let stderr = console::tail_lines(&vm.run_dir().join(qemu::STDERR_LOG), 10);
            let _ = vm.stop(Duration::from_secs(1)).await;
            Err(VmmError::Exited {
                id,
                status,
                stderr,
                console,
            })
        }
        Err(()) => {
            let console = console::tail_lines(vm.console_log(), 30);
            let _ = vm.stop(Duration::from_secs(1)).await;
            Err(VmmError::NotReady {
                id,
                marker: READY_MARKER,
                waited: limit,
                console,
            })
        }
    }
}
