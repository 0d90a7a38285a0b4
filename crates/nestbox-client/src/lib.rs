//! A typed client of Nestbox's REST API (`/v1`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nestbox_client::ClientError> {
//! use nestbox_client::Client;
//! use nestbox_types::api::{CreateSandboxRequest, ExecRequest};
//!
//! let client = Client::new("http://127.0.0.1:7700")?.with_api_key("nbx_…");
//! let sandbox = client.create_sandbox(&CreateSandboxRequest::default()).await?;
//! let out = client
//!     .exec(sandbox.id, &ExecRequest { command: Some("uname -a".into()), ..Default::default() })
//!     .await?;
//! println!("{}", out.stdout);
//! client.destroy_sandbox(sandbox.id).await?;
//! # Ok(()) }
//! ```
//!
//! Every failed call returns [`ClientError::Api`] with the server's stable error code when
//! the server answered, so callers branch on [`ErrorCode`] values.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use nestbox_types::api::*;
use nestbox_types::{ApiKeyId, BuildId, ErrorBody, ErrorCode, HostId, SandboxId, TeamId, UserId};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod processes;
pub use processes::{Terminal, TerminalFrame, TerminalReader, TerminalWriter};

/// Header selecting the team a user's request acts for.
pub const TEAM_HEADER: &str = "x-nestbox-team";

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{status}: {} ({})", body.error.message, body.error.code)]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: ErrorBody,
    },
    /// The request did not complete.
    #[error("request to {url} failed")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The base URL is not usable.
    #[error("invalid server URL `{0}`")]
    BadUrl(String),
    /// The response was not what the API promises.
    #[error("unexpected response from {url}: {detail}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.error.code),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Credentials {
    None,
    ApiKey(String),
    Bearer(String),
}

