//! Hybrid logical clocks (Kulkarni et al., 2014): a stamp is the wall
//! clock in milliseconds, a counter for events within one millisecond (or
//! while the wall clock lags a stamp already seen), and the node that made
//! it. Stamps of one node only grow, whatever its wall clock does; a stamp
//! received is at most the allowed skew ahead of the receiver's clock, or
//! it is refused, so one node with a wrong clock cannot drag every other
//! node's clock (and every key it writes) into the future.

use std::cmp::Ordering;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::identity::NodeId;

/// How far ahead of the receiver's clock a stamp may be, by default.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(60);

/// One stamp: ordered by time, then counter, then node id (so two writes
/// never tie).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Wall-clock part, milliseconds since the Unix epoch.
    pub ms: u64,
    /// Logical part.
    pub counter: u32,
    /// The node that made the stamp.
    pub node: NodeId,
}

impl Ord for Hlc {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ms, self.counter, self.node).cmp(&(other.ms, other.counter, other.node))
    }
}

impl PartialOrd for Hlc {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.ms, self.counter, self.node)
    }
}

impl fmt::Display for Hlc {
    /// `MS.COUNTER`, the form the CLI prints (the node is printed apart).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ms, self.counter)
    }
}

/// A stamp refused for being too far ahead of this node's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a stamp {ahead_ms} ms ahead of this node's clock (at most {max_ms} ms allowed)")]
pub struct FromTheFuture {
    /// How far ahead it was.
    pub ahead_ms: u64,
    /// The allowed skew.
    pub max_ms: u64,
}

/// One node's clock.
#[derive(Debug, Clone)]
pub struct HlcClock {
    node: NodeId,
    last_ms: u64,
    last_counter: u32,
    max_skew: Duration,
}

impl HlcClock {
    /// A clock for `node` that takes stamps at most `max_skew` ahead.
    pub fn new(node: NodeId, max_skew: Duration) -> Self {
        HlcClock {
            node,
            last_ms: 0,
            last_counter: 0,
            max_skew,
        }
    }

    /// The newest stamp made or seen.
    pub fn last(&self) -> Hlc {
        Hlc {
            ms: self.last_ms,
            counter: self.last_counter,
            node: self.node,
        }
    }

    /// The allowed skew.
    pub fn max_skew(&self) -> Duration {
        self.max_skew
    }

    /// A new stamp for a local event at wall-clock time `wall`: greater
    /// than every stamp made or seen before.
    pub fn tick(&mut self, wall: Timestamp) -> Hlc {
        let pt = wall.as_millis();
        if pt > self.last_ms {
            self.last_ms = pt;
            self.last_counter = 0;
        } else {
            self.bump();
        }
        self.last()
    }

    /// Takes in a stamp this node stored before a restart (no skew check:
    /// it was accepted when it was written), so that stamps stay monotonic
    /// across restarts even if the wall clock went back.
    pub fn restore(&mut self, seen: &Hlc) {
        if (seen.ms, seen.counter) > (self.last_ms, self.last_counter) {
            self.last_ms = seen.ms;
            self.last_counter = seen.counter;
        }
    }

    /// Checks `remote` against the skew allowed at `wall` (changes nothing).
    pub fn check(&self, remote: &Hlc, wall: Timestamp) -> Result<(), FromTheFuture> {
        let limit = wall
            .as_millis()
            .saturating_add(u64::try_from(self.max_skew.as_millis()).unwrap_or(u64::MAX));
        if remote.ms > limit {
            return Err(FromTheFuture {
                ahead_ms: remote.ms - wall.as_millis(),
                max_ms: u64::try_from(self.max_skew.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    /// Takes in a stamp received at `wall`, so that later local stamps are
    /// greater than it. Refused (and nothing changed) if it is too far
    /// ahead.
    pub fn observe(&mut self, remote: &Hlc, wall: Timestamp) -> Result<(), FromTheFuture> {
        self.check(remote, wall)?;
        let pt = wall.as_millis();
        let ms = self.last_ms.max(remote.ms).max(pt);
        let counter = if ms == self.last_ms && ms == remote.ms {
            self.last_counter.max(remote.counter)
        } else if ms == self.last_ms {
            self.last_counter
        } else if ms == remote.ms {
            remote.counter
        } else {
            // The wall clock is ahead of both: a fresh millisecond.
            self.last_ms = ms;
            self.last_counter = 0;
            return Ok(());
        };
        self.last_ms = ms;
        self.last_counter = counter;
        Ok(())
    }

    fn bump(&mut self) {
        match self.last_counter.checked_add(1) {
            Some(c) => self.last_counter = c,
            None => {
                // 4 billion events in one millisecond: borrow the next one.
                self.last_ms = self.last_ms.saturating_add(1);
                self.last_counter = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeKey;

    fn node(i: u8) -> NodeId {
        NodeKey::from_secret_bytes(&[i; 32]).node_id()
    }

    #[test]
    fn stamps_only_grow_whatever_the_wall_clock_does() {
        let mut c = HlcClock::new(node(1), DEFAULT_MAX_SKEW);
        let walls = [1000u64, 1000, 999, 500, 1001, 1001, 2000, 10, 10];
        let mut last: Option<Hlc> = None;
        for w in walls {
            let s = c.tick(Timestamp::from_millis(w));
            if let Some(l) = last {
                assert!(s > l, "{s:?} after {l:?}");
            }
            last = Some(s);
        }
    }

    #[test]
    fn an_observed_stamp_is_overtaken_by_the_next_local_one() {
        let mut a = HlcClock::new(node(1), DEFAULT_MAX_SKEW);
        let mut b = HlcClock::new(node(2), DEFAULT_MAX_SKEW);
        // b's clock runs 30 s ahead (within the skew).
        let sb = b.tick(Timestamp::from_millis(31_000));
        a.observe(&sb, Timestamp::from_millis(1_000)).unwrap();
        let sa = a.tick(Timestamp::from_millis(1_001));
        assert!(sa > sb);
        assert_eq!(sa.ms, sb.ms, "a borrowed b's millisecond");
    }

    #[test]
    fn a_stamp_too_far_ahead_is_refused_and_changes_nothing() {
        let mut a = HlcClock::new(node(1), Duration::from_secs(60));
        a.tick(Timestamp::from_millis(5_000));
        let before = a.last();
        let far = Hlc {
            ms: 5_000 + 61_000,
            counter: 0,
            node: node(2),
        };
        let err = a.observe(&far, Timestamp::from_millis(5_000)).unwrap_err();
        assert_eq!(err.ahead_ms, 61_000);
        assert_eq!(a.last(), before);
        // The same stamp is fine once this clock has caught up enough.
        a.observe(&far, Timestamp::from_millis(6_000)).unwrap();
        assert!(a.tick(Timestamp::from_millis(6_000)) > far);
    }

    #[test]
    fn the_counter_never_overflows() {
        let mut c = HlcClock::new(node(1), DEFAULT_MAX_SKEW);
        c.last_ms = 7;
        c.last_counter = u32::MAX;
        let s = c.tick(Timestamp::from_millis(7));
        assert_eq!((s.ms, s.counter), (8, 0));
    }

    #[test]
    fn ties_are_broken_by_node() {
        let (x, y) = (node(1), node(2));
        let a = Hlc {
            ms: 1,
            counter: 0,
            node: x,
        };
        let b = Hlc {
            ms: 1,
            counter: 0,
            node: y,
        };
        assert_ne!(a.cmp(&b), Ordering::Equal);
        assert_eq!(a.cmp(&b), x.cmp(&y));
    }
}
