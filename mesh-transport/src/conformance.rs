// Test support: a panic is how a check reports failure.
#![allow(clippy::unwrap_used)]

//! Checks every [`Transport`] implementation must pass. Each check takes a
//! [`Harness`] that makes endpoints; [`transport_conformance_tests!`](crate::transport_conformance_tests)
//! turns them into one test each.

use std::sync::Arc;

use async_trait::async_trait;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::transport::{
    Admission, AdmitAll, Capabilities, Connection, IncomingStream, PeerAddr, Protocol, RecvStream,
    StreamError, Transport, TransportError,
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

/// A protocol of the kind a node registers (files, media): the kind that
/// carries streams and datagrams.
pub const STREAMS_TEST: Protocol = Protocol::new("mesh-sdk-test/streams/1");

fn key(seed: u8) -> Arc<NodeKey> {
    Arc::new(NodeKey::from_secret_bytes(&[seed; 32]))
}

/// Two endpoints and a connection between them for the device session.
async fn pair(
    h: &dyn Harness,
) -> (
    Box<dyn Connection>,
    Box<dyn Connection>,
    Box<dyn Transport>,
    Box<dyn Transport>,
) {
    pair_for(h, None).await
}

/// The same for [`STREAMS_TEST`], both ends serving it.
async fn stream_pair(
    h: &dyn Harness,
) -> (
    Box<dyn Connection>,
    Box<dyn Connection>,
    Box<dyn Transport>,
    Box<dyn Transport>,
) {
    pair_for(h, Some(STREAMS_TEST)).await
}

/// A connection for `served` (served by both ends first), or for
/// [`Protocol::MESH`] when `None`.
async fn pair_for(
    h: &dyn Harness,
    served: Option<Protocol>,
) -> (
    Box<dyn Connection>,
    Box<dyn Connection>,
    Box<dyn Transport>,
    Box<dyn Transport>,
) {
    let (a, b) = (key(1), key(2));
    let (ta, _) = h.endpoint(&a, Arc::new(AdmitAll)).await;
    let (tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    if let Some(p) = served {
        for t in [&ta, &tb] {
            t.serve(&[p], Arc::new(AdmitAll)).unwrap();
        }
    }
    let protocol = served.unwrap_or(Protocol::MESH);
    let (c, s) = tokio::join!(ta.connect(b.node_id(), &addr_b, protocol), tb.accept());
    (c.unwrap(), s.unwrap(), ta, tb)
}

/// Messages arrive whole and in order, both ways; each side knows the other's id.
pub async fn round_trip(h: &dyn Harness) {
    let (c, s, ta, tb) = pair(h).await;
    assert_eq!(c.remote_node(), tb.local_node());
    assert_eq!(s.remote_node(), ta.local_node());
    assert_eq!(
        (c.protocol(), s.protocol()),
        (Protocol::MESH, Protocol::MESH)
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
    match ta.connect(c.node_id(), &addr_b, Protocol::MESH).await {
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
        protocol == Protocol::PAIRING || *peer == self.0
    }
}

/// An unknown key is refused for mesh traffic and admitted for pairing.
pub async fn unknown_keys_reach_only_pairing(h: &dyn Harness) {
    let (friend, b, stranger) = (key(1), key(2), key(3));
    let (tb, addr_b) = h.endpoint(&b, Arc::new(PairedOnly(friend.node_id()))).await;
    let (ts, _) = h.endpoint(&stranger, Arc::new(AdmitAll)).await;
    assert!(matches!(
        ts.connect(b.node_id(), &addr_b, Protocol::MESH).await,
        Err(TransportError::Refused(_))
    ));
    let (c, s) = tokio::join!(
        ts.connect(b.node_id(), &addr_b, Protocol::PAIRING),
        tb.accept()
    );
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!(s.protocol(), Protocol::PAIRING);
    assert_eq!(s.remote_node(), stranger.node_id());
    c.send(b"pair me".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"pair me");
    let (tf, _) = h.endpoint(&friend, Arc::new(AdmitAll)).await;
    let (c2, s2) = tokio::join!(
        tf.connect(b.node_id(), &addr_b, Protocol::MESH),
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
        let (c, s) = tokio::join!(t.connect(b.node_id(), &addr_b, Protocol::MESH), tb.accept());
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

/// `len` bytes that start with `i` (4 bytes, big-endian) and differ per `i`.
fn pattern(i: usize, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len).map(|k| (i * 31 + k) as u8).collect();
    v[..4].copy_from_slice(&(i as u32).to_be_bytes());
    v
}

/// The `i` a [`pattern`] starts with, if `data` is exactly that pattern.
fn pattern_index(data: &[u8]) -> Option<usize> {
    let i = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    (data == pattern(i, data.len())).then_some(i)
}

async fn accept(conn: &dyn Connection) -> IncomingStream {
    tokio::time::timeout(std::time::Duration::from_secs(10), conn.accept_stream())
        .await
        .expect("no stream arrived")
        .unwrap()
}

/// Many streams at once, both kinds, each carrying its own bytes intact;
/// messages flow beside them.
pub async fn many_concurrent_streams(h: &dyn Harness) {
    let (c, s, _ta, _tb) = stream_pair(h).await;
    assert!(c.capabilities().streams && s.capabilities().streams);
    let (c, s): (Arc<dyn Connection>, Arc<dyn Connection>) = (Arc::from(c), Arc::from(s));
    const N: usize = 40;
    const LEN: usize = 100_000;
    // The server checks each bidirectional stream's bytes and echoes its index.
    let server = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut echoes = Vec::new();
            for _ in 0..N {
                let IncomingStream::Bi(mut send, mut recv) = accept(s.as_ref()).await else {
                    panic!("a bidirectional stream");
                };
                echoes.push(tokio::spawn(async move {
                    let data = recv.read_to_end(10 * LEN).await.unwrap();
                    assert_eq!(data.len(), LEN);
                    let i = pattern_index(&data).expect("the stream's bytes intact");
                    send.write_all(&(i as u32).to_be_bytes()).await.unwrap();
                    send.finish().await.unwrap();
                }));
            }
            for e in echoes {
                e.await.unwrap();
            }
        })
    };
    let mut clients = Vec::new();
    for i in 0..N {
        let c = c.clone();
        clients.push(tokio::spawn(async move {
            let (mut send, mut recv) = c.open_bi(0).await.unwrap();
            send.write_all(&pattern(i, LEN)).await.unwrap();
            send.finish().await.unwrap();
            let back = recv.read_to_end(64).await.unwrap();
            assert_eq!(back, (i as u32).to_be_bytes(), "stream {i}'s echo");
        }));
    }
    c.send(b"beside the streams".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"beside the streams");
    for t in clients {
        t.await.unwrap();
    }
    server.await.unwrap();
    // Unidirectional streams the other way.
    for i in 0..10 {
        let mut send = s.open_uni(0).await.unwrap();
        send.write_all(&pattern(i, 5_000)).await.unwrap();
        send.finish().await.unwrap();
    }
    for _ in 0..10 {
        let IncomingStream::Uni(mut recv) = accept(c.as_ref()).await else {
            panic!("a unidirectional stream");
        };
        let data = recv.read_to_end(10_000).await.unwrap();
        assert_eq!(data.len(), 5_000);
        assert!(pattern_index(&data).is_some(), "the stream's bytes intact");
    }
}

/// A reset reaches the reader with its code, a stop reaches the writer with
/// its code, and the connection lives on.
pub async fn streams_reset_and_stop_with_codes(h: &dyn Harness) {
    let (c, s, _ta, _tb) = stream_pair(h).await;
    let (mut send, _recv) = c.open_bi(0).await.unwrap();
    send.write_all(b"hello").await.unwrap();
    let IncomingStream::Bi(_, mut peer) = accept(s.as_ref()).await else {
        panic!("a bidirectional stream");
    };
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        got += peer.read(&mut buf[got..]).await.unwrap().unwrap();
    }
    assert_eq!(&buf, b"hello");
    send.reset(7);
    assert_eq!(peer.read(&mut buf).await, Err(StreamError::Reset(7)));
    assert_eq!(send.write_all(b"more").await, Err(StreamError::Finished));

    let mut up = c.open_uni(0).await.unwrap();
    up.write_all(b"x").await.unwrap();
    let IncomingStream::Uni(mut down) = accept(s.as_ref()).await else {
        panic!("a unidirectional stream");
    };
    down.stop(9);
    // The stop arrives after a round trip; writes fail from then on.
    let chunk = vec![0u8; 16 * 1024];
    let outcome = loop {
        match up.write_all(&chunk).await {
            Ok(()) => tokio::task::yield_now().await,
            Err(e) => break e,
        }
    };
    assert_eq!(outcome, StreamError::Stopped(9));
    c.send(b"still here".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"still here");
}

