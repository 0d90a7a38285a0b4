//! OCI images made into image templates on this host (`ResolveImage`, `ImportImage`).
//!
//! An import resolves the reference (pinned by the control plane to the digest it
//! resolved), fetches the layers into the machine's blob cache (`<data>/oci/sha256/…`:
//! a layer shared by images, or pulled again, is fetched once), applies them to a tree
//! inside the template's staging directory, adds the guest agent (taken from the
//! initramfs it boots with: stage 1 and stage 2 are one binary) and our user and files,
//! packs the tree into a shrunk ext4 image and commits the template. The tree is
//! removed before the commit; a failure removes the staging directory, so a template
//! appears whole or not at all.
//!
//! Where the host may fetch from is [`nestbox_oci::AccessPolicy`]'s decision: HTTPS to
//! public addresses, except the registries the operator listed as insecure
//! ([`crate::AgentConfig::insecure_registries`]).
//!
//! Layers are untrusted: unpacking them never writes outside the tree (see
//! [`nestbox_oci::unpack`]), adding our files never follows one of the tree's links (see
//! [`nestbox_image::rootfs::customize`]), and `mkfs.ext4 -d` only reads the tree.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use nestbox_oci::{AccessPolicy, BlobCache, Credentials, Limits, OciError, Reference, Registry};
use nestbox_proto::hostagent::{RegistryCredentials, ResolveImageResponse};
use nestbox_types::TemplateId;

use crate::AgentConfig;
use crate::error::AgentError;
use crate::templates::{Kind, StoredTemplate, TemplateRecord, TemplateStore};

/// The built-in template whose kernel (and initramfs) image templates boot with.
const KERNEL_FROM: &str = "minimal";
/// A cached layer no pull used for this long is removed.
const BLOB_MAX_IDLE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a registry's answer means to the caller: this host's own failure is internal;
/// everything else (a bad reference or image, no such image, access refused, the registry
/// unreachable or failing) is told to the caller with its causes — it is about the
/// reference they gave.
fn image_error(reference: &str, e: OciError) -> AgentError {
    let mut msg = format!("image {reference}: {e}");
    let mut next = std::error::Error::source(&e);
    while let Some(s) = next {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        next = s.source();
    }
    if matches!(e, OciError::Io { .. }) {
        AgentError::Internal(msg)
    } else {
        AgentError::Invalid(msg)
    }
}

fn credentials(c: Option<RegistryCredentials>) -> Option<Credentials> {
    c.filter(|c| !c.username.is_empty() || !c.password.is_empty())
        .map(|c| Credentials {
            username: c.username,
            password: c.password,
        })
}

fn registry(
    cfg: &AgentConfig,
    reference: &str,
    creds: Option<RegistryCredentials>,
) -> Result<Registry, AgentError> {
    let parsed = Reference::parse(reference).map_err(|e| image_error(reference, e))?;
    Registry::new(
        parsed,
        credentials(creds),
        AccessPolicy {
            insecure: cfg.insecure_registries.clone(),
        },
    )
    .map_err(|e| image_error(reference, e))
}

/// Resolves `reference` to its linux/amd64 manifest and configuration.
pub async fn resolve(
    cfg: &AgentConfig,
    reference: &str,
    creds: Option<RegistryCredentials>,
) -> Result<ResolveImageResponse, AgentError> {
    let reg = registry(cfg, reference, creds)?;
    let image = reg.resolve().await.map_err(|e| image_error(reference, e))?;
    let run = image.config.config.clone().unwrap_or_default();
    Ok(ResolveImageResponse {
        pinned: image.reference.to_string(),
        digest: image.digest.clone(),
        env: run.env_pairs().into_iter().collect(),
        workdir: run.working_dir.clone().unwrap_or_default(),
        user: run.user.clone().unwrap_or_default(),
        entrypoint: run.entrypoint.clone().unwrap_or_default(),
        cmd: run.cmd.clone().unwrap_or_default(),
        layers: u32::try_from(image.manifest.layers.len()).unwrap_or(u32::MAX),
        size_bytes: image
            .manifest
            .layers
            .iter()
            .fold(0u64, |sum, l| sum.saturating_add(l.size)),
    })
}

/// What an import needs of the agent.
pub struct ImportContext<'a> {
    /// The configuration (data directory, registry policy).
    pub cfg: &'a AgentConfig,
    /// Built-in templates and kernels.
    pub images: &'a nestbox_image::ImageStore,
    /// Where the template goes.
    pub templates: &'a TemplateStore,
}

