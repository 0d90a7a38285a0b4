//! Registration with the control plane, the host's tokens, and heartbeats.
//!
//! On first start the agent trades its one-time registration token for credentials (host
//! id, host key, TLS bundle and a token pair) and stores them in `credentials.json` (mode
//! 0600, with a format version). Later starts reuse them. A [`HostSession`] holds them
//! while the agent runs: heartbeats carry the access token; the pair is traded for the next
//! one (`POST /v1/hosts/refresh`) when three quarters of the access token's life have passed
//! or when the control plane refuses it (401/403). The new pair is stored before it is used,
//! and if the agent dies between the control plane issuing a pair and storing it, the next
//! start trades the old refresh token again (the control plane allows that while the lost
//! pair was never used).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nestbox_types::HostId;
use nestbox_types::api::{
    HeartbeatRequest, HostTokenPair, RefreshHostRequest, RefreshHostResponse, RegisterHostRequest,
    RegisterHostResponse,
};

/// Format version of `credentials.json` (1: a long-lived host token; 2: a token pair).
pub const CREDENTIALS_FORMAT: u32 = 2;

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

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The control plane refused the refresh token (revoked, expired, replayed, or the host
    /// was deleted): the host must be registered again.
    #[error("the control plane refused this host's refresh token ({0}); register the host again")]
    Refused(String),
    /// The control plane could not be reached or answered otherwise (tried again later).
    #[error("refreshing the host's tokens failed: {0}")]
    Unavailable(String),
    /// The new pair could not be stored (it is not used: the old one is kept).
    #[error(transparent)]
    Store(#[from] RegisterError),
}

/// What a registered agent holds.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// [`CREDENTIALS_FORMAT`].
    pub format_version: u32,
    /// The host's id.
    pub host_id: HostId,
    /// Its current token pair.
    pub tokens: HostTokenPair,
    /// When the pair was obtained (its refresh is due after three quarters of the access
    /// token's life).
    pub obtained_at: DateTime<Utc>,
    /// Key the control plane signs calls with.
    pub host_key: String,
    /// The control plane it registered with.
    pub control_plane_url: String,
    /// Its TLS server certificate from the control plane's CA (registrations by versions
    /// without one serve plain HTTP/2 until they register again).
    #[serde(default)]
    pub tls: Option<nestbox_types::api::HostTls>,
}

/// `credentials.json` of format 1: a long-lived host token.
#[derive(serde::Deserialize)]
struct CredentialsV1 {
    host_id: HostId,
    host_token: String,
    host_key: String,
    control_plane_url: String,
    #[serde(default)]
    tls: Option<nestbox_types::api::HostTls>,
}

impl Credentials {
    /// Whether the pair should be traded for the next one now.
    pub fn refresh_due(&self, now: DateTime<Utc>) -> bool {
        let life = self.tokens.access_expires_at - self.obtained_at;
        now >= self.tokens.access_expires_at - life / 4
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("host_id", &self.host_id)
            .field("control_plane_url", &self.control_plane_url)
            .field("tokens", &self.tokens)
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
    let bad = |reason: String| RegisterError::BadCredentials {
        path: path.into(),
        reason,
    };
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| bad(e.to_string()))?
        .get("format_version")
        .and_then(serde_json::Value::as_u64);
    match version {
        Some(1) => {
            // A host token of format 1 is traded once for a pair: until then it stands for
            // both tokens, due for a refresh at once.
            let v1: CredentialsV1 =
                serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
            let now = Utc::now();
            Ok(Some(Credentials {
                format_version: CREDENTIALS_FORMAT,
                host_id: v1.host_id,
                tokens: HostTokenPair {
                    access_token: v1.host_token.clone(),
                    access_expires_at: now,
                    refresh_token: v1.host_token,
                    refresh_expires_at: now + chrono::Duration::days(3650),
                },
                obtained_at: now - chrono::Duration::seconds(1),
                host_key: v1.host_key,
                control_plane_url: v1.control_plane_url,
                tls: v1.tls,
            }))
        }
        Some(v) if v == u64::from(CREDENTIALS_FORMAT) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| bad(e.to_string())),
        other => Err(bad(format!(
            "format version {} is not supported (expected {CREDENTIALS_FORMAT})",
            other.map_or_else(|| "(none)".to_string(), |v| v.to_string())
        ))),
    }
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
        tokens: reg.credentials,
        obtained_at: Utc::now(),
        host_key: reg.host_key,
        control_plane_url: control_plane.to_string(),
        tls: reg.tls,
    };
    store(path, &creds)?;
    tracing::info!(host = %creds.host_id, "registered with the control plane");
    Ok(creds)
}

