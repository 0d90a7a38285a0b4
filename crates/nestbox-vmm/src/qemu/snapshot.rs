//! Saving and restoring QEMU VMs (RUNTIME-FACTS §4, measured on QEMU 7.2 under TCG).
//!
//! ```text
//! save(dir, mode):
//!   migrate-set-parameters (no bandwidth cap) + x-ignore-shared      guest running
//!   stop ───────────────────────────────────────────────────────────┐ guest stopped
//!   getfd (dir/state.bin, opened here), migrate "fd:", poll          │ (QEMU has flushed
//!   ├─ RAM: Suspend → rename into dir │ Checkpoint → sparse copy     │  and released the
//!   └─ freeze hook (the caller's disk freeze), concurrently          │  disk image)
//!   Checkpoint: cont ───────────────────────────────────────────────┘ guest running
//!               then digests + snapshot.json (the copy is frozen)
//!   Suspend:    digests + snapshot.json, then quit, reap              VMM gone
//!   any failure before cont/quit: undo (RAM back, files removed), cont
//!
//! restore(spec, dir, memory):
//!   checks (manifest, compatibility, files) — nothing started yet
//!   Resume: rename dir/memory.ram → <memory_dir>/<id>.ram (share=on)
//!   Clone:  map dir/memory.ram share=off (MAP_PRIVATE)
//!   Copy:   sparse copy dir/memory.ram → <memory_dir>/<id>.ram (share=on)
//!   in-state RAM: anonymous memory
//!   spawn QEMU (same machine, -incoming defer) ─ x-ignore-shared ─
//!   getfd (dir/state.bin) ─ migrate-incoming "fd:" ─ poll until completed ─ cont
//!   any failure: kill QEMU, put the RAM file back, return the error
//! ```
//!
//! Why these steps:
//! - QEMU 7.2 has no `file:` migration URI (8.2+). The host agent opens the state file
//!   and hands its descriptor in over QMP (`getfd`, `SCM_RIGHTS`), and the stream goes to
//!   `fd:NAME`: QEMU never starts a process (its seccomp filter forbids it) and never
//!   opens the path itself.
//! - `x-ignore-shared` must be set on both sides; on the destination that needs
//!   `-incoming defer`.
//! - The default `max-bandwidth` (128 MiB/s) would throttle a stream that carries RAM.
//! - The run state travels with the stream: a VM saved while stopped arrives `paused`,
//!   so a restore sends `cont` and does not wait for `running` (QEMU reports `completed`
//!   only after it has set the run state).
//! - With `-incoming`, QEMU does not load the kernel or ROMs into guest RAM, so a
//!   `share=on` RAM file is not written before the state is loaded.
//! - A guest that saved while stopped does not receive network packets or run devices,
//!   so its RAM file does not change between `stop` and `cont`/quit.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nestbox_hostsys::process::Supervised;
use serde_json::json;
use tracing::Instrument;

use super::{
    GuestImages, Held, MemoryBacking, QemuVm, QemuVmm, RunPaths, blocking, machine_argv,
    prepare_run_dir, remove_run_files,
};
use crate::qmp::{MigrationStatus, QmpClient, QmpError};
use crate::snapshot::{
    self as snap, DiskRecord, Expected, GuestRecord, MANIFEST_FILE, MEMORY_FILE, MemoryFile,
    Placement, STATE_FILE, StateFile, VmmRecord, files,
};
use crate::{
    FreezeHook, RestoreMemory, RestoreTimings, Restored, SaveMode, SaveTimings, SavedMemory,
    SavedSnapshot, SnapshotManifest, VmSpec, VmmError, console,
};

/// Migration bandwidth while saving: effectively unlimited.
const MAX_BANDWIDTH: u64 = 100 << 30;
/// How long saving or loading a state may take (a stream carrying RAM included).
const MIGRATION_LIMIT: Duration = Duration::from_secs(300);
/// How long QEMU may take to exit after `quit` at the end of a suspend.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// `query-migrate` polling interval.
const POLL: Duration = Duration::from_millis(1);

