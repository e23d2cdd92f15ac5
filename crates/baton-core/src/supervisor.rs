//! The supervisor state machine: every decision of the master, and nothing else.
//!
//! [`Supervisor::handle`] takes an [`Event`] and the current time and returns [`Action`]s. It
//! performs no I/O, spawns nothing and reads no clock, so every branch of a reload, a drain and a
//! stop is tested as plain data (see the tests at the bottom). The event loop in
//! [`crate::master`] feeds it and carries out what it returns.
//!
//! Architecture invariant: at most one reload runs at a time. Requests that arrive meanwhile are
//! queued and all covered by one follow-up reload, which starts after the running one ends; every
//! request is logged with the reload that covered it (or why it was rejected).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use baton_proto::MasterMessage;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

mod crash_loop;
mod drain;
mod invariants;
mod lookup;
mod model;
mod records;
mod replace;
mod rollout;
mod snapshot;
mod workers;

pub use crate::intent::{Intent, Trigger};
pub use crash_loop::{CRASH_LOOP, CrashLoop};
pub use model::{
    Action, Event, Generation, GenerationSpec, Phase, ProgramSpec, ReloadId, ReloadRecord,
    ReplaceSpec, RequestId, Strategy, Verdict, WorkerId,
};
pub use snapshot::{
    Counters, GenerationSnapshot, LaneSnapshot, RolloutSnapshot, Snapshot, WorkerSnapshot,
};

use lookup::join;
use records::{Canary, Gen, GenState, ReloadRun, Rollout, Slot, StopMode, Worker, WorkerState};

/// How many reload verdicts are kept.
const HISTORY: usize = 100;

