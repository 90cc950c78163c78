//! The wire format: signed message envelopes in versioned, length-prefixed frames.
//!
//! ```text
//! frame   = version (u8, = 1) | body length (u32, big-endian) | body
//! body    = hop limit (u8) | ed25519 signature (64) | signed part
//! signed  = postcard(id, from, to, timestamp, payload)
//! ```
//!
//! * The signature covers a domain tag, the frame version, the hop limit and
//!   the signed part, exactly as received: the receiver verifies the bytes it
//!   got, not a re-encoding. Nobody but the sender can change the hop limit;
//!   messages are not relayed at this layer (a relay counts hops in a message
//!   of its own).
//! * A frame body is at most [`DEFAULT_MAX_FRAME_LEN`] bytes unless configured
//!   otherwise (hard cap [`MAX_FRAME_LEN_LIMIT`]); the length is checked before
//!   any buffer is sized, and the streaming [`FrameDecoder`] grows its buffer
//!   only as bytes actually arrive.
//! * Receiving is three steps, each with its own error type:
//!   [`decode_frame`] or [`FrameDecoder`] → [`UnverifiedEnvelope::verify`] →
//!   [`ReplayGuard::admit`] (seen ids and a clock-skew window).
//!
//! ```
//! use mesh_core::clock::Timestamp;
//! use mesh_core::identity::NodeKey;
//! use mesh_core::wire::{decode_frame, Destination, Envelope, Payload, CustomJson, JsonText, ReplayGuard, ReplayConfig};
//!
//! let alice = NodeKey::generate();
//! let now = Timestamp::from_millis(1_700_000_000_000);
//! let payload = Payload::Custom(CustomJson { app_type: "hello".into(), data: JsonText::new("{\"n\":1}")? });
//! let frame = Envelope::new(alice.node_id(), Destination::Broadcast, now, payload).sign(&alice)?.to_frame()?;
//!
//! let (unverified, used) = decode_frame(&frame, mesh_core::wire::DEFAULT_MAX_FRAME_LEN)?;
//! assert_eq!(used, frame.len());
//! let envelope = unverified.verify()?;
//! let mut guard = ReplayGuard::new(ReplayConfig::default());
//! guard.admit(&envelope, now)?;
//! assert!(guard.admit(&envelope, now).is_err()); // the same message again
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bounded;
mod envelope;
mod frame;
mod payload;
mod replay;

pub use envelope::{
    DEFAULT_HOP_LIMIT, Destination, Envelope, MessageId, SignedEnvelope, UnverifiedEnvelope,
};
pub use frame::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, FRAME_VERSION, FrameDecoder, MAX_FRAME_LEN_LIMIT,
    decode_frame,
};
pub use payload::{
    Ack, Command, CommandOutcome, CommandResult, CommandUsage, ConfigUpdate, CustomJson, DbOp,
    DbSync, EventPayload, FileChunk, HealthMetrics, Heartbeat, JobSize, JsonText, MediaFrame,
    MediaType, PairingMessage, Payload, PeerAnnounce, PeerExchange, Platform, SessionMessage,
    Thermal,
};
pub use replay::{ReplayConfig, ReplayGuard};

use crate::clock::Timestamp;
use crate::crypto::CryptoError;
use crate::identity::NodeId;

/// A frame could not be decoded. Framing errors (version, size) leave a byte
/// stream unusable; content errors concern one frame only (see [`DecodeError::is_fatal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame announces a body larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced body length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A frame version this build does not speak.
    #[error("frame version {0} is not supported (this build speaks version {FRAME_VERSION})")]
    UnsupportedVersion(u8),
    /// The input ends inside a frame.
    #[error("truncated frame: {needed} bytes needed, {got} available")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes available.
        got: usize,
    },
    /// The body does not decode as an envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The envelope decoded but bytes were left over.
    #[error("{0} unexpected bytes after the envelope")]
    TrailingBytes(usize),
    /// A streaming decoder already hit a framing error and must be discarded.
    #[error("the byte stream lost framing after an earlier error; close the connection")]
    Poisoned,
}

impl DecodeError {
    /// Whether a byte stream cannot continue after this error (framing is lost).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::FrameTooLarge { .. }
                | DecodeError::UnsupportedVersion(_)
                | DecodeError::Poisoned
        )
    }
}

/// A message's signature or sender is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The signature does not verify under the claimed sender's key.
    #[error("bad signature on message {id} claimed to be from {from}")]
    BadSignature {
        /// Claimed sender.
        from: NodeId,
        /// Message id.
        id: MessageId,
    },
}

/// Describes a postcard decoding failure in words a peer's operator can act on.
/// (postcard drops the text of validation errors, so those are named here.)
fn malformed(e: postcard::Error) -> DecodeError {
    DecodeError::Malformed(match e {
        postcard::Error::SerdeDeCustom => {
            "a value failed validation: an unknown message kind (is the peer newer?), a list over its \
             limit (16 addresses, 64 peers, 1024 ack ids), invalid JSON text, or an invalid node id"
                .to_owned()
        }
        other => other.to_string(),
    })
}

/// The same for encoding; the only custom failure there is a list over its limit.
fn unencodable(e: postcard::Error) -> EnvelopeError {
    EnvelopeError::Encode(match e {
        postcard::Error::SerdeSerCustom => {
            "a list exceeds its wire limit (16 addresses, 64 peers, 1024 ack ids); split the message"
                .to_owned()
        }
        other => other.to_string(),
    })
}

/// A verified message is refused because it was seen before or its time is off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// This sender's message id was already accepted.
    #[error("message {id} from {from} was already received (replay or duplicate)")]
    Replayed {
        /// Sender.
        from: NodeId,
        /// Message id.
        id: MessageId,
    },
    /// The timestamp is older than the acceptance window.
    #[error("message timestamp {timestamp} is older than the oldest accepted {oldest_accepted}")]
    Stale {
        /// The message's timestamp.
        timestamp: Timestamp,
        /// The oldest timestamp accepted now.
        oldest_accepted: Timestamp,
    },
    /// The timestamp is further in the future than the allowed clock skew.
    #[error(
        "message timestamp {timestamp} is ahead of the newest accepted {newest_accepted}; check the sender's clock"
    )]
    FromFuture {
        /// The message's timestamp.
        timestamp: Timestamp,
        /// The newest timestamp accepted now.
        newest_accepted: Timestamp,
    },
}

/// Errors building, sealing or opening envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The signing key is not the envelope's `from`.
    #[error("envelope is from {from} but the signing key belongs to {signer}")]
    SignerMismatch {
        /// The envelope's sender.
        from: NodeId,
        /// The key's node id.
        signer: NodeId,
    },
    /// The encoded frame would exceed the limit.
    #[error(
        "message of {len} bytes exceeds the frame limit of {max} bytes; split it (file chunks, media frames)"
    )]
    TooLarge {
        /// Body length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Sealing needs a single recipient.
    #[error("a sealed payload needs a single recipient, not a broadcast")]
    SealToBroadcast,
    /// The payload is not sealed.
    #[error("the payload is not sealed")]
    NotSealed,
    /// Sealing or opening failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The opened payload does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Encoding failed (never expected for well-formed values).
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Any error of the wire layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Decoding.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Signature.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Replay or clock skew.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// Building or sealing.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

#[cfg(test)]
mod tests;
