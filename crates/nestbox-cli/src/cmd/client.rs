//! Client commands: `login`, `configure`, `sandbox …`, `file …`, `template …`.
//!
//! Credentials come from flags, then `NESTBOX_URL` / `NESTBOX_API_KEY` / `NESTBOX_TOKEN`,
//! then the config file written by `login` or `configure` (mode 0600).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use futures::StreamExt;
use nestbox_client::Client;
use nestbox_types::SandboxId;
use nestbox_types::api::{
    CreateSandboxRequest, Encoding, ExecEvent, ExecRequest, LogDirection, LogEntry, LogLevel,
    LogsQuery, SandboxListQuery,
};

use crate::paths;

/// Settings saved by `login` / `configure`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Settings {
    url: Option<String>,
    api_key: Option<String>,
    token: Option<String>,
}

fn load_settings() -> Settings {
    std::fs::read_to_string(paths::client_config_file())
        .ok()
        .and_then(|s| toml::from_str(&s).ok())
        .unwrap_or_default()
}

fn save_settings(s: &Settings) -> anyhow::Result<()> {
    let file = paths::client_config_file();
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    paths::write_private(&file, toml::to_string(s)?.as_bytes())?;
    eprintln!("saved to {}", file.display());
    Ok(())
}

/// Connection flags shared by client commands.
#[derive(Args, Clone, Default)]
pub struct Conn {
    /// Server URL.
    #[arg(long, env = "NESTBOX_URL")]
    url: Option<String>,
    /// Team API key.
    #[arg(long, env = "NESTBOX_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// The server URL: the flag or `NESTBOX_URL`, else the saved one, else the local default.
fn url_of(conn: &Conn, saved: &Settings) -> String {
    conn.url
        .clone()
        .or_else(|| saved.url.clone())
        .unwrap_or_else(|| format!("http://{}", paths::DEFAULT_LISTEN))
}

/// The user session: `NESTBOX_TOKEN`, else the one `nestbox login` saved.
fn session_of(saved: Settings) -> Option<String> {
    std::env::var("NESTBOX_TOKEN").ok().or(saved.token)
}

/// A client with the user session (`nestbox login`, or `NESTBOX_TOKEN`): what host and
/// platform administration need (API keys cannot do them).
pub(crate) fn session_client(conn: &Conn) -> anyhow::Result<Client> {
    let saved = load_settings();
    let url = url_of(conn, &saved);
    match session_of(saved) {
        Some(token) => Ok(Client::new(&url)?.with_token(token)),
        None => bail!("this needs a user session, not an API key: run `nestbox login` first"),
    }
}

/// The server URL a client of `conn` talks to.
pub(crate) fn server_url(conn: &Conn) -> String {
    url_of(conn, &load_settings())
}

pub(crate) fn client(conn: &Conn) -> anyhow::Result<Client> {
    let mut saved = load_settings();
    let client = Client::new(&url_of(conn, &saved))?;
    if let Some(key) = conn.api_key.clone().or(saved.api_key.take()) {
        return Ok(client.with_api_key(key));
    }
    if let Some(token) = session_of(saved) {
        return Ok(client.with_token(token));
    }
    bail!("no credentials: run `nestbox login` or `nestbox configure`, or set NESTBOX_API_KEY")
}

/// `login`.
#[derive(Args)]
pub struct LoginArgs {
    #[command(flatten)]
    conn: Conn,
    /// Account email.
    #[arg(long)]
    email: String,
    /// Password (read from stdin when omitted).
    #[arg(long, env = "NESTBOX_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

/// Logs in and saves the session.
pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let url = args
        .conn
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", paths::DEFAULT_LISTEN));
    let password = match args.password {
        Some(p) => p,
        None => {
            eprint!("password: ");
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    let resp = Client::new(&url)?.login(&args.email, &password).await?;
    save_settings(&Settings {
        url: Some(url),
        api_key: None,
        token: Some(resp.token),
    })?;
    println!("logged in as {} until {}", resp.user.email, resp.expires_at);
    Ok(())
}

/// `configure`.
#[derive(Args)]
pub struct ConfigureArgs {
    /// Server URL.
    #[arg(long)]
    url: String,
    /// Team API key.
    #[arg(long, env = "NESTBOX_API_KEY", hide_env_values = true)]
    api_key: String,
}

/// Saves a URL and API key.
pub async fn configure(args: ConfigureArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.url)?.with_api_key(&args.api_key);
    let me = client.me().await.context("checking the API key")?;
    save_settings(&Settings {
        url: Some(args.url),
        api_key: Some(args.api_key),
        token: None,
    })?;
    println!("configured for team {}", me.team_id);
    Ok(())
}

fn parse_pairs(pairs: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} `{p}` is not KEY=VALUE"))
        })
        .collect()
}

