use std::time::Duration;

use super::*;
use crate::events::Received;
use crate::identity::NodeKey;
use crate::storage::{MemoryStorage, StorageExt};

fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_750_000_000_000 + ms)
}

fn metrics(score_target: u8) -> HealthMetrics {
    // Battery alone sets the score: 100 (none), 85 (<20), 75 (<10); plus
    // latency for lower ones.
    match score_target {
        100 => HealthMetrics::default(),
        45 => HealthMetrics {
            latency_ms: Some(9000.0),
            battery_percent: Some(5.0),
            memory_percent: Some(92.0),
            ..Default::default()
        },
        55 => HealthMetrics {
            latency_ms: Some(9000.0),
            battery_percent: Some(5.0),
            ..Default::default()
        },
        50 => HealthMetrics {
            latency_ms: Some(9000.0),
            battery_percent: Some(5.0),
            cpu_percent: Some(95.0),
            ..Default::default()
        },
        _ => unreachable!(),
    }
}

#[test]
fn hysteresis_prevents_flapping_at_the_threshold() {
    let cfg = HealthConfig::for_interval(Duration::from_secs(1));
    let mut d = DeviceHealth::new();
    let mut all = vec![];
    // Scores 45, 50, 45, 50, 55, 50, 45: degraded once at the first 45;
    // 50 is not enough to recover (55 is); the second dip degrades again.
    for (i, s) in [45u8, 50, 45, 50, 55, 50, 45].into_iter().enumerate() {
        let m = metrics(s);
        assert_eq!(score(&m, &cfg.score), s);
        all.extend(d.on_heartbeat(at(i as u64 * 1000), &m, &cfg).unwrap());
    }
    assert_eq!(
        all,
        [
            HealthEvent::Online,
            HealthEvent::Degraded { score: 45 },
            HealthEvent::Recovered { score: 55 },
            HealthEvent::Degraded { score: 45 },
        ]
    );
    assert_eq!(d.status(), HealthStatus::Degraded);
}

#[test]
fn offline_and_online_are_reported_once_per_transition() {
    let cfg = HealthConfig::for_interval(Duration::from_secs(1));
    let mut d = DeviceHealth::new();
    for i in 0..10 {
        d.on_heartbeat(at(i * 1000), &metrics(100), &cfg).unwrap();
    }
    assert_eq!(d.tick(at(10_000), &cfg), None);
    let mut offline = 0;
    for t in (10_000..20_000).step_by(100) {
        if d.tick(at(t), &cfg) == Some(HealthEvent::Offline) {
            offline += 1;
        }
    }
    assert_eq!(offline, 1);
    assert_eq!(d.status(), HealthStatus::Offline);
    assert_eq!(
        d.on_heartbeat(at(20_000), &metrics(100), &cfg).unwrap(),
        [HealthEvent::Online]
    );
    assert_eq!(d.on_heartbeat(at(21_000), &metrics(100), &cfg).unwrap(), []);
}

#[test]
fn invalid_reports_count_as_errors_and_change_nothing_else() {
    let cfg = HealthConfig::default();
    let mut d = DeviceHealth::new();
    d.on_heartbeat(at(0), &metrics(100), &cfg).unwrap();
    let bad = HealthMetrics {
        battery_percent: Some(140.0),
        ..Default::default()
    };
    assert_eq!(
        d.on_heartbeat(at(1000), &bad, &cfg).unwrap_err().field,
        "battery_percent"
    );
    assert_eq!(d.status(), HealthStatus::Error);
    assert_eq!(d.score(), Some(100));
    let r = d.record(NodeKey::from_secret_bytes(&[1; 32]).node_id());
    assert_eq!((r.error_count, r.last_heartbeat), (1, at(0)));
    assert!(r.last_error.unwrap().contains("battery_percent"));
    d.on_heartbeat(at(2000), &metrics(100), &cfg).unwrap();
    assert_eq!(d.status(), HealthStatus::Healthy);
}

#[test]
fn monitor_publishes_events_and_persists_rows_in_one_batch() {
    let events = EventBus::new();
    let mut sub = events.subscribe("device.*", 64).unwrap();
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let mut mon = HealthMonitor::new(
        HealthConfig::for_interval(Duration::from_secs(1)),
        events,
        store.clone(),
    );
    let nodes: Vec<NodeId> = (1..=3)
        .map(|i| NodeKey::from_secret_bytes(&[i; 32]).node_id())
        .collect();
    for t in 0..5 {
        for n in &nodes {
            mon.ingest(*n, at(t * 1000), &metrics(100)).unwrap();
        }
    }
    mon.ingest(nodes[0], at(5000), &metrics(45)).unwrap();
    assert_eq!(mon.flush().unwrap(), 3);
    assert_eq!(mon.flush().unwrap(), 0);
    let rows: Vec<HealthRecord> = store.load_all().unwrap();
    assert_eq!(rows.len(), 3);
    // Nodes 2 and 3 stop; node 1 keeps going.
    for t in 6..20 {
        mon.ingest(nodes[0], at(t * 1000), &metrics(100)).unwrap();
        mon.tick(at(t * 1000 + 500));
    }
    let mut kinds = vec![];
    while let Some(Received::Event(e)) = sub.try_recv() {
        kinds.push(e.kind.clone());
    }
    assert_eq!(kinds.iter().filter(|k| *k == "device.online").count(), 3);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "device.health_degraded")
            .count(),
        1
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "device.health_recovered")
            .count(),
        1
    );
    assert_eq!(kinds.iter().filter(|k| *k == "device.offline").count(), 2);
    mon.flush().unwrap();
    let offline: HealthRecord = store.load(&nodes[1].to_string()).unwrap().unwrap();
    assert_eq!(offline.status, "offline");
    assert_eq!(
        mon.device(&nodes[0]).unwrap().status(),
        HealthStatus::Healthy
    );
}

#[test]
fn a_heartbeat_event_per_heartbeat_but_at_most_one_per_half_interval() {
    let events = EventBus::new();
    let mut beats = events.subscribe("device.heartbeat", 256).unwrap();
    let store: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    let mut mon = HealthMonitor::new(
        HealthConfig::for_interval(Duration::from_secs(1)),
        events,
        store,
    );
    let node = NodeKey::from_secret_bytes(&[9; 32]).node_id();
    let count = |sub: &mut crate::events::Subscription| {
        let mut n = 0;
        while let Some(Received::Event(e)) = sub.try_recv() {
            assert_eq!(e.data["node"], node.to_string());
            assert_eq!(e.data["score"], 100);
            n += 1;
        }
        n
    };
    // At the interval: every heartbeat is an event.
    for t in 0..5 {
        mon.ingest(node, at(t * 1000), &metrics(100)).unwrap();
    }
    assert_eq!(count(&mut beats), 5);
    // A device reporting every 10 ms for a second: two events (500 ms apart).
    for t in 0..100 {
        mon.ingest(node, at(5000 + t * 10), &metrics(100)).unwrap();
    }
    assert_eq!(count(&mut beats), 2);
}
