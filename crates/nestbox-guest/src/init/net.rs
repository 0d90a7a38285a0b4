//! Guest networking with in-process ioctls: loopback up, eth0 address, default route and
//! `/etc/resolv.conf`. The minbase root filesystem has no iproute2 and the kernel has no
//! `CONFIG_IP_PNP`, so stage 2 does it itself.
//!
//! The classic `SIOCSIF*` / `SIOCADDRT` interface is enough for one IPv4 address and a
//! default route, and needs no netlink dependency in the guest.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::InitError;
use super::cmdline::BootConfig;

/// `struct ifreq` with the `ifr_addr` member (x86_64 layout: 16 + 24 bytes).
#[repr(C)]
struct IfReqAddr {
    name: [libc::c_char; libc::IFNAMSIZ],
    addr: libc::sockaddr_in,
    _pad: [u8; 8],
}

/// `struct ifreq` with the `ifr_flags` member.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `struct rtentry` (linux/route.h).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr_in,
    rt_gateway: libc::sockaddr_in,
    rt_genmask: libc::sockaddr_in,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn ifname(name: &str) -> [libc::c_char; libc::IFNAMSIZ] {
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    out
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn socket() -> Result<OwnedFd, InitError> {
    // SAFETY: plain socket(2); the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(InitError::Net {
            op: "open an inet socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(
    sock: &OwnedFd,
    req: libc::c_ulong,
    arg: &mut T,
    op: impl FnOnce() -> String,
) -> Result<(), InitError> {
    // SAFETY: `arg` is a properly laid out request structure for `req`, valid for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req, arg as *mut T) } < 0 {
        return Err(InitError::Net {
            op: op(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Brings an interface up.
fn link_up(sock: &OwnedFd, name: &str) -> Result<(), InitError> {
    let mut req = IfReqFlags {
        name: ifname(name),
        flags: 0,
        _pad: [0; 22],
    };
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, || {
        format!("read flags of {name}")
    })?;
    req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req, || {
        format!("bring {name} up")
    })
}

/// Brings loopback up (the kernel then gives it 127.0.0.1/8).
pub fn loopback_up() -> Result<(), InitError> {
    link_up(&socket()?, "lo")
}

/// Configures eth0 from the boot keys. Does nothing without `nbx.ip`.
pub fn configure_eth0(cfg: &BootConfig) -> Result<bool, InitError> {
    let Some(ip) = cfg.ip else { return Ok(false) };
    let dev = "eth0";
    // The virtio-net device registers while its module loads; allow a short delay.
    let start = std::time::Instant::now();
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if start.elapsed() > Duration::from_secs(3) {
            return Err(InitError::Net {
                op: "find eth0".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sock = socket()?;
    let mut req = IfReqAddr {
        name: ifname(dev),
        addr: sockaddr(ip.addr),
        _pad: [0; 8],
    };
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, || {
        format!("set {} on {dev}", ip.addr)
    })?;
    let mut req = IfReqAddr {
        name: ifname(dev),
        addr: sockaddr(ip.netmask()),
        _pad: [0; 8],
    };
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, || {
        format!("set netmask /{} on {dev}", ip.prefix)
    })?;
    link_up(&sock, dev)?;
    if let Some(gw) = cfg.gateway {
        let mut name = ifname(dev);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gw),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: name.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        ioctl(&sock, libc::SIOCADDRT, &mut rt, || {
            format!("add default route via {gw}")
        })?;
    }
    Ok(true)
}

/// Writes `/etc/resolv.conf` when nameservers were given.
pub fn write_resolv_conf(cfg: &BootConfig) -> Result<(), InitError> {
    if cfg.dns.is_empty() {
        return Ok(());
    }
    let body: String = cfg
        .dns
        .iter()
        .map(|ip| format!("nameserver {ip}\n"))
        .collect();
    // resolv.conf may be a dangling symlink (systemd-resolved images): replace it.
    let path = "/etc/resolv.conf";
    if std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        let _ = std::fs::remove_file(path);
    }
    std::fs::write(path, body).map_err(|source| InitError::Io {
        op: "write",
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReqAddr>(), 40);
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn names_are_nul_terminated() {
        let n = ifname("a-very-long-interface-name");
        assert_eq!(n[libc::IFNAMSIZ - 1], 0);
        assert_eq!(n[0], b'a' as libc::c_char);
    }
}
