//! The relay's side: letters held for members that are away, bounded per
//! recipient and in all, dropped at their expiry (or at the relay's own
//! longest hold, whichever is first).

use std::collections::BTreeMap;
use std::time::Duration;

use super::letter::{Letter, LetterId};
use crate::clock::Timestamp;
use crate::identity::NodeId;

/// How much a relay holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayLimits {
    /// Letters for one recipient. Default 1,000.
    pub letters_per_recipient: usize,
    /// Bytes for one recipient. Default 16 MiB.
    pub bytes_per_recipient: usize,
    /// Letters in all. Default 10,000.
    pub letters: usize,
    /// Bytes in all. Default 256 MiB.
    pub bytes: usize,
    /// Letters from one sender, for all its recipients. Default 2,000.
    pub letters_per_sender: usize,
    /// The longest a letter is held, whatever its expiry. Default 7 days.
    pub max_hold: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            letters_per_recipient: 1000,
            bytes_per_recipient: 16 << 20,
            letters: 10_000,
            bytes: 256 << 20,
            letters_per_sender: 2000,
            max_hold: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Why a relay does not hold a letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayRefusal {
    /// Already past its expiry.
    #[error("the letter has expired")]
    Expired,
    /// The recipient's share, or the whole store, is full.
    #[error("the relay holds as much as it may")]
    Full,
}

#[derive(Debug, Clone)]
struct Held {
    letter: Letter,
    until_ms: u64,
}

/// The letters a relay holds, by recipient.
#[derive(Debug, Default)]
pub struct RelayStore {
    limits: RelayLimits,
    by_to: BTreeMap<NodeId, BTreeMap<LetterId, Held>>,
    bytes_by_to: BTreeMap<NodeId, usize>,
    by_from: BTreeMap<NodeId, usize>,
    letters: usize,
    bytes: usize,
}

impl RelayStore {
    /// An empty store.
    pub fn new(limits: RelayLimits) -> Self {
        RelayStore {
            limits,
            ..RelayStore::default()
        }
    }

    /// Takes `letter` at `now`: `Ok(true)` if new, `Ok(false)` if already
    /// held.
    pub fn accept(&mut self, letter: Letter, now: Timestamp) -> Result<bool, RelayRefusal> {
        let now_ms = now.as_millis();
        if letter.expires_at_ms < now_ms {
            return Err(RelayRefusal::Expired);
        }
        let to = letter.to;
        if self
            .by_to
            .get(&to)
            .is_some_and(|m| m.contains_key(&letter.id))
        {
            return Ok(false);
        }
        let size = letter.size();
        let held_for_to = self.by_to.get(&to).map_or(0, BTreeMap::len);
        let bytes_for_to = self.bytes_by_to.get(&to).copied().unwrap_or(0);
        let from_sender = self.by_from.get(&letter.from).copied().unwrap_or(0);
        if held_for_to >= self.limits.letters_per_recipient
            || from_sender >= self.limits.letters_per_sender
            || bytes_for_to + size > self.limits.bytes_per_recipient
            || self.letters >= self.limits.letters
            || self.bytes + size > self.limits.bytes
        {
            return Err(RelayRefusal::Full);
        }
        let hold_ms = u64::try_from(self.limits.max_hold.as_millis()).unwrap_or(u64::MAX);
        let until_ms = letter.expires_at_ms.min(now_ms.saturating_add(hold_ms));
        let from = letter.from;
        self.by_to
            .entry(to)
            .or_default()
            .insert(letter.id, Held { letter, until_ms });
        *self.bytes_by_to.entry(to).or_default() += size;
        *self.by_from.entry(from).or_default() += 1;
        self.letters += 1;
        self.bytes += size;
        Ok(true)
    }

    /// Letters held for `to`.
    pub fn for_recipient(&self, to: &NodeId) -> Vec<Letter> {
        self.by_to
            .get(to)
            .map(|m| m.values().map(|h| h.letter.clone()).collect())
            .unwrap_or_default()
    }

    /// Recipients with letters held.
    pub fn recipients(&self) -> Vec<NodeId> {
        self.by_to.keys().copied().collect()
    }

    /// Letters held in all.
    pub fn len(&self) -> usize {
        self.letters
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.letters == 0
    }

    /// Drops letter `id` for `to` (delivered); whether it was held.
    pub fn remove(&mut self, to: &NodeId, id: &LetterId) -> bool {
        let Some(m) = self.by_to.get_mut(to) else {
            return false;
        };
        let Some(h) = m.remove(id) else {
            return false;
        };
        let size = h.letter.size();
        if let Some(n) = self.by_from.get_mut(&h.letter.from) {
            *n -= 1;
            if *n == 0 {
                self.by_from.remove(&h.letter.from);
            }
        }
        if m.is_empty() {
            self.by_to.remove(to);
            self.bytes_by_to.remove(to);
        } else if let Some(b) = self.bytes_by_to.get_mut(to) {
            *b = b.saturating_sub(size);
        }
        self.letters -= 1;
        self.bytes = self.bytes.saturating_sub(size);
        true
    }

    /// Drops the letters held past `now`; returns them (recipient, id).
    pub fn expire(&mut self, now: Timestamp) -> Vec<(NodeId, LetterId)> {
        let now_ms = now.as_millis();
        let gone: Vec<(NodeId, LetterId)> = self
            .by_to
            .iter()
            .flat_map(|(to, m)| {
                m.values()
                    .filter(|h| h.until_ms < now_ms)
                    .map(|h| (*to, h.letter.id))
            })
            .collect();
        for (to, id) in &gone {
            self.remove(to, id);
        }
        gone
    }
}
