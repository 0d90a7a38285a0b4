//! QEMU command lines for `-M microvm` (RUNTIME-FACTS §1): PVH kernel, ACPI on (the
//! Debian kernel finds virtio-mmio devices through the DSDT), RTC on, guest RAM in a
//! shared file (`memory-backend-file,share=on`, so it can be snapshotted), serial console
//! to a file, QMP on a Unix socket.
//!
//! Device order and ids are fixed: a snapshot only restores into an identical machine.
//! [`machine_config`] describes the machine an argv builds, for snapshot manifests; a test
//! keeps the two in step.

use std::path::{Path, PathBuf};

use crate::Accel;
use crate::snapshot::{DeviceConfig, MachineConfig};
use crate::spec::{GUEST_AGENT_PORT, NetworkSpec, VmSpec};

/// QEMU's machine type.
pub const MACHINE_TYPE: &str = "microvm";
/// The cap on TCG's translated-code cache, MiB (QEMU's default is 1 GiB): part of what
/// a VMM may use beyond its guest's RAM (`vmm_overhead_mb`), so a busy guest's VMM stays
/// within its control group's memory limit.
pub const TCG_TB_SIZE_MB: u32 = 256;
/// The CPU emulated under TCG: QEMU's `qemu64` raised to x86-64-v2 (SSSE3, SSE4.1,
/// SSE4.2, POPCNT), the baseline that current distributions and compiled Python wheels
/// (numpy 2.4 and later, for one) assume; on plain `qemu64` they die of SIGILL.
pub const TCG_CPU: &str = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt";
/// The `-sandbox` setting every VM runs with (QEMU's seccomp filter).
pub const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryBacking {
    /// The VM's own RAM file, `share=on`: the file is the memory, so `x-ignore-shared`
    /// leaves it out of snapshots. Removed when the VM stops.
    Owned(PathBuf),
    /// A snapshot's RAM file mapped `share=off` (`MAP_PRIVATE`): a clone. Never written.
    Private(PathBuf),
    /// Anonymous memory (restored from a snapshot whose RAM is in its state file).
    Anonymous,
}

impl MemoryBacking {
    /// True when RAM is a shared file the VM owns (fast snapshots).
    pub fn is_owned(&self) -> bool {
        matches!(self, Self::Owned(_))
    }
}

/// Files of one VM. Everything but the RAM file lives in the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// QMP socket.
    pub qmp_socket: PathBuf,
    /// Serial console log.
    pub console_log: PathBuf,
    /// QEMU's pid, written by the agent (for crash clean-up).
    pub pid_file: PathBuf,
    /// QEMU's own stdout/stderr.
    pub stderr_log: PathBuf,
    /// Guest RAM.
    pub memory_file: PathBuf,
    /// What a later process needs to take the VM over ([`super::record`]).
    pub record: PathBuf,
}

impl RunPaths {
    /// The files for `id` in `run_dir` and `memory_dir`.
    pub fn new(run_dir: &Path, memory_dir: &Path, id: &str) -> Self {
        Self {
            qmp_socket: run_dir.join(super::QMP_SOCKET),
            console_log: run_dir.join(super::CONSOLE_LOG),
            pid_file: run_dir.join(super::PID_FILE),
            stderr_log: run_dir.join(super::STDERR_LOG),
            memory_file: memory_dir.join(format!("{id}.ram")),
            record: run_dir.join(super::record::RECORD_FILE),
        }
    }
}

/// QEMU's option syntax doubles commas inside values.
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The full argument list (without the program name) to boot `spec`.
pub fn qemu_argv(
    spec: &VmSpec,
    accel: Accel,
    tsc_khz: Option<u64>,
    paths: &RunPaths,
    clock_ms: u64,
) -> Vec<String> {
    machine_argv(
        spec,
        accel,
        paths,
        &spec.kernel_cmdline(tsc_khz, clock_ms),
        &MemoryBacking::Owned(paths.memory_file.clone()),
        false,
    )
}

