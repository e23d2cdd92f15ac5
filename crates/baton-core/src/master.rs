//! The master's event loop: gathers events, feeds the [`Supervisor`], carries out its actions.
//!
//! One task on a single-threaded runtime selects over three sources: operator input (intents and
//! "a child exited" from the binary's signal adapter), news from workers (one small task per
//! worker reads its channel or notify socket, or runs its readiness probe), and the state
//! machine's next deadline. Nothing polls: with no event and no deadline the loop sleeps in
//! `epoll_wait`.
//!
//! Architecture invariant: the master never accepts on a listener and never reads or writes
//! client data. It hands listeners over and then only exchanges small control messages.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_proto::{
    CHANNEL_FD_ENV, GENERATION_ENV, Hello, ListenerInfo, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE,
    MasterMessage, PROTOCOL_VERSION, WORKER_ID_ENV, WorkerMessage,
};
use baton_sys::process::{self, SignalNumber};
use baton_sys::{channel, notify};
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use baton_proto::control as proto;

mod upgrade;
pub use upgrade::SignalGate;

use crate::config::{self, Config, NotifyAccess, Probe, Protocol, Readiness, WorkerConfig};
use crate::control::{self, ControlRequest};
use crate::listeners::{BindError, GenerationListener, ListenerTable, Prepared};
use crate::metrics_http;
use crate::supervisor::{
    Action, Event, Generation, GenerationSpec, Intent, Phase, RequestId, Supervisor, Trigger,
    Verdict, WorkerId,
};

/// What the master tells its service manager (systemd's `sd_notify`). The core does not talk to
/// systemd itself: the binary passes a function that does (see [`Options::notify`]).
#[derive(Debug)]
pub enum Notification {
    /// The first generation serves; or a reload ended (either way: not reloading any more).
    Ready,
    /// A reload started.
    Reloading,
    /// A one-line summary, for `systemctl status`.
    Status(String),
    /// The master is stopping.
    Stopping,
    /// The event loop is alive (sent at half of the watchdog interval).
    Watchdog,
    /// A stop needs this much more time than systemd would otherwise give it.
    ExtendTimeout(Duration),
    /// Keep these listening sockets for the next start (`FDSTORE=1`, `FDNAME=`).
    StoreFds(Vec<(String, OwnedFd)>),
    /// Forget the stored socket with this name (`FDSTOREREMOVE=1`).
    RemoveFd(String),
}

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
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("notify", &self.notify.is_some())
            .field("watchdog", &self.watchdog)
            .field("inherited", &self.inherited.len())
            .field("signals", &self.signals.is_some())
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

/// The number at which a baton-protocol worker finds its channel, and a systemd-style worker its
/// first listener (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

/// Invalid packets a worker may send before the master stops listening to it.
const MAX_INVALID_PACKETS: u32 = 100;

/// Notifications read per worker per second at most; a flood waits in the socket (and then
/// blocks its sender) instead of costing the master CPU.
const NOTIFY_BUDGET: u32 = 64;

/// Largest notification read; longer ones are discarded (systemd's own limit is similar).
const NOTIFY_MAX: usize = 4096;

/// Environment variables of the master that describe *its* relation to systemd and must not
/// leak into a worker, where they would be wrong.
const MASTER_ONLY_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    crate::upgrade::STATE_FD_ENV,
];

/// What a generation holds while it lives.
#[derive(Debug)]
struct Resources {
    listeners: Vec<GenerationListener>,
    programs: Vec<Arc<WorkerConfig>>,
    /// The probation of this generation (probes go on that long after readiness).
    canary_window: Option<Duration>,
}

/// The master's side of one worker: its channel's command queue and the tasks serving it.
#[derive(Debug, Default)]
struct Link {
    commands: Option<mpsc::UnboundedSender<MasterMessage>>,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Duplicates kept for a self-upgrade: the baton channel, or the notify socket with its
    /// path and access rule.
    channel: Option<OwnedFd>,
    notify: Option<(OwnedFd, PathBuf, NotifyAccess)>,
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
    supervisor: Supervisor,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    control: Option<(
        std::os::unix::net::UnixListener,
        config::ControlConfig,
        control::SocketFile,
    )>,
    /// Clients waiting for the verdict of a reload request.
    waiters: HashMap<RequestId, Vec<tokio::sync::oneshot::Sender<proto::Response>>>,
    /// Recent verdicts by request, for `baton reload --no-wait` followed by a wait.
    verdicts: std::collections::BTreeMap<RequestId, proto::ReloadVerdict>,
    started: (Instant, std::time::SystemTime),
    options: Options,
    /// What was last told to the service manager.
    told: Told,
    /// How this master was started, to exec itself again on `baton upgrade`.
    argv: Vec<OsString>,
    binary: PathBuf,
    /// The control socket's descriptor (a duplicate) and settings, for a self-upgrade.
    control_fd: Option<(OwnedFd, config::ControlConfig)>,
    /// The upgrade under way, if any, and where its preflight reports.
    upgrade: Option<upgrade::Pending>,
    upgrade_tx: mpsc::UnboundedSender<upgrade::Preflight>,
    upgrade_rx: mpsc::UnboundedReceiver<upgrade::Preflight>,
    upgrades: Vec<proto::UpgradeInfo>,
    next_upgrade: u64,
    /// Set when this master took over from its predecessor: what is left to do when it runs.
    resumed: Option<upgrade::Resumed>,
    /// The metrics endpoint serving (its address, its task), one bound but not yet serving,
    /// and where its clients ask for the text.
    metrics: Option<(std::net::SocketAddr, tokio::task::AbortHandle)>,
    metrics_pending: Option<metrics_http::Endpoint>,
    metrics_tx: mpsc::Sender<metrics_http::Ask>,
    metrics_rx: mpsc::Receiver<metrics_http::Ask>,
}

/// Metrics requests waiting for the event loop (their clients wait too, bounded in number).
const MAX_ASKS: usize = metrics_http::MAX_CLIENTS;

