//! Start-up recovery: takes back what an earlier run of this agent left running, and
//! removes what cannot be taken back.
//!
//! An agent that crashes, is OOM-killed or is restarted on a new binary leaves its VMMs
//! running (each runs in a session of its own). Everything a sandbox takes is recorded
//! before it is taken (see [`crate::sandbox::state`]), and each VMM keeps a record of its
//! own (see [`nestbox_vmm::Vmm::adopt`]), so for this agent instance only:
//!
//! - a **running** sandbox whose VMM is the same process (pid and start time) and whose
//!   namespace is there is adopted: it keeps running untouched. A pause or snapshot the
//!   crash interrupted is undone (the guest runs again); a pause that had finished but
//!   was not yet recorded is recorded. Pooled clones are adopted the same way, to go back
//!   into their pool;
//! - a **paused** sandbox that held its VMM (stopped, for a fast resume) keeps holding it;
//!   a resume the crash interrupted after its guest ran again is recorded as running;
//! - a paused sandbox without a VMM needs only files: if its snapshot is intact (on tmpfs,
//!   or its on-disk copy after a reboot) it is returned to be adopted;
//! - anything else — a sandbox that was starting, a VMM that cannot be adopted, the
//!   agent's own warm-up builds — is removed: VMM processes (killed only if their command
//!   line names the sandbox, so a recycled pid is never hit), network namespaces and veth
//!   links of the instance's slots, slot files, tmpfs files and sandbox directories. The
//!   control plane learns of such a loss from the agent's list;
//! - a QEMU whose pid no record names (a crash between its start and the record of its
//!   pid) is found by its command line, which names a file under the instance's sandbox
//!   directory, and killed.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nestbox_hostsys::net::SlotAllocator;
use nestbox_vmm::Vm;
use nestbox_vmm::snapshot::{MANIFEST_FILE, MEMORY_FILE};

use crate::host::Host;

use crate::sandbox::state::{self, Phase, StateFile};

/// What the recovery removed and kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// VMM processes killed.
    pub processes: usize,
    /// Network slots torn down.
    pub networks: usize,
    /// Sandbox directories removed.
    pub directories: usize,
    /// Paused sandboxes kept (without a VMM).
    pub paused: usize,
    /// Sandboxes whose VMM was adopted (running, held or pooled).
    pub adopted: usize,
}

/// What the recovery hands to the manager.
#[derive(Default)]
pub struct Recovered {
    /// Paused sandboxes without a VMM.
    pub paused: Vec<StateFile>,
    /// Sandboxes whose VMM was adopted: running ones, pooled clones (`pooled`) and paused
    /// ones holding their VMM ([`Vm::is_held`]).
    pub live: Vec<(StateFile, Box<dyn Vm>)>,
}

/// Whether `slot`'s file names `holder` (a record's slot may be stale: released, and
/// perhaps another sandbox's by now). Slots no record keeps are swept at the end anyway.
fn holds(slots: &SlotAllocator, slot: u32, holder: &str) -> bool {
    slots
        .owned()
        .is_ok_and(|owned| owned.iter().any(|(s, h)| *s == slot && h == holder))
}

/// Takes over the VMM of the sandbox in `dir` if it can be: see the module docs.
async fn adopt_live(host: &Host, dir: &Path) -> Option<(StateFile, Box<dyn Vm>)> {
    let mut st = state::read(dir)?;
    let named = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy() == st.sandbox_id.to_string());
    let slot = st.slot?;
    let pid = st.vmm_pid?;
    if !named || st.internal || st.phase == Phase::Starting || !host.network.exists(slot) {
        return None;
    }
    let vm = match host.vmm.adopt(dir).await {
        Ok(vm) if vm.pid() == pid => vm,
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(sandbox = %st.sandbox_id, error = %e, "its VMM cannot be taken over");
            return None;
        }
    };
    let fast = st.mem_dir.join("snapshot");
    match (st.phase, vm.is_held()) {
        // A pause that finished (held) before it was recorded.
        (Phase::Running, true) => {
            st.phase = Phase::Paused;
            st.snapshot_durable = false;
        }
        // A held VMM's resume that ran the guest before it was recorded.
        (Phase::Paused, false) => {
            st.phase = Phase::Running;
            st.auto_paused = false;
            st.snapshot_durable = false;
            let _ = std::fs::remove_dir_all(&fast);
            let _ = std::fs::remove_dir_all(dir.join("snapshot"));
        }
        _ => {}
    }
    if st.phase == Phase::Running {
        // What an undone pause left: its copy on disk, if it began.
        let _ = std::fs::remove_dir_all(dir.join("snapshot.partial"));
    }
    if let Err(e) = state::write(dir, &st) {
        tracing::warn!(sandbox = %st.sandbox_id, error = %e.public_message(), "recording an adopted sandbox");
        return None;
    }
    Some((st, vm))
}