/// The argument list for `spec`'s machine with a given kernel command line and RAM;
/// `incoming` adds `-incoming defer` (a restore).
pub fn machine_argv(
    spec: &VmSpec,
    accel: Accel,
    paths: &RunPaths,
    cmdline: &str,
    memory: &MemoryBacking,
    incoming: bool,
) -> Vec<String> {
    let mem = spec.memory_mb;
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    push(&["-name", &format!("nbx-{},debug-threads=off", spec.id)]);
    push(&["-M", &format!("{MACHINE_TYPE},memory-backend=mem0")]);
    match accel {
        // TCG's translated-code cache is 1 GiB unless capped: a busy guest fills it, and
        // its VMM would pass the memory its control group allows (guest RAM plus
        // `vmm_overhead_mb`) and be killed.
        Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MB}")]),
        Accel::Kvm => push(&["-accel", accel.as_str()]),
    }
    match accel {
        Accel::Kvm => push(&["-cpu", "host"]),
        Accel::Tcg => push(&["-cpu", TCG_CPU]),
    }
    push(&["-m", &format!("{mem}M"), "-smp", &spec.vcpus.to_string()]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    // QEMU's seccomp filter: no obsolete system calls, no privilege changes, no new
    // processes (snapshots stream through a descriptor the host agent hands in), no
    // scheduler or resource changes.
    push(&["-sandbox", SECCOMP]);
    // The RAM block is named after the backend id (`mem0`) whatever its type, so a
    // snapshot loads into any of them.
    let backend = match memory {
        MemoryBacking::Owned(path) => format!(
            "memory-backend-file,id=mem0,size={mem}M,mem-path={},share=on",
            esc(path)
        ),
        MemoryBacking::Private(path) => format!(
            "memory-backend-file,id=mem0,size={mem}M,mem-path={},share=off",
            esc(path)
        ),
        MemoryBacking::Anonymous => format!("memory-backend-ram,id=mem0,size={mem}M"),
    };
    push(&["-object", &backend]);
    push(&[
        "-chardev",
        &format!("file,id=con0,path={}", esc(&paths.console_log)),
        "-serial",
        "chardev:con0",
    ]);
    // QMP on the listening socket the agent binds and hands in: QEMU creates no file.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp0,fd={},server=on,wait=off",
            super::jail::QMP_FD
        ),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    push(&["-kernel", &spec.kernel.to_string_lossy()]);
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    push(&["-append", cmdline]);
    // An overlay's backing image is named here, not taken from its header (which the
    // VMM that ran the disk could have rewritten).
    let backing = match &spec.root_disk.backing {
        Some(b) => format!(",backing.driver=raw,backing.file.filename={}", esc(b)),
        None => String::new(),
    };
    push(&[
        "-drive",
        &format!(
            "id=root,file={},format={},if=none,cache=writeback,discard=unmap{backing}",
            esc(&spec.root_disk.path),
            spec.root_disk.format.as_str()
        ),
        "-device",
        "virtio-blk-device,drive=root",
    ]);
    match &spec.network {
        NetworkSpec::None => {}
        // The TAP device the agent opens in the sandbox's namespace and hands in.
        NetworkSpec::Tap { mac, .. } => push(&[
            "-netdev",
            &format!("tap,id=net0,fd={}", super::jail::TAP_FD),
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={mac}"),
        ]),
        NetworkSpec::User { host_port } => push(&[
            "-netdev",
            &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{host_port}-:{GUEST_AGENT_PORT}"),
            "-device",
            "virtio-net-device,netdev=net0",
        ]),
    }
    // Entropy from the host: under TCG the default CPU has no RDRAND, and a guest whose
    // crng is not ready blocks getrandom() (Python, TLS) for seconds.
    push(&[
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        "virtio-rng-device,rng=rng0",
    ]);
    if incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

