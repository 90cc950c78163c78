//! The WebSocket gateway under load (issue 18).
//!
//! One primary (SQLite, QUIC on 127.0.0.1) with 200 paired workers
//! heartbeating at the default interval (5 s; `GATEWAY_BENCH_INTERVAL_MS`),
//! and its gateway on 127.0.0.1. The clients run in a child process (this
//! binary again), so the primary's memory and CPU are its own:
//!
//! 1. **Fan-out.** 1,000 WebSocket clients sign in with the admin token and
//!    subscribe to `device.*`; every `device.heartbeat` event published in a
//!    window must reach every client (counted against the bus), with the
//!    latency from publication to arrival (p50/p99). Baseline, same run,
//!    same clients: a bare WebSocket server (tokio-tungstenite) sending one
//!    pre-serialised notification of the same shape to every client at the
//!    same rate — the cost of the sockets alone.
//! 2. **`devices.get_health`** calls per second over 16 connections, each
//!    waiting for its answer before the next call; baseline: the bare
//!    server answering every request with a fixed result.
//! 3. **Memory per client**: the primary process's resident set before and
//!    after the clients connect and subscribe, divided by their number;
//!    baseline: the same for the bare server.
//!
//! `cargo test --benches` runs 20 clients and 4 workers for 2 s.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use mesh_benches::{percentile, process_cpu_ms, rss_kib};
use mesh_core::events::{Received, kinds};
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::limits::Rate;
use mesh_core::node::{
    MetricsSource, Node, NodeConfig, PairingLimits, Primary, RegistryAdmission, Role,
};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_core::transport::PeerAddr;
use mesh_core::wire::HealthMetrics;
use mesh_transport::gateway::{Gateway, GatewayConfig};
use mesh_transport::quic::{QuicConfig, QuicTransport};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The child's role, and where it connects.
const CHILD_ENV: &str = "GATEWAY_BENCH_CHILD";

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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------- the child

