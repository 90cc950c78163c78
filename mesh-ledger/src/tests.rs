use std::sync::Arc;

use mesh_core::clock::Timestamp;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::ledger::{Body, Entry, Ledger, LedgerError, record_types};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage, StorageError, Table, Write};
use proptest::prelude::*;

use crate::record::offsets;
use crate::verify::record_key;
use crate::*;

fn key(seed: u8) -> Arc<NodeKey> {
    Arc::new(NodeKey::from_secret_bytes(&[seed; 32]))
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

const TYPES: [&str; 4] = [
    record_types::PAIRING_APPROVED,
    record_types::COMMAND_DECIDED,
    record_types::POLICY_SET,
    "app.custom-event_1",
];

fn entry(i: u64, actor: NodeId) -> Entry {
    if i.is_multiple_of(3) {
        Entry {
            record_type: TYPES[(i % 4) as usize].into(),
            actor,
            body: Body::Bytes((0..(i % 40) as u8).collect()),
        }
    } else {
        Entry::json(
            TYPES[(i % 4) as usize],
            actor,
            &serde_json::json!({"i": i, "device": format!("dev-{}", i % 7)}),
        )
    }
}

fn store() -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new())
}

/// A ledger of `n` entries, ending with a checkpoint.
fn build(
    store: &Arc<dyn Storage>,
    author: &Arc<NodeKey>,
    n: u64,
    config: LedgerConfig,
) -> SignedLedger {
    let ledger = SignedLedger::open(store.clone(), author.clone(), config).unwrap();
    for i in 0..n {
        ledger
            .append(vec![entry(i, key(9).node_id())], vec![], t(1_000 + i))
            .unwrap();
    }
    ledger.checkpoint(t(1_000 + n)).unwrap();
    ledger
}

fn stored(store: &Arc<dyn Storage>, author: &NodeId, seq: u64) -> Vec<u8> {
    store
        .get(Table::LedgerRecords, &record_key(author, seq))
        .unwrap()
        .unwrap()
}

fn put(store: &Arc<dyn Storage>, author: &NodeId, seq: u64, body: Vec<u8>) {
    store
        .apply(&[Write::Put {
            table: Table::LedgerRecords,
            key: record_key(author, seq),
            body,
        }])
        .unwrap();
}

fn verify(store: &Arc<dyn Storage>, author: &NodeId) -> Report {
    verify_ledger(store.as_ref(), author, None).unwrap()
}

#[test]
fn an_untouched_ledger_verifies() {
    let s = store();
    let a = key(1);
    let ledger = build(&s, &a, 50, LedgerConfig::default().checkpoint_every(8));
    let r = verify(&s, &a.node_id());
    assert!(r.ok(), "{r:?}");
    // 50 entries, a checkpoint after every 8 (6), and the final one.
    assert_eq!(r.records, 57);
    assert_eq!(r.checkpoints, 7);
    assert_eq!(r.uncovered, 0);
    assert_eq!(ledger.len(), 57);
    assert_eq!(ledger.view().latest_checkpoint().unwrap().size, 56);
}

/// The expected problems for a byte flipped at `offset` of record `seq`.
fn expected_for_flip(bytes: &[u8], offset: usize, is_last: bool) -> Vec<&'static str> {
    let record = LedgerRecord::decode(bytes).unwrap();
    let canonical = record.canonical().len();
    if (offsets::PREV..offsets::PREV + 32).contains(&offset) {
        vec!["wrong_previous_hash"]
    } else if offset == canonical {
        vec!["body_edited"]
    } else if offset > canonical && offset <= canonical + 32 {
        vec!["foreign_signature"]
    } else if offset > canonical + 32 {
        vec!["bad_signature"]
    } else if is_last && record.signature.is_some() {
        // Only its own signature commits to the last record.
        vec!["bad_signature", "body_edited"]
    } else {
        vec!["body_edited"]
    }
}

