//! Replication (R-LED5–6): a peer asks for what it lacks, the holder answers
//! with records up to a signed checkpoint and a consistency proof from the
//! peer's last checkpoint, and the peer verifies everything before storing.
//!
//! The exchange is sans-IO ([`LedgerView::serve`], [`Replica::request`],
//! [`Replica::apply`]); [`serve_sync`] and [`pull`] drive it over any
//! mesh-core [`Connection`]. Messages are postcard, one per transport
//! message.

use mesh_core::clock::Clock;
use mesh_core::identity::NodeId;
use mesh_core::storage::Table;
use mesh_core::transport::{Connection, TransportError};
use serde::{Deserialize, Serialize};

use crate::ledger::{LedgerView, Replica, ReplicationError, SignedLedger};
use crate::merkle::Hash;
use crate::record::Checkpoint;
use crate::verify::{keys_end, record_key};

/// Most records in one answer.
pub const MAX_RECORDS_PER_ANSWER: usize = 4096;
/// Target size of one answer's records, in bytes (a transport message holds
/// 1 MiB).
pub const MAX_ANSWER_BYTES: usize = 768 * 1024;

/// A replica's question: "I hold `from` records of `author`'s ledger, the
/// last checkpoint I verified is `known`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Whose ledger.
    pub author: NodeId,
    /// Records held.
    pub from: u64,
    /// The latest checkpoint held.
    pub known: Option<Checkpoint>,
}

/// The answer: records `[from, checkpoint.size]` (the checkpoint record
/// last), and the consistency proof from `known` to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The checkpoint the records lead to; `None` when there is nothing.
    pub checkpoint: Option<Checkpoint>,
    /// Consistency proof from the request's `known` checkpoint.
    pub consistency: Vec<Hash>,
    /// Stored records, in order.
    pub records: Vec<serde_bytes::ByteBuf>,
}

fn invalid(e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Invalid(e.to_string())
}

impl SyncRequest {
    /// Encodes for the transport.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a request.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplicationError> {
        postcard::from_bytes(bytes).map_err(invalid)
    }
}

impl SyncResponse {
    /// Encodes for the transport.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes an answer.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplicationError> {
        postcard::from_bytes(bytes).map_err(invalid)
    }
}

impl LedgerView {
    /// Answers a replica: records from `request.from` up to the furthest
    /// checkpoint that keeps the answer within [`MAX_RECORDS_PER_ANSWER`]
    /// and [`MAX_ANSWER_BYTES`] (or the first checkpoint after `from`, if
    /// even that is larger).
    pub fn serve(&self, request: &SyncRequest) -> Result<SyncResponse, ReplicationError> {
        if request.author != self.author {
            return Err(ReplicationError::WrongLedger {
                expected: self.author,
                found: request.author,
            });
        }
        let empty = SyncResponse {
            checkpoint: None,
            consistency: Vec::new(),
            records: Vec::new(),
        };
        let (checkpoints, latest) = {
            // Only what is durable: a checkpoint still being flushed could be
            // taken back and would then look like a fork to the replica.
            let st = self.lock();
            let Some(latest) = st.committed_checkpoints().last().cloned() else {
                return Ok(empty);
            };
            let sizes: Vec<u64> = st.committed_checkpoints().iter().map(|c| c.size).collect();
            (sizes, latest)
        };
        if request.from > latest.size {
            // The asker holds more than we do: show our head so it can
            // check it against its own.
            return Ok(SyncResponse {
                checkpoint: Some(latest),
                ..empty
            });
        }
        // Read forward from `from` to the furthest checkpoint within the
        // limits; always at least to the first checkpoint.
        let Some(first_cp) = checkpoints.iter().copied().find(|s| *s >= request.from) else {
            return Ok(SyncResponse {
                checkpoint: Some(latest),
                ..empty
            });
        };
        let must = usize::try_from(first_cp - request.from + 1).unwrap_or(usize::MAX);
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut target = None;
        self.store.scan_range(
            Table::LedgerRecords,
            &record_key(&self.author, request.from),
            &keys_end(&self.author),
            must.max(MAX_RECORDS_PER_ANSWER),
            &mut |_, body| {
                let full = records.len() >= MAX_RECORDS_PER_ANSWER
                    || bytes + body.len() > MAX_ANSWER_BYTES;
                if target.is_some() && full {
                    return Ok(());
                }
                let seq = request.from + records.len() as u64;
                bytes += body.len();
                records.push(serde_bytes::ByteBuf::from(body.to_vec()));
                if checkpoints.binary_search(&seq).is_ok() {
                    target = Some(seq);
                }
                Ok(())
            },
        )?;
        let Some(target) = target else {
            return Ok(SyncResponse {
                checkpoint: Some(latest),
                ..empty
            });
        };
        records.truncate((target + 1 - request.from) as usize);
        let checkpoint = self
            .lock()
            .v
            .checkpoints
            .iter()
            .find(|c| c.size == target)
            .cloned();
        let consistency = match &request.known {
            Some(k) if k.size < target => self
                .consistency_proof(k.size, target)
                .map(|p| p.path)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(SyncResponse {
            checkpoint,
            consistency,
            records,
        })
    }
}

fn transport(e: TransportError) -> ReplicationError {
    ReplicationError::Transport(e.to_string())
}

/// Answers sync requests on `conn` until the peer closes it. Before each
/// answer, records not yet covered by a checkpoint get one (so entries made
/// while the peer was away reach it).
pub async fn serve_sync(
    conn: &dyn Connection,
    ledger: &SignedLedger,
    clock: &dyn Clock,
) -> Result<(), ReplicationError> {
    loop {
        let message = match conn.recv().await {
            Ok(m) => m,
            Err(TransportError::Closed) => return Ok(()),
            Err(e) => return Err(transport(e)),
        };
        let request = SyncRequest::decode(&message)?;
        ledger
            .checkpoint(clock.now())
            .map_err(ReplicationError::Ledger)?;
        let answer = ledger.view().serve(&request)?;
        conn.send(answer.encode()).await.map_err(transport)?;
    }
}

/// Pulls from `conn` into `replica` until it has everything the peer has
/// checkpointed; returns the number of records added.
pub async fn pull(conn: &dyn Connection, replica: &Replica) -> Result<u64, ReplicationError> {
    let mut added = 0;
    loop {
        conn.send(replica.request().encode())
            .await
            .map_err(transport)?;
        let answer = SyncResponse::decode(&conn.recv().await.map_err(transport)?)?;
        let n = replica.apply(answer)?;
        if n == 0 {
            return Ok(added);
        }
        added += n;
    }
}
