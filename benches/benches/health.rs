//! Heartbeat ingestion: validate, score, update the phi detector, publish
//! events, and persist the health rows to SQLite in batches — against the
//! same rows written to SQLite alone (baseline, same run).
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::clock::Timestamp;
use mesh_core::events::EventBus;
use mesh_core::health::{DeviceHealth, HealthConfig, HealthMonitor};
use mesh_core::identity::{NodeId, NodeKey};
use mesh_core::storage::{Record, SqliteStorage, Storage};
use mesh_core::wire::{HealthMetrics, Thermal};

const DEVICES: usize = 1000;
/// Heartbeats per batch: one flush per round over all devices.
const BATCH: usize = DEVICES;

fn nodes() -> Vec<NodeId> {
    (0..DEVICES)
        .map(|i| {
            let mut seed = [3u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            NodeKey::from_secret_bytes(&seed).node_id()
        })
        .collect()
}

fn report(i: usize) -> HealthMetrics {
    HealthMetrics {
        latency_ms: Some(20.0 + (i % 50) as f64),
        battery_percent: Some((i % 100) as f64),
        charging: Some(i.is_multiple_of(3)),
        memory_percent: Some(40.0 + (i % 60) as f64),
        cpu_percent: Some((i % 100) as f64),
        disk_free_gb: Some(100.0),
        thermal: Some(Thermal::Nominal),
        ..Default::default()
    }
}

fn ingest(c: &mut Criterion) {
    let nodes = nodes();
    let mut g = c.benchmark_group("heartbeat_ingest");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Storage> =
        Arc::new(SqliteStorage::open(dir.path().join("mesh.db")).unwrap());
    let events = EventBus::new();
    let _listener = events.subscribe("device.*", 1024).unwrap();
    let mut monitor = HealthMonitor::new(
        HealthConfig::for_interval(Duration::from_secs(1)),
        events,
        store,
    );
    let mut t = 0u64;
    g.bench_function("monitor_sqlite_1000_devices", |b| {
        b.iter(|| {
            t += 1000;
            for (i, n) in nodes.iter().enumerate() {
                monitor
                    .ingest(*n, Timestamp::from_millis(t), &report(i + t as usize))
                    .unwrap();
            }
            monitor.flush().unwrap();
        })
    });

    // Baseline: the same number of health rows, written in one batch, no
    // scoring, no detector, no events.
    let dir2 = tempfile::tempdir().unwrap();
    let raw = SqliteStorage::open(dir2.path().join("mesh.db")).unwrap();
    let rows: Vec<_> = nodes
        .iter()
        .map(|n| {
            let mut d = DeviceHealth::new();
            d.on_heartbeat(
                Timestamp::from_millis(1),
                &report(0),
                &HealthConfig::default(),
            )
            .unwrap();
            d.record(*n)
        })
        .collect();
    g.bench_function("sqlite_rows_only", |b| {
        b.iter(|| {
            let batch: Vec<_> = rows.iter().map(|r| r.put().unwrap()).collect();
            raw.apply(&batch).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
