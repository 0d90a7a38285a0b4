//! The agent's error type and its one mapping to stable codes and gRPC statuses.

use nestbox_types::{ErrorCode, SandboxId};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent does not know the sandbox.
    #[error("sandbox {0} not found on this host")]
    SandboxNotFound(SandboxId),
    /// A sandbox with this id already exists.
    #[error("sandbox {0} already exists on this host")]
    SandboxExists(SandboxId),
    /// The sandbox is not in a state that allows the operation.
    #[error("sandbox {id} is {state}")]
    WrongState {
        /// The sandbox.
        id: SandboxId,
        /// Its state.
        state: &'static str,
    },
    /// The template is not available on this host.
    #[error("template `{0}` is not available on this host")]
    TemplateNotFound(String),
    /// Sandboxes on this host still build on the template.
    #[error("template {template} is in use by {sandboxes} sandboxes on this host")]
    TemplateInUse {
        /// The template.
        template: nestbox_types::TemplateId,
        /// How many use it.
        sandboxes: usize,
    },
    /// The host is full.
    #[error("host is at capacity: {0}")]
    NoCapacity(String),
    /// A request field is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The sandbox's task did not take the request in time.
    #[error("sandbox {0} is busy; retry")]
    Busy(SandboxId),
    /// The sandbox's VMM stopped it because the host could not write its disk; it runs
    /// again once the host has space.
    #[error(
        "sandbox {0} is stopped: its host is out of disk space; it runs again once space is freed"
    )]
    OutOfSpace(SandboxId),
    /// An operation failed while the host's disk was full (whatever the step that failed
    /// said: a guest whose disk cannot be written does not come up either).
    #[error("{what} failed: the host is out of disk space ({cause})")]
    NoDiskSpace {
        /// The operation.
        what: String,
        /// How it failed.
        cause: String,
    },
    /// The VM did not become ready.
    #[error("sandbox {id} did not boot: {reason}")]
    Boot {
        /// The sandbox.
        id: SandboxId,
        /// What happened, with the console's last lines.
        reason: String,
    },
    /// The guest agent answered with an error.
    #[error("guest agent of {id}: {source}")]
    Guest {
        /// The sandbox.
        id: SandboxId,
        /// The error.
        #[source]
        source: nestbox_envd::client::EnvdError,
    },
    /// No process with that pid or tag runs in the sandbox.
    #[error("no process {process} in sandbox {id}")]
    ProcessNotFound {
        /// The sandbox.
        id: SandboxId,
        /// The pid or tag asked for.
        process: String,
    },
    /// A host resource operation failed.
    #[error("{what} for sandbox {id}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// The sandbox.
        id: SandboxId,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// A host-resource error.
    pub fn host(
        what: &'static str,
        id: SandboxId,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        AgentError::Host {
            what,
            id,
            source: Box::new(source),
        }
    }

    /// The stable code clients see.
    pub fn code(&self) -> ErrorCode {
        use nestbox_envd::connect::Code;
        match self {
            AgentError::SandboxNotFound(_) => ErrorCode::SandboxNotFound,
            AgentError::SandboxExists(_) => ErrorCode::AlreadyExists,
            AgentError::WrongState { .. } => ErrorCode::SandboxNotRunning,
            AgentError::TemplateNotFound(_) => ErrorCode::TemplateNotFound,
            AgentError::TemplateInUse { .. } => ErrorCode::Conflict,
            AgentError::NoCapacity(_) => ErrorCode::NoCapacity,
            AgentError::Invalid(_) => ErrorCode::InvalidRequest,
            AgentError::Busy(_) => ErrorCode::Busy,
            AgentError::OutOfSpace(_) | AgentError::NoDiskSpace { .. } => {
                ErrorCode::InsufficientStorage
            }
            AgentError::ProcessNotFound { .. } => ErrorCode::ProcessNotFound,
            AgentError::Boot { .. } | AgentError::Host { .. } | AgentError::Internal(_) => {
                if self.out_of_space() {
                    ErrorCode::InsufficientStorage
                } else {
                    ErrorCode::Internal
                }
            }
            AgentError::Guest { source, .. } => match source.code() {
                Code::NotFound => ErrorCode::FileNotFound,
                Code::InvalidArgument => ErrorCode::InvalidRequest,
                Code::AlreadyExists => ErrorCode::AlreadyExists,
                Code::PermissionDenied => ErrorCode::Forbidden,
                Code::DeadlineExceeded => ErrorCode::Timeout,
                Code::ResourceExhausted if source.http_status() == Some(507) => {
                    ErrorCode::InsufficientStorage
                }
                Code::ResourceExhausted => ErrorCode::Busy,
                Code::FailedPrecondition => ErrorCode::Conflict,
                // The host agent's own token is always right: a guest agent that says
                // "unauthenticated" refuses the user named in the request (E2B's envd
                // answers so for a user the sandbox does not have).
                Code::Unauthenticated if source.to_string().contains("does not exist") => {
                    ErrorCode::InvalidRequest
                }
                _ => ErrorCode::AgentError,
            },
        }
    }

    /// Whether the host ran out of disk space: somewhere in this host-side error's chain
    /// is an I/O error of that kind (`ENOSPC`, `EDQUOT`), or a tool that said so.
    pub fn out_of_space(&self) -> bool {
        if matches!(self, AgentError::NoDiskSpace { .. }) {
            return true;
        }
        if !matches!(
            self,
            AgentError::Boot { .. } | AgentError::Host { .. } | AgentError::Internal(_)
        ) {
            return false;
        }
        // A boot failure's reason carries the guest's console, which the tenant writes.
        let text_counts = !matches!(self, AgentError::Boot { .. });
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            {
                return true;
            }
            let text = e.to_string();
            if text_counts
                && (text.contains("No space left on device")
                    || text.contains("Disk quota exceeded"))
            {
                return true;
            }
            next = e.source();
        }
        false
    }

    /// The message clients see: full for their own mistakes, the whole chain otherwise
    /// (agent errors reach only the control plane, which logs them and decides what users
    /// see).
    pub fn public_message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }
}

