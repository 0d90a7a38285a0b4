//! What a VM is made of ([`VmSpec`]) and the guest kernel command line built from it.
//!
//! The `nbx.*` keys are the contract with the guest init (`nestbox-guest`'s `init`
//! module): network, host name, clock, access token hash, root device.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::VmmError;

/// The guest agent's port.
pub const GUEST_AGENT_PORT: u16 = 49983;

/// Kernel arguments that shave boot time under TCG (RUNTIME-FACTS §1, variant m9).
pub const FAST_ARGS: &[&str] = &[
    "mitigations=off",
    "cryptomgr.notests",
    "no_timer_check",
    "i8042.noaux",
    "i8042.nomux",
    "i8042.nopnp",
    "i8042.dumbkbd",
    "8250.nr_uarts=1",
    "random.trust_cpu=on",
];

/// Root disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskFormat {
    /// A raw image (a template copy or reflink clone).
    Raw,
    /// A qcow2 overlay over a template image.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// The root disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Disk {
    /// Image path.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The image a qcow2 overlay was made over (raw, one level), as its maker recorded
    /// it. A jailed VMM's overlay must name exactly this image: the header is writable by
    /// the VMM that ran the disk, so what it says is not trusted.
    #[serde(default)]
    pub backing: Option<PathBuf>,
}

/// How the guest reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetworkSpec {
    /// No NIC: loopback only.
    None,
    /// A TAP device inside a network namespace (production): QEMU is started in that
    /// namespace.
    Tap {
        /// The namespace, e.g. `/run/netns/nbx-12`.
        netns: PathBuf,
        /// TAP interface name inside it.
        ifname: String,
        /// Guest MAC address.
        mac: String,
    },
    /// QEMU user networking (slirp) with `127.0.0.1:host_port` forwarded to the guest
    /// agent: rootless, for development and tests.
    User {
        /// Host port forwarded to guest port 49983.
        host_port: u16,
    },
}

/// Guest settings passed on the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestConfig {
    /// `nbx.hostname`.
    pub hostname: Option<String>,
    /// `nbx.ip` (`172.16.0.2/30`); defaults to slirp's `10.0.2.15/24` with `User`.
    pub ip: Option<String>,
    /// `nbx.gw`.
    pub gateway: Option<Ipv4Addr>,
    /// `nbx.dns`.
    pub dns: Vec<Ipv4Addr>,
    /// `nbx.token_sha256`: hex SHA-256 of the access token.
    pub access_token_sha256: Option<String>,
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSpec {
    /// Identifier, used in file and process names: `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Kernel image (PVH `vmlinux` or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended last.
    pub cmdline_extra: Vec<String>,
    /// The root disk.
    pub root_disk: Disk,
    /// The network.
    pub network: NetworkSpec,
    /// Guest settings (`nbx.*`).
    pub guest: GuestConfig,
    /// Per-VM directory for the QMP socket, console log, pid file and QEMU's stderr.
    /// Created if missing.
    pub run_dir: PathBuf,
    /// Directory of the guest RAM file (`<id>.ram`), normally on tmpfs (`/dev/shm/…`).
    pub memory_dir: PathBuf,
    /// The unprivileged user (and group) a jailed VMM runs as: one no other live VMM
    /// uses (the caller owns that; see [`crate::qemu::jail`]). Required by a driver that
    /// jails its VMMs.
    #[serde(default)]
    pub uid: Option<u32>,
}

