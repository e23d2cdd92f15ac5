//! The state machine's vocabulary: the ids, what a generation runs ([`GenerationSpec`]), the
//! [`Event`]s it reacts to, the [`Action`]s it asks for, and the [`Verdict`] and
//! [`ReloadRecord`] of a reload. Types only; the decisions are in [`super::Supervisor`].

use std::fmt;
use std::time::{Duration, Instant};

use baton_proto::{MasterMessage, WorkerMessage};
use baton_sys::process::{ExitKind, SignalNumber};
use serde::{Deserialize, Serialize};

use crate::intent::{Intent, Trigger};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $fmt:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub u64);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}
id_type!(
    /// A generation of workers: all started by one reload, with one configuration.
    Generation, "{}");
id_type!(
    /// A worker process, unique for the master's lifetime (a restarted worker gets a new id).
    WorkerId, "{}");
id_type!(
    /// One reload request (a signal, a command): each is accounted for in the log.
    RequestId, "#{}");
id_type!(
    /// One reload actually carried out; it covers one or more requests.
    ReloadId, "{}");

/// The parts of one worker program's configuration the state machine decides with: timings and
/// counts, never the command or environment (those stay with the event loop, which spawns).
/// Deliberately a copy of those fields of [`crate::config::WorkerConfig`], so the state
/// machine's tests build it directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramSpec {
    pub processes: usize,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    #[serde(with = "crate::codec::signal_opt")]
    pub drain_signal: Option<SignalNumber>,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// How long a worker of a failed generation may take to finish what it accepted before it
    /// was given up (a worker may accept before it reports ready), after its drain request.
    #[serde(default = "default_failed_stop_timeout")]
    pub failed_stop_timeout: Duration,
    /// How a worker that fails its liveness check is replaced (`liveness:`); `None`: no check.
    #[serde(default)]
    pub replace: Option<ReplaceSpec>,
    /// The program's name: a rolling reload pairs old and new workers by it.
    #[serde(default)]
    pub name: String,
    /// How a reload replaces this program's workers (`reload:`).
    #[serde(default)]
    pub strategy: Strategy,
}

/// How a reload replaces a program's workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// A whole new generation beside the old one, which drains once every new worker is ready.
    #[default]
    AllAtOnce,
    /// `batch` new workers at a time; as many old ones drain once they are ready, and the next
    /// batch starts once those have exited: at most `processes + batch` alive.
    Rolling { batch: usize },
}

impl Strategy {
    pub fn batch(self) -> Option<usize> {
        match self {
            Strategy::AllAtOnce => None,
            Strategy::Rolling { batch } => Some(batch),
        }
    }
}

/// How the state machine replaces a worker that failed its liveness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceSpec {
    /// At most this percentage of the generation's workers being replaced at once (at least 1).
    pub max_replacing_percent: u32,
    /// SIGKILL this long after the drain request.
    pub kill_after: Duration,
}

/// States written before `failed_stop_timeout` existed get the default.
fn default_failed_stop_timeout() -> Duration {
    crate::DEFAULT_FAILED_STOP_TIMEOUT
}

impl ProgramSpec {
    /// Delay before the restart after `crashes` crashes in a row: doubling from
    /// `restart_backoff`, capped at `restart_backoff_max`.
    pub fn backoff(&self, crashes: u32) -> Duration {
        let factor = 1u32
            .checked_shl(crashes.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.restart_backoff
            .saturating_mul(factor)
            .min(self.restart_backoff_max)
    }
}

/// What a generation runs: every program of the configuration, and the master-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationSpec {
    pub programs: Vec<ProgramSpec>,
    pub max_draining: usize,
    pub forward_usr1: bool,
    /// Probation of this generation after it becomes ready (see [`crate::config::SupervisorConfig`]).
    pub canary_window: Option<Duration>,
    /// The signal that upgrades the master (`supervisor.upgrade_signal`), if any.
    #[serde(default, with = "crate::codec::signal_opt")]
    pub upgrade_signal: Option<SignalNumber>,
    /// How long a new program may take to check the state (`supervisor.upgrade_timeout`).
    #[serde(default = "default_upgrade_timeout")]
    pub upgrade_timeout: Duration,
    /// How long a graceful stop goes on serving before it drains (`supervisor.stop_delay`).
    #[serde(default)]
    pub stop_delay: Duration,
    /// Whether the master watches its configuration file (`supervisor.watch: [config]`).
    #[serde(default)]
    pub watch_config: bool,
}

/// States written before `upgrade_timeout` existed get the default.
fn default_upgrade_timeout() -> Duration {
    crate::DEFAULT_UPGRADE_TIMEOUT
}

