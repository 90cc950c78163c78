//! Storage behind a trait: SQLite (feature `sqlite`, default) and in memory.
//!
//! The node keeps records in tables ([`Table`]); each record is a body under a
//! string key: a format byte and postcard (compact, fast to decode; JSON
//! bodies are read too, see [`Record`]). The [`Storage`] trait is small and
//! object-safe: read one, list or scan a table, and apply a batch of writes
//! **atomically** (all or nothing,
//! so a failed operation leaves nothing half-written). Typed access goes
//! through [`Record`] and the [`StorageExt`] helpers. Both backends pass the
//! same conformance suite ([`storage_conformance_tests!`](crate::storage_conformance_tests)).
//!
//! ```
//! use mesh_core::storage::{MemoryStorage, StorageExt, records::PeerRecord};
//! use mesh_core::identity::NodeKey;
//!
//! let store = MemoryStorage::new();
//! use mesh_core::mesh::member::MemberId;
//! use mesh_core::clock::Timestamp;
//!
//! let id = MemberId::new(&NodeKey::generate(), 1, "laptop", vec![])?;
//! let peer = PeerRecord::new(id, Timestamp::from_millis(1));
//! store.save(&peer)?;
//! let back: Option<PeerRecord> = store.load(&peer.node.to_string())?;
//! assert_eq!(back, Some(peer));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod memory;
pub mod records;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use memory::MemoryStorage;
#[cfg(feature = "sqlite")]
pub use sqlite::{MAX_GROUP, QUEUE_DEPTH, SCHEMA_VERSION, SqliteStorage, WriteStats};

/// The tables the node keeps (R-STORE1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Table {
    /// Paired devices (R-PAIR5).
    Devices,
    /// Pairing requests and their state.
    PairingRequests,
    /// Nodes seen by discovery.
    DiscoveredNodes,
    /// Latest health per device.
    DeviceHealth,
    /// Execution policy documents per device.
    DeviceExecPolicies,
    /// Capabilities a node declares.
    NodeCapabilities,
    /// Mesh members.
    Peers,
    /// Join tokens issued.
    JoinTokens,
    /// Actions and their lifecycle.
    Actions,
    /// Index: hardware/app device id → node id (keeps device ids unique).
    DeviceIds,
    /// Audit ledger records (mesh-ledger), keyed by author and sequence.
    LedgerRecords,
    /// This node's own state: a worker's link to its primary and its
    /// token fallback during a rotation; its standing in the mesh.
    NodeState,
    /// Nodes blocked from the mesh.
    Blocklist,
    /// Replicated namespaces' changes, a log keyed `NAMESPACE:ORIGIN:SEQ`.
    ReplicatedEntries,
    /// Replicated namespaces' version vectors, keyed by namespace.
    ReplicaCoverage,
    /// Letters this node sent and not yet acknowledged, keyed by letter id.
    DeliveryOutbox,
    /// Letters received and not yet handed to the application, keyed
    /// `SENDER:SEQ`.
    DeliveryInbox,
    /// Per sender (and per recipient): the sequence numbers seen, and the
    /// next to send.
    DeliverySeq,
    /// Letters held as a relay for members, keyed `RECIPIENT:LETTER_ID`.
    DeliveryRelay,
    /// File transfers in and out, keyed by transfer id.
    FileTransfers,
    /// Health samples per device for the last hours (a ring of slots),
    /// keyed `NODE:SLOT`.
    HealthSamples,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 21] = [
        Table::Devices,
        Table::PairingRequests,
        Table::DiscoveredNodes,
        Table::DeviceHealth,
        Table::DeviceExecPolicies,
        Table::NodeCapabilities,
        Table::Peers,
        Table::JoinTokens,
        Table::Actions,
        Table::DeviceIds,
        Table::LedgerRecords,
        Table::NodeState,
        Table::Blocklist,
        Table::ReplicatedEntries,
        Table::ReplicaCoverage,
        Table::DeliveryOutbox,
        Table::DeliveryInbox,
        Table::DeliverySeq,
        Table::DeliveryRelay,
        Table::FileTransfers,
        Table::HealthSamples,
    ];

    /// The table's name (also its SQL name).
    pub fn name(self) -> &'static str {
        match self {
            Table::Devices => "devices",
            Table::PairingRequests => "pairing_requests",
            Table::DiscoveredNodes => "discovered_nodes",
            Table::DeviceHealth => "device_health",
            Table::DeviceExecPolicies => "device_exec_policies",
            Table::NodeCapabilities => "node_capabilities",
            Table::Peers => "peers",
            Table::JoinTokens => "join_tokens",
            Table::Actions => "actions",
            Table::DeviceIds => "device_ids",
            Table::LedgerRecords => "ledger_records",
            Table::NodeState => "node_state",
            Table::Blocklist => "mesh_blocklist",
            Table::ReplicatedEntries => "replicated_entries",
            Table::ReplicaCoverage => "replica_coverage",
            Table::DeliveryOutbox => "delivery_outbox",
            Table::DeliveryInbox => "delivery_inbox",
            Table::DeliverySeq => "delivery_seq",
            Table::DeliveryRelay => "delivery_relay",
            Table::FileTransfers => "file_transfers",
            Table::HealthSamples => "health_samples",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One write in a batch.
#[derive(Clone, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace.
    Put {
        /// Table.
        table: Table,
        /// Key.
        key: String,
        /// Record body (see [`Record`] for the format).
        body: Vec<u8>,
    },
    /// Insert; the whole batch fails with [`StorageError::AlreadyExists`] if the key exists.
    Insert {
        /// Table.
        table: Table,
        /// Key.
        key: String,
        /// Record body (see [`Record`] for the format).
        body: Vec<u8>,
    },
    /// Remove if present.
    Delete {
        /// Table.
        table: Table,
        /// Key.
        key: String,
    },
    /// Writes nothing; the whole batch fails with [`StorageError::Missing`]
    /// unless the key exists (written earlier in this batch or by a batch
    /// committed, or queued, before it). A batch that extends another
    /// queued batch (the next records of a hash chain) requires the other's
    /// last key, so if the first fails the second fails too.
    Require {
        /// Table.
        table: Table,
        /// Key.
        key: String,
    },
}

