//! The ledger itself: [`SignedLedger`] (a node's own ledger, which it
//! appends to and signs) and [`Replica`] (a verified copy of another node's
//! ledger, extended only by replication), both readable through
//! [`LedgerView`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mesh_core::clock::Timestamp;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::ledger::{Appended, Entry, Ledger, LedgerError};
use mesh_core::storage::{Storage, StorageError, Table, Write};

use crate::merkle::{Hash, ProofError, verify_consistency, verify_inclusion};
use crate::record::{Checkpoint, CheckpointError, LedgerRecord, RecordView, SignatureStatus};
use crate::verify::{Verified, Verifier, read_records};

/// When checkpoints are made, and whether every record is signed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LedgerConfig {
    /// A checkpoint after this many records. Default 1024.
    pub checkpoint_every: u64,
    /// A checkpoint once the oldest record not covered by one is this old
    /// (checked on append and by [`Ledger::tick`]). Default 60 s.
    pub checkpoint_interval_ms: u64,
    /// Sign every record, not only checkpoints (a receipt per record, at
    /// ~15 µs each). Default off.
    pub sign_records: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            checkpoint_every: 1024,
            checkpoint_interval_ms: 60_000,
            sign_records: false,
        }
    }
}

impl LedgerConfig {
    /// Checkpoints every `records` records (at least 1).
    pub fn checkpoint_every(mut self, records: u64) -> Self {
        self.checkpoint_every = records.max(1);
        self
    }

    /// Checkpoints once uncovered records are `ms` old.
    pub fn checkpoint_interval_ms(mut self, ms: u64) -> Self {
        self.checkpoint_interval_ms = ms;
        self
    }

    /// Signs every record.
    pub fn sign_records(mut self, on: bool) -> Self {
        self.sign_records = on;
        self
    }
}

/// An inclusion proof: record `index` is in the tree of `size` records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InclusionProof {
    /// The record's position.
    pub index: u64,
    /// The tree size (a checkpoint's).
    pub size: u64,
    /// The audit path.
    pub path: Vec<Hash>,
}

/// A consistency proof between two tree sizes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsistencyProof {
    /// The earlier size.
    pub old_size: u64,
    /// The later size.
    pub new_size: u64,
    /// The proof.
    pub path: Vec<Hash>,
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofCheckError {
    /// The checkpoint itself does not verify.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The proof is for another tree size than the checkpoint's.
    #[error("the proof is for {proof} records, the checkpoint covers {checkpoint}")]
    SizeMismatch {
        /// Size in the proof.
        proof: u64,
        /// Size in the checkpoint.
        checkpoint: u64,
    },
    /// The hashes do not lead to the checkpoint's root.
    #[error("the proof does not lead to the checkpoint's root")]
    Mismatch,
}

/// Checks that `record` is in the ledger `checkpoint` (by `author`) covers.
/// Needs nothing but the three.
pub fn verify_record_inclusion(
    record: &LedgerRecord,
    proof: &InclusionProof,
    checkpoint: &Checkpoint,
    author: &NodeId,
) -> Result<(), ProofCheckError> {
    checkpoint.verify(author)?;
    verify_leaf_inclusion(&record.leaf_hash(), record.seq, proof, checkpoint)
}

/// Checks an inclusion proof for a leaf hash against a checkpoint's root
/// (the checkpoint's signature is the caller's to check).
pub fn verify_leaf_inclusion(
    leaf: &Hash,
    index: u64,
    proof: &InclusionProof,
    checkpoint: &Checkpoint,
) -> Result<(), ProofCheckError> {
    if proof.size != checkpoint.size || proof.index != index {
        return Err(ProofCheckError::SizeMismatch {
            proof: proof.size,
            checkpoint: checkpoint.size,
        });
    }
    if verify_inclusion(leaf, index, proof.size, &proof.path, &checkpoint.root) {
        Ok(())
    } else {
        Err(ProofCheckError::Mismatch)
    }
}

/// Checks that `new` extends `old` (both signed by `author`).
pub fn verify_checkpoint_consistency(
    old: &Checkpoint,
    new: &Checkpoint,
    proof: &ConsistencyProof,
    author: &NodeId,
) -> Result<(), ProofCheckError> {
    old.verify(author)?;
    new.verify(author)?;
    if proof.old_size != old.size || proof.new_size != new.size {
        return Err(ProofCheckError::SizeMismatch {
            proof: proof.new_size,
            checkpoint: new.size,
        });
    }
    if verify_consistency(old.size, &old.root, new.size, &new.root, &proof.path) {
        Ok(())
    } else {
        Err(ProofCheckError::Mismatch)
    }
}

