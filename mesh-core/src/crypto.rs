//! Sealing payloads to a node: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305.
//!
//! Two forms share one key schedule (modelled on HPKE base mode, RFC 9180):
//!
//! * **One-shot** [`seal`] / [`open`]: a fresh ephemeral X25519 key per message,
//!   agreement with the recipient's static key (the Montgomery form of its node
//!   id), HKDF into a key and nonce. The result is a [`SealedBox`]; only the
//!   holder of the recipient's [`NodeKey`] can open it. Relays see ciphertext.
//! * **Session** [`Sealer`] / [`Opener`] for a long conversation: one key
//!   agreement, then every message is numbered. The nonce is the base nonce XOR
//!   the message number, and the number is kept by the `Sealer` and only ever
//!   increases, so a nonce never repeats under a key; after 2^64 - 1 messages
//!   sealing fails instead of wrapping. The `Opener` refuses numbers it has
//!   already opened (a 128-message sliding window) or that are older than the
//!   window. [`DuplexSession`] pairs a sealer and an opener with one key per
//!   direction for request/response traffic.
//!
//! Every form takes *associated data* that is authenticated but not encrypted;
//! the wire layer binds sender, recipient and message id into it so a box cannot
//! be lifted into another envelope.
//!
//! ```
//! use mesh_core::crypto::{open, seal};
//! use mesh_core::identity::NodeKey;
//!
//! let bob = NodeKey::generate();
//! let sealed = seal(&bob.node_id(), b"context", b"hello bob")?;
//! assert_eq!(open(&bob, b"context", &sealed)?, b"hello bob");
//! assert!(open(&NodeKey::generate(), b"context", &sealed).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret};
use zeroize::Zeroizing;

use crate::identity::{NodeId, NodeKey};

/// Authentication tag length appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Length of an encapsulated (ephemeral public) key.
pub const ENC_LEN: usize = 32;
const SEALED_BOX_VERSION: u8 = 1;
/// Bytes a [`SealedBox`] adds to its plaintext in [`SealedBox::to_bytes`] form.
pub const SEALED_BOX_OVERHEAD: usize = 1 + ENC_LEN + TAG_LEN;
const REPLAY_WINDOW: u64 = 128;

/// Errors from sealing and opening. None reveals key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The ciphertext, its tag, the associated data or the key is wrong.
    /// (AEADs cannot tell these apart, by design.)
    #[error("decryption failed: the box was tampered with, or is for another key or context")]
    Decrypt,
    /// Fewer bytes than the smallest possible box.
    #[error("sealed box truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes given.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// A box format this version does not know.
    #[error(
        "sealed box version {0} is not supported (this build reads version {SEALED_BOX_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// The peer's key agreement produced an all-zero secret (a small-order point).
    #[error("key agreement with a small-order public key was refused")]
    NonContributory,
    /// A session has sealed 2^64 - 1 messages; start a new one.
    #[error("session exhausted its message numbers; establish a new session")]
    SequenceExhausted,
    /// The message number was opened before.
    #[error("message number {0} was already received (replay)")]
    Replayed(u64),
    /// The message number is behind the replay window.
    #[error("message number {seq} is older than the replay window (newest seen {newest})")]
    TooOld {
        /// The number received.
        seq: u64,
        /// The newest number opened so far.
        newest: u64,
    },
}

/// The ephemeral public key that starts a seal or a session (HPKE's `enc`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EncapsulatedKey(pub [u8; ENC_LEN]);

impl fmt::Debug for EncapsulatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EncapsulatedKey({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// A payload sealed to one recipient: the ephemeral key and the ciphertext with its tag.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedBox {
    /// The sender's ephemeral public key.
    pub enc: EncapsulatedKey,
    /// Ciphertext followed by the 16-byte tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedBox")
            .field("enc", &self.enc)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

impl SealedBox {
    /// The standalone byte form: `version (1) | enc (32) | ciphertext | tag (16)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + ENC_LEN + self.ciphertext.len());
        out.push(SEALED_BOX_VERSION);
        out.extend_from_slice(&self.enc.0);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    /// Parses [`SealedBox::to_bytes`] output. Checks only the framing; [`open`] authenticates.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() < SEALED_BOX_OVERHEAD {
            return Err(CryptoError::Truncated {
                len: bytes.len(),
                min: SEALED_BOX_OVERHEAD,
            });
        }
        if bytes[0] != SEALED_BOX_VERSION {
            return Err(CryptoError::UnsupportedVersion(bytes[0]));
        }
        let mut enc = [0u8; ENC_LEN];
        enc.copy_from_slice(&bytes[1..1 + ENC_LEN]);
        Ok(SealedBox {
            enc: EncapsulatedKey(enc),
            ciphertext: bytes[1 + ENC_LEN..].to_vec(),
        })
    }
}

