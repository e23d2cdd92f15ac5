//! A bounded HTTP/1.1 load generator for loopback tests: no retries, every failure counted by
//! kind, so a lost request cannot hide.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the request path of every client of this process (default `/`).
pub fn request_path(path: &str) {
    let _ = PATH.set(path.to_string());
}

/// How clients use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new TCP connection per request.
    Fresh,
    /// Back-to-back requests on a held connection; reconnect only when the server said
    /// `Connection: close`. A connection closed without that notice loses a request.
    KeepAlive,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ok: u64,
    /// Failures by kind: `connect`, `write`, `reset`, `closed` (EOF before a full response),
    /// `timeout`, `status <code>`, `malformed`.
    pub failures: BTreeMap<String, u64>,
    /// Connections opened.
    pub connections: u64,
    /// Responses that carried `Connection: close`.
    pub close_notices: u64,
    /// Responses per generation (from `x-baton-generation`).
    pub generations: BTreeMap<u64, u64>,
    /// Request latencies, sorted after the run.
    pub latencies: Vec<Duration>,
}

impl Report {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// Nothing failed: the one loss assertion of the suite. `what` names the run in the
    /// message (may be empty); the failure points at the caller's line.
    #[track_caller]
    pub fn assert_lossless(&self, what: impl std::fmt::Display) {
        assert_eq!(
            self.failed(),
            0,
            "{what}{}lost {} of {}: {}",
            if what.to_string().is_empty() {
                ""
            } else {
                ": "
            },
            self.failed(),
            self.ok + self.failed(),
            self.summary()
        );
    }

    /// Prints the run's summary under `what`, then asserts nothing failed and at least
    /// `at_least` requests were answered (the load was real).
    #[track_caller]
    pub fn assert_lossless_with(&self, what: &str, at_least: u64) {
        eprintln!("{what}: {}", self.summary());
        self.assert_lossless(what);
        assert!(
            self.ok >= at_least,
            "{what}: the load must be real (at least {at_least} answered): {}",
            self.summary()
        );
    }

    /// Asserts every answer came from one of `generations`.
    #[track_caller]
    pub fn assert_served_by(&self, generations: &[u64]) {
        assert_eq!(
            self.generations.keys().copied().collect::<Vec<_>>(),
            generations,
            "{}",
            self.summary()
        );
    }

    fn merge(&mut self, other: Report) {
        self.ok += other.ok;
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.connections += other.connections;
        self.close_notices += other.close_notices;
        for (k, v) in other.generations {
            *self.generations.entry(k).or_default() += v;
        }
        self.latencies.extend(other.latencies);
    }

    /// The `q`-quantile latency (0.5 = median).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i]
    }

    pub fn summary(&self) -> String {
        format!(
            "{} ok, {} failed {:?}, {} connections, {} close notices, generations seen: {}, p50 {:?}, p99 {:?}",
            self.ok,
            self.failed(),
            self.failures,
            self.connections,
            self.close_notices,
            self.generations.len(),
            self.quantile(0.5),
            self.quantile(0.99),
        )
    }
}

/// Limits of a run: it ends at whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub clients: usize,
    pub duration: Duration,
    pub max_requests_per_client: u64,
}

/// A load run in background threads.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Report>>,
}

impl Load {
    pub fn start(addr: SocketAddr, mode: Mode, bounds: Bounds) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..bounds.clients)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || client(addr, mode, bounds, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    /// `clients` clients running until [`Load::finish`] (or a minute at most).
    pub fn until_finished(addr: SocketAddr, mode: Mode, clients: usize) -> Load {
        let bounds = Bounds {
            clients,
            duration: Duration::from_secs(60),
            max_requests_per_client: 1_000_000,
        };
        Load::start(addr, mode, bounds)
    }

    /// Waits until every client reaches its bounds, and collects their reports.
    pub fn join(self) -> Report {
        let mut report = Report::default();
        for t in self.threads {
            report.merge(t.join().expect("load client panicked"));
        }
        report.latencies.sort();
        report
    }

    /// Stops the clients (each finishes its current request) and collects their reports.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }
}

