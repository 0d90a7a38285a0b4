//! The typed envd client the host agent drives a guest with (feature `client`).
//!
//! Connect calls use the protobuf binary encoding; the acting user travels as E2B's SDKs
//! send it (`Authorization: Basic base64("<user>:")` on Connect calls, `username` on
//! `/files`), the access token in `X-Access-Token`. An [`EnvdClient`] is cheap to clone: the
//! connection pool is shared, and [`EnvdClient::as_user`], [`EnvdClient::with_timeout`] and
//! [`EnvdClient::with_access_token`] derive clients that reuse it.
//!
//! Every failure is an [`EnvdError`] carrying the Connect [`Code`] (plain-HTTP endpoints'
//! statuses are mapped to codes too), the message and the HTTP status when there was one.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderValue, StatusCode, header};

use crate::connect::client::{
    StreamDecoder, StreamItem, decode_unary_response, encode_request_message, error_from_http,
};
use crate::connect::{
    CONTENT_TYPE_CONNECT_PROTO, CONTENT_TYPE_PROTO, Code, Codec, ConnectError, HEADER_TIMEOUT,
    Message,
};
use crate::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, FilesystemEvent,
    GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest, ListDirResponse,
    MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest, RemoveResponse,
    RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest,
    WatchDirResponse,
};
use crate::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, Pty, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, UpdateRequest, UpdateResponse, stream_input_request,
};
use crate::types::{HttpError, InitRequest, Metrics, UploadEntry};
use crate::{auth, headers};

/// Largest response message or error body the client reads.
const MAX_MESSAGE: usize = 64 << 20;
/// Largest error body kept from a failed plain-HTTP call.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A stream of results from the guest.
pub type EnvdStream<T> = Pin<Box<dyn Stream<Item = Result<T, EnvdError>> + Send + 'static>>;

/// Why a call to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// The guest answered with an error.
    #[error("envd {operation}: {code}: {message}")]
    Status {
        /// The call, e.g. `process.Start` or `POST /files`.
        operation: &'static str,
        /// What kind of failure.
        code: Code,
        /// The guest's explanation.
        message: String,
        /// The HTTP status, when the error was one (streamed errors arrive with 200).
        http_status: Option<u16>,
    },
    /// The guest could not be reached, or the connection broke.
    #[error("envd {operation}: cannot reach the guest agent")]
    Transport {
        /// The call.
        operation: &'static str,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The guest answered something this client cannot understand.
    #[error("envd {operation}: malformed response: {detail}")]
    Protocol {
        /// The call.
        operation: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The client was built or called with an unusable value.
    #[error("invalid envd client input: {detail}")]
    InvalidInput {
        /// What was wrong.
        detail: String,
    },
}

impl EnvdError {
    fn from_connect(operation: &'static str, err: ConnectError, http_status: Option<u16>) -> Self {
        EnvdError::Status {
            operation,
            code: err.code,
            message: err.message,
            http_status,
        }
    }

    /// The Connect code: the guest's, or `unavailable` for transport failures and `internal`
    /// for malformed answers.
    pub fn code(&self) -> Code {
        match self {
            EnvdError::Status { code, .. } => *code,
            EnvdError::Transport { .. } => Code::Unavailable,
            EnvdError::Protocol { .. } => Code::Internal,
            EnvdError::InvalidInput { .. } => Code::InvalidArgument,
        }
    }

    /// The HTTP status of the failed response, if there was one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            EnvdError::Status { http_status, .. } => *http_status,
            EnvdError::Transport { source, .. } => source.status().map(|s| s.as_u16()),
            _ => None,
        }
    }

    /// The guest's message, or this error's description.
    pub fn message(&self) -> String {
        match self {
            EnvdError::Status { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// `not_found`: no such process, file or directory.
    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }

    /// `already_exists`.
    pub fn is_already_exists(&self) -> bool {
        self.code() == Code::AlreadyExists
    }

    /// `unauthenticated`: missing or wrong access token, or unknown user.
    pub fn is_unauthenticated(&self) -> bool {
        self.code() == Code::Unauthenticated
    }

    /// `permission_denied`.
    pub fn is_permission_denied(&self) -> bool {
        self.code() == Code::PermissionDenied
    }

    /// `invalid_argument`.
    pub fn is_invalid_argument(&self) -> bool {
        self.code() == Code::InvalidArgument
    }

    /// `deadline_exceeded`.
    pub fn is_deadline_exceeded(&self) -> bool {
        self.code() == Code::DeadlineExceeded
    }

    /// `unavailable`: the guest is unreachable or the stream was cut; retrying may help.
    pub fn is_unavailable(&self) -> bool {
        self.code() == Code::Unavailable
    }
}

/// The code a plain-HTTP status stands for.
fn rest_code(status: StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::AlreadyExists,
        413 | 429 | 507 => Code::ResourceExhausted,
        501 => Code::Unimplemented,
        502..=504 => Code::Unavailable,
        _ => Code::Internal,
    }
}

