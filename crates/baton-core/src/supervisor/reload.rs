//! The reload, the one at a time: its [`Run`] from a request to its verdict. A request starts
//! one or queues behind the one running; the generation is prepared, started (all at once, or a
//! batch at a time: `reload/rollout.rs`), put on probation if it has a canary window, and
//! promoted or failed; every request it covers gets its verdict in [`Supervisor::record`].

use std::time::{Duration, Instant};

use baton_proto::MasterMessage;
use tracing::{debug, error, info, warn};

use super::lookup::join;
use super::records::{Canary, Gen, GenState, ReloadRun, Run, Slot, StopMode, Worker, WorkerState};
use super::{
    Action, Generation, GenerationSpec, HISTORY, ReloadId, ReloadRecord, RequestId, Supervisor,
    Trigger, Verdict, WorkerId,
};

mod rollout;

/// How a reload ended, for its record and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeeded,
    Failed(String),
    /// Failed, and the generation it replaced serves again (a probation or a rolling reload).
    RolledBack(String),
}

impl Supervisor {
    pub(super) fn on_reload_request(&mut self, now: Instant, trigger: Trigger) {
        self.next_request += 1;
        let request = RequestId(self.next_request);
        info!(event = baton_proto::event::RELOAD_REQUESTED, request = request.0, trigger = %trigger,
            "reload request {request} ({trigger})");
        if self.stop.is_some() {
            self.reject(request);
        } else if let Some(current) = self.run.id() {
            info!(
                event = baton_proto::event::RELOAD_QUEUED,
                request = request.0,
                behind = current.0,
                "reload request {request} queued: reload {current} is running; the next reload covers it"
            );
            self.pending.push((request, trigger));
        } else {
            self.begin_reload(now, vec![(request, trigger)], false);
        }
    }

    pub(super) fn reject(&mut self, request: RequestId) {
        warn!(
            event = baton_proto::event::RELOAD_REJECTED,
            request = request.0,
            "reload request {request} rejected: the master is stopping"
        );
        self.actions.push(Action::Verdict(Verdict {
            requests: vec![request],
            reload: None,
            generation: None,
            result: Err("rejected: the master is stopping".into()),
            duration: Duration::ZERO,
            culprit: None,
        }));
    }

    pub(super) fn begin_reload(
        &mut self,
        now: Instant,
        requests: Vec<(RequestId, Trigger)>,
        initial: bool,
    ) {
        let (covers, triggers): (Vec<RequestId>, Vec<Trigger>) = requests.into_iter().unzip();
        self.next_generation += 1;
        let generation = Generation(self.next_generation);
        let id = if initial {
            ReloadId(0)
        } else {
            self.next_reload += 1;
            ReloadId(self.next_reload)
        };
        if !initial {
            let list = join(&covers);
            info!(event = baton_proto::event::RELOAD_STARTED, reload = id.0, generation = generation.0,
                covers = %list, "reload {id} started: generation {generation}, covering requests {list}");
        }
        self.generations.insert(
            generation,
            Gen {
                spec: None,
                state: GenState::Preparing,
                slots: Vec::new(),
                failed_at: None,
            },
        );
        self.run = Run::Starting(ReloadRun {
            id,
            generation,
            covers,
            triggers,
            started: now,
            initial,
        });
        self.actions.push(Action::Prepare { generation });
        if !initial {
            // The generation being started counts against the cap already.
            self.enforce_drain_cap();
        }
    }

    pub(super) fn on_prepared(
        &mut self,
        now: Instant,
        g: Generation,
        result: Result<GenerationSpec, String>,
    ) {
        let Some(entry) = self.generations.get_mut(&g) else {
            self.actions.push(Action::Release { generation: g });
            return;
        };
        if !matches!(entry.state, GenState::Preparing) {
            return;
        }
        match result {
            Err(reason) => self.fail_reload(now, reason, None),
            Ok(spec) => {
                entry.slots = spec
                    .programs
                    .iter()
                    .enumerate()
                    .flat_map(|(program, p)| {
                        (0..p.processes).map(move |index| Slot {
                            program,
                            index,
                            worker: None,
                            crashes: 0,
                            restarts: 0,
                            last_exit: None,
                            restart_at: None,
                            last_worker: None,
                            stable_at: None,
                        })
                    })
                    .collect();
                entry.spec = Some(spec);
                // Stays Preparing (prepared) until there is room under the cap.
                self.start_if_room(now);
            }
        }
    }

