//! The manager's side of template copies between hosts (see [`crate::transfer`]): it
//! serves the templates it holds and receives new ones, each step off the async workers.

use nestbox_proto::hostagent::{FileBlock, TemplateManifest};
use nestbox_types::TemplateId;
use tokio::sync::mpsc;

use super::Manager;
use crate::error::AgentError;
use crate::templates::StoredTemplate;
use crate::transfer::{self, Begun};

/// A template id off the wire.
fn template_id(s: &str) -> Result<TemplateId, AgentError> {
    s.parse()
        .map_err(|e: nestbox_types::IdParseError| AgentError::Invalid(e.to_string()))
}

/// Runs blocking file work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Internal(format!("file task: {e}")))?
}

impl Manager {
    /// What template `id` is made of, for a copy to another host.
    pub async fn template_manifest(&self, id: TemplateId) -> Result<TemplateManifest, AgentError> {
        let t = self.template(id)?;
        blocking(move || transfer::manifest(&t)).await
    }

    /// Streams file `name` of template `id` from `offset` (a multiple of
    /// [`transfer::BLOCK`]): a first block at `offset` with no data, the blocks that are
    /// not all zeros, and a last one with no data at the file's length. An error ends the
    /// stream.
    pub fn read_template_file(
        &self,
        id: TemplateId,
        name: String,
        offset: u64,
    ) -> Result<mpsc::Receiver<Result<FileBlock, AgentError>>, AgentError> {
        let t: StoredTemplate = self.template(id)?;
        let (path, size) = transfer::export_file(&t, &name)?;
        if !offset.is_multiple_of(transfer::BLOCK) || offset > size {
            return Err(AgentError::Invalid(format!(
                "offset {offset} is not a block of `{name}` ({size} bytes)"
            )));
        }
        let (tx, rx) = mpsc::channel(4);
        let template_id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let block = |offset: u64, data: Vec<u8>| FileBlock {
                template_id: template_id.clone(),
                name: name.clone(),
                offset,
                data,
            };
            let send = |b: Result<FileBlock, AgentError>| tx.blocking_send(b).is_ok();
            if offset < size && !send(Ok(block(offset, Vec::new()))) {
                return;
            }
            let sent = std::fs::File::open(&path).and_then(|file| {
                transfer::for_each_block(&file, offset, |at, data| {
                    if send(Ok(block(at, data.to_vec()))) {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("the reader went away"))
                    }
                })
            });
            match sent {
                Ok(()) => {
                    send(Ok(block(size, Vec::new())));
                }
                Err(e) => {
                    send(Err(AgentError::Internal(format!(
                        "reading {}: {e}",
                        path.display()
                    ))));
                }
            }
        });
        Ok(rx)
    }

    /// Starts or resumes receiving a template.
    pub async fn begin_template_import(&self, m: TemplateManifest) -> Result<Begun, AgentError> {
        let id = template_id(&m.template_id)?;
        let _held = self.inner.imports.lock(id).await;
        let manager = self.clone();
        blocking(move || {
            let free = nix::sys::statvfs::statvfs(manager.inner.templates.root())
                .map(|s| s.blocks_available() * s.fragment_size())
                .map_err(|e| AgentError::Internal(format!("reading free disk space: {e}")))?;
            let images = &manager.inner.images;
            manager
                .inner
                .imports
                .begin(&m, |kernel| images.kernel(kernel).is_ok(), free)
        })
        .await
    }

    /// Writes the blocks `blocks` brings of one file of a template being received (all of
    /// one file; see [`transfer::FileWriter::put`]); returns where the file's copy stands
    /// when they end (everything before it is synced).
    pub async fn write_template_file(
        &self,
        first: FileBlock,
        mut blocks: mpsc::Receiver<FileBlock>,
    ) -> Result<u64, AgentError> {
        let id = template_id(&first.template_id)?;
        let _held = self.inner.imports.lock(id).await;
        let manager = self.clone();
        blocking(move || {
            let mut w = manager.inner.imports.open(id, &first.name)?;
            let name = first.name.clone();
            let mut next = Some(first);
            while let Some(b) = next.take().or_else(|| blocks.blocking_recv()) {
                if b.template_id != id.to_string() || b.name != name {
                    w.sync()?;
                    return Err(AgentError::Invalid(
                        "every block of one write must be of one file".into(),
                    ));
                }
                if let Err(e) = w.put(b.offset, &b.data) {
                    w.sync()?;
                    return Err(e);
                }
            }
            w.sync()
        })
        .await
    }

    /// Checks a received template and puts it in place.
    pub async fn commit_template_import(
        &self,
        id: TemplateId,
    ) -> Result<StoredTemplate, AgentError> {
        let _held = self.inner.imports.lock(id).await;
        let manager = self.clone();
        let stored = blocking(move || manager.inner.imports.commit(id)).await?;
        self.inner.telemetry.copied(stored.record.size_bytes);
        match stored.record.move_of {
            Some(sandbox) => {
                tracing::info!(package = %id, %sandbox, bytes = stored.record.size_bytes, "move package copied to this host")
            }
            None => {
                tracing::info!(template = %id, bytes = stored.record.size_bytes, "template copied to this host")
            }
        }
        Ok(stored)
    }
}
