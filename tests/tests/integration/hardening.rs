//! The runtime under a hostile host on the LAN (issue 14): what an unpaired
//! key can send must never reach state that paired devices depend on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::clock::{Clock, SystemClock};
use mesh_core::events::{Received, kinds};
use mesh_core::identity::NodeKey;
use mesh_core::limits::Rate;
use mesh_core::node::{
    FnHandler, Node, NodeConfig, NodeError, PairingLimits, PeerLimits, Role, Worker,
};
use mesh_core::pairing::{DeviceInfo, DevicePairing, PairingConfig};
use mesh_core::storage::records::{PairingRequestRecord, PrimaryLinkRecord};
use mesh_core::storage::{MemoryStorage, Storage, StorageExt};
use mesh_core::transport::{Connection, Protocol, Transport};
use mesh_core::wire::{
    Ack, Destination, Envelope, EventPayload, JsonText, Payload, Platform, SessionMessage,
};
use mesh_transport::quic::QuicTransport;
use serde_json::json;

use crate::node_e2e::{pair, primary, primary_built, primary_on, primary_with, quic, worker};

/// A frame of `payload` from `key` to `to`, stamped `at`.
fn signed(
    key: &NodeKey,
    to: mesh_core::identity::NodeId,
    at: mesh_core::clock::Timestamp,
    payload: Payload,
) -> Vec<u8> {
    Envelope::new(key.node_id(), Destination::Node(to), at, payload)
        .sign(key)
        .unwrap()
        .to_frame()
        .unwrap()
}

/// Envelopes the flood sends at most, and how long it may take.
const FLOOD_MESSAGES: usize = 80_000;
const FLOOD_TIME: Duration = Duration::from_secs(15);

/// Defect 1: one replay guard shared by every peer let an unpaired key,
/// admitted only to pairing, push the guard's floor past every paired
/// worker's messages. With per-peer replay state the flood touches only its
/// own connection: no heartbeat is lost and no session drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaired_key_flooding_pairing_loses_no_heartbeat_of_50_workers() {
    let p = primary();
    let mut workers = Vec::new();
    for i in 0..50 {
        let (w, _) = worker(&format!("w{i}"));
        pair(&p, &w, false).await;
        workers.push(w);
    }
    let mut left = p.node.subscribe("peer.left", 256).unwrap();

    // The attacker: a key of its own, admitted to pairing like anyone.
    let evil_key = Arc::new(NodeKey::generate());
    let evil_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let evil = quic(&evil_key, &evil_store);
    let primary_id = p.node.node_id();
    let started = Instant::now();
    let mut sent = 0usize;
    let mut connections = 0usize;
    while sent < FLOOD_MESSAGES && started.elapsed() < FLOOD_TIME {
        let Ok(conn) = evil.connect(primary_id, &p.addr, Protocol::PAIRING).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        connections += 1;
        let now = SystemClock.now();
        let info = DeviceInfo {
            device_id: format!("evil-{connections}"),
            name: "evil".into(),
            platform: Platform::Desktop,
        };
        let (_, request) = DevicePairing::start(
            evil_key.node_id(),
            primary_id,
            info,
            now,
            &PairingConfig::default(),
        );
        let frame = signed(&evil_key, primary_id, now, Payload::Pairing(request));
        if conn.send(frame).await.is_err() {
            continue;
        }
        // Then as many validly signed envelopes as the primary takes,
        // stamped just inside the clock-skew window's future edge.
        while sent < FLOOD_MESSAGES && started.elapsed() < FLOOD_TIME {
            let stamp = SystemClock.now().saturating_add(Duration::from_secs(295));
            let frame = signed(
                &evil_key,
                primary_id,
                stamp,
                Payload::Ack(Ack { ids: vec![] }),
            );
            if conn.send(frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        conn.close();
    }
    println!("flood: {sent} envelopes over {connections} pairing connections");

    // Let the workers beat on for a while after the flood.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for w in &workers {
        assert!(w.is_connected(), "a worker lost its session");
    }
    // Stop the workers, then compare: every heartbeat sent was processed.
    for w in &workers {
        w.shutdown().await;
    }
    let sent_total: u64 = workers.iter().map(|w| w.stats().heartbeats_sent).sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.node.stats().heartbeats_received < sent_total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.node.stats().heartbeats_received, sent_total);
    assert!(sent_total > 50 * 10, "too few heartbeats: {sent_total}");
    // No session dropped before the workers said goodbye: each of the 50
    // left once, at its shutdown.
    let mut lefts = 0;
    while let Ok(Some(Received::Event(e))) =
        tokio::time::timeout(Duration::from_millis(200), left.recv()).await
    {
        if e.kind == "peer.left" {
            lefts += 1;
        }
    }
    assert_eq!(lefts, 50, "sessions dropped during the flood");
}

