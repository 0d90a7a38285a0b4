//! Server side of the Connect protocol over `http` types.
//!
//! A handler calls [`accept`] with the request headers and the procedure's [`Shape`], reads
//! its input with [`read_unary`], [`read_single_envelope`] (server streaming) or
//! [`decode_request_stream`] (client streaming), and answers with [`unary_response`] or
//! [`stream_response`]. Errors take the shape the client expects: a unary error is an HTTP
//! status with a JSON body; a streaming error is HTTP 200 with an end-of-stream frame. A
//! request whose content type is not Connect's (or does not match the procedure's shape) is
//! refused with HTTP 415 before anything else.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full, StreamBody};

use super::envelope::{self, EndStream, EnvelopeDecoder};
use super::{
    Code, Codec, ConnectError, HEADER_STREAM_ENCODING, Message, Shape, is_identity,
    parse_content_type, parse_timeout,
};

/// Errors a response body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response built here (and a convenient one for other handlers).
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty_body() -> ResponseBody {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// What the headers of an accepted request say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMeta {
    /// The codec of the request, and so of the response.
    pub codec: Codec,
    /// Unary or streaming.
    pub shape: Shape,
    /// `Connect-Timeout-Ms`, if sent.
    pub timeout: Option<Duration>,
    /// When the timeout runs out, measured from [`accept`].
    pub deadline: Option<Instant>,
}

impl RequestMeta {
    /// The time left before the deadline (zero once passed), `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The error response for this request's shape.
    pub fn error(&self, err: &ConnectError) -> Response<ResponseBody> {
        match self.shape {
            Shape::Unary => unary_error(err),
            Shape::Streaming => stream_error(self.codec, err),
        }
    }
}

/// Checks the headers of a request to a procedure of `shape`. On refusal the error is the
/// complete response to send.
pub fn accept(
    headers: &HeaderMap,
    shape: Shape,
) -> Result<RequestMeta, Box<Response<ResponseBody>>> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let codec = match parse_content_type(content_type) {
        Some((codec, sent)) if sent == shape => codec,
        _ => return Err(Box::new(unsupported_media_type(shape))),
    };
    let fail = |err: ConnectError| -> Box<Response<ResponseBody>> {
        Box::new(match shape {
            Shape::Unary => unary_error(&err),
            Shape::Streaming => stream_error(codec, &err),
        })
    };
    let encoding_header = match shape {
        Shape::Unary => header::CONTENT_ENCODING.as_str(),
        Shape::Streaming => HEADER_STREAM_ENCODING,
    };
    if !is_identity(headers.get(encoding_header)) {
        return Err(fail(ConnectError::unimplemented(format!(
            "compressed requests are not supported ({encoding_header}: {}); send them uncompressed",
            headers
                .get(encoding_header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
        ))));
    }
    let timeout = parse_timeout(headers).map_err(fail)?;
    Ok(RequestMeta {
        codec,
        shape,
        timeout,
        deadline: timeout.map(|t| Instant::now() + t),
    })
}

fn unsupported_media_type(shape: Shape) -> Response<ResponseBody> {
    let accepted = match shape {
        Shape::Unary => "application/proto, application/json",
        Shape::Streaming => "application/connect+proto, application/connect+json",
    };
    let mut response = Response::new(empty_body());
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
        .headers_mut()
        .insert("accept-post", HeaderValue::from_static(accepted));
    response
}

/// A unary error: the code's HTTP status and the JSON error body.
pub fn unary_error(err: &ConnectError) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(err.to_json()));
    *response.status_mut() = err.code.http_status();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(super::CONTENT_TYPE_JSON),
    );
    response
}

/// A streaming error: HTTP 200 and only the end-of-stream frame.
pub fn stream_error(codec: Codec, err: &ConnectError) -> Response<ResponseBody> {
    let end = EndStream {
        error: Some(err.clone()),
    };
    stream_headers(codec, full_body(end.encode()))
}

fn stream_headers(codec: Codec, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(codec.stream_content_type()),
    );
    response
}

/// A unary response: the encoded message, or the error.
pub fn unary_response<M: Message>(
    codec: Codec,
    result: Result<M, ConnectError>,
) -> Response<ResponseBody> {
    match result.and_then(|m| codec.encode(&m)) {
        Ok(bytes) => {
            let mut response = Response::new(full_body(bytes));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(codec.unary_content_type()),
            );
            response
        }
        Err(err) => unary_error(&err),
    }
}

