//! Teams, their members and their API keys.
//!
//! Rules:
//! - only users (not API keys) manage teams;
//! - any member may read a team and its members; owners and admins rename it, manage
//!   members and API keys; only the owner deletes it;
//! - the owner's role cannot change and the owner cannot be removed; nobody is made owner
//!   through these operations;
//! - a member may remove themselves (leave);
//! - a team that still has sandboxes holding host resources cannot be deleted;
//! - to anyone who is not a member, a team does not exist (404), so ids cannot be probed;
//! - the platform team is managed by platform admins only.

use nestbox_db::{api_keys, quotas, sandboxes, teams, users};
use nestbox_types::api::{self, ApiKey, CreatedApiKey, Member};
use nestbox_types::{ApiKeyId, ErrorCode, SandboxStatus, TeamId, TeamRole, UserId};

use super::users::team_view;
use super::{AuditActor, AuditEntry, validate_name};
use crate::auth;
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

fn not_found(team: TeamId) -> ApiError {
    ApiError::new(ErrorCode::TeamNotFound, format!("team {team} not found"))
}

/// A database error about `team`, as callers see it ("not found" is the team's).
fn team_error(team: TeamId) -> impl FnOnce(nestbox_db::DbError) -> ApiError {
    move |e| {
        if e.is_not_found() {
            not_found(team)
        } else {
            e.into()
        }
    }
}

fn member_view(m: &teams::Member) -> Member {
    Member {
        user_id: m.user.id,
        email: m.user.email.clone(),
        name: m.user.name.clone(),
        role: m.role,
        joined_at: m.joined_at,
    }
}

fn key_view(k: &api_keys::ApiKey) -> ApiKey {
    ApiKey {
        id: k.id,
        team_id: k.team_id,
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        created_at: k.created_at,
        last_used_at: k.last_used_at,
    }
}

impl Services {
    /// The caller's role in `team`; 404 when they are not a member.
    async fn role_in(&self, caller: &Caller, team: TeamId) -> ApiResult<(UserId, TeamRole)> {
        let user = caller.require_user()?;
        if team.is_platform() {
            if caller.actor.is_admin() {
                return Ok((user, TeamRole::Owner));
            }
            return Err(not_found(team));
        }
        let role = teams::membership(&self.db, team, user)
            .await?
            .ok_or_else(|| not_found(team))?;
        Ok((user, role))
    }

    pub(crate) async fn manager_of(&self, caller: &Caller, team: TeamId) -> ApiResult<UserId> {
        let (user, role) = self.role_in(caller, team).await?;
        if !role.can_manage() {
            return Err(ApiError::forbidden(
                "only the team's owner and admins may do this",
            ));
        }
        Ok(user)
    }

    /// A team's quotas and usage: its members, and its own API keys.
    pub async fn team_quotas(&self, caller: &Caller, team: TeamId) -> ApiResult<api::TeamQuotas> {
        if caller.require_user().is_ok() {
            self.role_in(caller, team).await?;
        } else if caller.team != team {
            return Err(not_found(team));
        }
        self.quotas_view(team).await
    }

    /// Any team's quotas and usage (platform admins).
    pub async fn admin_team_quotas(
        &self,
        caller: &Caller,
        team: TeamId,
    ) -> ApiResult<api::TeamQuotas> {
        caller.require_admin()?;
        teams::get(&self.db, team).await.map_err(team_error(team))?;
        self.quotas_view(team).await
    }

    /// Sets a team's quotas (platform admins). Usage above a new limit is left running;
    /// only what would add to it is refused.
    pub async fn set_team_quotas(
        &self,
        caller: &Caller,
        team: TeamId,
        limits: &api::TeamQuotaLimits,
    ) -> ApiResult<api::TeamQuotas> {
        caller.require_admin()?;
        let q = quotas::Quota {
            max_running: limits.max_running,
            max_paused: limits.max_paused,
            max_vcpus: limits.max_vcpus,
            max_memory_mb: limits.max_memory_mb,
            max_disk_mb: limits.max_disk_mb,
            max_templates: limits.max_templates,
        };
        quotas::set(&self.db, team, &q)
            .await
            .map_err(team_error(team))?;
        self.audit(self.team_audit(
            caller,
            team,
            "team.quotas_set",
            "team",
            team.to_string(),
            serde_json::to_value(limits).unwrap_or_default(),
        ))
        .await;
        self.quotas_view(team).await
    }

