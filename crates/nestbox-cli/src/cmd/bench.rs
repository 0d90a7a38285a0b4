//! `nestbox bench`: measured figures, side by side with baselines run in the same process.
//!
//! It starts a throwaway one-box platform (control plane + host agent, temporary data
//! directory) and measures, interleaving each measurement with its baseline so machine
//! noise hits both alike:
//!
//! - bare QEMU boot of the same image to guest-agent ready vs. create through REST to
//!   exec-ready;
//! - exec of `true` through REST vs. directly against the guest agent;
//! - upload and download throughput through REST;
//! - VMM resident memory of an idle sandbox;
//! - many create/destroy cycles, then a check that nothing is left on the host;
//! - the platform's own CPU use (control plane + host agent, this process) over a window
//!   with N idle sandboxes, next to the same window with none: what the per-sandbox work
//!   that never stops (the metrics sampler, the sandbox tasks' ticks) costs;
//! - VMM confinement (jail + seccomp filter + control group) against none: boot, guest agent
//!   round trip, pause and resume (`--only-confinement`);
//! - a template build from scratch against a rebuild with its last step changed
//!   (`--only-builds`, [`super::bench_builds`]).
//!
//! Numbers are printed, never asserted: speed is measured, not tested.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use nestbox_client::Client;
use nestbox_envd::process::{ProcessConfig, StartRequest};
use nestbox_types::SandboxId;
use nestbox_types::api::{CreateSandboxRequest, ExecRequest};
use nestbox_vmm::{Disk, DiskFormat, GuestConfig, NetworkSpec, VmSpec};

use super::up::{UpArgs, launch};

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Runs per boot measurement (medians are reported).
    #[arg(long, short = 'n', default_value_t = 5)]
    pub runs: usize,
    /// Runs per exec measurement.
    #[arg(long, default_value_t = 50)]
    pub exec_runs: usize,
    /// Create/destroy cycles for the leak check.
    #[arg(long, default_value_t = 50)]
    pub cycles: usize,
    /// Size of the file transfer, MiB.
    #[arg(long, default_value_t = 64)]
    pub transfer_mb: usize,
    /// Idle sandboxes during the platform CPU measurement (0 skips it).
    #[arg(long, default_value_t = 30)]
    pub sampler_sandboxes: usize,
    /// Length of each platform CPU measurement window, seconds.
    #[arg(long, default_value_t = 20)]
    pub sampler_secs: u64,
    /// Runs only the platform CPU measurement.
    #[arg(long)]
    pub only_sampler: bool,
    /// Copies per fork in the fork measurement.
    #[arg(long, default_value_t = 10)]
    pub fork_count: u32,
    /// Runs only the fork measurement.
    #[arg(long)]
    pub only_fork: bool,
    /// Runs only the confinement measurement (VMMs with and without their seccomp filter
    /// and control group).
    #[arg(long)]
    pub only_confinement: bool,
    /// A Python with E2B's SDK (`pip install e2b`) for the SDK-vs-REST comparison;
    /// without one that comparison is skipped.
    #[arg(long, env = "NESTBOX_BENCH_PYTHON")]
    pub sdk_python: Option<PathBuf>,
    /// Only the SDK-vs-REST comparison.
    #[arg(long)]
    pub only_sdk: bool,
    /// Only the template build measurement (cold against cached).
    #[arg(long)]
    pub only_builds: bool,
    /// Built guest images.
    #[arg(
        long,
        env = "NESTBOX_IMAGES_DIR",
        default_value = "/var/lib/nestbox/images"
    )]
    pub images_dir: PathBuf,
}

/// Median, min and max of a sample.
pub(super) struct Stats {
    pub(super) median: f64,
    min: f64,
    max: f64,
    n: usize,
}

pub(super) fn stats(mut xs: Vec<f64>) -> Stats {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    };
    Stats {
        median,
        min: xs.first().copied().unwrap_or(f64::NAN),
        max: xs.last().copied().unwrap_or(f64::NAN),
        n,
    }
}

