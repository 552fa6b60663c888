//! One JSON line per request. Lines are handed to a writer thread through a bounded queue, so
//! a slow disk never stalls a request: when the queue is full the line is dropped and counted.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metrics::Metrics;
use crate::snapshot::AccessLogOutput;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// After a write the writer rests this long, so under load lines are taken in batches and no
/// request thread has to wake it for each line.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339 with milliseconds, UTC.
    pub time: String,
    pub request_id: &'a str,
    pub client: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_out: usize,
    /// Milliseconds, to the microsecond.
    pub duration_ms: f64,
    pub route: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub attempts: u32,
    /// Why the proxy answered itself, if it did (`no_route`, `upstream_timeout`, …).
    pub error: Option<&'a str>,
}

enum Message {
    Line(String),
    /// Write out everything queued so far, then answer.
    Flush(SyncSender<()>),
}

/// The access-log sink.
pub struct AccessLog {
    queue: Option<SyncSender<Message>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Opens the output and starts the writer thread. `Off` starts nothing.
    pub fn open(output: &AccessLogOutput, metrics: Arc<Metrics>) -> io::Result<Self> {
        let writer: Box<dyn Write + Send> = match output {
            AccessLogOutput::Off => {
                return Ok(Self {
                    queue: None,
                    metrics,
                })
            }
            AccessLogOutput::Stdout => Box::new(io::stdout()),
            AccessLogOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("access log {}: {e}", path.display()))
                    })?,
            ),
        };
        let (queue, lines) = sync_channel(QUEUE);
        thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, writer))?;
        Ok(Self {
            queue: Some(queue),
            metrics,
        })
    }

    /// Whether lines are written at all; callers skip building entries when not.
    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues one entry.
    pub fn log(&self, entry: &Entry<'_>) {
        let Some(queue) = &self.queue else { return };
        let Ok(line) = serde_json::to_string(entry) else {
            return;
        };
        match queue.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.access_log_dropped.inc(),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Waits up to `timeout` for queued lines to reach the output, for a clean exit.
    pub fn flush(&self, timeout: Duration) {
        let Some(queue) = &self.queue else { return };
        let (done, wait) = sync_channel(1);
        if queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

/// The time now as the access log writes it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn write_lines(queue: Receiver<Message>, writer: Box<dyn Write + Send>) {
    let mut out = BufWriter::new(writer);
    let mut waiting = Vec::new();
    while let Ok(first) = queue.recv() {
        // Drain what is already queued, then flush once, so bursts cost one write.
        for message in std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok())) {
            match message {
                Message::Line(line) => {
                    let _ = writeln!(out, "{line}");
                }
                Message::Flush(done) => waiting.push(done),
            }
        }
        let _ = out.flush();
        let flushed = !waiting.is_empty();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if !flushed {
            thread::sleep(BATCH_WINDOW);
        }
    }
}
