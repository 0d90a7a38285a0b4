//! Hosts: creation with a one-time registration token, agent registration, heartbeats,
//! listing and deletion.
//!
//! Rules: platform admins create, list and delete every host; the owners and admins of a
//! team that brings its own hosts (BYOC) create, list and delete that team's hosts, and
//! nobody else sees them; a registration token works
//! once and for one hour; a host then holds a token pair (`nestbox_db::host_credentials`):
//! an access token (JWT) that authenticates heartbeats of that host only, while its pair is
//! current, and a refresh token traded once for the next pair. A refresh that fails is 401
//! whatever the reason; a replayed refresh token is refused and logged. Deleting a host
//! deletes its pairs. A host with sandboxes holding resources cannot be deleted.

use chrono::Utc;
use nestbox_db::host_credentials::{self, NewPair, Refresh};
use nestbox_db::{HostKind, hosts, sandboxes, teams};
use nestbox_types::api::{
    self, CreatedHost, HeartbeatRequest, HostTokenPair, RefreshHostRequest, RefreshHostResponse,
    RegisterHostRequest, RegisterHostResponse,
};
use nestbox_types::{ErrorCode, HostId, SandboxStatus, TeamId};

use super::{AuditActor, AuditEntry, validate_name};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// How long a registration token is valid.
pub const REGISTRATION_TTL: chrono::Duration = chrono::Duration::hours(1);

/// API view of a host (`team_name`: its BYOC team's).
pub fn host_view(h: &hosts::Host, team_name: Option<String>) -> api::Host {
    api::Host {
        id: h.id,
        name: h.name.clone(),
        status: h.status,
        address: h.address.clone(),
        version: h.version.clone(),
        vcpus: h.specs.vcpus,
        memory_mb: u64::from(h.specs.memory_mb),
        disk_mb: u64::from(h.specs.disk_mb),
        max_sandboxes: h.specs.max_sandboxes.unwrap_or(0),
        team_id: h.team_id,
        team_name,
        guest_memory_mb: h.guest_memory.map(|m| u64::from(m.total_mb)),
        guest_memory_used_mb: h.guest_memory.map(|m| u64::from(m.used_mb)),
        draining: h.draining,
        last_heartbeat_at: h.last_heartbeat_at,
        created_at: h.created_at,
    }
}

fn validate_address(address: &str) -> Result<(), ApiError> {
    let ok = (address.starts_with("http://") || address.starts_with("https://"))
        && address.len() <= 512
        && !address.chars().any(char::is_whitespace)
        && address
            .split("://")
            .nth(1)
            .is_some_and(|rest| !rest.is_empty());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("address must be an http(s) URL"))
    }
}

