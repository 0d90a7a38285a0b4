//! Reading the audit log.
//!
//! Rules:
//! - `scope=team` (the default) lists the caller's team's entries and needs the team's owner
//!   or an admin (`forbidden` otherwise, API keys included: they act as members);
//! - `scope=platform` lists entries of no team (host registrations, host failures, user
//!   administration) and needs a platform admin (`forbidden` otherwise);
//! - `resource_type` and `action` filter by exact match; they are validated (lower-case
//!   letters, digits, `_`, and `.` in actions; at most 64 characters) so a typo is an
//!   `invalid_request`, not an empty page;
//! - pages are keyset-paginated like every list (`limit` 1–200, default 50; `cursor`).

use nestbox_db::audit::{self, AuditFilter, AuditScope};
use nestbox_types::api::{AuditLog, AuditLogQuery, Page};

use crate::error::{ApiError, ApiResult};
use crate::extract::Caller;
use crate::state::Services;

/// Longest `resource_type` or `action` filter.
const MAX_FILTER: usize = 64;

fn validate_filter(field: &str, value: Option<&str>, extra: &[char]) -> ApiResult<Option<String>> {
    let Some(v) = value else { return Ok(None) };
    let valid = !v.is_empty()
        && v.len() <= MAX_FILTER
        && v.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || extra.contains(&c)
        });
    if valid {
        Ok(Some(v.to_string()))
    } else {
        Err(ApiError::invalid(format!(
            "{field}: must be 1–{MAX_FILTER} lower-case letters, digits or `_`{}",
            if extra.is_empty() { "" } else { " (and `.`)" }
        )))
    }
}

/// The scope a caller asked for, once they are allowed to see it.
fn scope(caller: &Caller, asked: Option<&str>) -> ApiResult<AuditScope> {
    match asked {
        None | Some("team") => {
            if caller.role.can_manage() {
                Ok(AuditScope::Team(caller.team))
            } else {
                Err(ApiError::forbidden(
                    "only the team's owner and admins may read its audit log",
                ))
            }
        }
        Some("platform") => {
            caller.require_admin()?;
            Ok(AuditScope::Platform)
        }
        Some(_) => Err(ApiError::invalid("scope: must be `team` or `platform`")),
    }
}

impl Services {
    /// A page of the audit log, newest first.
    #[tracing::instrument(skip(self, caller, q), fields(team = %caller.team))]
    pub async fn audit_logs(
        &self,
        caller: &Caller,
        q: &AuditLogQuery,
    ) -> ApiResult<Page<AuditLog>> {
        let filter = AuditFilter {
            resource_type: validate_filter("resource_type", q.resource_type.as_deref(), &[])?,
            action: validate_filter("action", q.action.as_deref(), &['.'])?,
        };
        let scope = scope(caller, q.scope.as_deref())?;
        let page = nestbox_db::Page {
            limit: q.limit.unwrap_or(50).clamp(1, 200),
            cursor: q.cursor.clone(),
        };
        let paged = audit::list(&self.db, scope, &filter, &page).await?;
        Ok(Page {
            items: paged
                .items
                .into_iter()
                .map(|a| AuditLog {
                    id: a.id,
                    team_id: a.team_id,
                    actor_type: a.actor_type.to_string(),
                    actor_id: a.actor_id,
                    action: a.action,
                    resource_type: a.resource_type,
                    resource_id: a.resource_id,
                    status: a.status.to_string(),
                    details: a.details,
                    created_at: a.created_at,
                })
                .collect(),
            next_cursor: paged.next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_validated() {
        assert_eq!(validate_filter("f", None, &[]).unwrap(), None);
        assert_eq!(
            validate_filter("action", Some("sandbox.create"), &['.']).unwrap(),
            Some("sandbox.create".into())
        );
        assert!(validate_filter("resource_type", Some("sandbox.x"), &[]).is_err());
        assert!(validate_filter("f", Some(""), &[]).is_err());
        assert!(validate_filter("f", Some("Sandbox"), &[]).is_err());
        assert!(validate_filter("f", Some(&"a".repeat(65)), &[]).is_err());
        assert!(validate_filter("f", Some("a' OR 1=1"), &['.']).is_err());
    }
}
