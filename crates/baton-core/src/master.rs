//! The master's event loop: gathers events, feeds the [`Supervisor`], carries out its actions.
//!
//! One task on a single-threaded runtime selects over its sources: operator input (intents and
//! "a child exited" from the binary's signal adapter), news from workers (one small task per
//! worker reads its channel or notify socket, or runs its readiness probe), control requests,
//! metrics scrapes, an upgrade's preflight, and the deadlines (the state machine's next one, an
//! upgrade's, the watchdog, the status line while something drains). Nothing polls: with no
//! event and no deadline the loop sleeps in `epoll_wait`.
//!
//! This file holds the master's state, its setup ([`Master::new`], [`Master::run`]) and the
//! carrying out of actions (`Master::apply`); each job has a room of its own:
//!
//! - `main_loop`: the loop (`next_wake` returns what woke it, `on_wake` acts on it) and `feed`,
//!   the one door into the state machine;
//! - `config_watch`: `supervisor.watch: [config]`, the configuration file watched (inotify);
//! - `generations`: a generation's resources (configuration re-read, listeners, the metrics
//!   endpoint moved) and their release;
//! - `spawn`: a worker's process (environment, user, limits, descriptors, both protocols);
//! - `capture`: a worker's output pipes and the tasks reading them;
//! - `containment`: workers' cgroups (made, killed, removed);
//! - `link`: a baton-protocol worker's channel and the `SCM_RIGHTS` handoff;
//! - `worker_notify`: a systemd-style worker's `NOTIFY_SOCKET`;
//! - `main_pid`: a worker's announced main process (`MAINPID=`), proven its own or refused;
//! - `processes`: the processes the master may signal, each held by a pidfd;
//! - `probe`: readiness probes;
//! - `liveness`: liveness checks of ready workers (probes, watchdog);
//! - `memory`: the periodic memory check of `recycle:`;
//! - `queues`: the listeners' accept queues, reload receipts, `queue_watch`;
//! - `requests`: control requests and the verdicts clients wait for (`Verdicts`);
//! - `report`: the views (status, metrics, history, the systemd status line);
//! - `health`: the metrics endpoint's pages, `/healthz` and `/livez` among them;
//! - `service_manager`: what the master tells systemd;
//! - `upgrade`: `baton upgrade`, the master replacing its own program (`Upgrades`);
//! - `resume`: the new program's side of an upgrade;
//! - `stall`: deadlines judged only after the news pending at wake-up;
//! - `guard`, `health`, `metrics`, `steering`, `readiness`: the guard process and the registry,
//!   the metrics endpoint's pages, the Prometheus text, QUIC steering, the readiness gate.
//!
//! Architecture invariant: the master never accepts on a listener and never reads or writes
//! client data. It hands listeners over and then only exchanges small control messages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::control::{self, ControlRequest};
use crate::listeners::{BindError, ListenerTable, Prepared};
use crate::supervisor::{Action, Event, Generation, Intent, Supervisor, Trigger, WorkerId};
use crate::{cgroups, metrics_http, orphans, output};

mod capture;
mod config_watch;
mod connection_handoff;
mod containment;
mod generations;
mod guard;
mod health;
mod link;
mod liveness;
mod main_loop;
mod main_pid;
mod memory;
mod metrics;
mod probe;
mod processes;
mod queues;
mod readiness;
mod report;
mod requests;
mod resume;
mod service_manager;
mod spawn;
mod stall;
mod steering;
mod upgrade;
mod worker_notify;
pub use main_pid::Refusal;
pub use worker_notify::{Notice, notices};

pub use crate::upgrade::STATE_FD_ENV;
use generations::Resources;
use link::Link;
use readiness::News;
pub use resume::{Inherited, ResumeError};
pub use service_manager::Notification;
use service_manager::Told;
pub use upgrade::SignalGate;

