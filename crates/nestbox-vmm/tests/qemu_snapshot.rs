//! Snapshots of real VMs under QEMU TCG: suspend and resume (twice), checkpoint and
//! clones, a clone's own suspend, restore onto another TAP namespace, and the refusals
//! (damaged, incompatible or unloadable snapshots leave no QEMU behind).
//!
//! Guests run the `minimal` template from `$NESTBOX_TEST_IMAGES` (default
//! `<workspace>/target/nestbox-images`) and are driven through their guest agent (envd
//! protocol) over slirp port forwards. Guest RAM and snapshots live on /dev/shm, as in
//! production.

// Test helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nestbox_envd::client::EnvdClient;
use nestbox_envd::process::{ProcessConfig, StartRequest, process_event};
use nestbox_envd::types::InitRequest;
use nestbox_hostsys::process::Cmd;
use nestbox_image::{ImageStore, KernelImage, TemplateImage};
use nestbox_vmm::qemu::{QemuOptions, QemuVmm};
use nestbox_vmm::snapshot::{MANIFEST_FILE, MEMORY_FILE, Placement, STATE_FILE};
use nestbox_vmm::{
    AccelChoice, BoxError, BoxFuture, Disk, DiskFormat, GuestConfig, NetworkSpec, RestoreMemory,
    SaveMode, SavedMemory, Vm, VmSpec, Vmm, VmmError,
};

const READY_WITHIN: Duration = Duration::from_secs(180);
const GUEST_WITHIN: Duration = Duration::from_secs(60);
const MEMORY_MB: u32 = 256;
/// The guest agent's access token (its SHA-256 goes on the kernel command line).
const TOKEN: &str = "nbx-snapshot-test-token";

fn token_sha256() -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
}

