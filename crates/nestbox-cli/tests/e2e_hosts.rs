//! A fleet on one machine: the control plane (`nestbox server`) on PostgreSQL and several
//! host agents (`nestbox agent`), each its own process with its own data directory, in a
//! network namespace of its own with an address of its own on a bridge (a "host" per
//! namespace), with real VMs.
//!
//! - A template made on one host starts sandboxes on another (what happened shows in the
//!   Prometheus metrics of the control plane and of the hosts): the control plane copies its
//!   files there (a memory snapshot: the new sandbox carries on with the template's disk
//!   and memory), and deleting the template deletes them on every host.
//! - An agent killed with `kill -9`: its host becomes `unreachable` and its sandboxes
//!   `missing`, new sandboxes go to the other host; restarted, it takes its VMMs back and
//!   they are `running` (or `paused`) again with nothing lost.
//! - A host cut off from the control plane for longer than its pause-all threshold pauses
//!   its running sandboxes with their memory; once the network heals the control plane
//!   sees them paused, and they resume where they were.
//! - A drained host's sandboxes move to another host — a paused one as it is, a running
//!   one paused, moved and resumed — and carry on with their processes, memory and disks;
//!   an operator's move of a paused sandbox is timed.
//! - Placement with real agents: round robin alternates between the platform's hosts and
//!   least loaded fills the emptier one; a BYOC team's sandboxes run on its own host only
//!   and no other team's do; deleting that host is refused while it holds a sandbox
//!   (naming it) and, forced, destroys it and revokes the host; the team then gets
//!   `no_capacity` and no record.
//! - Host credentials: an agent killed in the middle of a rotation (the next pair issued,
//!   never stored) is not locked out when it restarts, and the refresh token it had,
//!   presented again, is refused as a replay and audited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_instance_clean, eventually, nestbox_agent_tag, sh_ok};
use nestbox_client::Client;
use nestbox_types::api::{CreateSandboxRequest, CreateSnapshotRequest, DrainMoves};
use nestbox_types::{HostId, HostStatus, TemplateKind};

/// Port every agent listens on, in its own namespace.
const AGENT_PORT: u16 = 7070;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge in the root namespace, the control plane on its address, and one namespace
/// per host plugged into it.
struct Fleet {
    dir: tempfile::TempDir,
    /// Interface and namespace names start with it.
    prefix: String,
    /// The bridge's /24, as `10.251.N`.
    net: String,
    url: String,
    server: Option<Child>,
    agents: Vec<Option<Child>>,
}

