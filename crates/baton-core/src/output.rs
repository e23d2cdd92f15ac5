//! Workers' output: each worker's standard output and error come to the master through a pipe
//! per stream (`output: capture`, the default); every line is logged once, whole, with the
//! program, generation, worker, slot, pid and stream it came from, and the last ones of each
//! worker are kept for `baton logs` and for the verdict of a reload the worker failed.
//!
//! Back-pressure: the master reads a pipe only as fast as it writes the lines out, one chunk
//! ([`READ_CHUNK`]) at a time per worker, yielding to the event loop between chunks. A worker
//! that writes faster waits on its full pipe, as it would on a terminal or under journald; no
//! line is dropped, the master's memory per worker stays bounded (a partial line of at most
//! [`MAX_LINE`] bytes and a tail of [`TAIL_LINES`] lines / [`TAIL_BYTES`] bytes), and other
//! workers' lines, reloads and the master's own decisions take their turns in between.
//!
//! Lines are logged as tracing events with target `baton::output` and `event = baton_proto::event::OUTPUT`, at
//! level INFO; the binary formats them (a prefix in the text log, fields in JSON and in the
//! journal).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use baton_proto::control::{OutputFilter, OutputLine, OutputStream};
use tokio::net::unix::pipe;
use tokio::sync::broadcast;
use tracing::{debug, info};

mod lines;

use lines::{Cut, Cutter};
pub use lines::{MAX_LINE, escape};

/// The most a capture reads from its pipe before letting the event loop run.
pub const READ_CHUNK: usize = 64 * 1024;
/// Lines kept per worker for `baton logs` and verdicts: at most this many...
pub const TAIL_LINES: usize = 40;
/// ... and at most this many bytes of text.
pub const TAIL_BYTES: usize = 8 * 1024;
/// The longest text a kept line holds: the log has the line whole (up to [`MAX_LINE`]), the
/// tail a shorter copy, so that one long line does not push every other one out of it.
pub const TAIL_LINE: usize = 1024;
/// Workers gone whose last lines are still kept (the oldest is forgotten first).
pub const KEPT_GONE: usize = 64;
/// Lines a follower (`baton logs --follow`) may fall behind before it misses some (and is told
/// how many).
pub const FOLLOW_BACKLOG: usize = 1024;

/// Where a line comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub program: Arc<str>,
    pub generation: u64,
    pub worker: u64,
    pub slot: u64,
    pub pid: u32,
}

/// A kept line.
#[derive(Debug, Clone)]
struct Kept {
    seq: u64,
    unix_ms: u64,
    stream: OutputStream,
    text: Box<str>,
}

/// One worker's last lines.
#[derive(Debug)]
struct Tail {
    origin: Arc<Origin>,
    lines: VecDeque<Kept>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, kept: Kept) {
        self.bytes += kept.text.len();
        self.lines.push_back(kept);
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.text.len();
            }
        }
    }
}

#[derive(Debug, Default)]
struct Tails {
    by_worker: HashMap<u64, Tail>,
    /// Workers gone, oldest first: their tails are kept until [`KEPT_GONE`] more are gone.
    gone: VecDeque<u64>,
}

/// Counters of forwarded output, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub lines: u64,
    pub bytes: u64,
    /// Lines longer than [`MAX_LINE`], cut.
    pub cut: u64,
}

#[derive(Debug)]
struct Shared {
    tails: Mutex<Tails>,
    follow: broadcast::Sender<OutputLine>,
    seq: AtomicU64,
    lines: AtomicU64,
    bytes: AtomicU64,
    cut: AtomicU64,
}

/// Every worker's output as the master keeps it: the tails, the followers, the counters.
/// Cheap to clone (one shared state).
#[derive(Debug, Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            shared: Arc::new(Shared {
                tails: Mutex::default(),
                follow: broadcast::channel(FOLLOW_BACKLOG).0,
                seq: AtomicU64::new(0),
                lines: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                cut: AtomicU64::new(0),
            }),
        }
    }
}