/// How long one heartbeat may take (a partitioned network must not hang the loop).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent does when it cannot reach its control plane for long (see
/// [`HostSession::heartbeat_loop`]).
pub struct LostContact {
    /// How long without a successful heartbeat.
    pub after: Duration,
    /// What to do then (pause every running sandbox).
    pub pause: Box<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>,
}

/// The agent's credentials while it runs: heartbeats, and the refreshes they need.
pub struct HostSession {
    http: reqwest::Client,
    /// The control plane the agent is configured with now (it may have moved since
    /// registration).
    control_plane: String,
    path: PathBuf,
    creds: tokio::sync::Mutex<Credentials>,
    host_id: HostId,
    /// When the control plane last accepted a heartbeat (Unix ms; 0: never).
    last_ok_ms: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for HostSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSession")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

/// What a heartbeat tells the control plane about the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostReport {
    /// Sandboxes the agent runs.
    pub sandboxes: u32,
    /// The memory that backs guest RAM and what sandboxes hold of it, MiB.
    pub guest_memory_mb: Option<(u64, u64)>,
}

/// How a heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// The control plane refused the host's tokens and the refresh failed too.
    #[error(transparent)]
    Refresh(#[from] RefreshError),
    /// The control plane refused the heartbeat.
    #[error("heartbeat refused: {0}")]
    Refused(reqwest::StatusCode),
    /// It could not be reached.
    #[error("heartbeat failed: {0}")]
    Unreachable(String),
}

impl HostSession {
    /// A session on `creds`, stored at `path`, with the control plane at `control_plane`.
    pub fn new(
        http: reqwest::Client,
        control_plane: &str,
        path: &Path,
        creds: Credentials,
    ) -> Self {
        Self {
            http,
            control_plane: control_plane.trim_end_matches('/').to_string(),
            path: path.to_path_buf(),
            host_id: creds.host_id,
            creds: tokio::sync::Mutex::new(creds),
            last_ok_ms: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The host's id.
    pub fn host_id(&self) -> HostId {
        self.host_id
    }

    /// The credentials held now.
    pub async fn credentials(&self) -> Credentials {
        self.creds.lock().await.clone()
    }

    /// Trades the refresh token for the next pair and stores it; with `only_if_due`, only
    /// when the pair is due (another caller may have refreshed meanwhile).
    pub async fn refresh(&self, only_if_due: bool) -> Result<(), RefreshError> {
        let mut creds = self.creds.lock().await;
        if only_if_due && !creds.refresh_due(Utc::now()) {
            return Ok(());
        }
        let url = format!("{}/v1/hosts/refresh", self.control_plane);
        let resp = self
            .http
            .post(&url)
            .json(&RefreshHostRequest {
                refresh_token: creds.tokens.refresh_token.clone(),
            })
            .send()
            .await
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            let body = resp.text().await.unwrap_or_default();
            return Err(RefreshError::Refused(format!(
                "{status}: {}",
                body.chars().take(300).collect::<String>()
            )));
        }
        if !status.is_success() {
            return Err(RefreshError::Unavailable(format!("{status}")));
        }
        let next: RefreshHostResponse = resp
            .json()
            .await
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?;
        if next.host_id != creds.host_id {
            return Err(RefreshError::Unavailable(format!(
                "the control plane answered for another host ({})",
                next.host_id
            )));
        }
        let mut updated = creds.clone();
        updated.tokens = next.credentials;
        updated.obtained_at = Utc::now();
        // Stored before it is used: a crash from here on restarts with the new pair.
        store(&self.path, &updated)?;
        *creds = updated;
        tracing::info!(host = %creds.host_id, expires = %creds.tokens.access_expires_at, "host tokens refreshed");
        Ok(())
    }

    /// When the control plane last accepted a heartbeat from this process.
    pub fn last_heartbeat(&self) -> Option<DateTime<Utc>> {
        match self.last_ok_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => DateTime::from_timestamp_millis(ms),
        }
    }

    /// Sends one heartbeat: the control plane learns that the agent is up, and at which
    /// address, at once (a restarted agent may listen on another port). Refreshes the
    /// tokens first when due, and once more if the control plane refuses them.
    pub async fn heartbeat(&self, address: &str, report: HostReport) -> Result<(), HeartbeatError> {
        let due = self.creds.lock().await.refresh_due(Utc::now());
        if due && let Err(e) = self.refresh(true).await {
            // The current access token may still work: try it.
            tracing::warn!(error = %e, "refreshing the host's tokens before they expire");
        }
        match self.send_heartbeat(address, report).await {
            Err(HeartbeatError::Refused(status))
                if status == reqwest::StatusCode::UNAUTHORIZED
                    || status == reqwest::StatusCode::FORBIDDEN =>
            {
                self.refresh(false).await?;
                self.send_heartbeat(address, report).await
            }
            other => other,
        }
    }