    /// Every team, with its BYOC flag and counts (platform admins).
    pub async fn list_all_teams(
        &self,
        caller: &Caller,
        page: &nestbox_db::Page,
    ) -> ApiResult<api::Page<api::AdminTeam>> {
        caller.require_admin()?;
        let paged = teams::list_all(&self.db, page).await?;
        Ok(api::Page {
            items: paged
                .items
                .iter()
                .map(|t| api::AdminTeam {
                    id: t.team.id,
                    name: t.team.name.clone(),
                    is_byoc: t.team.is_byoc,
                    members: t.members,
                    hosts: t.hosts,
                    created_at: t.team.created_at,
                })
                .collect(),
            next_cursor: paged.next_cursor,
        })
    }

    /// Lets a team bring its own hosts, or stops it once it has none (platform admins).
    pub async fn set_team_byoc(
        &self,
        caller: &Caller,
        team: TeamId,
        enabled: bool,
    ) -> ApiResult<api::Team> {
        caller.require_admin()?;
        if team.is_platform() {
            return Err(ApiError::invalid(
                "the platform team's hosts are the platform's",
            ));
        }
        if enabled {
            teams::set_byoc(&self.db, team, true)
                .await
                .map_err(team_error(team))?;
        } else if !teams::disable_byoc(&self.db, team)
            .await
            .map_err(team_error(team))?
        {
            return Err(ApiError::conflict(format!(
                "team {team} still has hosts of its own; delete them first"
            )));
        }
        self.audit(self.team_audit(
            caller,
            team,
            "team.byoc_set",
            "team",
            team.to_string(),
            serde_json::json!({ "enabled": enabled }),
        ))
        .await;
        let t = teams::get(&self.db, team).await.map_err(team_error(team))?;
        Ok(team_view(&t))
    }

    async fn quotas_view(&self, team: TeamId) -> ApiResult<api::TeamQuotas> {
        let q = quotas::get(&self.db, team)
            .await
            .map_err(team_error(team))?;
        let u = quotas::usage(&self.db, team).await?;
        Ok(api::TeamQuotas {
            team_id: team,
            limits: api::TeamQuotaLimits {
                max_running: q.max_running,
                max_paused: q.max_paused,
                max_vcpus: q.max_vcpus,
                max_memory_mb: q.max_memory_mb,
                max_disk_mb: q.max_disk_mb,
                max_templates: q.max_templates,
            },
            usage: api::TeamQuotaUsage {
                running: u.running,
                paused: u.paused,
                vcpus: u.vcpus,
                memory_mb: u.memory_mb,
                disk_mb: u.disk_mb,
                templates: u.templates,
            },
        })
    }

