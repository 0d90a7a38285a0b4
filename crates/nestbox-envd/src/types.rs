//! JSON of envd's plain HTTP endpoints (`/init`, `/envs`, `/metrics`, `/files`).
//!
//! Names follow E2B's envd OpenAPI spec; fields this agent does not know are ignored on
//! input, so that newer orchestrators and SDKs keep working.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /init`: the host agent hands the guest its token, environment and defaults.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRequest {
    /// The token every later request must carry in `X-Access-Token`. Setting it on an
    /// initialised guest rotates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Merged into the environment of every process started afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// The user of requests that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user: Option<String>,
    /// The working directory of processes that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_workdir: Option<String>,
    /// The host's current time, to set the guest clock after a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
    /// Nestbox extension: the guest's host name (clones of a snapshot get their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Nestbox extension: random bytes from the host, hex, mixed into the guest kernel's
    /// random generator, which is then reseeded. Clones of one snapshot start with the
    /// same generator state; this makes them diverge at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<String>,
}

impl fmt::Debug for InitRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitRequest")
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "env_vars",
                &self
                    .env_vars
                    .as_ref()
                    .map(|vars| vars.keys().collect::<Vec<_>>()),
            )
            .field("default_user", &self.default_user)
            .field("default_workdir", &self.default_workdir)
            .field("timestamp", &self.timestamp)
            .field("hostname", &self.hostname)
            .field("entropy", &self.entropy.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `GET /metrics`: the guest's resource usage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Unix time of the sample, seconds.
    pub ts: i64,
    /// Online CPUs.
    pub cpu_count: u32,
    /// CPU busy share since the previous sample, percent of all CPUs (0–100).
    pub cpu_used_pct: f32,
    /// Total memory, bytes.
    pub mem_total: u64,
    /// Memory in use (total minus available), bytes.
    pub mem_used: u64,
    /// Used space of the root filesystem, bytes.
    pub disk_used: u64,
    /// Size of the root filesystem, bytes.
    pub disk_total: u64,
}

/// The kind of an uploaded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadEntryType {
    /// A regular file.
    File,
    /// A kind this client does not know.
    #[serde(other)]
    Other,
}

/// One element of the `POST /files` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadEntry {
    /// Absolute path of the written file.
    pub path: String,
    /// Its file name.
    pub name: String,
    /// Always [`UploadEntryType::File`] today.
    #[serde(rename = "type")]
    pub kind: UploadEntryType,
    /// The user metadata stored with the file (`X-Metadata-*` headers), when any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The JSON body of plain-HTTP errors: `{"code":404,"message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    /// The HTTP status, repeated.
    pub code: u16,
    /// What went wrong.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_request_uses_camel_case_and_ignores_unknown_fields() {
        let json = r#"{"accessToken":"t","envVars":{"A":"1"},"defaultUser":"user",
            "defaultWorkdir":"/home/user","timestamp":"2024-05-01T12:00:00Z",
            "hostname":"sb-1","volumeMounts":[],"hyperloopIP":"10.0.0.1"}"#;
        let req: InitRequest = serde_json::from_str(json).unwrap();
        assert_eq!(req.access_token.as_deref(), Some("t"));
        assert_eq!(req.env_vars.as_ref().unwrap()["A"], "1");
        assert_eq!(req.timestamp.unwrap().timestamp(), 1_714_564_800);
        assert_eq!(req.hostname.as_deref(), Some("sb-1"));
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["defaultWorkdir"], "/home/user");
        assert!(!format!("{req:?}").contains("\"t\""));
        assert_eq!(
            serde_json::from_str::<InitRequest>("{}").unwrap(),
            InitRequest::default()
        );
    }

    #[test]
    fn upload_entries_and_metrics() {
        let entry = UploadEntry {
            path: "/a/b".into(),
            name: "b".into(),
            kind: UploadEntryType::File,
            metadata: None,
        };
        assert_eq!(
            serde_json::to_string(&[entry]).unwrap(),
            r#"[{"path":"/a/b","name":"b","type":"file"}]"#
        );
        let odd: UploadEntry =
            serde_json::from_str(r#"{"path":"/x","name":"x","type":"dir"}"#).unwrap();
        assert_eq!(odd.kind, UploadEntryType::Other);
        let metrics: Metrics = serde_json::from_str(
            r#"{"ts":1,"cpu_count":2,"cpu_used_pct":12.5,"mem_total":3,"mem_used":2,
                "disk_used":1,"disk_total":9}"#,
        )
        .unwrap();
        assert_eq!(metrics.cpu_count, 2);
    }
}
