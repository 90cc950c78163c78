use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mesh_core::identity::NodeKey;
use mesh_core::transport::{Admission, AdmitAll, PeerAddr, Protocol, Transport, TransportError};
use tokio::time::Instant;

use crate::conformance::Harness;
use crate::memory::{MAX_MESSAGE, MemoryNetwork, MemoryTransport};

struct MemoryHarness(MemoryNetwork);

#[async_trait]
impl Harness for MemoryHarness {
    async fn endpoint(
        &self,
        key: &Arc<NodeKey>,
        admission: Arc<dyn Admission>,
    ) -> (Box<dyn Transport>, PeerAddr) {
        let name = key.node_id().fingerprint().to_string();
        let t = self.0.endpoint(key.node_id(), &name, admission).unwrap();
        let addr = t.addr();
        (Box::new(t), addr)
    }

    fn max_message(&self) -> usize {
        MAX_MESSAGE
    }
}

crate::transport_conformance_tests!(memory_conformance, MemoryHarness(MemoryNetwork::new(1)));

fn key(seed: u8) -> NodeKey {
    NodeKey::from_secret_bytes(&[seed; 32])
}

async fn connected(
    net: &MemoryNetwork,
) -> (
    MemoryTransport,
    MemoryTransport,
    Box<dyn mesh_core::transport::Connection>,
    Box<dyn mesh_core::transport::Connection>,
) {
    connected_for(net, Protocol::MESH).await
}

/// A connection for a registered protocol (the kind with streams).
async fn stream_connected(
    net: &MemoryNetwork,
) -> (
    MemoryTransport,
    MemoryTransport,
    Box<dyn mesh_core::transport::Connection>,
    Box<dyn mesh_core::transport::Connection>,
) {
    connected_for(net, crate::conformance::STREAMS_TEST).await
}

/// Endpoints "a" and "b" and a connection from a to b for `protocol` (which
/// b serves first, unless it is a built-in one).
async fn connected_for(
    net: &MemoryNetwork,
    protocol: Protocol,
) -> (
    MemoryTransport,
    MemoryTransport,
    Box<dyn mesh_core::transport::Connection>,
    Box<dyn mesh_core::transport::Connection>,
) {
    let (a, b) = (key(1), key(2));
    let ta = net.endpoint(a.node_id(), "a", Arc::new(AdmitAll)).unwrap();
    let tb = net.endpoint(b.node_id(), "b", Arc::new(AdmitAll)).unwrap();
    if protocol.carries_streams() {
        tb.serve(&[protocol], Arc::new(AdmitAll)).unwrap();
    }
    let addr_b = tb.addr();
    let (c, s) = tokio::join!(ta.connect(b.node_id(), &addr_b, protocol), tb.accept());
    (ta, tb, c.unwrap(), s.unwrap())
}

#[tokio::test(start_paused = true)]
async fn latency_delays_delivery_on_the_virtual_clock() {
    let net = MemoryNetwork::new(1);
    let (_ta, _tb, c, s) = connected(&net).await;
    net.set_latency(Duration::from_millis(250));
    let start = Instant::now();
    c.send(b"x".to_vec()).await.unwrap();
    c.send(b"y".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"x");
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert_eq!(s.recv().await.unwrap(), b"y");
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn loss_drops_a_seeded_fraction() {
    let net = MemoryNetwork::new(42);
    let (_ta, _tb, c, s) = connected(&net).await;
    net.set_loss(0.3);
    for i in 0..200u32 {
        c.send(i.to_be_bytes().to_vec()).await.unwrap();
    }
    net.set_loss(0.0);
    c.send(b"end".to_vec()).await.unwrap();
    let mut got = 0;
    while s.recv().await.unwrap() != b"end" {
        got += 1;
    }
    // ~70 % of 200 arrive; the seed makes the exact count repeatable.
    assert!((110..=170).contains(&got), "{got} of 200 arrived");
}

#[tokio::test(start_paused = true)]
async fn partition_drops_traffic_and_refuses_connects_until_healed() {
    let net = MemoryNetwork::new(1);
    let (ta, tb, c, s) = connected(&net).await;
    net.partition(ta.local_node(), tb.local_node());
    c.send(b"lost".to_vec()).await.unwrap();
    assert!(matches!(
        ta.connect(tb.local_node(), &tb.addr(), Protocol::MESH)
            .await,
        Err(TransportError::Unreachable { .. })
    ));
    // Nothing arrives while partitioned (bounded wait on the virtual clock).
    assert!(
        tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .is_err()
    );
    net.heal(ta.local_node(), tb.local_node());
    c.send(b"after".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"after");
}

#[tokio::test(start_paused = true)]
async fn a_crash_breaks_connections_and_a_restart_is_reachable_again() {
    let net = MemoryNetwork::new(1);
    let (ta, tb, c, s) = connected(&net).await;
    let b_node = tb.local_node();
    net.crash("b");
    assert_eq!(c.recv().await, Err(TransportError::Closed));
    assert_eq!(s.recv().await, Err(TransportError::Closed));
    assert_eq!(c.send(b"x".to_vec()).await, Err(TransportError::Closed));
    assert!(matches!(tb.accept().await, Err(TransportError::Closed)));
    assert!(matches!(
        ta.connect(b_node, &PeerAddr::Memory("b".into()), Protocol::MESH)
            .await,
        Err(TransportError::Unreachable { .. })
    ));
    // The node comes back under the same name; the old handle's drop must not remove it.
    let tb2 = net.endpoint(b_node, "b", Arc::new(AdmitAll)).unwrap();
    drop(tb);
    let addr_b2 = tb2.addr();
    let (c2, s2) = tokio::join!(ta.connect(b_node, &addr_b2, Protocol::MESH), tb2.accept());
    c2.unwrap().send(b"back".to_vec()).await.unwrap();
    assert_eq!(s2.unwrap().recv().await.unwrap(), b"back");
}

#[tokio::test]
async fn other_address_kinds_are_not_supported_and_names_are_unique() {
    let net = MemoryNetwork::new(1);
    let ta = net
        .endpoint(key(1).node_id(), "a", Arc::new(AdmitAll))
        .unwrap();
    let addr = PeerAddr::Socket("127.0.0.1:4433".parse().unwrap());
    assert_eq!(
        ta.connect(key(2).node_id(), &addr, Protocol::MESH)
            .await
            .err(),
        Some(TransportError::AddressNotSupported(addr))
    );
    assert!(matches!(
        net.endpoint(key(3).node_id(), "a", Arc::new(AdmitAll)),
        Err(TransportError::Io(_))
    ));
}

/// Foundation A: under a constrained link, the highest-priority stream with
/// data queued goes first (on the virtual clock: 20 kB/s, 180 kB queued).
#[tokio::test(start_paused = true)]
async fn stream_priorities_order_a_constrained_memory_link() {
    let net = MemoryNetwork::new(1);
    let (_ta, _tb, c, s) = stream_connected(&net).await;
    net.set_bandwidth(Some(20_000));
    crate::conformance::priorities_order_a_constrained_link(c.as_ref(), s.as_ref()).await;
}

/// Under a constraint the link carries about its rate (virtual clock).
#[tokio::test(start_paused = true)]
async fn a_constrained_memory_link_carries_its_rate() {
    let net = MemoryNetwork::new(1);
    let (_ta, _tb, c, s) = stream_connected(&net).await;
    net.set_bandwidth(Some(100_000));
    let start = Instant::now();
    let mut send = c.open_uni(0).await.unwrap();
    send.write_all(&vec![5u8; 200_000]).await.unwrap();
    send.finish().await.unwrap();
    let mesh_core::transport::IncomingStream::Uni(mut recv) = s.accept_stream().await.unwrap()
    else {
        panic!("a unidirectional stream");
    };
    let data = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(data.len(), 200_000);
    // 200 kB at 100 kB/s: two seconds of virtual time (one chunk of slack).
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1_980) && took <= Duration::from_millis(2_050),
        "{took:?}"
    );
}