/// The in-memory state of a verified ledger.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) v: Verified,
    /// Batches submitted to storage and not yet known to be committed, in
    /// submission order, each with the state to go back to if it fails.
    inflight: VecDeque<InFlight>,
    next_ticket: u64,
    /// Records and checkpoints known to be durable. Readers (lengths,
    /// checkpoints, proofs, replication answers) see only these: a batch
    /// still being flushed may yet fail and be taken back, and a checkpoint
    /// handed out before that would look like a fork later.
    committed_len: u64,
    committed_checkpoints: usize,
}

/// A batch on its way to storage.
#[derive(Debug)]
struct InFlight {
    ticket: u64,
    /// The state before it, to go back to if it fails.
    mark: Mark,
    /// Where it ends: records and checkpoints with it.
    end_len: u64,
    end_checkpoints: usize,
}

impl State {
    /// Every record built, including those of batches still in flight (the
    /// next record's sequence number).
    pub(crate) fn len(&self) -> u64 {
        self.v.tree.len()
    }

    /// The latest checkpoint built (possibly in flight).
    pub(crate) fn latest(&self) -> Option<&Checkpoint> {
        self.v.checkpoints.last()
    }

    /// Records known durable.
    pub(crate) fn committed_len(&self) -> u64 {
        self.committed_len.min(self.len())
    }

    /// Checkpoints known durable, oldest first.
    pub(crate) fn committed_checkpoints(&self) -> &[Checkpoint] {
        let n = self.committed_checkpoints.min(self.v.checkpoints.len());
        &self.v.checkpoints[..n]
    }

    /// Everything built so far is durable (after a synchronous write).
    fn all_committed(&mut self) {
        self.committed_len = self.len();
        self.committed_checkpoints = self.v.checkpoints.len();
    }

    /// A size a reader may ask about.
    fn readable(&self, size: u64) -> Result<(), ProofError> {
        let len = self.committed_len();
        if size > len {
            Err(ProofError::SizeOutOfRange { size, len })
        } else {
            Ok(())
        }
    }
}

/// Read access to a ledger (own or replica): records, checkpoints, proofs.
pub struct LedgerView {
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) author: NodeId,
    /// `"{author}/"`: the start of every record key.
    key_prefix: String,
    pub(crate) state: Mutex<State>,
}

impl fmt::Debug for LedgerView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerView")
            .field("author", &self.author)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl LedgerView {
    /// Opens `author`'s ledger in `store`, verifying it from the start.
    pub(crate) fn open(store: Arc<dyn Storage>, author: NodeId) -> Result<Self, LedgerError> {
        let (report, verified) = Verifier::new(store.as_ref(), author).run(None)?;
        if let (Some(seq), Some(problem)) = (report.first_bad, report.problem) {
            return Err(LedgerError::Damaged {
                seq,
                problem: problem.to_string(),
            });
        }
        Ok(LedgerView {
            store,
            author,
            key_prefix: format!("{author}/"),
            state: Mutex::new({
                let mut st = State {
                    v: verified,
                    inflight: VecDeque::new(),
                    next_ticket: 0,
                    committed_len: 0,
                    committed_checkpoints: 0,
                };
                st.all_committed();
                st
            }),
        })
    }

    /// The storage key of record `seq` (see `verify::record_key`).
    pub(crate) fn key(&self, seq: u64) -> String {
        use std::fmt::Write as _;
        let mut key = String::with_capacity(self.key_prefix.len() + 20);
        key.push_str(&self.key_prefix);
        let _ = write!(key, "{seq:020}");
        key
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ledger's author.
    pub fn author(&self) -> NodeId {
        self.author
    }

    /// Records held durably, checkpoints included (a batch still being
    /// flushed counts once it is committed).
    pub fn len(&self) -> u64 {
        self.lock().committed_len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The latest checkpoint.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.lock().committed_checkpoints().last().cloned()
    }

    /// Every checkpoint, oldest first.
    pub fn checkpoints(&self) -> Vec<Checkpoint> {
        self.lock().committed_checkpoints().to_vec()
    }

    /// The Merkle root of the first `size` records.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        let st = self.lock();
        st.readable(size)?;
        st.v.tree.root_at(size)
    }

    /// One record.
    pub fn record(&self, seq: u64) -> Result<Option<LedgerRecord>, LedgerError> {
        Ok(self.records(seq, 1)?.into_iter().next())
    }

    /// Up to `limit` records from `from` on.
    pub fn records(&self, from: u64, limit: usize) -> Result<Vec<LedgerRecord>, LedgerError> {
        read_records(self.store.as_ref(), &self.author, from, limit)?
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.map_err(|problem| LedgerError::Damaged {
                    seq: from + i as u64,
                    problem,
                })
            })
            .collect()
    }

    /// Proof that record `index` is among the first `size` records.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<InclusionProof, ProofError> {
        let path = {
            let st = self.lock();
            st.readable(size)?;
            st.v.tree.inclusion_proof(index, size)?
        };
        Ok(InclusionProof { index, size, path })
    }

    /// Proof that the first `old_size` records are a prefix of the first
    /// `new_size`.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<ConsistencyProof, ProofError> {
        let path = {
            let st = self.lock();
            st.readable(new_size)?;
            st.v.tree.consistency_proof(old_size, new_size)?
        };
        Ok(ConsistencyProof {
            old_size,
            new_size,
            path,
        })
    }
}

