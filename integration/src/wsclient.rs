//! WebSocket clients for the suite and the benchmark, on tokio-tungstenite's client (a library
//! of its own: nothing of baton's or of the example server's code). Each client opens one
//! connection, sends a numbered message every period and waits for its echo before the next:
//! a message lost, repeated or out of order, and a connection that ends, are each counted,
//! never retried, never reconnected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct WsReport {
    pub clients: usize,
    /// Clients whose connection opened.
    pub connected: usize,
    pub sent: u64,
    /// Echoes received, each the one expected next.
    pub echoed: u64,
    /// Echoes that were not the one expected next (lost, repeated or out of order).
    pub wrong: u64,
    /// Connections that ended before the run did, by why (`close 1012`, `error ...`,
    /// `timeout`).
    pub ended: BTreeMap<String, u64>,
    /// When each of those connections ended, from the run's start, sorted.
    pub ended_at: Vec<Duration>,
    /// Echo times, sorted after the run.
    pub latencies: Vec<Duration>,
    /// The same by the window they were measured in ([`WsLoad::mark`]: 0 before the first
    /// mark), each sorted after the run.
    pub windows: Vec<Vec<Duration>>,
    /// Clients that stopped because the run's `longest` passed, not because it was stopped:
    /// gone before the end of what was measured (a run that counts these counted less).
    pub expired: u64,
}

impl WsReport {
    pub fn disconnects(&self) -> u64 {
        self.ended.values().sum()
    }

    /// The most connections that ended within any `window`: how many clients come back at once.
    pub fn peak_ends(&self, window: Duration) -> usize {
        let at = &self.ended_at;
        (0..at.len())
            .map(|i| at[i..].iter().take_while(|t| **t < at[i] + window).count())
            .max()
            .unwrap_or(0)
    }

    pub fn quantile(&self, q: f64) -> Duration {
        quantile(&self.latencies, q)
    }

    /// The `q`-quantile echo time of window `mark` ([`WsLoad::mark`]).
    pub fn quantile_in(&self, mark: usize, q: f64) -> Duration {
        self.windows
            .get(mark)
            .map_or(Duration::ZERO, |w| quantile(w, q))
    }

    /// Prints the summary under `what`, then asserts no client was disconnected and every
    /// message came back once, in order.
    #[track_caller]
    pub fn assert_unbroken(&self, what: &str) {
        eprintln!("{what}: {}", self.summary());
        assert_eq!(self.disconnects(), 0, "{what}: {}", self.summary());
        assert_eq!(self.wrong, 0, "{what}: {}", self.summary());
        assert_eq!(self.echoed, self.sent, "{what}: {}", self.summary());
    }

    /// Prints the summary under `what`, then asserts every client's connection ended with a
    /// 1012 close frame (Service Restart) and no message came back wrong.
    #[track_caller]
    pub fn assert_all_closed_with_1012(&self, what: &str) {
        eprintln!("{what}: {}", self.summary());
        assert_eq!(self.wrong, 0, "{what}: {}", self.summary());
        assert_eq!(
            self.ended.get("close 1012"),
            Some(&(self.clients as u64)),
            "{what}: {}",
            self.summary()
        );
    }

    pub fn summary(&self) -> String {
        format!(
            "{} of {} clients connected, {} expired before the stop, {} sent, {} echoed, {} wrong, {} disconnects {:?}, echo p50 {:?}, p99 {:?}",
            self.connected,
            self.clients,
            self.expired,
            self.sent,
            self.echoed,
            self.wrong,
            self.disconnects(),
            self.ended,
            self.quantile(0.5),
            self.quantile(0.99)
        )
    }
}

/// Quantile `q` of `sorted` (zero if empty).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A run of WebSocket clients on a runtime of its own, until [`WsLoad::stop_and_report`].
#[derive(Debug)]
pub struct WsLoad {
    stop: Arc<AtomicBool>,
    window: Arc<std::sync::atomic::AtomicUsize>,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    ended: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<WsReport>,
}

impl WsLoad {
    /// `clients` connections to `ws://addr/chat`, opened a few at a time
    /// ([`OPENING_AT_ONCE`]), then a message every `period` on each, for at most `longest`.
    pub fn start(addr: SocketAddr, clients: usize, period: Duration, longest: Duration) -> WsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let window = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (flag, count, gone) = (stop.clone(), opened.clone(), ended.clone());
        let marks = window.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the WebSocket clients");
            runtime.block_on(run(
                addr,
                clients,
                (period, longest),
                (flag, marks),
                (count, gone),
            ))
        });
        WsLoad {
            stop,
            window,
            opened,
            ended,
            thread,
        }
    }

    /// How many clients' connections have ended (not counting those the run stopped).
    /// `clients` clients on `addr`, each sending a message every 100 ms, once every one of
    /// them is connected (the load opens them one by one).
    pub fn connected_clients(addr: SocketAddr, clients: usize) -> WsLoad {
        let load = WsLoad::start(
            addr,
            clients,
            Duration::from_millis(100),
            Duration::from_secs(300),
        );
        crate::eventually(
            Duration::from_secs(30),
            "every WebSocket client connected",
            || (load.connected() == clients).then_some(()),
        );
        load
    }

    pub fn ended(&self) -> usize {
        self.ended.load(Ordering::Acquire)
    }

    /// From now on, echo times go to window `mark` of the report (they go to window 0 before
    /// the first mark): a benchmark measures its phases apart, with the same clients.
    pub fn mark(&self, mark: usize) {
        self.window.store(mark, Ordering::Release);
    }

    /// How many clients have opened their connection so far.
    pub fn connected(&self) -> usize {
        self.opened.load(Ordering::Acquire)
    }

    /// Stops every client after its current message, and what they saw.
    pub fn stop_and_report(self) -> WsReport {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the WebSocket clients' thread")
    }
}