    async fn send_heartbeat(
        &self,
        address: &str,
        report: HostReport,
    ) -> Result<(), HeartbeatError> {
        let token = self.creds.lock().await.tokens.access_token.clone();
        let url = format!("{}/v1/hosts/{}/heartbeat", self.control_plane, self.host_id);
        let body = HeartbeatRequest {
            sandboxes: report.sandboxes,
            version: crate::VERSION.to_string(),
            address: address.to_string(),
            guest_memory_mb: report.guest_memory_mb.map(|(total, _)| total),
            guest_memory_used_mb: report.guest_memory_mb.map(|(_, used)| used),
        };
        match self
            .http
            .post(&url)
            .bearer_auth(token)
            .timeout(HEARTBEAT_TIMEOUT)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                self.last_ok_ms.store(
                    Utc::now().timestamp_millis(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                Ok(())
            }
            Ok(r) => Err(HeartbeatError::Refused(r.status())),
            Err(e) => Err(HeartbeatError::Unreachable(e.to_string())),
        }
    }

    /// Sends a heartbeat every `interval` until the task is aborted. When heartbeats
    /// (refreshes included) have failed for `lost.after`, runs `lost.pause` once per
    /// outage.
    pub async fn heartbeat_loop(
        self: std::sync::Arc<Self>,
        address: String,
        interval: Duration,
        report: impl Fn() -> HostReport + Send + 'static,
        lost: Option<LostContact>,
    ) {
        let mut tick = tokio::time::interval(interval);
        let mut failing = false;
        let mut last_ok = std::time::Instant::now();
        let mut paused = false;
        loop {
            tick.tick().await;
            match self.heartbeat(&address, report()).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("heartbeats reach the control plane again");
                    }
                    if paused {
                        tracing::info!(
                            "the sandboxes paused while the control plane was away stay paused until resumed"
                        );
                    }
                    failing = false;
                    paused = false;
                    last_ok = std::time::Instant::now();
                }
                Err(e) => {
                    if !failing {
                        if matches!(e, HeartbeatError::Refresh(RefreshError::Refused(_))) {
                            tracing::error!(error = %e, "the control plane no longer accepts this host");
                        } else {
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                    }
                    failing = true;
                    if let Some(lost) = &lost
                        && !paused
                        && last_ok.elapsed() >= lost.after
                    {
                        tracing::warn!(
                            secs = last_ok.elapsed().as_secs(),
                            "the control plane is out of reach: pausing every running sandbox with its memory"
                        );
                        (lost.pause)().await;
                        paused = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pair(obtained: DateTime<Utc>, life: chrono::Duration) -> Credentials {
        Credentials {
            format_version: CREDENTIALS_FORMAT,
            host_id: HostId::new(),
            tokens: HostTokenPair {
                access_token: "a".into(),
                access_expires_at: obtained + life,
                refresh_token: "r".into(),
                refresh_expires_at: obtained + life * 8,
            },
            obtained_at: obtained,
            host_key: "k".into(),
            control_plane_url: "http://127.0.0.1:1".into(),
            tls: None,
        }
    }

    #[test]
    fn a_refresh_is_due_after_three_quarters_of_the_access_tokens_life() {
        let t0 = Utc::now();
        let c = pair(t0, chrono::Duration::days(7));
        assert!(!c.refresh_due(t0));
        assert!(!c.refresh_due(t0 + chrono::Duration::days(5)));
        assert!(c.refresh_due(t0 + chrono::Duration::hours(5 * 24 + 6)));
        assert!(c.refresh_due(t0 + chrono::Duration::days(8)));
    }

    #[test]
    fn credentials_round_trip_and_first_version_ones_are_due_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        let c = pair(Utc::now(), chrono::Duration::days(7));
        store(&path, &c).unwrap();
        let back = load(&path).unwrap().unwrap();
        assert_eq!(back.tokens, c.tokens);
        assert_eq!(back.host_id, c.host_id);

        let host = HostId::new();
        std::fs::write(
            &path,
            serde_json::json!({
                "format_version": 1, "host_id": host, "host_token": "nbxhost_x",
                "host_key": "k", "control_plane_url": "http://127.0.0.1:1",
            })
            .to_string(),
        )
        .unwrap();
        let v1 = load(&path).unwrap().unwrap();
        assert_eq!(v1.host_id, host);
        assert_eq!(v1.tokens.refresh_token, "nbxhost_x");
        assert!(v1.refresh_due(Utc::now()));

        std::fs::write(&path, r#"{"format_version": 9}"#).unwrap();
        assert!(matches!(
            load(&path),
            Err(RegisterError::BadCredentials { .. })
        ));
    }
}