impl VmSpec {
    /// Checks the fields QEMU would otherwise reject obscurely.
    pub fn validate(&self) -> Result<(), VmmError> {
        let invalid =
            |field: &'static str, reason: String| Err(VmmError::InvalidSpec { field, reason });
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return invalid("id", format!("`{}` must be 1-64 of [A-Za-z0-9_-]", self.id));
        }
        if self.uid == Some(0) {
            return invalid("uid", "a VMM never runs as root".into());
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return invalid("vcpus", format!("{} is not in 1..=64", self.vcpus));
        }
        if self.memory_mb < 64 {
            return invalid(
                "memory_mb",
                format!("{} MiB is too small (minimum 64)", self.memory_mb),
            );
        }
        if !self.kernel.is_file() {
            return invalid("kernel", format!("{} is not a file", self.kernel.display()));
        }
        if let Some(i) = &self.initrd
            && !i.is_file()
        {
            return invalid("initrd", format!("{} is not a file", i.display()));
        }
        if !self.root_disk.path.is_file() {
            return invalid(
                "root_disk",
                format!("{} is not a file", self.root_disk.path.display()),
            );
        }
        for a in &self.cmdline_extra {
            if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '"') {
                return invalid("cmdline_extra", format!("`{a}` must be one word"));
            }
        }
        let word = |s: &str| !s.is_empty() && !s.contains([',', ' ', '=', '"']);
        if let NetworkSpec::Tap { netns, ifname, mac } = &self.network {
            if !netns.exists() {
                return invalid(
                    "network.netns",
                    format!("{} does not exist", netns.display()),
                );
            }
            if !word(ifname) || ifname.len() > 15 {
                return invalid("network.ifname", format!("`{ifname}`"));
            }
            if mac.len() != 17
                || !mac
                    .split(':')
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok())
            {
                return invalid("network.mac", format!("`{mac}` is not aa:bb:cc:dd:ee:ff"));
            }
        }
        if let Some(h) = &self.guest.hostname
            && (!word(h)
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return invalid("guest.hostname", format!("`{h}`"));
        }
        if let Some(t) = &self.guest.access_token_sha256
            && (t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return invalid("guest.access_token_sha256", "must be 64 hex digits".into());
        }
        if let Some(ip) = &self.guest.ip
            && !ip.split_once('/').is_some_and(|(a, p)| {
                a.parse::<Ipv4Addr>().is_ok() && p.parse::<u8>().is_ok_and(|p| p <= 32)
            })
        {
            return invalid("guest.ip", format!("`{ip}` is not an address/prefix"));
        }
        Ok(())
    }

    /// The guest kernel command line. `tsc_khz` is set under TCG (without it the kernel
    /// can hang calibrating the TSC); `clock_ms` becomes `nbx.clock`.
    pub fn kernel_cmdline(&self, tsc_khz: Option<u64>, clock_ms: u64) -> String {
        let mut args: Vec<String> = vec!["console=ttyS0".into(), "panic=-1".into(), "quiet".into()];
        args.extend(FAST_ARGS.iter().map(|s| s.to_string()));
        args.push("pci=off".into());
        if let Some(khz) = tsc_khz {
            args.push(format!("tsc_early_khz={khz}"));
        }
        args.push(format!("nbx.clock={clock_ms}"));
        let g = &self.guest;
        let (ip, gw, dns) = match (&self.network, &g.ip) {
            // slirp's fixed addresses unless told otherwise.
            (NetworkSpec::User { .. }, None) => (
                Some("10.0.2.15/24".to_string()),
                Some(g.gateway.unwrap_or(Ipv4Addr::new(10, 0, 2, 2))),
                if g.dns.is_empty() {
                    vec![Ipv4Addr::new(10, 0, 2, 3)]
                } else {
                    g.dns.clone()
                },
            ),
            (NetworkSpec::None, _) => (None, None, Vec::new()),
            (_, ip) => (ip.clone(), g.gateway, g.dns.clone()),
        };
        if let Some(ip) = ip {
            args.push(format!("nbx.ip={ip}"));
        }
        if let Some(gw) = gw {
            args.push(format!("nbx.gw={gw}"));
        }
        if !dns.is_empty() {
            let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
            args.push(format!("nbx.dns={}", list.join(",")));
        }
        if let Some(h) = &g.hostname {
            args.push(format!("nbx.hostname={h}"));
        }
        if let Some(t) = &g.access_token_sha256 {
            args.push(format!("nbx.token_sha256={}", t.to_ascii_lowercase()));
        }
        args.extend(self.cmdline_extra.iter().cloned());
        args.join(" ")
    }
}
