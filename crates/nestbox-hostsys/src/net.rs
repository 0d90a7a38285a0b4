//! Sandbox networking: one network namespace per sandbox, a veth pair to the host, a TAP
//! device for the VMM inside the namespace, and nftables rules.
//!
//! ```text
//! root ns:  nbxh<N> 10.200.x.1/30 <-veth-> netns nbx<N>: nbxg<N> 10.200.x.2/30 (default via .1)
//!                                            tap0 172.16.0.1/30 <-> VMM <-> guest eth0 172.16.0.2/30
//! ```
//!
//! Every guest has the same address (172.16.0.2), so snapshot clones need no re-addressing.
//! The host reaches sandbox N at its per-slot address (10.200.x.2), which the namespace DNATs
//! to the guest. Guest traffic leaving the namespace is masqueraded to that address, then
//! masqueraded again by the host on its way out.
//!
//! Isolation (rules in [`HostFirewall`], one table per agent instance): a sandbox can reach
//! neither another sandbox (forwarding between sandbox veths is dropped), nor the host's own
//! services (input from sandbox veths is dropped unless it answers a host-initiated
//! connection), nor private or link-local ranges unless allowed — except the DNS servers
//! given to guests.
//!
//! Slots are allocated machine-wide (several agents may share a host) with exclusive
//! creation of files in [`SlotAllocator::dir`]; each file names the owning instance so the
//! start-up cleanup removes only its own leftovers.
//!
//! Tenants add their own egress rules on top, inside the namespace (see
//! [`SandboxNet::ns_ruleset`]): they are evaluated before the host's rules see the packet,
//! so they can narrow what a sandbox reaches but never widen it.
//!
//! Invariants: a [`SandboxNet`] exists only when its namespace, veth pair, TAP and rules all
//! exist (setup rolls back on failure); deleting the namespace removes the TAP, both veth
//! ends and the in-namespace rules at once.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nestbox_types::egress::Egress;

use crate::process::{Cmd, ProcessError};

/// Name prefix of every interface and namespace Nestbox creates.
pub const PREFIX: &str = "nbx";
/// Highest slot number: 10.200.0.0/16 holds 16384 /30 networks.
pub const MAX_SLOT: u32 = 16383;
/// The block every slot's addresses come from.
pub const SANDBOX_RANGE: &str = "10.200.0.0/16";
/// The guest's address inside every sandbox.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
/// The guest's gateway: the TAP inside the namespace.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// Name of the TAP device inside each namespace.
pub const TAP_NAME: &str = "tap0";
/// The nftables table inside each namespace.
pub const NS_TABLE: &str = "nestbox";
/// Its set of blocks the tenant allows.
const SET_ALLOW: &str = "egress_allow";
/// Its set of blocks the tenant denies.
const SET_DENY: &str = "egress_deny";
/// Its set of addresses allowed domain names resolved to.
const SET_PINNED: &str = "egress_pinned";
/// Its chain redirecting the guest's DNS queries to the pinning resolver.
const CHAIN_DNS: &str = "dns";
/// Its chain checking what the guest starts against the tenant's rules.
const CHAIN_EGRESS: &str = "egress";
/// Its forward chain.
const CHAIN_FORWARD: &str = "forward";
/// The rules' generation at set-up (new connections carry mark 0, so they always differ).
const FIRST_GENERATION: u32 = 1;

/// A generation never handed out before by this process (and, seeded from the clock,
/// unlikely to equal one of an earlier process), never [`FIRST_GENERATION`] or 0.
fn next_generation() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static LAST: AtomicU32 = AtomicU32::new(FIRST_GENERATION);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    LAST.fetch_max(
        u32::try_from(secs & 0x7fff_ffff).unwrap_or(0),
        Ordering::Relaxed,
    );
    let g = LAST.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
    if g <= FIRST_GENERATION {
        LAST.store(FIRST_GENERATION + 1, Ordering::Relaxed);
        FIRST_GENERATION + 1
    } else {
        g
    }
}