/// SHA-256 of `data` under `tag` (domain separation): every hash the SDK
/// derives from a secret or an id (fingerprints, stored token hashes,
/// rotation acknowledgements, join-token secrets and checksums) goes
/// through here, each with a tag of its own.
pub fn tagged_sha256(tag: &[u8], data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    Sha256::new()
        .chain_update(tag)
        .chain_update(data)
        .finalize()
        .into()
}

/// Seals `plaintext` so that only `recipient` can read it, binding `aad`.
pub fn seal(recipient: &NodeId, aad: &[u8], plaintext: &[u8]) -> Result<SealedBox, CryptoError> {
    let (enc, mut sealer) = Sealer::new(recipient, b"seal")?;
    let mut ciphertext = plaintext.to_vec();
    sealer.seal_in_place(aad, &mut ciphertext)?;
    Ok(SealedBox { enc, ciphertext })
}

/// Opens a [`SealedBox`] addressed to `key`, checking `aad`.
pub fn open(key: &NodeKey, aad: &[u8], sealed: &SealedBox) -> Result<Vec<u8>, CryptoError> {
    let mut opener = Opener::new(key, &sealed.enc, b"seal")?;
    let mut buf = sealed.ciphertext.clone();
    opener.open_in_place(0, aad, &mut buf)?;
    Ok(buf)
}

/// One X25519 agreement between an ephemeral key (`enc`) and a recipient's
/// static key, from which directional keys are derived.
struct Agreement {
    shared: SharedSecret,
    enc: [u8; ENC_LEN],
    recipient: PublicKey,
}

impl Agreement {
    /// Sender side: a fresh ephemeral key against the recipient's node key.
    fn encapsulate(recipient: &NodeId) -> Self {
        let eph = EphemeralSecret::random_from_rng(&mut rand::rng());
        let enc = PublicKey::from(&eph).to_bytes();
        let recipient = recipient.agreement_key();
        let shared = eph.diffie_hellman(&recipient);
        Agreement {
            shared,
            enc,
            recipient,
        }
    }

    /// Recipient side: its static key against the sender's ephemeral key.
    fn decapsulate(key: &NodeKey, enc: &EncapsulatedKey) -> Self {
        let shared = key
            .agreement_secret()
            .diffie_hellman(&PublicKey::from(enc.0));
        Agreement {
            shared,
            enc: enc.0,
            recipient: PublicKey::from(key.agreement_secret()),
        }
    }

    /// HKDF-SHA256 of the shared secret into a key and base nonce for `label`.
    fn derive(&self, label: &[u8]) -> Result<(ChaCha20Poly1305, [u8; 12]), CryptoError> {
        if !self.shared.was_contributory() {
            return Err(CryptoError::NonContributory);
        }
        let hk = Hkdf::<Sha256>::new(Some(b"mesh-sdk/seal/v1"), self.shared.as_bytes());
        // The two trailing keys have fixed length, so `label` is unambiguous.
        let mut info = Vec::with_capacity(label.len() + 2 * ENC_LEN);
        info.extend_from_slice(label);
        info.extend_from_slice(&self.enc);
        info.extend_from_slice(self.recipient.as_bytes());
        let mut okm = Zeroizing::new([0u8; 44]);
        // 44 bytes is far below HKDF-SHA256's 8160-byte limit.
        hk.expand(&info, &mut okm[..])
            .map_err(|_| CryptoError::Decrypt)?;
        let key = Key::try_from(&okm[..32]).map_err(|_| CryptoError::Decrypt)?;
        let mut base_nonce = [0u8; 12];
        base_nonce.copy_from_slice(&okm[32..]);
        Ok((ChaCha20Poly1305::new(&key), base_nonce))
    }

    fn sealer(&self, label: &[u8]) -> Result<Sealer, CryptoError> {
        let (cipher, base_nonce) = self.derive(label)?;
        Ok(Sealer {
            cipher,
            base_nonce,
            next_seq: 0,
        })
    }