pub(super) fn row(name: &str, s: &Stats, unit: &str) {
    println!(
        "{name:<44} {:>10.1} {unit:<4} {:>9.1} {:>9.1} {:>5}",
        s.median, s.min, s.max, s.n
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The spec of a bare VM like a default sandbox's (1 vCPU, 512 MiB) on `overlay`.
fn bare_spec(
    id: String,
    kernel: &nestbox_image::KernelImage,
    overlay: PathBuf,
    network: NetworkSpec,
    run_dir: &Path,
    memory_dir: PathBuf,
) -> VmSpec {
    VmSpec {
        id,
        vcpus: 1,
        memory_mb: 512,
        kernel: kernel.kernel.clone(),
        initrd: Some(kernel.initramfs.clone()),
        cmdline_extra: Vec::new(),
        root_disk: Disk {
            // Made here a moment ago: its header is what this process wrote.
            backing: nestbox_hostsys::disk::backing_file(&overlay).ok().flatten(),
            path: overlay,
            format: DiskFormat::Qcow2,
        },
        network,
        guest: GuestConfig::default(),
        run_dir: run_dir.to_path_buf(),
        memory_dir,
        uid: None,
    }
}

/// VMM confinement (a jail of its own, QEMU's seccomp filter and a control group with the
/// sandbox's limits) against none, at the VMM, interleaved run by run: boot to a ready guest agent, the
/// guest agent's round trip, a pause (suspend into a snapshot) and a resume (restore).
async fn confinement(
    args: &BenchArgs,
    base: &Path,
    kernel: &nestbox_image::KernelImage,
    scratch: &Path,
) -> anyhow::Result<()> {
    use nestbox_vmm::Vmm as _;
    use nestbox_vmm::qemu::{Cgroups, QemuOptions, QemuVmm};
    let pid = std::process::id();
    let probe = Some(nestbox_vmm::qemu::ProbeImages {
        kernel: kernel.kernel.clone(),
        initrd: kernel.initramfs.clone(),
    });
    let hierarchy = nestbox_hostsys::cgroup::Hierarchy::detect();
    let parent = PathBuf::from(format!("nestbox-bench-{pid}"));
    let confined = QemuVmm::new(QemuOptions {
        probe: probe.clone(),
        state_dir: Some(PathBuf::from("/run/nestbox")),
        cgroups: hierarchy.clone().map(|hierarchy| Cgroups {
            hierarchy,
            parent: parent.clone(),
        }),
        seccomp: true,
        jail: true,
        ..Default::default()
    })
    .await?;
    let open = QemuVmm::new(QemuOptions {
        probe,
        state_dir: Some(PathBuf::from("/run/nestbox")),
        cgroups: None,
        seccomp: false,
        ..Default::default()
    })
    .await?;
    println!(
        "confinement: jail + seccomp filter + {} vs. none ({})",
        hierarchy.as_ref().map_or("no cgroup", |h| h.describe()),
        confined.info()
    );
    let http = reqwest::Client::new();
    // [unconfined, confined] × [boot, round trip, pause, resume]
    let mut samples: [[Vec<f64>; 4]; 2] = Default::default();
    for i in 0..args.runs {
        for (k, vmm) in [&open, &confined].into_iter().enumerate() {
            let run_dir = scratch.join(format!("conf-{k}-{i}"));
            std::fs::create_dir_all(&run_dir)?;
            let overlay = run_dir.join("root.qcow2");
            nestbox_hostsys::disk::create_overlay(base, &overlay, None).await?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut spec = bare_spec(
                format!("bench-conf-{k}-{i}"),
                kernel,
                overlay,
                NetworkSpec::User { host_port: port },
                &run_dir,
                PathBuf::from("/dev/shm").join(format!("nbx-bench-{pid}-{k}-{i}")),
            );
            // Above every network slot's user (the confined driver jails its VMMs).
            spec.uid = Some(nestbox_vmm::qemu::jail::VMM_UID_BASE + 70_000 + i as u32);
            let (mut vm, ready) =
                nestbox_vmm::boot_and_wait_ready(vmm, spec.clone(), Duration::from_secs(120))
                    .await?;
            samples[k][0].push(ms(ready.elapsed));
            let health = format!("http://127.0.0.1:{port}/health");
            let mut trips = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                let answered = http.get(&health).send().await;
                if answered.is_ok_and(|r| r.status().is_success()) {
                    trips.push(ms(t.elapsed()));
                }
            }
            samples[k][1].push(stats(trips).median);
            let snap = run_dir.join("snap");
            let t = Instant::now();
            vm.save(&snap, nestbox_vmm::SaveMode::Suspend, None).await?;
            samples[k][2].push(ms(t.elapsed()));
            drop(vm);
            let t = Instant::now();
            let restored = vmm
                .restore(spec.clone(), &snap, nestbox_vmm::RestoreMemory::Resume)
                .await?;
            samples[k][3].push(ms(t.elapsed()));
            let mut vm = restored.vm;
            vm.stop(Duration::from_secs(5)).await?;
            let _ = std::fs::remove_dir_all(&run_dir);
            let _ = std::fs::remove_dir_all(&spec.memory_dir);
        }
    }
    if let Some(h) = &hierarchy {
        let _ = h.group(&parent).remove();
    }
    println!(
        "{:<44} {:>10} {:<4} {:>9} {:>9} {:>5}",
        "measurement", "median", "", "min", "max", "runs"
    );
    let names = [
        "boot → guest agent ready",
        "guest agent round trip",
        "pause (suspend into a snapshot)",
        "resume (restore the snapshot)",
    ];
    let [open, confined] = samples;
    for ((name, o), c) in names.iter().zip(open).zip(confined) {
        let (o, c) = (stats(o), stats(c));
        row(&format!("{name}, unconfined"), &o, "ms");
        row(&format!("{name}, confined"), &c, "ms");
        println!(
            "{:<44} {:>10.3} ×    (target ≤ 1.05×)",
            "  confined / unconfined",
            c.median / o.median
        );
    }
    Ok(())
}

/// Runs the benchmarks.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.runs > 0 && args.exec_runs > 0,
        "runs must be at least 1"
    );
    let dir = tempfile::Builder::new()
        .prefix("nbx-bench-")
        .tempdir_in("/tmp")
        .context("creating a scratch directory")?;
    let up = UpArgs {
        config: None,
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".parse()?,
        database_url: None,
        images_dir: Some(args.images_dir.clone()),
        templates: vec!["minimal".into()],
        guest_bin: None,
        admin_email: "bench@nestbox.local".into(),
        proxy_domain: None,
        tls: Default::default(),
        create_timeout: 180,
        scheduler: Default::default(),
        host: super::agent::HostArgs {
            boot_timeout: 120,
            ..Default::default()
        },
    };
    eprintln!(
        "starting a throwaway installation in {}…",
        dir.path().display()
    );
    let launched = launch(&up).await?;
    // Measure on a quiet host: the agent first makes its warm snapshot (a boot).
    let waited = Instant::now();
    while !launched.agent.manager.warm_up_settled() && waited.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let result = measure(&args, &launched, dir.path()).await;
    launched.shutdown_and_destroy().await;
    result
}

