//! Verification of a stored ledger from its first record to its last,
//! reporting the first bad record and what is wrong with it (R-LED3).
//!
//! Every record's integrity rests on something outside it: the next record's
//! `prev_hash` (the chain), its own signature (per-record signing, and every
//! checkpoint), and the signed checkpoints' roots (which also catch a history
//! rewritten and re-chained). A broken link between records `j` and `j + 1`
//! is blamed on `j` when `j + 1` is otherwise intact (`j` was edited), and on
//! `j + 1`'s `prev_hash` when `j + 1` is not (its link onwards is broken too,
//! or its signature fails).
//!
//! What cannot be detected, by construction: edits to records after the last
//! checkpoint in a ledger without per-record signatures (nothing commits to
//! them yet), and removal of records from the end (pass a checkpoint known
//! from elsewhere, e.g. a replica's, to [`verify_ledger`]).

use std::collections::VecDeque;
use std::fmt;

use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeId;
use mesh_core::storage::{Storage, StorageError, Table};

use crate::merkle::{Hash, MerkleTree};
use crate::record::{Checkpoint, LedgerRecord, RecordView, SignatureStatus};

/// Records read from the store at a time.
const CHUNK: usize = 4096;

/// The storage key of record `seq` of `author`'s ledger.
pub(crate) fn record_key(author: &NodeId, seq: u64) -> String {
    format!("{author}/{seq:020}")
}

/// The first key after every record of `author` (`'0'` follows `'/'`).
pub(crate) fn keys_end(author: &NodeId) -> String {
    format!("{author}0")
}

fn key_seq(author: &NodeId, key: &str) -> Option<u64> {
    let rest = key.strip_prefix(&format!("{author}/"))?;
    if rest.len() != 20 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// Its content was changed after it was written (or it no longer decodes).
    Edited {
        /// What gave it away.
        detail: String,
    },
    /// There is no record at this position, though later ones exist (or a
    /// known checkpoint covers it).
    Removed,
    /// An intact record from another position is stored here.
    Reordered {
        /// The position it belongs to.
        found_seq: u64,
    },
    /// Its `prev_hash` is not the previous record's hash.
    WrongPrevHash,
    /// Its signature (or its checkpoint's) does not match its content.
    BadSignature,
    /// It is signed by a key other than the ledger's author.
    ForeignSignature {
        /// The key that signed (base32).
        signer: String,
    },
    /// A validly signed checkpoint whose root the records before it do not
    /// produce: history before it was rewritten.
    CheckpointMismatch,
}

impl Problem {
    /// A stable code for scripts: `body_edited`, `record_removed`,
    /// `records_reordered`, `wrong_previous_hash`, `bad_signature`,
    /// `foreign_signature`, `checkpoint_root_mismatch`.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Edited { .. } => "body_edited",
            Problem::Removed => "record_removed",
            Problem::Reordered { .. } => "records_reordered",
            Problem::WrongPrevHash => "wrong_previous_hash",
            Problem::BadSignature => "bad_signature",
            Problem::ForeignSignature { .. } => "foreign_signature",
            Problem::CheckpointMismatch => "checkpoint_root_mismatch",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Edited { detail } => write!(f, "body edited: {detail}"),
            Problem::Removed => f.write_str("record removed"),
            Problem::Reordered { found_seq } => {
                write!(f, "records reordered: record {found_seq} is stored here")
            }
            Problem::WrongPrevHash => {
                f.write_str("wrong previous hash: it does not link to the record before it")
            }
            Problem::BadSignature => f.write_str("bad signature: it does not match the content"),
            Problem::ForeignSignature { signer } => {
                write!(f, "foreign signature: signed by {signer}, not the ledger's author")
            }
            Problem::CheckpointMismatch => f.write_str(
                "checkpoint root mismatch: the records before this signed checkpoint were rewritten",
            ),
        }
    }
}

