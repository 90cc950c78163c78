//! Reliable delivery through the runtime: on the memory transport, a
//! member reached only through a relay while it was offline gets a
//! message once and its receipt travels back; over QUIC, a hostile relay's
//! tampering is detected by the recipient.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::NodeKey;
use mesh_core::node::{MeshSettings, Node, NodeConfig, Primary, RegistryAdmission, Role};
use mesh_core::storage::records::PeerStatus;
use mesh_core::storage::{MemoryStorage, Storage, Table};
use mesh_core::transport::PeerAddr;
use mesh_transport::memory::MemoryNetwork;

use crate::mesh_runtime::until;

struct InMemory {
    node: Primary,
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
    name: String,
}

/// A member on `net`, its endpoint named after a loopback socket address
/// (join tokens carry socket addresses; the memory transport answers
/// them by name).
fn in_memory(
    net: &MemoryNetwork,
    port: u16,
    store: Arc<dyn Storage>,
    key: Arc<NodeKey>,
) -> InMemory {
    let name = format!("127.0.0.1:{port}");
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let transport = Arc::new(net.endpoint(key.node_id(), &name, admission).unwrap());
    let addr = PeerAddr::Socket(name.parse().unwrap());
    let node = Node::builder(
        key.clone(),
        store.clone(),
        transport,
        NodeConfig::new(Role::Primary, &format!("m{port}"), &format!("m{port}")),
    )
    .mesh(MeshSettings::new(vec![addr]))
    .start_primary()
    .unwrap();
    InMemory {
        node,
        store,
        key,
        name,
    }
}

/// Every stored row of `table`, concatenated.
fn raw_rows(store: &dyn Storage, table: Table) -> Vec<u8> {
    store
        .list(table)
        .unwrap()
        .into_iter()
        .flat_map(|(k, v)| k.into_bytes().into_iter().chain(v))
        .collect()
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reached_only_through_a_relay_gets_a_message_once_after_being_offline() {
    let net = MemoryNetwork::new(11);
    let a = in_memory(
        &net,
        7001,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let b = in_memory(
        &net,
        7002,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let c = in_memory(
        &net,
        7003,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    for m in [&b, &c] {
        let t = a.node.mesh_token(None).await.unwrap();
        m.node.join_mesh(&t.token).await.unwrap();
    }
    for m in [&a, &b, &c] {
        until(&m.node, "all active", |v| {
            v.peers
                .iter()
                .filter(|p| p.status == PeerStatus::Active)
                .count()
                == 2
        })
        .await;
    }
    let (a_id, c_id) = (a.node.node_id(), c.key.node_id());
    // A reaches C only through B; C goes offline.
    net.partition(a_id, c_id);
    let (c_store, c_key, c_name) = (c.store.clone(), c.key.clone(), c.name.clone());
    net.crash(&c_name);
    drop(c);

    let sender = a.node.clone();
    let sending = tokio::spawn(async move {
        sender
            .send_reliable(c_id, b"the secret plans".to_vec())
            .await
    });
    eventually("b holds the letter", || async {
        b.node.delivery_status().await.unwrap().relayed == 1
    })
    .await;
    assert!(!sending.is_finished(), "acknowledged while c was away");
    // The relay holds ciphertext only.
    let held = raw_rows(b.store.as_ref(), Table::DeliveryRelay);
    assert!(!held.is_empty());
    assert!(!held.windows(16).any(|w| w == b"the secret plans"));

    // C comes back (same key, same store, same address), still cut off from A.
    let c = in_memory(&net, 7003, c_store, c_key);
    assert_eq!(c.name, c_name);
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never took the message"
        );
        got = c
            .node
            .receive_reliable(10, Duration::from_millis(200))
            .await
            .unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"the secret plans");
    assert_eq!(got[0].from, a_id);
    // The receipt travels back through B: A's call completes.
    let id = tokio::time::timeout(Duration::from_secs(20), sending)
        .await
        .expect("the receipt reaches a")
        .unwrap()
        .unwrap();
    assert_eq!(id, got[0].id);
    eventually("outboxes and relay empty", || async {
        a.node.delivery_status().await.unwrap().outbox == 0
            && c.node.delivery_status().await.unwrap().outbox == 0
            && b.node.delivery_status().await.unwrap().relayed == 0
    })
    .await;
    // Once only: nothing more arrives.
    let again = c
        .node
        .receive_reliable(10, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    for m in [a, b, c] {
        m.node.shutdown().await;
    }
}