/// A node's own ledger: appends, signs checkpoints (and records, if asked),
/// persists through [`Storage`] in the caller's batch.
pub struct SignedLedger {
    view: LedgerView,
    key: Arc<NodeKey>,
    config: LedgerConfig,
}

impl fmt::Debug for SignedLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedLedger")
            .field("author", &self.view.author)
            .field("len", &self.view.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SignedLedger {
    /// Opens (or starts) the ledger of `key`'s node in `store`, verifying
    /// what is there; a damaged ledger is refused with
    /// [`LedgerError::Damaged`] rather than extended.
    pub fn open(
        store: Arc<dyn Storage>,
        key: Arc<NodeKey>,
        config: LedgerConfig,
    ) -> Result<Self, LedgerError> {
        let view = LedgerView::open(store, key.node_id())?;
        Ok(SignedLedger { view, key, config })
    }

    /// Read access: records, checkpoints, proofs.
    pub fn view(&self) -> &LedgerView {
        &self.view
    }

    /// Makes a checkpoint now if any record is not covered by one; returns
    /// the latest checkpoint (`None` only for an empty ledger).
    pub fn checkpoint(&self, now: Timestamp) -> Result<Option<Checkpoint>, LedgerError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut st = self.view.lock();
            if !(st.v.uncovered > 0 || (st.latest().is_none() && st.len() > 0)) {
                // Nothing new to cover; what readers may see.
                return Ok(st.committed_checkpoints().last().cloned());
            }
            let mut writes = Vec::new();
            let mark = Mark::of(&st);
            let len_before = st.len();
            self.push_checkpoint(&mut st, now, &mut writes);
            let cp = st.latest().cloned();
            match self.commit(st, mark, writes) {
                Ok(()) => return Ok(cp),
                // The batch under it failed: build it again on what is left.
                Err(e) if tries < MAX_CHAIN_RETRIES && self.chain_broken(&e, len_before) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Hands a batch built under the lock to storage, releases the lock and
    /// waits for the commit — so appends from many threads pipeline: while
    /// one batch is being flushed the next ones are already built and
    /// queued, and the storage writer commits them together.
    ///
    /// The batch requires the record before its first one
    /// ([`Write::Require`]): if the batch that wrote that record fails, this
    /// one fails too instead of leaving a gap in the chain. A failed batch
    /// takes the in-memory state back to where it was before it (dropping
    /// the later batches built on it, which fail as well).
    fn commit(
        &self,
        mut st: MutexGuard<'_, State>,
        mark: Mark,
        mut writes: Vec<Write>,
    ) -> Result<(), StorageError> {
        if mark.len > 0 {
            writes.push(Write::Require {
                table: Table::LedgerRecords,
                key: self.view.key(mark.len - 1),
            });
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let start_len = mark.len;
        let pending = self.view.store.submit(writes);
        let (end_len, end_checkpoints) = (st.len(), st.v.checkpoints.len());
        st.inflight.push_back(InFlight {
            ticket,
            mark,
            end_len,
            end_checkpoints,
        });
        drop(st);

        let outcome = pending.wait();
        let mut st = self.view.lock();
        match &outcome {
            Ok(()) => {
                // Storage commits in submission order: everything before
                // this batch is settled too, and durable up to its end.
                while let Some(front) = st.inflight.front() {
                    let (t, end_len, end_checkpoints) =
                        (front.ticket, front.end_len, front.end_checkpoints);
                    if t > ticket {
                        break;
                    }
                    if t == ticket {
                        st.committed_len = end_len;
                        st.committed_checkpoints = end_checkpoints;
                    }
                    st.inflight.pop_front();
                }
            }
            Err(e) => {
                // Failed because the record it chained on is missing: the
                // batch that wrote that record failed, whether or not its
                // own thread has woken to say so. The state goes back to
                // before that batch now; otherwise this batch, built again
                // at once, would chain on the failed records once more.
                let chained_on = self
                    .chain_broken(e, start_len)
                    .then(|| {
                        st.inflight
                            .iter()
                            .position(|f| f.mark.len < start_len && start_len <= f.end_len)
                    })
                    .flatten();
                let cut =
                    chained_on.or_else(|| st.inflight.iter().position(|f| f.ticket == ticket));
                if let Some(pos) = cut {
                    let mut dropped = st.inflight.split_off(pos);
                    if let Some(failed) = dropped.pop_front() {
                        failed.mark.restore(&mut st);
                    }
                }
                // Otherwise an earlier failed batch has already taken the
                // state back past this one.
            }
        }
        outcome
    }

    /// Whether `e` says only that the record this batch chained on is gone
    /// (an earlier batch failed), so the same entries may be appended again.
    fn chain_broken(&self, e: &StorageError, len_before: u64) -> bool {
        matches!(e, StorageError::Missing { table: Table::LedgerRecords, key }
            if len_before > 0 && *key == self.view.key(len_before - 1))
    }

    fn push(&self, st: &mut State, mut record: LedgerRecord, writes: &mut Vec<Write>) {
        // Checkpoint records arrive signed (Checkpoint::make).
        let sign = record.signature.is_none() && self.config.sign_records;
        let (stored, leaf) = record.seal(sign.then_some(&*self.key));
        writes.push(Write::Insert {
            table: Table::LedgerRecords,
            key: self.view.key(record.seq),
            body: stored,
        });
        st.v.tree.push(leaf);
        st.v.last_hash = leaf;
    }

    fn push_checkpoint(&self, st: &mut State, now: Timestamp, writes: &mut Vec<Write>) {
        let size = st.len();
        let root = st.v.tree.root();
        let (cp, record) = Checkpoint::make(&self.key, size, root, st.v.last_hash, now);
        self.push(st, record, writes);
        st.v.checkpoints.push(cp);
        st.v.uncovered = 0;
        st.v.first_uncovered_at = None;
    }

    fn due(&self, st: &State, now: Timestamp) -> bool {
        st.v.uncovered > 0
            && st.v.first_uncovered_at.is_some_and(|t| {
                now.as_millis().saturating_sub(t.as_millis()) >= self.config.checkpoint_interval_ms
            })
    }
}

/// What to restore if a batch fails.
#[derive(Debug)]
struct Mark {
    len: u64,
    last_hash: Hash,
    checkpoints: usize,
    uncovered: u64,
    first_uncovered_at: Option<Timestamp>,
}

impl Mark {
    fn of(st: &State) -> Mark {
        Mark {
            len: st.len(),
            last_hash: st.v.last_hash,
            checkpoints: st.v.checkpoints.len(),
            uncovered: st.v.uncovered,
            first_uncovered_at: st.v.first_uncovered_at,
        }
    }

    fn restore(self, st: &mut State) {
        st.v.tree.truncate(self.len);
        st.v.last_hash = self.last_hash;
        st.v.checkpoints.truncate(self.checkpoints);
        st.v.uncovered = self.uncovered;
        st.v.first_uncovered_at = self.first_uncovered_at;
    }
}

impl Ledger for SignedLedger {
    fn author(&self) -> NodeId {
        self.view.author
    }

    fn len(&self) -> u64 {
        self.view.len()
    }

    fn append(
        &self,
        mut entries: Vec<Entry>,
        mut with: Vec<Write>,
        now: Timestamp,
    ) -> Result<Appended, LedgerError> {
        for e in &entries {
            e.validate()?;
        }
        // A batch that fails only because an earlier, concurrent batch it
        // was chained on failed is built again on the restored state.
        let mut tries = 0;
        loop {
            tries += 1;
            let last_try = tries >= MAX_CHAIN_RETRIES;
            let (entries, with) = if last_try {
                (std::mem::take(&mut entries), std::mem::take(&mut with))
            } else {
                (entries.clone(), with.clone())
            };
            match self.append_once(entries, with, now) {
                Err((e, len_before)) if !last_try && self.chain_broken(&e, len_before) => continue,
                Err((e, _)) => return Err(e.into()),
                Ok(appended) => return Ok(appended),
            }
        }
    }

    fn tick(&self, now: Timestamp) -> Result<bool, LedgerError> {
        let due = self.due(&self.view.lock(), now);
        if due {
            self.checkpoint(now)?;
        }
        Ok(due)
    }
}

/// How many times an append is built again after the batch it chained on
/// failed (each retry needs another concurrent batch to have failed).
const MAX_CHAIN_RETRIES: u32 = 8;

impl SignedLedger {
    /// One attempt of [`Ledger::append`]; the error comes with the length
    /// the batch was built on.
    fn append_once(
        &self,
        entries: Vec<Entry>,
        with: Vec<Write>,
        now: Timestamp,
    ) -> Result<Appended, (StorageError, u64)> {
        let mut st = self.view.lock();
        let mark = Mark::of(&st);
        let first_seq = st.len();
        let mut writes = with;
        writes.reserve(entries.len() + entries.len() / 64 + 1);
        for e in entries {
            let record = LedgerRecord {
                seq: st.len(),
                timestamp: now,
                actor: e.actor,
                record_type: e.record_type,
                body: e.body,
                prev_hash: st.v.last_hash,
                signature: None,
            };
            self.push(&mut st, record, &mut writes);
            st.v.uncovered += 1;
            st.v.first_uncovered_at.get_or_insert(now);
            if st.v.uncovered >= self.config.checkpoint_every {
                self.push_checkpoint(&mut st, now, &mut writes);
            }
        }
        if self.due(&st, now) {
            self.push_checkpoint(&mut st, now, &mut writes);
        }
        let appended = Appended {
            first_seq,
            count: st.len() - first_seq,
        };
        self.commit(st, mark, writes).map_err(|e| (e, first_seq))?;
        Ok(appended)
    }
}

/// Evidence that an author signed two histories that cannot both be true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkEvidence {
    /// One signed checkpoint.
    pub first: Checkpoint,
    /// Another, by the same author, inconsistent with the first.
    pub second: Checkpoint,
    /// Why they conflict.
    pub reason: String,
}

impl fmt::Display for ForkEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: checkpoint of {} records (root {}) and checkpoint of {} records (root {})",
            self.reason,
            self.first.size,
            data_encoding::HEXLOWER.encode(&self.first.root),
            self.second.size,
            data_encoding::HEXLOWER.encode(&self.second.root)
        )
    }
}

