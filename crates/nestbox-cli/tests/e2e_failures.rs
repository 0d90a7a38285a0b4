//! Failure paths with real VMs: a failed boot releases everything and leaves the sandbox
//! `error` with its reason; after a crash of `nestbox up` its next start takes back what
//! survived and cleans up what did not; a host without the tools gets a clear error; many
//! create/destroy cycles leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Nestbox, assert_gone, eventually, footprint, instance_slots, sh_ok, vmm_alive};
use nestbox_types::api::CreateSandboxRequest;
use nestbox_types::{ErrorCode, SandboxStatus};

fn qemu_of(id: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c).contains(id)
                    && String::from_utf8_lossy(&c).contains("qemu")
            })
            .unwrap_or(false)
    })
}

#[tokio::test]
async fn a_failed_boot_releases_everything_and_records_the_reason() {
    // One second is far too short for a TCG boot: every create that boots fails after the
    // VM started. (A non-default machine boots instead of restoring the warm snapshot.)
    // No pooled clones: the checks below count everything the instance holds.
    let nb = Nestbox::up_env(&[("NESTBOX_BOOT_TIMEOUT", "1"), ("NESTBOX_CLONE_POOL", "0")]);
    let client = nb.client();
    let err = client
        .create_sandbox(&CreateSandboxRequest {
            memory_mb: Some(384),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("failed to start"), "{msg}");
    let page = client
        .list_sandboxes(&nestbox_types::api::SandboxListQuery {
            status: Some("error".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let sb = page
        .items
        .first()
        .expect("the failed sandbox is listed as error");
    assert_eq!(sb.status, SandboxStatus::Error);
    assert!(
        sb.error
            .as_deref()
            .unwrap_or_default()
            .contains("did not boot"),
        "{:?}",
        sb.error
    );
    let id = sb.id.to_string();
    assert!(
        instance_slots(&nb.tag()).is_empty(),
        "no network slot is held"
    );
    assert!(!qemu_of(&id), "no VMM is left");
    assert!(
        !nb.data_dir().join("agent/sandboxes").join(&id).exists(),
        "no files are left"
    );
    assert!(
        !Path::new(&format!("/dev/shm/nestbox-{}/{id}", nb.tag())).exists(),
        "no guest memory is left"
    );
    // Destroying a failed sandbox is allowed and makes it stopped.
    client.destroy_sandbox(sb.id).await.unwrap();
    assert_eq!(
        client.get_sandbox(sb.id).await.unwrap().status,
        SandboxStatus::Stopped
    );
}

#[tokio::test]
async fn a_crash_is_cleaned_up_on_the_next_start() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    let sb = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    let fp = footprint(&nb, sb.id);
    // Guest RAM and sandbox files sit in directories only the agent's user may enter.
    for dir in [
        fp.mem_dir.parent().unwrap(),
        fp.sandbox_dir.parent().unwrap(),
    ] {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(dir).unwrap();
        assert!(meta.is_dir(), "{} is a real directory", dir.display());
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid()),
            (0o700, 0),
            "{}",
            dir.display()
        );
    }
    let kept = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let kept_vmm = footprint(&nb, kept).vmm_pid;
    nb.kill();
    // The VMM runs in its own session: it survives the crash of its agent…
    assert!(
        qemu_of(&sb.id.to_string()),
        "the VMM outlives a crashed agent"
    );
    // …unless something else ends it while the agent is down (the kernel's OOM killer,
    // an operator).
    // SAFETY: kill(2) on the VMM of this test's sandbox, checked just above.
    unsafe {
        libc::kill(fp.vmm_pid as i32, libc::SIGKILL);
    }
    eventually(Duration::from_secs(30), "the VMM to be gone", || async {
        (!vmm_alive(fp.vmm_pid, &fp.vmm_name)).then_some(())
    })
    .await;

    nb.restart();
    // The leftovers of the lost sandbox are gone; the other one was taken back.
    assert_gone(&nb, &fp, sb.id);
    assert_eq!(footprint(&nb, kept).vmm_pid, kept_vmm);
    // …and the control plane learns that the sandbox was lost.
    let client = nb.client();
    let status = eventually(
        Duration::from_secs(60),
        "the monitor to mark the sandbox lost",
        || {
            let client = client.clone();
            async move {
                let s = client.get_sandbox(sb.id).await.ok()?;
                (s.status == SandboxStatus::Error).then_some(s)
            }
        },
    )
    .await;
    assert!(status.error.unwrap_or_default().contains("lost"));
    assert_eq!(
        client.get_sandbox(kept).await.unwrap().status,
        SandboxStatus::Running
    );
    sh_ok(&client, kept, "true").await;
    client.destroy_sandbox(kept).await.unwrap();
    // The restarted instance works.
    let again = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    client.destroy_sandbox(again.id).await.unwrap();
}

#[tokio::test]
async fn create_destroy_cycles_leave_nothing_behind() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    for i in 0..8 {
        // Alternate restores of the warm snapshot (default machine) and fresh boots.
        let memory_mb = if i % 2 == 0 { None } else { Some(256) };
        let sb = client
            .create_sandbox(&CreateSandboxRequest {
                memory_mb,
                ..Default::default()
            })
            .await
            .unwrap();
        let fp = footprint(&nb, sb.id);
        client.destroy_sandbox(sb.id).await.unwrap();
        assert_gone(&nb, &fp, sb.id);
    }
    // The default template's pooled clone is the only thing the instance still holds; a
    // clean stop removes it too.
    nb.stop();
    assert!(instance_slots(&nb.tag()).is_empty());
    let left: Vec<_> = std::fs::read_dir(nb.data_dir().join("agent/sandboxes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "sandbox directories left: {left:?}");
}

#[tokio::test]
async fn validation_happens_before_anything_is_taken() {
    // No pooled clones: the checks below count everything the instance holds.
    let nb = Nestbox::up_env(&[("NESTBOX_CLONE_POOL", "0")]);
    let client = nb.client();
    let cases = [
        (
            CreateSandboxRequest {
                template: Some("no-such-template".into()),
                ..Default::default()
            },
            ErrorCode::TemplateNotFound,
        ),
        (
            CreateSandboxRequest {
                vcpus: Some(1000),
                ..Default::default()
            },
            ErrorCode::LimitExceeded,
        ),
        (
            CreateSandboxRequest {
                memory_mb: Some(10_000_000),
                ..Default::default()
            },
            ErrorCode::LimitExceeded,
        ),
        (
            CreateSandboxRequest {
                disk_size_mb: Some(16),
                ..Default::default()
            },
            ErrorCode::InvalidRequest,
        ),
        (
            CreateSandboxRequest {
                template: Some("../etc".into()),
                ..Default::default()
            },
            ErrorCode::InvalidRequest,
        ),
    ];
    for (req, code) in cases {
        let err = client.create_sandbox(&req).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
    }
    let all = client
        .list_sandboxes(&nestbox_types::api::SandboxListQuery {
            status: Some("pending,starting,running,error".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(all.items.is_empty(), "rejected requests create nothing");
    assert!(instance_slots(&nb.tag()).is_empty());
    // No credentials → 401.
    let err = nb
        .anonymous()
        .list_sandboxes(&Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
}

#[test]
fn a_host_without_qemu_gets_a_clear_error() {
    let _ = common::images_dir();
    let bin = tempfile::tempdir().unwrap();
    for tool in [
        "ip",
        "nft",
        "qemu-img",
        "resize2fs",
        "e2fsck",
        "cp",
        "mkfs.ext4",
        "sh",
    ] {
        let path = which(tool);
        std::os::unix::fs::symlink(path, bin.path().join(tool)).unwrap();
    }
    let dir = tempfile::Builder::new()
        .prefix("nbx-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nestbox"))
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--images-dir")
        .arg(common::images_dir())
        .env("PATH", bin.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("apt-get install qemu-system-x86"),
        "{stderr}"
    );
}

fn which(tool: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not installed"))
}

#[tokio::test]
async fn guest_memory_is_admitted_only_as_far_as_its_memory_filesystem_holds_it() {
    // A small memory filesystem of its own: room for two default guests (512 MiB), one
    // of which the start-up warm-up may hold for a while.
    let shm = tempfile::Builder::new()
        .prefix("nbx-shm-")
        .tempdir_in("/tmp")
        .unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1200m,mode=0700", "tmpfs"])
        .arg(shm.path())
        .status()
        .unwrap();
    assert!(mounted.success());
    let shm_dir = shm.path().to_string_lossy().into_owned();
    let nb = Nestbox::up_env(&[
        ("NESTBOX_MEMORY_DIR", shm_dir.as_str()),
        ("NESTBOX_CLONE_POOL", "0"),
    ]);
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let fa = footprint(&nb, a);
    assert!(
        fa.mem_dir.starts_with(shm.path()),
        "guest RAM lives on the configured memory filesystem: {}",
        fa.mem_dir.display()
    );
    // A second one does not fit next to it (and a warm-up build): refused, retryable,
    // and nothing of it is left on the host.
    let refused = client
        .create_sandbox(&CreateSandboxRequest {
            memory_mb: Some(768),
            ..Default::default()
        })
        .await
        .expect_err("more guest memory than the filesystem holds");
    assert_eq!(refused.code(), Some(ErrorCode::NoCapacity), "{refused}");
    assert!(refused.to_string().contains("guest memory"), "{refused}");
    // Memory given back is admitted again (once a warm-up build, if any, is done).
    client.destroy_sandbox(a).await.unwrap();
    assert_gone(&nb, &fa, a);
    let b = eventually(Duration::from_secs(180), "room for the guest", || async {
        client
            .create_sandbox(&CreateSandboxRequest {
                memory_mb: Some(768),
                ..Default::default()
            })
            .await
            .ok()
            .map(|sb| sb.id)
    })
    .await;
    client.destroy_sandbox(b).await.unwrap();
    drop(nb);
    let _ = std::process::Command::new("umount")
        .arg(shm.path())
        .status();
}
