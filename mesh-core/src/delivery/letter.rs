//! Letters: messages sealed end to end to their recipient and signed by
//! their sender, so that relays carry them without reading or altering
//! them.
//!
//! The header (id, sender, recipient, expiry) is in the clear: relays
//! route and store by it. It is bound, as associated data, into the seal
//! and signed inside it, so a relay that changes a byte of the header or
//! the ciphertext makes the letter fail to open at the recipient. The
//! inside names the sender's sequence number for this recipient (what the
//! recipient deduplicates by) and what the letter is: a message, or a
//! receipt for a message the sender of the receipt got through a relay.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, SealedBox};
use crate::identity::{NodeId, NodeKey};

/// The largest payload of a message letter.
pub const MAX_PAYLOAD_LEN: usize = 256 * 1024;
/// The largest sealed part of a letter (payload, sequence number, kind,
/// signature, seal overhead).
pub const MAX_SEALED_LEN: usize = MAX_PAYLOAD_LEN + 512;

const AAD_TAG: &[u8] = b"mesh-sdk/letter/1";
const SIG_TAG: &[u8] = b"mesh-sdk/letter-sig/1";
const ID_TAG: &[u8] = b"mesh-sdk/letter-id/1";

/// A letter's id: derived from sender, recipient and sequence number, so a
/// sender that restarts and sends a letter again sends the same id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LetterId(pub [u8; 16]);

impl LetterId {
    /// The id of `from`'s letter number `seq` to `to`.
    pub fn of(from: &NodeId, to: &NodeId, seq: u64) -> Self {
        let mut data = Vec::with_capacity(72);
        data.extend_from_slice(from.as_bytes());
        data.extend_from_slice(to.as_bytes());
        data.extend_from_slice(&seq.to_be_bytes());
        let h = crypto::tagged_sha256(ID_TAG, &data);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[..16]);
        LetterId(id)
    }

    /// Lowercase hex, 32 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`LetterId::to_hex`].
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(LetterId(id))
    }
}

impl fmt::Debug for LetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LetterId({})", self.to_hex())
    }
}

impl fmt::Display for LetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A letter as it travels and as relays store it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Letter {
    /// Its id.
    pub id: LetterId,
    /// Who sent it.
    pub from: NodeId,
    /// Who it is for.
    pub to: NodeId,
    /// After this (ms since the epoch) relays drop it.
    pub expires_at_ms: u64,
    /// The sealed inside ([`SealedBox::to_bytes`]).
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

impl fmt::Debug for Letter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Letter")
            .field("id", &self.id)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("sealed_len", &self.sealed.len())
            .finish()
    }
}

/// What a letter is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Contents {
    /// A message for the recipient's application.
    Message(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The sender of this letter received letter `.0` (through a relay).
    Receipt(LetterId),
}

impl fmt::Debug for Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Contents::Message(p) => write!(f, "Message({} bytes)", p.len()),
            Contents::Receipt(id) => write!(f, "Receipt({id})"),
        }
    }
}

/// The sealed inside of a letter.
#[derive(Serialize, Deserialize)]
struct Inside {
    seq: u64,
    floor: u64,
    contents: Contents,
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
}

/// An opened letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's sequence number for this recipient (from 1).
    pub seq: u64,
    /// The sender's lowest number for this recipient still waiting for an
    /// acknowledgement when it sealed this one: numbers below it were
    /// acknowledged or given up (expired), so the recipient may count them
    /// as taken.
    pub floor: u64,
    /// What it holds.
    pub contents: Contents,
}

/// Why a letter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LetterError {
    /// A payload over [`MAX_PAYLOAD_LEN`].
    #[error("a payload of {0} bytes is over the limit of {MAX_PAYLOAD_LEN}")]
    TooLarge(usize),
    /// Not addressed to this node.
    #[error("the letter is not for this node")]
    NotForMe,
    /// The seal did not open: altered on the way, or not sealed to us.
    #[error("the letter does not open (altered, or sealed to another node)")]
    Tampered,
    /// The inside is not a letter's.
    #[error("the letter's inside is malformed")]
    Malformed,
    /// The sender's signature does not verify.
    #[error("the sender's signature does not verify")]
    BadSignature,
    /// The id is not the one its sender, recipient and number give.
    #[error("the letter's id does not match its contents")]
    WrongId,
    /// Sequence number 0.
    #[error("a letter's sequence number starts at 1")]
    BadSeq,
    /// Sealing failed.
    #[error("sealing failed: {0}")]
    Seal(String),
}

fn aad(id: &LetterId, from: &NodeId, to: &NodeId, expires_at_ms: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_TAG.len() + 16 + 64 + 8);
    a.extend_from_slice(AAD_TAG);
    a.extend_from_slice(&id.0);
    a.extend_from_slice(from.as_bytes());
    a.extend_from_slice(to.as_bytes());
    a.extend_from_slice(&expires_at_ms.to_be_bytes());
    a
}

fn signed_bytes(header: &[u8], seq: u64, floor: u64, contents: &Contents) -> Vec<u8> {
    let mut m = Vec::with_capacity(header.len() + 64);
    m.extend_from_slice(SIG_TAG);
    m.extend_from_slice(header);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&floor.to_be_bytes());
    m.extend_from_slice(&postcard::to_allocvec(contents).unwrap_or_default());
    m
}