/// Defect 9: a command waiting for its result fails with `connection_lost`
/// as soon as the session drops, not after the command timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_command_fails_at_once_when_the_session_drops() {
    let p = primary();
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let config = NodeConfig::new(Role::Worker, "slow", "hw-slow")
        .heartbeat_interval(Duration::from_millis(100))
        .command_timeout(Duration::from_secs(30));
    let w = Node::builder(key.clone(), store.clone(), quic(&key, &store), config)
        .handler(
            "slow",
            Arc::new(FnHandler(|_: &serde_json::Value| {
                std::thread::sleep(Duration::from_secs(2));
                Ok(json!({}))
            })),
        )
        .start_worker()
        .unwrap();
    pair(&p, &w, false).await;
    let device = w.node_id();
    let primary_node = p.node.clone();
    let call =
        tokio::spawn(async move { primary_node.run_action(&device, "slow", json!({})).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(w); // the worker's process goes away mid-command
    let result = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call still waits")
        .unwrap();
    match result {
        Err(NodeError::Command { code, .. }) => assert_eq!(code, "connection_lost"),
        other => panic!("expected connection_lost, got {other:?}"),
    }
}

/// Opens a pairing connection with a fresh key and sends a request;
/// returns the transport and the connection (kept open).
async fn ask_to_pair(p: &crate::node_e2e::Primary) -> (Arc<QuicTransport>, Box<dyn Connection>) {
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let transport = quic(&key, &store);
    let conn = transport
        .connect(p.node.node_id(), &p.addr, Protocol::PAIRING)
        .await
        .unwrap();
    let now = SystemClock.now();
    let info = DeviceInfo {
        device_id: format!("hw-{}", key.node_id()),
        name: "asker".into(),
        platform: Platform::Android,
    };
    let (_, request) = DevicePairing::start(
        key.node_id(),
        p.node.node_id(),
        info,
        now,
        &PairingConfig::default(),
    );
    let frame = signed(&key, p.node.node_id(), now, Payload::Pairing(request));
    let _ = conn.send(frame).await;
    (transport, conn)
}

fn stored_requests(p: &crate::node_e2e::Primary) -> usize {
    p.store.load_all::<PairingRequestRecord>().unwrap().len()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Defect 2: pending requests are capped (globally and per address), new
/// ones rate-limited, and a request's row lives only as long as its
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_requests_are_capped_rate_limited_and_pruned() {
    // Per address: at most 3 waiting, 100/s. Globally: 4 ever (no refill).
    let p = primary_with(|c| {
        c.pairing_limits(
            PairingLimits::default()
                .max_pending(32, 3)
                .rates(Rate::per_second(0.0, 4), Rate::per_second(100.0, 100)),
        )
    });
    let mut open = Vec::new();
    for _ in 0..10 {
        open.push(ask_to_pair(&p).await);
    }
    wait_until("the requests to be decided", || {
        p.node.stats().pairing_refused + stored_requests(&p) as u64 >= 10
    })
    .await;
    // 127.0.0.1 may keep 3 requests waiting; the other 7 were refused.
    assert_eq!(p.node.pending_pairings().unwrap().len(), 3);
    assert_eq!(stored_requests(&p), 3);
    assert_eq!(p.node.stats().pairing_refused, 7);

    // Closing the connections prunes the rows (nothing can approve them).
    for (_, conn) in &open {
        conn.close();
    }
    wait_until("the rows to be pruned", || stored_requests(&p) == 0).await;

    // The global bucket: the 3 stored took 3 of its 4 tokens (those over
    // the cap were refused before it). So within two more requests, with
    // nothing waiting, one is refused for the rate alone.
    let mut rate_limited = false;
    for _ in 0..2 {
        let refused_before = p.node.stats().pairing_refused;
        let (_t, conn) = ask_to_pair(&p).await;
        wait_until("a decision", || {
            stored_requests(&p) == 1 || p.node.stats().pairing_refused > refused_before
        })
        .await;
        if p.node.stats().pairing_refused > refused_before {
            assert!(conn.recv().await.is_err(), "a refused connection is closed");
            assert_eq!(stored_requests(&p), 0);
            rate_limited = true;
            break;
        }
        conn.close();
        wait_until("the row to be pruned", || stored_requests(&p) == 0).await;
    }
    assert!(rate_limited, "the global rate never refused a request");
}

/// Defect 2: one live request per key (a new one replaces the old), and a
/// pairing connection that goes silent is closed at its idle deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_pairing_connection_is_closed_and_its_row_removed() {
    let p = primary_with(|c| {
        c.pairing_limits(
            PairingLimits::default()
                .rates(Rate::per_second(100.0, 100), Rate::per_second(100.0, 100))
                .idle_timeout(Duration::from_millis(300)),
        )
    });
    let (_t, conn) = ask_to_pair(&p).await;
    wait_until("the request to be stored", || stored_requests(&p) == 1).await;
    // Silence: the primary closes the connection and forgets the request.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.recv()).await;
    assert!(matches!(closed, Ok(Err(_))), "{closed:?}");
    wait_until("the row to go", || stored_requests(&p) == 0).await;
    assert!(p.node.pending_pairings().unwrap().is_empty());
}

/// A fake primary: accepts one session, answers the hello, then sends
/// `payloads`. Returns its id and address.
async fn fake_primary(
    payloads: Vec<Payload>,
) -> (mesh_core::identity::NodeId, mesh_core::transport::PeerAddr) {
    let key = Arc::new(NodeKey::generate());
    let transport = Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(mesh_core::transport::AdmitAll),
            mesh_transport::quic::QuicConfig::default(),
        )
        .unwrap(),
    );
    let addr = transport.addr();
    let id = key.node_id();
    tokio::spawn(async move {
        let conn = transport.accept().await.unwrap();
        let _hello = conn.recv().await.unwrap();
        let to = conn.remote_node();
        let mut all = vec![Payload::Session(SessionMessage::Welcome)];
        all.extend(payloads);
        for p in all {
            let frame = signed(&key, to, SystemClock.now(), p);
            conn.send(frame).await.unwrap();
        }
        // Keep the session open until the worker goes.
        let _ = conn.recv().await;
    });
    (id, addr)
}

/// A worker that believes it is paired with `primary` at `addr`.
fn worker_paired_with(
    primary: mesh_core::identity::NodeId,
    addr: mesh_core::transport::PeerAddr,
) -> Worker {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    store
        .save(&PrimaryLinkRecord {
            primary,
            address: addr,
            token: [7; 32],
            paired_at: SystemClock.now(),
        })
        .unwrap();
    let key = Arc::new(NodeKey::generate());
    let config = NodeConfig::new(Role::Worker, "victim", "hw-victim")
        .heartbeat_interval(Duration::from_secs(60));
    Node::builder(key.clone(), store.clone(), quic(&key, &store), config)
        .start_worker()
        .unwrap()
}

