//! Authorization: who may call what.
//!
//! [`MATRIX`] has one row per operation of the OpenAPI document and, for each kind of
//! caller, the expected answer: a success (`OK`, any 2xx) or an exact error status.
//! `every_documented_operation_is_in_the_matrix` fails for an operation missing from the
//! matrix, so a new endpoint cannot ship without deciding who may call it.
//!
//! The world: team A (an owner, an admin, a member, an API key, a running sandbox with
//! files), team B (another user and their API key), and the platform admin (who belongs to
//! neither). Another team never sees team A's resources (404); anonymous callers get 401;
//! insufficient roles, API keys on user-only routes and non-admins on admin routes get 403.
//! Destructive operations, and those that change a state (pause, resume), get a fresh
//! target for every caller.

// Tests may panic on what they expect (see clippy.toml); helpers here are not `#[test]`s.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::fmt;

use common::{Engine, Harness, TestUser, both_engines, raw_error};
use nestbox_client::Client;
use nestbox_db::teams;
use nestbox_testkit::{SimAgent, SimAgentConfig};
use nestbox_types::api::{AddMemberRequest, CreateSandboxRequest, HeartbeatRequest, Sandbox};
use nestbox_types::{ErrorCode, HostId, TeamId, TeamRole};
use reqwest::Method;
use serde_json::json;

both_engines!(
    authorization_matrix,
    other_teams_see_nothing_of_a_team,
    host_routes_need_their_own_host_token,
);

/// The kinds of caller, in the matrix's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    /// Team B's API key.
    OtherKey,
    /// Team B's owner.
    OtherUser,
    /// Team A's API key.
    Key,
    /// A member of team A.
    Member,
    /// An admin of team A.
    Admin,
    /// The owner of team A.
    Owner,
    /// The platform admin (in neither team).
    PlatformAdmin,
}

const CALLERS: [Who; 8] = [
    Who::Anonymous,
    Who::OtherKey,
    Who::OtherUser,
    Who::Key,
    Who::Member,
    Who::Admin,
    Who::Owner,
    Who::PlatformAdmin,
];

/// What a caller gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Any 2xx.
    Ok,
    /// Exactly this status.
    Status(u16),
}

impl Expect {
    fn matches(self, status: u16) -> bool {
        match self {
            Expect::Ok => (200..300).contains(&status),
            Expect::Status(s) => s == status,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Ok => f.write_str("2xx"),
            Expect::Status(s) => write!(f, "{s}"),
        }
    }
}

const OK: Expect = Expect::Ok;
const UNAUTH: Expect = Expect::Status(401);
const FORBID: Expect = Expect::Status(403);
const HIDDEN: Expect = Expect::Status(404);

struct Row {
    method: &'static str,
    path: &'static str,
    /// In [`CALLERS`] order: anonymous, other key, other user, key, member, admin, owner,
    /// platform admin.
    expect: [Expect; 8],
}

const fn row(method: &'static str, path: &'static str, expect: [Expect; 8]) -> Row {
    Row {
        method,
        path,
        expect,
    }
}

/// Public: everyone.
const PUBLIC: [Expect; 8] = [OK; 8];
/// Any authenticated caller, acting for their own team.
const ANY_CALLER: [Expect; 8] = [UNAUTH, OK, OK, OK, OK, OK, OK, OK];
/// Any user, for themselves (an API key lacks the session these need: `401`).
const ANY_USER: [Expect; 8] = [UNAUTH, UNAUTH, OK, UNAUTH, OK, OK, OK, OK];
/// Users who are members of team A.
const TEAM_USERS: [Expect; 8] = [UNAUTH, UNAUTH, HIDDEN, UNAUTH, OK, OK, OK, HIDDEN];
/// Owners and admins of team A.
const TEAM_MANAGERS: [Expect; 8] = [UNAUTH, UNAUTH, HIDDEN, UNAUTH, FORBID, OK, OK, HIDDEN];
/// The owner of team A.
const TEAM_OWNER: [Expect; 8] = [UNAUTH, UNAUTH, HIDDEN, UNAUTH, FORBID, FORBID, OK, HIDDEN];
/// Team A's resources, for anyone acting for team A (users and its API key).
const TEAM_RESOURCE: [Expect; 8] = [UNAUTH, HIDDEN, HIDDEN, OK, OK, OK, OK, HIDDEN];
/// A team A resource over a WebSocket: a plain request from team A gets `400` (no upgrade)
/// only after the caller, the sandbox and the process were checked.
const TEAM_WEBSOCKET: [Expect; 8] = [
    UNAUTH,
    HIDDEN,
    HIDDEN,
    Expect::Status(400),
    Expect::Status(400),
    Expect::Status(400),
    Expect::Status(400),
    HIDDEN,
];
/// Platform admins.
const PLATFORM_ADMINS: [Expect; 8] = [UNAUTH, UNAUTH, FORBID, UNAUTH, FORBID, FORBID, FORBID, OK];
/// The hosts of a team that brings its own (team A is BYOC for these rows): its owners
/// and admins, and platform admins.
const BYOC_MANAGERS: [Expect; 8] = [UNAUTH, UNAUTH, HIDDEN, UNAUTH, FORBID, OK, OK, OK];
/// A browser's own session: only its cookie (none of these callers holds one; the cookie
/// rules are tested in `browser.rs`).
const COOKIE_ONLY: [Expect; 8] = [UNAUTH; 8];
/// An upload URL's own token only (none of these callers holds one).
const TOKEN_ONLY: [Expect; 8] = [UNAUTH; 8];
/// Host agents only (none of these callers holds a host credential).
const HOSTS_ONLY: [Expect; 8] = [UNAUTH; 8];
/// The audit log: owners and admins of the team they act for.
const AUDIT: [Expect; 8] = [UNAUTH, FORBID, OK, FORBID, FORBID, OK, OK, OK];

