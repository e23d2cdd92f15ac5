//! A worker's life as the state machine sees it: spawned, its packets (ready, status,
//! draining), its probe failing on probation, its main pid announced, its exit and what that
//! means for its generation (a failed reload, a rollback, a restart with backoff), and the
//! deadlines of the tick (ready timeouts, drain deadlines, due restarts).

use std::time::{Duration, Instant};

use baton_proto::WorkerMessage;
use baton_sys::process::ExitKind;
use tracing::{debug, info, warn};

use super::model::{Action, Generation};
use super::records::{GenState, Retirement, WorkerState};
use super::{Supervisor, WorkerId};

mod crash_loop;
mod replace;

pub use crash_loop::{CRASH_LOOP, CrashLoop};

impl Supervisor {
    pub(super) fn on_spawned(&mut self, now: Instant, id: WorkerId, result: Result<u32, String>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let g = w.generation;
        match result {
            Ok(pid) => {
                w.pid = Some(pid);
                w.pgid = Some(pid);
                // Stopped before it had a pid (a rolling reload that failed meanwhile).
                let stopped = w.replaced.is_some();
                self.pids.insert(pid, id);
                match self.generations.get(&g).map(|entry| &entry.state) {
                    _ if stopped => self.kill(id),
                    Some(GenState::Failed) | None => self.kill(id),
                    Some(GenState::Draining { .. }) => self.drain_worker(id),
                    _ => {
                        let timeout = self.program(id).map_or(Duration::ZERO, |p| p.ready_timeout);
                        if let Some(w) = self.workers.get_mut(&id) {
                            w.state = WorkerState::Starting {
                                deadline: now + timeout,
                            };
                        }
                        debug!(
                            event = baton_proto::event::WORKER_SPAWNED,
                            worker = id.0,
                            generation = g.0,
                            pid,
                            "worker {id} of generation {g} started as pid {pid}"
                        );
                    }
                }
            }
            Err(reason) => {
                let slot = w.slot;
                self.workers.remove(&id);
                self.actions.push(Action::Forget { worker: id });
                if let Some(s) = self.slot_mut(g, slot) {
                    s.worker = None;
                }
                let reason =
                    format!("worker {id} of generation {g} could not be started: {reason}");
                self.after_worker_loss(now, g, slot, Duration::ZERO, reason, id);
            }
        }
    }

