//! Boots real VMs under QEMU TCG from the images built by `make test-images` and checks
//! the boot contract:
//! READY marker, the guest agent answering through the forwarded port, the root
//! filesystem grown to the disk, and a clean stop (process reaped, run files gone).
//!
//! Images come from `$NESTBOX_TEST_IMAGES` (default `<workspace>/target/nestbox-images`).

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nestbox_hostsys::process::Cmd;
use nestbox_image::{ImageStore, KernelImage, TemplateImage};
use nestbox_vmm::qemu::{ProbeImages, QemuOptions, QemuVmm};
use nestbox_vmm::{
    AccelChoice, Disk, DiskFormat, GuestConfig, NetworkSpec, Vm, VmSpec, Vmm, VmmError,
};

const READY_WITHIN: Duration = Duration::from_secs(120);

fn images_dir() -> PathBuf {
    match std::env::var_os("NESTBOX_TEST_IMAGES") {
        Some(d) => d.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nestbox-images"),
    }
}

fn images() -> (TemplateImage, KernelImage) {
    let dir = images_dir();
    ImageStore::new(&dir)
        .template_with_kernel("minimal")
        .unwrap_or_else(|e| {
            panic!(
                "no test images in {} ({e}).\nBuild them with `make test-images` (as root, a few \
             minutes the first time), or point NESTBOX_TEST_IMAGES at an existing output directory",
                dir.display()
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn tcg() -> QemuVmm {
    QemuVmm::new(QemuOptions {
        accel: AccelChoice::Tcg,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A qcow2 overlay over the shared template image, so tests never write to it.
async fn overlay(base: &Path, dir: &Path, size: &str) -> PathBuf {
    let disk = dir.join("root.qcow2");
    Cmd::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(&disk)
        .arg(size)
        .run()
        .await
        .unwrap();
    disk
}

fn spec(id: &str, kernel: &KernelImage, disk: Disk, network: NetworkSpec, dir: &Path) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 1,
        memory_mb: 512,
        kernel: kernel.kernel.clone(),
        initrd: Some(kernel.initramfs.clone()),
        cmdline_extra: vec![],
        root_disk: disk,
        network,
        guest: GuestConfig {
            hostname: Some(id.into()),
            ..Default::default()
        },
        run_dir: dir.join("run"),
        memory_dir: dir.join("mem"),
        uid: None,
    }
}

fn http_status(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn process_gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))
}

#[tokio::test]
async fn boots_to_ready_serves_health_and_stops_clean() {
    let (template, kernel) = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&template.rootfs, dir.path(), "1G").await;
    let port = free_port();
    let vmm = tcg().await;
    assert_eq!(vmm.info().name, "qemu");
    let s = spec(
        "boot-ready",
        &kernel,
        Disk {
            path: disk,
            format: DiskFormat::Qcow2,
            backing: None,
        },
        NetworkSpec::User { host_port: port },
        dir.path(),
    );
    let memory_file = s.memory_dir.join("boot-ready.ram");
    let (mut vm, ready) = nestbox_vmm::boot_and_wait_ready(&vmm, s, READY_WITHIN)
        .await
        .unwrap();
    eprintln!(
        "READY after {} ms (guest uptime {:?} ms) under {}",
        ready.elapsed.as_millis(),
        ready.guest_uptime_ms,
        vmm.info().accel.as_str()
    );
    assert!(ready.guest_uptime_ms.is_some());
    assert!(memory_file.exists(), "guest RAM should be a file");
    assert_eq!(vm.run_state().await.unwrap(), "running");
    // QEMU runs under its seccomp filter (mode 2).
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    assert!(
        proc_status.lines().any(|l| l == "Seccomp:\t2"),
        "no seccomp filter:\n{proc_status}"
    );

    let status = http_status(port, "/health").unwrap();
    assert!(status.contains(" 204"), "GET /health answered {status:?}");
    let console = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(
        console.contains("grew / from"),
        "root filesystem was not grown:\n{console}"
    );

    let pid = vm.pid();
    let run_dir = vm.run_dir().to_path_buf();
    let report = vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!report.forced, "{report:?}");
    assert!(process_gone(pid), "qemu {pid} still running");
    assert!(!memory_file.exists(), "RAM file left behind");
    assert!(
        !run_dir.join("qmp.sock").exists() && !run_dir.join("qemu.pid").exists(),
        "run files left behind"
    );
    assert!(
        run_dir.join("console.log").exists(),
        "the console log is kept for post-mortems"
    );
}

#[tokio::test]
async fn a_guest_that_cannot_mount_root_powers_off_and_says_why() {
    let (_template, kernel) = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("zero.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let vmm = tcg().await;
    let s = spec(
        "no-root",
        &kernel,
        Disk {
            path: disk,
            format: DiskFormat::Raw,
            backing: None,
        },
        NetworkSpec::None,
        dir.path(),
    );
    let memory_file = s.memory_dir.join("no-root.ram");
    let err = nestbox_vmm::boot_and_wait_ready(&vmm, s, READY_WITHIN)
        .await
        .err()
        .unwrap();
    match &err {
        VmmError::Exited { console, .. } => {
            assert!(console.contains("stage 1 failed"), "{console}");
            assert!(console.contains("/dev/vda"), "{console}");
        }
        other => panic!("expected an early exit, got {other}"),
    }
    assert!(!memory_file.exists());
}

#[tokio::test]
async fn dropping_a_vm_kills_it() {
    let (template, kernel) = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&template.rootfs, dir.path(), "512M").await;
    let vmm = tcg().await;
    let s = spec(
        "dropped",
        &kernel,
        Disk {
            path: disk,
            format: DiskFormat::Qcow2,
            backing: None,
        },
        NetworkSpec::None,
        dir.path(),
    );
    let memory_file = s.memory_dir.join("dropped.ram");
    let vm: Box<dyn Vm> = vmm.boot(s).await.unwrap();
    let pid = vm.pid();
    drop(vm);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu {pid} survived its handle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!memory_file.exists());
}

