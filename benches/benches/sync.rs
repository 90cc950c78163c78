//! Replicated state (issue 16), three measurements in one run:
//!
//! 1. Durable replicated writes per second through the runtime
//!    (`Replicated::put` on a node with SQLite: each put returns once its
//!    batch is on disk), 256 writers at once (group commit) against one
//!    writer at a time (a flush per write) — the ratio is what group
//!    commit buys.
//! 2. Bytes on the wire: one write's push frame against the write's own
//!    key and value; a member that missed 10,000 writes of a 100,000-key
//!    namespace catching up by version vector against a full copy.
//! 3. Convergence after a partition heals (simulation of the anti-entropy
//!    exchange, virtual time, 1 s rounds): 10 and 100 members, each half
//!    writing while apart; rounds until every replica holds the same
//!    state, against log2(N).
//!
//! `cargo bench -p mesh-benches --bench sync`; under `cargo test --benches`
//! it runs small sizes once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use mesh_core::clock::Timestamp;
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::node::{MeshSettings, Node, NodeConfig, RegistryAdmission, Role};
use mesh_core::storage::{SqliteStorage, Storage};
use mesh_core::sync::{
    Change, DEFAULT_MAX_SKEW, HlcClock, Replica, ReplicaLimits, SyncFrame, VersionVector,
};
use mesh_core::transport::PeerAddr;
use mesh_transport::memory::MemoryNetwork;

fn node(dir: &std::path::Path) -> Node {
    let key = Arc::new(NodeKey::generate());
    let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(dir.join("mesh.db")).unwrap());
    let net = MemoryNetwork::new(1);
    let admission = Arc::new(RegistryAdmission::new(store.clone()));
    let t = Arc::new(net.endpoint(key.node_id(), "bench", admission).unwrap());
    Node::builder(
        key,
        store,
        t,
        NodeConfig::new(Role::Primary, "bench", "bench"),
    )
    .mesh(MeshSettings::new(vec![PeerAddr::Memory("bench".into())]))
    .start()
    .unwrap()
}

/// Which keys the writers write.
#[derive(Clone, Copy, PartialEq)]
enum Keys {
    /// Ordered by time, as log-like data is.
    Appending,
    /// One key range per writer, new keys only.
    Scattered,
    /// 16 keys per writer, each rewritten over and over (every write but
    /// the first of a key supersedes one: the garbage rows are deleted in
    /// bulk as the run goes).
    Overwriting,
}

/// Keys each writer rewrites in [`Keys::Overwriting`].
const HOT_KEYS: usize = 16;

/// `total` puts of 100-byte values by `writers` tasks at once; puts/s.
async fn durable_writes(writers: usize, total: usize, keys: Keys) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let n = node(dir.path());
    let ns = n.replicated("bench").unwrap();
    let per = total / writers;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let key = match keys {
                    Keys::Appending => format!("{i:08}/w{w:03}"),
                    Keys::Scattered => format!("w{w}/k{i}"),
                    Keys::Overwriting => format!("w{w}/k{}", i % HOT_KEYS),
                };
                ns.put(&key, vec![7; 100]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (per * writers) as f64 / t0.elapsed().as_secs_f64();
    // Every write is there after a restart of the store.
    n.shutdown().await;
    drop(n);
    let back = node(dir.path());
    let stored = back
        .replicated("bench")
        .unwrap()
        .scan("")
        .await
        .unwrap()
        .len();
    let expected = match keys {
        Keys::Overwriting => per.min(HOT_KEYS) * writers,
        _ => per * writers,
    };
    assert_eq!(stored, expected);
    back.shutdown().await;
    rate
}

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000 + ms)
}

