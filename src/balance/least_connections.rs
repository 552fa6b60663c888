//! Weighted least connections, as Envoy's `least_request` does it: the backend with the fewest
//! requests in flight per unit of weight wins. Small pools are scanned in full; larger ones
//! compare two random choices, which is nearly as good and costs the same at any size.
//!
//! Slow start cannot work through the load alone: at low concurrency every backend has nothing
//! in flight, so a ramping backend's smaller weight would lose every comparison and then get a
//! full share at once. Instead the load uses the configured weight, and a ramping backend is a
//! candidate for each pick with probability equal to its current share.

use super::{BackendId, BackendView, Balancer};

/// Pools up to this size are scanned in full.
pub const FULL_SCAN: usize = 8;

/// Weighted least connections.
#[derive(Debug, Default)]
pub struct LeastConnections;

/// Lower is better: in-flight requests (plus the one being placed) per unit of weight.
fn load(view: &dyn BackendView, id: BackendId) -> f64 {
    (view.in_flight(id) + 1) as f64 / f64::from(view.full_weight(id).max(1))
}

/// Whether `id` is a candidate for this pick: usable and, in slow start (unless `ramp` is
/// off), drawn with the probability of its share.
fn candidate(view: &dyn BackendView, id: BackendId, ramp: bool) -> bool {
    view.usable(id)
        && (!ramp || {
            let share = view.share(id);
            share >= 1.0 || fastrand::f64() < share
        })
}

/// The less loaded of two distinct random candidates; `None` if random probing finds none
/// (the caller then scans).
fn two_choices(view: &dyn BackendView, n: usize) -> Option<BackendId> {
    let probe = |skip: Option<BackendId>| {
        (0..n)
            .map(|_| fastrand::usize(..n))
            .find(|id| Some(*id) != skip && candidate(view, *id, true))
    };
    let a = probe(None)?;
    let b = probe(Some(a)).unwrap_or(a);
    Some(if load(view, b) < load(view, a) { b } else { a })
}

/// The least loaded candidate; ties are broken at random so idle pools do not all pick the
/// first.
fn scan(view: &dyn BackendView, ramp: bool) -> Option<BackendId> {
    let mut best: Option<(f64, BackendId)> = None;
    let mut tied = 0;
    for id in (0..view.len()).filter(|id| candidate(view, *id, ramp)) {
        let l = load(view, id);
        match best {
            Some((b, _)) if l > b => {}
            Some((b, _)) if l == b => {
                tied += 1;
                if fastrand::usize(..tied) == 0 {
                    best = Some((l, id));
                }
            }
            _ => {
                best = Some((l, id));
                tied = 1;
            }
        }
    }
    best.map(|(_, id)| id)
}

impl Balancer for LeastConnections {
    fn select(&self, view: &dyn BackendView, _key: Option<&[u8]>) -> Option<BackendId> {
        if view.len() > FULL_SCAN {
            if let Some(id) = two_choices(view, view.len()) {
                return Some(id);
            }
        }
        // When only ramping backends are usable and none was drawn, one of them anyway.
        scan(view, true).or_else(|| scan(view, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::FixedView;

    #[test]
    fn picks_the_least_loaded_per_weight() {
        let mut view = FixedView::weighted(&[1, 1, 2]);
        view.in_flight = vec![3, 1, 3];
        // loads: 4/1, 2/1, 4/2 → backend 1 and 2 tie at 2; backend 0 never wins.
        let mut counts = [0; 3];
        for _ in 0..200 {
            counts[LeastConnections.select(&view, None).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1] > 50 && counts[2] > 50, "{counts:?}");
        view.in_flight = vec![0, 5, 5];
        assert_eq!(LeastConnections.select(&view, None), Some(0));
        view.down = vec![0];
        assert!(LeastConnections
            .select(&view, None)
            .is_some_and(|id| id != 0));
        view.down = vec![0, 1, 2];
        assert_eq!(LeastConnections.select(&view, None), None);
    }

    /// A simulated pool where one backend completes a tenth of a request per tick while the
    /// others complete two, and as many requests arrive per tick as there are backends: the
    /// slow one cannot take its fair share, and must be given far less. Bounded skew, not an
    /// exact count.
    fn slow_backend_share(backends: usize) -> f64 {
        let mut view = FixedView::weighted(&vec![1; backends]);
        let mut picks = vec![0usize; backends];
        for tick in 0..5_000 {
            for id in 0..backends {
                let done = if id == 0 {
                    u64::from(tick % 10 == 0)
                } else {
                    2
                };
                view.in_flight[id] = view.in_flight[id].saturating_sub(done);
            }
            for _ in 0..backends {
                let id = LeastConnections.select(&view, None).unwrap();
                view.in_flight[id] += 1;
                picks[id] += 1;
            }
        }
        picks[0] as f64 / picks.iter().sum::<usize>() as f64
    }

    #[test]
    fn a_slow_backend_gets_a_small_share() {
        for backends in [3, 16] {
            let share = slow_backend_share(backends);
            let fair = 1.0 / backends as f64;
            assert!(
                share < fair / 4.0,
                "{backends} backends: slow share {share:.3}, fair {fair:.3}"
            );
        }
    }

    #[test]
    fn slow_start_ramps_the_share_even_when_idle() {
        // Two idle backends, one at 10% of its slow start: it is a candidate a tenth of the
        // time and then wins half of the ties, about 5% of the picks, not nothing.
        let mut view = FixedView::weighted(&[1, 1]);
        view.shares = vec![0.1, 1.0];
        let ramping = (0..10_000)
            .filter(|_| LeastConnections.select(&view, None) == Some(0))
            .count();
        assert!((200..900).contains(&ramping), "{ramping} of 10000");
        view.shares = vec![0.5, 1.0];
        let ramping = (0..10_000)
            .filter(|_| LeastConnections.select(&view, None) == Some(0))
            .count();
        assert!((2_000..3_000).contains(&ramping), "{ramping} of 10000");
        // Alone, a ramping backend still serves.
        view.down = vec![1];
        assert_eq!(LeastConnections.select(&view, None), Some(0));
    }
}