impl Hub {
    /// Logs one line, keeps it in the worker's tail and hands it to the followers.
    fn emit(&self, origin: &Arc<Origin>, stream: OutputStream, cut: Cut) {
        let shared = &*self.shared;
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
        shared.lines.fetch_add(1, Ordering::Relaxed);
        shared.bytes.fetch_add(cut.bytes, Ordering::Relaxed);
        if cut.was_cut {
            shared.cut.fetch_add(1, Ordering::Relaxed);
        }
        info!(
            target: "baton::output",
            event = baton_proto::event::OUTPUT,
            program = &*origin.program,
            generation = origin.generation,
            worker = origin.worker,
            slot = origin.slot,
            pid = origin.pid,
            stream = stream.as_str(),
            "{}",
            cut.text
        );
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if shared.follow.receiver_count() > 0 {
            let _ = shared.follow.send(line_of(
                origin,
                &Kept {
                    seq,
                    unix_ms,
                    stream,
                    text: cut.text.as_str().into(),
                },
            ));
        }
        let kept = Kept {
            seq,
            unix_ms,
            stream,
            text: shortened(cut.text).into_boxed_str(),
        };
        let mut tails = self.lock();
        tails
            .by_worker
            .entry(origin.worker)
            .or_insert_with(|| Tail {
                origin: origin.clone(),
                lines: VecDeque::new(),
                bytes: 0,
            })
            .push(kept);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tails> {
        self.shared
            .tails
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A worker is gone: its tail is kept until [`KEPT_GONE`] more workers are gone.
    pub fn gone(&self, worker: u64) {
        let mut tails = self.lock();
        if !tails.by_worker.contains_key(&worker) || tails.gone.contains(&worker) {
            return;
        }
        tails.gone.push_back(worker);
        while tails.gone.len() > KEPT_GONE {
            if let Some(old) = tails.gone.pop_front() {
                tails.by_worker.remove(&old);
            }
        }
    }

    /// The kept lines of the workers `filter` matches, oldest first.
    pub fn lines(&self, filter: &OutputFilter) -> Vec<OutputLine> {
        let tails = self.lock();
        let mut out: Vec<OutputLine> = tails
            .by_worker
            .values()
            .filter(|tail| matches(filter, &tail.origin))
            .flat_map(|tail| tail.lines.iter().map(|kept| line_of(&tail.origin, kept)))
            .collect();
        out.sort_by_key(|line| line.seq);
        out
    }

    /// The last `count` lines `worker` wrote on stderr, oldest first.
    pub fn last_errors(&self, worker: u64, count: usize) -> Vec<String> {
        let tails = self.lock();
        let Some(tail) = tails.by_worker.get(&worker) else {
            return Vec::new();
        };
        let mut lines: Vec<String> = tail
            .lines
            .iter()
            .rev()
            .filter(|kept| kept.stream == OutputStream::Stderr)
            .take(count)
            .map(|kept| kept.text.to_string())
            .collect();
        lines.reverse();
        lines
    }

    /// New lines from now on (for `baton logs --follow`).
    pub fn subscribe(&self) -> broadcast::Receiver<OutputLine> {
        self.shared.follow.subscribe()
    }

    /// Lines and bytes forwarded since the master started.
    pub fn totals(&self) -> Totals {
        let shared = &*self.shared;
        Totals {
            lines: shared.lines.load(Ordering::Relaxed),
            bytes: shared.bytes.load(Ordering::Relaxed),
            cut: shared.cut.load(Ordering::Relaxed),
        }
    }

    /// Workers whose last lines are kept (live and gone).
    pub fn kept_workers(&self) -> usize {
        self.lock().by_worker.len()
    }
}

/// `text` as a tail keeps it: at most [`TAIL_LINE`] bytes (cut at a character boundary), and
/// how many more bytes the logged line has.
fn shortened(mut text: String) -> String {
    if text.len() <= TAIL_LINE {
        return text;
    }
    let mut end = TAIL_LINE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let lacks = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" [{lacks} more bytes in the log]"));
    text
}