    fn team_audit<'a>(
        &self,
        caller: &Caller,
        team: TeamId,
        action: &'a str,
        resource_type: &'a str,
        resource_id: String,
        details: serde_json::Value,
    ) -> AuditEntry<'a> {
        AuditEntry {
            actor: AuditActor::Caller(*caller),
            team: Some(team),
            action,
            resource_type,
            resource_id: Some(resource_id),
            ok: true,
            details,
        }
    }

    /// The caller's teams.
    pub async fn list_teams(&self, caller: &Caller) -> ApiResult<Vec<api::TeamMembership>> {
        let user = caller.require_user()?;
        let list = teams::list_for_user(&self.db, user).await?;
        Ok(list
            .iter()
            .map(|m| api::TeamMembership {
                team: team_view(&m.team),
                role: m.role,
                is_default: m.is_default,
            })
            .collect())
    }

    /// Creates a team owned by the caller.
    pub async fn create_team(&self, caller: &Caller, name: &str) -> ApiResult<api::Team> {
        let user = caller.require_user()?;
        let name = validate_name("name", name)?;
        let team = teams::create_with_owner(&self.db, &name, user).await?;
        self.audit(self.team_audit(
            caller,
            team.id,
            "team.create",
            "team",
            team.id.to_string(),
            serde_json::json!({ "name": name }),
        ))
        .await;
        Ok(team_view(&team))
    }

    /// One team, for its members.
    pub async fn get_team(&self, caller: &Caller, team: TeamId) -> ApiResult<api::Team> {
        self.role_in(caller, team).await?;
        Ok(team_view(
            &teams::get(&self.db, team)
                .await
                .map_err(|_| not_found(team))?,
        ))
    }

    /// Renames a team.
    pub async fn rename_team(
        &self,
        caller: &Caller,
        team: TeamId,
        name: &str,
    ) -> ApiResult<api::Team> {
        self.manager_of(caller, team).await?;
        let name = validate_name("name", name)?;
        teams::rename(&self.db, team, &name).await?;
        self.audit(self.team_audit(
            caller,
            team,
            "team.rename",
            "team",
            team.to_string(),
            serde_json::json!({ "name": name }),
        ))
        .await;
        self.get_team(caller, team).await
    }

    /// Deletes a team (owner only; no live sandboxes).
    pub async fn delete_team(&self, caller: &Caller, team: TeamId) -> ApiResult<()> {
        let (_, role) = self.role_in(caller, team).await?;
        if team.is_platform() {
            return Err(ApiError::forbidden("the platform team cannot be deleted"));
        }
        if role != TeamRole::Owner {
            return Err(ApiError::forbidden("only the team's owner may delete it"));
        }
        let holding: Vec<SandboxStatus> = SandboxStatus::ALL
            .iter()
            .copied()
            .filter(SandboxStatus::holds_host_resources)
            .collect();
        let live = sandboxes::list_for_team(
            &self.db,
            team,
            &sandboxes::SandboxFilter {
                statuses: holding,
                metadata: vec![],
            },
            &nestbox_db::Page::first(1),
        )
        .await?;
        if !live.items.is_empty() {
            return Err(ApiError::conflict(
                "the team still has sandboxes; destroy them first",
            ));
        }
        teams::soft_delete(&self.db, team).await?;
        self.audit(self.team_audit(
            caller,
            team,
            "team.delete",
            "team",
            team.to_string(),
            serde_json::json!({}),
        ))
        .await;
        Ok(())
    }

    /// Members of a team.
    pub async fn list_members(&self, caller: &Caller, team: TeamId) -> ApiResult<Vec<Member>> {
        self.role_in(caller, team).await?;
        Ok(teams::list_members(&self.db, team)
            .await?
            .iter()
            .map(member_view)
            .collect())
    }

    async fn member(&self, team: TeamId, user: UserId) -> ApiResult<Member> {
        teams::list_members(&self.db, team)
            .await?
            .iter()
            .find(|m| m.user.id == user)
            .map(member_view)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::UserNotFound, format!("{user} is not a member"))
            })
    }

    /// Adds an existing user to a team.
    pub async fn add_member(
        &self,
        caller: &Caller,
        team: TeamId,
        req: &api::AddMemberRequest,
    ) -> ApiResult<Member> {
        self.manager_of(caller, team).await?;
        if team.is_platform() {
            return Err(ApiError::invalid(
                "the platform team has no members: platform admins act for it",
            ));
        }
        let role = req.role.unwrap_or(TeamRole::Member);
        if role == TeamRole::Owner {
            return Err(ApiError::invalid(
                "a team has one owner; add members as `admin` or `member`",
            ));
        }
        let user = users::get_by_email(&self.db, &req.email)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::UserNotFound, "no user with this email"))?;
        teams::add_member(&self.db, team, user.id, role)
            .await
            .map_err(|e| {
                if e.is_conflict() {
                    ApiError::new(ErrorCode::AlreadyExists, "the user is already a member")
                } else {
                    e.into()
                }
            })?;
        self.audit(self.team_audit(
            caller,
            team,
            "member.add",
            "user",
            user.id.to_string(),
            serde_json::json!({ "role": role }),
        ))
        .await;
        self.member(team, user.id).await
    }

    /// Changes a member's role.
    pub async fn set_member_role(
        &self,
        caller: &Caller,
        team: TeamId,
        user: UserId,
        role: TeamRole,
    ) -> ApiResult<Member> {
        self.manager_of(caller, team).await?;
        if role == TeamRole::Owner {
            return Err(ApiError::invalid(
                "ownership cannot be given through a role change",
            ));
        }
        let current = teams::membership(&self.db, team, user)
            .await?
            .ok_or_else(|| {
                ApiError::new(ErrorCode::UserNotFound, format!("{user} is not a member"))
            })?;
        if current == TeamRole::Owner {
            return Err(ApiError::forbidden("the owner's role cannot change"));
        }
        teams::set_role(&self.db, team, user, role).await?;
        self.audit(self.team_audit(
            caller,
            team,
            "member.role",
            "user",
            user.to_string(),
            serde_json::json!({ "role": role }),
        ))
        .await;
        self.member(team, user).await
    }

    /// Removes a member (managers), or leaves (the member themselves). Returns the caller
    /// acting for that team (for a rotation of its sandboxes' tokens that follows).
    pub async fn remove_member(
        &self,
        caller: &Caller,
        team: TeamId,
        user: UserId,
    ) -> ApiResult<Caller> {
        let (me, my_role) = self.role_in(caller, team).await?;
        if me != user && !my_role.can_manage() {
            return Err(ApiError::forbidden(
                "only the team's owner and admins may remove members",
            ));
        }
        let target = teams::membership(&self.db, team, user)
            .await?
            .ok_or_else(|| {
                ApiError::new(ErrorCode::UserNotFound, format!("{user} is not a member"))
            })?;
        if target == TeamRole::Owner {
            return Err(ApiError::forbidden("the owner cannot be removed"));
        }
        teams::remove_member(&self.db, team, user).await?;
        let action = if me == user {
            "member.leave"
        } else {
            "member.remove"
        };
        self.audit(self.team_audit(
            caller,
            team,
            action,
            "user",
            user.to_string(),
            serde_json::json!({}),
        ))
        .await;
        Ok(Caller {
            actor: caller.actor,
            team,
            role: my_role,
        })
    }

    /// API keys of a team.
    pub async fn list_api_keys(&self, caller: &Caller, team: TeamId) -> ApiResult<Vec<ApiKey>> {
        self.role_in(caller, team).await?;
        Ok(api_keys::list_for_team(&self.db, team)
            .await?
            .iter()
            .map(key_view)
            .collect())
    }

    /// Creates an API key; the secret is returned once.
    pub async fn create_api_key(
        &self,
        caller: &Caller,
        team: TeamId,
        name: &str,
    ) -> ApiResult<CreatedApiKey> {
        let user = self.manager_of(caller, team).await?;
        let name = validate_name("name", name)?;
        self.create_api_key_unchecked(team, &name, Some(user), Some(caller))
            .await
    }

    /// Creates an API key without an authorization check (first-run bootstrap).
    pub async fn create_api_key_unchecked(
        &self,
        team: TeamId,
        name: &str,
        by: Option<UserId>,
        caller: Option<&Caller>,
    ) -> ApiResult<CreatedApiKey> {
        let (key, hash, prefix) = auth::new_api_key()?;
        let record = api_keys::create(
            &self.db,
            &api_keys::NewApiKey {
                team_id: team,
                name: name.to_string(),
                prefix,
                key_hash: hash,
                created_by: by,
            },
        )
        .await?;
        let actor = match caller {
            Some(c) => AuditActor::Caller(*c),
            None => AuditActor::System,
        };
        self.audit(AuditEntry {
            actor,
            team: Some(team),
            action: "api_key.create",
            resource_type: "api_key",
            resource_id: Some(record.id.to_string()),
            ok: true,
            details: serde_json::json!({ "name": name }),
        })
        .await;
        Ok(CreatedApiKey {
            api_key: key_view(&record),
            key,
        })
    }

    /// Revokes an API key.
    pub async fn delete_api_key(
        &self,
        caller: &Caller,
        team: TeamId,
        key: ApiKeyId,
    ) -> ApiResult<Caller> {
        self.manager_of(caller, team).await?;
        if !api_keys::delete(&self.db, team, key).await? {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("API key {key} not found"),
            ));
        }
        self.audit(self.team_audit(
            caller,
            team,
            "api_key.delete",
            "api_key",
            key.to_string(),
            serde_json::json!({}),
        ))
        .await;
        // A manager of the team (its owner or an admin).
        Ok(Caller {
            actor: caller.actor,
            team,
            role: TeamRole::Admin,
        })
    }
}
