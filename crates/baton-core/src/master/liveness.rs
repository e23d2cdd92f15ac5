//! Liveness after ready (`liveness:`): a task per ready worker probes it every interval (HTTP
//! or TCP), or waits for its heartbeats (a watchdog window). A worker that fails `threshold`
//! probes in a row, or stays silent for a whole window, is reported to the state machine
//! ([`Event::Unhealthy`]), which replaces it.
//!
//! No judgement while the master itself was not scheduled on time: every wait measures how late
//! it woke, a window is judged only once the heartbeats waiting in the runtime are taken in
//! (`stall.rs`), and a round in which the master ran late (a machine that stalled, a master stopped
//! with SIGSTOP) judges nothing: a probe that timed out because its answer sat unread, or a
//! window whose heartbeats sat in a socket, is not the worker's failure. The state machine adds
//! the other guard: at most `max_replacing` of a generation's workers are replaced at once.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::Master;
use super::probe::attempt;
use super::readiness::News;
use crate::config::{LivenessCheck, Probe};
use crate::supervisor::{Event, WorkerId};

/// A wait that ends this much later than planned means the master was not running: the round
/// judges nothing. Far above a loaded machine's timer slack, far below any useful interval.
pub(super) const LATE: Duration = Duration::from_millis(500);

impl Master {
    /// A worker just became ready: its liveness check starts (if its program has one).
    pub(super) fn start_liveness(&mut self, worker: WorkerId) {
        let Some(liveness) = self.program_of(worker).and_then(|p| p.liveness.clone()) else {
            return;
        };
        let events = self.events_tx.clone();
        let Some(link) = self.links.get_mut(&worker) else {
            return;
        };
        if link.liveness {
            return;
        }
        link.liveness = true;
        let task = match liveness.check {
            LivenessCheck::Probe(probe) => {
                let Some((generation, _, slot)) = self.supervisor.placement(worker) else {
                    return;
                };
                let address = probe.address_for(worker.0, slot, generation.0);
                let threshold = liveness.threshold;
                tokio::spawn(probe_liveness(worker, probe, address, threshold, events))
            }
            LivenessCheck::Watchdog(window) => {
                let (beats, beats_rx) = mpsc::unbounded_channel();
                link.heartbeats = Some(beats);
                tokio::spawn(watchdog(worker, window, beats_rx, events))
            }
        };
        if let Some(link) = self.links.get_mut(&worker) {
            link.tasks.push(task.abort_handle());
        }
    }

    /// The configuration of `worker`'s program.
    pub(super) fn program_of(&self, worker: WorkerId) -> Option<&crate::config::WorkerConfig> {
        let (generation, program, _) = self.supervisor.placement(worker)?;
        self.resources
            .get(&generation)?
            .programs
            .get(program)
            .map(|p| &**p)
    }
}

/// Sleeps until `at`; returns how late it woke.
async fn sleep_until(at: Instant) -> Duration {
    tokio::time::sleep_until(at).await;
    Instant::now().saturating_duration_since(at)
}

/// Probes a ready worker every interval; reports it after `threshold` failures in a row.
async fn probe_liveness(
    worker: WorkerId,
    probe: Probe,
    address: String,
    threshold: u32,
    events: mpsc::UnboundedSender<News>,
) {
    let mut failures = 0u32;
    let mut next = Instant::now() + probe.interval;
    loop {
        let late = sleep_until(next).await;
        next = Instant::now() + probe.interval;
        if late > LATE {
            debug!(
                worker = worker.0,
                "liveness of worker {worker}: the master ran {} ms late; no judgement this round",
                late.as_millis()
            );
            continue;
        }
        let started = Instant::now();
        let result = attempt(&probe, &address).await;
        if started.elapsed() > probe.timeout + LATE {
            // The attempt's own timer fired late: the master stalled during it.
            continue;
        }
        match result {
            Ok(()) => failures = 0,
            Err(err) => {
                failures += 1;
                debug!(
                    worker = worker.0,
                    "liveness probe of worker {worker} at {address} failed ({failures} of {threshold}): {err}"
                );
                if failures >= threshold {
                    failures = 0;
                    let reason = format!(
                        "its liveness probe at {address} failed {threshold} times in a row, last: {err}"
                    );
                    let _ = events.send(News::Event(Event::Unhealthy { worker, reason }));
                }
            }
        }
    }
}

/// Waits for a ready worker's heartbeats; reports it when a whole window passes without one.
async fn watchdog(
    worker: WorkerId,
    window: Duration,
    mut beats: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<News>,
) {
    loop {
        let deadline = Instant::now() + window;
        tokio::select! {
            beat = beats.recv() => {
                if beat.is_none() {
                    return;
                }
            }
            late = sleep_until(deadline) => {
                // Heartbeats that arrived while the master was not running wait unread: a
                // window that ended late is given again.
                if late > LATE {
                    continue;
                }
                // A stall that ended just before the deadline left them unread too: the tasks
                // that carry them run first, then the window is judged (`stall.rs`).
                super::stall::settle().await;
                match beats.try_recv() {
                    Ok(()) => continue,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                let reason = format!(
                    "no heartbeat for {} ms (liveness watchdog)",
                    window.as_millis()
                );
                let _ = events.send(News::Event(Event::Unhealthy { worker, reason }));
            }
        }
    }
}
