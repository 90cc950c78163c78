//! One replicated namespace: a last-writer-wins map, sans IO.
//!
//! Every write is a [`Change`]: the key, the value (or none: a tombstone),
//! its [`Hlc`] stamp and its origin's sequence number in this namespace.
//! Per key the greatest stamp wins (ties, possible only from a broken
//! origin, by sequence number then value bytes), so replicas that have
//! taken the same changes hold the same state, whatever the order, drops
//! and duplicates on the way.
//!
//! Catching up is by version vector: `covered[o] = n` means this replica's
//! state accounts for every change origin `o` made up to its `n`th (either
//! holds it or holds a newer write of the same key). A peer that sends its
//! vector gets back only the changes above it ([`Replica::delta_for`]),
//! with the vector the delta lets it claim; a change pushed out of order
//! is applied at once but advances the vector only when the gap before it
//! fills, or when a delta covers it.
//!
//! Tombstones are collected when every member's vector is known to cover
//! them, or after a horizon ([`ReplicaLimits::horizon`], 7 days by
//! default). The trade-off of the horizon: a replica away for longer than
//! it could bring a deleted key back; to prevent that, a change older than
//! the horizon for a key this replica does not hold is refused
//! ([`Refusal::BeyondHorizon`]). So a member that was offline past the
//! horizon loses the writes it made before going away that nobody else
//! saw, and never resurrects a deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hlc::{FromTheFuture, Hlc, HlcClock};
use crate::clock::Timestamp;
use crate::identity::NodeId;

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// The largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// The largest sequence number taken from a peer (2^48: a million writes a
/// second for eight years), so that no arithmetic on it can overflow.
pub const MAX_SEQ: u64 = 1 << 48;

/// One write.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: String,
    /// The value; `None` is a tombstone (the key was deleted).
    pub value: Option<Vec<u8>>,
    /// When, and by whom.
    pub hlc: Hlc,
    /// The origin's (`hlc.node`'s) sequence number of this write in its
    /// namespace, from 1.
    pub seq: u64,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Change")
            .field("key", &self.key)
            .field("value_len", &self.value.as_ref().map(Vec::len))
            .field("hlc", &self.hlc)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Change {
    /// The origin.
    pub fn origin(&self) -> NodeId {
        self.hlc.node
    }

    /// Whether this is a deletion.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Whether this change wins over `other` (for the same key).
    pub fn beats(&self, other: &Change) -> bool {
        (self.hlc, self.seq, &self.value) > (other.hlc, other.seq, &other.value)
    }

    /// About what it costs on the wire.
    pub fn wire_len(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len) + 64
    }
}

/// Per origin, how far a replica's state accounts for its changes.
pub type VersionVector = BTreeMap<NodeId, u64>;

/// Why a change was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Empty or longer than [`MAX_KEY_LEN`].
    #[error("a key must be 1 to {MAX_KEY_LEN} bytes")]
    BadKey,
    /// Over [`ReplicaLimits::max_value_len`].
    #[error("a value of {len} bytes is over the limit of {max}")]
    ValueTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A sequence number of 0.
    #[error("a change's sequence number starts at 1")]
    BadSeq,
    /// Stamped too far in the future.
    #[error(transparent)]
    FromTheFuture(#[from] FromTheFuture),
    /// Older than the horizon, for a key this replica does not hold.
    #[error("a change older than the tombstone horizon, for a key not held here")]
    BeyondHorizon,
    /// The namespace holds as many keys as allowed.
    #[error("the namespace is full ({max} keys)")]
    Full {
        /// The limit.
        max: usize,
    },
}

/// Bounds of one replica.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaLimits {
    /// Keys held, tombstones included.
    pub max_entries: usize,
    /// Bytes of one value.
    pub max_value_len: usize,
    /// Origins tracked in the version vector.
    pub max_origins: usize,
    /// Out-of-order sequence numbers remembered per origin.
    pub max_gaps: usize,
    /// Tombstones (and unseen changes) older than this are collected (and
    /// refused).
    pub horizon: Duration,
    /// Bytes of changes in one delta.
    pub delta_bytes: usize,
}

impl Default for ReplicaLimits {
    fn default() -> Self {
        ReplicaLimits {
            max_entries: 1_000_000,
            max_value_len: MAX_VALUE_LEN,
            max_origins: 4096,
            max_gaps: 4096,
            horizon: Duration::from_secs(7 * 24 * 3600),
            delta_bytes: 512 * 1024,
        }
    }
}

/// What [`Replica::apply`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes that won and now stand (to store, and to tell subscribers).
    pub changed: Vec<Change>,
    /// Changes that lost to what was there, or were already there.
    pub stale: usize,
    /// Changes refused, with why.
    pub refused: Vec<(String, Refusal)>,
    /// Whether the version vector moved (to store).
    pub covered_moved: bool,
}

