//! Device health: heartbeats, the 0–100 score, liveness, health events (R-HEALTH).
//!
//! * [`validate`] refuses out-of-range metrics (battery 140 %, negative
//!   latency, NaN) with a typed [`MetricError`]; nothing is clamped.
//! * [`score`] applies the table of R-HEALTH2 ([`ScoreConfig`]).
//! * [`DeviceHealth`] is one device's sans-IO state: score with hysteresis
//!   (degraded below 50, recovered at 55 or above), a [`PhiDetector`] for
//!   liveness, and the events of each transition, once.
//! * [`HealthMonitor`] keeps every device's state, publishes the events on the
//!   bus and persists changed health rows in one batch per [`HealthMonitor::flush`].
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::clock::Timestamp;
//! use mesh_core::health::{DeviceHealth, HealthConfig, HealthEvent, HealthStatus};
//! use mesh_core::wire::HealthMetrics;
//!
//! let config = HealthConfig::for_interval(Duration::from_secs(30));
//! let mut device = DeviceHealth::new();
//! let report = HealthMetrics { latency_ms: Some(2000.0), battery_percent: Some(30.0), ..Default::default() };
//! let events = device.on_heartbeat(Timestamp::from_millis(0), &report, &config)?;
//! assert_eq!(events, [HealthEvent::Online]);
//! assert_eq!((device.score(), device.status()), (Some(90), HealthStatus::Healthy));
//! // No heartbeat for three intervals (the fixed rule, before enough samples):
//! assert_eq!(device.tick(Timestamp::from_millis(91_000), &config), Some(HealthEvent::Offline));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod detector;
mod score;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

pub use detector::{DetectorConfig, PhiDetector};
pub use score::{MetricError, ScoreConfig, score, validate};

use crate::clock::Timestamp;
use crate::events::{EventBus, kinds};
use crate::identity::NodeId;
use crate::storage::records::{HealthRecord, HealthSample};
use crate::storage::{Record, Storage, StorageError};
use crate::wire::HealthMetrics;

/// A device's health status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Alive and scoring well.
    Healthy,
    /// Alive, score below the threshold.
    Degraded,
    /// Heartbeats stopped.
    Offline,
    /// The last report was invalid.
    Error,
}

impl HealthStatus {
    /// `healthy`, `degraded`, `offline` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Offline => "offline",
            HealthStatus::Error => "error",
        }
    }

    /// The status of a single report with no history: degraded below `threshold`.
    pub fn of_score(score: u8, threshold: u8) -> Self {
        if score < threshold {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        }
    }
}

/// Health settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HealthConfig {
    /// The score table.
    pub score: ScoreConfig,
    /// Degraded when the score falls below this. Default 50.
    pub degraded_below: u8,
    /// Recovered when a degraded device scores this or more. Default 55.
    pub recovered_at: u8,
    /// Liveness.
    pub detector: DetectorConfig,
}

impl HealthConfig {
    /// Defaults for devices that send a heartbeat every `interval` (30 s by default).
    pub fn for_interval(interval: Duration) -> Self {
        HealthConfig {
            score: ScoreConfig::default(),
            degraded_below: 50,
            recovered_at: 55,
            detector: DetectorConfig::for_interval(interval),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self::for_interval(Duration::from_secs(30))
    }
}

/// A health transition; each is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    /// First heartbeat, or the first after being offline.
    Online,
    /// Heartbeats stopped.
    Offline,
    /// The score fell below the threshold.
    Degraded {
        /// The score.
        score: u8,
    },
    /// The score recovered.
    Recovered {
        /// The score.
        score: u8,
    },
}

impl HealthEvent {
    /// The event kind on the bus.
    pub fn kind(&self) -> &'static str {
        match self {
            HealthEvent::Online => kinds::DEVICE_ONLINE,
            HealthEvent::Offline => kinds::DEVICE_OFFLINE,
            HealthEvent::Degraded { .. } => kinds::DEVICE_HEALTH_DEGRADED,
            HealthEvent::Recovered { .. } => kinds::DEVICE_HEALTH_RECOVERED,
        }
    }
}

