//! What members send each other on the membership protocol
//! ([`MEMBERSHIP`](super::MEMBERSHIP)), and the codec foca encodes its
//! packets with.
//!
//! Every message of a membership connection is one postcard-encoded
//! [`MeshFrame`] of at most [`MAX_FRAME_LEN`] bytes. The dialer's first
//! frame is [`MeshFrame::Hello`]; the acceptor reads nothing else from a
//! node it does not know until the hello's certificate is checked.
//!
//! [`MeshCodec`] checks every identity foca decodes (its signature, under a
//! bounded cache of identities already checked), so no packet can carry a
//! forged member.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut};
use serde::{Deserialize, Serialize};

use super::gossip::{GossipMessage, MessageKey};
use super::member::{MemberCert, MemberError, MemberId};
use crate::identity::NodeId;

/// The largest membership frame, in bytes.
pub const MAX_FRAME_LEN: usize = 96 * 1024;
/// The most message keys in one [`MeshFrame::IHave`] or [`MeshFrame::IWant`].
pub const MAX_KEYS_PER_FRAME: usize = 64;

/// One message of a membership connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshFrame {
    /// The dialer's first frame: its certificate of membership.
    Hello {
        /// Signed by the member that let the dialer in.
        cert: MemberCert,
    },
    /// A SWIM packet (foca's own encoding, by [`MeshCodec`]).
    Swim(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A broadcast message, pushed eagerly.
    Gossip(GossipMessage),
    /// Keys of recent messages the sender holds (lazy push, anti-entropy).
    IHave(Vec<MessageKey>),
    /// Keys the sender lacks, asked of the receiver after an `IHave`.
    IWant(Vec<MessageKey>),
}

/// Why a frame is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("a membership frame of {0} bytes exceeds {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// Not a frame.
    #[error("not a membership frame: {0}")]
    Malformed(String),
    /// More than [`MAX_KEYS_PER_FRAME`] keys.
    #[error("more than {MAX_KEYS_PER_FRAME} message keys in one frame")]
    TooManyKeys,
}

impl MeshFrame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Parses one frame, refusing oversized ones and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        let (frame, rest): (MeshFrame, _) =
            postcard::take_from_bytes(bytes).map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed("trailing bytes".into()));
        }
        if let MeshFrame::IHave(keys) | MeshFrame::IWant(keys) = &frame
            && keys.len() > MAX_KEYS_PER_FRAME
        {
            return Err(FrameError::TooManyKeys);
        }
        Ok(frame)
    }
}

/// The largest join request, in bytes (a secret and one identity).
pub const MAX_JOIN_REQUEST_LEN: usize = 4096;
/// The longest refusal code or message in a [`JoinAnswer`].
const MAX_REFUSAL_LEN: usize = 512;

/// What a joiner sends on a join connection ([`JOIN`](super::JOIN)): the
/// token's secret, proved inside the channel that authenticated both keys,
/// and its own signed identity.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's 128-bit secret.
    pub secret: [u8; 16],
    /// The joiner's identity (its node id is the connection's peer).
    pub member: MemberId,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

impl Drop for JoinRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// The issuer's answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinAnswer {
    /// Let in: the certificate, the members, the blocklist.
    Granted(super::machine::JoinGrant),
    /// Refused: `code` is one of the join error kinds (`token_invalid`,
    /// `token_expired`, `token_used`, `token_revoked`, `join_refused`).
    Refused {
        /// The error kind.
        code: String,
        /// A sentence.
        message: String,
    },
}

impl JoinRequest {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Parses a request, refusing oversized ones and trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        if bytes.len() > MAX_JOIN_REQUEST_LEN {
            return Err(FrameError::TooLarge(bytes.len()));
        }
        match postcard::take_from_bytes(bytes) {
            Ok((r, [])) => Ok(r),
            Ok(_) => Err(FrameError::Malformed("trailing bytes".into())),
            Err(e) => Err(FrameError::Malformed(e.to_string())),
        }
    }
}

impl JoinAnswer {
    /// The answer's bytes.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Parses an answer, refusing trailing bytes and overlong refusals.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let answer: JoinAnswer = match postcard::take_from_bytes(bytes) {
            Ok((a, [])) => a,
            Ok(_) => return Err(FrameError::Malformed("trailing bytes".into())),
            Err(e) => return Err(FrameError::Malformed(e.to_string())),
        };
        if let JoinAnswer::Refused { code, message } = &answer
            && (code.len() > 64 || message.len() > MAX_REFUSAL_LEN)
        {
            return Err(FrameError::Malformed("overlong refusal".into()));
        }
        Ok(answer)
    }
}

/// Why foca's codec refused a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Not foca's encoding.
    #[error("malformed SWIM packet: {0}")]
    Malformed(String),
    /// The buffer was too small to encode into.
    #[error("SWIM packet buffer full")]
    BufferFull,
    /// An identity with a bad signature or shape.
    #[error("SWIM packet carries a forged identity")]
    Forged,
}

