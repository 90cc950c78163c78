//! Ledger records, their canonical encoding, signatures and checkpoints.
//!
//! A record is stored as its **canonical bytes** followed by an optional
//! signature. The canonical bytes are what the chain and the tree commit to:
//!
//! ```text
//! version   u8      1
//! seq       u64 BE
//! timestamp u64 BE  Unix milliseconds
//! actor     [32]    node id of who caused it
//! prev_hash [32]    leaf hash of the previous record (zeros for the first)
//! type_len  u8, type bytes (a-z 0-9 . _ -)
//! body_kind u8      0 bytes, 1 JSON
//! body_len  u32 BE, body bytes
//! ```
//!
//! then `0x00` (unsigned) or `0x01 signer[32] signature[64]`. The leaf hash
//! is `SHA-256(0x00 || canonical)` (RFC 6962), and the next record's
//! `prev_hash`; a signature is ed25519 over
//! `"mesh-ledger/record/v1\0" || leaf hash`.
//!
//! A **checkpoint** is a signed record of type `ledger.checkpoint` at
//! sequence `size` whose body is `size u64 BE || root [32]`: the tree head of
//! the `size` records before it. [`Checkpoint`] carries what is needed to
//! rebuild that record, so it verifies on its own.

use mesh_core::clock::Timestamp;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::ledger::{Body, MAX_BODY_LEN, MAX_RECORD_TYPE_LEN, record_types};
use mesh_core::wire::JsonText;
use serde::{Deserialize, Serialize};

use crate::merkle::{Hash, leaf_hash};

/// Version byte of the canonical encoding.
pub const RECORD_VERSION: u8 = 1;
/// Domain separation of record signatures.
const SIGNATURE_DOMAIN: &[u8] = b"mesh-ledger/record/v1\0";
/// Fixed part of the canonical encoding before the type bytes.
const HEAD_LEN: usize = 1 + 8 + 8 + 32 + 32 + 1;
/// Byte offsets inside the canonical encoding (for tests).
#[cfg(test)]
pub(crate) mod offsets {
    pub(crate) const SEQ: usize = 1;
    pub(crate) const PREV: usize = 1 + 8 + 8 + 32;
    pub(crate) const TYPE_LEN: usize = PREV + 32;
}
/// Length of a stored signature block after the flag byte.
const SIGNATURE_BLOCK: usize = 32 + 64;

/// A record's signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSignature {
    /// The raw 32-byte key claimed to have signed (not necessarily a valid
    /// key: verification reports it).
    pub signer: [u8; 32],
    /// ed25519 signature.
    #[serde(with = "serde_bytes_64")]
    pub signature: [u8; 64],
}

impl std::fmt::Debug for RecordSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSignature")
            .field("signer", &data_encoding::BASE32_NOPAD.encode(&self.signer))
            .finish_non_exhaustive()
    }
}

mod serde_bytes_64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(&v[..], s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let v: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        v.as_ref()
            .try_into()
            .map_err(|_| D::Error::custom("a signature is 64 bytes"))
    }
}

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a ledger record: {0}")]
pub struct RecordError(pub String);

fn bad(what: impl Into<String>) -> RecordError {
    RecordError(what.into())
}

/// One ledger record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRecord {
    /// Position in the ledger, from 0.
    pub seq: u64,
    /// When it was appended.
    pub timestamp: Timestamp,
    /// Who caused it.
    pub actor: NodeId,
    /// What happened.
    pub record_type: String,
    /// The details.
    pub body: Body,
    /// Leaf hash of the previous record; zeros for the first.
    pub prev_hash: Hash,
    /// A signature by the ledger's author (every checkpoint; every record
    /// when per-record signing is on).
    pub signature: Option<RecordSignature>,
}

