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
//! 4. verification of one inclusion proof at 2^20 records.
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

fn main() {
    let quick = std::env::args().all(|a| a != "--bench");
    let (n_mem, n_signed, n_sqlite, n_verify, proof_leaves, rounds) = if quick {
        (20_000u64, 200u64, 5_000u64, 20_000u64, 1u64 << 12, 1)
    } else {
        (1_000_000, 20_000, 300_000, 1_000_000, 1 << 20, 3)
    };
    let actor = NodeKey::from_secret_bytes(&[2; 32]).node_id();

    println!("## appends in memory ({n_mem} records; median of {rounds})");
    let mut chain = Vec::new();
    let mut merkle = Vec::new();
    let mut kept = None;
    for _ in 0..rounds {
        chain.push(plain_chain(n_mem, actor));
        let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let (rate, ledger) = ours(n_mem, 1024, LedgerConfig::default(), store.clone());
        merkle.push(rate);
        kept = Some((ledger, store));
    }
    let (chain, merkle) = (median(chain), median(merkle));
    println!("plain hash chain (baseline):                 {chain:>12.0} records/s");
    println!(
        "ours, Merkle + checkpoint every 1,024:       {merkle:>12.0} records/s  ({:.3} of baseline)",
        merkle / chain
    );
    let (signed, _) = ours(
        n_signed,
        1024,
        LedgerConfig::default().sign_records(true),
        Arc::new(MemoryStorage::new()),
    );
    println!(
        "ours, a signature on every record:           {signed:>12.0} records/s  ({:.4} of baseline; {n_signed} records)",
        signed / chain
    );

    println!("## durable appends: SQLite file, WAL, synchronous=FULL ({n_sqlite} records)");
    let dir = tempfile::tempdir().unwrap();
    for group in [1u64, 100, 1000] {
        let n = if group == 1 {
            (n_sqlite / 300).max(50)
        } else {
            n_sqlite
        };
        let store: Arc<dyn Storage> =
            Arc::new(SqliteStorage::open(dir.path().join(format!("g{group}.db"))).unwrap());
        let (rate, _) = ours(n, group, LedgerConfig::default(), store);
        println!(
            "group commit of {group:>4} entries per transaction: {rate:>10.0} records/s ({n} records)"
        );
    }

    println!("## full verification");
    let (ledger, store) = kept.unwrap();
    let mut n = ledger.len();
    if n < n_verify {
        let (_, l) = ours(n_verify, 1024, LedgerConfig::default(), store.clone());
        n = l.len();
    }
    let author = ledger.view().author();
    let mut times = Vec::new();
    for _ in 0..rounds {
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

    println!("## inclusion proof verification at {proof_leaves} records");
    let mut tree = MerkleTree::new();
    for i in 0..proof_leaves {
        tree.push(leaf_hash(&i.to_be_bytes()));
    }
    let root = tree.root();
    let samples: Vec<(u64, [u8; 32], Vec<[u8; 32]>)> = (0..1000u64)
        .map(|i| {
            let index = (i * 7919) % proof_leaves;
            (
                index,
                tree.leaf(index).unwrap(),
                tree.inclusion_proof(index, proof_leaves).unwrap(),
            )
        })
        .collect();
    let reps = if quick { 1 } else { 100 };
    let start = Instant::now();
    for _ in 0..reps {
        for (index, leaf, proof) in &samples {
            assert!(verify_inclusion(
                black_box(leaf),
                *index,
                proof_leaves,
                proof,
                &root
            ));
        }
    }
    let per = start.elapsed().as_secs_f64() / (reps * samples.len()) as f64;
    println!(
        "{:.2} µs per proof ({} hashes each); baseline: one SHA-256 of 65 bytes ≈ {:.3} µs",
        per * 1e6,
        samples[0].2.len(),
        {
            let start = Instant::now();
            let mut h = [0u8; 32];
            for _ in 0..100_000 {
                h = mesh_ledger::merkle::node_hash(black_box(&h), &root);
            }
            black_box(h);
            start.elapsed().as_secs_f64() / 100_000.0 * 1e6
        }
    );
}
