//! Draining: why a drain was requested ([`DrainReason`]), waiting for it ([`DrainWatch`]), the
//! accept gate a standing-by generation closes ([`AcceptGate`]), connection counting
//! ([`ConnectionGuard`]), and the signals: the drain signal requests a drain, SIGUSR1 is ignored.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::Shared;

/// Why a drain was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The master retired this worker's generation; it kills the worker after `deadline`.
    Master { deadline: Duration },
    /// The drain signal arrived (SIGTERM by default).
    Signal,
    /// The channel closed: the master is gone.
    MasterGone,
}

impl std::fmt::Display for DrainReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainReason::Master { deadline } => {
                write!(
                    f,
                    "the master asked (killed in {} ms)",
                    deadline.as_millis()
                )
            }
            DrainReason::Signal => write!(f, "the drain signal arrived"),
            DrainReason::MasterGone => write!(f, "the master is gone"),
        }
    }
}

/// Resolves when a drain is requested. Cheap to clone: give one to every connection task.
#[derive(Debug, Clone)]
pub struct DrainWatch(pub(crate) watch::Receiver<Option<DrainReason>>);

impl DrainWatch {
    /// Waits until a drain is requested and says why.
    pub async fn requested(&mut self) -> DrainReason {
        loop {
            if let Some(reason) = *self.0.borrow_and_update() {
                return reason;
            }
            if self.0.changed().await.is_err() {
                // The sender lives as long as the worker; if it is gone, so is the master.
                return DrainReason::MasterGone;
            }
        }
    }
    /// Whether a drain was requested already.
    pub fn is_requested(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// Whether to accept now: closed while the worker's generation stands by during a newer
/// generation's probation (`pause`), open again if that generation is rolled back (`resume`).
#[derive(Debug, Clone)]
pub struct AcceptGate(pub(crate) watch::Receiver<bool>);

impl AcceptGate {
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }
    /// Waits until the gate opens or closes.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Counts a connection while alive.
#[derive(Debug)]
pub struct ConnectionGuard(pub(crate) Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
        self.0.counted.notify_one();
    }
}

/// SIGUSR1 (logrotate's habit, and `systemctl kill -s USR1` reaches every process of a unit)
/// must not kill a worker: it is noted and otherwise ignored.
async fn ignore_usr1(usr1: Option<Signal>) {
    let Some(mut usr1) = usr1 else { return };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: nothing to reopen (the worker logs to stderr)");
    }
}

/// How long after a drain signal a worker waits for the master's drain packet (and the handoff
/// links before it) before it drains with the links it has: a drain the master asks for sends
/// the packet first, but the signal may be seen first; a signal alone (an operator's `kill`,
/// a canary's test) brings no packet at all.
const PACKET_AFTER_SIGNAL: Duration = Duration::from_secs(2);

/// The drain signal (SIGTERM, baton's default) requests a drain instead of killing the process.
async fn watch_drain_signal(shared: Arc<Shared>, term: Option<Signal>) {
    let Some(mut term) = term else { return };
    if term.recv().await.is_some() {
        shared
            .drain
            .send_if_modified(|d| d.get_or_insert(DrainReason::Signal) == &DrainReason::Signal);
        // Without it, a connection waiting for its handoff turn would wait for links that
        // never come, and the worker would never finish its drain.
        tokio::time::sleep(PACKET_AFTER_SIGNAL).await;
        shared.handoff.settle();
    }
}

/// Starts watching the drain signal (SIGTERM) and SIGUSR1. Their handlers are installed here,
/// before the worker can report ready: a drain signal that comes right after `ready` requests a
/// drain instead of killing the process (tasks spawned on a current-thread runtime start only
/// when the caller yields).
pub(crate) fn watch_signals(shared: Arc<Shared>) {
    let term = signal(SignalKind::terminate()).ok();
    let usr1 = signal(SignalKind::user_defined1()).ok();
    tokio::spawn(watch_drain_signal(shared, term));
    tokio::spawn(ignore_usr1(usr1));
}

/// Spreads the closing of long-lived connections a worker cannot hand over across a window
/// (for WebSockets: a close with 1012, Service Restart), so that their clients do not all
/// reconnect in the same instant. Each connection waits for its turn: the `i`-th of `total`
/// at `window * i / total` after the pacer was made.
#[derive(Debug)]
pub struct Pacer {
    start: tokio::time::Instant,
    window: std::time::Duration,
    total: u64,
    next: std::sync::atomic::AtomicU64,
}

impl Pacer {
    pub fn new(window: std::time::Duration, total: u64) -> Pacer {
        Pacer {
            start: tokio::time::Instant::now(),
            window,
            total: total.max(1),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Waits for this connection's turn to close (turns past `total` close at the window's end).
    pub async fn turn(&self) {
        let i = self
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .min(self.total);
        let at = self.window.mul_f64(i as f64 / self.total as f64);
        tokio::time::sleep_until(self.start + at).await;
    }
}
