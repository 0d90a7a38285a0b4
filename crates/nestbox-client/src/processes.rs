//! Background processes, terminals (WebSocket) and directory watches.
//!
//! A [`Terminal`] is one WebSocket attachment: binary frames carry terminal bytes, text
//! frames JSON control messages (see `docs/API.md`). Dropping it detaches; the terminal
//! keeps running in the sandbox and can be attached again by pid or tag.

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};
use nestbox_types::api::{
    ExecEvent, ProcessInfo, ProcessInputRequest, ProcessList, ProcessSignal, SignalRequest,
    StartProcessRequest, StartTerminalRequest, TerminalClientMessage, TerminalServerMessage,
    WatchEvent, WatchQuery,
};
use nestbox_types::{ErrorBody, ErrorCode, SandboxId};
use reqwest::{Method, StatusCode};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, ClientError, Credentials, TEAM_HEADER, sse_events};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a terminal sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalFrame {
    /// Terminal output.
    Output(Vec<u8>),
    /// A control message.
    Control(TerminalServerMessage),
}

/// The receiving half of a terminal attachment.
pub struct TerminalReader {
    stream: SplitStream<Socket>,
    url: String,
}

/// The sending half of a terminal attachment.
pub struct TerminalWriter {
    sink: SplitSink<Socket, Message>,
    url: String,
}

/// An attachment to a terminal.
pub struct Terminal {
    /// Sends input and control messages.
    pub writer: TerminalWriter,
    /// Receives output and control messages.
    pub reader: TerminalReader,
}

fn ws_error(url: &str, e: tungstenite::Error) -> ClientError {
    ClientError::Protocol {
        url: url.to_string(),
        detail: format!("websocket: {e}"),
    }
}

impl TerminalReader {
    /// The next frame; `None` once the server closed the socket.
    pub async fn next(&mut self) -> Option<Result<TerminalFrame, ClientError>> {
        loop {
            let message = match self.stream.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(ws_error(&self.url, e))),
            };
            return Some(match message {
                Message::Binary(b) => Ok(TerminalFrame::Output(b.to_vec())),
                Message::Text(t) => serde_json::from_str(t.as_str())
                    .map(TerminalFrame::Control)
                    .map_err(|e| ClientError::Protocol {
                        url: self.url.clone(),
                        detail: format!("control message: {e}"),
                    }),
                Message::Close(_) => return None,
                _ => continue,
            });
        }
    }
}

impl TerminalWriter {
    async fn send(&mut self, message: Message) -> Result<(), ClientError> {
        self.sink
            .send(message)
            .await
            .map_err(|e| ws_error(&self.url, e))
    }

    async fn control(&mut self, message: &TerminalClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(message).map_err(|e| ClientError::Protocol {
            url: self.url.clone(),
            detail: e.to_string(),
        })?;
        self.send(Message::Text(text.into())).await
    }

    /// Types bytes.
    pub async fn input(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.send(Message::Binary(data.to_vec().into())).await
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, cols: u32, rows: u32) -> Result<(), ClientError> {
        self.control(&TerminalClientMessage::Resize { cols, rows })
            .await
    }

    /// Kills the terminal's processes.
    pub async fn kill(&mut self) -> Result<(), ClientError> {
        self.control(&TerminalClientMessage::Kill).await
    }

    /// Detaches (the terminal keeps running).
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.sink.close().await.map_err(|e| ws_error(&self.url, e))
    }
}

impl Client {
    /// Starts a process in the background.
    pub async fn start_process(
        &self,
        id: SandboxId,
        req: &StartProcessRequest,
    ) -> Result<ProcessInfo, ClientError> {
        self.post(&format!("/v1/sandboxes/{id}/processes"), req)
            .await
    }

    /// The sandbox's running processes.
    pub async fn list_processes(&self, id: SandboxId) -> Result<Vec<ProcessInfo>, ClientError> {
        let path = format!("/v1/sandboxes/{id}/processes");
        self.json::<ProcessList>(self.request(Method::GET, &path), &path)
            .await
            .map(|l| l.items)
    }

    /// Kills a process (by pid or tag).
    pub async fn kill_process(&self, id: SandboxId, process: &str) -> Result<(), ClientError> {
        let path = format!("/v1/sandboxes/{id}/processes/{process}");
        self.send(self.request(Method::DELETE, &path), &path)
            .await
            .map(|_| ())
    }

