// Test support: a panic is how a check reports failure.
#![allow(clippy::unwrap_used)]

//! Checks every [`Transport`] implementation must pass. Each check takes a
//! [`Harness`] that makes endpoints; [`transport_conformance_tests!`](crate::transport_conformance_tests)
//! turns them into one test each.

use std::sync::Arc;

use async_trait::async_trait;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::transport::{
    Admission, AdmitAll, Connection, PeerAddr, Protocol, Transport, TransportError,
};

/// Makes endpoints of the transport under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A transport for `key`, admitting as `admission` says, and its address.
    async fn endpoint(
        &self,
        key: &Arc<NodeKey>,
        admission: Arc<dyn Admission>,
    ) -> (Box<dyn Transport>, PeerAddr);
    /// The largest message the transport carries.
    fn max_message(&self) -> usize;
}

fn key(seed: u8) -> Arc<NodeKey> {
    Arc::new(NodeKey::from_secret_bytes(&[seed; 32]))
}

async fn pair(
    h: &dyn Harness,
) -> (
    Box<dyn Connection>,
    Box<dyn Connection>,
    Box<dyn Transport>,
    Box<dyn Transport>,
) {
    let (a, b) = (key(1), key(2));
    let (ta, _) = h.endpoint(&a, Arc::new(AdmitAll)).await;
    let (tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    let (c, s) = tokio::join!(
        ta.connect(b.node_id(), &addr_b, Protocol::Mesh),
        tb.accept()
    );
    (c.unwrap(), s.unwrap(), ta, tb)
}

/// Messages arrive whole and in order, both ways; each side knows the other's id.
pub async fn round_trip(h: &dyn Harness) {
    let (c, s, ta, tb) = pair(h).await;
    assert_eq!(c.remote_node(), tb.local_node());
    assert_eq!(s.remote_node(), ta.local_node());
    assert_eq!(
        (c.protocol(), s.protocol()),
        (Protocol::Mesh, Protocol::Mesh)
    );
    for i in 0..100u32 {
        c.send(i.to_be_bytes().to_vec()).await.unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(s.recv().await.unwrap(), i.to_be_bytes());
    }
    s.send(vec![0xAB; 70_000]).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), vec![0xAB; 70_000]);
    c.send(Vec::new()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), Vec::<u8>::new());
}

