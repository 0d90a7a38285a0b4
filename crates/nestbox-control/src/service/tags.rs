//! Template tags: `name:tag` names one build of a team's template.
//!
//! A build gives its template the tags it was asked for (`default` unless others were
//! named; see [`super::builds`]). Here tags are listed, moved to the build another tag
//! names, and taken off. Rules:
//! - `default` is the template `name` itself: moving it makes another build that template
//!   (the one it replaces stays, hidden, while sandboxes or other tags hold it), and taking
//!   it off hides the template `name` (its sandboxes carry on, its other tags keep it);
//! - builds no tag and no sandbox holds any more are deleted by the monitor's sweep of
//!   hidden templates ([`Services::sweep_fork_templates`]);
//! - a team tags only its own templates; the platform team's tags need a platform admin
//!   (never an API key), as its templates do;
//! - every change is audited.

use nestbox_db::{builds, tags, templates};
use nestbox_types::ErrorCode;
use nestbox_types::api::TemplateTag;
use nestbox_types::limits::{DEFAULT_TAG, is_valid_template_name, is_valid_template_tag};

use super::AuditEntry;
use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// Most tags one request (or build) names.
pub const MAX_TAGS: usize = 10;

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::TemplateNotFound,
        format!(
            "template `{}` not found",
            name.chars().take(80).collect::<String>()
        ),
    )
}

fn check_name(name: &str) -> ApiResult<()> {
    if is_valid_template_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name must be 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
        ))
    }
}

/// Tags as asked for: each checked, at most [`MAX_TAGS`], without repeats (in the order
/// asked).
pub(crate) fn checked_tags(asked: &[String]) -> ApiResult<Vec<String>> {
    if asked.len() > MAX_TAGS {
        return Err(ApiError::limit("tags", MAX_TAGS, ""));
    }
    let mut out: Vec<String> = Vec::new();
    for tag in asked {
        if !is_valid_template_tag(tag) {
            return Err(ApiError::invalid(format!(
                "tag `{}` is not valid: 1–64 letters, digits, `.`, `_` or `-`, starting with a letter or digit",
                tag.chars().take(80).collect::<String>()
            )));
        }
        if !out.contains(tag) {
            out.push(tag.clone());
        }
    }
    Ok(out)
}

/// The tags of a request that changes tags: [`checked_tags`], at least one.
fn check_tags(asked: &[String]) -> ApiResult<Vec<String>> {
    let tags = checked_tags(asked)?;
    if tags.is_empty() {
        return Err(ApiError::invalid("name at least one tag"));
    }
    Ok(tags)
}

impl Services {
    /// Only platform admins change the platform team's tags.
    fn may_tag(&self, caller: &Caller) -> ApiResult<()> {
        if caller.team.is_platform() && !caller.actor.is_admin() {
            return Err(ApiError::forbidden(
                "templates of the platform team are every team's; only platform admins may tag them",
            ));
        }
        Ok(())
    }

    async fn tag_view(
        &self,
        tag: String,
        t: &templates::Template,
        at: chrono::DateTime<chrono::Utc>,
    ) -> ApiResult<TemplateTag> {
        Ok(TemplateTag {
            tag,
            template_id: t.id,
            build_id: builds::made(&self.db, t.id).await?,
            created_at: at,
        })
    }

    /// The tags of a template name the caller's team sees (its own, else the
    /// platform's): `default` first when there is a template `name`, then the others by
    /// tag. `404` if the name has neither.
    pub async fn template_tags(&self, caller: &Caller, name: &str) -> ApiResult<Vec<TemplateTag>> {
        check_name(name)?;
        let visible = templates::get_visible(&self.db, caller.team, name).await?;
        // The team's own name shadows the platform's, tags and all.
        let owner = match &visible {
            Some(t) => t.team_id,
            None => caller.team,
        };
        let mut out = Vec::new();
        if let Some(t) = &visible {
            out.push(self.tag_view(DEFAULT_TAG.into(), t, t.updated_at).await?);
        }
        for tag in tags::list(&self.db, owner, name).await? {
            let t = templates::get(&self.db, tag.template_id).await?;
            out.push(self.tag_view(tag.tag, &t, tag.created_at).await?);
        }
        if out.is_empty() {
            return Err(not_found(name));
        }
        Ok(out)
    }

    /// Points `tags` of the team's template `name` at the build its tag `from` names;
    /// returns that build's tags afterwards.
    pub async fn assign_template_tags(
        &self,
        caller: &Caller,
        name: &str,
        from: &str,
        asked: &[String],
    ) -> ApiResult<(templates::Template, Vec<String>)> {
        check_name(name)?;
        if !is_valid_template_tag(from) {
            return Err(ApiError::invalid(format!(
                "tag `{}` is not valid",
                from.chars().take(80).collect::<String>()
            )));
        }
        let wanted = check_tags(asked)?;
        self.may_tag(caller)?;
        let source = if from == DEFAULT_TAG {
            templates::get_visible(&self.db, caller.team, name).await?
        } else {
            tags::resolve(&self.db, caller.team, name, from).await?
        }
        .ok_or_else(|| not_found(&format!("{name}:{from}")))?;
        if source.team_id != caller.team {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("`{name}` is the name of a platform template; tag a template of your own"),
            ));
        }
        let left = tags::assign(&self.db, caller.team, name, source.id, &wanted).await?;
        for id in left {
            self.release_template(id).await;
        }
        self.audit(AuditEntry {
            actor: super::AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "template.tag",
            resource_type: "template",
            resource_id: Some(source.id.to_string()),
            ok: true,
            details: serde_json::json!({ "name": name, "from": from, "tags": wanted }),
        })
        .await;
        Ok((source, wanted))
    }

    /// Takes `tags` off the team's template `name` (`default` hides the template `name`
    /// itself; its sandboxes carry on). `404` if the name has none of them.
    pub async fn remove_template_tags(
        &self,
        caller: &Caller,
        name: &str,
        asked: &[String],
    ) -> ApiResult<()> {
        check_name(name)?;
        let wanted = check_tags(asked)?;
        self.may_tag(caller)?;
        if let Some(t) = templates::get_visible(&self.db, caller.team, name).await?
            && t.team_id != caller.team
        {
            return Err(ApiError::forbidden(format!(
                "`{name}` is a platform template; its tags are the platform's"
            )));
        }
        let left = tags::remove(&self.db, caller.team, name, &wanted).await?;
        if left.is_empty() {
            return Err(ApiError::new(
                ErrorCode::TemplateNotFound,
                format!(
                    "template `{name}` has none of the tags {}",
                    wanted.join(", ")
                ),
            ));
        }
        self.audit(AuditEntry {
            actor: super::AuditActor::Caller(*caller),
            team: Some(caller.team),
            action: "template.untag",
            resource_type: "template",
            resource_id: None,
            ok: true,
            details: serde_json::json!({ "name": name, "tags": wanted }),
        })
        .await;
        for id in left {
            self.release_template(id).await;
        }
        Ok(())
    }
}
