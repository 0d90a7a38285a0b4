//! Snapshots that become templates, with real VMs: sandboxes started from a snapshot
//! template see its files and memory and are independent; image templates boot fresh;
//! overwrite and delete leave no files behind; platform templates are protected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Nestbox, sh, sh_ok};
use nestbox_types::api::{CreateSandboxRequest, CreateSnapshotRequest};
use nestbox_types::{ErrorCode, SandboxStatus, TemplateKind};

/// Template directories the agent holds.
fn template_dirs(nb: &Nestbox) -> Vec<String> {
    std::fs::read_dir(nb.data_dir().join("agent/templates"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn snapshot_templates_start_independent_sandboxes() {
    // Every clone here is a restore of the same state (no pooled clones, which ran a
    // process of their own first): their kernels' random generators start identical.
    let nb = Nestbox::up_env(&[("NESTBOX_CLONE_POOL", "0")]);
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    sh_ok(
        &client,
        a,
        "echo on-disk > /root/disk.txt; echo in-memory > /dev/shm/mem.txt",
    )
    .await;
    let pid = sh_ok(&client, a, "nohup sleep 100000 >/dev/null 2>&1 & echo $!")
        .await
        .trim()
        .to_string();

    let tpl = client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: a,
            name: "e2e-snap".into(),
            overwrite: false,
            kind: None,
        })
        .await
        .unwrap();
    assert_eq!(tpl.kind, TemplateKind::Snapshot);
    assert!(tpl.size_bytes > 0);
    // The source keeps running.
    assert_eq!(
        client.get_sandbox(a).await.unwrap().status,
        SandboxStatus::Running
    );
    assert_eq!(
        sh_ok(&client, a, "cat /dev/shm/mem.txt").await.trim(),
        "in-memory"
    );

    let from_template = CreateSandboxRequest {
        template: Some("e2e-snap".into()),
        ..Default::default()
    };
    let b = client.create_sandbox(&from_template).await.unwrap().id;
    let c = client.create_sandbox(&from_template).await.unwrap().id;
    for id in [b, c] {
        assert_eq!(
            sh_ok(&client, id, "cat /root/disk.txt").await.trim(),
            "on-disk"
        );
        assert_eq!(
            sh_ok(&client, id, "cat /dev/shm/mem.txt").await.trim(),
            "in-memory"
        );
        assert_eq!(
            sh_ok(&client, id, &format!("kill -0 {pid} && echo alive"))
                .await
                .trim(),
            "alive"
        );
    }
    // Each clone's kernel random generator is its own (reseeded by the host at create).
    let random = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let (rb, rc) = (
        sh_ok(&client, b, random).await,
        sh_ok(&client, c, random).await,
    );
    assert_eq!(rb.len(), 64, "{rb}");
    assert_ne!(rb, rc, "two clones drew the same random bytes");
    // A clone (its memory maps the template's privately) pauses and resumes too.
    client.pause_sandbox(c).await.unwrap();
    client.resume_sandbox(c).await.unwrap();
    assert_eq!(
        sh_ok(&client, c, "cat /dev/shm/mem.txt").await.trim(),
        "in-memory"
    );
    // Independent of each other and of the source.
    sh_ok(
        &client,
        b,
        "echo only-b > /root/b.txt; echo only-b > /dev/shm/b.txt",
    )
    .await;
    for id in [a, c] {
        assert_ne!(sh(&client, id, "cat /root/b.txt").await.exit_code, 0);
        assert_ne!(sh(&client, id, "cat /dev/shm/b.txt").await.exit_code, 0);
    }
    // A template in use cannot be deleted.
    let err = client.delete_snapshot("e2e-snap").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(409), "{err}");

    // Overwrite: same name, new contents, the old files are gone.
    let dup = client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: a,
            name: "e2e-snap".into(),
            overwrite: false,
            kind: None,
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Some(ErrorCode::AlreadyExists));
    for id in [b, c] {
        client.destroy_sandbox(id).await.unwrap();
    }
    sh_ok(&client, a, "echo second > /root/disk.txt").await;
    let second = client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: a,
            name: "e2e-snap".into(),
            overwrite: true,
            kind: None,
        })
        .await
        .unwrap();
    assert_ne!(second.id, tpl.id);
    assert_eq!(
        template_dirs(&nb),
        vec![second.id.to_string()],
        "only the new generation is kept"
    );
    let d = client.create_sandbox(&from_template).await.unwrap().id;
    assert_eq!(
        sh_ok(&client, d, "cat /root/disk.txt").await.trim(),
        "second"
    );
    client.destroy_sandbox(d).await.unwrap();

    // Delete: the record and every file go.
    client.delete_snapshot("e2e-snap").await.unwrap();
    assert!(
        template_dirs(&nb).is_empty(),
        "no template files left: {:?}",
        template_dirs(&nb)
    );
    let err = client.create_sandbox(&from_template).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TemplateNotFound));
    client.destroy_sandbox(a).await.unwrap();
}

#[tokio::test]
async fn a_paused_sandbox_becomes_a_template_and_image_templates_boot_fresh() {
    let nb = Nestbox::up();
    let client = nb.client();
    let a = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap()
        .id;
    sh_ok(
        &client,
        a,
        "mkdir -p /opt/tool && echo 'echo tool-ok' > /opt/tool/run.sh && echo mem > /dev/shm/m",
    )
    .await;
    client.pause_sandbox(a).await.unwrap();

    // From a paused sandbox: a snapshot template, and the sandbox stays paused.
    client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: a,
            name: "from-paused".into(),
            overwrite: false,
            kind: None,
        })
        .await
        .unwrap();
    assert_eq!(
        client.get_sandbox(a).await.unwrap().status,
        SandboxStatus::Paused
    );
    let b = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("from-paused".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(sh_ok(&client, b, "cat /dev/shm/m").await.trim(), "mem");

    // An image template: the disk only; sandboxes boot from it (no memory state).
    let img = client
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: a,
            name: "tooling".into(),
            overwrite: false,
            kind: Some(TemplateKind::Image),
        })
        .await
        .unwrap();
    assert_eq!(img.kind, TemplateKind::Image);
    let c = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("tooling".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    assert_eq!(
        sh_ok(&client, c, "sh /opt/tool/run.sh").await.trim(),
        "tool-ok"
    );
    assert_ne!(
        sh(&client, c, "cat /dev/shm/m").await.exit_code,
        0,
        "a fresh boot has no memory state"
    );
    // The disk size flows through: a larger disk is seen by the guest from boot.
    let d = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("tooling".into()),
            disk_size_mb: Some(6144),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(d.disk_size_mb, 6144);
    let size_mb: u64 = sh_ok(&client, d.id, "df -m / | tail -1 | awk '{print $2}'")
        .await
        .trim()
        .parse()
        .unwrap();
    assert!(
        size_mb > 5500,
        "the guest sees its 6 GiB disk: {size_mb} MiB"
    );
    let err = client
        .create_sandbox(&CreateSandboxRequest {
            template: Some("tooling".into()),
            disk_size_mb: Some(64),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400), "{err}");

    for id in [a, b, c, d.id] {
        client.destroy_sandbox(id).await.unwrap();
    }
    client.delete_snapshot("from-paused").await.unwrap();
    client.delete_snapshot("tooling").await.unwrap();
    assert!(template_dirs(&nb).is_empty());
    // A team cannot delete a platform template.
    let err = client.delete_snapshot("minimal").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}
