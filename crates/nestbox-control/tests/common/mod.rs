//! The control-plane test harness.
//!
//! [`Harness::start`] runs the real control plane (`nestbox_control::start`) on a fresh
//! SQLite file or a fresh PostgreSQL database, bootstraps it like a first run (a platform
//! admin, their team and an API key), creates a host, registers a [`SimAgent`] with the
//! host's one-time token, and records the agent's templates, so `minimal` exists. Tests then
//! act through typed clients ([`nestbox_client::Client`]) like users would.
//!
//! [`both_engines!`] turns `async fn name(engine: Engine) -> anyhow::Result<()>` into two
//! tests, `sqlite::name` and `postgres::name`.
//!
//! Routes the typed client does not cover yet are called through [`api::Api`]
//! ([`Harness::key_api`], [`TestUser::api`]); [`Harness::add_agent`] registers more
//! simulated hosts.
//!
//! The background monitor and expiry task of `start` only run their first pass (the
//! interval is an hour); tests run passes explicitly with [`Harness::monitor_pass`] and
//! [`Harness::expiry_pass`] so that nothing changes behind their back.

#![allow(dead_code)]

pub mod api;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nestbox_client::{Client, ClientError};
use nestbox_control::{ControlConfig, Limits, RunningControlPlane, Services};
use nestbox_testkit::{PgCluster, SimAgent, SimAgentConfig, SimHold, TempSqlite, temp_sqlite_url};
use nestbox_types::api::{CreateSandboxRequest, CreateUserRequest, Sandbox};
use nestbox_types::{ErrorBody, ErrorCode, HostId, TeamId, UserId};

/// Password of every user the harness creates.
pub const PASSWORD: &str = "correct horse battery staple";
/// Email of the first-run platform admin.
pub const ADMIN_EMAIL: &str = "admin@example.com";
/// How long tests wait for a condition.
pub const WAIT: Duration = Duration::from_secs(20);

/// Defines `sqlite::$name` and `postgres::$name` tests calling `$name(Engine)`.
macro_rules! both_engines {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(crate::common::Engine::Sqlite).await
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(crate::common::Engine::Postgres).await
                }
            )+
        }
    };
}
pub(crate) use both_engines;

/// The database engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database in the test process's PostgreSQL cluster.
    Postgres,
}

/// What to change from the defaults.
#[derive(Debug, Clone)]
pub struct Options {
    /// Request limits.
    pub limits: Limits,
    /// Heartbeat grace before a host is unreachable.
    pub host_grace: Duration,
    /// The simulated agent.
    pub agent: SimAgentConfig,
    /// Deadline of pause and resume calls (and how long the monitor leaves a fresh pause
    /// alone).
    pub pause_timeout: Duration,
    /// Login attempts per address and per account.
    pub login_limits: nestbox_control::throttle::LoginLimits,
    /// Deadline of create calls (the monitor settles creates older than twice that).
    pub create_timeout: Duration,
    /// Lifetime of host access tokens.
    pub host_access_ttl: Duration,
    /// The placement policy.
    pub scheduler: nestbox_control::scheduler::Policy,
    /// Deadline of template calls (and how old files of a template that no longer exists
    /// must be before a host's are deleted).
    pub template_timeout: Duration,
    /// The scrape token of `/metrics`.
    pub metrics_token: Option<String>,
    /// How often placement's view of the fleet is read.
    pub placement_refresh: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            host_grace: Duration::from_secs(90),
            agent: SimAgentConfig::default(),
            pause_timeout: Duration::from_secs(120),
            login_limits: Default::default(),
            create_timeout: Duration::from_secs(180),
            host_access_ttl: Duration::from_secs(7 * 24 * 3600),
            scheduler: Default::default(),
            template_timeout: Duration::from_secs(600),
            metrics_token: None,
            placement_refresh: ControlConfig::new(
                "127.0.0.1:0".parse().expect("an address"),
                String::new(),
                Vec::new(),
            )
            .placement_refresh,
        }
    }
}

/// A user with a session.
#[derive(Debug, Clone)]
pub struct TestUser {
    /// Their id.
    pub id: UserId,
    /// Their email.
    pub email: String,
    /// Their personal team (they own it).
    pub team: TeamId,
    /// A client with their session token.
    pub client: Client,
    /// Their session token.
    pub token: String,
    base: String,
}