#[derive(Debug, Clone)]
enum Tamper {
    Flip {
        record: u64,
        offset: usize,
        mask: u8,
    },
    Delete {
        record: u64,
    },
    Swap {
        a: u64,
        b: u64,
    },
    Resign {
        record: u64,
    },
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        (any::<u64>(), any::<usize>(), 1u8..).prop_map(|(record, offset, mask)| Tamper::Flip {
            record,
            offset,
            mask
        }),
        any::<u64>().prop_map(|record| Tamper::Delete { record }),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Tamper::Swap { a, b }),
        any::<u64>().prop_map(|record| Tamper::Resign { record }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_single_tampering_is_found_at_exactly_that_record(
        n in 1u64..40,
        every in 1u64..12,
        sign in any::<bool>(),
        how in tamper(),
    ) {
        let s = store();
        let a = key(1);
        let author = a.node_id();
        build(&s, &a, n, LedgerConfig::default().checkpoint_every(every).sign_records(sign));
        let len = verify(&s, &author).records;
        let last = len - 1;
        let (at, problems): (u64, Vec<&str>) = match how {
            Tamper::Flip { record, offset, mask } => {
                let seq = record % len;
                let mut bytes = stored(&s, &author, seq);
                let offset = offset % bytes.len();
                let expected = expected_for_flip(&bytes, offset, seq == last);
                bytes[offset] ^= mask;
                put(&s, &author, seq, bytes);
                (seq, expected)
            }
            Tamper::Delete { record } => {
                // Removing the last record leaves a shorter, valid-looking
                // ledger; that needs a checkpoint known from elsewhere (tested
                // separately).
                if last == 0 { return Ok(()); }
                let seq = record % last;
                s.apply(&[Write::Delete { table: Table::LedgerRecords, key: record_key(&author, seq) }]).unwrap();
                (seq, vec!["record_removed"])
            }
            Tamper::Swap { a: x, b: y } => {
                let (x, y) = (x % len, y % len);
                if x == y { return Ok(()); }
                let (lo, hi) = (x.min(y), x.max(y));
                let (bl, bh) = (stored(&s, &author, lo), stored(&s, &author, hi));
                put(&s, &author, lo, bh);
                put(&s, &author, hi, bl);
                (lo, vec!["records_reordered"])
            }
            Tamper::Resign { record } => {
                let seq = record % len;
                let mut r = LedgerRecord::decode(&stored(&s, &author, seq)).unwrap();
                r.sign(&key(2));
                put(&s, &author, seq, r.encode());
                (seq, vec!["foreign_signature"])
            }
        };
        let report = verify(&s, &author);
        prop_assert_eq!(report.first_bad, Some(at), "{:?}", report);
        let code = report.problem.as_ref().map(Problem::code).unwrap_or("none");
        prop_assert!(problems.contains(&code), "expected {:?}, got {:?}", problems, report.problem);
        if let Some(Problem::Reordered { found_seq }) = report.problem {
            prop_assert!(found_seq != at);
        }
        // A damaged ledger is refused rather than extended.
        let refused = matches!(SignedLedger::open(s.clone(), a.clone(), LedgerConfig::default()), Err(LedgerError::Damaged { .. }));
        prop_assert!(refused);
    }
}

#[test]
fn a_validly_signed_checkpoint_with_a_wrong_root_is_a_root_mismatch() {
    let s = store();
    let a = key(1);
    let ledger = build(&s, &a, 5, LedgerConfig::default());
    // The author's key signs a checkpoint record whose root is not the records'.
    let view = ledger.view();
    let prev = view.records(5, 1).unwrap()[0].leaf_hash();
    let (_, bogus) = crate::record::Checkpoint::make(&a, 6, [7; 32], prev, t(9_999));
    put(&s, &a.node_id(), 6, bogus.encode());
    let r = verify(&s, &a.node_id());
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(6), Some(Problem::CheckpointMismatch))
    );
}