/// A client of one Nestbox server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    credentials: Credentials,
    team: Option<TeamId>,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:7700`).
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let base = base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl(base_url.to_string()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .map_err(|source| ClientError::Transport {
                url: base.clone(),
                source,
            })?;
        Ok(Self {
            base,
            http,
            credentials: Credentials::None,
            team: None,
        })
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Authenticates with a team API key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.credentials = Credentials::ApiKey(key.into());
        self
    }

    /// Authenticates with a user session token (from [`Client::login`]).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.credentials = Credentials::Bearer(token.into());
        self
    }

    /// Makes a user's requests act for `team` instead of their default team.
    pub fn with_team(mut self, team: TeamId) -> Self {
        self.team = Some(team);
        self
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut rb = self.http.request(method, self.url(path));
        rb = match &self.credentials {
            Credentials::None => rb,
            Credentials::ApiKey(k) => rb.header("x-api-key", k),
            Credentials::Bearer(t) => rb.bearer_auth(t),
        };
        if let Some(team) = self.team {
            rb = rb.header(TEAM_HEADER, team.to_string());
        }
        rb
    }

    async fn send(&self, rb: RequestBuilder, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                        .chars()
                        .take(300)
                        .collect::<String>()
                ),
            )
        });
        Err(ClientError::Api { status, body })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: RequestBuilder,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(rb, path).await?;
        let url = self.url(path);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url,
            detail: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.json(self.request(Method::GET, path), path).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::POST, path).json(body), path)
            .await
    }

    async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::PUT, path).json(body), path)
            .await
    }

    async fn patch<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.json(self.request(Method::PATCH, path).json(body), path)
            .await
    }

    async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, path), path)
            .await
            .map(|_| ())
    }

    // ------------------------------------------------------------- health and auth

    /// `GET /health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/health").await
    }

    /// Logs in; use the token with [`Client::with_token`].
    pub async fn login(&self, email: &str, password: &str) -> Result<LoginResponse, ClientError> {
        self.post(
            "/v1/auth/login",
            &LoginRequest {
                email: email.into(),
                password: password.into(),
            },
        )
        .await
    }

    /// The caller and their teams.
    pub async fn me(&self) -> Result<Me, ClientError> {
        self.get("/v1/me").await
    }

    // ----------------------------------------------------------------------- teams

    /// Teams of the calling user.
    pub async fn list_teams(&self) -> Result<Vec<TeamMembership>, ClientError> {
        self.get::<Page<TeamMembership>>("/v1/teams")
            .await
            .map(|p| p.items)
    }

    /// Creates a team owned by the caller.
    pub async fn create_team(&self, name: &str) -> Result<Team, ClientError> {
        self.post("/v1/teams", &TeamRequest { name: name.into() })
            .await
    }

    /// One team.
    pub async fn get_team(&self, team: TeamId) -> Result<Team, ClientError> {
        self.get(&format!("/v1/teams/{team}")).await
    }

    /// A team's quotas and usage.
    pub async fn team_quotas(&self, team: TeamId) -> Result<TeamQuotas, ClientError> {
        self.get(&format!("/v1/teams/{team}/quotas")).await
    }

    /// Sets a team's quotas, all at once (platform admins).
    pub async fn set_team_quotas(
        &self,
        team: TeamId,
        limits: &TeamQuotaLimits,
    ) -> Result<TeamQuotas, ClientError> {
        self.put(&format!("/v1/admin/teams/{team}/quotas"), limits)
            .await
    }

    /// Renames a team.
    pub async fn rename_team(&self, team: TeamId, name: &str) -> Result<Team, ClientError> {
        self.patch(
            &format!("/v1/teams/{team}"),
            &TeamRequest { name: name.into() },
        )
        .await
    }

    /// Deletes a team (owner only).
    pub async fn delete_team(&self, team: TeamId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/teams/{team}")).await
    }

    /// Members of a team.
    pub async fn list_members(&self, team: TeamId) -> Result<Vec<Member>, ClientError> {
        self.get::<Page<Member>>(&format!("/v1/teams/{team}/members"))
            .await
            .map(|p| p.items)
    }

    /// Adds an existing user to a team.
    pub async fn add_member(
        &self,
        team: TeamId,
        req: &AddMemberRequest,
    ) -> Result<Member, ClientError> {
        self.post(&format!("/v1/teams/{team}/members"), req).await
    }

    /// Changes a member's role.
    pub async fn update_member(
        &self,
        team: TeamId,
        user: UserId,
        role: nestbox_types::TeamRole,
    ) -> Result<Member, ClientError> {
        self.patch(
            &format!("/v1/teams/{team}/members/{user}"),
            &UpdateMemberRequest { role },
        )
        .await
    }

    /// Removes a member.
    pub async fn remove_member(&self, team: TeamId, user: UserId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/teams/{team}/members/{user}"))
            .await
    }

    /// API keys of a team.
    pub async fn list_api_keys(&self, team: TeamId) -> Result<Vec<ApiKey>, ClientError> {
        self.get::<Page<ApiKey>>(&format!("/v1/teams/{team}/api-keys"))
            .await
            .map(|p| p.items)
    }

    /// Creates an API key; the secret is in the response only.
    pub async fn create_api_key(
        &self,
        team: TeamId,
        name: &str,
    ) -> Result<CreatedApiKey, ClientError> {
        self.post(
            &format!("/v1/teams/{team}/api-keys"),
            &CreateApiKeyRequest { name: name.into() },
        )
        .await
    }

    /// Revokes an API key.
    pub async fn delete_api_key(&self, team: TeamId, key: ApiKeyId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/teams/{team}/api-keys/{key}"))
            .await
    }

    // ----------------------------------------------------------------------- admin

    /// Creates a user and their personal team (platform admins).
    pub async fn create_user(&self, req: &CreateUserRequest) -> Result<CreatedUser, ClientError> {
        self.post("/v1/admin/users", req).await
    }

    /// All users (platform admins).
    pub async fn list_users(&self) -> Result<Page<User>, ClientError> {
        self.get("/v1/admin/users").await
    }

    /// Creates a platform host and its registration token (platform admins).
    pub async fn create_host(&self, name: &str) -> Result<CreatedHost, ClientError> {
        let req = CreateHostRequest {
            name: name.into(),
            team_id: None,
        };
        self.post("/v1/admin/hosts", &req).await
    }

    /// Creates a host of a BYOC team and its registration token (platform admins).
    pub async fn create_byoc_host(
        &self,
        team: TeamId,
        name: &str,
    ) -> Result<CreatedHost, ClientError> {
        let req = CreateHostRequest {
            name: name.into(),
            team_id: Some(team),
        };
        self.post("/v1/admin/hosts", &req).await
    }

    /// Every team with its BYOC flag and counts (platform admins).
    pub async fn list_all_teams(&self) -> Result<Page<AdminTeam>, ClientError> {
        self.get("/v1/admin/teams").await
    }

    /// Lets a team bring its own hosts, or stops it (platform admins).
    pub async fn set_team_byoc(&self, team: TeamId, enabled: bool) -> Result<Team, ClientError> {
        self.put(
            &format!("/v1/admin/teams/{team}/byoc"),
            &SetByocRequest { enabled },
        )
        .await
    }

    /// Registers a host of the caller's BYOC team: its one-time token (owners and admins).
    pub async fn create_team_host(
        &self,
        team: TeamId,
        name: &str,
    ) -> Result<CreatedHost, ClientError> {
        let req = CreateHostRequest {
            name: name.into(),
            team_id: None,
        };
        self.post(&format!("/v1/teams/{team}/hosts"), &req).await
    }

    /// A BYOC team's hosts (owners and admins).
    pub async fn list_team_hosts(&self, team: TeamId) -> Result<Page<Host>, ClientError> {
        self.get(&format!("/v1/teams/{team}/hosts")).await
    }

    /// Deletes a host of a BYOC team that holds no sandboxes (owners and admins).
    pub async fn delete_team_host(&self, team: TeamId, host: HostId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/teams/{team}/hosts/{host}")).await
    }

    /// Deletes a host of a BYOC team, destroying its sandboxes first (owners and admins).
    pub async fn force_delete_team_host(
        &self,
        team: TeamId,
        host: HostId,
    ) -> Result<(), ClientError> {
        self.delete(&format!("/v1/teams/{team}/hosts/{host}?force=true"))
            .await
    }

    /// All hosts (platform admins).
    pub async fn list_hosts(&self) -> Result<Page<Host>, ClientError> {
        self.get("/v1/admin/hosts").await
    }

    /// Cordons a host (no new sandboxes) and starts moving what `moves` names to other
    /// hosts of its pool, or lets it take sandboxes again (platform admins).
    pub async fn drain_host(
        &self,
        host: HostId,
        draining: bool,
        moves: DrainMoves,
    ) -> Result<HostDrain, ClientError> {
        self.put(
            &format!("/v1/admin/hosts/{host}/drain"),
            &DrainHostRequest {
                draining,
                moves: Some(moves),
            },
        )
        .await
    }

    /// Moves a running or paused sandbox to another host of its pool (`to`, or the one the
    /// scheduler picks); answers once it has arrived (platform admins).
    pub async fn move_sandbox(
        &self,
        id: SandboxId,
        to: Option<HostId>,
    ) -> Result<Sandbox, ClientError> {
        self.post(
            &format!("/v1/admin/sandboxes/{id}/move"),
            &MoveSandboxRequest { host_id: to },
        )
        .await
    }

    /// Deletes a host without sandboxes (platform admins).
    pub async fn delete_host(&self, host: HostId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/admin/hosts/{host}")).await
    }

    /// Deletes a host, destroying the sandboxes it holds first (platform admins).
    pub async fn force_delete_host(&self, host: HostId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/admin/hosts/{host}?force=true"))
            .await
    }

    // ------------------------------------------------------------------- templates

    /// Templates visible to the team.
    pub async fn list_templates(&self) -> Result<Vec<Template>, ClientError> {
        self.get::<Page<Template>>("/v1/templates")
            .await
            .map(|p| p.items)
    }

    // ------------------------------------------------------------------- sandboxes

    /// Creates a sandbox and returns once it runs.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<Sandbox, ClientError> {
        self.post("/v1/sandboxes", req).await
    }

    /// One sandbox.
    pub async fn get_sandbox(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.get(&format!("/v1/sandboxes/{id}")).await
    }

    /// A page of the team's sandboxes.
    pub async fn list_sandboxes(
        &self,
        query: &SandboxListQuery,
    ) -> Result<Page<Sandbox>, ClientError> {
        let path = "/v1/sandboxes";
        self.json(self.request(Method::GET, path).query(query), path)
            .await
    }

    /// Destroys a sandbox.
    pub async fn destroy_sandbox(&self, id: SandboxId) -> Result<(), ClientError> {
        self.delete(&format!("/v1/sandboxes/{id}")).await
    }

    /// `POST /v1/sandboxes/{id}/rotate-tokens`: new guest and traffic tokens; the old ones
    /// stop working.
    pub async fn rotate_tokens(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.post(
            &format!("/v1/sandboxes/{id}/rotate-tokens"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Pauses a running sandbox: its memory, processes and disk are saved.
    pub async fn pause_sandbox(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.post(&format!("/v1/sandboxes/{id}/pause"), &serde_json::json!({}))
            .await
    }

    /// Resumes a paused sandbox where it was.
    pub async fn resume_sandbox(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.post(
            &format!("/v1/sandboxes/{id}/resume"),
            &serde_json::json!({}),
        )
        .await
    }

    /// Makes `count` running copies of a running sandbox.
    pub async fn fork_sandbox(
        &self,
        id: SandboxId,
        count: u32,
    ) -> Result<nestbox_types::api::ForkResult, ClientError> {
        self.post(
            &format!("/v1/sandboxes/{id}/fork"),
            &serde_json::json!({ "count": count }),
        )
        .await
    }

    /// Gives a running sandbox a new deadline `lifetime_sec` from now (only a later one
    /// with `extend_only`).
    pub async fn set_lifetime(
        &self,
        id: SandboxId,
        lifetime_sec: u32,
        extend_only: bool,
    ) -> Result<Sandbox, ClientError> {
        self.post(
            &format!("/v1/sandboxes/{id}/lifetime"),
            &serde_json::json!({ "lifetime_sec": lifetime_sec, "extend_only": extend_only }),
        )
        .await
    }

    /// Replaces a running or paused sandbox's egress rules.
    pub async fn set_egress(
        &self,
        id: SandboxId,
        rules: &nestbox_types::api::EgressRequest,
    ) -> Result<Sandbox, ClientError> {
        self.put(&format!("/v1/sandboxes/{id}/egress"), rules).await
    }

    /// Resets a sandbox's inactivity timer.
    pub async fn ping_sandbox(&self, id: SandboxId) -> Result<(), ClientError> {
        let path = format!("/v1/sandboxes/{id}/ping");
        self.send(self.request(Method::POST, &path), &path)
            .await
            .map(|_| ())
    }

    /// Turns a running or paused sandbox into a team template.
    pub async fn create_snapshot(
        &self,
        req: &CreateSnapshotRequest,
    ) -> Result<Template, ClientError> {
        self.post("/v1/snapshots", req).await
    }

    /// The team's templates and the platform's.
    pub async fn list_snapshots(&self) -> Result<Vec<Template>, ClientError> {
        self.get::<Page<Template>>("/v1/snapshots")
            .await
            .map(|p| p.items)
    }

    /// Deletes a team template (platform templates: platform admins only).
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/snapshots/{name}")).await
    }

    /// A template name's tags, `default` (the template `name` itself) first.
    pub async fn template_tags(&self, name: &str) -> Result<Vec<TemplateTag>, ClientError> {
        self.get(&format!("/v1/snapshots/{name}/tags")).await
    }

    /// Points `tags` of the team's template `name` at the build its tag `from` points at
    /// (`None`: `default`); returns the name's tags afterwards.
    pub async fn assign_template_tags(
        &self,
        name: &str,
        from: Option<&str>,
        tags: &[&str],
    ) -> Result<Vec<TemplateTag>, ClientError> {
        let req = AssignTagsRequest {
            from: from.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        self.post(&format!("/v1/snapshots/{name}/tags"), &req).await
    }

    /// Takes `tag` off the team's template `name`.
    pub async fn remove_template_tag(&self, name: &str, tag: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/snapshots/{name}/tags/{tag}"))
            .await
    }

    // ----------------------------------------------------------------- template builds

    /// Starts a template build; it runs in the background (follow it with
    /// [`Client::build_logs`]).
    pub async fn create_build(&self, req: &CreateBuildRequest) -> Result<Build, ClientError> {
        self.post("/v1/templates/builds", req).await
    }

    /// The team's builds, newest first.
    pub async fn list_builds(&self) -> Result<Vec<Build>, ClientError> {
        self.get::<Page<Build>>("/v1/templates/builds")
            .await
            .map(|p| p.items)
    }

    /// A build.
    pub async fn get_build(&self, id: BuildId) -> Result<Build, ClientError> {
        self.get(&format!("/v1/templates/builds/{id}")).await
    }

    /// A page of a build's log from `offset`.
    pub async fn build_logs(&self, id: BuildId, offset: u64) -> Result<BuildLogs, ClientError> {
        let path = format!("/v1/templates/builds/{id}/logs");
        let q = BuildLogsQuery {
            offset,
            limit: None,
        };
        self.json(self.request(Method::GET, &path).query(&q), &path)
            .await
    }

    /// Cancels a running build.
    pub async fn cancel_build(&self, id: BuildId) -> Result<Build, ClientError> {
        self.post(&format!("/v1/templates/builds/{id}/cancel"), &())
            .await
    }

    /// Whether the team has uploaded the archive with this SHA-256.
    pub async fn has_build_file(&self, hash: &str) -> Result<bool, ClientError> {
        match self
            .get::<BuildFile>(&format!("/v1/templates/builds/files/{hash}"))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads an archive for copy steps under its SHA-256.
    pub async fn put_build_file(
        &self,
        hash: &str,
        data: Vec<u8>,
    ) -> Result<BuildFile, ClientError> {
        let path = format!("/v1/templates/builds/files/{hash}");
        self.json(
            self.request(Method::PUT, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(data),
            &path,
        )
        .await
    }

    /// Every team's templates (platform admins).
    pub async fn admin_templates(&self) -> Result<Vec<Template>, ClientError> {
        self.get::<Page<Template>>("/v1/admin/templates")
            .await
            .map(|p| p.items)
    }

    /// Runs a command and returns its collected output.
    pub async fn exec(&self, id: SandboxId, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.post(&format!("/v1/sandboxes/{id}/exec"), req).await
    }

    /// Runs a command and streams its events as they happen.
    pub async fn exec_stream(
        &self,
        id: SandboxId,
        req: &ExecRequest,
    ) -> Result<impl Stream<Item = Result<ExecEvent, ClientError>> + use<>, ClientError> {
        let path = format!("/v1/sandboxes/{id}/exec/stream");
        let resp = self
            .send(
                self.request(Method::POST, &path)
                    .header("accept", "text/event-stream")
                    .json(req),
                &path,
            )
            .await?;
        let url = self.url(&path);
        let bytes = resp
            .bytes_stream()
            .map_err(move |source| ClientError::Transport {
                url: url.clone(),
                source,
            });
        Ok(sse_events(bytes, self.url(&path)))
    }

    /// Lists a directory.
    pub async fn list_files(
        &self,
        id: SandboxId,
        path: &str,
        depth: Option<u32>,
    ) -> Result<Vec<EntryInfo>, ClientError> {
        let p = format!("/v1/sandboxes/{id}/files");
        let q = PathQuery {
            path: path.into(),
            user: None,
            depth,
        };
        self.json::<FileList>(self.request(Method::GET, &p).query(&q), &p)
            .await
            .map(|l| l.items)
    }

    /// Describes one path.
    pub async fn stat(&self, id: SandboxId, path: &str) -> Result<EntryInfo, ClientError> {
        let p = format!("/v1/sandboxes/{id}/files/stat");
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        self.json(self.request(Method::GET, &p).query(&q), &p).await
    }

    /// Creates a directory and its parents.
    pub async fn mkdir(&self, id: SandboxId, path: &str) -> Result<EntryInfo, ClientError> {
        self.post(
            &format!("/v1/sandboxes/{id}/files/mkdir"),
            &MkdirRequest {
                path: path.into(),
                user: None,
            },
        )
        .await
    }

    /// Removes a file or a directory tree.
    pub async fn remove(&self, id: SandboxId, path: &str) -> Result<(), ClientError> {
        let p = format!("/v1/sandboxes/{id}/files");
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        self.send(self.request(Method::DELETE, &p).query(&q), &p)
            .await
            .map(|_| ())
    }

    /// Uploads `body` to `path`, streaming.
    pub async fn upload(
        &self,
        id: SandboxId,
        path: &str,
        body: reqwest::Body,
        size: Option<u64>,
    ) -> Result<EntryInfo, ClientError> {
        let p = format!("/v1/sandboxes/{id}/files/content");
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        let mut rb = self
            .request(Method::PUT, &p)
            .query(&q)
            .header("content-type", "application/octet-stream");
        if let Some(size) = size {
            rb = rb.header("content-length", size);
        }
        self.json(rb.body(body), &p).await
    }

    /// Downloads `path` as a stream of chunks, with its size when known.
    pub async fn download(
        &self,
        id: SandboxId,
        path: &str,
    ) -> Result<
        (
            Option<u64>,
            impl Stream<Item = Result<Bytes, ClientError>> + use<>,
        ),
        ClientError,
    > {
        let p = format!("/v1/sandboxes/{id}/files/content");
        let q = PathQuery {
            path: path.into(),
            ..Default::default()
        };
        let resp = self
            .send(self.request(Method::GET, &p).query(&q), &p)
            .await?;
        let size = resp.content_length();
        let url = self.url(&p);
        Ok((
            size,
            resp.bytes_stream()
                .map_err(move |source| ClientError::Transport {
                    url: url.clone(),
                    source,
                }),
        ))
    }

    /// Audit log of the team.
    pub async fn audit_logs(&self, query: &PageQuery) -> Result<Page<AuditLog>, ClientError> {
        let path = "/v1/audit-logs";
        self.json(self.request(Method::GET, path).query(query), path)
            .await
    }

    /// Audit log, filtered (`resource_type`, `action`) and scoped (`team` or `platform`).
    pub async fn audit_logs_filtered(
        &self,
        query: &AuditLogQuery,
    ) -> Result<Page<AuditLog>, ClientError> {
        let path = "/v1/audit-logs";
        self.json(self.request(Method::GET, path).query(query), path)
            .await
    }

    /// A sandbox's metrics over `range` (`10m`, `2h` or `24h`; the server's default, `10m`,
    /// when `None`).
    pub async fn sandbox_metrics(
        &self,
        id: SandboxId,
        range: Option<&str>,
    ) -> Result<SandboxMetrics, ClientError> {
        let path = format!("/v1/sandboxes/{id}/metrics");
        let query = MetricsQuery {
            range: range.map(String::from),
        };
        self.json(self.request(Method::GET, &path).query(&query), &path)
            .await
    }

    /// A page of a sandbox's log.
    pub async fn sandbox_logs(
        &self,
        id: SandboxId,
        query: &LogsQuery,
    ) -> Result<SandboxLogs, ClientError> {
        let path = format!("/v1/sandboxes/{id}/logs");
        self.json(self.request(Method::GET, &path).query(query), &path)
            .await
    }
}

/// Parses a server-sent event stream whose `data:` lines are JSON [`ExecEvent`]s.
fn sse_events<T: DeserializeOwned>(
    bytes: impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static,
    url: String,
) -> impl Stream<Item = Result<T, ClientError>> {
    futures::stream::unfold(
        (Box::pin(bytes), Vec::<u8>::new(), false),
        move |(mut bytes, mut buf, done)| {
            let url = url.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    // An event ends at a blank line.
                    if let Some(pos) = find_event_end(&buf) {
                        let raw: Vec<u8> = buf.drain(..pos).collect();
                        let data: String = String::from_utf8_lossy(&raw)
                            .lines()
                            .filter_map(|l| l.strip_prefix("data:"))
                            .map(|d| d.trim_start())
                            .collect::<Vec<_>>()
                            .join("\n");
                        if data.is_empty() {
                            continue;
                        }
                        let item =
                            serde_json::from_str::<T>(&data).map_err(|e| ClientError::Protocol {
                                url: url.clone(),
                                detail: e.to_string(),
                            });
                        return Some((item, (bytes, buf, false)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => return Some((Err(e), (bytes, buf, true))),
                        None => return None,
                    }
                }
            }
        },
    )
}

/// Index just past the blank line ending the first complete event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let text = buf;
    for i in 0..text.len() {
        if text[i..].starts_with(b"\n\n") {
            return Some(i + 2);
        }
        if text[i..].starts_with(b"\r\n\r\n") {
            return Some(i + 4);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_sse_stream_split_anywhere() {
        let text = "event: started\ndata: {\"type\":\"started\",\"pid\":7}\n\n: keepalive\n\nevent: exit\ndata: {\"type\":\"exit\",\"exit_code\":0,\"duration_ms\":3,\"timed_out\":false}\n\n";
        for split in [1usize, 5, 17, 64] {
            let chunks: Vec<Result<Bytes, ClientError>> = text
                .as_bytes()
                .chunks(split)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            let events: Vec<ExecEvent> = sse_events(futures::stream::iter(chunks), "u".into())
                .map(|e| e.unwrap())
                .collect()
                .await;
            assert_eq!(
                events,
                vec![
                    ExecEvent::Started { pid: 7 },
                    ExecEvent::Exit {
                        exit_code: 0,
                        duration_ms: 3,
                        timed_out: false
                    }
                ]
            );
        }
    }

    #[test]
    fn rejects_bad_url() {
        assert!(matches!(
            Client::new("localhost:1"),
            Err(ClientError::BadUrl(_))
        ));
    }
}