/// The result of verifying a ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records stored (checkpoints included).
    pub records: u64,
    /// The first bad record, if any.
    pub first_bad: Option<u64>,
    /// What is wrong with it.
    pub problem: Option<Problem>,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Records after the last checkpoint (covered by no checkpoint yet).
    pub uncovered: u64,
}

impl Report {
    /// Whether the whole ledger verified.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// What a good prefix of the ledger amounts to: enough to extend it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Verified {
    pub(crate) tree: MerkleTree,
    pub(crate) last_hash: Hash,
    pub(crate) checkpoints: Vec<Checkpoint>,
    pub(crate) uncovered: u64,
    pub(crate) first_uncovered_at: Option<Timestamp>,
}

/// A record as the verifier sees it.
#[derive(Debug, Clone)]
struct Item {
    key_seq: Option<u64>,
    parsed: Result<Parsed, String>,
}

#[derive(Debug, Clone)]
struct Parsed {
    seq: u64,
    timestamp: u64,
    leaf: Hash,
    prev: Hash,
    sig: SignatureStatus,
    /// For checkpoint records: the checkpoint, or why it is not one.
    checkpoint: Option<Result<Checkpoint, String>>,
}

fn parse(author: &NodeId, key: &str, stored: &[u8]) -> Item {
    let parsed = RecordView::parse(stored).map_err(|e| e.0).map(|view| {
        let leaf = view.leaf_hash();
        let sig = view.signature_status(author, &leaf);
        let checkpoint = view.is_checkpoint().then(|| {
            view.to_record()
                .map_err(|e| e.0)
                .and_then(|r| Checkpoint::from_record(&r).map_err(|e| e.to_string()))
        });
        Parsed {
            seq: view.seq,
            timestamp: view.timestamp,
            leaf,
            prev: view.prev_hash,
            sig,
            checkpoint,
        }
    });
    Item {
        key_seq: key_seq(author, key),
        parsed,
    }
}

/// Reads and checks a ledger in order; stops at the first bad record.
pub(crate) struct Verifier<'a> {
    store: &'a dyn Storage,
    author: NodeId,
    buffer: VecDeque<Item>,
    next_key: String,
    exhausted: bool,
    state: Verified,
    pos: u64,
}

impl<'a> Verifier<'a> {
    pub(crate) fn new(store: &'a dyn Storage, author: NodeId) -> Self {
        Verifier {
            store,
            author,
            buffer: VecDeque::new(),
            next_key: record_key(&author, 0),
            exhausted: false,
            state: Verified::default(),
            pos: 0,
        }
    }

    /// Keeps at least three records buffered (the one judged and two ahead).
    fn fill(&mut self) -> Result<(), StorageError> {
        while self.buffer.len() < 3 && !self.exhausted {
            let author = self.author;
            let mut loaded = 0;
            let mut last_key = None;
            let buffer = &mut self.buffer;
            self.store.scan_range(
                Table::LedgerRecords,
                &self.next_key,
                &keys_end(&author),
                CHUNK,
                &mut |key, body| {
                    buffer.push_back(parse(&author, key, body));
                    loaded += 1;
                    last_key = Some(key.to_owned());
                    Ok(())
                },
            )?;
            match last_key {
                // Resume just after the last key read.
                Some(k) if loaded == CHUNK => self.next_key = format!("{k}\0"),
                _ => self.exhausted = true,
            }
        }
        Ok(())
    }

    /// The record at `seq` if it is stored under its own key and parses.
    fn usable(&self, ahead: usize, seq: u64) -> Option<&Parsed> {
        let item = self.buffer.get(ahead)?;
        if item.key_seq != Some(seq) {
            return None;
        }
        item.parsed.as_ref().ok().filter(|p| p.seq == seq)
    }

    /// Whether a record found at the wrong position is itself intact.
    fn intact_elsewhere(&self, p: &Parsed) -> Result<bool, StorageError> {
        if p.sig == SignatureStatus::Valid {
            return Ok(true);
        }
        let Some(next) = p.seq.checked_add(1) else {
            return Ok(false);
        };
        let stored = self
            .store
            .get(Table::LedgerRecords, &record_key(&self.author, next))?;
        Ok(stored
            .and_then(|b| RecordView::parse(&b).ok().map(|v| v.prev_hash))
            .is_some_and(|prev| prev == p.leaf))
    }

