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

#[tokio::test]
async fn egress_rules_fill_the_namespace_sets_and_replace_each_other() {
    use nestbox_types::egress::EgressRules;
    let slots_dir = tempfile::tempdir().unwrap();
    let slots = SlotAllocator::new(slots_dir.path(), "egresstest")
        .unwrap()
        // Not the range of the test above: the two run at once, each with its own files.
        .with_range(16200..=16383);
    let slot = slots.allocate("test").unwrap();
    let net = SandboxNet::setup(slot).await.unwrap();
    let list = || async {
        text(
            Cmd::new("nft")
                .args(["list", "table", "ip", "nestbox"])
                .netns(net.addrs.netns_path()),
        )
        .await
    };
    // Overlapping blocks merge; names turn DNS redirection on.
    let egress = EgressRules {
        allow_out: vec![
            "203.0.113.0/24".into(),
            "203.0.113.7".into(),
            "example.com".into(),
        ],
        deny_out: vec!["0.0.0.0/0".into()],
    }
    .parse()
    .unwrap();
    net.apply_egress(&egress, &[]).await.unwrap();
    net.pin(&["192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap()])
        .await
        .unwrap();
    let rules = list().await;
    assert!(rules.contains("203.0.113.0/24"), "{rules}");
    assert!(rules.contains("0.0.0.0/0"), "{rules}");
    assert!(rules.contains("192.0.2.10"), "{rules}");
    assert!(rules.contains("dnat to 172.16.0.1"), "{rules}");
    net.unpin(&["192.0.2.10".parse().unwrap()]).await.unwrap();
    let rules = list().await;
    assert!(!rules.contains("192.0.2.10"), "{rules}");
    assert!(rules.contains("192.0.2.11"), "{rules}");

    // New rules replace the old ones whole, pinned addresses but the kept one included,
    // under a new generation (connections of the old one are checked again).
    let generation = |rules: &str| {
        rules
            .lines()
            .find_map(|l| l.trim().strip_prefix("ip daddr @egress_allow ct mark set "))
            .and_then(|r| r.split_whitespace().next())
            .map(str::to_string)
            .unwrap()
    };
    let before = generation(&list().await);
    let cidr_only = EgressRules {
        allow_out: vec![],
        deny_out: vec!["198.51.100.0/24".into()],
    }
    .parse()
    .unwrap();
    net.apply_egress(&cidr_only, &["192.0.2.11".parse().unwrap()])
        .await
        .unwrap();
    let rules = list().await;
    assert!(rules.contains("198.51.100.0/24"), "{rules}");
    assert!(!rules.contains("203.0.113.0/24"), "{rules}");
    assert!(rules.contains("192.0.2.11"), "kept: {rules}");
    assert!(!rules.contains("192.0.2.10"), "{rules}");
    assert_ne!(generation(&rules), before, "{rules}");
    assert!(
        rules.contains(&format!("ct mark != {}", generation(&rules))),
        "{rules}"
    );
    assert!(
        !rules.contains("dnat to 172.16.0.1"),
        "no names, no redirection: {rules}"
    );
    // And no rules at all leaves every set empty.
    net.apply_egress(&Default::default(), &[]).await.unwrap();
    let rules = list().await;
    assert!(!rules.contains("198.51.100.0/24"), "{rules}");

    net.teardown().await.unwrap();
    slots.release(slot).unwrap();
}