/// Defect 10: a primary may tell its workers how their actions progress,
/// and nothing else: it cannot publish arbitrary event kinds on a worker's
/// bus (a forged `device.revoked` or `pairing.approved` there would mislead
/// the app).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cannot_publish_arbitrary_events_on_a_worker() {
    let event = |kind: &str| {
        Payload::Event(EventPayload {
            kind: kind.into(),
            data: JsonText::new(r#"{"forged": true}"#).unwrap(),
        })
    };
    let (id, addr) = fake_primary(vec![
        event("device.revoked"),
        event("pairing.approved"),
        event("session.ended"),
        event(kinds::ACTION_UPDATED),
    ])
    .await;
    let w = worker_paired_with(id, addr);
    let mut all = w.subscribe("*", 64).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|k| k == kinds::ACTION_UPDATED) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, all.recv()).await {
            Ok(Some(Received::Event(e))) => seen.push(e.kind.clone()),
            Ok(Some(_)) => {}
            _ => panic!("no action.updated; saw {seen:?}"),
        }
    }
    for forged in ["device.revoked", "pairing.approved", "session.ended"] {
        assert!(
            !seen.iter().any(|k| k == forged),
            "{forged} got through: {seen:?}"
        );
    }
    w.shutdown().await;
}

/// Battery state an app reports; the test flips it.
#[derive(Debug, Default)]
struct Battery(std::sync::atomic::AtomicBool);

impl mesh_core::node::MetricsSource for Battery {
    fn sample(&self) -> mesh_core::wire::HealthMetrics {
        let on_battery = self.0.load(std::sync::atomic::Ordering::Relaxed);
        mesh_core::wire::HealthMetrics {
            battery_percent: Some(55.0),
            charging: Some(!on_battery),
            ..Default::default()
        }
    }
}

/// Defect 7: QUIC keep-alive follows the node's own power state, driven by
/// the runtime from its heartbeat metrics (not only by a test calling the
/// transport).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_follows_the_workers_own_power_state() {
    let p = primary();
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let transport = quic(&key, &store);
    let battery = Arc::new(Battery::default());
    let config = NodeConfig::new(Role::Worker, "laptop", "hw-laptop")
        .heartbeat_interval(Duration::from_millis(50));
    let w = Node::builder(key, store, transport.clone(), config)
        .metrics(battery.clone())
        .start_worker()
        .unwrap();
    pair(&p, &w, false).await;
    wait_until("a heartbeat on external power", || {
        w.stats().heartbeats_sent > 0
    })
    .await;
    assert!(!transport.on_battery());
    assert!(transport.keep_alive_now().is_some());

    battery.0.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("the transport to hear of the battery", || {
        transport.on_battery()
    })
    .await;
    assert_eq!(
        transport.keep_alive_now(),
        None,
        "keep-alive off on battery"
    );

    battery.0.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_until("the transport to hear of the charger", || {
        !transport.on_battery()
    })
    .await;
    assert!(transport.keep_alive_now().is_some());
    w.shutdown().await;
}

/// A paired device driven by hand: its key and token (from pairing a real
/// worker, which is then shut down).
struct RawDevice {
    key: Arc<NodeKey>,
    token: [u8; 32],
    transport: Arc<QuicTransport>,
}

async fn raw_device(p: &crate::node_e2e::Primary) -> RawDevice {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let config = NodeConfig::new(Role::Worker, "raw", &format!("hw-raw-{}", key.node_id()))
        .heartbeat_interval(Duration::from_secs(60));
    let w = Node::builder(key.clone(), store.clone(), quic(&key, &store), config)
        .start_worker()
        .unwrap();
    pair(p, &w, false).await;
    let link: PrimaryLinkRecord = store.load("primary").unwrap().unwrap();
    w.shutdown().await;
    RawDevice {
        transport: quic(&key, &store),
        key,
        token: link.token,
    }
}

impl RawDevice {
    async fn send(&self, conn: &dyn Connection, to: mesh_core::identity::NodeId, payload: Payload) {
        let frame = signed(&self.key, to, SystemClock.now(), payload);
        conn.send(frame).await.unwrap();
    }

    /// Opens a session (hello with the token, welcome back).
    async fn session(&self, p: &crate::node_e2e::Primary) -> Box<dyn Connection> {
        let conn = self
            .transport
            .connect(p.node.node_id(), &p.addr, Protocol::MESH)
            .await
            .unwrap();
        self.send(
            conn.as_ref(),
            p.node.node_id(),
            Payload::Session(SessionMessage::Hello { token: self.token }),
        )
        .await;
        match recv(conn.as_ref()).await {
            Some(Payload::Session(SessionMessage::Welcome)) => conn,
            other => panic!("no welcome: {other:?}"),
        }
    }
}

/// The next payload on `conn` within 5 s (`None`: closed or silent).
async fn recv(conn: &dyn Connection) -> Option<Payload> {
    let frame = tokio::time::timeout(Duration::from_secs(5), conn.recv())
        .await
        .ok()?
        .ok()?;
    let (u, _) =
        mesh_core::wire::decode_frame(&frame, mesh_core::wire::DEFAULT_MAX_FRAME_LEN).ok()?;
    Some(u.verify().ok()?.into_envelope().payload)
}

fn command(name: &str) -> Payload {
    Payload::Command(mesh_core::wire::Command {
        command_id: mesh_core::wire::MessageId::random(),
        name: name.into(),
        args: JsonText::new(r#"{"text": "x"}"#).unwrap(),
        timeout_ms: 5000,
        usage: None,
    })
}

/// Sends `n` commands `name` at once and returns the outcome codes
/// (`ok` for successes), in any order.
async fn burst(dev: &RawDevice, p: &crate::node_e2e::Primary, name: &str, n: usize) -> Vec<String> {
    let conn = dev.session(p).await;
    for _ in 0..n {
        dev.send(conn.as_ref(), p.node.node_id(), command(name))
            .await;
    }
    let mut codes = Vec::new();
    while codes.len() < n {
        match recv(conn.as_ref()).await {
            Some(Payload::CommandResult(r)) => codes.push(match r.outcome {
                mesh_core::wire::CommandOutcome::Ok(_) => "ok".to_owned(),
                mesh_core::wire::CommandOutcome::Err { code, .. } => code,
            }),
            Some(_) => {}
            None => break,
        }
    }
    conn.close();
    codes
}

fn count(codes: &[String], code: &str) -> usize {
    codes.iter().filter(|c| *c == code).count()
}

/// Defect 4: a peer's messages over its rate are refused with a typed code
/// and counted; the rest are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_message_rate_is_refused_with_rate_limited() {
    let p =
        primary_with(|c| c.peer_limits(PeerLimits::default().messages(Rate::per_second(0.0, 10))));
    let dev = raw_device(&p).await;
    // A burst of 10 and no refill. The bucket is the device's: the worker
    // that paired this key spent a token or two of it already (its first
    // heartbeat, its goodbye), so 8 to 10 are served and the rest refused.
    let codes = burst(&dev, &p, "notes.write", 30).await;
    assert_eq!(codes.len(), 30, "{codes:?}");
    let served = count(&codes, "ok");
    assert!((8..=10).contains(&served), "{codes:?}");
    assert_eq!(count(&codes, "rate_limited"), 30 - served, "{codes:?}");
    assert_eq!(p.node.stats().messages_refused, (30 - served) as u64);
    // The bucket is the device's, not the session's: reconnecting does not
    // refill it.
    let codes = burst(&dev, &p, "notes.write", 5).await;
    assert_eq!(count(&codes, "rate_limited"), 5, "{codes:?}");
}