#[tokio::test]
async fn kvm_probe_is_bounded() {
    let (_template, kernel) = images();
    let started = std::time::Instant::now();
    let images = ProbeImages {
        kernel: kernel.kernel.clone(),
        initrd: kernel.initramfs.clone(),
    };
    let verdict = nestbox_vmm::qemu::accel::probe_kvm(
        Path::new("qemu-system-x86_64"),
        &images,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    eprintln!(
        "kvm usable: {verdict} (probe took {} ms)",
        started.elapsed().as_millis()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let state = tempfile::tempdir().unwrap();
    let vmm = QemuVmm::new(QemuOptions {
        accel: AccelChoice::Auto,
        probe: Some(images),
        state_dir: Some(state.path().into()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        vmm.info().accel == nestbox_vmm::Accel::Kvm,
        verdict && Path::new("/dev/kvm").exists()
    );
}

/// A network namespace with a TAP device for one test; deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    async fn create(name: &str) -> Self {
        let ns = Self { name: name.into() };
        let _ = Cmd::new("ip").args(["netns", "del", name]).run().await;
        Cmd::new("ip")
            .args(["netns", "add", name])
            .run()
            .await
            .unwrap();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["addr", "add", "172.16.0.1/30", "dev", "tap0"],
            vec!["link", "set", "tap0", "up"],
        ] {
            Cmd::new("ip")
                .args(["-n", name])
                .args(args)
                .run()
                .await
                .unwrap();
        }
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn tap_networking_inside_a_netns_uses_the_static_address() {
    if !is_root() {
        eprintln!("skipped: creating a network namespace needs root");
        return;
    }
    let (template, kernel) = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&template.rootfs, dir.path(), "1G").await;
    let ns = TestNetns::create(&format!("nbx-vmmtest-{}", std::process::id())).await;
    let vmm = tcg().await;
    let mut s = spec(
        "tap-net",
        &kernel,
        Disk {
            path: disk,
            format: DiskFormat::Qcow2,
            backing: None,
        },
        NetworkSpec::Tap {
            netns: ns.path(),
            ifname: "tap0".into(),
            mac: "02:00:00:00:00:02".into(),
        },
        dir.path(),
    );
    s.guest.ip = Some("172.16.0.2/30".into());
    s.guest.gateway = Some("172.16.0.1".parse().unwrap());
    s.guest.dns = vec!["1.1.1.1".parse().unwrap()];
    let (mut vm, _ready) = nestbox_vmm::boot_and_wait_ready(&vmm, s, READY_WITHIN)
        .await
        .unwrap();
    // The guest is reachable only from inside the namespace.
    let out = Cmd::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "http://172.16.0.2:49983/health",
        ])
        .netns(ns.path())
        .run()
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "204");
    let pid = vm.pid();
    vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(process_gone(pid));
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn a_vm_runs_in_its_cgroup_with_limits_from_its_size() {
    let Some(hierarchy) = nestbox_hostsys::cgroup::Hierarchy::detect() else {
        eprintln!("skipped: no usable cgroup hierarchy on this host");
        return;
    };
    let (template, kernel) = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&template.rootfs, dir.path(), "1G").await;
    let parent = PathBuf::from(format!("nestbox-test-{}", std::process::id()));
    let vmm = QemuVmm::new(QemuOptions {
        accel: AccelChoice::Tcg,
        cgroups: Some(nestbox_vmm::qemu::Cgroups {
            hierarchy: hierarchy.clone(),
            parent: parent.clone(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let s = spec(
        "confined",
        &kernel,
        Disk {
            path: disk,
            format: DiskFormat::Qcow2,
            backing: None,
        },
        NetworkSpec::User {
            host_port: free_port(),
        },
        dir.path(),
    );
    let (mut vm, _) = nestbox_vmm::boot_and_wait_ready(&vmm, s, READY_WITHIN)
        .await
        .unwrap();
    let group = hierarchy.group(&parent.join("confined"));
    // The VMM is in its group in every hierarchy, from its start.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid())).unwrap();
    let name = format!("/{}/confined", parent.display());
    assert!(
        cgroups.lines().filter(|l| l.ends_with(&name)).count() >= 3,
        "not in its group:\n{cgroups}"
    );
    for d in group.dirs() {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|p| p == vm.pid().to_string()),
            "{}",
            d.display()
        );
        // Its limits: 1 vCPU + half a CPU, 512 MiB + the TCG overhead, 512 threads.
        for (file, want) in [
            ("cpu.cfs_quota_us", "150000"),
            (
                "memory.limit_in_bytes",
                &((512u64 + 1024) << 20).to_string(),
            ),
            ("pids.max", "512"),
        ] {
            if let Ok(got) = std::fs::read_to_string(d.join(file)) {
                assert_eq!(got.trim(), want, "{file}");
            }
        }
    }
    vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(
        group.dirs().iter().all(|d| !d.exists()),
        "the group goes with the VMM"
    );
    let _ = hierarchy.group(&parent).remove();
}

/// The attack surface of a jailed VMM: its own unprivileged user, no capabilities, no new
/// privileges, QEMU's seccomp filter, and a mount namespace in which only its own files
/// exist — not a neighbour's disk, not the host's configuration, no other process.
#[tokio::test]
async fn a_jailed_vmm_has_no_privilege_and_sees_only_its_files() {
    if !is_root() {
        eprintln!("skipped: jails need root");
        return;
    }
    let (template, kernel) = images();
    let base = std::fs::canonicalize(&template.rootfs).unwrap();
    let kernel_file = std::fs::canonicalize(&kernel.kernel).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = overlay(&base, dir.path(), "1G").await;
    // A neighbour's files, next to this VM's.
    let neighbour = dir.path().join("neighbour");
    std::fs::create_dir(&neighbour).unwrap();
    std::fs::write(neighbour.join("rootfs.qcow2"), "another tenant's disk").unwrap();
    let vmm = QemuVmm::new(QemuOptions {
        accel: AccelChoice::Tcg,
        jail: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port();
    let uid = nestbox_vmm::qemu::jail::VMM_UID_BASE + 90_000 + std::process::id() % 10_000;
    let mut s = spec(
        "jailed",
        &kernel,
        Disk {
            path: disk.clone(),
            format: DiskFormat::Qcow2,
            backing: Some(base.clone()),
        },
        NetworkSpec::User { host_port: port },
        dir.path(),
    );
    s.uid = Some(uid);
    // Without its own user a jailed VMM does not start.
    let mut nobody = s.clone();
    nobody.uid = None;
    let err = vmm.boot(nobody).await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("uid"), "{err}");
    // Nor with a disk whose header names another backing image than recorded.
    let mut redirected = s.clone();
    redirected.root_disk.backing = Some(neighbour.join("rootfs.qcow2"));
    let err = vmm.boot(redirected).await.map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("backing image"), "{err}");

    let (mut vm, _) = nestbox_vmm::boot_and_wait_ready(&vmm, s, READY_WITHIN)
        .await
        .unwrap();
    let pid = vm.pid();
    assert!(http_status(port, "/health").unwrap().contains(" 204"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for want in [
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
        format!("Gid:\t{uid}\t{uid}\t{uid}\t{uid}"),
        "CapEff:\t0000000000000000".into(),
        "CapPrm:\t0000000000000000".into(),
        "CapBnd:\t0000000000000000".into(),
        "NoNewPrivs:\t1".into(),
        "Seccomp:\t2".into(),
    ] {
        assert!(
            status.lines().any(|l| l == want),
            "{want} missing:\n{status}"
        );
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(
        ns(&pid.to_string()),
        ns("self"),
        "no mount namespace of its own"
    );
    // Its root: the system directories, its devices, its own process table, and the
    // paths of its own files.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let own_top = dir.path().components().nth(1).unwrap();
    let own_top = own_top.as_os_str().to_string_lossy().into_owned();
    for name in &top {
        assert!(
            [
                "usr", "lib", "lib64", "bin", "sbin", "etc", "dev", "proc", "nix"
            ]
            .contains(&name.as_str())
                || *name == own_top
                || kernel_file.starts_with(format!("/{name}")),
            "unexpected {name} in the jail: {top:?}"
        );
    }
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    assert!(inside(&disk).exists(), "its own disk is there");
    assert!(inside(&base).exists(), "its backing image is there");
    assert!(inside(&kernel_file).exists(), "its kernel is there");
    assert!(
        !inside(&neighbour).exists(),
        "a neighbour's files are visible"
    );
    assert!(!inside(Path::new("/etc/passwd")).exists());
    let procs: Vec<String> = std::fs::read_dir(inside(Path::new("/proc")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    // Root looking through the VMM's /proc still sees everything (hidepid hides other
    // users' processes from the VMM's user only); the VMM itself is there.
    assert!(procs.contains(&pid.to_string()), "{procs:?}");
    // The backing image is read-only in there, the disk is the VMM's.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(&base).unwrap().uid(), 0);
    vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(process_gone(pid));
}