/// Fresh-connection clients and keep-alive clients at once (`clients` of each), until
/// [`Mixed::finish`] (or a minute at most).
#[derive(Debug)]
pub struct Mixed {
    fresh: Load,
    kept: Load,
}

impl Mixed {
    pub fn start(addr: SocketAddr, clients: usize) -> Mixed {
        Mixed {
            fresh: Load::until_finished(addr, Mode::Fresh, clients),
            kept: Load::until_finished(addr, Mode::KeepAlive, clients),
        }
    }

    /// The fresh clients' report and the keep-alive clients'.
    pub fn finish(self) -> (Report, Report) {
        (self.fresh.finish(), self.kept.finish())
    }
}

/// Runs `n` fresh-connection requests one after another and returns the report.
pub fn requests(addr: SocketAddr, n: u64) -> Report {
    let bounds = Bounds {
        clients: 1,
        duration: Duration::from_secs(30),
        max_requests_per_client: n,
    };
    let stop = AtomicBool::new(false);
    client(addr, Mode::Fresh, bounds, &stop)
}

fn client(addr: SocketAddr, mode: Mode, bounds: Bounds, stop: &AtomicBool) -> Report {
    let mut report = Report::default();
    let end = Instant::now() + bounds.duration;
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0;
    while sent < bounds.max_requests_per_client
        && Instant::now() < end
        && !stop.load(Ordering::SeqCst)
    {
        sent += 1;
        let started = Instant::now();
        if conn.is_none() {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.set_nodelay(true).unwrap();
                    report.connections += 1;
                    conn = Some(s);
                }
                Err(e) => {
                    fail(&mut report, "connect", &e);
                    continue;
                }
            }
        }
        let stream = conn.as_mut().unwrap();
        let path = PATH.get().map_or("/", String::as_str);
        let request = match mode {
            Mode::Fresh => {
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            }
            Mode::KeepAlive => format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"),
        };
        let request = request.as_bytes();
        if let Err(e) = stream.write_all(request) {
            fail(&mut report, "write", &e);
            conn = None;
            continue;
        }
        match read_response(stream) {
            Ok(resp) => {
                report.latencies.push(started.elapsed());
                if resp.status != 200 {
                    *report
                        .failures
                        .entry(format!("status {}", resp.status))
                        .or_default() += 1;
                } else {
                    report.ok += 1;
                    if let Some(g) = resp.generation {
                        *report.generations.entry(g).or_default() += 1;
                    }
                }
                if resp.close {
                    report.close_notices += 1;
                }
                if resp.close || mode == Mode::Fresh {
                    conn = None;
                }
            }
            Err(kind) => {
                *report.failures.entry(kind.to_string()).or_default() += 1;
                conn = None;
            }
        }
    }
    report
}

fn fail(report: &mut Report, kind: &str, err: &std::io::Error) {
    let kind = match err.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "reset",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        std::io::ErrorKind::ConnectionRefused => "refused",
        _ => kind,
    };
    *report.failures.entry(kind.to_string()).or_default() += 1;
}

struct Response {
    status: u16,
    close: bool,
    generation: Option<u64>,
}

/// Reads one response with a `Content-Length` body.
fn read_response(stream: &mut TcpStream) -> Result<Response, &'static str> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(io_kind(&e)),
        }
        if buf.len() > 64 * 1024 {
            return Err("malformed");
        }
    };
    let head = std::str::from_utf8(&buf[..header_end]).map_err(|_| "malformed")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("malformed")?;
    let (mut length, mut close, mut generation) = (0usize, false, None);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => length = v.parse().map_err(|_| "malformed")?,
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "x-baton-generation" => generation = v.parse().ok(),
            _ => {}
        }
    }
    while buf.len() < header_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err("closed"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(io_kind(&e)),
        }
    }
    Ok(Response {
        status,
        close,
        generation,
    })
}

fn io_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => "reset",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        _ => "read",
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