impl TestUser {
    /// Calls routes the typed client does not cover, for the user's default team.
    pub fn api(&self) -> api::Api {
        api::Api::new(
            &self.base,
            vec![("authorization", format!("Bearer {}", self.token))],
        )
    }

    /// [`TestUser::api`] acting for `team`.
    pub fn api_for(&self, team: TeamId) -> api::Api {
        api::Api::new(
            &self.base,
            vec![
                ("authorization", format!("Bearer {}", self.token)),
                ("x-nestbox-team", team.to_string()),
            ],
        )
    }
}

/// A running control plane with a registered simulated agent.
pub struct Harness {
    /// The engine it runs on.
    pub engine: Engine,
    /// The control plane's services (for bootstrap-style set-up and monitor passes).
    pub services: Arc<Services>,
    /// The API's base URL.
    pub url: String,
    /// The simulated host agent.
    pub agent: SimAgent,
    /// The agent's host.
    pub host_id: HostId,
    /// The first-run platform admin (owner of [`Harness::team`]).
    pub admin: TestUser,
    /// The first-run API key of the admin's team.
    pub key: Client,
    /// The first-run team.
    pub team: TeamId,
    /// The first-run API key itself.
    pub api_key: String,
    cp: Option<RunningControlPlane>,
    _sqlite: Option<TempSqlite>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("engine", &self.engine)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn master_secret() -> Vec<u8> {
    let mut secret = uuid::Uuid::new_v4().as_bytes().to_vec();
    secret.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    secret
}

impl Harness {
    /// A control plane with default options.
    pub async fn start(engine: Engine) -> anyhow::Result<Harness> {
        Self::with(engine, Options::default()).await
    }

    /// A control plane with `opts`.
    pub async fn with(engine: Engine, opts: Options) -> anyhow::Result<Harness> {
        let (url, sqlite) = match engine {
            Engine::Sqlite => {
                let db = temp_sqlite_url()?;
                (db.url().to_string(), Some(db))
            }
            Engine::Postgres => {
                let pg = PgCluster::shared().await?;
                (pg.fresh_database().await?, None)
            }
        };
        let mut cfg = ControlConfig::new("127.0.0.1:0".parse()?, url, master_secret());
        cfg.limits = opts.limits;
        cfg.host_grace = opts.host_grace;
        cfg.monitor_interval = Duration::from_secs(3600);
        cfg.expiry_interval = Duration::from_secs(3600);
        cfg.pause_timeout = opts.pause_timeout;
        cfg.login_limits = opts.login_limits;
        cfg.create_timeout = opts.create_timeout;
        cfg.host_access_ttl = opts.host_access_ttl;
        cfg.scheduler = opts.scheduler;
        cfg.template_timeout = opts.template_timeout;
        cfg.metrics_token = opts.metrics_token;
        cfg.placement_refresh = opts.placement_refresh;
        let cp = nestbox_control::start(cfg).await?;
        let services = cp.services.clone();
        let base = cp.url();

        let first = nestbox_control::bootstrap::first_run(&services, ADMIN_EMAIL)
            .await?
            .context("a fresh database has no users, so the first run creates the admin")?;
        let agent = SimAgent::start(opts.agent).await?;
        let host = services.create_host_unchecked("sim-1").await?;
        let creds = agent.register(&base, &host.registration_token).await?;
        anyhow::ensure!(creds.host_id == host.host.id, "registered as another host");
        let synced = services
            .sync_host_templates(creds.host_id, &agent.address())
            .await?;
        anyhow::ensure!(synced > 0, "the simulated agent reported no template");

        let anonymous = Client::new(&base)?;
        let login = anonymous.login(&first.email, &first.password).await?;
        let admin = TestUser {
            id: login.user.id,
            email: first.email.clone(),
            team: first.team_id,
            client: anonymous.clone().with_token(login.token.clone()),
            token: login.token,
            base: base.clone(),
        };
        Ok(Harness {
            engine,
            services,
            url: base,
            agent,
            host_id: creds.host_id,
            admin,
            key: anonymous.with_api_key(first.api_key.clone()),
            team: first.team_id,
            api_key: first.api_key,
            cp: Some(cp),
            _sqlite: sqlite,
        })
    }

    /// A client without credentials.
    pub fn anonymous(&self) -> Client {
        Client::new(&self.url).expect("the harness URL is valid")
    }

