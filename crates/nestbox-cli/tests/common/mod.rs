//! End-to-end harness: a real `nestbox up` (real QEMU VMs, namespaces, nftables) in a
//! temporary data directory, driven through the REST API like a user would.
//!
//! Needs root and the guest images built by `make test-images` (found through
//! `NESTBOX_TEST_IMAGES`, default `<workspace>/target/nestbox-images`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nestbox_client::Client;
use nestbox_types::SandboxId;
use nestbox_types::api::{ExecRequest, ExecResult};

/// Where the test images are.
pub fn images_dir() -> PathBuf {
    let dir = std::env::var_os("NESTBOX_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/nestbox-images")
        });
    assert!(
        dir.join("templates/minimal/template.json").exists(),
        "guest images not found in {}: run `make test-images` (or set NESTBOX_TEST_IMAGES)",
        dir.display()
    );
    assert!(
        nix_is_root(),
        "end-to-end tests need root, like the host agent"
    );
    dir
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `nestbox up`. Stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Nestbox {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub api_key: String,
    pub admin_email: String,
    pub admin_password: String,
    child: Option<Child>,
    pub log: PathBuf,
    /// What it was started with (restarts keep it).
    opts: Options,
    /// The `nestbox` binary it runs.
    binary: PathBuf,
}

/// Extra settings of an instance.
#[derive(Default, Clone)]
pub struct Options {
    pub env: Vec<(String, String)>,
    /// Where the API listens (default: a free port on loopback).
    pub listen: Option<String>,
    /// It serves HTTPS (`NESTBOX_TLS_CERT`/`NESTBOX_TLS_KEY` in `env`).
    pub https: bool,
    /// Its data directory (default: `data` in its own temporary directory).
    pub data_dir: Option<PathBuf>,
}

impl Nestbox {
    /// Starts an instance and waits until it is up.
    pub fn up() -> Nestbox {
        Self::up_with(Options::default())
    }

    /// Starts an instance with these environment variables set.
    pub fn up_env(vars: &[(&str, &str)]) -> Nestbox {
        Self::up_with(Options {
            env: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    }

    /// A client with the first-run admin's session (a platform admin).
    pub async fn admin(&self) -> Client {
        let login = self
            .anonymous()
            .login(&self.admin_email, &self.admin_password)
            .await
            .unwrap();
        self.anonymous().with_token(login.token)
    }

    /// Starts an instance with extra environment.
    pub fn up_with(opts: Options) -> Nestbox {
        let images = images_dir();
        // Short path: unix socket paths live under it.
        let dir = tempfile::Builder::new()
            .prefix("nbx-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut nb = Nestbox {
            url: String::new(),
            api_key: String::new(),
            admin_email: String::new(),
            admin_password: String::new(),
            child: None,
            log: dir.path().join("nestbox.log"),
            dir,
            opts: opts.clone(),
            binary: PathBuf::from(env!("CARGO_BIN_EXE_nestbox")),
        };
        nb.start(&images, &opts);
        nb
    }

    fn start(&mut self, images: &Path, opts: &Options) {
        let listen = opts
            .listen
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.binary);
        cmd.args(["up", "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen", &listen])
            .arg("--images-dir")
            .arg(images)
            .env("NESTBOX_LOG", "info,tower_http=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning nestbox up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stdout for the life of the process.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.starts_with("Nestbox is up.") => break,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("nestbox up exited with {status}; log:\n{}", self.log_tail());
                    }
                    assert!(
                        Instant::now() < deadline,
                        "nestbox up did not come up; log:\n{}",
                        self.log_tail()
                    );
                }
            }
        }
        self.child = Some(child);
        let scheme = if opts.https { "https" } else { "http" };
        self.url = format!("{scheme}://{listen}");
        let env = std::fs::read_to_string(self.data_dir().join("admin.env"))
            .expect("admin.env written on first run");
        for line in env.lines() {
            if let Some((k, v)) = line.split_once('=') {
                match k {
                    "NESTBOX_API_KEY" => self.api_key = v.to_string(),
                    "NESTBOX_ADMIN_EMAIL" => self.admin_email = v.to_string(),
                    "NESTBOX_ADMIN_PASSWORD" => self.admin_password = v.to_string(),
                    _ => {}
                }
            }
        }
    }

    /// Restarts the instance on the same data directory (after [`Nestbox::kill`] or a
    /// clean stop).
    pub fn restart(&mut self) {
        self.stop();
        let images = images_dir();
        let keep = (
            self.api_key.clone(),
            self.admin_email.clone(),
            self.admin_password.clone(),
        );
        let opts = self.opts.clone();
        self.start(&images, &opts);
        if self.api_key.is_empty() {
            (self.api_key, self.admin_email, self.admin_password) = keep;
        }
    }

    /// Upgrades the instance in place: stops it for a restart (SIGUSR2: its sandboxes keep
    /// running) and starts `binary` on the same data directory.
    pub fn upgrade_to(&mut self, binary: &Path) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGUSR2);
            }
            let status = child.wait().unwrap();
            assert!(status.success(), "a restart stop exits cleanly: {status}");
        }
        self.binary = binary.to_path_buf();
        self.restart();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.opts
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// The client authenticated with the first-run API key.
    pub fn client(&self) -> Client {
        Client::new(&self.url).unwrap().with_api_key(&self.api_key)
    }

    /// An unauthenticated client.
    pub fn anonymous(&self) -> Client {
        Client::new(&self.url).unwrap()
    }

    /// Last lines of the instance's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Every warning and error the instance logged (the last 200), for failure messages
    /// of long tests whose tail has moved on.
    pub fn log_problems(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        lines[lines.len().saturating_sub(200)..].join("\n")
    }

    /// The instance tag (names its host-wide resources).
    pub fn tag(&self) -> String {
        nestbox_agent_tag(&self.data_dir().join("agent"))
    }

    /// Kills the process without letting it clean up (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops with SIGTERM and returns how the process exited (`None`: it had to be
    /// killed after the grace period of [`Nestbox::stop`]).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        terminate(self.child.take()?)
    }

    /// Stops cleanly: SIGTERM, wait, SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            // A graceful stop pauses every running sandbox and copies its snapshot to
            // disk, which under TCG on a loaded machine can take minutes; killing it
            // sooner leaves its VMMs behind.
            let deadline = Instant::now() + Duration::from_secs(240);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Runs the `nestbox` CLI against this instance.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_nestbox"))
            .args(args)
            .env("NESTBOX_URL", &self.url)
            .env("NESTBOX_API_KEY", &self.api_key)
            .env("NESTBOX_CONFIG", self.dir.path().join("cli.toml"))
            .output()
            .unwrap()
    }
}