/// Defect 4: commands in flight per peer are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_commands_in_flight_is_refused_with_too_many_commands() {
    let p = primary_with(|c| c.peer_limits(PeerLimits::default().commands_in_flight(2)));
    let dev = raw_device(&p).await;
    let codes = burst(&dev, &p, "notes.slow", 6).await;
    assert_eq!(count(&codes, "ok"), 2, "{codes:?}");
    assert_eq!(count(&codes, "too_many_commands"), 4, "{codes:?}");
    assert_eq!(p.node.stats().commands_refused, 4);
    // Once they finished, the device may run commands again.
    let again = burst(&dev, &p, "notes.slow", 2).await;
    assert_eq!(count(&again, "ok"), 2, "{again:?}");
}

/// Defect 4: connections per key are capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_connection_cap_is_closed() {
    let p = primary_with(|c| c.peer_limits(PeerLimits::default().connections_per_key(2)));
    let dev = raw_device(&p).await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(
            dev.transport
                .connect(p.node.node_id(), &p.addr, Protocol::MESH)
                .await
                .unwrap(),
        );
    }
    wait_until("two refusals", || p.node.stats().connections_refused == 2).await;
    let mut closed = 0;
    for c in &conns {
        if tokio::time::timeout(Duration::from_millis(300), c.recv())
            .await
            .is_ok_and(|r| r.is_err())
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 2);
    for c in &conns {
        c.close();
    }
    drop(conns);
    // With the others gone (their hello deadline or close), a session
    // opens again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = dev.session(&p).await;
    conn.close();
}

/// The payload of one frame.
fn payload_of(frame: &[u8]) -> Payload {
    let (u, _) =
        mesh_core::wire::decode_frame(frame, mesh_core::wire::DEFAULT_MAX_FRAME_LEN).unwrap();
    u.verify().unwrap().into_envelope().payload
}

/// Defect 6: a worker retries transient ends (a storage hiccup on the
/// primary), acknowledges a rotated token only once it is stored, and if
/// the primary never committed the rotation (it stopped between the
/// acknowledgement and its commit) it falls back to the old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_retries_transient_ends_and_survives_an_uncommitted_rotation() {
    let key = Arc::new(NodeKey::generate());
    let transport = Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(mesh_core::transport::AdmitAll),
            mesh_transport::quic::QuicConfig::default(),
        )
        .unwrap(),
    );
    let addr = transport.addr();
    let id = key.node_id();
    let new_token = [9u8; 32];
    let (tx, mut hellos) = tokio::sync::mpsc::channel(16);
    let fake = tokio::spawn(async move {
        let send = |conn: Arc<dyn Connection>, p: Payload| {
            let key = key.clone();
            async move {
                let to = conn.remote_node();
                let frame = signed(&key, to, SystemClock.now(), p);
                let _ = conn.send(frame).await;
            }
        };
        for round in 0..4 {
            let conn: Arc<dyn Connection> = Arc::from(transport.accept().await.unwrap());
            let Payload::Session(SessionMessage::Hello { token }) =
                payload_of(&conn.recv().await.unwrap())
            else {
                panic!("no hello");
            };
            tx.send(token).await.unwrap();
            match round {
                // A storage hiccup on the primary: transient.
                0 => {
                    send(
                        conn.clone(),
                        Payload::Session(SessionMessage::Bye {
                            reason: "storage".into(),
                        }),
                    )
                    .await;
                }
                // A rotation the worker acknowledges; then this "primary"
                // stops before committing it.
                1 => {
                    send(conn.clone(), Payload::Session(SessionMessage::Welcome)).await;
                    send(
                        conn.clone(),
                        Payload::Session(SessionMessage::TokenRotated { token: new_token }),
                    )
                    .await;
                    loop {
                        let p = payload_of(&conn.recv().await.unwrap());
                        if let Payload::Session(SessionMessage::TokenStored { digest }) = p {
                            // It names the token it stored.
                            assert_eq!(digest, SessionMessage::stored_digest(&new_token));
                            break;
                        }
                    }
                    tx.send([0xAC; 32]).await.unwrap(); // "acknowledged"
                }
                // Back up without the commit: the new token is unknown.
                2 => {
                    send(
                        conn.clone(),
                        Payload::Session(SessionMessage::Bye {
                            reason: "bad_token".into(),
                        }),
                    )
                    .await;
                }
                _ => {
                    send(conn.clone(), Payload::Session(SessionMessage::Welcome)).await;
                    while conn.recv().await.is_ok() {}
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.close();
        }
    });

    let old_token = [7u8; 32];
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    store
        .save(&PrimaryLinkRecord {
            primary: id,
            address: addr,
            token: old_token,
            paired_at: SystemClock.now(),
        })
        .unwrap();
    let wkey = Arc::new(NodeKey::generate());
    let config = NodeConfig::new(Role::Worker, "w", "hw-w")
        .heartbeat_interval(Duration::from_secs(60))
        .reconnect(Duration::from_millis(20), Duration::from_millis(100));
    let w = Node::builder(wkey.clone(), store.clone(), quic(&wkey, &store), config)
        .start_worker()
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(10), hellos.recv()).await {
            Ok(Some(t)) => seen.push(t),
            other => panic!(
                "the worker stopped trying: {other:?} after {} hellos",
                seen.len()
            ),
        }
    }
    // old (storage bye) → old (rotated, acknowledged) → new (bad_token) → old again.
    assert_eq!(
        seen,
        [old_token, old_token, [0xAC; 32], new_token, old_token]
    );
    wait_until("the session", || w.is_connected()).await;
    let link: PrimaryLinkRecord = store.load("primary").unwrap().unwrap();
    assert_eq!(link.token, old_token);
    w.shutdown().await;
    fake.abort();
}