#[derive(Debug, Default)]
struct Told {
    ready: bool,
    stopping: bool,
    status: String,
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

/// Verdicts kept for `Request::Verdict`.
const KEPT_VERDICTS: usize = 1000;

impl Master {
    /// Binds the configured listeners and the control socket. Nothing is spawned until
    /// [`Master::run`]. Must be called inside a tokio runtime (the control socket registers
    /// with it).
    pub fn new(config: Config, mut options: Options) -> Result<Master, StartError> {
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
        let control_config = config.supervisor.control.clone();
        let listener = control::bind(&control_config).map_err(|source| StartError::Control {
            path: control_config.socket.display().to_string(),
            source,
        })?;
        let socket_file = control::SocketFile(control_config.socket.clone());
        let metrics_pending = config
            .supervisor
            .metrics_listen
            .map(metrics_http::bind)
            .transpose()
            .map_err(StartError::Metrics)?;
        let (metrics_tx, metrics_rx) = mpsc::channel(MAX_ASKS);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (upgrade_tx, upgrade_rx) = mpsc::unbounded_channel();
        Ok(Master {
            config_path: config.source.clone(),
            runtime_dir: config.supervisor.runtime_dir.clone(),
            initial: Some((config, prepared)),
            table,
            resources: HashMap::new(),
            links: HashMap::new(),
            supervisor: Supervisor::new(),
            events_tx,
            events_rx,
            control: Some((listener, control_config, socket_file)),
            waiters: HashMap::new(),
            verdicts: std::collections::BTreeMap::new(),
            started: (Instant::now(), std::time::SystemTime::now()),
            options,
            told: Told::default(),
            argv: std::env::args_os().collect(),
            binary: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            control_fd: None,
            upgrade: None,
            upgrade_tx,
            upgrade_rx,
            upgrades: Vec::new(),
            next_upgrade: 1,
            resumed: None,
            metrics: None,
            metrics_pending,
            metrics_tx,
            metrics_rx,
        })
    }

    /// Serves `endpoint` in place of the current one (if any, it closes); `announce`: log it
    /// (a master resumed after an upgrade serves the same endpoint again, quietly).
    fn serve_metrics(&mut self, endpoint: Option<metrics_http::Endpoint>, announce: bool) {
        if let Some((old, task)) = self.metrics.take() {
            task.abort();
            if endpoint.as_ref().map(|e| e.address) != Some(old) {
                info!(event = "metrics_endpoint_closed", address = %old,
                    "metrics endpoint http://{old}/metrics closed");
            }
        }
        if let Some(endpoint) = endpoint {
            let address = endpoint.address;
            if announce {
                info!(event = "metrics_endpoint", address = %address,
                    "metrics at http://{address}/metrics");
            }
            let task = tokio::spawn(metrics_http::serve(endpoint, self.metrics_tx.clone()));
            self.metrics = Some((address, task.abort_handle()));
        }
    }

    fn notify(&mut self, notification: Notification) {
        if let Some(notify) = self.options.notify.as_mut() {
            notify(notification);
        }
    }

    /// Hands `listeners` to the service manager's fd store.
    fn store_fds(&mut self, listeners: &[GenerationListener]) {
        if self.options.notify.is_none() || listeners.is_empty() {
            return;
        }
        let fds = listeners
            .iter()
            .filter_map(|l| Some((l.config.name.clone(), l.socket.duplicate().ok()?)))
            .collect();
        self.notify(Notification::StoreFds(fds));
    }

    /// Tells the service manager what changed since last time: readiness, stop, status line.
    fn report(&mut self) {
        if self.options.notify.is_none() {
            return;
        }
        let snap = self.supervisor.snapshot(Instant::now());
        if !self.told.ready && snap.generations.iter().any(|g| g.phase == Phase::Serving) {
            self.told.ready = true;
            self.notify(Notification::Ready);
        }
        if snap.stopping && !self.told.stopping {
            self.told.stopping = true;
            self.notify(Notification::Stopping);
        }
        let status = status_line(&snap);
        if status != self.told.status {
            if snap.stopping {
                let left = snap
                    .generations
                    .iter()
                    .filter_map(|g| g.time_left)
                    .max()
                    .unwrap_or_default();
                self.notify(Notification::ExtendTimeout(left + Duration::from_secs(5)));
            }
            self.told.status = status.clone();
            self.notify(Notification::Status(status));
        }
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
    pub async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) -> i32 {
        if self.resumed.is_none() {
            info!(event = "started", pid = std::process::id(), config = %self.config_path.display(),
                "baton {} master started (pid {})", crate::upgrade::version(), std::process::id());
        }
        for (name, address) in self.listening() {
            info!(event = "listening", listener = %name, address = %address,
                "listener {name} listening on {address}");
        }
        let (control_tx, mut control_rx) = mpsc::channel::<ControlRequest>(64);
        let mut _socket_file = None;
        if let Some((listener, config, file)) = self.control.take() {
            if self.resumed.is_none() {
                info!(event = "control_socket", path = %config.socket.display(),
                    "control socket at {}", config.socket.display());
            }
            self.control_fd = listener
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(|fd| (fd, config.clone()));
            _socket_file = Some(file);
            tokio::spawn(control::serve(listener, config, control_tx));
        }
        if let Some(endpoint) = self.metrics_pending.take() {
            let announce = self.resumed.is_none();
            self.serve_metrics(Some(endpoint), announce);
        }
        if let Some((_, prepared)) = &self.initial {
            let listeners = prepared.listeners.clone();
            self.store_fds(&listeners);
        }
        let mut watchdog = self.options.watchdog.map(|w| tokio::time::interval(w / 2));
        let mut queue = VecDeque::new();
        let actions = if self.resumed.is_some() {
            self.on_resumed(&mut queue)
        } else {
            self.supervisor.start(Instant::now())
        };
        if let Some(code) = self.apply(actions, &mut queue) {
            return code;
        }
        let mut inputs_open = true;
        loop {
            while let Some(event) = queue.pop_front() {
                let actions = self.supervisor.handle(Instant::now(), event);
                if let Some(code) = self.apply(actions, &mut queue) {
                    return code;
                }
            }
            self.report();
            let deadline = self.supervisor.next_deadline();
            // While something drains, refresh the status line (time left) once a second.
            let refresh = (self.options.notify.is_some()
                && self
                    .supervisor
                    .snapshot(Instant::now())
                    .generations
                    .iter()
                    .any(|g| g.phase == Phase::Draining))
            .then(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                    self.notify(Notification::Watchdog);
                }
                () = sleep_until(refresh), if refresh.is_some() => {}
                input = inputs.recv(), if inputs_open => match input {
                    Some(Input::Intent(intent)) => queue.push_back(Event::Intent(intent)),
                    Some(Input::ChildExited) => reap(&mut queue),
                    Some(Input::UpgradeSignal { signal, trigger }) => {
                        self.on_upgrade_signal(signal, trigger, false);
                    }
                    None => {
                        inputs_open = false;
                        let trigger = crate::supervisor::Trigger::Other("input closed".into());
                        queue.push_back(Event::Intent(Intent::Stop { graceful: true, trigger }));
                    }
                },
                Some(event) = self.events_rx.recv() => queue.push_back(event),
                Some(ask) = self.metrics_rx.recv() => {
                    let _ = ask.send(self.metrics());
                }
                Some(request) = control_rx.recv() => {
                    if let Some(code) = self.on_control(request, &mut queue) {
                        return code;
                    }
                }
                Some(preflight) = self.upgrade_rx.recv() => {
                    if let Some(code) = self.on_preflight(preflight, &mut inputs, &mut queue) {
                        return code;
                    }
                }
                () = sleep_until(self.upgrade.as_ref().map(|u| u.deadline)), if self.upgrade.is_some() => {
                    self.preflight_expired();
                }
                () = sleep_until(deadline), if deadline.is_some() => queue.push_back(Event::Tick),
            }
        }
    }

