//! Smooth weighted round robin, as nginx does it: weights 5,1,1 give `a a b a c a a`,
//! spreading the heavy backend's turns instead of sending it five in a row. Effective
//! weights are read at every pick, so a slow-starting backend's share grows smoothly.

use std::sync::Mutex;

use super::{BackendId, BackendView, Balancer};

/// nginx's smooth weighted round robin.
pub struct SmoothWeightedRoundRobin {
    current: Mutex<Vec<i64>>,
}

impl SmoothWeightedRoundRobin {
    /// For a pool of `len` backends.
    pub fn new(len: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; len]),
        }
    }
}

impl Balancer for SmoothWeightedRoundRobin {
    fn select(&self, view: &dyn BackendView, _key: Option<&[u8]>) -> Option<BackendId> {
        // The lock guards a few integers for a few nanoseconds; a poisoned lock only means
        // another thread panicked mid-update, and the counters are still valid numbers.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = 0;
        let mut best: Option<BackendId> = None;
        for id in 0..view.len().min(current.len()) {
            if !view.usable(id) {
                continue;
            }
            let weight = i64::from(view.weight(id).max(1));
            current[id] += weight;
            total += weight;
            if best.is_none_or(|b| current[id] > current[b]) {
                best = Some(id);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::FixedView;

    fn sequence(balancer: &dyn Balancer, view: &FixedView, n: usize) -> String {
        (0..n)
            .map(|_| match balancer.select(view, None) {
                Some(id) => (b'a' + id as u8) as char,
                None => '-',
            })
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        let view = FixedView::weighted(&[5, 1, 1]);
        let balancer = SmoothWeightedRoundRobin::new(3);
        assert_eq!(sequence(&balancer, &view, 14), "aabacaaaabacaa");
    }

    #[test]
    fn exact_distribution_over_whole_cycles() {
        let cases: &[(&[u32], usize)] = &[(&[3, 1], 400), (&[1, 1, 1], 300), (&[7, 2, 1], 1000)];
        for (weights, n) in cases {
            let view = FixedView::weighted(weights);
            let balancer = SmoothWeightedRoundRobin::new(weights.len());
            let mut counts = vec![0usize; weights.len()];
            for _ in 0..*n {
                counts[balancer.select(&view, None).unwrap()] += 1;
            }
            let total: u32 = weights.iter().sum();
            let want: Vec<usize> = weights
                .iter()
                .map(|w| n * *w as usize / total as usize)
                .collect();
            assert_eq!(counts, want, "weights {weights:?}");
        }
    }

    #[test]
    fn skips_unusable_and_reports_none_when_empty() {
        let mut view = FixedView::weighted(&[5, 1, 1]);
        view.down = vec![0];
        let balancer = SmoothWeightedRoundRobin::new(3);
        assert_eq!(sequence(&balancer, &view, 4), "bcbc");
        view.down = vec![0, 1, 2];
        assert_eq!(balancer.select(&view, None), None);
    }

    #[test]
    fn follows_effective_weights() {
        // A backend at a tenth of its weight (slow start) gets a tenth of the share.
        let mut view = FixedView::weighted(&[1, 1]);
        view.weights[1] /= 10;
        let balancer = SmoothWeightedRoundRobin::new(2);
        let picks: Vec<_> = (0..110)
            .map(|_| balancer.select(&view, None).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|id| **id == 1).count(), 10);
    }
}