impl Drop for Nestbox {
    fn drop(&mut self) {
        self.stop();
        // A clean stop pauses sandboxes and keeps their snapshots; the data directory goes
        // with the test, so does their tmpfs memory.
        let _ = std::fs::remove_dir_all(format!("/dev/shm/nestbox-{}", self.tag()));
        if std::thread::panicking() {
            eprintln!("--- nestbox log (last lines) ---\n{}", self.log_tail());
        }
    }
}

/// The network slots an instance (by its tag) holds machine-wide.
pub fn instance_slots(tag: &str) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/run/nestbox/slots")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .starts_with(tag)
                })
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The network slots of the agent instance `tag`, with the sandbox each is held for.
pub fn instance_slot_holders(tag: &str) -> std::collections::BTreeMap<u32, String> {
    std::fs::read_dir("/run/nestbox/slots")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let slot = e.file_name().to_str()?.parse().ok()?;
                    let text = std::fs::read_to_string(e.path()).ok()?;
                    let (owner, holder) = text.trim().split_once(' ')?;
                    (owner == tag).then(|| (slot, holder.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The agent's instance tag for a data directory (same derivation as the agent).
pub fn nestbox_agent_tag(agent_dir: &Path) -> String {
    use sha2::Digest;
    let canonical = std::fs::canonicalize(agent_dir).unwrap_or_else(|_| agent_dir.to_path_buf());
    hex::encode(sha2::Sha256::digest(
        canonical.as_os_str().as_encoded_bytes(),
    ))[..8]
        .to_string()
}

/// Runs a shell command line in a sandbox.
pub async fn sh(client: &Client, id: SandboxId, command: &str) -> ExecResult {
    client
        .exec(
            id,
            &ExecRequest {
                command: Some(command.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("exec `{command}` in {id}: {e}"))
}

/// Runs a shell command line and returns stdout, asserting exit 0.
pub async fn sh_ok(client: &Client, id: SandboxId, command: &str) -> String {
    let r = sh(client, id, command).await;
    assert_eq!(
        r.exit_code, 0,
        "`{command}` failed: stdout={} stderr={}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Host resources of one sandbox, found while it runs.
#[derive(Debug, Clone)]
pub struct HostFootprint {
    pub slot: u32,
    pub vmm_pid: u32,
    /// What the VMM's command line names (the id it started under: a pooled clone's for a
    /// sandbox that took one over).
    pub vmm_name: String,
    pub sandbox_dir: PathBuf,
    pub mem_dir: PathBuf,
}

/// Finds what a running sandbox holds on the host.
pub fn footprint(nb: &Nestbox, id: SandboxId) -> HostFootprint {
    let sandbox_dir = nb.data_dir().join("agent/sandboxes").join(id.to_string());
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox_dir.join("state.json")).expect("state.json of a running sandbox"),
    )
    .unwrap();
    HostFootprint {
        slot: state["slot"].as_u64().unwrap() as u32,
        vmm_pid: state["vmm_pid"].as_u64().unwrap() as u32,
        vmm_name: state["vmm_name"]
            .as_str()
            .map_or_else(|| id.to_string(), String::from),
        mem_dir: PathBuf::from(state["mem_dir"].as_str().unwrap()),
        sandbox_dir,
    }
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A default sandbox of `client`'s team.
pub async fn new_sandbox(client: &Client) -> SandboxId {
    client
        .create_sandbox(&nestbox_types::api::CreateSandboxRequest::default())
        .await
        .unwrap()
        .id
}

/// The VMM processes of the agent whose data directory is `data_dir`: those whose command
/// line names it (a zombie does not count).
pub fn instance_vmms(data_dir: &Path) -> std::collections::BTreeSet<u32> {
    let needle = std::fs::canonicalize(data_dir)
        .unwrap_or_else(|_| data_dir.to_path_buf())
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
            cmd.starts_with("qemu-system") && cmd.contains(&needle) && !zombie
        })
        .collect()
}

/// Whether the VMM process `pid`, whose command line names `name`, runs (a zombie or a
/// recycled pid does not count).
pub fn vmm_alive(pid: u32, name: &str) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
    !zombie
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).contains(name))
            .unwrap_or(false)
}

/// Asserts that nothing of the sandbox is left on the host: process, namespace, links,
/// slot, files.
pub fn assert_gone(nb: &Nestbox, fp: &HostFootprint, id: SandboxId) {
    let pid_alive = vmm_alive(fp.vmm_pid, &fp.vmm_name);
    assert!(
        !pid_alive,
        "the VMM process {} of {id} still runs",
        fp.vmm_pid
    );
    // Slots are machine-wide: once freed, another instance may take the slot (and its
    // namespace name). Only while the slot is free are leftover links ours.
    let slot_file = Path::new("/run/nestbox/slots").join(fp.slot.to_string());
    let holder = std::fs::read_to_string(&slot_file).ok();
    assert!(
        !holder
            .as_deref()
            .unwrap_or_default()
            .contains(&id.to_string()),
        "slot {} still held by {id}",
        fp.slot
    );
    if holder.is_none() {
        let netns = output("ip", &["netns", "list"]);
        assert!(
            !netns
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&format!("nbx{}", fp.slot))),
            "namespace nbx{} left: {netns}",
            fp.slot
        );
        let links = output("ip", &["-br", "link"]);
        assert!(
            !links
                .lines()
                .any(|l| l.split(['@', ' ']).next() == Some(&format!("nbxh{}", fp.slot))),
            "link nbxh{} left: {links}",
            fp.slot
        );
    }
    assert!(
        !fp.sandbox_dir.exists(),
        "{} left",
        fp.sandbox_dir.display()
    );
    assert!(!fp.mem_dir.exists(), "{} left", fp.mem_dir.display());
    let _ = nb;
}