/// All state of the master's supervision.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Supervisor {
    generations: BTreeMap<Generation, Gen>,
    workers: BTreeMap<WorkerId, Worker>,
    /// Every pid that belongs to a worker: its spawned pid and its announced main pid.
    pids: BTreeMap<u32, WorkerId>,
    reload: Option<ReloadRun>,
    canary: Option<Canary>,
    /// A rolling reload in progress (forward or back).
    #[serde(default)]
    rollout: Option<Rollout>,
    pending: Vec<(RequestId, Trigger)>,
    stop: Option<StopMode>,
    exit_code: i32,
    exited: bool,
    next_generation: u64,
    next_worker: u64,
    next_request: u64,
    next_reload: u64,
    history: VecDeque<ReloadRecord>,
    counters: Counters,
    /// Actions of the event being handled (empty between events).
    #[serde(skip)]
    actions: Vec<Action>,
    /// A graceful stop's `stop_delay`: until then the serving generation goes on serving.
    #[serde(default, with = "crate::codec::mono_opt")]
    stop_delayed_until: Option<Instant>,
    /// Workers SIGKILLed and not reaped yet: when to kill them again (`None`: killed by the
    /// event being handled). Not carried across an upgrade: the new program's next event
    /// stamps nothing, and the kill already sent stands.
    #[serde(skip)]
    kills: BTreeMap<WorkerId, Option<Instant>>,
    #[serde(with = "crate::codec::mono_opt")]
    started: Option<Instant>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the first generation.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        self.started = Some(now);
        self.begin_reload(now, Vec::new(), true);
        self.assert_invariants();
        std::mem::take(&mut self.actions)
    }

    /// Applies one event at time `now`.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match event {
            Event::Intent(Intent::Reload(trigger)) => self.on_reload_request(now, trigger),
            Event::Intent(Intent::Stop { graceful, trigger }) => {
                self.on_stop(now, graceful, trigger)
            }
            Event::Intent(Intent::ReopenLogs(trigger)) => self.on_reopen_logs(trigger),
            Event::Prepared { generation, result } => self.on_prepared(now, generation, result),
            Event::Spawned { worker, result } => self.on_spawned(now, worker, result),
            Event::Message { worker, message } => self.on_message(now, worker, message),
            Event::MainPid { worker, pid } => self.on_main_pid(worker, pid),
            Event::NotReadyBecause { worker, cause } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    if matches!(
                        w.state,
                        WorkerState::Starting { .. } | WorkerState::Spawning
                    ) {
                        w.not_ready = Some(cause);
                    }
                }
            }
            Event::CannotBeReady { worker, cause } => {
                let starting = self.workers.get(&worker).filter(|w| {
                    matches!(
                        w.state,
                        WorkerState::Starting { .. } | WorkerState::Spawning
                    )
                });
                if let Some(w) = starting {
                    let reason = format!(
                        "worker {worker} of generation {} (pid {}) cannot become ready: {cause}",
                        w.generation,
                        w.pid.unwrap_or(0)
                    );
                    self.never_ready(now, worker, reason);
                }
            }
            Event::ProbeFailed { worker, reason } => self.on_probe_failed(now, worker, reason),
            Event::Unhealthy { worker, reason } => self.on_unhealthy(now, worker, reason),
            Event::Recycle { worker, reason } => self.on_recycle(now, worker, reason),
            Event::Exited { pid, status } => self.on_exited(now, pid, status),
            Event::Tick => self.on_tick(now),
        }
        self.advance_rollout(now);
        self.stamp_kills(now);
        self.assert_invariants();
        std::mem::take(&mut self.actions)
    }

    // ---- reloads ----------------------------------------------------------------------------

    fn on_reload_request(&mut self, now: Instant, trigger: Trigger) {
        self.next_request += 1;
        let request = RequestId(self.next_request);
        info!(event = baton_proto::event::RELOAD_REQUESTED, request = request.0, trigger = %trigger,
            "reload request {request} ({trigger})");
        if self.stop.is_some() {
            self.reject(request);
        } else if let Some(current) = self
            .reload
            .as_ref()
            .or(self.canary.as_ref().map(|c| &c.reload))
            .map(|r| r.id)
            .or(self.rollout.as_ref().map(|r| r.reload))
        {
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

    fn reject(&mut self, request: RequestId) {
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

    fn begin_reload(&mut self, now: Instant, requests: Vec<(RequestId, Trigger)>, initial: bool) {
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
        self.reload = Some(ReloadRun {
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

    fn on_prepared(&mut self, now: Instant, g: Generation, result: Result<GenerationSpec, String>) {
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
    fn start_if_room(&mut self, now: Instant) {
        let Some(g) = self.reload.as_ref().map(|r| r.generation) else {
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

    fn spawn(&mut self, now: Instant, generation: Generation, slot: usize) {
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
    fn promote(&mut self, now: Instant, g: Generation) {
        let Some(reload) = self.reload.take() else {
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
            self.canary = Some(Canary {
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
            self.record(&reload, now, Ok(()), None);
        }
        for old in old {
            self.begin_drain(now, old);
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// The probation passed: the reload succeeded, the standing-by generation drains.
    fn confirm_canary(&mut self, now: Instant) {
        let Some(c) = self.canary.take() else { return };
        let g = c.new;
        let list = join(&c.reload.covers);
        let took = now.saturating_duration_since(c.reload.started);
        info!(event = baton_proto::event::RELOAD_SUCCEEDED, reload = c.reload.id.0, generation = g.0,
            covers = %list, took_ms = took.as_millis() as u64,
            "reload {} succeeded: generation {g} passed its probation and serves (requests {list})",
            c.reload.id);
        self.record(&c.reload, now, Ok(()), None);
        for old in c.old {
            self.begin_drain(now, old);
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// The generation on probation failed: it is killed and the standing-by one serves again.
    fn roll_back(&mut self, now: Instant, reason: String, culprit: Option<WorkerId>) {
        let Some(c) = self.canary.take() else { return };
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
            Err(format!(
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
    fn fail_reload(&mut self, now: Instant, reason: String, culprit: Option<WorkerId>) {
        let Some(reload) = self.reload.take() else {
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
            self.record(&reload, now, Err(reason), culprit);
        }
        self.finish_if_empty(now, g);
        self.next_pending(now);
    }

    fn next_pending(&mut self, now: Instant) {
        if self.reload.is_none()
            && self.canary.is_none()
            && self.rollout.is_none()
            && self.stop.is_none()
            && !self.pending.is_empty()
        {
            let covers = std::mem::take(&mut self.pending);
            self.begin_reload(now, covers, false);
        }
    }

    fn record(
        &mut self,
        reload: &ReloadRun,
        now: Instant,
        verdict: Result<(), String>,
        culprit: Option<WorkerId>,
    ) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        let duration = now.saturating_duration_since(reload.started);
        match &verdict {
            Ok(()) => self.counters.reloads_ok += 1,
            Err(why) => {
                self.counters.reloads_failed += 1;
                if why.starts_with("rolled back") {
                    self.counters.reloads_rolled_back += 1;
                }
            }
        }
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

    // ---- helpers ----------------------------------------------------------------------------

    fn kill(&mut self, id: WorkerId) {
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

    /// Puts `g` in `state` and tells each of its workers (`pause` or `resume`).
    fn switch_generation(&mut self, g: Generation, state: GenState, message: MasterMessage) {
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
    fn fail_generation(&mut self, now: Instant, g: Generation) {
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

#[cfg(test)]
mod tests;
