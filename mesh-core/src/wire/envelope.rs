//! The signed message envelope.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::frame::{self, FRAME_HEADER_LEN, FRAME_VERSION};
use super::{DecodeError, EnvelopeError, Payload, VerifyError, malformed, unencodable};
use crate::clock::Timestamp;
use crate::crypto;
use crate::identity::{NodeId, NodeKey};

/// Hops a message may travel unless the sender says otherwise.
pub const DEFAULT_HOP_LIMIT: u8 = 8;
/// Bytes before the signed part in a frame body: hop limit and signature.
pub(super) const BODY_PREFIX_LEN: usize = 1 + 64;
const SIGNATURE_DOMAIN: &[u8] = b"mesh-sdk/envelope/v";
const SEAL_DOMAIN: &[u8] = b"mesh-sdk/envelope-seal/v1";

/// A message id: 16 random bytes, unique per sender.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random() -> Self {
        MessageId(rand::random())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// Every member (gossip).
    Broadcast,
    /// One node.
    Node(NodeId),
}

/// A message before signing: everything the signature covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per sender; duplicates are dropped by `(from, id)`.
    pub id: MessageId,
    /// The origin (not the last relay).
    pub from: NodeId,
    /// The final recipient.
    pub to: Destination,
    /// When the origin created it.
    pub timestamp: Timestamp,
    /// What it carries.
    pub payload: Payload,
}

impl Envelope {
    /// A new envelope with a random id.
    pub fn new(from: NodeId, to: Destination, timestamp: Timestamp, payload: Payload) -> Self {
        Envelope {
            id: MessageId::random(),
            from,
            to,
            timestamp,
            payload,
        }
    }

    /// A new envelope whose payload is `inner` sealed to `to` (R-ID4): relays can
    /// route it but only `to` can read it. The seal binds sender, recipient and
    /// message id, so the box cannot be moved into another envelope.
    pub fn new_sealed(
        from: NodeId,
        to: NodeId,
        timestamp: Timestamp,
        inner: &Payload,
    ) -> Result<Self, EnvelopeError> {
        let id = MessageId::random();
        let plain = postcard::to_allocvec(inner).map_err(unencodable)?;
        let sealed = crypto::seal(&to, &seal_aad(&id, &from, &to), &plain)?;
        Ok(Envelope {
            id,
            from,
            to: Destination::Node(to),
            timestamp,
            payload: Payload::Sealed(sealed),
        })
    }

    /// Opens a payload sealed with [`Envelope::new_sealed`] to `key`.
    pub fn open_sealed(&self, key: &NodeKey) -> Result<Payload, EnvelopeError> {
        let Payload::Sealed(sealed) = &self.payload else {
            return Err(EnvelopeError::NotSealed);
        };
        let Destination::Node(to) = self.to else {
            return Err(EnvelopeError::SealToBroadcast);
        };
        let plain = crypto::open(key, &seal_aad(&self.id, &self.from, &to), sealed)?;
        let (inner, rest) = postcard::take_from_bytes::<Payload>(&plain).map_err(malformed)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()).into());
        }
        Ok(inner)
    }

    /// Signs the envelope with the sender's key (hop limit
    /// [`DEFAULT_HOP_LIMIT`]).
    pub fn sign(self, key: &NodeKey) -> Result<SignedEnvelope, EnvelopeError> {
        self.sign_with_hop_limit(key, DEFAULT_HOP_LIMIT)
    }

    /// Signs the envelope with the sender's key and hop limit `hops`. The
    /// signature covers the hop limit: nobody but the sender can change it
    /// (a relay that must count hops does so in a message of its own).
    pub fn sign_with_hop_limit(
        self,
        key: &NodeKey,
        hops: u8,
    ) -> Result<SignedEnvelope, EnvelopeError> {
        if key.node_id() != self.from {
            return Err(EnvelopeError::SignerMismatch {
                from: self.from,
                signer: key.node_id(),
            });
        }
        let signed = postcard::to_allocvec(&self).map_err(unencodable)?;
        let signature = key.sign(&signing_input(hops, &signed));
        Ok(SignedEnvelope {
            envelope: self,
            signed,
            signature,
            hop_limit: hops,
        })
    }
}

fn seal_aad(id: &MessageId, from: &NodeId, to: &NodeId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SEAL_DOMAIN.len() + 16 + 64);
    aad.extend_from_slice(SEAL_DOMAIN);
    aad.extend_from_slice(&id.0);
    aad.extend_from_slice(from.as_bytes());
    aad.extend_from_slice(to.as_bytes());
    aad
}

