//! A typed caller of the routes `nestbox_client::Client` does not cover yet (pause,
//! resume, ping, snapshots, the admin template list), with the same error type so that
//! [`super::api_error`] checks them alike.

use nestbox_client::ClientError;
use nestbox_types::api::{CreateSnapshotRequest, Page, Sandbox, Template};
use nestbox_types::{ErrorBody, ErrorCode, SandboxId, TemplateKind};
use reqwest::Method;
use serde::de::DeserializeOwned;

/// Calls the API with one set of credentials.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    headers: Vec<(&'static str, String)>,
}

impl Api {
    /// Acting with `headers` (an API key, or a session and a team).
    pub fn new(base: &str, headers: Vec<(&'static str, String)>) -> Self {
        Self {
            base: base.to_string(),
            http: reqwest::Client::new(),
            headers,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method, &url);
        for (name, value) in &self.headers {
            rb = rb.header(*name, value);
        }
        if let Some(body) = body {
            rb = rb.json(&body);
        }
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| {
            ErrorBody::new(ErrorCode::Internal, format!("HTTP {status}: {text}"))
        });
        Err(ClientError::Api { status, body })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ClientError> {
        let resp = self.send(method, path, body).await?;
        let text = resp.text().await.unwrap_or_default();
        serde_json::from_str(&text).map_err(|e| ClientError::Protocol {
            url: path.to_string(),
            detail: format!("{e}: {text}"),
        })
    }

    /// `POST /v1/sandboxes/{id}/pause`.
    pub async fn pause(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None)
            .await
    }

    /// `POST /v1/sandboxes/{id}/resume`.
    pub async fn resume(&self, id: SandboxId) -> Result<Sandbox, ClientError> {
        self.json(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None)
            .await
    }

    /// `POST /v1/sandboxes/{id}/ping`.
    pub async fn ping(&self, id: SandboxId) -> Result<(), ClientError> {
        self.send(Method::POST, &format!("/v1/sandboxes/{id}/ping"), None)
            .await
            .map(drop)
    }

    /// `POST /v1/snapshots`.
    pub async fn snapshot(&self, req: &CreateSnapshotRequest) -> Result<Template, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| ClientError::Protocol {
            url: "/v1/snapshots".into(),
            detail: e.to_string(),
        })?;
        self.json(Method::POST, "/v1/snapshots", Some(body)).await
    }

    /// `GET /v1/snapshots[?kind=]`.
    pub async fn snapshots(
        &self,
        kind: Option<TemplateKind>,
    ) -> Result<Page<Template>, ClientError> {
        let path = match kind {
            Some(k) => format!("/v1/snapshots?kind={k}"),
            None => "/v1/snapshots".into(),
        };
        self.json(Method::GET, &path, None).await
    }

    /// `DELETE /v1/snapshots/{name}`.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &format!("/v1/snapshots/{name}"), None)
            .await
            .map(drop)
    }

    /// `GET /v1/admin/templates`.
    pub async fn admin_templates(&self) -> Result<Page<Template>, ClientError> {
        self.json(Method::GET, "/v1/admin/templates", None).await
    }
}

/// `POST /v1/snapshots` body: a snapshot of `sandbox` named `name`.
pub fn snapshot(sandbox: SandboxId, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        sandbox_id: sandbox,
        name: name.into(),
        overwrite: false,
        kind: None,
    }
}
