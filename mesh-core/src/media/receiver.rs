//! The receiving side of a media stream, sans-IO: frames back in order
//! within a jitter window, gaps reported as lost, frames after their turn
//! as late, nothing yielded after its deadline, and statistics.
//!
//! Deadlines: a group's header says how long after its own timestamp each
//! frame is of use. The receiver maps the sender's media
//! clock to its own with the smallest transit seen (arrival − timestamp):
//! the least-delayed frame is taken as the one with no queueing, so a
//! frame is too old once `now − (timestamp + smallest transit)` exceeds
//! the deadline. On loopback or a LAN this is within a millisecond or so
//! of the truth; it never counts a frame as fresher than it is by more
//! than the path's base one-way delay.

use std::collections::{BTreeMap, BTreeSet};

use super::wire::FrameRecord;

/// How a receiver waits and how much it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiverSettings {
    /// How long a frame waits for the ones before it (reordering, loss
    /// repair) before they are given up as lost. Default 60 ms.
    pub jitter_ms: u32,
    /// Frames held at most; beyond, the oldest gap is given up. Default
    /// 1,024.
    pub max_buffered: usize,
}

impl Default for ReceiverSettings {
    fn default() -> Self {
        ReceiverSettings {
            jitter_ms: 60,
            max_buffered: 1024,
        }
    }
}

/// Counters of a receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct MediaStats {
    /// Frames that arrived (once each).
    pub received: u64,
    /// Frames yielded to the app, in order.
    pub delivered: u64,
    /// Frames given up and not (yet) arrived: exact once the stream has
    /// ended (a frame that comes after it was given up moves to `late`).
    pub lost: u64,
    /// Frames that arrived after their turn had passed (dropped).
    pub late: u64,
    /// Frames dropped because their deadline had passed.
    pub too_old: u64,
    /// Frames that arrived twice.
    pub duplicates: u64,
    /// Frames refused because their number was impossibly far ahead.
    pub rejected: u64,
    /// Inter-arrival jitter, ms (RFC 3550's estimator).
    pub jitter_ms: f64,
}

/// What the receiver yields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The next frame.
    Frame(FrameRecord),
    /// Frames `from..from + count` were given up (lost or too old).
    Gap {
        /// The first missing sequence number.
        from: u64,
        /// How many.
        count: u64,
    },
}

#[derive(Debug)]
struct Held {
    frame: FrameRecord,
    arrived_ms: u64,
    /// The sender's media time past which it is of no use (µs).
    deadline_us: u64,
}

/// The receiving side of one media stream.
#[derive(Debug)]
pub struct MediaReceiver {
    settings: ReceiverSettings,
    next: u64,
    held: BTreeMap<u64, Held>,
    /// Sequence numbers given up, to recognise them if they come late
    /// (bounded: the most recent 4,096).
    given_up: BTreeSet<u64>,
    /// Smallest transit seen, µs (arrival − timestamp).
    min_transit: Option<i128>,
    last_transit: Option<i128>,
    stats: MediaStats,
}

const GIVEN_UP_KEPT: usize = 4096;
/// How far ahead of the next expected frame a sequence number may be.
const MAX_AHEAD: u64 = 1 << 20;