/// The namespace's forward rules for rules of `generation`.
fn forward_rules(addrs: &SlotAddrs, generation: u32) -> Vec<String> {
    let g = &addrs.ns_if;
    vec![
        // The host's connections to the guest, both ways.
        format!("iifname \"{g}\" oifname \"{TAP_NAME}\" ct status dnat accept"),
        format!("iifname \"{TAP_NAME}\" oifname \"{g}\" ct status dnat accept"),
        // The guest's: new ones, and those the current rules have not passed yet.
        format!(
            "iifname \"{TAP_NAME}\" oifname \"{g}\" ct mark != {generation} jump {CHAIN_EGRESS}"
        ),
        "ct state established,related accept".to_string(),
        format!("iifname \"{TAP_NAME}\" oifname \"{g}\" accept"),
    ]
}

/// The egress chain's rules for rules of `generation`.
fn egress_chain_rules(generation: u32) -> Vec<String> {
    vec![
        format!("ip daddr @{SET_ALLOW} ct mark set {generation} accept"),
        format!("ip daddr @{SET_PINNED} ct mark set {generation} accept"),
        format!("ip daddr @{SET_DENY} reject with icmp type admin-prohibited"),
        format!("ct mark set {generation}"),
    ]
}

/// A networking operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Every slot is taken.
    #[error("no free network slot (all {MAX_SLOT} in use)")]
    SlotsExhausted,
    /// The slot directory could not be used.
    #[error("slot directory {path}")]
    SlotDir {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("network setup for slot {slot}")]
    Command {
        /// The slot being set up or torn down.
        slot: u32,
        /// The failed command.
        #[source]
        source: ProcessError,
    },
    /// The host firewall could not be installed.
    #[error("host firewall table {table}")]
    Firewall {
        /// The nftables table.
        table: String,
        /// The failed command.
        #[source]
        source: ProcessError,
    },
    /// A sysctl could not be set.
    #[error("cannot set {key}")]
    Sysctl {
        /// The sysctl path.
        key: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Addresses and names of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAddrs {
    /// The slot number.
    pub slot: u32,
    /// Namespace name (`nbx<N>`).
    pub netns: String,
    /// Host-side veth (`nbxh<N>`).
    pub host_if: String,
    /// Namespace-side veth (`nbxg<N>`).
    pub ns_if: String,
    /// Host-side address of the veth.
    pub host_ip: Ipv4Addr,
    /// Namespace-side address: where the host reaches the guest.
    pub sandbox_ip: Ipv4Addr,
}

impl SlotAddrs {
    /// Names and addresses of `slot` (1..=[`MAX_SLOT`]).
    pub fn new(slot: u32) -> Self {
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + slot * 4;
        Self {
            slot,
            netns: format!("{PREFIX}{slot}"),
            host_if: format!("{PREFIX}h{slot}"),
            ns_if: format!("{PREFIX}g{slot}"),
            host_ip: Ipv4Addr::from(base + 1),
            sandbox_ip: Ipv4Addr::from(base + 2),
        }
    }

    /// Path of the namespace's bind mount.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// Machine-wide slot allocation through exclusively created files.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    dir: PathBuf,
    owner: String,
    range: std::ops::RangeInclusive<u32>,
    /// Where the next search starts: slots are handed out round-robin, so a freed slot
    /// (and its addresses, with any conntrack state) is not reused at once.
    next: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl SlotAllocator {
    /// An allocator keeping its files in `dir` (created if missing), marking slots as owned
    /// by `owner` (the agent instance tag).
    pub fn new(dir: impl Into<PathBuf>, owner: impl Into<String>) -> Result<Self, NetError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| NetError::SlotDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self {
            dir,
            owner: owner.into(),
            range: 1..=MAX_SLOT,
            next: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
        })
    }

    /// Restricts allocation to `range` (clamped to 1..=[`MAX_SLOT`]), e.g. to keep tests
    /// away from slots a running agent uses.
    pub fn with_range(mut self, range: std::ops::RangeInclusive<u32>) -> Self {
        let start = (*range.start()).max(1);
        let end = (*range.end()).min(MAX_SLOT);
        self.range = start..=end;
        self.next.store(start, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// The directory holding slot files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes a free slot, recording `holder` (e.g. a sandbox id) in its file.
    pub fn allocate(&self, holder: &str) -> Result<u32, NetError> {
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let start = self
            .next
            .load(std::sync::atomic::Ordering::Relaxed)
            .clamp(lo, hi);
        for slot in (start..=hi).chain(lo..start) {
            let path = self.dir.join(slot.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = writeln!(f, "{} {}", self.owner, holder);
                    let next = if slot >= hi { lo } else { slot + 1 };
                    self.next.store(next, std::sync::atomic::Ordering::Relaxed);
                    return Ok(slot);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(NetError::SlotDir { path, source }),
            }
        }
        Err(NetError::SlotsExhausted)
    }

    /// Records a new holder of a slot this allocator's owner holds (a pooled clone taken
    /// over by a sandbox).
    pub fn reassign(&self, slot: u32, holder: &str) -> Result<(), NetError> {
        let path = self.dir.join(slot.to_string());
        let tmp = self.dir.join(format!(".{slot}.tmp"));
        std::fs::write(&tmp, format!("{} {}\n", self.owner, holder))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| NetError::SlotDir { path, source })
    }

    /// Frees a slot. Freeing a free slot is not an error.
    pub fn release(&self, slot: u32) -> Result<(), NetError> {
        let path = self.dir.join(slot.to_string());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetError::SlotDir { path, source }),
        }
    }

    /// Slots held by this allocator's owner, with their holders: after a crash, these are
    /// the leftovers to clean up.
    pub fn owned(&self) -> Result<Vec<(u32, String)>, NetError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| NetError::SlotDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(slot) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut parts = content.split_whitespace();
            if parts.next() == Some(self.owner.as_str()) {
                out.push((slot, parts.next().unwrap_or_default().to_string()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// What guests may reach.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
    /// DNS servers handed to guests; always reachable on port 53.
    pub dns: Vec<Ipv4Addr>,
    /// Whether guests may reach private, shared and link-local ranges.
    pub allow_private: bool,
}

/// Ranges a guest may not reach unless [`EgressPolicy::allow_private`] is set.
pub const PRIVATE_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "224.0.0.0/4",
];

/// The per-instance nftables table in the host's namespace, plus host sysctls.
#[derive(Debug, Clone)]
pub struct HostFirewall {
    table: String,
}

impl HostFirewall {
    /// The firewall of the agent instance tagged `tag`.
    pub fn new(tag: &str) -> Self {
        Self {
            table: format!("nestbox_{tag}"),
        }
    }

    /// The nftables table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The ruleset text, for inspection and tests.
    pub fn ruleset(&self, policy: &EgressPolicy) -> String {
        let dns = policy
            .dns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let mut r = String::new();
        let t = &self.table;
        let _ = writeln!(r, "table inet {t} {{}}");
        let _ = writeln!(r, "delete table inet {t}");
        let _ = writeln!(r, "table inet {t} {{");
        let _ = writeln!(r, "  chain forward {{");
        let _ = writeln!(
            r,
            "    type filter hook forward priority filter - 5; policy accept;"
        );
        let _ = writeln!(r, "    iifname \"{PREFIX}h*\" oifname \"{PREFIX}h*\" drop");
        // Nothing from elsewhere is forwarded to a sandbox but replies: the host reaches
        // its sandboxes only from itself (the agent's proxy), never on anyone's behalf.
        let _ = writeln!(
            r,
            "    oifname \"{PREFIX}h*\" ct state established,related accept"
        );
        let _ = writeln!(r, "    oifname \"{PREFIX}h*\" drop");
        // Sandboxes speak IPv4 only.
        let _ = writeln!(r, "    iifname \"{PREFIX}h*\" meta nfproto ipv6 drop");
        // Only sandbox addresses come from sandbox links (spoofed sources never leave).
        let _ = writeln!(
            r,
            "    iifname \"{PREFIX}h*\" ip saddr != {SANDBOX_RANGE} drop"
        );
        if !dns.is_empty() {
            let _ = writeln!(
                r,
                "    iifname \"{PREFIX}h*\" ip daddr {{ {dns} }} udp dport 53 accept"
            );
            let _ = writeln!(
                r,
                "    iifname \"{PREFIX}h*\" ip daddr {{ {dns} }} tcp dport 53 accept"
            );
        }
        if !policy.allow_private {
            let ranges = PRIVATE_RANGES.join(", ");
            let _ = writeln!(r, "    iifname \"{PREFIX}h*\" ip daddr {{ {ranges} }} drop");
        }
        let _ = writeln!(r, "  }}");
        let _ = writeln!(r, "  chain input {{");
        let _ = writeln!(
            r,
            "    type filter hook input priority filter - 5; policy accept;"
        );
        let _ = writeln!(
            r,
            "    iifname \"{PREFIX}h*\" ct state established,related accept"
        );
        let _ = writeln!(r, "    iifname \"{PREFIX}h*\" drop");
        let _ = writeln!(r, "  }}");
        let _ = writeln!(r, "  chain postrouting {{");
        let _ = writeln!(
            r,
            "    type nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(
            r,
            "    ip saddr {SANDBOX_RANGE} oifname != \"{PREFIX}h*\" masquerade"
        );
        let _ = writeln!(r, "  }}");
        let _ = writeln!(r, "}}");
        r
    }

    /// Installs (or replaces) the table and enables IPv4 forwarding on the host.
    pub async fn install(&self, policy: &EgressPolicy) -> Result<(), NetError> {
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        Cmd::new("nft")
            .args(["-f", "-"])
            .stdin(self.ruleset(policy))
            .run()
            .await
            .map_err(|source| NetError::Firewall {
                table: self.table.clone(),
                source,
            })?;
        Ok(())
    }

    /// Removes the table; a missing table is not an error.
    pub async fn remove(&self) -> Result<(), NetError> {
        let script = format!(
            "table inet {t} {{}}\ndelete table inet {t}\n",
            t = self.table
        );
        Cmd::new("nft")
            .args(["-f", "-"])
            .stdin(script)
            .run()
            .await
            .map_err(|source| NetError::Firewall {
                table: self.table.clone(),
                source,
            })?;
        Ok(())
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<(), NetError> {
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == value)
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, value).map_err(|source| NetError::Sysctl {
        key: path.to_string(),
        source,
    })
}

/// A sandbox's network: namespace, veth pair, TAP and rules, all present.
#[derive(Debug, Clone)]
pub struct SandboxNet {
    /// Names and addresses.
    pub addrs: SlotAddrs,
}

impl SandboxNet {
    /// The ruleset loaded inside the namespace.
    ///
    /// Traffic the guest starts towards the outside passes the `egress` chain, whose sets
    /// hold the tenant's rules ([`SandboxNet::apply_egress`]): an allowed or pinned address
    /// is let through, a denied one rejected, anything else let through. Each connection
    /// is marked with the generation of the rules that passed it; when the rules change
    /// (a new generation), connections of older ones are checked again on their next
    /// packet, so a rule change applies to open connections too. Connections the host
    /// opens to the guest (its guest agent, its ports) are not the tenant's to filter.
    /// The `dns` chain is empty unless the rules name domains; then every DNS query the
    /// guest sends, whatever its destination, goes to the pinning resolver listening on
    /// the gateway address. Packets from the guest with another source address than its
    /// own are dropped before anything else sees them, and IPv6 (sandboxes speak IPv4
    /// only) is dropped on both of the namespace's links, counted.
    pub fn ns_ruleset(addrs: &SlotAddrs) -> String {
        let g = &addrs.ns_if;
        let sip = addrs.sandbox_ip;
        let indent = |rules: Vec<String>| {
            rules
                .iter()
                .map(|r| format!("    {r}\n"))
                .collect::<String>()
        };
        let forward = indent(forward_rules(addrs, FIRST_GENERATION));
        let egress = indent(egress_chain_rules(FIRST_GENERATION));
        format!(
            "table ip {NS_TABLE} {{
  set {SET_ALLOW} {{ type ipv4_addr; flags interval; auto-merge; }}
  set {SET_DENY} {{ type ipv4_addr; flags interval; auto-merge; }}
  set {SET_PINNED} {{ type ipv4_addr; }}
  chain spoof {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"{TAP_NAME}\" ip saddr != {GUEST_IP} drop
  }}
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{g}\" ip daddr {sip} dnat to {GUEST_IP}
    iifname \"{TAP_NAME}\" jump {CHAIN_DNS}
  }}
  chain {CHAIN_DNS} {{
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{g}\" ip saddr {GUEST_GATEWAY}/{GUEST_PREFIX} masquerade
  }}
  chain {CHAIN_EGRESS} {{
{egress}  }}
  chain {CHAIN_FORWARD} {{
    type filter hook forward priority filter; policy drop;
{forward}  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    iifname \"{TAP_NAME}\" ip daddr {GUEST_GATEWAY} meta l4proto {{ tcp, udp }} th dport 53 accept
  }}
}}
table ip6 {NS_TABLE} {{
  chain pre {{
    type filter hook prerouting priority raw; policy accept;
    iifname {{ \"{TAP_NAME}\", \"{g}\" }} counter drop
  }}
}}
"
        )
    }

    /// The script that replaces the tenant's rules in the namespace, in one transaction:
    /// the allow and deny sets, the pinned addresses (`keep` only), the DNS redirection
    /// when the rules name domains, and a new generation (see [`SandboxNet::ns_ruleset`]).
    pub fn egress_script(
        addrs: &SlotAddrs,
        egress: &Egress,
        keep: &[Ipv4Addr],
        generation: u32,
    ) -> String {
        let mut r = String::new();
        for set in [SET_ALLOW, SET_DENY, SET_PINNED] {
            let _ = writeln!(r, "flush set ip {NS_TABLE} {set}");
        }
        for chain in [CHAIN_DNS, CHAIN_EGRESS, CHAIN_FORWARD] {
            let _ = writeln!(r, "flush chain ip {NS_TABLE} {chain}");
        }
        let nets = |nets: &[Ipv4Net]| nets.iter().map(ToString::to_string).collect::<Vec<_>>();
        let addresses = keep.iter().map(ToString::to_string).collect::<Vec<_>>();
        for (set, list) in [
            (SET_ALLOW, nets(&egress.allow_nets)),
            (SET_DENY, nets(&egress.deny_nets)),
            (SET_PINNED, addresses),
        ] {
            if !list.is_empty() {
                let _ = writeln!(
                    r,
                    "add element ip {NS_TABLE} {set} {{ {} }}",
                    list.join(", ")
                );
            }
        }
        if !egress.allow_domains.is_empty() {
            let _ = writeln!(
                r,
                "add rule ip {NS_TABLE} {CHAIN_DNS} meta l4proto {{ tcp, udp }} th dport 53 dnat to {GUEST_GATEWAY}"
            );
        }
        for rule in egress_chain_rules(generation) {
            let _ = writeln!(r, "add rule ip {NS_TABLE} {CHAIN_EGRESS} {rule}");
        }
        for rule in forward_rules(addrs, generation) {
            let _ = writeln!(r, "add rule ip {NS_TABLE} {CHAIN_FORWARD} {rule}");
        }
        r
    }

    /// Puts the tenant's rules in force, replacing earlier ones and every pinned address
    /// but `keep`; connections already open are checked against the new rules.
    pub async fn apply_egress(&self, egress: &Egress, keep: &[Ipv4Addr]) -> Result<(), NetError> {
        let generation = next_generation();
        self.nft(Self::egress_script(&self.addrs, egress, keep, generation))
            .await
    }

    /// Lets the guest reach `ips` (addresses a domain rule resolved to).
    pub async fn pin(&self, ips: &[Ipv4Addr]) -> Result<(), NetError> {
        self.pinned_elements("add", ips).await
    }

    /// Takes back addresses [`SandboxNet::pin`] let through; each must be pinned.
    pub async fn unpin(&self, ips: &[Ipv4Addr]) -> Result<(), NetError> {
        self.pinned_elements("delete", ips).await
    }

    async fn pinned_elements(&self, verb: &str, ips: &[Ipv4Addr]) -> Result<(), NetError> {
        if ips.is_empty() {
            return Ok(());
        }
        let list = ips.iter().map(ToString::to_string).collect::<Vec<_>>();
        self.nft(format!(
            "{verb} element ip {NS_TABLE} {SET_PINNED} {{ {} }}\n",
            list.join(", ")
        ))
        .await
    }

    async fn nft(&self, script: String) -> Result<(), NetError> {
        Cmd::new("nft")
            .args(["-f", "-"])
            .netns(self.addrs.netns_path())
            .stdin(script)
            .run()
            .await
            .map_err(|source| NetError::Command {
                slot: self.addrs.slot,
                source,
            })?;
        Ok(())
    }

    /// Creates the namespace, links, addresses, routes and rules of `slot`. On failure
    /// everything created so far is removed before the error is returned.
    pub async fn setup(slot: u32) -> Result<Self, NetError> {
        let addrs = SlotAddrs::new(slot);
        let wrap = |source| NetError::Command { slot, source };
        // A crash may have left a namespace with this name behind.
        let _ = Self::teardown_addrs(&addrs).await;
        let root = format!(
            "netns add {ns}\n\
             link add {h} type veth peer name {g} netns {ns}\n\
             addr add {hip}/30 dev {h}\n\
             link set {h} up\n",
            ns = addrs.netns,
            h = addrs.host_if,
            g = addrs.ns_if,
            hip = addrs.host_ip,
        );
        let inner = format!(
            "link set lo up\n\
             addr add {sip}/30 dev {g}\n\
             link set {g} up\n\
             route add default via {hip}\n\
             tuntap add dev {TAP_NAME} mode tap\n\
             addr add {GUEST_GATEWAY}/{GUEST_PREFIX} dev {TAP_NAME}\n\
             link set {TAP_NAME} up\n",
            sip = addrs.sandbox_ip,
            g = addrs.ns_if,
            hip = addrs.host_ip,
        );
        let result = async {
            Cmd::new("ip")
                .args(["-batch", "-"])
                .stdin(root)
                .run()
                .await
                .map_err(wrap)?;
            Cmd::new("ip")
                .args(["-n", &addrs.netns, "-batch", "-"])
                .stdin(inner)
                .run()
                .await
                .map_err(wrap)?;
            // sysctls under /proc/sys/net belong to the namespace of the writing process, so
            // forwarding is switched on by a process inside the namespace.
            Cmd::new("sh")
                .args([
                    "-c",
                    "echo 1 > /proc/sys/net/ipv4/ip_forward && exec nft -f -",
                ])
                .netns(addrs.netns_path())
                .stdin(Self::ns_ruleset(&addrs))
                .run()
                .await
                .map_err(wrap)?;
            Ok::<(), NetError>(())
        }
        .await;
        match result {
            Ok(()) => Ok(Self { addrs }),
            Err(e) => {
                if let Err(cleanup) = Self::teardown_addrs(&addrs).await {
                    tracing::warn!(slot, error = %cleanup, "rollback of failed network setup");
                }
                Err(e)
            }
        }
    }

    /// Removes everything of this sandbox's network.
    pub async fn teardown(&self) -> Result<(), NetError> {
        Self::teardown_addrs(&self.addrs).await
    }

    /// Removes the namespace and host veth of a slot, whether or not they exist.
    pub async fn teardown_addrs(addrs: &SlotAddrs) -> Result<(), NetError> {
        let slot = addrs.slot;
        if addrs.netns_path().exists() {
            Cmd::new("ip")
                .args(["netns", "delete", &addrs.netns])
                .run()
                .await
                .map_err(|source| NetError::Command { slot, source })?;
        }
        // Deleting the namespace destroys the veth pair, but the host end may take a moment
        // to disappear; only a link that is still there after a failed delete is an error.
        let host_link = Path::new("/sys/class/net").join(&addrs.host_if);
        if host_link.exists()
            && let Err(source) = Cmd::new("ip")
                .args(["link", "delete", &addrs.host_if])
                .run()
                .await
            && host_link.exists()
        {
            return Err(NetError::Command { slot, source });
        }
        Ok(())
    }
}