    fn opener(&self, label: &[u8]) -> Result<Opener, CryptoError> {
        let (cipher, base_nonce) = self.derive(label)?;
        Ok(Opener {
            cipher,
            base_nonce,
            window: ReplayWindow::default(),
        })
    }
}

fn nonce_for(base: &[u8; 12], seq: u64) -> Nonce {
    let mut n = *base;
    for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    Nonce::from(n)
}

/// The sending half of a session: seals numbered messages to one recipient.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    base_nonce: [u8; 12],
    next_seq: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Starts a session to `recipient`. Send the returned [`EncapsulatedKey`]
    /// once; the recipient builds the matching [`Opener`] from it. `label`
    /// separates uses (both sides must pass the same).
    pub fn new(recipient: &NodeId, label: &[u8]) -> Result<(EncapsulatedKey, Sealer), CryptoError> {
        let agreement = Agreement::encapsulate(recipient);
        Ok((EncapsulatedKey(agreement.enc), agreement.sealer(label)?))
    }

    /// Seals `buf` in place (the tag is appended) and returns its message number.
    pub fn seal_in_place(&mut self, aad: &[u8], buf: &mut Vec<u8>) -> Result<u64, CryptoError> {
        let seq = self.next_seq;
        // u64::MAX itself is never used, so the counter can never wrap.
        if seq == u64::MAX {
            return Err(CryptoError::SequenceExhausted);
        }
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &nonce_for(&self.base_nonce, seq),
                aad,
                buf.as_mut_slice().into(),
            )
            .map_err(|_| CryptoError::Decrypt)?;
        buf.extend_from_slice(&tag);
        self.next_seq = seq + 1;
        Ok(seq)
    }

    /// Seals a copy of `plaintext`; returns the message number and the ciphertext.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<(u64, Vec<u8>), CryptoError> {
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        let seq = self.seal_in_place(aad, &mut buf)?;
        Ok((seq, buf))
    }

    /// The number the next sealed message will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    #[cfg(test)]
    fn jump_to(&mut self, seq: u64) {
        self.next_seq = seq;
    }
}

/// The receiving half of a session: opens numbered messages, refusing replays.
pub struct Opener {
    cipher: ChaCha20Poly1305,
    base_nonce: [u8; 12],
    window: ReplayWindow,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("newest_seq", &self.window.newest)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Accepts a session started by a [`Sealer`] to `key`'s node id.
    pub fn new(key: &NodeKey, enc: &EncapsulatedKey, label: &[u8]) -> Result<Opener, CryptoError> {
        Agreement::decapsulate(key, enc).opener(label)
    }

    /// Opens message `seq` in place (the tag is removed). Nothing changes on error.
    pub fn open_in_place(
        &mut self,
        seq: u64,
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        self.window.check(seq)?;
        let body_len = buf
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(CryptoError::Truncated {
                len: buf.len(),
                min: TAG_LEN,
            })?;
        let tag = Tag::try_from(&buf[body_len..]).map_err(|_| CryptoError::Decrypt)?;
        // ChaCha20-Poly1305 checks the tag before decrypting, so on failure
        // `buf` is left exactly as it was (a test pins this).
        self.cipher
            .decrypt_inout_detached(
                &nonce_for(&self.base_nonce, seq),
                aad,
                buf[..body_len].as_mut().into(),
                &tag,
            )
            .map_err(|_| CryptoError::Decrypt)?;
        buf.truncate(body_len);
        self.window.accept(seq);
        Ok(())
    }

    /// Opens a copy of `ciphertext` (message number `seq`).
    pub fn open(
        &mut self,
        seq: u64,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let mut buf = ciphertext.to_vec();
        self.open_in_place(seq, aad, &mut buf)?;
        Ok(buf)
    }
}

/// Sliding window over message numbers (as in IPsec/WireGuard): remembers the
/// newest number and which of the 128 before it were seen.
#[derive(Debug, Default)]
struct ReplayWindow {
    /// Whether any message was accepted yet.
    started: bool,
    newest: u64,
    /// Bit `i` set: number `newest - i` was accepted.
    bits: u128,
}

impl ReplayWindow {
    fn check(&self, seq: u64) -> Result<(), CryptoError> {
        if !self.started || seq > self.newest {
            return Ok(());
        }
        let age = self.newest - seq;
        if age >= REPLAY_WINDOW {
            return Err(CryptoError::TooOld {
                seq,
                newest: self.newest,
            });
        }
        if self.bits & (1u128 << age) != 0 {
            return Err(CryptoError::Replayed(seq));
        }
        Ok(())
    }