/// The machine [`machine_argv`] builds for `spec` (device order as on the command line).
/// `host_cpu` is the host's CPU model name (recorded under KVM only).
pub fn machine_config(spec: &VmSpec, accel: Accel, host_cpu: Option<&str>) -> MachineConfig {
    let dev = |id: &str, driver: &str, backend: &str| DeviceConfig {
        id: id.into(),
        driver: driver.into(),
        backend: backend.into(),
    };
    let mut devices = vec![dev(
        "root",
        "virtio-blk-device",
        spec.root_disk.format.as_str(),
    )];
    match &spec.network {
        NetworkSpec::None => {}
        NetworkSpec::Tap { .. } => devices.push(dev("net0", "virtio-net-device", "tap")),
        NetworkSpec::User { .. } => devices.push(dev("net0", "virtio-net-device", "user")),
    }
    devices.push(dev("rng0", "virtio-rng-device", "urandom"));
    let kvm = accel == Accel::Kvm;
    MachineConfig {
        machine_type: MACHINE_TYPE.into(),
        cpu: if kvm { "host" } else { TCG_CPU }.into(),
        host_cpu: host_cpu.filter(|_| kvm).map(str::to_string),
        vcpus: spec.vcpus,
        memory_mb: spec.memory_mb,
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Disk, DiskFormat, GuestConfig};

    fn spec(network: NetworkSpec) -> VmSpec {
        VmSpec {
            id: "sb1".into(),
            vcpus: 2,
            memory_mb: 512,
            kernel: "/img/vmlinux".into(),
            initrd: Some("/img/initramfs.cpio".into()),
            cmdline_extra: vec!["loglevel=4".into()],
            root_disk: Disk {
                path: "/disks/sb1.qcow2".into(),
                format: DiskFormat::Qcow2,
                backing: None,
            },
            network,
            guest: GuestConfig {
                hostname: Some("sb1".into()),
                ip: Some("172.16.0.2/30".into()),
                gateway: Some("172.16.0.1".parse().unwrap()),
                dns: vec!["1.1.1.1".parse().unwrap(), "8.8.8.8".parse().unwrap()],
                access_token_sha256: Some("AB".repeat(32)),
            },
            run_dir: "/run/nbx/sb1".into(),
            memory_dir: "/dev/shm/nbx".into(),
            uid: None,
        }
    }

    fn value_after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tap_vm_under_tcg() {
        let s = spec(NetworkSpec::Tap {
            netns: "/run/netns/x".into(),
            ifname: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
        let argv = qemu_argv(&s, Accel::Tcg, Some(2_596_138), &paths, 1_700_000_000_000);
        assert_eq!(value_after(&argv, "-M"), ["microvm,memory-backend=mem0"]);
        assert_eq!(value_after(&argv, "-accel"), ["tcg,tb-size=256"]);
        assert_eq!(value_after(&argv, "-cpu"), [TCG_CPU]);
        assert_eq!(value_after(&argv, "-m"), ["512M"]);
        assert_eq!(value_after(&argv, "-smp"), ["2"]);
        assert!(
            argv.contains(&"-no-reboot".to_string()) && argv.contains(&"-nodefaults".to_string())
        );
        assert_eq!(
            value_after(&argv, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(
            value_after(&argv, "-object")[0],
            "memory-backend-file,id=mem0,size=512M,mem-path=/dev/shm/nbx/sb1.ram,share=on"
        );
        assert_eq!(
            value_after(&argv, "-chardev"),
            [
                "file,id=con0,path=/run/nbx/sb1/console.log",
                "socket,id=qmp0,fd=3,server=on,wait=off"
            ]
        );
        assert_eq!(value_after(&argv, "-serial"), ["chardev:con0"]);
        assert_eq!(value_after(&argv, "-mon"), ["chardev=qmp0,mode=control"]);
        // Nothing QEMU would create in the run directory itself.
        assert!(value_after(&argv, "-qmp").is_empty() && value_after(&argv, "-pidfile").is_empty());
        assert_eq!(value_after(&argv, "-initrd"), ["/img/initramfs.cpio"]);
        assert_eq!(
            value_after(&argv, "-drive"),
            ["id=root,file=/disks/sb1.qcow2,format=qcow2,if=none,cache=writeback,discard=unmap"]
        );
        assert_eq!(value_after(&argv, "-netdev"), ["tap,id=net0,fd=4"]);
        assert_eq!(
            value_after(&argv, "-device"),
            [
                "virtio-blk-device,drive=root",
                "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01",
                "virtio-rng-device,rng=rng0"
            ]
        );
        let append = value_after(&argv, "-append")[0];
        for want in [
            "console=ttyS0",
            "panic=-1",
            "pci=off",
            "mitigations=off",
            "tsc_early_khz=2596138",
            "nbx.clock=1700000000000",
            "nbx.ip=172.16.0.2/30",
            "nbx.gw=172.16.0.1",
            "nbx.dns=1.1.1.1,8.8.8.8",
            "nbx.hostname=sb1",
            &format!("nbx.token_sha256={}", "ab".repeat(32)),
        ] {
            assert!(
                append.split(' ').any(|w| w == want),
                "{want} missing from {append}"
            );
        }
        assert!(append.ends_with("loglevel=4"), "{append}");
    }

    #[test]
    fn user_networking_under_kvm_defaults_to_slirp_addresses() {
        let mut s = spec(NetworkSpec::User { host_port: 40123 });
        s.guest = GuestConfig::default();
        let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
        let argv = qemu_argv(&s, Accel::Kvm, None, &paths, 1);
        assert_eq!(value_after(&argv, "-accel"), ["kvm"]);
        assert_eq!(value_after(&argv, "-cpu"), ["host"]);
        assert_eq!(
            value_after(&argv, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:40123-:49983"]
        );
        let append = value_after(&argv, "-append")[0];
        assert!(!append.contains("tsc_early_khz"));
        assert!(
            append.contains("nbx.ip=10.0.2.15/24 nbx.gw=10.0.2.2 nbx.dns=10.0.2.3"),
            "{append}"
        );
        assert!(!append.contains("nbx.token_sha256"));
    }

    #[test]
    fn no_network_means_no_nic_and_no_keys() {
        let s = spec(NetworkSpec::None);
        let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
        let argv = qemu_argv(&s, Accel::Tcg, None, &paths, 1);
        assert!(value_after(&argv, "-netdev").is_empty());
        let append = value_after(&argv, "-append")[0];
        assert!(
            !append.contains("nbx.ip") && !append.contains("nbx.dns"),
            "{append}"
        );
    }

    #[test]
    fn machine_config_matches_the_argv_devices() {
        for net in [
            NetworkSpec::None,
            NetworkSpec::User { host_port: 1 },
            NetworkSpec::Tap {
                netns: "/run/netns/x".into(),
                ifname: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            },
        ] {
            let s = spec(net);
            let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
            let argv = qemu_argv(&s, Accel::Tcg, None, &paths, 1);
            let m = machine_config(&s, Accel::Tcg, Some("AMD EPYC"));
            let drivers: Vec<&str> = value_after(&argv, "-device")
                .iter()
                .map(|d| d.split(',').next().unwrap())
                .collect();
            let want: Vec<&str> = m.devices.iter().map(|d| d.driver.as_str()).collect();
            assert_eq!(drivers, want);
            assert_eq!(m.host_cpu, None, "host cpu is recorded under kvm only");
            assert_eq!(m.vcpus, 2);
            assert_eq!(m.memory_mb, 512);
            assert!(value_after(&argv, "-M")[0].starts_with(&m.machine_type));
        }
    }

    #[test]
    fn restores_map_memory_by_backing_and_wait_for_incoming() {
        let s = spec(NetworkSpec::None);
        let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
        let private = MemoryBacking::Private("/snap/memory.ram".into());
        let argv = machine_argv(&s, Accel::Tcg, &paths, "console=ttyS0 x", &private, true);
        assert_eq!(
            value_after(&argv, "-object")[0],
            "memory-backend-file,id=mem0,size=512M,mem-path=/snap/memory.ram,share=off"
        );
        assert_eq!(value_after(&argv, "-append"), ["console=ttyS0 x"]);
        assert_eq!(value_after(&argv, "-incoming"), ["defer"]);
        let argv = machine_argv(&s, Accel::Tcg, &paths, "x", &MemoryBacking::Anonymous, true);
        assert_eq!(
            value_after(&argv, "-object")[0],
            "memory-backend-ram,id=mem0,size=512M"
        );
        let argv = qemu_argv(&s, Accel::Tcg, None, &paths, 1);
        assert!(value_after(&argv, "-incoming").is_empty());
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut s = spec(NetworkSpec::None);
        s.root_disk.path = "/d/a,b.raw".into();
        s.root_disk.format = DiskFormat::Raw;
        let paths = RunPaths::new(&s.run_dir, &s.memory_dir, &s.id);
        let argv = qemu_argv(&s, Accel::Tcg, None, &paths, 1);
        assert!(value_after(&argv, "-drive")[0].starts_with("id=root,file=/d/a,,b.raw,format=raw"));
    }
}
