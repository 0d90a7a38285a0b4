//! Hosts: creation with a one-time registration token, agent registration, heartbeats,
//! listing and deletion.
//!
//! Rules: only platform admins create, list and delete hosts; a registration token works
//! once and for one hour; a host then holds a token pair (`nestbox_db::host_credentials`):
//! an access token (JWT) that authenticates heartbeats of that host only, while its pair is
//! current, and a refresh token traded once for the next pair. A refresh that fails is 401
//! whatever the reason; a replayed refresh token is refused and logged. Deleting a host
//! deletes its pairs. A host with sandboxes holding resources cannot be deleted.

use chrono::Utc;
use nestbox_db::host_credentials::{self, NewPair, Refresh};
use nestbox_db::{HostKind, hosts, sandboxes};
use nestbox_types::api::{
    self, CreatedHost, HeartbeatRequest, HostTokenPair, RefreshHostRequest, RefreshHostResponse,
    RegisterHostRequest, RegisterHostResponse,
};
use nestbox_types::{ErrorCode, HostId};

use super::{AuditActor, AuditEntry, validate_name};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// How long a registration token is valid.
pub const REGISTRATION_TTL: chrono::Duration = chrono::Duration::hours(1);

/// API view of a host.
pub fn host_view(h: &hosts::Host) -> api::Host {
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
    /// Creates a pending host and its registration token. Platform admins only.
    pub async fn create_host(&self, caller: &Caller, name: &str) -> ApiResult<CreatedHost> {
        caller.require_admin()?;
        let created = self.create_host_unchecked(name).await?;
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: None,
            action: "host.create",
            resource_type: "host",
            resource_id: Some(created.host.id.to_string()),
            ok: true,
            details: serde_json::json!({ "name": created.host.name }),
        })
        .await;
        Ok(created)
    }

    /// Creates a pending host without an authorization check (the one-box bootstrap).
    pub async fn create_host_unchecked(&self, name: &str) -> ApiResult<CreatedHost> {
        let name = validate_name("name", name)?;
        let token = format!("nbxreg_{}", auth::random_hex(32)?);
        let expires_at = Utc::now() + REGISTRATION_TTL;
        let host = hosts::create_pending(
            &self.db,
            &hosts::NewHost {
                name,
                kind: HostKind::Regular,
                team_id: None,
            },
            &auth::hash_token(&token),
            expires_at,
        )
        .await?;
        Ok(CreatedHost {
            host: host_view(&host),
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
        let came_back = hosts::heartbeat(&self.db, host).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::new(ErrorCode::HostNotFound, format!("host {host} not found"))
            } else {
                e.into()
            }
        })?;
        if hosts::update_endpoint(&self.db, host, &req.address, &req.version).await? {
            tracing::info!(host = %host, address = %req.address, "host agent moved; updating its address");
            self.pool.evict(host);
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

    /// All hosts. Platform admins only.
    pub async fn list_hosts(&self, caller: &Caller) -> ApiResult<Vec<api::Host>> {
        caller.require_admin()?;
        Ok(hosts::list(&self.db).await?.iter().map(host_view).collect())
    }

    /// Deletes a host that holds no sandboxes. Platform admins only.
    pub async fn delete_host(&self, caller: &Caller, host: HostId) -> ApiResult<()> {
        caller.require_admin()?;
        let load = sandboxes::host_load(&self.db, host).await?;
        if load.sandboxes > 0 {
            return Err(ApiError::conflict(format!(
                "host {host} still has {} sandboxes; destroy them first",
                load.sandboxes
            )));
        }
        if !hosts::delete(&self.db, host).await? {
            return Err(ApiError::new(
                ErrorCode::HostNotFound,
                format!("host {host} not found"),
            ));
        }
        self.pool.evict(host);
        self.audit(AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: None,
            action: "host.delete",
            resource_type: "host",
            resource_id: Some(host.to_string()),
            ok: true,
            details: serde_json::json!({}),
        })
        .await;
        Ok(())
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
        if online.is_empty() {
            return Err("no host is online yet".into());
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
