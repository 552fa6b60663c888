//! One JSON line per request. Lines are handed to a writer thread through a bounded queue, so
//! a slow disk never stalls a request: when the queue is full the line is dropped and counted.
//!
//! The writer never leaves a partial line in a file: a write cut short (disk full, file size
//! limit) is rolled back to the last complete line, and every line that did not make it is
//! counted in `kingdom_edge_access_log_dropped_total` and reported on stderr (at most every
//! ten seconds). A file output is reopened on `SIGUSR1` ([`AccessLog::reopen`]) and when its
//! path no longer names the open file (renamed or deleted by log rotation).
//!
//! A reload may change the output ([`AccessLog::set_output`]): lines queued before the
//! change go to the old output, later ones to the new.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;

use crate::metrics::Metrics;

/// `access_log.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogOutput {
    /// No access log.
    Off,
    /// One JSON line per request on standard output.
    Stdout,
    /// Appended to this file.
    File(PathBuf),
}

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// After a write the writer rests this long, so under load lines are taken in batches and no
/// request thread has to wake it for each line.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// How often the writer checks that the file's path still names the file it writes.
const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// How long a change of output waits for room in a full queue.
const SWITCH_WAIT: Duration = Duration::from_secs(1);
/// At most one report of lost lines on stderr per this long.
const REPORT_EVERY: Duration = Duration::from_secs(10);

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
    /// The query string without the `?`, if the target had one.
    pub query: Option<&'a str>,
    pub status: u16,
    pub bytes_out: usize,
    /// Milliseconds, to the microsecond.
    pub duration_ms: f64,
    pub route: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub attempts: u32,
    /// Why the proxy answered itself (`no_route`, `upstream_timeout`, …) or why the exchange
    /// ended early (`client_aborted`, `upstream_truncated`).
    pub error: Option<&'a str>,
}

enum Message {
    Line(String),
    /// Wake up: a reopen was requested.
    Wake,
    /// Write out everything queued so far, then answer.
    Flush(SyncSender<()>),
    /// Write what is queued so far, then write to this output.
    Switch(Output),
}