fn parse_id(s: &str) -> anyhow::Result<SandboxId> {
    s.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Sandbox subcommands.
#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until it runs.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// Template.
        #[arg(long, short)]
        template: Option<String>,
        /// vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, MiB.
        #[arg(long)]
        memory_mb: Option<u32>,
        /// Root disk, MiB.
        #[arg(long)]
        disk_size_mb: Option<u32>,
        /// Inactivity timeout, seconds.
        #[arg(long)]
        timeout_sec: Option<u32>,
        /// Absolute lifetime, seconds (the sandbox ends this long after it starts).
        #[arg(long)]
        lifetime_sec: Option<u32>,
        /// Pause instead of destroying it when its lifetime ends.
        #[arg(long)]
        pause_on_expiry: bool,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Metadata KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm')]
        metadata: Vec<String>,
        #[command(flatten)]
        egress: EgressArgs,
        /// Let anyone reach its ports through the proxy, without the traffic token.
        #[arg(long)]
        public: bool,
        /// While it is paused, let a request to one of its ports resume it.
        #[arg(long)]
        auto_resume: bool,
        /// Print only the id.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List sandboxes.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        conn: Conn,
        /// Comma-separated statuses.
        #[arg(long)]
        status: Option<String>,
        /// Metadata filter KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm')]
        metadata: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Get {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
    },
    /// Run a command: `nestbox sandbox exec ID -- ls -la` or `--sh 'echo hi | wc'`.
    Exec {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// A shell command line (run by /bin/sh -c).
        #[arg(long)]
        sh: Option<String>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
        /// User.
        #[arg(long, short)]
        user: Option<String>,
        /// Timeout, seconds.
        #[arg(long)]
        timeout: Option<u32>,
        /// Collect the output instead of streaming it.
        #[arg(long)]
        collect: bool,
        /// Program and arguments.
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// List the processes running in a sandbox (started through the API).
    Ps {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
    },
    /// Kill processes in a sandbox by pid or tag (SIGKILL to the group; --term: SIGTERM).
    Kill {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// Pids or tags.
        #[arg(required = true)]
        processes: Vec<String>,
        /// Send SIGTERM instead of SIGKILL.
        #[arg(long)]
        term: bool,
    },
    /// An interactive shell in a sandbox (Ctrl-] detaches; the shell keeps running).
    Shell {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// Attach to a running terminal (pid or tag) instead of starting one.
        #[arg(long)]
        attach: Option<String>,
        /// Tag of the new terminal, to reattach by.
        #[arg(long)]
        tag: Option<String>,
        /// User.
        #[arg(long, short)]
        user: Option<String>,
        /// Working directory.
        #[arg(long)]
        cwd: Option<String>,
    },
    /// Pause sandboxes: memory, processes and disk are saved; nothing runs.
    Pause {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Give running sandboxes new guest and traffic tokens; the old ones stop working.
    RotateTokens {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Resume paused sandboxes where they were.
    Resume {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Show a sandbox's CPU, memory and disk use (live while it runs, stored once paused).
    Metrics {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// `10m` (500 ms samples), `2h` (30 s averages) or `24h` (5 min averages).
        #[arg(long, default_value = "10m")]
        range: String,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox's log: its console (kernel, init, guest agent) and its host's events.
    Logs {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// The last N entries (with `--follow`: then what comes).
        #[arg(long, short = 'n', default_value_t = 100)]
        tail: u32,
        /// Only entries at least this severe: debug, info, warn or error.
        #[arg(long)]
        level: Option<String>,
        /// Only entries whose message contains this (case-insensitive).
        #[arg(long)]
        search: Option<String>,
        /// Keep printing new entries until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print entries as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Replace a running or paused sandbox's egress rules (none given: no rules).
    Egress {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        #[command(flatten)]
        egress: EgressArgs,
    },
    /// Reset a sandbox's inactivity timer.
    Ping {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
    },
    /// Destroy sandboxes.
    #[command(alias = "rm")]
    Destroy {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Egress rules on the command line.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EgressArgs {
    /// Destination the sandbox may reach even when denied: an IPv4 address, a CIDR block
    /// or a domain name (`example.com`, `*.example.com`); repeatable.
    #[arg(long = "allow-out")]
    allow_out: Vec<String>,
    /// Destination the sandbox may not reach unless allowed: an IPv4 address or a CIDR
    /// block (`0.0.0.0/0`: everything); repeatable.
    #[arg(long = "deny-out")]
    deny_out: Vec<String>,
    /// Deny everything not allowed (as `--deny-out 0.0.0.0/0`).
    #[arg(long)]
    no_internet: bool,
}

impl EgressArgs {
    fn request(&self) -> nestbox_types::api::EgressRequest {
        nestbox_types::api::EgressRequest {
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            allow_internet_access: self.no_internet.then_some(false),
        }
    }
}

/// Runs a sandbox subcommand.
pub async fn sandbox(command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Create {
            conn,
            template,
            vcpus,
            memory_mb,
            disk_size_mb,
            timeout_sec,
            lifetime_sec,
            pause_on_expiry,
            env,
            metadata,
            egress,
            public,
            auto_resume,
            quiet,
        } => {
            let req = CreateSandboxRequest {
                template,
                vcpus,
                memory_mb,
                disk_size_mb,
                timeout_sec,
                env: parse_pairs(&env, "env")?,
                metadata: parse_pairs(&metadata, "metadata")?,
                lifetime_sec,
                on_expiry: pause_on_expiry.then_some(nestbox_types::Expiry::Pause),
                egress: Some(egress.request()),
                public_traffic: Some(public),
                auto_resume: Some(auto_resume),
            };
            let sb = client(&conn)?.create_sandbox(&req).await?;
            if quiet {
                println!("{}", sb.id);
            } else {
                print_json(&sb)?;
            }
            Ok(())
        }
        SandboxCommand::List {
            conn,
            status,
            metadata,
            json,
        } => {
            let md = parse_pairs(&metadata, "metadata")?;
            let metadata = (!md.is_empty()).then(|| {
                md.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let c = client(&conn)?;
            let mut query = SandboxListQuery {
                status,
                metadata,
                limit: Some(200),
                cursor: None,
            };
            let mut all = Vec::new();
            loop {
                let page = c.list_sandboxes(&query).await?;
                all.extend(page.items);
                match page.next_cursor {
                    Some(cur) => query.cursor = Some(cur),
                    None => break,
                }
            }
            if json {
                return print_json(&all);
            }
            println!(
                "{:<40} {:<9} {:<10} {:>5} {:>7} {:>7}  CREATED",
                "ID", "STATUS", "TEMPLATE", "VCPUS", "MEM_MB", "DISK_MB"
            );
            for s in all {
                println!(
                    "{:<40} {:<9} {:<10} {:>5} {:>7} {:>7}  {}",
                    s.id.to_string(),
                    s.status.as_str(),
                    s.template,
                    s.vcpus,
                    s.memory_mb,
                    s.disk_size_mb,
                    s.created_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
            Ok(())
        }
        SandboxCommand::Get { conn, id } => {
            print_json(&client(&conn)?.get_sandbox(parse_id(&id)?).await?)
        }
        SandboxCommand::Exec {
            conn,
            id,
            sh,
            env,
            cwd,
            user,
            timeout,
            collect,
            argv,
        } => {
            let (command, argv) = match (sh, argv.is_empty()) {
                (Some(s), true) => (Some(s), None),
                (None, false) => (None, Some(argv)),
                _ => bail!("give either --sh 'COMMAND LINE' or -- PROGRAM ARGS…"),
            };
            let req = ExecRequest {
                command,
                argv,
                env: parse_pairs(&env, "env")?,
                cwd,
                user,
                timeout_sec: timeout,
                stdin_base64: None,
            };
            let c = client(&conn)?;
            let id = parse_id(&id)?;
            let code = if collect {
                let r = c.exec(id, &req).await?;
                let decode = |s: String, e: Encoding| match e {
                    Encoding::Utf8 => Ok(s.into_bytes()),
                    Encoding::Base64 => B64.decode(s),
                };
                std::io::stdout().write_all(&decode(r.stdout, r.stdout_encoding)?)?;
                std::io::stderr().write_all(&decode(r.stderr, r.stderr_encoding)?)?;
                r.exit_code
            } else {
                let mut events = Box::pin(c.exec_stream(id, &req).await?);
                let mut code = -1;
                while let Some(ev) = events.next().await {
                    match ev? {
                        ExecEvent::Started { .. } => {}
                        ExecEvent::Stdout { data } => {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&B64.decode(data)?)?;
                            out.flush()?;
                        }
                        ExecEvent::Stderr { data } => {
                            std::io::stderr().write_all(&B64.decode(data)?)?
                        }
                        ExecEvent::Exit {
                            exit_code,
                            timed_out,
                            ..
                        } => {
                            if timed_out {
                                eprintln!("(timed out)");
                            }
                            code = exit_code;
                        }
                        ExecEvent::Error { code, message } => bail!("{message} ({code})"),
                    }
                }
                code
            };
            if code != 0 {
                std::process::exit(code.clamp(1, 255));
            }
            Ok(())
        }
        SandboxCommand::Ps { conn, id } => {
            super::processes::ps(&client(&conn)?, parse_id(&id)?).await
        }
        SandboxCommand::Kill {
            conn,
            id,
            processes,
            term,
        } => super::processes::kill(&client(&conn)?, parse_id(&id)?, &processes, term).await,
        SandboxCommand::Shell {
            conn,
            id,
            attach,
            tag,
            user,
            cwd,
        } => {
            let opts = super::processes::ShellOptions {
                attach,
                tag,
                user,
                cwd,
            };
            super::processes::shell(&client(&conn)?, parse_id(&id)?, opts).await
        }
        SandboxCommand::Pause { conn, ids } => {
            let c = client(&conn)?;
            for id in ids {
                c.pause_sandbox(parse_id(&id)?)
                    .await
                    .with_context(|| format!("pausing {id}"))?;
                println!("paused {id}");
            }
            Ok(())
        }
        SandboxCommand::RotateTokens { conn, ids } => {
            let c = client(&conn)?;
            for id in ids {
                c.rotate_tokens(parse_id(&id)?)
                    .await
                    .with_context(|| format!("rotating the tokens of {id}"))?;
                println!("rotated the tokens of {id}");
            }
            Ok(())
        }
        SandboxCommand::Resume { conn, ids } => {
            let c = client(&conn)?;
            for id in ids {
                c.resume_sandbox(parse_id(&id)?)
                    .await
                    .with_context(|| format!("resuming {id}"))?;
                println!("resumed {id}");
            }
            Ok(())
        }
        SandboxCommand::Metrics {
            conn,
            id,
            range,
            json,
        } => {
            let m = client(&conn)?
                .sandbox_metrics(parse_id(&id)?, Some(&range))
                .await?;
            if json {
                return print_json(&m);
            }
            println!(
                "{} {} ({}, every {} ms)",
                m.sandbox_id, m.range, m.source, m.interval_ms
            );
            println!(
                "{:<24} {:>8} {:>10} {:>10}",
                "TIME", "CPU %", "MEM MiB", "DISK MiB"
            );
            for p in &m.points {
                println!(
                    "{:<24} {:>8.1} {:>10.1} {:>10.1}",
                    p.timestamp.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                    p.cpu_pct,
                    p.mem_bytes as f64 / f64::from(1u32 << 20),
                    p.disk_bytes as f64 / f64::from(1u32 << 20)
                );
            }
            Ok(())
        }
        SandboxCommand::Logs {
            conn,
            id,
            tail,
            level,
            search,
            follow,
            json,
        } => {
            let level = level
                .map(|l| {
                    LogLevel::parse(&l)
                        .with_context(|| format!("level `{l}`: debug, info, warn or error"))
                })
                .transpose()?;
            let c = client(&conn)?;
            let id = parse_id(&id)?;
            let print = |e: &LogEntry| -> anyhow::Result<()> {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let fields: Vec<String> = e
                        .fields
                        .iter()
                        .filter(|(k, _)| k.as_str() != "source")
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!(
                        "{} {:<5} {}{}{}",
                        e.timestamp.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                        e.level.as_str(),
                        e.message,
                        if fields.is_empty() { "" } else { " " },
                        fields.join(" ")
                    );
                }
                Ok(())
            };
            // The newest `tail` entries, printed oldest first.
            let last = c
                .sandbox_logs(
                    id,
                    &LogsQuery {
                        limit: Some(tail.clamp(1, 1000)),
                        direction: Some(LogDirection::Backward),
                        level,
                        search: search.clone(),
                        ..LogsQuery::default()
                    },
                )
                .await?;
            let mut cursor = last.entries.first().map(|e| e.seq.to_string());
            for e in last.entries.iter().rev() {
                print(e)?;
            }
            if !follow {
                return Ok(());
            }
            loop {
                let page = c
                    .sandbox_logs(
                        id,
                        &LogsQuery {
                            limit: Some(1000),
                            cursor: cursor.clone().or(Some("0".into())),
                            level,
                            search: search.clone(),
                            ..LogsQuery::default()
                        },
                    )
                    .await?;
                for e in &page.entries {
                    print(e)?;
                }
                cursor = page.next_cursor.or(cursor);
                if !page.has_more {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        SandboxCommand::Egress { conn, id, egress } => {
            let sb = client(&conn)?
                .set_egress(parse_id(&id)?, &egress.request())
                .await?;
            print_json(&sb.egress)
        }
        SandboxCommand::Ping { conn, id } => client(&conn)?
            .ping_sandbox(parse_id(&id)?)
            .await
            .map_err(Into::into),
        SandboxCommand::Destroy { conn, ids } => {
            let c = client(&conn)?;
            for id in ids {
                c.destroy_sandbox(parse_id(&id)?)
                    .await
                    .with_context(|| format!("destroying {id}"))?;
                println!("destroyed {id}");
            }
            Ok(())
        }
    }
}

/// File subcommands.
#[derive(Subcommand)]
pub enum FileCommand {
    /// Copy a file to or from a sandbox: `cp ./local sb-…:/path` or `cp sb-…:/path ./local`.
    Cp {
        #[command(flatten)]
        conn: Conn,
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// List a directory inside a sandbox.
    Ls {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// Directory.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to list.
        #[arg(long, default_value_t = 1)]
        depth: u32,
    },
}

fn remote(spec: &str) -> Option<(&str, &str)> {
    spec.strip_prefix("sb-").and_then(|_| spec.split_once(':'))
}

/// Runs a file subcommand.
pub async fn file(command: FileCommand) -> anyhow::Result<()> {
    match command {
        FileCommand::Cp { conn, src, dst } => {
            let c = client(&conn)?;
            match (remote(&src), remote(&dst)) {
                (None, Some((id, path))) => {
                    let local = PathBuf::from(&src);
                    let file = tokio::fs::File::open(&local)
                        .await
                        .with_context(|| format!("opening {}", local.display()))?;
                    let size = file.metadata().await?.len();
                    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                    let entry = c.upload(parse_id(id)?, path, body, Some(size)).await?;
                    println!("{} bytes -> {}:{}", entry.size, id, entry.path);
                }
                (Some((id, path)), None) => {
                    let (_, mut stream) = c.download(parse_id(id)?, path).await?;
                    let local = PathBuf::from(&dst);
                    let tmp = local.with_extension("nestbox-part");
                    let mut out = tokio::fs::File::create(&tmp)
                        .await
                        .with_context(|| format!("creating {}", tmp.display()))?;
                    let mut n: u64 = 0;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk?;
                        n += chunk.len() as u64;
                        tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
                    }
                    tokio::io::AsyncWriteExt::flush(&mut out).await?;
                    drop(out);
                    tokio::fs::rename(&tmp, &local).await?;
                    println!("{id}:{path} -> {} ({n} bytes)", local.display());
                }
                _ => bail!("exactly one of SRC and DST must be a sandbox path like sb-…:/path"),
            }
            Ok(())
        }
        FileCommand::Ls {
            conn,
            id,
            path,
            depth,
        } => {
            let entries = client(&conn)?
                .list_files(parse_id(&id)?, &path, Some(depth))
                .await?;
            for e in entries {
                println!(
                    "{} {:>8} {:<8} {:<8} {}",
                    e.permissions, e.size, e.owner, e.group, e.path
                );
            }
            Ok(())
        }
    }
}

/// Template subcommands.
#[derive(Subcommand)]
pub enum TemplateCommand {
    /// List templates.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Turn a running or paused sandbox into a template: memory and disk (snapshot, the
    /// default: sandboxes continue where it was) or the disk alone (--image: they boot).
    Create {
        #[command(flatten)]
        conn: Conn,
        /// The sandbox.
        sandbox: String,
        /// Template name.
        name: String,
        /// Only the disk: sandboxes boot from it.
        #[arg(long)]
        image: bool,
        /// Replace the team's template of that name.
        #[arg(long)]
        overwrite: bool,
    },
    /// Build a template from a recipe file (TOML) or a Dockerfile, following its log.
    Build(super::builds::BuildArgs),
    /// The team's template builds, newest first.
    Builds {
        #[command(flatten)]
        conn: Conn,
    },
    /// A build's log (followed while it runs).
    BuildLogs {
        #[command(flatten)]
        conn: Conn,
        /// The build (`bld-…`).
        build: String,
    },
    /// Cancel a running build.
    BuildCancel {
        #[command(flatten)]
        conn: Conn,
        /// The build (`bld-…`).
        build: String,
    },
    /// Delete a template.
    #[command(alias = "rm")]
    Delete {
        #[command(flatten)]
        conn: Conn,
        /// Template names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// A template name's tags, with the build each points at (`default` is the name itself).
    Tags {
        #[command(flatten)]
        conn: Conn,
        /// Template name.
        name: String,
    },
    /// Point tags of a template name at the build its tag --from points at (`default`
    /// makes that build the template NAME).
    Tag {
        #[command(flatten)]
        conn: Conn,
        /// Template name.
        name: String,
        /// The tag whose build gets the tags.
        #[arg(long, default_value = "default")]
        from: String,
        /// Tags to point there.
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Take tags off a template name (`default` hides the template NAME itself).
    Untag {
        #[command(flatten)]
        conn: Conn,
        /// Template name.
        name: String,
        /// Tags to take off.
        #[arg(required = true)]
        tags: Vec<String>,
    },
}

/// Runs a template subcommand.
pub async fn template(command: TemplateCommand) -> anyhow::Result<()> {
    match command {
        TemplateCommand::Create {
            conn,
            sandbox,
            name,
            image,
            overwrite,
        } => {
            let req = nestbox_types::api::CreateSnapshotRequest {
                sandbox_id: parse_id(&sandbox)?,
                name,
                overwrite,
                kind: Some(if image {
                    nestbox_types::TemplateKind::Image
                } else {
                    nestbox_types::TemplateKind::Snapshot
                }),
            };
            print_json(&client(&conn)?.create_snapshot(&req).await?)
        }
        TemplateCommand::Build(args) => super::builds::build(args).await,
        TemplateCommand::Builds { conn } => super::builds::list(&conn).await,
        TemplateCommand::BuildLogs { conn, build } => super::builds::logs(&conn, &build).await,
        TemplateCommand::BuildCancel { conn, build } => super::builds::cancel(&conn, &build).await,
        TemplateCommand::Tags { conn, name } => {
            print_json(&client(&conn)?.template_tags(&name).await?)
        }
        TemplateCommand::Tag {
            conn,
            name,
            from,
            tags,
        } => {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            print_json(
                &client(&conn)?
                    .assign_template_tags(&name, Some(&from), &tags)
                    .await?,
            )
        }
        TemplateCommand::Untag { conn, name, tags } => {
            let c = client(&conn)?;
            for tag in tags {
                c.remove_template_tag(&name, &tag)
                    .await
                    .with_context(|| format!("taking {tag} off {name}"))?;
                println!("untagged {name}:{tag}");
            }
            Ok(())
        }
        TemplateCommand::Delete { conn, names } => {
            let c = client(&conn)?;
            for name in names {
                c.delete_snapshot(&name)
                    .await
                    .with_context(|| format!("deleting {name}"))?;
                println!("deleted {name}");
            }
            Ok(())
        }
        TemplateCommand::List { conn } => {
            for t in client(&conn)?.list_snapshots().await? {
                println!(
                    "{:<24} {:<8} {:>5} {:>7} {:>8}  {}",
                    t.name,
                    t.kind.as_str(),
                    t.vcpus,
                    t.memory_mb,
                    t.disk_size_mb,
                    if t.platform { "platform" } else { "team" }
                );
            }
            Ok(())
        }
    }
}