/// A streaming response: each `Ok` item becomes a message frame as soon as it is produced;
/// the first `Err` item, or the end of `stream`, becomes the end-of-stream frame.
pub fn stream_response<M, S>(codec: Codec, stream: S) -> Response<ResponseBody>
where
    M: Message,
    S: Stream<Item = Result<M, ConnectError>> + Send + 'static,
{
    struct State<S> {
        inner: Pin<Box<S>>,
        done: bool,
    }
    let frames = futures::stream::unfold(
        State {
            inner: Box::pin(stream),
            done: false,
        },
        move |mut state| async move {
            if state.done {
                return None;
            }
            let frame = match state.inner.next().await {
                Some(Ok(message)) => match codec.encode(&message) {
                    Ok(bytes) => envelope::encode(0, &bytes),
                    Err(err) => {
                        state.done = true;
                        EndStream { error: Some(err) }.encode()
                    }
                },
                Some(Err(err)) => {
                    state.done = true;
                    EndStream { error: Some(err) }.encode()
                }
                None => {
                    state.done = true;
                    EndStream::default().encode()
                }
            };
            Some((Ok::<_, BoxError>(Frame::data(frame)), state))
        },
    );
    stream_headers(codec, StreamBody::new(frames).boxed_unsync())
}

fn body_error<E: std::fmt::Display>(err: E) -> ConnectError {
    ConnectError::new(
        Code::Canceled,
        format!("cannot read the request body: {err}"),
    )
}

/// Reads a unary request message of at most `limit` bytes.
pub async fn read_unary<M, B>(codec: Codec, body: B, limit: usize) -> Result<M, ConnectError>
where
    M: Message,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    let mut buffer = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(body_error)?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > limit {
                return Err(ConnectError::resource_exhausted(format!(
                    "request message is larger than the limit of {limit} bytes"
                )));
            }
            buffer.extend_from_slice(&data);
        }
    }
    codec.decode(&buffer)
}

/// Decodes a streaming request body into its messages, each of at most `limit` bytes. The
/// stream ends with the body; a client must not send an end-of-stream frame.
pub fn decode_request_stream<M, B>(
    codec: Codec,
    body: B,
    limit: usize,
) -> impl Stream<Item = Result<M, ConnectError>> + Send + 'static
where
    M: Message,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    struct State<B> {
        body: Pin<Box<B>>,
        decoder: EnvelopeDecoder,
        done: bool,
    }
    futures::stream::unfold(
        State {
            body: Box::pin(body),
            decoder: EnvelopeDecoder::new(limit),
            done: false,
        },
        move |mut state| async move {
            loop {
                if state.done {
                    return None;
                }
                match state.decoder.next_envelope() {
                    Err(err) => {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                    Ok(Some(frame)) if frame.is_end_stream() => {
                        state.done = true;
                        let err = ConnectError::invalid_argument(
                            "clients must not send an end-of-stream frame",
                        );
                        return Some((Err(err), state));
                    }
                    Ok(Some(frame)) => {
                        let item = codec.decode::<M>(&frame.payload);
                        state.done = item.is_err();
                        return Some((item, state));
                    }
                    Ok(None) => {}
                }
                match state.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            state.decoder.push(&data);
                        }
                    }
                    Some(Err(err)) => {
                        state.done = true;
                        return Some((Err(body_error(err)), state));
                    }
                    None => {
                        state.done = true;
                        if state.decoder.is_empty() {
                            return None;
                        }
                        let err = ConnectError::invalid_argument(
                            "request body ended inside a message frame",
                        );
                        return Some((Err(err), state));
                    }
                }
            }
        },
    )
}

