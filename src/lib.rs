//! kingdom-edge: the Kingdom Studios edge proxy on Pingora, and the sidecar services it fronts.
//!
//! The modules are layers; each imports only the layers above it here (a test checks it):
//!
//! - `config`: the YAML mirror, units, YAML paths and lines, the error type.
//! - `metrics`: metric families and handles.
//! - policies, each compiling its own section, with a pure decision at its heart:
//!   `balance`, `slow_start`, `health`, `outlier`, `retry`, `sticky`, `request`,
//!   `forwarded`, `request_id`, `errors`, `access_log`, `tls`, `token`, `ratelimit`,
//!   `shed`, `validation`, `security`, `cache`.
//! - `sidecar`: the content and API services, and how the proxy launches them.
//! - `live`: state that outlives config snapshots.
//! - `upstream`: pools, the choice of a backend, the outcome of an attempt.
//! - `route`: routing.
//! - `snapshot`: compile (pure), activate, diff, store.
//! - `proxy`: the request pipeline on Pingora.
//! - `admin`: the admin API and status page.
//! - `runtime`: the running process (server, reload, health checks, sidecars, shutdown).

pub mod config;

pub mod metrics;

pub mod access_log;
pub mod balance;
pub mod cache;
pub mod errors;
pub mod forwarded;
pub mod health;
pub mod outlier;
pub mod ratelimit;
pub mod request;
pub mod request_id;
pub mod retry;
pub mod security;
pub mod shed;
pub mod slow_start;
pub mod sticky;
pub mod tls;
pub mod token;
pub mod validation;

pub mod sidecar;

pub mod live;

pub mod upstream;

pub mod route;

pub mod snapshot;

pub mod proxy;

pub mod admin;

pub mod runtime;
