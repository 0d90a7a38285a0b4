//! The task that owns one sandbox: its VM while it runs, its snapshot while it is paused.
//!
//! It serves lifecycle commands one at a time (destroy, pause, resume, make a template),
//! pauses the sandbox after `timeout_sec` without activity, and notices a VMM that exits
//! on its own.
//!
//! Pause saves the VM into `<tmpfs>/snapshot` (the RAM file is moved, not copied: tens of
//! milliseconds), then copies the snapshot to the sandbox's directory in the background so
//! it survives a reboot (`snapshot_durable`). The VMM is either ended (namespace and slot
//! freed) or, for `pause_hold` and while a hold permit is free, kept stopped: resuming a
//! held VMM is a `cont` and a clock reset, milliseconds even under TCG, where a restore
//! costs hundreds of milliseconds of code translation before the guest answers. A held
//! VMM is let go after that time, at shutdown, or if it dies, and the sandbox stays paused
//! on its snapshot. After the hold time (a minute without one) the tmpfs copy is freed too,
//! once the disk copy is complete: a long-paused sandbox holds no RAM. Resume otherwise
//! restores the tmpfs snapshot when it is there (fast), else the on-disk copy.
//!
//! It also keeps the metrics sampler ([`crate::metrics`]) informed: it tracks the VM once
//! it runs (create, resume), untracks it once paused (the tiers stay for the control
//! plane's flush) and retires the sandbox when it is destroyed or its VMM dies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use nestbox_hostsys::disk;
use nestbox_vmm::BoxFuture;
use nestbox_vmm::snapshot::{
    BoxError, MANIFEST_FILE, MEMORY_FILE, RestoreMemory, STATE_FILE, SaveMode,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinHandle;

use super::launch::{Init, Live, send_init};
use super::state::{self, Phase, StateFile};
use super::{Command, Manager, SandboxHandle, State, sandbox_dir};
use crate::error::AgentError;
use crate::templates::{Kind, ROOTFS_FILE, StoredTemplate, TemplateRecord, TemplateStore};

/// The copy-on-write disk in a sandbox's directory.
const DISK_FILE: &str = "rootfs.qcow2";

/// How often the task checks its VMM and the inactivity timeout.
const TICK: Duration = Duration::from_millis(500);
/// Ticks between checks that a running VM was not stopped by its VMM after a failed
/// disk write (and, if it was, retries of that write).
const IO_CHECK_TICKS: u32 = 10;
/// How long after a failed copy of a paused sandbox's snapshot to disk (a full disk) it is
/// tried again.
const PERSIST_RETRY: Duration = Duration::from_secs(30);

/// How long a paused sandbox's memory stays on tmpfs (for a fast resume) before it is
/// left on disk alone, when no hold time is set (otherwise: the hold time).
const TMPFS_KEEP: Duration = Duration::from_secs(60);

/// The owner of one sandbox.
pub(crate) struct SandboxTask {
    manager: Manager,
    handle: Arc<SandboxHandle>,
    st: StateFile,
    dir: PathBuf,
    live: Option<Live>,
    /// A paused sandbox's VMM, kept stopped for a fast resume.
    held: Option<Held>,
    /// When it was paused, while its snapshot's memory is still on tmpfs.
    paused_at: Option<Instant>,
    persist: Option<JoinHandle<Result<(), AgentError>>>,
    /// When the last copy of the snapshot to disk failed (it is tried again after
    /// [`PERSIST_RETRY`]).
    persist_failed: Option<Instant>,
    /// The state file is behind the sandbox (its last write failed; see `record`).
    unrecorded: bool,
}

/// A paused sandbox's VMM, stopped, with its network: resuming it is a `cont`.
struct Held {
    live: Live,
    since: Instant,
    _permit: OwnedSemaphorePermit,
}

/// The fast (tmpfs) snapshot of a paused sandbox.
fn tmpfs_snapshot(st: &StateFile) -> PathBuf {
    st.mem_dir.join("snapshot")
}

/// The durable (on-disk) copy of a paused sandbox's snapshot.
fn disk_snapshot(dir: &Path) -> PathBuf {
    dir.join("snapshot")
}

fn has_snapshot(dir: &Path) -> bool {
    dir.join(MANIFEST_FILE).is_file()
}

/// Copies a snapshot directory's files (sparse), manifest last.
async fn copy_snapshot(from: &Path, to: &Path) -> Result<(), AgentError> {
    let io = |e: std::io::Error| {
        AgentError::Internal(format!("copying a snapshot to {}: {e}", to.display()))
    };
    tokio::fs::create_dir_all(to).await.map_err(io)?;
    for name in [STATE_FILE, MEMORY_FILE, MANIFEST_FILE] {
        let src = from.join(name);
        if src.exists() {
            disk::sparse_copy(&src, &to.join(name))
                .await
                .map_err(|e| AgentError::Internal(format!("copying {}: {e}", src.display())))?;
        }
    }
    Ok(())
}

impl SandboxTask {
    pub(crate) fn new(
        manager: Manager,
        handle: Arc<SandboxHandle>,
        st: StateFile,
        live: Option<Live>,
    ) -> Self {
        let dir = sandbox_dir(&manager.inner().cfg.data_dir, st.sandbox_id);
        // An adopted paused sandbox's tmpfs copy (after a crash) goes in time, too.
        let paused_at = (live.is_none() && st.phase == Phase::Paused).then(Instant::now);
        Self {
            manager,
            handle,
            st,
            dir,
            live,
            held: None,
            paused_at,
            persist: None,
            persist_failed: None,
            unrecorded: false,
        }
    }

    /// The task of an adopted running sandbox (see [`Manager::adopt_live`]).
    pub(crate) fn running(mut self, live: Live) -> Self {
        self.paused_at = None;
        self.live = Some(live);
        self
    }

    /// The task of an adopted paused sandbox that holds its VMM (with a hold permit).
    pub(crate) fn holding(mut self, live: Live, permit: OwnedSemaphorePermit) -> Self {
        self.held = Some(Held {
            live,
            since: Instant::now(),
            _permit: permit,
        });
        self
    }

    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let id = self.st.sandbox_id;
        if self.live.is_some() {
            self.track().await;
        }
        // A paused sandbox taken back after a restart whose snapshot was not yet copied
        // to disk: copy it now (so it survives a reboot and its tmpfs copy can go).
        if self.st.phase == Phase::Paused
            && !self.st.snapshot_durable
            && has_snapshot(&tmpfs_snapshot(&self.st))
        {
            self.start_persist();
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    match cmd {
                        Command::Destroy { reply } => {
                            let result = self.destroy().await;
                            let _ = reply.send(result);
                            return;
                        }
                        Command::Pause { auto, reply } => {
                            let _ = reply.send(self.pause(auto).await);
                        }
                        Command::Resume { reply } => {
                            let _ = reply.send(self.resume().await);
                        }
                        Command::ReleaseHeld { reply } => {
                            self.release_held().await;
                            let _ = reply.send(Ok(()));
                        }
                        Command::Settle { reply } => {
                            let _ = reply.send(self.settle().await);
                        }
                        Command::CreateTemplate { store, key, kind, move_of, reply } => {
                            let _ = reply.send(self.create_template(&store, &key, kind, move_of).await);
                        }
                        Command::SetEgress { rules, version, reply } => {
                            let _ = reply.send(self.set_egress(rules, version).await);
                        }
                        Command::RotateToken { token, reply } => {
                            let _ = reply.send(self.rotate_token(token).await);
                        }
                        Command::Detach { reply } => {
                            self.detach().await;
                            let _ = reply.send(Ok(()));
                            return;
                        }
                    }
                    if self.handle.state() == State::Stopping {
                        // The VM died during the operation and everything was released.
                        return;
                    }
                }
                done = async {
                    match self.persist.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if self.persist.is_some() => {
                    self.persist = None;
                    self.persisted(done.unwrap_or_else(|e| Err(AgentError::Internal(format!("snapshot copy task: {e}")))));
                }
                _ = tick.tick() => {
                    if self.live.is_some() || self.held.is_some() {
                        self.log(|l| l.collect(Utc::now().timestamp_millis())).await;
                    }
                    if let Some(held) = self.held.as_mut() {
                        let why = match held.live.vm.exited() {
                            Some(status) => Some(format!("its VMM exited ({status})")),
                            None => (held.since.elapsed() >= self.manager.inner().cfg.pause_hold)
                                .then(|| "its hold time is over".to_string()),
                        };
                        if let Some(why) = why {
                            tracing::info!(sandbox = %id, %why, "paused sandbox lets its VMM go; its snapshot stays");
                            self.release_held().await;
                        }
                    }
                    if self.unrecorded {
                        self.record();
                    }
                    if self.persist.is_none()
                        && self.persist_failed.is_some_and(|t| t.elapsed() >= PERSIST_RETRY)
                        && self.st.phase == Phase::Paused
                        && !self.st.snapshot_durable
                        && has_snapshot(&tmpfs_snapshot(&self.st))
                    {
                        self.start_persist();
                    }
                    if self.long_paused() {
                        // Its memory waits on disk from now on, not in RAM.
                        if let Err(e) = self.settle().await {
                            tracing::warn!(sandbox = %id, error = %e.public_message(), "freeing a paused sandbox's memory");
                        }
                        self.paused_at = None;
                    }
                    if let Some(live) = self.live.as_mut()
                        && let Some(status) = live.vm.exited()
                    {
                        tracing::warn!(sandbox = %id, %status, "VMM exited on its own; releasing the sandbox");
                        self.vanish().await;
                        // Answer whoever is waiting to destroy it.
                        while let Ok(cmd) = rx.try_recv() {
                            if let Command::Destroy { reply } = cmd {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        return;
                    }
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(IO_CHECK_TICKS) {
                        self.check_io().await;
                    }
                    if self.inactive() {
                        tracing::info!(sandbox = %id, timeout_sec = self.st.timeout_sec, "inactive; pausing");
                        if let Err(e) = self.pause(true).await {
                            tracing::error!(sandbox = %id, error = %e.public_message(), "automatic pause failed");
                            self.handle.touch();
                        }
                        if self.handle.state() == State::Stopping {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Finds out whether the running VM's VMM stopped it after a failed disk write (the
    /// host's disk is full: QEMU stops the guest rather than fail its write, so nothing
    /// is lost) and, while it is stopped, has the VMM retry: the guest runs again as soon
    /// as the host has space. Meanwhile requests to its guest get a clear
    /// `insufficient_storage` at once instead of waiting for a guest that cannot answer.
    async fn check_io(&mut self) {
        let id = self.st.sandbox_id;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        if self.handle.state() != State::Running {
            return;
        }
        let was = self.handle.io_stopped();
        let stopped = match live.vm.run_state().await {
            Ok(state) => state == nestbox_vmm::RUN_STATE_IO_ERROR,
            // A VMM that does not answer is found out by its exit.
            Err(_) => return,
        };
        match (was, stopped) {
            (false, true) => {
                self.handle.set(|s| s.io_stopped = true);
                tracing::error!(sandbox = %id, "the host's disk is full: the sandbox's VM is stopped until space is freed");
            }
            // Still stopped: retry. Judged at the next check, not now: a retried write that
            // fails again stops the guest only moments after it was let run.
            (true, true) => {
                if let Err(e) = live.vm.retry_io().await {
                    tracing::warn!(sandbox = %id, error = %e, "retrying the VM's failed disk writes");
                }
            }
            (true, false) => {
                self.handle.set(|s| s.io_stopped = false);
                tracing::info!(sandbox = %id, "the host has disk space again: the sandbox runs again");
            }
            (false, false) => {}
        }
    }

    /// Gives the running guest agent a new token (presenting the one it holds), then
    /// records it and talks to the guest with it from then on. A paused sandbox's guest
    /// gets it when it resumes (recorded now; a later rotation replaces it).
    async fn rotate_token(&mut self, token: String) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        let state = self.handle.state();
        if state == State::Paused {
            let previous = self.st.rotating_to.replace(token);
            if let Err(e) = state::write(&self.dir, &self.st) {
                self.st.rotating_to = previous;
                return Err(e);
            }
            tracing::info!(sandbox = %id, "guest agent token rotation recorded for the next resume");
            return Ok(());
        }
        let Some(live) = self.live.as_mut().filter(|_| state == State::Running) else {
            return Err(AgentError::WrongState {
                id,
                state: state.as_str(),
            });
        };
        let guest = self.manager.guest_client(id, &live.net, &token)?;
        let init = Init {
            present: Some(self.st.access_token.clone()),
            token: token.clone(),
            env: None,
            hostname: None,
            defaults: None,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let console = self.dir.join("console.log");
        // Recorded first: a crash from here on leaves the guest holding either token, and
        // the next start asks it which.
        self.st.rotating_to = Some(token.clone());
        if let Err(e) = state::write(&self.dir, &self.st) {
            self.st.rotating_to = None;
            return Err(e);
        }
        let sent = send_init(&guest, init, live.vm.as_mut(), id, deadline, &console).await;
        self.st.rotating_to = None;
        if let Err(e) = sent {
            self.record();
            return Err(e);
        }
        // The guest holds the new token: from here on it is the sandbox's, recorded or not.
        self.st.access_token = token;
        self.record();
        self.handle.set(|s| s.guest = Some(guest));
        tracing::info!(sandbox = %id, "guest agent token rotated");
        Ok(())
    }

    /// Lets go of the sandbox without touching it (see [`Manager::detach_all`]): a copy of
    /// its snapshot to disk in progress is stopped (the next run makes it again).
    async fn detach(&mut self) {
        if let Some(h) = self.persist.take() {
            h.abort();
            let _ = h.await;
        }
        self.log(|l| l.collect(Utc::now().timestamp_millis())).await;
        if let Some(live) = self.live.take() {
            live.detach();
        }
        if let Some(held) = self.held.take() {
            held.live.detach();
        }
        self.manager.unreserve(self.st.sandbox_id);
        tracing::info!(sandbox = %self.st.sandbox_id, "left running for the next run of the agent");
    }

    /// Works on the sandbox's log off the async workers; a failure is logged, not raised
    /// (the sandbox runs on without its log).
    async fn log(
        &self,
        work: impl FnOnce(&mut super::logs::SandboxLog) -> std::io::Result<()> + Send + 'static,
    ) {
        let log = self.handle.log.clone();
        let done = tokio::task::spawn_blocking(move || match log.lock() {
            Ok(mut l) => work(&mut l),
            Err(_) => Err(std::io::Error::other("the log's lock is poisoned")),
        })
        .await;
        if let Ok(Err(e)) | Err(e) = done.map_err(std::io::Error::other) {
            tracing::warn!(sandbox = %self.st.sandbox_id, error = %e, "sandbox log");
        }
    }

    /// Has the metrics sampler sample the running VM (internal sandboxes are not sampled).
    async fn track(&self) {
        if let (Some(pid), false) = (self.st.vmm_pid, self.handle.facts.internal) {
            let target = crate::metrics::Target {
                pid,
                disk: self.dir.join(DISK_FILE),
                vcpus: self.st.vcpus,
            };
            self.manager
                .inner()
                .metrics
                .track(self.st.sandbox_id, target)
                .await;
        }
    }

    /// Paused for longer than the hold time, with its snapshot copied to disk and no VMM
    /// held: its tmpfs copy can go (a later resume restores from the disk copy).
    fn long_paused(&self) -> bool {
        self.held.is_none()
            && self.persist.is_none()
            && self.st.snapshot_durable
            // Recorded too: a restart trusts only a recorded disk copy.
            && !self.unrecorded
            && self.paused_at.is_some_and(|t| {
                let hold = self.manager.inner().cfg.pause_hold;
                t.elapsed() >= if hold.is_zero() { TMPFS_KEEP } else { hold }
            })
    }

    fn inactive(&self) -> bool {
        self.st.timeout_sec > 0
            && self.handle.state() == State::Running
            && Utc::now().timestamp_millis() - self.handle.last_active_ms()
                > i64::from(self.st.timeout_sec) * 1000
    }

    /// Removes the sandbox after its VMM died: nothing can be saved.
    async fn vanish(&mut self) {
        self.handle.set(|s| {
            s.state = State::Stopping;
            s.guest = None;
            s.io_stopped = false;
        });
        let live = self
            .live
            .take()
            .or_else(|| self.held.take().map(|h| h.live));
        if let Some(h) = self.persist.take() {
            h.abort();
        }
        if let Some(e) = self
            .manager
            .release(&mut self.st, live, &self.dir, true)
            .await
        {
            tracing::error!(sandbox = %self.st.sandbox_id, error = %e.public_message(), "release after VMM exit");
        }
        self.manager
            .inner()
            .metrics
            .retire(self.st.sandbox_id)
            .await;
        self.manager.unreserve(self.st.sandbox_id);
    }

    async fn destroy(&mut self) -> Result<(), AgentError> {
        self.handle.set(|s| {
            s.state = State::Stopping;
            s.guest = None;
        });
        if let Some(h) = self.persist.take() {
            h.abort();
            let _ = h.await;
        }
        let live = self
            .live
            .take()
            .or_else(|| self.held.take().map(|h| h.live));
        let result = self
            .manager
            .release(&mut self.st, live, &self.dir, true)
            .await;
        // Its 24 h tier waits in the sampler for the control plane's flush.
        self.manager
            .inner()
            .metrics
            .retire(self.st.sandbox_id)
            .await;
        self.manager.unreserve(self.st.sandbox_id);
        tracing::info!(sandbox = %self.st.sandbox_id, "sandbox destroyed");
        match result {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn pause(&mut self, auto: bool) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        let state = self.handle.state();
        if state != State::Running {
            return Err(AgentError::WrongState {
                id,
                state: state.as_str(),
            });
        }
        let Some(mut live) = self.live.take() else {
            return Err(AgentError::Internal(format!(
                "sandbox {id} runs without a VM"
            )));
        };
        self.handle.set(|s| {
            s.state = State::Pausing;
            s.guest = None;
            s.io_stopped = false;
        });
        let started = Instant::now();
        let snap = tmpfs_snapshot(&self.st);
        let _ = tokio::fs::remove_dir_all(&snap).await;
        // Keep the VMM (stopped) for a fast resume, if there is room for one more.
        let hold = (!self.manager.inner().cfg.pause_hold.is_zero())
            .then(|| self.manager.inner().holds.clone().try_acquire_owned().ok())
            .flatten();
        let saved = match hold {
            Some(_) => live.vm.suspend_held(&snap).await,
            None => live.vm.save(&snap, SaveMode::Suspend, None).await,
        };
        match saved {
            Ok(saved) => {
                tracing::info!(sandbox = %id, ms = started.elapsed().as_millis() as u64, auto, held = hold.is_some(), timings = ?saved.timings, "paused");
            }
            Err(e) => {
                if live.vm.exited().is_none() {
                    // The guest runs again: the sandbox stays running.
                    let guest = self.reconnect(&live);
                    self.live = Some(live);
                    self.handle.set(|s| {
                        s.state = State::Running;
                        s.guest = guest;
                    });
                    return Err(AgentError::host("saving the VM", id, e));
                }
                self.live = Some(live);
                self.vanish().await;
                return Err(AgentError::host(
                    "saving the VM (the VMM died; the sandbox is lost)",
                    id,
                    e,
                ));
            }
        }
        let what = if auto { "paused (inactive)" } else { "paused" };
        self.log(move |l| {
            l.collect(Utc::now().timestamp_millis())?;
            l.event(super::logs::Level::Info, what)
        })
        .await;
        // The tiers stay with the sampler for the control plane's flush.
        self.manager.inner().metrics.untrack(id).await;
        match hold {
            // Its pid and slot stay recorded: a crash now is cleaned up like any other.
            Some(permit) => {
                self.held = Some(Held {
                    live,
                    since: Instant::now(),
                    _permit: permit,
                });
            }
            None => {
                self.st.vmm_pid = None;
                self.manager
                    .drop_network(&mut self.st, Some(live.net))
                    .await;
            }
        }
        self.st.phase = Phase::Paused;
        self.st.auto_paused = auto;
        self.st.snapshot_durable = false;
        self.paused_at = Some(Instant::now());
        let _ = tokio::fs::remove_dir_all(disk_snapshot(&self.dir)).await;
        // The sandbox is paused, its snapshot whole, recorded or not (see `record`).
        self.record();
        self.handle.set(|s| {
            s.state = State::Paused;
            s.auto_paused = auto;
        });
        self.start_persist();
        Ok(())
    }

    /// Records the sandbox's state after a change that has happened on the host. If the
    /// record cannot be written (a full disk) the sandbox is what it became all the same:
    /// the record is written again every tick until it is (and start-up recovery finds a
    /// pause or resume a crash left unrecorded from the VMM's own record). Returns whether
    /// it was written.
    fn record(&mut self) -> bool {
        match state::write(&self.dir, &self.st) {
            Ok(()) => {
                if std::mem::take(&mut self.unrecorded) {
                    tracing::info!(sandbox = %self.st.sandbox_id, "sandbox state recorded at last");
                }
                true
            }
            Err(e) => {
                if !std::mem::replace(&mut self.unrecorded, true) {
                    tracing::error!(sandbox = %self.st.sandbox_id, error = %e.public_message(), "recording sandbox state; trying again every tick");
                }
                false
            }
        }
    }

    /// Copies the tmpfs snapshot to the sandbox's directory in the background, so that it
    /// survives a reboot ([`Self::persisted`] records it).
    fn start_persist(&mut self) {
        let from = tmpfs_snapshot(&self.st);
        let staging = self.dir.join("snapshot.partial");
        let to = disk_snapshot(&self.dir);
        self.persist_failed = None;
        self.persist = Some(tokio::spawn(async move {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            let copied = async {
                copy_snapshot(&from, &staging).await?;
                tokio::fs::rename(&staging, &to).await.map_err(|e| {
                    AgentError::Internal(format!("moving the snapshot copy into place: {e}"))
                })
            }
            .await;
            if copied.is_err() {
                // A partial copy holds disk space for nothing (the disk may be full).
                let _ = tokio::fs::remove_dir_all(&staging).await;
            }
            copied
        }));
    }

    fn persisted(&mut self, result: Result<(), AgentError>) {
        let id = self.st.sandbox_id;
        match result {
            Ok(()) if self.st.phase == Phase::Paused => {
                self.st.snapshot_durable = true;
                self.record();
            }
            Ok(()) => {}
            Err(e) => {
                self.persist_failed = Some(Instant::now());
                tracing::error!(sandbox = %id, error = %e.public_message(), retry_secs = PERSIST_RETRY.as_secs(), "copying the snapshot to disk")
            }
        }
    }

    /// Waits for the on-disk snapshot copy, then frees the tmpfs copy.
    async fn settle(&mut self) -> Result<(), AgentError> {
        self.release_held().await;
        if let Some(h) = self.persist.take() {
            let done = h
                .await
                .unwrap_or_else(|e| Err(AgentError::Internal(e.to_string())));
            self.persisted(done);
        }
        if self.unrecorded {
            self.record();
        }
        if self.st.phase == Phase::Paused
            && self.st.snapshot_durable
            && !self.unrecorded
            && has_snapshot(&disk_snapshot(&self.dir))
        {
            let _ = tokio::fs::remove_dir_all(tmpfs_snapshot(&self.st)).await;
            let _ = tokio::fs::remove_dir_all(&self.st.mem_dir).await;
            Ok(())
        } else {
            Err(AgentError::Internal(format!(
                "the snapshot of {} is not on disk",
                self.st.sandbox_id
            )))
        }
    }

    /// A fresh guest client for the live VM (after a failed pause).
    fn reconnect(&self, live: &Live) -> Option<nestbox_envd::client::EnvdClient> {
        let url = format!("http://{}", live.net.guest_agent());
        nestbox_envd::client::EnvdClient::with_http_client(
            self.manager.inner().http.clone(),
            url,
            Some(self.st.access_token.clone()),
        )
        .ok()
    }

    async fn resume(&mut self) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        let state = self.handle.state();
        if state != State::Paused {
            return Err(AgentError::WrongState {
                id,
                state: state.as_str(),
            });
        }
        self.handle.set(|s| s.state = State::Resuming);
        if self.held.is_some() {
            match self.resume_held().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e.public_message(), "resuming the held VMM failed; restoring the snapshot instead");
                    // Its disk copy was stopped for the fast path: make it again (the
                    // restore below waits for it).
                    if !self.st.snapshot_durable && has_snapshot(&tmpfs_snapshot(&self.st)) {
                        self.start_persist();
                    }
                }
            }
        }
        // Never consume the tmpfs snapshot while it is being copied.
        if let Some(h) = self.persist.take() {
            let done = h
                .await
                .unwrap_or_else(|e| Err(AgentError::Internal(e.to_string())));
            self.persisted(done);
        }
        let fast = tmpfs_snapshot(&self.st);
        let durable = disk_snapshot(&self.dir);
        let source = if has_snapshot(&fast) {
            fast.clone()
        } else {
            // Its memory comes back onto the memory filesystem: only if it fits (resuming,
            // it is counted already).
            if let Err(e) = self.manager.admit_memory(0) {
                self.handle.set(|s| s.state = State::Paused);
                return Err(e);
            }
            // A restore consumes the snapshot it resumes: it gets a copy there, so the
            // copy on disk stays whole until the guest runs (a resume that fails after the
            // VMM restored can be tried again).
            let _ = tokio::fs::remove_dir_all(&fast).await;
            let copied = async {
                tokio::fs::create_dir_all(&self.st.mem_dir)
                    .await
                    .map_err(|e| AgentError::host("creating the guest memory directory", id, e))?;
                copy_snapshot(&durable, &fast).await
            }
            .await;
            if let Err(e) = copied {
                let _ = tokio::fs::remove_dir_all(&fast).await;
                self.handle.set(|s| s.state = State::Paused);
                return Err(e);
            }
            fast.clone()
        };
        if !has_snapshot(&source) {
            self.handle.set(|s| s.state = State::Paused);
            return Err(AgentError::Internal(format!(
                "paused sandbox {id} has no snapshot"
            )));
        }
        let started = Instant::now();
        let _ = tokio::fs::create_dir_all(&self.st.mem_dir).await;
        // The restored VMM writes a new console file.
        self.log(|l| l.new_console()).await;
        // A rotation recorded while it was paused reaches the guest now.
        let init = Init {
            present: Some(self.st.access_token.clone()),
            token: self.next_token(),
            env: None,
            hostname: None,
            defaults: None,
        };
        match self
            .manager
            .bring_up(
                &mut self.st,
                &self.dir,
                Some((source.clone(), RestoreMemory::Resume)),
                init,
                started,
            )
            .await
        {
            Ok((live, guest, version)) => {
                self.rotated_on_resume();
                self.running_again(live, guest, version, started, "restored")
                    .await
            }
            Err(e) => {
                self.handle.set(|s| s.state = State::Paused);
                self.record();
                Err(e)
            }
        }
    }

    /// Replaces the egress rules: in force at once while a VM (running or held) has a
    /// network, recorded for the next resume in any case. A change older than the one in
    /// force (`version`, see [`super::egress::stale`]) changes nothing.
    async fn set_egress(
        &mut self,
        rules: nestbox_types::egress::EgressRules,
        version: u64,
    ) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        if super::egress::stale(self.st.egress_version, version) {
            tracing::info!(sandbox = %id, version, holding = self.st.egress_version, "an older egress change arrived late; ignored");
            return Ok(());
        }
        let egress = super::egress::parse(id, &rules)?;
        let previous = (self.st.egress.clone(), self.st.egress_version);
        self.st.egress = egress.rules();
        if version != 0 {
            self.st.egress_version = version;
        }
        // Recorded before they are put in force (a restart starts the resolver from the
        // record): rules that cannot be recorded are refused, and nothing changes.
        if let Err(e) = state::write(&self.dir, &self.st) {
            (self.st.egress, self.st.egress_version) = previous;
            return Err(e);
        }
        let live = self.live.as_ref().or(self.held.as_ref().map(|h| &h.live));
        if let Some(live) = live
            && let Err(e) = live.egress.replace(egress).await
        {
            (self.st.egress, self.st.egress_version) = previous;
            self.record();
            return Err(AgentError::host("putting the egress rules in force", id, e));
        }
        tracing::info!(sandbox = %id, "egress rules replaced");
        Ok(())
    }

    /// Ends a paused sandbox's held VMM and frees its network; the snapshot stays whole.
    async fn release_held(&mut self) {
        let Some(held) = self.held.take() else { return };
        let id = self.st.sandbox_id;
        let Live {
            mut vm,
            net,
            egress,
        } = held.live;
        drop(egress);
        if let Err(e) = vm.stop(Duration::from_secs(5)).await {
            tracing::warn!(sandbox = %id, error = %e, "stopping a held VMM");
        }
        self.st.vmm_pid = None;
        self.manager.drop_network(&mut self.st, Some(net)).await;
        // Its slot is free now: a record naming it must not outlive this (see `record`).
        self.record();
    }

    /// Resumes a paused sandbox whose VMM was held: `cont`, then the guest's clock. On
    /// failure the VMM and network are released and the caller restores the snapshot (or
    /// its on-disk copy) instead.
    async fn resume_held(&mut self) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        let started = Instant::now();
        // The on-disk copy reads the RAM the guest is about to change: stop it (the next
        // pause makes a new one).
        if let Some(h) = self.persist.take() {
            h.abort();
            let _ = h.await;
            let _ = tokio::fs::remove_dir_all(self.dir.join("snapshot.partial")).await;
        }
        let Some(mut held) = self.held.take() else {
            return Err(AgentError::Internal(format!("sandbox {id} holds no VMM")));
        };
        let next = self.next_token();
        let rotating = next != self.st.access_token;
        let guest = match self.manager.guest_client(id, &held.live.net, &next) {
            Ok(guest) => guest,
            Err(e) => {
                self.held = Some(held);
                self.release_held().await;
                return Err(e);
            }
        };
        // On failure the VMM layer has put the snapshot back whole: restore it instead.
        if let Err(e) = held.live.vm.resume_held().await {
            self.held = Some(held);
            self.release_held().await;
            return Err(AgentError::host("running the held VM again", id, e));
        }
        // The guest runs: from here on the sandbox is running, whatever its agent answers
        // (it keeps its token; /init sets its clock), unless a rotation recorded while it
        // was paused did not reach it: then the snapshot is restored instead.
        let init = Init {
            present: Some(self.st.access_token.clone()),
            token: next,
            env: None,
            hostname: None,
            defaults: None,
        };
        let deadline = Instant::now() + self.manager.inner().cfg.boot_timeout;
        let console = self.dir.join("console.log");
        if let Err(e) = send_init(&guest, init, held.live.vm.as_mut(), id, deadline, &console).await
        {
            if rotating {
                self.held = Some(held);
                self.release_held().await;
                return Err(e);
            }
            tracing::warn!(sandbox = %id, error = %e.public_message(), "the resumed guest's clock was not set");
        }
        self.rotated_on_resume();
        let version = self.st.guest_version.clone();
        self.running_again(held.live, guest, version, started, "held VMM")
            .await
    }

    /// The token the guest should hold once it runs again: a rotation recorded while it
    /// was paused, else the one it has.
    fn next_token(&self) -> String {
        self.st
            .rotating_to
            .clone()
            .unwrap_or_else(|| self.st.access_token.clone())
    }

    /// A resumed guest took [`Self::next_token`]: it is the sandbox's token from now on
    /// (recorded by the caller's next state write).
    fn rotated_on_resume(&mut self) {
        if let Some(token) = self.st.rotating_to.take() {
            self.st.access_token = token;
            tracing::info!(sandbox = %self.st.sandbox_id, "guest agent token rotated on resume");
        }
    }

    /// Records a resumed sandbox as running: its snapshot copies are spent (one was
    /// consumed, the other is stale), the sampler tracks it, requests reach its guest.
    async fn running_again(
        &mut self,
        live: Live,
        guest: nestbox_envd::client::EnvdClient,
        version: String,
        started: Instant,
        how: &'static str,
    ) -> Result<(), AgentError> {
        let id = self.st.sandbox_id;
        self.live = Some(live);
        self.paused_at = None;
        self.st.phase = Phase::Running;
        self.st.auto_paused = false;
        self.st.snapshot_durable = false;
        self.st.guest_version = version.clone();
        let _ = tokio::fs::remove_dir_all(tmpfs_snapshot(&self.st)).await;
        let _ = tokio::fs::remove_dir_all(disk_snapshot(&self.dir)).await;
        // The guest runs, recorded or not (see `record`).
        self.record();
        self.track().await;
        self.handle.touch();
        self.handle.set(|s| {
            s.state = State::Running;
            s.auto_paused = false;
            s.guest = Some(guest);
            s.guest_version = version;
            s.io_stopped = false;
        });
        tracing::info!(sandbox = %id, ms = started.elapsed().as_millis() as u64, how, "resumed");
        self.log(|l| l.event(super::logs::Level::Info, "resumed"))
            .await;
        Ok(())
    }

    /// Freezes the sandbox into a template: memory + disk (snapshot) or disk alone (image).
    async fn create_template(
        &mut self,
        store: &TemplateStore,
        key: &str,
        kind: Kind,
        move_of: bool,
    ) -> Result<StoredTemplate, AgentError> {
        let id = self.st.sandbox_id;
        let state = self.handle.state();
        // A move package is of a paused sandbox: it stays paused until it is destroyed here
        // (its move is done) or resumed (its move failed).
        let allowed = if move_of {
            state == State::Paused
        } else {
            matches!(state, State::Running | State::Paused)
        };
        if !allowed {
            return Err(AgentError::WrongState {
                id,
                state: state.as_str(),
            });
        }
        // A paused sandbox's disk may lack writes still in its guest's page cache (they are
        // in its memory snapshot). An image template is the disk alone, so the sandbox is
        // resumed, its guest flushes, the disk is frozen, and it is paused again.
        let resumed = state == State::Paused && kind == Kind::Image;
        if resumed {
            self.resume().await?;
        }
        let staging = store.staging(key)?;
        let result = self
            .build_template(&staging, self.handle.state(), kind)
            .await;
        if resumed && let Err(e) = self.pause(self.st.auto_paused).await {
            tracing::error!(sandbox = %id, error = %e.public_message(), "pausing again after making an image template");
        }
        let built = match result {
            Ok(disk_mb) => disk_mb,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(e);
            }
        };
        let record = TemplateRecord {
            format_version: crate::templates::TEMPLATE_FORMAT,
            key: key.to_string(),
            kind,
            base_template: self.st.template.clone(),
            vcpus: self.st.vcpus,
            memory_mb: self.st.memory_mb,
            disk_size_mb: built,
            kernel_version: self.st.kernel_version.clone(),
            access_token: (kind == Kind::Snapshot).then(|| self.st.access_token.clone()),
            size_bytes: 0,
            created_at: Utc::now(),
            move_of: move_of.then_some(id),
        };
        let stored = store.commit(&staging, record);
        if stored.is_err() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        stored
    }

    /// Fills `staging`; returns the template's disk size in MiB.
    async fn build_template(
        &mut self,
        staging: &Path,
        state: State,
        kind: Kind,
    ) -> Result<u32, AgentError> {
        let id = self.st.sandbox_id;
        let overlay = self.dir.join(DISK_FILE);
        let frozen_disk = staging.join("disk.qcow2");
        let rootfs = staging.join(ROOTFS_FILE);
        match state {
            State::Running => {
                let Some(live) = self.live.as_mut() else {
                    return Err(AgentError::Internal(format!(
                        "sandbox {id} runs without a VM"
                    )));
                };
                if kind == Kind::Image
                    && let Ok(guest) = self.handle.guest()
                {
                    // Flush the guest's page cache so the disk copy is complete.
                    let _ = crate::guest::sync(id, &guest).await;
                }
                self.handle.set(|s| s.state = State::Snapshotting);
                let memory_dir = if kind == Kind::Snapshot {
                    staging.to_path_buf()
                } else {
                    staging.join("discard")
                };
                let (src, dst) = (overlay.clone(), frozen_disk.clone());
                let mut freeze = move || -> BoxFuture<'static, Result<(), BoxError>> {
                    let (src, dst) = (src.clone(), dst.clone());
                    Box::pin(async move {
                        disk::sparse_copy(&src, &dst)
                            .await
                            .map_err(|e| Box::new(e) as BoxError)
                    })
                };
                let saved = live
                    .vm
                    .save(&memory_dir, SaveMode::Checkpoint, Some(&mut freeze))
                    .await;
                self.handle.set(|s| s.state = State::Running);
                if let Err(e) = saved {
                    if live.vm.exited().is_some() {
                        self.vanish().await;
                    }
                    return Err(AgentError::host("freezing the VM", id, e));
                }
                if kind == Kind::Image {
                    let _ = tokio::fs::remove_dir_all(&memory_dir).await;
                }
            }
            State::Paused => {
                disk::sparse_copy(&overlay, &frozen_disk)
                    .await
                    .map_err(|e| AgentError::host("copying the disk", id, e))?;
                if kind == Kind::Snapshot {
                    let fast = tmpfs_snapshot(&self.st);
                    let source = if has_snapshot(&fast) {
                        fast
                    } else {
                        disk_snapshot(&self.dir)
                    };
                    copy_snapshot(&source, staging).await?;
                }
            }
            other => {
                return Err(AgentError::WrongState {
                    id,
                    state: other.as_str(),
                });
            }
        }
        // The disk becomes a standalone sparse image (the overlay's backing file is not
        // the template's to keep).
        let overlay = self.dir.join("rootfs.qcow2");
        let backing = self
            .manager
            .disk_backing(&self.st, &overlay)
            .ok_or_else(|| {
                AgentError::host(
                    "flattening the disk",
                    id,
                    std::io::Error::other("its overlay's backing image is not known"),
                )
            })?;
        let disks = self.manager.inner().disks.clone();
        disks
            .flatten(&frozen_disk, &backing, &rootfs)
            .await
            .map_err(|e| AgentError::host("flattening the disk", id, e))?;
        let _ = tokio::fs::remove_file(&frozen_disk).await;
        match kind {
            Kind::Snapshot => Ok(self.st.disk_size_mb),
            Kind::Image => {
                let bytes = disks
                    .shrink(&rootfs)
                    .await
                    .map_err(|e| AgentError::host("shrinking the disk", id, e))?;
                Ok(u32::try_from(super::min_disk_mb(bytes)).unwrap_or(u32::MAX))
            }
        }
    }
}