/// The host part of an `http(s)://` URL, lowercased (`[::1]`, `10.0.0.5`, `agent.example`).
fn url_host(address: &str) -> Option<String> {
    let rest = address.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if authority.starts_with('[') {
        authority.split_inclusive(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// A heartbeat may move its agent to another port (a restart), never to another host,
/// and never from `https` back to plain `http`: a stolen host token cannot point the
/// control plane at an address of the thief's choosing or strip its TLS.
fn same_host(current: &str, proposed: &str) -> Result<(), ApiError> {
    if current.starts_with("https://") && !proposed.starts_with("https://") {
        return Err(ApiError::invalid(
            "address must stay https: the host's agent serves TLS",
        ));
    }
    if url_host(current) != url_host(proposed) {
        return Err(ApiError::invalid(format!(
            "address must name the host that registered ({})",
            url_host(current).unwrap_or_default()
        )));
    }
    Ok(())
}

impl Services {
    /// Creates a pending host and its registration token. Platform admins only; with a
    /// team, a host of that BYOC team.
    pub async fn create_host(
        &self,
        caller: &Caller,
        req: &api::CreateHostRequest,
    ) -> ApiResult<CreatedHost> {
        caller.require_admin()?;
        let team = match req.team_id {
            Some(team) => Some(self.byoc_team(team).await.map_err(|e| {
                if e.code == ErrorCode::Forbidden {
                    ApiError::invalid(format!("team {team} does not bring its own hosts"))
                } else {
                    e
                }
            })?),
            None => None,
        };
        self.create_host_for(caller, &req.name, team).await
    }

    /// Registers a host of a BYOC team (its owners and admins): the one-time token.
    pub async fn create_team_host(
        &self,
        caller: &Caller,
        team: TeamId,
        req: &api::CreateHostRequest,
    ) -> ApiResult<CreatedHost> {
        let t = self.team_hosts_access(caller, team).await?;
        if req.team_id.is_some_and(|other| other != team) {
            return Err(ApiError::invalid(
                "team_id is the team of the path here; leave it out",
            ));
        }
        self.create_host_for(caller, &req.name, Some(t)).await
    }

    /// A BYOC team's hosts (its owners and admins).
    pub async fn list_team_hosts(
        &self,
        caller: &Caller,
        team: TeamId,
    ) -> ApiResult<Vec<api::Host>> {
        let t = self.team_hosts_access(caller, team).await?;
        Ok(hosts::list_for_team(&self.db, team)
            .await?
            .iter()
            .map(|h| host_view(h, Some(t.name.clone())))
            .collect())
    }

    /// Deletes a host of a BYOC team (its owners and admins); as [`Self::delete_host`].
    pub async fn delete_team_host(
        &self,
        caller: &Caller,
        team: TeamId,
        host: HostId,
        force: bool,
    ) -> ApiResult<()> {
        self.team_hosts_access(caller, team).await?;
        let h = hosts::get(&self.db, host)
            .await
            .map_err(|e| host_error(e, host))?;
        if h.team_id != Some(team) {
            // Another team's host, or a platform host: not there for this team.
            return Err(host_not_found(host));
        }
        self.delete_host_unchecked(caller, &h, force).await
    }

    /// The team, if the caller may manage its hosts: it brings its own hosts and the caller
    /// is its owner or an admin (platform admins may too).
    async fn team_hosts_access(&self, caller: &Caller, team: TeamId) -> ApiResult<teams::Team> {
        if !caller.actor.is_admin() {
            self.manager_of(caller, team).await?;
        }
        self.byoc_team(team).await
    }

    /// `team`, which must bring its own hosts (`403` otherwise; `404` if there is none).
    async fn byoc_team(&self, team: TeamId) -> ApiResult<teams::Team> {
        let t = teams::get(&self.db, team).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::new(ErrorCode::TeamNotFound, format!("team {team} not found"))
            } else {
                e.into()
            }
        })?;
        if !t.is_byoc {
            return Err(ApiError::forbidden(format!(
                "team {team} does not bring its own hosts (a platform admin can enable it)"
            )));
        }
        Ok(t)
    }

    async fn create_host_for(
        &self,
        caller: &Caller,
        name: &str,
        team: Option<teams::Team>,
    ) -> ApiResult<CreatedHost> {
        let created = self.create_pending_host(name, team.as_ref()).await?;
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: team.as_ref().map(|t| t.id),
            action: "host.create",
            resource_type: "host",
            resource_id: Some(created.host.id.to_string()),
            ok: true,
            details: serde_json::json!({ "name": created.host.name }),
        })
        .await;
        Ok(created)
    }

    /// Creates a pending platform host without an authorization check (the one-box
    /// bootstrap).
    pub async fn create_host_unchecked(&self, name: &str) -> ApiResult<CreatedHost> {
        self.create_pending_host(name, None).await
    }

    async fn create_pending_host(
        &self,
        name: &str,
        team: Option<&teams::Team>,
    ) -> ApiResult<CreatedHost> {
        let name = validate_name("name", name)?;
        let token = format!("nbxreg_{}", auth::random_hex(32)?);
        let expires_at = Utc::now() + REGISTRATION_TTL;
        let host = hosts::create_pending(
            &self.db,
            &hosts::NewHost {
                name,
                kind: if team.is_some() {
                    HostKind::Byoc
                } else {
                    HostKind::Regular
                },
                team_id: team.map(|t| t.id),
            },
            &auth::hash_token(&token),
            expires_at,
        )
        .await?;
        Ok(CreatedHost {
            host: host_view(&host, team.map(|t| t.name.clone())),
            registration_token: token,
            expires_at,
        })
    }

    /// An agent trades its registration token for credentials.
    pub async fn register_host(
        &self,
        req: &RegisterHostRequest,
    ) -> ApiResult<RegisterHostResponse> {
        validate_address(&req.address)?;
        if req.version.is_empty() || req.version.len() > 64 {
            return Err(ApiError::invalid("version must be 1–64 characters"));
        }
        let host = hosts::consume_registration_token(&self.db, &auth::hash_token(&req.token))
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid, used or expired registration token"))?;
        let (pair, refresh_token) = self.new_host_pair()?;
        let credentials = self.host_pair_view(host.id, &pair, refresh_token)?;
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let reg = hosts::Registration {
            address: req.address.clone(),
            version: req.version.clone(),
            specs: hosts::HostSpecs {
                vcpus: req.vcpus,
                memory_mb: clamp(req.memory_mb),
                disk_mb: clamp(req.disk_mb),
                max_sandboxes: Some(req.max_sandboxes),
            },
            credentials: pair,
        };
        let host = hosts::mark_registered(&self.db, host.id, &reg).await?;
        self.fleet.invalidate();
        self.pool.evict(host.id);
        self.audit(AuditEntry {
            actor: AuditActor::Host(host.id.to_string()),
            team: host.team_id,
            action: "host.register",
            resource_type: "host",
            resource_id: Some(host.id.to_string()),
            ok: true,
            details: serde_json::json!({ "address": req.address, "version": req.version }),
        })
        .await;
        Ok(RegisterHostResponse {
            host_id: host.id,
            credentials,
            host_key: self.pool.host_key(host.id),
            heartbeat_interval_sec: u32::try_from(self.cfg.heartbeat_interval.as_secs())
                .unwrap_or(15),
            tls: Some(self.pool.host_tls(host.id)?),
        })
    }

    /// A new pair: what the database keeps, and the refresh token itself.
    fn new_host_pair(&self) -> ApiResult<(NewPair, String)> {
        let now = Utc::now();
        let ttl = |d: std::time::Duration| {
            chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(1))
        };
        let refresh_token = format!("{}{}", auth::HOST_REFRESH_PREFIX, auth::random_hex(32)?);
        Ok((
            NewPair {
                id: uuid::Uuid::new_v4(),
                refresh_hash: auth::hash_token(&refresh_token),
                access_expires_at: now + ttl(self.cfg.host_access_ttl),
                refresh_expires_at: now + ttl(self.cfg.host_refresh_ttl),
            },
            refresh_token,
        ))
    }

    /// What `host` gets of `pair`: its access token is signed here.
    fn host_pair_view(
        &self,
        host: HostId,
        pair: &NewPair,
        refresh_token: String,
    ) -> ApiResult<HostTokenPair> {
        Ok(HostTokenPair {
            access_token: self
                .host_tokens
                .issue(host, pair.id, pair.access_expires_at)?,
            access_expires_at: pair.access_expires_at,
            refresh_token,
            refresh_expires_at: pair.refresh_expires_at,
        })
    }

    /// A host trades its refresh token for the next pair. Every failure is 401 (the host
    /// must register again); a replayed token is also logged and audited.
    pub async fn refresh_host(&self, req: &RefreshHostRequest) -> ApiResult<RefreshHostResponse> {
        let refused = || ApiError::unauthorized("invalid, expired or already used refresh token");
        if req.refresh_token.is_empty() || req.refresh_token.len() > 256 {
            return Err(refused());
        }
        let (pair, refresh_token) = self.new_host_pair()?;
        let outcome =
            host_credentials::refresh(&self.db, &auth::hash_token(&req.refresh_token), &pair)
                .await?;
        match outcome {
            Refresh::Issued(host) => {
                tracing::info!(host = %host, "host credentials refreshed");
                Ok(RefreshHostResponse {
                    host_id: host,
                    credentials: self.host_pair_view(host, &pair, refresh_token)?,
                })
            }
            Refresh::Unknown => Err(refused()),
            Refresh::Expired(host) => {
                tracing::warn!(host = %host, "a host presented an expired refresh token");
                Err(refused())
            }
            Refresh::Reused { host, pair } => {
                tracing::warn!(
                    host = %host, pair = %pair,
                    "a revoked host refresh token was presented again (replay?); refused"
                );
                self.audit(AuditEntry {
                    actor: AuditActor::Host(host.to_string()),
                    team: None,
                    action: "host.refresh_reused",
                    resource_type: "host",
                    resource_id: Some(host.to_string()),
                    ok: false,
                    details: serde_json::json!({ "pair": pair.to_string() }),
                })
                .await;
                Err(refused())
            }
        }
    }

    /// The host a heartbeat's bearer token authenticates: an access token of its current
    /// pair, or the long-lived token of a host registered before token pairs.
    async fn authenticate_host(&self, host: HostId, token: &str) -> ApiResult<hosts::Host> {
        if token.starts_with("nbxhost_") {
            let found = hosts::find_by_legacy_token_hash(&self.db, &auth::hash_token(token))
                .await?
                .ok_or_else(|| ApiError::unauthorized("invalid host token"))?;
            if found.id != host {
                return Err(ApiError::unauthorized(
                    "the host token belongs to another host",
                ));
            }
            return Ok(found);
        }
        let (claimed, pair) = self.host_tokens.verify(token)?;
        if claimed != host {
            return Err(ApiError::unauthorized(
                "the host token belongs to another host",
            ));
        }
        match host_credentials::check_access(&self.db, host, pair).await? {
            host_credentials::AccessCheck::Valid => {}
            host_credentials::AccessCheck::Unknown => {
                return Err(ApiError::unauthorized("unknown host token"));
            }
            host_credentials::AccessCheck::Revoked => {
                return Err(ApiError::unauthorized(
                    "this host token was revoked: refresh",
                ));
            }
        }
        hosts::get(&self.db, host).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::unauthorized("unknown host token")
            } else {
                e.into()
            }
        })
    }

    /// Records a heartbeat of `host`, authenticated by its access token.
    pub async fn heartbeat(
        &self,
        host: HostId,
        token: &str,
        req: &HeartbeatRequest,
    ) -> ApiResult<()> {
        let found = self.authenticate_host(host, token).await?;
        validate_address(&req.address)?;
        if let Some(current) = &found.address {
            same_host(current, &req.address)?;
        }
        if req.version.is_empty() || req.version.len() > 64 {
            return Err(ApiError::invalid("version must be 1–64 characters"));
        }
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let memory = match (req.guest_memory_mb, req.guest_memory_used_mb) {
            (Some(total), Some(used)) => Some(hosts::GuestMemory {
                total_mb: clamp(total),
                used_mb: clamp(used),
            }),
            _ => None,
        };
        let came_back = hosts::heartbeat(&self.db, host, memory)
            .await
            .map_err(|e| {
                if e.is_not_found() {
                    ApiError::new(ErrorCode::HostNotFound, format!("host {host} not found"))
                } else {
                    e.into()
                }
            })?;
        if let Some(m) = memory {
            self.fleet.reported(host, m);
        }
        if hosts::update_endpoint(&self.db, host, &req.address, &req.version).await? {
            tracing::info!(host = %host, address = %req.address, "host agent moved; updating its address");
            self.pool.evict(host);
            self.fleet.invalidate();
        }
        if found.status != nestbox_types::HostStatus::Online {
            self.fleet.invalidate();
        }
        if came_back && found.status == nestbox_types::HostStatus::Unreachable {
            self.audit(AuditEntry {
                actor: AuditActor::Host(host.to_string()),
                team: found.team_id,
                action: "host.up",
                resource_type: "host",
                resource_id: Some(host.to_string()),
                ok: true,
                details: serde_json::json!({}),
            })
            .await;
        }
        Ok(())
    }

    /// All hosts, BYOC ones with their team. Platform admins only.
    pub async fn list_hosts(&self, caller: &Caller) -> ApiResult<Vec<api::Host>> {
        caller.require_admin()?;
        let all = hosts::list(&self.db).await?;
        let mut names: std::collections::HashMap<TeamId, String> = Default::default();
        for team in all.iter().filter_map(|h| h.team_id) {
            if let std::collections::hash_map::Entry::Vacant(e) = names.entry(team) {
                match teams::get(&self.db, team).await {
                    Ok(t) => {
                        e.insert(t.name);
                    }
                    Err(err) if err.is_not_found() => {}
                    Err(err) => return Err(err.into()),
                }
            }
        }
        Ok(all
            .iter()
            .map(|h| host_view(h, h.team_id.and_then(|t| names.get(&t).cloned())))
            .collect())
    }

    /// Cordons a host (it takes no new sandboxes; what it holds stays) or lets it take them
    /// again. Platform admins only.
    pub async fn drain_host(
        &self,
        caller: &Caller,
        host: HostId,
        draining: bool,
    ) -> ApiResult<api::Host> {
        caller.require_admin()?;
        let h = hosts::set_draining(&self.db, host, draining)
            .await
            .map_err(|e| host_error(e, host))?;
        self.fleet.invalidate();
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: h.team_id,
            action: if draining {
                "host.drain"
            } else {
                "host.undrain"
            },
            resource_type: "host",
            resource_id: Some(host.to_string()),
            ok: true,
            details: serde_json::json!({}),
        })
        .await;
        let team_name = match h.team_id {
            Some(t) => Some(teams::get(&self.db, t).await?.name),
            None => None,
        };
        Ok(host_view(&h, team_name))
    }

    /// Deletes a host. Platform admins only. A host holding sandboxes is refused (`409`,
    /// naming them) unless `force`, which destroys them first.
    pub async fn delete_host(&self, caller: &Caller, host: HostId, force: bool) -> ApiResult<()> {
        caller.require_admin()?;
        let h = hosts::get(&self.db, host)
            .await
            .map_err(|e| host_error(e, host))?;
        self.delete_host_unchecked(caller, &h, force).await
    }

    async fn delete_host_unchecked(
        &self,
        caller: &Caller,
        h: &hosts::Host,
        force: bool,
    ) -> ApiResult<()> {
        let host = h.id;
        if force {
            // Nothing new lands there while what it holds is destroyed.
            hosts::set_draining(&self.db, host, true)
                .await
                .map_err(|e| host_error(e, host))?;
            self.fleet.invalidate();
        }
        let holding: Vec<SandboxStatus> = SandboxStatus::ALL
            .iter()
            .copied()
            .filter(SandboxStatus::holds_host_resources)
            .collect();
        let affected = sandboxes::list_by_host(&self.db, host, &holding).await?;
        if !affected.is_empty() && !force {
            return Err(ApiError::conflict(format!(
                "host {host} still has {} sandboxes (listed in sandbox_ids); destroy them \
                 first, or delete with ?force=true to destroy them",
                affected.len()
            ))
            .with_sandboxes(affected.iter().map(|sb| sb.id).collect()));
        }
        for sb in &affected {
            self.destroy_for_host_removal(sb).await;
        }
        let deleted = hosts::delete(&self.db, host).await?;
        self.fleet.invalidate();
        if !deleted {
            return Err(host_not_found(host));
        }
        self.pool.evict(host);
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: h.team_id,
            action: "host.delete",
            resource_type: "host",
            resource_id: Some(host.to_string()),
            ok: true,
            details: serde_json::json!({
                "force": force,
                "sandboxes": affected.iter().map(|sb| sb.id.to_string()).collect::<Vec<_>>(),
            }),
        })
        .await;
        Ok(())
    }

    /// Destroys a sandbox of a host being deleted by force: on its host if it answers,
    /// and in the records whatever the host says (it is going away).
    async fn destroy_for_host_removal(&self, sb: &sandboxes::Sandbox) {
        let system = Caller::system(sb.team_id);
        if let Err(e) = self.destroy_sandbox(&system, sb.id).await {
            tracing::warn!(sandbox = %sb.id, error = %e.message, "destroying a sandbox of a deleted host; recording it stopped");
        }
        let live = [
            SandboxStatus::Pending,
            SandboxStatus::Starting,
            SandboxStatus::Running,
            SandboxStatus::Paused,
            SandboxStatus::Missing,
            SandboxStatus::Error,
        ];
        if let Err(e) = sandboxes::transition(
            &self.db,
            sb.id,
            &live,
            SandboxStatus::Stopped,
            Some("its host was deleted"),
        )
        .await
        {
            tracing::warn!(sandbox = %sb.id, error = %e, "recording a sandbox of a deleted host stopped");
        }
    }
}

