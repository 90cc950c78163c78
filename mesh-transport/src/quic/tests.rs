use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mesh_core::identity::NodeKey;
use mesh_core::transport::{Admission, AdmitAll, PeerAddr, Protocol, Transport, TransportError};

use super::*;
use crate::conformance::Harness;

struct QuicHarness;

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[async_trait]
impl Harness for QuicHarness {
    async fn endpoint(
        &self,
        key: &Arc<NodeKey>,
        admission: Arc<dyn Admission>,
    ) -> (Box<dyn Transport>, PeerAddr) {
        let t = QuicTransport::bind(key.clone(), localhost(), admission, QuicConfig::default())
            .unwrap();
        let addr = t.addr();
        (Box::new(t), addr)
    }

    fn max_message(&self) -> usize {
        QuicConfig::default().max_message
    }
}

crate::transport_conformance_tests!(quic_conformance, QuicHarness);

fn key(seed: u8) -> Arc<NodeKey> {
    Arc::new(NodeKey::from_secret_bytes(&[seed; 32]))
}

fn bind(seed: u8, config: QuicConfig) -> QuicTransport {
    QuicTransport::bind(key(seed), localhost(), Arc::new(AdmitAll), config).unwrap()
}

async fn connected(
    client: &QuicTransport,
    server: &QuicTransport,
) -> (Box<dyn Connection>, Box<dyn Connection>) {
    let addr = server.addr();
    let (c, s) = tokio::join!(
        client.connect(server.local_node(), &addr, Protocol::MESH),
        server.accept()
    );
    (c.unwrap(), s.unwrap())
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("bounded wait")
}

/// A client that speaks QUIC with a node key but writes raw bytes on the
/// message stream, as a broken or hostile peer would.
async fn raw_client(
    seed: u8,
    server: &QuicTransport,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream) {
    let tls = Tls::new(key(seed)).unwrap();
    let (crypto, _) = tls.client(server.local_node(), Protocol::MESH).unwrap();
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(QuicConfig::default().transport(false, 1).unwrap()));
    let endpoint = quinn::Endpoint::client(localhost()).unwrap();
    let conn = endpoint
        .connect_with(client, server.local_addr(), SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [ADMITTED]);
    (endpoint, conn, send)
}

async fn assert_still_serving(server: &QuicTransport, seed: u8) {
    let client = bind(seed, QuicConfig::default());
    let (c, s) = connected(&client, server).await;
    c.send(b"still here?".to_vec()).await.unwrap();
    assert_eq!(s.recv().await.unwrap(), b"still here?");
    s.send(b"yes".to_vec()).await.unwrap();
    assert_eq!(c.recv().await.unwrap(), b"yes");
}

