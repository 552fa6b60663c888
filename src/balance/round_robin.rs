//! Smooth weighted round robin, as nginx does it: weights 5,1,1 give `a a b a c a a`,
//! spreading the heavy backend's turns instead of sending it five in a row.

use std::sync::Mutex;

use super::{BackendId, Balancer};

/// nginx's smooth weighted round robin over a fixed set of weights.
pub struct SmoothWeightedRoundRobin {
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

impl SmoothWeightedRoundRobin {
    /// One weight per backend, in backend order. Weights are at least 1.
    pub fn new(weights: &[u32]) -> Self {
        Self {
            weights: weights.iter().map(|w| i64::from(*w).max(1)).collect(),
            current: Mutex::new(vec![0; weights.len()]),
        }
    }
}

impl Balancer for SmoothWeightedRoundRobin {
    fn select(&self, usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId> {
        // The lock guards a few integers for a few nanoseconds; a poisoned lock only means
        // another thread panicked mid-update, and the counters are still valid numbers.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = 0;
        let mut best: Option<BackendId> = None;
        for (id, weight) in self.weights.iter().enumerate() {
            if !usable(id) {
                continue;
            }
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

    fn sequence(balancer: &dyn Balancer, n: usize, usable: &dyn Fn(BackendId) -> bool) -> String {
        (0..n)
            .map(|_| match balancer.select(usable) {
                Some(id) => (b'a' + id as u8) as char,
                None => '-',
            })
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        let balancer = SmoothWeightedRoundRobin::new(&[5, 1, 1]);
        assert_eq!(sequence(&balancer, 14, &|_| true), "aabacaaaabacaa");
    }

    #[test]
    fn exact_distribution_over_whole_cycles() {
        let cases: &[(&[u32], usize)] = &[(&[3, 1], 400), (&[1, 1, 1], 300), (&[7, 2, 1], 1000)];
        for (weights, n) in cases {
            let balancer = SmoothWeightedRoundRobin::new(weights);
            let mut counts = vec![0usize; weights.len()];
            for _ in 0..*n {
                counts[balancer.select(&|_| true).unwrap()] += 1;
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
        let balancer = SmoothWeightedRoundRobin::new(&[5, 1, 1]);
        assert_eq!(sequence(&balancer, 4, &|id| id != 0), "bcbc");
        assert_eq!(balancer.select(&|_| false), None);
    }
}
