//! The audit ledger interface (R-LED1–2): what the runtime records, and the
//! [`Ledger`] trait that `mesh-ledger` implements.
//!
//! Every security-relevant change (approvals, rejections, unpairing,
//! revocation, token rotation, policy changes, command decisions, action
//! transitions) is appended **in the same storage batch** that commits the
//! change: [`Ledger::append`] takes the caller's own writes and commits them
//! together with the new records, so either both happen or neither does.

use std::fmt;

use crate::clock::Timestamp;
use crate::identity::NodeId;
use crate::storage::{StorageError, Write};
use crate::wire::JsonText;

/// Record types the SDK writes (R-LED2). Apps may add their own
/// (lowercase letters, digits, `.`, `_`, `-`; at most
/// [`MAX_RECORD_TYPE_LEN`] bytes).
pub mod record_types {
    /// A pairing request was approved.
    pub const PAIRING_APPROVED: &str = "pairing.approved";
    /// A pairing request was rejected.
    pub const PAIRING_REJECTED: &str = "pairing.rejected";
    /// A device was unpaired.
    pub const DEVICE_UNPAIRED: &str = "device.unpaired";
    /// A device was revoked.
    pub const DEVICE_REVOKED: &str = "device.revoked";
    /// A device's token was rotated.
    pub const TOKEN_ROTATED: &str = "device.token_rotated";
    /// A device's scopes were replaced.
    pub const SCOPES_SET: &str = "device.scopes_set";
    /// A paired device became trusted (R-PAIR8).
    pub const DEVICE_TRUSTED: &str = "device.trusted";
    /// A device's policy was set or changed.
    pub const POLICY_SET: &str = "policy.set";
    /// A command was decided (allowed, denied, needs approval, deferred).
    pub const COMMAND_DECIDED: &str = "command.decided";
    /// A device ran a command its primary sent it (recorded in the
    /// device's own ledger, which its primary replicates).
    pub const COMMAND_EXECUTED: &str = "command.executed";
    /// An action changed state.
    pub const ACTION_TRANSITION: &str = "action.transition";
    /// A peer joined the mesh.
    pub const PEER_JOINED: &str = "peer.joined";
    /// A peer was blocklisted.
    pub const PEER_BLOCKLISTED: &str = "peer.blocklisted";
    /// A signed checkpoint (tree head) of the ledger itself.
    pub const CHECKPOINT: &str = "ledger.checkpoint";
}

/// Longest record type, in bytes.
pub const MAX_RECORD_TYPE_LEN: usize = 64;
/// Largest record body, in bytes.
pub const MAX_BODY_LEN: usize = 256 * 1024;

/// A record's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Opaque bytes.
    Bytes(Vec<u8>),
    /// A JSON value.
    Json(JsonText),
}

impl Body {
    /// The body's bytes (JSON as UTF-8 text).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Json(j) => j.as_str().as_bytes(),
        }
    }
}

/// What the caller asks to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What happened (see [`record_types`]).
    pub record_type: String,
    /// Who caused it (the approving primary, the commanding worker, …).
    pub actor: NodeId,
    /// The details.
    pub body: Body,
}

impl Entry {
    /// An entry with a JSON body.
    pub fn json(record_type: &str, actor: NodeId, body: &serde_json::Value) -> Self {
        Entry {
            record_type: record_type.to_owned(),
            actor,
            // Serializing a `Value` cannot fail.
            body: Body::Json(JsonText::from_value(body).unwrap_or_else(|_| JsonText::null())),
        }
    }

    /// Checks the type (see [`validate_record_type`]) and the size limit.
    pub fn validate(&self) -> Result<(), LedgerError> {
        validate_record_type(&self.record_type)?;
        let len = self.body.as_bytes().len();
        if len > MAX_BODY_LEN {
            return Err(LedgerError::InvalidEntry(format!(
                "body of {len} bytes exceeds {MAX_BODY_LEN}"
            )));
        }
        Ok(())
    }
}

/// Checks a record type an app may append: 1 to [`MAX_RECORD_TYPE_LEN`] of
/// `a-z 0-9 . _ -`, and not [`record_types::CHECKPOINT`] (the ledger makes
/// those itself).
pub fn validate_record_type(t: &str) -> Result<(), LedgerError> {
    if t.is_empty()
        || t.len() > MAX_RECORD_TYPE_LEN
        || !t
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(LedgerError::InvalidEntry(format!(
            "record type {t:?} must be 1 to {MAX_RECORD_TYPE_LEN} of a-z 0-9 . _ -"
        )));
    }
    if t == record_types::CHECKPOINT {
        return Err(LedgerError::InvalidEntry(
            "checkpoints are made by the ledger, not appended".into(),
        ));
    }
    Ok(())
}