fn matches(filter: &OutputFilter, origin: &Origin) -> bool {
    filter
        .program
        .as_deref()
        .is_none_or(|p| p == &*origin.program)
        && filter.generation.is_none_or(|g| g == origin.generation)
        && filter.worker.is_none_or(|w| w == origin.worker)
}

fn line_of(origin: &Origin, kept: &Kept) -> OutputLine {
    OutputLine {
        seq: kept.seq,
        unix_ms: kept.unix_ms,
        program: origin.program.to_string(),
        generation: origin.generation,
        worker: origin.worker,
        slot: origin.slot,
        pid: origin.pid,
        stream: kept.stream,
        text: kept.text.to_string(),
    }
}

/// One stream of one worker: the pipe's read end and the line being assembled.
#[derive(Debug)]
pub struct Capture {
    pipe: pipe::Receiver,
    origin: Arc<Origin>,
    stream: OutputStream,
    cutter: Mutex<Cutter>,
    hub: Hub,
}

/// What one read of a pipe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pumped {
    Data,
    End,
}

thread_local! {
    /// The read buffer, one per thread rather than one per worker: a capture uses it only while
    /// it reads, never across an `await`.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

impl Capture {
    /// A capture of `stream` of the worker `origin` names, reading `pipe` (a pipe's read end;
    /// made non-blocking). Must be called within the runtime, whose reactor then watches it.
    pub fn new(
        pipe: File,
        origin: Arc<Origin>,
        stream: OutputStream,
        hub: Hub,
    ) -> io::Result<Arc<Capture>> {
        Ok(Arc::new(Capture {
            pipe: pipe::Receiver::from_file(pipe)?,
            origin,
            stream,
            cutter: Mutex::default(),
            hub,
        }))
    }

    /// The same, after a self-upgrade: `partial` is the line the old program had begun.
    pub fn resume(
        pipe: File,
        origin: Arc<Origin>,
        stream: OutputStream,
        hub: Hub,
        partial: &[u8],
    ) -> io::Result<Arc<Capture>> {
        let capture = Capture::new(pipe, origin, stream, hub)?;
        capture.lock_cutter().feed(partial, |_| {});
        Ok(capture)
    }

    /// The line begun and not finished (a self-upgrade carries it across the exec).
    pub fn partial(&self) -> Vec<u8> {
        self.lock_cutter().partial().to_vec()
    }

    /// Who wrote this stream.
    pub fn origin(&self) -> &Arc<Origin> {
        &self.origin
    }

    fn lock_cutter(&self) -> std::sync::MutexGuard<'_, Cutter> {
        self.cutter.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pipe's read end (a self-upgrade carries it across the exec).
    pub fn pipe(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.pipe.as_fd()
    }

    pub fn stream(&self) -> OutputStream {
        self.stream
    }

    /// Reads one chunk with `read` and logs the lines it completes (`WouldBlock`: nothing to
    /// read now).
    fn pump(&self, read: impl FnOnce(&mut [u8]) -> io::Result<usize>) -> io::Result<Pumped> {
        let mut cutter = self.lock_cutter();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let n = read(&mut scratch)?;
            if n == 0 {
                if let Some(cut) = cutter.finish() {
                    self.hub.emit(&self.origin, self.stream, cut);
                }
                return Ok(Pumped::End);
            }
            cutter.feed(&scratch[..n], |cut| {
                self.hub.emit(&self.origin, self.stream, cut);
            });
            Ok(Pumped::Data)
        })
    }

    /// Reads what the pipe holds now, up to `limit` bytes' worth of chunks: the worker exited,
    /// and its last lines must be logged (and kept for a verdict) before its exit is acted on.
    pub fn drain(&self, limit: usize) {
        // A read of the pipe itself: the reactor may not know yet that it holds anything.
        let read = |buf: &mut [u8]| baton_sys::pipe::read_now(self.pipe(), buf);
        for _ in 0..limit.div_ceil(READ_CHUNK) {
            match self.pump(read) {
                Ok(Pumped::Data) => {}
                Ok(Pumped::End) | Err(_) => return,
            }
        }
    }
}