/// Connecting with the wrong expected node id fails with `PeerMismatch`.
pub async fn wrong_peer_is_refused(h: &dyn Harness) {
    let (a, b, c) = (key(1), key(2), key(3));
    let (ta, _) = h.endpoint(&a, Arc::new(AdmitAll)).await;
    let (_tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    match ta.connect(c.node_id(), &addr_b, Protocol::Mesh).await {
        Err(TransportError::PeerMismatch { expected, actual }) => {
            assert_eq!((expected, actual), (c.node_id(), b.node_id()));
        }
        other => panic!("expected PeerMismatch, got {other:?}"),
    }
}

#[derive(Debug)]
struct PairedOnly(NodeId);

impl Admission for PairedOnly {
    fn admit(&self, peer: &NodeId, protocol: Protocol) -> bool {
        protocol == Protocol::Pairing || *peer == self.0
    }
}

/// An unknown key is refused for mesh traffic and admitted for pairing.
pub async fn unknown_keys_reach_only_pairing(h: &dyn Harness) {
    let (friend, b, stranger) = (key(1), key(2), key(3));
    let (tb, addr_b) = h.endpoint(&b, Arc::new(PairedOnly(friend.node_id()))).await;
    let (ts, _) = h.endpoint(&stranger, Arc::new(AdmitAll)).await;
    assert!(matches!(
        ts.connect(b.node_id(), &addr_b, Protocol::Mesh).await,
        Err(TransportError::Refused(_))
    ));
    let (c, s) = tokio::join!(
        ts.connect(b.node_id(), &addr_b, Protocol::Pairing),
        tb.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(s.protocol(), Protocol::Pairing);
    assert_eq!(s.remote_node(), stranger.node_id());
    c.send(b"pair me".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"pair me");
    let (tf, _) = h.endpoint(&friend, Arc::new(AdmitAll)).await;
    let (c2, s2) = tokio::join!(
        tf.connect(b.node_id(), &addr_b, Protocol::Mesh),
        tb.accept()
    );
    assert!(c2.is_ok() && s2.is_ok());
}

/// A message over the limit is refused with a typed error; the connection lives on.
pub async fn oversize_messages_are_refused(h: &dyn Harness) {
    let (c, s, _ta, _tb) = pair(h).await;
    let max = h.max_message();
    assert_eq!(
        c.send(vec![0; max + 1]).await,
        Err(TransportError::TooLarge { len: max + 1, max })
    );
    c.send(vec![1; max]).await.unwrap();
    assert_eq!(s.recv().await.unwrap().len(), max);
}

/// Many connections at once, each with its own ordered traffic.
pub async fn many_connections_in_parallel(h: &dyn Harness) {
    let b = key(2);
    let (tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    let mut clients = Vec::new();
    for i in 0..16u8 {
        let (t, _) = h.endpoint(&key(10 + i), Arc::new(AdmitAll)).await;
        clients.push(t);
    }
    let mut conns = Vec::new();
    for t in &clients {
        let (c, s) = tokio::join!(t.connect(b.node_id(), &addr_b, Protocol::Mesh), tb.accept());
        conns.push((c.unwrap(), s.unwrap()));
    }
    for (i, (c, _)) in conns.iter().enumerate() {
        for j in 0..10u8 {
            c.send(vec![i as u8, j]).await.unwrap();
        }
    }
    for (i, (c, s)) in conns.iter().enumerate() {
        for j in 0..10u8 {
            assert_eq!(s.recv().await.unwrap(), [i as u8, j]);
        }
        assert_eq!(s.remote_node(), clients[i].local_node());
        let _ = c;
    }
}

/// After one side closes, the other side's `recv` ends with `Closed`.
pub async fn close_is_seen_by_the_peer(h: &dyn Harness) {
    let (c, s, _ta, _tb) = pair(h).await;
    c.send(b"last".to_vec()).await.unwrap();
    c.close();
    assert_eq!(s.recv().await.unwrap(), b"last");
    assert_eq!(s.recv().await, Err(TransportError::Closed));
    assert_eq!(c.send(b"more".to_vec()).await, Err(TransportError::Closed));
}

/// Dropping a connection closes it, but what was already sent still arrives.
pub async fn drop_delivers_what_was_sent(h: &dyn Harness) {
    let (c, s, _ta, _tb) = pair(h).await;
    for i in 0..20u8 {
        c.send(vec![i; 60_000]).await.unwrap();
    }
    drop(c);
    for i in 0..20u8 {
        assert_eq!(s.recv().await.unwrap(), vec![i; 60_000]);
    }
    assert_eq!(s.recv().await, Err(TransportError::Closed));
}

/// Turns every check into a `#[tokio::test]` for the harness `$make`.
#[macro_export]
macro_rules! transport_conformance_tests {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;
            $crate::transport_conformance_tests!(@checks $make;
                round_trip,
                wrong_peer_is_refused,
                unknown_keys_reach_only_pairing,
                oversize_messages_are_refused,
                many_connections_in_parallel,
                close_is_seen_by_the_peer,
                drop_delivers_what_was_sent
            );
        }
    };
    (@checks $make:expr; $($check:ident),*) => {$(
        #[tokio::test]
        async fn $check() {
            let harness = $make;
            // Bounded: a hung transport fails the test instead of stalling CI.
            tokio::time::timeout(std::time::Duration::from_secs(30), $crate::conformance::$check(&harness))
                .await
                .expect("conformance check timed out");
        }
    )*};
}