    /// Starts the prepared generation of the running reload once the generations the cap
    /// killed to make room for it are gone: at most `max_draining` generations besides the
    /// serving one are ever alive, the new one included.
    pub(super) fn start_if_room(&mut self, now: Instant) {
        let Some(g) = self.run.starting().map(|r| r.generation) else {
            return;
        };
        let Some(entry) = self.generations.get(&g) else {
            return;
        };
        if !matches!(entry.state, GenState::Preparing) || entry.spec.is_none() {
            return;
        }
        let max = self.serving_spec().map_or(usize::MAX, |s| s.max_draining);
        let others = self
            .generations
            .iter()
            .filter(|(n, e)| **n != g && !matches!(e.state, GenState::Serving))
            .filter(|(n, _)| self.workers.values().any(|w| w.generation == **n))
            .count();
        if others + 1 > max {
            debug!(
                generation = g.0,
                "generation {g} waits for the generations killed by the cap to exit"
            );
            return;
        }
        let Some(entry) = self.generations.get_mut(&g) else {
            return;
        };
        entry.state = GenState::Starting;
        if self.begin_rollout(now, g) {
            return;
        }
        let Some(entry) = self.generations.get(&g) else {
            return;
        };
        let slots = entry.slots.len();
        for slot in 0..slots {
            self.spawn(now, g, slot);
        }
        if slots == 0 {
            self.promote(now, g);
        }
    }

    pub(super) fn spawn(&mut self, now: Instant, generation: Generation, slot: usize) {
        let Some(s) = self.slot_mut(generation, slot) else {
            return;
        };
        let (program, index) = (s.program, s.index);
        self.next_worker += 1;
        let worker = WorkerId(self.next_worker);
        if let Some(s) = self.slot_mut(generation, slot) {
            s.worker = Some(worker);
            s.restart_at = None;
        }
        self.workers.insert(
            worker,
            Worker {
                generation,
                slot,
                program,
                pid: None,
                pgid: None,
                state: WorkerState::Spawning,
                spawned: now,
                ready_after: None,
                connections: None,
                status: None,
                not_ready: None,
                replaced: None,
                successor: None,
                replacement: false,
            },
        );
        self.actions.push(Action::Spawn {
            worker,
            generation,
            program,
            slot: index,
        });
    }