/// How many checked identities a cache remembers.
const VERIFIED_CACHE: usize = 8192;

/// Identities whose signatures were checked, by node: one per member, so a
/// signature is checked once per identity, not once per packet. Bounded;
/// the oldest entries go first. Cloning shares the cache (a simulation
/// shares one among all its nodes: the check is a pure function of the
/// bytes, so sharing it changes no outcome).
#[derive(Debug, Clone, Default)]
pub struct IdentityCache(Arc<Mutex<IdentityCacheInner>>);

#[derive(Debug, Default)]
struct IdentityCacheInner {
    verified: HashMap<NodeId, [u8; 32]>,
    order: VecDeque<NodeId>,
    verifications: u64,
}

impl IdentityCache {
    /// Checks `id`'s shape and signature, from the cache when it can.
    pub fn check(&self, id: &MemberId) -> Result<(), MemberError> {
        let digest = id.digest();
        let known = self
            .0
            .lock()
            .map(|c| c.verified.get(&id.node()) == Some(&digest))
            .unwrap_or(false);
        if known {
            return Ok(());
        }
        id.verify()?;
        if let Ok(mut c) = self.0.lock() {
            c.verifications += 1;
            if c.verified.insert(id.node(), digest).is_none() {
                c.order.push_back(id.node());
                if c.order.len() > VERIFIED_CACHE
                    && let Some(old) = c.order.pop_front()
                {
                    c.verified.remove(&old);
                }
            }
        }
        Ok(())
    }

    /// Signatures checked so far (cache misses).
    pub fn verifications(&self) -> u64 {
        self.0.lock().map(|c| c.verifications).unwrap_or(0)
    }
}

/// foca's codec: postcard, with every decoded identity checked.
#[derive(Debug, Default)]
pub struct MeshCodec {
    identities: IdentityCache,
}

impl MeshCodec {
    /// A codec checking identities through `identities`.
    pub fn new(identities: IdentityCache) -> Self {
        MeshCodec { identities }
    }

    fn check(&mut self, id: &MemberId) -> Result<(), CodecError> {
        self.identities.check(id).map_err(|_| CodecError::Forged)
    }

    fn check_message(&mut self, m: &foca::Message<MemberId>) -> Result<(), CodecError> {
        match m {
            foca::Message::PingReq { target: id, .. }
            | foca::Message::IndirectPing { origin: id, .. }
            | foca::Message::IndirectAck { target: id, .. }
            | foca::Message::ForwardedAck { origin: id, .. } => self.check(id),
            _ => Ok(()),
        }
    }
}

fn take<T: for<'de> Deserialize<'de>>(mut buf: impl Buf) -> Result<T, CodecError> {
    let remaining = buf.remaining();
    let chunk = buf.chunk();
    if chunk.len() != remaining {
        return Err(CodecError::Malformed("fragmented buffer".into()));
    }
    let (value, rest) =
        postcard::take_from_bytes(chunk).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let used = remaining - rest.len();
    buf.advance(used);
    Ok(value)
}

fn put<T: Serialize>(value: &T, mut buf: impl BufMut) -> Result<(), CodecError> {
    let bytes = postcard::to_allocvec(value).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError::BufferFull);
    }
    buf.put_slice(&bytes);
    Ok(())
}

impl foca::Codec<MemberId> for MeshCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &foca::Header<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<foca::Header<MemberId>, Self::Error> {
        let header: foca::Header<MemberId> = take(buf)?;
        self.check(&header.src)?;
        self.check(&header.dst)?;
        self.check_message(&header.message)?;
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &foca::Member<MemberId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<foca::Member<MemberId>, Self::Error> {
        let member: foca::Member<MemberId> = take(buf)?;
        self.check(member.id())?;
        Ok(member)
    }
}

/// The node a SWIM packet says it is from, without checking anything else:
/// the mesh drops a packet whose source is not the connection's
/// authenticated peer before foca sees it.
pub fn swim_source(packet: &[u8]) -> Option<NodeId> {
    let (header, _): (foca::Header<MemberId>, _) = postcard::take_from_bytes(packet).ok()?;
    Some(header.src.node())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_typed_errors() {
        let frame = MeshFrame::IHave(vec![]);
        assert_eq!(MeshFrame::decode(&frame.encode()).unwrap(), frame);
        assert!(matches!(
            MeshFrame::decode(&[0xff; 8]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            MeshFrame::decode(&vec![0; MAX_FRAME_LEN + 1]),
            Err(FrameError::TooLarge(_))
        ));
        let mut trailing = frame.encode();
        trailing.push(0);
        assert!(matches!(
            MeshFrame::decode(&trailing),
            Err(FrameError::Malformed(_))
        ));
    }
}
