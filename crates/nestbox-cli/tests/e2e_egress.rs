//! Egress rules with real VMs, against a test internet in a network namespace: domain
//! rules resolved by the host's pinning resolver (and nothing else reachable), CIDR rules,
//! no bypass by asking another DNS server, the host's own rules beyond any tenant rule,
//! and rules changed on a running sandbox and kept across pause and resume.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Internet, Nestbox, assert_gone, assert_instance_clean, footprint, host_primary_ip, sh_ok,
};
use nestbox_client::Client;
use nestbox_types::SandboxId;
use nestbox_types::api::{CreateSandboxRequest, EgressRequest};

/// What the sandbox runs to look outside: `resolve NAME`, `connect HOST PORT`, and
/// `query NAME SERVER` (an A query sent straight to SERVER; prints its response code).
const PROBE: &str = r#"
import socket, struct, sys
op = sys.argv[1]
if op == "resolve":
    try:
        print(socket.gethostbyname(sys.argv[2]))
    except OSError:
        print("FAIL")
elif op == "connect":
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((sys.argv[2], int(sys.argv[3])))
        print("OPEN")
    except OSError:
        print("CLOSED")
elif op == "query":
    name, server = sys.argv[2], sys.argv[3]
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(q, (server, 53))
        print("rcode", s.recv(512)[3] & 15)
    except OSError:
        print("TIMEOUT")
"#;

async fn probe(client: &Client, id: SandboxId, args: &str) -> String {
    sh_ok(client, id, &format!("python3 /root/probe.py {args}"))
        .await
        .trim()
        .to_string()
}

fn rules(allow: &[&str], deny: &[&str]) -> EgressRequest {
    EgressRequest {
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
        allow_internet_access: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_rules_confine_a_sandbox() {
    let net = Internet::new(
        "203.0.113.0/25",
        &[10, 20, 30, 31, 40],
        &[
            ("allowed.test", 10),
            ("other.test", 20),
            ("api.wild.test", 30),
            ("wild.test", 31),
        ],
    );
    let nb = Nestbox::up_env(&[("NESTBOX_DNS", &net.dns())]);
    let client = nb.client();
    // A service on the host, which no tenant rule may open.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let host_ip = host_primary_ip();

    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("python".into()),
            egress: Some(EgressRequest {
                allow_out: vec![
                    "allowed.test".into(),
                    "*.wild.test".into(),
                    net.ip(40),
                    host_ip.clone(),
                    "169.254.169.254".into(),
                ],
                deny_out: vec![],
                allow_internet_access: Some(false),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = sb.id;
    assert_eq!(sb.egress.deny_out, vec!["0.0.0.0/0".to_string()]);
    sh_ok(
        &client,
        id,
        &format!("cat > /root/probe.py <<'EOF'\n{PROBE}\nEOF"),
    )
    .await;

    // An allowed name resolves through the host's resolver, and its address is reachable.
    assert_eq!(probe(&client, id, "resolve allowed.test").await, net.ip(10));
    assert_eq!(
        probe(&client, id, "connect allowed.test 8080").await,
        "OPEN"
    );
    // Any other name is refused before it reaches a DNS server, and its address, however
    // the guest learned it, is not reachable.
    assert_eq!(probe(&client, id, "resolve other.test").await, "FAIL");
    assert!(!net.was_asked("other.test"), "{}", net.dns_log());
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(20))).await,
        "CLOSED"
    );
    // A wildcard covers the names below it, not the name itself.
    assert_eq!(
        probe(&client, id, "resolve api.wild.test").await,
        net.ip(30)
    );
    assert_eq!(
        probe(&client, id, "connect api.wild.test 8080").await,
        "OPEN"
    );
    assert_eq!(probe(&client, id, "resolve wild.test").await, "FAIL");
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(31))).await,
        "CLOSED"
    );
    // An allowed address needs no name.
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(40))).await,
        "OPEN"
    );
    // Asking another server does not help: every DNS query goes to the host's resolver.
    assert_eq!(
        probe(&client, id, &format!("query other.test {}", net.ip(2))).await,
        "rcode 5"
    );
    assert_eq!(
        probe(&client, id, &format!("query allowed.test {}", net.ip(2))).await,
        "rcode 0"
    );
    assert!(!net.was_asked("other.test"), "{}", net.dns_log());
    // The host's own rules hold whatever a tenant allows: not the host, not the link-local
    // metadata address.
    assert_eq!(
        probe(&client, id, &format!("connect {host_ip} {host_port}")).await,
        "CLOSED"
    );
    assert_eq!(
        probe(&client, id, "connect 169.254.169.254 80").await,
        "CLOSED"
    );

    // New rules on the running sandbox: open by default, one address denied.
    let changed = client
        .set_egress(id, &rules(&[], &[&net.ip(20)]))
        .await
        .unwrap();
    assert_eq!(changed.egress.deny_out, vec![net.ip(20)]);
    assert_eq!(probe(&client, id, "resolve other.test").await, net.ip(20));
    assert_eq!(
        probe(&client, id, "connect other.test 8080").await,
        "CLOSED"
    );
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(31))).await,
        "OPEN"
    );

    // Kept across pause and resume.
    client.pause_sandbox(id).await.unwrap();
    client.resume_sandbox(id).await.unwrap();
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(20))).await,
        "CLOSED"
    );
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(10))).await,
        "OPEN"
    );

    // No rules (through the CLI): whatever the host allows.
    let out = nb.cli(&["sandbox", "egress", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(client.get_sandbox(id).await.unwrap().egress.is_empty());
    assert_eq!(
        probe(&client, id, &format!("connect {} 8080", net.ip(20))).await,
        "OPEN"
    );
    drop(listener);
    // Nothing of it stays: namespace (and the resolver's sockets in it), slot, VMM, files;
    // and nothing of the installation once it stops.
    let fp = footprint(&nb, id);
    client.destroy_sandbox(id).await.unwrap();
    assert_gone(&nb, &fp, id);
    let tag = nb.tag();
    let mut nb = nb;
    nb.stop();
    assert_instance_clean(&tag);
}