/// What a peer behind this replica is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The changes it lacks, per origin in sequence order.
    pub changes: Vec<Change>,
    /// What it may claim once it has applied them.
    pub covers: VersionVector,
    /// Whether the budget cut it short (ask again).
    pub more: bool,
}

/// One replicated namespace.
#[derive(Debug)]
pub struct Replica {
    me: NodeId,
    limits: ReplicaLimits,
    entries: BTreeMap<String, Change>,
    /// (origin, seq) → key, for the entries held.
    by_origin: BTreeMap<(NodeId, u64), String>,
    covered: VersionVector,
    gaps: BTreeMap<NodeId, BTreeSet<u64>>,
    next_seq: u64,
    /// The vectors members last sent (for collecting tombstones).
    peers: BTreeMap<NodeId, VersionVector>,
    /// Changes no longer standing (superseded, or tombstones collected)
    /// since [`Replica::take_dropped`] last ran: their stored rows are
    /// garbage.
    dropped: Vec<(NodeId, u64)>,
}

impl Replica {
    /// An empty replica on node `me`.
    pub fn new(me: NodeId, limits: ReplicaLimits) -> Self {
        Replica {
            me,
            limits,
            entries: BTreeMap::new(),
            by_origin: BTreeMap::new(),
            covered: VersionVector::new(),
            gaps: BTreeMap::new(),
            next_seq: 1,
            peers: BTreeMap::new(),
            dropped: Vec::new(),
        }
    }

    /// A replica restored from stored changes (in any order, superseded
    /// ones included: they are what [`Replica::take_dropped`] then
    /// returns) and vector.
    pub fn restore(
        me: NodeId,
        limits: ReplicaLimits,
        entries: Vec<Change>,
        covered: VersionVector,
    ) -> Self {
        let mut r = Replica::new(me, limits);
        for c in entries {
            if c.origin() == me && c.seq >= r.next_seq {
                // Our own change, from before a loss of local state.
                r.next_seq = c.seq + 1;
            }
            match r.entries.get(&c.key) {
                Some(cur) if !c.beats(cur) => r.dropped.push((c.origin(), c.seq)),
                _ => r.install(c),
            }
        }
        r.next_seq = r.next_seq.max(covered.get(&me).map_or(1, |n| n + 1));
        r.covered = covered;
        r
    }

    /// The (origin, seq) of every change that stopped standing since the
    /// last call (superseded, or a tombstone collected): storage may drop
    /// their rows.
    pub fn take_dropped(&mut self) -> Vec<(NodeId, u64)> {
        std::mem::take(&mut self.dropped)
    }

    /// How many changes stopped standing since [`Replica::take_dropped`]
    /// last ran.
    pub fn dropped_len(&self) -> usize {
        self.dropped.len()
    }

    // ---- reading -------------------------------------------------------

