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
    // Bad input: typed errors, nothing in the outbox.
    let stranger = NodeKey::generate().node_id();
    let e = a
        .node
        .post_reliable(stranger, b"x".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(e, mesh_core::node::NodeError::NotConnected(n) if n == stranger),
        "{e}"
    );
    let e = a
        .node
        .post_reliable(c_id, vec![0; mesh_core::delivery::MAX_PAYLOAD_LEN + 1])
        .await
        .unwrap_err();
    assert!(matches!(e, mesh_core::node::NodeError::Protocol(_)), "{e}");
    assert_eq!(a.node.delivery_status().await.unwrap().outbox, 0);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_tampering_is_detected_by_the_recipient() {
    use mesh_core::delivery::{Contents, DELIVER, DeliveryFrame, Letter};
    use mesh_core::transport::Transport;

    use crate::mesh_runtime::{member_with, raw_member};
    use crate::support::next;

    let a_key = Arc::new(NodeKey::generate());
    let a = member_with("sender", Arc::new(MemoryStorage::new()), a_key.clone());
    let c = crate::mesh_runtime::member("recipient");
    let t = a.node.mesh_token(None).await.unwrap();
    c.node.join_mesh(&t.token).await.unwrap();
    until(&c.node, "a active", |v| {
        v.peers.iter().any(|p| p.status == PeerStatus::Active)
    })
    .await;
    // A hostile member carries a letter of a's to c, altered.
    let (_evil_key, evil, _) = raw_member(&c).await;
    let mut refused = c.node.subscribe("delivery.refused", 16).unwrap();
    let letter = Letter::seal(
        &a_key,
        &c.node.node_id(),
        1,
        1,
        Contents::Message(b"pay 10".to_vec()),
        u64::MAX,
    )
    .unwrap();
    let conn = evil
        .connect(c.node.node_id(), &PeerAddr::Socket(c.addr), DELIVER)
        .await
        .unwrap();
    let mut altered = letter.clone();
    let last = altered.sealed.len() - 20;
    altered.sealed[last] ^= 0x01;
    conn.send(DeliveryFrame::Deliver(altered).encode())
        .await
        .unwrap();
    let e = next(&mut refused, "delivery.refused", Duration::from_secs(10)).await;
    assert!(
        e.data["reason"].as_str().unwrap().contains("does not open"),
        "{e:?}"
    );
    // A letter whose header was changed (another recipient's seal moved
    // under c's name) is refused too.
    let mut moved = Letter::seal(
        &a_key,
        &a.node.node_id(),
        1,
        1,
        Contents::Message(b"pay 1000".to_vec()),
        u64::MAX,
    )
    .unwrap();
    moved.to = c.node.node_id();
    conn.send(DeliveryFrame::Deliver(moved).encode())
        .await
        .unwrap();
    next(&mut refused, "delivery.refused", Duration::from_secs(10)).await;
    let nothing = c
        .node
        .receive_reliable(10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");
    // The letter as sealed is taken, once, and acknowledged to the relay.
    conn.send(DeliveryFrame::Deliver(letter.clone()).encode())
        .await
        .unwrap();
    let got = c
        .node
        .receive_reliable(10, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"pay 10");
    conn.send(DeliveryFrame::Deliver(letter).encode())
        .await
        .unwrap();
    let again = c
        .node
        .receive_reliable(10, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(again.is_empty());
    for m in [a, c] {
        m.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_call_dropped_before_it_returned_takes_nothing() {
    let net = MemoryNetwork::new(12);
    let a = in_memory(
        &net,
        7011,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let b = in_memory(
        &net,
        7012,
        Arc::new(MemoryStorage::new()),
        Arc::new(NodeKey::generate()),
    );
    let t = a.node.mesh_token(None).await.unwrap();
    b.node.join_mesh(&t.token).await.unwrap();
    until(&a.node, "b active", |v| {
        v.peers.iter().any(|p| p.status == PeerStatus::Active)
    })
    .await;
    let b_id = b.key.node_id();
    a.node
        .send_reliable(b_id, b"hold on to this".to_vec())
        .await
        .unwrap();
    assert_eq!(b.node.delivery_status().await.unwrap().inbox, 1);

    // A call polled once (it asks for messages), then dropped after the
    // message was handed to it but before it returned: as a `select!`
    // taking another branch does.
    // (On a loaded machine the first poll may already find its answer and
    // return: then it took the message — legitimately — and the scenario
    // is tried again with a new one.)
    let mut dropped = false;
    for attempt in 0..20 {
        let mut call = Box::pin(b.node.receive_reliable(10, Duration::from_secs(10)));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
        match first {
            std::task::Poll::Pending => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(call);
                dropped = true;
                break;
            }
            std::task::Poll::Ready(got) => {
                let got = got.unwrap();
                assert_eq!(got.len(), 1, "returned at once: it took the message");
                a.node
                    .send_reliable(b_id, b"hold on to this".to_vec())
                    .await
                    .unwrap();
                eventually("the next message in the inbox", || async {
                    b.node.delivery_status().await.unwrap().inbox == 1
                })
                .await;
                assert!(attempt < 19, "every first poll returned at once");
            }
        }
    }
    assert!(dropped);

    // The message is still there, and the next call gets it, once.
    let got = b
        .node
        .receive_reliable(10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"hold on to this");
    let again = b
        .node
        .receive_reliable(10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    eventually("the inbox empties", || async {
        b.node.delivery_status().await.unwrap().inbox == 0
    })
    .await;
    for m in [a, b] {
        m.node.shutdown().await;
    }
}