/// Defect 6: rotating an offline device's token fails with
/// `DeviceOffline` (nothing changes) unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_an_offline_device_needs_force() {
    let p = primary();
    let (w, w_store) = worker("sleepy");
    pair(&p, &w, false).await;
    let device = w.node_id();
    w.shutdown().await;
    wait_until("the device to be offline", || {
        !p.node.devices().unwrap()[0].online
    })
    .await;
    let link: PrimaryLinkRecord = w_store.load("primary").unwrap().unwrap();
    let registry =
        mesh_core::registry::Registry::new(p.store.clone(), mesh_core::events::EventBus::new());
    let gate = mesh_core::registry::scopes::PRESENCE_WRITE;
    assert!(matches!(
        p.node.rotate_token(&device).await,
        Err(NodeError::DeviceOffline(d)) if d == device
    ));
    registry.check(&device, &link.token, gate).unwrap();
    p.node.rotate_token_forced(&device).await.unwrap();
    assert!(registry.check(&device, &link.token, gate).is_err());
}

/// Defect 8: successful commands move a device from paired to trusted
/// (threshold configurable, recorded in the ledger, `device.trusted`);
/// scope changes are audited and enforced at the entry points: without
/// `commands:run` a command is refused `scope_missing` (the session stays
/// open), without `events:write` a worker's event is dropped, with it the
/// event reaches the primary as `device.event`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_progresses_with_successes_and_scopes_guard_their_entry_points() {
    use mesh_core::ledger::record_types;
    use mesh_core::registry::{TrustConfig, scopes};
    use mesh_core::storage::records::{DeviceRecord, DeviceStatus};
    // No interval between rises here (the registry's unit test covers it).
    let p = primary_with(|c| {
        c.trust(
            TrustConfig::default()
                .step(0.2)
                .trusted_from(0.7)
                .min_interval(Duration::ZERO),
        )
    });
    let (w, _) = worker("climber");
    pair(&p, &w, false).await;
    let dev = w.node_id();
    let status = |p: &crate::node_e2e::Primary| {
        let d: DeviceRecord = p.store.load(&dev.to_string()).unwrap().unwrap();
        (d.status, (d.trust_level * 100.0).round() as u32)
    };
    assert_eq!(status(&p), (DeviceStatus::Paired, 30));
    let mut trusted = p.node.subscribe(kinds::DEVICE_TRUSTED, 8).unwrap();
    // A refused command earns nothing.
    assert!(w.send_command("shell.exec", json!({})).await.is_err());
    assert_eq!(status(&p), (DeviceStatus::Paired, 30));
    w.send_command("notes.write", json!({"text": "1"}))
        .await
        .unwrap();
    assert_eq!(status(&p), (DeviceStatus::Paired, 50));
    w.send_command("notes.write", json!({"text": "2"}))
        .await
        .unwrap();
    assert_eq!(status(&p), (DeviceStatus::Trusted, 70));
    crate::support::next(&mut trusted, kinds::DEVICE_TRUSTED, crate::support::WAIT).await;

    // Scopes: commands:run and events:write taken away (audited).
    let mut device_events = p.node.subscribe(kinds::DEVICE_EVENT, 8).unwrap();
    p.node
        .set_scopes(&dev, &[scopes::PRESENCE_WRITE, scopes::ACTIONS_READ])
        .unwrap();
    match w.send_command("notes.write", json!({"text": "3"})).await {
        Err(NodeError::Command { code, .. }) => assert_eq!(code, "scope_missing"),
        other => panic!("{other:?}"),
    }
    w.publish_event("app.note", json!({"n": 1})).await.unwrap();
    // The session is in order: this answer means the event was handled.
    assert!(w.send_command("notes.write", json!({})).await.is_err());
    assert!(w.is_connected(), "a missing scope does not end the session");
    // Events allowed again: the next one arrives (and only it).
    p.node
        .set_scopes(&dev, &[scopes::PRESENCE_WRITE, scopes::EVENTS_WRITE])
        .unwrap();
    w.publish_event("app.note", json!({"n": 2})).await.unwrap();
    let e = crate::support::next(
        &mut device_events,
        kinds::DEVICE_EVENT,
        crate::support::WAIT,
    )
    .await;
    assert_eq!(e.data["kind"], "app.note");
    assert_eq!(e.data["data"]["n"], 2);
    assert_eq!(e.data["device"], dev.to_string());

    let ledger = mesh_ledger::SignedLedger::open(
        p.store.clone(),
        p.key.clone(),
        mesh_ledger::LedgerConfig::default(),
    )
    .unwrap();
    let types: Vec<String> = ledger
        .view()
        .records(0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.record_type)
        .collect();
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == record_types::DEVICE_TRUSTED)
            .count(),
        1
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == record_types::SCOPES_SET)
            .count(),
        2
    );
}

/// Review finding, over QUIC: trust is not farmed. With the default
/// progression (a rise at most every 10 minutes), a burst of successful
/// commands is counted but raises the device's trust once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_successes_raises_trust_once() {
    use mesh_core::storage::records::{DeviceRecord, DeviceStatus};
    let p = primary();
    let (w, _) = worker("farmer");
    pair(&p, &w, false).await;
    for i in 0..10 {
        w.send_command("notes.write", json!({ "text": i }))
            .await
            .unwrap();
    }
    let d: DeviceRecord = p.store.load(&w.node_id().to_string()).unwrap().unwrap();
    assert_eq!(d.successes, 10);
    assert_eq!(
        (d.trust_level * 100.0).round() as u32,
        35,
        "0.30 + one step"
    );
    assert_eq!(d.status, DeviceStatus::Paired);
    w.shutdown().await;
    p.node.shutdown().await;
}

