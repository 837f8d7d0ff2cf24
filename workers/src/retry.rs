//! The retry schedule: exponential with jitter, computed with `backon`
//! (the maintained successor of the unmaintained `backoff` crate).
//! Retries are durable: the caller stores `next_attempt_at` and enqueues
//! a delayed job; no worker ever sleeps on a retry.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min: Duration,
    pub max: Duration,
    pub factor: f32,
}

impl RetryPolicy {
    #[must_use]
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            factor: 3.0,
        }
    }

    /// The wait after attempt `attempt` (1-based) failed. `retry_after`
    /// (a provider's rate limit) is a floor, clamped to the maximum.
    #[must_use]
    pub fn delay_after(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(self.factor)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max);
        backoff.max(retry_after.unwrap_or_default()).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_bounds() {
        let p = RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(3600));
        let first = p.delay_after(1, None);
        assert!(
            first >= Duration::from_secs(5) && first <= Duration::from_secs(10),
            "{first:?}"
        );
        let third = p.delay_after(3, None);
        assert!(third >= Duration::from_secs(45), "{third:?}");
        assert_eq!(p.delay_after(40, None), Duration::from_secs(3600));
    }

    #[test]
    fn a_rate_limit_is_a_floor_but_clamped() {
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60));
        assert!(p.delay_after(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(9999))),
            Duration::from_secs(60)
        );
    }
}