/// A stream nobody reads fills its own window and holds up nothing else:
/// another stream and the messages still go through.
pub async fn a_stalled_stream_stalls_only_itself(h: &dyn Harness) {
    let (c, s, _ta, _tb) = stream_pair(h).await;
    let (c, s): (Arc<dyn Connection>, Arc<dyn Connection>) = (Arc::from(c), Arc::from(s));
    let mut stalled = c.open_uni(0).await.unwrap();
    stalled.write_all(b"first").await.unwrap();
    let IncomingStream::Uni(_never_read) = accept(s.as_ref()).await else {
        panic!("a unidirectional stream");
    };
    // 64 MiB: more than any stream window; this writer ends up waiting.
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 1 << 20];
        for _ in 0..64 {
            if stalled.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut other = c.open_uni(0).await.unwrap();
    let data = pattern(3, 8 << 20);
    let sent = data.clone();
    let other_writer = tokio::spawn(async move {
        other.write_all(&sent).await.unwrap();
        other.finish().await.unwrap();
    });
    let IncomingStream::Uni(mut recv) = accept(s.as_ref()).await else {
        panic!("a unidirectional stream");
    };
    let got = recv.read_to_end(16 << 20).await.unwrap();
    other_writer.await.unwrap();
    assert!(
        got == data,
        "the other stream's {} bytes arrive intact",
        data.len()
    );
    c.send(b"not held up".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"not held up");
    assert!(
        !writer.is_finished(),
        "the unread stream's writer waits for its window"
    );
    writer.abort();
}