/// Defect 3: one paired device sending denied commands as fast as it can,
/// against a primary on SQLite, makes no other device look offline, and
/// every decision it got an answer for is durable in the ledger — written
/// through the storage writer's group commit (fewer transactions than
/// batches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_flooding_denied_commands_on_sqlite_slows_no_other_device() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        Arc::new(mesh_core::storage::SqliteStorage::open(dir.path().join("primary.db")).unwrap());
    // The primary expects a heartbeat a second (the workers send ten): a
    // device looks offline only after seconds of silence, so what this
    // catches is the flood starving others, not the test machine's load.
    let (p, ledger) = primary_on(sqlite.clone(), |c| {
        c.heartbeat_interval(Duration::from_secs(1)).peer_limits(
            PeerLimits::default()
                .messages(Rate::per_second(100_000.0, 100_000))
                .commands_in_flight(256),
        )
    });
    // The flooder first: the worker it pairs through (then shuts down) has
    // heartbeats of its own, counted before the baseline below.
    let dev = raw_device(&p).await;
    // Its last heartbeat may still be in flight: wait until the count rests.
    let mut beats_before = p.node.stats().heartbeats_received;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = p.node.stats().heartbeats_received;
        if now == beats_before {
            break;
        }
        beats_before = now;
    }
    let mut workers = Vec::new();
    for i in 0..10 {
        let (w, _) = worker(&format!("w{i}"));
        pair(&p, &w, false).await;
        workers.push(w);
    }
    let mut offline = p.node.subscribe(kinds::DEVICE_OFFLINE, 64).unwrap();
    let decided_before = ledger
        .view()
        .records(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|r| r.record_type == mesh_core::ledger::record_types::COMMAND_DECIDED)
        .count();
    let stats_before = sqlite.write_stats();

    // The flood: the device's session (a new one would replace it) sends
    // denied commands back to back for 3 s while reading the answers.
    let dev = Arc::new(dev);
    let flood_for = Duration::from_secs(3);
    let mut floods = Vec::new();
    {
        let conn: Arc<dyn Connection> = Arc::from(dev.session(&p).await);
        let dev = dev.clone();
        let to = p.node.node_id();
        let reader = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut denied = 0usize;
                let mut other = 0usize;
                while let Some(payload) = recv(conn.as_ref()).await {
                    if let Payload::CommandResult(r) = payload {
                        match r.outcome {
                            mesh_core::wire::CommandOutcome::Err { code, .. }
                                if code == "blocked_command" =>
                            {
                                denied += 1
                            }
                            _ => other += 1,
                        }
                    }
                }
                (denied, other)
            })
        };
        floods.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0usize;
            while started.elapsed() < flood_for {
                dev.send(conn.as_ref(), to, command("shell.exec")).await;
                sent += 1;
            }
            // Let the last answers come, then end the session.
            tokio::time::sleep(Duration::from_secs(2)).await;
            conn.close();
            (sent, reader.await.unwrap())
        }));
    }
    let mut sent = 0;
    let mut denied = 0;
    let mut refused = 0;
    for f in floods {
        let (s, (d, o)) = f.await.unwrap();
        sent += s;
        denied += d;
        refused += o;
    }
    println!(
        "flood: {sent} denied commands sent, {denied} answered denied, {refused} refused otherwise"
    );
    assert!(
        denied > 100,
        "the flood barely reached the policy: {denied}"
    );

    // Nobody else looked offline (the flooder sends no heartbeats, so it
    // may), and every session is up.
    let flooder = dev.key.node_id().to_string();
    while let Ok(Some(Received::Event(e))) =
        tokio::time::timeout(Duration::from_millis(300), offline.recv()).await
    {
        assert_eq!(
            e.data["node"],
            json!(flooder),
            "another device went offline: {e:?}"
        );
    }
    for w in &workers {
        assert!(w.is_connected(), "a worker lost its session");
    }
    // Every heartbeat the workers sent was processed.
    for w in &workers {
        w.shutdown().await;
    }
    let sent_total: u64 = workers.iter().map(|w| w.stats().heartbeats_sent).sum();
    let received = || p.node.stats().heartbeats_received - beats_before;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received() < sent_total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(received(), sent_total);

    // Each answered denial is a durable ledger record, and the writer
    // shared its transactions among them.
    let decided = ledger
        .view()
        .records(0, usize::MAX)
        .unwrap()
        .iter()
        .filter(|r| r.record_type == mesh_core::ledger::record_types::COMMAND_DECIDED)
        .count()
        - decided_before;
    assert!(
        decided >= denied,
        "{decided} decisions recorded, {denied} answered"
    );
    let stats = sqlite.write_stats();
    let (tx, batches) = (
        stats.transactions - stats_before.transactions,
        stats.batches - stats_before.batches,
    );
    println!("storage writer: {batches} batches in {tx} transactions");
    assert!(
        tx < batches,
        "no group commit: {batches} batches in {tx} transactions"
    );
    let report = mesh_ledger::verify_ledger(p.store.as_ref(), &p.node.node_id(), None).unwrap();
    assert!(report.ok(), "{report:?}");
}

/// Foundation B: a protocol registered on the node by ALPN, with its own
/// admission, served over QUIC beside pairing and the device session.
const ECHO: Protocol = Protocol::new("mesh-sdk-test/echo/1");

#[derive(Debug)]
struct Echo(mesh_core::node::RegistryAdmission);

#[async_trait::async_trait]
impl mesh_core::node::ProtocolHandler for Echo {
    fn admit(&self, peer: &mesh_core::identity::NodeId) -> bool {
        // Paired devices only: the registry's own rule for the session.
        mesh_core::transport::Admission::admit(&self.0, peer, Protocol::MESH)
    }

