//! The read side of the state machine: what `baton status`, `baton history` and the metrics
//! see ([`Snapshot`], [`Counters`]). Nothing here changes the state.

use std::time::{Duration, Instant};

use baton_proto::control::{RolloutStep, WorkerState as WorkerPhase};
use serde::{Deserialize, Serialize};

use super::CrashLoop;
use super::Supervisor;
use baton_sys::process::SignalNumber;

use super::model::{Generation, Phase, ReloadId, ReloadRecord, RequestId, WorkerId};
use super::records::{Direction, GenState, Run, Step, WorkerState};
use crate::histogram::{DrainBuckets, Histogram, ReloadBuckets};

/// What the state machine knows at one instant, for `baton status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub uptime: Duration,
    pub stopping: bool,
    /// A graceful stop's delay (`supervisor.stop_delay`): the time left before it drains.
    pub stop_delay_left: Option<Duration>,
    /// The reload running now: its id, generation, the requests it covers, how long it runs.
    pub reload: Option<(ReloadId, Generation, Vec<RequestId>, Duration)>,
    /// Requests queued behind it.
    pub queued: Vec<RequestId>,
    /// A reload whose new generation is on probation, and the time left.
    pub probation: Option<(ReloadId, Generation, Duration)>,
    /// A rolling reload in progress.
    pub rollout: Option<RolloutSnapshot>,
    pub generations: Vec<GenerationSnapshot>,
}

/// A rolling reload in a [`Snapshot`]: workers move from generation `from` to `to` (rolling
/// back: `back` is the reload's failure, and `to` is the old generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSnapshot {
    pub reload: ReloadId,
    pub from: Generation,
    pub to: Generation,
    pub back: Option<String>,
    pub programs: Vec<LaneSnapshot>,
}

/// One program of a [`RolloutSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneSnapshot {
    /// Its index in generation `to`'s configuration.
    pub program: usize,
    /// Ready workers of generation `to`, of `processes`.
    pub replaced: usize,
    pub processes: usize,
    pub batch_size: usize,
    pub batch: usize,
    pub batches: usize,
    pub step: RolloutStep,
    pub in_step: Duration,
}

/// One generation in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationSnapshot {
    pub generation: Generation,
    pub phase: Phase,
    /// Draining: since when, and the time left before its last worker is killed.
    pub draining_for: Option<Duration>,
    pub time_left: Option<Duration>,
    pub workers: Vec<WorkerSnapshot>,
    /// Its crash-looping programs (it is degraded while there is one).
    pub crash_loops: Vec<CrashLoop>,
}

/// One worker in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    /// Index of its program in the configuration, and its slot within the program.
    pub program: usize,
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: WorkerPhase,
    pub age: Duration,
    pub ready_after: Option<Duration>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub connections: Option<u64>,
    pub status: Option<String>,
    /// A slot waiting out its restart backoff (`state: backoff`, the worker that last ran in
    /// it, no pid): when its next worker starts.
    pub restart_in: Option<Duration>,
}

/// Counters since the master started, for `baton metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Failed reloads that were rollbacks of a generation on probation.
    pub reloads_rolled_back: u64,
    /// Durations of finished reloads (request to verdict).
    pub reload_durations: Histogram<ReloadBuckets>,
    /// Crashed workers replaced.
    pub restarts: u64,
    /// Workers killed at their drain deadline, and to respect `max_draining`.
    pub killed_at_deadline: u64,
    pub killed_by_cap: u64,
    /// How long finished drains took.
    pub drain_durations: Histogram<DrainBuckets>,
    /// Workers replaced because they failed their liveness check.
    #[serde(default)]
    pub replaced_unhealthy: u64,
    /// Workers replaced because they used too much memory (`recycle:`).
    #[serde(default)]
    pub replaced_memory: u64,
}

impl Supervisor {
    /// Generations with their phase and number of live workers, oldest first.
    pub fn generations(&self) -> Vec<(Generation, Phase, usize)> {
        self.generations
            .iter()
            .map(|(&g, entry)| {
                let phase = match entry.state {
                    GenState::Preparing => Phase::Preparing,
                    GenState::Starting => Phase::Starting,
                    GenState::Rolling => Phase::Rolling,
                    GenState::Serving => Phase::Serving,
                    GenState::Standby => Phase::Standby,
                    GenState::Draining { .. } => Phase::Draining,
                    GenState::Failed => Phase::Failed,
                };
                (g, phase, self.live_workers(g))
            })
            .collect()
    }