impl Write {
    /// The table and key the write concerns.
    pub fn target(&self) -> (Table, &str) {
        match self {
            Write::Put { table, key, .. }
            | Write::Insert { table, key, .. }
            | Write::Delete { table, key }
            | Write::Require { table, key } => (*table, key),
        }
    }
}

impl fmt::Debug for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Bodies may hold token hashes; print sizes only.
        match self {
            Write::Put { table, key, body } => {
                write!(f, "Put({table}/{key}, {} bytes)", body.len())
            }
            Write::Insert { table, key, body } => {
                write!(f, "Insert({table}/{key}, {} bytes)", body.len())
            }
            Write::Delete { table, key } => write!(f, "Delete({table}/{key})"),
            Write::Require { table, key } => write!(f, "Require({table}/{key})"),
        }
    }
}

/// Storage errors. Nothing of a failed batch was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An `Insert` found its key taken.
    #[error("{table}/{key} already exists")]
    AlreadyExists {
        /// Table.
        table: Table,
        /// Key.
        key: String,
    },
    /// A [`Write::Require`] found no record under its key.
    #[error("{table}/{key} is required by the batch but does not exist")]
    Missing {
        /// Table.
        table: Table,
        /// Key.
        key: String,
    },
    /// A stored document does not decode as the expected record.
    #[error("record {table}/{key} is corrupt or of another version: {reason}")]
    Corrupt {
        /// Table.
        table: Table,
        /// Key.
        key: String,
        /// Decoder message.
        reason: String,
    },
    /// The database was written by a newer version of the SDK.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); upgrade the SDK"
    )]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// The backend failed (disk full, permissions, a locked or damaged file).
    #[error("storage backend error: {0}")]
    Backend(String),
}