/// The access-log sink.
pub struct AccessLog {
    queue: SyncSender<Message>,
    /// The output now, as configured; `Off` writes nothing.
    output: std::sync::Mutex<AccessLogOutput>,
    enabled: AtomicBool,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    /// Lines dropped at a full queue, for the writer's report on stderr.
    overflowed: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the output and starts the writer thread.
    pub fn open(output: &AccessLogOutput, metrics: Arc<Metrics>) -> io::Result<Self> {
        let dropped = metrics.access_log_dropped.clone();
        let reopen = Arc::new(AtomicBool::new(false));
        let overflowed = Arc::new(AtomicU64::new(0));
        let (queue, lines) = sync_channel(QUEUE);
        let writer = Writer {
            output: Output::open(output)?,
            reopen: reopen.clone(),
            dropped: dropped.clone(),
            overflowed: overflowed.clone(),
            unreported: 0,
            last_error: None,
            last_report: None,
        };
        thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(lines))?;
        Ok(Self {
            queue,
            output: std::sync::Mutex::new(output.clone()),
            enabled: AtomicBool::new(*output != AccessLogOutput::Off),
            reopen,
            dropped,
            overflowed,
        })
    }

    /// Writes later lines to `output` (a reload changed it). The new output is opened
    /// here, so an error leaves the old one in place. Returns whether anything changed.
    pub fn set_output(&self, output: &AccessLogOutput) -> io::Result<bool> {
        let mut current = self.output.lock().unwrap_or_else(|p| p.into_inner());
        if *current == *output {
            return Ok(false);
        }
        let mut message = Message::Switch(Output::open(output)?);
        // The queue is full only while the writer is behind; a writer stuck on a hung disk
        // must not hang the reload.
        let deadline = Instant::now() + SWITCH_WAIT;
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    thread::sleep(BATCH_WINDOW);
                }
                Err(TrySendError::Full(_)) => {
                    return Err(io::Error::other(
                        "the access-log writer is stuck: its queue stayed full",
                    ))
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Err(io::Error::other("the access-log writer has stopped"))
                }
            }
        }
        self.enabled
            .store(*output != AccessLogOutput::Off, Ordering::Release);
        *current = output.clone();
        Ok(true)
    }

    /// Whether lines are written at all; callers skip building entries when not.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Queues one entry.
    pub fn log(&self, entry: &Entry<'_>) {
        if !self.enabled() {
            return;
        }
        let queue = &self.queue;
        let Ok(line) = serde_json::to_string(entry) else {
            self.dropped.inc();
            return;
        };
        match queue.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
                self.overflowed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens a file output before the next line (log rotation, `SIGUSR1`).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // A full queue means the writer is busy and sees the flag soon anyway.
        let _ = self.queue.try_send(Message::Wake);
    }

    /// Waits up to `timeout` for queued lines to reach the output, for a clean exit. Never
    /// longer, even when the writer is stuck on a hung disk with a full queue.
    pub fn flush(&self, timeout: Duration) {
        let queue = &self.queue;
        let deadline = Instant::now() + timeout;
        let (done, wait) = sync_channel(1);
        let mut message = Message::Flush(done);
        loop {
            match queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    message = back;
                    thread::sleep(BATCH_WINDOW);
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The time now as the access log writes it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Where lines go: something that takes bytes and, for files, can take back a cut-short
/// write.
trait Sink {
    /// One `write` call; may write only part of `buf`.
    fn write_some(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// The current length, where the next write lands; `None` when it cannot be known or
    /// cut back (a pipe, a terminal).
    fn len(&mut self) -> Option<u64>;
    /// Cuts the output back to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// The file output, with what is needed to notice it was rotated away.
struct LogFile {
    path: PathBuf,
    file: File,
    last_check: Instant,
}

impl LogFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("access log {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            last_check: Instant::now(),
        })
    }

    /// Whether the path still names the open file.
    fn still_in_place(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(at_path), Ok(open)) => at_path.dev() == open.dev() && at_path.ino() == open.ino(),
            _ => false,
        }
    }
}