    /// Signals a process's group.
    pub async fn signal_process(
        &self,
        id: SandboxId,
        process: &str,
        signal: ProcessSignal,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/sandboxes/{id}/processes/{process}/signal");
        self.send(
            self.request(Method::POST, &path)
                .json(&SignalRequest { signal }),
            &path,
        )
        .await
        .map(|_| ())
    }

    /// Writes bytes to a process's stdin.
    pub async fn send_stdin(
        &self,
        id: SandboxId,
        process: &str,
        data: &[u8],
    ) -> Result<(), ClientError> {
        use base64::Engine as _;
        let path = format!("/v1/sandboxes/{id}/processes/{process}/stdin");
        let body = ProcessInputRequest {
            data: None,
            data_base64: Some(base64::engine::general_purpose::STANDARD.encode(data)),
        };
        self.send(self.request(Method::POST, &path).json(&body), &path)
            .await
            .map(|_| ())
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, id: SandboxId, process: &str) -> Result<(), ClientError> {
        let path = format!("/v1/sandboxes/{id}/processes/{process}/close-stdin");
        self.send(self.request(Method::POST, &path), &path)
            .await
            .map(|_| ())
    }

    /// Attaches to a process's output from now on (`started`, output, then `exit`).
    pub async fn process_output(
        &self,
        id: SandboxId,
        process: &str,
    ) -> Result<impl Stream<Item = Result<ExecEvent, ClientError>> + use<>, ClientError> {
        let path = format!("/v1/sandboxes/{id}/processes/{process}/output");
        self.event_stream(self.request(Method::GET, &path), &path)
            .await
    }

    /// Starts a terminal in the background; attach with [`Client::attach_terminal`].
    pub async fn start_terminal(
        &self,
        id: SandboxId,
        req: &StartTerminalRequest,
    ) -> Result<ProcessInfo, ClientError> {
        self.post(&format!("/v1/sandboxes/{id}/terminals"), req)
            .await
    }

    /// Watches a directory: `started`, then its changes.
    pub async fn watch_dir(
        &self,
        id: SandboxId,
        q: &WatchQuery,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + use<>, ClientError> {
        let path = format!("/v1/sandboxes/{id}/files/watch");
        self.event_stream(self.request(Method::GET, &path).query(q), &path)
            .await
    }

    async fn event_stream<T: serde::de::DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<impl Stream<Item = Result<T, ClientError>> + use<T>, ClientError> {
        let resp = self
            .send(rb.header("accept", "text/event-stream"), path)
            .await?;
        let url = self.url(path);
        let bytes = resp
            .bytes_stream()
            .map_err(move |source| ClientError::Transport {
                url: url.clone(),
                source,
            });
        Ok(sse_events(bytes, self.url(path)))
    }

    /// Attaches to a terminal (by pid or tag) over a WebSocket. The first frame is
    /// `attached`; output from then on follows.
    pub async fn attach_terminal(
        &self,
        id: SandboxId,
        process: &str,
    ) -> Result<Terminal, ClientError> {
        let path = format!("/v1/sandboxes/{id}/terminals/{process}");
        let http_url = self.url(&path);
        let url = match http_url.strip_prefix("http://") {
            Some(rest) => format!("ws://{rest}"),
            None => {
                return Err(ClientError::Protocol {
                    url: http_url,
                    detail: "terminals need an http:// server URL (wss is not supported yet)"
                        .into(),
                });
            }
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ws_error(&url, e))?;
        let header = |v: &str| {
            HeaderValue::from_str(v).map_err(|_| ClientError::Protocol {
                url: url.clone(),
                detail: "credentials are not a valid header value".into(),
            })
        };
        let headers = request.headers_mut();
        match &self.credentials {
            Credentials::None => {}
            Credentials::ApiKey(k) => {
                headers.insert("x-api-key", header(k)?);
            }
            Credentials::Bearer(t) => {
                headers.insert("authorization", header(&format!("Bearer {t}"))?);
            }
        }
        if let Some(team) = self.team {
            headers.insert(TEAM_HEADER, header(&team.to_string())?);
        }
        let (socket, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(ok) => ok,
            Err(tungstenite::Error::Http(response)) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let body = response
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                    .unwrap_or_else(|| {
                        ErrorBody::new(
                            ErrorCode::Internal,
                            format!("websocket handshake refused with {status}"),
                        )
                    });
                return Err(ClientError::Api { status, body });
            }
            Err(e) => return Err(ws_error(&url, e)),
        };
        let (sink, stream) = socket.split();
        Ok(Terminal {
            writer: TerminalWriter {
                sink,
                url: url.clone(),
            },
            reader: TerminalReader { stream, url },
        })
    }
}