    fn accept(&mut self, seq: u64) {
        if !self.started {
            self.newest = seq;
            self.started = true;
            self.bits = 1;
        } else if seq > self.newest {
            let shift = seq - self.newest;
            self.bits = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.newest = seq;
        } else {
            self.bits |= 1u128 << (self.newest - seq);
        }
    }
}

/// A two-way session: one key per direction, both from one key agreement.
///
/// The initiator knows the responder's node id; the responder learns nothing
/// about the initiator from the session itself (authenticate it with a signed
/// envelope or the transport).
#[derive(Debug)]
pub struct DuplexSession {
    sealer: Sealer,
    opener: Opener,
}

impl DuplexSession {
    /// Starts a session to `responder`; send the [`EncapsulatedKey`] to it.
    pub fn initiate(responder: &NodeId) -> Result<(EncapsulatedKey, DuplexSession), CryptoError> {
        let agreement = Agreement::encapsulate(responder);
        let session = DuplexSession {
            sealer: agreement.sealer(b"duplex/i2r")?,
            opener: agreement.opener(b"duplex/r2i")?,
        };
        Ok((EncapsulatedKey(agreement.enc), session))
    }

    /// Accepts a session started by [`DuplexSession::initiate`] to `key`'s node id.
    pub fn accept(key: &NodeKey, enc: &EncapsulatedKey) -> Result<DuplexSession, CryptoError> {
        let agreement = Agreement::decapsulate(key, enc);
        Ok(DuplexSession {
            sealer: agreement.sealer(b"duplex/r2i")?,
            opener: agreement.opener(b"duplex/i2r")?,
        })
    }