impl Sink for LogFile {
    fn write_some(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn len(&mut self) -> Option<u64> {
        let meta = self.file.metadata().ok()?;
        meta.is_file().then_some(meta.len())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
}

impl Sink for io::Stdout {
    fn write_some(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = self.lock();
        let n = out.write(buf)?;
        out.flush()?;
        Ok(n)
    }

    fn len(&mut self) -> Option<u64> {
        None
    }

    fn truncate(&mut self, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

enum Output {
    Off,
    Stdout(io::Stdout),
    File(LogFile),
}

impl Output {
    fn open(output: &AccessLogOutput) -> io::Result<Self> {
        Ok(match output {
            AccessLogOutput::Off => Output::Off,
            AccessLogOutput::Stdout => Output::Stdout(io::stdout()),
            AccessLogOutput::File(path) => Output::File(LogFile::open(path)?),
        })
    }
}

/// What became of a batch.
#[derive(Debug)]
struct Written {
    /// Whole lines that reached the output.
    lines: usize,
    /// What stopped the rest.
    error: Option<io::Error>,
    /// The unwritten rest of a line cut short on an output that cannot take it back (a
    /// pipe): written first next time, so the line is completed rather than torn.
    carry: Vec<u8>,
}

/// Writes `batch`, whose lines end at the offsets in `ends`, keeping only whole lines: a line
/// cut short is rolled back where the output allows it, else completed on the next write.
fn write_batch(sink: &mut dyn Sink, batch: &[u8], ends: &[usize]) -> Written {
    let start = sink.len();
    let mut written = 0;
    let error = loop {
        if written == batch.len() {
            break None;
        }
        match sink.write_some(&batch[written..]) {
            Ok(0) => break Some(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e),
        }
    };
    let lines = ends.iter().take_while(|&&end| end <= written).count();
    let kept = if lines == 0 { 0 } else { ends[lines - 1] };
    let mut carry = Vec::new();
    if written > kept {
        match start {
            // Take the torn line back, unless someone else changed the file meanwhile.
            Some(start) if sink.len() == Some(start + written as u64) => {
                let _ = sink.truncate(start + kept as u64);
            }
            Some(_) => {}
            None => carry = batch[written..ends[lines]].to_vec(),
        }
    }
    Written {
        lines,
        error,
        carry,
    }
}

struct Writer {
    output: Output,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    /// Lines lost since the last report.
    overflowed: Arc<AtomicU64>,
    /// Lines lost since the last report, and the last write error among them.
    unreported: u64,
    last_error: Option<io::Error>,
    last_report: Option<Instant>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Message>) {
        let mut waiting = Vec::new();
        let (mut batch, mut ends) = (Vec::new(), Vec::new());
        let mut carry: Vec<u8> = Vec::new();
        loop {
            // Wake up now and then even when idle, so a last loss still gets reported.
            let first = match queue.recv_timeout(REPORT_EVERY) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => {
                    self.report();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // The rest of a line cut short last time goes first, so it is completed.
            if !carry.is_empty() {
                batch.append(&mut carry);
                ends.push(batch.len());
            }
            // Drain what is already queued, then write once, so bursts cost one write.
            for message in
                std::iter::once(first).chain(std::iter::from_fn(|| queue.try_recv().ok()))
            {
                match message {
                    Message::Line(line) => {
                        batch.extend_from_slice(line.as_bytes());
                        batch.push(b'\n');
                        ends.push(batch.len());
                    }
                    Message::Wake => {}
                    Message::Flush(done) => waiting.push(done),
                    Message::Switch(output) => {
                        // What came before goes to the old output.
                        self.write(&mut batch, &mut ends, &mut carry);
                        // A line torn on the old output cannot be finished on the new one.
                        carry.clear();
                        self.output = output;
                    }
                }
            }
            self.rotate_if_needed();
            self.write(&mut batch, &mut ends, &mut carry);
            self.report();
            let flushed = !waiting.is_empty();
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            if !flushed {
                thread::sleep(BATCH_WINDOW);
            }
        }
    }

    /// Writes `batch` (lines ending at `ends`) and empties it; `carry` takes the rest of a
    /// line cut short on an output that cannot take it back.
    fn write(&mut self, batch: &mut Vec<u8>, ends: &mut Vec<usize>, carry: &mut Vec<u8>) {
        if ends.is_empty() {
            return;
        }
        let sink: &mut dyn Sink = match &mut self.output {
            Output::Off => {
                batch.clear();
                ends.clear();
                return;
            }
            Output::Stdout(out) => out,
            Output::File(file) => file,
        };
        let written = write_batch(sink, batch, ends);
        // A carried line is not lost: it is finished next time.
        let unfinished = written.lines + usize::from(!written.carry.is_empty());
        if let Some(e) = written.error {
            self.lost((ends.len() - unfinished) as u64, e);
        }
        *carry = written.carry;
        batch.clear();
        ends.clear();
    }

    /// Reopens the file when asked to, or when its path names another file (or none).
    fn rotate_if_needed(&mut self) {
        let Output::File(file) = &mut self.output else {
            self.reopen.store(false, Ordering::Release);
            return;
        };
        let asked = self.reopen.swap(false, Ordering::AcqRel);
        let due = file.last_check.elapsed() >= ROTATION_CHECK;
        if !asked && !due {
            return;
        }
        file.last_check = Instant::now();
        if !asked && file.still_in_place() {
            return;
        }
        match LogFile::open(&file.path) {
            Ok(reopened) => {
                *file = reopened;
                tracing::info!(path = %file.path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!("cannot reopen the access log, still writing the old file: {e}")
            }
        }
    }

    /// Counts lines a failed write lost.
    fn lost(&mut self, lines: u64, e: io::Error) {
        self.dropped.inc_by(lines);
        self.unreported += lines;
        self.last_error = Some(e);
    }

    /// Says on stderr how many lines were lost since the last report (failed writes and a
    /// full queue), at most every [`REPORT_EVERY`].
    fn report(&mut self) {
        self.unreported += self.overflowed.swap(0, Ordering::Relaxed);
        if self.unreported == 0 {
            return;
        }
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_EVERY)
        {
            return;
        }
        let why = match self.last_error.take() {
            Some(e) => format!("access log write failed, lines lost: {e}"),
            None => "access log lines lost: the writer fell behind".to_string(),
        };
        tracing::error!(lost_lines = self.unreported, "{why}");
        self.unreported = 0;
        self.last_report = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in memory that takes at most `room` more bytes, then fails like a full disk.
    struct FullDisk {
        data: Vec<u8>,
        room: usize,
        per_write: usize,
        /// A pipe cannot be cut back.
        pipe: bool,
    }

    impl Sink for FullDisk {
        fn write_some(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room).min(self.per_write);
            self.data.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn len(&mut self) -> Option<u64> {
            (!self.pipe).then_some(self.data.len() as u64)
        }

        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.data.truncate(len as usize);
            Ok(())
        }
    }

    fn batch(lines: &[&str]) -> (Vec<u8>, Vec<usize>) {
        let (mut batch, mut ends) = (Vec::new(), Vec::new());
        for line in lines {
            batch.extend_from_slice(line.as_bytes());
            batch.push(b'\n');
            ends.push(batch.len());
        }
        (batch, ends)
    }

    #[test]
    fn a_full_disk_keeps_whole_lines_only_and_reports_the_rest() {
        let (bytes, ends) = batch(&["{\"a\":1}", "{\"b\":22}", "{\"c\":333}"]);
        // Room for the first line and half the second, written in small pieces.
        for per_write in [1, 3, 64] {
            let mut disk = FullDisk {
                data: b"{\"old\":0}\n".to_vec(),
                room: 13,
                per_write,
                pipe: false,
            };
            let written = write_batch(&mut disk, &bytes, &ends);
            assert_eq!(written.lines, 1, "per_write {per_write}");
            assert_eq!(written.error.unwrap().raw_os_error(), Some(28));
            assert!(written.carry.is_empty(), "rolled back, not carried");
            assert_eq!(
                disk.data, b"{\"old\":0}\n{\"a\":1}\n",
                "per_write {per_write}"
            );
        }
    }

    #[test]
    fn everything_fits() {
        let (bytes, ends) = batch(&["{}", "{}"]);
        let mut disk = FullDisk {
            data: Vec::new(),
            room: 100,
            per_write: 3,
            pipe: false,
        };
        let written = write_batch(&mut disk, &bytes, &ends);
        assert_eq!((written.lines, written.error.is_none()), (2, true));
        assert_eq!(disk.data, b"{}\n{}\n");
    }

    #[test]
    fn a_line_cut_short_on_a_pipe_is_completed_next_time() {
        let (bytes, ends) = batch(&["{\"a\":1}", "{\"b\":22}"]);
        let mut pipe = FullDisk {
            data: Vec::new(),
            room: 12,
            per_write: 64,
            pipe: true,
        };
        let written = write_batch(&mut pipe, &bytes, &ends);
        assert_eq!(written.lines, 1);
        assert_eq!(written.carry, b":22}\n");
        pipe.room = 100;
        let written = write_batch(&mut pipe, &written.carry, &[5]);
        assert_eq!(written.lines, 1);
        assert_eq!(pipe.data, b"{\"a\":1}\n{\"b\":22}\n");
    }
}
