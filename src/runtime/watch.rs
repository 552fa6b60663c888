//! What triggers a reload: `SIGHUP`, and a change to the config file or a certificate it
//! names (watched with inotify through `notify`). The directories holding them are watched,
//! not the files, so an editor that saves by writing a new file and renaming it over the old
//! one, and a Kubernetes ConfigMap whose `..data` symlink is swapped, are both seen. Events
//! are debounced, and a reload happens only if the file's content (or a certificate's)
//! differs from what was last read.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::reload::{watched_files, Reloader};
use crate::snapshot::Trigger;

/// A burst of events ends when none came for this long.
const QUIET: Duration = Duration::from_millis(200);
/// A reload waits for a quiet moment at most this long after the first event.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// Reloads on `SIGHUP` and on changes to the files a reload reads, for as long as the
/// process runs.
pub async fn reload_on_triggers(reloader: Arc<Reloader>) {
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            tracing::error!("cannot handle SIGHUP, reload through the file or the admin API: {e}");
            None
        }
    };
    let (events, mut changed) = mpsc::unbounded_channel();
    let mut files = FileWatch::new(events);
    files.follow(&watched_files(reloader.path(), &reloader.store().load()));
    loop {
        tokio::select! {
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading the config");
                reloader.reload(Trigger::Signal).await;
            }
            Some(()) = changed.recv() => {
                settle(&mut changed).await;
                reloader.reload_if_changed(Trigger::File).await;
            }
            // Neither signal nor watcher could be set up: only the admin API reloads.
            else => std::future::pending::<()>().await,
        }
        // A reload may name other certificates, and a ConfigMap swap moves the real files.
        files.follow(&watched_files(reloader.path(), &reloader.store().load()));
    }
}

/// Waits until the events stop for [`QUIET`] (at most [`MAX_WAIT`]), taking them all.
async fn settle(changed: &mut mpsc::UnboundedReceiver<()>) {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    loop {
        let quiet = (tokio::time::Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet, changed.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// Watches the directories of a set of files and reports events that touch one of them.
struct FileWatch {
    watcher: Option<RecommendedWatcher>,
    /// The file names that matter (besides Kubernetes' `..`-prefixed entries).
    names: Arc<Mutex<HashSet<OsString>>>,
    directories: HashSet<PathBuf>,
}

impl FileWatch {
    fn new(events: mpsc::UnboundedSender<()>) -> Self {
        let names: Arc<Mutex<HashSet<OsString>>> = Arc::default();
        let wanted = names.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let names = wanted.lock().unwrap_or_else(|p| p.into_inner());
            let relevant = event.paths.iter().any(|path| {
                path.file_name().is_some_and(|name| {
                    names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
                })
            });
            if relevant {
                let _ = events.send(());
            }
        });
        let watcher = watcher
            .inspect_err(|e| {
                tracing::error!(
                    "cannot watch the config file, reload with SIGHUP or the admin API: {e}"
                )
            })
            .ok();
        Self {
            watcher,
            names,
            directories: HashSet::new(),
        }
    }

    /// Watches the directories of `files` (and of the files their symlinks lead to).
    fn follow(&mut self, files: &[PathBuf]) {
        let Some(watcher) = &mut self.watcher else {
            return;
        };
        let mut names = HashSet::new();
        let mut directories = HashSet::new();
        for file in files {
            let resolved = std::fs::canonicalize(file).ok();
            for path in std::iter::once(file.as_path()).chain(resolved.as_deref()) {
                if let Some(name) = path.file_name() {
                    names.insert(name.to_os_string());
                }
                directories.insert(directory_of(path));
            }
        }
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = names;
        for gone in self.directories.difference(&directories) {
            let _ = watcher.unwatch(gone);
        }
        for directory in &directories {
            // Watched again each time: a directory that was replaced needs a new watch.
            if let Err(e) = watcher.watch(directory, RecursiveMode::NonRecursive) {
                tracing::warn!(directory = %directory.display(), "cannot watch: {e}");
            }
        }
        self.directories = directories;
    }
}

fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