#[test]
fn a_rewritten_or_truncated_history_is_caught_by_a_checkpoint_known_elsewhere() {
    let a = key(1);
    let (honest, rewritten) = (store(), store());
    let ledger = build(
        &honest,
        &a,
        30,
        LedgerConfig::default().checkpoint_every(10),
    );
    let known = ledger.view().latest_checkpoint().unwrap();
    // The author rewrites everything and re-signs: internally consistent.
    let forged = SignedLedger::open(
        rewritten.clone(),
        a.clone(),
        LedgerConfig::default().checkpoint_every(10),
    )
    .unwrap();
    for i in 0..40 {
        forged
            .append(vec![entry(i + 100, a.node_id())], vec![], t(5_000))
            .unwrap();
    }
    forged.checkpoint(t(6_000)).unwrap();
    assert!(verify(&rewritten, &a.node_id()).ok());
    let r = verify_ledger(rewritten.as_ref(), &a.node_id(), Some(&known)).unwrap();
    assert_eq!(r.problem, Some(Problem::CheckpointMismatch));
    // Records dropped from the end are missed alone, caught against a checkpoint.
    let len = ledger.len();
    for seq in (len - 5)..len {
        honest
            .apply(&[Write::Delete {
                table: Table::LedgerRecords,
                key: record_key(&a.node_id(), seq),
            }])
            .unwrap();
    }
    assert!(verify(&honest, &a.node_id()).ok());
    let r = verify_ledger(honest.as_ref(), &a.node_id(), Some(&known)).unwrap();
    assert_eq!(
        (r.first_bad, r.problem),
        (Some(len - 5), Some(Problem::Removed))
    );
}

#[test]
fn checkpoints_come_every_n_records_every_t_ms_and_on_demand() {
    let s = store();
    let a = key(1);
    let config = LedgerConfig::default()
        .checkpoint_every(4)
        .checkpoint_interval_ms(1_000);
    let ledger = SignedLedger::open(s.clone(), a.clone(), config).unwrap();
    let one = |i| vec![entry(i, a.node_id())];
    // Every 4 records.
    let appended = ledger
        .append((0..4).flat_map(one).collect(), vec![], t(0))
        .unwrap();
    assert_eq!((appended.first_seq, appended.count), (0, 5));
    assert_eq!(ledger.view().latest_checkpoint().unwrap().size, 4);
    // After 1 s with records uncovered: on the next tick, not before.
    ledger.append(one(4), vec![], t(100)).unwrap();
    assert!(!ledger.tick(t(1_099)).unwrap());
    assert!(ledger.tick(t(1_100)).unwrap());
    assert_eq!(ledger.view().latest_checkpoint().unwrap().size, 6);
    assert!(!ledger.tick(t(50_000)).unwrap(), "nothing uncovered");
    // ... or on the append that finds the interval passed.
    ledger.append(one(5), vec![], t(2_000)).unwrap();
    let appended = ledger.append(one(6), vec![], t(3_000)).unwrap();
    assert_eq!(appended.count, 2);
    // On demand; idempotent when nothing is uncovered.
    ledger.append(one(7), vec![], t(3_001)).unwrap();
    let cp = ledger.checkpoint(t(3_002)).unwrap().unwrap();
    assert_eq!(ledger.checkpoint(t(3_003)).unwrap().unwrap(), cp);
    assert_eq!(cp.size, ledger.len() - 1);
    cp.verify(&a.node_id()).unwrap();
    assert!(verify(&s, &a.node_id()).ok());
}

