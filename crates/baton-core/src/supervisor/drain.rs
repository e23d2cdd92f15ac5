//! Draining and stopping: a retired generation's workers asked to drain (packet and signal),
//! killed at their deadline, the cap on draining generations, a stop (graceful or fast), the log
//! reopen request, and a generation's end once its last worker is gone.

use std::time::{Duration, Instant};

use baton_sys::process::SignalNumber;
use tracing::{debug, info, warn};

use super::model::{Action, Generation};
use super::records::{Gen, GenState, Run, StopMode, WorkerState};
use super::reload::Outcome;
use super::{Supervisor, Trigger, WorkerId};

/// How long a SIGKILLed worker may take to be reaped before it is killed again.
pub(super) const KILL_AGAIN: Duration = Duration::from_secs(1);

impl Supervisor {
    pub(super) fn begin_drain(&mut self, now: Instant, g: Generation) {
        let Some(entry) = self.generations.get_mut(&g) else {
            return;
        };
        entry.state = GenState::Draining {
            since: now,
            killed: false,
        };
        for slot in &mut entry.slots {
            slot.restart_at = None;
        }
        let longest = entry
            .spec
            .as_ref()
            .and_then(|s| s.programs.iter().map(|p| p.drain_timeout).max())
            .unwrap_or_default();
        let workers = self.live_workers(g);
        info!(
            event = baton_proto::event::GENERATION_DRAINING,
            generation = g.0,
            workers,
            deadline_ms = longest.as_millis() as u64,
            "generation {g} is draining: {workers} workers, killed in {} ms if still running",
            longest.as_millis()
        );
        for id in self.worker_ids(g) {
            // A replaced or retired worker drains already, on a deadline of its own.
            if self.workers.get(&id).is_some_and(|w| w.replaced.is_none()) {
                self.drain_worker(id);
            }
        }
        self.finish_if_empty(now, g);
    }

    pub(super) fn drain_worker(&mut self, id: WorkerId) {
        let Some(timeout) = self.program(id).map(|p| p.drain_timeout) else {
            return;
        };
        self.drain_worker_within(id, timeout);
    }

    /// Asks worker `id` to drain (packet and drain signal), telling it it has `timeout`.
    pub(super) fn drain_worker_within(&mut self, id: WorkerId, timeout: Duration) {
        let Some(program) = self.program(id).cloned() else {
            return;
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(pid) = w.pid else { return };
        if w.state == WorkerState::Killed {
            return;
        }
        w.state = WorkerState::Draining;
        self.actions.push(Action::Drain {
            worker: id,
            pid,
            deadline_ms: timeout.as_millis() as u64,
            signal: program.drain_signal,
        });
    }

    /// More generations drain than allowed: the oldest go first.
    /// At most `max_draining` generations besides the serving one: draining ones, and the one a
    /// running reload is starting. The oldest draining generations are killed to make room.
    pub(super) fn enforce_drain_cap(&mut self) {
        let max = self.serving_spec().map_or(usize::MAX, |s| s.max_draining);
        let starting = self
            .generations
            .values()
            .filter(|e| {
                matches!(
                    e.state,
                    GenState::Preparing | GenState::Starting | GenState::Rolling
                )
            })
            .count();
        let draining: Vec<Generation> = self
            .generations
            .iter()
            .filter(|(_, entry)| {
                matches!(entry.state, GenState::Draining { .. } | GenState::Failed)
            })
            .filter(|(g, _)| {
                self.workers
                    .values()
                    .any(|w| w.generation == **g && w.state != WorkerState::Killed)
            })
            .map(|(g, _)| *g)
            .collect();
        let excess = (draining.len() + starting).saturating_sub(max);
        for g in draining.into_iter().take(excess) {
            for id in self.worker_ids(g) {
                self.kill_draining(
                    id,
                    &format!("more than {max} generations besides the serving one"),
                );
            }
        }
    }

    /// When the kills of the event just handled are due again.
    pub(super) fn stamp_kills(&mut self, now: Instant) {
        for at in self.kills.values_mut().filter(|at| at.is_none()) {
            *at = Some(now + KILL_AGAIN);
        }
    }

    /// When a SIGKILLed worker not reaped yet is killed again.
    pub(super) fn next_kill_again(&self) -> Option<Instant> {
        self.kills.values().flatten().min().copied()
    }

    /// Kills again the workers a SIGKILL has not ended within [`KILL_AGAIN`]: the kill may not
    /// have been sent (it failed), or the process sleeps uninterruptibly (stuck in the kernel,
    /// on a dead disk or NFS server: it ends when it wakes).
    pub(super) fn kill_again(&mut self, now: Instant) {
        let workers = &self.workers;
        self.kills.retain(|id, _| {
            workers
                .get(id)
                .is_some_and(|w| w.state == WorkerState::Killed)
        });
        let due: Vec<WorkerId> = self
            .kills
            .iter()
            .filter(|(_, at)| at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            if let (Some(pid), Some(pgid)) = (w.pid, w.pgid) {
                warn!(
                    event = baton_proto::event::WORKER_KILLED_AGAIN,
                    worker = id.0,
                    pid,
                    "worker {id} (pid {pid}) still runs {} ms after SIGKILL: killed again (the kill failed, or it sleeps in the kernel)",
                    KILL_AGAIN.as_millis()
                );
                self.actions.push(Action::Kill { pid, pgid });
            }
            self.kills.insert(id, Some(now + KILL_AGAIN));
        }
    }

    /// Kills a worker of a draining generation, saying why and with what it still had.
    pub(super) fn kill_draining(&mut self, id: WorkerId, why: &str) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.state == WorkerState::Killed {
            return;
        }
        let g = w.generation;
        if let Some(pid) = w.pid {
            let conns = w
                .connections
                .map_or("unknown".to_string(), |c| c.to_string());
            warn!(
                event = baton_proto::event::WORKER_KILLED,
                worker = id.0,
                generation = g.0,
                pid,
                "killing worker {id} of generation {g} (pid {pid}, connections: {conns}): {why}"
            );
        }
        if let Some(Gen {
            state: GenState::Draining { killed, .. },
            ..
        }) = self.generations.get_mut(&g)
        {
            *killed = true;
        }
        if why.contains("deadline") {
            self.counters.killed_at_deadline += 1;
        } else if why.contains("besides the serving one") {
            self.counters.killed_by_cap += 1;
        }
        self.kill(id);
    }