/// The fields of a record as stored, borrowed: what verification needs,
/// without allocating.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub(crate) seq: u64,
    pub(crate) timestamp: u64,
    pub(crate) actor: &'a [u8; 32],
    pub(crate) prev_hash: Hash,
    pub(crate) record_type: &'a str,
    pub(crate) body_kind: u8,
    pub(crate) body: &'a [u8],
    /// The canonical bytes (what is hashed).
    pub(crate) canonical: &'a [u8],
    pub(crate) signature: Option<RecordSignature>,
}

fn valid_type(t: &[u8]) -> bool {
    !t.is_empty()
        && t.len() <= MAX_RECORD_TYPE_LEN
        && t.iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b))
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], RecordError> {
    if bytes.len() < n {
        return Err(bad(format!("truncated in {what}")));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(b);
    out
}

impl<'a> RecordView<'a> {
    /// Parses stored bytes, checking every length, the version, the type's
    /// characters and the body limit (not the actor key or JSON syntax:
    /// the hashes cover those).
    pub(crate) fn parse(stored: &'a [u8]) -> Result<Self, RecordError> {
        let mut rest = stored;
        let head = take(&mut rest, HEAD_LEN, "the header")?;
        if head[0] != RECORD_VERSION {
            return Err(bad(format!("unknown version {}", head[0])));
        }
        let seq = u64::from_be_bytes(array(&head[1..9]));
        let timestamp = u64::from_be_bytes(array(&head[9..17]));
        let actor: &[u8; 32] = head[17..49].try_into().map_err(|_| bad("actor"))?;
        let prev_hash = array(&head[49..81]);
        let type_len = head[81] as usize;
        let record_type = take(&mut rest, type_len, "the type")?;
        if !valid_type(record_type) {
            return Err(bad("record type has invalid characters or length"));
        }
        let record_type = std::str::from_utf8(record_type).map_err(|_| bad("record type"))?;
        let kind = take(&mut rest, 1, "the body kind")?[0];
        if kind > 1 {
            return Err(bad(format!("unknown body kind {kind}")));
        }
        let len = u32::from_be_bytes(array(take(&mut rest, 4, "the body length")?)) as usize;
        if len > MAX_BODY_LEN {
            return Err(bad(format!("body of {len} bytes exceeds {MAX_BODY_LEN}")));
        }
        let body = take(&mut rest, len, "the body")?;
        let canonical = &stored[..stored.len() - rest.len()];
        let flag = take(&mut rest, 1, "the signature flag")?[0];
        let signature = match flag {
            0 => None,
            1 => {
                let block = take(&mut rest, SIGNATURE_BLOCK, "the signature")?;
                Some(RecordSignature {
                    signer: array(&block[..32]),
                    signature: array(&block[32..]),
                })
            }
            other => return Err(bad(format!("unknown signature flag {other}"))),
        };
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        Ok(RecordView {
            seq,
            timestamp,
            actor,
            prev_hash,
            record_type,
            body_kind: kind,
            body,
            canonical,
            signature,
        })
    }

    pub(crate) fn leaf_hash(&self) -> Hash {
        leaf_hash(self.canonical)
    }

    /// Whether the signature is by `author` and matches the content.
    pub(crate) fn signature_status(&self, author: &NodeId, leaf: &Hash) -> SignatureStatus {
        match &self.signature {
            None => SignatureStatus::Unsigned,
            Some(sig) if sig.signer != *author.as_bytes() => SignatureStatus::Foreign(sig.signer),
            Some(sig) => {
                if author.verify(&signed_message(leaf), &sig.signature).is_ok() {
                    SignatureStatus::Valid
                } else {
                    SignatureStatus::Invalid
                }
            }
        }
    }

    pub(crate) fn is_checkpoint(&self) -> bool {
        self.record_type == record_types::CHECKPOINT
    }

    /// The full record, with the actor key and JSON syntax checked.
    pub(crate) fn to_record(self) -> Result<LedgerRecord, RecordError> {
        let actor = NodeId::from_bytes(self.actor).map_err(|e| bad(format!("actor: {e}")))?;
        let body = match self.body_kind {
            0 => Body::Bytes(self.body.to_vec()),
            _ => {
                let text =
                    std::str::from_utf8(self.body).map_err(|_| bad("JSON body is not UTF-8"))?;
                Body::Json(JsonText::new(text).map_err(|e| bad(format!("JSON body: {e}")))?)
            }
        };
        Ok(LedgerRecord {
            seq: self.seq,
            timestamp: Timestamp::from_millis(self.timestamp),
            actor,
            record_type: self.record_type.to_owned(),
            body,
            prev_hash: self.prev_hash,
            signature: self.signature,
        })
    }
}

/// What a record's signature says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignatureStatus {
    Unsigned,
    Valid,
    Invalid,
    Foreign([u8; 32]),
}