    /// A starting worker will not be ready: its deadline passed, or something final happened
    /// ([`Event::CannotBeReady`](super::Event::CannotBeReady)). A worker of a reload's new
    /// generation fails the reload (a rolling one rolls back); a replacement in a serving
    /// generation is killed and restarted.
    pub(super) fn never_ready(&mut self, now: Instant, id: WorkerId, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (g, pid) = (w.generation, w.pid.unwrap_or(0));
        let rolling = self.rolling_forward(g);
        let fails_reload = match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Starting) => true,
            Some(GenState::Rolling) => rolling,
            _ => false,
        };
        if !fails_reload {
            warn!(
                event = baton_proto::event::WORKER_NOT_READY,
                worker = id.0,
                pid,
                "{reason}: killing it"
            );
            // Its exit schedules the restart with backoff.
            self.kill(id);
            return;
        }
        info!(
            event = baton_proto::event::WORKER_NOT_READY,
            worker = id.0,
            generation = g.0,
            pid,
            "{reason}"
        );
        if rolling {
            self.rollout_failed(now, reason, Some(id));
        } else {
            self.fail_reload(now, reason, Some(id));
        }
    }

    pub(super) fn on_message(&mut self, now: Instant, id: WorkerId, message: WorkerMessage) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let g = w.generation;
        let slot = w.slot;
        match message {
            WorkerMessage::Ready => {
                if let WorkerState::Starting { .. } = w.state {
                    w.state = WorkerState::Ready;
                    self.watch_stability(now, g, slot);
                    self.successor_ready(now, id);
                    let Some(w) = self.workers.get_mut(&id) else {
                        return;
                    };
                    w.ready_after = Some(now.saturating_duration_since(w.spawned));
                    let after = now.saturating_duration_since(w.spawned).as_millis() as u64;
                    let pid = w.pid.unwrap_or(0);
                    info!(
                        event = baton_proto::event::WORKER_READY,
                        worker = id.0,
                        generation = g.0,
                        pid,
                        ready_ms = after,
                        "worker {id} of generation {g} (pid {pid}) is ready after {after} ms"
                    );
                    let all_ready = self.generations.get(&g).is_some_and(|entry| {
                        matches!(entry.state, GenState::Starting)
                            && entry.slots.iter().all(|s| {
                                s.worker
                                    .and_then(|w| self.workers.get(&w))
                                    .is_some_and(|w| w.state == WorkerState::Ready)
                            })
                    });
                    if all_ready {
                        self.promote(now, g);
                    }
                }
            }
            WorkerMessage::Status { connections, text } => {
                if connections.is_some() {
                    w.connections = connections;
                }
                if let Some(text) = text {
                    debug!(event = baton_proto::event::WORKER_STATUS, worker = id.0, generation = g.0, status = %text,
                        "worker {id} of generation {g}: {text}");
                    w.status = Some(text);
                }
            }
            WorkerMessage::Draining => {
                // A serving worker that stops on its own (STOPPING=1) is on its way out: shown as
                // draining; its exit is then replaced like any other.
                let serving = matches!(
                    self.generations.get(&g).map(|e| &e.state),
                    Some(GenState::Serving)
                );
                if let (true, Some(w)) = (serving, self.workers.get_mut(&id)) {
                    if w.state == WorkerState::Ready {
                        w.state = WorkerState::Draining;
                    }
                }
                debug!(worker = id.0, "worker {id} of generation {g} is draining");
            }
            // Heartbeats go to the master's liveness watchdog, and connection handoff is between
            // workers and the master's links: neither comes here.
            WorkerMessage::Heartbeat
            | WorkerMessage::Handoff { .. }
            | WorkerMessage::HandoffReport(_) => {}
            WorkerMessage::Unknown => {
                debug!(
                    worker = id.0,
                    "worker {id} sent a message type this master does not know"
                );
            }
        }
    }

    /// Why a starting worker is not ready yet, kept for its verdict if it times out.
    pub(super) fn on_not_ready(&mut self, id: WorkerId, cause: String) {
        if let Some(w) = self.workers.get_mut(&id)
            && matches!(
                w.state,
                WorkerState::Starting { .. } | WorkerState::Spawning
            )
        {
            w.not_ready = Some(cause);
        }
    }

    /// A starting worker can never become ready: judged now, as if its ready deadline passed.
    pub(super) fn on_cannot_be_ready(&mut self, now: Instant, id: WorkerId, cause: String) {
        let starting = self.workers.get(&id).filter(|w| {
            matches!(
                w.state,
                WorkerState::Starting { .. } | WorkerState::Spawning
            )
        });
        if let Some(w) = starting {
            let reason = format!(
                "worker {id} of generation {} (pid {}) cannot become ready: {cause}",
                w.generation,
                w.pid.unwrap_or(0)
            );
            self.never_ready(now, id, reason);
        }
    }

    pub(super) fn on_probe_failed(&mut self, now: Instant, id: WorkerId, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let g = w.generation;
        let pid = w.pid.unwrap_or(0);
        let reason = format!(
            "worker {id} of generation {g} (pid {pid}) failed its readiness probe: {reason}"
        );
        if self.on_probation(g) {
            self.roll_back(now, reason, Some(id));
        } else if self.rolling_forward(g) {
            self.rollout_failed(now, reason, Some(id));
        } else {
            debug!(worker = id.0, "{reason} (not on probation: ignored)");
        }
    }

    pub(super) fn on_main_pid(&mut self, id: WorkerId, pid: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.pid == Some(pid) || pid == 0 {
            return;
        }
        info!(
            event = baton_proto::event::WORKER_MAIN_PID,
            worker = id.0,
            pid,
            "worker {id}'s main process is now pid {pid} (was {})",
            w.pid.unwrap_or(0)
        );
        w.pid = Some(pid);
        self.pids.insert(pid, id);
    }

    pub(super) fn on_exited(&mut self, now: Instant, pid: u32, status: ExitKind) {
        let Some(id) = self.pids.remove(&pid) else {
            debug!(pid, "reaped pid {pid}, not a worker: it {status}");
            return;
        };
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.pid != Some(pid) {
            // The process it was started as exited after handing over to its announced main
            // process (a server that forks): the worker lives on as that process.
            debug!(
                worker = id.0,
                pid, "worker {id}'s launcher pid {pid} {status}"
            );
            return;
        }
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.kills.remove(&id);
        if let Some(pgid) = w.pgid {
            self.actions.push(Action::KillGroup { pgid });
        }
        self.pids.retain(|_, owner| *owner != id);
        self.actions.push(Action::Forget { worker: id });
        let g = w.generation;
        // No slot names a worker gone (a worker retired by a rolling reload, which counts as
        // replaced, kept its slot's name: found by the property test).
        if let Some(s) = self.slot_mut(g, w.slot)
            && s.worker == Some(id)
        {
            s.worker = None;
        }
        if self.replaced_exited(now, id, &w, &status.to_string()) {
            return;
        }
        if let Some(s) = self.slot_mut(g, w.slot) {
            s.last_worker = Some(id);
            s.last_exit = Some(status.to_string());
        }
        let ran = now.saturating_duration_since(w.spawned);
        match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Draining { .. }) => {
                info!(event = baton_proto::event::WORKER_EXITED, worker = id.0, generation = g.0, pid,
                    status = %status, "worker {id} of generation {g} (pid {pid}) {status}");
                self.finish_if_empty(now, g);
            }
            Some(GenState::Failed) | None => {
                debug!(
                    worker = id.0,
                    pid, "worker {id} of failed generation {g} is gone: it {status}"
                );
                self.finish_if_empty(now, g);
            }
            _ => {
                let before = if w.state == WorkerState::Ready {
                    ""
                } else {
                    " before it was ready"
                };
                let reason = format!("worker {id} of generation {g} (pid {pid}) {status}{before}");
                self.after_worker_loss(now, g, w.slot, ran, reason, id);
            }
        }
    }

    /// A worker of a starting or serving generation is gone (exited, or never started).
    pub(super) fn after_worker_loss(
        &mut self,
        now: Instant,
        g: Generation,
        slot: usize,
        ran: Duration,
        reason: String,
        worker: WorkerId,
    ) {
        if self.recycle_failed(g, slot, worker, &reason) {
            return;
        }
        match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Starting) | Some(GenState::Preparing) => {
                self.fail_reload(now, reason, Some(worker));
            }
            Some(GenState::Rolling) => self.rollout_failed(now, reason, Some(worker)),
            Some(GenState::Serving) if self.on_probation(g) => {
                self.roll_back(now, reason, Some(worker));
            }
            Some(GenState::Serving) if self.stop.is_none() => {
                let Some(program) = self.slot_program(g, slot).cloned() else {
                    return;
                };
                self.counters.restarts += 1;
                let Some(s) = self.slot_mut(g, slot) else {
                    return;
                };
                // A worker that ran at least as long as the longest backoff was healthy: its
                // crash starts a new sequence instead of continuing the old one.
                s.restarts += 1;
                s.crashes = if ran >= program.restart_backoff_max {
                    1
                } else {
                    s.crashes + 1
                };
                let delay = program.backoff(s.crashes);
                s.restart_at = Some(now + delay);
                s.stable_at = None;
                let crashes = s.crashes;
                self.note_crash(g, slot, crashes, &reason);
                warn!(
                    event = baton_proto::event::WORKER_CRASHED,
                    generation = g.0,
                    slot,
                    crashes,
                    restart_in_ms = delay.as_millis() as u64,
                    "{reason}; restarting it in {} ms (crash {crashes} in a row)",
                    delay.as_millis()
                );
            }
            Some(_) => self.finish_if_empty(now, g),
            None => {}
        }
    }

    pub(super) fn on_tick(&mut self, now: Instant) {
        self.kill_again(now);
        if self.stop_delayed_until.is_some_and(|until| until <= now) {
            self.end_stop_delay(now);
        }
        if self.run.canary().is_some_and(|c| c.until <= now) {
            self.confirm_canary(now);
        }
        // Ready deadlines.
        let late: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(
                |(_, w)| matches!(w.state, WorkerState::Starting { deadline } if deadline <= now),
            )
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            // A worker whose generation failed because of an earlier one in this list is
            // draining already: it is not late any more.
            let Some(w) = self
                .workers
                .get(&id)
                .filter(|w| matches!(w.state, WorkerState::Starting { .. }))
            else {
                continue;
            };
            let g = w.generation;
            let pid = w.pid.unwrap_or(0);
            let timeout = self.program(id).map_or(Duration::ZERO, |p| p.ready_timeout);
            let cause = w
                .not_ready
                .as_ref()
                .map_or_else(String::new, |cause| format!(": {cause}"));
            let reason = format!(
                "worker {id} of generation {g} (pid {pid}) was not ready after {} ms{cause}",
                timeout.as_millis()
            );
            self.never_ready(now, id, reason);
        }
        // Drain deadlines, per worker (programs may have different drain timeouts).
        let expired: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state != WorkerState::Killed)
            .filter(|(_, w)| self.drain_deadline(w).is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let failed = self
                .workers
                .get(&id)
                .and_then(|w| self.generations.get(&w.generation))
                .is_some_and(|entry| matches!(entry.state, GenState::Failed));
            let replaced = self
                .workers
                .get(&id)
                .and_then(|w| w.replaced.as_ref())
                .map(|r| r.reason.clone());
            if let Some(Retirement::Unhealthy(_)) = replaced {
                self.kill_draining(id, "it failed its liveness check and has not exited since");
            } else if let Some(reason) = replaced {
                self.kill_draining(id, &format!("its drain deadline passed ({reason})"));
            } else if failed {
                self.kill_draining(id, "its generation failed and failed_stop_timeout passed");
            } else {
                self.kill_draining(id, "its drain deadline passed");
            }
        }
        self.settle_stable(now);
        // Restarts that are due.
        let due: Vec<(Generation, usize)> = self
            .generations
            .iter()
            .filter(|(_, entry)| matches!(entry.state, GenState::Serving))
            .flat_map(|(g, entry)| {
                entry.slots.iter().enumerate().filter_map(move |(i, s)| {
                    (s.worker.is_none() && s.restart_at.is_some_and(|t| t <= now))
                        .then_some((*g, i))
                })
            })
            .collect();
        for (g, slot) in due {
            self.spawn(now, g, slot);
        }
    }
}
