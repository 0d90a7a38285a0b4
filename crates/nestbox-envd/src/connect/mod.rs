//! The Connect protocol (<https://connectrpc.com/docs/protocol>), as building blocks.
//!
//! What this module owns:
//!
//! - [`Code`] and [`ConnectError`]: the error vocabulary, its canonical JSON form and the
//!   HTTP status a unary error is sent with;
//! - [`Codec`]: `proto` (binary) or `json` (proto3-canonical JSON) message encoding;
//! - [`envelope`]: the streaming frame (1 flag byte, u32 big-endian length, payload) and the
//!   end-of-stream message;
//! - [`server`]: turning HTTP requests into messages and results into HTTP responses, for
//!   servers built on `http` types (hyper, axum);
//! - [`client`]: encoding requests and decoding unary and streamed responses.
//!
//! Invariants: compression is never negotiated — a compressed request (unary
//! `Content-Encoding`, streaming `Connect-Content-Encoding` or the envelope flag) is refused
//! with [`Code::Unimplemented`]; every message size is bounded by the caller's limit; unknown
//! JSON fields are ignored so that newer SDKs keep working.

pub mod client;
pub mod envelope;
pub mod server;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

/// `Content-Type` of unary proto requests and responses.
pub const CONTENT_TYPE_PROTO: &str = "application/proto";
/// `Content-Type` of unary JSON requests and responses (and of every unary error).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of streaming proto requests and responses.
pub const CONTENT_TYPE_CONNECT_PROTO: &str = "application/connect+proto";
/// `Content-Type` of streaming JSON requests and responses.
pub const CONTENT_TYPE_CONNECT_JSON: &str = "application/connect+json";
/// The timeout header: a positive integer of at most 10 digits, in milliseconds.
pub const HEADER_TIMEOUT: &str = "connect-timeout-ms";
/// The protocol version header clients send (`1`).
pub const HEADER_PROTOCOL_VERSION: &str = "connect-protocol-version";
/// The compression of a streaming request's envelopes.
pub const HEADER_STREAM_ENCODING: &str = "connect-content-encoding";

macro_rules! codes {
    ($($(#[$meta:meta])* $variant:ident => ($wire:literal, $status:expr)),+ $(,)?) => {
        /// A Connect error code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[$meta])* $variant),+
        }

        impl Code {
            /// Every code.
            pub const ALL: &'static [Code] = &[$(Code::$variant),+];

            /// The canonical wire spelling (`not_found`).
            pub const fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $wire),+ }
            }

            /// The HTTP status a unary response with this error carries.
            pub fn http_status(self) -> StatusCode {
                let status: u16 = match self { $(Code::$variant => $status),+ };
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }

            /// Parses the wire spelling; `None` for anything unknown.
            pub fn from_wire(s: &str) -> Option<Code> {
                match s { $($wire => Some(Code::$variant),)+ _ => None }
            }
        }
    };
}

codes! {
    /// The operation was cancelled, typically by the caller.
    Canceled => ("canceled", 499),
    /// An error that fits no other code.
    Unknown => ("unknown", 500),
    /// The request is invalid regardless of the system's state.
    InvalidArgument => ("invalid_argument", 400),
    /// The deadline passed before the operation finished.
    DeadlineExceeded => ("deadline_exceeded", 504),
    /// The requested entity does not exist.
    NotFound => ("not_found", 404),
    /// The entity the caller tried to create already exists.
    AlreadyExists => ("already_exists", 409),
    /// The caller may not do this.
    PermissionDenied => ("permission_denied", 403),
    /// A resource (buffer, quota, disk) ran out.
    ResourceExhausted => ("resource_exhausted", 429),
    /// The system is not in a state that allows the operation.
    FailedPrecondition => ("failed_precondition", 400),
    /// The operation was aborted by a concurrency conflict.
    Aborted => ("aborted", 409),
    /// The operation went past a valid range.
    OutOfRange => ("out_of_range", 400),
    /// The operation is not implemented or not supported.
    Unimplemented => ("unimplemented", 501),
    /// An invariant of the server broke.
    Internal => ("internal", 500),
    /// The service is unavailable; retrying may help.
    Unavailable => ("unavailable", 503),
    /// Unrecoverable data loss or corruption.
    DataLoss => ("data_loss", 500),
    /// The caller did not authenticate.
    Unauthenticated => ("unauthenticated", 401),
}

impl Code {
    /// The code a client infers from the HTTP status of a response that carries no Connect
    /// error body (a proxy's answer, say), as the Connect specification prescribes.
    pub fn from_http_status(status: StatusCode) -> Code {
        match status.as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Connect error: a code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    /// What kind of failure; clients branch on this.
    pub code: Code,
    /// Human-readable explanation; not stable.
    pub message: String,
}

/// The JSON form of an error, as in unary error bodies and end-of-stream messages.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireError {
    code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    message: String,
}

