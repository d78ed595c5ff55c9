//! Back-off with jitter for every retry loop (replication, etcd): one policy, from the `backon`
//! crate, so that a fleet of datanodes retrying the same thing never retries in step.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How long to wait before attempt `attempt` + 1 (`attempt` ≥ 1 failures so far): `min`
/// doubling up to `max`, plus up to as much again at random.
pub fn delay(attempt: u32, min: Duration, max: Duration) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1).min(64) as usize)
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_with_jitter_on_top() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        for attempt in 1..=20u32 {
            let base = (min * 2u32.pow(attempt.saturating_sub(1).min(20))).min(max);
            let d = delay(attempt, min, max);
            assert!(d >= base && d <= base * 2, "attempt {attempt}: {d:?} not in [{base:?}, {:?}]", base * 2);
        }
        // Jitter: the same attempt does not always wait the same.
        let samples: std::collections::BTreeSet<_> = (0..20).map(|_| delay(3, min, max)).collect();
        assert!(samples.len() > 1);
        assert!(delay(u32::MAX, min, max) <= max * 2);
    }
}
