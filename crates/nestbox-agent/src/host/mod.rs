//! The host side of the sandbox manager, behind narrow traits: the VMM
//! ([`nestbox_vmm::Vmm`]), each sandbox's network ([`Network`]) and the tools that work on
//! disk images ([`DiskTools`]). The manager is handed one of each ([`Host`]) and never
//! chooses: the agent gives it the real ones ([`Host::real`]); tests give it the in-memory
//! stand-ins of [`fake`], which need no root, record what they hold and fail on request at
//! any step.
//!
//! Everything else the manager does on the host (its directories, state files, snapshot
//! copies, slot files) is plain file work and runs for real in both cases.

pub mod fake;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use nestbox_dns::{DnsError, Sockets};
pub use nestbox_hostsys::disk::{BoxFuture, DiskTools, Ext4Qcow2};
use nestbox_hostsys::net::{GUEST_GATEWAY, NetError, SandboxNet, SlotAddrs};
use nestbox_types::egress::Egress;
use nestbox_types::limits::GUEST_AGENT_PORT;
use nestbox_vmm::Vmm;

/// The networks of sandboxes, one per network slot: a namespace the VMM's TAP lives in,
/// the link the host reaches the guest through, and the tenant's egress rules.
pub trait Network: Send + Sync {
    /// Makes `slot`'s network (all of it, or nothing).
    fn setup(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>>;
    /// Removes whatever part of `slot`'s network exists.
    fn teardown(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>>;
    /// Whether `slot`'s network exists.
    fn exists(&self, slot: u32) -> bool;
    /// The namespace the VMM opens its TAP device in.
    fn netns(&self, slot: u32) -> PathBuf;
    /// Where the host reaches the guest agent of `slot`'s sandbox.
    fn guest_agent(&self, slot: u32) -> SocketAddr;
    /// Binds the sandbox's resolver (its guest's DNS server).
    fn resolver(&self, slot: u32) -> Result<Sockets, DnsError>;
    /// Replaces the tenant's egress rules, keeping the pinned addresses in `keep`.
    fn replace_egress<'a>(
        &'a self,
        slot: u32,
        egress: &'a Egress,
        keep: &'a [Ipv4Addr],
    ) -> BoxFuture<'a, Result<(), NetError>>;
    /// Lets the guest reach addresses its resolver answered with.
    fn pin<'a>(&'a self, slot: u32, ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>>;
    /// Takes such addresses back.
    fn unpin<'a>(&'a self, slot: u32, ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>>;
}

/// The real networks: a network namespace per slot (see [`nestbox_hostsys::net`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Namespaces;

fn slot_net(slot: u32) -> SandboxNet {
    SandboxNet {
        addrs: SlotAddrs::new(slot),
    }
}

impl Network for Namespaces {
    fn setup(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>> {
        Box::pin(async move { SandboxNet::setup(slot).await.map(drop) })
    }
    fn teardown(&self, slot: u32) -> BoxFuture<'_, Result<(), NetError>> {
        Box::pin(async move { SandboxNet::teardown_addrs(&SlotAddrs::new(slot)).await })
    }
    fn exists(&self, slot: u32) -> bool {
        SlotAddrs::new(slot).netns_path().exists()
    }
    fn netns(&self, slot: u32) -> PathBuf {
        SlotAddrs::new(slot).netns_path()
    }
    fn guest_agent(&self, slot: u32) -> SocketAddr {
        SocketAddr::from((SlotAddrs::new(slot).sandbox_ip, GUEST_AGENT_PORT))
    }
    fn resolver(&self, slot: u32) -> Result<Sockets, DnsError> {
        Sockets::bind_in(&self.netns(slot), SocketAddr::from((GUEST_GATEWAY, 53)))
    }
    fn replace_egress<'a>(
        &'a self,
        slot: u32,
        egress: &'a Egress,
        keep: &'a [Ipv4Addr],
    ) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move { slot_net(slot).apply_egress(egress, keep).await })
    }
    fn pin<'a>(&'a self, slot: u32, ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move { slot_net(slot).pin(ips).await })
    }
    fn unpin<'a>(&'a self, slot: u32, ips: &'a [Ipv4Addr]) -> BoxFuture<'a, Result<(), NetError>> {
        Box::pin(async move { slot_net(slot).unpin(ips).await })
    }
}

/// What the manager runs sandboxes with.
#[derive(Clone)]
pub struct Host {
    /// The VMM.
    pub vmm: Arc<dyn Vmm>,
    /// Sandbox networks.
    pub network: Arc<dyn Network>,
    /// Disk image tools.
    pub disks: Arc<dyn DiskTools>,
}

impl Host {
    /// The real network and disk tools, with `vmm`.
    pub fn real(vmm: Arc<dyn Vmm>) -> Self {
        Self {
            vmm,
            network: Arc::new(Namespaces),
            disks: Arc::new(Ext4Qcow2),
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("vmm", self.vmm.info())
            .finish_non_exhaustive()
    }
}

/// One sandbox's network: its slot, on the host's [`Network`].
#[derive(Clone)]
pub struct NetHandle {
    slot: u32,
    network: Arc<dyn Network>,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("slot", &self.slot)
            .finish()
    }
}

impl NetHandle {
    /// The network of `slot` (made already, or to be torn down).
    pub fn new(network: Arc<dyn Network>, slot: u32) -> Self {
        Self { slot, network }
    }

    /// Makes the network of `slot`.
    pub async fn setup(network: Arc<dyn Network>, slot: u32) -> Result<Self, NetError> {
        network.setup(slot).await?;
        Ok(Self::new(network, slot))
    }

    /// Its slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Its namespace.
    pub fn netns(&self) -> PathBuf {
        self.network.netns(self.slot)
    }

    /// Where the guest agent is reached.
    pub fn guest_agent(&self) -> SocketAddr {
        self.network.guest_agent(self.slot)
    }

    /// Binds the resolver.
    pub fn resolver(&self) -> Result<Sockets, DnsError> {
        self.network.resolver(self.slot)
    }

    /// Removes the network.
    pub async fn teardown(&self) -> Result<(), NetError> {
        self.network.teardown(self.slot).await
    }

    /// See [`Network::replace_egress`].
    pub async fn replace_egress(&self, egress: &Egress, keep: &[Ipv4Addr]) -> Result<(), NetError> {
        self.network.replace_egress(self.slot, egress, keep).await
    }

    /// See [`Network::pin`].
    pub async fn pin(&self, ips: &[Ipv4Addr]) -> Result<(), NetError> {
        self.network.pin(self.slot, ips).await
    }

    /// See [`Network::unpin`].
    pub async fn unpin(&self, ips: &[Ipv4Addr]) -> Result<(), NetError> {
        self.network.unpin(self.slot, ips).await
    }
}
