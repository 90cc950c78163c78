//! Rate limits: token buckets, alone or one per key in a bounded table.
//!
//! Sans-IO: the time is passed in, so tests drive them with a controlled
//! clock. The runtime uses them for new pairing requests (globally and per
//! source address) and for each peer's messages.
//!
//! ```
//! use mesh_core::clock::Timestamp;
//! use mesh_core::limits::{Rate, TokenBucket};
//!
//! let t0 = Timestamp::from_millis(1_000);
//! let mut bucket = TokenBucket::new(Rate::per_second(2.0, 3), t0);
//! assert!((0..3).all(|_| bucket.try_take(t0))); // the burst
//! assert!(!bucket.try_take(t0));
//! assert!(bucket.try_take(t0.saturating_add(std::time::Duration::from_millis(500))));
//! ```

use std::collections::HashMap;
use std::hash::Hash;

use crate::clock::Timestamp;

/// A sustained rate with a burst on top.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held (the burst), at least 1.
    pub burst: u32,
}

impl Rate {
    /// `per_second` sustained, `burst` at once.
    pub fn per_second(per_second: f64, burst: u32) -> Self {
        Rate {
            per_second: if per_second.is_finite() && per_second > 0.0 {
                per_second
            } else {
                0.0
            },
            burst: burst.max(1),
        }
    }
}

/// One token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    last: Timestamp,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: Rate, now: Timestamp) -> Self {
        TokenBucket {
            rate,
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    fn refill(&mut self, now: Timestamp) {
        let elapsed_ms = now.as_millis().saturating_sub(self.last.as_millis());
        if elapsed_ms > 0 {
            let added = self.rate.per_second * (elapsed_ms as f64) / 1000.0;
            self.tokens = (self.tokens + added).min(f64::from(self.rate.burst));
            self.last = now;
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again at `now` (nothing to remember).
    pub fn is_full(&mut self, now: Timestamp) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.rate.burst)
    }
}

/// One token bucket per key, at most `max_keys` of them. When the table is
/// full, buckets that have refilled completely are dropped (they remember
/// nothing); if none has, a new key is refused: a flood of new keys can
/// neither grow the table nor reset anyone's bucket.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
    /// When full: make room (drop the fullest bucket) instead of refusing.
    evicting: bool,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// Buckets of `rate`, at most `max_keys` (at least 1).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        KeyedLimiter {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
            evicting: false,
        }
    }

    /// Like [`KeyedLimiter::new`], but a full table makes room for a new
    /// key by dropping the bucket with the most tokens left (the one that
    /// has lost the least) instead of refusing the key. For a limit that
    /// must stay available to newcomers (who may connect at all), where
    /// another bound holds the total: a flood of keys then loosens the
    /// limit a little, but locks nobody out.
    pub fn evicting(rate: Rate, max_keys: usize) -> Self {
        KeyedLimiter {
            evicting: true,
            ..Self::new(rate, max_keys)
        }
    }

    /// Takes one of `key`'s tokens.
    pub fn try_take(&mut self, key: &K, now: Timestamp) -> bool {
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.try_take(now);
        }
        if self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_keys {
                if !self.evicting {
                    return false;
                }
                let fullest = self
                    .buckets
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(k, _)| k.clone());
                if let Some(k) = fullest {
                    self.buckets.remove(&k);
                }
            }
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let taken = bucket.try_take(now);
        self.buckets.insert(key.clone(), bucket);
        taken
    }

    /// Forgets `key`.
    pub fn forget(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Keys with a bucket now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_000_000);

    fn at(ms: u64) -> Timestamp {
        T0.saturating_add(Duration::from_millis(ms))
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = TokenBucket::new(Rate::per_second(10.0, 5), T0);
        assert_eq!((0..20).filter(|_| b.try_take(T0)).count(), 5);
        // 10 per second: one per 100 ms.
        assert!(!b.try_take(at(50)));
        assert!(b.try_take(at(100)));
        assert!(!b.try_take(at(150)));
        // Over a long quiet time it refills to the burst, not beyond.
        assert_eq!((0..20).filter(|_| b.try_take(at(60_000))).count(), 5);
    }

    #[test]
    fn a_clock_going_back_adds_nothing() {
        let mut b = TokenBucket::new(Rate::per_second(10.0, 1), at(1000));
        assert!(b.try_take(at(1000)));
        assert!(!b.try_take(T0));
        assert!(!b.try_take(at(1050)));
    }

    #[test]
    fn a_bad_rate_allows_only_the_burst() {
        for r in [f64::NAN, -1.0, f64::INFINITY] {
            let mut b = TokenBucket::new(Rate::per_second(r, 2), T0);
            assert_eq!((0..5).filter(|_| b.try_take(at(10_000))).count(), 2);
        }
    }

    #[test]
    fn keys_have_their_own_buckets_and_the_table_is_bounded() {
        let mut l = KeyedLimiter::new(Rate::per_second(1.0, 2), 3);
        assert!(l.try_take(&"a", T0));
        assert!(l.try_take(&"a", T0));
        assert!(!l.try_take(&"a", T0));
        // Another key is not affected by a's flood.
        assert!(l.try_take(&"b", T0));
        assert!(l.try_take(&"c", T0));
        // Full, and nobody has refilled: a new key is refused.
        assert!(!l.try_take(&"d", T0));
        assert_eq!(l.len(), 3);
        // Once buckets refilled they are dropped to make room.
        assert!(l.try_take(&"d", at(10_000)));
        assert!(l.len() <= 3);
        l.forget(&"d");
        assert!(!l.buckets.contains_key(&"d"));
    }

    #[test]
    fn an_evicting_table_makes_room_by_dropping_the_fullest_bucket() {
        let mut l = KeyedLimiter::evicting(Rate::per_second(0.001, 3), 2);
        // a is drained, b has lost one token.
        for _ in 0..3 {
            assert!(l.try_take(&"a", T0));
        }
        assert!(l.try_take(&"b", T0));
        // A newcomer gets in; b (the fullest) made room, a stays drained.
        assert!(l.try_take(&"c", T0));
        assert_eq!(l.len(), 2);
        assert!(l.buckets.contains_key(&"a") && !l.buckets.contains_key(&"b"));
        assert!(!l.try_take(&"a", T0));
    }
}