    /// Seals an outgoing message; returns its number and ciphertext.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<(u64, Vec<u8>), CryptoError> {
        self.sealer.seal(aad, plaintext)
    }

    /// Opens an incoming message.
    pub fn open(
        &mut self,
        seq: u64,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.opener.open(seq, aad, ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_shot_round_trip_and_wrong_key() {
        let bob = NodeKey::generate();
        let sealed = seal(&bob.node_id(), b"aad", b"secret").unwrap();
        assert_eq!(sealed.ciphertext.len(), 6 + TAG_LEN);
        assert_eq!(open(&bob, b"aad", &sealed).unwrap(), b"secret");
        assert_eq!(
            open(&NodeKey::generate(), b"aad", &sealed),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(open(&bob, b"other", &sealed), Err(CryptoError::Decrypt));
    }

    #[test]
    fn two_seals_of_the_same_plaintext_differ() {
        let bob = NodeKey::generate().node_id();
        let a = seal(&bob, b"", b"same").unwrap();
        let b = seal(&bob, b"", b"same").unwrap();
        assert_ne!(a.enc, b.enc);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn tamper_at_every_byte_position_is_an_error() {
        let bob = NodeKey::generate();
        let bytes = seal(&bob.node_id(), b"aad", b"attack at dawn")
            .unwrap()
            .to_bytes();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x80] {
                let mut t = bytes.clone();
                t[i] ^= bit;
                let res = SealedBox::from_bytes(&t).and_then(|b| open(&bob, b"aad", &b));
                match (i, res) {
                    (0, Err(CryptoError::UnsupportedVersion(_))) => {}
                    (1.., Err(CryptoError::Decrypt | CryptoError::NonContributory)) => {}
                    (i, other) => panic!("byte {i} bit {bit:#x}: {other:?}"),
                }
            }
        }
        for len in 0..SEALED_BOX_OVERHEAD {
            assert!(matches!(
                SealedBox::from_bytes(&bytes[..len]),
                Err(CryptoError::Truncated { .. })
            ));
        }
        // Cut inside the ciphertext: still parses, but fails authentication.
        let cut = SealedBox::from_bytes(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(open(&bob, b"aad", &cut), Err(CryptoError::Decrypt));
    }

    #[test]
    fn small_order_ephemeral_is_refused() {
        let bob = NodeKey::generate();
        let sealed = SealedBox {
            enc: EncapsulatedKey([0u8; 32]),
            ciphertext: vec![0u8; 20],
        };
        assert_eq!(open(&bob, b"", &sealed), Err(CryptoError::NonContributory));
    }

    #[test]
    fn session_numbers_messages_and_refuses_replays() {
        let bob = NodeKey::generate();
        let (enc, mut sealer) = Sealer::new(&bob.node_id(), b"test").unwrap();
        let mut opener = Opener::new(&bob, &enc, b"test").unwrap();
        let msgs: Vec<_> = (0..5).map(|i| sealer.seal(b"", &[i]).unwrap()).collect();
        assert_eq!(
            msgs.iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        // Out of order is fine; the same number twice is not.
        for idx in [3usize, 0, 4, 1, 2] {
            let (seq, ct) = &msgs[idx];
            assert_eq!(opener.open(*seq, b"", ct).unwrap(), vec![idx as u8]);
        }
        assert_eq!(
            opener.open(2, b"", &msgs[2].1),
            Err(CryptoError::Replayed(2))
        );
        // A ciphertext under another number fails, leaves the buffer untouched,
        // and does not burn that number.
        let mut buf = msgs[0].1.clone();
        assert_eq!(
            opener.open_in_place(9, b"", &mut buf),
            Err(CryptoError::Decrypt)
        );
        assert_eq!(buf, msgs[0].1);
        let (seq, ct) = sealer.seal(b"", b"x").unwrap();
        assert_eq!(seq, 5);
        assert_eq!(opener.open(seq, b"", &ct).unwrap(), b"x");
        // Different labels do not interoperate.
        let mut wrong = Opener::new(&bob, &enc, b"other").unwrap();
        assert_eq!(wrong.open(0, b"", &msgs[0].1), Err(CryptoError::Decrypt));
    }

    #[test]
    fn replay_window_edges() {
        let bob = NodeKey::generate();
        let (enc, mut sealer) = Sealer::new(&bob.node_id(), b"w").unwrap();
        let mut opener = Opener::new(&bob, &enc, b"w").unwrap();
        let first = sealer.seal(b"", b"0").unwrap();
        sealer.jump_to(200);
        let late = sealer.seal(b"", b"200").unwrap();
        opener.open(late.0, b"", &late.1).unwrap();
        assert_eq!(
            opener.open(first.0, b"", &first.1),
            Err(CryptoError::TooOld {
                seq: 0,
                newest: 200
            })
        );
    }

    #[test]
    fn sealer_refuses_to_wrap() {
        let bob = NodeKey::generate();
        let (_, mut sealer) = Sealer::new(&bob.node_id(), b"w").unwrap();
        sealer.jump_to(u64::MAX - 1);
        assert_eq!(sealer.seal(b"", b"last").unwrap().0, u64::MAX - 1);
        assert_eq!(sealer.seal(b"", b"x"), Err(CryptoError::SequenceExhausted));
        assert_eq!(sealer.next_seq(), u64::MAX);
    }

    #[test]
    fn duplex_directions_use_distinct_keys() {
        let bob = NodeKey::generate();
        let (enc, mut alice_side) = DuplexSession::initiate(&bob.node_id()).unwrap();
        let mut bob_side = DuplexSession::accept(&bob, &enc).unwrap();
        let (s, c) = alice_side.seal(b"", b"ping").unwrap();
        assert_eq!(bob_side.open(s, b"", &c).unwrap(), b"ping");
        let (s2, c2) = bob_side.seal(b"", b"pong").unwrap();
        assert_eq!(s2, 0);
        assert_eq!(alice_side.open(s2, b"", &c2).unwrap(), b"pong");
        // A message reflected back to its sender does not open.
        let (s3, c3) = alice_side.seal(b"", b"mirror").unwrap();
        assert_eq!(alice_side.open(s3, b"", &c3), Err(CryptoError::Decrypt));
    }

    proptest! {
        #[test]
        fn prop_seal_open_round_trip(
            plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let bob = NodeKey::generate();
            let sealed = seal(&bob.node_id(), &aad, &plaintext).unwrap();
            let parsed = SealedBox::from_bytes(&sealed.to_bytes()).unwrap();
            prop_assert_eq!(open(&bob, &aad, &parsed).unwrap(), plaintext);
        }

        #[test]
        fn prop_tampered_box_never_opens(
            plaintext in proptest::collection::vec(any::<u8>(), 0..256),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let bob = NodeKey::generate();
            let mut bytes = seal(&bob.node_id(), b"", &plaintext).unwrap().to_bytes();
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            let res = SealedBox::from_bytes(&bytes).and_then(|b| open(&bob, b"", &b));
            prop_assert!(res.is_err());
        }
    }
}
