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
use std::fmt;
use std::time::{Duration, Instant};

use baton_proto::{MasterMessage, WorkerMessage};
use baton_sys::process::{ExitKind, SignalNumber};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

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

/// Who asked for something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Signal {
        name: &'static str,
        sender_pid: Option<u32>,
    },
    Other(String),
}

/// A trigger crosses a master upgrade as its text (what the log and history show anyway).
impl Serialize for Trigger {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Trigger {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Trigger::Other(String::deserialize(d)?))
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal {
                name,
                sender_pid: Some(pid),
            } => write!(f, "{name} from pid {pid}"),
            Trigger::Signal {
                name,
                sender_pid: None,
            } => write!(f, "{name}"),
            Trigger::Other(what) => write!(f, "{what}"),
        }
    }
}

/// What an operator wants, whatever the channel it came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    Reload(Trigger),
    /// Graceful: drain every generation within its deadline, then exit 0. Fast: kill workers now.
    Stop {
        graceful: bool,
        trigger: Trigger,
    },
    /// SIGUSR1: never fatal; forwarded to workers only if configured.
    ReopenLogs(Trigger),
}

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
    /// The worker's main process is now `pid` (`MAINPID=`: a server that forks).
    MainPid {
        worker: WorkerId,
        pid: u32,
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
}

/// The phase of a generation, as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Preparing,
    Starting,
    Serving,
    /// Replaced by a generation on probation: paused, ready to serve again.
    Standby,
    Draining,
    /// Its reload failed; its workers are being killed.
    Failed,
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

/// What the state machine knows at one instant, for `baton status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub uptime: Duration,
    pub stopping: bool,
    /// The reload running now: its id, generation, the requests it covers, how long it runs.
    pub reload: Option<(ReloadId, Generation, Vec<RequestId>, Duration)>,
    /// Requests queued behind it.
    pub queued: Vec<RequestId>,
    /// A reload whose new generation is on probation, and the time left.
    pub probation: Option<(ReloadId, Generation, Duration)>,
    pub generations: Vec<GenerationSnapshot>,
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
}

