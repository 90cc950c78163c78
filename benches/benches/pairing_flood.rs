//! A pairing flood from unpaired keys against a primary serving paired
//! workers (issue 14): attackers open pairing connections on 127.0.0.1 as
//! fast as they can (each from its own loopback address), each connection
//! sending a signed pairing request, while 100
//! workers heartbeat at 1 Hz over QUIC. Reports the attempts (QUIC
//! connections with a request) per second
//! reached, how many the primary refused before storing anything, the
//! heartbeats lost (sent and never processed), the primary's heartbeat
//! processing p50/p99 during the flood against the same figure measured
//! without it in the same run, the pairing rows stored, and the process's
//! RSS before, during and after.
//!
//! Workers are provisioned directly in the primary's registry (pairing them
//! from 127.0.0.1 would itself hit the per-address limits under test).
//!
//! `cargo test --benches` runs 10 workers and a 1 s flood.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_benches::rss_kib;
use mesh_core::clock::{Clock, SystemClock};
use mesh_core::identity::NodeKey;
use mesh_core::node::{Node, NodeConfig, RegistryAdmission, Role};
use mesh_core::pairing::{DeviceInfo, DevicePairing, PairingConfig};
use mesh_core::registry::{NewDevice, Registry};
use mesh_core::storage::records::{PairingRequestRecord, PrimaryLinkRecord};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage, StorageExt};
use mesh_core::transport::{PeerAddr, Protocol, Transport};
use mesh_core::wire::{Destination, Envelope, Payload, Platform};
use mesh_ledger::{LedgerConfig, SignedLedger};
use mesh_transport::quic::{QuicConfig, QuicTransport};

fn quic(key: &Arc<NodeKey>, store: &Arc<dyn Storage>) -> Arc<QuicTransport> {
    quic_at(key, store, "127.0.0.1:0")
}

fn quic_at(key: &Arc<NodeKey>, store: &Arc<dyn Storage>, at: &str) -> Arc<QuicTransport> {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let mut config = QuicConfig::default();
    config.handshake_timeout = Duration::from_millis(500);
    Arc::new(QuicTransport::bind(key.clone(), at.parse().unwrap(), admission, config).unwrap())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    f64::from(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]) / 1e3
}

/// What the attackers did.
#[derive(Default)]
struct Attack {
    /// Connection attempts started (each sends a QUIC Initial).
    attempts: AtomicU64,
    /// Attempts that became a connection, on which a request was sent.
    connected: AtomicU64,
}