/// Replication errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The author signed conflicting histories.
    #[error("fork detected: {0}")]
    Fork(Box<ForkEvidence>),
    /// The peer's answer does not verify (bad signature, records that do not
    /// match the checkpoint, malformed data); nothing was stored.
    #[error("invalid replication data: {0}")]
    Invalid(String),
    /// The answer concerns another ledger.
    #[error("the answer is about {found}'s ledger, not {expected}'s")]
    WrongLedger {
        /// Asked for.
        expected: NodeId,
        /// Received.
        found: NodeId,
    },
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(String),
}

impl From<StorageError> for ReplicationError {
    fn from(e: StorageError) -> Self {
        ReplicationError::Ledger(e.into())
    }
}

/// A verified copy of another node's ledger.
pub struct Replica {
    view: LedgerView,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("author", &self.view.author)
            .field("len", &self.view.len())
            .finish()
    }
}

impl Replica {
    /// Opens the replica of `author`'s ledger in `store`, verifying what is
    /// there.
    pub fn open(store: Arc<dyn Storage>, author: NodeId) -> Result<Self, LedgerError> {
        Ok(Replica {
            view: LedgerView::open(store, author)?,
        })
    }

    /// Read access.
    pub fn view(&self) -> &LedgerView {
        &self.view
    }

