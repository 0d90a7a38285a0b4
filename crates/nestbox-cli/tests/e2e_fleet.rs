//! The control plane and a host agent as separate processes (`nestbox server`, `nestbox
//! agent`), as a fleet runs them, with real VMs: a new database gets its first platform
//! admin, a host registers with a one-time token, and the control plane crashes, is
//! upgraded to a new binary and is restarted while the agent runs a sandbox and holds a
//! paused one. Every sandbox carries on: the running one in the same VMM with its memory,
//! the paused one resumes, creates work again. The admin adds the host with the CLI
//! (`nestbox login`, `nestbox host token`, `host list`); the agent runs from a config file
//! and a `.env` file. Host access tokens live 12 s here, so the
//! agent trades its token pair for the next one again and again meanwhile, and comes back
//! with the stored pair after a kill -9. The agent on its own is also stopped for an
//! upgrade (SIGUSR2) under a running sandbox, and with SIGTERM at random moments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{assert_instance_clean, eventually, new_sandbox, sh_ok};
use nestbox_client::Client;
use nestbox_types::{SandboxId, SandboxStatus};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `nestbox server` and one `nestbox agent`, in a directory of their own.
struct Split {
    dir: tempfile::TempDir,
    url: String,
    listen: String,
    server: Option<Child>,
    agent: Option<Child>,
}

impl Split {
    fn new() -> Split {
        let dir = tempfile::Builder::new()
            .prefix("nbx-fleet-")
            .tempdir_in("/tmp")
            .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        Split {
            url: format!("http://{listen}"),
            listen,
            dir,
            server: None,
            agent: None,
        }
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
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Starts the control plane from `binary` and waits until it answers.
    async fn start_server(&mut self, binary: &Path) {
        let child = Command::new(binary)
            .args(["server", "--listen", &self.listen, "--database-url"])
            .arg(format!(
                "sqlite://{}",
                self.dir.path().join("nestbox.db").display()
            ))
            .arg("--secret-file")
            .arg(self.dir.path().join("secret.key"))
            .arg("--admin-env")
            .arg(self.dir.path().join("admin.env"))
            .env("NESTBOX_LOG", "info,tower_http=warn")
            .env("NESTBOX_HOST_ACCESS_TTL_SECS", "12")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("server"))
            .spawn()
            .unwrap();
        self.server = Some(child);
        let anon = Client::new(&self.url).unwrap();
        eventually(
            Duration::from_secs(60),
            "the control plane answering",
            || async { anon.health().await.ok() },
        )
        .await;
    }

    /// Runs the CLI (its settings in this directory); returns its output, which must be a
    /// success.
    fn cli(&self, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_nestbox"))
            .args(args)
            .env("NESTBOX_CONFIG", self.dir.path().join("cli.toml"))
            .env("NESTBOX_URL", &self.url)
            .env_remove("NESTBOX_API_KEY")
            .env_remove("NESTBOX_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nestbox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts the host agent (registering with `token` on its first start), its settings
    /// in a config file and its address in a `.env` file, as an operator would.
    fn start_agent(&mut self, token: Option<&str>) {
        let port = free_port();
        let config = self.dir.path().join("nestbox.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ncontrol-plane = \"{}\"\ndata-dir = \"{}\"\nimages_dir = \"{}\"\n",
                self.url,
                self.agent_dir().display(),
                common::images_dir().display()
            ),
        )
        .unwrap();
        let cwd = self.dir.path().join("agent-cwd");
        std::fs::create_dir_all(&cwd).unwrap();
        std::fs::write(
            cwd.join(".env"),
            format!(
                "NESTBOX_AGENT_LISTEN=127.0.0.1:{port}\nNESTBOX_AGENT_ADVERTISE=http://127.0.0.1:{port}\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nestbox"));
        cmd.arg("agent")
            .arg("--config")
            .arg(&config)
            .current_dir(&cwd)
            .env("NESTBOX_LOG", "info")
            .env_remove("NESTBOX_AGENT_LISTEN")
            .env_remove("NESTBOX_AGENT_ADVERTISE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log("agent"));
        if let Some(token) = token {
            cmd.args(["--register-token", token]);
        }
        self.agent = Some(cmd.spawn().unwrap());
    }

    fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// Waits until the control plane is ready (a host online with its templates).
    async fn ready(&self) {
        let url = format!("{}/health/ready", self.url);
        eventually(Duration::from_secs(240), "the platform ready", || async {
            let ok = reqwest::get(&url)
                .await
                .is_ok_and(|r| r.status().is_success());
            ok.then_some(())
        })
        .await;
    }

    /// A value of the first admin's credentials file (written once the server has made
    /// them, just after it first answers).
    async fn admin_env(&self, key: &str) -> String {
        let path = self.dir.path().join("admin.env");
        let env = eventually(Duration::from_secs(30), "admin.env", || async {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|t| t.contains("NESTBOX_API_KEY="))
        })
        .await;
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in admin.env"))
            .to_string()
    }

    fn signal(child: &mut Option<Child>, signal: i32) -> Option<std::process::ExitStatus> {
        let mut child = child.take()?;
        // SAFETY: kill(2) on our own child process.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", self.log_tail("server"));
            eprintln!("--- agent log ---\n{}", self.log_tail("agent"));
        }
        Split::signal(&mut self.agent, libc::SIGTERM);
        Split::signal(&mut self.server, libc::SIGTERM);
    }
}

