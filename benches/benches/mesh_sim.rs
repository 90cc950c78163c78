//! The mesh simulated (issue 15): deterministic, one thread, virtual clock.
//! For N members: virtual time until every member agrees on the member set
//! after joining; rounds (hops) until a broadcast reaches everyone, against
//! log2(N) + 4; the worst reach at 5 % loss; frames per member per second
//! at one broadcast per second mesh-wide, as a ratio to the smallest N (it
//! must not grow with N); agreement time after 10 % of members crash.
//! `cargo bench -p mesh-benches --bench mesh_sim` runs 100, 300 and 1,000
//! members (`MESH_SIM_SIZES=300,1000` picks sizes); under `cargo test
//! --benches` it runs 50.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use mesh_core::mesh::MeshConfig;
use mesh_core::mesh::sim::Sim;

fn agree(sim: &mut Sim, limit: Duration) -> Option<Duration> {
    let start = sim.now;
    while sim.now.saturating_duration_since(start) < limit {
        sim.run_for(Duration::from_millis(250));
        if sim.agree_on_live_set() {
            return Some(sim.now.saturating_duration_since(start));
        }
    }
    None
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // MESH_SIM_SIZES=300,1000 runs just those.
    let chosen: Option<Vec<usize>> = std::env::var("MESH_SIM_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let sizes: &[usize] = match &chosen {
        Some(c) if !c.is_empty() => c,
        _ if full => &[100, 300, 1000],
        _ => &[50],
    };
    println!(
        "| members | joined, agreed after | rounds (goal ≤ log2 N + 4) | worst reach at 5 % loss | frames / member / s at 1 broadcast/s | ratio to N={} | agreed after 10 % crash | real time |",
        sizes[0]
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut base = None;
    // MESH_SIM_SEED=7 runs another deterministic history.
    let seed: u64 = std::env::var("MESH_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    for &n in sizes {
        let t0 = Instant::now();
        let gap = if n > 300 { 50 } else { 20 };
        let mut sim = Sim::joined(
            n,
            seed,
            MeshConfig::for_size(n as u32),
            Duration::from_millis(gap),
        );
        let joined =
            agree(&mut sim, Duration::from_secs(300)).expect("members agree after joining");
        eprintln!("joined: {:.1}s real", t0.elapsed().as_secs_f64());
        if std::env::var("MESH_SIM_IDLE").is_ok() {
            sim.loss = 0.01;
            let t = Instant::now();
            sim.run_for(Duration::from_secs(60));
            eprintln!("idle 60 virt s at 1% loss: {:.1}s real", t.elapsed().as_secs_f64());
            sim.loss = 0.0;
        }

        let key = sim.broadcast(0, "b", vec![0; 64]);
        sim.run_for(Duration::from_secs(3));
        assert_eq!(sim.reached(&key), n, "a broadcast reaches everyone");
        let rounds = sim.rounds(&key);
        assert!(f64::from(rounds) <= (n as f64).log2() + 4.0);

        sim.loss = 0.05;
        let mut worst = n;
        for i in 0..5 {
            let key = sim.broadcast(i * n / 5, "b", vec![1; 64]);
            sim.run_for(Duration::from_secs(3));
            worst = worst.min(sim.reached(&key));
        }
        sim.loss = 0.0;
        assert!(worst as f64 >= 0.999 * n as f64);

        // Cost: one broadcast a second, from a different member each time.
        let before: u64 = sim.nodes.iter().map(|m| m.sent).sum();
        let secs = 20;
        for s in 0..secs {
            sim.broadcast((s * 7919) % n, "b", vec![2; 64]);
            sim.run_for(Duration::from_secs(1));
        }
        let after: u64 = sim.nodes.iter().map(|m| m.sent).sum();
        let per_member = (after - before) as f64 / n as f64 / secs as f64;
        let ratio = per_member / *base.get_or_insert(per_member);

        for i in (3..n).step_by(10) {
            sim.crash(i);
        }
        let crashed = agree(&mut sim, Duration::from_secs(30));
        println!(
            "| {n} | {:.1} s | {rounds} (≤ {:.1}) | {worst}/{n} | {per_member:.1} | {ratio:.2}× | {} | {:.1} s |",
            joined.as_secs_f64(),
            (n as f64).log2() + 4.0,
            crashed.map_or("not within 30 s".into(), |d| format!(
                "{:.1} s",
                d.as_secs_f64()
            )),
            t0.elapsed().as_secs_f64()
        );
    }
}
