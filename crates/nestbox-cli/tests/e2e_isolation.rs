//! Isolation with real VMs: sandboxes reach the outside through NAT, but not each other,
//! not the host's own services, not over IPv6, and nobody reaches them through the host's
//! forward path; another team sees none of them; the host agent answers only the control
//! plane (mutual TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Internet, Nestbox, footprint, host_primary_ip, sh, sh_ok};
use nestbox_client::Client;
use nestbox_hostsys::net::SlotAddrs;
use nestbox_types::ErrorCode;
use nestbox_types::api::{CreateSandboxRequest, CreateUserRequest, ExecRequest, SandboxListQuery};

/// `OPEN` or `CLOSED`: whether the sandbox can open a TCP connection to `ip:port`.
async fn probe(client: &Client, id: nestbox_types::SandboxId, ip: &str, port: u16) -> String {
    let cmd = format!(
        "timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null && echo OPEN || echo CLOSED"
    );
    // (`timeout` runs bash, which knows /dev/tcp; the outer shell is sh.)
    sh_ok(client, id, &cmd).await.trim().to_string()
}

#[tokio::test]
async fn sandboxes_reach_out_but_not_each_other_nor_the_host() {
    let nb = Nestbox::up();
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let b = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    let (foot_a, foot_b) = (footprint(&nb, a), footprint(&nb, b));
    let addr_a = SlotAddrs::new(foot_a.slot);
    let addr_b = SlotAddrs::new(foot_b.slot);

    // Each VMM is jailed: its own unprivileged user (not its neighbour's), no
    // capabilities, QEMU's seccomp filter, and a root of its own in which the neighbour's
    // disk, RAM and directory do not exist.
    for (me, other) in [(&foot_a, &foot_b), (&foot_b, &foot_a)] {
        let status = std::fs::read_to_string(format!("/proc/{}/status", me.vmm_pid)).unwrap();
        let uid = nestbox_vmm::qemu::jail::uid_for_slot(me.slot);
        for want in [
            format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}"),
            "CapEff:\t0000000000000000".into(),
            "CapBnd:\t0000000000000000".into(),
            "NoNewPrivs:\t1".into(),
            "Seccomp:\t2".into(),
        ] {
            assert!(
                status.lines().any(|l| l == want),
                "{want} missing:\n{status}"
            );
        }
        let root = PathBuf::from(format!("/proc/{}/root", me.vmm_pid));
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
        // Its own directory, and only that, under the sandboxes' directory (by the name it
        // had when the VMM started: a pooled clone's is renamed when a create takes it over).
        let sandboxes = me.sandbox_dir.parent().unwrap();
        let seen: Vec<PathBuf> = std::fs::read_dir(inside(sandboxes))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(seen.len(), 1, "a VMM sees one sandbox directory: {seen:?}");
        assert!(seen[0].join("rootfs.qcow2").exists(), "{seen:?}");
        for theirs in [
            other.sandbox_dir.clone(),
            other.mem_dir.clone(),
            PathBuf::from("/etc/shadow"),
        ] {
            assert!(
                !inside(&theirs).exists(),
                "{} is visible to a VMM",
                theirs.display()
            );
        }
        // What the VMM can list of its own directory (seen by its first name, as above): its
        // disk and its console; nothing the agent keeps there.
        let mut own: Vec<String> = std::fs::read_dir(&seen[0])
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        own.sort();
        assert_eq!(own, ["console.log", "rootfs.qcow2"], "{own:?}");
    }

    // A service on the host, listening on every address.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("the host service answers locally");

    // Egress through NAT works: the outside sees the host's address, not the sandbox's.
    let outside = Internet::new("198.51.100.0/25", &[], &[]);
    let page = sh_ok(
        &client,
        a,
        "bash -c 'exec 3<>/dev/tcp/198.51.100.2/8080 && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && head -1 <&3'",
    )
    .await;
    assert!(page.contains("200"), "egress to the outside failed: {page}");
    assert!(
        outside
            .web_log()
            .lines()
            .any(|l| l.starts_with("198.51.100.1 ") && l.contains("\"GET / ")),
        "the outside should see the host's address: {}",
        outside.web_log()
    );

    // The host forwards nothing new to a sandbox: a machine that routes the sandbox
    // range through the host (here, the outside network) reaches no guest, neither its
    // guest agent nor anything else.
    let routed = outside
        .command("ip")
        .args(["route", "add", "10.200.0.0/16", "via", "198.51.100.1"])
        .status()
        .unwrap();
    assert!(routed.success());
    let forward = outside
        .command("bash")
        .args([
            "-c",
            &format!(
                "timeout 3 bash -c 'exec 3<>/dev/tcp/{}/49983' 2>/dev/null && echo OPEN || echo CLOSED",
                addr_a.sandbox_ip
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&forward.stdout).trim(),
        "CLOSED",
        "the host forwarded a connection to a guest"
    );

    // Sandboxes speak IPv4 only: what IPv6 a guest sends (router and neighbour
    // solicitations, a connection to a link-local address) is dropped at its link.
    let _ = sh(
        &client,
        a,
        "timeout 3 bash -c 'exec 3<>/dev/tcp/fe80::1%eth0/80' 2>/dev/null; ip -6 route get 2001:db8::1 || true",
    )
    .await;
    let v6 = std::process::Command::new("ip")
        .args(["netns", "exec", &addr_a.netns])
        .args(["nft", "list", "table", "ip6", "nestbox"])
        .output()
        .unwrap();
    let v6 = String::from_utf8_lossy(&v6.stdout).into_owned();
    let dropped: u64 = v6
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "no IPv6 from the guest was dropped:\n{v6}");
    let guest_v6 = sh(&client, a, "ip -6 addr show scope global").await;
    assert!(
        guest_v6.stdout.trim().is_empty(),
        "the guest got a global IPv6 address: {}",
        guest_v6.stdout
    );

    // Not another sandbox (its guest agent port, through its per-slot address).
    assert_eq!(
        probe(&client, a, &addr_b.sandbox_ip.to_string(), 49983).await,
        "CLOSED"
    );
    // Not the host: neither through the sandbox's gateway nor the host's own address.
    assert_eq!(
        probe(&client, a, &addr_a.host_ip.to_string(), port).await,
        "CLOSED"
    );
    assert_eq!(probe(&client, a, &host_primary_ip(), port).await, "CLOSED");
    // Not link-local or private ranges (e.g. cloud metadata services).
    assert_eq!(probe(&client, a, "169.254.169.254", 80).await, "CLOSED");
    // And B cannot reach A either.
    assert_eq!(
        probe(&client, b, &addr_a.sandbox_ip.to_string(), 49983).await,
        "CLOSED"
    );
    drop(listener);

    client.destroy_sandbox(a).await.unwrap();
    client.destroy_sandbox(b).await.unwrap();
}