/// Reads a worker's stream until it ends (every process holding the pipe's write end is gone),
/// one chunk per turn of the event loop.
pub async fn capture_task(capture: Arc<Capture>) {
    loop {
        if capture.pipe.readable().await.is_err() {
            return;
        }
        // Through the reactor, which learns from a `WouldBlock` that the pipe is empty.
        match capture.pump(|buf| capture.pipe.try_read(buf)) {
            Ok(Pumped::Data) => tokio::task::yield_now().await,
            Ok(Pumped::End) => return,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                debug!(
                    worker = capture.origin.worker,
                    "reading worker {}'s {}: {err}",
                    capture.origin.worker,
                    capture.stream.as_str()
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn origin(worker: u64) -> Arc<Origin> {
        Arc::new(Origin {
            program: "web".into(),
            generation: 2,
            worker,
            slot: 0,
            pid: 1000 + worker as u32,
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lines_are_kept_bounded_and_filtered() {
        let hub = Hub::default();
        let (read, write) = baton_sys::pipe::output_pipe().unwrap();
        let capture = Capture::new(read, origin(7), OutputStream::Stderr, hub.clone()).unwrap();
        let task = tokio::spawn(capture_task(capture));
        let mut write = File::from(write);
        for i in 0..(TAIL_LINES + 10) {
            writeln!(write, "line {i}").unwrap();
        }
        write.write_all(b"no newline").unwrap();
        drop(write);
        task.await.unwrap();
        let lines = hub.lines(&OutputFilter::default());
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.last().unwrap().text, "no newline");
        assert_eq!(lines[0].text, "line 11");
        assert!(lines.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(hub.totals().lines, TAIL_LINES as u64 + 11);
        assert_eq!(hub.last_errors(7, 2), ["line 49", "no newline"]);
        let other = OutputFilter {
            program: Some("api".into()),
            ..OutputFilter::default()
        };
        assert!(hub.lines(&other).is_empty());
    }

    #[test]
    fn tails_of_gone_workers_are_forgotten_oldest_first() {
        let hub = Hub::default();
        for worker in 0..(KEPT_GONE as u64 + 5) {
            let cut = Cut {
                text: format!("w{worker}"),
                bytes: 3,
                was_cut: false,
            };
            hub.emit(&origin(worker), OutputStream::Stdout, cut);
            hub.gone(worker);
        }
        assert_eq!(hub.kept_workers(), KEPT_GONE);
        assert!(hub.last_errors(0, 1).is_empty());
        let last = OutputFilter {
            worker: Some(KEPT_GONE as u64 + 4),
            ..OutputFilter::default()
        };
        assert_eq!(hub.lines(&last)[0].text, format!("w{}", KEPT_GONE + 4));
    }

    #[test]
    fn a_tail_is_bounded_in_bytes() {
        let hub = Hub::default();
        for _ in 0..10 {
            let cut = Cut {
                text: "x".repeat(3000),
                bytes: 3001,
                was_cut: false,
            };
            hub.emit(&origin(1), OutputStream::Stdout, cut);
        }
        let kept: usize = hub
            .lines(&OutputFilter::default())
            .iter()
            .map(|l| l.text.len())
            .sum();
        assert!(kept <= TAIL_BYTES, "{kept}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn drain_reads_what_an_exited_worker_left() {
        let hub = Hub::default();
        let (read, write) = baton_sys::pipe::output_pipe().unwrap();
        let capture = Capture::new(read, origin(3), OutputStream::Stderr, hub.clone()).unwrap();
        let mut write = File::from(write);
        write.write_all(b"fatal: no database\n").unwrap();
        drop(write);
        capture.drain(1 << 20);
        assert_eq!(hub.last_errors(3, 5), ["fatal: no database"]);
    }
}
