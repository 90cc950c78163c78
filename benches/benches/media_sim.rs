//! Media streams (issue 17), the sans-IO core in virtual time: 30 fps video
//! at 1 Mbit/s (a key frame each second) plus 50 frames/s of audio, for
//! 60 s, over a simulated path that loses 5 % of frames and delays each by
//! 20 ms plus up to 40 ms of jitter (so frames also come out of order).
//! The sender groups, prioritises and bounds; the receiver orders, gives
//! gaps up and drops what is past its deadline. Checked and printed:
//!
//! - loss reported exactly: the receiver's `lost` equals the frames the
//!   path dropped (after the stream ends; frames that came after their
//!   turn count as `late`, not lost);
//! - nothing delivered older than its deadline (by the true clock of the
//!   simulation);
//! - latency from capture to delivery, p50 / p99, against the path's own
//!   delay (the baseline: what a receiver that never waited would see).
//!
//! This is the media core alone, in one process with a shared clock, not
//! the QUIC path (`tests/tests/integration/files_runtime.rs` moves media
//! over QUIC). `cargo bench -p mesh-benches --bench media_sim`; under
//! `cargo test --benches` it runs 10 s of media.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BinaryHeap;

use mesh_core::media::{
    FrameRecord, GroupHeader, MediaKind, MediaReceiver, MediaSender, Received, ReceiverSettings,
    SenderSettings, Submitted,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A frame on its way: arrives at `at` (ms).
#[derive(PartialEq, Eq)]
struct InFlight {
    at: u64,
    seq_tiebreak: u64,
    frame: FrameRecord,
    deadline_ms: u32,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first.
        (other.at, other.seq_tiebreak).cmp(&(self.at, self.seq_tiebreak))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Stream {
    kind: MediaKind,
    sender: MediaSender,
    receiver: MediaReceiver,
    /// Capture timestamps by sequence number (µs).
    captured: Vec<u64>,
    deadline_ms: u32,
    path: BinaryHeap<InFlight>,
    dropped: u64,
    delivered_latency_ms: Vec<u64>,
    path_latency_ms: Vec<u64>,
    late_deliveries: u64,
}

impl Stream {
    fn new(id: u32, kind: MediaKind) -> Self {
        let settings = SenderSettings::for_kind(kind);
        Stream {
            kind,
            deadline_ms: settings.deadline_ms,
            sender: MediaSender::new(id, kind, settings),
            receiver: MediaReceiver::new(ReceiverSettings::default()),
            captured: Vec::new(),
            path: BinaryHeap::new(),
            dropped: 0,
            delivered_latency_ms: Vec::new(),
            path_latency_ms: Vec::new(),
            late_deliveries: 0,
        }
    }

    /// Captures a frame at `now` (ms) and puts it on the path.
    fn capture(&mut self, now: u64, key: bool, len: usize, rng: &mut StdRng) {
        let ts = now * 1000;
        let Submitted::Send { seq, plan, bytes } =
            self.sender.submit(ts, key, vec![0u8; len], now).unwrap()
        else {
            return;
        };
        // A new group: the previous one is written and no longer counts.
        if let Some(GroupHeader { group, .. }) = plan.header
            && group > 0
        {
            self.sender.finished(group - 1);
        }
        assert_eq!(seq as usize, self.captured.len());
        self.captured.push(ts);
        if rng.random_range(0..100) < 5 {
            self.dropped += 1;
            return;
        }
        let delay = 20 + rng.random_range(0..40);
        self.path_latency_ms.push(delay);
        let frame = FrameRecord::decode(&bytes[4..]).unwrap();
        self.path.push(InFlight {
            at: now + delay,
            seq_tiebreak: seq,
            frame,
            deadline_ms: self.deadline_ms,
        });
    }

    fn deliver(&mut self, out: Vec<Received>, now: u64) {
        for r in out {
            if let Received::Frame(f) = r {
                let age = now - self.captured[f.seq as usize] / 1000;
                if age > u64::from(self.deadline_ms) {
                    self.late_deliveries += 1;
                }
                self.delivered_latency_ms.push(age);
            }
        }
    }

    /// Moves the path and the receiver to `now`.
    fn step(&mut self, now: u64) {
        while self.path.peek().is_some_and(|f| f.at <= now) {
            let f = self.path.pop().unwrap();
            self.receiver.push(f.frame, f.deadline_ms, f.at);
        }
        let out = self.receiver.poll(now);
        self.deliver(out, now);
    }
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let seconds: u64 = if full { 60 } else { 10 };
    let mut rng = StdRng::seed_from_u64(17);
    let mut video = Stream::new(1, MediaKind::Video);
    let mut audio = Stream::new(2, MediaKind::Audio);
    // 1 Mbit/s at 30 fps: 4,167 bytes a frame on average; key frames 5x.
    let (delta, key) = (3_600usize, 18_000usize);
    let end = seconds * 1000;
    for now in 0..end + 2_000 {
        if now < end {
            if now * 3 % 100 < 3 {
                let n = now * 30 / 1000;
                video.capture(
                    now,
                    n % 30 == 0,
                    if n % 30 == 0 { key } else { delta },
                    &mut rng,
                );
            }
            if now % 20 == 0 {
                audio.capture(now, false, 160, &mut rng);
            }
        }
        video.step(now);
        audio.step(now);
    }
    println!("## Media streams: the sans-IO core, {seconds} s of virtual time\n");
    println!(
        "path: 5 % of frames lost, 20 ms + 0–40 ms of delay (reordering); video 30 fps at ~1 Mbit/s, audio 50 frames/s\n"
    );
    println!(
        "| stream | frames | lost by the path | reported lost | late | too old | delivered past deadline | latency p50 / p99 | path delay p50 / p99 | deadline |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for s in [&mut video, &mut audio] {
        let out = s.receiver.finish(end + 10_000);
        // Frames held at the end come out now; they are not counted
        // against the deadline (the stream is over).
        let _ = out;
        let st = s.receiver.stats();
        let frames = s.captured.len();
        let (p50, p99) = (
            pct(&mut s.delivered_latency_ms, 0.5),
            pct(&mut s.delivered_latency_ms, 0.99),
        );
        let (b50, b99) = (
            pct(&mut s.path_latency_ms, 0.5),
            pct(&mut s.path_latency_ms, 0.99),
        );
        println!(
            "| {} | {frames} | {} | {} | {} | {} | {} | {p50} / {p99} ms | {b50} / {b99} ms | {} ms |",
            s.kind.as_str(),
            s.dropped,
            st.lost,
            st.late,
            st.too_old,
            s.late_deliveries,
            s.deadline_ms
        );
        assert_eq!(
            st.lost + st.too_old,
            s.dropped + st.too_old,
            "loss reported exactly"
        );
        assert_eq!(st.lost, s.dropped, "loss reported exactly");
        assert_eq!(s.late_deliveries, 0, "nothing past its deadline");
    }
}
