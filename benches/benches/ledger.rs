//! The audit ledger against a plain hash chain, in the same run:
//!
//! 1. appends/s in memory: a plain hash chain (encode, SHA-256 over the
//!    previous hash and the record, keep the bytes) — the baseline; ours with
//!    the Merkle tree and a signed checkpoint every 1,024 records
//!    (`MemoryStorage`, 1,024 entries per `append` call); ours with a
//!    signature on every record;
//! 2. durable appends/s: SQLite (WAL, `synchronous=FULL`, a file on disk)
//!    with group commit, 1,000 entries per transaction;
//! 3. full verification of 1,000,000 records (memory store);
//! 4. verification of one inclusion proof at 2^20 records;
//! 5. audited decisions/s: one `command.decided` entry per `append` (one
//!    durable transaction each, as the node records a decision) from many
//!    threads at once, which the storage writer's group commit shares
//!    transactions among — against the same appends from one thread (one
//!    fsync each), in the same run.
//!
//! `cargo test --benches` runs a small version of each.
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::clock::Timestamp;
use mesh_core::identity::NodeKey;
use mesh_core::ledger::{Body, Entry, Ledger};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_ledger::merkle::{MerkleTree, leaf_hash, verify_inclusion};
use mesh_ledger::{LedgerConfig, LedgerRecord, SignedLedger, verify_ledger};
use sha2::{Digest, Sha256};

const TYPE: &str = "command.decided";

fn entries(from: u64, n: u64, actor: mesh_core::identity::NodeId) -> Vec<Entry> {
    (from..from + n)
        .map(|i| Entry {
            record_type: TYPE.to_owned(),
            actor,
            // A 48-byte body, like a small decision record.
            body: Body::Bytes([&i.to_be_bytes()[..], &[0x5a; 40]].concat()),
        })
        .collect()
}

/// The baseline: the same records, hashed into a chain and kept, nothing else.
fn plain_chain(n: u64, actor: mesh_core::identity::NodeId) -> f64 {
    let start = Instant::now();
    let mut prev = [0u8; 32];
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(n as usize);
    for chunk in 0..n.div_ceil(1024) {
        for e in entries(chunk * 1024, 1024.min(n - chunk * 1024), actor) {
            let record = LedgerRecord {
                seq: kept.len() as u64,
                timestamp: Timestamp::from_millis(1),
                actor: e.actor,
                record_type: e.record_type,
                body: e.body,
                prev_hash: prev,
                signature: None,
            };
            let bytes = record.canonical();
            prev = Sha256::new()
                .chain_update(prev)
                .chain_update(&bytes)
                .finalize()
                .into();
            kept.push(bytes);
        }
    }
    black_box(&kept);
    n as f64 / start.elapsed().as_secs_f64()
}

/// Ours: appends of `batch` entries at a time; returns (appends/s, ledger, store).
fn ours(n: u64, batch: u64, config: LedgerConfig, store: Arc<dyn Storage>) -> (f64, SignedLedger) {
    let key = Arc::new(NodeKey::from_secret_bytes(&[1; 32]));
    let ledger = SignedLedger::open(store, key.clone(), config).unwrap();
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let k = batch.min(n - done);
        ledger
            .append(
                entries(done, k, key.node_id()),
                vec![],
                Timestamp::from_millis(1),
            )
            .unwrap();
        done += k;
    }
    (n as f64 / start.elapsed().as_secs_f64(), ledger)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One part of the benchmark.
type Phase = fn(&Sizes);

struct Sizes {
    quick: bool,
    n_mem: u64,
    n_signed: u64,
    n_sqlite: u64,
    n_verify: u64,
    proof_leaves: u64,
    rounds: usize,
}

fn appends_in_memory(z: &Sizes) {
    let actor = NodeKey::from_secret_bytes(&[2; 32]).node_id();
    println!(
        "## appends in memory ({} records; median of {})",
        z.n_mem, z.rounds
    );
    let mut chain = Vec::new();
    let mut merkle = Vec::new();
    for _ in 0..z.rounds {
        chain.push(plain_chain(z.n_mem, actor));
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        merkle.push(ours(z.n_mem, 1024, LedgerConfig::default(), store).0);
    }
    let (chain, merkle) = (median(chain), median(merkle));
    println!("plain hash chain (baseline):                 {chain:>12.0} records/s");
    println!(
        "ours, Merkle + checkpoint every 1,024:       {merkle:>12.0} records/s  ({:.3} of baseline)",
        merkle / chain
    );
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let config = LedgerConfig::default().sign_records(true);
    let (signed, _) = ours(z.n_signed, 1024, config, store);
    println!(
        "ours, a signature on every record:           {signed:>12.0} records/s  ({:.4} of baseline; {} records)",
        signed / chain,
        z.n_signed
    );
}

fn durable_appends(z: &Sizes) {
    println!(
        "## durable appends: SQLite file, WAL, synchronous=FULL ({} records)",
        z.n_sqlite
    );
    let dir = tempfile::tempdir().unwrap();
    for group in [1u64, 100, 1000] {
        let n = if group == 1 {
            (z.n_sqlite / 300).max(50)
        } else {
            z.n_sqlite
        };
        let path = dir.path().join(format!("g{group}.db"));
        let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(path).unwrap());
        let (rate, _) = ours(n, group, LedgerConfig::default(), store);
        println!(
            "group commit of {group:>4} entries per transaction: {rate:>10.0} records/s ({n} records)"
        );
    }
}

