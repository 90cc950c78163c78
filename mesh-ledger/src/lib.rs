//! The signed, Merkle-verified audit ledger of the mesh SDK (R-LED1–6).
//!
//! * [`record`]: records with a canonical, hashed encoding; a hash chain
//!   (`prev_hash`) plus an RFC 6962 Merkle tree over all records; optional
//!   per-record signatures; signed checkpoints (tree heads) stored in the
//!   ledger itself.
//! * [`merkle`]: the tree, inclusion and consistency proofs, and their
//!   verification from the proof and a root alone.
//! * [`SignedLedger`]: a node's own ledger, implementing mesh-core's
//!   [`Ledger`](mesh_core::ledger::Ledger): appends commit in the caller's
//!   storage batch (group commit: many records, one transaction), checkpoints
//!   every N records or T milliseconds and on demand.
//! * [`verify_ledger`]: end-to-end verification naming the first bad record
//!   and what is wrong with it.
//! * [`Replica`] and [`sync`]: replication verified against signed
//!   checkpoints and consistency proofs, with fork detection.
//!
//! Persistence goes through mesh-core's [`Storage`](mesh_core::storage::Storage)
//! (SQLite with WAL, or memory), in the `ledger_records` table.
//!
//! ```
//! use std::sync::Arc;
//! use mesh_core::clock::Timestamp;
//! use mesh_core::identity::NodeKey;
//! use mesh_core::ledger::{Entry, Ledger, record_types};
//! use mesh_core::storage::{MemoryStorage, Storage};
//! use mesh_ledger::{LedgerConfig, SignedLedger, verify_ledger};
//!
//! let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
//! let key = Arc::new(NodeKey::generate());
//! let ledger = SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default())?;
//! let entry = Entry::json(record_types::PAIRING_APPROVED, key.node_id(), &serde_json::json!({"device": "laptop"}));
//! ledger.append(vec![entry], vec![], Timestamp::from_millis(1_000))?;
//! let checkpoint = ledger.checkpoint(Timestamp::from_millis(2_000))?.expect("a checkpoint");
//! assert_eq!(checkpoint.size, 1);
//! assert!(verify_ledger(store.as_ref(), &key.node_id(), None)?.ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod hub;
mod ledger;
pub mod merkle;
pub mod record;
pub mod sync;
mod verify;

#[cfg(test)]
mod tests;

pub use hub::{LedgerHub, MAX_REPLICAS};
pub use ledger::{
    ConsistencyProof, ForkEvidence, InclusionProof, LedgerConfig, LedgerView, ProofCheckError,
    Replica, ReplicationError, SignedLedger, verify_checkpoint_consistency, verify_leaf_inclusion,
    verify_record_inclusion,
};
pub use record::{Checkpoint, CheckpointError, LedgerRecord, RecordSignature};
pub use verify::{Problem, Report, ledger_authors, verify_ledger};
