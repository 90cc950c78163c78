//! Refusing replays: seen message ids plus a clock-skew window.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::{MessageId, ReplayError, SignedEnvelope};
use crate::clock::Timestamp;
use crate::identity::NodeId;

/// Settings of a [`ReplayGuard`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplayConfig {
    /// How far a message's timestamp may be from the receiver's clock, either way.
    /// Default: 5 minutes.
    pub max_skew: Duration,
    /// How many ids are remembered at most. Default: 65 536.
    pub capacity: usize,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_skew: Duration::from_secs(300),
            capacity: 65_536,
        }
    }
}

impl ReplayConfig {
    /// Sets the allowed clock skew.
    pub fn max_skew(mut self, skew: Duration) -> Self {
        self.max_skew = skew;
        self
    }

    /// Sets the number of remembered ids (at least 1).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }
}

type Key = (NodeId, MessageId);

/// Accepts each `(sender, message id)` once, and only with a timestamp within
/// `max_skew` of now.
///
/// An id only needs remembering while its timestamp is inside the window: once
/// it falls out, the timestamp check refuses the message anyway. So memory is
/// bounded by the traffic of one window, and by `capacity` on top. When the
/// capacity is reached the oldest id is forgotten and the acceptance floor
/// rises to just past its timestamp, so a forgotten id can never be accepted
/// again: under a flood the guard refuses old messages rather than admitting
/// replays. Sans-IO: time is passed in.
#[derive(Debug)]
pub struct ReplayGuard {
    config: ReplayConfig,
    seen: HashSet<Key>,
    by_time: BTreeSet<(Timestamp, Key)>,
    /// Messages older than this are refused (raised by capacity evictions).
    floor: Timestamp,
}

impl ReplayGuard {
    /// An empty guard.
    pub fn new(config: ReplayConfig) -> Self {
        ReplayGuard {
            config,
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
            floor: Timestamp::EPOCH,
        }
    }

    /// Accepts `envelope` at time `now`, or says why not. Only verified
    /// envelopes are admitted, so nobody can block another sender's ids.
    pub fn admit(&mut self, envelope: &SignedEnvelope, now: Timestamp) -> Result<(), ReplayError> {
        let env = envelope.envelope();
        let oldest = now.saturating_sub(self.config.max_skew).max(self.floor);
        let newest = now.saturating_add(self.config.max_skew);
        if env.timestamp < oldest {
            return Err(ReplayError::Stale {
                timestamp: env.timestamp,
                oldest_accepted: oldest,
            });
        }
        if env.timestamp > newest {
            return Err(ReplayError::FromFuture {
                timestamp: env.timestamp,
                newest_accepted: newest,
            });
        }
        self.expire(now.saturating_sub(self.config.max_skew));
        let key = (env.from, env.id);
        if self.seen.contains(&key) {
            return Err(ReplayError::Replayed {
                from: env.from,
                id: env.id,
            });
        }
        while self.seen.len() >= self.config.capacity {
            let Some((ts, old)) = self.by_time.pop_first() else {
                break;
            };
            self.seen.remove(&old);
            self.floor = self
                .floor
                .max(Timestamp::from_millis(ts.as_millis().saturating_add(1)));
        }
        if env.timestamp < self.floor {
            // The eviction just above raised the floor past this message.
            return Err(ReplayError::Stale {
                timestamp: env.timestamp,
                oldest_accepted: self.floor,
            });
        }
        self.seen.insert(key);
        self.by_time.insert((env.timestamp, key));
        Ok(())
    }

    /// Forgets ids whose timestamps are before `cutoff`.
    fn expire(&mut self, cutoff: Timestamp) {
        while let Some((ts, key)) = self.by_time.first().copied() {
            if ts >= cutoff {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&key);
        }
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}