    /// A raw HTTP client and the URL of `path`, for requests the typed client cannot make.
    pub fn raw(&self, path: &str) -> (reqwest::Client, String) {
        (reqwest::Client::new(), format!("{}{path}", self.url))
    }

    /// Creates a user (by the platform admin, through the API) with a session. The session
    /// is issued directly (logging in costs an argon2 hash; `auth.rs` covers login).
    pub async fn user(&self, name: &str) -> anyhow::Result<TestUser> {
        let email = format!("{name}@example.com");
        let created = self
            .admin
            .client
            .create_user(&CreateUserRequest {
                email: email.clone(),
                name: name.into(),
                password: PASSWORD.into(),
                is_admin: false,
            })
            .await?;
        let (token, _) = self.services.sessions.issue(created.user.id)?;
        Ok(TestUser {
            id: created.user.id,
            email,
            team: created.team.id,
            client: self.anonymous().with_token(token.clone()),
            token,
            base: self.url.clone(),
        })
    }

    /// Calls routes the typed client does not cover, with the first-run API key.
    pub fn key_api(&self) -> api::Api {
        api::Api::new(&self.url, vec![("x-api-key", self.api_key.clone())])
    }

    /// Registers another simulated host, online, with its templates recorded.
    pub async fn add_agent(&self, name: &str, cfg: SimAgentConfig) -> anyhow::Result<SimAgent> {
        let agent = SimAgent::start(cfg).await?;
        let host = self.services.create_host_unchecked(name).await?;
        let creds = agent.register(&self.url, &host.registration_token).await?;
        agent.heartbeat().await?;
        self.services
            .sync_host_templates(creds.host_id, &agent.address())
            .await?;
        Ok(agent)
    }

    /// A default sandbox of the first-run team, created with its API key.
    pub async fn sandbox(&self) -> Result<Sandbox, ClientError> {
        self.key
            .create_sandbox(&CreateSandboxRequest::default())
            .await
    }

    /// One pass of the host monitor.
    pub async fn monitor_pass(&self) -> anyhow::Result<()> {
        nestbox_control::monitor::pass(&self.services)
            .await
            .map_err(|e| anyhow::anyhow!("monitor pass failed: {e}"))
    }

    /// One pass of the expiry task (ends sandboxes whose lifetime is over).
    pub async fn expiry_pass(&self) -> anyhow::Result<usize> {
        nestbox_control::expiry::pass(&self.services, &mut Default::default())
            .await
            .map_err(|e| anyhow::anyhow!("expiry pass failed: {e}"))
    }

    /// Stops the control plane and the agent.
    pub async fn shutdown(mut self) {
        if let Some(cp) = self.cp.take() {
            cp.shutdown().await;
        }
        self.agent.shutdown().await;
    }
}

/// Asserts that `result` is an API error with `status` and `code`; returns its body.
#[track_caller]
pub fn api_error<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
    status: u16,
    code: ErrorCode,
) -> ErrorBody {
    match result {
        Err(ClientError::Api { status: got, body }) => {
            assert_eq!(
                (got.as_u16(), body.error.code),
                (status, code),
                "expected {status} {code}, got {got} with {body:?}"
            );
            body
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// Reads a raw response that must be our error shape with `status` and `code`.
pub async fn raw_error(
    resp: reqwest::Response,
    status: u16,
    code: ErrorCode,
) -> anyhow::Result<ErrorBody> {
    let got = resp.status().as_u16();
    let text = resp.text().await?;
    let body: ErrorBody = serde_json::from_str(&text)
        .with_context(|| format!("HTTP {got} with a body that is not our error shape: {text}"))?;
    anyhow::ensure!(
        (got, body.error.code) == (status, code),
        "expected {status} {code}, got {got} {text}"
    );
    Ok(body)
}

/// Waits until a held agent call has arrived (the control plane made it and waits for it).
pub async fn arrived(hold: &SimHold) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT, hold.arrived())
        .await
        .context("the held call never reached the agent")
}

/// Polls `check` until it says yes; fails after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// An E2B call with the first-run key: status, headers and JSON body (`Null` if empty).
pub async fn e2b(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, serde_json::Value)> {
    e2b_as(h, &h.api_key, method, path, body).await
}

pub async fn e2b_as(
    h: &Harness,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, reqwest::header::HeaderMap, serde_json::Value)> {
    let (http, url) = h.raw(path);
    let mut rb = http.request(method, url).header("X-API-KEY", key);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, headers, value))
}
