//! Backend selection. Each algorithm lives in its own file behind [`Balancer`]; what it may
//! know about the backends comes through [`BackendView`].

mod consistent_hash;
mod least_connections;
mod round_robin;

pub use consistent_hash::ConsistentHash;
pub use least_connections::LeastConnections;
pub use round_robin::SmoothWeightedRoundRobin;

/// Index of a backend within its pool's backend list.
pub type BackendId = usize;

/// Weight units per configured weight point, so slow start can ramp a weight-1 backend from
/// 10% to 100% in whole numbers.
pub const WEIGHT_SCALE: u32 = 100;

/// A pool's backends as one selection sees them.
pub trait BackendView {
    /// How many backends there are; ids run from 0 to `len() - 1`.
    fn len(&self) -> usize;
    /// Whether the pool has no backends at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether this backend may take the request (healthy, not ejected, not already tried).
    fn usable(&self, id: BackendId) -> bool;
    /// Effective weight now, in [`WEIGHT_SCALE`] units per configured point (at least 1):
    /// the configured weight, scaled down while the backend is in slow start.
    fn weight(&self, id: BackendId) -> u32;
    /// The configured weight in [`WEIGHT_SCALE`] units, whatever slow start says.
    fn full_weight(&self, id: BackendId) -> u32;
    /// The share of its full weight a backend in slow start has now (1 when it is not).
    /// Balancers that do not weigh backends by [`Self::weight`] apply slow start with it.
    fn share(&self, id: BackendId) -> f64 {
        (f64::from(self.weight(id)) / f64::from(self.full_weight(id).max(1))).min(1.0)
    }
    /// Requests in flight to this backend now.
    fn in_flight(&self, id: BackendId) -> u64;
}

/// Chooses a backend for one request.
pub trait Balancer: Send + Sync {
    /// A usable backend, or `None` when there is none. `key` is the request's hash key, for
    /// balancers that use one.
    fn select(&self, view: &dyn BackendView, key: Option<&[u8]>) -> Option<BackendId>;
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fixed [`BackendView`] for balancer tests.

    use super::*;

    /// Backends with weights, slow-start shares, in-flight counts and a set of unusable ids.
    pub struct FixedView {
        pub weights: Vec<u32>,
        pub shares: Vec<f64>,
        pub in_flight: Vec<u64>,
        pub down: Vec<BackendId>,
    }

    impl FixedView {
        /// Every backend usable and idle, with these configured weights.
        pub fn weighted(weights: &[u32]) -> Self {
            Self {
                weights: weights.iter().map(|w| w * WEIGHT_SCALE).collect(),
                shares: vec![1.0; weights.len()],
                in_flight: vec![0; weights.len()],
                down: Vec::new(),
            }
        }
    }

    impl BackendView for FixedView {
        fn len(&self) -> usize {
            self.weights.len()
        }
        fn usable(&self, id: BackendId) -> bool {
            !self.down.contains(&id)
        }
        fn weight(&self, id: BackendId) -> u32 {
            ((f64::from(self.weights[id]) * self.shares[id]) as u32).max(1)
        }
        fn full_weight(&self, id: BackendId) -> u32 {
            self.weights[id]
        }
        fn in_flight(&self, id: BackendId) -> u64 {
            self.in_flight[id]
        }
    }
}