/// Every operation of the API and who may call it.
const MATRIX: &[Row] = &[
    row("GET", "/health", PUBLIC),
    row("GET", "/health/ready", PUBLIC),
    row("GET", "/metrics", PLATFORM_ADMINS),
    row("POST", "/v1/auth/login", PUBLIC),
    row("POST", "/v1/auth/session", PUBLIC),
    row("GET", "/v1/auth/session", COOKIE_ONLY),
    // Signing out without a session only clears the (absent) cookie.
    row("DELETE", "/v1/auth/session", PUBLIC),
    row("GET", "/v1/me", ANY_CALLER),
    row("GET", "/v1/teams", ANY_USER),
    row("POST", "/v1/teams", ANY_USER),
    row("GET", "/v1/teams/{team_id}", TEAM_USERS),
    row("PATCH", "/v1/teams/{team_id}", TEAM_MANAGERS),
    row("DELETE", "/v1/teams/{team_id}", TEAM_OWNER),
    row("GET", "/v1/teams/{team_id}/members", TEAM_USERS),
    row("POST", "/v1/teams/{team_id}/members", TEAM_MANAGERS),
    row(
        "PATCH",
        "/v1/teams/{team_id}/members/{user_id}",
        TEAM_MANAGERS,
    ),
    row(
        "DELETE",
        "/v1/teams/{team_id}/members/{user_id}",
        TEAM_MANAGERS,
    ),
    row("GET", "/v1/teams/{team_id}/api-keys", TEAM_USERS),
    row("POST", "/v1/teams/{team_id}/api-keys", TEAM_MANAGERS),
    row(
        "DELETE",
        "/v1/teams/{team_id}/api-keys/{key_id}",
        TEAM_MANAGERS,
    ),
    row("GET", "/v1/teams/{team_id}/quotas", TEAM_RESOURCE),
    row("GET", "/v1/admin/teams/{team_id}/quotas", PLATFORM_ADMINS),
    row("PUT", "/v1/admin/teams/{team_id}/quotas", PLATFORM_ADMINS),
    row("GET", "/v1/admin/teams", PLATFORM_ADMINS),
    row("PUT", "/v1/admin/teams/{team_id}/byoc", PLATFORM_ADMINS),
    row("GET", "/v1/teams/{team_id}/hosts", BYOC_MANAGERS),
    row("POST", "/v1/teams/{team_id}/hosts", BYOC_MANAGERS),
    row(
        "DELETE",
        "/v1/teams/{team_id}/hosts/{host_id}",
        BYOC_MANAGERS,
    ),
    row("GET", "/v1/admin/users", PLATFORM_ADMINS),
    row("POST", "/v1/admin/users", PLATFORM_ADMINS),
    row("PATCH", "/v1/admin/users/{user_id}", PLATFORM_ADMINS),
    row("GET", "/v1/admin/hosts", PLATFORM_ADMINS),
    row("POST", "/v1/admin/hosts", PLATFORM_ADMINS),
    row("DELETE", "/v1/admin/hosts/{host_id}", PLATFORM_ADMINS),
    row("PUT", "/v1/admin/hosts/{host_id}/drain", PLATFORM_ADMINS),
    row("POST", "/v1/hosts/register", HOSTS_ONLY),
    row("POST", "/v1/hosts/refresh", HOSTS_ONLY),
    row("POST", "/v1/hosts/{host_id}/heartbeat", HOSTS_ONLY),
    row("GET", "/v1/templates", ANY_CALLER),
    row("GET", "/v1/sandboxes", ANY_CALLER),
    row("POST", "/v1/sandboxes", ANY_CALLER),
    row("GET", "/v1/sandboxes/{sandbox_id}", TEAM_RESOURCE),
    row("DELETE", "/v1/sandboxes/{sandbox_id}", TEAM_RESOURCE),
    row("POST", "/v1/sandboxes/{sandbox_id}/pause", TEAM_RESOURCE),
    row("POST", "/v1/sandboxes/{sandbox_id}/resume", TEAM_RESOURCE),
    row("POST", "/v1/sandboxes/{sandbox_id}/ping", TEAM_RESOURCE),
    row("GET", "/v1/sandboxes/{sandbox_id}/metrics", TEAM_RESOURCE),
    row("GET", "/v1/sandboxes/{sandbox_id}/logs", TEAM_RESOURCE),
    row("GET", "/v1/snapshots", ANY_CALLER),
    row("POST", "/v1/snapshots", TEAM_RESOURCE),
    row("DELETE", "/v1/snapshots/{name}", TEAM_RESOURCE),
    row("GET", "/v1/snapshots/{name}/tags", TEAM_RESOURCE),
    row("POST", "/v1/snapshots/{name}/tags", TEAM_RESOURCE),
    row("DELETE", "/v1/snapshots/{name}/tags/{tag}", TEAM_RESOURCE),
    row("GET", "/v1/admin/templates", PLATFORM_ADMINS),
    row("POST", "/v1/templates/builds", ANY_CALLER),
    row("GET", "/v1/templates/builds", ANY_CALLER),
    row("GET", "/v1/templates/builds/{build_id}", TEAM_RESOURCE),
    row("GET", "/v1/templates/builds/{build_id}/logs", TEAM_RESOURCE),
    row(
        "POST",
        "/v1/templates/builds/{build_id}/cancel",
        TEAM_RESOURCE,
    ),
    // An upload lands in the caller's own team; another team never learns of it.
    row("PUT", "/v1/templates/builds/files/{hash}", ANY_CALLER),
    row("GET", "/v1/templates/builds/files/{hash}", TEAM_RESOURCE),
    row("POST", "/v1/sandboxes/{sandbox_id}/exec", TEAM_RESOURCE),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/exec/stream",
        TEAM_RESOURCE,
    ),
    row("GET", "/v1/sandboxes/{sandbox_id}/files", TEAM_RESOURCE),
    row("DELETE", "/v1/sandboxes/{sandbox_id}/files", TEAM_RESOURCE),
    row(
        "GET",
        "/v1/sandboxes/{sandbox_id}/files/stat",
        TEAM_RESOURCE,
    ),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/files/mkdir",
        TEAM_RESOURCE,
    ),
    row(
        "GET",
        "/v1/sandboxes/{sandbox_id}/files/content",
        TEAM_RESOURCE,
    ),
    row(
        "PUT",
        "/v1/sandboxes/{sandbox_id}/files/content",
        TEAM_RESOURCE,
    ),
    row("GET", "/v1/audit-logs", AUDIT),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/processes",
        TEAM_RESOURCE,
    ),
    row("GET", "/v1/sandboxes/{sandbox_id}/processes", TEAM_RESOURCE),
    row(
        "DELETE",
        "/v1/sandboxes/{sandbox_id}/processes/{process}",
        TEAM_RESOURCE,
    ),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/processes/{process}/signal",
        TEAM_RESOURCE,
    ),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/processes/{process}/stdin",
        TEAM_RESOURCE,
    ),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/processes/{process}/close-stdin",
        TEAM_RESOURCE,
    ),
    row(
        "GET",
        "/v1/sandboxes/{sandbox_id}/processes/{process}/output",
        TEAM_RESOURCE,
    ),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/terminals",
        TEAM_RESOURCE,
    ),
    row(
        "GET",
        "/v1/sandboxes/{sandbox_id}/terminals/{process}",
        TEAM_WEBSOCKET,
    ),
    row(
        "GET",
        "/v1/sandboxes/{sandbox_id}/files/watch",
        TEAM_RESOURCE,
    ),
    row("POST", "/v1/sandboxes/{sandbox_id}/lifetime", TEAM_RESOURCE),
    row("POST", "/v1/sandboxes/{sandbox_id}/fork", TEAM_RESOURCE),
    row("PUT", "/v1/sandboxes/{sandbox_id}/egress", TEAM_RESOURCE),
    row(
        "POST",
        "/v1/sandboxes/{sandbox_id}/rotate-tokens",
        TEAM_RESOURCE,
    ),
    row("PUT", "/sandboxes/{sandboxID}/network", TEAM_RESOURCE),
    // E2B's REST API: the same rules as /v1 (team resources are hidden from other teams).
    row("POST", "/sandboxes/{sandboxID}/fork", TEAM_RESOURCE),
    row("POST", "/sandboxes", ANY_CALLER),
    row("GET", "/sandboxes", ANY_CALLER),
    row("POST", "/v2/sandboxes", ANY_CALLER),
    row("GET", "/v2/sandboxes", ANY_CALLER),
    row("GET", "/sandboxes/{sandboxID}", TEAM_RESOURCE),
    row("DELETE", "/sandboxes/{sandboxID}", TEAM_RESOURCE),
    row("POST", "/sandboxes/{sandboxID}/timeout", TEAM_RESOURCE),
    row("POST", "/sandboxes/{sandboxID}/refreshes", TEAM_RESOURCE),
    row("POST", "/sandboxes/{sandboxID}/pause", TEAM_RESOURCE),
    row("POST", "/sandboxes/{sandboxID}/resume", TEAM_RESOURCE),
    row("POST", "/sandboxes/{sandboxID}/connect", TEAM_RESOURCE),
    row("POST", "/v2/sandboxes/{sandboxID}/connect", TEAM_RESOURCE),
    row("GET", "/sandboxes/{sandboxID}/metrics", TEAM_RESOURCE),
    row("GET", "/sandboxes/{sandboxID}/logs", TEAM_RESOURCE),
    row("GET", "/v2/sandboxes/{sandboxID}/logs", TEAM_RESOURCE),
    row("GET", "/sandboxes/metrics", ANY_CALLER),
    row("POST", "/sandboxes/{sandboxID}/snapshots", TEAM_RESOURCE),
    row("GET", "/snapshots", ANY_CALLER),
    row("GET", "/templates", ANY_CALLER),
    row("GET", "/templates/{templateID}", ANY_CALLER),
    row("DELETE", "/templates/{templateID}", TEAM_RESOURCE),
    row("GET", "/templates/aliases/{alias}", ANY_CALLER),
    row("POST", "/templates/tags", TEAM_RESOURCE),
    row("DELETE", "/templates/tags", TEAM_RESOURCE),
    row("GET", "/templates/{templateID}/tags", TEAM_RESOURCE),
    row("POST", "/v3/templates", ANY_CALLER),
    row("GET", "/templates/{templateID}/files/{hash}", ANY_CALLER),
    // Authorised by the token of the URL the lookup above gives, never by a key or a
    // session (a valid token: `e2b_builds.rs`).
    row("PUT", "/templates/{templateID}/files/{hash}", TOKEN_ONLY),
    row(
        "POST",
        "/v2/templates/{templateID}/builds/{buildID}",
        TEAM_RESOURCE,
    ),
    row(
        "GET",
        "/templates/{templateID}/builds/{buildID}/status",
        TEAM_RESOURCE,
    ),
    // Last: its call registers a second host, which then takes part in placement.
    row(
        "POST",
        "/v1/admin/sandboxes/{sandbox_id}/move",
        PLATFORM_ADMINS,
    ),
];