/// `threads` threads appending `n` single-entry batches in all to a ledger
/// on a fresh SQLite file; returns (decisions/s, batches per transaction).
fn decisions(dir: &std::path::Path, threads: u64, n: u64) -> (f64, f64) {
    let path = dir.join(format!("decisions-{threads}.db"));
    let sqlite = Arc::new(SqliteStorage::open(path).unwrap());
    let store: Arc<dyn Storage> = sqlite.clone();
    let key = Arc::new(NodeKey::from_secret_bytes(&[1; 32]));
    let ledger = Arc::new(SignedLedger::open(store, key.clone(), LedgerConfig::default()).unwrap());
    let actor = key.node_id();
    let per = n / threads;
    let before = sqlite.write_stats();
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let ledger = ledger.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    ledger
                        .append(
                            entries(t * per + i, 1, actor),
                            vec![],
                            Timestamp::from_millis(1),
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let rate = (per * threads) as f64 / start.elapsed().as_secs_f64();
    let after = sqlite.write_stats();
    let grouped = (after.batches - before.batches) as f64
        / (after.transactions - before.transactions).max(1) as f64;
    (rate, grouped)
}

fn audited_decisions(z: &Sizes) {
    println!("## audited decisions: one entry per durable append, SQLite file, synchronous=FULL");
    let dir = tempfile::tempdir().unwrap();
    let n_one = if z.quick { 200 } else { 5_000 };
    let (one, _) = decisions(dir.path(), 1, n_one);
    println!("1 thread (baseline, one fsync each):          {one:>10.0} decisions/s ({n_one})");
    for threads in [16u64, 64, 256] {
        let n = if z.quick { threads * 10 } else { 200_000 };
        let (rate, grouped) = decisions(dir.path(), threads, n);
        println!(
            "{threads:>3} threads, group commit:                  {rate:>10.0} decisions/s ({n}; {grouped:.1} per transaction; {:.1}x baseline)",
            rate / one
        );
    }
}

fn full_verification(z: &Sizes) {
    println!("## full verification");
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let (_, ledger) = ours(z.n_verify, 1024, LedgerConfig::default(), store.clone());
    let (n, author) = (ledger.len(), ledger.view().author());
    let mut times = Vec::new();
    for _ in 0..z.rounds {
        let start = Instant::now();
        let report = verify_ledger(store.as_ref(), &author, None).unwrap();
        times.push(start.elapsed().as_secs_f64());
        assert!(report.ok());
        assert_eq!(report.records, n);
    }
    let t = median(times);
    println!(
        "{n} records (checkpoints included) verified in {t:.3} s ({:.0} records/s)",
        n as f64 / t
    );
}

fn proof_verification(z: &Sizes) {
    let leaves = z.proof_leaves;
    println!("## inclusion proof verification at {leaves} records");
    let mut tree = MerkleTree::new();
    for i in 0..leaves {
        tree.push(leaf_hash(&i.to_be_bytes()));
    }
    let root = tree.root();
    let samples: Vec<(u64, [u8; 32], Vec<[u8; 32]>)> = (0..1000u64)
        .map(|i| {
            let index = (i * 7919) % leaves;
            (
                index,
                tree.leaf(index).unwrap(),
                tree.inclusion_proof(index, leaves).unwrap(),
            )
        })
        .collect();
    let reps = if z.quick { 1 } else { 100 };
    let start = Instant::now();
    for _ in 0..reps {
        for (index, leaf, proof) in &samples {
            assert!(verify_inclusion(
                black_box(leaf),
                *index,
                leaves,
                proof,
                &root
            ));
        }
    }
    let per = start.elapsed().as_secs_f64() / (reps * samples.len()) as f64;
    // Baseline: one interior-node hash.
    let start = Instant::now();
    let mut h = [0u8; 32];
    for _ in 0..100_000 {
        h = mesh_ledger::merkle::node_hash(black_box(&h), &root);
    }
    black_box(h);
    let one = start.elapsed().as_secs_f64() / 100_000.0;
    println!(
        "{:.2} µs per proof ({} hashes each); one node hash (SHA-256 of 65 bytes): {:.3} µs",
        per * 1e6,
        samples[0].2.len(),
        one * 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // run a small version of each phase.
    let quick = std::env::args().all(|a| a != "--bench");
    let z = if quick {
        Sizes {
            quick,
            n_mem: 20_000,
            n_signed: 200,
            n_sqlite: 5_000,
            n_verify: 20_000,
            proof_leaves: 1 << 12,
            rounds: 1,
        }
    } else {
        Sizes {
            quick,
            n_mem: 1_000_000,
            n_signed: 20_000,
            n_sqlite: 300_000,
            n_verify: 1_000_000,
            proof_leaves: 1 << 20,
            rounds: 3,
        }
    };
    // Optional filter, e.g. `cargo bench --bench ledger -- memory verify`
    // (phases: memory sqlite decisions verify proof).
    let phases: [(&str, Phase); 5] = [
        ("memory", appends_in_memory),
        ("sqlite", durable_appends),
        ("decisions", audited_decisions),
        ("verify", full_verification),
        ("proof", proof_verification),
    ];
    let picked: Vec<String> = std::env::args()
        .filter(|a| phases.iter().any(|(name, _)| name == a))
        .collect();
    for (name, phase) in phases {
        if picked.is_empty() || picked.iter().any(|p| p == name) {
            phase(&z);
        }
    }
}