/// What the signature is computed over: domain tag, version, hop limit,
/// signed bytes.
fn signing_input(hop_limit: u8, signed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 2 + signed.len());
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.push(FRAME_VERSION);
    m.push(hop_limit);
    m.extend_from_slice(signed);
    m
}

/// An envelope whose signature is known to be valid (made here, or verified).
#[derive(Clone, PartialEq)]
pub struct SignedEnvelope {
    envelope: Envelope,
    /// The exact bytes the signature covers.
    signed: Vec<u8>,
    signature: [u8; 64],
    hop_limit: u8,
}

impl fmt::Debug for SignedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedEnvelope")
            .field("envelope", &self.envelope)
            .field("hop_limit", &self.hop_limit)
            .finish_non_exhaustive()
    }
}

impl SignedEnvelope {
    /// The signed content.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Takes the content out.
    pub fn into_envelope(self) -> Envelope {
        self.envelope
    }

    /// The signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The hop limit the sender signed.
    pub fn hop_limit(&self) -> u8 {
        self.hop_limit
    }

    /// Length of the frame [`SignedEnvelope::write_frame`] produces.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + BODY_PREFIX_LEN + self.signed.len()
    }

    /// Appends the frame to `out`, refusing bodies over `max_frame_len`.
    pub fn write_frame(
        &self,
        out: &mut Vec<u8>,
        max_frame_len: usize,
    ) -> Result<(), EnvelopeError> {
        let body_len = BODY_PREFIX_LEN + self.signed.len();
        let max = max_frame_len.min(frame::MAX_FRAME_LEN_LIMIT);
        if body_len > max {
            return Err(EnvelopeError::TooLarge { len: body_len, max });
        }
        out.reserve(FRAME_HEADER_LEN + body_len);
        out.push(FRAME_VERSION);
        // body_len <= MAX_FRAME_LEN_LIMIT < u32::MAX.
        out.extend_from_slice(&(body_len as u32).to_be_bytes());
        out.push(self.hop_limit);
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&self.signed);
        Ok(())
    }

    /// The frame, with the default size limit.
    pub fn to_frame(&self) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = Vec::new();
        self.write_frame(&mut out, frame::DEFAULT_MAX_FRAME_LEN)?;
        Ok(out)
    }
}

/// A decoded envelope whose signature has not been checked yet. Its content is
/// only reachable through [`UnverifiedEnvelope::verify`].
#[derive(Clone)]
pub struct UnverifiedEnvelope {
    inner: SignedEnvelope,
}

impl fmt::Debug for UnverifiedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnverifiedEnvelope")
            .field("id", &self.inner.envelope.id)
            .field("claimed_from", &self.inner.envelope.from)
            .finish_non_exhaustive()
    }
}

impl UnverifiedEnvelope {
    /// Parses a frame body (everything after the 5-byte header).
    pub(super) fn from_body(body: &[u8]) -> Result<Self, DecodeError> {
        if body.len() < BODY_PREFIX_LEN {
            return Err(DecodeError::Truncated {
                needed: BODY_PREFIX_LEN,
                got: body.len(),
            });
        }
        let hop_limit = body[0];
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&body[1..BODY_PREFIX_LEN]);
        let signed = &body[BODY_PREFIX_LEN..];
        let (envelope, rest) = postcard::take_from_bytes::<Envelope>(signed).map_err(malformed)?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        Ok(UnverifiedEnvelope {
            inner: SignedEnvelope {
                envelope,
                signed: signed.to_vec(),
                signature,
                hop_limit,
            },
        })
    }

    /// The sender the envelope claims, for logging before verification.
    pub fn claimed_from(&self) -> NodeId {
        self.inner.envelope.from
    }

    /// The message id, for logging before verification.
    pub fn id(&self) -> MessageId {
        self.inner.envelope.id
    }

    /// Checks the signature against the claimed sender.
    pub fn verify(self) -> Result<SignedEnvelope, VerifyError> {
        let from = self.inner.envelope.from;
        from.verify(
            &signing_input(self.inner.hop_limit, &self.inner.signed),
            &self.inner.signature,
        )
        .map_err(|_| VerifyError::BadSignature {
            from,
            id: self.inner.envelope.id,
        })?;
        Ok(self.inner)
    }
}