    /// Carries out actions; events they produce at once go to `queue`. Returns the exit code
    /// when the state machine asks to exit.
    fn apply(&mut self, actions: Vec<Action>, queue: &mut VecDeque<Event>) -> Option<i32> {
        for action in actions {
            match action {
                Action::Prepare { generation } => {
                    if self.told.ready {
                        self.notify(Notification::Reloading);
                    }
                    let result = self.prepare(generation);
                    queue.push_back(Event::Prepared { generation, result });
                }
                Action::Spawn {
                    worker,
                    generation,
                    program,
                    slot,
                } => {
                    let result = self.spawn(worker, generation, program, slot);
                    queue.push_back(Event::Spawned { worker, result });
                }
                Action::Send { worker, message } => {
                    if let Some(commands) =
                        self.links.get(&worker).and_then(|l| l.commands.as_ref())
                    {
                        let _ = commands.send(message);
                    }
                }
                Action::Signal { pid, signal } => {
                    if let Err(err) = process::signal_process(pid, signal) {
                        debug!(pid, "cannot send {} to pid {pid}: {err}", signal.as_str());
                    }
                }
                Action::Kill { pid, pgid } => {
                    // The worker leads its own process group: take its children with it. Signal
                    // the main pid too, in case it left the group.
                    let _ = process::signal_group(pgid, SignalNumber::SIGKILL);
                    let _ = process::signal_process(pid, SignalNumber::SIGKILL);
                }
                Action::KillGroup { pgid } => {
                    let _ = process::signal_group(pgid, SignalNumber::SIGKILL);
                }
                Action::Forget { worker } => {
                    if let Some(link) = self.links.remove(&worker) {
                        for task in link.tasks {
                            task.abort();
                        }
                    }
                }
                Action::Release { generation } => self.release(generation),
                Action::Exit { code } => return Some(code),
                Action::Verdict(verdict) => {
                    if self.told.ready && self.supervisor.snapshot(Instant::now()).reload.is_none()
                    {
                        self.notify(Notification::Ready);
                    }
                    self.on_verdict(verdict);
                }
            }
        }
        None
    }

    /// A request from the control socket, already authorized.
    fn on_control(&mut self, req: ControlRequest, queue: &mut VecDeque<Event>) -> Option<i32> {
        let ControlRequest {
            request,
            peer,
            reply,
            client,
        } = req;
        match request {
            proto::Request::Status => {
                let _ = reply.send(proto::Response::Status(self.status()));
            }
            proto::Request::Metrics => {
                let _ = reply.send(proto::Response::Metrics {
                    text: self.metrics(),
                });
            }
            proto::Request::History => {
                let _ = reply.send(proto::Response::History {
                    reloads: self.history(),
                });
            }
            proto::Request::Reload { wait } => {
                let trigger = Trigger::Other(format!("baton reload from {peer}"));
                let actions = self
                    .supervisor
                    .handle(Instant::now(), Event::Intent(Intent::Reload(trigger)));
                let request = self.supervisor.last_request().unwrap_or(RequestId(0));
                if wait {
                    self.waiters.entry(request).or_default().push(reply);
                } else {
                    let _ = reply.send(proto::Response::Accepted { request: request.0 });
                }
                return self.apply(actions, queue);
            }
            proto::Request::Verdict { request } => {
                let id = RequestId(request);
                if let Some(verdict) = self.verdicts.get(&id) {
                    let _ = reply.send(proto::Response::Verdict(verdict.clone()));
                } else if self
                    .supervisor
                    .last_request()
                    .is_some_and(|last| id <= last)
                    && id.0 > 0
                {
                    self.waiters.entry(id).or_default().push(reply);
                } else {
                    let _ = reply.send(proto::Response::Error {
                        kind: proto::ErrorKind::Unavailable,
                        message: format!("no reload request #{request} is known"),
                    });
                }
            }
            proto::Request::Upgrade { binary } => {
                self.begin_upgrade(binary, reply, client, &peer, false);
            }
            proto::Request::Stop { fast } => {
                let trigger = Trigger::Other(format!("baton stop from {peer}"));
                let _ = reply.send(proto::Response::Stopping { fast });
                let actions = self.supervisor.handle(
                    Instant::now(),
                    Event::Intent(Intent::Stop {
                        graceful: !fast,
                        trigger,
                    }),
                );
                return self.apply(actions, queue);
            }
        }
        None
    }