/// Stream faults (virtual clock): every byte arrives, in order within its
/// stream, no sooner than the path's delay; a stream written later
/// overtakes one held up by a lost packet; a reset stream's bytes in
/// flight never arrive.
#[tokio::test(start_paused = true)]
async fn stream_faults_delay_reorder_and_hold_up_only_their_own_stream() {
    use crate::memory::StreamFaults;
    use mesh_core::transport::{IncomingStream, RecvStream};

    async fn uni(s: &dyn mesh_core::transport::Connection) -> Box<dyn RecvStream> {
        match s.accept_stream().await.unwrap() {
            IncomingStream::Uni(r) => r,
            _ => panic!("a unidirectional stream"),
        }
    }

    let net = MemoryNetwork::new(7);
    let (_ta, _tb, c, s) = stream_connected(&net).await;
    let faults = StreamFaults {
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(20),
        loss: 0.05,
        retransmit: Duration::from_millis(100),
    };
    net.set_stream_faults(Some(faults));

    // Many streams of 12 packets each, written one after another at once:
    // each arrives whole and in order, after at least the delay; some
    // finish after streams written later (a lost packet held them up).
    let start = Instant::now();
    let payload = |i: u8| (0..14_400u32).map(|k| (k as u8) ^ i).collect::<Vec<u8>>();
    for i in 0..40u8 {
        let mut send = c.open_uni(0).await.unwrap();
        send.write_all(&payload(i)).await.unwrap();
        send.finish().await.unwrap();
    }
    let mut readers = Vec::new();
    for _ in 0..40 {
        let mut r = uni(s.as_ref()).await;
        readers.push(tokio::spawn(async move {
            let data = r.read_to_end(1 << 20).await.unwrap();
            (data, Instant::now())
        }));
    }
    let mut finished = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        let (data, at) = r.await.unwrap();
        assert_eq!(data, payload(i as u8), "stream {i} whole and in order");
        let took = at - start;
        assert!(took >= faults.delay, "stream {i} after {took:?}");
        assert!(
            took <= faults.delay + faults.jitter + faults.retransmit,
            "stream {i} after {took:?}"
        );
        finished.push((at, i));
    }
    finished.sort();
    let order: Vec<usize> = finished.iter().map(|(_, i)| *i).collect();
    assert_ne!(
        order,
        (0..40).collect::<Vec<_>>(),
        "streams overtook one another"
    );
    let held_up = finished
        .iter()
        .filter(|(at, _)| *at - start > faults.delay + faults.jitter)
        .count();
    assert!(held_up > 0, "a lost packet held up its stream");

    // A stream reset while its bytes are in flight: none of them arrive.
    let mut send = c.open_uni(0).await.unwrap();
    send.write_all(&[1u8; 5000]).await.unwrap();
    let mut r = uni(s.as_ref()).await;
    send.reset(9);
    assert_eq!(
        r.read(&mut [0u8; 64]).await,
        Err(mesh_core::transport::StreamError::Reset(9))
    );

    // Faults off: bytes arrive at once again.
    net.set_stream_faults(None);
    let start = Instant::now();
    let mut send = c.open_uni(0).await.unwrap();
    send.write_all(b"now").await.unwrap();
    send.finish().await.unwrap();
    let mut r = uni(s.as_ref()).await;
    assert_eq!(r.read_to_end(64).await.unwrap(), b"now");
    assert_eq!(start.elapsed(), Duration::ZERO);
}