impl ConnectError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `invalid_argument`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// `already_exists`.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    /// `permission_denied`.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    /// `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }

    /// `failed_precondition`.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// `resource_exhausted`.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    /// `unimplemented`.
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Code::Unimplemented, message)
    }

    /// `deadline_exceeded`.
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, message)
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// The canonical JSON form: `{"code":"not_found","message":"…"}`.
    pub fn to_json(&self) -> Bytes {
        let wire = WireError {
            code: self.code.as_str().to_owned(),
            message: self.message.clone(),
        };
        // Serializing two strings cannot fail; fall back to a fixed body all the same.
        serde_json::to_vec(&wire)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(br#"{"code":"internal"}"#))
    }

    /// Parses the JSON form; `None` if `body` is not a Connect error. An unknown code
    /// becomes [`Code::Unknown`].
    pub fn from_json(body: &[u8]) -> Option<Self> {
        let wire: WireError = serde_json::from_slice(body).ok()?;
        Some(Self::from_wire(wire))
    }

    fn from_wire(wire: WireError) -> Self {
        Self {
            code: Code::from_wire(&wire.code).unwrap_or(Code::Unknown),
            message: wire.message,
        }
    }
}

/// How messages are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Protobuf binary.
    Proto,
    /// Proto3-canonical JSON.
    Json,
}

/// A message this module can encode and decode in both codecs.
pub trait Message:
    prost::Message + Default + serde::Serialize + DeserializeOwned + Send + 'static
{
}

impl<T> Message for T where
    T: prost::Message + Default + serde::Serialize + DeserializeOwned + Send + 'static
{
}

impl Codec {
    /// The `Content-Type` of unary requests and successful unary responses.
    pub const fn unary_content_type(self) -> &'static str {
        match self {
            Codec::Proto => CONTENT_TYPE_PROTO,
            Codec::Json => CONTENT_TYPE_JSON,
        }
    }

    /// The `Content-Type` of streaming requests and responses.
    pub const fn stream_content_type(self) -> &'static str {
        match self {
            Codec::Proto => CONTENT_TYPE_CONNECT_PROTO,
            Codec::Json => CONTENT_TYPE_CONNECT_JSON,
        }
    }

    /// Encodes a message.
    pub fn encode<M: Message>(self, message: &M) -> Result<Bytes, ConnectError> {
        match self {
            Codec::Proto => Ok(Bytes::from(message.encode_to_vec())),
            Codec::Json => serde_json::to_vec(message)
                .map(Bytes::from)
                .map_err(|e| ConnectError::internal(format!("cannot encode JSON message: {e}"))),
        }
    }

    /// Decodes a message. An empty JSON body is read as the empty message, like an empty
    /// proto body.
    pub fn decode<M: Message>(self, bytes: &[u8]) -> Result<M, ConnectError> {
        match self {
            Codec::Proto => M::decode(bytes).map_err(|e| {
                ConnectError::invalid_argument(format!("cannot decode protobuf message: {e}"))
            }),
            Codec::Json if bytes.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| {
                ConnectError::invalid_argument(format!("cannot decode JSON message: {e}"))
            }),
        }
    }
}

/// Whether a procedure's request body is one message or a stream of envelopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One request message, one response message (`application/proto`, `application/json`).
    Unary,
    /// Enveloped messages in at least one direction (`application/connect+…`): server-,
    /// client- and bidirectional streaming.
    Streaming,
}

/// Parses a `Content-Type` into the codec and the shape it announces; `None` if it is not a
/// Connect content type. Parameters such as `charset=utf-8` are ignored.
pub fn parse_content_type(value: &str) -> Option<(Codec, Shape)> {
    let essence = value.split(';').next().unwrap_or("").trim();
    let lower = essence.to_ascii_lowercase();
    match lower.as_str() {
        CONTENT_TYPE_PROTO => Some((Codec::Proto, Shape::Unary)),
        CONTENT_TYPE_JSON => Some((Codec::Json, Shape::Unary)),
        CONTENT_TYPE_CONNECT_PROTO => Some((Codec::Proto, Shape::Streaming)),
        CONTENT_TYPE_CONNECT_JSON => Some((Codec::Json, Shape::Streaming)),
        _ => None,
    }
}

/// Reads `Connect-Timeout-Ms`: `None` when absent, an error when malformed.
pub fn parse_timeout(headers: &HeaderMap) -> Result<Option<Duration>, ConnectError> {
    let Some(value) = headers.get(HEADER_TIMEOUT) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ConnectError::invalid_argument("connect-timeout-ms is not text"))?;
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConnectError::invalid_argument(format!(
            "connect-timeout-ms must be a positive integer of at most 10 digits, got {text:?}"
        )));
    }
    let millis: u64 = text
        .parse()
        .map_err(|_| ConnectError::invalid_argument("connect-timeout-ms is not a number"))?;
    Ok(Some(Duration::from_millis(millis)))
}