impl From<AgentError> for tonic::Status {
    fn from(err: AgentError) -> Self {
        let code = err.code();
        if err.out_of_space() {
            // The chain names host paths: it goes to the log, the caller learns what ran out.
            tracing::error!(error = %err.public_message(), "the host is out of disk space");
            return nestbox_proto::status(code, "the host is out of disk space");
        }
        if matches!(code, ErrorCode::Internal | ErrorCode::AgentError) {
            tracing::error!(error = %err.public_message(), "agent operation failed");
        }
        nestbox_proto::status(code, err.public_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_host_disk_is_insufficient_storage_without_paths() {
        let id = SandboxId::new();
        let full = AgentError::host(
            "creating the root disk",
            id,
            nestbox_hostsys::disk::DiskError::Io {
                path: "/var/lib/nestbox/sandboxes/x/rootfs.qcow2".into(),
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            },
        );
        assert!(full.out_of_space());
        assert_eq!(full.code(), ErrorCode::InsufficientStorage);
        let status = tonic::Status::from(full);
        assert_eq!(status.message(), "the host is out of disk space");
        // A tool that said so counts too.
        let tool = AgentError::Internal("qemu-img: No space left on device".into());
        assert_eq!(tool.code(), ErrorCode::InsufficientStorage);
        // A guest's console saying so does not.
        let console = AgentError::Boot {
            id,
            reason: "console: No space left on device".into(),
        };
        assert_eq!(console.code(), ErrorCode::Internal);
        // Anything else stays internal; a guest's own full disk is the guest's answer.
        let other = AgentError::host(
            "creating the root disk",
            id,
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(other.code(), ErrorCode::Internal);
        assert!(!AgentError::Invalid("No space left on device".into()).out_of_space());
    }
}
