//! The guest's boot configuration, read from the kernel command line.
//!
//! This is the contract between the host (image builder, VMM driver, host agent) and the
//! guest init stages. Every key is optional; an absent network key leaves only loopback.
//!
//! | key | meaning |
//! | --- | --- |
//! | `nbx.ip=172.16.0.2/30` | eth0 address and prefix length |
//! | `nbx.gw=172.16.0.1` | default gateway |
//! | `nbx.dns=1.1.1.1,8.8.8.8` | nameservers written to `/etc/resolv.conf` |
//! | `nbx.hostname=NAME` | host name (and `/etc/hosts`) |
//! | `nbx.clock=<unix ms>` | wall clock at boot |
//! | `nbx.token_sha256=<hex>` | passed to the server as `--access-token-sha256` |
//! | `nbx.root=/dev/vda` | root block device (default `/dev/vda`) |
//! | `nbx.probe=1` | print `NESTBOX-PROBE-OK` and power off (the host's KVM probe) |
//!
//! Parsing never fails as a whole: a malformed value is reported in
//! [`BootConfig::warnings`] and ignored, because PID 1 must boot whatever it is given.

use std::net::Ipv4Addr;

/// The default root block device.
pub const DEFAULT_ROOT: &str = "/dev/vda";

/// An IPv4 address with its prefix length (`172.16.0.2/30`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The netmask of the prefix (`/30` → 255.255.255.252).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        Ipv4Addr::from(bits)
    }

    fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().ok()?),
            None => (s, 32),
        };
        if prefix > 32 {
            return None;
        }
        Some(Self {
            addr: addr.parse().ok()?,
            prefix,
        })
    }
}

/// Everything the init stages read from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// eth0 address (`nbx.ip`).
    pub ip: Option<Ipv4Cidr>,
    /// Default gateway (`nbx.gw`).
    pub gateway: Option<Ipv4Addr>,
    /// Nameservers (`nbx.dns`).
    pub dns: Vec<Ipv4Addr>,
    /// Host name (`nbx.hostname`).
    pub hostname: Option<String>,
    /// Wall clock at boot in Unix milliseconds (`nbx.clock`).
    pub clock_ms: Option<u64>,
    /// SHA-256 of the access token, lower-case hex (`nbx.token_sha256`).
    pub token_sha256: Option<String>,
    /// Root block device (`nbx.root`).
    pub root: String,
    /// KVM probe mode (`nbx.probe=1`).
    pub probe: bool,
    /// Keys that were present but malformed, for the console.
    pub warnings: Vec<String>,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            ip: None,
            gateway: None,
            dns: Vec::new(),
            hostname: None,
            clock_ms: None,
            token_sha256: None,
            root: DEFAULT_ROOT.to_string(),
            probe: false,
            warnings: Vec::new(),
        }
    }
}

impl BootConfig {
    /// Reads `/proc/cmdline`. A missing /proc yields the defaults plus a warning.
    pub fn from_proc() -> Self {
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(s) => Self::parse(&s),
            Err(e) => {
                let mut cfg = Self::default();
                cfg.warnings.push(format!("cannot read /proc/cmdline: {e}"));
                cfg
            }
        }
    }

    /// Parses a kernel command line. Unknown words are ignored.
    pub fn parse(cmdline: &str) -> Self {
        let mut cfg = Self::default();
        for word in split_words(cmdline) {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let Some(key) = key.strip_prefix("nbx.") else {
                continue;
            };
            let ok = match key {
                "ip" => Ipv4Cidr::parse(value).map(|v| cfg.ip = Some(v)).is_some(),
                "gw" => value.parse().map(|v| cfg.gateway = Some(v)).is_ok(),
                "dns" => {
                    let parsed: Result<Vec<Ipv4Addr>, _> = value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::parse)
                        .collect();
                    parsed.map(|v| cfg.dns = v).is_ok()
                }
                "hostname" => {
                    let valid = !value.is_empty()
                        && value.len() <= 64
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
                    if valid {
                        cfg.hostname = Some(value.to_string());
                    }
                    valid
                }
                "clock" => value.parse().map(|v| cfg.clock_ms = Some(v)).is_ok(),
                "token_sha256" => {
                    let valid = value.len() == 64 && value.chars().all(|c| c.is_ascii_hexdigit());
                    if valid {
                        cfg.token_sha256 = Some(value.to_ascii_lowercase());
                    }
                    valid
                }
                "root" => {
                    let valid = value.starts_with("/dev/");
                    if valid {
                        cfg.root = value.to_string();
                    }
                    valid
                }
                "probe" => {
                    cfg.probe = value == "1";
                    true
                }
                _ => true,
            };
            if !ok {
                cfg.warnings
                    .push(format!("ignoring malformed nbx.{key}={value}"));
            }
        }
        cfg
    }
}

/// Splits a command line on whitespace, keeping double-quoted runs together (as the
/// kernel does) and dropping the quotes.
fn split_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_keys() {
        let token = "ab".repeat(32);
        let cfg = BootConfig::parse(&format!(
            "console=ttyS0 quiet nbx.ip=172.16.0.2/30 nbx.gw=172.16.0.1 nbx.dns=1.1.1.1,8.8.8.8 \
             nbx.hostname=sb-1 nbx.clock=1700000000123 nbx.token_sha256={token} nbx.root=/dev/vdb \
             nbx.probe=1\n"
        ));
        assert_eq!(
            cfg.ip,
            Some(Ipv4Cidr {
                addr: Ipv4Addr::new(172, 16, 0, 2),
                prefix: 30
            })
        );
        assert_eq!(
            cfg.ip.map(|c| c.netmask()),
            Some(Ipv4Addr::new(255, 255, 255, 252))
        );
        assert_eq!(cfg.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(
            cfg.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(cfg.hostname.as_deref(), Some("sb-1"));
        assert_eq!(cfg.clock_ms, Some(1_700_000_000_123));
        assert_eq!(cfg.token_sha256, Some(token));
        assert_eq!(cfg.root, "/dev/vdb");
        assert!(cfg.probe);
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    }

    #[test]
    fn defaults_without_keys() {
        let cfg = BootConfig::parse("console=ttyS0 pci=off");
        assert_eq!(cfg, BootConfig::default());
        assert_eq!(cfg.root, "/dev/vda");
    }

    #[test]
    fn malformed_values_warn_and_are_ignored() {
        let cfg =
            BootConfig::parse("nbx.ip=300.1.1.1/24 nbx.gw=x nbx.token_sha256=zz nbx.hostname=a_b");
        assert_eq!(cfg.ip, None);
        assert_eq!(cfg.gateway, None);
        assert_eq!(cfg.token_sha256, None);
        assert_eq!(cfg.hostname, None);
        assert_eq!(cfg.warnings.len(), 4);
    }

    #[test]
    fn quoted_words_and_netmasks() {
        assert_eq!(split_words(r#"a "b c" d"#), vec!["a", "b c", "d"]);
        let zero = Ipv4Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
        };
        assert_eq!(zero.netmask(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            Ipv4Cidr::parse("10.0.2.15"),
            Some(Ipv4Cidr {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 32
            })
        );
        assert_eq!(Ipv4Cidr::parse("10.0.2.15/33"), None);
    }
}