/// Whether a content-encoding header value means "not compressed".
fn is_identity(value: Option<&http::HeaderValue>) -> bool {
    match value.and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => v.trim().is_empty() || v.trim().eq_ignore_ascii_case("identity"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{ProcessSelector, SendSignalRequest, Signal, process_selector};

    #[test]
    fn every_code_round_trips_and_maps_to_a_status() {
        for code in Code::ALL {
            assert_eq!(Code::from_wire(code.as_str()), Some(*code));
            assert!(code.http_status().as_u16() >= 400);
        }
        assert_eq!(Code::ALL.len(), 16);
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(
            Code::Unauthenticated.http_status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
        assert_eq!(Code::ResourceExhausted.http_status().as_u16(), 429);
        assert_eq!(Code::FailedPrecondition.http_status().as_u16(), 400);
        assert_eq!(Code::Unimplemented.http_status().as_u16(), 501);
    }

    #[test]
    fn error_json_round_trips() {
        let err = ConnectError::not_found("no process with pid 7");
        let json = err.to_json();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"code":"not_found","message":"no process with pid 7"}"#
        );
        assert_eq!(ConnectError::from_json(&json), Some(err));
        let odd = ConnectError::from_json(br#"{"code":"brand_new"}"#).unwrap();
        assert_eq!(odd.code, Code::Unknown);
        assert_eq!(ConnectError::from_json(b"<html>"), None);
    }

    #[test]
    fn http_status_fallbacks() {
        assert_eq!(
            Code::from_http_status(StatusCode::NOT_FOUND),
            Code::Unimplemented
        );
        assert_eq!(
            Code::from_http_status(StatusCode::BAD_GATEWAY),
            Code::Unavailable
        );
        assert_eq!(
            Code::from_http_status(StatusCode::IM_A_TEAPOT),
            Code::Unknown
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            parse_content_type("application/json; charset=utf-8"),
            Some((Codec::Json, Shape::Unary))
        );
        assert_eq!(
            parse_content_type("application/connect+proto"),
            Some((Codec::Proto, Shape::Streaming))
        );
        assert_eq!(parse_content_type("application/grpc"), None);
    }

    #[test]
    fn timeouts() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_timeout(&headers).unwrap(), None);
        headers.insert(HEADER_TIMEOUT, "1500".parse().unwrap());
        assert_eq!(
            parse_timeout(&headers).unwrap(),
            Some(Duration::from_millis(1500))
        );
        for bad in ["", "-1", "1.5", "12345678901", "abc"] {
            headers.insert(HEADER_TIMEOUT, bad.parse().unwrap());
            assert_eq!(
                parse_timeout(&headers).unwrap_err().code,
                Code::InvalidArgument
            );
        }
    }

    #[test]
    fn proto_and_json_round_trips() {
        let msg = SendSignalRequest {
            process: Some(ProcessSelector {
                selector: Some(process_selector::Selector::Tag("web".into())),
            }),
            signal: Signal::Sigkill as i32,
        };
        for codec in [Codec::Proto, Codec::Json] {
            let bytes = codec.encode(&msg).unwrap();
            assert_eq!(codec.decode::<SendSignalRequest>(&bytes).unwrap(), msg);
        }
        let json = Codec::Json.encode(&msg).unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"process":{"tag":"web"},"signal":"SIGNAL_SIGKILL"}"#
        );
        // Unknown fields and original field names are accepted.
        let decoded: SendSignalRequest = Codec::Json
            .decode(br#"{"process":{"pid":7},"signal":9,"futureField":true}"#)
            .unwrap();
        assert_eq!(decoded.signal, Signal::Sigkill as i32);
        assert_eq!(
            Codec::Json.decode::<SendSignalRequest>(b"").unwrap(),
            SendSignalRequest::default()
        );
        assert_eq!(
            Codec::Json
                .decode::<SendSignalRequest>(b"{")
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
        assert_eq!(
            Codec::Proto
                .decode::<SendSignalRequest>(&[0xff, 0xff])
                .unwrap_err()
                .code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn bytes_and_timestamps_use_canonical_json() {
        use crate::filesystem::EntryInfo;
        use crate::process::{ProcessEvent, process_event};
        let event = ProcessEvent {
            event: Some(process_event::Event::Data(process_event::DataEvent {
                output: Some(process_event::data_event::Output::Stdout(
                    Bytes::from_static(&[0, 1, 2, 255]),
                )),
            })),
        };
        let json = Codec::Json.encode(&event).unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"data":{"stdout":"AAEC/w=="}}"#
        );
        assert_eq!(Codec::Json.decode::<ProcessEvent>(&json).unwrap(), event);

        let entry = EntryInfo {
            name: "a".into(),
            size: 5,
            modified_time: Some(crate::wkt::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = String::from_utf8(Codec::Json.encode(&entry).unwrap().to_vec()).unwrap();
        assert!(json.contains(r#""size":"5""#), "{json}");
        assert!(
            json.contains(r#""modifiedTime":"2023-11-14T22:13:20Z""#),
            "{json}"
        );
        assert!(json.contains(r#""type":"FILE_TYPE_UNSPECIFIED""#) || !json.contains("type"));
    }
}
