//! Client side of the Connect protocol, independent of any HTTP client.
//!
//! A unary call sends [`Codec::encode`]d bytes with [`Codec::unary_content_type`] and reads
//! the answer with [`decode_unary_response`]. A streaming call sends
//! [`encode_request_message`] frames with [`Codec::stream_content_type`] and feeds the
//! response body to a [`StreamDecoder`], which yields messages and then exactly one
//! [`StreamItem::End`].

use std::marker::PhantomData;

use bytes::Bytes;
use http::StatusCode;

use super::envelope::{self, EndStream, EnvelopeDecoder};
use super::{Code, Codec, ConnectError, Message, parse_content_type};

/// Longest error text kept from a non-Connect error body.
const MAX_ERROR_TEXT: usize = 512;

/// Frames one request message of a streaming call.
pub fn encode_request_message<M: Message>(
    codec: Codec,
    message: &M,
) -> Result<Bytes, ConnectError> {
    Ok(envelope::encode(0, &codec.encode(message)?))
}

/// The error a non-success HTTP response stands for: its Connect error body if it has one,
/// otherwise the code the HTTP status implies and the start of the body as the message.
pub fn error_from_http(status: StatusCode, body: &[u8]) -> ConnectError {
    if let Some(err) = ConnectError::from_json(body) {
        return err;
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_TEXT)]);
    let message = if text.trim().is_empty() {
        format!("HTTP status {status}")
    } else {
        format!("HTTP status {status}: {}", text.trim())
    };
    ConnectError::new(Code::from_http_status(status), message)
}

/// Decodes the response to a unary call.
pub fn decode_unary_response<M: Message>(
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<M, ConnectError> {
    if !status.is_success() {
        return Err(error_from_http(status, body));
    }
    let codec = match content_type.and_then(parse_content_type) {
        Some((codec, super::Shape::Unary)) => codec,
        _ => {
            return Err(ConnectError::internal(format!(
                "unexpected content type {:?} in a unary response",
                content_type.unwrap_or("")
            )));
        }
    };
    codec
        .decode(body)
        .map_err(|e| ConnectError::internal(e.message))
}

/// One decoded item of a response stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem<M> {
    /// A message.
    Message(M),
    /// The end of the stream: `Ok` when the call succeeded.
    End(Result<(), ConnectError>),
}

/// Decodes a streaming response body, chunk by chunk.
#[derive(Debug)]
pub struct StreamDecoder<M> {
    codec: Codec,
    frames: EnvelopeDecoder,
    ended: bool,
    message: PhantomData<fn() -> M>,
}

impl<M: Message> StreamDecoder<M> {
    /// A decoder for messages of `codec`, refusing any longer than `limit` bytes.
    pub fn new(codec: Codec, limit: usize) -> Self {
        Self {
            codec,
            frames: EnvelopeDecoder::new(limit),
            ended: false,
            message: PhantomData,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.ended {
            self.frames.push(chunk);
        }
    }

    /// The next item, `None` if more bytes are needed or the stream has ended.
    pub fn next_item(&mut self) -> Result<Option<StreamItem<M>>, ConnectError> {
        if self.ended {
            return Ok(None);
        }
        let Some(frame) = self.frames.next_envelope()? else {
            return Ok(None);
        };
        if frame.is_end_stream() {
            self.ended = true;
            let end = EndStream::decode(&frame.payload)?;
            return Ok(Some(StreamItem::End(match end.error {
                Some(err) => Err(err),
                None => Ok(()),
            })));
        }
        let message = self
            .codec
            .decode(&frame.payload)
            .map_err(|e| ConnectError::internal(e.message))?;
        Ok(Some(StreamItem::Message(message)))
    }

    /// Whether the end-of-stream frame has been read.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Checks that the body may end here: a body that ends without the end-of-stream frame
    /// was cut off (the server died or the connection dropped).
    pub fn finish(&self) -> Result<(), ConnectError> {
        if self.ended {
            Ok(())
        } else {
            Err(ConnectError::new(
                Code::Unavailable,
                "the response stream ended without an end-of-stream message",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ListResponse;

    #[test]
    fn non_connect_errors_map_from_http_status() {
        let err = error_from_http(StatusCode::BAD_GATEWAY, b"upstream down");
        assert_eq!(err.code, Code::Unavailable);
        assert!(err.message.contains("upstream down"));
        let err = error_from_http(
            StatusCode::NOT_FOUND,
            br#"{"code":"not_found","message":"x"}"#,
        );
        assert_eq!(err, ConnectError::not_found("x"));
    }

    #[test]
    fn unary_responses_check_content_type() {
        let ok =
            decode_unary_response::<ListResponse>(StatusCode::OK, Some("application/proto"), b"");
        assert_eq!(ok.unwrap(), ListResponse::default());
        let bad = decode_unary_response::<ListResponse>(StatusCode::OK, Some("text/html"), b"");
        assert_eq!(bad.unwrap_err().code, Code::Internal);
    }

    #[test]
    fn truncated_streams_are_errors() {
        let mut decoder = StreamDecoder::<ListResponse>::new(Codec::Proto, 1024);
        decoder.push(&encode_request_message(Codec::Proto, &ListResponse::default()).unwrap());
        assert!(matches!(
            decoder.next_item().unwrap(),
            Some(StreamItem::Message(_))
        ));
        assert_eq!(decoder.finish().unwrap_err().code, Code::Unavailable);
        decoder.push(&EndStream::default().encode());
        assert!(matches!(
            decoder.next_item().unwrap(),
            Some(StreamItem::End(Ok(())))
        ));
        assert!(decoder.finish().is_ok());
    }
}
