//! Templates: what teams may start sandboxes from.
//!
//! Platform image templates are discovered from the hosts: an agent reports the templates
//! it can boot, and [`Services::sync_host_templates`] records them as platform templates
//! (visible to every team). A team sees its own templates and the platform's.

use nestbox_db::templates;
use nestbox_proto::hostagent::PingRequest;
use nestbox_types::api::{self, Template};
use nestbox_types::{HostId, PLATFORM_TEAM, TemplateKind};

use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::state::Services;

/// API view of a template.
pub fn template_view(t: &templates::Template) -> Template {
    Template {
        id: t.id,
        name: t.name.clone(),
        team_id: t.team_id,
        platform: t.team_id.is_platform(),
        kind: t.kind,
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        size_bytes: t.size_bytes,
        created_at: t.created_at,
    }
}

impl Services {
    /// Templates visible to the caller's team.
    pub async fn list_templates(&self, caller: &Caller) -> ApiResult<api::Page<Template>> {
        let list = templates::list_visible(&self.db, caller.team).await?;
        Ok(api::Page {
            items: list.iter().map(template_view).collect(),
            next_cursor: None,
        })
    }

    /// Asks a host which templates it can boot and records them as platform templates.
    pub async fn sync_host_templates(&self, host: HostId, address: &str) -> ApiResult<usize> {
        let mut client = self.pool.client(host, address)?;
        let mut req = tonic::Request::new(PingRequest {});
        req.set_timeout(std::time::Duration::from_secs(10));
        let ping = client
            .ping(req)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        let mut n = 0;
        for info in &ping.template_infos {
            if info.kind != "image" {
                continue;
            }
            if !nestbox_types::limits::is_valid_template_name(&info.name) {
                tracing::warn!(host = %host, name = %info.name, "host reports an invalid template name; ignored");
                continue;
            }
            let existing = templates::get_visible(&self.db, PLATFORM_TEAM, &info.name).await?;
            let unchanged = existing.as_ref().is_some_and(|t| {
                t.team_id.is_platform()
                    && t.disk_size_mb == info.min_disk_mb
                    && t.size_bytes == info.size_bytes
            });
            if unchanged {
                continue;
            }
            templates::upsert(
                &self.db,
                &templates::NewTemplate {
                    team_id: PLATFORM_TEAM,
                    name: info.name.clone(),
                    kind: TemplateKind::Image,
                    vcpus: nestbox_types::limits::DEFAULT_VCPUS,
                    memory_mb: nestbox_types::limits::DEFAULT_MEMORY_MB,
                    disk_size_mb: info.min_disk_mb,
                    size_bytes: info.size_bytes,
                    host_id: None,
                    created_by: None,
                },
            )
            .await
            .map_err(ApiError::from)?;
            n += 1;
        }
        if n > 0 {
            tracing::info!(host = %host, templates = n, "platform templates updated");
        }
        Ok(n)
    }
}
