//! How long to wait after a failed look at the metadata service: doubling
//! from a short first retry (the link is often just coming up at boot) up
//! to a cap, with up to a quarter of jitter (so that guests whose host came
//! back do not all ask at once), and the poll interval after a success.

use std::time::Duration;

/// The longest wait between tries.
pub const MAX: Duration = Duration::from_secs(60);

/// The first retry after a failure.
pub const FIRST: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Backoff {
    /// The wait after a success (the poll interval).
    base: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration) -> Backoff {
        Backoff { base, failures: 0 }
    }

    /// How long to wait after a success.
    pub fn succeeded(&mut self) -> Duration {
        self.failures = 0;
        self.base
    }

    /// How long to wait after one more failure, before jitter: 1 s, 2 s,
    /// 4 s, … up to [`MAX`].
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << (self.failures - 1).min(16);
        FIRST.saturating_mul(factor).min(MAX)
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// `d` less up to a quarter, by `r` (any number: its low bits choose).
pub fn jitter(d: Duration, r: u64) -> Duration {
    let quarter = d.as_millis() as u64 / 4;
    if quarter == 0 {
        return d;
    }
    d - Duration::from_millis(r % quarter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_double_up_to_the_cap_and_a_success_resets() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.failures(), 9);
        assert_eq!(b.succeeded(), Duration::from_secs(5));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.failed(), Duration::from_secs(1));
        // Many failures never overflow.
        let mut b = Backoff::new(Duration::from_secs(3600));
        for n in 0..100 {
            assert_eq!(b.failed() == MAX, n >= 6, "{n}");
        }
    }

    #[test]
    fn jitter_takes_off_at_most_a_quarter() {
        let d = Duration::from_secs(8);
        for r in [0, 1, 1999, 2000, u64::MAX] {
            let j = jitter(d, r);
            assert!(j <= d && j > Duration::from_secs(6), "{r}: {j:?}");
        }
        assert_eq!(
            jitter(Duration::from_millis(3), 7),
            Duration::from_millis(3)
        );
    }
}