/// How the master is embedded: what the binary knows about its environment.
#[derive(Default)]
pub struct Options {
    /// Called with every [`Notification`]; `None`: no service manager listens.
    pub notify: Option<Box<dyn FnMut(Notification)>>,
    /// The service manager's watchdog interval (`WATCHDOG_USEC`).
    pub watchdog: Option<Duration>,
    /// Listening sockets inherited by name (`LISTEN_FDS`/`LISTEN_FDNAMES`): a listener of the
    /// same name uses them instead of binding.
    pub inherited: Vec<(String, OwnedFd)>,
    /// Holds signal delivery around a self-upgrade (see [`SignalGate`]); `None`: signals are
    /// not the binary's concern (tests feeding inputs directly).
    pub signals: Option<Box<dyn SignalGate>>,
    /// The arguments this program was started with: `baton upgrade` execs the new program with
    /// them.
    pub argv: Vec<OsString>,
    /// The program now running (`None`: unknown; an upgrade by signal then execs
    /// `/proc/self/exe`).
    pub binary: Option<PathBuf>,
    /// The guard: a program and its first arguments (`baton guard --log-format json`), to which
    /// the master adds `--master PID --started TICKS --registry PATH`. It ends the workers of a
    /// master that died without stopping them. `None`: no guard (tests of the core).
    pub guard: Option<(PathBuf, Vec<OsString>)>,
    /// The log file and pid file the binary uses (shown among the start-only settings).
    pub files: config::OwnFiles,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("notify", &self.notify.is_some())
            .field("watchdog", &self.watchdog)
            .field("inherited", &self.inherited.len())
            .field("signals", &self.signals.is_some())
            .field("argv", &self.argv)
            .field("binary", &self.binary)
            .field("guard", &self.guard)
            .field("files", &self.files)
            .finish()
    }
}

/// Input from outside the core: what the binary's signal adapter (or a test) sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Intent(Intent),
    /// SIGCHLD arrived: reap every exited child.
    ChildExited,
    /// SIGURG or SIGWINCH arrived: an upgrade if `supervisor.upgrade_signal` names it.
    UpgradeSignal {
        signal: baton_sys::process::SignalNumber,
        trigger: Trigger,
    },
}
/// The master: listeners, workers and the state machine.
#[derive(Debug)]
pub struct Master {
    config_path: PathBuf,
    runtime_dir: PathBuf,
    /// The first generation's configuration and sockets, bound before the loop starts so that a
    /// busy port fails the start with a clear error.
    initial: Option<(Config, Prepared)>,
    table: ListenerTable,
    resources: HashMap<Generation, Resources>,
    links: HashMap<WorkerId, Link>,
    /// Every process the master may signal, held by a pidfd.
    processes: processes::Processes,
    supervisor: Supervisor,
    events_tx: mpsc::UnboundedSender<News>,
    events_rx: mpsc::UnboundedReceiver<News>,
    control: Option<(
        std::os::unix::net::UnixListener,
        config::ControlConfig,
        control::SocketFile,
    )>,
    /// Reload verdicts: clients waiting for one, and the recent ones.
    verdicts: requests::Verdicts,
    started: (Instant, std::time::SystemTime),
    options: Options,
    /// What was last told to the service manager.
    told: Told,
    /// How this master was started, to exec itself again on `baton upgrade`.
    argv: Vec<OsString>,
    binary: PathBuf,
    /// The control socket's descriptor (a duplicate) and settings, for a self-upgrade.
    control_fd: Option<(OwnedFd, config::ControlConfig)>,
    /// The settings this master read at its start and keeps until it stops
    /// ([`config::start_only_settings`]).
    start_settings: BTreeMap<String, String>,
    /// Links at a control socket path a reload named, to the socket this master listens on,
    /// so that `baton ... -c FILE` finds it; removed when the master stops or the path changes.
    control_aliases: Vec<control::SocketFile>,
    /// This master's workers as recorded for its guard and its successor ([`orphans`]).
    registry: guard::Registration,
    /// `baton upgrade`: the one under way, where its preflight reports, the ones done.
    upgrades: upgrade::Upgrades,
    handoffs: connection_handoff::Handoffs,
    /// Set when this master took over from its predecessor: what is left to do when it runs.
    resumed: Option<resume::Resumed>,
    /// The metrics endpoint (`supervisor.metrics_listen`).
    endpoint: generations::MetricsEndpoint,
    /// The workers' captured output: tails, followers, counters.
    output: output::Hub,
    /// `recycle:`'s memory checks; the accept queues' watch and reload receipts.
    memory: memory::MemoryWatch,
    queues: queues::QueueWatch,
    /// What `baton status` read from the kernel, kept for its next call.
    census: std::sync::Arc<std::sync::Mutex<report::StatusCensus>>,
    /// Where workers' cgroups are made, or why they are not ([`crate::cgroups`]).
    containment: Result<cgroups::Containment, cgroups::Unavailable>,
    /// The cgroups open to make workers in, and those of gone generations still to remove.
    cgroups: containment::OpenCgroups,
    /// The configuration file's watch (`supervisor.watch: [config]`), if it runs.
    config_watch: Option<tokio::task::AbortHandle>,
}

/// Why the master could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("control socket {path}: {source}")]
    Control {
        path: String,
        source: std::io::Error,
    },
    /// `supervisor.metrics_listen` could not be bound (the message names the address).
    #[error("{0}")]
    Metrics(std::io::Error),
}

