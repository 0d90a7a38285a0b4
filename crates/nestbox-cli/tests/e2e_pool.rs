//! Pooled clones with real VMs: a create from a snapshot template takes over a clone
//! started ahead of time, which becomes exactly the sandbox asked for (its own token,
//! environment, host name and clock; the template's files and memory; independent of the
//! others), then pauses, resumes and survives a restart like any sandbox. Deleting the
//! template stops its pooled clones, and nothing is left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::{Nestbox, eventually, footprint, new_sandbox, sh, sh_ok};
use nestbox_envd::client::EnvdClient;
use nestbox_hostsys::net::SlotAddrs;
use nestbox_types::api::{CreateSandboxRequest, CreateSnapshotRequest};
use nestbox_types::{SandboxId, SandboxStatus, TemplateId};

/// A started clone of `template` on the host that no sandbox has taken over:
/// `(its directory, its state)`.
fn pooled_clone(nb: &Nestbox, template: TemplateId) -> Option<(PathBuf, serde_json::Value)> {
    let dirs = std::fs::read_dir(nb.data_dir().join("agent/sandboxes")).ok()?;
    dirs.flatten().find_map(|e| {
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.path().join("state.json")).ok()?).ok()?;
        let pooled =
            st["template_id"].as_str() == Some(&template.to_string()) && st["pooled"] == true;
        pooled.then(|| (e.path(), st))
    })
}

async fn wait_for_pooled_clone(nb: &Nestbox, template: TemplateId) -> (PathBuf, serde_json::Value) {
    eventually(
        Duration::from_secs(120),
        "a pooled clone of the template",
        || async { pooled_clone(nb, template) },
    )
    .await
}

#[tokio::test]
async fn creates_take_over_pooled_clones() {
    let mut nb = Nestbox::up();
    let client = nb.client();
    let src = new_sandbox(&client).await;
    sh_ok(
        &client,
        src,
        "echo on-disk > /root/disk.txt; echo in-memory > /dev/shm/mem.txt",
    )
    .await;
    let tpl = client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: src,
            name: "e2e-pool".into(),
            overwrite: false,
            kind: None,
        })
        .await
        .unwrap();
    client.destroy_sandbox(src).await.unwrap();
    let from_template = |greeting: &str| CreateSandboxRequest {
        template: Some("e2e-pool".into()),
        env: BTreeMap::from([("GREETING".into(), greeting.into())]),
        ..Default::default()
    };

    // The first create restores; it leaves a started clone behind for the next one.
    let a = client.create_sandbox(&from_template("a")).await.unwrap();
    let (clone_dir, clone_state) = wait_for_pooled_clone(&nb, tpl.id).await;
    let clone_id = clone_state["sandbox_id"].as_str().unwrap().to_string();
    let clone_token = clone_state["access_token"].as_str().unwrap().to_string();

    let b = client.create_sandbox(&from_template("b")).await.unwrap();
    let fp = footprint(&nb, b.id);
    assert_eq!(
        fp.vmm_name, clone_id,
        "the create took the pooled clone over"
    );
    assert_eq!(
        std::fs::read_link(&clone_dir).unwrap(),
        PathBuf::from(b.id.to_string()),
        "the clone's directory is the sandbox's now (its old name a link)"
    );
    assert_eq!(b.status, SandboxStatus::Running);

    // It is the sandbox asked for: its environment, host name and clock...
    for (sb, greeting) in [(&a, "a"), (&b, "b")] {
        assert_eq!(
            sh_ok(&client, sb.id, "echo $GREETING").await.trim(),
            greeting
        );
        assert_eq!(
            sh_ok(&client, sb.id, "hostname").await.trim(),
            format!("sb-{}", sb.id.short())
        );
        assert_eq!(
            sh_ok(&client, sb.id, "cat /root/disk.txt /dev/shm/mem.txt").await,
            "on-disk\nin-memory\n"
        );
        let guest: i64 = sh_ok(&client, sb.id, "date +%s")
            .await
            .trim()
            .parse()
            .unwrap();
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (guest - host).abs() <= 5,
            "guest clock {guest} vs host {host}"
        );
    }
    // ...with its own guest token: the pool's no longer opens the guest agent.
    let url = format!("http://{}:49983", SlotAddrs::new(fp.slot).sandbox_ip);
    let old = EnvdClient::new(&url, Some(clone_token)).unwrap();
    let err = old.envs().await.unwrap_err();
    assert!(err.is_unauthenticated(), "{err}");
    let own = EnvdClient::new(&url, b.envd_access_token.clone()).unwrap();
    assert_eq!(own.envs().await.unwrap()["GREETING"], "b");

    // Independent of each other.
    sh_ok(
        &client,
        b.id,
        "echo only-b > /root/b.txt; echo only-b > /dev/shm/b.txt",
    )
    .await;
    assert_ne!(sh(&client, a.id, "cat /root/b.txt").await.exit_code, 0);
    assert_ne!(sh(&client, a.id, "cat /dev/shm/b.txt").await.exit_code, 0);

    // It pauses and resumes (held VMM), and after a restart (restored from its snapshot).
    client.pause_sandbox(b.id).await.unwrap();
    client.resume_sandbox(b.id).await.unwrap();
    assert_eq!(
        sh_ok(&client, b.id, "cat /dev/shm/b.txt").await.trim(),
        "only-b"
    );
    client.pause_sandbox(b.id).await.unwrap();
    nb.restart();
    let client = nb.client();
    client.resume_sandbox(b.id).await.unwrap();
    assert_eq!(
        sh_ok(&client, b.id, "cat /dev/shm/b.txt").await.trim(),
        "only-b"
    );
    assert_eq!(sh_ok(&client, b.id, "echo $GREETING").await.trim(), "b");

    // Deleting the template stops its pooled clones; nothing of it is left.
    let c: SandboxId = client.create_sandbox(&from_template("c")).await.unwrap().id;
    wait_for_pooled_clone(&nb, tpl.id).await;
    for id in [a.id, b.id, c] {
        client.destroy_sandbox(id).await.unwrap();
    }
    client.delete_snapshot("e2e-pool").await.unwrap();
    assert!(
        pooled_clone(&nb, tpl.id).is_none(),
        "a pooled clone outlived its template"
    );
    assert!(
        !nb.data_dir()
            .join("agent/templates")
            .join(tpl.id.to_string())
            .exists()
    );
    assert!(
        std::fs::symlink_metadata(&clone_dir).is_err(),
        "the old name went with the sandbox"
    );
}