/// Nameservers of the host usable by guests (loopback resolvers are skipped), else public
/// fallbacks.
pub fn host_dns_servers() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out: Vec<Ipv4Addr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect();
    if out.is_empty() {
        out = vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)];
    }
    out.truncate(3);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_addresses() {
        let a = SlotAddrs::new(1);
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(a.sandbox_ip, Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(a.netns, "nbx1");
        assert_eq!(a.host_if, "nbxh1");
        let last = SlotAddrs::new(MAX_SLOT);
        assert_eq!(last.sandbox_ip, Ipv4Addr::new(10, 200, 255, 254));
        assert!(last.host_if.len() <= 15);
    }

    #[test]
    fn slots_are_exclusive_and_owned() {
        let dir = tempfile::tempdir().unwrap();
        let a = SlotAllocator::new(dir.path(), "aaaa").unwrap();
        let b = SlotAllocator::new(dir.path(), "bbbb").unwrap();
        let s1 = a.allocate("sb-1").unwrap();
        let s2 = b.allocate("sb-2").unwrap();
        assert_ne!(s1, s2);
        assert_eq!(a.owned().unwrap(), vec![(s1, "sb-1".to_string())]);
        a.release(s1).unwrap();
        a.release(s1).unwrap();
        assert!(a.owned().unwrap().is_empty());
        assert_eq!(b.owned().unwrap().len(), 1);
        let s3 = a.allocate("sb-3").unwrap();
        assert_ne!(s3, s1, "a freed slot is not handed out again at once");
        let small = SlotAllocator::new(dir.path().join("small"), "c")
            .unwrap()
            .with_range(1..=2);
        let x = small.allocate("x").unwrap();
        let _y = small.allocate("y").unwrap();
        assert!(small.allocate("z").is_err(), "all slots taken");
        small.release(x).unwrap();
        assert_eq!(
            small.allocate("z").unwrap(),
            x,
            "wraps around to the freed slot"
        );
    }

    #[test]
    fn namespaces_drop_ipv6_on_both_links() {
        let r = SandboxNet::ns_ruleset(&SlotAddrs::new(7));
        assert!(r.contains("table ip6 nestbox"));
        assert!(r.contains("iifname { \"tap0\", \"nbxg7\" } counter drop"));
    }

    #[test]
    fn host_ruleset_isolates() {
        let fw = HostFirewall::new("t1");
        let policy = EgressPolicy {
            dns: vec![Ipv4Addr::new(10, 255, 255, 53)],
            allow_private: false,
        };
        let r = fw.ruleset(&policy);
        assert!(r.contains("table inet nestbox_t1"));
        assert!(r.contains("iifname \"nbxh*\" oifname \"nbxh*\" drop"));
        // Only replies are forwarded to sandboxes; no IPv6 leaves them.
        let established = r
            .find("oifname \"nbxh*\" ct state established,related accept")
            .unwrap();
        assert!(r.find("\n    oifname \"nbxh*\" drop").unwrap() > established);
        assert!(r.contains("iifname \"nbxh*\" meta nfproto ipv6 drop"));
        assert!(r.contains("10.0.0.0/8"));
        assert!(r.contains("10.255.255.53"));
        let open = fw.ruleset(&EgressPolicy {
            dns: vec![],
            allow_private: true,
        });
        assert!(!open.contains("10.0.0.0/8"));
    }
}
