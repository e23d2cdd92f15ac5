//! State format 3, the one this master writes: the state machine as the upgrade carries it.
//!
//! These types are the format and nothing else: the supervisor's records (`supervisor::Parts`)
//! are converted to them and back here, and only here. Each conversion names every field (no
//! `..`), so a field added to a record does not compile until it is carried or left out on
//! purpose; renaming a record's field changes nothing here. What the supervisor shares with the
//! rest of the master crosses as it serializes itself: the ids (numbers), [`GenerationSpec`],
//! [`ReloadRecord`], [`Counters`] and [`Trigger`]; the fixtures of `upgrade/tests.rs` keep
//! those readable.
//!
//! A state read back is checked whole before the new master uses it
//! (`Supervisor::from_parts` runs every invariant): an inconsistent state is refused by name,
//! and the old master goes on.
//!
//! Format 3 differs from format 2 in two places: the reload running is one record, its phase
//! ([`Run`]), where format 2 had three (`reload`, `canary`, `rollout` with `back`); and why a
//! worker left its slot is a [`Retirement`], where format 2 had its text.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::intent::Trigger;
use crate::supervisor::{
    self as live, Counters, Generation, GenerationSpec, Parts, ReloadId, ReloadRecord, RequestId,
    WorkerId,
};

/// The state machine in format 3.
#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub generations: BTreeMap<Generation, Gen>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pub pids: BTreeMap<u32, WorkerId>,
    pub run: Run,
    pub pending: Vec<(RequestId, Trigger)>,
    pub stop: Option<StopMode>,
    pub exit_code: i32,
    pub exited: bool,
    pub next_generation: u64,
    pub next_worker: u64,
    pub next_request: u64,
    pub next_reload: u64,
    pub history: VecDeque<ReloadRecord>,
    pub counters: Counters,
    #[serde(with = "crate::codec::mono_opt")]
    pub stop_delayed_until: Option<Instant>,
    #[serde(with = "crate::codec::mono_opt")]
    pub started: Option<Instant>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum GenState {
    Preparing,
    Starting,
    Rolling,
    Serving,
    Standby,
    Draining {
        #[serde(with = "crate::codec::mono")]
        since: Instant,
        killed: bool,
    },
    Failed,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Gen {
    pub spec: Option<GenerationSpec>,
    pub state: GenState,
    pub slots: Vec<Slot>,
    #[serde(with = "crate::codec::mono_opt")]
    pub failed_at: Option<Instant>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Slot {
    pub program: usize,
    pub index: usize,
    pub worker: Option<WorkerId>,
    pub crashes: u32,
    pub restarts: u32,
    pub last_exit: Option<String>,
    #[serde(with = "crate::codec::mono_opt")]
    pub restart_at: Option<Instant>,
    pub last_worker: Option<WorkerId>,
    #[serde(with = "crate::codec::mono_opt")]
    pub stable_at: Option<Instant>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WorkerState {
    Spawning,
    Starting {
        #[serde(with = "crate::codec::mono")]
        deadline: Instant,
    },
    Ready,
    Draining,
    Killed,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Worker {
    pub generation: Generation,
    pub slot: usize,
    pub program: usize,
    pub pid: Option<u32>,
    pub pgid: Option<u32>,
    pub state: WorkerState,
    #[serde(with = "crate::codec::mono")]
    pub spawned: Instant,
    pub ready_after: Option<Duration>,
    pub connections: Option<u64>,
    pub status: Option<String>,
    pub not_ready: Option<String>,
    pub replaced: Option<Replaced>,
    pub successor: Option<(WorkerId, String)>,
    pub replacement: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Replaced {
    pub reason: Retirement,
    #[serde(with = "crate::codec::mono")]
    pub kill_at: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Retirement {
    Unhealthy(String),
    Recycled(String),
    Rolled { reload: ReloadId, batch: usize },
    RolledBack(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadRun {
    pub id: ReloadId,
    pub generation: Generation,
    pub covers: Vec<RequestId>,
    pub triggers: Vec<Trigger>,
    #[serde(with = "crate::codec::mono")]
    pub started: Instant,
    pub initial: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Canary {
    pub reload: ReloadRun,
    pub old: Vec<Generation>,
    pub new: Generation,
    #[serde(with = "crate::codec::mono")]
    pub until: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Rollout {
    pub reload: ReloadId,
    pub old: Generation,
    pub new: Generation,
    pub lanes: Vec<Lane>,
    pub canary: Option<Duration>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Lane {
    pub new_program: usize,
    pub old_program: Option<usize>,
    pub batch: usize,
    pub batch_no: usize,
    pub batches: usize,
    pub step: Step,
    #[serde(with = "crate::codec::mono")]
    pub since: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Step {
    Starting(Vec<usize>),
    Canary(#[serde(with = "crate::codec::mono")] Instant),
    Retiring(Vec<WorkerId>),
    Waiting,
    Done,
}

/// The reload running, in its phase.
#[derive(Debug, Serialize, Deserialize)]
pub enum Run {
    Idle,
    Starting(ReloadRun),
    OnProbation(Canary),
    RollingForward { reload: ReloadRun, rollout: Rollout },
    RollingBack { rollout: Rollout, failure: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum StopMode {
    Graceful,
    Fast,
}

// ---- to the records and back ---------------------------------------------------------------
//
// `mirror!` writes both conversions of a struct whose fields are all named: each field moves
// as it is (`into`), or through `opt`/`list`/`map` when it holds records in an `Option`, a `Vec`
// or a map. Enums are converted by hand below, variant by variant.

fn opt<A: Into<B>, B>(x: Option<A>) -> Option<B> {
    x.map(Into::into)
}

fn list<A: Into<B>, B>(x: Vec<A>) -> Vec<B> {
    x.into_iter().map(Into::into).collect()
}

fn map<K: Ord, A: Into<B>, B>(x: BTreeMap<K, A>) -> BTreeMap<K, B> {
    x.into_iter().map(|(k, v)| (k, v.into())).collect()
}

macro_rules! mirror {
    ($ours:ident <=> $($live:ident)::+ { $($field:ident $(: $conv:ident)?),* $(,)? }) => {
        impl From<$($live)::+> for $ours {
            fn from(x: $($live)::+) -> Self {
                let $($live)::+ { $($field),* } = x;
                $ours { $($field: mirror!(@move $field $($conv)?)),* }
            }
        }
        impl From<$ours> for $($live)::+ {
            fn from(x: $ours) -> Self {
                let $ours { $($field),* } = x;
                $($live)::+ { $($field: mirror!(@move $field $($conv)?)),* }
            }
        }
    };
    (@move $field:ident) => { $field.into() };
    (@move $field:ident $conv:ident) => { $conv($field) };
}

mirror!(Machine <=> Parts {
    generations: map, workers: map, pids, run, pending, stop: opt, exit_code, exited,
    next_generation, next_worker, next_request, next_reload, history, counters,
    stop_delayed_until, started,
});
mirror!(Gen <=> live::Gen { spec, state, slots: list, failed_at });
mirror!(Slot <=> live::Slot {
    program, index, worker, crashes, restarts, last_exit, restart_at, last_worker, stable_at,
});
mirror!(Worker <=> live::Worker {
    generation, slot, program, pid, pgid, state, spawned, ready_after, connections, status,
    not_ready, replaced: opt, successor, replacement,
});
mirror!(Replaced <=> live::Replaced { reason, kill_at });
mirror!(ReloadRun <=> live::ReloadRun { id, generation, covers, triggers, started, initial });
mirror!(Canary <=> live::Canary { reload, old, new, until });
mirror!(Rollout <=> live::Rollout { reload, old, new, lanes: list, canary });
mirror!(Lane <=> live::Lane { new_program, old_program, batch, batch_no, batches, step, since });

impl From<live::GenState> for GenState {
    fn from(state: live::GenState) -> Self {
        match state {
            live::GenState::Preparing => GenState::Preparing,
            live::GenState::Starting => GenState::Starting,
            live::GenState::Rolling => GenState::Rolling,
            live::GenState::Serving => GenState::Serving,
            live::GenState::Standby => GenState::Standby,
            live::GenState::Draining { since, killed } => GenState::Draining { since, killed },
            live::GenState::Failed => GenState::Failed,
        }
    }
}

impl From<GenState> for live::GenState {
    fn from(state: GenState) -> Self {
        match state {
            GenState::Preparing => live::GenState::Preparing,
            GenState::Starting => live::GenState::Starting,
            GenState::Rolling => live::GenState::Rolling,
            GenState::Serving => live::GenState::Serving,
            GenState::Standby => live::GenState::Standby,
            GenState::Draining { since, killed } => live::GenState::Draining { since, killed },
            GenState::Failed => live::GenState::Failed,
        }
    }
}

impl From<live::WorkerState> for WorkerState {
    fn from(state: live::WorkerState) -> Self {
        match state {
            live::WorkerState::Spawning => WorkerState::Spawning,
            live::WorkerState::Starting { deadline } => WorkerState::Starting { deadline },
            live::WorkerState::Ready => WorkerState::Ready,
            live::WorkerState::Draining => WorkerState::Draining,
            live::WorkerState::Killed => WorkerState::Killed,
        }
    }
}

impl From<WorkerState> for live::WorkerState {
    fn from(state: WorkerState) -> Self {
        match state {
            WorkerState::Spawning => live::WorkerState::Spawning,
            WorkerState::Starting { deadline } => live::WorkerState::Starting { deadline },
            WorkerState::Ready => live::WorkerState::Ready,
            WorkerState::Draining => live::WorkerState::Draining,
            WorkerState::Killed => live::WorkerState::Killed,
        }
    }
}

impl From<live::Step> for Step {
    fn from(step: live::Step) -> Self {
        match step {
            live::Step::Starting(slots) => Step::Starting(slots),
            live::Step::Canary(until) => Step::Canary(until),
            live::Step::Retiring(workers) => Step::Retiring(workers),
            live::Step::Waiting => Step::Waiting,
            live::Step::Done => Step::Done,
        }
    }
}

impl From<Step> for live::Step {
    fn from(step: Step) -> Self {
        match step {
            Step::Starting(slots) => live::Step::Starting(slots),
            Step::Canary(until) => live::Step::Canary(until),
            Step::Retiring(workers) => live::Step::Retiring(workers),
            Step::Waiting => live::Step::Waiting,
            Step::Done => live::Step::Done,
        }
    }
}

impl From<live::Retirement> for Retirement {
    fn from(why: live::Retirement) -> Self {
        match why {
            live::Retirement::Unhealthy(reason) => Retirement::Unhealthy(reason),
            live::Retirement::Recycled(reason) => Retirement::Recycled(reason),
            live::Retirement::Rolled { reload, batch } => Retirement::Rolled { reload, batch },
            live::Retirement::RolledBack(verdict) => Retirement::RolledBack(verdict),
        }
    }
}

impl From<Retirement> for live::Retirement {
    fn from(why: Retirement) -> Self {
        match why {
            Retirement::Unhealthy(reason) => live::Retirement::Unhealthy(reason),
            Retirement::Recycled(reason) => live::Retirement::Recycled(reason),
            Retirement::Rolled { reload, batch } => live::Retirement::Rolled { reload, batch },
            Retirement::RolledBack(verdict) => live::Retirement::RolledBack(verdict),
        }
    }
}

impl From<live::StopMode> for StopMode {
    fn from(mode: live::StopMode) -> Self {
        match mode {
            live::StopMode::Graceful => StopMode::Graceful,
            live::StopMode::Fast => StopMode::Fast,
        }
    }
}

impl From<StopMode> for live::StopMode {
    fn from(mode: StopMode) -> Self {
        match mode {
            StopMode::Graceful => live::StopMode::Graceful,
            StopMode::Fast => live::StopMode::Fast,
        }
    }
}

impl From<live::Run> for Run {
    fn from(run: live::Run) -> Self {
        match run {
            live::Run::Idle => Run::Idle,
            live::Run::Starting(reload) => Run::Starting(reload.into()),
            live::Run::OnProbation(canary) => Run::OnProbation(canary.into()),
            live::Run::RollingForward { reload, rollout } => Run::RollingForward {
                reload: reload.into(),
                rollout: rollout.into(),
            },
            live::Run::RollingBack { rollout, failure } => Run::RollingBack {
                rollout: rollout.into(),
                failure,
            },
        }
    }
}

impl From<Run> for live::Run {
    fn from(run: Run) -> Self {
        match run {
            Run::Idle => live::Run::Idle,
            Run::Starting(reload) => live::Run::Starting(reload.into()),
            Run::OnProbation(canary) => live::Run::OnProbation(canary.into()),
            Run::RollingForward { reload, rollout } => live::Run::RollingForward {
                reload: reload.into(),
                rollout: rollout.into(),
            },
            Run::RollingBack { rollout, failure } => live::Run::RollingBack {
                rollout: rollout.into(),
                failure,
            },
        }
    }
}