#[test]
fn appends_commit_with_the_callers_writes_or_not_at_all() {
    let s = store();
    let a = key(1);
    let ledger = SignedLedger::open(s.clone(), a.clone(), LedgerConfig::default()).unwrap();
    let device = |k: &str| Write::Insert {
        table: Table::Devices,
        key: k.into(),
        body: b"{}".to_vec(),
    };
    ledger
        .append(vec![entry(0, a.node_id())], vec![device("d1")], t(1))
        .unwrap();
    assert!(s.get(Table::Devices, "d1").unwrap().is_some());
    // The caller's insert conflicts: the batch fails, and the ledger with it.
    let failed = ledger.append(vec![entry(1, a.node_id())], vec![device("d1")], t(2));
    assert!(matches!(
        failed,
        Err(LedgerError::Storage(StorageError::AlreadyExists { .. }))
    ));
    assert_eq!(ledger.len(), 1);
    assert_eq!(s.list(Table::LedgerRecords).unwrap().len(), 1);
    // The ledger carries on from where it was.
    ledger
        .append(vec![entry(2, a.node_id())], vec![device("d2")], t(3))
        .unwrap();
    ledger.checkpoint(t(4)).unwrap();
    assert_eq!(ledger.len(), 3);
    assert!(verify(&s, &a.node_id()).ok());
}

#[test]
fn bad_entries_are_refused_and_change_nothing() {
    let s = store();
    let a = key(1);
    let ledger = SignedLedger::open(s.clone(), a.clone(), LedgerConfig::default()).unwrap();
    let bad = [
        Entry {
            record_type: "Has Upper".into(),
            actor: a.node_id(),
            body: Body::Bytes(vec![]),
        },
        Entry {
            record_type: String::new(),
            actor: a.node_id(),
            body: Body::Bytes(vec![]),
        },
        Entry {
            record_type: "x".repeat(65),
            actor: a.node_id(),
            body: Body::Bytes(vec![]),
        },
        Entry {
            record_type: "big".into(),
            actor: a.node_id(),
            body: Body::Bytes(vec![0; mesh_core::ledger::MAX_BODY_LEN + 1]),
        },
        Entry {
            record_type: record_types::CHECKPOINT.into(),
            actor: a.node_id(),
            body: Body::Bytes(vec![]),
        },
    ];
    for e in bad {
        let good = entry(0, a.node_id());
        assert!(matches!(
            ledger.append(vec![good, e], vec![], t(1)),
            Err(LedgerError::InvalidEntry(_))
        ));
    }
    assert_eq!(ledger.len(), 0);
    assert!(s.list(Table::LedgerRecords).unwrap().is_empty());
}

#[test]
fn sqlite_ledger_reopens_where_it_was_and_keeps_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let a = key(1);
    let config = LedgerConfig::default()
        .checkpoint_every(16)
        .sign_records(true);
    {
        let s: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&path).unwrap());
        let ledger = SignedLedger::open(s, a.clone(), config.clone()).unwrap();
        let batch: Vec<Entry> = (0..100).map(|i| entry(i, a.node_id())).collect();
        ledger.append(batch, vec![], t(10)).unwrap();
    }
    let s: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&path).unwrap());
    let ledger = SignedLedger::open(s.clone(), a.clone(), config).unwrap();
    // 100 entries and 6 checkpoints (after 16, 32, ... 96).
    assert_eq!(ledger.len(), 106);
    ledger
        .append(vec![entry(100, a.node_id())], vec![], t(20))
        .unwrap();
    ledger.checkpoint(t(21)).unwrap();
    let r = verify(&s, &a.node_id());
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.records, r.checkpoints), (108, 7));
    let shown = ledger.view().records(0, 3).unwrap();
    assert_eq!(shown.len(), 3);
    assert!(shown.iter().all(|r| r.signature.is_some()));
    assert_eq!(ledger_authors(s.as_ref()).unwrap(), vec![a.node_id()]);
}

