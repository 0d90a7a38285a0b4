//! Warm snapshots of the built-in templates: "minimal ships as a snapshot template too".
//!
//! At start-up the agent boots each configured built-in template once with the default
//! machine (vCPUs, memory, disk), freezes it into a snapshot template, and from then on a
//! create that asks for exactly that machine restores a clone of it (tens of milliseconds
//! under the VMM) instead of booting (seconds). Warm snapshots are keyed by everything they
//! depend on — the template and kernel builds, the VMM and its accelerator, the machine —
//! and live in a machine-wide directory shared by every agent on the host, guarded by a
//! file lock so two agents never build the same one at once. A create that does not match,
//! or comes before the warm snapshot is ready, simply boots.
//!
//! Generations do not pile up: once a template's warm snapshot is ready, the same
//! template's snapshots under other keys that were built more than [`STALE_AFTER`] ago are
//! deleted (another agent still restoring from one falls back to booting).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use nestbox_types::limits::{DEFAULT_MEMORY_MB, DEFAULT_VCPUS};
use nestbox_types::{PLATFORM_TEAM, SandboxId};
use sha2::{Digest, Sha256};

use super::{CreateParams, Manager, State};
use crate::error::AgentError;
use crate::templates::{Kind, StoredTemplate, TemplateStore};

/// How old another generation of a warm snapshot must be before it is deleted.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Bumped when the way warm snapshots are made changes.
const WARM_FORMAT: u32 = 1;

/// The warm snapshots this agent may restore from.
pub(crate) struct Warm {
    store: TemplateStore,
    ready: Mutex<HashMap<String, Entry>>,
    settled: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    vcpus: u32,
    memory_mb: u32,
    disk_mb: u64,
}

impl Warm {
    pub(crate) fn new(store: TemplateStore) -> Self {
        Self {
            store,
            ready: Mutex::new(HashMap::new()),
            settled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The warm snapshot of `template` if it is ready and made for exactly this machine.
    pub(crate) fn get(
        &self,
        template: &str,
        vcpus: u32,
        memory_mb: u32,
        disk_mb: u64,
    ) -> Option<StoredTemplate> {
        let entry = self.ready.lock().ok()?.get(template).cloned()?;
        if (entry.vcpus, entry.memory_mb, entry.disk_mb) != (vcpus, memory_mb, disk_mb) {
            return None;
        }
        match self.store.get(&entry.key) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(template, error = %e.public_message(), "warm snapshot unusable; booting instead");
                if let Ok(mut ready) = self.ready.lock() {
                    ready.remove(template);
                }
                None
            }
        }
    }

    fn set_ready(&self, template: &str, entry: Entry) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.insert(template.to_string(), entry);
        }
    }

    /// Whether the start-up warm-up has finished (whatever its outcome).
    pub(crate) fn settled(&self) -> bool {
        self.settled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Forgets the warm snapshot of `template` (it failed to restore).
    pub(crate) fn forget(&self, template: &str) {
        if let Ok(mut ready) = self.ready.lock() {
            ready.remove(template);
        }
    }
}

/// Builds or finds the warm snapshot of every configured template.
pub(crate) async fn warm_up(manager: Manager) {
    let names = manager.inner().cfg.warm_templates.clone();
    for name in names {
        if !manager.templates().contains(&name) {
            continue;
        }
        match warm_one(&manager, &name).await {
            Ok(key) => {
                tracing::info!(template = %name, key, "warm snapshot ready: default creates restore instead of booting")
            }
            Err(e) => {
                tracing::warn!(template = %name, error = %e.public_message(), "no warm snapshot; creates boot")
            }
        }
    }
    // The default create is the most common one: have a clone of it ready.
    let default = nestbox_types::limits::DEFAULT_TEMPLATE;
    if manager.templates().iter().any(|t| t == default)
        && let Ok(params) = default_machine(default, manager.inner().cfg.default_disk_mb)
    {
        manager.prefill_pool(&params).await;
    }
    manager
        .inner()
        .warm
        .settled
        .store(true, std::sync::atomic::Ordering::Release);
}

/// A create of built-in template `name` on the default machine, by the platform.
fn default_machine(name: &str, disk_mb: u64) -> Result<CreateParams, AgentError> {
    Ok(CreateParams {
        id: SandboxId::new(),
        team: PLATFORM_TEAM,
        template: name.to_string(),
        template_id: None,
        vcpus: DEFAULT_VCPUS,
        memory_mb: DEFAULT_MEMORY_MB,
        disk_size_mb: u32::try_from(disk_mb).unwrap_or(u32::MAX),
        timeout_sec: 0,
        env: HashMap::new(),
        access_token: crate::random_token()?,
        no_pool: false,
        default_user: None,
        default_workdir: None,
        egress: Default::default(),
    })
}

