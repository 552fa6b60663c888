//! Upstreams: pools of backends, the choice of a backend for each attempt, and the
//! bookkeeping of each attempt's outcome.

pub mod pool;

pub use pool::{Backend, Choice, HashKey, PanicMode, Pool, Timeouts, Unavailable, MAX_WEIGHT};