    fn on_verdict(&mut self, verdict: Verdict) {
        for &request in &verdict.requests {
            let answer = proto::ReloadVerdict {
                request: request.0,
                reload: verdict.reload.map(|r| r.0),
                generation: verdict.generation.map(|g| g.0),
                ok: verdict.result.is_ok(),
                reason: verdict.result.clone().err(),
                duration_ms: Some(verdict.duration.as_millis() as u64),
            };
            for waiter in self.waiters.remove(&request).unwrap_or_default() {
                let _ = waiter.send(proto::Response::Verdict(answer.clone()));
            }
            self.verdicts.insert(request, answer);
            while self.verdicts.len() > KEPT_VERDICTS {
                self.verdicts.pop_first();
            }
        }
    }

    fn unix_ms_ago(&self, ago: Duration) -> u64 {
        let now = self.started.1 + self.started.0.elapsed();
        now.checked_sub(ago)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn status(&self) -> proto::StatusSnapshot {
        let now = Instant::now();
        let snap = self.supervisor.snapshot(now);
        // Connections of workers that do not report them, counted from the kernel.
        let ports: std::collections::HashSet<u16> = self
            .resources
            .values()
            .flat_map(|r| &r.listeners)
            .filter_map(|l| match &l.config.address {
                baton_proto::ListenerAddress::Tcp { .. } => {
                    l.socket.local().rsplit(':').next()?.parse().ok()
                }
                baton_proto::ListenerAddress::Unix { .. } => None,
            })
            .collect();
        let unreported: Vec<u32> = snap
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter(|w| w.connections.is_none())
            .filter_map(|w| w.pid)
            .collect();
        let counted = crate::procnet::established_connections(&unreported, &ports);
        let generations = snap
            .generations
            .iter()
            .rev()
            .map(|g| proto::GenerationStatus {
                generation: g.generation.0,
                state: phase_name(g.phase).into(),
                draining_ms: g.draining_for.map(|d| d.as_millis() as u64),
                time_left_ms: g.time_left.map(|d| d.as_millis() as u64),
                deadline_unix_ms: g
                    .time_left
                    .map(|d| self.unix_ms_ago(Duration::ZERO) + d.as_millis() as u64),
                workers: g
                    .workers
                    .iter()
                    .map(|w| {
                        let kernel = w.pid.and_then(|p| counted.get(&p).copied());
                        proto::WorkerStatus {
                            worker: w.id.0,
                            program: self
                                .resources
                                .get(&g.generation)
                                .and_then(|r| r.programs.get(w.program))
                                .map_or_else(|| w.program.to_string(), |p| p.name.clone()),
                            slot: w.slot,
                            pid: w.pid,
                            state: w.state.into(),
                            started_unix_ms: self.unix_ms_ago(w.age),
                            ready_after_ms: w.ready_after.map(|d| d.as_millis() as u64),
                            restarts: w.restarts,
                            last_exit: w.last_exit.clone(),
                            connections: w.connections.or(kernel),
                            connections_source: match (w.connections, kernel) {
                                (Some(_), _) => Some("reported".into()),
                                (None, Some(_)) => Some("kernel".into()),
                                _ => None,
                            },
                            status: w.status.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        proto::StatusSnapshot {
            master: proto::MasterStatus {
                pid: std::process::id(),
                version: crate::upgrade::version().into(),
                uptime_ms: snap.uptime.as_millis() as u64,
                config: self.config_path.display().to_string(),
                state: if snap.stopping {
                    "stopping"
                } else if snap.reload.is_some() {
                    "reloading"
                } else if snap.probation.is_some() {
                    "probation"
                } else {
                    "idle"
                }
                .into(),
                reload: snap
                    .reload
                    .map(|(id, g, covers, running)| proto::RunningReload {
                        reload: id.0,
                        generation: g.0,
                        covers: covers.iter().map(|r| r.0).collect(),
                        running_ms: running.as_millis() as u64,
                    }),
                queued_requests: snap.queued.iter().map(|r| r.0).collect(),
                upgrades: self.upgrades.clone(),
            },
            generations,
        }
    }

    /// The Prometheus text exposition of the master's counters and gauges.
    fn metrics(&self) -> String {
        let c = self.supervisor.counters();
        let snap = self.supervisor.snapshot(Instant::now());
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for (labels, value) in samples {
                out += &format!("{name}{labels} {value}\n");
            }
        };
        metric(
            "baton_reloads_total",
            "counter",
            "Reloads that ended, by verdict.",
            vec![
                ("{verdict=\"ok\"}".into(), c.reloads_ok.to_string()),
                (
                    "{verdict=\"failed\"}".into(),
                    (c.reloads_failed - c.reloads_rolled_back).to_string(),
                ),
                (
                    "{verdict=\"rolled_back\"}".into(),
                    c.reloads_rolled_back.to_string(),
                ),
            ],
        );
        metric(
            "baton_reload_duration_seconds",
            "histogram",
            "From reload request to verdict.",
            histogram(
                &c.reload_durations,
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
        );
        metric(
            "baton_drain_duration_seconds",
            "histogram",
            "How long retired generations took to drain.",
            histogram(
                &c.drain_durations,
                &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
        );
        metric(
            "baton_worker_restarts_total",
            "counter",
            "Crashed workers replaced.",
            vec![(String::new(), c.restarts.to_string())],
        );
        metric(
            "baton_workers_killed_total",
            "counter",
            "Workers of draining generations killed, by reason.",
            vec![
                (
                    "{reason=\"deadline\"}".into(),
                    c.killed_at_deadline.to_string(),
                ),
                ("{reason=\"cap\"}".into(), c.killed_by_cap.to_string()),
            ],
        );
        let phases = [
            "preparing",
            "starting",
            "serving",
            "standby",
            "draining",
            "failed",
        ];
        metric(
            "baton_generations",
            "gauge",
            "Generations by state.",
            phases
                .iter()
                .map(|p| {
                    let n = snap
                        .generations
                        .iter()
                        .filter(|g| phase_name(g.phase) == *p)
                        .count();
                    (format!("{{state=\"{p}\"}}"), n.to_string())
                })
                .collect(),
        );
        let states = ["spawning", "starting", "ready", "draining", "killed"];
        metric(
            "baton_workers",
            "gauge",
            "Worker processes by state.",
            states
                .iter()
                .map(|s| {
                    let n = snap
                        .generations
                        .iter()
                        .flat_map(|g| &g.workers)
                        .filter(|w| w.state == *s)
                        .count();
                    (format!("{{state=\"{s}\"}}"), n.to_string())
                })
                .collect(),
        );
        metric(
            "baton_build_info",
            "gauge",
            "The running master's version (it changes with `baton upgrade`).",
            vec![(
                format!("{{version=\"{}\"}}", crate::upgrade::version()),
                "1".into(),
            )],
        );
        metric(
            "baton_uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            vec![(String::new(), format!("{:.3}", snap.uptime.as_secs_f64()))],
        );
        out
    }

    fn history(&self) -> Vec<proto::ReloadRecord> {
        let now = Instant::now();
        self.supervisor
            .history()
            .map(|r| proto::ReloadRecord {
                reload: r.id.0,
                generation: r.generation.0,
                requests: r
                    .covers
                    .iter()
                    .zip(&r.triggers)
                    .map(|(id, t)| format!("{id} {t}"))
                    .collect(),
                started_unix_ms: self.unix_ms_ago(now.saturating_duration_since(r.started)),
                duration_ms: r.duration.as_millis() as u64,
                ok: r.verdict.is_ok(),
                reason: r.verdict.clone().err(),
            })
            .collect()
    }

    fn prepare(&mut self, generation: Generation) -> Result<GenerationSpec, String> {
        let (config, prepared) = match self.initial.take() {
            Some(initial) => initial,
            None => {
                let config = config::load(&self.config_path).map_err(|e| e.to_string())?;
                // A moved metrics endpoint is bound first, and replaces the old one only if the
                // listeners can be prepared too.
                let wanted = config.supervisor.metrics_listen;
                // `Some(new endpoint, or none)` when the setting changed.
                let moved = if wanted == self.metrics.as_ref().map(|m| m.0) {
                    None
                } else {
                    let bound = wanted.map(metrics_http::bind).transpose();
                    Some(bound.map_err(|e| format!("supervisor.metrics_listen: {e}"))?)
                };
                let prepared = self
                    .table
                    .prepare(&config.listeners)
                    .map_err(|e| e.to_string())?;
                if let Some(endpoint) = moved {
                    self.serve_metrics(endpoint, true);
                }
                let bound: Vec<GenerationListener> = prepared
                    .listeners
                    .iter()
                    .filter(|l| prepared.bound.contains(&l.config.name))
                    .cloned()
                    .collect();
                self.store_fds(&bound);
                for l in &prepared.listeners {
                    if prepared.bound.contains(&l.config.name) {
                        info!(event = "listening", listener = %l.config.name,
                            address = %l.socket.local(), generation = generation.0,
                            "listener {} listening on {} (new in generation {generation})",
                            l.config.name, l.socket.local());
                    }
                }
                (config, prepared)
            }
        };
        let spec = GenerationSpec::from_config(&config);
        self.resources.insert(
            generation,
            Resources {
                listeners: prepared.listeners,
                programs: config.programs.into_iter().map(Arc::new).collect(),
                canary_window: config.supervisor.canary_window,
            },
        );
        Ok(spec)
    }

    fn spawn(
        &mut self,
        worker: WorkerId,
        generation: Generation,
        program: usize,
        slot: usize,
    ) -> Result<u32, String> {
        let resources = self
            .resources
            .get(&generation)
            .ok_or_else(|| format!("generation {generation} has no resources"))?;
        let config = resources
            .programs
            .get(program)
            .ok_or_else(|| format!("generation {generation} has no program {program}"))?
            .clone();
        let resources_canary = resources.canary_window;
        let listeners: Vec<GenerationListener> = config
            .listeners
            .iter()
            .filter_map(|&i| resources.listeners.get(i).cloned())
            .collect();
        let probe_address = match &config.ready {
            Readiness::Probe(probe) => Some(probe.address_for(worker.0, slot, generation.0)),
            _ => None,
        };

        // The worker's environment: the master's, minus what describes the master's relation to
        // systemd, plus the configured variables, plus baton's.
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !MASTER_ONLY_ENV.iter().any(|m| k == m))
            .filter(|(k, _)| !config.env.contains_key(&k.to_string_lossy().into_owned()))
            .collect();
        env.extend(config.env.iter().map(|(k, v)| (k.into(), v.into())));
        env.push((GENERATION_ENV.into(), generation.to_string().into()));
        env.push((WORKER_ID_ENV.into(), worker.to_string().into()));
        env.push(("BATON_SLOT".into(), slot.to_string().into()));
        env.push(("BATON_PROGRAM".into(), config.name.clone().into()));
        if let Some(address) = &probe_address {
            env.push(("BATON_PROBE_ADDRESS".into(), address.into()));
        }

        let mut cmd = Command::new(&config.command);
        cmd.args(&config.args).stdin(Stdio::null()).process_group(0);
        if let Some(cwd) = &config.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(uid) = config.uid {
            cmd.uid(uid);
        }
        if let Some(gid) = config.gid {
            cmd.gid(gid);
        }
        // If the master dies, its workers learn it at once (and drain): PR_SET_PDEATHSIG with
        // the drain signal. Set after the user change, which would clear it.
        process::setup_child(
            &mut cmd,
            process::ChildSetup {
                umask: config.umask,
                parent_death_signal: Some(config.drain_signal.unwrap_or(SignalNumber::SIGTERM)),
                max_open_files: config.rlimits.nofile,
                max_core_size: config.rlimits.core,
            },
        );
        let mut link = Link::default();
        let pid = match config.protocol {
            Protocol::Baton => {
                let (ours, theirs) = channel::pair().map_err(|e| format!("socketpair: {e}"))?;
                env.push((CHANNEL_FD_ENV.into(), FIRST_FD.to_string().into()));
                cmd.env_clear().envs(env);
                process::place_fds(&mut cmd, vec![(theirs, FIRST_FD)])
                    .map_err(|e| format!("placing the channel: {e}"))?;
                let pid = spawn_child(&mut cmd, &config)?;
                let (commands, commands_rx) = mpsc::unbounded_channel();
                link.channel = ours.try_clone().ok();
                match handoff_parts(worker, generation, &listeners).and_then(|(hello, fds)| {
                    let channel = channel::into_async(ours)?;
                    Ok((hello, fds, channel))
                }) {
                    Ok((hello, fds, channel)) => {
                        let events = self.events_tx.clone();
                        let task = tokio::spawn(link_task(
                            worker,
                            channel,
                            hello,
                            fds,
                            commands_rx,
                            events,
                        ));
                        link.tasks.push(task.abort_handle());
                        link.commands = Some(commands);
                    }
                    // The process runs but cannot get its listeners: it fails its ready timeout.
                    Err(e) => warn!(
                        worker = worker.0,
                        pid, "cannot hand listeners to worker {worker}: {e}"
                    ),
                }
                pid
            }
            Protocol::Systemd => {
                let socket = self.notify_socket(worker)?;
                let names: Vec<&str> = listeners.iter().map(|l| l.config.name.as_str()).collect();
                env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
                env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
                env.push(("NOTIFY_SOCKET".into(), socket.path().into()));
                let placements = listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| Ok((l.socket.duplicate()?, FIRST_FD + i as i32)))
                    .collect::<std::io::Result<Vec<_>>>()
                    .map_err(|e| format!("duplicating listeners: {e}"))?;
                process::place_fds(&mut cmd, placements)
                    .map_err(|e| format!("placing listeners: {e}"))?;
                let args: Vec<OsString> = config.args.iter().map(OsString::from).collect();
                process::exec_with_own_pid(&mut cmd, &config.command, &args, &env, "LISTEN_PID")
                    .map_err(|e| format!("preparing the exec: {e}"))?;
                let pid = spawn_child(&mut cmd, &config)?;
                link.notify = socket
                    .duplicate()
                    .ok()
                    .map(|fd| (fd, socket.path().to_owned(), config.notify_access));
                let events = self.events_tx.clone();
                let task = tokio::spawn(notify_task(
                    worker,
                    socket,
                    pid,
                    config.notify_access,
                    events,
                ));
                link.tasks.push(task.abort_handle());
                pid
            }
        };
        drop(cmd);
        let events = self.events_tx.clone();
        match (&config.ready, probe_address) {
            (Readiness::Delay(delay), _) => {
                let delay = *delay;
                let task = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = events.send(Event::Message {
                        worker,
                        message: WorkerMessage::Ready,
                    });
                });
                link.tasks.push(task.abort_handle());
            }
            (Readiness::Probe(probe), Some(address)) => {
                let task = tokio::spawn(probe_task(
                    worker,
                    probe.clone(),
                    address,
                    resources_canary,
                    events,
                ));
                link.tasks.push(task.abort_handle());
            }
            _ => {}
        }
        self.links.insert(worker, link);
        Ok(pid)
    }

    /// A notify socket for one systemd-style worker, in `<runtime_dir>/notify/`.
    fn notify_socket(&self, worker: WorkerId) -> Result<notify::NotifySocket, String> {
        let dir = self.runtime_dir.join("notify");
        let fail = |e: std::io::Error| {
            format!(
                "notify socket in {}: {e} (set supervisor.runtime_dir to a writable directory)",
                dir.display()
            )
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        notify::NotifySocket::bind(&dir.join(format!("{}.{worker}.sock", std::process::id())))
            .map_err(fail)
    }

    fn release(&mut self, generation: Generation) {
        let Some(resources) = self.resources.remove(&generation) else {
            return;
        };
        let mut closed = Vec::new();
        for l in resources.listeners {
            // This generation held the last reference: dropping it closes the socket. Log only
            // after the close, so that whoever reads the line finds the port closed.
            if Rc::strong_count(&l.socket) == 1 {
                closed.push((l.config.name.clone(), l.socket.local().to_string()));
            }
        }
        for (name, address) in closed {
            info!(event = "listener_closed", listener = %name, address = %address,
                "listener {name} ({address}) closed: no generation uses it any more");
            self.notify(Notification::RemoveFd(name));
        }
    }
}

/// The one-line summary for `systemctl status`: "gen 7 serving 4 workers; gen 6 draining 2
/// workers, 3 conns, 12 s left".
fn status_line(snap: &crate::supervisor::Snapshot) -> String {
    let mut parts: Vec<String> = snap
        .generations
        .iter()
        .rev()
        .map(|g| {
            let n = g.workers.len();
            match g.phase {
                Phase::Draining => {
                    let conns: u64 = g.workers.iter().filter_map(|w| w.connections).sum();
                    let left = g.time_left.map_or(0, |d| d.as_secs());
                    format!(
                        "gen {} draining {n} workers, {conns} conns, {left} s left",
                        g.generation
                    )
                }
                phase => format!("gen {} {} {n} workers", g.generation, phase_name(phase)),
            }
        })
        .collect();
    if snap.stopping {
        parts.insert(0, "stopping".into());
    } else if let Some((id, g, _, _)) = &snap.reload {
        parts.insert(0, format!("reload {id} starting gen {g}"));
    } else if let Some((id, g, left)) = &snap.probation {
        parts.insert(
            0,
            format!(
                "reload {id}: gen {g} on probation, {} s left",
                left.as_secs()
            ),
        );
    }
    parts.join("; ")
}

/// Prometheus histogram samples (cumulative buckets, sum, count) of `values` in seconds.
fn histogram(values: &[Duration], bounds: &[f64]) -> Vec<(String, String)> {
    let secs: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    let mut samples: Vec<(String, String)> = bounds
        .iter()
        .map(|b| {
            (
                format!("_bucket{{le=\"{b}\"}}"),
                secs.iter().filter(|v| **v <= *b).count().to_string(),
            )
        })
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), secs.len().to_string()));
    samples.push(("_sum".into(), format!("{:.6}", secs.iter().sum::<f64>())));
    samples.push(("_count".into(), secs.len().to_string()));
    samples
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Preparing => "preparing",
        Phase::Starting => "starting",
        Phase::Serving => "serving",
        Phase::Standby => "standby",
        Phase::Draining => "draining",
        Phase::Failed => "failed",
    }
}

