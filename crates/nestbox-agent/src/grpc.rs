//! The agent's gRPC service (`nestbox.hostagent.v1.HostAgent`): parses requests, calls the
//! [`Manager`] or the sandbox's guest agent, maps errors once (via [`AgentError`]).
//!
//! Every call must carry a control-plane token for this host (see
//! [`nestbox_proto::auth`]); [`Authenticator`] rejects anything else before a handler runs.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use nestbox_envd::client::EnvdClient;
use nestbox_envd::filesystem::{self as fs, FileType as EnvdFileType};
use nestbox_proto::hostagent::host_agent_server::HostAgent;
use nestbox_proto::hostagent::*;
use nestbox_types::{HostId, SandboxId, TeamId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::AgentError;
use crate::guest::{self, ExecParams};
use crate::metrics::{Series, Tier};
use crate::processes;
use crate::sandbox::{CreateParams, Manager, SandboxHandle, State};

/// Chunk size of file downloads.
const READ_CHUNK: usize = 256 * 1024;

/// Checks the control plane's bearer token on every call.
#[derive(Clone)]
pub struct Authenticator {
    host: HostId,
    key: String,
}

impl Authenticator {
    /// Accepts tokens issued for `host` with `key`.
    pub fn new(host: HostId, key: String) -> Self {
        Self { host, key }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing control-plane token"))?;
        nestbox_proto::auth::verify(&self.key, self.host, token)
            .map_err(|_| Status::unauthenticated("invalid control-plane token"))?;
        Ok(req)
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct Service {
    manager: Manager,
    host: HostId,
}

impl Service {
    /// A service over `manager` for `host`.
    pub fn new(manager: Manager, host: HostId) -> Self {
        Self { manager, host }
    }
}

/// Egress rules off the wire (absent: none).
fn egress_rules(rules: Option<EgressRules>) -> nestbox_types::egress::EgressRules {
    let rules = rules.unwrap_or_default();
    nestbox_types::egress::EgressRules {
        allow_out: rules.allow_out,
        deny_out: rules.deny_out,
    }
}

fn parse_sandbox(s: &str) -> Result<SandboxId, Status> {
    s.parse()
        .map_err(|e: nestbox_types::IdParseError| Status::invalid_argument(e.to_string()))
}

fn parse_template(s: &str) -> Result<nestbox_types::TemplateId, Status> {
    s.parse()
        .map_err(|e: nestbox_types::IdParseError| Status::invalid_argument(e.to_string()))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn info(h: &SandboxHandle, vmm: &str) -> SandboxInfo {
    let f = &h.facts;
    SandboxInfo {
        sandbox_id: f.id.to_string(),
        team_id: f.team.to_string(),
        state: match h.state() {
            State::Starting | State::Resuming => SandboxState::Starting,
            State::Running | State::Pausing | State::Snapshotting => SandboxState::Running,
            State::Paused => SandboxState::Paused,
            State::Stopping => SandboxState::Stopping,
        } as i32,
        template: f.template.clone(),
        vcpus: f.vcpus,
        memory_mb: f.memory_mb,
        disk_size_mb: f.disk_size_mb,
        started_at_unix_ms: f.started_at.timestamp_millis(),
        guest_agent_version: h.guest_version(),
        vmm: vmm.to_string(),
        kernel_version: f.kernel_version.clone(),
        boot_ms: ms(f.boot),
        timeout_sec: f.timeout_sec,
        last_active_unix_ms: h.last_active_ms(),
        auto_paused: h.auto_paused(),
        started_by: f.started_by.as_str().to_string(),
    }
}

/// A team template stored here, as the control plane sees it.
pub(crate) fn template_info(t: &crate::templates::StoredTemplate) -> TemplateInfo {
    let r = &t.record;
    let stored_at = std::fs::metadata(t.dir.join(crate::templates::RECORD_FILE))
        .and_then(|m| m.modified())
        .map(|at| chrono::DateTime::<chrono::Utc>::from(at).timestamp_millis())
        .unwrap_or(0);
    TemplateInfo {
        stored_at_unix_ms: stored_at,
        name: r.base_template.clone(),
        min_disk_mb: r.disk_size_mb,
        size_bytes: r.size_bytes,
        kind: r.kind.as_str().to_string(),
        template_id: r.key.clone(),
        vcpus: r.vcpus,
        memory_mb: r.memory_mb,
    }
}

fn entry(e: fs::EntryInfo) -> EntryInfo {
    let file_type = match EnvdFileType::try_from(e.r#type).unwrap_or(EnvdFileType::Unspecified) {
        EnvdFileType::File => FileType::File,
        EnvdFileType::Directory => FileType::Directory,
        EnvdFileType::Symlink => FileType::Symlink,
        EnvdFileType::Unspecified => FileType::Unspecified,
    };
    EntryInfo {
        name: e.name,
        path: e.path,
        r#type: file_type as i32,
        size: u64::try_from(e.size).unwrap_or(0),
        mode: e.mode,
        permissions: e.permissions,
        owner: e.owner,
        group: e.group,
        modified_unix_ms: e
            .modified_time
            .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
            .unwrap_or(0),
        symlink_target: e.symlink_target,
    }
}

fn user_name(s: &str) -> Option<&str> {
    if s.is_empty() { None } else { Some(s) }
}

impl Service {
    /// The guest agent of a running sandbox, acting as `user` (empty: the default user).
    fn guest(&self, sandbox_id: &str, user: &str) -> Result<(SandboxId, EnvdClient), Status> {
        let id = parse_sandbox(sandbox_id)?;
        let guest = self.manager.running(id)?.guest()?;
        let guest = match user_name(user) {
            Some(u) => guest
                .as_user(u)
                .map_err(|e| AgentError::Guest { id, source: e })?,
            None => guest,
        };
        Ok((id, guest))
    }

    fn exec_params(&self, req: &ExecRequest) -> Result<ExecParams, Status> {
        if req.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is empty"));
        }
        let cfg = &self.manager.inner().cfg;
        let timeout = if req.timeout_ms == 0 {
            cfg.exec_timeout
        } else {
            Duration::from_millis(u64::from(req.timeout_ms))
        };
        let max_output = if req.max_output_bytes == 0 {
            cfg.exec_max_output
        } else {
            req.max_output_bytes.min(cfg.exec_max_output)
        };
        Ok(ExecParams {
            cmd: req.cmd.clone(),
            args: req.args.clone(),
            env: req.env.clone().into_iter().collect::<HashMap<_, _>>(),
            cwd: if req.cwd.is_empty() {
                None
            } else {
                Some(req.cwd.clone())
            },
            user: user_name(&req.user).map(String::from),
            timeout,
            stdin: if req.stdin.is_empty() {
                None
            } else {
                Some(Bytes::from(req.stdin.clone()))
            },
            max_output,
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl HostAgent for Service {
    async fn ping(&self, _req: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        let inner = self.manager.inner();
        let (vcpus, memory_mb, disk_mb) = crate::host_specs(&inner.cfg);
        Ok(Response::new(PingResponse {
            host_id: self.host.to_string(),
            version: crate::VERSION.to_string(),
            capacity: Some(HostCapacity {
                vcpus,
                memory_mb,
                disk_mb,
                max_sandboxes: inner.cfg.max_sandboxes,
            }),
            sandboxes: u32::try_from(self.manager.count()).unwrap_or(u32::MAX),
            templates: self.manager.templates(),
            vmm: inner.vmm.info().to_string(),
            template_infos: self.manager.template_infos(),
        }))
    }

    async fn create_sandbox(
        &self,
        req: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let team: TeamId = r
            .team_id
            .parse()
            .map_err(|e: nestbox_types::IdParseError| Status::invalid_argument(e.to_string()))?;
        let template_id = if r.template_id.is_empty() {
            None
        } else {
            Some(
                r.template_id
                    .parse()
                    .map_err(|e: nestbox_types::IdParseError| {
                        Status::invalid_argument(e.to_string())
                    })?,
            )
        };
        let params = CreateParams {
            id,
            team,
            template: r.template,
            template_id,
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            timeout_sec: r.timeout_sec,
            env: r.env.into_iter().collect(),
            access_token: r.access_token,
            no_pool: r.no_pool,
            egress: egress_rules(r.egress),
            default_user: Some(r.default_user).filter(|u| !u.is_empty()),
            default_workdir: Some(r.default_workdir).filter(|w| !w.is_empty()),
        };
        // The create runs to its end even if the caller goes away: a half-created sandbox
        // must be either finished or released, never abandoned.
        let manager = self.manager.clone();
        let started = std::time::Instant::now();
        let created = tokio::spawn(async move { manager.create(params).await })
            .await
            .map_err(|e| Status::internal(format!("create task failed: {e}")))?;
        let outcome = match &created {
            Ok(_) => "ok",
            Err(e) => e.code().as_str(),
        };
        self.manager
            .telemetry()
            .create(outcome, started.elapsed().as_secs_f64());
        let handle = created?;
        let vmm = self.manager.inner().vmm.info().to_string();
        Ok(Response::new(CreateSandboxResponse {
            sandbox: Some(info(&handle, &vmm)),
        }))
    }

    async fn pause_sandbox(
        &self,
        req: Request<PauseSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        let manager = self.manager.clone();
        // Runs to its end even if the caller goes away: never a half-paused sandbox.
        tokio::spawn(async move { manager.pause(id).await })
            .await
            .map_err(|e| Status::internal(format!("pause task failed: {e}")))??;
        let h = self.manager.get(id)?;
        Ok(Response::new(info(&h, &self.manager.vmm_info())))
    }

    async fn resume_sandbox(
        &self,
        req: Request<ResumeSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        let manager = self.manager.clone();
        tokio::spawn(async move { manager.resume(id).await })
            .await
            .map_err(|e| Status::internal(format!("resume task failed: {e}")))?
            .map_err(|e| match e {
                AgentError::WrongState { id, state } => nestbox_proto::status(
                    nestbox_types::ErrorCode::Conflict,
                    format!("sandbox {id} is {state}, not paused"),
                ),
                other => other.into(),
            })?;
        let h = self.manager.get(id)?;
        Ok(Response::new(info(&h, &self.manager.vmm_info())))
    }

    async fn ping_sandbox(
        &self,
        req: Request<PingSandboxRequest>,
    ) -> Result<Response<PingSandboxResponse>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        self.manager.ping(id)?;
        Ok(Response::new(PingSandboxResponse {}))
    }

    async fn set_egress(
        &self,
        req: Request<SetEgressRequest>,
    ) -> Result<Response<SetEgressResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        self.manager
            .set_egress(id, egress_rules(r.egress), r.version)
            .await?;
        Ok(Response::new(SetEgressResponse {}))
    }

    async fn rotate_sandbox_token(
        &self,
        req: Request<RotateSandboxTokenRequest>,
    ) -> Result<Response<RotateSandboxTokenResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        self.manager.rotate_token(id, r.access_token).await?;
        Ok(Response::new(RotateSandboxTokenResponse {}))
    }

    async fn create_template(
        &self,
        req: Request<CreateTemplateRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let template: nestbox_types::TemplateId = r
            .template_id
            .parse()
            .map_err(|e: nestbox_types::IdParseError| Status::invalid_argument(e.to_string()))?;
        let kind = match TemplateKind::try_from(r.kind).unwrap_or(TemplateKind::Unspecified) {
            TemplateKind::Snapshot | TemplateKind::Unspecified => crate::templates::Kind::Snapshot,
            TemplateKind::Image => crate::templates::Kind::Image,
        };
        let manager = self.manager.clone();
        let stored = tokio::spawn(async move { manager.create_template(id, template, kind).await })
            .await
            .map_err(|e| Status::internal(format!("template task failed: {e}")))??;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template_info(&stored)),
        }))
    }

    async fn delete_template(
        &self,
        req: Request<DeleteTemplateRequest>,
    ) -> Result<Response<DeleteTemplateResponse>, Status> {
        let template: nestbox_types::TemplateId = req
            .into_inner()
            .template_id
            .parse()
            .map_err(|e: nestbox_types::IdParseError| Status::invalid_argument(e.to_string()))?;
        self.manager.delete_template(template).await?;
        Ok(Response::new(DeleteTemplateResponse {}))
    }

    async fn resolve_image(
        &self,
        req: Request<ResolveImageRequest>,
    ) -> Result<Response<ResolveImageResponse>, Status> {
        let r = req.into_inner();
        let cfg = self.manager.inner().cfg.clone();
        let resolved = crate::oci::resolve(&cfg, &r.reference, r.credentials).await?;
        Ok(Response::new(resolved))
    }

    async fn import_image(
        &self,
        req: Request<ImportImageRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let r = req.into_inner();
        let template = parse_template(&r.template_id)?;
        let manager = self.manager.clone();
        // Its own task: a caller that goes away does not leave a half-made template.
        let stored = tokio::spawn(async move {
            let inner = manager.inner();
            crate::oci::import(
                crate::oci::ImportContext {
                    cfg: &inner.cfg,
                    images: &inner.images,
                    templates: &inner.templates,
                },
                &r.reference,
                r.credentials,
                template,
            )
            .await
        })
        .await
        .map_err(|e| Status::internal(format!("image task failed: {e}")))??;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template_info(&stored)),
        }))
    }

    async fn export_sandbox(
        &self,
        req: Request<ExportSandboxRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let export = parse_template(&r.export_id)?;
        let manager = self.manager.clone();
        let stored = tokio::spawn(async move { manager.export_sandbox(id, export).await })
            .await
            .map_err(|e| Status::internal(format!("export task failed: {e}")))??;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template_info(&stored)),
        }))
    }

    async fn adopt_sandbox(
        &self,
        req: Request<AdoptSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        let r = req.into_inner();
        let template_id = if r.template_id.is_empty() {
            None
        } else {
            Some(parse_template(&r.template_id)?)
        };
        let params = crate::sandbox::AdoptParams {
            id: parse_sandbox(&r.sandbox_id)?,
            export: parse_template(&r.export_id)?,
            team: r
                .team_id
                .parse()
                .map_err(|e: nestbox_types::IdParseError| {
                    Status::invalid_argument(e.to_string())
                })?,
            template: r.template,
            template_id,
            timeout_sec: r.timeout_sec,
            egress: egress_rules(r.egress),
            egress_version: r.egress_version,
            access_token: (!r.access_token.is_empty()).then_some(r.access_token),
        };
        let manager = self.manager.clone();
        let h = tokio::spawn(async move { manager.adopt_sandbox(params).await })
            .await
            .map_err(|e| Status::internal(format!("adopt task failed: {e}")))??;
        Ok(Response::new(info(
            &h,
            &self.manager.inner().vmm.info().to_string(),
        )))
    }

    async fn get_template_manifest(
        &self,
        req: Request<GetTemplateManifestRequest>,
    ) -> Result<Response<TemplateManifest>, Status> {
        let id = parse_template(&req.into_inner().template_id)?;
        Ok(Response::new(self.manager.template_manifest(id).await?))
    }

    type ReadTemplateFileStream = BoxStream<FileBlock>;

    async fn read_template_file(
        &self,
        req: Request<ReadTemplateFileRequest>,
    ) -> Result<Response<Self::ReadTemplateFileStream>, Status> {
        let r = req.into_inner();
        let id = parse_template(&r.template_id)?;
        let rx = self.manager.read_template_file(id, r.name, r.offset)?;
        let stream = ReceiverStream::new(rx).map(|b| b.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn begin_template_import(
        &self,
        req: Request<TemplateManifest>,
    ) -> Result<Response<BeginTemplateImportResponse>, Status> {
        let begun = self.manager.begin_template_import(req.into_inner()).await?;
        Ok(Response::new(BeginTemplateImportResponse {
            resume_at: begun.resume_at,
            present: begun.present,
        }))
    }

    async fn write_template_file(
        &self,
        req: Request<Streaming<FileBlock>>,
    ) -> Result<Response<WriteTemplateFileResponse>, Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("no block was sent"));
        };
        // Blocks flow to the writer as they arrive; a stream that breaks ends the write
        // where it stands (synced), so the next one resumes there.
        let (tx, rx) = mpsc::channel(8);
        let pump = tokio::spawn(async move {
            while let Ok(Some(block)) = stream.message().await {
                if tx.send(block).await.is_err() {
                    break;
                }
            }
        });
        let next_offset = self.manager.write_template_file(first, rx).await;
        pump.abort();
        Ok(Response::new(WriteTemplateFileResponse {
            next_offset: next_offset?,
        }))
    }

    async fn commit_template_import(
        &self,
        req: Request<CommitTemplateImportRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let id = parse_template(&req.into_inner().template_id)?;
        let stored = self.manager.commit_template_import(id).await?;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(template_info(&stored)),
        }))
    }

    async fn destroy_sandbox(
        &self,
        req: Request<DestroySandboxRequest>,
    ) -> Result<Response<DestroySandboxResponse>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        let manager = self.manager.clone();
        tokio::spawn(async move { manager.destroy(id).await })
            .await
            .map_err(|e| Status::internal(format!("destroy task failed: {e}")))??;
        Ok(Response::new(DestroySandboxResponse {}))
    }

    async fn get_sandbox(
        &self,
        req: Request<GetSandboxRequest>,
    ) -> Result<Response<SandboxInfo>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        let h = self.manager.get(id)?;
        Ok(Response::new(info(
            &h,
            &self.manager.inner().vmm.info().to_string(),
        )))
    }

    async fn list_sandboxes(
        &self,
        _req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let vmm = self.manager.inner().vmm.info().to_string();
        let sandboxes = self.manager.list().iter().map(|h| info(h, &vmm)).collect();
        Ok(Response::new(ListSandboxesResponse { sandboxes }))
    }

    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let params = self.exec_params(&r)?;
        let guest = self.manager.running(id)?.guest()?;
        let out = guest::run(id, &guest, params, None).await?;
        Ok(Response::new(ExecResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            duration_ms: ms(out.duration),
            timed_out: out.timed_out,
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            pid: out.pid,
        }))
    }

    type ExecStreamStream = ReceiverStream<Result<ExecEvent, Status>>;

    async fn exec_stream(
        &self,
        req: Request<ExecRequest>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let params = self.exec_params(&r)?;
        let guest = self.manager.running(id)?.guest()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            match guest::run(id, &guest, params, Some(tx.clone())).await {
                Ok(_) => {}
                // Nobody follows the command any more (its caller left, or the sandbox was
                // destroyed under it): nothing to report, and no operation failed.
                Err(e) if tx.is_closed() => {
                    tracing::debug!(sandbox = %id, error = %e, "an unwatched command's stream ended");
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write_file(
        &self,
        req: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(WriteFileRequest {
                part: Some(write_file_request::Part::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a header",
                ));
            }
        };
        let id = parse_sandbox(&header.sandbox_id)?;
        if header.path.is_empty() {
            return Err(Status::invalid_argument("path is empty"));
        }
        let guest = self.manager.running(id)?.guest()?;
        // Chunks flow from the control plane to the guest without buffering the file. If
        // the control plane's stream breaks, the guest request is aborted with an error so
        // no truncated file is committed.
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = counter.clone();
        let pump = tokio::spawn(async move {
            let abort = |why: String| Err(std::io::Error::other(why));
            loop {
                match stream.message().await {
                    Ok(Some(WriteFileRequest {
                        part: Some(write_file_request::Part::Chunk(c)),
                    })) => {
                        count.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        if tx.send(Ok(Bytes::from(c))).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(Some(WriteFileRequest {
                        part: Some(write_file_request::Part::Commit(commit)),
                    })) => {
                        let sent = count.load(std::sync::atomic::Ordering::Relaxed);
                        if commit.total_bytes != sent {
                            let why = format!(
                                "commit says {} bytes but {sent} arrived",
                                commit.total_bytes
                            );
                            let _ = tx.send(abort(why.clone())).await;
                            return Err(Status::invalid_argument(why));
                        }
                        // Ending the body normally is what keeps the file.
                        return Ok(());
                    }
                    Ok(Some(_)) => {
                        let _ = tx
                            .send(abort("unexpected message in an upload".into()))
                            .await;
                        return Err(Status::invalid_argument(
                            "only chunks and a commit may follow the header",
                        ));
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(abort("the upload ended without a commit".into()))
                            .await;
                        return Err(Status::aborted(
                            "the upload ended without a commit; nothing was kept",
                        ));
                    }
                    Err(status) => {
                        let _ = tx
                            .send(abort(format!("upload aborted: {}", status.message())))
                            .await;
                        return Err(status);
                    }
                }
            }
        });
        let uploaded = guest
            .upload(
                &header.path,
                user_name(&header.user),
                ReceiverStream::new(rx),
            )
            .await;
        let pumped = pump
            .await
            .map_err(|e| Status::internal(format!("upload pump failed: {e}")))?;
        pumped?;
        uploaded.map_err(|e| AgentError::Guest { id, source: e })?;
        let stat = guest
            .stat(&header.path)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(WriteFileResponse {
            entry: Some(entry(stat)),
            bytes_written: counter.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    type ReadFileStream = BoxStream<ReadFileResponse>;

    async fn read_file(
        &self,
        req: Request<ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let stat = guest
            .stat(&r.path)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        if stat.r#type == EnvdFileType::Directory as i32 {
            return Err(nestbox_proto::status(
                nestbox_types::ErrorCode::InvalidRequest,
                format!("{} is a directory", r.path),
            ));
        }
        let (_size, body) = guest
            .download(&r.path, user_name(&r.user))
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        let header = ReadFileResponse {
            part: Some(read_file_response::Part::Header(ReadFileHeader {
                entry: Some(entry(stat)),
            })),
        };
        let chunks = body.flat_map(move |item| {
            let out: Vec<Result<ReadFileResponse, Status>> = match item {
                Ok(bytes) => bytes
                    .chunks(READ_CHUNK)
                    .map(|c| {
                        Ok(ReadFileResponse {
                            part: Some(read_file_response::Part::Chunk(c.to_vec())),
                        })
                    })
                    .collect(),
                Err(e) => vec![Err(AgentError::Guest { id, source: e }.into())],
            };
            futures::stream::iter(out)
        });
        let stream = futures::stream::once(async move { Ok(header) }).chain(chunks);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_dir(
        &self,
        req: Request<ListDirRequest>,
    ) -> Result<Response<ListDirResponse>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let entries = guest
            .list_dir(&r.path, r.depth.max(1))
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(ListDirResponse {
            entries: entries.into_iter().map(entry).collect(),
        }))
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let e = guest
            .stat(&r.path)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(StatResponse {
            entry: Some(entry(e)),
        }))
    }

    async fn make_dir(
        &self,
        req: Request<MakeDirRequest>,
    ) -> Result<Response<MakeDirResponse>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let e = guest
            .make_dir(&r.path)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(MakeDirResponse {
            entry: Some(entry(e)),
        }))
    }

    async fn remove(
        &self,
        req: Request<RemoveRequest>,
    ) -> Result<Response<RemoveResponse>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        guest
            .remove(&r.path)
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn get_sandbox_metrics(
        &self,
        req: Request<GetSandboxMetricsRequest>,
    ) -> Result<Response<GetSandboxMetricsResponse>, Status> {
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        let tier = match MetricsRange::try_from(r.range) {
            Ok(MetricsRange::TenMinutes) => Tier::TenMinutes,
            Ok(MetricsRange::TwoHours) => Tier::TwoHours,
            Ok(MetricsRange::Day) => Tier::Day,
            _ => {
                return Err(AgentError::Invalid("range must be set".into()).into());
            }
        };
        // Known to the manager (running or paused) but never sampled here (adopted after a
        // restart, or just created): no points yet.
        self.manager.get(id)?;
        let series = self
            .manager
            .metrics()
            .get(id, tier)
            .await?
            .unwrap_or(Series {
                tier,
                points: Vec::new(),
            });
        Ok(Response::new(GetSandboxMetricsResponse {
            series: Some(series_pb(&series)),
        }))
    }

    async fn get_sandbox_logs(
        &self,
        req: Request<GetSandboxLogsRequest>,
    ) -> Result<Response<GetSandboxLogsResponse>, Status> {
        use crate::sandbox::logs::{Level, Query};
        let r = req.into_inner();
        let id = parse_sandbox(&r.sandbox_id)?;
        if r.limit == 0 || r.limit > nestbox_types::limits::MAX_LOG_PAGE {
            return Err(AgentError::Invalid(format!(
                "limit must be 1..={}",
                nestbox_types::limits::MAX_LOG_PAGE
            ))
            .into());
        }
        let min_level = match r.min_level.as_str() {
            "" => Level::Debug,
            name => Level::parse(name).ok_or_else(|| {
                AgentError::Invalid(format!(
                    "unknown level `{name}`: debug, info, warn or error"
                ))
            })?,
        };
        let query = Query {
            start_ms: r.start_unix_ms,
            cursor: r.cursor,
            limit: r.limit as usize,
            backward: r.backward,
            min_level,
            search: (!r.search.is_empty()).then_some(r.search),
        };
        let page = self.manager.logs(id, query).await?;
        Ok(Response::new(GetSandboxLogsResponse {
            entries: page
                .entries
                .into_iter()
                .map(|e| LogEntry {
                    seq: e.seq,
                    unix_ms: e.ts,
                    level: e.level.as_str().to_string(),
                    message: e.msg,
                    fields: e.fields.into_iter().collect(),
                })
                .collect(),
            more: page.more,
        }))
    }

    async fn flush_sandbox_metrics(
        &self,
        req: Request<FlushSandboxMetricsRequest>,
    ) -> Result<Response<FlushSandboxMetricsResponse>, Status> {
        let id = parse_sandbox(&req.into_inner().sandbox_id)?;
        // Nothing known (never sampled: destroyed within its first second, or already
        // flushed after its destroy) is nothing to store, not an error.
        let series = match self.manager.metrics().flush(id).await? {
            Some(all) => all.iter().map(series_pb).collect(),
            None => Vec::new(),
        };
        Ok(Response::new(FlushSandboxMetricsResponse { series }))
    }

    async fn start_process(
        &self,
        req: Request<StartProcessRequest>,
    ) -> Result<Response<ProcessInfo>, Status> {
        let r = req.into_inner();
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is empty"));
        }
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let info = processes::start(id, &guest, r).await?;
        Ok(Response::new(info))
    }

    async fn list_processes(
        &self,
        req: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        let list = guest
            .list()
            .await
            .map_err(|e| AgentError::Guest { id, source: e })?;
        Ok(Response::new(ListProcessesResponse {
            processes: list.into_iter().map(processes::info).collect(),
        }))
    }

    type ConnectProcessStream = processes::EventStream<ProcessEvent>;

    async fn connect_process(
        &self,
        req: Request<ConnectProcessRequest>,
    ) -> Result<Response<Self::ConnectProcessStream>, Status> {
        let r = req.into_inner();
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        let sandbox = self.manager.running(id)?;
        let stream = processes::connect(sandbox, &guest, r.process.as_ref()).await?;
        Ok(Response::new(stream))
    }

    async fn send_process_input(
        &self,
        req: Request<SendProcessInputRequest>,
    ) -> Result<Response<SendProcessInputResponse>, Status> {
        use nestbox_envd::process::{ProcessInput, process_input::Input};
        let r = req.into_inner();
        let (sel, shown) = processes::selector(r.process.as_ref())?;
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        let data = Bytes::from(r.data);
        let input = ProcessInput {
            input: Some(if r.terminal {
                Input::Pty(data)
            } else {
                Input::Stdin(data)
            }),
        };
        guest
            .send_input(sel, input)
            .await
            .map_err(|e| processes::process_error(id, &shown, e))?;
        Ok(Response::new(SendProcessInputResponse {}))
    }

    async fn close_process_stdin(
        &self,
        req: Request<CloseProcessStdinRequest>,
    ) -> Result<Response<CloseProcessStdinResponse>, Status> {
        let r = req.into_inner();
        let (sel, shown) = processes::selector(r.process.as_ref())?;
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        guest
            .close_stdin(sel)
            .await
            .map_err(|e| processes::process_error(id, &shown, e))?;
        Ok(Response::new(CloseProcessStdinResponse {}))
    }

    async fn signal_process(
        &self,
        req: Request<SignalProcessRequest>,
    ) -> Result<Response<SignalProcessResponse>, Status> {
        use nestbox_envd::process::Signal;
        let r = req.into_inner();
        let (sel, shown) = processes::selector(r.process.as_ref())?;
        let signal = match r.signal {
            9 => Signal::Sigkill,
            15 => Signal::Sigterm,
            other => {
                return Err(Status::invalid_argument(format!(
                    "signal {other} is not supported: use 9 (SIGKILL) or 15 (SIGTERM)"
                )));
            }
        };
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        guest
            .send_signal(sel, signal)
            .await
            .map_err(|e| processes::process_error(id, &shown, e))?;
        Ok(Response::new(SignalProcessResponse {}))
    }

    async fn resize_terminal(
        &self,
        req: Request<ResizeTerminalRequest>,
    ) -> Result<Response<ResizeTerminalResponse>, Status> {
        use nestbox_envd::process::{Pty, pty};
        let r = req.into_inner();
        let (sel, shown) = processes::selector(r.process.as_ref())?;
        let size = r
            .size
            .filter(|s| s.cols > 0 && s.rows > 0)
            .ok_or_else(|| Status::invalid_argument("size needs cols and rows above 0"))?;
        let (id, guest) = self.guest(&r.sandbox_id, "")?;
        let pty = Pty {
            size: Some(pty::Size {
                cols: size.cols,
                rows: size.rows,
            }),
        };
        guest
            .update(sel, Some(pty))
            .await
            .map_err(|e| processes::process_error(id, &shown, e))?;
        Ok(Response::new(ResizeTerminalResponse {}))
    }

    type WatchDirStream = processes::EventStream<WatchDirEvent>;

    async fn watch_dir(
        &self,
        req: Request<WatchDirRequest>,
    ) -> Result<Response<Self::WatchDirStream>, Status> {
        let r = req.into_inner();
        if r.path.is_empty() {
            return Err(Status::invalid_argument("path is empty"));
        }
        let (id, guest) = self.guest(&r.sandbox_id, &r.user)?;
        let sandbox = self.manager.running(id)?;
        let stream = processes::watch(sandbox, &guest, &r.path, r.recursive).await?;
        Ok(Response::new(stream))
    }
}

fn series_pb(s: &Series) -> MetricSeries {
    let range = match s.tier {
        Tier::TenMinutes => MetricsRange::TenMinutes,
        Tier::TwoHours => MetricsRange::TwoHours,
        Tier::Day => MetricsRange::Day,
    };
    MetricSeries {
        range: range as i32,
        interval_ms: u32::try_from(s.tier.interval_ms()).unwrap_or(u32::MAX),
        points: s
            .points
            .iter()
            .map(|p| MetricPoint {
                ts_unix_ms: p.ts_ms,
                cpu_pct: p.cpu_pct,
                mem_bytes: p.mem_bytes,
                disk_bytes: p.disk_bytes,
            })
            .collect(),
    }
}