/// One worker in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    pub id: WorkerId,
    /// Index of its program in the configuration, and its slot within the program.
    pub program: usize,
    pub slot: usize,
    pub pid: Option<u32>,
    /// `spawning`, `starting`, `ready`, `draining` or `killed`.
    pub state: &'static str,
    pub age: Duration,
    pub ready_after: Option<Duration>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub connections: Option<u64>,
    pub status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum GenState {
    Preparing,
    Starting,
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
struct Gen {
    spec: Option<GenerationSpec>,
    state: GenState,
    /// The processes of every program, in order.
    slots: Vec<Slot>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Slot {
    program: usize,
    /// Index within its program (what `BATON_SLOT` tells the worker).
    index: usize,
    worker: Option<WorkerId>,
    /// Crashes in a row (for the backoff).
    crashes: u32,
    /// Replacements so far.
    restarts: u32,
    last_exit: Option<String>,
    #[serde(with = "crate::codec::mono_opt")]
    restart_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum WorkerState {
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
struct Worker {
    generation: Generation,
    /// Its slot in the generation (slots of all programs, in order).
    slot: usize,
    program: usize,
    /// The main process: the one spawned, or the one announced with `MAINPID=`.
    pid: Option<u32>,
    /// The pid it was spawned as, which leads its process group.
    pgid: Option<u32>,
    state: WorkerState,
    #[serde(with = "crate::codec::mono")]
    spawned: Instant,
    ready_after: Option<Duration>,
    connections: Option<u64>,
    /// The last status line it reported (`STATUS=`, or a status packet).
    status: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Reload {
    id: ReloadId,
    generation: Generation,
    covers: Vec<RequestId>,
    triggers: Vec<Trigger>,
    #[serde(with = "crate::codec::mono")]
    started: Instant,
    /// The first generation at startup: its failure ends the master.
    initial: bool,
}

/// A reload whose new generation serves on probation while the old one stands by.
#[derive(Debug, Serialize, Deserialize)]
struct Canary {
    reload: Reload,
    old: Vec<Generation>,
    new: Generation,
    #[serde(with = "crate::codec::mono")]
    until: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Stop {
    Graceful,
    Fast,
}

/// Counters since the master started, for `baton metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Failed reloads that were rollbacks of a generation on probation.
    pub reloads_rolled_back: u64,
    /// Durations of finished reloads (request to verdict).
    pub reload_durations: Vec<Duration>,
    /// Crashed workers replaced.
    pub restarts: u64,
    /// Workers killed at their drain deadline, and to respect `max_draining`.
    pub killed_at_deadline: u64,
    pub killed_by_cap: u64,
    /// How long finished drains took.
    pub drain_durations: Vec<Duration>,
}

/// How many reload verdicts are kept.
const HISTORY: usize = 100;

/// All state of the master's supervision.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Supervisor {
    generations: BTreeMap<Generation, Gen>,
    workers: BTreeMap<WorkerId, Worker>,
    /// Every pid that belongs to a worker: its spawned pid and its announced main pid.
    pids: BTreeMap<u32, WorkerId>,
    reload: Option<Reload>,
    canary: Option<Canary>,
    pending: Vec<(RequestId, Trigger)>,
    stop: Option<Stop>,
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
            Event::ProbeFailed { worker, reason } => self.on_probe_failed(now, worker, reason),
            Event::Exited { pid, status } => self.on_exited(now, pid, status),
            Event::Tick => self.on_tick(now),
        }
        std::mem::take(&mut self.actions)
    }

    /// The earliest time at which [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { deadline } => Some(deadline),
            WorkerState::Killed => None,
            _ => self.drain_deadline(w),
        });
        let restarts = self
            .generations
            .values()
            .flat_map(|g| g.slots.iter().filter_map(|s| s.restart_at));
        workers
            .chain(restarts)
            .chain(self.canary.as_ref().map(|c| c.until))
            .min()
    }

    /// Generations with their phase and number of live workers, oldest first.
    pub fn generations(&self) -> Vec<(Generation, Phase, usize)> {
        self.generations
            .iter()
            .map(|(&g, entry)| {
                let phase = match entry.state {
                    GenState::Preparing => Phase::Preparing,
                    GenState::Starting => Phase::Starting,
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
                                WorkerState::Spawning => "spawning",
                                WorkerState::Starting { .. } => "starting",
                                WorkerState::Ready => "ready",
                                WorkerState::Draining => "draining",
                                WorkerState::Killed => "killed",
                            },
                            age: now.saturating_duration_since(w.spawned),
                            ready_after: w.ready_after,
                            restarts: slot.map_or(0, |s| s.restarts),
                            last_exit: slot.and_then(|s| s.last_exit.clone()),
                            connections: w.connections,
                            status: w.status.clone(),
                        }
                    })
                    .collect();
                workers.sort_by_key(|w| (w.program, w.slot, w.id));
                let (phase, draining_for, time_left) = match entry.state {
                    GenState::Preparing => (Phase::Preparing, None, None),
                    GenState::Starting => (Phase::Starting, None, None),
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
                }
            })
            .collect();
        Snapshot {
            uptime: self
                .started
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s)),
            stopping: self.stop.is_some(),
            reload: self.reload.as_ref().filter(|r| !r.initial).map(|r| {
                (
                    r.id,
                    r.generation,
                    r.covers.clone(),
                    now.saturating_duration_since(r.started),
                )
            }),
            queued: self.pending.iter().map(|(r, _)| *r).collect(),
            probation: self
                .canary
                .as_ref()
                .map(|c| (c.reload.id, c.new, c.until.saturating_duration_since(now))),
            generations,
        }
    }

    /// Counters since the start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The serving generation's upgrade signal (`supervisor.upgrade_signal`), if any.
    pub fn upgrade_signal(&self) -> Option<SignalNumber> {
        self.serving_spec().and_then(|s| s.upgrade_signal)
    }

    /// How long a new program may take to check the state, from the serving generation's
    /// configuration.
    pub fn upgrade_timeout(&self) -> Duration {
        self.serving_spec()
            .map_or(crate::DEFAULT_UPGRADE_TIMEOUT, |s| s.upgrade_timeout)
    }

    /// The last reloads' verdicts, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &ReloadRecord> {
        self.history.iter()
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
        }));
    }

    /// The id of the last reload request handled: a caller that just sent one learns its id.
    pub fn last_request(&self) -> Option<RequestId> {
        (self.next_request > 0).then_some(RequestId(self.next_request))
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
            },
        );
        self.reload = Some(Reload {
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
            Err(reason) => self.fail_reload(now, reason),
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
                if let Some(entry) = self.generations.get_mut(&o) {
                    entry.state = GenState::Standby;
                }
                for id in self.worker_ids(o) {
                    self.actions.push(Action::Send {
                        worker: id,
                        message: MasterMessage::Pause,
                    });
                }
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
            self.record(&reload, now, Ok(()));
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
        self.record(&c.reload, now, Ok(()));
        for old in c.old {
            self.begin_drain(now, old);
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// The generation on probation failed: it is killed and the standing-by one serves again.
    fn roll_back(&mut self, now: Instant, reason: String) {
        let Some(c) = self.canary.take() else { return };
        let g = c.new;
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = GenState::Failed;
            for slot in &mut entry.slots {
                slot.restart_at = None;
            }
        }
        self.kill_workers_of(g);
        for &o in &c.old {
            if let Some(entry) = self.generations.get_mut(&o) {
                entry.state = GenState::Serving;
            }
            for id in self.worker_ids(o) {
                self.actions.push(Action::Send {
                    worker: id,
                    message: MasterMessage::Resume,
                });
            }
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
        );
        self.finish_if_empty(now, g);
        self.next_pending(now);
    }

    /// The running reload failed: its generation is killed, the serving one is not touched.
    fn fail_reload(&mut self, now: Instant, reason: String) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        let g = reload.generation;
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = GenState::Failed;
            for slot in &mut entry.slots {
                slot.restart_at = None;
            }
        }
        self.kill_workers_of(g);
        if reload.initial && self.stop.is_some() {
            info!(
                generation = g.0,
                "generation {g} stopped before it served: {reason}"
            );
        } else if reload.initial {
            error!(event = "start_failed", generation = g.0, reason = %reason,
                "generation {g} failed to start: {reason}");
            self.exit_code = 1;
            self.stop = Some(Stop::Fast);
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
            self.record(&reload, now, Err(reason));
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

    fn record(&mut self, reload: &Reload, now: Instant, verdict: Result<(), String>) {
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
        self.counters.reload_durations.push(duration);
        self.actions.push(Action::Verdict(Verdict {
            requests: reload.covers.clone(),
            reload: Some(reload.id),
            generation: Some(reload.generation),
            result: verdict.clone(),
            duration,
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
                self.after_worker_loss(now, g, slot, Duration::ZERO, reason);
            }
        }
    }

    fn on_message(&mut self, now: Instant, id: WorkerId, message: WorkerMessage) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let g = w.generation;
        match message {
            WorkerMessage::Ready => {
                if let WorkerState::Starting { .. } = w.state {
                    w.state = WorkerState::Ready;
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
            self.roll_back(now, reason);
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
            debug!(pid, "reaped pid {pid} ({status}), not a worker");
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
                pid, "worker {id}'s launcher pid {pid} exited ({status})"
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
        let g = w.generation;
        if let Some(s) = self.slot_mut(g, w.slot) {
            if s.worker == Some(id) {
                s.worker = None;
            }
            s.last_exit = Some(status.to_string());
        }
        let ran = now.saturating_duration_since(w.spawned);
        match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Draining { .. }) => {
                info!(event = "worker_exited", worker = id.0, generation = g.0, pid,
                    status = %status, "worker {id} of generation {g} (pid {pid}) exited: {status}");
                self.finish_if_empty(now, g);
            }
            Some(GenState::Failed) | None => {
                debug!(
                    worker = id.0,
                    pid, "worker {id} of failed generation {g} is gone ({status})"
                );
                self.finish_if_empty(now, g);
            }
            _ => {
                let before = if w.state == WorkerState::Ready {
                    ""
                } else {
                    " before it was ready"
                };
                let reason = format!(
                    "worker {id} of generation {g} (pid {pid}) exited with {status}{before}"
                );
                self.after_worker_loss(now, g, w.slot, ran, reason);
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
    ) {
        match self.generations.get(&g).map(|entry| &entry.state) {
            Some(GenState::Starting) | Some(GenState::Preparing) => self.fail_reload(now, reason),
            Some(GenState::Serving) if self.canary.as_ref().is_some_and(|c| c.new == g) => {
                self.roll_back(now, reason);
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
                let delay = backoff(&program, s.crashes);
                s.restart_at = Some(now + delay);
                let crashes = s.crashes;
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
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let g = w.generation;
            let pid = w.pid.unwrap_or(0);
            let timeout = self.program(id).map_or(Duration::ZERO, |p| p.ready_timeout);
            let reason = format!(
                "worker {id} of generation {g} (pid {pid}) was not ready after {} ms",
                timeout.as_millis()
            );
            match self.generations.get(&g).map(|entry| &entry.state) {
                Some(GenState::Starting) => self.fail_reload(now, reason),
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
            self.kill_draining(id, "its drain deadline passed");
        }
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

    // ---- drain and stop ---------------------------------------------------------------------

    fn begin_drain(&mut self, now: Instant, g: Generation) {
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
            event = "generation_draining",
            generation = g.0,
            workers,
            deadline_ms = longest.as_millis() as u64,
            "generation {g} is draining: {workers} workers, killed in {} ms if still running",
            longest.as_millis()
        );
        for id in self.worker_ids(g) {
            self.drain_worker(id);
        }
        self.finish_if_empty(now, g);
    }

    fn drain_worker(&mut self, id: WorkerId) {
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
        let deadline_ms = program.drain_timeout.as_millis() as u64;
        self.actions.push(Action::Send {
            worker: id,
            message: MasterMessage::Drain { deadline_ms },
        });
        if let Some(signal) = program.drain_signal {
            self.actions.push(Action::Signal { pid, signal });
        }
    }

    /// The drain message of every draining worker, again, with the time it has left. A master
    /// that upgraded itself sends them once more, in case one was still queued for its channel
    /// when the old program was replaced (a worker takes a second drain request as a no-op).
    pub fn drain_messages(&self, now: Instant) -> Vec<Action> {
        self.workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Draining)
            .map(|(&worker, w)| {
                let left = self
                    .drain_deadline(w)
                    .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
                Action::Send {
                    worker,
                    message: MasterMessage::Drain {
                        deadline_ms: left.as_millis() as u64,
                    },
                }
            })
            .collect()
    }

    /// When a draining worker is killed: its generation's drain start plus its program's timeout.
    fn drain_deadline(&self, w: &Worker) -> Option<Instant> {
        let entry = self.generations.get(&w.generation)?;
        let GenState::Draining { since, .. } = entry.state else {
            return None;
        };
        let program = entry.spec.as_ref()?.programs.get(w.program)?;
        Some(since + program.drain_timeout)
    }

    /// More generations drain than allowed: the oldest go first.
    /// At most `max_draining` generations besides the serving one: draining ones, and the one a
    /// running reload is starting. The oldest draining generations are killed to make room.
    fn enforce_drain_cap(&mut self) {
        let max = self.serving_spec().map_or(usize::MAX, |s| s.max_draining);
        let starting = self
            .generations
            .values()
            .filter(|e| matches!(e.state, GenState::Preparing | GenState::Starting))
            .count();
        let draining: Vec<Generation> = self
            .generations
            .iter()
            .filter(|(_, entry)| matches!(entry.state, GenState::Draining { .. }))
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

    /// Kills a worker of a draining generation, saying why and with what it still had.
    fn kill_draining(&mut self, id: WorkerId, why: &str) {
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
                event = "worker_killed",
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

    fn on_stop(&mut self, now: Instant, graceful: bool, trigger: Trigger) {
        let wanted = if graceful { Stop::Graceful } else { Stop::Fast };
        match (self.stop, wanted) {
            (Some(Stop::Fast), _) | (Some(Stop::Graceful), Stop::Graceful) => {
                info!("{trigger}: already stopping");
                return;
            }
            _ => {}
        }
        self.stop = Some(wanted);
        info!(event = "stopping", graceful, trigger = %trigger,
            "{trigger}: {} stop", if graceful { "graceful" } else { "fast" });
        for (request, _) in std::mem::take(&mut self.pending) {
            self.reject(request);
        }
        self.fail_reload(now, format!("stop requested ({trigger})"));
        if let Some(c) = self.canary.take() {
            // A stop ends the probation: everything drains, and the reload has no verdict of
            // success it could still earn.
            self.record(
                &c.reload,
                now,
                Err(format!("stop requested during the probation ({trigger})")),
            );
        }
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

    fn on_reopen_logs(&mut self, trigger: Trigger) {
        let forward = self.serving_spec().is_some_and(|s| s.forward_usr1);
        if !forward {
            info!(
                event = "reopen_logs",
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
            event = "reopen_logs",
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
    fn finish_if_empty(&mut self, now: Instant, g: Generation) {
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
                    .push(now.saturating_duration_since(since));
                let took = now.saturating_duration_since(since).as_millis() as u64;
                info!(
                    event = "generation_exited",
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

    fn check_exit(&mut self) {
        if self.stop.is_some() && !self.exited && self.workers.is_empty() {
            for g in std::mem::take(&mut self.generations).into_keys() {
                self.actions.push(Action::Release { generation: g });
            }
            self.exited = true;
            info!(
                event = "exiting",
                code = self.exit_code,
                "all workers are gone: exiting"
            );
            self.actions.push(Action::Exit {
                code: self.exit_code,
            });
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

    fn kill_workers_of(&mut self, g: Generation) {
        for id in self.worker_ids(g) {
            self.kill(id);
        }
    }

    fn worker_ids(&self, g: Generation) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.generation == g)
            .map(|(id, _)| *id)
            .collect()
    }

    fn live_workers(&self, g: Generation) -> usize {
        self.workers.values().filter(|w| w.generation == g).count()
    }

    /// The settings of the newest serving generation: the master-wide ones apply from there.
    fn serving_spec(&self) -> Option<&GenerationSpec> {
        self.generations
            .values()
            .rev()
            .find(|entry| matches!(entry.state, GenState::Serving))
            .and_then(|entry| entry.spec.as_ref())
    }

    /// The program settings of a worker.
    fn program(&self, id: WorkerId) -> Option<&ProgramSpec> {
        let w = self.workers.get(&id)?;
        self.generations
            .get(&w.generation)?
            .spec
            .as_ref()?
            .programs
            .get(w.program)
    }

    fn slot_program(&self, g: Generation, slot: usize) -> Option<&ProgramSpec> {
        let entry = self.generations.get(&g)?;
        let program = entry.slots.get(slot)?.program;
        entry.spec.as_ref()?.programs.get(program)
    }

    fn slot_mut(&mut self, g: Generation, slot: usize) -> Option<&mut Slot> {
        self.generations
            .get_mut(&g)
            .and_then(|entry| entry.slots.get_mut(slot))
    }
}

/// Delay before the restart after `crashes` crashes in a row: doubling from `restart_backoff`,
/// capped at `restart_backoff_max`.
fn backoff(program: &ProgramSpec, crashes: u32) -> Duration {
    let factor = 1u32
        .checked_shl(crashes.saturating_sub(1))
        .unwrap_or(u32::MAX);
    program
        .restart_backoff
        .saturating_mul(factor)
        .min(program.restart_backoff_max)
}

fn join(ids: &[RequestId]) -> String {
    ids.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;
