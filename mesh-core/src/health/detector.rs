//! Liveness: a phi-accrual failure detector (Hayashibara et al., 2004) with a
//! fixed "missed intervals" rule while it has too few samples (R-HEALTH3).
//!
//! The detector learns the distribution of heartbeat inter-arrival times
//! (mean and standard deviation over a sliding window) and turns "time since
//! the last heartbeat" into a suspicion level phi = -log10(P(a heartbeat
//! arrives even later)). phi 1 means a 10 % chance the device is merely late,
//! phi 8 one in 10^8. A device is suspected (offline) once phi reaches the
//! threshold. Unlike "N missed periods", the same threshold adapts to each
//! device's real jitter. Sans-IO: time is passed in.

use std::collections::VecDeque;
use std::time::Duration;

use crate::clock::Timestamp;

/// Detector settings. [`DetectorConfig::for_interval`] derives sensible
/// values from the heartbeat interval.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DetectorConfig {
    /// Suspect the device once phi reaches this. Default 8.
    pub threshold: f64,
    /// Inter-arrival samples kept. Default 200.
    pub max_samples: usize,
    /// Floor for the learned standard deviation, ms, so a very regular device
    /// is not suspected after a tiny delay. Default: a tenth of the interval,
    /// at least 100 ms.
    pub min_std_dev_ms: f64,
    /// Extra pause tolerated on top of the mean, ms (GC, radio wake-up).
    /// Default: half the interval.
    pub acceptable_pause_ms: f64,
    /// Below this many samples the fixed rule decides. Default 3.
    pub min_samples: usize,
    /// Fixed rule: offline after this many missed intervals. Default 3.
    pub fallback_missed_intervals: u32,
    /// The configured heartbeat interval, ms.
    pub expected_interval_ms: f64,
}

impl DetectorConfig {
    /// Settings for devices that send a heartbeat every `interval`.
    pub fn for_interval(interval: Duration) -> Self {
        let ms = interval.as_secs_f64() * 1000.0;
        DetectorConfig {
            threshold: 8.0,
            max_samples: 200,
            min_std_dev_ms: (ms / 10.0).max(100.0),
            acceptable_pause_ms: ms / 2.0,
            min_samples: 3,
            fallback_missed_intervals: 3,
            expected_interval_ms: ms,
        }
    }

    /// Sets the phi threshold.
    pub fn threshold(mut self, phi: f64) -> Self {
        self.threshold = phi;
        self
    }
}

impl Default for DetectorConfig {
    /// For the default 30 s heartbeat.
    fn default() -> Self {
        Self::for_interval(Duration::from_secs(30))
    }
}

/// One device's detector state.
#[derive(Debug, Clone, Default)]
pub struct PhiDetector {
    intervals: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last: Option<Timestamp>,
}

impl PhiDetector {
    /// A detector that has seen no heartbeat.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a heartbeat at `now`. A heartbeat that appears to come from
    /// the past (clock stepped back) restarts the interval without a sample.
    pub fn heartbeat(&mut self, now: Timestamp, config: &DetectorConfig) {
        if let Some(last) = self.last
            && now > last
        {
            let ms = now.saturating_duration_since(last).as_secs_f64() * 1000.0;
            self.intervals.push_back(ms);
            self.sum += ms;
            self.sum_sq += ms * ms;
            while self.intervals.len() > config.max_samples.max(1) {
                if let Some(old) = self.intervals.pop_front() {
                    self.sum -= old;
                    self.sum_sq -= old * old;
                }
            }
        }
        self.last = Some(now);
    }

    /// When the last heartbeat arrived.
    pub fn last_heartbeat(&self) -> Option<Timestamp> {
        self.last
    }

    /// Inter-arrival samples held.
    pub fn samples(&self) -> usize {
        self.intervals.len()
    }

