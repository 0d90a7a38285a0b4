//! Registration with the control plane and heartbeats.
//!
//! On first start the agent trades its one-time registration token for credentials (host
//! id, heartbeat token, host key) and stores them in `credentials.json` (mode 0600, with a
//! format version). Later starts reuse them. A heartbeat loop then reports liveness.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nestbox_types::HostId;
use nestbox_types::api::{HeartbeatRequest, RegisterHostRequest, RegisterHostResponse};

/// Format version of `credentials.json`.
pub const CREDENTIALS_FORMAT: u32 = 1;

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// No credentials and no token.
    #[error(
        "this agent is not registered: pass a registration token (`nestbox agent --register-token …`)"
    )]
    NoToken,
    /// The credentials file is unreadable or of an unknown format.
    #[error("credentials file {path}: {reason}")]
    BadCredentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The control plane refused or could not be reached.
    #[error("registration with {url} failed: {reason}")]
    Refused {
        /// The control plane.
        url: String,
        /// Why.
        reason: String,
    },
    /// The credentials could not be stored.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What a registered agent holds.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// [`CREDENTIALS_FORMAT`].
    pub format_version: u32,
    /// The host's id.
    pub host_id: HostId,
    /// Bearer token for heartbeats.
    pub host_token: String,
    /// Key the control plane signs calls with.
    pub host_key: String,
    /// The control plane it registered with.
    pub control_plane_url: String,
    /// Its TLS server certificate from the control plane's CA (registrations by versions
    /// without one serve plain HTTP/2 until they register again).
    #[serde(default)]
    pub tls: Option<nestbox_types::api::HostTls>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("host_id", &self.host_id)
            .field("control_plane_url", &self.control_plane_url)
            .finish_non_exhaustive()
    }
}

fn load(path: &Path) -> Result<Option<Credentials>, RegisterError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegisterError::BadCredentials {
                path: path.into(),
                reason: e.to_string(),
            });
        }
    };
    let creds: Credentials =
        serde_json::from_slice(&bytes).map_err(|e| RegisterError::BadCredentials {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if creds.format_version != CREDENTIALS_FORMAT {
        return Err(RegisterError::BadCredentials {
            path: path.into(),
            reason: format!(
                "format version {} is not supported (expected {CREDENTIALS_FORMAT})",
                creds.format_version
            ),
        });
    }
    Ok(Some(creds))
}

fn store(path: &Path, creds: &Credentials) -> Result<(), RegisterError> {
    let write = |source| RegisterError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(creds).map_err(|e| write(std::io::Error::other(e)))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    f.write_all(&bytes).map_err(write)?;
    f.sync_all().map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

/// Returns stored credentials, or registers with `token` and stores the result.
pub async fn ensure(
    http: &reqwest::Client,
    path: &Path,
    control_plane: &str,
    token: Option<&str>,
    request: RegisterHostRequest,
) -> Result<Credentials, RegisterError> {
    if let Some(creds) = load(path)? {
        return Ok(creds);
    }
    let token = token.ok_or(RegisterError::NoToken)?;
    let url = format!("{}/v1/hosts/register", control_plane.trim_end_matches('/'));
    let refused = |reason: String| RegisterError::Refused {
        url: url.clone(),
        reason,
    };
    let resp = http
        .post(&url)
        .json(&RegisterHostRequest {
            token: token.to_string(),
            ..request
        })
        .send()
        .await
        .map_err(|e| refused(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(refused(format!(
            "{status}: {}",
            body.chars().take(300).collect::<String>()
        )));
    }
    let reg: RegisterHostResponse = resp.json().await.map_err(|e| refused(e.to_string()))?;
    let creds = Credentials {
        format_version: CREDENTIALS_FORMAT,
        host_id: reg.host_id,
        host_token: reg.host_token,
        host_key: reg.host_key,
        control_plane_url: control_plane.to_string(),
        tls: reg.tls,
    };
    store(path, &creds)?;
    tracing::info!(host = %creds.host_id, "registered with the control plane");
    Ok(creds)
}

/// Sends one heartbeat: the control plane learns that the agent is up, and at which
/// address, at once (a restarted agent may listen on another port).
pub async fn heartbeat_once(
    http: &reqwest::Client,
    control_plane: &str,
    creds: &Credentials,
    address: &str,
    sandboxes: u32,
) -> Result<(), String> {
    let url = format!(
        "{}/v1/hosts/{}/heartbeat",
        control_plane.trim_end_matches('/'),
        creds.host_id
    );
    let body = HeartbeatRequest {
        sandboxes,
        version: crate::VERSION.to_string(),
        address: address.to_string(),
    };
    match http
        .post(&url)
        .bearer_auth(&creds.host_token)
        .json(&body)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("refused: {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends a heartbeat every `interval` until the task is aborted, to the control plane the
/// agent is configured with now (it may have moved since registration).
pub async fn heartbeat_loop(
    http: reqwest::Client,
    control_plane: String,
    creds: Credentials,
    address: String,
    interval: Duration,
    sandboxes: impl Fn() -> u32 + Send + 'static,
) {
    let mut tick = tokio::time::interval(interval);
    let mut failing = false;
    loop {
        tick.tick().await;
        match heartbeat_once(&http, &control_plane, &creds, &address, sandboxes()).await {
            Ok(()) => {
                if failing {
                    tracing::info!("heartbeats reach the control plane again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
                failing = true;
            }
        }
    }
}