/// Makes the image template `template` from `reference`.
pub async fn import(
    ctx: ImportContext<'_>,
    reference: &str,
    creds: Option<RegistryCredentials>,
    template: TemplateId,
) -> Result<StoredTemplate, AgentError> {
    let began = std::time::Instant::now();
    let reg = registry(ctx.cfg, reference, creds)?;
    let image = reg.resolve().await.map_err(|e| image_error(reference, e))?;
    let cache =
        BlobCache::new(ctx.cfg.data_dir.join("oci")).map_err(|e| image_error(reference, e))?;
    let layers = cache
        .fetch_layers(&reg, &image)
        .await
        .map_err(|e| image_error(reference, e))?;
    let pruned = cache.prune(BLOB_MAX_IDLE);
    if pruned > 0 {
        tracing::info!(layers = pruned, "unused image layers removed");
    }
    let (_, kernel) = ctx
        .images
        .template_with_kernel(KERNEL_FROM)
        .map_err(|e| AgentError::Internal(format!("the kernel for image templates: {e}")))?;

    let key = template.to_string();
    let staging = ctx.templates.staging(&key)?;
    let built = build(&staging, &layers, &kernel.initramfs).await;
    let result = built.and_then(|disk_mb| {
        let record = TemplateRecord {
            format_version: crate::templates::TEMPLATE_FORMAT,
            key: key.clone(),
            kind: Kind::Image,
            base_template: KERNEL_FROM.to_string(),
            vcpus: nestbox_types::limits::DEFAULT_VCPUS,
            memory_mb: nestbox_types::limits::DEFAULT_MEMORY_MB,
            disk_size_mb: disk_mb,
            kernel_version: kernel.manifest.kernel_version.clone(),
            access_token: None,
            size_bytes: 0,
            created_at: Utc::now(),
            move_of: None,
        };
        ctx.templates.commit(&staging, record)
    });
    match result {
        Ok(stored) => {
            tracing::info!(template = %template, image = %image.reference, layers = layers.len(), disk_mb = stored.record.disk_size_mb, ms = began.elapsed().as_millis() as u64, "image template made");
            Ok(stored)
        }
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            Err(e)
        }
    }
}

/// Fills `staging` with `rootfs.ext4`; returns the smallest disk it needs, MiB.
async fn build(
    staging: &Path,
    layers: &[std::path::PathBuf],
    initramfs: &Path,
) -> Result<u32, AgentError> {
    // The unpacked tree holds what the image chose (setuid files, world-writable
    // directories): inside a directory only root may enter, and gone before the commit.
    let private = staging.join("unpack");
    let tree = private.join("tree");
    let guest = private.join("nestbox-guest");
    let out = staging.join(crate::templates::ROOTFS_FILE);
    {
        let (private, tree, guest, layers, initramfs) = (
            private.clone(),
            tree.clone(),
            guest.clone(),
            layers.to_vec(),
            initramfs.to_path_buf(),
        );
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            std::fs::create_dir(&private)
                .and_then(|()| {
                    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| AgentError::Internal(format!("making the image tree: {e}")))?;
            std::fs::create_dir(&tree)
                .map_err(|e| AgentError::Internal(format!("making the image tree: {e}")))?;
            std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| AgentError::Internal(format!("making the image tree: {e}")))?;
            let applied = nestbox_oci::apply_layers(&tree, &layers, &Limits::default())
                .map_err(|e| image_error("layers", e))?;
            tracing::debug!(?applied, "layers applied");
            let bin = nestbox_image::initramfs::read_member(&initramfs, "init")
                .map_err(|e| AgentError::Internal(format!("the guest agent: {e}")))?;
            std::fs::write(&guest, bin)
                .map_err(|e| AgentError::Internal(format!("the guest agent: {e}")))?;
            nestbox_image::rootfs::customize(&tree, &guest, nestbox_image::DEFAULT_HOSTNAME)
                .map_err(|e| match e {
                    nestbox_image::ImageError::BadTree(why) => {
                        AgentError::Invalid(format!("the image cannot be a template: {why}"))
                    }
                    other => AgentError::Internal(format!("adding the guest agent: {other}")),
                })
        })
        .await
        .map_err(|e| AgentError::Internal(format!("image task failed: {e}")))??;
    }
    let info = nestbox_image::ext4::pack(&tree, &out)
        .await
        .map_err(|e| AgentError::Internal(format!("packing the image's root filesystem: {e}")))?;
    // The tree and the guest copy go; the template is its disk alone.
    tokio::fs::remove_dir_all(&private)
        .await
        .map_err(|e| AgentError::Internal(format!("removing the image tree: {e}")))?;
    Ok(u32::try_from(crate::sandbox::min_disk_mb(info.size_bytes)).unwrap_or(u32::MAX))
}
