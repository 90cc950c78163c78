//! Registry and pairing on the embedded SQLite store.
//!
//! * `list_devices/{1000,10000}`: `Registry::list` (SELECT + decode of every
//!   record, including dropping the result), against the raw `SELECT key, body` of the same rows in the same run
//!   (baseline: what SQLite itself costs).
//! * `token_check`: `Registry::check` on SQLite and in memory, against the
//!   bare hash-and-compare it performs (baseline).
//! * `pairing_flow`: a whole pairing (request, approve with the code,
//!   challenge, confirm, grant) on SQLite with FULL sync and in memory,
//!   against the cryptography alone (two SPAKE2 runs, four MACs, one seal).
#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::clock::Timestamp;
use mesh_core::events::EventBus;
use mesh_core::identity::NodeKey;
use mesh_core::pairing::{DeviceInfo, DevicePairing, DeviceStep, PairingConfig, PrimaryPairing};
use mesh_core::registry::{DeviceToken, NewDevice, Registry, scopes};
use mesh_core::storage::{MemoryStorage, SqliteStorage, Storage};
use mesh_core::wire::Platform;

const T0: Timestamp = Timestamp::from_millis(1_750_000_000_000);

/// A registry over `store` holding `n` paired devices; returns one device's id and token.
fn fill(store: Arc<dyn Storage>, n: usize) -> (Registry, mesh_core::identity::NodeId, DeviceToken) {
    let registry = Registry::new(store.clone(), EventBus::new());
    let mut batch = Vec::with_capacity(n);
    let mut probe = None;
    for i in 0..n {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        seed[31] = 7;
        let node = NodeKey::from_secret_bytes(&seed).node_id();
        let token = DeviceToken::generate();
        let (mut record, _, writes) = registry
            .prepare_device(
                NewDevice {
                    node,
                    device_id: format!("hw-{i}"),
                    name: format!("Device {i}"),
                    platform: Platform::Android,
                },
                T0,
            )
            .unwrap();
        record.token_hash = token.hash();
        batch.push(mesh_core::storage::Record::put(&record).unwrap());
        batch.push(writes[1].clone()); // the device_ids index entry
        if i == n / 2 {
            probe = Some((node, token));
        }
    }
    store.apply(&batch).unwrap();
    let (node, token) = probe.unwrap();
    (registry, node, token)
}

fn list_devices(c: &mut Criterion) {
    let mut g = c.benchmark_group("list_devices");
    g.sample_size(30);
    for n in [1_000usize, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.db");
        let store: Arc<dyn Storage> = Arc::new(SqliteStorage::open(&path).unwrap());
        let (registry, _, _) = fill(store, n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("registry_sqlite", n), |b| {
            b.iter(|| assert_eq!(registry.list().unwrap().len(), n))
        });
        // The same decoding over the memory backend: what is not SQLite.
        let (in_memory, _, _) = fill(Arc::new(MemoryStorage::new()), n);
        g.bench_function(BenchmarkId::new("registry_memory", n), |b| {
            b.iter(|| assert_eq!(in_memory.list().unwrap().len(), n))
        });
        // Baseline: the same rows straight from SQLite, no decoding.
        let conn = rusqlite::Connection::open(&path).unwrap();
        // Same page cache as SqliteStorage, so the baseline is like for like.
        conn.pragma_update(None, "cache_size", -8192).unwrap();
        g.bench_function(BenchmarkId::new("raw_select", n), |b| {
            b.iter(|| {
                let mut stmt = conn
                    .prepare_cached("SELECT key, body FROM devices ORDER BY key")
                    .unwrap();
                let rows: Vec<(String, Vec<u8>)> = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                assert_eq!(rows.len(), n);
            })
        });
    }
    g.finish();
}

