//! The state machine's private records: generations, slots, workers, and the reload running
//! ([`Run`], its one phase). They are not the upgrade state: `crate::upgrade` has types of its
//! own for that, converted from and to these in one place (`upgrade/v3.rs`, through
//! [`super::Parts`]), so renaming a field here changes no format.

use std::fmt;
use std::time::{Duration, Instant};

use super::model::{Generation, GenerationSpec, ReloadId, RequestId, WorkerId};
use crate::intent::Trigger;

#[derive(Debug, Clone)]
pub(crate) enum GenState {
    Preparing,
    Starting,
    /// Replacing the serving generation a batch at a time (a rolling reload, see `reload/rollout.rs`):
    /// its ready workers serve.
    Rolling,
    Serving,
    Standby,
    /// Each worker is killed at `since` + its program's drain timeout; `killed`: some were.
    Draining {
        since: Instant,
        killed: bool,
    },
    Failed,
}

#[derive(Debug, Clone)]
pub(crate) struct Gen {
    pub(crate) spec: Option<GenerationSpec>,
    pub(crate) state: GenState,
    /// The processes of every program, in order.
    pub(crate) slots: Vec<Slot>,
    /// Failed: since when. Its workers were asked to drain then, and each is killed at this
    /// plus its program's `failed_stop_timeout`.
    pub(crate) failed_at: Option<Instant>,
}

#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) program: usize,
    /// Index within its program (what `BATON_SLOT` tells the worker).
    pub(crate) index: usize,
    pub(crate) worker: Option<WorkerId>,
    /// Crashes in a row (for the backoff).
    pub(crate) crashes: u32,
    /// Replacements so far.
    pub(crate) restarts: u32,
    pub(crate) last_exit: Option<String>,
    pub(crate) restart_at: Option<Instant>,
    /// The worker that last ran in it (shown while the slot waits out its backoff).
    pub(crate) last_worker: Option<WorkerId>,
    /// After crashes, when its worker will have stayed up long enough to start the count over.
    pub(crate) stable_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerState {
    /// Asked to spawn; no pid yet.
    Spawning,
    Starting {
        deadline: Instant,
    },
    Ready,
    Draining,
    /// SIGKILL sent; waiting to be reaped.
    Killed,
}

#[derive(Debug, Clone)]
pub(crate) struct Worker {
    pub(crate) generation: Generation,
    /// Its slot in the generation (slots of all programs, in order).
    pub(crate) slot: usize,
    pub(crate) program: usize,
    /// The main process: the one spawned, or the one announced with `MAINPID=`.
    pub(crate) pid: Option<u32>,
    /// The pid it was spawned as, which leads its process group.
    pub(crate) pgid: Option<u32>,
    pub(crate) state: WorkerState,
    pub(crate) spawned: Instant,
    pub(crate) ready_after: Option<Duration>,
    pub(crate) connections: Option<u64>,
    /// The last status line it reported (`STATUS=`, or a status packet).
    pub(crate) status: Option<String>,
    /// Why it is not ready yet, as last seen (see [`super::Event::NotReadyBecause`]).
    pub(crate) not_ready: Option<String>,
    /// Replaced (it failed its liveness check): why, and when it is killed if still running.
    /// Its slot has a new worker already.
    pub(crate) replaced: Option<Replaced>,
    /// Being recycled: the worker that will take its slot once ready, and why.
    pub(crate) successor: Option<(WorkerId, String)>,
    /// Started in the slot of a worker replaced for failing its liveness check: its slot counts
    /// against `max_replacing` until it is ready, however fast the replaced one exited.
    pub(crate) replacement: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Replaced {
    pub(crate) reason: Retirement,
    pub(crate) kill_at: Instant,
}

#[derive(Debug, Clone)]
pub(crate) struct ReloadRun {
    pub(crate) id: ReloadId,
    pub(crate) generation: Generation,
    pub(crate) covers: Vec<RequestId>,
    pub(crate) triggers: Vec<Trigger>,
    pub(crate) started: Instant,
    /// The first generation at startup: its failure ends the master.
    pub(crate) initial: bool,
}

/// A reload whose new generation serves on probation while the old one stands by.
#[derive(Debug, Clone)]
pub(crate) struct Canary {
    pub(crate) reload: ReloadRun,
    pub(crate) old: Vec<Generation>,
    pub(crate) new: Generation,
    pub(crate) until: Instant,
}

/// A rolling reload in progress: the new generation's workers replace the old one's a batch at
/// a time, program by program; or, after a failure, the old generation's workers replace the new
/// one's the same way (which way: [`Run`]).
#[derive(Debug, Clone)]
pub(crate) struct Rollout {
    pub(crate) reload: ReloadId,
    pub(crate) old: Generation,
    pub(crate) new: Generation,
    pub(crate) lanes: Vec<Lane>,
    /// The first batch's probation (`canary_window`).
    pub(crate) canary: Option<Duration>,
}

/// Which way a rolling reload moves workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// From the old generation to the new one: the reload has no verdict yet.
    Forward,
    /// Back to the old generation: the reload failed (its verdict given).
    Back,
}