pub(crate) fn signed_message(leaf: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 32);
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.extend_from_slice(leaf);
    m
}

impl LedgerRecord {
    /// The canonical bytes (what is hashed and signed).
    pub fn canonical(&self) -> Vec<u8> {
        self.canonical_with_room(0)
    }

    fn canonical_with_room(&self, extra: usize) -> Vec<u8> {
        let body = self.body.as_bytes();
        let mut out =
            Vec::with_capacity(HEAD_LEN + self.record_type.len() + 5 + body.len() + extra);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.timestamp.as_millis().to_be_bytes());
        out.extend_from_slice(self.actor.as_bytes());
        out.extend_from_slice(&self.prev_hash);
        // Entry::validate keeps the type within 64 bytes and the body within
        // MAX_BODY_LEN, so both lengths fit.
        out.push(self.record_type.len() as u8);
        out.extend_from_slice(self.record_type.as_bytes());
        out.push(match self.body {
            Body::Bytes(_) => 0,
            Body::Json(_) => 1,
        });
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Signs with `key` (if given) and returns the stored form and the leaf
    /// hash, encoding the record once.
    pub(crate) fn seal(&mut self, key: Option<&NodeKey>) -> (Vec<u8>, Hash) {
        let mut stored = self.canonical_with_room(1 + SIGNATURE_BLOCK);
        let leaf = leaf_hash(&stored);
        if let Some(key) = key {
            self.signature = Some(RecordSignature {
                signer: *key.node_id().as_bytes(),
                signature: key.sign(&signed_message(&leaf)),
            });
        }
        self.push_signature(&mut stored);
        (stored, leaf)
    }

    /// `SHA-256(0x00 || canonical)`: the record's leaf in the tree and the
    /// next record's `prev_hash`.
    pub fn leaf_hash(&self) -> Hash {
        leaf_hash(&self.canonical())
    }

    /// Signs the record with `key` (its author).
    pub fn sign(&mut self, key: &NodeKey) {
        let leaf = self.leaf_hash();
        self.signature = Some(RecordSignature {
            signer: *key.node_id().as_bytes(),
            signature: key.sign(&signed_message(&leaf)),
        });
    }

    /// The stored form: canonical bytes, then the signature block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.canonical_with_room(1 + SIGNATURE_BLOCK);
        self.push_signature(&mut out);
        out
    }

    /// Appends the signature block (`0x00`, or `0x01 signer signature`).
    fn push_signature(&self, out: &mut Vec<u8>) {
        match &self.signature {
            None => out.push(0),
            Some(sig) => {
                out.push(1);
                out.extend_from_slice(&sig.signer);
                out.extend_from_slice(&sig.signature);
            }
        }
    }

    /// Parses the stored form, checking everything including the actor key
    /// and JSON syntax.
    pub fn decode(stored: &[u8]) -> Result<Self, RecordError> {
        RecordView::parse(stored)?.to_record()
    }
}

