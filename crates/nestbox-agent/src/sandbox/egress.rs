//! A sandbox's egress rules on the host: the nftables sets of its namespace, filled by
//! [`nestbox_dns::DnsGuard`], which every running sandbox has (listening on the guest's
//! gateway; the guest's DNS queries reach it only while the rules name domains).
//!
//! Rules are in force before the sandbox is the tenant's: `bring_up` starts the guard
//! right after the namespace is made and before the VMM starts, and a create that takes
//! over a pooled clone (which ran the template's code only) replaces the clone's open
//! rules before the guest agent gets the tenant's token. Rules are kept in the sandbox's
//! `state.json`, so a resume (or a restore after a restart) brings them back. A change
//! applies to open connections too (see `SandboxNet::ns_ruleset`).

use std::net::SocketAddr;

use nestbox_dns::{DnsGuard, PinTable, TableError};
use nestbox_types::SandboxId;
use nestbox_types::egress::{Egress, EgressRules};

use super::Manager;
use crate::error::AgentError;
use crate::host::NetHandle;

/// The nftables sets of one sandbox's namespace.
pub(crate) struct NsTable(NetHandle);

impl PinTable for NsTable {
    async fn replace(
        &self,
        egress: &Egress,
        keep: &[std::net::Ipv4Addr],
    ) -> Result<(), TableError> {
        Ok(self.0.replace_egress(egress, keep).await?)
    }
    async fn pin(&self, ips: &[std::net::Ipv4Addr]) -> Result<(), TableError> {
        Ok(self.0.pin(ips).await?)
    }
    async fn unpin(&self, ips: &[std::net::Ipv4Addr]) -> Result<(), TableError> {
        Ok(self.0.unpin(ips).await?)
    }
}

/// A running sandbox's resolver, holding its rules.
pub(crate) type Guard = DnsGuard<NsTable>;

/// Whether an egress change of `version` is older than (or the same as) the one in force,
/// `holding`: it arrived late and must not undo a newer one. Version 0 is unversioned and
/// always taken.
pub(crate) fn stale(holding: u64, version: u64) -> bool {
    version != 0 && version <= holding
}

/// Validates rules the control plane sent (it validated them too; an agent never trusts
/// its input).
pub(crate) fn parse(id: SandboxId, rules: &EgressRules) -> Result<Egress, AgentError> {
    rules
        .parse()
        .map_err(|e| AgentError::Invalid(format!("sandbox {id}: egress rules: {e}")))
}

impl Manager {
    /// Puts `rules` in force in `net` and starts the sandbox's resolver.
    pub(super) async fn start_egress(
        &self,
        id: SandboxId,
        net: &NetHandle,
        rules: &EgressRules,
    ) -> Result<Guard, AgentError> {
        let egress = parse(id, rules)?;
        let sockets = net
            .resolver()
            .map_err(|e| AgentError::host("starting the sandbox's resolver", id, e))?;
        let upstream = self
            .inner()
            .dns
            .iter()
            .map(|ip| SocketAddr::from((*ip, 53)))
            .collect();
        DnsGuard::start(sockets, NsTable(net.clone()), egress, upstream)
            .await
            .map_err(|e| AgentError::host("putting the egress rules in force", id, e))
    }
}

#[cfg(test)]
mod tests {
    use super::stale;

    #[test]
    fn only_newer_versions_are_taken() {
        assert!(!stale(0, 1));
        assert!(!stale(3, 4));
        assert!(stale(4, 4), "the same change twice");
        assert!(stale(4, 3), "an older change arriving late");
        assert!(!stale(4, 0), "unversioned changes are always taken");
    }
}
