//! Serde mirror of the YAML file. No logic lives here: `compile` turns it into runtime values.
//! Every struct refuses unknown keys, so a typo is an error instead of a silently ignored key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::units::{Dur, Size};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub listeners: Vec<RawListener>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub sidecars: Vec<RawSidecar>,
    pub pools: BTreeMap<String, RawPool>,
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub access_log: RawAccessLog,
}

/// `server:` process-wide settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Worker threads per listener service. Default: 2.
    pub threads: Option<usize>,
    /// How long SIGTERM waits for in-flight requests. Default: 30s.
    pub shutdown_timeout: Option<Dur>,
    /// Peers whose `X-Forwarded-*` headers are believed. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub address: String,
    pub tls: Option<RawTls>,
}

/// `listeners[].tls:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certificates: Vec<RawCertificate>,
    /// Offer HTTP/2 through ALPN. Default: true.
    pub http2: Option<bool>,
}

/// `listeners[].tls.certificates[]`: one PEM chain and its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `admin:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
}

/// One entry of `sidecars:`: a command started once per address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidecar {
    pub name: String,
    pub command: String,
    pub addresses: Vec<String>,
    /// Extra arguments after `--listen ADDR`. Default: none.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment variables. Default: none (the proxy's environment is inherited).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// One entry of `pools:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Default: weighted_round_robin.
    pub balance: Option<RawBalance>,
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
}

/// `pools.*.balance:`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawBalance {
    WeightedRoundRobin,
}

/// `pools.*.backends[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: String,
    /// Default: 1.
    pub weight: Option<u32>,
}

/// `pools.*.timeouts:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP connect. Default: 1s.
    pub connect: Option<Dur>,
    /// Between reads of the upstream response. Default: 30s.
    pub read: Option<Dur>,
    /// Between writes of the request to the upstream. Default: 30s.
    pub write: Option<Dur>,
    /// How long an idle upstream keep-alive connection is kept. Default: 60s.
    pub idle: Option<Dur>,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub pool: String,
    /// Largest request body accepted, e.g. `64KiB`. Default: no limit.
    pub max_body: Option<Size>,
}

/// `routes[].match:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    /// Exact (`api.example.com`) or wildcard (`*.example.com`). Default: any host.
    pub host: Option<String>,
    /// Default: `/`.
    pub path_prefix: Option<String>,
    /// Default: any method.
    pub methods: Option<Vec<String>>,
}

/// `access_log:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// `stdout`, `off`, or a file path. Default: stdout.
    pub output: Option<String>,
}
