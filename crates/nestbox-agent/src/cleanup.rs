//! Start-up cleanup: removes what a crashed agent left behind, and finds the paused
//! sandboxes that survive.
//!
//! Everything a sandbox takes is recorded before it is taken (see
//! [`crate::sandbox::state`]), so after a crash this module can find and remove, for this
//! agent instance only: VMM processes (killed only if their command line names the
//! sandbox, so a recycled pid is never hit), network namespaces and veth links of the
//! instance's slots, slot files, tmpfs files and sandbox directories.
//!
//! A sandbox that was **paused** needs only files: if its snapshot is intact (on tmpfs, or
//! its on-disk copy after a reboot) it is returned to be adopted, not removed; a VMM and
//! network it still held (stopped, for a fast resume) are removed. Sandboxes that were starting or running when the agent died are
//! gone — their VMM is killed — and the control plane learns it from the agent's list.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use nestbox_hostsys::net::{SandboxNet, SlotAddrs, SlotAllocator};
use nestbox_vmm::snapshot::MANIFEST_FILE;

use crate::sandbox::state::{self, Phase, StateFile};

/// What the cleanup removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// VMM processes killed.
    pub processes: usize,
    /// Network slots torn down.
    pub networks: usize,
    /// Sandbox directories removed.
    pub directories: usize,
    /// Paused sandboxes kept.
    pub paused: usize,
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

/// A paused sandbox whose snapshot can still be restored.
fn adoptable(dir: &Path) -> Option<StateFile> {
    let st = state::read(dir)?;
    if st.phase != Phase::Paused {
        return None;
    }
    let fast = st.mem_dir.join("snapshot").join(MANIFEST_FILE);
    let durable = dir.join("snapshot").join(MANIFEST_FILE);
    let disk = dir.join("rootfs.qcow2");
    (disk.is_file() && (fast.is_file() || (st.snapshot_durable && durable.is_file()))).then_some(st)
}

/// Removes the leftovers of this agent instance and returns the paused sandboxes to adopt.
pub async fn run(
    data_dir: &Path,
    mem_root: &Path,
    slots: &SlotAllocator,
) -> (CleanupReport, Vec<StateFile>) {
    let mut report = CleanupReport::default();
    let mut keep = Vec::new();
    let mut kept_mem: HashSet<PathBuf> = HashSet::new();
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
                    if let Some(slot) = st.slot.take() {
                        if let Err(e) = SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await {
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
                keep.push(st);
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
                if let Some(slot) = left.slot {
                    if let Err(e) = SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await {
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
    // Slots whose sandbox directory was already gone (paused sandboxes hold none).
    if let Ok(owned) = slots.owned() {
        for (slot, holder) in owned {
            tracing::warn!(slot, holder = %holder, "removing a leftover network slot");
            if let Err(e) = SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await {
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
    (report, keep)
}