/// Where appended records landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number of the first new record.
    pub first_seq: u64,
    /// Records written, checkpoints made on the way included.
    pub count: u64,
}

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Reading or writing the store; nothing of the batch was written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The entry breaks a limit (type, size).
    #[error("invalid ledger entry: {0}")]
    InvalidEntry(String),
    /// The stored ledger does not verify; it is not extended.
    #[error("the stored ledger is damaged at record {seq}: {problem}")]
    Damaged {
        /// The first bad record.
        seq: u64,
        /// What is wrong with it.
        problem: String,
    },
    /// This ledger is a replica: only replication may extend it.
    #[error("this ledger is a read-only replica of {0}")]
    ReadOnly(NodeId),
}

/// An append-only, signed audit ledger.
pub trait Ledger: Send + Sync + fmt::Debug + 'static {
    /// The node whose key signs this ledger.
    fn author(&self) -> NodeId;

    /// Number of records, checkpoints included.
    fn len(&self) -> u64;

    /// Whether the ledger has no records.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `entries` (and any checkpoint that falls due) and commits them
    /// in one storage batch together with the caller's writes `with`. Either
    /// everything is durable when this returns `Ok`, or nothing was written.
    fn append(
        &self,
        entries: Vec<Entry>,
        with: Vec<Write>,
        now: Timestamp,
    ) -> Result<Appended, LedgerError>;

    /// Writes a checkpoint if the interval has passed with records not yet
    /// covered by one; returns whether it did. Call it from a timer.
    fn tick(&self, now: Timestamp) -> Result<bool, LedgerError>;
}

/// A checkpoint named in a fork report: how many records, which root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    /// Records it covers.
    pub size: u64,
    /// Their Merkle root.
    pub root: [u8; 32],
}

/// Evidence that an author signed two histories that cannot both be true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkReport {
    /// The author.
    pub author: NodeId,
    /// One signed checkpoint.
    pub first: CheckpointRef,
    /// Another, inconsistent with the first.
    pub second: CheckpointRef,
    /// Why they conflict.
    pub reason: String,
}

/// One ledger a node holds: its own, or a verified replica of another's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LedgerHolding {
    /// Whose ledger.
    pub author: NodeId,
    /// Whether it is this node's own.
    pub own: bool,
    /// Records held.
    pub records: u64,
    /// The latest checkpoint held.
    pub checkpoint: Option<CheckpointRef>,
    /// A fork found while replicating it.
    pub fork: Option<ForkReport>,
}

impl LedgerHolding {
    /// A holding.
    pub fn new(
        author: NodeId,
        own: bool,
        records: u64,
        checkpoint: Option<CheckpointRef>,
        fork: Option<ForkReport>,
    ) -> Self {
        LedgerHolding {
            author,
            own,
            records,
            checkpoint,
            fork,
        }
    }
}

/// Why replicating a ledger failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerSyncError {
    /// The author signed conflicting histories (kept as evidence).
    #[error("fork in {}'s ledger: {}", .0.author, .0.reason)]
    Fork(Box<ForkReport>),
    /// The answer does not verify, or is malformed; nothing was stored.
    #[error("invalid replication data: {0}")]
    Invalid(String),
    /// No more ledgers may be held.
    #[error("this node holds as many ledgers as it may")]
    Full,
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Replication of ledgers between nodes (R-LED5–6): implemented by
/// mesh-ledger's hub, driven by the runtime over the ledger protocol. The
/// messages are opaque bytes here; their format is the implementation's.
/// Every method may read or write storage: call them off the async
/// threads.
pub trait LedgerSync: Send + Sync + fmt::Debug + 'static {
    /// Answers an encoded request about a ledger this node holds (its own
    /// or a replica).
    fn serve(&self, request: &[u8]) -> Result<Vec<u8>, LedgerSyncError>;
    /// The encoded request for what this node lacks of `author`'s ledger
    /// (a replica is opened if there is none).
    fn request(&self, author: &NodeId) -> Result<Vec<u8>, LedgerSyncError>;
    /// Verifies an encoded answer about `author`'s ledger and stores what
    /// it brings; the number of records added.
    fn apply(&self, author: &NodeId, answer: &[u8]) -> Result<u64, LedgerSyncError>;
    /// The ledgers held.
    fn holdings(&self) -> Vec<LedgerHolding>;
    /// Covers this node's records not yet under a signed checkpoint with
    /// one now (a worker does before answering its primary, so what it
    /// wrote while away goes across at once). The default does nothing.
    fn checkpoint_own(&self) -> Result<(), LedgerSyncError> {
        Ok(())
    }
}