impl Master {
    /// Binds the configured listeners, the control socket and the metrics endpoint (as std
    /// sockets: no runtime is needed yet; the binary builds its runtime after this). Nothing is
    /// spawned until [`Master::run`].
    pub fn new(config: Config, mut options: Options) -> Result<Master, StartError> {
        // The control socket first: bound, it proves no master runs with this configuration,
        // so workers its registry still names were left behind by a predecessor.
        let control_config = config.supervisor.control.clone();
        let listener = control::bind(&control_config).map_err(|source| StartError::Control {
            path: control_config.socket.display().to_string(),
            source,
        })?;
        let socket_file = control::SocketFile(control_config.socket.clone());
        if let Some(warning) = control::directory_warning(&control_config.socket) {
            warn!(
                event = baton_proto::event::CONTROL_DIRECTORY_SHARED,
                "{warning}"
            );
        }
        let registry = orphans::Registry::beside(&control_config.socket);
        guard::end_predecessors_workers(&registry);
        let containment = containment::open(config.supervisor.cgroups, &control_config.socket);
        if let Ok(containment) = &containment {
            // What escaped a predecessor's workers' process groups.
            containment.end_leftovers();
        }
        let mut table = ListenerTable::default();
        let inherited = std::mem::take(&mut options.inherited);
        let unused = table.adopt(&config.listeners, inherited)?;
        let prepared = table.prepare(&config.listeners)?;
        for name in unused {
            warn!("inherited socket `{name}` matches no configured listener: closed");
            if let Some(notify) = options.notify.as_mut() {
                notify(Notification::RemoveFd(name));
            }
        }
        let metrics_pending = config
            .supervisor
            .metrics_listen
            .map(metrics_http::bind)
            .transpose()
            .map_err(StartError::Metrics)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let argv = options.argv.clone();
        let start_settings = config::start_only_settings(
            &config.supervisor.control,
            &config.supervisor.runtime_dir,
            &options.files,
        );
        let binary = options
            .binary
            .clone()
            .unwrap_or_else(|| "/proc/self/exe".into());
        Ok(Master {
            config_path: config.source.clone(),
            runtime_dir: config.supervisor.runtime_dir.clone(),
            initial: Some((config, prepared)),
            table,
            resources: HashMap::new(),
            links: HashMap::new(),
            processes: processes::Processes::default(),
            supervisor: Supervisor::new(),
            events_tx,
            events_rx,
            control: Some((listener, control_config, socket_file)),
            verdicts: requests::Verdicts::default(),
            started: (Instant::now(), std::time::SystemTime::now()),
            options,
            told: Told::default(),
            argv,
            binary,
            control_fd: None,
            start_settings,
            control_aliases: Vec::new(),
            registry: guard::Registration::new(orphans::RegistryWriter::new(registry)),
            upgrades: upgrade::Upgrades::new(Vec::new()),
            handoffs: Default::default(),
            resumed: None,
            endpoint: generations::MetricsEndpoint::new(metrics_pending),
            output: output::Hub::default(),
            memory: memory::MemoryWatch::default(),
            queues: queues::QueueWatch::default(),
            census: Default::default(),
            containment,
            cgroups: containment::OpenCgroups::default(),
            config_watch: None,
        })
    }

    /// Where each listener of the first generation listens: `(name, address)`.
    pub fn listening(&self) -> Vec<(String, String)> {
        self.initial
            .iter()
            .flat_map(|(_, p)| &p.listeners)
            .map(|l| (l.config.name.clone(), l.socket.local().to_string()))
            .collect()
    }

    /// Runs until every worker is gone after a stop; returns the process exit code.
    ///
    /// Must run inside a tokio runtime (the binary uses a current-thread one). If `inputs`
    /// closes, the master stops gracefully.
    pub async fn run(mut self, inputs: mpsc::UnboundedReceiver<Input>) -> i32 {
        let code = self.serve(inputs).await;
        // Every worker is gone (or the master exits at once after a failed start): the
        // registry names nobody the guard should end.
        self.registry.writer.remove();
        self.close_containment();
        code
    }

