//! Length-prefixed frames: one-shot decoding and a streaming decoder.

use super::DecodeError;
use super::envelope::UnverifiedEnvelope;

/// The frame format version this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of the frame header: version and body length.
pub const FRAME_HEADER_LEN: usize = 5;
/// Default limit on a frame body: 1 MiB (a 64 KiB file chunk fits many times).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 20;
/// No configuration may raise the limit above 16 MiB.
pub const MAX_FRAME_LEN_LIMIT: usize = 16 << 20;

/// Reads and checks a frame header; returns the body length.
fn parse_header(header: &[u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, DecodeError> {
    if header[0] != FRAME_VERSION {
        return Err(DecodeError::UnsupportedVersion(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let max = max.min(MAX_FRAME_LEN_LIMIT);
    if len > max {
        return Err(DecodeError::FrameTooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one complete frame from the start of `bytes`; returns the envelope
/// and how many bytes the frame used. Allocates nothing before the header has
/// been checked against `max_frame_len`.
pub fn decode_frame(
    bytes: &[u8],
    max_frame_len: usize,
) -> Result<(UnverifiedEnvelope, usize), DecodeError> {
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(DecodeError::Truncated {
            needed: FRAME_HEADER_LEN,
            got: bytes.len(),
        });
    };
    let len = parse_header(header, max_frame_len)?;
    let total = FRAME_HEADER_LEN + len;
    let body = bytes
        .get(FRAME_HEADER_LEN..total)
        .ok_or(DecodeError::Truncated {
            needed: total,
            got: bytes.len(),
        })?;
    Ok((UnverifiedEnvelope::from_body(body)?, total))
}

/// Incremental decoder for a byte stream (a QUIC stream, any reliable link).
///
/// Sans-IO: hand it whatever bytes arrived; it consumes at most one frame per
/// call and says how many bytes it used. It holds at most one partial frame,
/// and its buffer grows only as bytes arrive, never to a size merely announced.
///
/// ```
/// # use mesh_core::wire::{FrameDecoder, DEFAULT_MAX_FRAME_LEN};
/// # fn handle(_: mesh_core::wire::UnverifiedEnvelope) {}
/// # let received: &[u8] = &[];
/// let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
/// let mut rest = received;
/// while !rest.is_empty() {
///     let (used, frame) = decoder.feed(rest);
///     rest = &rest[used..];
///     match frame {
///         Some(Ok(envelope)) => handle(envelope),
///         Some(Err(e)) if e.is_fatal() => break, // close the stream
///         Some(Err(_)) => {}                     // skip one bad frame
///         None => {}
///     }
/// }
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_filled: usize,
    /// Body length once the header is complete.
    body_len: Option<usize>,
    body: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder that refuses bodies over `max_frame_len` (capped at [`MAX_FRAME_LEN_LIMIT`]).
    pub fn new(max_frame_len: usize) -> Self {
        FrameDecoder {
            max: max_frame_len.min(MAX_FRAME_LEN_LIMIT),
            header: [0; FRAME_HEADER_LEN],
            header_filled: 0,
            body_len: None,
            body: Vec::new(),
            poisoned: false,
        }
    }

    /// Consumes bytes from `data` up to the end of the next frame. Returns the
    /// number of bytes used and, when a frame completed, its decoded envelope
    /// or the reason it is bad. After a fatal error every call returns
    /// [`DecodeError::Poisoned`] and uses nothing.
    pub fn feed(
        &mut self,
        data: &[u8],
    ) -> (usize, Option<Result<UnverifiedEnvelope, DecodeError>>) {
        if self.poisoned {
            return (0, Some(Err(DecodeError::Poisoned)));
        }
        let mut used = 0;
        if self.body_len.is_none() {
            let take = (FRAME_HEADER_LEN - self.header_filled).min(data.len());
            self.header[self.header_filled..self.header_filled + take]
                .copy_from_slice(&data[..take]);
            self.header_filled += take;
            used += take;
            if self.header_filled < FRAME_HEADER_LEN {
                return (used, None);
            }
            match parse_header(&self.header, self.max) {
                Ok(len) => self.body_len = Some(len),
                Err(e) => {
                    self.poisoned = true;
                    return (used, Some(Err(e)));
                }
            }
        }
        let body_len = self.body_len.unwrap_or(0);
        let take = (body_len - self.body.len()).min(data.len() - used);
        self.body.extend_from_slice(&data[used..used + take]);
        used += take;
        if self.body.len() < body_len {
            return (used, None);
        }
        let result = UnverifiedEnvelope::from_body(&self.body);
        self.header_filled = 0;
        self.body_len = None;
        self.body.clear();
        if self.body.capacity() > 64 * 1024 {
            // Do not keep a large buffer alive for an idle stream.
            self.body = Vec::new();
        }
        (used, Some(result))
    }

    /// Bytes of a partial frame currently held.
    pub fn buffered(&self) -> usize {
        self.header_filled + self.body.len()
    }
}
