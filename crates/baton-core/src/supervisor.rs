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

use baton_proto::{MasterMessage, WorkerMessage};
use baton_sys::process::ExitKind;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

mod crash_loop;
mod drain;
mod lookup;
mod model;
mod records;
mod replace;
mod snapshot;

pub use crate::intent::{Intent, Trigger};
pub use crash_loop::{CRASH_LOOP, CrashLoop};
pub use model::{
    Action, Event, Generation, GenerationSpec, Phase, ProgramSpec, ReloadId, ReloadRecord,
    ReplaceSpec, RequestId, Verdict, WorkerId,
};
pub use snapshot::{Counters, GenerationSnapshot, Snapshot, WorkerSnapshot};

use lookup::join;
use records::{Canary, Gen, GenState, ReloadRun, Slot, StopMode, Worker, WorkerState};

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
            Event::ProbeFailed { worker, reason } => self.on_probe_failed(now, worker, reason),
            Event::Unhealthy { worker, reason } => self.on_unhealthy(now, worker, reason),
            Event::Recycle { worker, reason } => self.on_recycle(now, worker, reason),
            Event::Exited { pid, status } => self.on_exited(now, pid, status),
            Event::Tick => self.on_tick(now),
        }
        std::mem::take(&mut self.actions)
    }

    // ---- reloads ----------------------------------------------------------------------------

    fn on_reload_request(&mut self, now: Instant, trigger: Trigger) {
        self.next_request += 1;
        let request = RequestId(self.next_request);
        info!(event = "reload_requested", request = request.0, trigger = %trigger,
            "reload request {request} ({trigger})");
        if self.stop.is_some() {
            self.reject(request);
        } else if let Some(current) = self
            .reload
            .as_ref()
            .or(self.canary.as_ref().map(|c| &c.reload))
        {
            info!(
                event = "reload_queued",
                request = request.0,
                behind = current.id.0,
                "reload request {request} queued: reload {} is running; the next reload covers it",
                current.id
            );
            self.pending.push((request, trigger));
        } else {
            self.begin_reload(now, vec![(request, trigger)], false);
        }
    }

    fn reject(&mut self, request: RequestId) {
        warn!(
            event = "reload_rejected",
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
            info!(event = "reload_started", reload = id.0, generation = generation.0,
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
                event = "canary",
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
                event = "serving",
                generation = g.0,
                took_ms = took.as_millis() as u64,
                "generation {g} is serving"
            );
        } else {
            let list = join(&reload.covers);
            info!(event = "reload_succeeded", reload = reload.id.0, generation = g.0,
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
        info!(event = "reload_succeeded", reload = c.reload.id.0, generation = g.0,
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
        error!(event = "reload_failed", reload = c.reload.id.0, generation = g.0, covers = %list,
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
            error!(event = "start_failed", generation = g.0, reason = %reason,
                "generation {g} failed to start: {reason}");
            self.exit_code = 1;
            self.stop = Some(StopMode::Fast);
        } else {
            let list = join(&reload.covers);
            let serving = self
                .generations
                .iter()
                .find(|(_, entry)| matches!(entry.state, GenState::Serving))
                .map(|(n, _)| format!("generation {n} keeps serving"))
                .unwrap_or_else(|| "no generation is serving".into());
            error!(event = "reload_failed", reload = reload.id.0, generation = g.0,
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

    // ---- workers ----------------------------------------------------------------------------

    fn on_spawned(&mut self, now: Instant, id: WorkerId, result: Result<u32, String>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let g = w.generation;
        match result {
            Ok(pid) => {
                w.pid = Some(pid);
                w.pgid = Some(pid);
                self.pids.insert(pid, id);
                match self.generations.get(&g).map(|entry| &entry.state) {
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
                            event = "worker_spawned",
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

    fn on_message(&mut self, now: Instant, id: WorkerId, message: WorkerMessage) {
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
                        event = "worker_ready",
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
                    debug!(event = "worker_status", worker = id.0, generation = g.0, status = %text,
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
            // Heartbeats go to the master's liveness watchdog, not here.
            WorkerMessage::Heartbeat => {}
            WorkerMessage::Unknown => {
                debug!(
                    worker = id.0,
                    "worker {id} sent a message type this master does not know"
                );
            }
        }
    }

    fn on_probe_failed(&mut self, now: Instant, id: WorkerId, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let g = w.generation;
        let pid = w.pid.unwrap_or(0);
        let reason = format!(
            "worker {id} of generation {g} (pid {pid}) failed its readiness probe: {reason}"
        );
        if self.canary.as_ref().is_some_and(|c| c.new == g) {
            self.roll_back(now, reason, Some(id));
        } else {
            debug!(worker = id.0, "{reason} (not on probation: ignored)");
        }
    }

    fn on_main_pid(&mut self, id: WorkerId, pid: u32) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.pid == Some(pid) || pid == 0 {
            return;
        }
        info!(
            event = "worker_main_pid",
            worker = id.0,
            pid,
            "worker {id}'s main process is now pid {pid} (was {})",
            w.pid.unwrap_or(0)
        );
        w.pid = Some(pid);
        self.pids.insert(pid, id);
    }

    fn on_exited(&mut self, now: Instant, pid: u32, status: ExitKind) {
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
        if let Some(pgid) = w.pgid {
            self.actions.push(Action::KillGroup { pgid });
        }
        self.pids.retain(|_, owner| *owner != id);
        self.actions.push(Action::Forget { worker: id });
        if self.replaced_exited(now, id, &w, &status.to_string()) {
            return;
        }
        let g = w.generation;
        if let Some(s) = self.slot_mut(g, w.slot) {
            if s.worker == Some(id) {
                s.worker = None;
            }
            s.last_worker = Some(id);
            s.last_exit = Some(status.to_string());
        }
        let ran = now.saturating_duration_since(w.spawned);
        match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Draining { .. }) => {
                info!(event = "worker_exited", worker = id.0, generation = g.0, pid,
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
    fn after_worker_loss(
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
            Some(GenState::Serving) if self.canary.as_ref().is_some_and(|c| c.new == g) => {
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
                    event = "worker_crashed",
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

    fn on_tick(&mut self, now: Instant) {
        if self.canary.as_ref().is_some_and(|c| c.until <= now) {
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
            match self.generations.get(&g).map(|entry| &entry.state) {
                Some(GenState::Starting) => {
                    info!(
                        event = "worker_not_ready",
                        worker = id.0,
                        generation = g.0,
                        pid,
                        "{reason}"
                    );
                    self.fail_reload(now, reason, Some(id));
                }
                _ => {
                    warn!(
                        event = "worker_not_ready",
                        worker = id.0,
                        pid,
                        "{reason}: killing it"
                    );
                    // Its exit schedules the restart with backoff.
                    self.kill(id);
                }
            }
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
            let replaced = self.workers.get(&id).is_some_and(|w| w.replaced.is_some());
            if replaced {
                self.kill_draining(id, "it failed its liveness check and has not exited since");
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

    // ---- helpers ----------------------------------------------------------------------------

    fn kill(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if let (Some(pid), Some(pgid), false) = (w.pid, w.pgid, w.state == WorkerState::Killed) {
            self.actions.push(Action::Kill { pid, pgid });
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
