//! OCI images for template builds: resolved and imported by a host that may take the
//! team's sandboxes (a BYOC team's own hosts, every other team the platform's), which
//! fetches from the registry within its own policy (see the agent's `oci` module).
//!
//! An imported image is a hidden image template of the team (ephemeral, never listed),
//! recorded in the step cache under a key of the image's digest, so that the next build
//! from the same image starts from it without a pull; the cache's pruning removes it like
//! any other entry. Registry credentials are passed through to the host and never stored.

use nestbox_db::templates;
use nestbox_proto::hostagent::{
    ImportImageRequest, RegistryCredentials, ResolveImageRequest, ResolveImageResponse,
};
use nestbox_types::api::RegistryAuth;
use nestbox_types::{ErrorCode, HostId, TeamId, TemplateId, TemplateKind};

use super::templates::discard;
use crate::error::{ApiError, ApiResult, from_agent};
use crate::extract::Caller;
use crate::hostpool::AgentClient;
use crate::state::Services;

/// How long a host may take to pull and unpack an image.
const IMPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);
/// How long resolving an image may take.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn credentials(auth: Option<&RegistryAuth>) -> Option<RegistryCredentials> {
    auth.map(|a| RegistryCredentials {
        username: a.username.clone(),
        password: a.password.clone(),
    })
}

/// Checks an image reference's syntax (what a host would refuse at once).
pub fn check_reference(reference: &str) -> ApiResult<()> {
    nestbox_oci::Reference::parse(reference)
        .map(|_| ())
        .map_err(|e| ApiError::invalid(e.to_string()))
}

impl Services {
    /// The least loaded host that may take `team`'s sandboxes, and its client.
    async fn image_host(&self, team: TeamId) -> ApiResult<(HostId, AgentClient)> {
        let host = self
            .candidates(team)
            .await?
            .into_iter()
            .min_by_key(|c| c.sandboxes)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NoCapacity,
                    "no host is online to fetch the image",
                )
            })?;
        Ok((host.host, self.pool.client(host.host, &host.address)?))
    }

    /// Resolves `reference` to its linux/amd64 manifest and configuration, on a host of
    /// the team; returns that host too (the import goes there).
    pub(crate) async fn resolve_image(
        &self,
        team: TeamId,
        reference: &str,
        auth: Option<&RegistryAuth>,
    ) -> ApiResult<(HostId, ResolveImageResponse)> {
        check_reference(reference)?;
        let (host, mut client) = self.image_host(team).await?;
        let mut rpc = tonic::Request::new(ResolveImageRequest {
            reference: reference.to_string(),
            credentials: credentials(auth),
        });
        rpc.set_timeout(RESOLVE_TIMEOUT);
        let resolved = client
            .resolve_image(rpc)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner();
        Ok((host, resolved))
    }

    /// Imports the pinned image `pinned` on `host` as the hidden image template `name` of
    /// the caller's team.
    pub(crate) async fn import_image(
        &self,
        caller: &Caller,
        host: HostId,
        pinned: &str,
        auth: Option<&RegistryAuth>,
        name: String,
    ) -> ApiResult<templates::Template> {
        let (host, mut client) = self.agent_for(Some(host)).await?;
        let id = TemplateId::new();
        let mut rpc = tonic::Request::new(ImportImageRequest {
            reference: pinned.to_string(),
            credentials: credentials(auth),
            template_id: id.to_string(),
        });
        rpc.set_timeout(IMPORT_TIMEOUT);
        let made = client
            .import_image(rpc)
            .await
            .map_err(|s| from_agent(&s))?
            .into_inner()
            .template
            .ok_or_else(|| ApiError::new(ErrorCode::AgentError, "the host made no template"))?;
        let new = templates::NewTemplate {
            team_id: caller.team,
            name,
            kind: TemplateKind::Image,
            vcpus: made.vcpus,
            memory_mb: made.memory_mb,
            disk_size_mb: made.min_disk_mb,
            size_bytes: made.size_bytes,
            host_id: Some(host),
            created_by: Some(caller.actor.id_string()),
            source_sandbox_id: None,
            ephemeral: true,
        };
        match templates::create_with_id(&self.db, id, &new).await {
            Ok(t) => Ok(t),
            Err(e) => {
                discard(&client, host, id, self.cfg.template_timeout).await;
                Err(e.into())
            }
        }
    }
}