/// The host's access token as its agent stored it.
fn stored_access_token(split: &Split) -> String {
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(split.agent_dir().join("credentials.json")).unwrap())
            .unwrap();
    assert_eq!(creds["format_version"], 2);
    creds["tokens"]["access_token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The VMM pid recorded for a sandbox on the agent.
fn vmm_pid(split: &Split, id: SandboxId) -> u64 {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            split
                .agent_dir()
                .join("sandboxes")
                .join(id.to_string())
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    state["vmm_pid"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_crashes_upgrades_and_restarts_under_a_running_host() {
    let mut split = Split::new();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_nestbox"));
    split.start_server(&binary).await;
    // A new database got its first admin; they add a host.
    let anon = Client::new(&split.url).unwrap();
    let login = anon
        .login(
            &split.admin_env("NESTBOX_ADMIN_EMAIL").await,
            &split.admin_env("NESTBOX_ADMIN_PASSWORD").await,
        )
        .await
        .unwrap();
    let admin = anon.clone().with_token(login.token);
    // The admin adds the host with the CLI.
    let email = split.admin_env("NESTBOX_ADMIN_EMAIL").await;
    let password = split.admin_env("NESTBOX_ADMIN_PASSWORD").await;
    split.cli(
        &["login", "--email", &email],
        Some(&format!("{password}\n")),
    );
    let made = split.cli(&["host", "token", "host-1"], None);
    let token = made
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("the token is printed")
        .trim()
        .to_string();
    assert!(
        made.contains(&format!("nestbox agent --control-plane {}", split.url)),
        "{made}"
    );
    split.start_agent(Some(&token));
    split.ready().await;
    let listed = split.cli(&["host", "list"], None);
    assert!(
        listed.contains("host-1") && listed.contains("online") && listed.contains("platform"),
        "{listed}"
    );
    assert!(
        split
            .cli(&["admin", "team", "list"], None)
            .contains("team-")
    );
    let client = Client::new(&split.url)
        .unwrap()
        .with_api_key(split.admin_env("NESTBOX_API_KEY").await);
    let first_token = stored_access_token(&split);

    let running = new_sandbox(&client).await;
    sh_ok(&client, running, "echo running > /dev/shm/mark").await;
    let paused = new_sandbox(&client).await;
    sh_ok(&client, paused, "echo paused > /dev/shm/mark").await;
    client.pause_sandbox(paused).await.unwrap();
    let vmm = vmm_pid(&split, running);
    let tag = common::nestbox_agent_tag(&split.agent_dir());

    // A crash, then an upgrade to a new binary; then a graceful restart.
    let upgraded = split.dir.path().join("nestbox-upgraded");
    std::fs::copy(&binary, &upgraded).unwrap();
    for (how, signal, next) in [
        ("crash", libc::SIGKILL, &upgraded),
        ("restart", libc::SIGTERM, &upgraded),
    ] {
        let status = Split::signal(&mut split.server, signal);
        assert!(status.is_some(), "{how}: the control plane stopped");
        // The host runs on meanwhile.
        assert!(
            split
                .agent
                .as_mut()
                .is_some_and(|a| a.try_wait().unwrap().is_none()),
            "{how}: the agent exited with its control plane"
        );
        split.start_server(next).await;
        split.ready().await;
        let got = client.get_sandbox(running).await.unwrap();
        assert_eq!(got.status, SandboxStatus::Running, "{how}: {got:?}");
        assert_eq!(vmm_pid(&split, running), vmm, "{how}: the same VMM");
        assert_eq!(
            sh_ok(&client, running, "cat /dev/shm/mark").await.trim(),
            "running",
            "{how}"
        );
        let got = client.get_sandbox(paused).await.unwrap();
        assert_eq!(got.status, SandboxStatus::Paused, "{how}: {got:?}");
        let fresh = new_sandbox(&client).await;
        assert_eq!(sh_ok(&client, fresh, "echo ok").await.trim(), "ok", "{how}");
        client.destroy_sandbox(fresh).await.unwrap();
    }
    client.resume_sandbox(paused).await.unwrap();
    assert_eq!(
        sh_ok(&client, paused, "cat /dev/shm/mark").await.trim(),
        "paused"
    );
    for id in [running, paused] {
        client.destroy_sandbox(id).await.unwrap();
    }

    // Its access token expires: the agent refreshes its pair, stores it, and the host
    // stays online.
    eventually(
        Duration::from_secs(60),
        "the agent refreshing its tokens",
        || async { (stored_access_token(&split) != first_token).then_some(()) },
    )
    .await;
    let hosts = admin.list_hosts().await.unwrap().items;
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].status, nestbox_types::HostStatus::Online);
    // Its heartbeats report the memory that backs guest RAM (the scheduler's limit).
    assert!(
        hosts[0].guest_memory_mb.is_some_and(|m| m > 0),
        "{:?}",
        hosts[0]
    );
    // Killed and started again, the agent comes back with the pair it stored.
    let status = Split::signal(&mut split.agent, libc::SIGKILL);
    assert!(status.is_some(), "the agent was killed");
    split.start_agent(None);
    let after = split.agent_dir().join("credentials.json");
    eventually(
        Duration::from_secs(120),
        "a heartbeat after the restart",
        || async {
            let again = admin.list_hosts().await.ok()?.items;
            let since = again[0].last_heartbeat_at?;
            (since > hosts[0].last_heartbeat_at? && after.exists()).then_some(())
        },
    )
    .await;
    let fresh = new_sandbox(&client).await;
    assert_eq!(sh_ok(&client, fresh, "echo ok").await.trim(), "ok");
    client.destroy_sandbox(fresh).await.unwrap();

    // A graceful stop of the host, then of the control plane, leaves nothing behind.
    let status = Split::signal(&mut split.agent, libc::SIGTERM);
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent stops cleanly: {status:?}"
    );
    let status = Split::signal(&mut split.server, libc::SIGTERM);
    assert!(
        status.is_some_and(|s| s.success()),
        "the server stops cleanly: {status:?}"
    );
    drop(split);
    assert_instance_clean(&tag);
}