    /// The value of `key` (none if absent or deleted).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).and_then(|c| c.value.as_deref())
    }

    /// The change standing for `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Change> {
        self.entries.get(key)
    }

    /// Live keys starting with `prefix`, in key order.
    pub fn scan<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Change> + 'a {
        self.entries
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, c)| c)
            .filter(|c| !c.is_tombstone())
    }

    /// Every change standing, tombstones included, in key order.
    pub fn entries(&self) -> impl Iterator<Item = &Change> {
        self.entries.values()
    }

    /// Keys held, tombstones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of this node's latest change in this namespace (0: none).
    pub fn last_own_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// This replica's version vector (what it sends as its digest).
    pub fn covered(&self) -> &VersionVector {
        &self.covered
    }

    /// Changes this replica has that `theirs` does not account for (a
    /// peer's pending count).
    pub fn pending_for(&self, theirs: &VersionVector) -> usize {
        self.by_origin
            .keys()
            .filter(|(o, s)| *s > theirs.get(o).copied().unwrap_or(0))
            .count()
    }

    // ---- writing -------------------------------------------------------

    /// Writes `value` (none: deletes) under `key`, stamped by `clock` at
    /// `wall`. Returns the change to store and push.
    pub fn write(
        &mut self,
        key: &str,
        value: Option<Vec<u8>>,
        clock: &mut HlcClock,
        wall: Timestamp,
    ) -> Result<Change, Refusal> {
        self.check_shape(key, value.as_deref())?;
        if !self.entries.contains_key(key) && self.entries.len() >= self.limits.max_entries {
            return Err(Refusal::Full {
                max: self.limits.max_entries,
            });
        }
        let change = Change {
            key: key.to_owned(),
            value,
            hlc: clock.tick(wall),
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.install(change.clone());
        self.mark(self.me, change.seq);
        Ok(change)
    }

    /// Takes changes from a peer (pushed, or a [`Delta`]'s with its
    /// `covers`), at `wall`.
    pub fn apply(
        &mut self,
        changes: Vec<Change>,
        covers: Option<&VersionVector>,
        clock: &mut HlcClock,
        wall: Timestamp,
    ) -> Applied {
        let mut out = Applied::default();
        // Origins with a refused change: their vector must not move past
        // it, so that the change is offered again.
        let mut held_back: BTreeSet<NodeId> = BTreeSet::new();
        for c in changes {
            match self.take(&c, clock, wall) {
                Ok(true) => {
                    let (origin, seq) = (c.origin(), c.seq);
                    self.install(c.clone());
                    out.changed.push(c);
                    out.covered_moved |= self.mark(origin, seq);
                }
                Ok(false) => {
                    out.stale += 1;
                    out.covered_moved |= self.mark(c.origin(), c.seq);
                }
                Err(e) => {
                    held_back.insert(c.origin());
                    out.refused.push((c.key.clone(), e));
                }
            }
        }
        if let Some(covers) = covers {
            for (origin, &n) in covers {
                // Numbers past MAX_SEQ are no one's (and would overflow).
                if held_back.contains(origin) || n > MAX_SEQ {
                    continue;
                }
                out.covered_moved |= self.cover(*origin, n);
            }
        }
        out
    }

    /// The changes a peer whose vector is `theirs` lacks, within the
    /// delta budget.
    pub fn delta_for(&self, theirs: &VersionVector) -> Delta {
        self.delta_for_upto(theirs, u64::MAX)
    }

    /// Like [`Replica::delta_for`], leaving out this node's own changes
    /// numbered above `own_upto` (those not yet durable: a crash could
    /// lose them and their numbers would be used again).
    pub fn delta_for_upto(&self, theirs: &VersionVector, own_upto: u64) -> Delta {
        let mut changes = Vec::new();
        let mut covers = VersionVector::new();
        let mut bytes = 0usize;
        let mut more = false;
        // Every origin: those covered, and those with changes held (found
        // by skipping from one origin's range to the next).
        let mut origins: BTreeSet<NodeId> = self.covered.keys().copied().collect();
        let mut cursor = self.by_origin.keys().next().map(|(o, _)| *o);
        while let Some(o) = cursor {
            origins.insert(o);
            cursor = self
                .by_origin
                .range((
                    std::ops::Bound::Excluded((o, u64::MAX)),
                    std::ops::Bound::Unbounded,
                ))
                .next()
                .map(|((next, _), _)| *next);
        }
        'origins: for origin in origins {
            let from = theirs.get(&origin).copied().unwrap_or(0);
            let upto = if origin == self.me {
                own_upto
            } else {
                u64::MAX
            };
            let mine = self.covered.get(&origin).copied().unwrap_or(0).min(upto);
            let mut last = from;
            if from >= upto {
                continue;
            }
            for ((_, seq), key) in self
                .by_origin
                .range((origin, from.saturating_add(1))..=(origin, upto))
            {
                let Some(c) = self.entries.get(key) else {
                    continue;
                };
                if bytes + c.wire_len() > self.limits.delta_bytes && !changes.is_empty() {
                    more = true;
                    if last.min(mine) > from {
                        covers.insert(origin, last.min(mine));
                    }
                    break 'origins;
                }
                bytes += c.wire_len();
                changes.push(c.clone());
                last = *seq;
            }
            if mine > from {
                covers.insert(origin, mine);
            }
        }
        Delta {
            changes,
            covers,
            more,
        }
    }

    /// Notes the vector `peer` sent (for collecting tombstones).
    pub fn note_peer(&mut self, peer: NodeId, covered: VersionVector) {
        if peer == self.me {
            return;
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.limits.max_origins {
            return;
        }
        self.peers.insert(peer, covered);
    }

    /// Forgets a peer that left (its vector no longer holds tombstones).
    pub fn forget_peer(&mut self, peer: &NodeId) {
        self.peers.remove(peer);
    }

    /// Collects the tombstones that every one of `members` (other than
    /// this node) is known to account for, and those older than the
    /// horizon. Returns the keys collected (to delete from the store).
    pub fn collect(&mut self, members: &[NodeId], wall: Timestamp) -> Vec<String> {
        let horizon_ms = u64::try_from(self.limits.horizon.as_millis()).unwrap_or(u64::MAX);
        let old_before = wall.as_millis().saturating_sub(horizon_ms);
        let others: Vec<&NodeId> = members.iter().filter(|m| **m != self.me).collect();
        let gone: Vec<String> = self
            .entries
            .values()
            .filter(|c| c.is_tombstone())
            .filter(|c| {
                c.hlc.ms < old_before
                    || others.iter().all(|m| {
                        self.peers
                            .get(*m)
                            .and_then(|v| v.get(&c.origin()))
                            .is_some_and(|n| *n >= c.seq)
                    })
            })
            .map(|c| c.key.clone())
            .collect();
        for k in &gone {
            if let Some(c) = self.entries.remove(k) {
                self.by_origin.remove(&(c.origin(), c.seq));
                self.dropped.push((c.origin(), c.seq));
            }
        }
        gone
    }

    // ---- internals -----------------------------------------------------

    fn check_shape(&self, key: &str, value: Option<&[u8]>) -> Result<(), Refusal> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Refusal::BadKey);
        }
        if let Some(v) = value
            && v.len() > self.limits.max_value_len
        {
            return Err(Refusal::ValueTooLarge {
                len: v.len(),
                max: self.limits.max_value_len,
            });
        }
        Ok(())
    }

    /// Whether `c` wins here (Ok(false): it lost or was there already).
    fn take(&mut self, c: &Change, clock: &mut HlcClock, wall: Timestamp) -> Result<bool, Refusal> {
        self.check_shape(&c.key, c.value.as_deref())?;
        if c.seq == 0 || c.seq > MAX_SEQ {
            return Err(Refusal::BadSeq);
        }
        if self.accounted(c.origin(), c.seq) {
            // Already taken in (or vouched for by a delta's `covers`): a
            // duplicate, or a superseded or collected change come late. A
            // second, different change under the same number is a forgery
            // and is not taken either (a change is stored under its origin
            // and number).
            return Ok(false);
        }
        clock.check(&c.hlc, wall)?;
        // A new origin only within the limit, even for a change that then
        // loses (its number would still be remembered as a gap).
        if !self.covered.contains_key(&c.origin())
            && !self.gaps.contains_key(&c.origin())
            && self.covered.len() + self.gaps.len() >= self.limits.max_origins
        {
            return Err(Refusal::Full {
                max: self.limits.max_origins,
            });
        }
        let current = self.entries.get(&c.key);
        if current.is_some_and(|cur| !c.beats(cur)) {
            let _ = clock.observe(&c.hlc, wall);
            return Ok(false);
        }
        if current.is_none() {
            let horizon_ms = u64::try_from(self.limits.horizon.as_millis()).unwrap_or(u64::MAX);
            if c.hlc.ms < wall.as_millis().saturating_sub(horizon_ms) {
                return Err(Refusal::BeyondHorizon);
            }
            if self.entries.len() >= self.limits.max_entries {
                return Err(Refusal::Full {
                    max: self.limits.max_entries,
                });
            }
        }
        let _ = clock.observe(&c.hlc, wall);
        Ok(true)
    }

    fn install(&mut self, c: Change) {
        if c.origin() == self.me && c.seq >= self.next_seq {
            // Our own change, from before a loss of local state.
            self.next_seq = c.seq + 1;
        }
        if let Some(old) = self.entries.get(&c.key) {
            self.by_origin.remove(&(old.origin(), old.seq));
            self.dropped.push((old.origin(), old.seq));
        }
        self.by_origin.insert((c.origin(), c.seq), c.key.clone());
        self.entries.insert(c.key.clone(), c);
    }

    /// Whether `origin`'s change `seq` is accounted for already.
    fn accounted(&self, origin: NodeId, seq: u64) -> bool {
        self.covered.get(&origin).is_some_and(|n| seq <= *n)
            || self.gaps.get(&origin).is_some_and(|g| g.contains(&seq))
    }

    /// Records that `origin`'s change `seq` is accounted for.
    fn mark(&mut self, origin: NodeId, seq: u64) -> bool {
        let n = self.covered.get(&origin).copied().unwrap_or(0);
        if seq <= n {
            return false;
        }
        if seq == n + 1 {
            return self.cover(origin, seq);
        }
        let gaps = self.gaps.entry(origin).or_default();
        if gaps.len() < self.limits.max_gaps {
            gaps.insert(seq);
        }
        false
    }

    /// Raises `origin`'s coverage to at least `n`, then over any gaps that
    /// have filled.
    fn cover(&mut self, origin: NodeId, n: u64) -> bool {
        let before = self.covered.get(&origin).copied().unwrap_or(0);
        if n <= before
            && !self
                .gaps
                .get(&origin)
                .is_some_and(|g| g.contains(&(before + 1)))
        {
            return false;
        }
        if !self.covered.contains_key(&origin) && self.covered.len() >= self.limits.max_origins {
            return false;
        }
        let mut top = before.max(n);
        if let Some(gaps) = self.gaps.get_mut(&origin) {
            gaps.retain(|s| *s > top);
            while gaps.remove(&(top + 1)) {
                top += 1;
            }
            if gaps.is_empty() {
                self.gaps.remove(&origin);
            }
        }
        self.covered.insert(origin, top);
        if origin == self.me && top >= self.next_seq {
            self.next_seq = top + 1;
        }
        top > before
    }
}
