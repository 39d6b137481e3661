//! The retry policy (docs/DESIGN.md §3), pure: a function of the attempt count and a random
//! draw, so it is tested without clocks or databases.

use std::time::Duration;

/// The delay before the next attempt after `attempts` claims have failed transiently:
/// `min(max, base · 2^(attempts-1))`, scaled by `0.5 + jitter/2` with `jitter` in
/// `[0, 1)` ("equal jitter": never more than the cap, never less than half of it), so
/// workers that failed together do not retry together.
pub fn backoff(attempts: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(62);
    let raw = base.as_secs_f64() * 2f64.powi(exp as i32);
    let capped = raw.min(max.as_secs_f64());
    let j = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    Duration::from_secs_f64(capped * (0.5 + j / 2.0))
}

/// A small, fast, non-cryptographic random source (splitmix64) for jitter: jitter does
/// not need a dependency.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// Seeded from the clock and a uuid, different in every thread and process.
    pub fn from_entropy() -> Jitter {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let u = uuid::Uuid::now_v7().as_u64_pair().1;
        Jitter(nanos ^ u)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn doubles_from_the_base_and_stops_at_the_cap() {
        // jitter 1.0 is the top of the range: the undamped value.
        assert_eq!(backoff(1, BASE, MAX, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(2, BASE, MAX, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, BASE, MAX, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(7, BASE, MAX, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(1000, BASE, MAX, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(0, BASE, MAX, 1.0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        let mut j = Jitter::new(7);
        for attempts in 1..20 {
            let full = backoff(attempts, BASE, MAX, 1.0);
            for _ in 0..100 {
                let d = backoff(attempts, BASE, MAX, j.next_f64());
                assert!(d >= full / 2 && d <= full, "{attempts}: {d:?} vs {full:?}");
            }
        }
        assert_eq!(backoff(3, BASE, MAX, f64::NAN), backoff(3, BASE, MAX, 0.0));
    }

    #[test]
    fn jitter_source_is_uniform_enough() {
        let mut j = Jitter::new(42);
        let draws: Vec<f64> = (0..10_000).map(|_| j.next_f64()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
