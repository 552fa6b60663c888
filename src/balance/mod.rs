//! Backend selection. Each algorithm lives in its own file behind [`Balancer`].

mod round_robin;

pub use round_robin::SmoothWeightedRoundRobin;

/// Index of a backend within its pool's backend list.
pub type BackendId = usize;

/// Chooses a backend for one request.
pub trait Balancer: Send + Sync {
    /// Picks among the backends for which `usable` returns true; `None` when none is.
    fn select(&self, usable: &dyn Fn(BackendId) -> bool) -> Option<BackendId>;
}
