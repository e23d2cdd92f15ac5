//! When a new worker counts as ready: every condition its program names, each reported by the
//! task that watches it (the channel's `ready` packet, `READY=1` on its notify socket, a probe
//! that answers, a delay that passed). [`News`] is what those tasks send the event loop; a
//! [`Gate`] per worker turns the last missing condition into the one `ready` the state machine
//! sees. A report of a condition the program does not name (a systemd-style worker's early
//! `READY=1` when a probe is configured) is ignored, with a debug line.
//!
//! A baton-protocol worker always reports on its channel, so its channel `ready` is always one
//! of the conditions: `ready: {http: ...}` on such a worker waits for both.

use std::collections::VecDeque;

use baton_proto::WorkerMessage;
use tracing::debug;

use super::Master;
use crate::config::{Protocol, Readiness, WorkerConfig};
use crate::faults::Point;
use crate::supervisor::{Event, WorkerId};

/// What the tasks watching workers send the event loop.
#[derive(Debug)]
pub(super) enum News {
    /// Anything for the state machine.
    Event(Event),
    /// One readiness condition of a worker is met.
    Ready(WorkerId, Condition),
    /// The worker proved it is alive (a heartbeat packet, `WATCHDOG=1`).
    Heartbeat(WorkerId),
    /// The worker announced a main process (`MAINPID=`), proven its own and held.
    MainPid {
        worker: WorkerId,
        process: baton_sys::pidfd::Process,
    },
    /// The worker announced a main process baton refuses.
    MainPidRefused {
        worker: WorkerId,
        refusal: super::main_pid::Refusal,
    },
    /// An announced main process ended (seen through its pidfd): `serial` tells it from a later
    /// process of the same number.
    MainGone { pid: u32, serial: u64 },
    /// What the worker does with connection handoff.
    HandoffAbility {
        worker: WorkerId,
        offers: bool,
        adopts: bool,
    },
}

/// One readiness condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Condition {
    Channel,
    Notify,
    Probe,
    Delay,
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Condition::Channel => "the channel's ready packet",
            Condition::Notify => "READY=1",
            Condition::Probe => "a readiness probe answer",
            Condition::Delay => "the ready delay",
        })
    }
}

/// The conditions a program's workers must meet, in the order they are checked.
pub(super) fn conditions(config: &WorkerConfig) -> Vec<Condition> {
    fn add(readiness: &Readiness, out: &mut Vec<Condition>) {
        let condition = match readiness {
            Readiness::Channel => Condition::Channel,
            Readiness::Notify => Condition::Notify,
            Readiness::Probe(_) => Condition::Probe,
            Readiness::Delay(_) => Condition::Delay,
            Readiness::All(all) => {
                for r in all {
                    add(r, out);
                }
                return;
            }
        };
        if !out.contains(&condition) {
            out.push(condition);
        }
    }
    let mut out = Vec::new();
    if config.protocol == Protocol::Baton {
        out.push(Condition::Channel);
    }
    add(&config.ready, &mut out);
    out
}

/// The readiness conditions of one worker not met yet; empty once it is ready.
#[derive(Debug, Default)]
pub(super) struct Gate {
    missing: Vec<Condition>,
}

impl Gate {
    pub(super) fn new(conditions: Vec<Condition>) -> Gate {
        Gate {
            missing: conditions,
        }
    }

    /// `condition` is met: the worker's `ready` event when it was the last one missing.
    pub(super) fn met(&mut self, worker: WorkerId, condition: Condition) -> Option<Event> {
        let Some(at) = self.missing.iter().position(|c| *c == condition) else {
            debug!(
                worker = worker.0,
                "worker {worker}: {condition} ignored (not one of its readiness conditions, or met already)"
            );
            return None;
        };
        self.missing.remove(at);
        if let Some(next) = self.missing.first() {
            debug!(
                worker = worker.0,
                "worker {worker}: {condition} met; waiting for {next}"
            );
            return Some(Event::NotReadyBecause {
                worker,
                cause: format!("still waiting for {next}; {condition} is in"),
            });
        }
        Some(Event::Message {
            worker,
            message: WorkerMessage::Ready,
        })
    }
}

impl Master {
    /// News from the tasks watching workers: events for the state machine go to `queue`; a
    /// readiness condition goes through the worker's gate, which lets its last one through as
    /// the worker's `ready`.
    pub(super) fn on_news(&mut self, news: News, queue: &mut VecDeque<Event>) {
        match news {
            News::Event(event) => queue.push_back(event),
            News::MainPid { worker, process } => self.announced(worker, process, queue),
            News::MainPidRefused { worker, refusal } => self.refused_main_pid(worker, refusal),
            News::MainGone { pid, serial } => self.main_gone(pid, serial, queue),
            News::HandoffAbility {
                worker,
                offers,
                adopts,
            } => self.handoff_ability(worker, offers, adopts),
            News::Heartbeat(worker) => {
                if let Some(beats) = self.links.get(&worker).and_then(|l| l.heartbeats.as_ref()) {
                    let _ = beats.send(());
                }
            }
            News::Ready(worker, _) if let Err(err) = Point::WorkerReady.check() => {
                let cause = format!("its readiness was lost: {err}");
                queue.push_back(Event::NotReadyBecause { worker, cause });
            }
            News::Ready(worker, condition) => {
                if let Some(ready) = self
                    .links
                    .get_mut(&worker)
                    .and_then(|link| link.ready.met(worker, condition))
                {
                    queue.push_back(ready);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_ready_once_every_condition_is_met_whatever_the_order() {
        let w = WorkerId(3);
        let mut gate = Gate::new(vec![Condition::Channel, Condition::Probe]);
        assert_eq!(
            gate.met(w, Condition::Probe),
            Some(Event::NotReadyBecause {
                worker: w,
                cause:
                    "still waiting for the channel's ready packet; a readiness probe answer is in"
                        .into()
            })
        );
        assert_eq!(gate.met(w, Condition::Notify), None, "not a condition");
        assert!(matches!(
            gate.met(w, Condition::Channel),
            Some(Event::Message {
                worker: WorkerId(3),
                message: WorkerMessage::Ready
            })
        ));
        assert_eq!(gate.met(w, Condition::Channel), None, "once");
    }
}
