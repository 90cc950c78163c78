//! The event bus: everything observable is an [`Event`] with a dotted kind.
//!
//! Subscribers choose kinds by glob (`device.*`, `pairing.*`, `*`) and each
//! gets a bounded buffer. Publishing never waits for a subscriber: when a
//! buffer is full the event is dropped *for that subscriber* and a gap marker
//! takes its place, so the subscriber later receives
//! [`Received::Lagged`] exactly where events went missing, with their number.
//! In-process code and FFI callbacks subscribe the same way.
//!
//! ```
//! use mesh_core::clock::Timestamp;
//! use mesh_core::events::{EventBus, Received, kinds};
//!
//! let bus = EventBus::new();
//! let mut devices = bus.subscribe("device.*", 16)?;
//! bus.publish(kinds::DEVICE_ONLINE, Timestamp::from_millis(1), serde_json::json!({"node": "abc"}));
//! bus.publish(kinds::PAIRING_APPROVED, Timestamp::from_millis(2), serde_json::Value::Null);
//! match devices.try_recv() {
//!     Some(Received::Event(e)) => assert_eq!(e.kind, "device.online"),
//!     other => panic!("{other:?}"),
//! }
//! assert!(devices.try_recv().is_none()); // pairing.* was not routed here
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};

use serde::Serialize;
use tokio::sync::Notify;

use crate::clock::Timestamp;

/// Event kinds the SDK publishes (R-EVT2).
pub mod kinds {
    /// A device's heartbeats resumed.
    pub const DEVICE_ONLINE: &str = "device.online";
    /// A device missed its heartbeats.
    pub const DEVICE_OFFLINE: &str = "device.offline";
    /// A device's heartbeat was taken (`node`, `score`): one per
    /// heartbeat (at most one per half heartbeat interval and device), so
    /// live views (the dashboard) need no polling. Busy: subscribe to the
    /// kinds you need rather than `*` where that matters.
    pub const DEVICE_HEARTBEAT: &str = "device.heartbeat";
    /// A device's health score fell below the threshold.
    pub const DEVICE_HEALTH_DEGRADED: &str = "device.health_degraded";
    /// A device's health score recovered.
    pub const DEVICE_HEALTH_RECOVERED: &str = "device.health_recovered";
    /// A device asked to pair.
    pub const PAIRING_REQUEST_RECEIVED: &str = "pairing.request_received";
    /// A pairing request was approved.
    pub const PAIRING_APPROVED: &str = "pairing.approved";
    /// A pairing request was rejected.
    pub const PAIRING_REJECTED: &str = "pairing.rejected";
    /// A pairing request expired (or was voided by wrong codes).
    pub const PAIRING_EXPIRED: &str = "pairing.expired";
    /// A pairing request was refused before it was stored (`reason`:
    /// `rate_limited`, `too_many_pending`, `invalid_request`).
    pub const PAIRING_REFUSED: &str = "pairing.refused";
    /// A device was unpaired.
    pub const DEVICE_UNPAIRED: &str = "device.unpaired";
    /// A device's token was rotated.
    pub const DEVICE_TOKEN_ROTATED: &str = "device.token_rotated";
    /// A device was revoked.
    pub const DEVICE_REVOKED: &str = "device.revoked";
    /// A paired device became trusted after enough successful commands.
    pub const DEVICE_TRUSTED: &str = "device.trusted";
    /// A device's scopes were replaced.
    pub const DEVICE_SCOPES_SET: &str = "device.scopes_set";
    /// A worker published an event to its primary (`device`, `kind`,
    /// `data`; needs `events:write`).
    pub const DEVICE_EVENT: &str = "device.event";
    /// A peer joined: a paired device opened its session with the
    /// primary (`"scope": "device"`), or a member joined the mesh of nodes
    /// (`"scope": "mesh"`, with `name` and `rejoined`).
    pub const PEER_JOINED: &str = "peer.joined";
    /// A peer left: a device's session closed (`"scope": "device"`), or a
    /// mesh member left, failed or was blocked (`"scope": "mesh"`, with
    /// `name` and `reason`: `left`, `failed`, `blocked`).
    pub const PEER_LEFT: &str = "peer.left";
    /// A mesh member is suspected of having failed.
    pub const PEER_SUSPECT: &str = "peer.suspect";
    /// A suspected mesh member answered again.
    pub const PEER_ALIVE: &str = "peer.alive";
    /// A mesh member changed its name (`old`, `new`).
    pub const PEER_RENAMED: &str = "peer.renamed";
    /// A node was blocked from the mesh (`by`, `reason`).
    pub const PEER_BLOCKLISTED: &str = "peer.blocklisted";
    /// A node was unblocked (`by`).
    pub const PEER_UNBLOCKED: &str = "peer.unblocked";
    /// A mesh peer's score fell below the line; its connections closed.
    pub const PEER_DISCONNECTED: &str = "peer.disconnected";
    /// An action changed state.
    pub const ACTION_UPDATED: &str = "action.updated";
    /// A policy refused a command.
    pub const POLICY_VIOLATION: &str = "policy.violation";
    /// Discovery found a node, or found it again after it was lost or moved.
    pub const DISCOVERY_FOUND: &str = "discovery.found";
    /// Discovery saw a node withdraw its advertisement.
    pub const DISCOVERY_LOST: &str = "discovery.lost";
    /// A peer's sync frame or changes were refused (`node`, `reason`,
    /// `count`): malformed, forged, from the future, over a limit.
    pub const SYNC_REFUSED: &str = "sync.refused";
    /// Replicated changes could not be stored (`error`).
    pub const SYNC_STORE_FAILED: &str = "sync.store_failed";
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Dotted kind, e.g. `device.online`.
    pub kind: String,
    /// When it happened.
    pub at: Timestamp,
    /// Details (never secrets).
    pub data: serde_json::Value,
}

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// An event.
    Event(Arc<Event>),
    /// This many events for this subscriber were dropped here because its
    /// buffer was full.
    Lagged {
        /// Number of events missed.
        missed: u64,
    },
}