/// A sandbox recorded as running whose VMM could not be adopted, after a pause that
/// finished (its snapshot is whole: the manifest is written last): recorded as paused,
/// so the paused path below keeps it (and ends a VMM that is left).
fn finish_pause(dir: &Path) {
    let Some(mut st) = state::read(dir) else {
        return;
    };
    if st.phase == Phase::Running && st.mem_dir.join("snapshot").join(MANIFEST_FILE).is_file() {
        tracing::warn!(sandbox = %st.sandbox_id, "a pause finished before a restart: recording it");
        st.phase = Phase::Paused;
        st.snapshot_durable = false;
        let _ = state::write(dir, &st);
    }
}

fn process_mentions(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

async fn kill_and_wait(pid: u32) {
    let Ok(raw) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) on a pid we verified to be one of our VMMs.
    unsafe {
        libc::kill(raw, libc::SIGKILL);
    }
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
    }
}

/// QEMU processes of this instance that nothing accounts for: their command line names a
/// file under the instance's sandbox directory (an absolute path: see [`crate::start`]),
/// and they are not among `keep` (the adopted VMMs). A crash between a VMM's start and
/// the record of its pid leaves one.
fn stray_vmms(sandboxes: &Path, keep: &HashSet<u32>) -> Vec<u32> {
    if !sandboxes.is_absolute() {
        return Vec::new();
    }
    let needle = format!("={}/", sandboxes.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !keep.contains(pid) && *pid != std::process::id())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = raw.split(|b| *b == 0);
            let program = args.next().unwrap_or_default();
            let program = Path::new(std::ffi::OsStr::from_bytes(program));
            program
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"))
                && String::from_utf8_lossy(&raw).contains(&needle)
        })
        .collect()
}

/// A paused sandbox whose snapshot can still be restored.
fn adoptable(dir: &Path) -> Option<StateFile> {
    let st = state::read(dir)?;
    if st.phase != Phase::Paused {
        return None;
    }
    // A resume that a crash interrupted may have taken the RAM file out of the snapshot
    // (to where its VMM maps it): it goes back.
    let snapshot_ram = st.mem_dir.join("snapshot").join(MEMORY_FILE);
    let name = st.vmm_name.clone().unwrap_or(st.sandbox_id.to_string());
    let taken = st.mem_dir.join(format!("{name}.ram"));
    if !snapshot_ram.exists() && taken.is_file() {
        let _ = std::fs::rename(&taken, &snapshot_ram);
    }
    let fast = st.mem_dir.join("snapshot").join(MANIFEST_FILE);
    let durable = dir.join("snapshot").join(MANIFEST_FILE);
    let disk = dir.join("rootfs.qcow2");
    (disk.is_file() && (fast.is_file() || (st.snapshot_durable && durable.is_file()))).then_some(st)
}