/// What one fan-out client saw.
#[derive(Default)]
struct Seen {
    /// (event time, latency ms) of every heartbeat event.
    events: Vec<(u64, u64)>,
    lagged: u64,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: &str) -> Ws {
    let mut tries = 0;
    loop {
        match tokio_tungstenite::connect_async(format!("ws://{addr}/rpc")).await {
            Ok((ws, _)) => return ws,
            Err(e) => {
                tries += 1;
                assert!(tries < 20, "connecting to {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends request `id` and waits for its answer (notifications before it
/// are handed to `other`).
async fn call(ws: &mut Ws, id: u64, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("{method}: the socket closed");
        };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["id"] == json!(id) {
            assert!(v.get("error").is_none(), "{method}: {v}");
            return v["result"].clone();
        }
    }
}

fn read_line(input: &mut impl BufRead) -> String {
    let mut line = String::new();
    input.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

/// The child: `fanout ADDR TOKEN N` or `rpc ADDR TOKEN N SECONDS DEVICE`;
/// prints "ready", waits for a line from the parent, prints one JSON line.
fn child(spec: &str) {
    let args: Vec<String> = spec.split(' ').map(str::to_owned).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, token, n): (String, String, usize) =
        (args[1].clone(), args[2].clone(), args[3].parse().unwrap());
    let result = match args[0].as_str() {
        "fanout" => rt.block_on(fanout_clients(addr, token, n)),
        "rpc" => {
            let seconds: u64 = args[4].parse().unwrap();
            rt.block_on(rpc_clients(addr, token, n, seconds, args[5].clone()))
        }
        other => panic!("unknown child role {other}"),
    };
    println!("{result}");
}

async fn fanout_clients(addr: String, token: String, n: usize) -> Value {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    for _ in 0..n {
        let (addr, token, mut stop, ready) = (
            addr.clone(),
            token.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut ws = open(&addr).await;
            call(&mut ws, 1, "auth.login", json!({"token": token})).await;
            call(
                &mut ws,
                2,
                "events.subscribe",
                json!({"patterns": ["device.*"]}),
            )
            .await;
            ready.send(()).await.unwrap();
            let mut seen = Seen::default();
            loop {
                let m = tokio::select! {
                    m = ws.next() => m,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let Some(Ok(Message::Text(t))) = m else { break };
                let arrived = now_ms();
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["method"].as_str() {
                    Some("event") if v["params"]["type"] == kinds::DEVICE_HEARTBEAT => {
                        let at = v["params"]["at"].as_u64().unwrap();
                        seen.events.push((at, arrived.saturating_sub(at)));
                    }
                    Some("event.lagged") => seen.lagged += v["params"]["missed"].as_u64().unwrap(),
                    _ => {}
                }
            }
            seen
        }));
    }
    drop(ready_tx);
    for _ in 0..n {
        ready_rx.recv().await.unwrap();
    }
    println!("ready");
    // The parent's window: "t0 t1".
    let window = tokio::task::spawn_blocking(|| read_line(&mut std::io::stdin().lock()))
        .await
        .unwrap();
    let (t0, t1) = window.split_once(' ').unwrap();
    let (t0, t1): (u64, u64) = (t0.parse().unwrap(), t1.parse().unwrap());
    stop_tx.send(true).unwrap();
    let mut counts = Vec::new();
    let mut latencies = Vec::new();
    let mut lagged = 0;
    for t in tasks {
        let seen = t.await.unwrap();
        lagged += seen.lagged;
        let inside: Vec<u64> = seen
            .events
            .iter()
            .filter(|(at, _)| (t0..t1).contains(at))
            .map(|(_, l)| *l)
            .collect();
        counts.push(inside.len() as u64);
        latencies.extend(inside);
    }
    latencies.sort_unstable();
    json!({
        "counts": counts,
        "lagged": lagged,
        "p50": percentile(&latencies, 0.5),
        "p99": percentile(&latencies, 0.99),
        "max": latencies.last().copied().unwrap_or(0),
    })
}

async fn rpc_clients(addr: String, token: String, n: usize, seconds: u64, device: String) -> Value {
    let mut tasks = Vec::new();
    let go = Arc::new(tokio::sync::Barrier::new(n + 1));
    for _ in 0..n {
        let (addr, token, device, go) = (addr.clone(), token.clone(), device.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            let mut ws = open(&addr).await;
            call(&mut ws, 1, "auth.login", json!({"token": token})).await;
            go.wait().await;
            let until = Instant::now() + Duration::from_secs(seconds);
            let mut times = Vec::new();
            let mut id = 2;
            while Instant::now() < until {
                let start = Instant::now();
                let r = call(
                    &mut ws,
                    id,
                    "devices.get_health",
                    json!({"deviceId": device}),
                )
                .await;
                assert_eq!(r["deviceId"], json!(device), "{r}");
                times.push(start.elapsed().as_micros() as u64);
                id += 1;
            }
            times
        }));
    }
    go.wait().await;
    let start = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let took = start.elapsed().as_secs_f64();
    all.sort_unstable();
    json!({
        "calls": all.len(),
        "per_second": all.len() as f64 / took,
        "p50_us": percentile(&all, 0.5),
        "p99_us": percentile(&all, 0.99),
    })
}

// --------------------------------------------------------------- the parent

struct ChildProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    fn spawn(spec: String) -> ChildProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ChildProc {
            child,
            stdin,
            stdout,
        }
    }

    /// The child's next line (blocking; call from a blocking thread).
    fn line(&mut self) -> String {
        read_line(&mut self.stdout)
    }

    fn tell(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn finish(mut self) -> Value {
        let v = serde_json::from_str(&self.line()).unwrap();
        assert!(self.child.wait().unwrap().success());
        v
    }
}

/// What one fan-out run measured (in this process, and the child's report).
struct FanOut {
    report: Value,
    /// Resident-set growth per connected client, KiB.
    kib_per_client: f64,
    /// This process's CPU time in the window, ms.
    cpu_ms: u64,
    /// The window: events with `at` in `t0..t1` count.
    t0: u64,
    t1: u64,
}

/// Connects `clients` fan-out clients (a child process) to `addr`, lets
/// events flow for `window`, and collects what they saw.
async fn fanout(addr: SocketAddr, token: &str, clients: usize, window: Duration) -> FanOut {
    let rss_before = rss_kib();
    let spec = format!("fanout {addr} {token} {clients}");
    let mut child = tokio::task::spawn_blocking(move || {
        let mut c = ChildProc::spawn(spec);
        assert_eq!(c.line(), "ready");
        c
    })
    .await
    .unwrap();
    // Let the sockets settle before reading memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kib_per_client = rss_kib().saturating_sub(rss_before) as f64 / clients as f64;
    let (t0, cpu0) = (now_ms(), process_cpu_ms());
    tokio::time::sleep(window).await;
    let (t1, cpu) = (now_ms(), process_cpu_ms() - cpu0);
    // Let the last events land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = tokio::task::spawn_blocking(move || {
        child.tell(&format!("{t0} {t1}"));
        child.finish()
    })
    .await
    .unwrap();
    FanOut {
        report,
        kib_per_client,
        cpu_ms: cpu,
        t0,
        t1,
    }
}

