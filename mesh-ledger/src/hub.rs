//! The ledgers one node holds: its own and verified replicas of others',
//! offered to the runtime for replication ([`LedgerSync`]).
//!
//! The runtime asks members for their ledgers (and for the replicas they
//! hold) with [`LedgerSync::request`], answers their requests with
//! [`LedgerSync::serve`] and stores what comes back with
//! [`LedgerSync::apply`], which verifies signatures, records against the
//! checkpoint and consistency with what is held, and keeps the evidence of
//! a fork (in the store, so it outlives a restart).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_core::identity::NodeId;
use mesh_core::ledger::{
    CheckpointRef, ForkReport, Ledger, LedgerHolding, LedgerSync, LedgerSyncError,
};
use mesh_core::storage::{Record, Storage, StorageExt, Table};
use serde::{Deserialize, Serialize};

use crate::ledger::{ForkEvidence, LedgerView, Replica, ReplicationError, SignedLedger};
use crate::record::Checkpoint;
use crate::sync::{SyncRequest, SyncResponse};
use crate::verify::ledger_authors;

/// Replicas one node keeps at most.
pub const MAX_REPLICAS: usize = 1024;

/// A fork's evidence as stored: the two signed checkpoints (anyone can
/// verify both signatures) and why they conflict. The first fork found is
/// kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredFork {
    author: NodeId,
    first: Checkpoint,
    second: Checkpoint,
    reason: String,
}

impl Record for StoredFork {
    const TABLE: Table = Table::NodeState;
    fn key(&self) -> String {
        format!("ledger-fork:{}", self.author)
    }
}

impl StoredFork {
    fn report(&self) -> ForkReport {
        ForkReport {
            author: self.author,
            first: checkpoint_ref(&self.first),
            second: checkpoint_ref(&self.second),
            reason: self.reason.clone(),
        }
    }
}

/// This node's ledger and the replicas it holds.
pub struct LedgerHub {
    store: Arc<dyn Storage>,
    own: Arc<SignedLedger>,
    replicas: Mutex<BTreeMap<NodeId, Arc<Replica>>>,
}

impl std::fmt::Debug for LedgerHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHub")
            .field("author", &self.own.author())
            .finish_non_exhaustive()
    }
}

fn checkpoint_ref(c: &Checkpoint) -> CheckpointRef {
    CheckpointRef {
        size: c.size,
        root: c.root,
    }
}

fn sync_error(e: ReplicationError) -> LedgerSyncError {
    match e {
        ReplicationError::Ledger(l) => LedgerSyncError::Ledger(l),
        other => LedgerSyncError::Invalid(other.to_string()),
    }
}

impl LedgerHub {
    /// The hub of `own`, with the replicas `store` holds.
    pub fn open(store: Arc<dyn Storage>, own: Arc<SignedLedger>) -> Result<Self, LedgerSyncError> {
        let me = own.author();
        let mut replicas = BTreeMap::new();
        let authors =
            ledger_authors(store.as_ref()).map_err(|e| LedgerSyncError::Invalid(e.to_string()))?;
        for author in authors.into_iter().filter(|a| *a != me).take(MAX_REPLICAS) {
            replicas.insert(author, Arc::new(Replica::open(store.clone(), author)?));
        }
        Ok(LedgerHub {
            store,
            own,
            replicas: Mutex::new(replicas),
        })
    }

    fn replica(&self, author: &NodeId) -> Result<Arc<Replica>, LedgerSyncError> {
        let mut replicas = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = replicas.get(author) {
            return Ok(r.clone());
        }
        if replicas.len() >= MAX_REPLICAS {
            return Err(LedgerSyncError::Full);
        }
        let r = Arc::new(Replica::open(self.store.clone(), *author)?);
        replicas.insert(*author, r.clone());
        Ok(r)
    }

    fn view_of(&self, author: &NodeId) -> Result<Option<Arc<Replica>>, LedgerSyncError> {
        if *author == self.own.author() {
            return Ok(None);
        }
        let replicas = self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        match replicas.get(author) {
            Some(r) => Ok(Some(r.clone())),
            None => Err(LedgerSyncError::Invalid(format!(
                "this node holds no ledger of {author}"
            ))),
        }
    }

    fn serve_view(view: &LedgerView, req: &SyncRequest) -> Result<Vec<u8>, LedgerSyncError> {
        Ok(view.serve(req).map_err(sync_error)?.encode())
    }

    fn fork(&self, author: &NodeId) -> Option<ForkReport> {
        self.store
            .load::<StoredFork>(&format!("ledger-fork:{author}"))
            .ok()
            .flatten()
            .map(|f| f.report())
    }
}

impl LedgerSync for LedgerHub {
    fn serve(&self, request: &[u8]) -> Result<Vec<u8>, LedgerSyncError> {
        let req = SyncRequest::decode(request).map_err(sync_error)?;
        match self.view_of(&req.author)? {
            None => Self::serve_view(self.own.view(), &req),
            Some(r) => Self::serve_view(r.view(), &req),
        }
    }

    fn request(&self, author: &NodeId) -> Result<Vec<u8>, LedgerSyncError> {
        if *author == self.own.author() {
            return Err(LedgerSyncError::Invalid(
                "a node does not replicate its own ledger".into(),
            ));
        }
        Ok(self.replica(author)?.request().encode())
    }

    fn apply(&self, author: &NodeId, answer: &[u8]) -> Result<u64, LedgerSyncError> {
        let answer = SyncResponse::decode(answer).map_err(sync_error)?;
        let replica = self.replica(author)?;
        match replica.apply(answer) {
            Ok(n) => Ok(n),
            Err(ReplicationError::Fork(evidence)) => {
                let ForkEvidence {
                    first,
                    second,
                    reason,
                } = *evidence;
                let stored = StoredFork {
                    author: *author,
                    first,
                    second,
                    reason,
                };
                let key = stored.key();
                match self.store.load::<StoredFork>(&key) {
                    // The first evidence found stays.
                    Ok(Some(kept)) => return Err(LedgerSyncError::Fork(Box::new(kept.report()))),
                    Ok(None) => {}
                    Err(e) => return Err(LedgerSyncError::Ledger(e.into())),
                }
                self.store
                    .save(&stored)
                    .map_err(|e| LedgerSyncError::Ledger(e.into()))?;
                Err(LedgerSyncError::Fork(Box::new(stored.report())))
            }
            Err(e) => Err(sync_error(e)),
        }
    }

    fn checkpoint_own(&self) -> Result<(), LedgerSyncError> {
        let now = mesh_core::clock::Clock::now(&mesh_core::clock::SystemClock);
        self.own.checkpoint(now)?;
        Ok(())
    }

    fn holdings(&self) -> Vec<LedgerHolding> {
        let own = self.own.view();
        let mut out = vec![LedgerHolding::new(
            own.author(),
            true,
            own.len(),
            own.latest_checkpoint().as_ref().map(checkpoint_ref),
            None,
        )];
        let replicas: Vec<(NodeId, Arc<Replica>)> = self
            .replicas
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(a, r)| (*a, r.clone()))
            .collect();
        for (author, r) in replicas {
            out.push(LedgerHolding::new(
                author,
                false,
                r.view().len(),
                r.view().latest_checkpoint().as_ref().map(checkpoint_ref),
                self.fork(&author),
            ));
        }
        out
    }
}