impl Fleet {
    fn new(hosts: usize) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("nbx-hosts-")
            .tempdir_in("/tmp")
            .unwrap();
        let id: u16 = rand_u16();
        let prefix = format!("nbf{:04x}", id);
        let net = format!("10.251.{}", id % 250);
        let bridge = prefix.clone();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let port = {
            let l = std::net::TcpListener::bind(format!("{net}.1:0")).unwrap();
            l.local_addr().unwrap().port()
        };
        let mut fleet = Fleet {
            url: format!("http://{net}.1:{port}"),
            dir,
            prefix,
            net,
            server: None,
            agents: Vec::new(),
        };
        for n in 0..hosts {
            let ns = fleet.netns(n);
            let outside = format!("{}v{n}", fleet.prefix);
            let inside = format!("{}p{n}", fleet.prefix);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ]);
            ip(&["link", "set", &inside, "netns", &ns]);
            ip(&["link", "set", &outside, "master", &bridge, "up"]);
            ip(&["-n", &ns, "link", "set", &inside, "name", "uplink"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", fleet.host_ip(n)),
                "dev",
                "uplink",
            ]);
            ip(&["-n", &ns, "link", "set", "uplink", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            fleet.agents.push(None);
        }
        fleet
    }

    fn netns(&self, n: usize) -> String {
        format!("{}h{n}", self.prefix)
    }

    fn host_ip(&self, n: usize) -> String {
        format!("{}.{}", self.net, 10 + n)
    }

    fn agent_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{n}"))
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the control plane on `database` (with `flags`) and returns the first admin's
    /// client.
    async fn start_server(&mut self, database: &str, flags: &[&str]) -> Client {
        let listen = self.url.trim_start_matches("http://").to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_nestbox"))
            .args(["server", "--listen", &listen, "--database-url", database])
            .args(flags)
            .arg("--secret-file")
            .arg(self.dir.path().join("secret.key"))
            .arg("--admin-env")
            .arg(self.dir.path().join("admin.env"))
            .env("NESTBOX_LOG", "info,tower_http=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("server"))
            .spawn()
            .unwrap();
        self.server = Some(child);
        let path = self.dir.path().join("admin.env");
        let env = eventually(Duration::from_secs(60), "admin.env", || async {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|t| t.contains("NESTBOX_API_KEY="))
        })
        .await;
        let get = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap()
                .to_string()
        };
        let anon = Client::new(&self.url).unwrap();
        let login = eventually(
            Duration::from_secs(60),
            "the first admin's login",
            || async {
                anon.login(&get("NESTBOX_ADMIN_EMAIL"), &get("NESTBOX_ADMIN_PASSWORD"))
                    .await
                    .ok()
            },
        )
        .await;
        anon.with_token(login.token)
    }

    /// Starts host `n`'s agent in its namespace (registering with `token` the first time),
    /// with `flags`.
    fn start_agent_with(&mut self, n: usize, token: Option<&str>, flags: &[&str]) {
        let addr = format!("{}:{AGENT_PORT}", self.host_ip(n));
        // Only the network namespace: `ip netns exec` would also remount /sys, hiding the
        // cgroup hierarchies the agent confines VMMs with.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns(n)))
            .arg(env!("CARGO_BIN_EXE_nestbox"))
            .args(["agent", "--control-plane", &self.url])
            .args(token.map(|t| ["--register-token", t]).into_iter().flatten())
            .arg("--data-dir")
            .arg(self.agent_dir(n))
            .arg("--images-dir")
            .arg(common::images_dir())
            .args(["--listen", &addr, "--advertise", &format!("http://{addr}")])
            .args(flags)
            .env("NESTBOX_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log(&format!("agent-{n}")))
            .spawn()
            .unwrap();
        self.agents[n] = Some(child);
    }

    fn stop(child: &mut Option<Child>) -> Option<std::process::ExitStatus> {
        common::terminate(child.take()?)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_tail("server"));
            for n in 0..self.agents.len() {
                eprintln!(
                    "--- agent {n} log ---\n{}",
                    self.log_tail(&format!("agent-{n}"))
                );
            }
        }
        for n in 0..self.agents.len() {
            Fleet::stop(&mut self.agents[n]);
        }
        Fleet::stop(&mut self.server);
        for n in 0..self.agents.len() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns(n)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.prefix])
            .status();
    }
}

/// Cuts host `n` off the bridge (`false`) or plugs it back (`true`).
fn plug(fleet: &Fleet, n: usize, up: bool) {
    let link = format!("{}v{n}", fleet.prefix);
    ip(&["link", "set", &link, if up { "up" } else { "down" }]);
}

/// Registers and starts `hosts` agents (with `flags`), waits until all are online and
/// the platform is ready; returns their ids in order.
async fn join(fleet: &mut Fleet, admin: &Client, hosts: usize, flags: &[&str]) -> Vec<HostId> {
    let mut ids = Vec::new();
    for n in 0..hosts {
        let created = admin.create_host(&format!("host-{n}")).await.unwrap();
        ids.push(created.host.id);
        fleet.start_agent_with(n, Some(&created.registration_token), flags);
    }
    eventually(Duration::from_secs(240), "every host online", || async {
        let list = admin.list_hosts().await.ok()?.items;
        ids.iter()
            .all(|id| {
                list.iter()
                    .any(|h| h.id == *id && h.status == HostStatus::Online)
            })
            .then_some(())
    })
    .await;
    let ready = format!("{}/health/ready", fleet.url);
    eventually(Duration::from_secs(120), "the platform ready", || async {
        reqwest::get(&ready)
            .await
            .is_ok_and(|r| r.status().is_success())
            .then_some(())
    })
    .await;
    ids
}

/// Stops every agent gracefully, then the fleet, and checks nothing of theirs is left.
fn finish(mut fleet: Fleet, hosts: usize) {
    let tags: Vec<String> = (0..hosts)
        .map(|n| nestbox_agent_tag(&fleet.agent_dir(n)))
        .collect();
    for n in 0..hosts {
        let status = Fleet::stop(&mut fleet.agents[n]);
        assert!(status.is_some_and(|s| s.success()), "agent {n}: {status:?}");
    }
    drop(fleet);
    for tag in tags {
        assert_instance_clean(&tag);
    }
}

fn rand_u16() -> u16 {
    let mut b = [0u8; 2];
    getrandom::fill(&mut b).unwrap();
    u16::from_le_bytes(b)
}

/// The scrape token of every metrics endpoint of the fleet.
const METRICS_TOKEN: &str = "fleet-metrics-token-0123456789";

/// What `{base}/metrics` answers to the scrape token.
async fn scrape(base: &str) -> String {
    let resp = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{base}");
    resp.text().await.unwrap()
}