    async fn serve(&self, conn: Arc<dyn Connection>) {
        while let Ok(m) = conn.recv().await {
            if conn.send(m).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_protocol_is_served_with_its_own_admission() {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let echo = Arc::new(Echo(mesh_core::node::RegistryAdmission::new(store.clone())));
    let (p, _) = primary_built(store, |c| c, |b| b.protocol(ECHO, echo));
    let dev = raw_device(&p).await;
    // A paired device's key reaches the protocol and is served.
    let conn = dev
        .transport
        .connect(p.node.node_id(), &p.addr, ECHO)
        .await
        .unwrap();
    conn.send(b"ping".to_vec()).await.unwrap();
    assert_eq!(conn.recv().await.unwrap(), b"ping");
    // An unpaired key is refused at the handshake, and still reaches pairing.
    let stranger_key = Arc::new(NodeKey::generate());
    let stranger_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let stranger = quic(&stranger_key, &stranger_store);
    assert!(matches!(
        stranger.connect(p.node.node_id(), &p.addr, ECHO).await,
        Err(mesh_core::transport::TransportError::Refused(_))
    ));
    assert!(
        stranger
            .connect(p.node.node_id(), &p.addr, Protocol::PAIRING)
            .await
            .is_ok()
    );
    // A protocol nobody registered is refused.
    const OTHER: Protocol = Protocol::new("mesh-sdk-test/other/1");
    assert!(matches!(
        dev.transport
            .connect(p.node.node_id(), &p.addr, OTHER)
            .await,
        Err(mesh_core::transport::TransportError::Refused(_))
    ));
    // The device session still works beside it.
    let session = dev.session(&p).await;
    session.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_protocols_cannot_be_replaced_and_workers_serve_nothing_by_default() {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let key = Arc::new(NodeKey::generate());
    let echo = Arc::new(Echo(mesh_core::node::RegistryAdmission::new(store.clone())));
    let config = NodeConfig::new(Role::Primary, "p", "hw-p");
    match Node::builder(key.clone(), store.clone(), quic(&key, &store), config)
        .protocol(Protocol::MESH, echo.clone())
        .start_primary()
    {
        Err(NodeError::ProtocolSetup(mesh_core::node::ProtocolError::BuiltIn(p))) => {
            assert_eq!(p, Protocol::MESH)
        }
        other => panic!("expected BuiltIn, got {:?}", other.map(|_| ())),
    }
    // A worker accepts no pairing and no sessions: its endpoint refuses
    // every connection (it used to complete handshakes nobody served).
    let w_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let w_key = Arc::new(NodeKey::generate());
    let w_transport = quic(&w_key, &w_store);
    let w_addr = w_transport.addr();
    let w = Node::builder(
        w_key.clone(),
        w_store,
        w_transport,
        NodeConfig::new(Role::Worker, "w", "hw-w"),
    )
    .start_worker()
    .unwrap();
    let other_key = Arc::new(NodeKey::generate());
    let other_store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let other = quic(&other_key, &other_store);
    for protocol in [Protocol::PAIRING, Protocol::MESH, ECHO] {
        assert!(
            other
                .connect(w_key.node_id(), &w_addr, protocol)
                .await
                .is_err(),
            "a worker accepted {protocol}"
        );
    }
    w.shutdown().await;
}

/// Foundation C: a command the policy refuses publishes `policy.violation`
/// (declared in `events::kinds`, never published before), over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_command_publishes_a_policy_violation() {
    let p = primary();
    let mut violations = p.node.subscribe(kinds::POLICY_VIOLATION, 16).unwrap();
    let dev = raw_device(&p).await;
    let codes = burst(&dev, &p, "shell.exec", 1).await;
    assert_eq!(codes, vec!["blocked_command".to_owned()]);
    let event = match tokio::time::timeout(Duration::from_secs(5), violations.recv()).await {
        Ok(Some(Received::Event(e))) => e,
        other => panic!("no policy.violation: {other:?}"),
    };
    assert_eq!(event.kind, kinds::POLICY_VIOLATION);
    assert_eq!(event.data["device"], json!(dev.key.node_id().to_string()));
    assert_eq!(event.data["command"], json!("shell.exec"));
    assert_eq!(event.data["reason"], json!("blocked_command"));
    // An allowed command is no violation.
    let codes = burst(&dev, &p, "notes.write", 1).await;
    assert_eq!(codes, vec!["ok".to_owned()]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), violations.recv())
            .await
            .is_err()
    );
}

/// Review finding: a device's actions waiting for approval are capped, so
/// it cannot fill the primary's action table; deciding one frees a place.
#[derive(Debug)]
struct ApproveEverything;

impl mesh_core::node::CommandPolicy for ApproveEverything {
    fn decide(
        &self,
        _: &mesh_core::node::CommandRequest<'_>,
    ) -> (mesh_core::node::Verdict, mesh_core::node::Permit) {
        (
            mesh_core::node::Verdict::NeedsApproval {
                code: "needs_approval".into(),
                message: "a person decides".into(),
            },
            mesh_core::node::Permit::none(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_propose_actions_without_end() {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let (p, _) = primary_built(
        store,
        |c| c.peer_limits(PeerLimits::default().proposed_actions(3)),
        |b| b.policy(Arc::new(ApproveEverything)),
    );
    let dev = raw_device(&p).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.extend(burst(&dev, &p, "notes.write", 1).await);
    }
    assert_eq!(count(&codes, "needs_approval"), 3, "{codes:?}");
    assert_eq!(count(&codes, "too_many_actions"), 2, "{codes:?}");
    let waiting: Vec<_> = p
        .node
        .actions()
        .unwrap()
        .into_iter()
        .filter(|a| a.state == mesh_core::node::action_states::PROPOSED)
        .collect();
    assert_eq!(waiting.len(), 3);
    // Rejecting one frees its place.
    p.node.reject_action(&waiting[0].id, None).await.unwrap();
    assert_eq!(
        burst(&dev, &p, "notes.write", 1).await,
        vec!["needs_approval".to_owned()]
    );
    assert_eq!(
        burst(&dev, &p, "notes.write", 1).await,
        vec!["too_many_actions".to_owned()]
    );
}

/// Foundation C, the worker's side: the session machine ends a session
/// whose primary never welcomes it (a transient loss, retried with a new
/// hello), sends its first heartbeat as soon as it is welcomed, and when the
/// worker stops says goodbye with `shutdown` before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_leaves_a_silent_primary_and_says_goodbye_when_it_stops() {
    let key = Arc::new(NodeKey::generate());
    let transport = Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(mesh_core::transport::AdmitAll),
            mesh_transport::quic::QuicConfig::default(),
        )
        .unwrap(),
    );
    let (addr, id) = (transport.addr(), key.node_id());
    let (tx, mut seen) = tokio::sync::mpsc::channel::<String>(64);
    let fake = tokio::spawn(async move {
        // First session: the hello, then silence.
        let silent = transport.accept().await.unwrap();
        let first = payload_of(&silent.recv().await.unwrap());
        tx.send(format!("1:{}", first.kind())).await.unwrap();
        // Second: welcomed; then every payload the worker sends, in order.
        let conn = transport.accept().await.unwrap();
        let hello = payload_of(&conn.recv().await.unwrap());
        tx.send(format!("2:{}", hello.kind())).await.unwrap();
        let to = conn.remote_node();
        let welcome = signed(
            &key,
            to,
            SystemClock.now(),
            Payload::Session(SessionMessage::Welcome),
        );
        conn.send(welcome).await.unwrap();
        while let Ok(frame) = conn.recv().await {
            let line = match payload_of(&frame) {
                Payload::Session(SessionMessage::Bye { reason }) => format!("bye:{reason}"),
                other => other.kind().to_owned(),
            };
            tx.send(line).await.unwrap();
        }
        drop(silent);
    });
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    store
        .save(&PrimaryLinkRecord {
            primary: id,
            address: addr,
            token: [7; 32],
            paired_at: SystemClock.now(),
        })
        .unwrap();
    let wkey = Arc::new(NodeKey::generate());
    let config = NodeConfig::new(Role::Worker, "w", "hw-w")
        .heartbeat_interval(Duration::from_secs(60))
        .command_timeout(Duration::from_millis(300))
        .reconnect(Duration::from_millis(50), Duration::from_millis(200));
    let w = Node::builder(wkey.clone(), store.clone(), quic(&wkey, &store), config)
        .start_worker()
        .unwrap();
    let mut lost = w.subscribe("session.lost", 8).unwrap();
    assert_eq!(next_line(&mut seen).await, "1:session");
    let e = crate::support::next(&mut lost, "session.lost", Duration::from_secs(5)).await;
    assert!(
        e.data["error"]
            .as_str()
            .unwrap()
            .contains("no welcome in time"),
        "{e:?}"
    );
    assert_eq!(next_line(&mut seen).await, "2:session");
    // Welcomed: the first heartbeat comes at once, not an interval later.
    assert_eq!(next_line(&mut seen).await, "heartbeat");
    assert!(w.is_connected());
    w.shutdown().await;
    assert_eq!(next_line(&mut seen).await, "bye:shutdown");
    assert!(!w.is_connected());
    // Nothing after the goodbye: the fake sees the connection end.
    tokio::time::timeout(Duration::from_secs(10), fake)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.recv().await.is_none());
}