#[test]
fn inclusion_and_consistency_proofs_check_against_checkpoints_alone() {
    let s = store();
    let a = key(1);
    let ledger = build(&s, &a, 200, LedgerConfig::default().checkpoint_every(64));
    let view = ledger.view();
    let cps = view.checkpoints();
    assert!(cps.len() >= 3);
    let (old, new) = (&cps[0], cps.last().unwrap());
    for seq in [0, 1, 63, old.size - 1] {
        let record = view.record(seq).unwrap().unwrap();
        let proof = view.inclusion_proof(seq, new.size).unwrap();
        verify_record_inclusion(&record, &proof, new, &a.node_id()).unwrap();
        let mut other = record.clone();
        other.timestamp = t(1);
        assert_eq!(
            verify_record_inclusion(&other, &proof, new, &a.node_id()),
            Err(ProofCheckError::Mismatch)
        );
        assert!(verify_record_inclusion(&record, &proof, new, &key(2).node_id()).is_err());
    }
    let proof = view.consistency_proof(old.size, new.size).unwrap();
    verify_checkpoint_consistency(old, new, &proof, &a.node_id()).unwrap();
    let mut bad = proof.clone();
    bad.path[0][0] ^= 1;
    assert_eq!(
        verify_checkpoint_consistency(old, new, &bad, &a.node_id()),
        Err(ProofCheckError::Mismatch)
    );
    assert!(verify_checkpoint_consistency(new, old, &proof, &a.node_id()).is_err());
}

#[test]
fn records_are_typed_and_read_back() {
    let s = store();
    let a = key(1);
    let ledger = build(&s, &a, 3, LedgerConfig::default());
    let records = ledger.view().records(0, 10).unwrap();
    assert_eq!(records.len(), 4);
    assert_eq!(records[0].record_type, TYPES[0]);
    assert_eq!(records[1].body, entry(1, key(9).node_id()).body);
    assert_eq!(records[3].record_type, record_types::CHECKPOINT);
    assert!(
        records
            .windows(2)
            .all(|w| w[1].prev_hash == w[0].leaf_hash())
    );
    assert_eq!(ledger.view().records(2, 1).unwrap()[0].seq, 2);
    assert!(ledger.view().record(99).unwrap().is_none());
}

mod replication {
    use mesh_core::clock::ManualClock;
    use mesh_core::transport::{AdmitAll, Connection, Protocol, Transport};
    use mesh_transport::memory::{MemoryNetwork, MemoryTransport};

    use super::*;
    use crate::sync::{pull, serve_sync};

    struct Link {
        _net: MemoryNetwork,
        _server: MemoryTransport,
        client: MemoryTransport,
        server_addr: mesh_core::transport::PeerAddr,
        server_node: NodeId,
    }

    async fn accept_and_serve(
        server: &MemoryTransport,
        ledger: Arc<SignedLedger>,
    ) -> tokio::task::JoinHandle<()> {
        let conn = server.accept().await.unwrap();
        tokio::spawn(async move {
            let clock = ManualClock::new(t(1_000_000));
            let _ = serve_sync(conn.as_ref(), &ledger, &clock).await;
        })
    }

    /// An endpoint of the ledger's author, and a client to reach it.
    fn link(net: &MemoryNetwork, ledger: &Arc<SignedLedger>, name: &str) -> Link {
        let server_node = ledger.author();
        let server = net.endpoint(server_node, name, Arc::new(AdmitAll)).unwrap();
        let server_addr = server.addr();
        let client = net
            .endpoint(
                key(50).node_id(),
                &format!("{name}-client"),
                Arc::new(AdmitAll),
            )
            .unwrap();
        Link {
            _net: net.clone(),
            _server: server,
            client,
            server_addr,
            server_node,
        }
    }

    async fn connect(l: &Link) -> Box<dyn Connection> {
        l.client
            .connect(l.server_node, &l.server_addr, Protocol::MESH)
            .await
            .unwrap()
    }

    async fn sync_once(
        l: &Link,
        ledger: &Arc<SignedLedger>,
        replica: &Replica,
    ) -> Result<u64, ReplicationError> {
        let (conn, served) = tokio::join!(connect(l), accept_and_serve(&l._server, ledger.clone()));
        let result = pull(conn.as_ref(), replica).await;
        conn.close();
        served.await.unwrap();
        result
    }