fn spawn_child(cmd: &mut Command, config: &WorkerConfig) -> Result<u32, String> {
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot execute {}: {e}", config.command.display()))?;
    // Dropping a std Child neither waits nor kills: the master reaps by pid on SIGCHLD.
    Ok(child.id())
}

/// The manifest and duplicated descriptors of a baton-protocol handoff.
fn handoff_parts(
    worker: WorkerId,
    generation: Generation,
    listeners: &[GenerationListener],
) -> std::io::Result<(Hello, Vec<OwnedFd>)> {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        generation: generation.0,
        worker_id: worker.0,
        listeners: listeners
            .iter()
            .map(|l| ListenerInfo {
                name: l.config.name.clone(),
                address: l.config.address.clone(),
            })
            .collect(),
    };
    let fds = listeners
        .iter()
        .map(|l| l.socket.duplicate())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((hello, fds))
}

fn reap(queue: &mut VecDeque<Event>) {
    loop {
        match process::reap_one() {
            Ok(Some((pid, status))) => queue.push_back(Event::Exited { pid, status }),
            Ok(None) => break,
            Err(err) => {
                warn!("waitpid failed: {err}");
                break;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A systemd-style worker's `NOTIFY_SOCKET`: turns `READY=1`, `STATUS=`, `STOPPING=1` and
/// `MAINPID=` into events. Only the worker may notify: its pid or announced main pid, or with
/// `notify_access: all` any process of its process group. At most [`NOTIFY_BUDGET`] datagrams a
/// second are read.
async fn notify_task(
    worker: WorkerId,
    socket: notify::NotifySocket,
    spawned: u32,
    access: NotifyAccess,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; NOTIFY_MAX];
    let mut main = spawned;
    let mut window = tokio::time::Instant::now();
    let mut read = 0u32;
    let (mut warned_flood, mut warned_sender, mut warned_size) = (false, false, false);
    loop {
        if read >= NOTIFY_BUDGET {
            if !warned_flood {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "worker {worker} floods its notify socket: reading at most {NOTIFY_BUDGET} notifications a second"
                );
                warned_flood = true;
            }
            tokio::time::sleep_until(window + Duration::from_secs(1)).await;
        }
        if window.elapsed() >= Duration::from_secs(1) {
            (window, read) = (tokio::time::Instant::now(), 0);
        }
        let datagram = match notify::recv(&socket, &mut buf).await {
            Ok(d) => d,
            Err(err) => {
                warn!(worker = worker.0, "notify socket of worker {worker}: {err}");
                return;
            }
        };
        read += 1;
        let allowed = datagram.pid.is_some_and(|pid| {
            pid == main
                || pid == spawned
                || (access == NotifyAccess::All
                    && process::process_group(pid).is_ok_and(|g| g == spawned))
        });
        if !allowed {
            if !warned_sender {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "notification for worker {worker} from pid {:?} refused (not the worker; see notify_access)",
                    datagram.pid
                );
                warned_sender = true;
            }
            continue;
        }
        if datagram.truncated {
            if !warned_size {
                warn!(
                    event = "worker_protocol_error",
                    worker = worker.0,
                    "worker {worker} sent a notification over {NOTIFY_MAX} bytes: ignored"
                );
                warned_size = true;
            }
            continue;
        }
        let text = String::from_utf8_lossy(&buf[..datagram.len]);
        for line in text.lines() {
            let event = match line.split_once('=') {
                Some(("READY", "1")) => Event::Message {
                    worker,
                    message: WorkerMessage::Ready,
                },
                Some(("STOPPING", "1")) => Event::Message {
                    worker,
                    message: WorkerMessage::Draining,
                },
                Some(("STATUS", status)) => Event::Message {
                    worker,
                    message: WorkerMessage::Status {
                        connections: None,
                        text: Some(status.to_string()),
                    },
                },
                Some(("MAINPID", pid)) => match pid.parse::<u32>() {
                    Ok(pid) if pid > 1 => {
                        main = pid;
                        Event::MainPid { worker, pid }
                    }
                    _ => continue,
                },
                _ => continue,
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

/// Probes a starting worker until the probe succeeds (then reports it ready) or the task is
/// dropped (the worker left `Starting`). Each attempt is bounded by the probe's timeout, and
/// attempts are `interval` apart: a backend that answers garbage or half-closes costs one short
/// attempt per interval, never a spin.
///
/// With a canary window, probing goes on for that long after readiness: a failure then is
/// reported ([`Event::ProbeFailed`]), and rolls the reload back. After the window, it stops.
async fn probe_task(
    worker: WorkerId,
    probe: Probe,
    address: String,
    probation: Option<Duration>,
    events: mpsc::UnboundedSender<Event>,
) {
    let attempt = || async {
        tokio::time::timeout(
            probe.timeout,
            probe_once(&address, probe.http_path.as_deref()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} ms", probe.timeout.as_millis())))
    };
    let mut last_error = String::new();
    loop {
        match attempt().await {
            Ok(()) => {
                debug!(
                    worker = worker.0,
                    "readiness probe of worker {worker} at {address} succeeded"
                );
                let _ = events.send(Event::Message {
                    worker,
                    message: WorkerMessage::Ready,
                });
                break;
            }
            Err(err) => {
                if err != last_error {
                    debug!(
                        worker = worker.0,
                        "readiness probe of worker {worker} at {address}: {err}"
                    );
                    last_error = err;
                }
            }
        }
        tokio::time::sleep(probe.interval).await;
    }
    let Some(probation) = probation else { return };
    let until = tokio::time::Instant::now() + probation;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(probe.interval).await;
        if let Err(reason) = attempt().await {
            let _ = events.send(Event::ProbeFailed { worker, reason });
            return;
        }
    }
}

/// One probe attempt: connect (TCP `host:port`, or a Unix socket path), and for HTTP send a GET
/// and require a `2xx` status line.
async fn probe_once(address: &str, http_path: Option<&str>) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut stream: S,
        path: Option<&str>,
    ) -> Result<(), String> {
        let Some(path) = path else { return Ok(()) };
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: baton-probe\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        // Read until the status line is complete, at most 1 KiB: enough to judge.
        let mut head = Vec::with_capacity(128);
        let mut chunk = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break; // closed (or half-closed): judge what arrived
            }
            head.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or("");
        let mut words = line.split_whitespace();
        match (
            words.next(),
            words.next().and_then(|c| c.parse::<u16>().ok()),
        ) {
            (Some(v), Some(code)) if v.starts_with("HTTP/") && (200..300).contains(&code) => Ok(()),
            (Some(v), Some(code)) if v.starts_with("HTTP/") => Err(format!("HTTP status {code}")),
            _ => Err(format!(
                "not an HTTP response: {:?}",
                line.chars().take(40).collect::<String>()
            )),
        }
    }
    if address.contains('/') {
        let stream = tokio::net::UnixStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(stream, http_path).await
    } else {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        exchange(stream, http_path).await
    }
}

/// One worker's channel: hands over the listeners, then forwards the worker's packets as events
/// and the master's commands as packets, until either side closes.
async fn link_task(
    worker: WorkerId,
    channel: UnixDatagram,
    hello: Hello,
    fds: Vec<OwnedFd>,
    commands: mpsc::UnboundedReceiver<MasterMessage>,
    events: mpsc::UnboundedSender<Event>,
) {
    if let Err(err) = handoff(&channel, hello, &fds).await {
        warn!(
            worker = worker.0,
            "handing listeners to worker {worker} failed: {err}"
        );
        return;
    }
    drop(fds);
    link_loop(worker, channel, commands, events).await;
}

/// A worker's channel after its handoff: commands out, messages in, until either side closes.
async fn link_loop(
    worker: WorkerId,
    channel: UnixDatagram,
    mut commands: mpsc::UnboundedReceiver<MasterMessage>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let mut invalid = 0u32;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(message) => {
                    if let Err(err) = channel.send(&baton_proto::encode(&message)).await {
                        debug!(worker = worker.0, "cannot send to worker {worker}: {err}");
                    }
                }
                None => return,
            },
            received = channel::recv_with_fds(&channel, &mut buf, 1) => {
                let packet = match received {
                    // End of stream: the worker closed its end (or exited). Stop reading, or a
                    // closed socket would wake this loop forever.
                    Ok(r) if r.len == 0 => {
                        debug!(worker = worker.0, "worker {worker} closed its channel");
                        return;
                    }
                    Ok(r) if r.truncated || !r.fds.is_empty() || r.fds_truncated => Err(
                        "oversized packet or unexpected descriptors".to_string(),
                    ),
                    Ok(r) => baton_proto::decode::<WorkerMessage>(&buf[..r.len])
                        .map_err(|e| format!("{e:#}")),
                    // A SEQPACKET peer that exits with unread packets resets instead of closing.
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                        debug!(worker = worker.0, "worker {worker} closed its channel (reset)");
                        return;
                    }
                    Err(err) => {
                        warn!(worker = worker.0, "reading the channel of worker {worker}: {err}");
                        return;
                    }
                };
                match packet {
                    Ok(message) => {
                        if events.send(Event::Message { worker, message }).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        invalid += 1;
                        if invalid == 1 {
                            warn!(event = "worker_protocol_error", worker = worker.0,
                                "worker {worker} sent an invalid packet: {err}");
                        }
                        if invalid >= MAX_INVALID_PACKETS {
                            warn!(event = "worker_protocol_error", worker = worker.0,
                                "worker {worker} sent {invalid} invalid packets: no longer listening to it");
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Sends the manifest, then the descriptors in chunks of at most `SCM_MAX_FD`.
async fn handoff(channel: &UnixDatagram, hello: Hello, fds: &[OwnedFd]) -> std::io::Result<()> {
    let hello = baton_proto::encode(&MasterMessage::Hello(hello));
    channel::send_with_fds(channel, &hello, &[]).await?;
    for (i, chunk) in fds.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let header = MasterMessage::Fds {
            first: i * MAX_FDS_PER_MESSAGE,
            count: chunk.len(),
        };
        let borrowed: Vec<_> = chunk.iter().map(|fd| fd.as_fd()).collect();
        channel::send_with_fds(channel, &baton_proto::encode(&header), &borrowed).await?;
    }
    Ok(())
}