struct Shared {
    http: reqwest::Client,
    base: String,
}

/// A client of one guest agent.
#[derive(Clone)]
pub struct EnvdClient {
    shared: Arc<Shared>,
    token: Option<HeaderValue>,
    user: Option<HeaderValue>,
    timeout: Option<Duration>,
}

impl fmt::Debug for EnvdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvdClient")
            .field("base", &self.shared.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn token_header(token: Option<String>) -> Result<Option<HeaderValue>, EnvdError> {
    token
        .map(|t| {
            let mut value = HeaderValue::from_str(&t).map_err(|_| EnvdError::InvalidInput {
                detail: "the access token is not a valid header value".into(),
            })?;
            value.set_sensitive(true);
            Ok(value)
        })
        .transpose()
}

impl EnvdClient {
    /// A client of the guest at `base_url` (`http://10.11.0.2:49983`), with its own
    /// connection pool.
    pub fn new(
        base_url: impl Into<String>,
        access_token: Option<String>,
    ) -> Result<Self, EnvdError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| EnvdError::InvalidInput {
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        Self::with_http_client(http, base_url, access_token)
    }

    /// A client on an existing connection pool (one per host agent, say).
    pub fn with_http_client(
        http: reqwest::Client,
        base_url: impl Into<String>,
        access_token: Option<String>,
    ) -> Result<Self, EnvdError> {
        let base = base_url.into().trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(EnvdError::InvalidInput {
                detail: format!("base url {base:?} must start with http:// or https://"),
            });
        }
        Ok(Self {
            shared: Arc::new(Shared { http, base }),
            token: token_header(access_token)?,
            user: None,
            timeout: None,
        })
    }

    /// The same guest with another access token (after a rotation through `/init`).
    pub fn with_access_token(&self, access_token: Option<String>) -> Result<Self, EnvdError> {
        Ok(Self {
            token: token_header(access_token)?,
            ..self.clone()
        })
    }

    /// The same guest, acting as `user` on Connect calls.
    pub fn as_user(&self, user: &str) -> Result<Self, EnvdError> {
        let value = HeaderValue::from_str(&auth::basic_user_header(user)).map_err(|_| {
            EnvdError::InvalidInput {
                detail: format!("user name {user:?} is not a valid header value"),
            }
        })?;
        Ok(Self {
            user: Some(value),
            ..self.clone()
        })
    }

    /// The same guest with a deadline on every call: sent as `Connect-Timeout-Ms` (for
    /// `start`, the guest kills the process group when it passes) and enforced locally on
    /// unary and plain-HTTP calls.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.shared.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut builder = self
            .shared
            .http
            .request(method, format!("{}{}", self.shared.base, path));
        if let Some(token) = &self.token {
            builder = builder.header(headers::ACCESS_TOKEN, token.clone());
        }
        builder
    }

    fn connect_request(
        &self,
        path: &str,
        content_type: &'static str,
        streaming: bool,
    ) -> reqwest::RequestBuilder {
        let mut builder = self
            .request(reqwest::Method::POST, path)
            .header(header::CONTENT_TYPE, content_type)
            .header(crate::connect::HEADER_PROTOCOL_VERSION, "1");
        if let Some(user) = &self.user {
            builder = builder.header(header::AUTHORIZATION, user.clone());
        }
        if let Some(timeout) = self.timeout {
            builder = builder.header(HEADER_TIMEOUT, timeout.as_millis().max(1).to_string());
            if !streaming {
                // A little slack so that the guest's deadline error wins the race.
                builder = builder.timeout(timeout + Duration::from_secs(1));
            }
        }
        builder
    }

    fn plain_timeout(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.timeout {
            Some(timeout) => builder.timeout(timeout),
            None => builder,
        }
    }

    async fn send(
        operation: &'static str,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, EnvdError> {
        builder
            .send()
            .await
            .map_err(|source| EnvdError::Transport { operation, source })
    }

    async fn read_capped(
        operation: &'static str,
        response: &mut reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, EnvdError> {
        let mut buffer = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|source| EnvdError::Transport { operation, source })?
        {
            if buffer.len() + chunk.len() > limit {
                return Err(EnvdError::Protocol {
                    operation,
                    detail: format!("response is larger than {limit} bytes"),
                });
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer.freeze())
    }

    /// Turns a failed plain-HTTP response into an error.
    async fn rest_error(operation: &'static str, mut response: reqwest::Response) -> EnvdError {
        let status = response.status();
        let body = Self::read_capped(operation, &mut response, MAX_ERROR_BODY)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<HttpError>(&body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
        EnvdError::Status {
            operation,
            code: rest_code(status),
            message,
            http_status: Some(status.as_u16()),
        }
    }

    async fn unary<Req: Message, Resp: Message>(
        &self,
        operation: &'static str,
        path: &'static str,
        request: &Req,
    ) -> Result<Resp, EnvdError> {
        let body = Codec::Proto
            .encode(request)
            .map_err(|e| EnvdError::from_connect(operation, e, None))?;
        let builder = self
            .connect_request(path, CONTENT_TYPE_PROTO, false)
            .body(body);
        let mut response = Self::send(operation, builder).await?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Self::read_capped(operation, &mut response, MAX_MESSAGE).await?;
        decode_unary_response(status, content_type.as_deref(), &body).map_err(|err| {
            if status.is_success() {
                EnvdError::Protocol {
                    operation,
                    detail: err.message,
                }
            } else {
                EnvdError::from_connect(operation, err, Some(status.as_u16()))
            }
        })
    }

    async fn server_stream<Req: Message, Resp: Message>(
        &self,
        operation: &'static str,
        path: &'static str,
        request: &Req,
    ) -> Result<EnvdStream<Resp>, EnvdError> {
        let body = encode_request_message(Codec::Proto, request)
            .map_err(|e| EnvdError::from_connect(operation, e, None))?;
        let builder = self
            .connect_request(path, CONTENT_TYPE_CONNECT_PROTO, true)
            .body(body);
        let response = Self::send(operation, builder).await?;
        Self::response_stream(operation, response).await
    }

    async fn response_stream<Resp: Message>(
        operation: &'static str,
        mut response: reqwest::Response,
    ) -> Result<EnvdStream<Resp>, EnvdError> {
        let status = response.status();
        if status != StatusCode::OK {
            let body = Self::read_capped(operation, &mut response, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            return Err(EnvdError::from_connect(
                operation,
                error_from_http(status, &body),
                Some(status.as_u16()),
            ));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with(CONTENT_TYPE_CONNECT_PROTO) {
            return Err(EnvdError::Protocol {
                operation,
                detail: format!("unexpected content type {content_type:?} in a stream"),
            });
        }
        struct State<M> {
            response: reqwest::Response,
            decoder: StreamDecoder<M>,
            done: bool,
        }
        let state = State {
            response,
            decoder: StreamDecoder::<Resp>::new(Codec::Proto, MAX_MESSAGE),
            done: false,
        };
        let stream = futures::stream::unfold(state, move |mut state| async move {
            loop {
                if state.done {
                    return None;
                }
                match state.decoder.next_item() {
                    Ok(Some(StreamItem::Message(message))) => return Some((Ok(message), state)),
                    Ok(Some(StreamItem::End(Ok(())))) => return None,
                    Ok(Some(StreamItem::End(Err(err)))) => {
                        state.done = true;
                        return Some((Err(EnvdError::from_connect(operation, err, None)), state));
                    }
                    Err(err) => {
                        state.done = true;
                        let detail = err.message;
                        return Some((Err(EnvdError::Protocol { operation, detail }), state));
                    }
                    Ok(None) => {}
                }
                match state.response.chunk().await {
                    Ok(Some(chunk)) => state.decoder.push(&chunk),
                    Ok(None) => {
                        return match state.decoder.finish() {
                            Ok(()) => None,
                            Err(err) => {
                                state.done = true;
                                Some((Err(EnvdError::from_connect(operation, err, None)), state))
                            }
                        };
                    }
                    Err(source) => {
                        state.done = true;
                        return Some((Err(EnvdError::Transport { operation, source }), state));
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    // --- plain HTTP ---

    /// `GET /health`: the guest agent's version, from the `nestbox-guest-version` header.
    pub async fn health(&self) -> Result<String, EnvdError> {
        const OP: &str = "GET /health";
        let response = Self::send(
            OP,
            self.plain_timeout(self.request(reqwest::Method::GET, "/health")),
        )
        .await?;
        if !response.status().is_success() {
            return Err(Self::rest_error(OP, response).await);
        }
        response
            .headers()
            .get(headers::GUEST_VERSION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| EnvdError::Protocol {
                operation: OP,
                detail: format!(
                    "no {} header: not a Nestbox guest agent",
                    headers::GUEST_VERSION
                ),
            })
    }

    /// `POST /init`: sets (or, with the current token, rotates) the access token, the
    /// default environment, user and working directory, the clock and the host name.
    pub async fn init(&self, request: &InitRequest) -> Result<(), EnvdError> {
        const OP: &str = "POST /init";
        let builder =
            self.plain_timeout(self.request(reqwest::Method::POST, "/init").json(request));
        let response = Self::send(OP, builder).await?;
        if !response.status().is_success() {
            return Err(Self::rest_error(OP, response).await);
        }
        Ok(())
    }

    /// `GET /envs`: the default environment set by `/init`.
    pub async fn envs(&self) -> Result<BTreeMap<String, String>, EnvdError> {
        self.get_json("GET /envs", "/envs").await
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Result<Metrics, EnvdError> {
        self.get_json("GET /metrics", "/metrics").await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
    ) -> Result<T, EnvdError> {
        let builder = self.plain_timeout(self.request(reqwest::Method::GET, path));
        let mut response = Self::send(operation, builder).await?;
        if !response.status().is_success() {
            return Err(Self::rest_error(operation, response).await);
        }
        let body = Self::read_capped(operation, &mut response, MAX_MESSAGE).await?;
        serde_json::from_slice(&body).map_err(|e| EnvdError::Protocol {
            operation,
            detail: e.to_string(),
        })
    }

    /// `GET /files`: the file's size (when the guest announces it) and its content, streamed.
    pub async fn download(
        &self,
        path: &str,
        user: Option<&str>,
    ) -> Result<(Option<u64>, EnvdStream<Bytes>), EnvdError> {
        const OP: &str = "GET /files";
        let mut query = vec![("path", path)];
        if let Some(user) = user {
            query.push(("username", user));
        }
        let builder = self.request(reqwest::Method::GET, "/files").query(&query);
        let response = Self::send(OP, builder).await?;
        if !response.status().is_success() {
            return Err(Self::rest_error(OP, response).await);
        }
        let size = response.content_length();
        let stream = futures::stream::unfold(Some(response), |state| async move {
            let mut response = state?;
            match response.chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(response))),
                Ok(None) => None,
                Err(source) => Some((
                    Err(EnvdError::Transport {
                        operation: OP,
                        source,
                    }),
                    None,
                )),
            }
        });
        Ok((size, Box::pin(stream)))
    }

    /// `POST /files` with a raw body: streams `body` to `path` (parents are created, the
    /// file belongs to `user`), replacing any file there. An error item aborts the request,
    /// so the guest discards the partial file instead of keeping a truncated one.
    pub async fn upload<S, E>(
        &self,
        path: &str,
        user: Option<&str>,
        body: S,
    ) -> Result<Vec<UploadEntry>, EnvdError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        const OP: &str = "POST /files";
        let mut query = vec![("path", path)];
        if let Some(user) = user {
            query.push(("username", user));
        }
        let body = reqwest::Body::wrap_stream(body);
        let builder = self
            .request(reqwest::Method::POST, "/files")
            .query(&query)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let mut response = Self::send(OP, builder).await?;
        if !response.status().is_success() {
            return Err(Self::rest_error(OP, response).await);
        }
        let body = Self::read_capped(OP, &mut response, MAX_MESSAGE).await?;
        serde_json::from_slice(&body).map_err(|e| EnvdError::Protocol {
            operation: OP,
            detail: e.to_string(),
        })
    }

    // --- process.Process ---

    /// `process.Start`: starts a process and streams its events (start, data, end). The
    /// process outlives the stream; reattach with [`EnvdClient::connect`].
    pub async fn start(
        &self,
        request: StartRequest,
    ) -> Result<EnvdStream<ProcessEvent>, EnvdError> {
        let stream = self
            .server_stream::<_, StartResponse>("process.Start", "/process.Process/Start", &request)
            .await?;
        Ok(Box::pin(stream.filter_map(|item| async move {
            item.map(|r| r.event).transpose()
        })))
    }

    /// `process.Connect`: attaches to a running process's live events.
    pub async fn connect(
        &self,
        process: ProcessSelector,
    ) -> Result<EnvdStream<ProcessEvent>, EnvdError> {
        let request = ConnectRequest {
            process: Some(process),
        };
        let stream = self
            .server_stream::<_, ConnectResponse>(
                "process.Connect",
                "/process.Process/Connect",
                &request,
            )
            .await?;
        Ok(Box::pin(stream.filter_map(|item| async move {
            item.map(|r| r.event).transpose()
        })))
    }

    /// `process.List`: the running processes.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>, EnvdError> {
        let response: ListResponse = self
            .unary("process.List", "/process.Process/List", &ListRequest {})
            .await?;
        Ok(response.processes)
    }

    /// `process.SendInput`: writes to the process's stdin (or PTY).
    pub async fn send_input(
        &self,
        process: ProcessSelector,
        input: ProcessInput,
    ) -> Result<(), EnvdError> {
        let request = SendInputRequest {
            process: Some(process),
            input: Some(input),
        };
        let _: SendInputResponse = self
            .unary("process.SendInput", "/process.Process/SendInput", &request)
            .await?;
        Ok(())
    }

    /// `process.StreamInput`: writes every input of `inputs`, in order, over one
    /// client-streaming call.
    pub async fn stream_input<S>(
        &self,
        process: ProcessSelector,
        inputs: S,
    ) -> Result<(), EnvdError>
    where
        S: Stream<Item = ProcessInput> + Send + 'static,
    {
        const OP: &str = "process.StreamInput";
        let start = StreamInputRequest {
            event: Some(stream_input_request::Event::Start(
                stream_input_request::StartEvent {
                    process: Some(process),
                },
            )),
        };
        let first = futures::stream::iter([start]);
        let data = inputs.map(|input| StreamInputRequest {
            event: Some(stream_input_request::Event::Data(
                stream_input_request::DataEvent { input: Some(input) },
            )),
        });
        let frames = first.chain(data).map(|message| {
            encode_request_message(Codec::Proto, &message)
                .map_err(|e| std::io::Error::other(e.message))
        });
        let builder = self
            .connect_request(
                "/process.Process/StreamInput",
                CONTENT_TYPE_CONNECT_PROTO,
                true,
            )
            .body(reqwest::Body::wrap_stream(frames));
        let response = Self::send(OP, builder).await?;
        let mut stream = Self::response_stream::<StreamInputResponse>(OP, response).await?;
        while let Some(item) = stream.next().await {
            item?;
        }
        Ok(())
    }

    /// `process.CloseStdin`: end of input for a process started with stdin.
    pub async fn close_stdin(&self, process: ProcessSelector) -> Result<(), EnvdError> {
        let request = CloseStdinRequest {
            process: Some(process),
        };
        let _: CloseStdinResponse = self
            .unary(
                "process.CloseStdin",
                "/process.Process/CloseStdin",
                &request,
            )
            .await?;
        Ok(())
    }

    /// `process.SendSignal`: signals the process's group.
    pub async fn send_signal(
        &self,
        process: ProcessSelector,
        signal: Signal,
    ) -> Result<(), EnvdError> {
        let request = SendSignalRequest {
            process: Some(process),
            signal: signal as i32,
        };
        let _: SendSignalResponse = self
            .unary(
                "process.SendSignal",
                "/process.Process/SendSignal",
                &request,
            )
            .await?;
        Ok(())
    }

    /// `process.Update`: resizes a PTY process's terminal.
    pub async fn update(
        &self,
        process: ProcessSelector,
        pty: Option<Pty>,
    ) -> Result<(), EnvdError> {
        let request = UpdateRequest {
            process: Some(process),
            pty,
        };
        let _: UpdateResponse = self
            .unary("process.Update", "/process.Process/Update", &request)
            .await?;
        Ok(())
    }

    // --- filesystem.Filesystem ---

    /// `filesystem.Stat`.
    pub async fn stat(&self, path: &str) -> Result<EntryInfo, EnvdError> {
        const OP: &str = "filesystem.Stat";
        let request = StatRequest { path: path.into() };
        let response: StatResponse = self
            .unary(OP, "/filesystem.Filesystem/Stat", &request)
            .await?;
        response.entry.ok_or_else(|| missing_entry(OP))
    }

    /// `filesystem.ListDir`: entries under `path` down to `depth` levels (at least 1).
    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>, EnvdError> {
        let request = ListDirRequest {
            path: path.into(),
            depth,
        };
        let response: ListDirResponse = self
            .unary(
                "filesystem.ListDir",
                "/filesystem.Filesystem/ListDir",
                &request,
            )
            .await?;
        Ok(response.entries)
    }

    /// `filesystem.MakeDir`: creates `path` and its parents; `already_exists` if present.
    pub async fn make_dir(&self, path: &str) -> Result<EntryInfo, EnvdError> {
        const OP: &str = "filesystem.MakeDir";
        let request = MakeDirRequest { path: path.into() };
        let response: MakeDirResponse = self
            .unary(OP, "/filesystem.Filesystem/MakeDir", &request)
            .await?;
        response.entry.ok_or_else(|| missing_entry(OP))
    }

    /// `filesystem.Remove`: removes a file, or a directory with its content.
    pub async fn remove(&self, path: &str) -> Result<(), EnvdError> {
        let request = RemoveRequest { path: path.into() };
        let _: RemoveResponse = self
            .unary(
                "filesystem.Remove",
                "/filesystem.Filesystem/Remove",
                &request,
            )
            .await?;
        Ok(())
    }

    /// `filesystem.Move`: renames `source` to `destination`.
    pub async fn move_path(&self, source: &str, destination: &str) -> Result<EntryInfo, EnvdError> {
        const OP: &str = "filesystem.Move";
        let request = MoveRequest {
            source: source.into(),
            destination: destination.into(),
        };
        let response: MoveResponse = self
            .unary(OP, "/filesystem.Filesystem/Move", &request)
            .await?;
        response.entry.ok_or_else(|| missing_entry(OP))
    }
}

impl EnvdClient {
    /// `filesystem.WatchDir`: a start event once the watch is in place, then changes under
    /// `path` (and its subdirectories when `recursive`) until the stream is dropped.
    pub async fn watch_dir(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<EnvdStream<WatchDirResponse>, EnvdError> {
        self.watch_dir_with(WatchDirRequest {
            path: path.into(),
            recursive,
            include_entry: false,
            allow_network_mounts: false,
        })
        .await
    }

    /// `filesystem.WatchDir` with every option of the request (entries in events, network
    /// mounts).
    pub async fn watch_dir_with(
        &self,
        request: WatchDirRequest,
    ) -> Result<EnvdStream<WatchDirResponse>, EnvdError> {
        self.server_stream(
            "filesystem.WatchDir",
            "/filesystem.Filesystem/WatchDir",
            &request,
        )
        .await
    }

    /// `filesystem.CreateWatcher`: a polled watcher; returns its id.
    pub async fn create_watcher(&self, path: &str, recursive: bool) -> Result<String, EnvdError> {
        let request = CreateWatcherRequest {
            path: path.into(),
            recursive,
            include_entry: false,
            allow_network_mounts: false,
        };
        let response: CreateWatcherResponse = self
            .unary(
                "filesystem.CreateWatcher",
                "/filesystem.Filesystem/CreateWatcher",
                &request,
            )
            .await?;
        Ok(response.watcher_id)
    }

    /// `filesystem.GetWatcherEvents`: the events since the previous call.
    pub async fn get_watcher_events(
        &self,
        watcher_id: &str,
    ) -> Result<Vec<FilesystemEvent>, EnvdError> {
        let request = GetWatcherEventsRequest {
            watcher_id: watcher_id.into(),
        };
        let response: GetWatcherEventsResponse = self
            .unary(
                "filesystem.GetWatcherEvents",
                "/filesystem.Filesystem/GetWatcherEvents",
                &request,
            )
            .await?;
        Ok(response.events)
    }

    /// `filesystem.RemoveWatcher`.
    pub async fn remove_watcher(&self, watcher_id: &str) -> Result<(), EnvdError> {
        let request = RemoveWatcherRequest {
            watcher_id: watcher_id.into(),
        };
        let _: RemoveWatcherResponse = self
            .unary(
                "filesystem.RemoveWatcher",
                "/filesystem.Filesystem/RemoveWatcher",
                &request,
            )
            .await?;
        Ok(())
    }
}

fn missing_entry(operation: &'static str) -> EnvdError {
    EnvdError::Protocol {
        operation,
        detail: "the response carries no entry".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_expose_codes() {
        let err = EnvdError::from_connect("process.Connect", ConnectError::not_found("gone"), None);
        assert!(err.is_not_found());
        assert_eq!(err.message(), "gone");
        assert_eq!(err.to_string(), "envd process.Connect: not_found: gone");
        assert_eq!(
            rest_code(StatusCode::INSUFFICIENT_STORAGE),
            Code::ResourceExhausted
        );
        assert_eq!(rest_code(StatusCode::UNAUTHORIZED), Code::Unauthenticated);
    }

    #[test]
    fn clients_validate_and_redact() {
        assert!(EnvdClient::new("ftp://x", None).is_err());
        let client = EnvdClient::new("http://127.0.0.1:1/", Some("secret".into())).unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:1");
        assert!(!format!("{client:?}").contains("secret"));
        assert!(client.as_user("nobody").is_ok());
        assert!(client.with_access_token(Some("bad\ntoken".into())).is_err());
    }
}