fn host_not_found(host: HostId) -> ApiError {
    ApiError::new(ErrorCode::HostNotFound, format!("host {host} not found"))
}

fn host_error(e: nestbox_db::DbError, host: HostId) -> ApiError {
    if e.is_not_found() {
        host_not_found(host)
    } else {
        e.into()
    }
}

impl Services {
    /// Records that every sandbox the host ran is gone because the host shut down cleanly
    /// (its agent destroyed them). Returns how many were updated.
    pub async fn host_shut_down(&self, host: HostId) -> ApiResult<usize> {
        let live = [
            nestbox_types::SandboxStatus::Running,
            nestbox_types::SandboxStatus::Missing,
        ];
        let mut n = 0;
        for sb in sandboxes::list_by_host(&self.db, host, &live).await? {
            if sandboxes::transition(
                &self.db,
                sb.id,
                &live,
                nestbox_types::SandboxStatus::Stopped,
                Some("its host shut down"),
            )
            .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Services {
    /// Whether sandboxes can be created: the database answers and at least one host is
    /// online with the platform's default template registered. The reason when not.
    pub async fn readiness(&self) -> Result<(), String> {
        // The cause goes to the log, never to the (unauthenticated) caller.
        let db_down = |e: nestbox_db::DbError| {
            tracing::warn!(error = %e, "readiness: the database does not answer");
            "the database does not answer".to_string()
        };
        let online = nestbox_db::hosts::list_online(&self.db)
            .await
            .map_err(db_down)?;
        if !online.iter().any(|h| h.team_id.is_none()) {
            return Err("no platform host is online yet".into());
        }
        let default = nestbox_db::templates::get_visible(
            &self.db,
            nestbox_types::PLATFORM_TEAM,
            nestbox_types::limits::DEFAULT_TEMPLATE,
        )
        .await
        .map_err(db_down)?;
        if default.is_none() {
            return Err("no host has registered the platform's templates yet".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(validate_address("http://127.0.0.1:5000").is_ok());
        assert!(validate_address("https://agent.example:443").is_ok());
        assert!(validate_address("127.0.0.1:5000").is_err());
        assert!(validate_address("http://").is_err());
        assert!(validate_address("http://a b").is_err());
    }

    #[test]
    fn hosts_are_read_from_urls() {
        assert_eq!(
            url_host("https://10.0.0.5:7701").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(url_host("https://[::1]:7701/x").as_deref(), Some("[::1]"));
        assert_eq!(
            url_host("http://Agent.Example/").as_deref(),
            Some("agent.example")
        );
        assert_eq!(
            url_host("https://evil@10.0.0.5:1").as_deref(),
            Some("10.0.0.5")
        );
        assert_eq!(url_host("nonsense"), None);
    }

    #[test]
    fn heartbeats_move_ports_not_hosts_nor_down_to_http() {
        assert!(same_host("https://10.0.0.5:7701", "https://10.0.0.5:7702").is_ok());
        assert!(same_host("http://10.0.0.5:7701", "https://10.0.0.5:7701").is_ok());
        assert!(same_host("https://10.0.0.5:7701", "http://10.0.0.5:7701").is_err());
        assert!(same_host("https://10.0.0.5:7701", "https://10.0.0.6:7701").is_err());
        assert!(same_host("https://10.0.0.5:7701", "https://10.0.0.5.evil.example:1").is_err());
    }
}