async fn measure(
    args: &BenchArgs,
    launched: &super::up::Launched,
    scratch: &Path,
) -> anyhow::Result<()> {
    let key = launched
        .first_run
        .as_ref()
        .context("a fresh installation has a first run")?
        .api_key
        .clone();
    let client = Client::new(&launched.url)?.with_api_key(key.clone());
    if args.only_sampler {
        return platform_cpu(args, launched, &client).await;
    }
    if args.only_fork {
        return fork(args, &client).await;
    }
    if args.only_sdk {
        return sdk_vs_rest(args, launched, &client, &key).await;
    }
    if args.only_builds {
        return super::bench_builds::builds(&client, args.runs.min(3)).await;
    }
    let manager = &launched.agent.manager;
    let vmm_info = launched.agent.manager.vmm_info();
    println!(
        "Nestbox {} benchmark — {} — {} CPUs",
        env!("CARGO_PKG_VERSION"),
        vmm_info,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "{:<44} {:>10} {:<4} {:>9} {:>9} {:>5}",
        "measurement", "median", "", "min", "max", "runs"
    );

    // 1. Boot: bare QEMU (same image, kernel, disk size, VMM options; no network) vs. a
    // REST create that boots. A disk size other than the default makes the create boot
    // instead of restoring the warm snapshot.
    let bare_vmm = manager.vmm();
    let (template, kernel) = nestbox_image::ImageStore::new(&args.images_dir)
        .template_with_kernel("minimal")
        .context("the minimal template")?;
    let cold_disk = manager.default_disk_mb() + 1024;
    let cold = CreateSandboxRequest {
        disk_size_mb: u32::try_from(cold_disk).ok(),
        ..Default::default()
    };
    let base = manager
        .base_image("minimal", &template, cold_disk)
        .await
        .context("preparing the base image")?;
    if args.only_confinement {
        return confinement(args, &base, &kernel, scratch).await;
    }
    // Untimed: the first create of a new size prepares its base image.
    let first = client.create_sandbox(&cold).await?;
    client.destroy_sandbox(first.id).await?;
    let mut bare = Vec::new();
    let mut create = Vec::new();
    for i in 0..args.runs {
        let run_dir = scratch.join(format!("bare-{i}"));
        std::fs::create_dir_all(&run_dir)?;
        let overlay = run_dir.join("root.qcow2");
        nestbox_hostsys::disk::create_overlay(&base, &overlay, None).await?;
        let spec = bare_spec(
            format!("bench-bare-{i}"),
            &kernel,
            overlay,
            NetworkSpec::None,
            &run_dir,
            PathBuf::from("/dev/shm").join(format!("nbx-bench-{}", std::process::id())),
        );
        let (mut vm, ready) =
            nestbox_vmm::boot_and_wait_ready(bare_vmm.as_ref(), spec, Duration::from_secs(120))
                .await?;
        bare.push(ms(ready.elapsed));
        vm.stop(Duration::from_secs(5)).await?;
        let _ = std::fs::remove_dir_all(&run_dir);

        let t = Instant::now();
        let sb = client.create_sandbox(&cold).await?;
        create.push(ms(t.elapsed()));
        client.destroy_sandbox(sb.id).await?;
    }
    let _ = std::fs::remove_dir_all(
        PathBuf::from("/dev/shm").join(format!("nbx-bench-{}", std::process::id())),
    );
    let bare = stats(bare);
    let create = stats(create);
    row("bare QEMU boot → guest agent ready", &bare, "ms");
    row("create through REST (boot) → exec-ready", &create, "ms");
    println!(
        "{:<44} {:>10.2} ×    (target ≤ 1.2×)",
        "  create / bare boot",
        create.median / bare.median
    );

    // 2. Exec of `true`: REST vs. the guest agent directly.
    let sb = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let guest = manager.get(sb.id)?.guest()?;
    let rest_req = ExecRequest {
        argv: Some(vec!["true".into()]),
        ..Default::default()
    };
    let direct_req = StartRequest {
        process: Some(ProcessConfig {
            cmd: "true".into(),
            args: vec![],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    };
    // Warm both paths (connections, page cache) before measuring.
    client.exec(sb.id, &rest_req).await?;
    run_direct(&guest, direct_req.clone()).await?;
    let mut rest = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..args.exec_runs {
        let t = Instant::now();
        let r = client.exec(sb.id, &rest_req).await?;
        anyhow::ensure!(r.exit_code == 0, "`true` failed through REST");
        rest.push(ms(t.elapsed()));
        let t = Instant::now();
        run_direct(&guest, direct_req.clone()).await?;
        direct.push(ms(t.elapsed()));
    }
    let rest = stats(rest);
    let direct = stats(direct);
    row("exec `true` through REST", &rest, "ms");
    row(
        "exec `true` directly against the guest agent",
        &direct,
        "ms",
    );
    println!(
        "{:<44} {:>10.1} ms   (target ≤ 1.5 × direct + 5 ms = {:.1} ms)",
        "  REST overhead",
        rest.median - direct.median,
        direct.median * 1.5 + 5.0
    );

    // 2b. An HTTP request to a port in the sandbox: through the proxy vs. direct.
    proxy_latency(args, &client, &launched.url, &key, manager, sb.id).await?;
    // 2c. A keystroke's echo through a terminal attached over a WebSocket.
    pty_echo(args, &client, sb.id).await?;

    // 3. File transfer through REST.
    let size = args.transfer_mb << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    let mut up_rates = Vec::new();
    let mut down_rates = Vec::new();
    for _ in 0..args.runs.min(3) {
        let t = Instant::now();
        client
            .upload(
                sb.id,
                "/tmp/bench.bin",
                reqwest::Body::from(data.clone()),
                Some(size as u64),
            )
            .await?;
        up_rates.push(size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let (_, mut stream) = client.download(sb.id, "/tmp/bench.bin").await?;
        let mut got = 0usize;
        while let Some(chunk) = stream.next().await {
            got += chunk?.len();
        }
        anyhow::ensure!(got == size, "downloaded {got} of {size} bytes");
        down_rates.push(size as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
    }
    row(
        &format!("upload {} MiB through REST", args.transfer_mb),
        &stats(up_rates),
        "MB/s",
    );
    row(
        &format!("download {} MiB through REST", args.transfer_mb),
        &stats(down_rates),
        "MB/s",
    );
    client.destroy_sandbox(sb.id).await?;

    // 4. Resident memory of an idle sandbox's VMM.
    let idle = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = vmm_pid(&launched.data_dir, idle.id)?;
    let rss_kb = proc_status_kb(pid, "VmRSS:")?;
    println!(
        "{:<44} {:>10.1} MiB  (512 MiB guest, restored from the warm snapshot)",
        "idle sandbox: VMM resident memory",
        rss_kb as f64 / 1024.0
    );
    client.destroy_sandbox(idle.id).await?;

    // 5. Snapshots: pause, resume, create from a snapshot template, sizes, idle clones.
    snapshots(args, launched, scratch, &client, &kernel, &base).await?;

    // 6. The platform's CPU with idle sandboxes (the metrics sampler among it).
    platform_cpu(args, launched, &client).await?;

    // 7. Fork of a running sandbox into N copies vs. N plain creates.
    fork(args, &client).await?;

    // 8. Create → first command through E2B's Python SDK vs. our REST API.
    sdk_vs_rest(args, launched, &client, &key).await?;

    // 8b. VMM confinement (seccomp filter + control group) vs. none.
    confinement(args, &base, &kernel, scratch).await?;

    // 9. Create/destroy cycles leave nothing behind (the pooled clones are stopped
    // before the check, as at shutdown).
    let t = Instant::now();
    for _ in 0..args.cycles {
        let sb = client
            .create_sandbox(&CreateSandboxRequest::default())
            .await?;
        client.destroy_sandbox(sb.id).await?;
    }
    launched.agent.manager.drain_pools().await;
    let leftovers = leftovers(
        &launched.data_dir,
        &nestbox_agent::instance_tag(&launched.data_dir.join("agent")),
    );
    println!(
        "{:<44} {:>10} in {:.0} s: {}",
        format!("{} create/destroy cycles", args.cycles),
        "",
        t.elapsed().as_secs_f64(),
        if leftovers.is_empty() {
            "nothing left behind".to_string()
        } else {
            format!("LEFT: {}", leftovers.join(", "))
        }
    );
    Ok(())
}

/// `GET /health` of the guest agent (port 49983): through the control plane's proxy and
/// the host agent, vs. straight from this host to the guest.
async fn proxy_latency(
    args: &BenchArgs,
    client: &Client,
    url: &str,
    key: &str,
    manager: &nestbox_agent::sandbox::Manager,
    id: SandboxId,
) -> anyhow::Result<()> {
    let token = client
        .get_sandbox(id)
        .await?
        .envd_access_token
        .context("the sandbox's guest token")?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let direct_url = format!("{}/health", manager.get(id)?.guest()?.base_url());
    let proxied_url = format!("{url}/v1/sandboxes/{id}/ports/49983/health");
    let get = |u: &str| {
        http.get(u)
            .header("x-api-key", key)
            .header("x-access-token", &token)
    };
    // Warm both paths (connections, the guest's code) first.
    for _ in 0..3 {
        get(&proxied_url).send().await?.error_for_status()?;
        get(&direct_url).send().await?.error_for_status()?;
    }
    let mut proxied = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..args.exec_runs {
        let t = Instant::now();
        get(&proxied_url).send().await?.error_for_status()?;
        proxied.push(ms(t.elapsed()));
        let t = Instant::now();
        get(&direct_url).send().await?.error_for_status()?;
        direct.push(ms(t.elapsed()));
    }
    let proxied = stats(proxied);
    let direct = stats(direct);
    row(
        "HTTP GET to a sandbox port through the proxy",
        &proxied,
        "ms",
    );
    row("HTTP GET to the same port, direct", &direct, "ms");
    println!(
        "{:<44} {:>10.2} ms   (target ≤ 2 ms)",
        "  proxy overhead",
        proxied.median - direct.median
    );
    Ok(())
}

/// One keystroke → its echo, through a terminal attached over a WebSocket (control plane,
/// host agent, guest agent, the guest's tty). `cat` on the terminal: the echo is the tty's.
async fn pty_echo(args: &BenchArgs, client: &Client, id: SandboxId) -> anyhow::Result<()> {
    use nestbox_client::TerminalFrame;
    let info = client
        .start_terminal(
            id,
            &nestbox_types::api::StartTerminalRequest {
                argv: Some(vec!["/bin/cat".into()]),
                ..Default::default()
            },
        )
        .await?;
    let mut term = client.attach_terminal(id, &info.pid.to_string()).await?;
    let mut samples = Vec::new();
    // The first keystrokes warm the path; they are not counted.
    for i in 0..args.exec_runs + 3 {
        let key = b'a' + (i % 26) as u8;
        let t = Instant::now();
        term.writer.input(&[key]).await?;
        loop {
            match term.reader.next().await {
                Some(Ok(TerminalFrame::Output(bytes))) if bytes.contains(&key) => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the terminal closed"),
            }
        }
        if i >= 3 {
            samples.push(ms(t.elapsed()));
        }
    }
    term.writer.kill().await?;
    row("PTY keystroke → echo over WebSocket", &stats(samples), "ms");
    Ok(())
}

/// User + system CPU time of this process (control plane and host agent), seconds.
fn own_cpu_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let ticks = nestbox_agent::metrics::procfs::parse_stat_ticks(&stat)
        .context("parsing /proc/self/stat")?;
    Ok(ticks as f64 / nestbox_agent::metrics::procfs::clock_ticks() as f64)
}

/// This process's CPU use over `window`, in percent of one host CPU.
async fn cpu_over(window: Duration) -> anyhow::Result<f64> {
    let (cpu0, t0) = (own_cpu_secs()?, Instant::now());
    tokio::time::sleep(window).await;
    let (cpu1, elapsed) = (own_cpu_secs()?, t0.elapsed());
    Ok((cpu1 - cpu0) / elapsed.as_secs_f64() * 100.0)
}

/// The platform's CPU with no sandbox, then with `sampler_sandboxes` idle ones (clones of
/// the warm snapshot), each over `sampler_secs`, and the metrics sampler's own share. The
/// VMs' own CPU is not counted: they are other processes.
async fn platform_cpu(
    args: &BenchArgs,
    launched: &super::up::Launched,
    client: &Client,
) -> anyhow::Result<()> {
    let n = args.sampler_sandboxes;
    if n == 0 {
        return Ok(());
    }
    let sampler = launched.agent.manager.metrics();
    let window = Duration::from_secs(args.sampler_secs.max(1));
    let empty = cpu_over(window).await?;
    let mut ids = Vec::with_capacity(n);
    let result = async {
        for _ in 0..n {
            ids.push(
                client
                    .create_sandbox(&CreateSandboxRequest::default())
                    .await?
                    .id,
            );
        }
        // Let the creates' own work settle before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = sampler.stats();
        let busy = cpu_over(window).await?;
        let after = sampler.stats();
        anyhow::Ok((busy, before, after))
    }
    .await;
    for id in ids.drain(..) {
        if let Err(e) = client.destroy_sandbox(id).await {
            eprintln!("destroying {id}: {e}");
        }
    }
    let (busy, before, after) = result?;
    println!(
        "{:<44} {:>10.2} %    vs {:.2} % with none ({} s windows; % of one CPU)",
        format!("platform CPU, {n} idle sandboxes"),
        busy,
        empty,
        window.as_secs()
    );
    let sampling = after.busy.saturating_sub(before.busy);
    let samples = after.samples.saturating_sub(before.samples).max(1);
    // Wall time, not CPU time: on a busy host the sampler's thread also waits for a core,
    // so this is an upper bound of its cost, and can exceed the process's CPU share.
    println!(
        "{:<44} {:>10.3} %    ({:.1} µs per sandbox sample, {} samples; wall time, an upper bound)",
        "  metrics sampler, time in sampling passes",
        sampling.as_secs_f64() / window.as_secs_f64() * 100.0,
        sampling.as_secs_f64() * 1e6 / samples as f64,
        samples
    );
    Ok(())
}

/// Pause, resume and clones through REST, side by side with the bare VMM doing the same.
async fn snapshots(
    args: &BenchArgs,
    launched: &super::up::Launched,
    scratch: &Path,
    client: &Client,
    kernel: &nestbox_image::KernelImage,
    base: &Path,
) -> anyhow::Result<()> {
    use nestbox_vmm::snapshot::{RestoreMemory, SaveMode};
    let manager = &launched.agent.manager;
    let vmm = manager.vmm();
    let mem_dir = PathBuf::from("/dev/shm").join(format!("nbx-bench-snap-{}", std::process::id()));
    let spec_for = |dir: &Path, i: usize| {
        bare_spec(
            format!("bench-snap-{i}"),
            kernel,
            dir.join("root.qcow2"),
            NetworkSpec::None,
            dir,
            mem_dir.clone(),
        )
    };
    // Bare VMM: suspend a booted VM, restore it (resume), checkpoint it and restore a clone.
    let (mut bare_pause, mut bare_resume, mut bare_clone) = (Vec::new(), Vec::new(), Vec::new());
    let runs = args.runs.min(5);
    for i in 0..runs {
        let dir = scratch.join(format!("snap-{i}"));
        std::fs::create_dir_all(&dir)?;
        nestbox_hostsys::disk::create_overlay(base, &dir.join("root.qcow2"), None).await?;
        let (mut vm, _) = nestbox_vmm::boot_and_wait_ready(
            vmm.as_ref(),
            spec_for(&dir, i),
            Duration::from_secs(120),
        )
        .await?;
        let t = Instant::now();
        vm.save(&mem_dir.join(format!("s{i}")), SaveMode::Suspend, None)
            .await?;
        bare_pause.push(ms(t.elapsed()));
        let t = Instant::now();
        let mut restored = vmm
            .restore(
                spec_for(&dir, i),
                &mem_dir.join(format!("s{i}")),
                RestoreMemory::Resume,
            )
            .await?;
        bare_resume.push(ms(t.elapsed()));
        let tpl = dir.join("tpl");
        restored.vm.save(&tpl, SaveMode::Checkpoint, None).await?;
        restored.vm.stop(Duration::from_secs(5)).await?;
        let clone_dir = dir.join("clone");
        std::fs::create_dir_all(&clone_dir)?;
        nestbox_hostsys::disk::create_overlay(base, &clone_dir.join("root.qcow2"), None).await?;
        let t = Instant::now();
        let mut clone = vmm
            .restore(spec_for(&clone_dir, i + 100), &tpl, RestoreMemory::Clone)
            .await?;
        bare_clone.push(ms(t.elapsed()));
        clone.vm.stop(Duration::from_secs(5)).await?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&mem_dir);

    // Through REST: a booted 512 MiB sandbox, and a clone of the warm snapshot. Resume is
    // measured both ways: with the VMM held (a `cont`), and restored from the snapshot
    // (the VMM let go first, as after the hold time or a restart). Each is followed by
    // the first exec, which under TCG pays for what a restore left cold.
    let cold = CreateSandboxRequest {
        disk_size_mb: u32::try_from(manager.default_disk_mb() + 1024).ok(),
        ..Default::default()
    };
    let mut m = SnapshotFigures::default();
    for _ in 0..runs {
        for (req, clone) in [(&cold, false), (&CreateSandboxRequest::default(), true)] {
            let sb = client.create_sandbox(req).await?;
            let t = Instant::now();
            client.pause_sandbox(sb.id).await?;
            m.pause[usize::from(clone)].push(ms(t.elapsed()));
            let t = Instant::now();
            client.resume_sandbox(sb.id).await?;
            m.held[usize::from(clone)].push(ms(t.elapsed()));
            let t = Instant::now();
            run_true(client, sb.id).await?;
            m.held_exec.push(ms(t.elapsed()));
            client.pause_sandbox(sb.id).await?;
            manager.release_held(sb.id).await?;
            let t = Instant::now();
            client.resume_sandbox(sb.id).await?;
            m.restored[usize::from(clone)].push(ms(t.elapsed()));
            let t = Instant::now();
            run_true(client, sb.id).await?;
            m.restored_exec.push(ms(t.elapsed()));
            client.destroy_sandbox(sb.id).await?;
        }
    }
    row(
        "bare VMM suspend (512 MiB, booted)",
        &stats(bare_pause),
        "ms",
    );
    row(
        "pause through REST (512 MiB, booted)",
        &stats(m.pause[0].clone()),
        "ms",
    );
    row(
        "pause through REST (clone of a snapshot)",
        &stats(m.pause[1].clone()),
        "ms",
    );
    row(
        "resume → exec-ready, VMM held (booted)",
        &stats(m.held[0].clone()),
        "ms",
    );
    row(
        "resume → exec-ready, VMM held (clone)",
        &stats(m.held[1].clone()),
        "ms",
    );
    row("  then the first exec `true`", &stats(m.held_exec), "ms");
    row(
        "bare VMM restore of a suspended VM",
        &stats(bare_resume),
        "ms",
    );
    row(
        "resume → exec-ready, restored (booted)",
        &stats(m.restored[0].clone()),
        "ms",
    );
    row(
        "resume → exec-ready, restored (clone)",
        &stats(m.restored[1].clone()),
        "ms",
    );
    row(
        "  then the first exec `true`",
        &stats(m.restored_exec),
        "ms",
    );

    // Create from a snapshot template (a team's): taking over a pooled clone, and
    // restoring one (the pools drained first), each followed by the first exec.
    let src = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    let tpl = client
        .create_snapshot(&nestbox_types::api::CreateSnapshotRequest {
            sandbox_id: src.id,
            name: "bench-snapshot".into(),
            overwrite: true,
            kind: None,
        })
        .await?;
    client.destroy_sandbox(src.id).await?;
    let from_tpl = CreateSandboxRequest {
        template: Some("bench-snapshot".into()),
        ..Default::default()
    };
    let (mut pooled, mut pooled_exec, mut restored, mut restored_exec) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let settle_pools = || async {
        let waited = Instant::now();
        while manager.pool_filling() && waited.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for _ in 0..runs {
        // Restored: no pooled clone (fills in flight discard theirs after a drain).
        manager.drain_pools().await;
        settle_pools().await;
        // Pooled: the restored create started filling the pool; wait until it is full.
        for (times, execs) in [
            (&mut restored, &mut restored_exec),
            (&mut pooled, &mut pooled_exec),
        ] {
            let t = Instant::now();
            let sb = client.create_sandbox(&from_tpl).await?;
            times.push(ms(t.elapsed()));
            let t = Instant::now();
            run_true(client, sb.id).await?;
            execs.push(ms(t.elapsed()));
            client.destroy_sandbox(sb.id).await?;
            settle_pools().await;
        }
    }
    row("bare VMM restore of a clone", &stats(bare_clone), "ms");
    row(
        "create from a snapshot template, pooled clone",
        &stats(pooled),
        "ms",
    );
    row("  then the first exec `true`", &stats(pooled_exec), "ms");
    row(
        "create from a snapshot template, restored",
        &stats(restored),
        "ms",
    );
    row("  then the first exec `true`", &stats(restored_exec), "ms");
    println!(
        "{:<44} {:>10.1} MiB  (512 MiB guest, 5 GiB disk; allocated)",
        "snapshot template size on disk",
        tpl.size_bytes as f64 / (1 << 20) as f64
    );

    // Host memory of idle clones: resident set shared with the template's pages. Restored
    // ones (no pool), then what one pooled clone costs (its warm-up ran a process, and
    // QEMU keeps the code it translated for that).
    let n = 8;
    manager.drain_pools().await;
    let before = meminfo_kb("MemAvailable:")?;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(client.create_sandbox(&from_tpl).await?.id);
        manager.drain_pools().await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = meminfo_kb("MemAvailable:")?;
    let mut pss = Vec::new();
    let mut private = Vec::new();
    for id in &ids {
        let pid = vmm_pid(&launched.data_dir, *id)?;
        pss.push(smaps_kb(pid, "Pss:")? as f64 / 1024.0);
        private.push(private_mib(pid)?);
    }
    row(
        &format!("idle restored clone: VMM proportional memory ({n} clones)"),
        &stats(pss),
        "MiB",
    );
    row(
        "idle restored clone: VMM private memory",
        &stats(private),
        "MiB",
    );
    println!(
        "{:<44} {:>10.1} MiB",
        format!("host memory taken per idle restored clone ({n})"),
        before.saturating_sub(after) as f64 / 1024.0 / n as f64
    );
    for id in ids {
        client.destroy_sandbox(id).await?;
    }
    // A pooled clone, taken over (its warm-up ran a process; QEMU keeps what it
    // translated for that): what it adds beyond the template's shared pages.
    // (A create starts filling the pool again after the drains above.)
    let sb = client.create_sandbox(&from_tpl).await?;
    client.destroy_sandbox(sb.id).await?;
    let mut private = Vec::new();
    for _ in 0..3 {
        settle_pools().await;
        let sb = client.create_sandbox(&from_tpl).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        private.push(private_mib(vmm_pid(&launched.data_dir, sb.id)?)?);
        client.destroy_sandbox(sb.id).await?;
    }
    row(
        "pooled clone taken over: VMM private memory",
        &stats(private),
        "MiB",
    );
    client.delete_snapshot("bench-snapshot").await?;
    Ok(())
}

/// What [`snapshots`] measures through REST, per run (`[booted, clone]` pairs).
#[derive(Default)]
struct SnapshotFigures {
    pause: [Vec<f64>; 2],
    held: [Vec<f64>; 2],
    restored: [Vec<f64>; 2],
    held_exec: Vec<f64>,
    restored_exec: Vec<f64>,
}

/// Fork of a running default sandbox (512 MiB) into `fork_count` copies, from the request
/// until every copy ran a command, next to as many plain creates (each then running a
/// command), in the same run. Each measurement destroys what it made.
async fn fork(args: &BenchArgs, client: &Client) -> anyhow::Result<()> {
    let n = args.fork_count.max(1);
    let source = client
        .create_sandbox(&CreateSandboxRequest::default())
        .await?;
    run_true(client, source.id).await?;
    let mut forked = Vec::new();
    let mut created = Vec::new();
    for _ in 0..args.runs.min(3) {
        let t = Instant::now();
        let result = client.fork_sandbox(source.id, n).await?;
        let copies: Vec<SandboxId> = result
            .items
            .iter()
            .filter_map(|i| i.sandbox.as_ref().map(|s| s.id))
            .collect();
        anyhow::ensure!(
            copies.len() == n as usize,
            "{} of {n} copies started",
            copies.len()
        );
        futures::future::try_join_all(copies.iter().map(|id| run_true(client, *id))).await?;
        forked.push(ms(t.elapsed()));
        for id in copies {
            client.destroy_sandbox(id).await?;
        }

        let t = Instant::now();
        let plain = CreateSandboxRequest::default();
        let made =
            futures::future::try_join_all((0..n).map(|_| client.create_sandbox(&plain))).await?;
        futures::future::try_join_all(made.iter().map(|s| run_true(client, s.id))).await?;
        created.push(ms(t.elapsed()));
        for s in made {
            client.destroy_sandbox(s.id).await?;
        }
    }
    client.destroy_sandbox(source.id).await?;
    row(
        &format!("fork 1 → {n}, all exec-ready"),
        &stats(forked),
        "ms",
    );
    row(
        &format!("baseline: {n} creates, all exec-ready"),
        &stats(created),
        "ms",
    );
    Ok(())
}

/// What the Python side of [`sdk_vs_rest`] runs: one create → first command per line read
/// on stdin, printing its milliseconds (timed inside Python, the import and the process
/// start excluded), the sandbox killed untimed.
const SDK_ROUND: &str = r#"
import sys, time
from e2b import Sandbox
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter()
    s = Sandbox.create()
    s.commands.run("true")
    ms = (time.perf_counter() - t) * 1000
    s.kill()
    print(ms, flush=True)
"#;

/// Create → first command through E2B's Python SDK (E2B's REST API and the guest agent's
/// protocol through the proxy) against the same through our REST API with the Rust
/// client, interleaved round by round, each round starting with the clone pool full. Both
/// run the process the SDK runs for a command: `/bin/bash -l -c true`.
async fn sdk_vs_rest(
    args: &BenchArgs,
    launched: &super::up::Launched,
    client: &Client,
    key: &str,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let Some(python) = &args.sdk_python else {
        println!("(SDK vs REST skipped: no --sdk-python with E2B's SDK)");
        return Ok(());
    };
    let mut child = tokio::process::Command::new(python)
        .args(["-c", SDK_ROUND])
        .env("E2B_API_URL", &launched.url)
        .env("E2B_SANDBOX_URL", &launched.url)
        .env("E2B_API_KEY", key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", python.display()))?;
    let mut stdin = child.stdin.take().context("the SDK process's stdin")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("its stdout")?).lines();
    anyhow::ensure!(
        lines.next_line().await?.as_deref() == Some("ready"),
        "E2B's SDK did not load in {}",
        python.display()
    );
    let manager = &launched.agent.manager;
    let pool_full = || async {
        let waited = Instant::now();
        while (manager.pool_filling() || manager.pooled() == 0)
            && waited.elapsed() < Duration::from_secs(60)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (mut rest, mut sdk) = (Vec::new(), Vec::new());
    for _ in 0..args.runs.max(3) {
        pool_full().await;
        let t = Instant::now();
        let sb = client
            .create_sandbox(&CreateSandboxRequest::default())
            .await?;
        // The process E2B's SDK starts for `commands.run("true")`: a login shell.
        let r = client
            .exec(
                sb.id,
                &ExecRequest {
                    argv: Some(vec![
                        "/bin/bash".into(),
                        "-l".into(),
                        "-c".into(),
                        "true".into(),
                    ]),
                    ..Default::default()
                },
            )
            .await?;
        anyhow::ensure!(
            r.exit_code == 0,
            "`bash -l -c true` exited with {}",
            r.exit_code
        );
        rest.push(ms(t.elapsed()));
        client.destroy_sandbox(sb.id).await?;

        pool_full().await;
        stdin.write_all(b"go\n").await?;
        let line = lines
            .next_line()
            .await?
            .context("the SDK process ended early")?;
        sdk.push(line.trim().parse::<f64>().context("an SDK round's time")?);
    }
    drop(stdin);
    let _ = child.wait().await;
    let (rest, sdk) = (stats(rest), stats(sdk));
    row("create → first command, REST (Rust client)", &rest, "ms");
    row("create → first command, E2B Python SDK", &sdk, "ms");
    println!(
        "{:<44} {:>10.1} ms (target ≤ 10)",
        "  SDK path adds (median − median)",
        sdk.median - rest.median
    );
    Ok(())
}

/// Runs `true` in a sandbox through REST.
async fn run_true(client: &Client, id: SandboxId) -> anyhow::Result<()> {
    let r = client
        .exec(
            id,
            &ExecRequest {
                command: Some("true".into()),
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(r.exit_code == 0, "`true` exited with {}", r.exit_code);
    Ok(())
}

fn meminfo_kb(key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/meminfo"))
}

/// Memory of a process that no other process shares (clean and dirty), MiB.
fn private_mib(pid: u32) -> anyhow::Result<f64> {
    Ok((smaps_kb(pid, "Private_Clean:")? + smaps_kb(pid, "Private_Dirty:")?) as f64 / 1024.0)
}

fn smaps_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} for pid {pid}"))
}

async fn run_direct(
    guest: &nestbox_envd::client::EnvdClient,
    req: StartRequest,
) -> anyhow::Result<()> {
    use nestbox_envd::process::process_event::Event;
    let mut events = guest.start(req).await?;
    while let Some(ev) = events.next().await {
        if let Some(Event::End(end)) = ev?.event {
            anyhow::ensure!(end.exit_code == 0, "`true` failed against the guest agent");
            return Ok(());
        }
    }
    anyhow::bail!("the guest agent ended the stream without an end event")
}

fn vmm_pid(data_dir: &Path, id: SandboxId) -> anyhow::Result<u32> {
    let state = data_dir
        .join("agent/sandboxes")
        .join(id.to_string())
        .join("state.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state)?)?;
    v["vmm_pid"]
        .as_u64()
        .map(|p| p as u32)
        .context("no VMM pid recorded")
}

fn proc_status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} for pid {pid}"))
}

/// What an instance still holds on the host: slots, sandbox directories, guest memory.
fn leftovers(data_dir: &Path, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/nestbox/slots") {
        for e in rd.flatten() {
            if std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .starts_with(tag)
            {
                out.push(format!("slot {}", e.file_name().to_string_lossy()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(data_dir.join("agent/sandboxes")) {
        out.extend(
            rd.flatten()
                .map(|e| format!("directory {}", e.file_name().to_string_lossy())),
        );
    }
    if let Ok(rd) = std::fs::read_dir(format!("/dev/shm/nestbox-{tag}")) {
        out.extend(
            rd.flatten()
                .map(|e| format!("memory {}", e.file_name().to_string_lossy())),
        );
    }
    out
}