    /// What to ask the author (or any holder) for.
    pub fn request(&self) -> crate::sync::SyncRequest {
        let st = self.view.lock();
        crate::sync::SyncRequest {
            author: self.view.author,
            from: st.len(),
            known: st.latest().cloned(),
        }
    }

    /// Verifies an answer and appends what it brings; returns the number of
    /// records added. Nothing is stored unless everything verifies.
    pub fn apply(&self, answer: crate::sync::SyncResponse) -> Result<u64, ReplicationError> {
        let author = self.view.author;
        let Some(cp) = answer.checkpoint else {
            return Ok(0);
        };
        if cp.author != author {
            return Err(ReplicationError::WrongLedger {
                expected: author,
                found: cp.author,
            });
        }
        cp.verify(&author)
            .map_err(|e| ReplicationError::Invalid(format!("checkpoint: {e}")))?;
        let mut st = self.view.lock();
        let fork = |first: &Checkpoint, second: &Checkpoint, reason: &str| {
            ReplicationError::Fork(Box::new(ForkEvidence {
                first: first.clone(),
                second: second.clone(),
                reason: reason.to_owned(),
            }))
        };
        // Compare with every checkpoint we hold of that size or below.
        if let Some(mine) = st.v.checkpoints.iter().find(|c| c.size == cp.size) {
            if mine.root != cp.root {
                return Err(fork(
                    mine,
                    &cp,
                    "two checkpoints of the same size with different roots",
                ));
            }
            return Ok(0);
        }
        if let Some(known) = st.latest().cloned() {
            if cp.size < known.size {
                // The peer is behind; its checkpoint must agree with our records.
                return if st.v.tree.root_at(cp.size).ok() == Some(cp.root) {
                    Ok(0)
                } else {
                    Err(fork(
                        &cp,
                        &known,
                        "an earlier checkpoint disagrees with the records a later one covers",
                    ))
                };
            }
            if !verify_consistency(
                known.size,
                &known.root,
                cp.size,
                &cp.root,
                &answer.consistency,
            ) {
                return Err(fork(
                    &known,
                    &cp,
                    "the later checkpoint is not consistent with the earlier one",
                ));
            }
        }
        let from = st.len();
        let Some(wanted) = (cp.size + 1).checked_sub(from) else {
            return Ok(0);
        };
        if answer.records.len() as u64 != wanted {
            return Err(ReplicationError::Invalid(format!(
                "expected records {from} to {} ({wanted}), got {}",
                cp.size,
                answer.records.len()
            )));
        }
        let mark = Mark::of(&st);
        let mut writes = Vec::with_capacity(answer.records.len());
        let mut new_checkpoints = Vec::new();
        let result = (|| {
            for (i, stored) in answer.records.iter().enumerate() {
                let seq = from + i as u64;
                let view = RecordView::parse(stored)
                    .map_err(|e| ReplicationError::Invalid(format!("record {seq}: {e}")))?;
                if view.seq != seq || view.prev_hash != st.v.last_hash {
                    return Err(ReplicationError::Invalid(format!(
                        "record {seq} is out of order or does not link to the one before"
                    )));
                }
                let leaf = view.leaf_hash();
                match view.signature_status(&author, &leaf) {
                    SignatureStatus::Unsigned | SignatureStatus::Valid => {}
                    SignatureStatus::Invalid | SignatureStatus::Foreign(_) => {
                        return Err(ReplicationError::Invalid(format!(
                            "record {seq}: not signed by the author"
                        )));
                    }
                }
                if view.is_checkpoint() {
                    let inner = view
                        .to_record()
                        .map_err(|e| e.to_string())
                        .and_then(|r| Checkpoint::from_record(&r).map_err(|e| e.to_string()))
                        .map_err(|e| ReplicationError::Invalid(format!("record {seq}: {e}")))?;
                    if st.v.tree.root() != inner.root {
                        return Err(ReplicationError::Invalid(format!(
                            "checkpoint {seq} does not match the records before it"
                        )));
                    }
                    new_checkpoints.push(inner);
                }
                st.v.tree.push(leaf);
                st.v.last_hash = leaf;
                writes.push(Write::Insert {
                    table: Table::LedgerRecords,
                    key: self.view.key(seq),
                    body: stored.to_vec(),
                });
            }
            if new_checkpoints.last() != Some(&cp) {
                return Err(ReplicationError::Invalid(
                    "the records do not end with the signed checkpoint".into(),
                ));
            }
            Ok(())
        })();
        if let Err(e) = result {
            mark.restore(&mut st);
            return Err(e);
        }
        if let Err(e) = self.view.store.apply(&writes) {
            mark.restore(&mut st);
            return Err(e.into());
        }
        st.v.checkpoints.extend(new_checkpoints);
        st.v.uncovered = 0;
        st.v.first_uncovered_at = None;
        st.all_committed();
        Ok(wanted)
    }
}