    pub(super) fn on_stop(&mut self, now: Instant, graceful: bool, trigger: Trigger) {
        let wanted = if graceful {
            StopMode::Graceful
        } else {
            StopMode::Fast
        };
        match (self.stop, wanted) {
            (Some(StopMode::Graceful), StopMode::Graceful) if self.stop_delayed_until.is_some() => {
                // Asked again: the operator will not wait for the delay.
                info!(event = baton_proto::event::STOP_DELAY_ENDED, trigger = %trigger,
                    "{trigger}: the stop delay ends now, draining");
                self.end_stop_delay(now);
                return;
            }
            (Some(StopMode::Fast), _) | (Some(StopMode::Graceful), StopMode::Graceful) => {
                info!("{trigger}: already stopping");
                return;
            }
            _ => {}
        }
        self.stop = Some(wanted);
        self.stop_delayed_until = None;
        info!(event = baton_proto::event::STOPPING, graceful, trigger = %trigger,
            "{trigger}: {} stop", if graceful { "graceful" } else { "fast" });
        for (request, _) in std::mem::take(&mut self.pending) {
            self.reject(request);
        }
        match &self.run {
            Run::Idle => {}
            Run::Starting(_) => self.fail_reload(now, format!("stop requested ({trigger})"), None),
            Run::OnProbation(_) => {
                // A stop ends the probation: everything drains, and the reload has no verdict
                // of success it could still earn.
                if let Run::OnProbation(c) = std::mem::take(&mut self.run) {
                    self.record(
                        &c.reload,
                        now,
                        Outcome::Failed(format!("stop requested during the probation ({trigger})")),
                        None,
                    );
                }
            }
            Run::RollingForward { .. } | Run::RollingBack { .. } => {
                self.end_rollout_for_stop(now, &trigger.to_string());
            }
        }
        let delay = self.serving_spec().map_or(Duration::ZERO, |s| s.stop_delay);
        if graceful && !delay.is_zero() {
            // Lame duck: endpoints are removed from load balancers asynchronously after the
            // stop began, and connections keep coming meanwhile: serve them, then drain.
            info!(
                event = baton_proto::event::STOP_DELAYED,
                delay_ms = delay.as_millis() as u64,
                "serving and accepting for {} ms more (supervisor.stop_delay), then draining; a second SIGTERM drains at once",
                delay.as_millis()
            );
            self.stop_delayed_until = Some(now + delay);
            return;
        }
        self.drain_for_stop(now, graceful);
    }

