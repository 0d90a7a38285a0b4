//! The streaming frame: 1 flag byte, a u32 big-endian payload length, the payload.
//!
//! Flag [`FLAG_COMPRESSED`] marks a compressed payload (never produced, refused on input);
//! flag [`FLAG_END_STREAM`] marks the server's last frame, whose payload is the JSON
//! [end-of-stream message](EndStream) in either codec. [`EnvelopeDecoder`] reassembles
//! frames from arbitrarily split chunks and refuses payloads over its limit before
//! buffering them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Code, ConnectError, WireError};

/// The payload is compressed.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// This is the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Length of the frame header.
pub const HEADER_LEN: usize = 5;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Flag bits.
    pub flags: u8,
    /// The message (or end-of-stream JSON).
    pub payload: Bytes,
}

impl Envelope {
    /// Whether this is the end-of-stream frame.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }

    /// Whether the payload is compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
}

/// Frames `payload` with `flags`.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(flags);
    // Messages are bounded far below 4 GiB by every producer in this crate.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// The end-of-stream message: an optional error and metadata (trailers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndStream {
    /// Why the stream failed; `None` when it succeeded.
    pub error: Option<ConnectError>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct WireEndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
}

impl EndStream {
    /// The frame (flag [`FLAG_END_STREAM`]) carrying this message as JSON.
    pub fn encode(&self) -> Bytes {
        let wire = WireEndStream {
            error: self.error.as_ref().map(|e| WireError {
                code: e.code.as_str().to_owned(),
                message: e.message.clone(),
            }),
            metadata: serde_json::Map::new(),
        };
        let json = serde_json::to_vec(&wire)
            .unwrap_or_else(|_| br#"{"error":{"code":"internal"},"metadata":{}}"#.to_vec());
        encode(FLAG_END_STREAM, &json)
    }

    /// Parses the JSON payload of an end-of-stream frame.
    pub fn decode(payload: &[u8]) -> Result<Self, ConnectError> {
        let wire: WireEndStream = serde_json::from_slice(payload)
            .map_err(|e| ConnectError::internal(format!("malformed end-of-stream message: {e}")))?;
        Ok(Self {
            error: wire.error.map(ConnectError::from_wire),
        })
    }
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buffer: BytesMut,
    max_payload: usize,
}

impl EnvelopeDecoder {
    /// A decoder refusing payloads longer than `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_payload,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame, `None` if more bytes are needed. A payload over the limit is
    /// [`Code::ResourceExhausted`]; a compressed one is [`Code::Unimplemented`].
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, ConnectError> {
        if self.buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buffer[0];
        let len_bytes = [
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ];
        let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
        if len > self.max_payload {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!(
                    "message of {len} bytes is larger than the limit of {} bytes",
                    self.max_payload
                ),
            ));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(ConnectError::unimplemented(
                "compressed messages are not supported; send them uncompressed",
            ));
        }
        if self.buffer.len() < HEADER_LEN + len {
            self.buffer.reserve(HEADER_LEN + len - self.buffer.len());
            return Ok(None);
        }
        self.buffer.advance(HEADER_LEN);
        let payload = self.buffer.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Whether no partial frame is buffered (the stream may end cleanly here).
    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(0, b"hello"));
        wire.extend_from_slice(&encode(0, b""));
        wire.extend_from_slice(&EndStream::default().encode());
        assert_eq!(&wire[..HEADER_LEN], &[0, 0, 0, 0, 5]);

        for split in 1..wire.len() {
            let mut decoder = EnvelopeDecoder::new(1024);
            let mut frames = Vec::new();
            for chunk in wire.chunks(split) {
                decoder.push(chunk);
                while let Some(frame) = decoder.next_envelope().unwrap() {
                    frames.push(frame);
                }
            }
            assert!(decoder.is_empty());
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[0].payload, Bytes::from_static(b"hello"));
            assert!(frames[1].payload.is_empty());
            assert!(frames[2].is_end_stream());
            assert_eq!(
                EndStream::decode(&frames[2].payload).unwrap(),
                EndStream::default()
            );
        }
    }

    #[test]
    fn end_stream_carries_errors() {
        let frame = EndStream {
            error: Some(ConnectError::deadline_exceeded("too slow")),
        }
        .encode();
        assert_eq!(frame[0], FLAG_END_STREAM);
        let json = std::str::from_utf8(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(
            json,
            r#"{"error":{"code":"deadline_exceeded","message":"too slow"},"metadata":{}}"#
        );
        let decoded = EndStream::decode(json.as_bytes()).unwrap();
        assert_eq!(decoded.error.unwrap().code, Code::DeadlineExceeded);
        assert_eq!(EndStream::decode(b"{}").unwrap().error, None);
        assert_eq!(EndStream::decode(b"nope").unwrap_err().code, Code::Internal);
    }

    #[test]
    fn limits_and_compression_are_enforced() {
        let mut decoder = EnvelopeDecoder::new(4);
        decoder.push(&encode(0, b"12345"));
        assert_eq!(
            decoder.next_envelope().unwrap_err().code,
            Code::ResourceExhausted
        );

        let mut decoder = EnvelopeDecoder::new(1024);
        decoder.push(&encode(FLAG_COMPRESSED, b"xx"));
        assert_eq!(
            decoder.next_envelope().unwrap_err().code,
            Code::Unimplemented
        );

        // A huge announced length is refused before anything is buffered for it.
        let mut decoder = EnvelopeDecoder::new(1024);
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decoder.next_envelope().unwrap_err().code,
            Code::ResourceExhausted
        );
    }
}