fn images() -> (TemplateImage, KernelImage) {
    let dir = match std::env::var_os("NESTBOX_TEST_IMAGES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nestbox-images"),
    };
    ImageStore::new(&dir)
        .template_with_kernel("minimal")
        .unwrap_or_else(|e| {
            panic!(
                "no test images in {} ({e}); build them with `make test-images`",
                dir.display()
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The driver as a host agent runs it: every VMM jailed.
async fn tcg() -> QemuVmm {
    QemuVmm::new(QemuOptions {
        accel: AccelChoice::Tcg,
        jail: true,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A VMM user for VM `id` of this test process: above every network slot's, and
/// (practically) unique among concurrent tests.
fn test_uid(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (id, std::process::id()).hash(&mut h);
    nestbox_vmm::qemu::jail::VMM_UID_BASE + 100_000 + (h.finish() % 1_000_000) as u32
}

/// Disk scratch space and a tmpfs directory for RAM and snapshots.
struct Scratch {
    disk: tempfile::TempDir,
    shm: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            disk: tempfile::tempdir().unwrap(),
            shm: tempfile::Builder::new()
                .prefix("nbx-snaptest-")
                .tempdir_in("/dev/shm")
                .unwrap(),
        }
    }

    fn memory_dir(&self) -> PathBuf {
        self.shm.path().join("mem")
    }

    fn snapshot(&self, name: &str) -> PathBuf {
        self.shm.path().join(name)
    }

    /// A qcow2 overlay over the template, so tests never write to it.
    async fn overlay(&self, base: &Path, name: &str) -> PathBuf {
        let disk = self.disk.path().join(format!("{name}.qcow2"));
        Cmd::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(&disk)
            .arg("1G")
            .run()
            .await
            .unwrap();
        disk
    }

    fn spec(&self, id: &str, kernel: &KernelImage, disk: &Path, network: NetworkSpec) -> VmSpec {
        VmSpec {
            id: id.into(),
            vcpus: 1,
            memory_mb: MEMORY_MB,
            kernel: kernel.kernel.clone(),
            initrd: Some(kernel.initramfs.clone()),
            cmdline_extra: vec![],
            root_disk: Disk {
                path: disk.to_path_buf(),
                format: DiskFormat::Qcow2,
                // Made by this test: its header is what the test wrote.
                backing: nestbox_hostsys::disk::backing_file(disk).ok().flatten(),
            },
            network,
            guest: GuestConfig {
                hostname: Some(id.into()),
                access_token_sha256: Some(token_sha256()),
                ..Default::default()
            },
            run_dir: self.disk.path().join(format!("run-{id}")),
            memory_dir: self.memory_dir(),
            uid: Some(test_uid(id)),
        }
    }
}

/// A client of the guest agent behind `port`. No deadline: a deadline on `start` would
/// also bound the process's life (the guest kills it when the deadline passes).
fn guest(port: u16) -> EnvdClient {
    EnvdClient::new(format!("http://127.0.0.1:{port}"), Some(TOKEN.into())).unwrap()
}

/// Polls the guest agent until it answers; returns how long that took.
async fn wait_agent(client: &EnvdClient) -> Duration {
    let started = Instant::now();
    loop {
        if client
            .with_timeout(Duration::from_secs(5))
            .health()
            .await
            .is_ok()
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < GUEST_WITHIN,
            "the guest agent at {} never answered",
            client.base_url()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The first `/init` after boot: the guest expects the token whose hash it booted with.
/// Restored guests keep it (it is in their memory).
async fn init(client: &EnvdClient) {
    wait_agent(client).await;
    client
        .with_timeout(GUEST_WITHIN)
        .init(&InitRequest {
            access_token: Some(TOKEN.into()),
            timestamp: Some(chrono::Utc::now()),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn sh_request(script: &str) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..ProcessConfig::default()
        }),
        stdin: Some(false),
        ..StartRequest::default()
    }
}

/// Runs `sh -c script` in the guest; returns stdout (asserting exit 0).
async fn sh(client: &EnvdClient, script: &str) -> String {
    let mut events = client
        .with_timeout(GUEST_WITHIN)
        .start(sh_request(script))
        .await
        .unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let deadline = tokio::time::Instant::now() + GUEST_WITHIN;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("`{script}` did not finish"));
        let Some(event) = event else {
            panic!("`{script}`: the stream ended without an end event")
        };
        use process_event::data_event::Output;
        match event.unwrap().event {
            Some(process_event::Event::Data(d)) => match d.output {
                Some(Output::Stdout(b)) => stdout.extend_from_slice(&b),
                Some(Output::Stderr(b)) => stderr.extend_from_slice(&b),
                _ => {}
            },
            Some(process_event::Event::End(end)) => {
                assert!(
                    end.exited && end.exit_code == 0,
                    "`{script}` failed: {end:?}: {}",
                    String::from_utf8_lossy(&stderr)
                );
                return String::from_utf8_lossy(&stdout).trim().to_string();
            }
            _ => {}
        }
    }
}

/// Starts a loop that writes an increasing counter to `/dev/shm/counter` (guest tmpfs)
/// every 50 ms; returns its pid. The process outlives the request.
async fn start_counter(client: &EnvdClient) -> u32 {
    let script = "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/counter.tmp; \
                  mv /dev/shm/counter.tmp /dev/shm/counter; sleep 0.05; done";
    let mut events = client.start(sh_request(script)).await.unwrap();
    loop {
        match events.next().await {
            Some(Ok(e)) => {
                if let Some(process_event::Event::Start(s)) = e.event {
                    return s.pid;
                }
            }
            other => panic!("no start event: {other:?}"),
        }
    }
}

async fn counter(client: &EnvdClient) -> u64 {
    // 0 until the loop's first write.
    sh(client, "cat /dev/shm/counter 2>/dev/null || echo 0")
        .await
        .parse()
        .unwrap()
}

/// Waits until the guest's counter passes `than`: the loop is alive.
async fn counter_passes(client: &EnvdClient, than: u64) -> u64 {
    let deadline = Instant::now() + GUEST_WITHIN;
    loop {
        let now = counter(client).await;
        if now > than {
            return now;
        }
        assert!(Instant::now() < deadline, "counter stuck at {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn boot(vmm: &QemuVmm, spec: VmSpec) -> Box<dyn Vm> {
    nestbox_vmm::boot_and_wait_ready(vmm, spec, READY_WITHIN)
        .await
        .unwrap()
        .0
}

/// SHA-256 of a file by coreutils (fast even in debug builds, where ours is not).
fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// QEMU processes whose command line mentions `needle`.
fn qemus_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
            !zombie && cmd.contains("qemu-system") && cmd.contains(&*needle)
        })
        .collect()
}

/// A freeze hook that copies the disk image while the guest is stopped.
fn copy_disk(
    from: PathBuf,
    to: PathBuf,
) -> impl FnMut() -> BoxFuture<'static, Result<(), BoxError>> {
    move || {
        let (from, to) = (from.clone(), to.clone());
        Box::pin(async move {
            tokio::fs::copy(&from, &to).await?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn suspend_and_resume_twice_keeps_processes_and_tmpfs() {
    let (template, kernel) = images();
    let s = Scratch::new();
    let disk = s.overlay(&template.rootfs, "root").await;
    let vmm = tcg().await;
    let id = "susp";
    let first_port = free_port();
    let mut vm = boot(
        &vmm,
        s.spec(
            id,
            &kernel,
            &disk,
            NetworkSpec::User {
                host_port: first_port,
            },
        ),
    )
    .await;
    let ram = s.memory_dir().join(format!("{id}.ram"));
    let mut client = guest(first_port);
    init(&client).await;
    let pid = start_counter(&client).await;
    sh(&client, "echo kept > /dev/shm/note").await;
    counter_passes(&client, 2).await;

    for round in 0..2 {
        let dir = s.snapshot(&format!("pause{round}"));
        // The loop runs until the guest stops: the counter is at least this at suspend.
        let before = counter(&client).await;
        let qemu_pid = vm.pid();
        let saved = vm.save(&dir, SaveMode::Suspend, None).await.unwrap();
        eprintln!("round {round}: suspend {:?}", saved.timings);
        assert_eq!(
            saved.memory,
            SavedMemory::File {
                path: dir.join(MEMORY_FILE),
                placement: Placement::Moved
            },
            "same tmpfs: the RAM file is renamed, not copied"
        );
        assert!(
            saved.manifest.state.size < 1 << 20,
            "{:?}",
            saved.manifest.state
        );
        assert!(vm.exited().is_some(), "the vmm quits after a suspend");
        assert!(
            qemus_mentioning(vm.run_dir()).is_empty(),
            "qemu {qemu_pid} survived"
        );
        assert!(!ram.exists() && dir.join(MEMORY_FILE).exists());
        // A suspended VM cannot be saved again.
        assert!(
            vm.save(&s.snapshot("never"), SaveMode::Checkpoint, None)
                .await
                .is_err()
        );

        let new_port = free_port();
        let spec = s.spec(
            id,
            &kernel,
            &disk,
            NetworkSpec::User {
                host_port: new_port,
            },
        );
        let restored = vmm
            .restore(spec, &dir, RestoreMemory::Resume)
            .await
            .unwrap();
        eprintln!("round {round}: resume {:?}", restored.timings);
        // The old handle is finished: dropping it must not touch the new VM's files.
        drop(vm);
        vm = restored.vm;
        assert!(ram.exists(), "the resumed VM owns the RAM file");
        for f in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
            assert!(!dir.join(f).exists(), "{f} of a resumed snapshot is left");
        }
        client = guest(new_port);
        let answered = wait_agent(&client).await;
        eprintln!("round {round}: agent answered {answered:?} after restore returned");
        // Same process, same tmpfs, still counting.
        counter_passes(&client, before).await;
        assert_eq!(sh(&client, "cat /dev/shm/note").await, "kept");
        let running: Vec<u32> = client.list().await.unwrap().iter().map(|p| p.pid).collect();
        assert!(running.contains(&pid), "counter {pid} not in {running:?}");
        assert_eq!(vm.run_state().await.unwrap(), "running");
    }

    // The clock: restore leaves it alone; the host agent's /init sets it.
    let ahead = chrono::Utc::now() + chrono::Duration::hours(1);
    client
        .init(&InitRequest {
            timestamp: Some(ahead),
            ..Default::default()
        })
        .await
        .unwrap();
    let guest_now: i64 = sh(&client, "date +%s").await.parse().unwrap();
    assert!(
        (guest_now - ahead.timestamp()).abs() < 60,
        "guest clock {guest_now}, set to {}",
        ahead.timestamp()
    );

    vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(!ram.exists());
}

#[tokio::test]
async fn a_held_vm_resumes_in_place_or_leaves_a_whole_snapshot() {
    let (template, kernel) = images();
    let s = Scratch::new();
    let disk = s.overlay(&template.rootfs, "root").await;
    let vmm = tcg().await;
    let id = "held";
    let port = free_port();
    let user = NetworkSpec::User { host_port: port };
    let mut vm = boot(&vmm, s.spec(id, &kernel, &disk, user.clone())).await;
    let ram = s.memory_dir().join(format!("{id}.ram"));
    let client = guest(port);
    init(&client).await;
    let pid = start_counter(&client).await;
    sh(&client, "echo kept > /dev/shm/note").await;
    counter_passes(&client, 2).await;

    // Held: a whole snapshot, and the VMM still there, stopped.
    let dir = s.snapshot("held0");
    let before = counter(&client).await;
    let qemu_pid = vm.pid();
    let saved = vm.suspend_held(&dir).await.unwrap();
    assert_eq!(
        saved.memory,
        SavedMemory::File {
            path: dir.join(MEMORY_FILE),
            placement: Placement::Moved
        }
    );
    assert!(vm.exited().is_none(), "a held VMM stays");
    assert_ne!(vm.run_state().await.unwrap(), "running");
    assert!(dir.join(MANIFEST_FILE).exists() && !ram.exists());
    assert!(matches!(
        vm.suspend_held(&s.snapshot("again")).await,
        Err(VmmError::Held { .. })
    ));
    // A resume that fails before the guest runs (here: the RAM file cannot go back)
    // leaves the snapshot whole and the VM held.
    std::fs::create_dir(&ram).unwrap();
    assert!(matches!(vm.resume_held().await, Err(VmmError::Io { .. })));
    for f in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
        assert!(dir.join(f).exists(), "{f} of a held snapshot is gone");
    }
    std::fs::remove_dir(&ram).unwrap();
    // Resumed in place: the same process, the snapshot consumed, the RAM file back.
    vm.resume_held().await.unwrap();
    assert_eq!(vm.pid(), qemu_pid);
    assert_eq!(vm.run_state().await.unwrap(), "running");
    for f in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
        assert!(!dir.join(f).exists(), "{f} of a resumed snapshot is left");
    }
    assert!(ram.exists());
    counter_passes(&client, before).await;
    assert_eq!(sh(&client, "cat /dev/shm/note").await, "kept");
    assert!(matches!(vm.resume_held().await, Err(VmmError::Held { .. })));

    // Its directories renamed under it: it saves to, and stops from, the new paths.
    let run2 = s.disk.path().join("run-held-moved");
    let mem2 = s.shm.path().join("mem-moved");
    std::fs::rename(vm.run_dir(), &run2).unwrap();
    std::fs::rename(s.memory_dir(), &mem2).unwrap();
    vm.relocate(&run2, &mem2);
    assert_eq!(vm.run_dir(), run2.as_path());
    let dir = mem2.join("held1");
    let before = counter(&client).await;
    vm.suspend_held(&dir).await.unwrap();
    // Stopped instead of resumed: the snapshot stays whole and restores elsewhere.
    vm.stop(Duration::from_secs(10)).await.unwrap();
    assert!(
        qemus_mentioning(&run2).is_empty(),
        "qemu {qemu_pid} survived"
    );
    for f in [MANIFEST_FILE, STATE_FILE, MEMORY_FILE] {
        assert!(
            dir.join(f).exists(),
            "{f} of a held snapshot went with its VMM"
        );
    }
    let port = free_port();
    let mut spec = s.spec(id, &kernel, &disk, NetworkSpec::User { host_port: port });
    spec.memory_dir = mem2.clone();
    let mut vm = vmm
        .restore(spec, &dir, RestoreMemory::Resume)
        .await
        .unwrap()
        .vm;
    let client = guest(port);
    wait_agent(&client).await;
    counter_passes(&client, before).await;
    let running: Vec<u32> = client.list().await.unwrap().iter().map(|p| p.pid).collect();
    assert!(running.contains(&pid), "counter {pid} not in {running:?}");
    vm.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test]
async fn checkpoint_keeps_the_original_running_and_clones_are_independent() {
    let (template, kernel) = images();
    let s = Scratch::new();
    let disk = s.overlay(&template.rootfs, "origin").await;
    let vmm = tcg().await;
    let port_a = free_port();
    let mut a = boot(
        &vmm,
        s.spec(
            "origin",
            &kernel,
            &disk,
            NetworkSpec::User { host_port: port_a },
        ),
    )
    .await;
    let ga = guest(port_a);
    init(&ga).await;
    sh(
        &ga,
        "echo origin > /dev/shm/who; echo on-disk > /root/marker; sync",
    )
    .await;
    start_counter(&ga).await;
    counter_passes(&ga, 2).await;

    let tmpl = s.snapshot("template");
    let frozen = s.disk.path().join("frozen.qcow2");
    let mut hook = copy_disk(disk.clone(), frozen.clone());
    let saved = a
        .save(&tmpl, SaveMode::Checkpoint, Some(&mut hook))
        .await
        .unwrap();
    eprintln!("checkpoint {:?}", saved.timings);
    assert!(saved.timings.freeze.is_some());
    assert!(matches!(
        saved.memory,
        SavedMemory::File {
            placement: Placement::Copied | Placement::Reflinked,
            ..
        }
    ));
    let m = &saved.manifest;
    assert_eq!(m.kind, SaveMode::Checkpoint);
    assert_eq!((m.machine.memory_mb, m.machine.vcpus), (MEMORY_MB, 1));
    assert!(m.machine.has_nic());
    eprintln!(
        "{}",
        std::fs::read_to_string(tmpl.join(MANIFEST_FILE)).unwrap()
    );
    let ram_sha = sha256(&tmpl.join(MEMORY_FILE));

    // The original keeps running, and its disk is writable again (QEMU released the
    // image for the migration and takes it back on `cont`).
    let at_checkpoint = counter(&ga).await;
    counter_passes(&ga, at_checkpoint).await;
    sh(&ga, "echo after > /root/after; sync; cat /root/after").await;
    assert_eq!(a.run_state().await.unwrap(), "running");

    // Two clones, each on its own copy of the frozen disk.
    let mut clones = Vec::new();
    for name in ["clone-b", "clone-c"] {
        let cdisk = s.disk.path().join(format!("{name}.qcow2"));
        std::fs::copy(&frozen, &cdisk).unwrap();
        let port = free_port();
        let spec = s.spec(name, &kernel, &cdisk, NetworkSpec::User { host_port: port });
        let restored = vmm
            .restore(spec, &tmpl, RestoreMemory::Clone)
            .await
            .unwrap();
        eprintln!("{name}: restore {:?}", restored.timings);
        let client = guest(port);
        let answered = wait_agent(&client).await;
        eprintln!("{name}: agent answered {answered:?} after restore returned");
        clones.push((name, restored.vm, client));
    }
    for (name, _, client) in &clones {
        // Memory and disk as at the checkpoint, and the loop carried over.
        assert_eq!(sh(client, "cat /dev/shm/who").await, "origin");
        assert_eq!(sh(client, "cat /root/marker").await, "on-disk");
        counter_passes(client, 0).await;
        sh(
            client,
            &format!("echo {name} > /dev/shm/who; touch /dev/shm/only-{name}"),
        )
        .await;
    }
    for (name, _, client) in &clones {
        assert_eq!(sh(client, "cat /dev/shm/who").await, *name);
        let other = if *name == "clone-b" {
            "clone-c"
        } else {
            "clone-b"
        };
        assert_eq!(
            sh(
                client,
                &format!("test -e /dev/shm/only-{other} && echo seen || echo unseen")
            )
            .await,
            "unseen"
        );
    }
    assert_eq!(sh(&ga, "cat /dev/shm/who").await, "origin");
    assert!(
        !s.memory_dir().join("clone-b.ram").exists(),
        "a clone has no RAM file of its own"
    );

    // A copy-clone owns a RAM file: its suspend is the fast path again.
    let ddisk = s.disk.path().join("clone-d.qcow2");
    std::fs::copy(&frozen, &ddisk).unwrap();
    let port = free_port();
    let spec = s.spec(
        "clone-d",
        &kernel,
        &ddisk,
        NetworkSpec::User { host_port: port },
    );
    let restored = vmm.restore(spec, &tmpl, RestoreMemory::Copy).await.unwrap();
    eprintln!("clone-d (copy): restore {:?}", restored.timings);
    let mut d = restored.vm;
    let gd = guest(port);
    wait_agent(&gd).await;
    assert_eq!(sh(&gd, "cat /dev/shm/who").await, "origin");
    assert!(s.memory_dir().join("clone-d.ram").exists());
    let ddir = s.snapshot("clone-d-paused");
    let saved = d.save(&ddir, SaveMode::Suspend, None).await.unwrap();
    assert!(matches!(
        saved.memory,
        SavedMemory::File {
            placement: Placement::Moved,
            ..
        }
    ));
    assert!(saved.manifest.state.size < 1 << 20);
    drop(d);

    // A clone's RAM is private: its suspend carries the RAM in the state file, and its
    // resume loads it back.
    let (_, mut b, _) = clones.remove(0);
    let bdir = s.snapshot("clone-b-paused");
    let saved = b.save(&bdir, SaveMode::Suspend, None).await.unwrap();
    eprintln!("clone suspend {:?}", saved.timings);
    assert_eq!(saved.memory, SavedMemory::InState);
    assert!(saved.manifest.memory.is_none() && saved.manifest.state.size > 1 << 20);
    let port = free_port();
    let bdisk = s.disk.path().join("clone-b.qcow2");
    let spec = s.spec(
        "clone-b",
        &kernel,
        &bdisk,
        NetworkSpec::User { host_port: port },
    );
    let restored = vmm
        .restore(spec, &bdir, RestoreMemory::Resume)
        .await
        .unwrap();
    eprintln!("clone resume {:?}", restored.timings);
    let mut b = restored.vm;
    let gb = guest(port);
    wait_agent(&gb).await;
    assert_eq!(sh(&gb, "cat /dev/shm/who").await, "clone-b");
    counter_passes(&gb, 0).await;

    b.stop(Duration::from_secs(10)).await.unwrap();
    for (_, mut vm, _) in clones {
        vm.stop(Duration::from_secs(10)).await.unwrap();
    }
    a.stop(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        sha256(&tmpl.join(MEMORY_FILE)),
        ram_sha,
        "clones must never write the template's RAM file"
    );
    assert!(
        tmpl.join(MANIFEST_FILE).exists(),
        "clones do not consume a snapshot"
    );
}

/// Copies a snapshot directory; the RAM file is hard-linked (cheap) unless `ram_copy`
/// (a case that damages it must not damage the original).
fn copy_snapshot(from: &Path, to: &Path, ram_copy: bool) {
    std::fs::create_dir_all(to).unwrap();
    for f in [MANIFEST_FILE, STATE_FILE] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let (src, dst) = (from.join(MEMORY_FILE), to.join(MEMORY_FILE));
    if ram_copy {
        nestbox_vmm::snapshot::files::copy_sparse(&src, &dst).unwrap();
    } else {
        std::fs::hard_link(&src, &dst).unwrap();
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[tokio::test]
async fn damaged_or_incompatible_snapshots_are_refused_and_leave_no_qemu() {
    let (template, kernel) = images();
    let s = Scratch::new();
    let disk = s.overlay(&template.rootfs, "src").await;
    let vmm = tcg().await;
    let started = Instant::now();
    let mut a = boot(&vmm, s.spec("src", &kernel, &disk, NetworkSpec::None)).await;
    eprintln!("booted after {:?}", started.elapsed());
    let tmpl = s.snapshot("good");
    a.save(&tmpl, SaveMode::Checkpoint, None).await.unwrap();
    eprintln!("checkpoint after {:?}", started.elapsed());
    a.stop(Duration::from_secs(10)).await.unwrap();
    let good_sha = sha256(&tmpl.join(MEMORY_FILE));
    let spec = |id: &str| s.spec(id, &kernel, &disk, NetworkSpec::None);
    // The untouched snapshot passes the checks.
    vmm.check_snapshot(&spec("check"), &tmpl).await.unwrap();

    let other_kernel = s.disk.path().join("vmlinux-other");
    let mut bytes = std::fs::read(&kernel.kernel).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&other_kernel, bytes).unwrap();

    type Damage<'a> = Box<dyn FnOnce(&Path, &mut VmSpec) + 'a>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "corrupt-state",
            Box::new(|d: &Path, _: &mut VmSpec| {
                let p = d.join(STATE_FILE);
                let mut b = std::fs::read(&p).unwrap();
                b[100] ^= 0x55;
                std::fs::write(&p, b).unwrap();
            }),
            "corrupt:state.bin",
        ),
        (
            "truncated-ram",
            Box::new(|d: &Path, _: &mut VmSpec| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join(MEMORY_FILE))
                    .unwrap();
                f.set_len(u64::from(MEMORY_MB) << 19).unwrap();
            }),
            "corrupt:memory.ram",
        ),
        (
            "future-format",
            Box::new(|d: &Path, _: &mut VmSpec| {
                edit_manifest(d, |v| v["format_version"] = 2.into())
            }),
            "incompatible:format version 2",
        ),
        (
            "bigger-guest",
            Box::new(|_: &Path, spec: &mut VmSpec| spec.memory_mb = MEMORY_MB * 2),
            "incompatible:memory_mb",
        ),
        (
            "other-kernel",
            Box::new(|_: &Path, spec: &mut VmSpec| spec.kernel = other_kernel.clone()),
            "incompatible:another kernel",
        ),
        (
            "other-vmm",
            Box::new(|d: &Path, _: &mut VmSpec| {
                edit_manifest(d, |v| v["vmm"]["version"] = "9.9.9".into())
            }),
            "incompatible:qemu 9.9.9",
        ),
    ];
    for (name, damage, want) in cases {
        let dir = s.snapshot(name);
        copy_snapshot(&tmpl, &dir, name == "truncated-ram");
        let mut spec = spec(name);
        damage(&dir, &mut spec);
        let run_dir = spec.run_dir.clone();
        let err = vmm
            .restore(spec, &dir, RestoreMemory::Resume)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: restored"));
        let (kind, what) = want.split_once(':').unwrap();
        match (&err, kind) {
            (VmmError::CorruptSnapshot { path, .. }, "corrupt") => {
                assert!(path.ends_with(what), "{name}: {err}")
            }
            (VmmError::IncompatibleSnapshot { reason, .. }, "incompatible") => {
                assert!(reason.contains(what), "{name}: {err}")
            }
            _ => panic!("{name}: unexpected error {err:?}"),
        }
        eprintln!("{name} ({:?}): {err}", started.elapsed());
        assert!(
            qemus_mentioning(&run_dir).is_empty(),
            "{name}: a qemu was started"
        );
        assert!(
            !run_dir.join("qemu.pid").exists(),
            "{name}: a qemu was started"
        );
        assert!(
            dir.join(MEMORY_FILE).exists(),
            "{name}: the snapshot lost its RAM"
        );
        assert!(!s.memory_dir().join(format!("{name}.ram")).exists());
    }

    // Passes every check but cannot be loaded: QEMU starts, fails, is killed; the RAM
    // file is back in the snapshot.
    let dir = s.snapshot("garbage-state");
    copy_snapshot(&tmpl, &dir, false);
    let garbage = vec![0x5au8; 4096];
    std::fs::write(dir.join(STATE_FILE), &garbage).unwrap();
    edit_manifest(&dir, |v| {
        v["state"]["size"] = garbage.len().into();
        v["state"]["sha256"] = sha256(&dir.join(STATE_FILE)).into();
    });
    let spec = spec("garbage");
    let run_dir = spec.run_dir.clone();
    let err = vmm
        .restore(spec, &dir, RestoreMemory::Resume)
        .await
        .err()
        .unwrap();
    eprintln!("garbage-state: {err}");
    assert!(
        matches!(err, VmmError::Migration { phase: "load", .. }),
        "{err:?}"
    );
    assert!(
        qemus_mentioning(&run_dir).is_empty(),
        "a failed restore left its qemu"
    );
    assert!(dir.join(MEMORY_FILE).exists() && dir.join(MANIFEST_FILE).exists());
    assert!(!s.memory_dir().join("garbage.ram").exists());
    assert_eq!(sha256(&tmpl.join(MEMORY_FILE)), good_sha);
}

