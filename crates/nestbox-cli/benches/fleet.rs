//! The fleet benchmark (`make bench-fleet`): one control plane (`nestbox server`, its own
//! process) on PostgreSQL with many simulated host agents (the test kit's, speaking the real
//! gRPC contract and heartbeating over HTTP like real agents), then many creates placed
//! across them. Prints, never asserts:
//!
//! - the control plane's CPU while every host heartbeats (every 15 s, as agents do), next to
//!   the same window with none (share of one core);
//! - create latency through the REST API (p50/p99) and the placement itself (reading the
//!   team's candidates and their load, then picking one: p99 from the control plane's own
//!   histogram);
//! - the host monitor's pass over the whole fleet (a second control plane on the same
//!   database, monitoring every 2 s).
//!
//! Scale: `NESTBOX_FLEET_HOSTS` (default 1000) and `NESTBOX_FLEET_CREATES` (10000).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nestbox_client::Client;
use nestbox_testkit::{PgCluster, SimAgent, SimAgentConfig};
use nestbox_types::api::CreateSandboxRequest;

const TOKEN: &str = "fleet-bench-metrics-token";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
const WINDOW: Duration = Duration::from_secs(30);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Raises this process's open-file limit to its hard limit (a thousand agents' listeners
/// and connections); children inherit it.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a control plane on `port` (every one of the run listens there: the agents know
/// one address).
async fn server(dir: &std::path::Path, database: &str, port: u16, monitor_every: u64) -> Server {
    let url = format!("http://127.0.0.1:{port}");
    std::fs::write(dir.join("metrics.token"), TOKEN).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nestbox"))
        .args(["server", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", database])
        .arg("--secret-file")
        .arg(dir.join("secret.key"))
        .arg("--admin-env")
        .arg(dir.join("admin.env"))
        .arg("--metrics-token-file")
        .arg(dir.join("metrics.token"))
        .args(["--monitor-interval", &monitor_every.to_string()])
        .args(["--host-grace", "86400"])
        .env("NESTBOX_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let anon = Client::new(&url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while anon.health().await.is_err() {
        assert!(Instant::now() < deadline, "the control plane did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Server { child, url }
}

async fn metrics(url: &str) -> String {
    reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Count and the upper bound of the bucket holding quantile `q` of histogram `name`.
fn histogram_quantile(text: &str, name: &str, q: f64) -> (u64, f64) {
    let mut buckets: Vec<(f64, u64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0, |b| b.1);
    let want = (total as f64 * q).ceil() as u64;
    let bound = buckets
        .iter()
        .find(|(_, c)| *c >= want)
        .map_or(f64::NAN, |b| b.0);
    (total, bound)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    raise_nofile();
    let hosts = env_usize("NESTBOX_FLEET_HOSTS", 1000);
    let creates = env_usize("NESTBOX_FLEET_CREATES", 10_000);
    let dir = tempfile::tempdir().unwrap();
    let pg = PgCluster::start().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    // This one records the hosts' templates (its monitor) as they join.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cp = server(dir.path(), &database, port, 2).await;
    // (Written just after the server first answers.)
    let env = loop {
        match std::fs::read_to_string(dir.path().join("admin.env")) {
            Ok(text) if text.contains("NESTBOX_API_KEY=") => break text,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let anon = Client::new(&cp.url).unwrap();
    let login = anon
        .login(&get("NESTBOX_ADMIN_EMAIL"), &get("NESTBOX_ADMIN_PASSWORD"))
        .await
        .unwrap();
    let admin = anon.clone().with_token(login.token);
    let key = Client::new(&cp.url)
        .unwrap()
        .with_api_key(get("NESTBOX_API_KEY"));

    // A thousand hosts join.
    let started = Instant::now();
    // Room to spare: concurrent placements read the load before each other land.
    let per_host = (creates / hosts.max(1) * 2 + 8) as u32;
    let agents: Vec<Arc<SimAgent>> = futures::stream::iter(0..hosts)
        .map(|n| {
            let (admin, url) = (admin.clone(), cp.url.clone());
            async move {
                let created = admin.create_host(&format!("sim-{n}")).await.unwrap();
                let agent = SimAgent::start(SimAgentConfig {
                    max_sandboxes: per_host,
                    memory_mb: 1 << 20,
                    ..SimAgentConfig::default()
                })
                .await
                .unwrap();
                agent
                    .register(&url, &created.registration_token)
                    .await
                    .unwrap();
                agent.heartbeat().await.unwrap();
                Arc::new(agent)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    println!(
        "{hosts} simulated hosts registered in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ready = format!("{}/health/ready", cp.url);
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The measured one monitors nothing in its windows (its first pass runs at start).
    drop(cp);
    let cp = server(dir.path(), &database, port, 3600).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = cp.child.id();

    // The control plane idle, then with every host heartbeating.
    let before = cpu_secs(pid);
    tokio::time::sleep(WINDOW).await;
    let idle = (cpu_secs(pid) - before) / WINDOW.as_secs_f64();
    let beating: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let agent = agent.clone();
            // Spread over the period, as independent agents are.
            let phase = HEARTBEAT_EVERY.mul_f64(i as f64 / agents.len() as f64);
            tokio::spawn(async move {
                tokio::time::sleep(phase).await;
                let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
                loop {
                    tick.tick().await;
                    let _ = agent.heartbeat().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(HEARTBEAT_EVERY).await;
    let before = cpu_secs(pid);
    tokio::time::sleep(WINDOW).await;
    let busy = (cpu_secs(pid) - before) / WINDOW.as_secs_f64();
    println!(
        "control plane CPU with {hosts} hosts heartbeating every {} s: {:.1} % of one core \
         (idle baseline in the same run: {:.1} %; target < 10 %)",
        HEARTBEAT_EVERY.as_secs(),
        busy * 100.0,
        idle * 100.0
    );

    // Ten thousand creates, placed across the fleet.
    let started = Instant::now();
    let mut latencies: Vec<Duration> = futures::stream::iter(0..creates)
        .map(|_| {
            let key = key.clone();
            async move {
                let t = Instant::now();
                key.create_sandbox(&CreateSandboxRequest::default())
                    .await
                    .unwrap();
                t.elapsed()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let took = started.elapsed();
    latencies.sort();
    let text = metrics(&cp.url).await;
    let (placed, p99) =
        histogram_quantile(&text, "nestbox_scheduler_placement_duration_seconds", 0.99);
    println!(
        "{creates} creates in {:.1} s ({:.0}/s): REST create p50 {:.1} ms, p99 {:.1} ms; \
         placement p99 ≤ {:.1} ms over {placed} decisions (target < 20 ms)",
        took.as_secs_f64(),
        creates as f64 / took.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        p99 * 1000.0
    );
    for task in &beating {
        task.abort();
    }
    drop(cp);

    // A control plane that monitors the fleet every 2 s.
    let cp = server(dir.path(), &database, port, 2).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let text = metrics(&cp.url).await;
    let (passes, p99) = histogram_quantile(&text, "nestbox_monitor_pass_duration_seconds", 0.99);
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nestbox_monitor_pass_duration_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    println!(
        "host monitor pass over {hosts} hosts: mean {:.0} ms, p99 ≤ {:.0} ms over {passes} \
         passes (target < 1 s)",
        sum / passes.max(1) as f64 * 1000.0,
        p99 * 1000.0
    );
    drop(cp);
    drop(agents);
}