    /// The suspicion level at `now`: 0 just after a heartbeat, growing while
    /// none comes; infinite once the fixed rule (too few samples) says offline.
    pub fn phi(&self, now: Timestamp, config: &DetectorConfig) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        let elapsed = now.saturating_duration_since(last).as_secs_f64() * 1000.0;
        if self.intervals.len() < config.min_samples.max(1) {
            let limit = config.expected_interval_ms * f64::from(config.fallback_missed_intervals);
            return if elapsed > limit { f64::INFINITY } else { 0.0 };
        }
        let n = self.intervals.len() as f64;
        let mean = self.sum / n + config.acceptable_pause_ms;
        let variance = (self.sum_sq / n - (self.sum / n).powi(2)).max(0.0);
        let std = variance.sqrt().max(config.min_std_dev_ms).max(1e-3);
        phi_normal(elapsed, mean, std)
    }

    /// Whether the device counts as alive at `now`.
    pub fn is_available(&self, now: Timestamp, config: &DetectorConfig) -> bool {
        self.phi(now, config) < config.threshold
    }
}

/// -log10 of the probability that a normally distributed delay with this
/// mean and standard deviation exceeds `elapsed`. The normal tail uses the
/// logistic approximation of the CDF, `1 / (1 + e^(-y (1.5976 + 0.070566 y²)))`,
/// accurate to ~1e-4 and cheap.
fn phi_normal(elapsed: f64, mean: f64, std: f64) -> f64 {
    let y = (elapsed - mean) / std;
    let e = (-y * (1.5976 + 0.070566 * y * y)).exp();
    let p_later = if elapsed > mean {
        e / (1.0 + e)
    } else {
        1.0 - 1.0 / (1.0 + e)
    };
    if p_later <= 0.0 || !p_later.is_finite() {
        f64::INFINITY
    } else {
        -p_later.log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_000_000 + ms)
    }

    #[test]
    fn fixed_rule_until_enough_samples() {
        let cfg = DetectorConfig::for_interval(Duration::from_secs(1));
        let mut d = PhiDetector::new();
        assert_eq!(d.phi(at(0), &cfg), 0.0); // never heard of: not suspected
        d.heartbeat(at(0), &cfg);
        d.heartbeat(at(1000), &cfg);
        assert_eq!(d.samples(), 1);
        // Three intervals (3 s) after the last heartbeat: still up; just past: down.
        assert!(d.is_available(at(4000), &cfg));
        assert!(!d.is_available(at(4001), &cfg));
    }

    #[test]
    fn phi_grows_with_silence_and_resets_on_heartbeat() {
        let cfg = DetectorConfig::for_interval(Duration::from_secs(1));
        let mut d = PhiDetector::new();
        for i in 0..20 {
            d.heartbeat(at(i * 1000), &cfg);
        }
        let last = 19_000;
        let mut prev = -1.0;
        for dt in (0..5000).step_by(100) {
            let p = d.phi(at(last + dt), &cfg);
            assert!(p >= prev, "phi must not fall while silent");
            prev = p;
        }
        // With 1 s beats: mean 1 s + 0.5 s pause, std floor 0.1 s → phi 8 near 2.06 s.
        assert!(d.is_available(at(last + 1900), &cfg));
        assert!(!d.is_available(at(last + 2200), &cfg));
        d.heartbeat(at(last + 2300), &cfg);
        assert!(d.phi(at(last + 2300), &cfg) < 1.0);
    }

    #[test]
    fn jittery_devices_get_more_slack() {
        let cfg = DetectorConfig::for_interval(Duration::from_secs(1));
        let mut steady = PhiDetector::new();
        let mut jittery = PhiDetector::new();
        let mut t_j = 0;
        for i in 0..100u64 {
            steady.heartbeat(at(i * 1000), &cfg);
            t_j += if i % 2 == 0 { 400 } else { 1600 };
            jittery.heartbeat(at(t_j), &cfg);
        }
        let silence = 3000;
        assert!(steady.phi(at(99_000 + silence), &cfg) > jittery.phi(at(t_j + silence), &cfg));
    }

    #[test]
    fn the_window_is_bounded_and_clock_steps_back_are_harmless() {
        let cfg = DetectorConfig::for_interval(Duration::from_secs(1));
        let mut d = PhiDetector::new();
        for i in 0..1000 {
            d.heartbeat(at(i * 1000), &cfg);
        }
        assert_eq!(d.samples(), cfg.max_samples);
        d.heartbeat(at(500), &cfg); // the clock went back
        assert_eq!(d.samples(), cfg.max_samples);
        assert!(d.phi(at(500), &cfg).is_finite());
    }
}