impl Letter {
    /// Seals `contents` from `key`'s node to `to` as its letter `seq`
    /// (`floor`: see [`Opened::floor`]; at most `seq`).
    pub fn seal(
        key: &NodeKey,
        to: &NodeId,
        seq: u64,
        floor: u64,
        contents: Contents,
        expires_at_ms: u64,
    ) -> Result<Letter, LetterError> {
        if let Contents::Message(p) = &contents
            && p.len() > MAX_PAYLOAD_LEN
        {
            return Err(LetterError::TooLarge(p.len()));
        }
        if seq == 0 || floor > seq {
            return Err(LetterError::BadSeq);
        }
        let from = key.node_id();
        let id = LetterId::of(&from, to, seq);
        let header = aad(&id, &from, to, expires_at_ms);
        let sig = key.sign(&signed_bytes(&header, seq, floor, &contents));
        let inside = Inside {
            seq,
            floor,
            contents,
            sig: sig.to_vec(),
        };
        let plain = postcard::to_allocvec(&inside).map_err(|e| LetterError::Seal(e.to_string()))?;
        let sealed =
            crypto::seal(to, &header, &plain).map_err(|e| LetterError::Seal(e.to_string()))?;
        Ok(Letter {
            id,
            from,
            to: *to,
            expires_at_ms,
            sealed: sealed.to_bytes(),
        })
    }

    /// Opens a letter addressed to `key`'s node: the seal, the sender's
    /// signature, the id.
    pub fn open(&self, key: &NodeKey) -> Result<Opened, LetterError> {
        if self.to != key.node_id() {
            return Err(LetterError::NotForMe);
        }
        let header = aad(&self.id, &self.from, &self.to, self.expires_at_ms);
        let sealed = SealedBox::from_bytes(&self.sealed).map_err(|_| LetterError::Tampered)?;
        let plain = crypto::open(key, &header, &sealed).map_err(|_| LetterError::Tampered)?;
        let (inside, rest): (Inside, _) =
            postcard::take_from_bytes(&plain).map_err(|_| LetterError::Malformed)?;
        if !rest.is_empty() {
            return Err(LetterError::Malformed);
        }
        let sig: [u8; 64] = inside
            .sig
            .as_slice()
            .try_into()
            .map_err(|_| LetterError::BadSignature)?;
        self.from
            .verify(
                &signed_bytes(&header, inside.seq, inside.floor, &inside.contents),
                &sig,
            )
            .map_err(|_| LetterError::BadSignature)?;
        if inside.seq == 0 || inside.floor > inside.seq {
            return Err(LetterError::BadSeq);
        }
        if LetterId::of(&self.from, &self.to, inside.seq) != self.id {
            return Err(LetterError::WrongId);
        }
        Ok(Opened {
            seq: inside.seq,
            floor: inside.floor,
            contents: inside.contents,
        })
    }

    /// About what it costs to store.
    pub fn size(&self) -> usize {
        self.sealed.len() + 128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_opens_only_for_its_recipient_and_any_change_is_detected() {
        let alice = NodeKey::from_secret_bytes(&[1; 32]);
        let bob = NodeKey::from_secret_bytes(&[2; 32]);
        let carol = NodeKey::from_secret_bytes(&[3; 32]);
        let letter = Letter::seal(
            &alice,
            &bob.node_id(),
            7,
            5,
            Contents::Message(b"hello bob".to_vec()),
            99,
        )
        .unwrap();
        assert_eq!(letter.id, LetterId::of(&alice.node_id(), &bob.node_id(), 7));
        let opened = letter.open(&bob).unwrap();
        assert_eq!(
            (opened.seq, opened.floor, opened.contents),
            (7, 5, Contents::Message(b"hello bob".to_vec()))
        );
        // The plaintext is nowhere in what a relay holds.
        let wire = postcard::to_allocvec(&letter).unwrap();
        assert!(!wire.windows(9).any(|w| w == b"hello bob"));
        assert_eq!(letter.open(&carol), Err(LetterError::NotForMe));
        // Every byte of the ciphertext, and every header field, is bound.
        for i in [0, 1, 40, letter.sealed.len() - 1] {
            let mut bad = letter.clone();
            bad.sealed[i] ^= 1;
            assert!(bad.open(&bob).is_err(), "byte {i}");
        }
        let mut bad = letter.clone();
        bad.expires_at_ms += 1;
        assert_eq!(bad.open(&bob), Err(LetterError::Tampered));
        let mut bad = letter.clone();
        bad.from = carol.node_id();
        assert_eq!(bad.open(&bob), Err(LetterError::Tampered));
        let mut bad = letter.clone();
        bad.id.0[0] ^= 1;
        assert_eq!(bad.open(&bob), Err(LetterError::Tampered));
        // A sender cannot be impersonated: carol seals in alice's name.
        let forged = Letter::seal(
            &carol,
            &bob.node_id(),
            7,
            7,
            Contents::Message(b"x".to_vec()),
            99,
        )
        .map(|mut l| {
            l.from = alice.node_id();
            l
        })
        .unwrap();
        assert!(forged.open(&bob).is_err());
        assert_eq!(
            Letter::seal(
                &alice,
                &bob.node_id(),
                1,
                1,
                Contents::Message(vec![0; MAX_PAYLOAD_LEN + 1]),
                9
            )
            .unwrap_err(),
            LetterError::TooLarge(MAX_PAYLOAD_LEN + 1)
        );
        assert_eq!(LetterId::from_hex(&letter.id.to_hex()), Some(letter.id));
        assert_eq!(LetterId::from_hex("zz"), None);
    }
}