/// `path` made absolute (QEMU's `exec:` commands and later restores must not depend on
/// the current directory).
pub(crate) fn absolute(path: &Path) -> Result<PathBuf, VmmError> {
    std::path::absolute(path).map_err(|e| VmmError::SnapshotDir {
        dir: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The name the state file's descriptor is handed to QEMU under.
const STATE_FD: &str = "nbx-state";

/// Opens the state file for QEMU: a new file to save into, or an existing one to load.
fn open_state(path: &Path, create: bool) -> Result<std::fs::File, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    if create {
        opts.write(true).create_new(true).mode(0o600);
    } else {
        opts.read(true);
    }
    opts.open(path).map_err(|source| VmmError::Io {
        op: if create { "create" } else { "open" },
        path: path.to_path_buf(),
        source,
    })
}

fn qmp_err(id: &str) -> impl Fn(QmpError) -> VmmError + '_ {
    move |source| VmmError::Qmp {
        id: id.to_string(),
        source,
    }
}

/// Polls `query-migrate` until the migration completes. A failure, a time-out or the
/// VMM exiting (QEMU 7.2 exits when an incoming migration fails) is an error naming
/// QEMU's reason.
async fn wait_migration(
    qmp: &QmpClient,
    child: &mut Supervised,
    id: &str,
    paths: &RunPaths,
    phase: &'static str,
) -> Result<MigrationStatus, VmmError> {
    let fail = |detail: String| VmmError::Migration {
        id: id.to_string(),
        phase,
        detail,
    };
    let deadline = tokio::time::Instant::now() + MIGRATION_LIMIT;
    loop {
        match qmp.query_migrate().await {
            Ok(s) if s.status == "completed" => return Ok(s),
            Ok(s) if s.is_finished() => {
                let stderr = console::tail_lines(&paths.stderr_log, 5);
                return Err(fail(format!(
                    "{}: {}; qemu log: {stderr}",
                    s.status,
                    s.error.unwrap_or_default()
                )));
            }
            Ok(_) => {}
            Err(QmpError::Closed) => {
                let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                {
                    Ok(Ok(s)) => s.to_string(),
                    _ => "still running".into(),
                };
                let stderr = console::tail_lines(&paths.stderr_log, 5);
                return Err(fail(format!("the vmm exited ({status}): {stderr}")));
            }
            Err(source) => return Err(qmp_err(id)(source)),
        }
        if let Some(status) = child.try_status() {
            let stderr = console::tail_lines(&paths.stderr_log, 5);
            return Err(fail(format!("the vmm exited ({status}): {stderr}")));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(format!("not finished within {MIGRATION_LIMIT:?}")));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What the manifest needs from the VM, owned for the blocking task.
struct ManifestInput {
    dir: PathBuf,
    kind: SaveMode,
    source_vm: String,
    vmm: VmmRecord,
    images: GuestImages,
    digests: std::sync::Arc<snap::DigestCache>,
    cmdline: String,
    machine: snap::MachineConfig,
    disk: crate::Disk,
    memory: Option<PathBuf>,
}

/// Digests the snapshot's files and writes `snapshot.json` (last). Blocking.
fn write_snapshot_manifest(input: ManifestInput) -> Result<SnapshotManifest, VmmError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.to_path_buf();
        move |source| VmmError::Io { op, path, source }
    };
    let (kernel, initrd) = input.images.digests(&input.digests)?;
    let state_path = input.dir.join(STATE_FILE);
    files::sync_path(&state_path).map_err(io("sync", &state_path))?;
    let state = StateFile {
        file: STATE_FILE.into(),
        size: std::fs::metadata(&state_path)
            .map_err(io("stat", &state_path))?
            .len(),
        sha256: files::sha256_file(&state_path).map_err(io("hash", &state_path))?,
    };
    let memory = match &input.memory {
        None => None,
        Some(path) => {
            let size = std::fs::metadata(path).map_err(io("stat", path))?.len();
            if size != input.machine.memory_bytes() {
                return Err(VmmError::CorruptSnapshot {
                    path: path.clone(),
                    reason: format!(
                        "{size} bytes for {} MiB of guest memory",
                        input.machine.memory_mb
                    ),
                });
            }
            files::sync_path(path).map_err(io("sync", path))?;
            Some(MemoryFile {
                file: MEMORY_FILE.into(),
                size,
                allocated: files::allocated_bytes(path).map_err(io("stat", path))?,
                sample: files::sampled_digest(path, size, files::new_seed())
                    .map_err(io("hash", path))?,
            })
        }
    };
    let root_disk = DiskRecord {
        format: input.disk.format.as_str().into(),
        virtual_size: snap::disk_virtual_size(&input.disk.path, input.disk.format)
            .map_err(io("read", &input.disk.path))?,
    };
    let manifest = SnapshotManifest {
        format_version: snap::FORMAT_VERSION,
        kind: input.kind,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        source_vm: input.source_vm,
        vmm: input.vmm,
        guest: GuestRecord {
            kernel,
            initrd,
            cmdline: input.cmdline,
        },
        machine: input.machine,
        root_disk,
        state,
        memory,
    };
    snap::write_manifest(&input.dir, &manifest)?;
    Ok(manifest)
}

/// Removes what a failed save wrote (never the caller's files).
pub(super) fn remove_snapshot_files(dir: &Path) {
    for name in [
        STATE_FILE.to_string(),
        MEMORY_FILE.to_string(),
        MANIFEST_FILE.to_string(),
        format!("{MANIFEST_FILE}.tmp"),
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

impl QemuVm {
    pub(super) async fn save_vm(
        &mut self,
        dir: &Path,
        mode: SaveMode,
        freeze: Option<&mut dyn FreezeHook>,
    ) -> Result<SavedSnapshot, VmmError> {
        let span = tracing::info_span!("save", id = %self.id, ?mode, dir = %dir.display());
        self.recorded_save(dir, mode, freeze, false)
            .instrument(span)
            .await
    }

    /// [`Self::save_inner`], with the save recorded while it runs: a process that takes
    /// the VM over after a crash in the middle undoes it ([`super::record`]).
    async fn recorded_save(
        &mut self,
        dir: &Path,
        mode: SaveMode,
        freeze: Option<&mut dyn FreezeHook>,
        hold: bool,
    ) -> Result<SavedSnapshot, VmmError> {
        if !self.stopped && self.held.is_none() {
            self.saving = Some(absolute(dir)?);
            self.write_record();
        }
        let result = self.save_inner(dir, mode, freeze, hold).await;
        self.saving = None;
        if !self.stopped {
            self.write_record();
        }
        result
    }

    /// A [`SaveMode::Suspend`] that keeps the VMM, stopped (see [`crate::Vm::suspend_held`]).
    pub(super) async fn suspend_held_vm(&mut self, dir: &Path) -> Result<SavedSnapshot, VmmError> {
        if self.held.is_some() {
            return Err(VmmError::Held {
                id: self.id.clone(),
                held: true,
            });
        }
        let span = tracing::info_span!("suspend_held", id = %self.id, dir = %dir.display());
        self.recorded_save(dir, SaveMode::Suspend, None, true)
            .instrument(span)
            .await
    }

    /// Runs a held VM again (see [`crate::Vm::resume_held`]).
    pub(super) async fn resume_held_vm(&mut self) -> Result<(), VmmError> {
        let Some(held) = self.held.take() else {
            return Err(VmmError::Held {
                id: self.id.clone(),
                held: false,
            });
        };
        if let Some(status) = self.child.try_status() {
            // The snapshot is untouched and whole; the VM is gone.
            self.held = Some(held);
            return Err(super::exited_error(
                &self.id,
                &status.to_string(),
                &self.paths,
            ));
        }
        // A VMM that died but is not reaped yet shows as a closed monitor: ask it first,
        // before the snapshot is touched.
        if let Err(source) = self.qmp.query_status().await {
            self.held = Some(held);
            return Err(qmp_err(&self.id)(source));
        }
        let started = Instant::now();
        let io = |op: &'static str, path: PathBuf| move |source| VmmError::Io { op, path, source };
        // The manifest is parked first: from here until the guest runs the snapshot does
        // not look restorable, and every failure before `cont` puts it back whole.
        let manifest = held.dir.join(MANIFEST_FILE);
        let parked = held.dir.join(format!("{MANIFEST_FILE}.resuming"));
        if let Err(source) = std::fs::rename(&manifest, &parked) {
            self.held = Some(held);
            return Err(io("consume the snapshot", manifest)(source));
        }
        let ram = held.dir.join(MEMORY_FILE);
        // A moved RAM file goes back where the VM maps it; a copy stays until the guest
        // runs (the VM maps its own file).
        let moved = match &held.ram {
            Some((src, Placement::Moved)) => Some(src.clone()),
            _ => None,
        };
        let back = match &moved {
            Some(src) => {
                std::fs::rename(&ram, src).map_err(io("take the ram file back", ram.clone()))
            }
            None => Ok(()),
        };
        let ran = match back {
            Ok(()) => self.qmp.cont().await.map_err(qmp_err(&self.id)),
            Err(e) => Err(e),
        };
        if let Err(e) = ran {
            if let Some(src) = &moved
                && src.exists()
                && let Err(error) = std::fs::rename(src, &ram)
            {
                tracing::error!(%error, ram = %src.display(), "cannot put the ram file back into the snapshot");
            }
            if let Err(error) = std::fs::rename(&parked, &manifest) {
                tracing::error!(%error, manifest = %parked.display(), "cannot put the manifest back");
            }
            self.held = Some(held);
            return Err(e);
        }
        // The guest runs: the snapshot is spent.
        let mut spent = vec![parked, held.dir.join(STATE_FILE)];
        if moved.is_none() && held.ram.is_some() {
            spent.push(ram);
        }
        for f in spent {
            if let Err(error) = std::fs::remove_file(&f) {
                tracing::warn!(%error, file = %f.display(), "cannot remove a resumed snapshot's file");
            }
        }
        self.write_record();
        tracing::info!(
            id = %self.id,
            ms = started.elapsed().as_millis() as u64,
            "held vm runs again"
        );
        Ok(())
    }

    fn manifest_input(&self, dir: &Path, kind: SaveMode, memory: Option<PathBuf>) -> ManifestInput {
        ManifestInput {
            dir: dir.to_path_buf(),
            kind,
            source_vm: self.id.clone(),
            vmm: VmmRecord {
                name: self.info.name.into(),
                version: self.info.version.clone(),
                accel: self.info.accel,
            },
            images: self.images.clone(),
            digests: self.digests.clone(),
            cmdline: self.cmdline.clone(),
            machine: self.machine.clone(),
            disk: self.spec.root_disk.clone(),
            memory,
        }
    }

    /// Undoes a save that failed before `cont`/quit: the RAM file back where the VM
    /// maps it, the snapshot files removed, the guest resumed.
    pub(super) async fn abort_save(&mut self, dir: &Path, undo: Option<(PathBuf, Placement)>) {
        if let Some((src, how)) = undo
            && let Err(error) = files::undo_placement(&src, &dir.join(MEMORY_FILE), how)
        {
            tracing::error!(%error, ram = %src.display(), "cannot put the ram file back");
        }
        remove_snapshot_files(dir);
        if let Err(error) = self.qmp.cont().await {
            tracing::error!(%error, "cannot resume the guest after a failed save");
        }
    }

    async fn save_inner(
        &mut self,
        dir: &Path,
        mode: SaveMode,
        freeze: Option<&mut dyn FreezeHook>,
        hold: bool,
    ) -> Result<SavedSnapshot, VmmError> {
        let started = Instant::now();
        if self.held.is_some() {
            return Err(VmmError::Held {
                id: self.id.clone(),
                held: true,
            });
        }
        if self.stopped {
            return Err(super::exited_error(
                &self.id,
                "already stopped",
                &self.paths,
            ));
        }
        if let Some(status) = self.child.try_status() {
            return Err(super::exited_error(
                &self.id,
                &status.to_string(),
                &self.paths,
            ));
        }
        let dir = absolute(dir)?;
        std::fs::create_dir_all(&dir).map_err(|source| VmmError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        for name in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
            if dir.join(name).symlink_metadata().is_ok() {
                return Err(VmmError::SnapshotDir {
                    dir,
                    reason: format!("it already holds {name}"),
                });
            }
        }
        let id = self.id.clone();
        self.qmp
            .set_migration_parameters(json!({
                "max-bandwidth": MAX_BANDWIDTH,
                "downtime-limit": 1,
            }))
            .await
            .map_err(qmp_err(&id))?;
        self.qmp
            .set_migration_capability("x-ignore-shared", true)
            .await
            .map_err(qmp_err(&id))?;

        let stopped_at = Instant::now();
        self.qmp.stop().await.map_err(qmp_err(&id))?;
        let mut timings = SaveTimings {
            stop: stopped_at.elapsed(),
            ..Default::default()
        };

        // The device state (and the RAM, unless it is a shared file of ours).
        let t = Instant::now();
        let handed = match open_state(&dir.join(STATE_FILE), true) {
            Ok(file) => {
                use std::os::fd::AsFd;
                // QEMU keeps its own copy of the descriptor; ours closes here.
                self.qmp
                    .getfd(STATE_FD, file.as_fd())
                    .await
                    .map_err(qmp_err(&id))
            }
            Err(e) => Err(e),
        };
        let saved = match handed {
            Err(e) => Err(e),
            Ok(()) => match self.qmp.migrate(&format!("fd:{STATE_FD}")).await {
                Ok(()) => wait_migration(&self.qmp, &mut self.child, &id, &self.paths, "save")
                    .await
                    .map(drop),
                Err(source) => Err(qmp_err(&id)(source)),
            },
        };
        if let Err(e) = saved {
            self.abort_save(&dir, None).await;
            return Err(e);
        }
        timings.save_state = t.elapsed();

        // The RAM file and the caller's freeze, concurrently.
        let ram = match &self.memory {
            MemoryBacking::Owned(src) => Some(src.clone()),
            // Private (a clone) or anonymous RAM went into the state file.
            MemoryBacking::Private(_) | MemoryBacking::Anonymous => None,
        };
        let target = dir.join(MEMORY_FILE);
        let memory_job = async {
            let Some(src) = ram.clone() else {
                return Ok(None);
            };
            let dst = target.clone();
            blocking("snapshot the ram file", &src.clone(), move || {
                let t = Instant::now();
                let how = match mode {
                    // The VM quits: its file becomes the snapshot.
                    SaveMode::Suspend => files::rename_or_copy(&src, &dst),
                    // The VM goes on writing its file: freeze a copy.
                    SaveMode::Checkpoint => files::copy_sparse(&src, &dst),
                };
                let how = how.map_err(|source| VmmError::Io {
                    op: "snapshot the ram file",
                    path: src.clone(),
                    source,
                })?;
                Ok(Some((how, t.elapsed())))
            })
            .await
        };
        let freeze_job = async {
            let hook = freeze?;
            let t = Instant::now();
            let result = hook.freeze().await;
            Some((result, t.elapsed()))
        };
        let (memory, frozen) = tokio::join!(memory_job, freeze_job);
        let placed = match memory {
            Ok(placed) => placed,
            Err(e) => {
                self.abort_save(&dir, None).await;
                return Err(e);
            }
        };
        let undo = placed.zip(ram.clone()).map(|((how, took), src)| {
            timings.memory = took;
            (src, how)
        });
        if let Some((result, took)) = frozen {
            timings.freeze = Some(took);
            if let Err(source) = result {
                self.abort_save(&dir, undo).await;
                return Err(VmmError::Freeze { id, source });
            }
        }
        let memory_out = match &undo {
            Some((_, how)) => SavedMemory::File {
                path: target.clone(),
                placement: *how,
            },
            None => SavedMemory::InState,
        };
        let input = self.manifest_input(&dir, mode, undo.as_ref().map(|_| target.clone()));

        let manifest = match mode {
            SaveMode::Checkpoint => {
                let t = Instant::now();
                if let Err(source) = self.qmp.cont().await {
                    remove_snapshot_files(&dir);
                    return Err(qmp_err(&id)(source));
                }
                timings.finish = t.elapsed();
                timings.paused = stopped_at.elapsed();
                // The copy is frozen: digest it while the guest runs.
                let t = Instant::now();
                let written = blocking("write the manifest of", &dir, move || {
                    write_snapshot_manifest(input)
                })
                .await;
                match written {
                    Ok(m) => {
                        timings.manifest = t.elapsed();
                        m
                    }
                    Err(e) => {
                        remove_snapshot_files(&dir);
                        return Err(e);
                    }
                }
            }
            SaveMode::Suspend => {
                let t = Instant::now();
                let written = blocking("write the manifest of", &dir, move || {
                    write_snapshot_manifest(input)
                })
                .await;
                let m = match written {
                    Ok(m) => m,
                    Err(e) => {
                        self.abort_save(&dir, undo).await;
                        return Err(e);
                    }
                };
                timings.manifest = t.elapsed();
                let t = Instant::now();
                if hold {
                    // The VMM stays, stopped, mapping the RAM the snapshot now holds.
                    self.held = Some(Held {
                        dir: dir.clone(),
                        ram: undo.clone(),
                    });
                } else {
                    self.quit_after_suspend().await?;
                    // A copy (another filesystem) left the VM's file behind: the snapshot
                    // has the memory now.
                    if let Some((src, Placement::Copied | Placement::Reflinked)) = &undo {
                        let _ = std::fs::remove_file(src);
                    }
                }
                timings.finish = t.elapsed();
                timings.paused = stopped_at.elapsed();
                m
            }
        };
        timings.total = started.elapsed();
        tracing::info!(
            paused_ms = timings.paused.as_millis() as u64,
            total_ms = timings.total.as_millis() as u64,
            state_bytes = manifest.state.size,
            "saved"
        );
        Ok(SavedSnapshot {
            dir,
            manifest,
            memory: memory_out,
            timings,
        })
    }

    /// Ends the VMM after a suspend: `quit`, reap (SIGKILL if it lingers), remove the run
    /// files. The snapshot is complete before this runs.
    async fn quit_after_suspend(&mut self) -> Result<(), VmmError> {
        let _ = self.qmp.quit().await;
        let waited = tokio::time::timeout(QUIT_GRACE, self.child.wait()).await;
        let result = match waited {
            Ok(Ok(_)) => Ok(()),
            _ => self.child.kill().await.map(drop),
        };
        self.stopped = true;
        remove_run_files(&self.paths, None);
        self.remove_cgroup();
        result.map_err(|source| VmmError::Spawn {
            id: self.id.clone(),
            source,
        })
    }
}

impl QemuVmm {
    /// Restore's checks: the manifest, its compatibility with this host and `spec`, and
    /// its files. Blocking work runs on the blocking pool.
    pub(super) async fn check_snapshot_dir(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<SnapshotManifest, VmmError> {
        self.check_and_stamp(spec, dir).await.map(|(m, _)| m)
    }

    /// [`Self::check_snapshot_dir`], also returning the stamps of the images it hashed
    /// (the restored VM booted, in effect, from those files).
    async fn check_and_stamp(
        &self,
        spec: &VmSpec,
        dir: &Path,
    ) -> Result<(SnapshotManifest, GuestImages), VmmError> {
        let cache = self.digests.clone();
        let info = self.info.clone();
        let machine = self.machine_config(spec);
        let kernel = spec.kernel.clone();
        let initrd = spec.initrd.clone();
        let disk = spec.root_disk.clone();
        let dir = dir.to_path_buf();
        blocking("check", &dir.clone(), move || {
            let m = snap::read_manifest(&dir)?;
            let io = |op: &'static str, p: &Path| {
                let path = p.to_path_buf();
                move |source| VmmError::Io { op, path, source }
            };
            let (kernel_digest, kernel_stamp) =
                cache.digest_stamped(&kernel).map_err(io("hash", &kernel))?;
            let initrd = match &initrd {
                Some(p) => Some((p, cache.digest_stamped(p).map_err(io("hash", p))?)),
                None => None,
            };
            let images = GuestImages {
                kernel: (kernel.clone(), kernel_stamp),
                initrd: initrd.as_ref().map(|(p, (_, s))| (p.to_path_buf(), *s)),
            };
            let initrd = initrd.map(|(_, (d, _))| d);
            let kernel = kernel_digest;
            let root_disk = DiskRecord {
                format: disk.format.as_str().into(),
                virtual_size: snap::disk_virtual_size(&disk.path, disk.format)
                    .map_err(io("read", &disk.path))?,
            };
            let expected = Expected {
                vmm: &info,
                machine: &machine,
                kernel: &kernel,
                initrd: initrd.as_ref(),
                root_disk: &root_disk,
            };
            snap::check_compatible(&dir, &m, &expected)?;
            snap::verify_files(&dir, &m)?;
            Ok((m, images))
        })
        .await
    }

    pub(super) async fn restore_vm(
        &self,
        spec: VmSpec,
        snapshot: &Path,
        how: RestoreMemory,
    ) -> Result<Restored, VmmError> {
        let span =
            tracing::info_span!("restore", id = %spec.id, ?how, snapshot = %snapshot.display());
        self.restore_inner(spec, snapshot, how)
            .instrument(span)
            .await
    }

    async fn restore_inner(
        &self,
        spec: VmSpec,
        snapshot: &Path,
        how: RestoreMemory,
    ) -> Result<Restored, VmmError> {
        let started = Instant::now();
        spec.validate()?;
        let spec = self.resolved(spec)?;
        let dir = absolute(snapshot)?;
        let (manifest, images) = self.check_and_stamp(&spec, &dir).await?;
        let mut timings = RestoreTimings {
            check: started.elapsed(),
            ..Default::default()
        };
        let state = dir.join(&manifest.state.file);
        let paths = prepare_run_dir(&spec)?;

        let t = Instant::now();
        let (memory, placed) = match (&manifest.memory, how) {
            (Some(m), RestoreMemory::Resume) => {
                let src = dir.join(&m.file);
                let dst = paths.memory_file.clone();
                let (s, d) = (src.clone(), dst.clone());
                let placement = blocking("move the ram file", &src, move || {
                    files::rename_or_copy(&s, &d).map_err(|source| VmmError::Io {
                        op: "move the ram file",
                        path: s.clone(),
                        source,
                    })
                })
                .await?;
                (MemoryBacking::Owned(dst), Some((src, placement)))
            }
            (Some(m), RestoreMemory::Copy) => {
                let src = dir.join(&m.file);
                let dst = paths.memory_file.clone();
                let (s, d) = (src.clone(), dst.clone());
                let placement = blocking("copy the ram file", &src, move || {
                    files::copy_sparse(&s, &d).map_err(|source| VmmError::Io {
                        op: "copy the ram file",
                        path: s.clone(),
                        source,
                    })
                })
                .await?;
                (MemoryBacking::Owned(dst), Some((src, placement)))
            }
            (Some(m), RestoreMemory::Clone) => (MemoryBacking::Private(dir.join(&m.file)), None),
            (None, _) => (MemoryBacking::Anonymous, None),
        };
        // A jailed clone maps a sealed copy of the template's RAM (handed in): QEMU opens
        // a private RAM file read-write, and the template's must stay unwritable.
        let template_ram = match &memory {
            MemoryBacking::Private(file) if self.jail => {
                let (sealed, f) = (self.sealed.clone(), file.clone());
                Some(blocking("seal the template ram", file, move || sealed.get(&f)).await?)
            }
            _ => None,
        };
        timings.memory = t.elapsed();

        let mapped = match &template_ram {
            Some(_) => MemoryBacking::Private(super::jail::RAM_FD_PATH.into()),
            None => memory.clone(),
        };
        let argv = machine_argv(
            &spec,
            self.info.accel,
            &paths,
            &manifest.guest.cmdline,
            &mapped,
            true,
        );
        let loaded = self
            .load(
                &spec,
                &paths,
                argv,
                &state,
                &mut timings,
                super::GuestRam {
                    backing: &memory,
                    sealed: template_ram.as_ref(),
                },
            )
            .await;
        let (child, qmp) = match loaded {
            Ok(x) => x,
            Err(e) => {
                if let Some((src, placement)) = &placed
                    && let Err(error) = files::undo_placement(src, &paths.memory_file, *placement)
                {
                    tracing::error!(%error, ram = %src.display(), "cannot put the ram file back");
                }
                return Err(e);
            }
        };

        if how == RestoreMemory::Resume {
            // The snapshot is consumed: its RAM is the VM's now.
            let mut spent = vec![state, dir.join(MANIFEST_FILE)];
            if let Some((src, Placement::Copied | Placement::Reflinked)) = &placed {
                spent.push(src.clone());
            }
            for f in spent {
                if let Err(error) = std::fs::remove_file(&f) {
                    tracing::warn!(%error, file = %f.display(), "cannot remove a resumed snapshot's file");
                }
            }
        }
        timings.total = started.elapsed();
        tracing::info!(
            pid = child.pid(),
            total_ms = timings.total.as_millis() as u64,
            "vm restored"
        );
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
            machine: self.machine_config(&spec),
            spec,
            cmdline: manifest.guest.cmdline.clone(),
            images,
            digests: self.digests.clone(),
            memory,
            _template_ram: template_ram,
        };
        vm.write_record();
        Ok(Restored {
            vm: Box::new(vm),
            manifest,
            timings,
        })
    }

    /// Starts QEMU waiting for a migration, loads `uri`, sends `cont`. On failure QEMU is
    /// killed and reaped and its run files removed (the RAM file is the caller's).
    async fn load(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        argv: Vec<String>,
        state: &Path,
        timings: &mut RestoreTimings,
        ram: super::GuestRam<'_>,
    ) -> Result<(Supervised, QmpClient), VmmError> {
        let t = Instant::now();
        let (mut child, qmp) = self.launch(spec, paths, argv, ram).await?;
        timings.spawn = t.elapsed();
        let id = spec.id.as_str();
        let t = Instant::now();
        let loaded = async {
            qmp.set_migration_capability("x-ignore-shared", true)
                .await
                .map_err(qmp_err(id))?;
            {
                use std::os::fd::AsFd;
                let file = open_state(state, false)?;
                qmp.getfd(STATE_FD, file.as_fd())
                    .await
                    .map_err(qmp_err(id))?;
            }
            qmp.migrate_incoming(&format!("fd:{STATE_FD}"))
                .await
                .map_err(qmp_err(id))?;
            wait_migration(&qmp, &mut child, id, paths, "load").await?;
            timings.load = t.elapsed();
            // Saved while stopped, so it arrives `paused`: resume it. Waiting for
            // `running` first would wait forever.
            let t = Instant::now();
            qmp.cont().await.map_err(qmp_err(id))?;
            timings.cont = t.elapsed();
            Ok::<(), VmmError>(())
        }
        .await;
        match loaded {
            Ok(()) => Ok((child, qmp)),
            Err(e) => {
                if let Err(error) = child.kill().await {
                    tracing::error!(%error, "cannot kill a vmm whose restore failed");
                }
                remove_run_files(paths, None);
                if let Some(g) = self.cgroup_of(&spec.id) {
                    let _ = g.remove();
                }
                Err(e)
            }
        }
    }
}