/// One attacker host (its own loopback address, its own key): `loops`
/// concurrent loops, each opening pairing connections with a fresh signed
/// request on each, until `stop`.
async fn attack(
    host: u8,
    loops: usize,
    primary: mesh_core::identity::NodeId,
    addr: PeerAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Attack>,
) {
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let transport = quic_at(&key, &store, &format!("127.0.0.{host}:0"));
    let mut tasks = Vec::new();
    for l in 0..loops {
        let (key, transport, addr, stop, counts) = (
            key.clone(),
            transport.clone(),
            addr.clone(),
            stop.clone(),
            counts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                counts.attempts.fetch_add(1, Ordering::Relaxed);
                let Ok(conn) = transport.connect(primary, &addr, Protocol::PAIRING).await else {
                    continue;
                };
                counts.connected.fetch_add(1, Ordering::Relaxed);
                let now = SystemClock.now();
                let info = DeviceInfo {
                    device_id: format!("evil-{host}-{l}-{n}"),
                    name: "evil".into(),
                    platform: Platform::Android,
                };
                let (_, request) = DevicePairing::start(
                    key.node_id(),
                    primary,
                    info,
                    now,
                    &PairingConfig::default(),
                );
                let frame = Envelope::new(
                    key.node_id(),
                    Destination::Node(primary),
                    now,
                    Payload::Pairing(request),
                )
                .sign(&key)
                .unwrap()
                .to_frame()
                .unwrap();
                let _ = conn.send(frame).await;
                conn.close();
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Set in the attacker process: `ATTACKERS LOOPS PRIMARY ADDRESS SECONDS`.
const ATTACKER_ENV: &str = "PAIRING_FLOOD_ATTACKER";

/// The attackers run in a process of their own, so the RSS measured is the
/// primary's (and its workers'), not the attackers' half-open connections.
/// Prints `ATTEMPTS CONNECTED`.
fn attacker_process(spec: &str) {
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [attackers, loops, primary, addr, secs] = parts[..] else {
        panic!("bad {ATTACKER_ENV}: {spec}");
    };
    let (attackers, loops, secs): (u8, usize, u64) = (
        attackers.parse().unwrap(),
        loops.parse().unwrap(),
        secs.parse().unwrap(),
    );
    let primary: mesh_core::identity::NodeId = primary.parse().unwrap();
    let addr = PeerAddr::Socket(addr.parse().unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let counts = Arc::new(Attack::default());
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for a in 0..attackers {
            tasks.push(tokio::spawn(attack(
                2 + a,
                loops,
                primary,
                addr.clone(),
                stop.clone(),
                counts.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    });
    println!(
        "{} {}",
        counts.attempts.load(Ordering::Relaxed),
        counts.connected.load(Ordering::Relaxed)
    );
}

fn main() {
    if let Ok(spec) = std::env::var(ATTACKER_ENV) {
        return attacker_process(&spec);
    }
    let quick = std::env::args().all(|a| a != "--bench");
    let (workers, attackers, loops, flood_secs, calm_secs) = if quick {
        (10usize, 2usize, 4usize, 1u64, 1u64)
    } else {
        (100, 6, 24, 20, 10)
    };
    let primary_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("primary")
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.db");
    let (primary, addr, pstore, ptransport) = primary_rt.block_on(async move {
        let key = Arc::new(NodeKey::generate());
        let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(db).unwrap());
        let ledger = Arc::new(
            SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default()).unwrap(),
        );
        let transport = quic(&key, &store);
        let ptransport = transport.clone();
        let addr = transport.addr();
        let config = NodeConfig::new(Role::Primary, "primary", "primary")
            .heartbeat_interval(Duration::from_secs(1));
        let node = Node::builder(key, store.clone(), transport, config)
            .ledger(ledger)
            .record_timings(true)
            .start_primary()
            .unwrap();
        (node, addr, store, ptransport)
    });
    let primary_handle = primary_rt.handle().clone();
    rt.block_on(async move {
        // Workers provisioned in the registry, each told its token.
        let registry = Registry::new(pstore.clone(), mesh_core::events::EventBus::new());
        let mut nodes = Vec::new();
        for i in 0..workers {
            let key = Arc::new(NodeKey::generate());
            let (record, token, writes) = registry
                .prepare_device(
                    NewDevice { node: key.node_id(), device_id: format!("hw-{i}"), name: format!("w{i}"), platform: Platform::Desktop },
                    SystemClock.now(),
                )
                .unwrap();
            registry.commit_new_device(&record, &writes).unwrap();
            let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
            store
                .save(&PrimaryLinkRecord { primary: primary.node_id(), address: addr.clone(), token: *token.as_bytes(), paired_at: SystemClock.now() })
                .unwrap();
            let config = NodeConfig::new(Role::Worker, &format!("w{i}"), &format!("hw-{i}")).heartbeat_interval(Duration::from_secs(1));
            let w = Node::builder(key.clone(), store.clone(), quic(&key, &store), config).start_worker().unwrap();
            nodes.push(w);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while nodes.iter().any(|w| !w.is_connected()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(nodes.iter().all(|w| w.is_connected()), "workers did not connect");

        // Calm: heartbeats only.
        tokio::time::sleep(Duration::from_secs(calm_secs)).await;
        let calm_from = 0;
        let calm_to = primary.stats().heartbeat_nanos.len();
        let rss_before = rss_kib();

        // Flood, from the attacker process.
        let refused_before = primary.stats().pairing_refused;
        let incoming_before = ptransport.incoming_stats();
        let started = Instant::now();
        let PeerAddr::Socket(paddr) = &addr else { unreachable!("QUIC") };
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(ATTACKER_ENV, format!("{attackers} {loops} {} {paddr} {flood_secs}", primary.node_id()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let attacker = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
        tokio::time::sleep(Duration::from_secs(flood_secs) / 2).await;
        let rss_during = rss_kib();
        let rows_during = pstore.load_all::<PairingRequestRecord>().map(|r| r.len()).unwrap_or(0);
        let out = attacker.await.unwrap();
        assert!(out.status.success(), "the attacker process failed");
        let line = String::from_utf8(out.stdout).unwrap();
        let mut figures = line.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        let (attempts, connected) = (figures.next().unwrap(), figures.next().unwrap());
        let flood_elapsed = started.elapsed();
        let flood_to = primary.stats().heartbeat_nanos.len();
        let refused = primary.stats().pairing_refused - refused_before;
        let incoming = ptransport.incoming_stats();

        // After.
        tokio::time::sleep(Duration::from_secs(calm_secs)).await;
        let rss_after = rss_kib();
        let rows_after = pstore.load_all::<PairingRequestRecord>().map(|r| r.len()).unwrap_or(0);
        for w in &nodes {
            w.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent: u64 = nodes.iter().map(|w| w.stats().heartbeats_sent).sum();
        let stats = primary.stats();
        let received = stats.heartbeats_received;
        let mut calm: Vec<u32> = stats.heartbeat_nanos[calm_from..calm_to].to_vec();
        let mut flood: Vec<u32> = stats.heartbeat_nanos[calm_to..flood_to].to_vec();
        calm.sort_unstable();
        flood.sort_unstable();

        println!("## pairing flood: {attackers} attacker hosts (127.0.0.2-{}, unpaired keys, {loops} loops each) vs {workers} workers heartbeating at 1 Hz (QUIC, SQLite primary on one runtime thread)", 1 + attackers);
        println!(
            "flood: {attempts} pairing attempts in {:.1} s = {:.0}/s; at the primary's QUIC endpoint from their first packet: {} refused over their source's rate, {} refused busy, {} refused as unvalidated after a Retry, {} Retries sent; {} handshakes; {connected} connections with a request; refused by pairing limits before storing anything: {refused}; pairing rows stored: {rows_during} during, {rows_after} after",
            flood_elapsed.as_secs_f64(),
            attempts as f64 / flood_elapsed.as_secs_f64(),
            incoming.refused_rate - incoming_before.refused_rate,
            incoming.refused_busy - incoming_before.refused_busy,
            incoming.refused_unvalidated - incoming_before.refused_unvalidated,
            incoming.retries - incoming_before.retries,
            incoming.handshakes - incoming_before.handshakes,
        );
        println!("heartbeats sent {sent}, processed {received}; lost: {}", sent.saturating_sub(received));
        println!(
            "primary processing per heartbeat: calm p50 {:.1} µs p99 {:.1} µs ({} samples); during the flood p50 {:.1} µs p99 {:.1} µs ({} samples) → p99 ratio {:.2}",
            percentile(&calm, 0.5),
            percentile(&calm, 0.99),
            calm.len(),
            percentile(&flood, 0.5),
            percentile(&flood, 0.99),
            flood.len(),
            percentile(&flood, 0.99) / percentile(&calm, 0.99).max(0.001)
        );
        println!("RSS of the primary's process (primary and workers; the attackers run in a process of their own): before {rss_before} KiB, during {rss_during} KiB, after {rss_after} KiB");
        assert_eq!(sent.saturating_sub(received), 0, "heartbeats were lost");
        assert!(rows_during <= 32, "pairing rows beyond the cap: {rows_during}");
        let stopping = primary.clone();
        primary_handle.spawn(async move { stopping.shutdown().await }).await.unwrap();
    });
}