/// Adopts what this agent instance left running, removes its other leftovers, and
/// returns the sandboxes to take back.
pub async fn run(
    data_dir: &Path,
    mem_root: &Path,
    slots: &SlotAllocator,
    host: &Host,
) -> (CleanupReport, Recovered) {
    let mut report = CleanupReport::default();
    let mut recovered = Recovered::default();
    let mut kept_mem: HashSet<PathBuf> = HashSet::new();
    let mut kept_slots: HashSet<u32> = HashSet::new();
    let sandboxes = data_dir.join("sandboxes");
    if let Ok(entries) = std::fs::read_dir(&sandboxes) {
        for entry in entries.flatten() {
            let dir = entry.path();
            // A directory's old name (a pooled clone's): the directory itself is handled
            // under its own name; a dangling one goes.
            if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                if !dir.exists() {
                    let _ = std::fs::remove_file(&dir);
                }
                continue;
            }
            if let Some((st, vm)) = adopt_live(host, &dir).await {
                kept_mem.insert(st.mem_dir.clone());
                kept_slots.extend(st.slot);
                report.adopted += 1;
                recovered.live.push((st, vm));
                continue;
            }
            finish_pause(&dir);
            if let Some(mut st) = adoptable(&dir) {
                // A partial on-disk copy from an interrupted persist is useless.
                let _ = std::fs::remove_dir_all(dir.join("snapshot.partial"));
                // A VMM it held (stopped) for a fast resume is not needed: the snapshot is
                // whole.
                if st.vmm_pid.is_some() || st.slot.is_some() {
                    let name = st.vmm_name.clone().unwrap_or(st.sandbox_id.to_string());
                    if let Some(pid) = st.vmm_pid.take()
                        && process_mentions(pid, &name)
                    {
                        tracing::info!(sandbox = %st.sandbox_id, pid, "ending the VMM a paused sandbox held");
                        kill_and_wait(pid).await;
                        report.processes += 1;
                    }
                    // Only a slot still held for it: a stale record (its release was not
                    // recorded) must not take another sandbox's network.
                    if let Some(slot) = st.slot.take()
                        && holds(slots, slot, &st.sandbox_id.to_string())
                    {
                        if let Err(e) = host.network.teardown(slot).await {
                            tracing::error!(slot, error = %e, "removing a held network");
                        }
                        let _ = slots.release(slot);
                        report.networks += 1;
                    }
                    if let Err(e) = state::write(&dir, &st) {
                        tracing::warn!(sandbox = %st.sandbox_id, error = %e.public_message(), "recording the released VMM");
                    }
                }
                kept_mem.insert(st.mem_dir.clone());
                report.paused += 1;
                recovered.paused.push(st);
                continue;
            }
            if let Some(left) = state::read_leftovers(&dir) {
                let name = left.vmm_name.unwrap_or(left.sandbox_id.to_string());
                if let Some(pid) = left.vmm_pid
                    && process_mentions(pid, &name)
                {
                    tracing::warn!(sandbox = %left.sandbox_id, pid, "killing a VMM left by a previous run");
                    kill_and_wait(pid).await;
                    report.processes += 1;
                }
                if let Some(slot) = left.slot
                    && holds(slots, slot, &left.sandbox_id.to_string())
                {
                    if let Err(e) = host.network.teardown(slot).await {
                        tracing::error!(slot, error = %e, "removing a leftover network");
                    }
                    let _ = slots.release(slot);
                    report.networks += 1;
                }
                if let Some(mem) = &left.mem_dir {
                    let _ = std::fs::remove_dir_all(mem);
                }
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                report.directories += 1;
            }
        }
        // Old names whose directory was removed above.
        if let Ok(entries) = std::fs::read_dir(&sandboxes) {
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_symlink()) && !path.exists() {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    // VMMs no record names (started, but killed before their pid was recorded).
    let adopted: HashSet<u32> = recovered.live.iter().map(|(_, vm)| vm.pid()).collect();
    for pid in stray_vmms(&sandboxes, &adopted) {
        tracing::warn!(pid, "killing a VMM no sandbox records");
        kill_and_wait(pid).await;
        report.processes += 1;
    }
    // Slots whose sandbox directory was already gone (paused sandboxes hold none).
    if let Ok(owned) = slots.owned() {
        for (slot, holder) in owned.into_iter().filter(|(s, _)| !kept_slots.contains(s)) {
            tracing::warn!(slot, holder = %holder, "removing a leftover network slot");
            if let Err(e) = host.network.teardown(slot).await {
                tracing::error!(slot, error = %e, "removing a leftover network");
            }
            let _ = slots.release(slot);
            report.networks += 1;
        }
    }
    // Tmpfs directories of sandboxes that are not kept.
    if let Ok(entries) = std::fs::read_dir(mem_root) {
        for e in entries.flatten() {
            if !kept_mem.contains(&e.path()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if report != CleanupReport::default() {
        tracing::warn!(?report, "cleaned up after a previous run");
    }
    (report, recovered)
}
