//! Started clones of snapshot templates, kept for creates to take over.
//!
//! Under TCG a freshly restored guest is slow to answer at first: QEMU translates again
//! every code path the guest runs (its network stack, the guest agent, process start-up),
//! a few hundred milliseconds before the first exec returns. A pooled clone has been
//! restored, initialised and exercised (one shell through the process API) ahead of time.
//! A create that matches it takes it over: the clone's directories are renamed to the
//! sandbox's, the VMM is told its new paths (it keeps its open files and mappings), its
//! slot is recorded as the sandbox's, its egress rules are put in force, and one `/init`
//! gives the guest agent the sandbox's token, environment, host name and clock. The result is the same sandbox a restore would
//! have made, minus the cold start.
//!
//! Policy: every create of a clone (a team's snapshot template, or the warm snapshot of a
//! built-in one) tops that template's pool up to `clone_pool` clones in the background;
//! the default template's pool is filled at start-up. A pool not used for
//! [`POOL_IDLE`] is drained, and a full host does not fill. Only creates that ask for the
//! template's own disk size match (a larger disk needs a new overlay).
//!
//! Invariants:
//! - a pooled clone is, on the host, a started sandbox (directory and `state.json`, slot,
//!   namespace, VMM), so a crash is cleaned up like any sandbox's; it is not listed, not
//!   counted as a sandbox, never paused;
//! - a template's pool is drained before its files are deleted, and a clone whose fill
//!   began before a drain of its pool is stopped, not pooled (drains bump that pool's
//!   epoch);
//! - a take never hands over a clone whose VMM exited; a take-over that fails stops the
//!   clone and the create restores as if the pool were empty.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use nestbox_envd::client::EnvdClient;
use nestbox_types::SandboxId;

use super::launch::{Init, Live, hostname, send_init};
use super::state::{self, Phase, StateFile};
use super::{CreateParams, Manager, sandbox_dir};
use crate::error::AgentError;
use crate::guest::{self, ExecParams};
use crate::templates::StoredTemplate;

/// A pool not taken from for this long is drained.
pub(crate) const POOL_IDLE: Duration = Duration::from_secs(600);

/// How often idle pools and dead clones are looked for.
const REAP_EVERY: Duration = Duration::from_secs(30);

/// Which creates a pooled clone can serve: clones of one template generation (its
/// directory) with one disk size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    /// The snapshot template's directory.
    pub template: PathBuf,
    /// Disk size, MiB.
    pub disk_mb: u32,
}

/// The pool key of a create that clones `template` as `st` describes; `None` when no
/// pooled clone can serve it (a disk larger than the template's).
pub(super) fn key(template: &StoredTemplate, st: &StateFile) -> Option<PoolKey> {
    (st.disk_size_mb == template.record.disk_size_mb).then(|| PoolKey {
        template: template.dir.clone(),
        disk_mb: st.disk_size_mb,
    })
}

/// A started clone waiting to be taken over.
pub(crate) struct Pooled {
    st: StateFile,
    live: Live,
    version: String,
}

impl Pooled {
    /// Leaves the clone running for the next run of the agent (see
    /// [`Manager::detach_all`]).
    pub(super) fn detach(self) {
        self.live.detach();
    }
}

/// The pooled clones of this host.
#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
pub(super) struct PoolState {
    pub(super) ready: HashMap<PoolKey, Vec<Pooled>>,
    filling: HashSet<PoolKey>,
    /// When a create last matched each pool.
    wanted: HashMap<PoolKey, Instant>,
    /// Bumped for a pool by each drain of it: a fill that began before does not pool its
    /// clone.
    epochs: HashMap<PoolKey, u64>,
}

impl Pool {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves plain data behind: carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clones pooled or being started.
    pub(crate) fn len(&self) -> usize {
        let s = self.lock();
        s.ready.values().map(Vec::len).sum::<usize>() + s.filling.len()
    }

    /// Guest memory of the clones ready in the pool, MiB.
    pub(crate) fn memory_mb(&self) -> u64 {
        self.lock()
            .ready
            .values()
            .flatten()
            .map(|p| u64::from(p.st.memory_mb))
            .sum()
    }

    /// Whether clones are being started.
    pub(crate) fn filling(&self) -> bool {
        !self.lock().filling.is_empty()
    }
}