/// Why a worker left its slot while its generation goes on: it drains on a deadline of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retirement {
    /// It failed its liveness check (the check's words).
    Unhealthy(String),
    /// It was recycled (the memory sampler's words), and its successor is ready.
    Recycled(String),
    /// A batch of a rolling reload took its place.
    Rolled { reload: ReloadId, batch: usize },
    /// A rolling reload failed (its verdict) and stops the new workers that serve nothing yet.
    RolledBack(String),
}

impl fmt::Display for Retirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Retirement::Unhealthy(reason) => f.write_str(reason),
            Retirement::Recycled(reason) => write!(f, "recycled: {reason}"),
            Retirement::Rolled { reload, batch } => {
                write!(f, "retired by reload {reload}, batch {batch}")
            }
            Retirement::RolledBack(verdict) => write!(f, "stopped: {verdict}"),
        }
    }
}

/// Where the one reload that may run at a time is.
#[derive(Debug, Clone, Default)]
pub(crate) enum Run {
    /// No reload runs (requests start one at once).
    #[default]
    Idle,
    /// Its generation is being prepared or started (the first generation's too).
    Starting(ReloadRun),
    /// Its generation serves on probation; the old ones stand by.
    OnProbation(Canary),
    /// Its generation replaces the serving one a batch at a time.
    RollingForward { reload: ReloadRun, rollout: Rollout },
    /// It failed (its verdict given: `failure`); the old generation gets its workers back a
    /// batch at a time.
    RollingBack { rollout: Rollout, failure: String },
}

/// A [`Run`]'s phase without its records, to name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunPhase {
    Idle,
    Starting,
    OnProbation,
    RollingForward,
    RollingBack,
}

impl Run {
    pub(crate) fn phase(&self) -> RunPhase {
        match self {
            Run::Idle => RunPhase::Idle,
            Run::Starting(_) => RunPhase::Starting,
            Run::OnProbation(_) => RunPhase::OnProbation,
            Run::RollingForward { .. } => RunPhase::RollingForward,
            Run::RollingBack { .. } => RunPhase::RollingBack,
        }
    }

    /// The reload that has no verdict yet, in whatever phase.
    pub(crate) fn reload(&self) -> Option<&ReloadRun> {
        match self {
            Run::Starting(reload) | Run::RollingForward { reload, .. } => Some(reload),
            Run::OnProbation(canary) => Some(&canary.reload),
            Run::Idle | Run::RollingBack { .. } => None,
        }
    }

    /// The reload running, verdict or not (rolling back after one).
    pub(crate) fn id(&self) -> Option<ReloadId> {
        match self {
            Run::RollingBack { rollout, .. } => Some(rollout.reload),
            run => run.reload().map(|r| r.id),
        }
    }

    pub(crate) fn starting(&self) -> Option<&ReloadRun> {
        match self {
            Run::Starting(reload) => Some(reload),
            _ => None,
        }
    }

    pub(crate) fn canary(&self) -> Option<&Canary> {
        match self {
            Run::OnProbation(canary) => Some(canary),
            _ => None,
        }
    }

    pub(crate) fn rollout(&self) -> Option<(&Rollout, Direction)> {
        match self {
            Run::RollingForward { rollout, .. } => Some((rollout, Direction::Forward)),
            Run::RollingBack { rollout, .. } => Some((rollout, Direction::Back)),
            _ => None,
        }
    }

    pub(crate) fn rollout_mut(&mut self) -> Option<&mut Rollout> {
        match self {
            Run::RollingForward { rollout, .. } | Run::RollingBack { rollout, .. } => Some(rollout),
            _ => None,
        }
    }

    /// Takes the run if `take` says so (leaving [`Run::Idle`]); else returns [`Run::Idle`].
    pub(crate) fn take_if(&mut self, take: impl FnOnce(&Run) -> bool) -> Run {
        if take(self) {
            std::mem::take(self)
        } else {
            Run::Idle
        }
    }
}

/// One program's progress in a [`Rollout`].
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    /// The program's index in the new generation's configuration, and in the old one's (paired
    /// by name; `None`: a program the reload adds).
    pub(crate) new_program: usize,
    pub(crate) old_program: Option<usize>,
    /// Workers started at a time (all of them for a program reloaded all at once).
    pub(crate) batch: usize,
    /// Batches so far (the one in flight included), and in all.
    pub(crate) batch_no: usize,
    pub(crate) batches: usize,
    pub(crate) step: Step,
    pub(crate) since: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The batch's slots (in the generation being filled): the next step once each has a ready
    /// worker.
    Starting(Vec<usize>),
    /// The first batch serves on probation until then, beside every old worker.
    Canary(Instant),
    /// These workers (of the generation being replaced) drain; the next batch starts once they
    /// are gone.
    Retiring(Vec<WorkerId>),
    /// The next batch waits for room: workers of the program in older generations still drain,
    /// and starting it would make more than `processes + batch` alive.
    Waiting,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopMode {
    Graceful,
    Fast,
}