/// `(METHOD, path)` of every operation in the OpenAPI document.
fn documented_operations() -> Vec<(String, String)> {
    let doc = nestbox_control::api::openapi();
    let mut ops = Vec::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("POST", item.post.is_some()),
            ("PUT", item.put.is_some()),
            ("PATCH", item.patch.is_some()),
            ("DELETE", item.delete.is_some()),
            ("HEAD", item.head.is_some()),
            ("OPTIONS", item.options.is_some()),
            ("TRACE", item.trace.is_some()),
        ];
        for (method, present) in methods {
            if present {
                ops.push((method.to_string(), path.clone()));
            }
        }
    }
    ops
}

#[test]
fn every_documented_operation_is_in_the_matrix() {
    let documented = documented_operations();
    let in_matrix: Vec<(String, String)> = MATRIX
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    let missing: Vec<String> = documented
        .iter()
        .filter(|op| !in_matrix.contains(op))
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    let stale: Vec<String> = in_matrix
        .iter()
        .filter(|op| !documented.contains(op))
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(
        missing.is_empty(),
        "operations without a row in the authorization matrix (tests/authz.rs, MATRIX): decide \
         who may call them and add them: {missing:#?}"
    );
    assert!(
        stale.is_empty(),
        "matrix rows for operations the API no longer has: {stale:#?}"
    );
    let mut seen = std::collections::HashSet::new();
    for r in MATRIX {
        assert!(
            seen.insert((r.method, r.path)),
            "duplicate row {} {}",
            r.method,
            r.path
        );
    }
}