impl Manager {
    /// Takes over a pooled clone for `p`, if one is ready; `None`: restore as usual.
    pub(super) async fn take_pooled(
        &self,
        key: &PoolKey,
        p: &CreateParams,
        started: Instant,
    ) -> Option<(StateFile, Live, EnvdClient, String)> {
        loop {
            let mut entry = {
                let mut s = self.inner().pool.lock();
                s.wanted.insert(key.clone(), Instant::now());
                s.ready.get_mut(key)?.pop()?
            };
            if let Some(status) = entry.live.vm.exited() {
                tracing::warn!(clone = %entry.st.sandbox_id, %status, "a pooled clone's VMM exited");
                self.release_pooled(entry).await;
                continue;
            }
            let from = entry.st.sandbox_id;
            match self.take_over(entry, p, started).await {
                Ok(done) => {
                    tracing::debug!(sandbox = %p.id, clone = %from, "took over a pooled clone");
                    return Some(done);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %p.id, clone = %from, error = %e.public_message(), "taking over a pooled clone failed; restoring instead");
                }
            }
        }
    }

    /// Tops the pool of `key` up in the background (`p` is the create it serves).
    pub(super) fn refill_pool(&self, key: PoolKey, p: &CreateParams) {
        if let Some(recipe) = self.begin_fill(key.clone(), p) {
            let manager = self.clone();
            tokio::spawn(async move { manager.fill(key, recipe).await });
        }
    }

    /// Fills the pool of the creates `p` stands for, and returns when it is full (or
    /// cannot be filled). For start-up: the default template's pool.
    pub(crate) async fn prefill_pool(&self, p: &CreateParams) {
        let key = match self.clone_origin_key(p) {
            Some(key) => key,
            None => return,
        };
        if let Some(recipe) = self.begin_fill(key.clone(), p) {
            self.fill(key, recipe).await;
        }
    }

    /// Marks `key` wanted and, if it needs clones and none are being started, as filling;
    /// returns the recipe of its clones then.
    fn begin_fill(&self, key: PoolKey, p: &CreateParams) -> Option<CreateParams> {
        let target = self.inner().cfg.clone_pool as usize;
        if target == 0 || !self.is_open() {
            return None;
        }
        let mut s = self.inner().pool.lock();
        s.wanted.insert(key.clone(), Instant::now());
        let have = s.ready.get(&key).map_or(0, Vec::len);
        if have >= target || !s.filling.insert(key) {
            return None;
        }
        Some(CreateParams {
            id: p.id,
            team: p.team,
            template: p.template.clone(),
            template_id: p.template_id,
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            disk_size_mb: p.disk_size_mb,
            timeout_sec: 0,
            env: HashMap::new(),
            access_token: String::new(),
            no_pool: false,
            default_user: None,
            default_workdir: None,
            egress: Default::default(),
        })
    }

    /// Starts clones for `key` until its pool is full, no longer wanted, or the host is.
    async fn fill(&self, key: PoolKey, recipe: CreateParams) {
        let target = self.inner().cfg.clone_pool as usize;
        loop {
            let epoch = {
                let s = self.inner().pool.lock();
                let wanted = s.wanted.get(&key).is_some_and(|t| t.elapsed() < POOL_IDLE);
                if !wanted || !self.is_open() || s.ready.get(&key).map_or(0, Vec::len) >= target {
                    break;
                }
                s.epochs.get(&key).copied().unwrap_or(0)
            };
            // The pool never takes the last places of a host (it counts this clone), nor
            // memory the host does not have.
            if self.count() + self.inner().pool.len() >= self.inner().cfg.max_sandboxes as usize
                || self.admit_memory(recipe.memory_mb).is_err()
            {
                break;
            }
            let entry = match self.start_pooled(&key, &recipe).await {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(template = %key.template.display(), error = %e.public_message(), "starting a pooled clone failed");
                    break;
                }
            };
            let stale = {
                let mut s = self.inner().pool.lock();
                if s.epochs.get(&key).copied().unwrap_or(0) == epoch {
                    s.ready.entry(key.clone()).or_default().push(entry);
                    None
                } else {
                    Some(entry)
                }
            };
            if let Some(entry) = stale {
                self.release_pooled(entry).await;
                break;
            }
        }
        self.inner().pool.lock().filling.remove(&key);
    }

    /// The pool key of `p`'s creates, if they start as clones.
    fn clone_origin_key(&self, p: &CreateParams) -> Option<PoolKey> {
        self.pool_key_of(p).ok().flatten()
    }

    /// Starts one clone for the pool and exercises it.
    async fn start_pooled(
        &self,
        key: &PoolKey,
        recipe: &CreateParams,
    ) -> Result<Pooled, AgentError> {
        let mut p = recipe.clone();
        p.id = SandboxId::new();
        p.access_token = crate::random_token()?;
        let (st, live, guest, version) = self.launch_for_pool(&p, key).await?;
        let mut entry = Pooled { st, live, version };
        // What its sandbox's first requests will run: a shell, through the process API.
        let warm = ExecParams {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "true".into()],
            env: HashMap::new(),
            cwd: None,
            user: None,
            timeout: Duration::from_secs(30),
            stdin: None,
            max_output: 4096,
        };
        let ready = async {
            guest::run(p.id, &guest, warm, None).await?;
            entry.st.pooled = true;
            entry.st.pool_template = Some(key.template.clone());
            let dir = sandbox_dir(&self.inner().cfg.data_dir, p.id);
            state::write(&dir, &entry.st)
        }
        .await;
        match ready {
            Ok(()) => Ok(entry),
            Err(e) => {
                self.release_pooled(entry).await;
                Err(e)
            }
        }
    }

    /// Puts a pooled clone an earlier run of this agent left running back into its pool
    /// (see [`Manager::adopt_live`]); one whose template is gone, or that the pool has no
    /// room for, is released.
    pub(super) async fn adopt_pooled(&self, st: StateFile, live: Live) {
        let version = st.guest_version.clone();
        let entry = Pooled { st, live, version };
        let key = entry
            .st
            .pool_template
            .clone()
            .filter(|t| t.is_dir())
            .map(|template| PoolKey {
                template,
                disk_mb: entry.st.disk_size_mb,
            });
        let target = self.inner().cfg.clone_pool as usize;
        let rejected = match key {
            Some(key) => {
                let mut s = self.inner().pool.lock();
                let ready = s.ready.entry(key.clone()).or_default();
                if ready.len() < target {
                    tracing::info!(clone = %entry.st.sandbox_id, "took back a pooled clone");
                    ready.push(entry);
                    s.wanted.insert(key, Instant::now());
                    None
                } else {
                    Some(entry)
                }
            }
            None => Some(entry),
        };
        if let Some(entry) = rejected {
            self.release_pooled(entry).await;
        }
    }

    /// Stops a pooled clone and removes everything it holds.
    async fn release_pooled(&self, entry: Pooled) {
        let Pooled { mut st, live, .. } = entry;
        let dir = sandbox_dir(&self.inner().cfg.data_dir, st.sandbox_id);
        if let Some(e) = self.release(&mut st, Some(live), &dir, true).await {
            tracing::warn!(clone = %st.sandbox_id, error = %e.public_message(), "releasing a pooled clone");
        }
    }

    /// Makes a pooled clone sandbox `p.id`: files renamed, VMM told, slot recorded,
    /// guest agent initialised. On failure the clone is released.
    async fn take_over(
        &self,
        entry: Pooled,
        p: &CreateParams,
        started: Instant,
    ) -> Result<(StateFile, Live, EnvdClient, String), AgentError> {
        let inner = self.inner();
        let Pooled {
            mut st,
            mut live,
            version,
        } = entry;
        let id = p.id;
        let from_dir = sandbox_dir(&inner.cfg.data_dir, st.sandbox_id);
        let dir = sandbox_dir(&inner.cfg.data_dir, id);
        if let Err(e) = tokio::fs::rename(&from_dir, &dir).await {
            self.release(&mut st, Some(live), &from_dir, true).await;
            return Err(AgentError::host("moving a pooled clone's files", id, e));
        }
        // The VMM reopens its disk by path when a pause hands the image over (QEMU cannot
        // change a read-write file descriptor into a read-only one): the old name stays as
        // a symlink.
        let alias = dir.file_name().map(PathBuf::from).unwrap_or_default();
        if let Err(e) = tokio::fs::symlink(&alias, &from_dir).await {
            self.release(&mut st, Some(live), &dir, true).await;
            return Err(AgentError::host("linking a pooled clone's old name", id, e));
        }
        st.dir_alias = Some(from_dir);
        let memory = self.mem_dir(id);
        if let Err(e) = tokio::fs::rename(&st.mem_dir, &memory).await {
            self.release(&mut st, Some(live), &dir, true).await;
            return Err(AgentError::host("moving a pooled clone's memory", id, e));
        }
        st.mem_dir = memory;
        live.vm.relocate(&dir, &st.mem_dir);
        let pool_token = std::mem::replace(&mut st.access_token, p.access_token.clone());
        st.sandbox_id = id;
        st.team_id = p.team;
        st.template = p.template.clone();
        st.template_id = p.template_id;
        st.timeout_sec = p.timeout_sec;
        st.pooled = false;
        st.pool_template = None;
        // Starting until its guest holds the sandbox's token: a crash before that is an
        // interrupted create (rolled back), never a running sandbox whose guest refuses
        // the token on record.
        st.phase = Phase::Starting;
        let taken = async {
            // The tenant's egress rules hold before the sandbox is theirs.
            let egress = super::egress::parse(id, &p.egress)?;
            st.egress = egress.rules();
            live.egress
                .replace(egress)
                .await
                .map_err(|e| AgentError::host("putting the egress rules in force", id, e))?;
            if let Some(slot) = st.slot {
                inner
                    .slots
                    .reassign(slot, &id.to_string())
                    .map_err(|e| AgentError::host("recording the slot's holder", id, e))?;
            }
            state::write(&dir, &st)?;
            let guest = self.guest_client(id, &live.net, &p.access_token)?;
            let init = Init {
                present: Some(pool_token),
                token: p.access_token.clone(),
                env: Some(p.env.clone()),
                hostname: Some(hostname(id)),
                defaults: super::launch::Defaults::of(p),
            };
            let deadline = started + inner.cfg.boot_timeout;
            let console = dir.join("console.log");
            send_init(&guest, init, live.vm.as_mut(), id, deadline, &console).await?;
            st.phase = Phase::Running;
            st.started_at = Utc::now();
            st.boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            state::write(&dir, &st)?;
            Ok::<_, AgentError>(guest)
        }
        .await;
        match taken {
            Ok(guest) => Ok((st, live, guest, version)),
            Err(e) => {
                self.release(&mut st, Some(live), &dir, true).await;
                Err(e)
            }
        }
    }

    /// Stops the pooled clones of the pools `which` selects, and keeps those pools empty
    /// until a create wants them again (before a template's files are deleted; shutdown).
    pub(crate) async fn drain_pool(&self, which: impl Fn(&PoolKey) -> bool) {
        let drained: Vec<Pooled> = {
            let mut s = self.inner().pool.lock();
            let touched: HashSet<PoolKey> = s
                .ready
                .keys()
                .chain(s.filling.iter())
                .chain(s.wanted.keys())
                .filter(|k| which(k))
                .cloned()
                .collect();
            for k in touched {
                *s.epochs.entry(k).or_default() += 1;
            }
            s.wanted.retain(|k, _| !which(k));
            let keys: Vec<PoolKey> = s.ready.keys().filter(|k| which(k)).cloned().collect();
            keys.iter()
                .filter_map(|k| s.ready.remove(k))
                .flatten()
                .collect()
        };
        for entry in drained {
            self.release_pooled(entry).await;
        }
    }

    /// Drains pools not used for [`POOL_IDLE`] and drops clones whose VMM exited, every
    /// [`REAP_EVERY`], for the life of the runtime.
    pub(crate) fn start_pool_reaper(&self) {
        let weak = std::sync::Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticks: u64 = 0;
            loop {
                tokio::time::sleep(REAP_EVERY).await;
                // The agent is gone once nothing else holds its manager.
                let Some(inner) = weak.upgrade() else { return };
                let manager = Manager { inner };
                let idle: HashSet<PoolKey> = {
                    let s = manager.inner().pool.lock();
                    s.ready
                        .keys()
                        .filter(|k| s.wanted.get(*k).is_none_or(|t| t.elapsed() >= POOL_IDLE))
                        .cloned()
                        .collect()
                };
                if !idle.is_empty() {
                    tracing::info!(pools = idle.len(), "draining idle clone pools");
                    manager.drain_pool(|k| idle.contains(k)).await;
                }
                let dead: Vec<Pooled> = {
                    let mut s = manager.inner().pool.lock();
                    let mut dead = Vec::new();
                    for entries in s.ready.values_mut() {
                        let mut i = 0;
                        while i < entries.len() {
                            if entries[i].live.vm.exited().is_some() {
                                dead.push(entries.swap_remove(i));
                            } else {
                                i += 1;
                            }
                        }
                    }
                    dead
                };
                for entry in dead {
                    tracing::warn!(clone = %entry.st.sandbox_id, "a pooled clone's VMM exited");
                    manager.release_pooled(entry).await;
                }
                // Every 10 minutes: base images nothing uses any more.
                ticks += 1;
                if ticks.is_multiple_of(20) {
                    manager.prune_bases().await;
                }
            }
        });
    }
}