/// Asserts that a stopped instance left nothing on the host: no VMM of it, no slot of it,
/// no nftables table of it.
pub fn assert_instance_clean(tag: &str) {
    let tables = output("nft", &["list", "tables"]);
    assert!(
        !tables.contains(&format!("nestbox_{tag}")),
        "nftables table of {tag} left: {tables}"
    );
    if let Ok(entries) = std::fs::read_dir("/run/nestbox/slots") {
        for e in entries.flatten() {
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            assert!(
                !owner.starts_with(tag),
                "slot {:?} of {tag} left: {owner}",
                e.file_name()
            );
        }
    }
    assert!(
        !Path::new(&format!("/dev/shm/nestbox-{tag}")).exists(),
        "guest memory of {tag} left"
    );
    for controller in ["cpu", "memory", "pids"] {
        let group = Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(format!("nestbox-{tag}"));
        assert!(!group.exists(), "cgroup {} left", group.display());
    }
}

/// Polls `check` until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An API key of a second team: the admin creates a user (`email`), who gets a team of
/// their own, and that user creates the key.
pub async fn other_team_key(nb: &Nestbox, email: &str) -> String {
    use nestbox_types::api::CreateUserRequest;
    let admin = nb
        .anonymous()
        .login(&nb.admin_email, &nb.admin_password)
        .await
        .unwrap();
    let created = nb
        .anonymous()
        .with_token(admin.token)
        .create_user(&CreateUserRequest {
            email: email.into(),
            name: "Other".into(),
            password: "a long enough password".into(),
            is_admin: false,
        })
        .await
        .unwrap();
    let session = nb
        .anonymous()
        .login(email, "a long enough password")
        .await
        .unwrap();
    nb.anonymous()
        .with_token(session.token)
        .create_api_key(created.team.id, "other")
        .await
        .unwrap()
        .key
}

