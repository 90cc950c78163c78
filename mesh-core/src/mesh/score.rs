//! Peer scores: what a directly connected member did, as one number.
//!
//! | input | weight |
//! |---|---|
//! | a frame, packet or broadcast with a bad signature, a forged identity or a source that is not the connection's peer | −50 |
//! | a frame that does not parse | −20 |
//! | a message over its rate (the peer's frames, or an origin's broadcasts) | −10 |
//! | a probe of the peer that failed (no ack, direct or indirect) | −5 |
//! | a duplicate beyond 4 per new message, over the last window | −1 |
//! | a new, valid broadcast first received from the peer | +1 |
//!
//! Scores lie in [−1000, 100] and decay towards 0 by a tenth every
//! [`DECAY_EVERY`]. Below [`FANOUT_FLOOR`] a peer is not chosen to relay
//! broadcasts to; below [`DISCONNECT_BELOW`] its connections are closed and
//! refused until its score has decayed back above the line.

use std::time::Duration;

use crate::clock::Timestamp;

/// A bad signature, a forged identity, a spoofed source.
pub const BAD_SIGNATURE: f64 = -50.0;
/// A frame that does not parse.
pub const MALFORMED: f64 = -20.0;
/// A message over its rate.
pub const RATE_VIOLATION: f64 = -10.0;
/// A failed probe.
pub const PROBE_FAILED: f64 = -5.0;
/// A duplicate beyond the allowance.
pub const EXCESS_DUPLICATE: f64 = -1.0;
/// A new valid broadcast.
pub const USEFUL_MESSAGE: f64 = 1.0;
/// Below this a peer is not chosen for fanout.
pub const FANOUT_FLOOR: f64 = -50.0;
/// Below this a peer is disconnected and refused.
pub const DISCONNECT_BELOW: f64 = -100.0;
/// How often scores decay by a tenth.
pub const DECAY_EVERY: Duration = Duration::from_secs(10);
/// Duplicates allowed per new message a peer sends.
pub const DUPLICATES_PER_MESSAGE: u32 = 4;

const MIN: f64 = -1000.0;
const MAX: f64 = 100.0;

/// One peer's score and the counters behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerScore {
    /// The score.
    pub score: f64,
    /// Bad signatures, forged identities, spoofed sources.
    pub bad_signatures: u64,
    /// Frames that did not parse.
    pub malformed: u64,
    /// Messages dropped for being over their rate.
    pub rate_dropped: u64,
    /// Failed probes.
    pub probes_failed: u64,
    /// Duplicates received (all of them).
    pub duplicates: u64,
    /// New valid broadcasts first received from this peer.
    pub useful: u64,
    window_new: u32,
    window_dups: u32,
    last_decay: Timestamp,
}

impl PeerScore {
    /// A neutral score at `now`.
    pub fn new(now: Timestamp) -> Self {
        PeerScore {
            score: 0.0,
            bad_signatures: 0,
            malformed: 0,
            rate_dropped: 0,
            probes_failed: 0,
            duplicates: 0,
            useful: 0,
            window_new: 0,
            window_dups: 0,
            last_decay: now,
        }
    }

    fn add(&mut self, delta: f64) {
        self.score = (self.score + delta).clamp(MIN, MAX);
    }

    /// A bad signature, forged identity or spoofed source.
    pub fn bad_signature(&mut self) {
        self.bad_signatures += 1;
        self.add(BAD_SIGNATURE);
    }

    /// A frame that did not parse.
    pub fn malformed(&mut self) {
        self.malformed += 1;
        self.add(MALFORMED);
    }

    /// A message over its rate.
    pub fn rate_violation(&mut self) {
        self.rate_dropped += 1;
        self.add(RATE_VIOLATION);
    }

    /// A failed probe.
    pub fn probe_failed(&mut self) {
        self.probes_failed += 1;
        self.add(PROBE_FAILED);
    }

    /// A duplicate broadcast.
    pub fn duplicate(&mut self) {
        self.duplicates += 1;
        self.window_dups += 1;
        if self.window_dups > DUPLICATES_PER_MESSAGE * self.window_new.max(1) {
            self.add(EXCESS_DUPLICATE);
        }
    }

    /// A new valid broadcast.
    pub fn useful(&mut self) {
        self.useful += 1;
        self.window_new += 1;
        self.add(USEFUL_MESSAGE);
    }

    /// Decays the score as time passed; starts a new duplicate window.
    pub fn decay(&mut self, now: Timestamp) {
        while now.saturating_duration_since(self.last_decay) >= DECAY_EVERY {
            self.score *= 0.9;
            if self.score.abs() < 0.5 {
                self.score = 0.0;
            }
            self.window_new = 0;
            self.window_dups = 0;
            self.last_decay = self.last_decay.saturating_add(DECAY_EVERY);
        }
    }

    /// Whether broadcasts may be relayed to this peer.
    pub fn relay_to(&self) -> bool {
        self.score >= FANOUT_FLOOR
    }

    /// Whether this peer is to be disconnected and refused.
    pub fn refused(&self) -> bool {
        self.score < DISCONNECT_BELOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_behaviour_disconnects_and_time_forgives() {
        let t0 = Timestamp::from_millis(0);
        let mut s = PeerScore::new(t0);
        s.bad_signature();
        assert!(s.relay_to() && !s.refused());
        s.bad_signature();
        s.rate_violation();
        assert!(!s.relay_to());
        assert!(s.refused());
        s.decay(t0 + Duration::from_secs(60));
        assert!(!s.refused(), "six decays bring -110 above -100");
        let mut d = PeerScore::new(t0);
        d.useful();
        for _ in 0..DUPLICATES_PER_MESSAGE {
            d.duplicate();
        }
        assert_eq!(d.score, USEFUL_MESSAGE, "the allowance costs nothing");
        d.duplicate();
        assert_eq!(d.score, USEFUL_MESSAGE + EXCESS_DUPLICATE);
    }
}
