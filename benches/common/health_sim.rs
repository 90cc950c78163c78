//! A deterministic simulation of heartbeats and failure detection: no
//! network, no clocks, no sleeping. Shared by `tests/health_simulation.rs`
//! (asserts the goals) and `benches/health_sim.rs` (prints the sweep).
//!
//! * Heartbeats leave every `interval`; each arrives with a delay drawn from a
//!   jitter model (normal, or long-tailed), and now and then a pause (a GC
//!   stop, a radio waking up) delays one by seconds.
//! * **False positives**: phi only grows between heartbeats, so the detector
//!   wrongly suspected a live device exactly when phi reached the threshold
//!   before the next heartbeat arrived. Counted per 1,000 device-hours.
//! * **Detection latency**: after a warm-up, the device crashes at a uniform
//!   moment after its last heartbeat; the latency is the time from the crash
//!   until phi reaches the threshold (found by bisection, phi being monotone),
//!   plus the runtime's tick period (the check happens on the next tick).
//! * The source design's rule ("offline after two missed periods", checked
//!   once per period) is simulated the same way for comparison.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::time::Duration;

use mesh_core::clock::Timestamp;
use mesh_core::health::{DetectorConfig, PhiDetector};

pub use mesh_benches::Rng;

/// How heartbeat delays vary.
#[derive(Debug, Clone, Copy)]
pub enum Jitter {
    /// Normal, standard deviation in ms.
    Normal { std_ms: f64 },
    /// Pareto tail: delay = scale · (U^(-1/alpha) − 1), ms (mostly small, sometimes seconds).
    LongTail { scale_ms: f64, alpha: f64 },
}

/// One scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub interval_ms: f64,
    pub jitter: Jitter,
    /// Chance per heartbeat of an extra pause, and its length range in ms.
    pub pause: Option<(f64, f64, f64)>,
}

impl Scenario {
    fn delay(&self, rng: &mut Rng) -> f64 {
        let mut d = match self.jitter {
            Jitter::Normal { std_ms } => rng.normal() * std_ms,
            Jitter::LongTail { scale_ms, alpha } => {
                scale_ms * (rng.unit().max(1e-12).powf(-1.0 / alpha) - 1.0)
            }
        };
        if let Some((p, lo, hi)) = self.pause
            && rng.unit() < p
        {
            d += lo + (hi - lo) * rng.unit();
        }
        d
    }

    /// Arrival times: send times every interval plus each one's delay (kept
    /// in order, as one stream delivers them).
    fn arrivals(&self, rng: &mut Rng, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n);
        let mut last = f64::MIN;
        for k in 0..n {
            let t = (k as f64 * self.interval_ms + self.delay(rng)).max(last + 1.0);
            out.push(t);
            last = t;
        }
        out
    }
}

/// The scenarios the sweep reports.
pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "1 s, normal jitter 100 ms",
            interval_ms: 1000.0,
            jitter: Jitter::Normal { std_ms: 100.0 },
            pause: None,
        },
        Scenario {
            name: "1 s, long-tailed jitter",
            interval_ms: 1000.0,
            jitter: Jitter::LongTail {
                scale_ms: 40.0,
                alpha: 2.5,
            },
            pause: None,
        },
        Scenario {
            name: "1 s, 100 ms jitter + 2-4 s pauses (1/h)",
            interval_ms: 1000.0,
            jitter: Jitter::Normal { std_ms: 100.0 },
            pause: Some((1.0 / 3600.0, 2000.0, 4000.0)),
        },
        Scenario {
            name: "30 s, normal jitter 100 ms",
            interval_ms: 30_000.0,
            jitter: Jitter::Normal { std_ms: 100.0 },
            pause: None,
        },
        Scenario {
            name: "30 s, 1 s jitter + 20-40 s pauses (1/h)",
            interval_ms: 30_000.0,
            jitter: Jitter::Normal { std_ms: 1000.0 },
            pause: Some((30.0 / 3600.0, 20_000.0, 40_000.0)),
        },
    ]
}