/// A small deterministic generator for the stop probe's moments.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// `nestbox agent` on its own, stopped as an operator stops it: with SIGUSR2 for an upgrade
/// under a running sandbox (which the next agent takes back, the same VMM carrying on), and
/// with SIGTERM at random moments — of its start-up (registration, warm-up) and of a
/// create/exec/destroy workload. Every SIGTERM exits cleanly with no VMM and no guest
/// memory left; once its data directory is deleted, nothing of it is left on the host.
#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_agent_stops_cleanly_at_any_moment_and_upgrades_under_a_sandbox() {
    let seed = std::env::var("NESTBOX_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("agent stop probe: seed {seed} (NESTBOX_CRASH_SEED replays it)");
    let mut rng = Rng(seed);
    let mut split = Split::new();
    split
        .start_server(&PathBuf::from(env!("CARGO_BIN_EXE_nestbox")))
        .await;
    let admin = Client::new(&split.url)
        .unwrap()
        .login(
            &split.admin_env("NESTBOX_ADMIN_EMAIL").await,
            &split.admin_env("NESTBOX_ADMIN_PASSWORD").await,
        )
        .await
        .unwrap();
    let admin = Client::new(&split.url).unwrap().with_token(admin.token);
    let token = admin.create_host("probe").await.unwrap().registration_token;
    let client = Client::new(&split.url)
        .unwrap()
        .with_api_key(split.admin_env("NESTBOX_API_KEY").await);
    split.start_agent(Some(&token));
    split.ready().await;
    let tag = common::nestbox_agent_tag(&split.agent_dir());

    // An upgrade stop: the sandbox's VMM outlives the agent and the next one takes it back.
    let running = new_sandbox(&client).await;
    sh_ok(&client, running, "echo kept > /dev/shm/mark").await;
    let vmm = vmm_pid(&split, running);
    let status = Split::signal(&mut split.agent, libc::SIGUSR2);
    assert!(status.is_some_and(|s| s.success()), "SIGUSR2: {status:?}");
    assert!(
        common::instance_vmms(&split.agent_dir()).contains(&(vmm as u32)),
        "the VMM runs on without its agent"
    );
    split.start_agent(None);
    let read_mark = nestbox_types::api::ExecRequest {
        command: Some("cat /dev/shm/mark".into()),
        ..Default::default()
    };
    eventually(Duration::from_secs(120), "the sandbox back", || async {
        // `503` until the new agent has registered again.
        let out = client.exec(running, &read_mark).await.ok()?;
        (out.exit_code == 0 && out.stdout.trim() == "kept").then_some(())
    })
    .await;
    assert_eq!(vmm_pid(&split, running), vmm, "the same VMM");
    client.destroy_sandbox(running).await.unwrap();

    // SIGTERM at random moments: start-up, then a workload.
    for round in 0..4 {
        let during_start = round % 2 == 0;
        if round > 0 {
            split.start_agent(None);
        }
        if !during_start {
            split.ready().await;
        }
        let work = (!during_start).then(|| {
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    if let Ok(sb) = client
                        .create_sandbox(&nestbox_types::api::CreateSandboxRequest::default())
                        .await
                    {
                        let busy = nestbox_types::api::ExecRequest {
                            command: Some("echo busy".into()),
                            ..Default::default()
                        };
                        let _ = client.exec(sb.id, &busy).await;
                        let _ = client.destroy_sandbox(sb.id).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
        });
        let after = Duration::from_millis(rng.below(if during_start { 8000 } else { 6000 }));
        tokio::time::sleep(after).await;
        let mut agent = split.agent.take();
        let status = tokio::task::spawn_blocking(move || Split::signal(&mut agent, libc::SIGTERM))
            .await
            .unwrap();
        if let Some(work) = work {
            work.abort();
            let _ = work.await;
        }
        let what = if during_start { "start-up" } else { "workload" };
        assert!(
            status.is_some_and(|s| s.success()),
            "round {round}: a SIGTERM {after:?} into its {what} exits cleanly ({status:?}):\n{}",
            split.log_tail("agent")
        );
        let left = common::instance_vmms(&split.agent_dir());
        assert!(left.is_empty(), "round {round}: VMMs left: {left:?}");
        assert!(
            !Path::new(&format!("/dev/shm/nestbox-{tag}")).exists(),
            "round {round}: guest memory left after a graceful stop"
        );
        eprintln!("round {round}: stopped {after:?} into its {what}; nothing left running");
    }
    // With its data directory gone, nothing of the agent is left on the host.
    let status = Split::signal(&mut split.server, libc::SIGTERM);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    drop(split);
    assert_instance_clean(&tag);
}
