//! Boot benchmark: boots the `minimal` template N times under the chosen accelerator
//! and prints the time from `boot` to the guest's `NESTBOX-READY` line.
//!
//! ```text
//! cargo run -p nestbox-vmm --example boot_bench -- [IMAGES_DIR] [RUNS] [--console]
//! ```
//!
//! `IMAGES_DIR` defaults to `target/nestbox-images`; `--console` prints the first run's
//! serial console.

use std::time::Duration;

use anyhow::Context;
use nestbox_hostsys::process::Cmd;
use nestbox_image::ImageStore;
use nestbox_vmm::qemu::{ProbeImages, QemuOptions, QemuVmm};
use nestbox_vmm::{Disk, DiskFormat, GuestConfig, NetworkSpec, VmSpec, Vmm};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let show_console = args.iter().any(|a| a == "--console");
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let images = pos.first().map_or("target/nestbox-images", |s| s.as_str());
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
        "qemu {} accel {}",
        vmm.info().version,
        vmm.info().accel.as_str()
    );
    let dir = tempfile::tempdir()?;
    // Guest RAM on tmpfs, as the host agent runs it.
    let shm = tempfile::Builder::new()
        .prefix("nestbox-bench-")
        .tempdir_in("/dev/shm")?;
    let mut times = Vec::new();
    for i in 0..runs {
        let disk = dir.path().join(format!("root{i}.qcow2"));
        Cmd::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&template.rootfs)
            .arg(&disk)
            .arg("2G")
            .run()
            .await?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spec = VmSpec {
            id: format!("bench{i}"),
            vcpus: 1,
            memory_mb: 512,
            kernel: kernel.kernel.clone(),
            initrd: Some(kernel.initramfs.clone()),
            cmdline_extra: vec![],
            root_disk: Disk {
                path: disk.clone(),
                format: DiskFormat::Qcow2,
                backing: None,
            },
            network: NetworkSpec::User { host_port: port },
            guest: GuestConfig::default(),
            run_dir: dir.path().join(format!("run{i}")),
            memory_dir: shm.path().to_path_buf(),
            uid: None,
        };
        let (mut vm, ready) =
            nestbox_vmm::boot_and_wait_ready(&vmm, spec, Duration::from_secs(120)).await?;
        println!(
            "run {i}: READY after {} ms (guest uptime {} ms)",
            ready.elapsed.as_millis(),
            ready.guest_uptime_ms.unwrap_or_default()
        );
        times.push(ready.elapsed.as_millis());
        vm.stop(Duration::from_secs(10)).await?;
        if i == 0 && show_console {
            println!("{}", std::fs::read_to_string(vm.console_log())?);
        }
        std::fs::remove_file(&disk)?;
    }
    times.sort();
    if let Some(median) = times.get(times.len() / 2) {
        println!("median READY {median} ms over {runs} runs: {times:?}");
    }
    Ok(())
}
