//! Load: 1,000 workers (`NODE_LOAD_WORKERS` to change), in-process, each with its own QUIC endpoint on
//! 127.0.0.1, heartbeating every second for 60 s against one primary
//! (SQLite, ledger, mesh-policy). Reports heartbeats lost, the primary's
//! processing time per heartbeat (frame off the transport → health updated;
//! p50/p99) against the same work done in a tight loop (decode, verify,
//! gate, ingest: the floor), the primary's CPU per heartbeat (the primary
//! runs on a runtime of its own, and the CPU time of exactly its threads is
//! read from /proc), command round trips (ping) p50/p99 under the same load,
//! and pairing round trips with the approval made at once (no human in the
//! loop).
//!
//! `cargo test --benches` runs 10 workers for 3 s.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_benches::percentile;
use mesh_core::clock::{Clock, SystemClock};
use mesh_core::events::{EventBus, Received};
use mesh_core::health::{HealthConfig, HealthMonitor};
use mesh_core::identity::NodeKey;
use mesh_core::limits::Rate;
use mesh_core::node::{MetricsSource, Node, NodeConfig, PairingLimits, RegistryAdmission, Role};
use mesh_core::registry::{NewDevice, Registry, scopes};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_core::wire::{
    DEFAULT_MAX_FRAME_LEN, Destination, Envelope, HealthMetrics, Heartbeat, Payload, Platform,
    decode_frame,
};
use mesh_ledger::{LedgerConfig, SignedLedger};
use mesh_transport::quic::{QuicConfig, QuicTransport};

#[derive(Debug)]
struct Metrics;

impl MetricsSource for Metrics {
    fn sample(&self) -> HealthMetrics {
        HealthMetrics {
            cpu_percent: Some(25.0),
            memory_percent: Some(50.0),
            battery_percent: Some(70.0),
            charging: Some(false),
            latency_ms: Some(3.0),
            ..HealthMetrics::default()
        }
    }
}

/// The calling thread's Linux thread id.
fn this_tid() -> Option<u32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    stat.split_whitespace().next()?.parse().ok()
}