fn bytes_on_the_wire(keys: usize, missed: usize) {
    let a = NodeKey::from_secret_bytes(&[1; 32]).node_id();
    let b = NodeKey::from_secret_bytes(&[2; 32]).node_id();
    let mut clock = HlcClock::new(a, DEFAULT_MAX_SKEW);
    let mut src = Replica::new(a, ReplicaLimits::default());
    let mut changes: Vec<Change> = Vec::new();
    for i in 0..keys {
        changes.push(
            src.write(
                &format!("key/{i:08}"),
                Some(vec![9; 100]),
                &mut clock,
                at(i as u64),
            )
            .unwrap(),
        );
    }
    let one = SyncFrame::Push {
        namespace: "config".into(),
        changes: vec![changes[0].clone()],
    }
    .encode()
    .len();
    let payload = changes[0].key.len() + 100;
    println!(
        "| one write pushed | {one} bytes | key + value {payload} bytes | {:.2}x |",
        one as f64 / payload as f64
    );
    // b has everything but the last `missed` writes.
    let mut dst = Replica::new(b, ReplicaLimits::default());
    let mut bclock = HlcClock::new(b, DEFAULT_MAX_SKEW);
    let mut theirs = VersionVector::new();
    theirs.insert(a, (keys - missed) as u64);
    let _ = dst.apply(
        changes[..keys - missed].to_vec(),
        Some(&theirs),
        &mut bclock,
        at(keys as u64),
    );
    let mut catchup = 0usize;
    let mut sent = 0usize;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let digest = SyncFrame::Digest {
            vectors: vec![("config".into(), dst.covered().clone())],
            reply: true,
            all: true,
        }
        .encode();
        let delta = src.delta_for(dst.covered());
        sent += delta.changes.len();
        let frame = SyncFrame::Delta {
            namespace: "config".into(),
            delta: delta.clone(),
        }
        .encode();
        catchup += digest.len() + frame.len();
        let _ = dst.apply(
            delta.changes,
            Some(&delta.covers),
            &mut bclock,
            at(keys as u64),
        );
        if !delta.more {
            break;
        }
    }
    assert_eq!(sent, missed, "exactly the missed writes");
    assert_eq!(dst.entries().count(), keys);
    let mut full_bytes = 0;
    let mut cover = VersionVector::new();
    loop {
        let d = src.delta_for(&cover);
        full_bytes += SyncFrame::Delta {
            namespace: "config".into(),
            delta: d.clone(),
        }
        .encode()
        .len();
        cover = d.covers.clone();
        if !d.more {
            break;
        }
    }
    println!(
        "| catch-up of {missed} missed writes of {keys} | {catchup} bytes in {rounds} round(s), {sent} changes | full copy {full_bytes} bytes | {:.3}x |",
        catchup as f64 / full_bytes as f64
    );
}

