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
//!
//! The rooms, by what they own:
//! - `reload.rs`: the reload and its one phase ([`Run`]: idle, starting, on probation, rolling
//!   forward, rolling back) to its verdict; `reload/rollout.rs` a rolling reload's lanes.
//! - `workers.rs`: the workers and their slots (spawned, ready, exited, restarted);
//!   `workers/replace.rs` replacing an unhealthy or recycled one; `workers/crash_loop.rs`.
//! - `drain.rs`: draining generations, kills, the stop.
//! - `model.rs` the vocabulary (events, actions, ids), `records.rs` the private records,
//!   `parts.rs` the records taken apart for an upgrade, `lookup.rs` lookups and the next
//!   deadline, `snapshot.rs` the read side, `invariants.rs` what holds between events.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

mod drain;
mod invariants;
mod lookup;
mod model;
mod parts;
mod records;
mod reload;
mod snapshot;
mod workers;

pub use crate::intent::{Intent, Trigger};
pub use model::{
    Action, Event, Generation, GenerationSpec, Phase, ProgramSpec, ReloadId, ReloadRecord,
    ReplaceSpec, RequestId, Strategy, Verdict, WorkerId,
};
pub use snapshot::{
    Counters, GenerationSnapshot, LaneSnapshot, RolloutSnapshot, Snapshot, WorkerSnapshot,
};
pub use workers::{CRASH_LOOP, CrashLoop};

pub(crate) use parts::Parts;
pub(crate) use records::{
    Canary, Gen, GenState, Lane, ReloadRun, Replaced, Retirement, Rollout, Run, Slot, Step,
    StopMode, Worker, WorkerState,
};

use lookup::join;

/// How many reload verdicts are kept.
const HISTORY: usize = 100;

/// All state of the master's supervision.
#[derive(Debug, Default)]
pub struct Supervisor {
    generations: BTreeMap<Generation, Gen>,
    workers: BTreeMap<WorkerId, Worker>,
    /// Every pid that belongs to a worker: its spawned pid and its announced main pid.
    pids: BTreeMap<u32, WorkerId>,
    /// The reload running, and its phase (one at a time).
    run: Run,
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
    actions: Vec<Action>,
    /// A graceful stop's `stop_delay`: until then the serving generation goes on serving.
    stop_delayed_until: Option<Instant>,
    /// Workers SIGKILLed and not reaped yet: when to kill them again (`None`: killed by the
    /// event being handled). Not carried across an upgrade: the new program's next event
    /// stamps nothing, and the kill already sent stands.
    kills: BTreeMap<WorkerId, Option<Instant>>,
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
            Event::NotReadyBecause { worker, cause } => self.on_not_ready(worker, cause),
            Event::CannotBeReady { worker, cause } => self.on_cannot_be_ready(now, worker, cause),
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
}

#[cfg(test)]
mod tests;
