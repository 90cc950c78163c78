//! Reconnection delays: exponential backoff with jitter (sans-IO).

use std::time::Duration;

/// Exponential backoff with "equal jitter": the n-th delay is drawn from
/// `[d/2, d]` where `d = min(max, base · 2^n)`, so a fleet of workers that
/// lost the primary at once does not come back in lockstep, yet no delay
/// collapses to zero.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// Delays from `base` doubling up to `max`; `seed` drives the jitter.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Backoff {
            base: base.max(Duration::from_millis(1)),
            max: max.max(base),
            attempt: 0,
            // splitmix64 of the seed: distinct seeds give distinct streams.
            rng: {
                let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) | 1
            },
        }
    }

    fn unit(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(self.unit())
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            let d = b.next_delay();
            ceilings.push(d);
        }
        let expected = [100u64, 200, 400, 800, 1600, 2000, 2000, 2000];
        for (d, c) in ceilings.iter().zip(expected) {
            let c = Duration::from_millis(c);
            assert!(*d >= c / 2 && *d <= c, "{d:?} not in [{:?}, {c:?}]", c / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let delays: std::collections::HashSet<u128> = (0..50u64)
            .map(|seed| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), seed);
                b.next_delay();
                b.next_delay().as_micros()
            })
            .collect();
        assert!(delays.len() > 40, "{} distinct delays of 50", delays.len());
    }
}