fn ts(ms: f64) -> Timestamp {
    Timestamp::from_millis(1_000_000_000 + ms.max(0.0) as u64)
}

/// What one detector did in one scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub false_positives_per_1000_h: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A detector under test: the phi-accrual one, or the fixed rule.
#[derive(Debug, Clone)]
pub enum Detector {
    Phi(DetectorConfig),
    /// Offline after `missed` periods, checked once per period.
    FixedRule {
        missed: f64,
    },
}

/// How often the runtime checks liveness, ms (the phi detector's tick).
pub fn tick_ms(interval_ms: f64) -> f64 {
    (interval_ms / 10.0).clamp(100.0, 1000.0)
}

pub fn run(
    s: &Scenario,
    det: &Detector,
    device_hours: f64,
    crash_trials: usize,
    seed: u64,
) -> Outcome {
    let mut rng = Rng::new(seed);
    let beats = ((device_hours * 3_600_000.0) / s.interval_ms) as usize;
    // False positives over one long stream of heartbeats.
    let mut fp = 0u64;
    match det {
        Detector::Phi(cfg) => {
            let mut d = PhiDetector::new();
            for t in s.arrivals(&mut rng, beats) {
                if d.last_heartbeat().is_some() && !d.is_available(ts(t - 1.0), cfg) {
                    fp += 1;
                }
                d.heartbeat(ts(t), cfg);
            }
        }
        Detector::FixedRule { missed } => {
            // Checked at period boundaries: suspected if, at a check, more
            // than `missed` periods passed since the last heartbeat.
            let arr = s.arrivals(&mut rng, beats);
            for w in arr.windows(2) {
                let (prev, next) = (w[0], w[1]);
                let first_check = (prev / s.interval_ms).floor() * s.interval_ms + s.interval_ms;
                let deadline = prev + missed * s.interval_ms;
                let mut c = first_check;
                while c < next {
                    if c > deadline {
                        fp += 1;
                        break;
                    }
                    c += s.interval_ms;
                }
            }
        }
    }
    // Detection latency after a crash.
    let mut lat = Vec::with_capacity(crash_trials);
    for _ in 0..crash_trials {
        let arr = s.arrivals(&mut rng, 300);
        let last = *arr.last().unwrap();
        let crash = last + rng.unit() * s.interval_ms;
        let detected = match det {
            Detector::Phi(cfg) => {
                let mut d = PhiDetector::new();
                for &t in &arr {
                    d.heartbeat(ts(t), cfg);
                }
                // Bisection for the first moment phi reaches the threshold.
                let (mut lo, mut hi) = (last, last + 1000.0 * s.interval_ms);
                for _ in 0..60 {
                    let mid = (lo + hi) / 2.0;
                    if d.is_available(ts(mid), cfg) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                // Seen on the next tick.
                let tick = tick_ms(s.interval_ms);
                (hi / tick).ceil() * tick
            }
            Detector::FixedRule { missed } => {
                let deadline = last + missed * s.interval_ms;
                (deadline / s.interval_ms).floor() * s.interval_ms + s.interval_ms
            }
        };
        lat.push((detected - crash).max(0.0));
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    Outcome {
        false_positives_per_1000_h: fp as f64 * 1000.0 / device_hours,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: *lat.last().unwrap(),
    }
}

/// The default configuration for a scenario's interval, at `threshold`.
pub fn phi(interval_ms: f64, threshold: f64) -> Detector {
    Detector::Phi(
        DetectorConfig::for_interval(Duration::from_secs_f64(interval_ms / 1000.0))
            .threshold(threshold),
    )
}

/// Like [`phi`], tolerating pauses of `pause_ms` on top of the mean.
pub fn phi_with_pause(interval_ms: f64, threshold: f64, pause_ms: f64) -> Detector {
    let mut cfg = DetectorConfig::for_interval(Duration::from_secs_f64(interval_ms / 1000.0))
        .threshold(threshold);
    cfg.acceptable_pause_ms = pause_ms;
    Detector::Phi(cfg)
}