fn token_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("token_check");
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn Storage> =
        Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
    for (name, store) in [
        ("sqlite_1000_devices", sqlite),
        (
            "memory_1000_devices",
            Arc::new(MemoryStorage::new()) as Arc<dyn Storage>,
        ),
    ] {
        let (registry, node, token) = fill(store, 1000);
        g.bench_function(name, |b| {
            b.iter(|| {
                registry
                    .check(black_box(&node), token.as_bytes(), scopes::COMMANDS_RUN)
                    .unwrap()
            })
        });
    }
    // Baseline: the hash and the constant-time comparison alone.
    let token = DeviceToken::generate();
    let stored = token.hash();
    g.bench_function("hash_and_compare_only", |b| {
        b.iter(|| {
            let presented = DeviceToken::from_bytes(*black_box(token.as_bytes())).hash();
            assert!(bool::from(subtle::ConstantTimeEq::ct_eq(
                &presented[..],
                &stored[..]
            )));
        })
    });
    g.finish();
}

/// One full pairing; returns when the device holds its grant.
fn pair_once(primary_key: &NodeKey, primary: &PrimaryPairing, seq: u64) {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&seq.to_le_bytes());
    seed[31] = 9;
    let dev_key = NodeKey::from_secret_bytes(&seed);
    let (mut dev, request) = DevicePairing::start(
        dev_key.node_id(),
        primary_key.node_id(),
        DeviceInfo {
            device_id: format!("bench-{seq}"),
            name: "Bench".into(),
            platform: Platform::Desktop,
        },
        T0,
        &PairingConfig::default(),
    );
    let rid = primary
        .on_request(dev_key.node_id(), request, T0)
        .unwrap()
        .request_id;
    let (_, challenge) = primary.approve(&rid, dev.code(), T0).unwrap();
    let DeviceStep::Send(confirm) = dev
        .handle(primary_key.node_id(), challenge, &dev_key, T0)
        .unwrap()
    else {
        panic!("code mismatch")
    };
    let paired = primary.on_message(dev_key.node_id(), confirm, T0).unwrap();
    let DeviceStep::Paired(_) = dev
        .handle(primary_key.node_id(), paired.reply, &dev_key, T0)
        .unwrap()
    else {
        panic!("not paired")
    };
}

fn pairing_flow(c: &mut Criterion) {
    let mut g = c.benchmark_group("pairing_flow");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    let primary_key = NodeKey::from_secret_bytes(&[1; 32]);
    let dir = tempfile::tempdir().unwrap();
    let sqlite: Arc<dyn Storage> =
        Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
    for (name, store) in [
        ("sqlite", sqlite),
        ("memory", Arc::new(MemoryStorage::new()) as Arc<dyn Storage>),
    ] {
        let events = EventBus::new();
        let registry = Registry::new(store.clone(), events.clone());
        let primary = PrimaryPairing::new(
            primary_key.node_id(),
            store,
            registry,
            events,
            PairingConfig::default(),
        );
        let mut seq = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                seq += 1;
                pair_once(&primary_key, &primary, seq);
            })
        });
    }
    // Baseline: the cryptography of one pairing without any bookkeeping.
    g.bench_function("crypto_only", |b| {
        use spake2::{Ed25519Group, Identity, Password, Spake2};
        let pw = Password::new(b"123456");
        let (ia, ib) = (Identity::new(b"a"), Identity::new(b"b"));
        let device = NodeKey::from_secret_bytes(&[5; 32]);
        b.iter_batched(
            || (),
            |()| {
                let (a, ma) = Spake2::<Ed25519Group>::start_a(&pw, &ia, &ib);
                let (bb, mb) = Spake2::<Ed25519Group>::start_b(&pw, &ia, &ib);
                let ka = a.finish(&mb).unwrap();
                let kb = bb.finish(&ma).unwrap();
                assert_eq!(ka, kb);
                mesh_core::crypto::seal(&device.node_id(), b"", &[0u8; 64]).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, list_devices, token_check, pairing_flow);
criterion_main!(benches);