#[tokio::test]
async fn another_team_cannot_see_or_touch_a_sandbox() {
    let nb = Nestbox::up();
    let owner = nb.client();
    let sb = owner
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();

    // The admin creates a second user, who gets a team and an API key of their own.
    let admin = nb.admin().await;
    let created = admin
        .create_user(&CreateUserRequest {
            email: "other@example.com".into(),
            name: "Other".into(),
            password: "a long enough password".into(),
            is_admin: false,
        })
        .await
        .unwrap();
    let other = nb
        .anonymous()
        .login("other@example.com", "a long enough password")
        .await
        .unwrap();
    let other_user = nb.anonymous().with_token(other.token);
    let key = other_user
        .create_api_key(created.team.id, "ci")
        .await
        .unwrap();
    let other = nb.anonymous().with_api_key(key.key);

    let not_found = |r: Result<_, nestbox_client::ClientError>| {
        let e = r.expect_err("another team's call must fail");
        assert_eq!(e.code(), Some(ErrorCode::SandboxNotFound), "{e}");
    };
    not_found(other.get_sandbox(sb.id).await.map(|_| ()));
    not_found(
        other
            .exec(
                sb.id,
                &ExecRequest {
                    command: Some("true".into()),
                    ..Default::default()
                },
            )
            .await
            .map(|_| ()),
    );
    not_found(other.list_files(sb.id, "/", None).await.map(|_| ()));
    not_found(other.download(sb.id, "/etc/hostname").await.map(|_| ()));
    not_found(
        other
            .upload(sb.id, "/tmp/x", reqwest::Body::from("x"), Some(1))
            .await
            .map(|_| ()),
    );
    not_found(other.destroy_sandbox(sb.id).await);
    let listed = other
        .list_sandboxes(&SandboxListQuery::default())
        .await
        .unwrap();
    assert!(
        listed.items.is_empty(),
        "another team lists nothing of ours"
    );
    // The owner still has it, untouched.
    assert_eq!(
        owner.get_sandbox(sb.id).await.unwrap().status,
        nestbox_types::SandboxStatus::Running
    );
    owner.destroy_sandbox(sb.id).await.unwrap();
}

#[tokio::test]
async fn the_host_agent_answers_only_the_control_plane() {
    let nb = Nestbox::up();
    let admin = nb.admin().await;
    let hosts = admin.list_hosts().await.unwrap().items;
    let address = hosts[0].address.clone().unwrap();
    let authority = address
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("the agent is not reached over TLS: {address}"));
    // Everything the control plane does with it works (sandboxes run through it)...
    let sb = nb
        .client()
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    assert_eq!(sh_ok(&nb.client(), sb.id, "echo ok").await.trim(), "ok");
    // ...but nobody else gets an answer: not in plain HTTP, not over TLS without a client
    // certificate, not with a certificate of another authority.
    let get = |client: reqwest::Client, url: String| async move {
        client
            .get(url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
    };
    // Clients that would accept any server certificate: only their own is in question.
    let tls_client = |identity: Option<reqwest::Identity>| {
        let builder = reqwest::Client::builder().danger_accept_invalid_certs(true);
        match identity {
            Some(identity) => builder.identity(identity),
            None => builder,
        }
        .build()
        .unwrap()
    };
    let plain = get(reqwest::Client::new(), format!("http://{authority}/")).await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let no_cert = get(tls_client(None), format!("https://{authority}/")).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate got {no_cert:?}"
    );
    let stranger = nestbox_pki::Authority::new(b"another installation")
        .unwrap()
        .control_plane()
        .unwrap();
    let identity = reqwest::Identity::from_pem(
        format!("{}{}", stranger.cert_pem, stranger.key_pem).as_bytes(),
    )
    .unwrap();
    let foreign = get(tls_client(Some(identity)), format!("https://{authority}/")).await;
    assert!(
        foreign.is_err(),
        "another authority's client got {foreign:?}"
    );
    nb.client().destroy_sandbox(sb.id).await.unwrap();
}