/// The next line a test's fake peer reported, within 10 s.
async fn next_line(seen: &mut tokio::sync::mpsc::Receiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("a line within 10 s")
        .expect("the fake peer still running")
}

/// A raw device's `TokenStored` naming `token`.
async fn acknowledge(
    dev: &RawDevice,
    conn: &dyn Connection,
    primary: mesh_core::identity::NodeId,
    token: [u8; 32],
) {
    let digest = SessionMessage::stored_digest(&token);
    let ack = Payload::Session(SessionMessage::TokenStored { digest });
    dev.send(conn, primary, ack).await;
}

/// Defect 6 (two-phase rotation), hardened: a device's acknowledgement
/// names the token it stored, so the late acknowledgement of a rotation
/// that timed out cannot confirm a later rotation whose token the device
/// never stored (which would lock it out: the primary would commit a token
/// the device does not have).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_acknowledgement_confirms_no_later_rotation() {
    let p = primary_with(|c| c.command_timeout(Duration::from_millis(400)));
    let dev = raw_device(&p).await;
    let conn = dev.session(&p).await;
    let device = dev.key.node_id();
    let primary_id = p.node.node_id();
    let registry =
        mesh_core::registry::Registry::new(p.store.clone(), mesh_core::events::EventBus::new());
    let gate = mesh_core::registry::scopes::PRESENCE_WRITE;
    // The next rotation's token, as the device sees it.
    async fn rotated(conn: &dyn Connection) -> [u8; 32] {
        loop {
            match recv(conn).await {
                Some(Payload::Session(SessionMessage::TokenRotated { token })) => return token,
                Some(_) => continue,
                None => panic!("no rotation came"),
            }
        }
    }
    // Rotation 1: the device is too slow; it times out, the old token stays.
    let (first, a) = tokio::join!(p.node.rotate_token(&device), rotated(conn.as_ref()));
    assert!(matches!(first, Err(NodeError::Timeout(_))), "{first:?}");
    registry.check(&device, &dev.token, gate).unwrap();
    // Rotation 2: the device now acknowledges rotation 1's token, late.
    let stale = async {
        let b = rotated(conn.as_ref()).await;
        acknowledge(&dev, conn.as_ref(), primary_id, a).await;
        b
    };
    let (second, b) = tokio::join!(p.node.rotate_token(&device), stale);
    assert_ne!(a, b);
    assert!(
        matches!(second, Err(NodeError::Timeout(_))),
        "a stale acknowledgement confirmed a rotation: {second:?}"
    );
    // Neither new token was committed; the device's own still opens.
    registry.check(&device, &dev.token, gate).unwrap();
    assert!(registry.check(&device, &b, gate).is_err());
    // Rotation 3, acknowledged with its own token: committed.
    let right = async {
        let c = rotated(conn.as_ref()).await;
        acknowledge(&dev, conn.as_ref(), primary_id, c).await;
        c
    };
    let (third, c) = tokio::join!(p.node.rotate_token(&device), right);
    third.unwrap();
    registry.check(&device, &c, gate).unwrap();
    assert!(registry.check(&device, &dev.token, gate).is_err());
}