/// Everything the state machine reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Intent(Intent),
    /// Answer to [`Action::Prepare`]: the configuration was read and the listeners bound.
    Prepared {
        generation: Generation,
        result: Result<GenerationSpec, String>,
    },
    /// Answer to [`Action::Spawn`]: the process runs with this pid, or could not be started.
    Spawned {
        worker: WorkerId,
        result: Result<u32, String>,
    },
    /// News from a worker: a packet of its channel, or the same from its notify socket or probe.
    Message {
        worker: WorkerId,
        message: WorkerMessage,
    },
    /// A ready worker's readiness probe failed during its generation's probation.
    ProbeFailed {
        worker: WorkerId,
        reason: String,
    },
    /// Why a starting worker is not ready yet, as last seen (a probe's answer, a refused
    /// packet, the condition still missing): it goes into the verdict if the worker times out.
    NotReadyBecause {
        worker: WorkerId,
        cause: String,
    },
    /// A starting worker can never become ready, for a cause that is final (its listeners
    /// could not be handed to it): judged now, with the cause, not at its ready deadline.
    CannotBeReady {
        worker: WorkerId,
        cause: String,
    },
    /// The worker's main process is now `pid` (`MAINPID=`: a server that forks).
    MainPid {
        worker: WorkerId,
        pid: u32,
    },
    /// A ready worker failed its liveness check (`liveness:`): it is replaced.
    Unhealthy {
        worker: WorkerId,
        reason: String,
    },
    /// A ready worker used too much memory for too long (`recycle:`): a new worker starts in
    /// its slot, and once that one is ready it drains.
    Recycle {
        worker: WorkerId,
        reason: String,
    },
    /// A child was reaped.
    Exited {
        pid: u32,
        status: ExitKind,
    },
    /// Time passed: act on every deadline that is due.
    Tick,
}

/// Everything the state machine asks the event loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read the configuration, bind new listeners, keep the resources for `generation`, and
    /// answer with [`Event::Prepared`].
    Prepare { generation: Generation },
    /// Start process `slot` (0-based within its program) of program `program` (an index into
    /// the configuration's programs) of `generation`; answer with [`Event::Spawned`].
    Spawn {
        worker: WorkerId,
        generation: Generation,
        program: usize,
        slot: usize,
    },
    /// Send a packet over the worker's channel (ignored for workers without one).
    Send {
        worker: WorkerId,
        message: MasterMessage,
    },
    /// Ask a worker to drain: the drain packet over its channel (if it has one) with the time
    /// it has left, and its drain signal (`None`: none configured, or asked again).
    Drain {
        worker: WorkerId,
        pid: u32,
        deadline_ms: u64,
        signal: Option<SignalNumber>,
    },
    /// Send a signal to one worker process.
    Signal { pid: u32, signal: SignalNumber },
    /// SIGKILL the worker's process group (`pgid`, the pid it was started as) and its main
    /// process `pid`.
    Kill { pid: u32, pgid: u32 },
    /// A worker's main process exited: SIGKILL what is left of its process group (children it
    /// left behind). The group's id cannot have been reused while a member lives.
    KillGroup { pgid: u32 },
    /// The worker is gone: drop its channel, notify socket and probe.
    Forget { worker: WorkerId },
    /// No worker of `generation` is left: drop its resources (listeners it alone used close).
    Release { generation: Generation },
    /// Leave the event loop and exit the process with this code.
    Exit { code: i32 },
    /// These reload requests have their verdict (for clients waiting on them).
    Verdict(Verdict),
}

/// How the reload covering some requests ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub requests: Vec<RequestId>,
    /// The reload that covered them; `None` if they were rejected before one started.
    pub reload: Option<ReloadId>,
    pub generation: Option<Generation>,
    pub result: Result<(), String>,
    pub duration: Duration,
    /// The worker whose exit, lateness or failed probe failed the reload, if one did (its last
    /// stderr lines go with the verdict).
    pub culprit: Option<WorkerId>,
}

/// The phase of a generation. Shown to operators as
/// [`baton_proto::control::GenerationState`], where the names are written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    Starting,
    /// Replacing the serving generation a batch at a time (a rolling reload).
    Rolling,
    Serving,
    /// Replaced by a generation on probation: paused, ready to serve again.
    Standby,
    Draining,
    /// Its reload failed; its workers are being killed.
    Failed,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(baton_proto::control::GenerationState::from(*self).as_str())
    }
}

impl From<Phase> for baton_proto::control::GenerationState {
    fn from(phase: Phase) -> Self {
        use baton_proto::control::GenerationState as State;
        match phase {
            Phase::Preparing => State::Preparing,
            Phase::Starting => State::Starting,
            Phase::Rolling => State::Rolling,
            Phase::Serving => State::Serving,
            Phase::Standby => State::Standby,
            Phase::Draining => State::Draining,
            Phase::Failed => State::Failed,
        }
    }
}

/// How one reload ended, kept for `baton history` and for tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRecord {
    pub id: ReloadId,
    pub covers: Vec<RequestId>,
    /// Who asked, for each covered request.
    pub triggers: Vec<Trigger>,
    pub generation: Generation,
    #[serde(with = "crate::codec::mono")]
    pub started: Instant,
    pub duration: Duration,
    pub verdict: Result<(), String>,
}
