//! Real network namespaces, veth pairs, TAPs and nftables rules (needs root, iproute2 and
//! nftables, as the host agent does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use nestbox_hostsys::net::{EgressPolicy, HostFirewall, SandboxNet, SlotAllocator};
use nestbox_hostsys::process::Cmd;

async fn text(cmd: Cmd) -> String {
    cmd.run().await.unwrap().stdout_text()
}

#[tokio::test]
async fn sandbox_network_setup_and_teardown_leave_nothing() {
    let slots_dir = tempfile::tempdir().unwrap();
    // A high slot range keeps clear of a developer's running agent.
    let slots = SlotAllocator::new(slots_dir.path(), "nettest")
        .unwrap()
        .with_range(16000..=16383);
    let slot = slots.allocate("test").unwrap();
    assert!(slot >= 16000);
    let net = SandboxNet::setup(slot).await.unwrap();
    let a = &net.addrs;
    assert!(a.netns_path().exists());
    let links = text(Cmd::new("ip").args(["-n", &a.netns, "-br", "link"])).await;
    assert!(links.contains("tap0"), "{links}");
    assert!(links.contains(&a.ns_if), "{links}");
    let rules = text(
        Cmd::new("nft")
            .args(["list", "ruleset"])
            .netns(a.netns_path()),
    )
    .await;
    assert!(rules.contains("dnat to 172.16.0.2"), "{rules}");
    let forward = text(
        Cmd::new("cat")
            .arg("/proc/sys/net/ipv4/ip_forward")
            .netns(a.netns_path()),
    )
    .await;
    assert_eq!(forward, "1", "forwarding is on inside the namespace");
    // The host routes the sandbox's address through its veth.
    let route = text(Cmd::new("ip").args(["route", "get", &a.sandbox_ip.to_string()])).await;
    assert!(route.contains(&a.host_if), "{route}");

    net.teardown().await.unwrap();
    assert!(!a.netns_path().exists());
    let host_links = text(Cmd::new("ip").args(["-br", "link"])).await;
    assert!(!host_links.contains(&a.host_if), "{host_links}");
    slots.release(slot).unwrap();
}

#[tokio::test]
async fn host_firewall_installs_and_removes() {
    let fw = HostFirewall::new("fwtest");
    let policy = EgressPolicy {
        dns: vec!["10.255.255.53".parse().unwrap()],
        allow_private: false,
    };
    fw.install(&policy).await.unwrap();
    let listed = text(Cmd::new("nft").args(["list", "table", "inet", fw.table()])).await;
    assert!(listed.contains("masquerade"), "{listed}");
    // Installing twice replaces, never duplicates.
    fw.install(&policy).await.unwrap();
    let again = text(Cmd::new("nft").args(["list", "table", "inet", fw.table()])).await;
    assert_eq!(
        listed.matches("masquerade").count(),
        again.matches("masquerade").count()
    );
    fw.remove().await.unwrap();
    fw.remove().await.unwrap();
    let all = text(Cmd::new("nft").args(["list", "tables"])).await;
    assert!(!all.contains(fw.table()), "{all}");
}