/// Runs an rpc child (`n` connections calling `devices.get_health` on
/// `device` for `seconds`) against `addr`.
async fn rpc(addr: SocketAddr, token: &str, n: usize, seconds: u64, device: &NodeId) -> Value {
    let spec = format!("rpc {addr} {token} {n} {seconds} {device}");
    tokio::task::spawn_blocking(move || ChildProc::spawn(spec).finish())
        .await
        .unwrap()
}

/// This process's CPU time per second over 5 s with nothing but the
/// workers' heartbeats going on, ms.
async fn idle_cpu_ms_per_s() -> f64 {
    let cpu0 = process_cpu_ms();
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    (process_cpu_ms() - cpu0) as f64 / start.elapsed().as_secs_f64()
}

/// Events of `published` in the window.
fn in_window(published: &std::sync::Mutex<Vec<u64>>, run: &FanOut) -> u64 {
    published
        .lock()
        .unwrap()
        .iter()
        .filter(|at| (run.t0..run.t1).contains(at))
        .count() as u64
}

/// Prints one fan-out run; returns (CPU µs per delivered message, p50
/// ms, p99 ms) and whether every client got every event.
fn summarise(name: &str, run: &FanOut, expected: u64) -> (f64, u64, u64, bool) {
    let (report, per_client_kib, cpu_ms) = (&run.report, run.kib_per_client, run.cpu_ms);
    let counts: Vec<u64> = report["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    let all = counts.iter().filter(|&&c| c == expected).count();
    let delivered: u64 = counts.iter().sum();
    let cpu_us_per_msg = cpu_ms as f64 * 1000.0 / delivered.max(1) as f64;
    println!(
        "{name}: {} clients, {expected} events each expected; {all} clients got every one (min {}, max {}), lag notices for {} events; latency p50 {} ms, p99 {} ms, max {} ms; this process's CPU {:.2} µs per delivered message; RSS +{:.1} KiB per client",
        counts.len(),
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
        report["lagged"],
        report["p50"],
        report["p99"],
        report["max"],
        cpu_us_per_msg,
        per_client_kib,
    );
    (
        cpu_us_per_msg,
        report["p50"].as_u64().unwrap(),
        report["p99"].as_u64().unwrap(),
        all == counts.len() && report["lagged"] == 0,
    )
}

/// The bare WebSocket server: answers every request with `result`, and
/// sends every message of `feed` to every socket. Shaped like the gateway
/// (a reader task and a writer task per socket, answers queued to the
/// writer, what is ready written with one flush) without anything above
/// the socket: no JSON-RPC dispatch, no runtime, one pre-serialised text
/// for everyone.
async fn bare_server(result: Value, feed: tokio::sync::broadcast::Sender<Arc<str>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (result, mut events) = (result.clone(), feed.subscribe());
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let (answers, mut answered) = tokio::sync::mpsc::channel::<String>(64);
                let reader = tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        let Message::Text(t) = m else { continue };
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        let answer = json!({"jsonrpc": "2.0", "id": v["id"], "result": result});
                        if answers.send(answer.to_string()).await.is_err() {
                            return;
                        }
                    }
                });
                'conn: loop {
                    let out = tokio::select! {
                        a = answered.recv() => match a {
                            Some(a) => a,
                            None => break,
                        },
                        e = events.recv() => match e {
                            Ok(text) => text.to_string(),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(_) => break,
                        },
                    };
                    // As the gateway does: what else is ready (up to 64)
                    // goes out with one flush.
                    if sink.feed(Message::Text(out.into())).await.is_err() {
                        break;
                    }
                    for _ in 1..64 {
                        let more = match answered.try_recv() {
                            Ok(a) => a,
                            Err(_) => match events.try_recv() {
                                Ok(text) => text.to_string(),
                                Err(_) => break,
                            },
                        };
                        if sink.feed(Message::Text(more.into())).await.is_err() {
                            break 'conn;
                        }
                    }
                    if sink.flush().await.is_err() {
                        break;
                    }
                }
                reader.abort();
            });
        }
    });
    addr
}

