//! The snapshot in force, swapped whole by a reload, and what the last reload did.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use super::diff::{Changes, HeldBack};
use super::Snapshot;
use crate::config::ConfigError;

/// The current snapshot; readers never block, and a swap never waits for them.
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    /// The version in force, for tasks that follow the config.
    versions: watch::Sender<u64>,
    last_reload: Mutex<Option<Arc<ReloadReport>>>,
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The config file (or a certificate it names) changed.
    File,
    /// `SIGHUP`.
    Signal,
    /// `POST /reload` on the admin API.
    Admin,
}

/// What one reload did: applied (with what it changed and what it held back) or refused
/// (with every error; the config in force did not change).
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// What asked for it.
    pub trigger: Trigger,
    /// When it finished, RFC 3339 UTC.
    pub at: String,
    /// `ok` or `error`.
    pub result: &'static str,
    /// The config version in force afterwards.
    pub version: u64,
    /// The digest of the file that was read (absent when it could not be read).
    pub digest: Option<String>,
    /// Why it was refused.
    pub errors: Vec<ConfigError>,
    /// Settings that changed but apply only at a restart; their old values stay.
    pub needs_restart: Vec<HeldBack>,
    /// What changed.
    pub changes: Changes,
}

impl ConfigStore {
    /// Starts with the first snapshot, as version 1.
    pub fn new(mut first: Snapshot) -> Self {
        first.version = 1;
        Self {
            current: ArcSwap::from_pointee(first),
            versions: watch::Sender::new(1),
            last_reload: Mutex::new(None),
        }
    }

    /// The snapshot to use for one whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes `next` (already activated) as the next version; requests that started on
    /// the old one finish on it. Returns the published snapshot.
    pub fn swap(&self, mut next: Snapshot) -> Arc<Snapshot> {
        next.version = self.current.load().version + 1;
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.versions.send_replace(next.version);
        next
    }

    /// Follows the version in force: changes after each swap.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// Records what a reload did, for `/status`.
    pub fn record(&self, report: ReloadReport) -> Arc<ReloadReport> {
        let report = Arc::new(report);
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        report
    }

    /// What the last reload did, if there was one.
    pub fn last_reload(&self) -> Option<Arc<ReloadReport>> {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
