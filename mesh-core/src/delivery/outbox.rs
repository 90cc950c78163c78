//! The sender's side: letters waiting for their acknowledgement, sent
//! again with exponential backoff and jitter, handed to relays when the
//! recipient cannot be reached directly.

use std::collections::BTreeMap;
use std::time::Duration;

use super::letter::{Letter, LetterId};
use crate::clock::Timestamp;
use crate::identity::NodeId;

/// When letters are sent again.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RetryConfig {
    /// The first wait. Default 500 ms.
    pub base: Duration,
    /// The longest wait. Default 30 s.
    pub max: Duration,
    /// Direct tries before relays are used too (at once if the recipient
    /// is not reachable). Default 2.
    pub direct_tries: u32,
    /// Relays a letter is handed to. Default 2.
    pub relays: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            base: Duration::from_millis(500),
            max: Duration::from_secs(30),
            direct_tries: 2,
            relays: 2,
        }
    }
}

/// One letter waiting.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// The letter.
    pub letter: Letter,
    /// Whether it is a receipt (done once anyone, a relay included, took it).
    pub receipt: bool,
    /// Sends so far.
    pub attempts: u32,
    /// When it is sent next.
    pub next_at: Timestamp,
    /// Relays that said they hold it.
    pub stored_at: Vec<NodeId>,
    /// Relays it was handed to.
    pub relayed_to: Vec<NodeId>,
}

/// A letter to send to `to` (its recipient, or a relay).
#[derive(Debug, Clone)]
pub struct Send {
    /// Whom to send it to.
    pub to: NodeId,
    /// The letter.
    pub letter: Letter,
}

/// The letters a node sent and awaits acknowledgements for.
#[derive(Debug)]
pub struct Outbox {
    config: RetryConfig,
    entries: BTreeMap<LetterId, OutboxEntry>,
    rng: u64,
}

impl Outbox {
    /// An empty outbox; `seed` drives the jitter.
    pub fn new(config: RetryConfig, seed: u64) -> Self {
        Outbox {
            config,
            entries: BTreeMap::new(),
            rng: seed | 1,
        }
    }

    /// Adds a letter, due at once.
    pub fn add(&mut self, letter: Letter, receipt: bool, now: Timestamp) {
        self.entries.insert(
            letter.id,
            OutboxEntry {
                letter,
                receipt,
                attempts: 0,
                next_at: now,
                stored_at: Vec::new(),
                relayed_to: Vec::new(),
            },
        );
    }

    /// Letters waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Letters waiting for `to`.
    pub fn pending_for(&self, to: &NodeId) -> usize {
        self.entries.values().filter(|e| e.letter.to == *to).count()
    }

    /// Whether `id` waits.
    pub fn contains(&self, id: &LetterId) -> bool {
        self.entries.contains_key(id)
    }

    /// The relays waiting letter `id` was handed to.
    pub fn entries_relayed_to(&self, id: &LetterId) -> Vec<NodeId> {
        self.entries
            .get(id)
            .map(|e| e.relayed_to.clone())
            .unwrap_or_default()
    }

    /// The recipient of waiting letter `id`.
    pub fn recipient(&self, id: &LetterId) -> Option<NodeId> {
        self.entries.get(id).map(|e| e.letter.to)
    }

    /// The earliest time a letter is due.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.entries.values().map(|e| e.next_at).min()
    }

    /// The sends due at `now`; `reachable` says whether a node can be
    /// reached directly, `relays` are the members that may hold letters.
    /// Letters past their expiry are dropped and returned.
    pub fn due(
        &mut self,
        now: Timestamp,
        reachable: &dyn Fn(&NodeId) -> bool,
        relays: &[NodeId],
    ) -> (Vec<Send>, Vec<OutboxEntry>) {
        let mut sends = Vec::new();
        let expired: Vec<LetterId> = self
            .entries
            .values()
            .filter(|e| e.letter.expires_at_ms < now.as_millis())
            .map(|e| e.letter.id)
            .collect();
        let dropped = expired
            .iter()
            .filter_map(|id| self.entries.remove(id))
            .collect();
        let due: Vec<LetterId> = self
            .entries
            .values()
            .filter(|e| e.next_at <= now)
            .map(|e| e.letter.id)
            .collect();
        for id in due {
            let wait = self.backoff(self.entries.get(&id).map_or(0, |e| e.attempts));
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            let to = e.letter.to;
            let direct = reachable(&to);
            if direct {
                sends.push(Send {
                    to,
                    letter: e.letter.clone(),
                });
            }
            if !direct || e.attempts >= self.config.direct_tries {
                // Relays not yet holding it, other than the recipient.
                let wanted = self.config.relays.saturating_sub(e.stored_at.len());
                let mut candidates: Vec<&NodeId> = relays
                    .iter()
                    .filter(|r| **r != to && !e.stored_at.contains(r))
                    .collect();
                // Ones not tried yet first.
                candidates.sort_by_key(|r| e.relayed_to.contains(r));
                for r in candidates.into_iter().take(wanted) {
                    if !e.relayed_to.contains(r) {
                        e.relayed_to.push(*r);
                    }
                    sends.push(Send {
                        to: *r,
                        letter: e.letter.clone(),
                    });
                }
            }
            e.attempts = e.attempts.saturating_add(1);
            e.next_at = now.saturating_add(wait);
        }
        (sends, dropped)
    }

    /// The recipient has letter `id` (or, for a receipt, anyone does):
    /// it leaves the outbox.
    pub fn acked(&mut self, id: &LetterId) -> Option<OutboxEntry> {
        self.entries.remove(id)
    }

    /// Relay `by` holds letter `id`: a receipt is done; a message waits
    /// for its recipient's receipt, tried directly less often.
    pub fn stored(&mut self, id: &LetterId, by: NodeId, now: Timestamp) -> Option<OutboxEntry> {
        let e = self.entries.get(id)?;
        // Only a relay it was handed to (ids are predictable: anyone else
        // saying so could end a receipt or keep real relays unused).
        if !e.relayed_to.contains(&by) {
            return None;
        }
        if e.receipt {
            return self.entries.remove(id);
        }
        let max = self.config.max;
        let e = self.entries.get_mut(id)?;
        if !e.stored_at.contains(&by) {
            e.stored_at.push(by);
        }
        e.next_at = e.next_at.max(now.saturating_add(max));
        None
    }

    /// The wait after `attempts` sends: base × 2^attempts, capped, ±25 %.
    fn backoff(&mut self, attempts: u32) -> Duration {
        let exp = self
            .config
            .base
            .saturating_mul(1u32 << attempts.min(16))
            .min(self.config.max);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = (self.rng % 501) as f64 / 1000.0 - 0.25; // -0.25 ..= 0.25
        exp.mul_f64(1.0 + jitter)
    }
}