    /// Judges the record at the current position; `Ok(None)` when it is good.
    fn judge(&mut self) -> Result<Option<Problem>, StorageError> {
        let j = self.pos;
        let Some(item) = self.buffer.front() else {
            return Ok(None);
        };
        match item.key_seq {
            Some(k) if k == j => {}
            Some(k) if k > j => return Ok(Some(Problem::Removed)),
            _ => {
                return Ok(Some(Problem::Edited {
                    detail: "stored under an unexpected key".into(),
                }));
            }
        }
        let p = match &item.parsed {
            Ok(p) => p.clone(),
            Err(e) => return Ok(Some(Problem::Edited { detail: e.clone() })),
        };
        if p.seq != j {
            return Ok(Some(if self.intact_elsewhere(&p)? {
                Problem::Reordered { found_seq: p.seq }
            } else {
                Problem::Edited {
                    detail: format!("its sequence number reads {}", p.seq),
                }
            }));
        }
        let expected_prev = if j == 0 {
            [0; 32]
        } else {
            self.state.last_hash
        };
        if p.prev != expected_prev {
            return Ok(Some(Problem::WrongPrevHash));
        }
        // Whether the next record still commits to this one (None: no usable next).
        let next_link = self.usable(1, j + 1).map(|n| n.prev == p.leaf);
        match p.sig {
            SignatureStatus::Foreign(signer) => {
                return Ok(Some(Problem::ForeignSignature {
                    signer: data_encoding::BASE32_NOPAD.encode(&signer),
                }));
            }
            SignatureStatus::Invalid => {
                return Ok(Some(if next_link == Some(false) {
                    Problem::Edited {
                        detail:
                            "its content no longer matches its signature or the next record's hash"
                                .into(),
                    }
                } else {
                    Problem::BadSignature
                }));
            }
            SignatureStatus::Unsigned | SignatureStatus::Valid => {}
        }
        if let Some(cp) = &p.checkpoint {
            if p.sig != SignatureStatus::Valid {
                return Ok(Some(Problem::BadSignature));
            }
            let cp = match cp {
                Ok(cp) => cp,
                Err(e) => return Ok(Some(Problem::Edited { detail: e.clone() })),
            };
            if cp.root != self.state.tree.root() {
                return Ok(Some(Problem::CheckpointMismatch));
            }
        }
        if next_link == Some(false) && self.next_is_intact(j)? {
            return Ok(Some(Problem::Edited {
                detail: "its hash no longer matches the next record's previous hash".into(),
            }));
        }
        Ok(None)
    }

    /// After the link from `j` to `j + 1` broke: is record `j + 1` intact
    /// (so `j` is to blame), judged from its own link onwards or its
    /// signature?
    fn next_is_intact(&self, j: u64) -> Result<bool, StorageError> {
        let Some(next) = self.usable(1, j + 1) else {
            return Ok(false);
        };
        if let Some(after) = self.usable(2, j + 2) {
            return Ok(after.prev == next.leaf);
        }
        // The next record is the last usable one: only its signature can say.
        Ok(next.sig == SignatureStatus::Valid)
    }

    /// Accepts the record at the current position.
    fn accept(&mut self) {
        let Some(Item { parsed: Ok(p), .. }) = self.buffer.pop_front() else {
            return;
        };
        let st = &mut self.state;
        st.tree.push(p.leaf);
        st.last_hash = p.leaf;
        match p.checkpoint {
            Some(Ok(cp)) => {
                st.checkpoints.push(cp);
                st.uncovered = 0;
                st.first_uncovered_at = None;
            }
            _ => {
                st.uncovered += 1;
                st.first_uncovered_at
                    .get_or_insert(Timestamp::from_millis(p.timestamp));
            }
        }
        self.pos += 1;
    }