    /// Everything `baton status` shows, as of `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let generations = self
            .generations
            .iter()
            .map(|(&g, entry)| {
                let mut workers: Vec<WorkerSnapshot> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| w.generation == g)
                    .map(|(&id, w)| {
                        let slot = entry.slots.get(w.slot);
                        WorkerSnapshot {
                            id,
                            program: w.program,
                            slot: slot.map_or(0, |s| s.index),
                            pid: w.pid,
                            state: match w.state {
                                WorkerState::Spawning => WorkerPhase::Spawning,
                                WorkerState::Starting { .. } => WorkerPhase::Starting,
                                WorkerState::Ready => WorkerPhase::Ready,
                                WorkerState::Draining => WorkerPhase::Draining,
                                WorkerState::Killed => WorkerPhase::Killed,
                            },
                            age: now.saturating_duration_since(w.spawned),
                            ready_after: w.ready_after,
                            restarts: slot.map_or(0, |s| s.restarts),
                            last_exit: slot.and_then(|s| s.last_exit.clone()),
                            connections: w.connections,
                            status: w.status.clone(),
                            restart_in: None,
                        }
                    })
                    .collect();
                // Slots waiting out a backoff keep a row: the worker that last ran there.
                workers.extend(entry.slots.iter().filter_map(|s| {
                    let at = s.restart_at.filter(|_| s.worker.is_none())?;
                    Some(WorkerSnapshot {
                        id: s.last_worker?,
                        program: s.program,
                        slot: s.index,
                        pid: None,
                        state: WorkerPhase::Backoff,
                        age: Duration::ZERO,
                        ready_after: None,
                        restarts: s.restarts,
                        last_exit: s.last_exit.clone(),
                        connections: None,
                        status: None,
                        restart_in: Some(at.saturating_duration_since(now)),
                    })
                }));
                workers.sort_by_key(|w| (w.program, w.slot, w.id));
                let (phase, draining_for, time_left) = match entry.state {
                    GenState::Preparing => (Phase::Preparing, None, None),
                    GenState::Starting => (Phase::Starting, None, None),
                    GenState::Rolling => (Phase::Rolling, None, None),
                    GenState::Serving => (Phase::Serving, None, None),
                    GenState::Standby => (Phase::Standby, None, None),
                    GenState::Failed => (Phase::Failed, None, None),
                    GenState::Draining { since, .. } => {
                        let last = self
                            .workers
                            .values()
                            .filter(|w| w.generation == g && w.state != WorkerState::Killed)
                            .filter_map(|w| self.drain_deadline(w))
                            .max();
                        (
                            Phase::Draining,
                            Some(now.saturating_duration_since(since)),
                            last.map(|d| d.saturating_duration_since(now)),
                        )
                    }
                };
                GenerationSnapshot {
                    generation: g,
                    phase,
                    draining_for,
                    time_left,
                    workers,
                    crash_loops: self.crash_loops(g, now),
                }
            })
            .collect();
        Snapshot {
            uptime: self
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            stopping: self.stop.is_some(),
            stop_delay_left: self
                .stop_delayed_until
                .map(|until| until.saturating_duration_since(now)),
            reload: match &self.run {
                Run::Starting(reload) | Run::RollingForward { reload, .. } => Some(reload),
                _ => None,
            }
            .filter(|r| !r.initial)
            .map(|r| {
                (
                    r.id,
                    r.generation,
                    r.covers.clone(),
                    now.saturating_duration_since(r.started),
                )
            }),
            queued: self.pending.iter().map(|(r, _)| *r).collect(),
            probation: self
                .run
                .canary()
                .map(|c| (c.reload.id, c.new, c.until.saturating_duration_since(now))),
            rollout: self.rollout_snapshot(now),
            generations,
        }
    }

    fn rollout_snapshot(&self, now: Instant) -> Option<RolloutSnapshot> {
        let (r, direction) = self.run.rollout()?;
        let (from, to) = match direction {
            Direction::Forward => (r.old, r.new),
            Direction::Back => (r.new, r.old),
        };
        let entry = self.generations.get(&to)?;
        let programs = r
            .lanes
            .iter()
            .filter_map(|lane| {
                let program = match direction {
                    Direction::Forward => lane.new_program,
                    Direction::Back => lane.old_program?,
                };
                let slots = entry.slots.iter().filter(|s| s.program == program);
                let replaced = slots
                    .clone()
                    .filter_map(|s| self.workers.get(&s.worker?))
                    .filter(|w| w.state == WorkerState::Ready)
                    .count();
                Some(LaneSnapshot {
                    program,
                    replaced,
                    processes: slots.count(),
                    batch_size: lane.batch,
                    batch: lane.batch_no,
                    batches: lane.batches,
                    step: match lane.step {
                        Step::Starting(_) => RolloutStep::Starting,
                        Step::Canary(_) => RolloutStep::Probation,
                        Step::Retiring(_) => RolloutStep::Retiring,
                        Step::Waiting => RolloutStep::Waiting,
                        Step::Done => RolloutStep::Done,
                    },
                    in_step: now.saturating_duration_since(lane.since),
                })
            })
            .collect();
        Some(RolloutSnapshot {
            reload: r.reload,
            from,
            to,
            back: match &self.run {
                Run::RollingBack { failure, .. } => Some(failure.clone()),
                _ => None,
            },
            programs,
        })
    }

    /// Counters since the start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The last reloads' verdicts, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &ReloadRecord> {
        self.history.iter()
    }

    /// The serving generation's upgrade signal (`supervisor.upgrade_signal`), if any.
    pub fn upgrade_signal(&self) -> Option<SignalNumber> {
        self.serving_spec().and_then(|s| s.upgrade_signal)
    }

    /// How long a new program may take to check the state, from the serving generation's
    /// configuration.
    /// Whether the serving generation's configuration asks for the configuration file to be
    /// watched.
    pub fn watches_config(&self) -> bool {
        self.serving_spec().is_some_and(|s| s.watch_config)
    }

    pub fn upgrade_timeout(&self) -> Duration {
        self.serving_spec()
            .map_or(crate::DEFAULT_UPGRADE_TIMEOUT, |s| s.upgrade_timeout)
    }

    /// The id of the last reload request handled: a caller that just sent one learns its id.
    pub fn last_request(&self) -> Option<RequestId> {
        (self.next_request > 0).then_some(RequestId(self.next_request))
    }
}