/// Metadata map helper.
pub fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A network namespace standing in for "the internet": a block of documentation
/// addresses (`subnet`, e.g. `203.0.113.0/25`; the host is its first address), a web server
/// answering on port 8080 at every address of the namespace, and a DNS server at offset 53
/// answering the names it was given (and REFUSED for any other). Tests that may run at the
/// same time use blocks that do not overlap (and none the machine itself uses).
pub struct Internet {
    base: std::net::Ipv4Addr,
    ns: String,
    host_if: String,
    children: Vec<Child>,
    web_log: tempfile::NamedTempFile,
    dns_log: tempfile::NamedTempFile,
}

impl Internet {
    /// An internet on `subnet` with hosts at the offsets `hosts` (2 and 53 are always
    /// there) and DNS `names` (`(name, offset)`).
    pub fn new(subnet: &str, hosts: &[u8], names: &[(&str, u8)]) -> Internet {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let (base, prefix) = subnet.split_once('/').expect("a CIDR block");
        let base: std::net::Ipv4Addr = base.parse().unwrap();
        let at = |offset: u8| std::net::Ipv4Addr::from(u32::from(base) + u32::from(offset));
        let n = std::process::id() % 10000;
        let k = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = format!("nbxtnet{n}{k}");
        let host_if = format!("nbxti{n}{k}");
        let peer = format!("nbxtj{n}{k}");
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
        run(&["netns", "add", &ns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]);
        run(&[
            "addr",
            "add",
            &format!("{}/{prefix}", at(1)),
            "dev",
            &host_if,
        ]);
        run(&["link", "set", &host_if, "up"]);
        let mut all: Vec<u8> = vec![2, 53];
        for offset in hosts {
            if !all.contains(offset) {
                all.push(*offset);
            }
        }
        for offset in &all {
            run(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/{prefix}", at(*offset)),
                "dev",
                &peer,
            ]);
        }
        run(&["-n", &ns, "link", "set", &peer, "up"]);
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        let web_log = tempfile::NamedTempFile::new().unwrap();
        let dns_log = tempfile::NamedTempFile::new().unwrap();
        let web = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
            .stdout(Stdio::null())
            .stderr(web_log.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut dns = Command::new("ip");
        dns.args(["netns", "exec", &ns])
            .args([
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
            ])
            .args(["--no-poll", "--conf-file=/dev/null", "--bind-interfaces"])
            .args([
                "--log-queries",
                "--log-facility=-",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--listen-address={}", at(53)));
        for (name, offset) in names {
            match name.strip_prefix("*.") {
                // The domain and every name below it.
                Some(domain) => dns.arg(format!("--address=/{domain}/{}", at(*offset))),
                None => dns.arg(format!("--host-record={name},{}", at(*offset))),
            };
        }
        let dns = dns
            .stdout(Stdio::null())
            .stderr(dns_log.reopen().unwrap())
            .spawn()
            .unwrap();
        let internet = Internet {
            base,
            ns,
            host_if,
            children: vec![web, dns],
            web_log,
            dns_log,
        };
        // Ready once both answer (the host routes to the namespace directly).
        let web_addr = std::net::SocketAddr::from((at(2), 8080));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let web_up =
                std::net::TcpStream::connect_timeout(&web_addr, Duration::from_millis(500)).is_ok();
            let dns_up = internet.dns_log().contains("started");
            if web_up && dns_up {
                break;
            }
            assert!(Instant::now() < deadline, "the test internet did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        internet
    }

    /// The address at `offset` in the block.
    pub fn ip(&self, offset: u8) -> String {
        std::net::Ipv4Addr::from(u32::from(self.base) + u32::from(offset)).to_string()
    }

    /// The DNS server's address.
    pub fn dns(&self) -> String {
        self.ip(53)
    }

    /// What the web server logged (one line per request, the client's address first).
    pub fn web_log(&self) -> String {
        std::fs::read_to_string(self.web_log.path()).unwrap_or_default()
    }

    /// What the DNS server logged (`query[A] NAME from ADDRESS` per query).
    pub fn dns_log(&self) -> String {
        std::fs::read_to_string(self.dns_log.path()).unwrap_or_default()
    }

    /// A command run inside the namespace (a client "on the internet"), resolving names
    /// with the namespace's DNS server.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let etc = Path::new("/etc/netns").join(&self.ns);
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {}\n", self.dns()),
        )
        .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Serves `dir` over plain HTTP on `port` at the block's host address (offset 2), from
    /// inside the namespace (a package host, a mirror); stopped when dropped. Returns once
    /// it accepts connections.
    pub fn serve_dir(&self, dir: &Path, port: u16) -> Served {
        let child = self
            .command("python3")
            .args(["-m", "http.server", &port.to_string()])
            .args(["--bind", "0.0.0.0", "--directory"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let served = Served(child);
        let addr: std::net::SocketAddr = format!("{}:{port}", self.ip(2)).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
            assert!(
                Instant::now() < deadline,
                "serving {} did not start",
                dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    /// Whether the DNS server was ever asked about `name`.
    pub fn was_asked(&self, name: &str) -> bool {
        self.dns_log()
            .lines()
            .any(|l| l.contains("query[") && l.contains(&format!(" {name} from ")))
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.ns));
    }
}

/// A web server of [`Internet::serve_dir`]; killed when dropped.
pub struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workspace's root directory.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The virtualenv with E2B's stock Python SDKs (`make sdk-deps`; `NESTBOX_SDK_VENV`).
pub fn sdk_venv() -> PathBuf {
    let venv = std::env::var_os("NESTBOX_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/sdk-venv"));
    assert!(
        venv.join("bin/pytest").exists(),
        "E2B's Python SDKs are not installed in {}: run `make sdk-deps` (or set NESTBOX_SDK_VENV)",
        venv.display()
    );
    venv
}

/// Runs an SDK suite (or script) pointed at `nb` the way the docs tell E2B's users to
/// (`E2B_API_URL`, `E2B_API_KEY`, `E2B_SANDBOX_URL`); returns its combined output and
/// whether it passed. The caller adds the suite's own variables to `cmd`.
pub fn run_sdk_suite(mut cmd: Command, nb: &Nestbox) -> (String, bool) {
    let out = cmd
        .env("E2B_API_URL", &nb.url)
        .env("E2B_API_KEY", &nb.api_key)
        .env("E2B_SANDBOX_URL", &nb.url)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_DEBUG")
        .output()
        .expect("starting the suite");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out.status.success())
}

/// The directory of E2B's stock JavaScript SDKs' suites, with their packages installed.
pub fn sdk_js_dir() -> PathBuf {
    let dir = workspace().join("sdk-tests/js");
    assert!(
        dir.join("node_modules/e2b").exists()
            && dir.join("node_modules/@e2b/code-interpreter").exists(),
        "E2B's JavaScript SDKs are not installed in {}: run `make sdk-deps`",
        dir.display()
    );
    dir
}

/// The host's own address on its default route (what a sandbox must never reach).
pub fn host_primary_ip() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "get", "1.1.1.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words.next().unwrap().to_string();
        }
    }
    panic!("no source address in `{text}`");
}

/// Sends SIGTERM to `child` and waits for it (killed after 240 s); `None` if it had to be
/// killed.
pub fn terminate(mut child: std::process::Child) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