    /// Runs to the end or the first bad record.
    pub(crate) fn run(
        mut self,
        known: Option<&Checkpoint>,
    ) -> Result<(Report, Verified), StorageError> {
        loop {
            self.fill()?;
            if self.buffer.is_empty() {
                break;
            }
            if let Some(problem) = self.judge()? {
                let records = self.pos + self.count_rest()?;
                let report = Report {
                    records,
                    first_bad: Some(self.pos),
                    problem: Some(problem),
                    checkpoints: self.state.checkpoints.len() as u64,
                    uncovered: self.state.uncovered,
                };
                return Ok((report, self.state));
            }
            self.accept();
        }
        // A checkpoint known from elsewhere covers records that must be here.
        if let Some(cp) = known {
            let problem = if cp.size > self.pos {
                Some(Problem::Removed)
            } else if self.state.tree.root_at(cp.size).ok() != Some(cp.root) {
                Some(Problem::CheckpointMismatch)
            } else {
                None
            };
            if let Some(problem) = problem {
                let first_bad = Some(self.pos.min(cp.size));
                let report = Report {
                    records: self.pos,
                    first_bad,
                    problem: Some(problem),
                    checkpoints: self.state.checkpoints.len() as u64,
                    uncovered: self.state.uncovered,
                };
                return Ok((report, self.state));
            }
        }
        let report = Report {
            records: self.pos,
            first_bad: None,
            problem: None,
            checkpoints: self.state.checkpoints.len() as u64,
            uncovered: self.state.uncovered,
        };
        Ok((report, self.state))
    }

    /// Records stored from the current position on (for the report).
    fn count_rest(&mut self) -> Result<u64, StorageError> {
        let mut n = self.buffer.len() as u64;
        if !self.exhausted {
            self.store.scan_range(
                Table::LedgerRecords,
                &self.next_key,
                &keys_end(&self.author),
                usize::MAX,
                &mut |_, _| {
                    n += 1;
                    Ok(())
                },
            )?;
        }
        Ok(n)
    }
}

/// Verifies `author`'s ledger in `store` from the first record to the last.
/// `known` is a checkpoint of this ledger obtained elsewhere (e.g. by a
/// peer); records it covers must be present and produce its root.
///
/// Storage errors are returned as errors; everything wrong with the records
/// is in the [`Report`].
pub fn verify_ledger(
    store: &dyn Storage,
    author: &NodeId,
    known: Option<&Checkpoint>,
) -> Result<Report, StorageError> {
    Verifier::new(store, *author)
        .run(known)
        .map(|(report, _)| report)
}

/// The authors whose ledgers (own or replicated) `store` holds.
pub fn ledger_authors(store: &dyn Storage) -> Result<Vec<NodeId>, StorageError> {
    let mut authors: Vec<NodeId> = Vec::new();
    let mut start = String::new();
    loop {
        let mut found = None;
        store.scan_range(
            Table::LedgerRecords,
            &start,
            "\u{10FFFF}",
            1,
            &mut |key, _| {
                found = Some(key.to_owned());
                Ok(())
            },
        )?;
        let Some(key) = found else { break };
        let Some((id, _)) = key.split_once('/') else {
            // Not a ledger key; skip past it.
            start = format!("{key}\0");
            continue;
        };
        if let Ok(node) = id.parse::<NodeId>() {
            authors.push(node);
        }
        start = format!("{id}0");
    }
    Ok(authors)
}

/// Decodes stored records `[from, from + limit)` of `author`'s ledger.
pub(crate) fn read_records(
    store: &dyn Storage,
    author: &NodeId,
    from: u64,
    limit: usize,
) -> Result<Vec<Result<LedgerRecord, String>>, StorageError> {
    let mut out = Vec::new();
    store.scan_range(
        Table::LedgerRecords,
        &record_key(author, from),
        &keys_end(author),
        limit,
        &mut |_, body| {
            out.push(LedgerRecord::decode(body).map_err(|e| e.0));
            Ok(())
        },
    )?;
    Ok(out)
}
