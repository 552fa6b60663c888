//! Reloading the config file: read, compile and verify the whole file, hold back what only a
//! restart can change, load its certificates, then activate and publish it and bring the
//! background work in line (certificates, access log, sidecars, health checks, which follow
//! the store). Any error before the publish refuses the file and changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use tokio::sync::Mutex;

use super::supervisor::Supervisor;
use crate::access_log::{self, AccessLog};
use crate::config::{self, process_env, ConfigError};
use crate::live::LiveState;
use crate::snapshot::diff::{self, Changes};
use crate::snapshot::{self, ConfigStore, ReloadReport, Snapshot, Trigger};
use crate::tls::{self, CertificateStore, Certificates};

/// Applies config reloads, one at a time.
pub struct Reloader {
    path: PathBuf,
    store: Arc<ConfigStore>,
    live: Arc<LiveState>,
    access_log: Arc<AccessLog>,
    supervisor: Arc<Supervisor>,
    /// Each TLS listener's certificates, by listener name (the listeners are fixed at start).
    certificates: HashMap<String, Arc<CertificateStore>>,
    /// Held while a reload runs; holds the digest of the inputs last read (the file and
    /// the certificates it names), so a file event that changed nothing is skipped.
    last_inputs: Mutex<String>,
}

impl Reloader {
    /// A reloader for the config at `path`, whose text `text` is in force.
    pub fn new(
        path: PathBuf,
        text: &str,
        store: Arc<ConfigStore>,
        live: Arc<LiveState>,
        access_log: Arc<AccessLog>,
        supervisor: Arc<Supervisor>,
        certificates: HashMap<String, Arc<CertificateStore>>,
    ) -> Self {
        let last_inputs = inputs_digest(text, &store.load());
        Self {
            path,
            store,
            live,
            access_log,
            supervisor,
            certificates,
            last_inputs: Mutex::new(last_inputs),
        }
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The store the reloads publish to.
    pub fn store(&self) -> &Arc<ConfigStore> {
        &self.store
    }

    /// Reloads when the config file or a certificate it names differs from what was last
    /// read; `None` when nothing changed (an editor's temporary file, a touch).
    pub async fn reload_if_changed(&self, trigger: Trigger) -> Option<Arc<ReloadReport>> {
        let mut last = self.last_inputs.lock().await;
        let (path, current) = (self.path.clone(), self.store.load());
        let now = tokio::task::spawn_blocking(move || {
            let text = std::fs::read_to_string(path).ok()?;
            Some(inputs_digest(&text, &current))
        })
        .await
        .ok()
        .flatten();
        if now.as_ref() == Some(&*last) {
            return None;
        }
        Some(self.reload_locked(trigger, &mut last).await)
    }

    /// Reads the config file and applies it, or refuses it and keeps the config in force.
    pub async fn reload(&self, trigger: Trigger) -> Arc<ReloadReport> {
        let mut last = self.last_inputs.lock().await;
        self.reload_locked(trigger, &mut last).await
    }

    async fn reload_locked(&self, trigger: Trigger, last: &mut String) -> Arc<ReloadReport> {
        let path = self.path.clone();
        let current = self.store.load();
        let prepared = tokio::task::spawn_blocking(move || prepare(&path, &current)).await;
        let report = match prepared {
            Ok(Ok(prepared)) => {
                let inputs = prepared.inputs.clone();
                let report = self.apply(trigger, prepared);
                // A file refused only at the last step (its access log could not be opened)
                // is tried again on the next change.
                if report.result == "ok" {
                    *last = inputs;
                }
                report
            }
            Ok(Err(refused)) => {
                if let Some(inputs) = refused.inputs {
                    *last = inputs;
                }
                self.refuse(trigger, refused.digest, refused.errors)
            }
            Err(e) => self.refuse(
                trigger,
                None,
                vec![whole_file(format!("the reload task failed: {e}"))],
            ),
        };
        self.store.record(report)
    }

    /// Publishes a prepared snapshot and brings everything that follows the config in line.
    fn apply(&self, trigger: Trigger, prepared: Prepared) -> ReloadReport {
        let Prepared {
            mut snapshot,
            certificates,
            needs_restart,
            changes,
            ..
        } = prepared;
        // The one step with an effect that can still fail: opening a new access-log file.
        if let Err(e) = self.access_log.set_output(&snapshot.access_log) {
            let error = ConfigError {
                path: "access_log.output".into(),
                line: None,
                message: e.to_string(),
            };
            return self.refuse(trigger, Some(snapshot.digest), vec![error]);
        }
        snapshot::activate(&mut snapshot, &self.live);
        let snapshot = self.store.swap(snapshot);
        snapshot::in_force(&snapshot, &self.live);
        for (name, certs) in certificates {
            if let Some(store) = self.certificates.get(&name) {
                store.replace(certs);
            }
        }
        self.supervisor.reconcile(&snapshot.sidecars);
        self.live.reap();
        let metrics = self.live.metrics();
        metrics.reloads_ok.inc();
        metrics.config_version.set(snapshot.version as i64);
        tracing::info!(
            version = snapshot.version,
            digest = %snapshot.digest,
            ?trigger,
            "config reloaded: {}",
            changes.line()
        );
        for held in &needs_restart {
            tracing::warn!(key = %held.key, "config reloaded without this change: {}", held.message);
        }
        ReloadReport {
            trigger,
            at: access_log::now_rfc3339(),
            result: "ok",
            version: snapshot.version,
            digest: Some(snapshot.digest.clone()),
            errors: Vec::new(),
            needs_restart,
            changes,
        }
    }

    /// Reports a refused file; the config in force stays.
    fn refuse(
        &self,
        trigger: Trigger,
        digest: Option<String>,
        errors: Vec<ConfigError>,
    ) -> ReloadReport {
        let version = self.store.load().version;
        self.live.metrics().reloads_error.inc();
        for e in &errors {
            tracing::error!(config = %self.path.display(), "config reload refused: {e}");
        }
        tracing::error!(
            version,
            ?trigger,
            "config reload refused with {} error(s); version {version} keeps serving",
            errors.len()
        );
        ReloadReport {
            trigger,
            at: access_log::now_rfc3339(),
            result: "error",
            version,
            digest,
            errors,
            needs_restart: Vec::new(),
            changes: Changes::default(),
        }
    }
}

/// A file read, compiled, verified and ready to publish.
struct Prepared {
    /// The digest of what was read (see [`inputs_digest`]).
    inputs: String,
    snapshot: Snapshot,
    /// Each TLS listener's certificates, loaded from the files the new config names.
    certificates: Vec<(String, Certificates)>,
    needs_restart: Vec<diff::HeldBack>,
    changes: Changes,
}

/// A file refused before anything changed.
struct Refused {
    /// The digest of what was read, when the file could be read.
    inputs: Option<String>,
    digest: Option<String>,
    errors: Vec<ConfigError>,
}

/// Everything of a reload that reads files or can fail, and changes nothing.
fn prepare(path: &Path, current: &Snapshot) -> Result<Prepared, Refused> {
    let text = config::read(path).map_err(|errors| Refused {
        inputs: None,
        digest: None,
        errors,
    })?;
    let refused = |text: &str, errors| Refused {
        inputs: Some(inputs_digest(text, current)),
        digest: Some(text_digest(text)),
        errors,
    };
    let mut snapshot = match super::load(&text, &process_env) {
        Ok(snapshot) => snapshot,
        Err(errors) => return Err(refused(&text, errors)),
    };
    let needs_restart = diff::hold_back(&mut snapshot, current);
    let mut certificates = Vec::new();
    let mut errors = Vec::new();
    for listener in &snapshot.listeners {
        if let Some(settings) = &listener.tls {
            match tls::load_all(settings) {
                Ok(certs) => certificates.push((listener.name.clone(), certs)),
                Err(e) => errors.extend(e),
            }
        }
    }
    if !errors.is_empty() {
        return Err(refused(&text, config::locate_in(&text, errors)));
    }
    let changes = Changes::between(current, &snapshot);
    Ok(Prepared {
        inputs: inputs_digest(&text, &snapshot),
        snapshot,
        certificates,
        needs_restart,
        changes,
    })
}

fn whole_file(message: String) -> ConfigError {
    ConfigError {
        path: String::new(),
        line: None,
        message,
    }
}

/// The snapshot digest of config text: the first 12 hex digits of its SHA-256.
fn text_digest(text: &str) -> String {
    snapshot::digest_of(text)
}

/// A digest of the config text and every certificate and key file `snapshot` names.
fn inputs_digest(text: &str, snapshot: &Snapshot) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(text.as_bytes());
    for listener in &snapshot.listeners {
        for files in listener.tls.iter().flat_map(|t| &t.certificates) {
            for path in [&files.cert, &files.key] {
                context.update(path.as_os_str().as_encoded_bytes());
                context.update(&std::fs::read(path).unwrap_or_default());
            }
        }
    }
    context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file a reload reads: the config and the certificates and keys it names.
pub fn watched_files(path: &Path, snapshot: &Snapshot) -> Vec<PathBuf> {
    let mut files = vec![path.to_path_buf()];
    for listener in &snapshot.listeners {
        for certificate in listener.tls.iter().flat_map(|t| &t.certificates) {
            files.push(certificate.cert.clone());
            files.push(certificate.key.clone());
        }
    }
    files
}