/// The WebSockets' configuration, the clients' and the benchmark's echo server's: tungstenite's
/// defaults but a 4 KiB read buffer (its default 128 KiB is zeroed before each read: at 10 000
/// clients that memset was most of the load's CPU). The same as `ws-worker`'s.
pub fn config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

/// Handshakes in flight at once while the clients open.
const OPENING_AT_ONCE: usize = 16;

async fn run(
    addr: SocketAddr,
    clients: usize,
    (period, longest): (Duration, Duration),
    (stop, window): (Arc<AtomicBool>, Arc<std::sync::atomic::AtomicUsize>),
    (opened, ended): (
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
) -> WsReport {
    let begun = Instant::now();
    let end = begun + longest;
    // A few handshakes at a time: one by one, 10 000 clients take minutes through a proxy.
    let connecting = Arc::new(tokio::sync::Semaphore::new(OPENING_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..clients {
        let url = format!("ws://{addr}/chat");
        let mut request = url.into_client_request().expect("a WebSocket request");
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "chat".parse().unwrap());
        let turn = connecting.clone().acquire_owned().await.expect("open");
        let (stop, opened, ended) = (stop.clone(), opened.clone(), ended.clone());
        let window = window.clone();
        tasks.spawn(async move {
            let connected = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async_with_config(request, Some(config()), true),
            )
            .await;
            drop(turn);
            let Ok(Ok((ws, _))) = connected else {
                return None;
            };
            opened.fetch_add(1, Ordering::AcqRel);
            let report = client(id, ws, period, (begun, end), (stop, window)).await;
            if report.disconnects() > 0 {
                ended.fetch_add(1, Ordering::AcqRel);
            }
            Some(report)
        });
    }
    let mut report = WsReport {
        clients,
        ..WsReport::default()
    };
    while let Some(one) = tasks.join_next().await {
        let Some(one) = one.expect("a client task") else {
            continue;
        };
        report.connected += 1;
        report.sent += one.sent;
        report.echoed += one.echoed;
        report.wrong += one.wrong;
        report.expired += one.expired;
        for (why, n) in one.ended {
            *report.ended.entry(why).or_default() += n;
        }
        report.ended_at.extend(one.ended_at);
        report.latencies.extend(one.latencies);
        for (mark, times) in one.windows.into_iter().enumerate() {
            if report.windows.len() <= mark {
                report.windows.resize(mark + 1, Vec::new());
            }
            report.windows[mark].extend(times);
        }
    }
    report.latencies.sort();
    report.windows.iter_mut().for_each(|w| w.sort());
    report.ended_at.sort();
    report
}

async fn client<S>(
    id: usize,
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    period: Duration,
    (begun, end): (Instant, Instant),
    (stop, window): (Arc<AtomicBool>, Arc<std::sync::atomic::AtomicUsize>),
) -> WsReport
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut report = WsReport::default();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) && Instant::now() < end {
        tick.tick().await;
        n += 1;
        let text = format!("c{id} n{n}");
        let sent = Instant::now();
        if let Err(err) = ws.send(Message::text(text.clone())).await {
            *report.ended.entry(format!("send: {err}")).or_default() += 1;
            return report;
        }
        report.sent += 1;
        let expected = format!("echo: {text}");
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.starts_with("echo: ") => return Ok(t),
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map_or(0, |f| u16::from(f.code));
                        return Err(format!("close {code}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(format!("error: {err}")),
                    None => return Err("end of stream".to_string()),
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(t)) if t.as_str() == expected => {
                report.echoed += 1;
                let took = sent.elapsed();
                report.latencies.push(took);
                let mark = window.load(Ordering::Acquire);
                if report.windows.len() <= mark {
                    report.windows.resize(mark + 1, Vec::new());
                }
                report.windows[mark].push(took);
            }
            Ok(Ok(_)) => report.wrong += 1,
            Ok(Err(why)) => {
                *report.ended.entry(why).or_default() += 1;
                report.ended_at.push(begun.elapsed());
                return report;
            }
            Err(_) => {
                *report.ended.entry("timeout".into()).or_default() += 1;
                return report;
            }
        }
    }
    if !stop.load(Ordering::Acquire) {
        report.expired += 1;
    }
    let _ = ws.close(None).await;
    report
}