/// Everyone and everything the matrix needs.
struct World {
    h: Harness,
    team: TeamId,
    owner: TestUser,
    admin: TestUser,
    member: TestUser,
    spare: TestUser,
    other: TestUser,
    key: String,
    other_key: String,
    sandbox: Sandbox,
    /// A second host, for moves (registered at the first).
    second: tokio::sync::OnceCell<SimAgent>,
}

/// A request to send.
struct Call {
    path: String,
    body: Body,
}

enum Body {
    Empty,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

impl World {
    async fn new(engine: Engine) -> anyhow::Result<World> {
        // Room for every sandbox the matrix makes (creates and forks keep theirs).
        let h = Harness::with(
            engine,
            common::Options {
                agent: SimAgentConfig {
                    max_sandboxes: 256,
                    memory_mb: 256 * 1024,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
        let owner = h.user("owner").await?;
        let admin = h.user("teamadmin").await?;
        let member = h.user("member").await?;
        let spare = h.user("spare").await?;
        let other = h.user("other").await?;
        let team = owner.team;
        for (user, role) in [(&admin, TeamRole::Admin), (&member, TeamRole::Member)] {
            owner
                .client
                .add_member(
                    team,
                    &AddMemberRequest {
                        email: user.email.clone(),
                        role: Some(role),
                    },
                )
                .await?;
        }
        let key = owner.client.create_api_key(team, "team A").await?.key;
        let other_key = other.client.create_api_key(other.team, "team B").await?.key;
        let sandbox = h
            .anonymous()
            .with_api_key(&key)
            .create_sandbox(&CreateSandboxRequest::default())
            .await?;
        anyhow::ensure!(
            h.agent
                .put_file(sandbox.id, "/data/file.txt", b"team A's data")
        );
        Ok(World {
            h,
            team,
            owner,
            admin,
            member,
            spare,
            other,
            key,
            other_key,
            sandbox,
            second: tokio::sync::OnceCell::new(),
        })
    }

    fn key_client(&self) -> Client {
        self.h.anonymous().with_api_key(&self.key)
    }

    fn key_api(&self) -> common::api::Api {
        common::api::Api::new(&self.h.url, vec![("x-api-key", self.key.clone())])
    }

    /// A fresh running sandbox of team A.
    async fn fresh_sandbox(&self) -> anyhow::Result<Sandbox> {
        Ok(self
            .key_client()
            .create_sandbox(&CreateSandboxRequest::default())
            .await?)
    }

    /// Headers that authenticate `who` (users act for team A when they belong to it).
    fn credentials(&self, who: Who) -> anyhow::Result<Vec<(&'static str, String)>> {
        let session = |user: &TestUser| -> anyhow::Result<String> {
            Ok(format!(
                "Bearer {}",
                self.h.services.sessions.issue(user.id)?.0
            ))
        };
        let in_team = |user: &TestUser| -> anyhow::Result<Vec<(&'static str, String)>> {
            Ok(vec![
                ("authorization", session(user)?),
                ("x-nestbox-team", self.team.to_string()),
            ])
        };
        Ok(match who {
            Who::Anonymous => vec![],
            Who::OtherKey => vec![("x-api-key", self.other_key.clone())],
            Who::OtherUser => vec![("authorization", session(&self.other)?)],
            Who::Key => vec![("x-api-key", self.key.clone())],
            Who::Member => in_team(&self.member)?,
            Who::Admin => in_team(&self.admin)?,
            Who::Owner => in_team(&self.owner)?,
            Who::PlatformAdmin => vec![("authorization", session(&self.h.admin)?)],
        })
    }

    /// The concrete request of a matrix row, creating a fresh target where the call
    /// destroys it.
    async fn prepare(&self, method: &str, path: &str) -> anyhow::Result<Call> {
        let db = &self.h.services.db;
        let team = self.team;
        let sb = self.sandbox.id;
        let files = |rest: &str| format!("/v1/sandboxes/{sb}/files{rest}");
        let call = |path: String, body: Body| Call { path, body };
        // Team A brings its own hosts exactly for the routes of such hosts (BYOC would send
        // its sandboxes to hosts it does not have everywhere else).
        teams::set_byoc(db, team, path.starts_with("/v1/teams/{team_id}/hosts")).await?;
        Ok(match (method, path) {
            ("GET", "/health") | ("GET", "/health/ready") | ("GET", "/metrics") => {
                call(path.into(), Body::Empty)
            }
            // Each sign-in route with its own account (logins are limited per account).
            ("POST", "/v1/auth/session") => call(
                path.into(),
                Body::Json(json!({ "email": self.member.email, "password": common::PASSWORD })),
            ),
            ("POST", "/v1/auth/login") => call(
                path.into(),
                Body::Json(json!({ "email": self.spare.email, "password": common::PASSWORD })),
            ),
            ("POST", "/v1/teams") => call(path.into(), Body::Json(json!({ "name": "New" }))),
            ("PATCH", "/v1/teams/{team_id}") => call(
                format!("/v1/teams/{team}"),
                Body::Json(json!({ "name": "A" })),
            ),
            ("DELETE", "/v1/teams/{team_id}") => {
                let doomed = self.owner.client.create_team("doomed").await?.id;
                for user in [&self.admin, &self.member] {
                    let role = if user.id == self.admin.id {
                        TeamRole::Admin
                    } else {
                        TeamRole::Member
                    };
                    teams::add_member(db, doomed, user.id, role).await?;
                }
                call(format!("/v1/teams/{doomed}"), Body::Empty)
            }
            ("POST", "/v1/teams/{team_id}/members") => {
                teams::remove_member(db, team, self.spare.id).await?;
                call(
                    format!("/v1/teams/{team}/members"),
                    Body::Json(json!({ "email": self.spare.email })),
                )
            }
            ("PATCH", "/v1/teams/{team_id}/members/{user_id}") => call(
                format!("/v1/teams/{team}/members/{}", self.member.id),
                Body::Json(json!({ "role": "member" })),
            ),
            ("DELETE", "/v1/teams/{team_id}/members/{user_id}") => {
                if teams::membership(db, team, self.spare.id).await?.is_none() {
                    teams::add_member(db, team, self.spare.id, TeamRole::Member).await?;
                }
                call(
                    format!("/v1/teams/{team}/members/{}", self.spare.id),
                    Body::Empty,
                )
            }
            ("POST", "/v1/teams/{team_id}/api-keys") => call(
                format!("/v1/teams/{team}/api-keys"),
                Body::Json(json!({ "name": "more" })),
            ),
            ("DELETE", "/v1/teams/{team_id}/api-keys/{key_id}") => {
                let doomed = self
                    .h
                    .services
                    .create_api_key_unchecked(team, "doomed", None, None)
                    .await?;
                call(
                    format!("/v1/teams/{team}/api-keys/{}", doomed.api_key.id),
                    Body::Empty,
                )
            }
            ("GET", "/v1/teams/{team_id}/hosts") => {
                call(format!("/v1/teams/{team}/hosts"), Body::Empty)
            }
            ("POST", "/v1/teams/{team_id}/hosts") => call(
                format!("/v1/teams/{team}/hosts"),
                Body::Json(json!({ "name": "own host" })),
            ),
            ("DELETE", "/v1/teams/{team_id}/hosts/{host_id}") => {
                let doomed = self.h.admin.client.create_byoc_host(team, "doomed").await?;
                call(
                    format!("/v1/teams/{team}/hosts/{}", doomed.host.id),
                    Body::Empty,
                )
            }
            (_, p) if p.starts_with("/v1/teams/{team_id}") => {
                call(p.replace("{team_id}", &team.to_string()), Body::Empty)
            }
            ("GET", "/v1/admin/teams/{team_id}/quotas") => {
                call(format!("/v1/admin/teams/{team}/quotas"), Body::Empty)
            }
            ("PUT", "/v1/admin/teams/{team_id}/quotas") => call(
                format!("/v1/admin/teams/{team}/quotas"),
                Body::Json(json!({})),
            ),
            ("PATCH", "/v1/admin/users/{user_id}") => call(
                format!("/v1/admin/users/{}", self.spare.id),
                Body::Json(json!({ "active": true })),
            ),
            ("POST", "/v1/admin/users") => call(
                path.into(),
                Body::Json(json!({
                    "email": format!("{}@example.com", uuid::Uuid::new_v4()),
                    "name": "New", "password": common::PASSWORD,
                })),
            ),
            ("POST", "/v1/admin/hosts") => {
                call(path.into(), Body::Json(json!({ "name": "new host" })))
            }
            ("POST", "/v1/admin/sandboxes/{sandbox_id}/move") => {
                self.second
                    .get_or_try_init(|| self.h.add_agent("second", SimAgentConfig::default()))
                    .await?;
                let fresh = self.fresh_sandbox().await?;
                call(
                    format!("/v1/admin/sandboxes/{}/move", fresh.id),
                    Body::Json(json!({})),
                )
            }
            ("PUT", "/v1/admin/hosts/{host_id}/drain") => call(
                format!("/v1/admin/hosts/{}/drain", self.h.host_id),
                Body::Json(json!({ "draining": false })),
            ),
            ("DELETE", "/v1/admin/hosts/{host_id}") => {
                let doomed = self.h.services.create_host_unchecked("doomed").await?;
                call(format!("/v1/admin/hosts/{}", doomed.host.id), Body::Empty)
            }
            ("POST", "/v1/hosts/register") => call(
                path.into(),
                Body::Json(json!({
                    "token": "nbxreg_not-a-token", "address": "http://127.0.0.1:1",
                    "version": "1", "vcpus": 1, "memory_mb": 1024, "disk_mb": 1024,
                    "max_sandboxes": 1,
                })),
            ),
            ("GET", "/v1/admin/teams") => call(path.into(), Body::Empty),
            ("PUT", "/v1/admin/teams/{team_id}/byoc") => {
                let target = teams::create_with_owner(db, "byoc target", self.spare.id).await?;
                call(
                    format!("/v1/admin/teams/{}/byoc", target.id),
                    Body::Json(json!({ "enabled": true })),
                )
            }
            ("POST", "/v1/hosts/refresh") => call(
                path.into(),
                Body::Json(json!({ "refresh_token": "nbxhr_not-a-token" })),
            ),
            ("POST", "/v1/hosts/{host_id}/heartbeat") => call(
                format!("/v1/hosts/{}/heartbeat", self.h.host_id),
                Body::Json(serde_json::to_value(HeartbeatRequest {
                    sandboxes: 0,
                    version: "1".into(),
                    address: self.h.agent.address(),
                    ..Default::default()
                })?),
            ),
            ("POST", "/v1/sandboxes") => call(path.into(), Body::Json(json!({}))),
            ("POST", "/v1/templates/builds") => call(
                path.into(),
                Body::Json(json!({ "name": unique("built"), "recipe": { "steps": [] } })),
            ),
            ("GET", "/v1/templates/builds") => call(path.into(), Body::Empty),
            (_, p) if p.starts_with("/v1/templates/builds/{build_id}") => {
                // A fresh build of team A's for every caller (a cancel ends it).
                let build = nestbox_db::builds::create(
                    db,
                    &nestbox_db::builds::NewBuild {
                        team_id: team,
                        name: unique("build"),
                        recipe: Default::default(),
                        steps: Vec::new(),
                        created_by: "system".into(),
                        deadline: chrono::Utc::now() + chrono::Duration::hours(1),
                        tags: vec!["default".into()],
                    },
                )
                .await?;
                call(p.replace("{build_id}", &build.id.to_string()), Body::Empty)
            }
            ("PUT", "/v1/templates/builds/files/{hash}") => {
                let data = unique("archive").into_bytes();
                let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
                call(
                    format!("/v1/templates/builds/files/{hash}"),
                    Body::Bytes(data),
                )
            }
            ("GET", "/v1/templates/builds/files/{hash}") => {
                let data = unique("archive").into_bytes();
                let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
                nestbox_db::builds::put_file(db, team, &hash, data).await?;
                call(format!("/v1/templates/builds/files/{hash}"), Body::Empty)
            }
            ("DELETE", "/v1/sandboxes/{sandbox_id}") => {
                let doomed = self.fresh_sandbox().await?;
                call(format!("/v1/sandboxes/{}", doomed.id), Body::Empty)
            }
            ("POST", "/v1/sandboxes/{sandbox_id}/rotate-tokens") => {
                let running = self.fresh_sandbox().await?;
                call(
                    format!("/v1/sandboxes/{}/rotate-tokens", running.id),
                    Body::Empty,
                )
            }
            ("POST", "/v1/sandboxes/{sandbox_id}/pause") => {
                let running = self.fresh_sandbox().await?;
                call(format!("/v1/sandboxes/{}/pause", running.id), Body::Empty)
            }
            ("POST", "/v1/sandboxes/{sandbox_id}/resume") => {
                let paused = self.fresh_sandbox().await?;
                self.key_api().pause(paused.id).await?;
                call(format!("/v1/sandboxes/{}/resume", paused.id), Body::Empty)
            }
            ("POST", "/v1/snapshots") => call(
                path.into(),
                Body::Json(json!({ "sandbox_id": sb, "name": unique("snap") })),
            ),
            ("DELETE", "/v1/snapshots/{name}") => {
                let doomed = self
                    .key_api()
                    .snapshot(&common::api::snapshot(sb, &unique("doomed")))
                    .await?;
                call(format!("/v1/snapshots/{}", doomed.name), Body::Empty)
            }
            (m, p)
                if p.starts_with("/v1/snapshots/{name}/tags")
                    || p == "/templates/tags"
                    || p == "/templates/{templateID}/tags" =>
            {
                // A fresh template of team A's, tagged `old`, for every caller.
                let name = self
                    .key_api()
                    .snapshot(&common::api::snapshot(sb, &unique("tagged")))
                    .await?
                    .name;
                let t = nestbox_db::templates::get_visible(db, team, &name)
                    .await?
                    .expect("the snapshot just made");
                nestbox_db::tags::assign(db, team, &name, t.id, &["old".to_string()]).await?;
                let path = p
                    .replace("{name}", &name)
                    .replace("{templateID}", &name)
                    .replace("{tag}", "old");
                let body = match (m, p) {
                    ("POST", "/templates/tags") => {
                        Body::Json(json!({ "target": format!("{name}:old"), "tags": ["new"] }))
                    }
                    ("DELETE", "/templates/tags") => {
                        Body::Json(json!({ "name": name, "tags": ["old"] }))
                    }
                    ("POST", _) => Body::Json(json!({ "from": "old", "tags": ["new"] })),
                    _ => Body::Empty,
                };
                call(path, body)
            }
            ("POST", "/v1/sandboxes/{sandbox_id}/exec")
            | ("POST", "/v1/sandboxes/{sandbox_id}/exec/stream") => call(
                path.replace("{sandbox_id}", &sb.to_string()),
                Body::Json(json!({ "argv": ["true"] })),
            ),
            ("GET", "/v1/sandboxes/{sandbox_id}/files") => call(files("?path=/data"), Body::Empty),
            ("DELETE", "/v1/sandboxes/{sandbox_id}/files") => {
                anyhow::ensure!(self.h.agent.put_file(sb, "/data/victim.txt", b"x"));
                call(files("?path=/data/victim.txt"), Body::Empty)
            }
            ("GET", "/v1/sandboxes/{sandbox_id}/files/stat")
            | ("GET", "/v1/sandboxes/{sandbox_id}/files/content") => call(
                format!(
                    "{}?path=/data/file.txt",
                    path.replace("{sandbox_id}", &sb.to_string())
                ),
                Body::Empty,
            ),
            ("POST", "/v1/sandboxes/{sandbox_id}/files/mkdir") => {
                call(files("/mkdir"), Body::Json(json!({ "path": "/data/dir" })))
            }
            ("PUT", "/v1/sandboxes/{sandbox_id}/files/content") => call(
                files("/content?path=/data/uploaded.txt"),
                Body::Bytes(b"uploaded".to_vec()),
            ),
            ("POST", "/v1/sandboxes/{sandbox_id}/processes") => call(
                path.replace("{sandbox_id}", &sb.to_string()),
                Body::Json(json!({ "argv": ["sleep", "1000"] })),
            ),
            ("POST", "/v1/sandboxes/{sandbox_id}/terminals") => call(
                path.replace("{sandbox_id}", &sb.to_string()),
                Body::Json(json!({ "cols": 100, "rows": 30 })),
            ),
            ("GET", "/v1/sandboxes/{sandbox_id}/files/watch") => {
                call(files("/watch?path=/data&recursive=true"), Body::Empty)
            }
            ("POST", "/v1/sandboxes/{sandbox_id}/lifetime") => call(
                format!("/v1/sandboxes/{sb}/lifetime"),
                Body::Json(json!({ "lifetime_sec": 3600 })),
            ),
            ("PUT", "/v1/sandboxes/{sandbox_id}/egress") => call(
                format!("/v1/sandboxes/{sb}/egress"),
                Body::Json(json!({ "deny_out": ["198.51.100.0/24"] })),
            ),
            ("PUT", "/sandboxes/{sandboxID}/network") => call(
                format!("/sandboxes/{sb}/network"),
                Body::Json(json!({ "denyOut": ["198.51.100.0/24"] })),
            ),
            ("POST", "/v1/sandboxes/{sandbox_id}/fork") => call(
                format!("/v1/sandboxes/{sb}/fork"),
                Body::Json(json!({ "count": 1 })),
            ),
            ("POST", "/sandboxes/{sandboxID}/fork") => call(
                format!("/sandboxes/{sb}/fork"),
                Body::Json(json!({ "count": 1 })),
            ),
            ("POST", "/sandboxes") | ("POST", "/v2/sandboxes") => {
                call(path.into(), Body::Json(json!({ "templateID": "base" })))
            }
            ("DELETE", "/sandboxes/{sandboxID}") => {
                let doomed = self.fresh_sandbox().await?;
                call(format!("/sandboxes/{}", doomed.id), Body::Empty)
            }
            ("POST", "/sandboxes/{sandboxID}/pause") => {
                let running = self.fresh_sandbox().await?;
                call(format!("/sandboxes/{}/pause", running.id), Body::Empty)
            }
            ("POST", "/sandboxes/{sandboxID}/resume") => {
                let paused = self.fresh_sandbox().await?;
                self.key_api().pause(paused.id).await?;
                call(format!("/sandboxes/{}/resume", paused.id), Body::Empty)
            }
            ("POST", "/sandboxes/{sandboxID}/timeout") => call(
                format!("/sandboxes/{sb}/timeout"),
                Body::Json(json!({ "timeout": 3600 })),
            ),
            ("POST", "/sandboxes/{sandboxID}/refreshes") => call(
                format!("/sandboxes/{sb}/refreshes"),
                Body::Json(json!({ "duration": 60 })),
            ),
            ("POST", "/sandboxes/{sandboxID}/snapshots") => call(
                format!("/sandboxes/{sb}/snapshots"),
                Body::Json(json!({ "name": unique("e2bsnap") })),
            ),
            ("GET", "/sandboxes/metrics") => {
                call(format!("/sandboxes/metrics?sandbox_ids={sb}"), Body::Empty)
            }
            ("GET", "/templates/{templateID}") => call("/templates/base".into(), Body::Empty),
            ("POST", "/v3/templates") => call(
                path.into(),
                Body::Json(json!({ "name": unique("e2bbuilt"), "cpuCount": 1 })),
            ),
            ("GET", "/templates/{templateID}/files/{hash}") => call(
                format!("/templates/anything/files/{}", "a".repeat(64)),
                Body::Empty,
            ),
            ("PUT", "/templates/{templateID}/files/{hash}") => call(
                format!("/templates/anything/files/{}?token=forged", "a".repeat(64)),
                Body::Bytes(b"data".to_vec()),
            ),
            (m, p) if p.contains("{buildID}") => {
                // A fresh build of team A's, announced and waiting, for every caller.
                let name = unique("e2bbuild");
                let build = nestbox_db::builds::create_waiting(
                    db,
                    &nestbox_db::builds::NewBuild {
                        team_id: team,
                        name: name.clone(),
                        recipe: Default::default(),
                        steps: Vec::new(),
                        created_by: "system".into(),
                        deadline: chrono::Utc::now() + chrono::Duration::hours(1),
                        tags: vec!["default".into()],
                    },
                )
                .await?;
                let id = build.id.to_string().trim_start_matches("bld-").to_string();
                let path = p.replace("{templateID}", &name).replace("{buildID}", &id);
                let body = if m == "POST" {
                    Body::Json(json!({ "fromTemplate": "minimal", "steps": [] }))
                } else {
                    Body::Empty
                };
                call(path, body)
            }
            ("GET", "/templates/aliases/{alias}") => {
                call("/templates/aliases/minimal".into(), Body::Empty)
            }
            ("DELETE", "/templates/{templateID}") => {
                let doomed = self
                    .key_api()
                    .snapshot(&common::api::snapshot(sb, &unique("doomed")))
                    .await?;
                call(format!("/templates/{}", doomed.name), Body::Empty)
            }
            (_, p) if p.contains("{sandboxID}") => {
                call(p.replace("{sandboxID}", &sb.to_string()), Body::Empty)
            }
            (m, p) if p.contains("{process}") => {
                // A fresh process of team A for every call (kills end it).
                let started = self
                    .key_client()
                    .start_process(
                        sb,
                        &nestbox_types::api::StartProcessRequest {
                            argv: Some(vec!["sleep".into(), "1000".into()]),
                            stdin: true,
                            ..Default::default()
                        },
                    )
                    .await?;
                let body = match (m, p.rsplit('/').next()) {
                    ("POST", Some("signal")) => Body::Json(json!({ "signal": "SIGTERM" })),
                    ("POST", Some("stdin")) => Body::Json(json!({ "data": "hello" })),
                    _ => Body::Empty,
                };
                call(
                    p.replace("{sandbox_id}", &sb.to_string())
                        .replace("{process}", &started.pid.to_string()),
                    body,
                )
            }
            (_, p) if p.contains("{sandbox_id}") => {
                call(p.replace("{sandbox_id}", &sb.to_string()), Body::Empty)
            }
            (_, p) if !p.contains('{') => call(p.into(), Body::Empty),
            (m, p) => anyhow::bail!("no request for {m} {p}: teach World::prepare"),
        })
    }

    /// Sends a prepared call as `who`; returns the status.
    async fn send(&self, who: Who, method: &str, call: Call) -> anyhow::Result<u16> {
        let (http, url) = self.h.raw(&call.path);
        let mut rb = http.request(Method::from_bytes(method.as_bytes())?, url);
        for (name, value) in self.credentials(who)? {
            rb = rb.header(name, value);
        }
        rb = match call.body {
            Body::Empty => rb,
            Body::Json(v) => rb.json(&v),
            Body::Bytes(b) => rb
                .header("content-type", "application/octet-stream")
                .body(b),
        };
        Ok(rb.send().await?.status().as_u16())
    }
}

/// A name no other call uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn authorization_matrix(engine: Engine) -> anyhow::Result<()> {
    let w = World::new(engine).await?;
    let mut failures = Vec::new();
    for r in MATRIX {
        for (who, expect) in CALLERS.iter().zip(r.expect) {
            let call = w.prepare(r.method, r.path).await?;
            let got = w.send(*who, r.method, call).await?;
            if !expect.matches(got) {
                failures.push(format!(
                    "{:>6} {:<48} {:<14} expected {expect}, got {got}",
                    r.method,
                    r.path,
                    format!("{who:?}")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells differ from the authorization matrix:\n{}",
        failures.len(),
        MATRIX.len() * CALLERS.len(),
        failures.join("\n")
    );

    // Nothing that other callers were refused happened to team A's sandbox.
    let sb = w.key_client().get_sandbox(w.sandbox.id).await?;
    assert_eq!(sb.status, nestbox_types::SandboxStatus::Running);
    assert_eq!(
        w.h.agent.file(w.sandbox.id, "/data/file.txt").as_deref(),
        Some(&b"team A's data"[..])
    );
    w.h.shutdown().await;
    Ok(())
}

async fn other_teams_see_nothing_of_a_team(engine: Engine) -> anyhow::Result<()> {
    let w = World::new(engine).await?;
    let outsiders = [
        w.h.anonymous().with_api_key(&w.other_key),
        w.other.client.clone(),
        w.h.admin.client.clone(),
    ];
    let sb = w.sandbox.id;
    let service = w
        .key_client()
        .start_process(
            sb,
            &nestbox_types::api::StartProcessRequest {
                argv: Some(vec!["sleep".into(), "1000".into()]),
                tag: Some("team-a-svc".into()),
                ..Default::default()
            },
        )
        .await?;
    for outsider in &outsiders {
        // Team A's processes, terminals and watches are not there for another team.
        let code = |r: Result<(), nestbox_client::ClientError>| r.err().and_then(|e| e.code());
        let process_codes = [
            code(outsider.list_processes(sb).await.map(|_| ())),
            code(outsider.kill_process(sb, "team-a-svc").await),
            code(outsider.send_stdin(sb, "team-a-svc", b"x").await),
            code(outsider.process_output(sb, "team-a-svc").await.map(|_| ())),
            code(outsider.attach_terminal(sb, "team-a-svc").await.map(|_| ())),
            code(
                outsider
                    .watch_dir(
                        sb,
                        &nestbox_types::api::WatchQuery {
                            path: "/data".into(),
                            ..Default::default()
                        },
                    )
                    .await
                    .map(|_| ()),
            ),
        ];
        assert_eq!(process_codes, [Some(ErrorCode::SandboxNotFound); 6]);
        let listed = outsider.list_sandboxes(&Default::default()).await?;
        assert!(
            listed.items.iter().all(|s| s.id != sb),
            "another team lists team A's sandbox"
        );
        let codes = [
            outsider.get_sandbox(sb).await.err().and_then(|e| e.code()),
            outsider
                .stat(sb, "/data/file.txt")
                .await
                .err()
                .and_then(|e| e.code()),
            outsider
                .destroy_sandbox(sb)
                .await
                .err()
                .and_then(|e| e.code()),
        ];
        assert_eq!(codes, [Some(ErrorCode::SandboxNotFound); 3]);
        let log = outsider.audit_logs(&Default::default()).await;
        if let Ok(log) = log {
            assert!(
                log.items.iter().all(|a| a.team_id != Some(w.team)),
                "another team reads team A's audit log"
            );
        }
    }
    let still = w.key_client().list_processes(sb).await?;
    assert!(
        still.iter().any(|p| p.pid == service.pid),
        "another team's kill reached team A's process"
    );
    // Nor of its templates.
    let theirs = w
        .key_api()
        .snapshot(&common::api::snapshot(sb, "team-a-only"))
        .await?;
    for outsider in [
        common::api::Api::new(&w.h.url, vec![("x-api-key", w.other_key.clone())]),
        w.other.api(),
        w.h.admin.api(),
    ] {
        let listed = outsider.snapshots(None).await?;
        assert!(listed.items.iter().all(|t| t.id != theirs.id));
        assert_eq!(
            outsider
                .delete_snapshot("team-a-only")
                .await
                .err()
                .and_then(|e| e.code()),
            Some(ErrorCode::TemplateNotFound)
        );
    }
    assert!(w.h.agent.template(theirs.id).is_some());
    // Another team's id in the team header is not a way in either.
    let sneaky = w.other.client.clone().with_team(w.team);
    assert_eq!(
        sneaky.get_sandbox(sb).await.err().and_then(|e| e.code()),
        Some(ErrorCode::TeamNotFound)
    );
    assert!(w.h.agent.sandbox(sb).is_some());
    w.h.shutdown().await;
    Ok(())
}

async fn host_routes_need_their_own_host_token(engine: Engine) -> anyhow::Result<()> {
    let h = Harness::start(engine).await?;
    let first = h
        .agent
        .credentials()
        .expect("the harness registered the agent");

    // A second host and its agent.
    let second_agent = SimAgent::start(SimAgentConfig::default()).await?;
    let second = h.services.create_host_unchecked("sim-2").await?;
    let creds = second_agent
        .register(&h.url, &second.registration_token)
        .await?;
    second_agent.heartbeat().await?;
    h.agent.heartbeat().await?;

    // A registration token works once.
    let reuse = second_agent
        .register(&h.url, &second.registration_token)
        .await;
    assert_eq!(reuse.err().and_then(|e| e.status()), Some(401));

    let heartbeat = |host: HostId, token: Option<&str>| {
        let (http, url) = h.raw(&format!("/v1/hosts/{host}/heartbeat"));
        let mut rb = http.post(url).json(&HeartbeatRequest {
            sandboxes: 0,
            version: "1".into(),
            address: h.agent.address(),
            ..Default::default()
        });
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let refused = [
        ("no token", heartbeat(first.host_id, None).await?),
        (
            "garbage",
            heartbeat(first.host_id, Some("nbxhost_garbage")).await?,
        ),
        (
            "another host's token",
            heartbeat(first.host_id, Some(&creds.credentials.access_token)).await?,
        ),
        (
            "a token for an unknown host",
            heartbeat(HostId::new(), Some(&first.credentials.access_token)).await?,
        ),
        (
            "the host key instead of its token",
            heartbeat(first.host_id, Some(&first.host_key)).await?,
        ),
    ];
    for (what, resp) in refused {
        raw_error(resp, 401, ErrorCode::Unauthorized)
            .await
            .map_err(|e| e.context(what))?;
    }
    let ok = heartbeat(first.host_id, Some(&first.credentials.access_token)).await?;
    assert_eq!(ok.status().as_u16(), 204);
    // A host's own token cannot point the control plane at another machine.
    let (http, url) = h.raw(&format!("/v1/hosts/{}/heartbeat", first.host_id));
    let elsewhere = http
        .post(url)
        .bearer_auth(&first.credentials.access_token)
        .json(&HeartbeatRequest {
            sandboxes: 0,
            version: "1".into(),
            address: "https://198.51.100.7:7701".into(),
            ..Default::default()
        })
        .send()
        .await?;
    raw_error(elsewhere, 400, ErrorCode::InvalidRequest).await?;

    // The control plane signs its calls for each host with that host's key only.
    assert_ne!(first.host_key, creds.host_key);
    let before = second_agent.rejected_calls();
    h.services
        .sync_host_templates(creds.host_id, &second_agent.address())
        .await?;
    assert_eq!(second_agent.rejected_calls(), before);
    let wrong_key = h
        .services
        .sync_host_templates(first.host_id, &second_agent.address())
        .await;
    assert!(wrong_key.is_err(), "a token for host 1 opens host 2");
    assert_eq!(second_agent.rejected_calls(), before + 1);

    second_agent.shutdown().await;
    h.shutdown().await;
    Ok(())
}