impl Clone for StorageError {
    fn clone(&self) -> Self {
        match self {
            StorageError::AlreadyExists { table, key } => StorageError::AlreadyExists {
                table: *table,
                key: key.clone(),
            },
            StorageError::Missing { table, key } => StorageError::Missing {
                table: *table,
                key: key.clone(),
            },
            StorageError::Corrupt { table, key, reason } => StorageError::Corrupt {
                table: *table,
                key: key.clone(),
                reason: reason.clone(),
            },
            StorageError::SchemaTooNew { found, supported } => StorageError::SchemaTooNew {
                found: *found,
                supported: *supported,
            },
            StorageError::Backend(m) => StorageError::Backend(m.clone()),
        }
    }
}

/// A batch handed to [`Storage::submit`]: wait on it for its outcome.
///
/// Batches are committed in the order they were submitted; a batch's
/// outcome is final (durable, or nothing of it written) when
/// [`Pending::wait`] returns.
#[derive(Debug)]
#[must_use = "a submitted batch is only known to be durable once `wait` returns Ok"]
pub struct Pending(PendingState);

#[derive(Debug)]
enum PendingState {
    Ready(Result<(), StorageError>),
    Waiting(std::sync::mpsc::Receiver<Result<(), StorageError>>),
}

impl Pending {
    /// An outcome known at once (a backend that applies in place).
    pub fn ready(outcome: Result<(), StorageError>) -> Self {
        Pending(PendingState::Ready(outcome))
    }

    /// An outcome a writer will send; the sender dropped unsent reads as a
    /// backend error (the writer stopped).
    pub fn waiting(rx: std::sync::mpsc::Receiver<Result<(), StorageError>>) -> Self {
        Pending(PendingState::Waiting(rx))
    }

    /// Blocks until the batch is committed or has failed. Do not call it on
    /// an async thread: it waits for a disk flush.
    pub fn wait(self) -> Result<(), StorageError> {
        match self.0 {
            PendingState::Ready(r) => r,
            PendingState::Waiting(rx) => rx.recv().unwrap_or_else(|_| {
                Err(StorageError::Backend(
                    "the storage writer stopped before committing the batch".into(),
                ))
            }),
        }
    }
}

/// The storage interface the node runtime uses. Implementations must make
/// [`Storage::apply`] atomic and durable once it returns `Ok`.
pub trait Storage: Send + Sync + fmt::Debug + 'static {
    /// One document.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Every document of a table, ordered by key.
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError>;
    /// Applies all writes or none.
    fn apply(&self, batch: &[Write]) -> Result<(), StorageError>;

    /// Queues a batch and returns at once; [`Pending::wait`] gives its
    /// outcome. Batches commit in submission order, and a backend with a
    /// writer task commits the batches queued together in one transaction
    /// (one disk flush), each still all or nothing. The default applies in
    /// place.
    fn submit(&self, batch: Vec<Write>) -> Pending {
        Pending::ready(self.apply(&batch))
    }

    /// Visits every document of a table in key order without copying it out;
    /// stops at the first error `visit` returns. The default goes through
    /// [`Storage::list`]; backends override it to lend their own buffers.
    /// `visit` must not call back into the same store (a backend may hold a
    /// lock while scanning).
    fn scan(&self, table: Table, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        for (k, b) in self.list(table)? {
            visit(&k, &b)?;
        }
        Ok(())
    }

    /// Like [`Storage::scan`], for at most `limit` keys with
    /// `start <= key < end`, in key order. The default filters a full scan;
    /// backends override it with a range read.
    fn scan_range(
        &self,
        table: Table,
        start: &str,
        end: &str,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StorageError> {
        let mut left = limit;
        self.scan(table, &mut |k, b| {
            if left > 0 && k >= start && k < end {
                left -= 1;
                visit(k, b)?;
            }
            Ok(())
        })
    }
}

/// What [`Storage::scan`] calls for each `(key, body)`.
pub type Visitor<'a> = dyn FnMut(&str, &[u8]) -> Result<(), StorageError> + 'a;