fn key_for(manager: &Manager, name: &str, disk_mb: u64) -> Result<String, AgentError> {
    let inner = manager.inner();
    let (image, kernel) = inner
        .images
        .template_with_kernel(name)
        .map_err(|e| AgentError::Internal(format!("template {name}: {e}")))?;
    let material = serde_json::json!({
        "format": WARM_FORMAT,
        "template": image.manifest.inputs_hash,
        "kernel": kernel.manifest.inputs_hash,
        // The same inputs can build different bytes (an initramfs archive records times),
        // and a snapshot only restores on the exact kernel and initramfs it booted: a
        // rebuild therefore makes a new key.
        "kernel_built_at": kernel.manifest.built_at,
        "template_built_at": image.manifest.built_at,
        "vmm": inner.vmm.info().to_string(),
        "cpu": inner.vmm.info().cpu,
        "vcpus": DEFAULT_VCPUS,
        "memory_mb": DEFAULT_MEMORY_MB,
        "disk_mb": disk_mb,
        // The guest's resolv.conf is written at boot: a snapshot keeps the servers it had.
        "dns": inner.dns,
    });
    Ok(format!(
        "{name}-{}",
        &hex::encode(Sha256::digest(material.to_string().as_bytes()))[..16]
    ))
}

async fn warm_one(manager: &Manager, name: &str) -> Result<String, AgentError> {
    let disk_mb = manager.inner().cfg.default_disk_mb;
    let key = key_for(manager, name, disk_mb)?;
    let store = manager.inner().warm.store.clone();
    let entry = Entry {
        key: key.clone(),
        vcpus: DEFAULT_VCPUS,
        memory_mb: DEFAULT_MEMORY_MB,
        disk_mb,
    };
    if store.get(&key).is_ok() {
        manager.inner().warm.set_ready(name, entry);
        prune_stale(store.root(), name, &key, STALE_AFTER);
        return Ok(key);
    }
    // One builder per key on this machine: the others wait, then find it built.
    let lock_path = store.root().join(format!(".{key}.lock"));
    let lock = tokio::task::spawn_blocking(move || -> Result<std::fs::File, std::io::Error> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        // SAFETY: flock(2) on a file descriptor we own for the call's duration.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(file)
    })
    .await
    .map_err(|e| AgentError::Internal(e.to_string()))?
    .map_err(|e| AgentError::Internal(format!("locking the warm snapshot: {e}")))?;
    let result = async {
        if store.get(&key).is_ok() {
            return Ok(());
        }
        build(manager, name, &store, &key, disk_mb).await
    }
    .await;
    drop(lock);
    result?;
    manager.inner().warm.set_ready(name, entry);
    prune_stale(store.root(), name, &key, STALE_AFTER);
    Ok(key)
}

/// Deletes `template`'s warm snapshots other than `current` built more than `older_than`
/// ago, with their lock files. Failures are logged: a leftover only costs disk.
fn prune_stale(
    root: &std::path::Path,
    template: &str,
    current: &str,
    older_than: std::time::Duration,
) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let prefix = format!("{template}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(suffix) = name.strip_prefix(&prefix) else {
            continue;
        };
        // Only keys of this template (`{template}-{16 hex}`), never another template
        // whose name merely starts the same way.
        if name == current || suffix.len() != 16 || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= older_than);
        if !old {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => {
                let _ = std::fs::remove_file(root.join(format!(".{name}.lock")));
                tracing::info!(template, key = %name, "deleted an old warm snapshot");
            }
            Err(e) => {
                tracing::warn!(template, key = %name, error = %e, "deleting an old warm snapshot")
            }
        }
    }
}

async fn build(
    manager: &Manager,
    name: &str,
    store: &TemplateStore,
    key: &str,
    disk_mb: u64,
) -> Result<(), AgentError> {
    let params = default_machine(name, disk_mb)?;
    let id = params.id;
    let handle = manager.create_inner(params, true).await?;
    let made = if handle.state() == State::Running {
        handle
            .request(|reply| super::Command::CreateTemplate {
                store: store.clone(),
                key: key.to_string(),
                kind: Kind::Snapshot,
                move_of: false,
                reply,
            })
            .await
    } else {
        Err(AgentError::WrongState {
            id,
            state: handle.state().as_str(),
        })
    };
    if let Err(e) = handle
        .request(|reply| super::Command::Destroy { reply })
        .await
    {
        tracing::warn!(sandbox = %id, error = %e.public_message(), "removing the warm-up sandbox");
    }
    made.map(|_| ())
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    #[test]
    fn old_generations_of_the_same_template_go_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str| std::fs::create_dir(root.path().join(name)).unwrap();
        let current = "minimal-0123456789abcdef";
        make(current);
        make("minimal-fedcba9876543210");
        std::fs::write(root.path().join(".minimal-fedcba9876543210.lock"), b"").unwrap();
        make("minimal-extra-0123456789abcdef");
        make("python-0123456789abcdef");
        make(".staging-x");
        // Too recent: kept.
        prune_stale(root.path(), "minimal", current, STALE_AFTER);
        assert!(root.path().join("minimal-fedcba9876543210").exists());
        // Old enough: the other generation and its lock go, the rest stays.
        prune_stale(root.path(), "minimal", current, std::time::Duration::ZERO);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".staging-x",
                current,
                "minimal-extra-0123456789abcdef",
                "python-0123456789abcdef"
            ]
        );
    }
}