/// Anti-entropy after a partition heals: `n` replicas, halves writing
/// `per` keys each while apart (some the same keys), then each round every
/// replica sends its vector to one random member, which answers with what
/// it lacks and, if the sender holds more, asks back. Rounds until equal.
fn converge(n: usize, per: usize, seed: u64) -> (usize, usize) {
    let keys: Vec<NodeId> = (0..n)
        .map(|i| {
            let mut secret = [7u8; 32];
            secret[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            NodeKey::from_secret_bytes(&secret).node_id()
        })
        .collect();
    let mut reps: Vec<(Replica, HlcClock)> = keys
        .iter()
        .map(|k| {
            (
                Replica::new(*k, ReplicaLimits::default()),
                HlcClock::new(*k, DEFAULT_MAX_SKEW),
            )
        })
        .collect();
    let half = n / 2;
    let side = |i: usize| i < half;
    let mut rng = seed | 1;
    let mut next = move |m: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % m as u64) as usize
    };
    // While apart: writes pushed to every member of the writer's side.
    for i in 0..n {
        for k in 0..per {
            let key = if k % 4 == 0 {
                format!("shared/{k}")
            } else {
                format!("n{i}/{k}")
            };
            let (r, c) = &mut reps[i];
            let ch = r
                .write(&key, Some(vec![i as u8; 32]), c, at((i * per + k) as u64))
                .unwrap();
            for (j, (r, c)) in reps.iter_mut().enumerate() {
                if j != i && side(j) == side(i) {
                    let _ = r.apply(vec![ch.clone()], None, c, at((n * per) as u64));
                }
            }
        }
    }
    let now = at((n * per) as u64 + 1);
    let mut bytes = 0usize;
    let same = |reps: &[(Replica, HlcClock)]| {
        let first: Vec<&Change> = reps[0].0.entries().collect();
        reps[1..]
            .iter()
            .all(|(r, _)| r.entries().collect::<Vec<_>>() == first)
    };
    let mut rounds = 0;
    while !same(&reps) {
        rounds += 1;
        assert!(rounds < 1000, "no convergence");
        for i in 0..n {
            let mut j = next(n);
            if j == i {
                j = (j + 1) % n;
            }
            // i → j: digest; j answers with a delta (and its own digest if
            // i holds more); i answers that with a delta.
            let vi = reps[i].0.covered().clone();
            bytes += SyncFrame::Digest {
                vectors: vec![("ns".into(), vi.clone())],
                reply: true,
                all: true,
            }
            .encode()
            .len();
            let d = reps[j].0.delta_for(&vi);
            bytes += SyncFrame::Delta {
                namespace: "ns".into(),
                delta: d.clone(),
            }
            .encode()
            .len();
            let ahead = vi
                .iter()
                .any(|(o, s)| *s > reps[j].0.covered().get(o).copied().unwrap_or(0));
            {
                let (r, c) = &mut reps[i];
                let _ = r.apply(d.changes, Some(&d.covers), c, now);
            }
            if ahead {
                let vj = reps[j].0.covered().clone();
                let back = reps[i].0.delta_for(&vj);
                bytes += SyncFrame::Delta {
                    namespace: "ns".into(),
                    delta: back.clone(),
                }
                .encode()
                .len();
                let (r, c) = &mut reps[j];
                let _ = r.apply(back.changes, Some(&back.covers), c, now);
            }
        }
    }
    (rounds, bytes)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    println!("## Durable replicated writes (SQLite, each put returns once on disk)\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (total, one_total) = if full { (200_000, 2_000) } else { (2_000, 100) };
    let appending = rt.block_on(durable_writes(256, total, Keys::Appending));
    let scattered = rt.block_on(durable_writes(256, total, Keys::Scattered));
    let overwriting = rt.block_on(durable_writes(256, total, Keys::Overwriting));
    let single = rt.block_on(durable_writes(1, one_total, Keys::Appending));
    println!("| writers | keys | puts | puts/s |\n|---|---|---|---|");
    println!("| 256 at once (group commit) | appending | {total} | {appending:.0} |");
    println!("| 256 at once (group commit) | scattered | {total} | {scattered:.0} |");
    println!(
        "| 256 at once (group commit) | {HOT_KEYS} per writer, rewritten | {total} | {overwriting:.0} |"
    );
    println!("| 1 at a time (a flush each) | appending | {one_total} | {single:.0} |");
    println!(
        "\ngroup commit: {:.1}x (appending keys), {:.1}x (scattered keys), {:.1}x (rewritten keys) the puts/s of one at a time\n",
        appending / single,
        scattered / single,
        overwriting / single
    );

    println!("## Bytes on the wire\n\n| what | bytes | against | ratio |\n|---|---|---|---|");
    if full {
        bytes_on_the_wire(100_000, 10_000);
    } else {
        bytes_on_the_wire(2_000, 200);
    }

    println!("\n## Convergence after a partition heals (anti-entropy only, 1 s rounds)\n");
    println!(
        "| members | writes while apart | rounds (s) to identical state | log2 N | ratio | bytes exchanged |\n|---|---|---|---|---|---|"
    );
    let sizes: &[usize] = if full { &[10, 100] } else { &[10] };
    for &n in sizes {
        let t0 = Instant::now();
        let (rounds, bytes) = converge(n, 20, 42);
        let log = (n as f64).log2();
        println!(
            "| {n} | {} | {rounds} | {log:.1} | {:.2}x | {bytes} | ({:?} real)",
            n * 20,
            rounds as f64 / log,
            t0.elapsed()
        );
    }
}