/// First byte of a binary (postcard) record body.
pub const FORMAT_POSTCARD: u8 = 0x01;

/// A typed record stored in one table.
///
/// Bodies are written as [`FORMAT_POSTCARD`] followed by postcard: listing
/// 10 000 devices must stay within milliseconds, and JSON decoding cost
/// several times SQLite's own read. Bodies that start with `{` are read as
/// JSON, so documents written by hand or by older builds still load.
pub trait Record: Serialize + DeserializeOwned {
    /// Its table.
    const TABLE: Table;
    /// Its key.
    fn key(&self) -> String;

    /// A write that inserts or replaces this record.
    fn put(&self) -> Result<Write, StorageError> {
        Ok(Write::Put {
            table: Self::TABLE,
            key: self.key(),
            body: encode(self)?,
        })
    }

    /// A write that inserts this record, failing the batch if the key exists.
    fn insert(&self) -> Result<Write, StorageError> {
        Ok(Write::Insert {
            table: Self::TABLE,
            key: self.key(),
            body: encode(self)?,
        })
    }

    /// A write that deletes the record with `key`.
    fn delete(key: &str) -> Write {
        Write::Delete {
            table: Self::TABLE,
            key: key.to_owned(),
        }
    }
}

fn encode<R: Serialize>(r: &R) -> Result<Vec<u8>, StorageError> {
    let body = vec![FORMAT_POSTCARD];
    postcard::to_extend(r, body)
        .map_err(|e| StorageError::Backend(format!("encoding a record: {e}")))
}

pub(crate) fn decode<R: Record>(key: &str, body: &[u8]) -> Result<R, StorageError> {
    let corrupt = |reason: String| StorageError::Corrupt {
        table: R::TABLE,
        key: key.to_owned(),
        reason,
    };
    match body.split_first() {
        Some((&FORMAT_POSTCARD, rest)) => match postcard::take_from_bytes(rest) {
            Ok((r, [])) => Ok(r),
            Ok((_, extra)) => Err(corrupt(format!("{} trailing bytes", extra.len()))),
            Err(e) => Err(corrupt(e.to_string())),
        },
        Some((b'{', _)) => serde_json::from_slice(body).map_err(|e| corrupt(e.to_string())),
        Some((other, _)) => Err(corrupt(format!("unknown body format {other:#04x}"))),
        None => Err(corrupt("empty body".into())),
    }
}

/// Typed helpers over any [`Storage`].
pub trait StorageExt: Storage {
    /// Loads one record.
    fn load<R: Record>(&self, key: &str) -> Result<Option<R>, StorageError> {
        self.get(R::TABLE, key)?
            .map(|b| decode(key, &b))
            .transpose()
    }

    /// Loads every record of the type, ordered by key.
    fn load_all<R: Record>(&self) -> Result<Vec<R>, StorageError> {
        self.list(R::TABLE)?
            .iter()
            .map(|(k, b)| decode(k, b))
            .collect()
    }

    /// Inserts or replaces one record.
    fn save<R: Record>(&self, record: &R) -> Result<(), StorageError> {
        self.apply(&[record.put()?])
    }