/// One device's health state machine.
#[derive(Debug, Clone, Default)]
pub struct DeviceHealth {
    detector: PhiDetector,
    online: bool,
    degraded: bool,
    invalid_last: bool,
    score: Option<u8>,
    error_count: u64,
    last_error: Option<(String, Timestamp)>,
    /// When this device's last `device.heartbeat` event went out.
    beat_published: Option<Timestamp>,
}

impl DeviceHealth {
    /// A device not heard from yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a heartbeat. An invalid report is counted as an error (status
    /// `error` until a valid one arrives) and changes nothing else.
    pub fn on_heartbeat(
        &mut self,
        now: Timestamp,
        metrics: &HealthMetrics,
        config: &HealthConfig,
    ) -> Result<Vec<HealthEvent>, MetricError> {
        if let Err(e) = validate(metrics) {
            self.error_count += 1;
            self.last_error = Some((e.to_string(), now));
            self.invalid_last = true;
            return Err(e);
        }
        self.invalid_last = false;
        let mut events = Vec::new();
        self.detector.heartbeat(now, &config.detector);
        if !self.online {
            self.online = true;
            events.push(HealthEvent::Online);
        }
        let s = score(metrics, &config.score);
        self.score = Some(s);
        if !self.degraded && s < config.degraded_below {
            self.degraded = true;
            events.push(HealthEvent::Degraded { score: s });
        } else if self.degraded && s >= config.recovered_at {
            self.degraded = false;
            events.push(HealthEvent::Recovered { score: s });
        }
        Ok(events)
    }

    /// Checks liveness at `now`; returns `Offline` once when heartbeats stopped.
    pub fn tick(&mut self, now: Timestamp, config: &HealthConfig) -> Option<HealthEvent> {
        if self.online && !self.detector.is_available(now, &config.detector) {
            self.online = false;
            return Some(HealthEvent::Offline);
        }
        None
    }

    /// The status now (as of the last heartbeat or tick).
    pub fn status(&self) -> HealthStatus {
        if self.invalid_last {
            HealthStatus::Error
        } else if !self.online {
            HealthStatus::Offline
        } else if self.degraded {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        }
    }

    /// The last score.
    pub fn score(&self) -> Option<u8> {
        self.score
    }

    /// When the last heartbeat came.
    pub fn last_heartbeat(&self) -> Option<Timestamp> {
        self.detector.last_heartbeat()
    }

    /// The suspicion level at `now`.
    pub fn phi(&self, now: Timestamp, config: &HealthConfig) -> f64 {
        self.detector.phi(now, &config.detector)
    }

    /// The row persisted for this device.
    pub fn record(&self, node: NodeId) -> HealthRecord {
        HealthRecord {
            node,
            last_heartbeat: self.detector.last_heartbeat().unwrap_or(Timestamp::EPOCH),
            score: self.score.unwrap_or(0),
            status: self.status().as_str().to_owned(),
            error_count: self.error_count,
            last_error: self.last_error.as_ref().map(|(m, _)| m.clone()),
            last_error_at: self.last_error.as_ref().map(|(_, t)| *t),
        }
    }
}

/// Health of every device: events on the bus, rows persisted in batches.
#[derive(Debug)]
pub struct HealthMonitor {
    config: HealthConfig,
    devices: HashMap<NodeId, DeviceHealth>,
    dirty: HashSet<NodeId>,
    /// The newest sample of each device since the last flush (one row
    /// per device and slot: see [`HealthSample`]).
    samples: HashMap<NodeId, HealthSample>,
    events: EventBus,
    store: Arc<dyn Storage>,
}

impl HealthMonitor {
    /// A monitor publishing on `events` and persisting into `store`.
    pub fn new(config: HealthConfig, events: EventBus, store: Arc<dyn Storage>) -> Self {
        HealthMonitor {
            config,
            devices: HashMap::new(),
            dirty: HashSet::new(),
            samples: HashMap::new(),
            events,
            store,
        }
    }