async fn start_primary(dir: &std::path::Path, interval: Duration) -> (Primary, PeerAddr) {
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(dir.join("primary.db")).unwrap());
    let mut quic = QuicConfig::default();
    // Every worker connects from 127.0.0.1.
    quic.handshakes_per_source = Rate::per_second(100_000.0, 100_000);
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let transport = Arc::new(
        QuicTransport::bind(key.clone(), "127.0.0.1:0".parse().unwrap(), admission, quic).unwrap(),
    );
    let addr = transport.addr();
    let config = NodeConfig::new(Role::Primary, "primary", "primary")
        .heartbeat_interval(interval)
        .pairing_limits(PairingLimits::default().rates(
            Rate::per_second(1000.0, 1000),
            Rate::per_second(1000.0, 1000),
        ));
    let node = Node::builder(key, store, transport, config)
        .start_primary()
        .unwrap();
    (node, addr)
}

async fn pair_workers(
    primary: &Primary,
    addr: &PeerAddr,
    n: usize,
    interval: Duration,
) -> Vec<mesh_core::node::Worker> {
    let mut requests = primary
        .subscribe(kinds::PAIRING_REQUEST_RECEIVED, 4096)
        .unwrap();
    let mut workers = Vec::new();
    for i in 0..n {
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let key = Arc::new(NodeKey::generate());
        let admission = Arc::new(RegistryAdmission::new(store.clone()));
        let transport = Arc::new(
            QuicTransport::bind(
                key.clone(),
                "127.0.0.1:0".parse().unwrap(),
                admission,
                QuicConfig::default(),
            )
            .unwrap(),
        );
        let config = NodeConfig::new(Role::Worker, &format!("w{i}"), &format!("hw-{i}"))
            .heartbeat_interval(interval);
        let w = Node::builder(key, store, transport, config)
            .metrics(Arc::new(Metrics))
            .start_worker()
            .unwrap();
        let mut connected = w.subscribe("session.connected", 4).unwrap();
        let ticket = w
            .request_pairing(primary.node_id(), addr.clone())
            .await
            .unwrap();
        while !matches!(requests.recv().await, Some(Received::Event(_))) {}
        primary
            .approve_pairing(ticket.request_id(), ticket.code())
            .await
            .unwrap();
        ticket.finished().await.unwrap();
        while !matches!(connected.recv().await, Some(Received::Event(_))) {}
        workers.push(w);
    }
    workers
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let quick = std::env::args().all(|a| a != "--bench");
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let clients = env("GATEWAY_BENCH_CLIENTS", if quick { 20 } else { 1000 }) as usize;
    let workers = env("GATEWAY_BENCH_WORKERS", if quick { 4 } else { 200 }) as usize;
    let interval = Duration::from_millis(env(
        "GATEWAY_BENCH_INTERVAL_MS",
        if quick { 1000 } else { 5000 },
    ));
    let window = Duration::from_secs(env("GATEWAY_BENCH_SECONDS", if quick { 2 } else { 30 }));
    let rpc_conns = if quick { 4 } else { 16 };
    let rpc_seconds = if quick { 1 } else { 10 };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async move {
        let (primary, quic_addr) = start_primary(dir.path(), interval).await;
        let nodes = pair_workers(&primary, &quic_addr, workers, interval).await;
        let config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), dir.path())
            .limits(clients + 64, clients + 64);
        let gateway = Gateway::start(primary.clone(), config).await.unwrap();
        let gw = gateway.local_addr();
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_owned();
        println!(
            "## gateway: {clients} WebSocket clients on `device.*`, {workers} workers heartbeating every {} ms (QUIC, 127.0.0.1; clients in a child process)",
            interval.as_millis()
        );

        // 1. Fan-out through the gateway, counted against the bus.
        let mut bus = primary.subscribe(kinds::DEVICE_HEARTBEAT, 1 << 20).unwrap();
        let published = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let recorder = published.clone();
        let counting = tokio::spawn(async move {
            while let Some(r) = bus.recv().await {
                match r {
                    Received::Event(e) => recorder.lock().unwrap().push(e.at.as_millis()),
                    Received::Lagged { missed } => panic!("the bench's own counter lagged {missed}"),
                }
            }
        });
        let idle_before = idle_cpu_ms_per_s().await;
        let run = fanout(gw, &token, clients, window).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_after = idle_cpu_ms_per_s().await;
        println!(
            "this process without clients (200 workers heartbeating into the primary): {idle_before:.1} ms CPU per s before the gateway's clients came, {idle_after:.1} after they left"
        );
        counting.abort();
        let expected = in_window(&published, &run);
        assert!(expected > 0, "no heartbeat in the window");
        let (gw_cpu, gw_p50, gw_p99, gw_all) = summarise("gateway", &run, expected);
        let gw_kib = run.kib_per_client;

        // The bare server: the same number of events, evenly spread, one
        // pre-serialised text for every client.
        let (feed, _) = tokio::sync::broadcast::channel::<Arc<str>>(4096);
        let bare = bare_server(json!({}), feed.clone()).await;
        let sent = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
        let (sender, log) = (feed.clone(), sent.clone());
        let node = nodes[0].node_id().to_string();
        // The gateway's events replayed with their timing (heartbeats come
        // in bunches; a baseline sent evenly would have it easier), over
        // and over until the window ends.
        let mut offsets: Vec<u64> = published
            .lock()
            .unwrap()
            .iter()
            .filter(|at| (run.t0..run.t1).contains(at))
            .map(|at| at - run.t0)
            .collect();
        offsets.sort_unstable();
        let span = Duration::from_millis(run.t1 - run.t0);
        let feeding = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for round in 0u32.. {
                for &offset in &offsets {
                    tokio::time::sleep_until(start + span * round + Duration::from_millis(offset)).await;
                    let at = now_ms();
                let note = json!({"jsonrpc": "2.0", "method": "event", "params": {
                    "subscriptionId": "s1", "type": kinds::DEVICE_HEARTBEAT, "at": at,
                    "data": {"node": node, "score": 97}}});
                    log.lock().unwrap().push(at);
                    let _ = sender.send(Arc::from(note.to_string()));
                }
            }
        });
        let bare_run = fanout(bare, "-", clients, window).await;
        feeding.abort();
        let bare_expected = in_window(&sent, &bare_run);
        let (bare_cpu, bare_p50, bare_p99, bare_all) = summarise("bare WebSocket server", &bare_run, bare_expected);
        println!(
            "fan-out: every client got every event: gateway {gw_all}, bare {bare_all}; CPU per delivered message gateway/bare {:.2}; p50 {gw_p50} vs {bare_p50} ms, p99 {gw_p99} vs {bare_p99} ms; memory per client gateway {gw_kib:.1} KiB vs bare {:.1} KiB ({:.2}×)",
            gw_cpu / bare_cpu.max(f64::MIN_POSITIVE),
            bare_run.kib_per_client,
            gw_kib / bare_run.kib_per_client.max(0.1),
        );
        assert!(gw_all, "a gateway client missed events");

        // 2. devices.get_health, one call at a time per connection.
        let device = nodes[0].node_id();
        let gw_rpc = rpc(gw, &token, rpc_conns, rpc_seconds, &device).await;
        let bare_result = json!({"deviceId": device.to_string()});
        let (feed2, _) = tokio::sync::broadcast::channel::<Arc<str>>(1);
        let bare2 = bare_server(bare_result, feed2).await;
        let bare_rpc = rpc(bare2, "-", rpc_conns, rpc_seconds, &device).await;
        // In-process: the runtime call the method makes, in a loop.
        let direct_primary = primary.clone();
        let direct = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let mut calls = 0u64;
            while start.elapsed() < Duration::from_secs(1) {
                direct_primary.device_health(&device).unwrap();
                calls += 1;
            }
            calls as f64 / start.elapsed().as_secs_f64()
        })
        .await
        .unwrap();
        let (g, b) = (gw_rpc["per_second"].as_f64().unwrap(), bare_rpc["per_second"].as_f64().unwrap());
        println!(
            "devices.get_health over {rpc_conns} connections for {rpc_seconds} s: gateway {g:.0} calls/s (p50 {} µs, p99 {} µs), bare server {b:.0} calls/s (p50 {} µs, p99 {} µs) → {:.2}× the bare server; the runtime call alone, in-process: {direct:.0} calls/s",
            gw_rpc["p50_us"], gw_rpc["p99_us"], bare_rpc["p50_us"], bare_rpc["p99_us"], g / b,
        );

        gateway.shutdown().await;
        for w in &nodes {
            w.shutdown().await;
        }
        primary.shutdown().await;
    });
}