    /// Deletes one record.
    fn remove<R: Record>(&self, key: &str) -> Result<(), StorageError> {
        self.apply(&[R::delete(key)])
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

/// The storage conformance suite: every [`Storage`] implementation must pass
/// it. Expands to a test module; `$make` builds a fresh, empty store.
///
/// ```
/// // In your backend's crate: the suite runs under `cargo test`.
/// mesh_core::storage_conformance_tests!(memory_backend, || mesh_core::storage::MemoryStorage::new());
/// ```
#[macro_export]
macro_rules! storage_conformance_tests {
    ($name:ident, $make:expr) => {
        #[cfg(test)]
        #[allow(clippy::unwrap_used)]
        mod $name {
            use $crate::clock::Timestamp;
            use $crate::identity::{NodeId, NodeKey};
            use $crate::storage::records::*;
            use $crate::storage::{Record, Storage, StorageError, StorageExt, Table, Write};

            fn store() -> impl Storage {
                ($make)()
            }

            fn node(n: u8) -> NodeId {
                NodeKey::from_secret_bytes(&[n; 32]).node_id()
            }

            fn put(table: Table, key: &str, body: &str) -> Write {
                Write::Put { table, key: key.into(), body: body.as_bytes().to_vec() }
            }

            fn insert(table: Table, key: &str, body: &str) -> Write {
                Write::Insert { table, key: key.into(), body: body.as_bytes().to_vec() }
            }

            #[test]
            fn scan_range_visits_exactly_the_half_open_range_in_order() {
                let s = store();
                let batch: Vec<Write> = (0..50).map(|i| put(Table::LedgerRecords, &format!("a/{i:04}"), "x")).chain((0..5).map(|i| put(Table::LedgerRecords, &format!("b/{i:04}"), "y"))).collect();
                s.apply(&batch).unwrap();
                let mut seen = Vec::new();
                s.scan_range(Table::LedgerRecords, "a/0010", "a/0020", usize::MAX, &mut |k, b| {
                    assert_eq!(b, b"x");
                    seen.push(k.to_owned());
                    Ok(())
                })
                .unwrap();
                let want: Vec<String> = (10..20).map(|i| format!("a/{i:04}")).collect();
                assert_eq!(seen, want);
                let mut count = 0;
                s.scan_range(Table::LedgerRecords, "b/", "b0", usize::MAX, &mut |_, _| { count += 1; Ok(()) }).unwrap();
                assert_eq!(count, 5);
                let mut limited = Vec::new();
                s.scan_range(Table::LedgerRecords, "a/0045", "b0", 3, &mut |k, _| { limited.push(k.to_owned()); Ok(()) }).unwrap();
                assert_eq!(limited, vec!["a/0045", "a/0046", "a/0047"]);
                s.scan_range(Table::LedgerRecords, "a/0020", "a/0010", usize::MAX, &mut |_, _| panic!("empty range")).unwrap();
                s.scan_range(Table::LedgerRecords, "a/", "b0", 0, &mut |_, _| panic!("limit 0")).unwrap();
                s.scan_range(Table::Devices, "", "~", usize::MAX, &mut |_, _| panic!("other table")).unwrap();
            }

            #[test]
            fn empty_store() {
                let s = store();
                for t in Table::ALL {
                    assert!(s.list(t).unwrap().is_empty());
                    assert_eq!(s.get(t, "x").unwrap(), None);
                }
            }

            #[test]
            fn put_get_overwrite_delete() {
                let s = store();
                s.apply(&[put(Table::Peers, "a", "1")]).unwrap();
                assert_eq!(s.get(Table::Peers, "a").unwrap(), Some(b"1".to_vec()));
                s.apply(&[put(Table::Peers, "a", "2")]).unwrap();
                assert_eq!(s.get(Table::Peers, "a").unwrap(), Some(b"2".to_vec()));
                // Tables are separate.
                assert_eq!(s.get(Table::Devices, "a").unwrap(), None);
                s.apply(&[Write::Delete { table: Table::Peers, key: "a".into() }]).unwrap();
                assert_eq!(s.get(Table::Peers, "a").unwrap(), None);
                // Deleting what is absent is fine.
                s.apply(&[Write::Delete { table: Table::Peers, key: "a".into() }]).unwrap();
            }

            #[test]
            fn list_is_ordered_by_key() {
                let s = store();
                s.apply(&[put(Table::Actions, "b", "2"), put(Table::Actions, "a", "1"), put(Table::Actions, "c", "3")])
                    .unwrap();
                let keys: Vec<String> = s.list(Table::Actions).unwrap().into_iter().map(|(k, _)| k).collect();
                assert_eq!(keys, ["a", "b", "c"]);
            }

            #[test]
            fn a_failing_batch_writes_nothing() {
                let s = store();
                s.apply(&[put(Table::Devices, "taken", "old")]).unwrap();
                let err = s
                    .apply(&[
                        put(Table::Devices, "new", "x"),
                        Write::Delete { table: Table::Devices, key: "taken".into() },
                        put(Table::Peers, "p", "y"),
                        insert(Table::PairingRequests, "r", "z"),
                        insert(Table::PairingRequests, "r", "again"),
                    ])
                    .unwrap_err();
                assert!(matches!(err, StorageError::AlreadyExists { table: Table::PairingRequests, .. }), "{err}");
                assert_eq!(s.get(Table::Devices, "new").unwrap(), None);
                assert_eq!(s.get(Table::Devices, "taken").unwrap(), Some(b"old".to_vec()));
                assert_eq!(s.get(Table::Peers, "p").unwrap(), None);
                assert_eq!(s.get(Table::PairingRequests, "r").unwrap(), None);
            }

            #[test]
            fn require_fails_the_batch_unless_its_key_exists() {
                let s = store();
                let require = |key: &str| Write::Require { table: Table::LedgerRecords, key: key.into() };
                let err = s.apply(&[put(Table::LedgerRecords, "a", "1"), require("b")]).unwrap_err();
                assert!(matches!(&err, StorageError::Missing { table: Table::LedgerRecords, key } if key == "b"), "{err}");
                assert_eq!(s.get(Table::LedgerRecords, "a").unwrap(), None, "nothing of the batch");
                // Written earlier in the same batch counts; so does committed.
                s.apply(&[put(Table::LedgerRecords, "b", "2"), require("b")]).unwrap();
                s.apply(&[require("b"), put(Table::LedgerRecords, "c", "3")]).unwrap();
                assert_eq!(s.get(Table::LedgerRecords, "c").unwrap(), Some(b"3".to_vec()));
                // Another table's key does not.
                assert!(s.apply(&[Write::Require { table: Table::Devices, key: "b".into() }]).is_err());
            }

            #[test]
            fn submitted_batches_commit_in_order_and_fail_alone() {
                let s = store();
                let require = |key: &str| Write::Require { table: Table::Actions, key: key.into() };
                let first = s.submit(vec![put(Table::Actions, "1", "a")]);
                let second = s.submit(vec![require("1"), insert(Table::Actions, "2", "b")]);
                let bad = s.submit(vec![insert(Table::Actions, "3", "c"), insert(Table::Actions, "1", "dup")]);
                let chained = s.submit(vec![require("3"), put(Table::Actions, "4", "d")]);
                let after = s.submit(vec![require("2"), put(Table::Actions, "5", "e")]);
                first.wait().unwrap();
                second.wait().unwrap();
                assert!(matches!(bad.wait(), Err(StorageError::AlreadyExists { .. })));
                assert!(matches!(chained.wait(), Err(StorageError::Missing { .. })), "a batch on a failed one fails");
                after.wait().unwrap();
                let keys: Vec<String> = s.list(Table::Actions).unwrap().into_iter().map(|(k, _)| k).collect();
                assert_eq!(keys, ["1", "2", "5"]);
                assert_eq!(s.get(Table::Actions, "1").unwrap(), Some(b"a".to_vec()));
            }

            #[test]
            fn insert_refuses_existing_keys_but_not_deleted_ones() {
                let s = store();
                s.apply(&[insert(Table::JoinTokens, "t", "1")]).unwrap();
                assert!(matches!(
                    s.apply(&[insert(Table::JoinTokens, "t", "2")]),
                    Err(StorageError::AlreadyExists { .. })
                ));
                assert_eq!(s.get(Table::JoinTokens, "t").unwrap(), Some(b"1".to_vec()));
                s.apply(&[Write::Delete { table: Table::JoinTokens, key: "t".into() }, insert(Table::JoinTokens, "t", "3")])
                    .unwrap();
                assert_eq!(s.get(Table::JoinTokens, "t").unwrap(), Some(b"3".to_vec()));
            }

            #[test]
            fn large_batches_are_atomic_too() {
                let s = store();
                let mut batch: Vec<Write> = (0..1000).map(|i| put(Table::DiscoveredNodes, &format!("{i:04}"), "{}")).collect();
                batch.push(insert(Table::DiscoveredNodes, "0500", "{}"));
                assert!(s.apply(&batch).is_err());
                assert!(s.list(Table::DiscoveredNodes).unwrap().is_empty());
                batch.pop();
                s.apply(&batch).unwrap();
                assert_eq!(s.list(Table::DiscoveredNodes).unwrap().len(), 1000);
            }

            #[test]
            fn every_record_type_round_trips() {
                let s = store();
                let t = Timestamp::from_millis(1_750_000_000_000);
                let device = DeviceRecord {
                    node: node(1),
                    device_id: "hw-1".into(),
                    name: "Phone".into(),
                    platform: $crate::wire::Platform::Ios,
                    os_version: Some("18.1".into()),
                    app_version: None,
                    address: Some("127.0.0.1:4433".into()),
                    is_primary: false,
                    status: DeviceStatus::Paired,
                    capabilities: vec!["camera".into()],
                    trust_level: 0.25,
                    token_hash: [0xab; 32],
                    scopes: vec!["events:write".into()],
                    successes: 3,
                    trust_raised_at: Some(t),
                    created_at: t,
                    paired_at: Some(t),
                    last_seen: None,
                    last_command: None,
                    revoked_at: None,
                    metadata: $crate::wire::JsonText::new(r#"{"color": "red"}"#).unwrap(),
                };
                s.save(&device).unwrap();
                assert_eq!(s.load::<DeviceRecord>(&device.key()).unwrap(), Some(device.clone()));
                let request = PairingRequestRecord {
                    request_id: "00ff".into(),
                    device_node: node(2),
                    device_id: "hw-2".into(),
                    device_name: "Tablet".into(),
                    platform: $crate::wire::Platform::Android,
                    status: PairingStatus::Pending,
                    created_at: t,
                    expires_at: t,
                    attempts_left: 5,
                    reject_reason: None,
                    device_pake: vec![1, 2, 3],
                };
                s.save(&request).unwrap();
                assert_eq!(s.load_all::<PairingRequestRecord>().unwrap(), vec![request]);
                let discovered = DiscoveredNodeRecord {
                    node: node(3),
                    name: "n".into(),
                    platform: None,
                    version: None,
                    addresses: vec!["[::1]:1".parse().unwrap()],
                    first_discovered: t,
                    last_discovered: t,
                    discovery_count: 2,
                    is_paired: false,
                    paired_device: None,
                };
                s.save(&discovered).unwrap();
                assert_eq!(s.load::<DiscoveredNodeRecord>(&discovered.key()).unwrap(), Some(discovered));
                let health = HealthRecord {
                    node: node(1),
                    last_heartbeat: t,
                    score: 90,
                    status: "healthy".into(),
                    error_count: 0,
                    last_error: None,
                    last_error_at: None,
                };
                s.save(&health).unwrap();
                assert_eq!(s.load::<HealthRecord>(&health.key()).unwrap(), Some(health));
                let policy = ExecPolicyRecord {
                    node: node(1),
                    document: $crate::wire::JsonText::new(r#"{"allowed_commands": ["*"]}"#).unwrap(),
                    updated_at: t,
                };
                s.save(&policy).unwrap();
                assert_eq!(s.load::<ExecPolicyRecord>(&policy.key()).unwrap(), Some(policy));
                let caps = CapabilitiesRecord { node: node(1), capabilities: vec!["network:localhost".into()], updated_at: t };
                s.save(&caps).unwrap();
                assert_eq!(s.load::<CapabilitiesRecord>(&caps.key()).unwrap(), Some(caps));
                let member = $crate::mesh::member::MemberId::new(
                    &$crate::identity::NodeKey::from_secret_bytes(&[4; 32]), 3, "desk",
                    vec![$crate::transport::PeerAddr::Memory("m".into())],
                ).unwrap();
                let peer = PeerRecord::new(member, t);
                s.save(&peer).unwrap();
                assert_eq!(s.load::<PeerRecord>(&peer.key()).unwrap(), Some(peer));
                let block = BlockRecord { node: node(5), by: node(1), reason: "spam".into(), at: t };
                s.save(&block).unwrap();
                assert_eq!(s.load::<BlockRecord>(&block.key()).unwrap(), Some(block));
                let token = JoinTokenRecord { id: "0011223344556677".into(), secret_hash: [7; 32], issuer: node(1), created_at: t, expires_at: t, used_by: Some(node(2)), used_at: Some(t), revoked_at: None };
                s.save(&token).unwrap();
                assert_eq!(s.load::<JoinTokenRecord>(&token.key()).unwrap(), Some(token));
                let action = ActionRecord {
                    id: "a1".into(),
                    state: ActionState::Proposed,
                    command: "backup".into(),
                    params: $crate::wire::JsonText::new("{}").unwrap(),
                    proposed_by: node(2),
                    decided_by: None,
                    created_at: t,
                    updated_at: t,
                    result: None,
                    error: None,
                };
                s.save(&action).unwrap();
                assert_eq!(s.load::<ActionRecord>(&action.key()).unwrap(), Some(action));
                s.remove::<ActionRecord>("a1").unwrap();
                assert_eq!(s.load::<ActionRecord>("a1").unwrap(), None);
            }

            #[test]
            fn json_documents_still_load_and_bodies_are_binary() {
                let s = store();
                let n = node(7);
                let json = format!(
                    r#"{{"node": "{n}", "by": "{n}", "reason": "hand-written", "at": 5}}"#
                );
                s.apply(&[put(Table::Blocklist, &n.to_string(), &json)]).unwrap();
                let block: BlockRecord = s.load(&n.to_string()).unwrap().unwrap();
                assert_eq!(block.reason, "hand-written");
                // Saved again, it is stored in the binary format.
                s.save(&block).unwrap();
                let body = s.get(Table::Blocklist, &n.to_string()).unwrap().unwrap();
                assert_eq!(body[0], $crate::storage::FORMAT_POSTCARD);
                assert_eq!(s.load::<BlockRecord>(&n.to_string()).unwrap(), Some(block));
            }

            #[test]
            fn scan_visits_in_key_order_and_stops_on_error() {
                let s = store();
                s.apply(&[put(Table::Peers, "b", "2"), put(Table::Peers, "a", "1"), put(Table::Peers, "c", "3")]).unwrap();
                let mut seen = Vec::new();
                let res = s.scan(Table::Peers, &mut |k, b| {
                    seen.push((k.to_owned(), b.to_vec()));
                    if k == "b" {
                        return Err(StorageError::Backend("stop".into()));
                    }
                    Ok(())
                });
                assert!(matches!(res, Err(StorageError::Backend(m)) if m == "stop"));
                assert_eq!(seen, [("a".to_owned(), b"1".to_vec()), ("b".to_owned(), b"2".to_vec())]);
            }

            #[test]
            fn a_corrupt_document_is_a_typed_error() {
                let s = store();
                for body in [&b"\x07garbage"[..], &b"\x01\xff\xff"[..], &b""[..]] {
                    s.apply(&[Write::Put { table: Table::Peers, key: "y".into(), body: body.to_vec() }]).unwrap();
                    assert!(matches!(s.load::<PeerRecord>("y"), Err(StorageError::Corrupt { .. })), "{body:?}");
                }
                s.remove::<PeerRecord>("y").unwrap();
                let s = store();
                s.apply(&[put(Table::Peers, "x", "{not json")]).unwrap();
                assert!(matches!(s.load::<PeerRecord>("x"), Err(StorageError::Corrupt { .. })));
                assert!(matches!(s.load_all::<PeerRecord>(), Err(StorageError::Corrupt { .. })));
            }
        }
    };
}