    fn publish(&self, node: NodeId, now: Timestamp, event: HealthEvent) {
        let score = match event {
            HealthEvent::Degraded { score } | HealthEvent::Recovered { score } => Some(score),
            _ => None,
        };
        self.events.publish(
            event.kind(),
            now,
            json!({ "node": node.to_string(), "score": score }),
        );
    }

    /// Ingests a heartbeat from `node` (already authenticated by the caller).
    pub fn ingest(
        &mut self,
        node: NodeId,
        now: Timestamp,
        metrics: &HealthMetrics,
    ) -> Result<(), MetricError> {
        let device = self.devices.entry(node).or_default();
        self.dirty.insert(node);
        let events = device.on_heartbeat(now, metrics, &self.config)?;
        if let Some(score) = device.score() {
            self.samples.insert(
                node,
                HealthSample {
                    node,
                    at: now,
                    score,
                    latency_ms: metrics.latency_ms,
                    battery_percent: metrics.battery_percent,
                    memory_percent: metrics.memory_percent,
                },
            );
        }
        let score = device.score();
        // One heartbeat event per half interval at most: a device that
        // beats faster (a page calling `devices.update_health` in a loop)
        // cannot flood every subscriber.
        let min_gap = (self.config.detector.expected_interval_ms / 2.0) as u64;
        let beat_due = device
            .beat_published
            .is_none_or(|t| now.as_millis().saturating_sub(t.as_millis()) >= min_gap);
        if beat_due {
            device.beat_published = Some(now);
        }
        for e in events {
            self.publish(node, now, e);
        }
        if beat_due {
            self.events.publish(
                kinds::DEVICE_HEARTBEAT,
                now,
                json!({ "node": node.to_string(), "score": score }),
            );
        }
        Ok(())
    }

    /// Checks every device's liveness; publishes `device.offline` transitions.
    pub fn tick(&mut self, now: Timestamp) {
        let mut offline = Vec::new();
        for (node, device) in &mut self.devices {
            if let Some(e) = device.tick(now, &self.config) {
                offline.push((*node, e));
            }
        }
        for (node, e) in offline {
            self.dirty.insert(node);
            self.publish(node, now, e);
        }
    }

    /// One device's state.
    pub fn device(&self, node: &NodeId) -> Option<&DeviceHealth> {
        self.devices.get(node)
    }

    /// The changed health rows as one batch, marked clean; write it with
    /// [`Storage::apply`] outside any lock around the monitor (and give it
    /// back with [`HealthMonitor::unflushed`] if that fails).
    pub fn take_dirty(
        &mut self,
    ) -> Result<(Vec<crate::storage::Write>, Vec<NodeId>), StorageError> {
        let nodes: Vec<NodeId> = self.dirty.drain().collect();
        // A lost sample is not worth a retry: the next heartbeat brings one.
        let samples: Vec<HealthSample> = self.samples.drain().map(|(_, s)| s).collect();
        let batch = nodes
            .iter()
            .filter_map(|n| self.devices.get(n).map(|d| d.record(*n).put()))
            .chain(samples.iter().map(Record::put))
            .collect::<Result<Vec<_>, _>>();
        match batch {
            Ok(b) => Ok((b, nodes)),
            Err(e) => {
                self.dirty.extend(nodes);
                Err(e)
            }
        }
    }

    /// Marks `nodes` changed again (their write failed).
    pub fn unflushed(&mut self, nodes: Vec<NodeId>) {
        self.dirty.extend(nodes);
    }

    /// Writes every changed health row in one batch; returns how many.
    pub fn flush(&mut self) -> Result<usize, StorageError> {
        if self.dirty.is_empty() {
            return Ok(0);
        }
        let batch = self
            .dirty
            .iter()
            .filter_map(|n| self.devices.get(n).map(|d| d.record(*n).put()))
            .collect::<Result<Vec<_>, _>>()?;
        self.store.apply(&batch)?;
        self.dirty.clear();
        Ok(batch.len())
    }
}

#[cfg(test)]
mod tests;