/// Errors of the event bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The subscription pattern is not a kind glob.
    #[error(
        "invalid event pattern {pattern:?}: use dotted lowercase kinds with `*` wildcards, e.g. \"device.*\""
    )]
    Pattern {
        /// The pattern.
        pattern: String,
    },
    /// A zero-sized buffer could never hold an event.
    #[error("a subscription buffer must hold at least one event")]
    ZeroCapacity,
}

/// A kind glob: `*` matches any run of characters, dots included.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KindPattern {
    parts: Vec<String>,
}

impl KindPattern {
    fn parse(pattern: &str) -> Result<Self, EventError> {
        let ok = !pattern.is_empty()
            && pattern.len() <= 128
            && pattern
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-*".contains(&b));
        if !ok {
            return Err(EventError::Pattern {
                pattern: pattern.to_owned(),
            });
        }
        Ok(KindPattern {
            parts: pattern.split('*').map(str::to_owned).collect(),
        })
    }

    fn matches(&self, kind: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(x) => x,
            None => return false,
        };
        let Some(mut remaining) = kind.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty(); // no `*`: exact match
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(i) => remaining = &remaining[i + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

enum Slot {
    Event(Arc<Event>),
    Gap(u64),
}

#[derive(Default)]
struct Buffer {
    slots: VecDeque<Slot>,
    /// Events in `slots` (gap markers not counted).
    events: usize,
}

/// One subscriber's bounded buffer: at most `capacity` events, and gap
/// markers between them (never two in a row, so at most `capacity + 1`).
struct Queue {
    items: Mutex<Buffer>,
    capacity: usize,
    notify: Notify,
    closed: AtomicBool,
    events_dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    /// Never blocks beyond the queue's own short lock.
    fn push(&self, event: &Arc<Event>) {
        {
            let mut buf = lock(&self.items);
            if buf.events < self.capacity {
                // After a gap marker, new events queue behind it: order is kept.
                buf.slots.push_back(Slot::Event(event.clone()));
                buf.events += 1;
            } else {
                match buf.slots.back_mut() {
                    Some(Slot::Gap(n)) => *n += 1,
                    _ => buf.slots.push_back(Slot::Gap(1)),
                }
                self.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Received> {
        let mut buf = lock(&self.items);
        buf.slots.pop_front().map(|s| match s {
            Slot::Event(e) => {
                buf.events -= 1;
                Received::Event(e)
            }
            Slot::Gap(missed) => Received::Lagged { missed },
        })
    }
}

struct Subscriber {
    id: u64,
    pattern: KindPattern,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Inner {
    subscribers: RwLock<Vec<Subscriber>>,
    next_id: AtomicU64,
}

/// The bus. Cheap to clone; clones share subscribers.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.subscriber_count())
            .finish()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes to kinds matching `pattern`, buffering up to `capacity` events.
    pub fn subscribe(&self, pattern: &str, capacity: usize) -> Result<Subscription, EventError> {
        if capacity == 0 {
            return Err(EventError::ZeroCapacity);
        }
        let pattern = KindPattern::parse(pattern)?;
        let queue = Arc::new(Queue {
            items: Mutex::new(Buffer {
                slots: VecDeque::with_capacity(capacity.min(1024) + 1),
                events: 0,
            }),
            capacity,
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            events_dropped: AtomicU64::new(0),
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .subscribers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Subscriber {
                id,
                pattern,
                queue: queue.clone(),
            });
        Ok(Subscription {
            id,
            queue,
            bus: Arc::downgrade(&self.inner),
        })
    }

    /// Publishes an event to every matching subscriber; returns how many it
    /// reached (a full buffer counts as reached, with a gap recorded).
    pub fn publish(&self, kind: &str, at: Timestamp, data: serde_json::Value) -> usize {
        let event = Arc::new(Event {
            kind: kind.to_owned(),
            at,
            data,
        });
        let subs = self
            .inner
            .subscribers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut reached = 0;
        for s in subs.iter().filter(|s| s.pattern.matches(kind)) {
            s.queue.push(&event);
            reached += 1;
        }
        reached
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.inner
            .subscribers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A live subscription. Dropping it (or [`Subscription::close`]) unsubscribes.
pub struct Subscription {
    id: u64,
    queue: Arc<Queue>,
    bus: Weak<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event or lag notice, waiting if none is buffered. `None` once
    /// the bus is gone and the buffer is empty.
    pub async fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(r) = self.queue.pop() {
                return Some(r);
            }
            if self.queue.closed.load(Ordering::Acquire) || self.bus.strong_count() == 0 {
                return None;
            }
            // notify_one stores a permit when nobody waits, so a push between
            // the pop above and this await is not lost.
            self.queue.notify.notified().await;
        }
    }

    /// The next buffered event or lag notice, without waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        self.queue.pop()
    }

    /// Events dropped for this subscriber so far.
    pub fn dropped(&self) -> u64 {
        self.queue.events_dropped.load(Ordering::Relaxed)
    }

    /// Unsubscribes now (also done on drop).
    pub fn close(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        if let Some(inner) = self.bus.upgrade() {
            inner
                .subscribers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|s| s.id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn kinds_of(sub: &mut Subscription) -> Vec<String> {
        let mut out = vec![];
        while let Some(r) = sub.try_recv() {
            out.push(match r {
                Received::Event(e) => e.kind.clone(),
                Received::Lagged { missed } => format!("lagged:{missed}"),
            });
        }
        out
    }

    #[test]
    fn glob_routing() {
        let bus = EventBus::new();
        let mut device = bus.subscribe("device.*", 8).unwrap();
        let mut health = bus.subscribe("device.health_*", 8).unwrap();
        let mut all = bus.subscribe("*", 8).unwrap();
        let mut exact = bus.subscribe("pairing.approved", 8).unwrap();
        let mut mid = bus.subscribe("*.revoked", 8).unwrap();
        for k in [
            "device.online",
            "device.health_degraded",
            "pairing.approved",
            "pairing.rejected",
            "device.revoked",
        ] {
            bus.publish(k, ts(1), serde_json::Value::Null);
        }
        assert_eq!(
            kinds_of(&mut device),
            ["device.online", "device.health_degraded", "device.revoked"]
        );
        assert_eq!(kinds_of(&mut health), ["device.health_degraded"]);
        assert_eq!(kinds_of(&mut all).len(), 5);
        assert_eq!(kinds_of(&mut exact), ["pairing.approved"]);
        assert_eq!(kinds_of(&mut mid), ["device.revoked"]);
    }

    #[test]
    fn pattern_matching_edges() {
        let m = |p: &str, k: &str| KindPattern::parse(p).unwrap().matches(k);
        assert!(m("device.*", "device.a.b"));
        assert!(!m("device.*", "device"));
        assert!(m("device*", "device"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "a.x.b.y.c"));
        assert!(!m("a*b*c", "a.c.b"));
        assert!(!m("ab*ba", "aba"));
        assert!(m("**", ""));
        for bad in ["", "Device.*", "device .x", "dévice", &"a".repeat(200)] {
            assert!(
                matches!(
                    EventBus::new().subscribe(bad, 1),
                    Err(EventError::Pattern { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            EventBus::new().subscribe("x", 0).unwrap_err(),
            EventError::ZeroCapacity
        );
    }

    #[test]
    fn lag_is_reported_where_events_were_lost() {
        let bus = EventBus::new();
        let mut sub = bus.subscribe("*", 2).unwrap();
        for i in 0..5 {
            bus.publish(&format!("e.{i}"), ts(i), serde_json::Value::Null);
        }
        assert_eq!(sub.dropped(), 3);
        // Read one: room for one more, which queues behind the gap marker.
        assert!(matches!(sub.try_recv(), Some(Received::Event(e)) if e.kind == "e.0"));
        bus.publish("e.5", ts(5), serde_json::Value::Null);
        bus.publish("e.6", ts(6), serde_json::Value::Null); // full again: lost
        assert_eq!(kinds_of(&mut sub), ["e.1", "lagged:3", "e.5", "lagged:1"]);
        bus.publish("e.7", ts(7), serde_json::Value::Null);
        assert_eq!(kinds_of(&mut sub), ["e.7"]);
        assert_eq!(sub.dropped(), 4);
        // A gap in the middle does not count as an event: two fit again.
        bus.publish("e.8", ts(8), serde_json::Value::Null);
        bus.publish("e.9", ts(9), serde_json::Value::Null);
        bus.publish("e.10", ts(10), serde_json::Value::Null);
        bus.publish("e.11", ts(11), serde_json::Value::Null);
        assert!(matches!(sub.try_recv(), Some(Received::Event(e)) if e.kind == "e.8"));
        bus.publish("e.12", ts(12), serde_json::Value::Null);
        bus.publish("e.13", ts(13), serde_json::Value::Null);
        assert_eq!(kinds_of(&mut sub), ["e.9", "lagged:2", "e.12", "lagged:1"]);
    }

    #[test]
    fn a_stalled_subscriber_never_stalls_publishing() {
        let bus = EventBus::new();
        let stalled = bus.subscribe("*", 4).unwrap(); // never read
        let mut live = bus.subscribe("*", 200_000).unwrap();
        for i in 0..100_000u64 {
            assert_eq!(bus.publish("tick.x", ts(i), serde_json::Value::Null), 2);
        }
        assert_eq!(stalled.dropped(), 100_000 - 4);
        let mut n = 0;
        while let Some(Received::Event(_)) = live.try_recv() {
            n += 1;
        }
        assert_eq!(n, 100_000);
        // The stalled buffer holds 4 events and one gap marker, not 100 000.
        assert_eq!(lock(&stalled.queue.items).slots.len(), 5);
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let bus = EventBus::new();
        let a = bus.subscribe("*", 1).unwrap();
        let b = bus.subscribe("*", 1).unwrap();
        assert_eq!(bus.subscriber_count(), 2);
        drop(a);
        b.close();
        assert_eq!(bus.subscriber_count(), 0);
        assert_eq!(bus.publish("x", ts(0), serde_json::Value::Null), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_publishers_on_other_tasks() {
        let bus = EventBus::new();
        let mut sub = bus.subscribe("job.*", 4).unwrap();
        let publisher = bus.clone();
        let task = tokio::spawn(async move {
            for i in 0..3 {
                tokio::task::yield_now().await;
                publisher.publish("job.done", ts(i), serde_json::json!({"i": i}));
            }
        });
        for i in 0..3 {
            match sub.recv().await {
                Some(Received::Event(e)) => assert_eq!(e.data["i"], i),
                other => panic!("{other:?}"),
            }
        }
        task.await.unwrap();
        drop(bus);
        assert_eq!(sub.recv().await, None);
    }
}