/// Reads the one request message of a server-streaming call.
pub async fn read_single_envelope<M, B>(
    codec: Codec,
    body: B,
    limit: usize,
) -> Result<M, ConnectError>
where
    M: Message,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    let mut messages = std::pin::pin!(decode_request_stream::<M, B>(codec, body, limit));
    let first = match messages.next().await {
        Some(result) => result?,
        None => return Err(ConnectError::invalid_argument("request has no message")),
    };
    match messages.next().await {
        None => Ok(first),
        Some(Err(err)) => Err(err),
        Some(Ok(_)) => Err(ConnectError::invalid_argument(
            "a server-streaming request carries exactly one message",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::client::{StreamDecoder, StreamItem, decode_unary_response};
    use crate::process::{ListRequest, ProcessEvent, process_event};

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        headers
    }

    async fn collect(response: Response<ResponseBody>) -> (StatusCode, HeaderMap, Bytes) {
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, bytes)
    }

    #[test]
    fn accept_checks_shape_encoding_and_timeout() {
        let meta = accept(&headers("application/json"), Shape::Unary).unwrap();
        assert_eq!(meta.codec, Codec::Json);
        assert!(meta.deadline.is_none());

        let refused = accept(&headers("application/json"), Shape::Streaming).unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let refused = accept(&headers("text/plain"), Shape::Unary).unwrap_err();
        assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

        let mut gz = headers("application/proto");
        gz.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let refused = accept(&gz, Shape::Unary).unwrap_err();
        assert_eq!(refused.status(), StatusCode::NOT_IMPLEMENTED);

        let mut gz = headers("application/connect+json");
        gz.insert(HEADER_STREAM_ENCODING, "gzip".parse().unwrap());
        let refused = accept(&gz, Shape::Streaming).unwrap_err();
        assert_eq!(refused.status(), StatusCode::OK);

        let mut timed = headers("application/connect+proto");
        timed.insert(super::super::HEADER_TIMEOUT, "2500".parse().unwrap());
        let meta = accept(&timed, Shape::Streaming).unwrap();
        assert_eq!(meta.timeout, Some(Duration::from_millis(2500)));
        assert!(meta.remaining().unwrap() <= Duration::from_millis(2500));
    }

    #[tokio::test]
    async fn unary_success_and_error_shapes() {
        let (status, headers, body) =
            collect(unary_response(Codec::Json, Ok(ListRequest {}))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(&body[..], b"{}");

        let err = ConnectError::already_exists("tag web is taken");
        let (status, headers, body) = collect(unary_response::<ListRequest>(
            Codec::Proto,
            Err(err.clone()),
        ))
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let decoded = decode_unary_response::<ListRequest>(status, Some("application/json"), &body);
        assert_eq!(decoded.unwrap_err(), err);
    }

    #[tokio::test]
    async fn streams_end_with_end_stream_frames() {
        let events = vec![
            Ok(ProcessEvent {
                event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
            }),
            Err(ConnectError::deadline_exceeded("time is up")),
            Ok(ProcessEvent::default()),
        ];
        for codec in [Codec::Proto, Codec::Json] {
            let response = stream_response(codec, futures::stream::iter(events.clone()));
            let (status, headers, body) = collect(response).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[header::CONTENT_TYPE], codec.stream_content_type());
            let mut decoder = StreamDecoder::<ProcessEvent>::new(codec, 1 << 20);
            decoder.push(&body);
            let first = decoder.next_item().unwrap().unwrap();
            assert!(matches!(first, StreamItem::Message(_)));
            let end = decoder.next_item().unwrap().unwrap();
            match end {
                StreamItem::End(Err(err)) => assert_eq!(err.code, Code::DeadlineExceeded),
                other => panic!("unexpected {other:?}"),
            }
            // Nothing follows the end-of-stream frame.
            assert!(decoder.next_item().unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn request_streams_decode_and_validate() {
        let mut wire = Vec::new();
        for _ in 0..3 {
            wire.extend_from_slice(&envelope::encode(
                0,
                &Codec::Json.encode(&ListRequest {}).unwrap(),
            ));
        }
        let body = Full::new(Bytes::from(wire.clone()));
        let items: Vec<_> = decode_request_stream::<ListRequest, _>(Codec::Json, body, 1024)
            .collect()
            .await;
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(Result::is_ok));

        let cut = Full::new(Bytes::from(wire[..6].to_vec()));
        let err = read_single_envelope::<ListRequest, _>(Codec::Json, cut, 1024)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);

        let many = Full::new(Bytes::from(wire));
        let err = read_single_envelope::<ListRequest, _>(Codec::Json, many, 1024)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);

        let big = Full::new(Bytes::from(vec![b' '; 100]));
        let err = read_unary::<ListRequest, _>(Codec::Json, big, 10)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
    }
}
