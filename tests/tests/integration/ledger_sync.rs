//! Ledger replication through the runtime, over QUIC on 127.0.0.1:
//! members hold verified replicas of each other's ledgers, and a member
//! that signs a second history is caught with the evidence.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::clock::{Clock, SystemClock};
use mesh_core::identity::NodeKey;
use mesh_core::ledger::{Entry, Ledger, LedgerHolding};
use mesh_core::node::{MeshSettings, Node, NodeConfig, Primary, RegistryAdmission, Role};
use mesh_core::storage::records::PeerStatus;
use mesh_core::storage::{MemoryStorage, Storage};
use mesh_core::transport::PeerAddr;
use mesh_ledger::{LedgerConfig, LedgerHub, SignedLedger};
use mesh_transport::quic::{QuicConfig, QuicTransport};

use crate::mesh_runtime::until;
use crate::support::next;

struct Member {
    node: Primary,
    ledger: Arc<SignedLedger>,
}

/// A primary whose ledger checkpoints every 100 ms, replicating ledgers
/// with its mesh.
fn member(name: &str, store: Arc<dyn Storage>, key: Arc<NodeKey>) -> Member {
    let loopback = "127.0.0.1:0".parse().unwrap();
    let (node, ledger, _) = ledger_node(Role::Primary, name, store, key, loopback, true);
    Member {
        node: node.as_primary().unwrap(),
        ledger,
    }
}

fn append(ledger: &SignedLedger, n: usize, what: &str) {
    let author = ledger.author();
    for i in 0..n {
        ledger
            .append(
                vec![Entry::json(
                    "app.note",
                    author,
                    &serde_json::json!({ "what": what, "i": i }),
                )],
                Vec::new(),
                SystemClock.now(),
            )
            .unwrap();
    }
}

