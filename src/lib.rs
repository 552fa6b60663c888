//! kingdom-edge: the Kingdom Studios edge proxy on Pingora, and the sidecar services it fronts.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod errors;
pub mod forwarded;
pub mod health;
pub mod live;
pub mod metrics;
pub mod outlier;
pub mod pool;
pub mod preflight;
pub mod proxy;
pub mod request;
pub mod request_id;
pub mod retry;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod sidecar;
pub mod slow_start;
pub mod snapshot;
pub mod sticky;
pub mod supervisor;
pub mod tls;
