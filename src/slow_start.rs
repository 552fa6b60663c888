//! Slow start: a backend that joins or recovers ramps its effective weight from 10% to 100%
//! over `slow_start`, so a cold process is not handed its full share at once.

use std::time::{Duration, Instant};

use crate::balance::WEIGHT_SCALE;

/// Share of the weight a backend starts with.
pub const INITIAL_SHARE: f64 = 0.1;

/// The effective weight, in [`WEIGHT_SCALE`] units, of a backend with configured `weight`
/// that became available at `since`. No window, or no `since`, means full weight.
pub fn effective_weight(
    weight: u32,
    since: Option<Instant>,
    window: Option<Duration>,
    now: Instant,
) -> u32 {
    let full = weight.saturating_mul(WEIGHT_SCALE);
    let (Some(since), Some(window)) = (since, window) else {
        return full;
    };
    if window.is_zero() {
        return full;
    }
    let progress = now.saturating_duration_since(since).as_secs_f64() / window.as_secs_f64();
    if progress >= 1.0 {
        return full;
    }
    let share = INITIAL_SHARE + (1.0 - INITIAL_SHARE) * progress;
    ((f64::from(full) * share) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_from_ten_percent_to_full() {
        let t0 = Instant::now();
        let window = Some(Duration::from_secs(30));
        let at = |secs| effective_weight(2, Some(t0), window, t0 + Duration::from_secs(secs));
        assert_eq!(at(0), 20);
        assert_eq!(at(15), 110);
        assert_eq!(at(30), 200);
        assert_eq!(at(300), 200);
        assert_eq!(effective_weight(2, None, window, t0), 200);
        assert_eq!(effective_weight(2, Some(t0), None, t0), 200);
    }
}