impl MediaReceiver {
    /// A receiver expecting frames from sequence number 0.
    pub fn new(settings: ReceiverSettings) -> Self {
        MediaReceiver {
            settings,
            next: 0,
            held: BTreeMap::new(),
            given_up: BTreeSet::new(),
            min_transit: None,
            last_transit: None,
            stats: MediaStats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> MediaStats {
        self.stats
    }

    /// The sender's media time now, as this receiver estimates it (µs).
    fn sender_now_us(&self, now_ms: u64) -> i128 {
        i128::from(now_ms) * 1000 - self.min_transit.unwrap_or(0)
    }

    /// Takes `frame`, of use until `deadline_ms` after its timestamp, that
    /// arrived at `now_ms`.
    pub fn push(&mut self, frame: FrameRecord, deadline_ms: u32, now_ms: u64) {
        let transit = i128::from(now_ms) * 1000 - i128::from(frame.timestamp_us);
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs() as f64 / 1000.0;
            self.stats.jitter_ms += (d - self.stats.jitter_ms) / 16.0;
        }
        self.last_transit = Some(transit);
        self.min_transit = Some(self.min_transit.map_or(transit, |m| m.min(transit)));
        let seq = frame.seq;
        if seq - self.next.min(seq) > MAX_AHEAD {
            self.stats.rejected += 1;
            return;
        }
        if seq < self.next {
            if self.given_up.remove(&seq) {
                self.stats.lost = self.stats.lost.saturating_sub(1);
                self.stats.late += 1;
                self.stats.received += 1;
            } else {
                self.stats.duplicates += 1;
            }
            return;
        }
        if self.held.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        self.stats.received += 1;
        let deadline_us = frame
            .timestamp_us
            .saturating_add(u64::from(deadline_ms) * 1000);
        self.held.insert(
            seq,
            Held {
                frame,
                arrived_ms: now_ms,
                deadline_us,
            },
        );
    }

    fn give_up(&mut self, from: u64, to: u64, out: &mut Vec<Received>) {
        if to <= from {
            return;
        }
        let count = to - from;
        self.stats.lost += count;
        for s in from.max(to.saturating_sub(GIVEN_UP_KEPT as u64))..to {
            self.given_up.insert(s);
        }
        while self.given_up.len() > GIVEN_UP_KEPT {
            self.given_up.pop_first();
        }
        match out.last_mut() {
            Some(Received::Gap { from: f, count: c }) if *f + *c == from => *c += count,
            _ => out.push(Received::Gap { from, count }),
        }
    }

    /// What is ready at `now_ms`: frames in order, gaps given up (waited
    /// out, or over the buffer), frames past their deadline dropped.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Received> {
        let mut out = Vec::new();
        let sender_now = self.sender_now_us(now_ms);
        while let Some((&seq, held)) = self.held.first_key_value() {
            if i128::from(held.deadline_us) < sender_now {
                // Of no use any more: dropped, and whatever it waited for
                // with it.
                let stale = seq;
                self.give_up(self.next, stale, &mut out);
                self.held.remove(&stale);
                self.stats.too_old += 1;
                self.next = stale.saturating_add(1);
                continue;
            }
            if seq == self.next {
                let Some(h) = self.held.remove(&seq) else {
                    break;
                };
                self.next = seq.saturating_add(1);
                self.stats.delivered += 1;
                out.push(Received::Frame(h.frame));
                continue;
            }
            // A gap before `seq`: wait for it within the jitter window,
            // unless the buffer is full.
            let waited = now_ms.saturating_sub(held.arrived_ms);
            if waited >= u64::from(self.settings.jitter_ms)
                || self.held.len() > self.settings.max_buffered
            {
                self.give_up(self.next, seq, &mut out);
                self.next = seq;
                continue;
            }
            break;
        }
        out
    }