/// A signed tree head: the root of the first `size` records, signed by the
/// ledger's author as the checkpoint record at sequence `size`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The ledger's author.
    pub author: NodeId,
    /// Records covered.
    pub size: u64,
    /// Their Merkle root.
    pub root: Hash,
    /// When it was made.
    pub timestamp: Timestamp,
    /// Leaf hash of record `size - 1` (zeros when `size` is 0).
    pub prev_hash: Hash,
    /// The author's signature of the checkpoint record.
    #[serde(with = "serde_bytes_64")]
    pub signature: [u8; 64],
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("author", &self.author)
            .field("size", &self.size)
            .field("root", &data_encoding::HEXLOWER.encode(&self.root))
            .field("timestamp", &self.timestamp)
            .finish_non_exhaustive()
    }
}

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Signed by someone other than the expected author.
    #[error("checkpoint is by {found}, expected {expected}")]
    WrongAuthor {
        /// Expected.
        expected: NodeId,
        /// Found.
        found: NodeId,
    },
    /// The signature does not match.
    #[error("checkpoint signature does not verify")]
    BadSignature,
    /// A record that is not a well-formed checkpoint.
    #[error("not a checkpoint record: {0}")]
    NotACheckpoint(String),
}

/// Body of a checkpoint record.
fn checkpoint_body(size: u64, root: &Hash) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(root);
    b
}

impl Checkpoint {
    /// Makes and signs the checkpoint record for the first `size` records.
    pub(crate) fn make(
        key: &NodeKey,
        size: u64,
        root: Hash,
        prev_hash: Hash,
        timestamp: Timestamp,
    ) -> (Checkpoint, LedgerRecord) {
        let mut record = LedgerRecord {
            seq: size,
            timestamp,
            actor: key.node_id(),
            record_type: record_types::CHECKPOINT.to_owned(),
            body: Body::Bytes(checkpoint_body(size, &root)),
            prev_hash,
            signature: None,
        };
        record.sign(key);
        let signature = record.signature.map(|s| s.signature).unwrap_or([0; 64]);
        let cp = Checkpoint {
            author: key.node_id(),
            size,
            root,
            timestamp,
            prev_hash,
            signature,
        };
        (cp, record)
    }

    /// The checkpoint record this checkpoint stands for.
    pub fn to_record(&self) -> LedgerRecord {
        LedgerRecord {
            seq: self.size,
            timestamp: self.timestamp,
            actor: self.author,
            record_type: record_types::CHECKPOINT.to_owned(),
            body: Body::Bytes(checkpoint_body(self.size, &self.root)),
            prev_hash: self.prev_hash,
            signature: Some(RecordSignature {
                signer: *self.author.as_bytes(),
                signature: self.signature,
            }),
        }
    }

    /// Reads a checkpoint record.
    pub fn from_record(record: &LedgerRecord) -> Result<Checkpoint, CheckpointError> {
        let not = |why: &str| CheckpointError::NotACheckpoint(why.to_owned());
        if record.record_type != record_types::CHECKPOINT {
            return Err(not("wrong record type"));
        }
        let Body::Bytes(body) = &record.body else {
            return Err(not("JSON body"));
        };
        if body.len() != 40 {
            return Err(not("body is not size and root"));
        }
        let size = u64::from_be_bytes(array(&body[..8]));
        if size != record.seq {
            return Err(not("size does not match the record's position"));
        }
        let sig = record.signature.ok_or_else(|| not("unsigned"))?;
        let author =
            NodeId::from_bytes(&sig.signer).map_err(|_| not("signer is not a valid key"))?;
        if author != record.actor {
            return Err(not("signed by someone other than its actor"));
        }
        Ok(Checkpoint {
            author,
            size,
            root: array(&body[8..]),
            timestamp: record.timestamp,
            prev_hash: record.prev_hash,
            signature: sig.signature,
        })
    }

    /// Checks the signature, and that `author` made it.
    pub fn verify(&self, author: &NodeId) -> Result<(), CheckpointError> {
        if self.author != *author {
            return Err(CheckpointError::WrongAuthor {
                expected: *author,
                found: self.author,
            });
        }
        let leaf = self.to_record().leaf_hash();
        author
            .verify(&signed_message(&leaf), &self.signature)
            .map_err(|_| CheckpointError::BadSignature)
    }