/// The value of the sample named (with its labels) `name` in `text`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// The files of template `id` in an agent's data directory.
fn template_dir(agent_dir: &Path, id: impl std::fmt::Display) -> PathBuf {
    agent_dir.join("templates").join(id.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_made_on_one_host_starts_sandboxes_on_another() {
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(2);
    // Metrics are scraped with a token, from the control plane and from each host.
    let token_file = fleet.dir.path().join("metrics.token");
    std::fs::write(&token_file, format!("{METRICS_TOKEN}\n")).unwrap();
    let token_flag = token_file.display().to_string();
    let admin = fleet
        .start_server(&database, &["--metrics-token-file", &token_flag])
        .await;
    let hosts = join(
        &mut fleet,
        &admin,
        2,
        &[
            "--metrics-listen",
            "0.0.0.0:9100",
            "--metrics-token-file",
            &token_flag,
        ],
    )
    .await;

    // A sandbox with state on disk and in memory becomes a template on its host.
    let made = admin
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    sh_ok(
        &admin,
        made.id,
        "echo disk > /root/mark && echo memory > /dev/shm/mark && sync",
    )
    .await;
    let template = admin
        .create_snapshot(&CreateSnapshotRequest {
            sandbox_id: made.id,
            name: "carried".into(),
            kind: Some(TemplateKind::Snapshot),
            overwrite: false,
        })
        .await
        .unwrap();
    admin.destroy_sandbox(made.id).await.unwrap();
    let home = made.host_id.unwrap();
    let n_home = hosts.iter().position(|h| *h == home).unwrap();
    let n_other = 1 - n_home;
    let other = hosts[n_other];
    assert!(template_dir(&fleet.agent_dir(n_home), template.id).exists());
    assert!(!template_dir(&fleet.agent_dir(n_other), template.id).exists());

    // Its host takes no new sandboxes: one from the template starts on the other host,
    // which gets the template's files first, and carries on where the template was.
    admin
        .drain_host(home, true, DrainMoves::None)
        .await
        .unwrap();
    let started = Instant::now();
    let moved = admin
        .create_sandbox(&CreateSandboxRequest {
            template: Some("carried".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    eprintln!(
        "a sandbox from a template made on another host (copy included) started in {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(moved.host_id, Some(other));
    assert!(
        template_dir(&fleet.agent_dir(n_other), template.id)
            .join("template.json")
            .exists()
    );
    assert_eq!(
        sh_ok(&admin, moved.id, "cat /root/mark /dev/shm/mark").await,
        "disk\nmemory\n"
    );

    // The hosts' metrics and the control plane's tell what happened.
    let received = scrape(&format!("http://{}:9100", fleet.host_ip(n_other))).await;
    assert!(
        metric(&received, "nestbox_agent_template_copy_bytes_total") > 0.0,
        "{received}"
    );
    assert_eq!(
        metric(&received, "nestbox_agent_sandboxes{state=\"running\"}"),
        1.0
    );
    assert!(metric(&received, "nestbox_agent_guest_memory_mib{kind=\"total\"}") > 0.0);
    let control = scrape(&fleet.url).await;
    assert_eq!(metric(&control, "nestbox_hosts{status=\"online\"}"), 2.0);
    assert_eq!(
        metric(
            &control,
            "nestbox_sandbox_create_duration_seconds_count{outcome=\"ok\"}"
        ),
        2.0
    );

    // Both hold it now; deleting it deletes it on both.
    admin
        .drain_host(home, false, DrainMoves::None)
        .await
        .unwrap();
    admin.destroy_sandbox(moved.id).await.unwrap();
    admin.delete_snapshot("carried").await.unwrap();
    for n in 0..2 {
        assert!(
            !template_dir(&fleet.agent_dir(n), template.id).exists(),
            "host {n} keeps the files"
        );
    }

    finish(fleet, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_cut_off_pauses_its_sandboxes_and_they_resume_after() {
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(1);
    let admin = fleet.start_server(&database, &[]).await;
    join(&mut fleet, &admin, 1, &["--pause-all-after-secs", "5"]).await;
    let sb = admin
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    leave_state(&admin, sb.id).await;

    // The network between the host and the control plane breaks.
    plug(&fleet, 0, false);
    let state = fleet
        .agent_dir(0)
        .join("sandboxes")
        .join(sb.id.to_string())
        .join("state.json");
    eventually(
        Duration::from_secs(120),
        "the host pausing its sandbox on its own",
        || async {
            let st: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
            (st["phase"] == "paused").then_some(())
        },
    )
    .await;

    // It heals: the control plane sees the sandbox paused; it resumes where it was.
    plug(&fleet, 0, true);
    eventually(
        Duration::from_secs(120),
        "the control plane seeing it paused",
        || async {
            let got = admin.get_sandbox(sb.id).await.ok()?;
            (got.status == nestbox_types::SandboxStatus::Paused).then_some(())
        },
    )
    .await;
    admin.resume_sandbox(sb.id).await.unwrap();
    state_kept(&admin, sb.id).await;
    admin.destroy_sandbox(sb.id).await.unwrap();
    finish(fleet, 1);
}

/// Starts a counter in the background of sandbox `id` and marks its memory.
async fn leave_state(admin: &Client, id: nestbox_types::SandboxId) {
    sh_ok(
        admin,
        id,
        "echo kept > /dev/shm/mark; nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 1; done' >/dev/null 2>&1 &",
    )
    .await;
}

/// Checks what [`leave_state`] left: the mark, and the counter still counting.
async fn state_kept(admin: &Client, id: nestbox_types::SandboxId) {
    assert_eq!(sh_ok(admin, id, "cat /dev/shm/mark").await.trim(), "kept");
    // (The counter rewrites its file: a read may find it empty for a moment.)
    let count = || async move {
        sh_ok(admin, id, "cat /tmp/count")
            .await
            .trim()
            .parse::<u64>()
            .ok()
    };
    let before = eventually(Duration::from_secs(30), "the counter's file", count).await;
    eventually(
        Duration::from_secs(30),
        "its process counting on",
        || async { count().await.filter(|now| *now > before) },
    )
    .await;
}

/// Waits until sandbox `id` has status `want`.
async fn status_is(
    admin: &Client,
    id: nestbox_types::SandboxId,
    want: nestbox_types::SandboxStatus,
) {
    eventually(
        Duration::from_secs(120),
        &format!("{id} {want}"),
        || async {
            let got = admin.get_sandbox(id).await.ok()?;
            (got.status == want).then_some(())
        },
    )
    .await;
}

/// Two sandboxes on host 0 (host 1 cordoned meanwhile), each with state on disk, in memory
/// and in a process; the second paused. Returns (running, paused).
async fn two_on_first_host(
    admin: &Client,
    hosts: &[HostId],
) -> (nestbox_types::SandboxId, nestbox_types::SandboxId) {
    admin
        .drain_host(hosts[1], true, DrainMoves::None)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let sb = admin
            .create_sandbox(&CreateSandboxRequest::default())
            .await
            .unwrap();
        assert_eq!(sb.host_id, Some(hosts[0]));
        sh_ok(admin, sb.id, "echo disk > /root/mark && sync").await;
        leave_state(admin, sb.id).await;
        ids.push(sb.id);
    }
    admin.pause_sandbox(ids[1]).await.unwrap();
    admin
        .drain_host(hosts[1], false, DrainMoves::None)
        .await
        .unwrap();
    (ids[0], ids[1])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_comes_back_to_its_sandboxes() {
    use nestbox_types::SandboxStatus;
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(2);
    let admin = fleet.start_server(&database, &["--host-grace", "10"]).await;
    let hosts = join(&mut fleet, &admin, 2, &[]).await;
    let (running, paused) = two_on_first_host(&admin, &hosts).await;

    // kill -9: the host stops answering.
    let mut agent = fleet.agents[0].take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    eventually(Duration::from_secs(120), "host 0 unreachable", || async {
        let list = admin.list_hosts().await.ok()?.items;
        list.iter()
            .any(|h| h.id == hosts[0] && h.status == HostStatus::Unreachable)
            .then_some(())
    })
    .await;
    for id in [running, paused] {
        status_is(&admin, id, SandboxStatus::Missing).await;
    }
    // New sandboxes go to the host that answers.
    let elsewhere = admin
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    assert_eq!(elsewhere.host_id, Some(hosts[1]));

    // Restarted (with the credentials it stored), it takes its sandboxes back.
    fleet.start_agent_with(0, None, &[]);
    status_is(&admin, running, SandboxStatus::Running).await;
    status_is(&admin, paused, SandboxStatus::Paused).await;
    state_kept(&admin, running).await;
    admin.resume_sandbox(paused).await.unwrap();
    state_kept(&admin, paused).await;
    for id in [running, paused, elsewhere.id] {
        admin.destroy_sandbox(id).await.unwrap();
    }
    finish(fleet, 2);
}

/// The `sh {tag}` blocks of `docs/fleet.md`, in order.
fn guide_blocks(tag: &str) -> Vec<String> {
    let guide =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/fleet.md"))
            .unwrap();
    guide
        .split(&format!("```sh {tag}\n"))
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_string())
        .collect()
}

/// What stands in for `sudo`, `install` of the binary, and systemd: `systemctl enable --now
/// UNIT` runs the unit's `ExecStart` (with its `EnvironmentFile`, `WorkingDirectory` and
/// `StateDirectory`) in the background, in `$NETNS_EXEC`, its paths under `$ROOT`.
const GUIDE_PRELUDE: &str = r#"set -euo pipefail
sudo() { "$@"; }
install() {
  local src="${@: -2:1}" dst="${@: -1}"
  if [ "$src" = nestbox ]; then mkdir -p "$(dirname "$dst")"; ln -sf "$NESTBOX_BIN" "$dst"; else command install "$@"; fi
}
under_root() { sed -e "s#/usr/local/bin/#$ROOT/usr/local/bin/#g" -e "s#/etc/nestbox#$ROOT/etc/nestbox#g" -e "s#/var/lib/nestbox#$ROOT/var/lib/nestbox#g"; }
systemctl() {
  case "$1" in
    daemon-reload) ;;
    enable)
      local file="$ROOT/etc/systemd/system/$3.service"
      local start envfile workdir state
      start=$(sed -n 's/^ExecStart=//p' "$file" | under_root)
      envfile=$(sed -n 's/^EnvironmentFile=//p' "$file" | under_root)
      workdir=$(sed -n 's/^WorkingDirectory=//p' "$file" | under_root)
      state=$(sed -n 's/^StateDirectory=//p' "$file")
      if [ -n "$state" ]; then
        export STATE_DIRECTORY="$ROOT/var/lib/$state"; mkdir -p "$STATE_DIRECTORY"
        start="${start//\$\{STATE_DIRECTORY\}/$STATE_DIRECTORY}"
      fi
      (
        if [ -n "$envfile" ]; then set -a; . "$envfile"; set +a; fi
        cd "${workdir:-/}"
        exec $NETNS_EXEC $start
      ) >>"$LOGS/$3-${HOST_NAME:-cp}.log" 2>&1 &
      echo $! >> "$PIDS"
      ;;
    *) echo "systemctl $* is not played here" >&2; return 1 ;;
  esac
}
"#;

/// Runs `block` of the guide as `root`'s machine (in `netns`, if any) with `env`.
fn run_guide_block(
    fleet: &Fleet,
    work: &Path,
    root: &Path,
    netns: Option<String>,
    block: &str,
    env: &[(&str, String)],
    listen: &str,
) -> String {
    // What every machine has.
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    let root_s = root.display().to_string();
    let script = block
        .replace("/usr/local/bin/", &format!("{root_s}/usr/local/bin/"))
        .replace("/etc/nestbox", &format!("{root_s}/etc/nestbox"))
        .replace(
            "/etc/systemd/system",
            &format!("{root_s}/etc/systemd/system"),
        )
        .replace("/var/lib/nestbox", &format!("{root_s}/var/lib/nestbox"))
        .replace("0.0.0.0:8080", listen);
    // A block that waits for something that never comes must not hang the suite.
    let mut cmd = Command::new("timeout");
    cmd.args(["300", "bash", "-c"])
        .arg(format!("{GUIDE_PRELUDE}\n{script}"))
        .current_dir(work)
        .env("ROOT", root)
        .env("NESTBOX_BIN", env!("CARGO_BIN_EXE_nestbox"))
        .env("NESTBOX_CONFIG", work.join("cli.toml"))
        .env("LOGS", fleet.dir.path())
        .env("PIDS", fleet.dir.path().join("guide.pids"))
        .env(
            "NETNS_EXEC",
            netns
                .map(|ns| format!("nsenter --net=/run/netns/{ns}"))
                .unwrap_or_default(),
        )
        .env(
            "PATH",
            format!(
                "{root_s}/usr/local/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env_remove("NESTBOX_API_KEY")
        .env_remove("NESTBOX_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let mut logs = String::new();
        for e in std::fs::read_dir(fleet.dir.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.ends_with(".log") {
                logs += &format!(
                    "--- {name} ---\n{}\n",
                    fleet.log_tail(&name[..name.len() - 4])
                );
            }
        }
        panic!(
            "the guide's block failed ({}):\n{block}\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n{logs}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// What the guide started and where its machines' files are: stopped (as systemd would)
/// and removed when dropped, also when the test fails.
struct GuideMachines {
    pids: PathBuf,
    roots: Vec<PathBuf>,
}

impl GuideMachines {
    /// Stops what the guide started, the hosts' agents first.
    fn stop(&self) {
        let pids = std::fs::read_to_string(&self.pids).unwrap_or_default();
        let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
        for &pid in pids.iter().rev() {
            // SAFETY: kill(2) on a process this test started.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            // (Gone, or a zombie nobody has reaped yet.)
            let alive = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| !r.trim_start().starts_with('Z'))
                })
            };
            let deadline = Instant::now() + Duration::from_secs(240);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_file(&self.pids);
    }
}

impl Drop for GuideMachines {
    fn drop(&mut self) {
        self.stop();
        for root in &self.roots {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_guide_runs_as_written() {
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let fleet = Fleet::new(3);
    let work = fleet.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"),
        work.join("deploy"),
    )
    .unwrap();
    let listen = fleet.url.trim_start_matches("http://").to_string();
    let common = [
        ("DATABASE_URL", database.clone()),
        ("CONTROL_PLANE", fleet.url.clone()),
    ];
    // Each machine's files under a short root of its own (the agent's sockets live under
    // its data directory, and unix socket paths are short).
    let machine_root = |name: &str| PathBuf::from(format!("/tmp/{}{name}", fleet.prefix));
    let machines = GuideMachines {
        pids: fleet.dir.path().join("guide.pids"),
        roots: ["c", "h1", "h2", "h3"]
            .iter()
            .map(|m| machine_root(m))
            .collect(),
    };
    let cp_root = machine_root("c");
    let cp = guide_blocks("control-plane");
    let host = guide_blocks("host");
    assert_eq!(
        (cp.len(), host.len()),
        (3, 1),
        "the guide's runnable blocks"
    );
    // The control plane, then the tokens.
    for block in &cp[..2] {
        run_guide_block(&fleet, &work, &cp_root, None, block, &common, &listen);
    }
    // Three hosts, each its own machine.
    let mut tags = Vec::new();
    for n in 0..3 {
        let root = machine_root(&format!("h{}", n + 1));
        let images = root.join("var/lib/nestbox/images");
        std::fs::create_dir_all(images.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(common::images_dir(), &images).unwrap();
        let mut env = common.to_vec();
        env.push(("HOST_NAME", format!("host-{}", n + 1)));
        env.push(("HOST_ADDR", fleet.host_ip(n)));
        run_guide_block(
            &fleet,
            &work,
            &root,
            Some(fleet.netns(n)),
            &host[0],
            &env,
            &listen,
        );
        tags.push(root.join("var/lib/nestbox/agent"));
    }
    // The check: three hosts online, sandboxes on them.
    let out = run_guide_block(&fleet, &work, &cp_root, None, &cp[2], &common, &listen);
    assert_eq!(out.matches(" online ").count(), 3, "{out}");
    assert_eq!(out.matches("hello from").count(), 3, "{out}");

    // Stop what the guide started (as systemd would), then check nothing is left.
    let tags: Vec<String> = tags.iter().map(|d| nestbox_agent_tag(d)).collect();
    machines.stop();
    drop(machines);
    drop(fleet);
    for tag in tags {
        assert_instance_clean(&tag);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_moves_paused_and_running_sandboxes_with_their_state() {
    use nestbox_types::SandboxStatus;
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(2);
    let admin = fleet.start_server(&database, &[]).await;
    let hosts = join(&mut fleet, &admin, 2, &[]).await;
    let (running, paused) = two_on_first_host(&admin, &hosts).await;

    // Host 0 drains: both move to host 1, the running one paused, moved and resumed.
    let started = Instant::now();
    let drain = admin
        .drain_host(hosts[0], true, DrainMoves::All)
        .await
        .unwrap();
    assert_eq!(drain.moving, vec![running, paused]);
    for (id, want) in [
        (paused, SandboxStatus::Paused),
        (running, SandboxStatus::Running),
    ] {
        eventually(
            Duration::from_secs(300),
            &format!("{id} {want} on host 1"),
            || async {
                let got = admin.get_sandbox(id).await.ok()?;
                (got.host_id == Some(hosts[1]) && got.status == want).then_some(())
            },
        )
        .await;
    }
    eprintln!(
        "a drain moved a paused and a running sandbox in {} ms",
        started.elapsed().as_millis()
    );
    // They carry on where they were: the running one's process counts on, the paused
    // one resumes with its memory, and both keep their disks.
    state_kept(&admin, running).await;
    admin.resume_sandbox(paused).await.unwrap();
    state_kept(&admin, paused).await;
    for id in [paused, running] {
        assert_eq!(sh_ok(&admin, id, "cat /root/mark").await, "disk\n");
    }
    // Nothing of them is left on host 0 (its pool of warm clones aside): no sandbox
    // directory, and no move package on either host.
    eventually(Duration::from_secs(60), "host 0 emptied", || async {
        [paused, running]
            .iter()
            .all(|id| {
                !fleet
                    .agent_dir(0)
                    .join("sandboxes")
                    .join(id.to_string())
                    .exists()
            })
            .then_some(())
    })
    .await;
    for n in 0..2 {
        let packages: Vec<String> = std::fs::read_dir(fleet.agent_dir(n).join("templates"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(packages.is_empty(), "host {n} keeps {packages:?}");
    }

    // An operator's move back, of the paused one (512 MiB of memory): timed.
    admin
        .drain_host(hosts[0], false, DrainMoves::None)
        .await
        .unwrap();
    admin.pause_sandbox(paused).await.unwrap();
    let started = Instant::now();
    let back = admin.move_sandbox(paused, Some(hosts[0])).await.unwrap();
    eprintln!(
        "moved a paused {} MiB sandbox between two hosts in {} ms",
        back.memory_mb,
        started.elapsed().as_millis()
    );
    assert_eq!(
        (back.host_id, back.status),
        (Some(hosts[0]), SandboxStatus::Paused)
    );
    admin.resume_sandbox(paused).await.unwrap();
    state_kept(&admin, paused).await;
    for id in [paused, running] {
        admin.destroy_sandbox(id).await.unwrap();
    }
    finish(fleet, 2);
}

/// The status and error body of a failed call.
fn refused<T: std::fmt::Debug>(
    result: Result<T, nestbox_client::ClientError>,
) -> (u16, nestbox_types::ErrorBody) {
    match result {
        Err(nestbox_client::ClientError::Api { status, body }) => (status.as_u16(), body),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_byoc_and_host_deletes_with_real_agents() {
    use nestbox_types::{ErrorCode, SandboxStatus};
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(3);
    let mut admin = fleet
        .start_server(&database, &["--scheduler", "round-robin"])
        .await;
    let platform = join(&mut fleet, &admin, 2, &[]).await;
    // A team that brings its own host: host 2.
    let team = admin.create_team("own hardware").await.unwrap();
    admin.set_team_byoc(team.id, true).await.unwrap();
    let own = admin.create_byoc_host(team.id, "own-host").await.unwrap();
    fleet.start_agent_with(2, Some(&own.registration_token), &[]);
    eventually(
        Duration::from_secs(240),
        "the team's host online",
        || async {
            let list = admin.list_hosts().await.ok()?.items;
            list.iter()
                .any(|h| {
                    h.id == own.host.id
                        && h.status == HostStatus::Online
                        && h.team_id == Some(team.id)
                })
                .then_some(())
        },
    )
    .await;
    let key = admin.create_api_key(team.id, "own").await.unwrap().key;
    let theirs = Client::new(&fleet.url).unwrap().with_api_key(key);

    // Round robin: the platform's sandboxes take turns on the platform's hosts, never on
    // the team's.
    let mut placed = Vec::new();
    for _ in 0..4 {
        let sb = admin
            .create_sandbox(&CreateSandboxRequest::default())
            .await
            .unwrap();
        placed.push((sb.id, sb.host_id.unwrap()));
    }
    for pair in placed.windows(2) {
        assert_ne!(pair[0].1, pair[1].1, "round robin alternates: {placed:?}");
    }
    assert!(
        placed.iter().all(|(_, h)| platform.contains(h)),
        "{placed:?}"
    );
    for (id, _) in &placed {
        admin.destroy_sandbox(*id).await.unwrap();
    }
    // The team's sandboxes go to its own host only.
    let mine = theirs
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .unwrap();
    assert_eq!(mine.host_id, Some(own.host.id));
    assert_eq!(sh_ok(&theirs, mine.id, "echo ok").await, "ok\n");

    // Deleting the team's host (its owner) while it holds a sandbox is refused, naming
    // it; forced, it destroys the sandbox on the host first and revokes the host.
    let (status, body) = refused(admin.delete_team_host(team.id, own.host.id).await);
    assert_eq!((status, body.error.code), (409, ErrorCode::Conflict));
    assert_eq!(body.error.sandbox_ids, vec![mine.id]);
    admin
        .force_delete_team_host(team.id, own.host.id)
        .await
        .unwrap();
    assert_eq!(
        theirs.get_sandbox(mine.id).await.unwrap().status,
        SandboxStatus::Stopped
    );
    assert!(
        !fleet
            .agent_dir(2)
            .join("sandboxes")
            .join(mine.id.to_string())
            .exists(),
        "the sandbox was destroyed on its host"
    );
    assert!(
        !admin
            .list_hosts()
            .await
            .unwrap()
            .items
            .iter()
            .any(|h| h.id == own.host.id)
    );
    // The deleted host gets nothing any more: its stored access token is refused.
    let creds: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fleet.agent_dir(2).join("credentials.json")).unwrap(),
    )
    .unwrap();
    let beat = reqwest::Client::new()
        .post(format!("{}/v1/hosts/{}/heartbeat", fleet.url, own.host.id))
        .bearer_auth(creds["tokens"]["access_token"].as_str().unwrap())
        .json(&serde_json::json!({
            "sandboxes": 0, "version": "1",
            "address": format!("http://{}:{AGENT_PORT}", fleet.host_ip(2)),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status().as_u16(), 401);
    // With no host of its own online, the team's creates get no_capacity and leave no
    // record.
    let before = theirs
        .list_sandboxes(&Default::default())
        .await
        .unwrap()
        .items
        .len();
    let (status, body) = refused(
        theirs
            .create_sandbox(&CreateSandboxRequest::default())
            .await,
    );
    assert_eq!((status, body.error.code), (503, ErrorCode::NoCapacity));
    assert_eq!(
        theirs
            .list_sandboxes(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        before
    );
    Fleet::stop(&mut fleet.agents[2]);

    // Least loaded (the control plane restarted with that policy; the hosts carry on):
    // with two sandboxes on host 0, the next two go to host 1.
    Fleet::stop(&mut fleet.server);
    admin = fleet
        .start_server(&database, &["--scheduler", "least-loaded"])
        .await;
    admin
        .drain_host(platform[1], true, DrainMoves::None)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let sb = admin
            .create_sandbox(&CreateSandboxRequest::default())
            .await
            .unwrap();
        assert_eq!(sb.host_id, Some(platform[0]));
        ids.push(sb.id);
    }
    admin
        .drain_host(platform[1], false, DrainMoves::None)
        .await
        .unwrap();
    for _ in 0..2 {
        let sb = admin
            .create_sandbox(&CreateSandboxRequest::default())
            .await
            .unwrap();
        assert_eq!(sb.host_id, Some(platform[1]), "the least loaded host");
        ids.push(sb.id);
    }
    for id in ids {
        admin.destroy_sandbox(id).await.unwrap();
    }
    finish(fleet, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_credentials_survive_a_crash_mid_rotation_and_a_replay_is_refused() {
    use nestbox_types::api::AuditLogQuery;
    let pg = nestbox_testkit::PgCluster::shared().await.unwrap();
    let database = pg.fresh_database().await.unwrap();
    let mut fleet = Fleet::new(1);
    let admin = fleet.start_server(&database, &[]).await;
    let hosts = join(&mut fleet, &admin, 1, &[]).await;
    let stored = |fleet: &Fleet| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fleet.agent_dir(0).join("credentials.json")).unwrap())
            .unwrap()
    };
    let refresh_url = format!("{}/v1/hosts/refresh", fleet.url);
    let refresh = |token: String| {
        let url = refresh_url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&serde_json::json!({ "refresh_token": token }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let first = stored(&fleet)["tokens"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();

    // The agent dies in the middle of a rotation: the control plane issued the next pair
    // (and revoked this one), the agent never stored it.
    let mut agent = fleet.agents[0].take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert_eq!(
        refresh(first.clone()).await,
        200,
        "the rotation the crash cut"
    );
    let last_beat = admin.list_hosts().await.unwrap().items[0].last_heartbeat_at;

    // Restarted with the pair it stored, it is not locked out: it asks for the lost pair
    // again, gets a new one, and its heartbeats go on.
    fleet.start_agent_with(0, None, &[]);
    eventually(
        Duration::from_secs(120),
        "heartbeats with a new pair",
        || async {
            let now = stored(&fleet)["tokens"]["refresh_token"]
                .as_str()
                .map(String::from)?;
            let host = admin.list_hosts().await.ok()?.items.pop()?;
            (now != first
                && host.status == HostStatus::Online
                && host.last_heartbeat_at > last_beat)
                .then_some(())
        },
    )
    .await;

    // That refresh token, presented again, is a replay: refused, logged and audited; the
    // host keeps its current pair.
    assert_eq!(refresh(first).await, 401);
    let audited = admin
        .audit_logs_filtered(&AuditLogQuery {
            action: Some("host.refresh_reused".into()),
            scope: Some("platform".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].resource_id, Some(hosts[0].to_string()));
    let since = admin.list_hosts().await.unwrap().items[0].last_heartbeat_at;
    eventually(
        Duration::from_secs(60),
        "heartbeats after the replay",
        || async {
            let host = admin.list_hosts().await.ok()?.items.pop()?;
            (host.status == HostStatus::Online && host.last_heartbeat_at > since).then_some(())
        },
    )
    .await;
    finish(fleet, 1);
}