fn closed_by_us_for_violation(e: ConnectionError) {
    match e {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, VarInt::from(PROTOCOL_VIOLATION));
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn a_peer_announcing_an_oversize_message_is_disconnected_and_others_are_served() {
    within(async {
        let server = bind(1, QuicConfig::default());
        let (_ep, conn, mut send) = raw_client(2, &server).await;
        let s = server.accept().await.unwrap();
        assert_eq!(s.remote_node(), key(2).node_id());
        send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let max = QuicConfig::default().max_message;
        assert_eq!(
            s.recv().await,
            Err(TransportError::TooLarge {
                len: u32::MAX as usize,
                max
            })
        );
        closed_by_us_for_violation(conn.closed().await);
        assert_eq!(s.recv().await, Err(TransportError::Closed));
        assert_eq!(s.send(b"x".to_vec()).await, Err(TransportError::Closed));
        assert_still_serving(&server, 3).await;
    })
    .await;
}

#[tokio::test]
async fn a_peer_ending_the_stream_inside_a_message_is_disconnected() {
    within(async {
        let server = bind(1, QuicConfig::default());
        // Half a length prefix, then the end of the stream.
        let (_ep, conn, mut send) = raw_client(2, &server).await;
        let s = server.accept().await.unwrap();
        send.write_all(&[0, 0]).await.unwrap();
        send.finish().unwrap();
        assert!(matches!(s.recv().await, Err(TransportError::Io(_))));
        closed_by_us_for_violation(conn.closed().await);

        // A length that promises more than the stream carries.
        let (_ep, conn, mut send) = raw_client(3, &server).await;
        let s = server.accept().await.unwrap();
        send.write_all(&[0, 0, 0, 10, 1, 2, 3]).await.unwrap();
        send.finish().unwrap();
        assert!(matches!(s.recv().await, Err(TransportError::Io(_))));
        closed_by_us_for_violation(conn.closed().await);

        assert_still_serving(&server, 4).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_carry_traffic_in_parallel_both_ways() {
    within(async {
        let server = Arc::new(bind(1, QuicConfig::default()));
        let clients: Vec<_> = (0..4)
            .map(|i| Arc::new(bind(10 + i, QuicConfig::default())))
            .collect();
        let mut pairs = Vec::new();
        for round in 0..8 {
            for client in &clients {
                let (c, s) = connected(client, &server).await;
                pairs.push((round, c, s));
            }
        }
        assert_eq!(pairs.len(), 32);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (_, c, s)) in pairs.into_iter().enumerate() {
            let (c, s): (Arc<dyn Connection>, Arc<dyn Connection>) = (c.into(), s.into());
            // Each stream: 50 messages of 8 KiB each way, all at once.
            for (from, to, tag) in [(c.clone(), s.clone(), 0u8), (s, c, 1u8)] {
                tasks.spawn(async move {
                    let sender = tokio::spawn(async move {
                        for j in 0..50u8 {
                            from.send(vec![i as u8 ^ tag ^ j; 8192]).await.unwrap();
                        }
                    });
                    for j in 0..50u8 {
                        assert_eq!(to.recv().await.unwrap(), vec![i as u8 ^ tag ^ j; 8192]);
                    }
                    sender.await.unwrap();
                });
            }
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
            done += 1;
        }
        assert_eq!(done, 64);
    })
    .await;
}

#[tokio::test]
async fn a_silent_address_is_unreachable_within_the_handshake_timeout() {
    within(async {
        // A bound UDP socket that never answers.
        let silent = UdpSocket::bind(localhost()).unwrap();
        let client = bind(
            1,
            QuicConfig {
                handshake_timeout: Duration::from_millis(300),
                ..QuicConfig::default()
            },
        );
        let addr = PeerAddr::Socket(silent.local_addr().unwrap());
        assert_eq!(
            client
                .connect(key(2).node_id(), &addr, Protocol::MESH)
                .await
                .err(),
            Some(TransportError::Unreachable { addr })
        );
    })
    .await;
}

#[tokio::test]
async fn memory_addresses_are_not_supported() {
    let client = bind(1, QuicConfig::default());
    let addr = PeerAddr::Memory("b".into());
    assert_eq!(
        client
            .connect(key(2).node_id(), &addr, Protocol::MESH)
            .await
            .err(),
        Some(TransportError::AddressNotSupported(addr))
    );
}

#[tokio::test]
async fn an_idle_connection_times_out() {
    within(async {
        let config = QuicConfig {
            idle_timeout: Duration::from_millis(300),
            keep_alive_interval: None,
            ..QuicConfig::default()
        };
        let (a, b) = (bind(1, config.clone()), bind(2, config));
        let (c, s) = connected(&a, &b).await;
        // Nothing is sent; both sides see the connection end.
        assert_eq!(s.recv().await, Err(TransportError::Closed));
        assert_eq!(c.recv().await, Err(TransportError::Closed));
    })
    .await;
}

#[test]
fn keep_alive_is_off_on_battery_unless_asked_for() {
    let config = QuicConfig::default();
    assert_eq!(config.keep_alive(false), Some(Duration::from_secs(10)));
    assert_eq!(config.keep_alive(true), None);
    let always = QuicConfig {
        keep_alive_on_battery: true,
        ..QuicConfig::default()
    };
    assert_eq!(always.keep_alive(true), Some(Duration::from_secs(10)));
    let never = QuicConfig {
        keep_alive_interval: None,
        ..QuicConfig::default()
    };
    assert_eq!(never.keep_alive(false), None);
}

#[tokio::test]
async fn switching_to_battery_applies_to_new_connections() {
    let t = bind(1, QuicConfig::default());
    t.set_on_battery(true).unwrap();
    assert!(t.shared.on_battery.load(Ordering::Relaxed));
    t.set_on_battery(false).unwrap();
    assert!(!t.shared.on_battery.load(Ordering::Relaxed));
}

#[test]
fn raw_public_keys_round_trip_and_bad_keys_are_refused() {
    let node = key(7).node_id();
    let der = spki(&node);
    assert_eq!(der.len(), 44);
    assert_eq!(node_from_spki(&der), Some(node));
    assert_eq!(node_from_spki(&der[..43]), None);
    let mut other_alg = der.clone();
    other_alg[8] = 0x71; // 1.3.101.113 is ed448
    assert_eq!(node_from_spki(&other_alg), None);
    // The identity point is a weak key: refused.
    let mut weak = ED25519_SPKI_PREFIX.to_vec();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    weak.extend_from_slice(&identity);
    assert_eq!(node_from_spki(&weak), None);
}

/// Claims `claimed`'s node id but signs with another key.
fn impostor(claimed: u8, real: u8) -> Tls {
    Tls::with_key(key(claimed).node_id(), Arc::new(NodeSigner(key(real)))).unwrap()
}

#[tokio::test]
async fn a_client_claiming_a_key_it_cannot_sign_with_is_refused() {
    within(async {
        let server = bind(1, QuicConfig::default());
        let tls = impostor(2, 3);
        let (crypto, _) = tls.client(server.local_node(), Protocol::MESH).unwrap();
        let endpoint = quinn::Endpoint::client(localhost()).unwrap();
        let attempt = endpoint
            .connect_with(
                quinn::ClientConfig::new(Arc::new(crypto)),
                server.local_addr(),
                SERVER_NAME,
            )
            .unwrap();
        let refused = match attempt.await {
            Err(_) => true,
            // The client may finish its side first; the server's alert then closes it.
            Ok(conn) => conn.accept_bi().await.is_err(),
        };
        assert!(refused);
        assert_still_serving(&server, 4).await;
    })
    .await;
}

#[tokio::test]
async fn a_server_claiming_a_key_it_cannot_sign_with_is_refused() {
    within(async {
        let tls = impostor(2, 3);
        let server_config = server_config(
            &tls,
            &QuicConfig::default(),
            false,
            &[Protocol::PAIRING, Protocol::MESH],
        )
        .unwrap();
        let fake = quinn::Endpoint::server(server_config, localhost()).unwrap();
        let fake_addr = PeerAddr::Socket(fake.local_addr().unwrap());
        let accepting = tokio::spawn(async move {
            if let Some(incoming) = fake.accept().await {
                let _ = incoming.await;
            }
        });
        let client = bind(1, QuicConfig::default());
        let result = client
            .connect(key(2).node_id(), &fake_addr, Protocol::MESH)
            .await;
        assert!(
            matches!(
                result,
                Err(TransportError::Refused(_) | TransportError::Io(_))
            ),
            "{result:?}"
        );
        accepting.abort();
    })
    .await;
}

#[tokio::test]
async fn shutdown_tells_open_connections() {
    within(async {
        let (a, b) = (
            bind(1, QuicConfig::default()),
            bind(2, QuicConfig::default()),
        );
        let (c, _s) = connected(&a, &b).await;
        b.shutdown(Duration::from_secs(2)).await;
        assert_eq!(c.recv().await, Err(TransportError::Closed));
        assert_eq!(b.accept().await.err(), Some(TransportError::Closed));
    })
    .await;
}

#[tokio::test]
async fn a_closing_endpoint_is_unreachable_not_a_refusal() {
    within(async {
        let config = QuicConfig {
            handshake_timeout: Duration::from_millis(500),
            ..QuicConfig::default()
        };
        let (a, b) = (bind(1, config.clone()), bind(2, config));
        let addr = b.addr();
        // Closed, but its socket still answers: transport-level CONNECTION_REFUSED.
        b.shutdown(Duration::ZERO).await;
        match a.connect(b.local_node(), &addr, Protocol::MESH).await {
            Err(TransportError::Unreachable { .. }) => {}
            other => panic!("expected Unreachable, got {other:?}"),
        }
    })
    .await;
}

#[test]
fn restart_keys_are_stable_per_node_and_differ_between_nodes() {
    let (reset_a, cid_a) = restart_keys(&key(1));
    let (reset_a2, cid_a2) = restart_keys(&key(1));
    let (reset_b, cid_b) = restart_keys(&key(2));
    let tag = |k: &ring::hmac::Key| ring::hmac::sign(k, b"cid").as_ref().to_vec();
    assert_eq!((tag(&reset_a), cid_a), (tag(&reset_a2), cid_a2));
    assert_ne!(tag(&reset_a), tag(&reset_b));
    assert_ne!(cid_a, cid_b);
}

/// A source over its handshake rate is refused from its first packet (no
/// handshake runs); another source on the same host is not affected.
#[tokio::test]
async fn a_source_over_its_handshake_rate_is_refused_before_any_handshake() {
    within(async {
        let config = QuicConfig {
            handshakes_per_source: mesh_core::limits::Rate::per_second(0.001, 3),
            ..QuicConfig::default()
        };
        let server = bind(1, config);
        let flooder = bind(2, QuicConfig::default());
        let mut accepted = Vec::new();
        let mut refused = 0;
        for _ in 0..8 {
            let addr = server.addr();
            let attempt = flooder.connect(server.local_node(), &addr, Protocol::MESH);
            let accepting =
                async { tokio::time::timeout(Duration::from_millis(500), server.accept()).await };
            let (c, s) = tokio::join!(attempt, accepting);
            match c {
                Ok(c) => accepted.push((c, s.unwrap().unwrap())),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(accepted.len(), 3, "the burst, then nothing");
        assert_eq!(refused, 5);
        let stats = server.incoming_stats();
        assert_eq!(stats.handshakes, 3);
        assert_eq!(stats.refused_rate, 5);
        // Another source (127.0.0.2: another host, as far as the limit
        // knows) still gets in.
        let other = QuicTransport::bind(
            key(3),
            SocketAddr::from(([127, 0, 0, 2], 0)),
            Arc::new(AdmitAll),
            QuicConfig::default(),
        )
        .unwrap();
        let (c, s) = connected(&other, &server).await;
        c.send(b"hi".to_vec()).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), b"hi");
        assert_eq!(server.incoming_stats().handshakes, 4);
    })
    .await;
}

/// Under load (here: `retry_above` 0, so always), an address not yet
/// validated is sent a stateless Retry first; a real client answers it and
/// connects, and only then does its handshake start.
#[tokio::test]
async fn under_load_an_unvalidated_address_is_retried_and_a_real_client_gets_in() {
    within(async {
        let config = QuicConfig {
            retry_above: 0,
            ..QuicConfig::default()
        };
        let server = bind(1, config);
        let client = bind(2, QuicConfig::default());
        let (c, s) = connected(&client, &server).await;
        c.send(b"validated".to_vec()).await.unwrap();
        assert_eq!(s.recv().await.unwrap(), b"validated");
        let stats = server.incoming_stats();
        assert_eq!((stats.retries, stats.handshakes), (1, 1), "{stats:?}");
    })
    .await;
}

/// Only a validated address is charged to its source's rate: below
/// `retry_above`, where no Retry proves the address, attempts go ahead
/// uncharged (a spoofed packet must not spend another host's rate); with
/// the default (always Retry), the same source is held to its rate.
#[tokio::test]
async fn only_validated_addresses_are_charged_to_their_source() {
    within(async {
        let tight = mesh_core::limits::Rate::per_second(0.001, 1);
        let lax = bind(
            1,
            QuicConfig {
                handshakes_per_source: tight,
                retry_above: 1000,
                ..QuicConfig::default()
            },
        );
        let client = bind(2, QuicConfig::default());
        for _ in 0..3 {
            let (c, s) = connected(&client, &lax).await;
            c.close();
            s.close();
        }
        let stats = lax.incoming_stats();
        assert_eq!(
            (stats.retries, stats.refused_rate, stats.handshakes),
            (0, 0, 3)
        );

        let strict = bind(
            3,
            QuicConfig {
                handshakes_per_source: tight,
                ..QuicConfig::default()
            },
        );
        let (_c, _s) = connected(&client, &strict).await;
        let addr = strict.addr();
        assert!(
            client
                .connect(strict.local_node(), &addr, Protocol::MESH)
                .await
                .is_err()
        );
        let stats = strict.incoming_stats();
        assert_eq!((stats.handshakes, stats.refused_rate), (1, 1), "{stats:?}");
        assert!(stats.retries >= 2);
    })
    .await;
}
