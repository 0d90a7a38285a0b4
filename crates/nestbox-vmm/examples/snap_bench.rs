//! Snapshot benchmark: boots the `minimal` template once, then measures, RUNS times each,
//! suspend, resume until the guest agent answers, checkpoint, and clone until the guest
//! agent answers; prints medians (and each phase's median).
//!
//! ```text
//! cargo run --release -p nestbox-vmm --example snap_bench -- [IMAGES_DIR] [RUNS] [--memory-mb N]
//! ```
//!
//! `IMAGES_DIR` defaults to `target/nestbox-images`, RUNS to 5, the guest has 512 MiB.
//! Guest RAM and snapshots live on /dev/shm; networking is slirp with a port forward to
//! the guest agent; the guest runs a shell loop writing a counter to its tmpfs throughout.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nestbox_envd::client::EnvdClient;
use nestbox_envd::types::InitRequest;
use nestbox_hostsys::process::Cmd;
use nestbox_image::ImageStore;
use nestbox_vmm::qemu::{ProbeImages, QemuOptions, QemuVmm};
use nestbox_vmm::{
    BoxError, BoxFuture, Disk, DiskFormat, GuestConfig, NetworkSpec, RestoreMemory, SaveMode,
    VmSpec, Vmm,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "nbx-snap-bench-token";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One `GET /health`; true on 204.
async fn healthy(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf[..n].starts_with(b"HTTP/1.1 204"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

/// Polls the guest agent every 2 ms until it answers.
async fn wait_answering(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(port).await {
        if Instant::now() > deadline {
            bail!("the guest agent on port {port} never answered");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn report(name: &str, v: Vec<f64>) {
    let runs: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    println!(
        "{name:<44} {:>8.1} ms   runs: {}",
        median(v),
        runs.join(" ")
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut memory_mb = 512u32;
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--memory-mb" {
            memory_mb = it.next().context("--memory-mb N")?.parse()?;
        } else {
            pos.push(a.as_str());
        }
    }
    let images = pos.first().copied().unwrap_or("target/nestbox-images");
    let runs: usize = pos.get(1).map_or(Ok(5), |s| s.parse()).context("RUNS")?;
    let (template, kernel) = ImageStore::new(images).template_with_kernel("minimal")?;
    let vmm = QemuVmm::new(QemuOptions {
        probe: Some(ProbeImages {
            kernel: kernel.kernel.clone(),
            initrd: kernel.initramfs.clone(),
        }),
        ..Default::default()
    })
    .await?;
    println!(
        "qemu {} accel {}, guest {memory_mb} MiB, {runs} runs",
        vmm.info().version,
        vmm.info().accel.as_str()
    );
    let work = tempfile::tempdir()?;
    let shm = tempfile::Builder::new()
        .prefix("nestbox-snapbench-")
        .tempdir_in("/dev/shm")?;
    let disk = work.path().join("root.qcow2");
    Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&template.rootfs)
        .arg(&disk)
        .arg("2G")
        .run()
        .await?;
    let token_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    };
    let spec = |id: &str, disk: &Path, port: u16| VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mb,
        kernel: kernel.kernel.clone(),
        initrd: Some(kernel.initramfs.clone()),
        cmdline_extra: vec![],
        root_disk: Disk {
            path: disk.to_path_buf(),
            format: DiskFormat::Qcow2,
            backing: None,
        },
        network: NetworkSpec::User { host_port: port },
        guest: GuestConfig {
            access_token_sha256: Some(token_sha.clone()),
            ..Default::default()
        },
        run_dir: work.path().join(format!("run-{id}")),
        memory_dir: shm.path().join("mem"),
        uid: None,
    };

    let port = free_port()?;
    let (mut vm, ready) = nestbox_vmm::boot_and_wait_ready(
        &vmm,
        spec("bench", &disk, port),
        Duration::from_secs(180),
    )
    .await?;
    println!("booted to READY in {:.0} ms", ms(ready.elapsed));
    let client = EnvdClient::new(format!("http://127.0.0.1:{port}"), Some(TOKEN.into()))?;
    wait_answering(port).await?;
    client
        .init(&InitRequest {
            access_token: Some(TOKEN.into()),
            ..Default::default()
        })
        .await?;
    let mut counter = client
        .start(nestbox_envd::process::StartRequest {
            process: Some(nestbox_envd::process::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/counter; sleep 0.1; done"
                        .into(),
                ],
                ..Default::default()
            }),
            stdin: Some(false),
            ..Default::default()
        })
        .await?;
    // The start event: the loop runs.
    futures::StreamExt::next(&mut counter).await;
    drop(counter);

    let (mut suspend_total, mut suspend_manifest) = (Vec::new(), Vec::new());
    let (
        mut resume_call,
        mut resume_answering,
        mut resume_check,
        mut resume_spawn,
        mut resume_load,
    ) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = shm.path().join(format!("pause-{i}"));
        let saved = vm.save(&dir, SaveMode::Suspend, None).await?;
        suspend_total.push(ms(saved.timings.total));
        suspend_manifest.push(ms(saved.timings.manifest));
        let port = free_port()?;
        let started = Instant::now();
        let restored = vmm
            .restore(spec("bench", &disk, port), &dir, RestoreMemory::Resume)
            .await?;
        resume_call.push(ms(started.elapsed()));
        wait_answering(port).await?;
        resume_answering.push(ms(started.elapsed()));
        resume_check.push(ms(restored.timings.check));
        resume_spawn.push(ms(restored.timings.spawn));
        resume_load.push(ms(restored.timings.load));
        drop(vm);
        vm = restored.vm;
        std::fs::remove_dir_all(&dir)?;
    }

    let (mut ck_paused, mut ck_total, mut ck_memory, mut ck_freeze) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut clone_call, mut clone_answering, mut clone_check, mut clone_spawn) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut clone_suspend, mut clone_state_mib, mut clone_resume_answering) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut copy_call, mut copy_answering, mut copy_suspend) =
        (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let dir = shm.path().join(format!("template-{i}"));
        let frozen = work.path().join(format!("frozen-{i}.qcow2"));
        let (from, to) = (disk.clone(), frozen.clone());
        let mut hook = move || -> BoxFuture<'static, Result<(), BoxError>> {
            let (from, to) = (from.clone(), to.clone());
            Box::pin(async move {
                tokio::fs::copy(&from, &to).await?;
                Ok(())
            })
        };
        let saved = vm.save(&dir, SaveMode::Checkpoint, Some(&mut hook)).await?;
        ck_paused.push(ms(saved.timings.paused));
        ck_total.push(ms(saved.timings.total));
        ck_memory.push(ms(saved.timings.memory));
        ck_freeze.push(saved.timings.freeze.map_or(0.0, ms));
        let clone_disk = work.path().join(format!("clone-{i}.qcow2"));
        std::fs::copy(&frozen, &clone_disk)?;
        let port = free_port()?;
        let started = Instant::now();
        let restored = vmm
            .restore(
                spec(&format!("clone{i}"), &clone_disk, port),
                &dir,
                RestoreMemory::Clone,
            )
            .await?;
        clone_call.push(ms(started.elapsed()));
        wait_answering(port).await?;
        clone_answering.push(ms(started.elapsed()));
        clone_check.push(ms(restored.timings.check));
        clone_spawn.push(ms(restored.timings.spawn));
        let mut clone = restored.vm;

        // A copy-clone (its own RAM file, so its suspend is the fast one), from the
        // template as saved: a clone's suspend below reads every page of the template's
        // RAM file through its private mapping, and tmpfs fills the holes it reads.
        let copy_disk = work.path().join(format!("copy-{i}.qcow2"));
        std::fs::copy(&frozen, &copy_disk)?;
        let port = free_port()?;
        let started = Instant::now();
        let restored = vmm
            .restore(
                spec(&format!("copy{i}"), &copy_disk, port),
                &dir,
                RestoreMemory::Copy,
            )
            .await?;
        copy_call.push(ms(started.elapsed()));
        wait_answering(port).await?;
        copy_answering.push(ms(started.elapsed()));
        let mut copy = restored.vm;
        let paused = shm.path().join(format!("copy-paused-{i}"));
        let saved = copy.save(&paused, SaveMode::Suspend, None).await?;
        copy_suspend.push(ms(saved.timings.total));
        std::fs::remove_dir_all(&paused)?;
        drop(copy);
        std::fs::remove_file(&copy_disk)?;

        // A clone's RAM is private: its suspend streams the RAM into the state file.
        let paused = shm.path().join(format!("clone-paused-{i}"));
        let saved = clone.save(&paused, SaveMode::Suspend, None).await?;
        clone_suspend.push(ms(saved.timings.total));
        clone_state_mib.push(saved.manifest.state.size as f64 / f64::from(1u32 << 20));
        let port = free_port()?;
        let started = Instant::now();
        let restored = vmm
            .restore(
                spec(&format!("clone{i}"), &clone_disk, port),
                &paused,
                RestoreMemory::Resume,
            )
            .await?;
        wait_answering(port).await?;
        clone_resume_answering.push(ms(started.elapsed()));
        drop(clone);
        let mut clone = restored.vm;
        clone.stop(Duration::from_secs(10)).await?;
        std::fs::remove_dir_all(&paused)?;

        std::fs::remove_dir_all(&dir)?;
        std::fs::remove_file(&clone_disk)?;
        std::fs::remove_file(&frozen)?;
    }
    vm.stop(Duration::from_secs(10)).await?;

    println!(
        "\nmedians over {runs} runs ({memory_mb} MiB guest, {}):",
        vmm.info().accel.as_str()
    );
    report("suspend (save call, VMM gone)", suspend_total);
    report("  of which digests + manifest", suspend_manifest);
    report("resume: restore call (guest running)", resume_call);
    report("resume: to guest agent answering", resume_answering);
    report("  restore phase: checks", resume_check);
    report("  restore phase: qemu start to QMP", resume_spawn);
    report("  restore phase: state load", resume_load);
    report("checkpoint: guest paused", ck_paused);
    report("checkpoint: save call", ck_total);
    report("  of which RAM copy", ck_memory);
    report("  of which disk freeze hook (concurrent)", ck_freeze);
    report("clone: restore call (guest running)", clone_call);
    report("clone: to guest agent answering", clone_answering);
    report("  restore phase: checks", clone_check);
    report("  restore phase: qemu start to QMP", clone_spawn);
    report("clone suspend (RAM in the state file)", clone_suspend);
    report("  state file, MiB (not ms)", clone_state_mib);
    report(
        "clone resume: to guest agent answering",
        clone_resume_answering,
    );
    report("copy-clone: restore call (guest running)", copy_call);
    report("copy-clone: to guest agent answering", copy_answering);
    report("copy-clone suspend (RAM file moved)", copy_suspend);
    Ok(())
}
