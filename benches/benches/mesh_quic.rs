//! The mesh over real QUIC on 127.0.0.1 (issue 15), all members in one
//! process:
//!
//! * join latency, token to full member list (`join_mesh` returns once the
//!   grant's list is applied), against a refused join through the same
//!   handler (dial, request, answer: the protocol's floor);
//! * broadcast latency to every member of the mesh, p50 and p99 over all
//!   (receiver, message) pairs, against one message on an open QUIC
//!   connection between two of the same endpoints (one hop);
//! * CPU per member per second at idle and at 10 broadcasts/s mesh-wide
//!   (the process's CPU time over the window, divided by the members).
//!
//! `cargo bench -p mesh-benches --bench mesh_quic` runs 20 members; under
//! `cargo test --benches` it runs 5 with short windows.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_core::identity::NodeKey;
use mesh_core::mesh::JOIN;
use mesh_core::mesh::member::MemberId;
use mesh_core::mesh::wire::{JoinAnswer, JoinRequest};
use mesh_core::node::{MeshSettings, Node, NodeConfig, RegistryAdmission, Role};
use mesh_core::storage::records::PeerStatus;
use mesh_core::storage::{MemoryStorage, Storage};
use mesh_core::transport::{AdmitAll, PeerAddr, Protocol, Transport};
use mesh_transport::quic::{QuicConfig, QuicTransport};