fn held<'a>(
    holdings: &'a [LedgerHolding],
    author: &mesh_core::identity::NodeId,
) -> Option<&'a LedgerHolding> {
    holdings.iter().find(|h| h.author == *author && !h.own)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replicate_each_others_ledgers_and_a_fork_is_caught_with_its_evidence() {
    let a = member(
        "a",
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let b = member(
        "b",
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let t = a.node.mesh_token(None).await.unwrap();
    b.node.join_mesh(&t.token).await.unwrap();
    until(&a.node, "b active", |v| {
        v.peers.iter().any(|p| p.status == PeerStatus::Active)
    })
    .await;
    append(&a.ledger, 30, "a's history");

    // b comes to hold a's ledger as a checkpointed, verified replica.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let own = a.node.ledger_replicas().await.unwrap();
        let mine = own.iter().find(|h| h.own).unwrap().clone();
        let theirs = b.node.ledger_replicas().await.unwrap();
        if let (Some(cp), Some(r)) = (&mine.checkpoint, held(&theirs, &a.node.node_id()))
            && r.checkpoint.as_ref() == Some(cp)
            && r.records == mine.records
            && cp.size >= 30
        {
            assert!(r.fork.is_none());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never held a's ledger: {theirs:?} vs {mine:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // c joins, is replicated, then signs a second history with the same key.
    let c_key = Arc::new(NodeKey::generate());
    let c = member("c", Arc::new(MemoryStorage::new()), c_key.clone());
    let t = b.node.mesh_token(None).await.unwrap();
    c.node.join_mesh(&t.token).await.unwrap();
    append(&c.ledger, 10, "the first history");
    let c_id = c_key.node_id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while held(&b.node.ledger_replicas().await.unwrap(), &c_id).is_none_or(|h| h.records < 10) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never held c's ledger"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut forks = b.node.subscribe("ledger.fork", 8).unwrap();
    c.node.shutdown().await;
    drop(c);
    let c2 = member("c", Arc::new(MemoryStorage::new()), c_key);
    append(&c2.ledger, 40, "a second history");
    let t = a.node.mesh_token(None).await.unwrap();
    c2.node.join_mesh(&t.token).await.unwrap();
    let e = next(&mut forks, "ledger.fork", Duration::from_secs(20)).await;
    assert_eq!(e.data["author"], c_id.to_string());
    assert!(e.data["first"]["root"] != e.data["second"]["root"], "{e:?}");
    let fork = held(&b.node.ledger_replicas().await.unwrap(), &c_id)
        .and_then(|h| h.fork.clone())
        .expect("the evidence is kept with the replica");
    assert_eq!(fork.author, c_id);
    for m in [a, b] {
        m.node.shutdown().await;
    }
    c2.node.shutdown().await;
}

/// A node of `role` on `bind`, with its ledger (checkpoints every 100 ms)
/// replicated through a hub.
fn ledger_node(
    role: Role,
    name: &str,
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
    bind: std::net::SocketAddr,
    mesh: bool,
) -> (Node, Arc<SignedLedger>, std::net::SocketAddr) {
    use mesh_core::limits::Rate;
    use mesh_core::node::PairingLimits;

    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    // A port just given up may take a moment to be free again.
    let mut tries = 0;
    let quic = loop {
        match QuicTransport::bind(key.clone(), bind, admission.clone(), QuicConfig::default()) {
            Ok(q) => break Arc::new(q),
            Err(e) if tries < 50 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("cannot bind {bind}: {e}"),
        }
    };
    let addr = quic.local_addr();
    let ledger = Arc::new(
        SignedLedger::open(
            store.clone(),
            key.clone(),
            LedgerConfig::default().checkpoint_interval_ms(100),
        )
        .unwrap(),
    );
    let hub = Arc::new(LedgerHub::open(store.clone(), ledger.clone()).unwrap());
    let config = NodeConfig::new(role, name, &format!("hw-{name}"))
        .heartbeat_interval(Duration::from_millis(100))
        .reconnect(Duration::from_millis(50), Duration::from_millis(300))
        .pairing_limits(PairingLimits::default().rates(
            Rate::per_second(1000.0, 1000),
            Rate::per_second(1000.0, 1000),
        ));
    let mut builder = Node::builder(key, store, quic, config)
        .ledger(ledger.clone())
        .ledger_sync(hub);
    if mesh {
        builder = builder.mesh(MeshSettings::new(vec![PeerAddr::Socket(addr)]));
    }
    (builder.start().unwrap(), ledger, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_ledger_entries_made_while_away_reach_its_primary_when_it_reconnects() {
    let p_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let p_key = Arc::new(NodeKey::generate());
    let loopback = "127.0.0.1:0".parse().unwrap();
    let (p, _, p_addr) = ledger_node(
        Role::Primary,
        "desk",
        p_store.clone(),
        p_key.clone(),
        loopback,
        false,
    );
    let (w, w_ledger, _) = ledger_node(
        Role::Worker,
        "field-tablet",
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
        loopback,
        false,
    );
    let primary = crate::node_e2e::Primary {
        node: p.as_primary().unwrap(),
        store: p_store.clone(),
        key: p_key.clone(),
        addr: PeerAddr::Socket(p_addr),
    };
    let worker = w.as_worker().unwrap();
    crate::node_e2e::pair(&primary, &worker, false).await;
    let w_id = w.node_id();

    // While connected: a command the primary sends is recorded in the
    // worker's own ledger (`command.executed`), and the primary, pulling
    // its devices' ledgers in turn, holds that record within a few rounds.
    let pong = p
        .command(&w_id, "ping", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(pong, serde_json::json!({ "pong": true }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let held = p.ledger_replicas().await.unwrap();
        if held
            .iter()
            .any(|h| h.author == w_id && !h.own && h.records >= 1)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's command record never reached the primary: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    append(&w_ledger, 3, "before");

    // The primary goes away; the worker keeps writing.
    drop(primary);
    p.shutdown().await;
    drop(p);
    append(&w_ledger, 5, "while the primary was away");
    let written = w_ledger.len();

    // The primary comes back where it was; the worker reconnects, and
    // its ledger (every entry, checkpointed) is the primary's replica.
    let (p, _, _) = ledger_node(Role::Primary, "desk", p_store, p_key, p_addr, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held = p.ledger_replicas().await.unwrap();
        if let Some(r) = held.iter().find(|h| h.author == w_id && !h.own)
            && r.records >= written
        {
            assert!(r.fork.is_none());
            assert!(r.checkpoint.as_ref().is_some_and(|c| c.size >= 9));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's ledger never reached the primary: {held:?} (worker wrote {written})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.shutdown().await;
    p.shutdown().await;
}