/// Datagrams up to the current maximum are carried; larger ones are refused
/// with a typed error.
pub async fn datagrams_up_to_the_size_limit(h: &dyn Harness) {
    let (c, s, _ta, _tb) = stream_pair(h).await;
    assert!(c.capabilities().datagrams);
    let max = c.max_datagram_size().expect("datagrams available");
    assert!(max >= 1000, "max datagram {max}");
    assert_eq!(
        c.send_datagram(vec![0; max + 1]),
        Err(TransportError::TooLarge { len: max + 1, max })
    );
    // Unreliable: send until one arrives (on loopback the first does).
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            c.send_datagram(vec![7; max]).unwrap();
            if let Ok(Ok(d)) =
                tokio::time::timeout(std::time::Duration::from_millis(200), s.recv_datagram()).await
            {
                break d;
            }
        }
    })
    .await
    .expect("no datagram arrived");
    assert!(got == vec![7; max], "the datagram arrives whole");
}

/// Pairing and device-session connections carry messages only: no peer
/// can open a stream or send a datagram there.
pub async fn pairing_connections_carry_no_streams(h: &dyn Harness) {
    let (a, b) = (key(1), key(2));
    let (ta, _) = h.endpoint(&a, Arc::new(AdmitAll)).await;
    let (tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    for protocol in [Protocol::PAIRING, Protocol::MESH] {
        let (c, s) = tokio::join!(ta.connect(b.node_id(), &addr_b, protocol), tb.accept());
        let (c, s) = (c.unwrap(), s.unwrap());
        assert_eq!(c.capabilities(), Capabilities::MESSAGES_ONLY);
        assert_eq!(s.capabilities(), Capabilities::MESSAGES_ONLY);
        assert!(matches!(
            c.open_bi(0).await,
            Err(TransportError::Unsupported(_))
        ));
        assert!(matches!(
            s.open_uni(0).await,
            Err(TransportError::Unsupported(_))
        ));
        assert_eq!(c.max_datagram_size(), None);
        assert!(matches!(
            c.send_datagram(vec![1]),
            Err(TransportError::Unsupported(_))
        ));
        c.send(b"messages only".to_vec()).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), b"messages only");
    }
}