/// A network namespace with a TAP device; deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    async fn create(name: &str) -> Self {
        let ns = Self { name: name.into() };
        let _ = Cmd::new("ip").args(["netns", "del", name]).run().await;
        Cmd::new("ip")
            .args(["netns", "add", name])
            .run()
            .await
            .unwrap();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "dev", "tap0", "mode", "tap"],
            vec!["addr", "add", "172.16.0.1/30", "dev", "tap0"],
            vec!["link", "set", "tap0", "up"],
        ] {
            Cmd::new("ip")
                .args(["-n", name])
                .args(args)
                .run()
                .await
                .unwrap();
        }
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// GET /health on the guest's static address from inside the namespace.
    async fn health(&self) -> String {
        let deadline = Instant::now() + GUEST_WITHIN;
        loop {
            let out = Cmd::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                ])
                .arg("http://172.16.0.2:49983/health")
                .netns(self.path())
                .output()
                .await
                .unwrap();
            let code = out.stdout_text();
            if code == "204" || Instant::now() >= deadline {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn a_tap_vm_restores_into_another_namespace() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let (template, kernel) = images();
    let s = Scratch::new();
    let disk = s.overlay(&template.rootfs, "tap-a").await;
    let pid = std::process::id();
    let ns_a = TestNetns::create(&format!("nbx-snap-a-{pid}")).await;
    let ns_b = TestNetns::create(&format!("nbx-snap-b-{pid}")).await;
    let vmm = tcg().await;
    let tap = |ns: &TestNetns, mac: &str| NetworkSpec::Tap {
        netns: ns.path(),
        ifname: "tap0".into(),
        mac: mac.into(),
    };
    let with_ip = |mut spec: VmSpec| {
        spec.guest.ip = Some("172.16.0.2/30".into());
        spec.guest.gateway = Some("172.16.0.1".parse().unwrap());
        spec
    };
    let mut a = boot(
        &vmm,
        with_ip(s.spec("tap-a", &kernel, &disk, tap(&ns_a, "02:00:00:00:00:0a"))),
    )
    .await;
    assert_eq!(ns_a.health().await, "204");
    let tmpl = s.snapshot("tap-template");
    let frozen = s.disk.path().join("tap-frozen.qcow2");
    let mut hook = copy_disk(disk.clone(), frozen.clone());
    a.save(&tmpl, SaveMode::Checkpoint, Some(&mut hook))
        .await
        .unwrap();

    // The clone gets another namespace (same guest address: clone-friendly) and MAC.
    let spec = with_ip(s.spec("tap-b", &kernel, &frozen, tap(&ns_b, "02:00:00:00:00:0b")));
    let restored = vmm
        .restore(spec, &tmpl, RestoreMemory::Clone)
        .await
        .unwrap();
    let mut b = restored.vm;
    assert_eq!(ns_b.health().await, "204");
    assert_eq!(ns_a.health().await, "204");

    // A TAP snapshot cannot go onto slirp (offloads the guest negotiated).
    let spec = s.spec(
        "tap-c",
        &kernel,
        &frozen,
        NetworkSpec::User {
            host_port: free_port(),
        },
    );
    let err = vmm.check_snapshot(&spec, &tmpl).await.unwrap_err();
    assert!(
        matches!(&err, VmmError::IncompatibleSnapshot { reason, .. } if reason.contains("slirp")),
        "{err}"
    );
    b.stop(Duration::from_secs(10)).await.unwrap();
    a.stop(Duration::from_secs(10)).await.unwrap();
}