    /// All workers of the reload's generation are ready: it serves, the previous one drains.
    pub(super) fn promote(&mut self, now: Instant, g: Generation) {
        let Run::Starting(reload) = self.run.take_if(|r| matches!(r, Run::Starting(_))) else {
            return;
        };
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = GenState::Serving;
        }
        let took = now.saturating_duration_since(reload.started);
        let old: Vec<Generation> = self
            .generations
            .iter()
            .filter(|(n, entry)| **n != g && matches!(entry.state, GenState::Serving))
            .map(|(n, _)| *n)
            .collect();
        let window = self
            .generations
            .get(&g)
            .and_then(|e| e.spec.as_ref())
            .and_then(|s| s.canary_window);
        if let (false, false, Some(window)) = (reload.initial, old.is_empty(), window) {
            for &o in &old {
                self.switch_generation(o, GenState::Standby, MasterMessage::Pause);
            }
            info!(
                event = baton_proto::event::CANARY,
                reload = reload.id.0,
                generation = g.0,
                window_ms = window.as_millis() as u64,
                "generation {g} serves on probation for {} ms; the previous generation stands by",
                window.as_millis()
            );
            self.run = Run::OnProbation(Canary {
                reload,
                old,
                new: g,
                until: now + window,
            });
            return;
        }
        if reload.initial {
            info!(
                event = baton_proto::event::SERVING,
                generation = g.0,
                took_ms = took.as_millis() as u64,
                "generation {g} is serving"
            );
        } else {
            let list = join(&reload.covers);
            info!(event = baton_proto::event::RELOAD_SUCCEEDED, reload = reload.id.0, generation = g.0,
                covers = %list, took_ms = took.as_millis() as u64,
                "reload {} succeeded: generation {g} is serving (requests {list})", reload.id);
            self.record(&reload, now, Outcome::Succeeded, None);
        }
        for old in old {
            self.begin_drain(now, old);
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// The probation passed: the reload succeeded, the standing-by generation drains.
    pub(super) fn confirm_canary(&mut self, now: Instant) {
        let Run::OnProbation(c) = self.run.take_if(|r| matches!(r, Run::OnProbation(_))) else {
            return;
        };
        let g = c.new;
        let list = join(&c.reload.covers);
        let took = now.saturating_duration_since(c.reload.started);
        info!(event = baton_proto::event::RELOAD_SUCCEEDED, reload = c.reload.id.0, generation = g.0,
            covers = %list, took_ms = took.as_millis() as u64,
            "reload {} succeeded: generation {g} passed its probation and serves (requests {list})",
            c.reload.id);
        self.record(&c.reload, now, Outcome::Succeeded, None);
        for old in c.old {
            self.begin_drain(now, old);
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// The generation on probation failed: it is killed and the standing-by one serves again.
    pub(super) fn roll_back(&mut self, now: Instant, reason: String, culprit: Option<WorkerId>) {
        let Run::OnProbation(c) = self.run.take_if(|r| matches!(r, Run::OnProbation(_))) else {
            return;
        };
        let g = c.new;
        self.fail_generation(now, g);
        for &o in &c.old {
            self.switch_generation(o, GenState::Serving, MasterMessage::Resume);
        }
        let back: Vec<String> = c.old.iter().map(|o| o.to_string()).collect();
        let list = join(&c.reload.covers);
        error!(event = baton_proto::event::RELOAD_FAILED, reload = c.reload.id.0, generation = g.0, covers = %list,
            reason = %reason, rolled_back = true,
            "reload {} failed: rolled back to generation {}: {reason} (requests {list})",
            c.reload.id, back.join(", "));
        self.record(
            &c.reload,
            now,
            Outcome::RolledBack(format!(
                "rolled back to generation {}: {reason}",
                back.join(", ")
            )),
            culprit,
        );
        self.finish_if_empty(now, g);
        self.next_pending(now);
    }

    /// The running reload failed: its generation is killed, the serving one is not touched.
    /// `culprit`: the worker whose failure failed it, if one did.
    pub(super) fn fail_reload(&mut self, now: Instant, reason: String, culprit: Option<WorkerId>) {
        let Run::Starting(reload) = self.run.take_if(|r| matches!(r, Run::Starting(_))) else {
            return;
        };
        let g = reload.generation;
        self.fail_generation(now, g);
        if reload.initial && self.stop.is_some() {
            info!(
                generation = g.0,
                "generation {g} stopped before it served: {reason}"
            );
        } else if reload.initial {
            error!(event = baton_proto::event::START_FAILED, generation = g.0, reason = %reason,
                "generation {g} failed to start: {reason}");
            self.exit_code = 1;
            self.stop = Some(StopMode::Fast);
            // Requests queued behind the start get their verdict: the master is stopping
            // (found by the property test: they had none, and the master exited).
            for (request, _) in std::mem::take(&mut self.pending) {
                self.reject(request);
            }
        } else {
            let list = join(&reload.covers);
            let serving = self
                .generations
                .iter()
                .find(|(_, entry)| matches!(entry.state, GenState::Serving))
                .map(|(n, _)| format!("generation {n} keeps serving"))
                .unwrap_or_else(|| "no generation is serving".into());
            error!(event = baton_proto::event::RELOAD_FAILED, reload = reload.id.0, generation = g.0,
                covers = %list, reason = %reason,
                "reload {} failed: {reason}; {serving} (requests {list})", reload.id);
            self.record(&reload, now, Outcome::Failed(reason), culprit);
        }
        self.finish_if_empty(now, g);
        self.next_pending(now);
    }

    pub(super) fn next_pending(&mut self, now: Instant) {
        if matches!(self.run, Run::Idle) && self.stop.is_none() && !self.pending.is_empty() {
            let covers = std::mem::take(&mut self.pending);
            self.begin_reload(now, covers, false);
        }
    }

    pub(super) fn record(
        &mut self,
        reload: &ReloadRun,
        now: Instant,
        outcome: Outcome,
        culprit: Option<WorkerId>,
    ) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        let duration = now.saturating_duration_since(reload.started);
        let verdict = match outcome {
            Outcome::Succeeded => {
                self.counters.reloads_ok += 1;
                Ok(())
            }
            Outcome::Failed(why) => {
                self.counters.reloads_failed += 1;
                Err(why)
            }
            Outcome::RolledBack(why) => {
                self.counters.reloads_failed += 1;
                self.counters.reloads_rolled_back += 1;
                Err(why)
            }
        };
        self.counters.reload_durations.observe(duration);
        self.actions.push(Action::Verdict(Verdict {
            requests: reload.covers.clone(),
            reload: Some(reload.id),
            generation: Some(reload.generation),
            result: verdict.clone(),
            duration,
            culprit,
        }));
        self.history.push_back(ReloadRecord {
            id: reload.id,
            covers: reload.covers.clone(),
            triggers: reload.triggers.clone(),
            generation: reload.generation,
            started: reload.started,
            duration,
            verdict,
        });
    }

    /// Puts `g` in `state` and tells each of its workers (`pause` or `resume`).
    pub(super) fn switch_generation(
        &mut self,
        g: Generation,
        state: GenState,
        message: MasterMessage,
    ) {
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = state;
        }
        for id in self.worker_ids(g) {
            self.actions.push(Action::Send {
                worker: id,
                message: message.clone(),
            });
        }
    }

    /// Marks `g` failed (no slot restarts any more) and asks its workers to drain: a worker may
    /// have accepted connections before it reported ready (systemd allows it), and those are
    /// finished, not reset. Each is killed at its program's `failed_stop_timeout`; one not
    /// started yet is killed at once.
    pub(super) fn fail_generation(&mut self, now: Instant, g: Generation) {
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = GenState::Failed;
            entry.failed_at = Some(now);
            for slot in &mut entry.slots {
                slot.restart_at = None;
            }
        }
        for id in self.worker_ids(g) {
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            match w.state {
                WorkerState::Spawning => self.kill(id),
                WorkerState::Killed | WorkerState::Draining => {}
                WorkerState::Starting { .. } | WorkerState::Ready => {
                    let timeout = self
                        .program(id)
                        .map_or(crate::DEFAULT_FAILED_STOP_TIMEOUT, |p| {
                            p.failed_stop_timeout
                        });
                    self.drain_worker_within(id, timeout);
                }
            }
        }
    }
}