    #[tokio::test]
    async fn a_replica_catches_up_in_several_rounds_and_verifies() {
        let net = MemoryNetwork::new(1);
        let a = key(1);
        let author_store = store();
        let ledger = Arc::new(build(
            &author_store,
            &a,
            9_000,
            LedgerConfig::default().checkpoint_every(500),
        ));
        let l = link(&net, &ledger, "author");
        let replica_store = store();
        let replica = Replica::open(replica_store.clone(), a.node_id()).unwrap();
        let added = sync_once(&l, &ledger, &replica).await.unwrap();
        assert_eq!(added, ledger.len());
        assert_eq!(replica.view().len(), ledger.len());
        assert_eq!(
            replica.view().latest_checkpoint(),
            ledger.view().latest_checkpoint()
        );
        assert!(verify(&replica_store, &a.node_id()).ok());
        assert_eq!(
            replica.view().records(4_000, 50).unwrap(),
            ledger.view().records(4_000, 50).unwrap()
        );
        // Reopened from storage, the replica knows where it was.
        let reopened = Replica::open(replica_store, a.node_id()).unwrap();
        assert_eq!(reopened.request().from, ledger.len());
        assert_eq!(sync_once(&l, &ledger, &reopened).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn entries_made_offline_sync_when_the_peer_is_back() {
        let net = MemoryNetwork::new(2);
        let a = key(1);
        let ledger = Arc::new(build(&store(), &a, 10, LedgerConfig::default()));
        let l = link(&net, &ledger, "author");
        let replica = Replica::open(store(), a.node_id()).unwrap();
        assert_eq!(sync_once(&l, &ledger, &replica).await.unwrap(), 11);
        // Partitioned: the replica cannot reach the author; the author keeps writing.
        net.partition(l.client.local_node(), a.node_id());
        assert!(
            l.client
                .connect(a.node_id(), &l.server_addr, Protocol::MESH)
                .await
                .is_err()
        );
        for i in 0..25 {
            ledger
                .append(vec![entry(i, a.node_id())], vec![], t(50_000 + i))
                .unwrap();
        }
        // Back: the author checkpoints on serving, the replica gets everything.
        net.heal(l.client.local_node(), a.node_id());
        let added = sync_once(&l, &ledger, &replica).await.unwrap();
        assert_eq!(added, 26);
        assert_eq!(replica.view().len(), ledger.len());
        assert_eq!(
            replica.view().records(11, 25).unwrap(),
            ledger.view().records(11, 25).unwrap()
        );
    }

    #[tokio::test]
    async fn an_author_signing_two_histories_is_reported_with_both_checkpoints() {
        let net = MemoryNetwork::new(3);
        let a = key(1);
        let honest = Arc::new(build(
            &store(),
            &a,
            20,
            LedgerConfig::default().checkpoint_every(10),
        ));
        // The same key, another history of the same length.
        let forked_store = store();
        let forked = SignedLedger::open(
            forked_store,
            a.clone(),
            LedgerConfig::default().checkpoint_every(10),
        )
        .unwrap();
        for i in 0..20 {
            forked
                .append(vec![entry(i + 500, a.node_id())], vec![], t(1_000 + i))
                .unwrap();
        }
        forked.checkpoint(t(2_000)).unwrap();
        let forked = Arc::new(forked);
        let replica = Replica::open(store(), a.node_id()).unwrap();
        let to_honest = link(&net, &honest, "honest");
        sync_once(&to_honest, &honest, &replica).await.unwrap();
        let to_fork = link(&net, &forked, "fork");
        match sync_once(&to_fork, &forked, &replica).await {
            Err(ReplicationError::Fork(evidence)) => {
                assert_eq!(evidence.first.size, evidence.second.size);
                assert_ne!(evidence.first.root, evidence.second.root);
                evidence.first.verify(&a.node_id()).unwrap();
                evidence.second.verify(&a.node_id()).unwrap();
            }
            other => panic!("expected a fork, got {other:?}"),
        }
        // The fork grows on: a later checkpoint inconsistent with ours.
        for i in 0..15 {
            forked
                .append(vec![entry(i + 900, a.node_id())], vec![], t(3_000 + i))
                .unwrap();
        }
        match sync_once(&to_fork, &forked, &replica).await {
            Err(ReplicationError::Fork(evidence)) => {
                assert!(evidence.first.size < evidence.second.size, "{evidence}");
                assert_eq!(evidence.first, replica.view().latest_checkpoint().unwrap());
            }
            other => panic!("expected a fork, got {other:?}"),
        }
        // Nothing of the fork was stored.
        assert_eq!(replica.view().len(), honest.len());
    }

    #[test]
    fn answers_that_do_not_verify_are_refused_and_store_nothing() {
        let a = key(1);
        let ledger = build(
            &store(),
            &a,
            30,
            LedgerConfig::default().checkpoint_every(10),
        );
        let replica_store = store();
        let replica = Replica::open(replica_store.clone(), a.node_id()).unwrap();
        let good = ledger.view().serve(&replica.request()).unwrap();
        // A record edited in transit.
        let mut edited = good.clone();
        let last = edited.records.len() / 2;
        let b = edited.records[last].as_mut();
        let n = b.len();
        b[n - 2] ^= 1;
        assert!(matches!(
            replica.apply(edited),
            Err(ReplicationError::Invalid(_))
        ));
        // A record dropped.
        let mut short = good.clone();
        short.records.remove(3);
        assert!(matches!(
            replica.apply(short),
            Err(ReplicationError::Invalid(_))
        ));
        // A checkpoint signed by someone else.
        let mut foreign = good.clone();
        let other = build(
            &store(),
            &key(2),
            30,
            LedgerConfig::default().checkpoint_every(10),
        );
        foreign.checkpoint = other.view().latest_checkpoint();
        assert!(matches!(
            replica.apply(foreign),
            Err(ReplicationError::WrongLedger { .. })
        ));
        // Garbage bytes.
        assert!(crate::sync::SyncResponse::decode(&[0xff; 7]).is_err());
        assert!(replica_store.list(Table::LedgerRecords).unwrap().is_empty());
        assert_eq!(replica.apply(good).unwrap(), ledger.len());
    }
}

/// Storage whose writer is held: batches queue until `release`, then go
/// through (in order) and later ones apply at once.
#[derive(Debug, Default)]
struct HeldStorage {
    inner: MemoryStorage,
    queue: std::sync::Mutex<Option<Vec<QueuedBatch>>>,
}

type QueuedBatch = (
    Vec<Write>,
    std::sync::mpsc::SyncSender<Result<(), StorageError>>,
);

impl HeldStorage {
    fn held() -> Self {
        HeldStorage {
            inner: MemoryStorage::new(),
            queue: std::sync::Mutex::new(Some(Vec::new())),
        }
    }

    fn queued(&self) -> usize {
        self.queue.lock().unwrap().as_ref().map_or(0, Vec::len)
    }

    fn wait_queued(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.queued() < n {
            assert!(std::time::Instant::now() < deadline, "batches never queued");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn release(&self) {
        let mut q = self.queue.lock().unwrap();
        for (batch, done) in q.take().unwrap_or_default() {
            done.send(self.inner.apply(&batch)).unwrap();
        }
    }
}

impl Storage for HeldStorage {
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(table, key)
    }
    fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        self.inner.list(table)
    }
    fn apply(&self, batch: &[Write]) -> Result<(), StorageError> {
        self.submit(batch.to_vec()).wait()
    }
    fn submit(&self, batch: Vec<Write>) -> mesh_core::storage::Pending {
        let mut q = self.queue.lock().unwrap();
        match q.as_mut() {
            Some(q) => {
                let (done, outcome) = std::sync::mpsc::sync_channel(1);
                q.push((batch, done));
                mesh_core::storage::Pending::waiting(outcome)
            }
            None => mesh_core::storage::Pending::ready(self.inner.apply(&batch)),
        }
    }
}

#[test]
fn a_failed_batch_fails_the_batches_chained_on_it_and_they_are_appended_again() {
    let held = Arc::new(HeldStorage::held());
    let store: Arc<dyn Storage> = held.clone();
    let author = key(1);
    let ledger = Arc::new(
        SignedLedger::open(store.clone(), author.clone(), LedgerConfig::default()).unwrap(),
    );
    let actor = key(9).node_id();
    let taken = Write::Put {
        table: Table::Devices,
        key: "taken".into(),
        body: b"x".to_vec(),
    };
    held.inner.apply(&[taken]).unwrap();

    // A's own write fails (the key is taken); B and C were built on A's
    // records while A was still queued.
    let a = {
        let ledger = ledger.clone();
        std::thread::spawn(move || {
            ledger.append(
                vec![entry(0, actor), entry(1, actor)],
                vec![Write::Insert {
                    table: Table::Devices,
                    key: "taken".into(),
                    body: b"y".to_vec(),
                }],
                t(10),
            )
        })
    };
    held.wait_queued(1);
    assert_eq!(ledger.len(), 0, "readers see only what is durable");
    assert_eq!(ledger.view().latest_checkpoint(), None);
    let spawn_one = |i: u64| {
        let ledger = ledger.clone();
        std::thread::spawn(move || ledger.append(vec![entry(i, actor)], vec![], t(10 + i)))
    };
    let b = spawn_one(2);
    held.wait_queued(2);
    let c = spawn_one(3);
    held.wait_queued(3);
    held.release();

    assert!(matches!(
        a.join().unwrap(),
        Err(LedgerError::Storage(StorageError::AlreadyExists { .. }))
    ));
    b.join().unwrap().unwrap();
    c.join().unwrap().unwrap();
    assert_eq!(ledger.len(), 2, "A's records are gone, B's and C's remain");
    // The stored chain has no gap and verifies from the start.
    let reopened =
        SignedLedger::open(store.clone(), author.clone(), LedgerConfig::default()).unwrap();
    let bodies: Vec<Body> = reopened
        .view()
        .records(0, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.body)
        .collect();
    // B and C were built again in whichever order their retries ran.
    assert_eq!(bodies.len(), 2);
    for want in [entry(2, actor).body, entry(3, actor).body] {
        assert!(bodies.contains(&want), "{want:?} missing from {bodies:?}");
    }
    // And it goes on: the next append chains on the last of them.
    reopened
        .append(vec![entry(4, actor)], vec![], t(20))
        .unwrap();
    assert_eq!(reopened.checkpoint(t(21)).unwrap().unwrap().size, 3);
}

#[test]
fn concurrent_appends_on_sqlite_share_transactions_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let sqlite = Arc::new(SqliteStorage::open(&path).unwrap());
    let store: Arc<dyn Storage> = sqlite.clone();
    let author = key(1);
    let ledger = Arc::new(
        SignedLedger::open(
            store,
            author.clone(),
            LedgerConfig::default().checkpoint_every(50),
        )
        .unwrap(),
    );
    let actor = key(9).node_id();
    let threads: Vec<_> = (0..8u64)
        .map(|th| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    ledger
                        .append(vec![entry(th * 100 + i, actor)], vec![], t(1_000))
                        .unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let stats = sqlite.write_stats();
    // 320 entries, 6 checkpoints on the way (every 50), all in 320 batches.
    assert_eq!(stats.batches, 320);
    assert_eq!(ledger.len(), 326);
    drop(ledger);
    drop(Arc::into_inner(sqlite));
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&path).unwrap());
    let reopened = SignedLedger::open(store, author, LedgerConfig::default()).unwrap();
    assert_eq!(reopened.len(), 326);
}