/// CPU time of threads `tids` of this process, nanoseconds: the scheduler's
/// own count (`schedstat`), or utime + stime in clock ticks if that is absent.
fn threads_cpu_ns(tids: &[u32]) -> u64 {
    tids.iter()
        .map(|tid| {
            let dir = format!("/proc/self/task/{tid}");
            if let Some(ns) = std::fs::read_to_string(format!("{dir}/schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .filter(|&ns| ns > 0)
            {
                return ns;
            }
            std::fs::read_to_string(format!("{dir}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the command name: state is 3rd, utime 14th, stime 15th.
                    let rest = &s[s.rfind(')')? + 2..];
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    Some(
                        (f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
                            * 10_000_000,
                    )
                })
                .unwrap_or(0)
        })
        .sum()
}

/// The whole process's CPU time, milliseconds.
fn process_cpu_ms() -> u64 {
    let mut sys = sysinfo::System::new();
    let Ok(pid) = sysinfo::get_current_pid() else {
        return 0;
    };
    sys.refresh_processes(sysinfo::ProcessesToUpdate::Some(&[pid]), true);
    sys.process(pid).map_or(0, |p| p.accumulated_cpu_time())
}

fn quic(key: &Arc<NodeKey>, store: &Arc<dyn Storage>) -> Arc<QuicTransport> {
    quic_with(key, store, QuicConfig::default())
}

fn quic_with(
    key: &Arc<NodeKey>,
    store: &Arc<dyn Storage>,
    config: QuicConfig,
) -> Arc<QuicTransport> {
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            admission,
            config,
        )
        .unwrap(),
    )
}

/// The floor: what the primary must do per heartbeat at least (decode and
/// verify the signed frame, the registry gate, the health update), in a
/// tight loop on one thread. Nanoseconds per heartbeat.
fn floor_ns(n: usize) -> f64 {
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let registry = Registry::new(store.clone(), EventBus::new());
    let worker = NodeKey::generate();
    let primary = NodeKey::generate();
    let (record, token, writes) = registry
        .prepare_device(
            NewDevice {
                node: worker.node_id(),
                device_id: "w".into(),
                name: "w".into(),
                platform: Platform::Desktop,
            },
            SystemClock.now(),
        )
        .unwrap();
    registry.commit_new_device(&record, &writes).unwrap();
    let mut monitor = HealthMonitor::new(HealthConfig::default(), EventBus::new(), store);
    let frames: Vec<Vec<u8>> = (0..n as u64)
        .map(|seq| {
            let payload = Payload::Heartbeat(Heartbeat {
                seq,
                metrics: Metrics.sample(),
            });
            Envelope::new(
                worker.node_id(),
                Destination::Node(primary.node_id()),
                SystemClock.now(),
                payload,
            )
            .sign(&worker)
            .unwrap()
            .to_frame()
            .unwrap()
        })
        .collect();
    let start = Instant::now();
    for f in &frames {
        let (u, _) = decode_frame(f, DEFAULT_MAX_FRAME_LEN).unwrap();
        let env = u.verify().unwrap().into_envelope();
        registry
            .check(&env.from, token.as_bytes(), scopes::PRESENCE_WRITE)
            .unwrap();
        if let Payload::Heartbeat(hb) = env.payload {
            monitor
                .ingest(env.from, SystemClock.now(), &hb.metrics)
                .unwrap();
        }
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let quick = std::env::args().all(|a| a != "--bench");
    let (workers, seconds, ping_seconds) = if quick {
        (10usize, 3u64, 1u64)
    } else {
        (1000, 60, 15)
    };
    // `NODE_LOAD_WORKERS=200 cargo bench … --bench node_load` for another size.
    let workers = std::env::var("NODE_LOAD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(workers);
    // The primary runs on its own runtime (one worker thread, plus blocking
    // threads that are kept alive), so its CPU time can be read per thread;
    // the workers and this driver run on another.
    let primary_tids = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let recorded = primary_tids.clone();
    let primary_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("primary")
        .thread_keep_alive(Duration::from_secs(3600))
        .on_thread_start(move || {
            if let Some(tid) = this_tid() {
                recorded.lock().unwrap().push(tid);
            }
        })
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
    let primary = primary_rt.block_on(async move {
        let key = Arc::new(NodeKey::generate());
        let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(db).unwrap());
        let ledger = Arc::new(
            SignedLedger::open(store.clone(), key.clone(), LedgerConfig::default()).unwrap(),
        );
        // Every simulated device connects from 127.0.0.1: one source, as
        // far as the per-source handshake rate knows, so it is lifted here.
        let mut config = QuicConfig::default();
        config.handshakes_per_source = mesh_core::limits::Rate::per_second(100_000.0, 100_000);
        let transport = quic_with(&key, &store, config);
        let ptransport = transport.clone();
        // Every worker pairs from 127.0.0.1, one after another.
        let config = NodeConfig::new(Role::Primary, "primary", "primary")
            .heartbeat_interval(Duration::from_secs(1))
            .pairing_limits(PairingLimits::default().rates(
                Rate::per_second(1000.0, 1000),
                Rate::per_second(1000.0, 1000),
            ));
        let addr = transport.addr();
        let node = Node::builder(key, store, transport, config)
            .ledger(ledger)
            .record_timings(true)
            .start_primary()
            .unwrap();
        (node, addr, ptransport)
    });
    let primary_handle = primary_rt.handle().clone();
    rt.block_on(async move {
        let (primary, addr, ptransport) = primary;
        // Pairing, approved at once: the round trip without the human.
        let mut requests = primary.subscribe("pairing.request_received", 4096).unwrap();
        let mut pairing_ms = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..workers {
            let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
            let key = Arc::new(NodeKey::generate());
            let transport = quic(&key, &store);
            let config = NodeConfig::new(Role::Worker, &format!("w{i}"), &format!("hw-{i}"))
                .heartbeat_interval(Duration::from_secs(1));
            let w = Node::builder(key, store, transport, config).metrics(Arc::new(Metrics)).start_worker().unwrap();
            let mut connected = w.subscribe("session.connected", 4).unwrap();
            let start = Instant::now();
            let ticket = match w.request_pairing(primary.node_id(), addr.clone()).await {
                Ok(t) => t,
                Err(e) => panic!("pairing worker {i}: {e}; primary's endpoint so far: {:?}", ptransport.incoming_stats()),
            };
            loop {
                if let Some(Received::Event(_)) = requests.recv().await {
                    break;
                }
            }
            let approving = primary.clone();
            let (request, code) = (ticket.request_id().to_owned(), ticket.code().to_owned());
            primary_handle
                .spawn(async move { approving.approve_pairing(&request, &code).await })
                .await
                .unwrap()
                .unwrap();
            ticket.finished().await.unwrap();
            pairing_ms.push(start.elapsed().as_micros() as u64);
            while !matches!(connected.recv().await, Some(Received::Event(_))) {}
            nodes.push(w);
        }
        pairing_ms.sort_unstable();

        // Phase 1: heartbeats only; the primary's threads' CPU time is read
        // before and after.
        let base_sent: u64 = nodes.iter().map(|w| w.stats().heartbeats_sent).sum();
        let base_received = primary.stats().heartbeats_received;
        let base_timings = primary.stats().heartbeat_nanos.len();
        let tids = primary_tids.lock().unwrap().clone();
        let primary_cpu_before = threads_cpu_ns(&tids);
        let process_cpu_before = process_cpu_ms();
        let received_before = primary.stats().heartbeats_received;
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let elapsed = start.elapsed();
        let received_in_window = primary.stats().heartbeats_received - received_before;
        let tids = primary_tids.lock().unwrap().clone();
        let primary_cpu_ns = threads_cpu_ns(&tids).saturating_sub(primary_cpu_before);
        let process_cpu = process_cpu_ms().saturating_sub(process_cpu_before);

        // Phase 2: command round trips under the same heartbeat load, sent
        // from the primary's runtime.
        let mut rtts = Vec::new();
        let ping_start = Instant::now();
        let mut i = 0;
        while ping_start.elapsed() < Duration::from_secs(ping_seconds) {
            let (pinging, device) = (primary.clone(), nodes[i % nodes.len()].node_id());
            i += 1;
            if let Ok(Ok(rtt)) = primary_handle.spawn(async move { pinging.ping(&device).await }).await {
                rtts.push(rtt.as_micros() as u64);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Stop the workers (no more heartbeats), let those in flight land, then count.
        for w in &nodes {
            w.shutdown().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sent: u64 = nodes.iter().map(|w| w.stats().heartbeats_sent).sum::<u64>() - base_sent;
        let stats = primary.stats();
        let received = stats.heartbeats_received - base_received;
        let mut timings: Vec<u64> = stats.heartbeat_nanos[base_timings..].iter().map(|&n| u64::from(n)).collect();
        timings.sort_unstable();
        rtts.sort_unstable();
        let floor = floor_ns(if quick { 200 } else { 5_000 });
        let per_heartbeat_ns = primary_cpu_ns as f64 / received_in_window.max(1) as f64;

        println!("## {workers} workers × 1 heartbeat/s against one primary (QUIC on 127.0.0.1, one process; the primary on its own runtime thread, the workers on two)");
        println!("heartbeats sent {sent}, processed by the primary {received}; lost (sent and never processed): {}", sent.saturating_sub(received));
        println!(
            "primary processing per heartbeat (frame off the transport → health updated): p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs; floor (same work in a tight loop): {:.1} µs → p50/floor {:.2}",
            percentile(&timings, 0.5) as f64 / 1e3,
            percentile(&timings, 0.99) as f64 / 1e3,
            timings.iter().sum::<u64>() as f64 / timings.len().max(1) as f64 / 1e3,
            floor / 1e3,
            percentile(&timings, 0.5) as f64 / floor
        );
        println!(
            "primary CPU, heartbeats only ({} threads of its runtime, {:.1} s, {received_in_window} heartbeats): {:.1} ms = {:.1} µs per heartbeat (QUIC receive, decrypt, decode, verify, gate, health) → {:.2}× the floor; {:.2}% of one core",
            tids.len(),
            elapsed.as_secs_f64(),
            primary_cpu_ns as f64 / 1e6,
            per_heartbeat_ns / 1e3,
            per_heartbeat_ns / floor,
            primary_cpu_ns as f64 / elapsed.as_nanos() as f64 * 100.0
        );
        println!(
            "whole process (primary + {workers} workers) in the same window: {process_cpu} ms = {:.1} µs per heartbeat",
            process_cpu as f64 * 1e3 / received_in_window.max(1) as f64
        );
        println!(
            "command round trip (ping under the heartbeat load, {} samples over {ping_seconds} s): p50 {:.2} ms, p99 {:.2} ms",
            rtts.len(),
            percentile(&rtts, 0.5) as f64 / 1e3,
            percentile(&rtts, 0.99) as f64 / 1e3
        );
        println!(
            "pairing round trip, approval at once ({} pairings): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (goal < 20 ms)",
            pairing_ms.len(),
            percentile(&pairing_ms, 0.5) as f64 / 1e3,
            percentile(&pairing_ms, 0.99) as f64 / 1e3,
            pairing_ms.last().copied().unwrap_or(0) as f64 / 1e3
        );
        assert_eq!(sent.saturating_sub(received), 0, "heartbeats were lost");
        assert!(primary_cpu_ns > 0, "the primary's threads' CPU time could not be read");
        let stopping = primary.clone();
        primary_handle.spawn(async move { stopping.shutdown().await }).await.unwrap();
    });
}