/// Under a link that carries `bytes_per_second`, streams with data queued
/// are served highest priority first. Needs a transport whose link the
/// test can constrain (the memory transport: `set_bandwidth`); the `pair`
/// passed in must already be on it.
pub async fn priorities_order_a_constrained_link(c: &dyn Connection, s: &dyn Connection) {
    const LEN: usize = 60_000;
    let mut sends = Vec::new();
    // Lowest priority first, so order of opening cannot explain the result.
    for priority in [0, 5, 10] {
        let mut send = c.open_uni(priority).await.unwrap();
        send.write_all(&[priority as u8]).await.unwrap();
        sends.push((priority, send));
    }
    let mut recvs: Vec<Box<dyn RecvStream>> = Vec::new();
    for _ in 0..3 {
        let IncomingStream::Uni(recv) = accept(s).await else {
            panic!("a unidirectional stream");
        };
        recvs.push(recv);
    }
    let mut readers = Vec::new();
    for mut recv in recvs {
        readers.push(tokio::spawn(async move {
            let data = recv.read_to_end(2 * LEN).await.unwrap();
            (data[0] as i32, tokio::time::Instant::now())
        }));
    }
    for (_, send) in &mut sends {
        send.write_all(&vec![0u8; LEN]).await.unwrap();
        send.finish().await.unwrap();
    }
    let mut done = Vec::new();
    for r in readers {
        done.push(r.await.unwrap());
    }
    done.sort_by_key(|(_, at)| *at);
    let order: Vec<i32> = done.iter().map(|(p, _)| *p).collect();
    assert_eq!(order, vec![10, 5, 0], "streams finish in priority order");
}

/// `serve` sets exactly what is accepted: an unlisted protocol is refused,
/// a listed one asks the new admission, and an empty list refuses all.
pub async fn serve_sets_the_protocols_accepted(h: &dyn Harness) {
    const ECHO: Protocol = Protocol::new("mesh-sdk-test/echo/1");
    let (friend, b, stranger) = (key(1), key(2), key(3));
    let (tb, addr_b) = h.endpoint(&b, Arc::new(AdmitAll)).await;
    let (tf, _) = h.endpoint(&friend, Arc::new(AdmitAll)).await;
    let (ts, _) = h.endpoint(&stranger, Arc::new(AdmitAll)).await;
    // Before `serve`: the built-in protocols only.
    assert!(matches!(
        tf.connect(b.node_id(), &addr_b, ECHO).await,
        Err(TransportError::Refused(_))
    ));
    tb.serve(&[ECHO], Arc::new(PairedOnly(friend.node_id())))
        .unwrap();
    let (c, s) = tokio::join!(tf.connect(b.node_id(), &addr_b, ECHO), tb.accept());
    let (c, s) = (c.unwrap(), s.unwrap());
    assert_eq!((c.protocol(), s.protocol()), (ECHO, ECHO));
    c.send(b"echo".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"echo");
    // Not for the stranger (admission), and MESH is no longer served.
    assert!(matches!(
        ts.connect(b.node_id(), &addr_b, ECHO).await,
        Err(TransportError::Refused(_))
    ));
    assert!(matches!(
        tf.connect(b.node_id(), &addr_b, Protocol::MESH).await,
        Err(TransportError::Refused(_))
    ));
    // Nothing served: nothing accepted.
    tb.serve(&[], Arc::new(AdmitAll)).unwrap();
    assert!(
        tf.connect(b.node_id(), &addr_b, Protocol::PAIRING)
            .await
            .is_err()
    );
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
                drop_delivers_what_was_sent,
                many_concurrent_streams,
                streams_reset_and_stop_with_codes,
                a_stalled_stream_stalls_only_itself,
                datagrams_up_to_the_size_limit,
                pairing_connections_carry_no_streams,
                serve_sets_the_protocols_accepted
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