    /// The stream ended: whatever is held is yielded (in order, with its
    /// gaps), and the counts are final.
    pub fn finish(&mut self, now_ms: u64) -> Vec<Received> {
        let mut out = self.poll(now_ms);
        while let Some((seq, h)) = self.held.pop_first() {
            self.give_up(self.next, seq, &mut out);
            self.next = seq.saturating_add(1);
            self.stats.delivered += 1;
            out.push(Received::Frame(h.frame));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> FrameRecord {
        FrameRecord {
            seq,
            timestamp_us: seq * 20_000,
            key: false,
            payload: vec![seq as u8],
        }
    }

    fn seqs(out: &[Received]) -> Vec<i64> {
        out.iter()
            .map(|r| match r {
                Received::Frame(f) => f.seq as i64,
                Received::Gap { count, .. } => -(*count as i64),
            })
            .collect()
    }

    #[test]
    fn reordered_frames_come_out_in_order() {
        let mut r = MediaReceiver::new(ReceiverSettings::default());
        for (s, at) in [(0, 0), (2, 41), (1, 42), (3, 60)] {
            r.push(frame(s), 10_000, at);
        }
        assert_eq!(seqs(&r.poll(60)), vec![0, 1, 2, 3]);
        let st = r.stats();
        assert_eq!((st.received, st.delivered, st.lost, st.late), (4, 4, 0, 0));
    }

    #[test]
    fn a_gap_waits_out_the_jitter_window_then_counts_as_lost_and_late_if_it_comes() {
        let mut r = MediaReceiver::new(ReceiverSettings::default());
        r.push(frame(0), 10_000, 0);
        r.push(frame(2), 10_000, 40);
        assert_eq!(seqs(&r.poll(40)), vec![0]);
        assert_eq!(seqs(&r.poll(99)), Vec::<i64>::new(), "within the window");
        assert_eq!(seqs(&r.poll(100)), vec![-1, 2]);
        assert_eq!(r.stats().lost, 1);
        // Frame 1 after all: late, not lost.
        r.push(frame(1), 10_000, 120);
        assert!(r.poll(120).is_empty());
        let st = r.stats();
        assert_eq!((st.lost, st.late, st.delivered), (0, 1, 2));
        r.push(frame(2), 10_000, 121);
        assert_eq!(r.stats().duplicates, 1);
    }

    #[test]
    fn nothing_past_its_deadline_is_yielded() {
        let mut r = MediaReceiver::new(ReceiverSettings::default());
        // Timestamps in step with arrival (transit 0), deadline 100 ms.
        r.push(frame(0), 100, 0);
        assert_eq!(seqs(&r.poll(0)), vec![0]);
        // Frame 2 arrives on time, frame 1 never; by the time the jitter
        // window would give 1 up, 2 is still fresh.
        r.push(frame(2), 100, 45);
        assert_eq!(seqs(&r.poll(105)), vec![-1, 2]);
        // Frame 3 (timestamp 60 ms) comes 200 ms late: too old.
        r.push(frame(3), 100, 260);
        assert_eq!(seqs(&r.poll(260)), Vec::<i64>::new());
        assert_eq!(r.stats().too_old, 1);
        assert_eq!(r.stats().delivered, 2);
    }

    #[test]
    fn sequence_numbers_far_ahead_or_at_the_end_of_the_range_change_nothing() {
        // Found by the fuzzer: u64::MAX overflowed the next number.
        let mut r = MediaReceiver::new(ReceiverSettings::default());
        r.push(frame(0), 100, 0);
        for seq in [u64::MAX, u64::MAX - 1, 1 << 40] {
            let mut f = frame(1);
            f.seq = seq;
            r.push(f, 100, 1);
        }
        assert_eq!(seqs(&r.poll(1)), vec![0]);
        assert_eq!(seqs(&r.poll(10_000)), Vec::<i64>::new());
        let st = r.stats();
        assert_eq!((st.rejected, st.lost, st.delivered), (3, 0, 1));
        assert!(r.finish(20_000).is_empty());
    }

    #[test]
    fn a_full_buffer_gives_up_the_oldest_gap() {
        let settings = ReceiverSettings {
            jitter_ms: 10_000,
            max_buffered: 4,
        };
        let mut r = MediaReceiver::new(settings);
        for s in 1..=6 {
            r.push(frame(s), 1_000_000, 0);
        }
        assert_eq!(seqs(&r.poll(0)), vec![-1, 1, 2, 3, 4, 5, 6]);
        assert_eq!(r.stats().lost, 1);
    }

    #[test]
    fn loss_is_counted_exactly_under_random_drops_and_reordering() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut r = MediaReceiver::new(ReceiverSettings::default());
        let mut arrivals: Vec<(u64, u64)> = Vec::new();
        let mut dropped = 0;
        for s in 0..3000u64 {
            if rng.random_range(0..100) < 5 {
                dropped += 1;
                continue;
            }
            // Sent every 20 ms, 0–30 ms of delay: reordering.
            arrivals.push((s * 20 + rng.random_range(0..30), s));
        }
        arrivals.sort();
        let mut delivered = Vec::new();
        for (at, s) in arrivals {
            r.push(frame(s), 10_000, at);
            delivered.extend(r.poll(at));
        }
        delivered.extend(r.finish(100_000));
        let st = r.stats();
        assert_eq!(st.lost, dropped, "{st:?}");
        let frames: Vec<u64> = delivered
            .iter()
            .filter_map(|x| match x {
                Received::Frame(f) => Some(f.seq),
                Received::Gap { .. } => None,
            })
            .collect();
        assert!(frames.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(st.delivered + st.late, 3000 - dropped);
        assert!(st.jitter_ms > 0.0);
    }
}
