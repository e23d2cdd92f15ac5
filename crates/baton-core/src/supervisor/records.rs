//! The state machine's private records: generations, slots, workers, the reload running and
//! the canary. They are serialized because the whole machine crosses a self-upgrade (see
//! [`crate::upgrade`]): renaming a field here is a change of the state format.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::model::{Generation, GenerationSpec, ReloadId, RequestId, WorkerId};
use crate::intent::Trigger;

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum GenState {
    Preparing,
    Starting,
    /// Replacing the serving generation a batch at a time (a rolling reload, see `rollout.rs`):
    /// its ready workers serve.
    Rolling,
    Serving,
    Standby,
    /// Each worker is killed at `since` + its program's drain timeout; `killed`: some were.
    Draining {
        #[serde(with = "crate::codec::mono")]
        since: Instant,
        killed: bool,
    },
    Failed,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Gen {
    pub(super) spec: Option<GenerationSpec>,
    pub(super) state: GenState,
    /// The processes of every program, in order.
    pub(super) slots: Vec<Slot>,
    /// Failed: since when. Its workers were asked to drain then, and each is killed at this
    /// plus its program's `failed_stop_timeout`.
    #[serde(default, with = "crate::codec::mono_opt")]
    pub(super) failed_at: Option<Instant>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Slot {
    pub(super) program: usize,
    /// Index within its program (what `BATON_SLOT` tells the worker).
    pub(super) index: usize,
    pub(super) worker: Option<WorkerId>,
    /// Crashes in a row (for the backoff).
    pub(super) crashes: u32,
    /// Replacements so far.
    pub(super) restarts: u32,
    pub(super) last_exit: Option<String>,
    #[serde(with = "crate::codec::mono_opt")]
    pub(super) restart_at: Option<Instant>,
    /// The worker that last ran in it (shown while the slot waits out its backoff).
    #[serde(default)]
    pub(super) last_worker: Option<WorkerId>,
    /// After crashes, when its worker will have stayed up long enough to start the count over.
    #[serde(default, with = "crate::codec::mono_opt")]
    pub(super) stable_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum WorkerState {
    /// Asked to spawn; no pid yet.
    Spawning,
    Starting {
        #[serde(with = "crate::codec::mono")]
        deadline: Instant,
    },
    Ready,
    Draining,
    /// SIGKILL sent; waiting to be reaped.
    Killed,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Worker {
    pub(super) generation: Generation,
    /// Its slot in the generation (slots of all programs, in order).
    pub(super) slot: usize,
    pub(super) program: usize,
    /// The main process: the one spawned, or the one announced with `MAINPID=`.
    pub(super) pid: Option<u32>,
    /// The pid it was spawned as, which leads its process group.
    pub(super) pgid: Option<u32>,
    pub(super) state: WorkerState,
    #[serde(with = "crate::codec::mono")]
    pub(super) spawned: Instant,
    pub(super) ready_after: Option<Duration>,
    pub(super) connections: Option<u64>,
    /// The last status line it reported (`STATUS=`, or a status packet).
    pub(super) status: Option<String>,
    /// Why it is not ready yet, as last seen (see [`super::Event::NotReadyBecause`]).
    #[serde(default)]
    pub(super) not_ready: Option<String>,
    /// Replaced (it failed its liveness check): why, and when it is killed if still running.
    /// Its slot has a new worker already.
    #[serde(default)]
    pub(super) replaced: Option<Replaced>,
    /// Being recycled: the worker that will take its slot once ready, and why.
    #[serde(default)]
    pub(super) successor: Option<(WorkerId, String)>,
    /// Started in the slot of a worker replaced for failing its liveness check: its slot counts
    /// against `max_replacing` until it is ready, however fast the replaced one exited.
    #[serde(default)]
    pub(super) replacement: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Replaced {
    pub(super) reason: String,
    #[serde(with = "crate::codec::mono")]
    pub(super) kill_at: Instant,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ReloadRun {
    pub(super) id: ReloadId,
    pub(super) generation: Generation,
    pub(super) covers: Vec<RequestId>,
    pub(super) triggers: Vec<Trigger>,
    #[serde(with = "crate::codec::mono")]
    pub(super) started: Instant,
    /// The first generation at startup: its failure ends the master.
    pub(super) initial: bool,
}

/// A reload whose new generation serves on probation while the old one stands by.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Canary {
    pub(super) reload: ReloadRun,
    pub(super) old: Vec<Generation>,
    pub(super) new: Generation,
    #[serde(with = "crate::codec::mono")]
    pub(super) until: Instant,
}

/// A rolling reload in progress: the new generation's workers replace the old one's a batch at
/// a time, program by program; or, after a failure, the old generation's workers replace the new
/// one's the same way (`back`: the failure).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Rollout {
    pub(super) reload: ReloadId,
    pub(super) old: Generation,
    pub(super) new: Generation,
    pub(super) lanes: Vec<Lane>,
    /// The first batch's probation (`canary_window`).
    pub(super) canary: Option<Duration>,
    /// Rolling back: why the reload failed.
    pub(super) back: Option<String>,
}

/// One program's progress in a [`Rollout`].
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Lane {
    /// The program's index in the new generation's configuration, and in the old one's (paired
    /// by name; `None`: a program the reload adds).
    pub(super) new_program: usize,
    pub(super) old_program: Option<usize>,
    /// Workers started at a time (all of them for a program reloaded all at once).
    pub(super) batch: usize,
    /// Batches so far (the one in flight included), and in all.
    pub(super) batch_no: usize,
    pub(super) batches: usize,
    pub(super) step: Step,
    #[serde(with = "crate::codec::mono")]
    pub(super) since: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Step {
    /// The batch's slots (in the generation being filled): the next step once each has a ready
    /// worker.
    Starting(Vec<usize>),
    /// The first batch serves on probation until then, beside every old worker.
    Canary(#[serde(with = "crate::codec::mono")] Instant),
    /// These workers (of the generation being replaced) drain; the next batch starts once they
    /// are gone.
    Retiring(Vec<WorkerId>),
    /// The next batch waits for room: workers of the program in older generations still drain,
    /// and starting it would make more than `processes + batch` alive.
    Waiting,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum StopMode {
    Graceful,
    Fast,
}