    async fn serve(&mut self, inputs: mpsc::UnboundedReceiver<Input>) -> i32 {
        if self.resumed.is_none() {
            info!(event = baton_proto::event::STARTED, pid = std::process::id(), config = %self.config_path.display(),
                "baton {} master started (pid {})", crate::version(), std::process::id());
        }
        if self.resumed.is_none() {
            cgroups::announce(&self.containment);
        }
        for (name, address) in self.listening() {
            info!(event = baton_proto::event::LISTENING, listener = %name, address = %address,
                "listener {name} listening on {address}");
        }
        let (control_tx, control_rx) = mpsc::channel::<ControlRequest>(64);
        let mut _socket_file = None;
        let mut control_task: Option<tokio::task::JoinHandle<()>> = None;
        if let Some((listener, config, file)) = self.control.take() {
            if self.resumed.is_none() {
                info!(event = baton_proto::event::CONTROL_SOCKET, path = %config.socket.display(),
                    "control socket at {}", config.socket.display());
            }
            self.control_fd = listener
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(|fd| (fd, config.clone()));
            _socket_file = Some(file);
            control_task = Some(tokio::spawn(control::serve(
                listener,
                config,
                control_tx.clone(),
                self.output.clone(),
            )));
        }
        if let Some(endpoint) = self.endpoint.pending.take() {
            let announce = self.resumed.is_none();
            self.serve_metrics(Some(endpoint), announce);
        }
        if self.resumed.is_none() {
            // A predecessor's guard watches its own pid; after `baton upgrade` it watches this
            // one already.
            self.start_guard();
        }
        if let Some((_, prepared)) = &self.initial {
            let listeners = prepared.listeners.clone();
            self.store_fds(&listeners);
        }
        let watchdog = self.options.watchdog.map(|w| tokio::time::interval(w / 2));
        let mut queue = VecDeque::new();
        let actions = if self.resumed.is_some() {
            self.on_resumed(&mut queue)
        } else {
            self.supervisor.start(Instant::now())
        };
        if let Some(code) = self.apply(actions, &mut queue) {
            return code;
        }
        let lp = main_loop::Loop {
            inputs,
            inputs_open: true,
            control_tx,
            control_rx,
            control_task,
            watchdog,
            queue,
        };
        self.run_loop(lp).await
    }

    /// One input from outside (a signal, an intent); `false` once the inputs closed.
    pub(super) fn on_input(&mut self, input: Option<Input>, queue: &mut VecDeque<Event>) -> bool {
        match input {
            Some(Input::Intent(intent)) => queue.push_back(Event::Intent(intent)),
            Some(Input::ChildExited) => {
                self.reap(queue);
                self.remove_cgroups();
            }
            Some(Input::UpgradeSignal { signal, trigger }) => {
                self.on_upgrade_signal(signal, trigger, false);
            }
            None => {
                let trigger = crate::supervisor::Trigger::Other("input closed".into());
                queue.push_back(Event::Intent(Intent::Stop {
                    graceful: true,
                    trigger,
                }));
                return false;
            }
        }
        true
    }

    /// Carries out actions; events they produce at once go to `queue`. Returns the exit code
    /// when the state machine asks to exit. Drain requests and kills go first: their deadlines
    /// run already, and nothing else (a verdict's answers, a configuration read) delays them.
    fn apply(&mut self, mut actions: Vec<Action>, queue: &mut VecDeque<Event>) -> Option<i32> {
        actions.sort_by_key(|a| match a {
            Action::Drain { .. } | Action::Kill { .. } => 0,
            Action::Exit { .. } => 2,
            _ => 1,
        });
        for action in actions {
            match action {
                Action::Prepare { generation } => {
                    if self.told.ready {
                        self.notify(Notification::Reloading);
                    }
                    if self.supervisor.reloading() {
                        self.watch_reload();
                    }
                    let result = self.prepare(generation).map_err(|e| e.to_string());
                    queue.push_back(Event::Prepared { generation, result });
                }
                Action::Spawn {
                    worker,
                    generation,
                    program,
                    slot,
                } => {
                    let result = self
                        .spawn(worker, generation, program, slot)
                        .map_err(|e| e.to_string());
                    queue.push_back(Event::Spawned { worker, result });
                }
                Action::Send { worker, message } => {
                    if let Some(commands) =
                        self.links.get(&worker).and_then(|l| l.commands.as_ref())
                    {
                        let _ = commands.send(message.into());
                    }
                }
                Action::Drain {
                    worker,
                    pid,
                    deadline_ms,
                    signal,
                } => self.drain(worker, pid, deadline_ms, signal),
                Action::Signal { pid, signal } => self.processes.signal(pid, signal),
                Action::Kill { pid, pgid } => self.kill(pid, pgid),
                Action::KillGroup { pgid } => self.processes.kill_group(pgid),
                Action::Forget { worker } => {
                    self.processes.forget(worker);
                    self.forget(worker);
                }
                Action::Release { generation } => {
                    let programs = self
                        .resources
                        .get(&generation)
                        .map_or(0, |r| r.programs.len());
                    self.release(generation);
                    self.release_cgroups(generation, programs);
                }
                Action::Exit { code } => return Some(code),
                Action::Verdict(verdict) => self.carry_out_verdict(verdict),
            }
        }
        None
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