    /// The stop delay is over (or cut short): the graceful stop drains.
    pub(super) fn end_stop_delay(&mut self, now: Instant) {
        if self.stop_delayed_until.take().is_some() {
            self.drain_for_stop(now, true);
        }
    }

    /// The serving and standing-by generations drain (graceful), or every worker is killed.
    fn drain_for_stop(&mut self, now: Instant, graceful: bool) {
        let gens: Vec<Generation> = self.generations.keys().copied().collect();
        for g in gens {
            let serving = matches!(
                self.generations.get(&g).map(|e| &e.state),
                Some(GenState::Serving | GenState::Standby)
            );
            if graceful {
                if serving {
                    self.begin_drain(now, g);
                }
                continue;
            }
            if let Some(entry) = self.generations.get_mut(&g) {
                if !matches!(entry.state, GenState::Failed) {
                    entry.state = GenState::Draining {
                        since: now,
                        killed: true,
                    };
                }
            }
            for id in self.worker_ids(g) {
                self.kill_draining(id, "fast stop");
            }
        }
        self.check_exit();
    }

    pub(super) fn on_reopen_logs(&mut self, trigger: Trigger) {
        let forward = self.serving_spec().is_some_and(|s| s.forward_usr1);
        if !forward {
            info!(
                event = baton_proto::event::REOPEN_LOGS,
                "{trigger}: baton logs to stderr and has nothing to reopen; \
                not forwarded (supervisor.forward_usr1 is off)"
            );
            return;
        }
        let pids: Vec<u32> = self
            .workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Draining))
            .filter_map(|w| w.pid)
            .collect();
        info!(
            event = baton_proto::event::REOPEN_LOGS,
            "{trigger}: forwarding SIGUSR1 to {} workers",
            pids.len()
        );
        for pid in pids {
            self.actions.push(Action::Signal {
                pid,
                signal: SignalNumber::SIGUSR1,
            });
        }
    }

    /// A draining or failed generation with no worker left is gone.
    pub(super) fn finish_if_empty(&mut self, now: Instant, g: Generation) {
        if self.live_workers(g) > 0 {
            return;
        }
        let Some(entry) = self.generations.get(&g) else {
            return;
        };
        match entry.state {
            GenState::Draining { since, killed } => {
                self.counters
                    .drain_durations
                    .observe(now.saturating_duration_since(since));
                let took = now.saturating_duration_since(since).as_millis() as u64;
                info!(
                    event = baton_proto::event::GENERATION_EXITED,
                    generation = g.0,
                    drain_ms = took,
                    killed,
                    "generation {g} is gone after draining for {took} ms{}",
                    if killed {
                        " (some workers were killed)"
                    } else {
                        ""
                    }
                );
            }
            GenState::Failed => debug!(generation = g.0, "failed generation {g} is gone"),
            _ => return,
        }
        self.generations.remove(&g);
        self.actions.push(Action::Release { generation: g });
        self.start_if_room(now);
        self.check_exit();
    }

    pub(super) fn check_exit(&mut self) {
        if self.stop.is_some() && !self.exited && self.workers.is_empty() {
            for g in std::mem::take(&mut self.generations).into_keys() {
                self.actions.push(Action::Release { generation: g });
            }
            self.exited = true;
            info!(
                event = baton_proto::event::EXITING,
                code = self.exit_code,
                "all workers are gone: exiting"
            );
            self.actions.push(Action::Exit {
                code: self.exit_code,
            });
        }
    }

    pub(super) fn kill(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        // Killed while it was still being spawned, it has no pid yet: the kill goes out when the
        // pid comes (`on_spawned` kills it again; the fault tests found it left running).
        if let (Some(pid), Some(pgid), false) = (w.pid, w.pgid, self.kills.contains_key(&id)) {
            self.actions.push(Action::Kill { pid, pgid });
            self.kills.insert(id, None);
        }
        w.state = WorkerState::Killed;
    }
}