    /// The leaf hash of the checkpoint record itself.
    pub fn record_leaf(&self) -> Hash {
        self.to_record().leaf_hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> NodeKey {
        NodeKey::from_secret_bytes(&[seed; 32])
    }

    fn record() -> LedgerRecord {
        LedgerRecord {
            seq: 7,
            timestamp: Timestamp::from_millis(1_700_000_000_000),
            actor: key(2).node_id(),
            record_type: "pairing.approved".into(),
            body: Body::Json(JsonText::new(r#"{"device":"laptop"}"#).unwrap()),
            prev_hash: [9; 32],
            signature: None,
        }
    }

    #[test]
    fn records_round_trip_signed_and_unsigned() {
        let mut r = record();
        assert_eq!(LedgerRecord::decode(&r.encode()).unwrap(), r);
        r.sign(&key(1));
        let stored = r.encode();
        let back = LedgerRecord::decode(&stored).unwrap();
        assert_eq!(back, r);
        let view = RecordView::parse(&stored).unwrap();
        assert_eq!(view.leaf_hash(), r.leaf_hash());
        assert_eq!(
            view.signature_status(&key(1).node_id(), &r.leaf_hash()),
            SignatureStatus::Valid
        );
        assert!(matches!(
            view.signature_status(&key(3).node_id(), &r.leaf_hash()),
            SignatureStatus::Foreign(_)
        ));
        assert_eq!(view.seq, 7);
        assert_eq!(&stored[offsets::PREV..offsets::PREV + 32], &[9; 32]);
        assert_eq!(stored[offsets::TYPE_LEN] as usize, "pairing.approved".len());
        assert_eq!(&stored[offsets::SEQ..offsets::SEQ + 8], &7u64.to_be_bytes());
    }

    #[test]
    fn malformed_bytes_get_typed_errors() {
        let stored = record().encode();
        for cut in 0..stored.len() {
            assert!(LedgerRecord::decode(&stored[..cut]).is_err(), "{cut}");
        }
        let mut extra = stored.clone();
        extra.push(0);
        assert!(LedgerRecord::decode(&extra).is_err());
        let mut version = stored.clone();
        version[0] = 2;
        assert!(LedgerRecord::decode(&version).is_err());
        let mut json = record();
        json.body = Body::Bytes(b"{not json".to_vec());
        let mut bytes = json.encode();
        // Flip the body kind to JSON.
        let kind_at = offsets::TYPE_LEN + 1 + json.record_type.len();
        bytes[kind_at] = 1;
        assert!(LedgerRecord::decode(&bytes).is_err());
    }

    #[test]
    fn checkpoints_verify_alone_and_refuse_other_authors_and_edits() {
        let k = key(1);
        let (cp, record) = Checkpoint::make(&k, 10, [4; 32], [5; 32], Timestamp::from_millis(99));
        cp.verify(&k.node_id()).unwrap();
        assert_eq!(cp.to_record(), record);
        assert_eq!(Checkpoint::from_record(&record).unwrap(), cp);
        assert!(matches!(
            cp.verify(&key(2).node_id()),
            Err(CheckpointError::WrongAuthor { .. })
        ));
        let mut edited = cp.clone();
        edited.root[0] ^= 1;
        assert_eq!(
            edited.verify(&k.node_id()),
            Err(CheckpointError::BadSignature)
        );
        let mut moved = cp.clone();
        moved.prev_hash[3] ^= 1;
        assert_eq!(
            moved.verify(&k.node_id()),
            Err(CheckpointError::BadSignature)
        );
        // Another author's correctly signed checkpoint is still not ours.
        let (theirs, _) =
            Checkpoint::make(&key(2), 10, [4; 32], [5; 32], Timestamp::from_millis(99));
        assert!(theirs.verify(&key(2).node_id()).is_ok());
        assert!(theirs.verify(&k.node_id()).is_err());
    }
}