fn member(name: &str) -> (Node, std::net::SocketAddr) {
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let quic = Arc::new(
        QuicTransport::bind(
            key.clone(),
            "127.0.0.1:0".parse().unwrap(),
            admission,
            QuicConfig::default(),
        )
        .unwrap(),
    );
    let addr = quic.local_addr();
    let node = Node::builder(key, store, quic, NodeConfig::new(Role::Primary, name, name))
        .mesh(MeshSettings::reachable_at(addr, &[]))
        .start()
        .unwrap();
    (node, addr)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// This process's CPU time (user + system).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

async fn wait_all_active(nodes: &[Node], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ok = true;
        for node in nodes {
            let v = node.mesh_peers().await.unwrap();
            ok &= v
                .peers
                .iter()
                .filter(|p| p.status == PeerStatus::Active)
                .count()
                == n - 1;
        }
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "the mesh never formed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(n: usize, joins: usize, broadcasts: usize, window: Duration) {
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..n {
        let (node, addr) = member(&format!("m{i}"));
        nodes.push(node);
        addrs.push(addr);
    }
    // Form the mesh in a chain of tokens.
    for i in 1..n {
        let t = nodes[i - 1].mesh_token(None).await.unwrap();
        nodes[i].join_mesh(&t.token).await.unwrap();
    }
    wait_all_active(&nodes, n).await;

    // Join latency: fresh nodes join through members' tokens.
    let mut join_times = Vec::new();
    let mut extra = Vec::new();
    for j in 0..joins {
        let (fresh, _) = member(&format!("j{j}"));
        let t = nodes[j % n].mesh_token(None).await.unwrap();
        let t0 = Instant::now();
        let known = fresh.join_mesh(&t.token).await.unwrap();
        join_times.push(t0.elapsed());
        assert!(known >= n, "the grant lists the mesh");
        extra.push(fresh);
    }
    // The floor: a join refused by the same handler (a secret it never issued).
    let raw_key = Arc::new(NodeKey::generate());
    let raw = QuicTransport::bind(
        raw_key.clone(),
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(AdmitAll),
        QuicConfig::default(),
    )
    .unwrap();
    let me = MemberId::new(&raw_key, 1, "floor", vec![]).unwrap();
    let mut floor_times = Vec::new();
    for j in 0..joins {
        let to = nodes[j % n].node_id();
        let t0 = Instant::now();
        let c = raw
            .connect(to, &PeerAddr::Socket(addrs[j % n]), JOIN)
            .await
            .unwrap();
        c.send(
            JoinRequest {
                secret: [j as u8; 16],
                member: me.clone(),
            }
            .encode(),
        )
        .await
        .unwrap();
        let answer = JoinAnswer::decode(&c.recv().await.unwrap()).unwrap();
        floor_times.push(t0.elapsed());
        assert!(matches!(answer, JoinAnswer::Refused { .. }));
        c.close();
    }
    join_times.sort();
    floor_times.sort();
    for e in &extra {
        e.shutdown().await;
    }
    drop(extra);

    // Broadcast latency.
    let arrivals: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    for node in &nodes {
        let mut sub = node.mesh_subscribe("bench/*", 4096).unwrap();
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(d) = sub.recv().await {
                arrivals.lock().unwrap().push((d.key.id, Instant::now()));
            }
        });
    }
    let mut sent = Vec::new();
    for b in 0..broadcasts {
        let origin = &nodes[b % n];
        let t0 = Instant::now();
        let key = origin
            .mesh_broadcast("bench/latency", vec![0u8; 256])
            .await
            .unwrap();
        sent.push((key.id, t0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = arrivals.lock().unwrap().clone();
    let mut lat = Vec::new();
    for (id, t0) in &sent {
        let reached: Vec<Duration> = got
            .iter()
            .filter(|(i, _)| i == id)
            .map(|(_, t)| t.duration_since(*t0))
            .collect();
        assert_eq!(
            reached.len(),
            n - 1,
            "a broadcast reached every other member once"
        );
        lat.extend(reached);
    }
    lat.sort();

    // The one-hop floor: a message on an open QUIC connection.
    const ECHO: Protocol = Protocol::new("mesh-bench/echo/1");
    let ka = Arc::new(NodeKey::generate());
    let kb = Arc::new(NodeKey::generate());
    let ta = QuicTransport::bind(
        ka,
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(AdmitAll),
        QuicConfig::default(),
    )
    .unwrap();
    let tb = Arc::new(
        QuicTransport::bind(
            kb.clone(),
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(AdmitAll),
            QuicConfig::default(),
        )
        .unwrap(),
    );
    tb.serve(&[ECHO], Arc::new(AdmitAll)).unwrap();
    let tb2 = tb.clone();
    let server = tokio::spawn(async move {
        let c = tb2.accept().await.unwrap();
        while let Ok(m) = c.recv().await {
            if c.send(m).await.is_err() {
                break;
            }
        }
    });
    let c = ta
        .connect(kb.node_id(), &PeerAddr::Socket(tb.local_addr()), ECHO)
        .await
        .unwrap();
    let mut hop = Vec::new();
    for _ in 0..broadcasts.max(50) {
        let t0 = Instant::now();
        c.send(vec![0u8; 256]).await.unwrap();
        c.recv().await.unwrap();
        hop.push(t0.elapsed() / 2);
    }
    hop.sort();
    c.close();
    server.abort();

    // CPU per member per second.
    let c0 = cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let idle = (cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64() / n as f64;
    let c0 = cpu_time();
    let t0 = Instant::now();
    let mut b = 0;
    while t0.elapsed() < window {
        let _ = nodes[b % n]
            .mesh_broadcast("bench/load", vec![0u8; 256])
            .await;
        b += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let busy = (cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64() / n as f64;

    println!("| figure | mesh | baseline | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| join, token to full member list (p50 of {joins}; {n} members) | {:.2} ms | refused join, same handler: {:.2} ms | {:.2}× |",
        ms(pct(&join_times, 0.5)),
        ms(pct(&floor_times, 0.5)),
        ms(pct(&join_times, 0.5)) / ms(pct(&floor_times, 0.5))
    );
    println!(
        "| broadcast to all {} others, p50 ({} samples) | {:.2} ms | one QUIC hop: {:.3} ms | {:.1}× |",
        n - 1,
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&hop, 0.5)),
        ms(pct(&lat, 0.5)) / ms(pct(&hop, 0.5))
    );
    println!(
        "| broadcast to all {} others, p99 | {:.2} ms | one QUIC hop p99: {:.3} ms | {:.1}× |",
        n - 1,
        ms(pct(&lat, 0.99)),
        ms(pct(&hop, 0.99)),
        ms(pct(&lat, 0.99)) / ms(pct(&hop, 0.99))
    );
    println!(
        "| CPU per member, 10 broadcasts/s mesh-wide | {:.2} ms/s | idle: {:.2} ms/s | {:.2}× |",
        busy * 1e3,
        idle * 1e3,
        busy / idle.max(1e-9)
    );
    for node in &nodes {
        node.shutdown().await;
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if full {
        rt.block_on(run(20, 20, 100, Duration::from_secs(10)));
    } else {
        rt.block_on(run(5, 3, 10, Duration::from_secs(1)));
    }
}
