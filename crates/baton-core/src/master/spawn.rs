//! Starting a worker process: its environment (the master's, minus what describes the master's
//! own relation to systemd), user, group, umask and limits, its descriptors placed between clone
//! and exec, its cgroup, and the tasks that then listen to it (its channel, its notify socket,
//! its probe). The process itself is made by [`baton_sys::spawn`], which copies nothing of the
//! master.

use std::ffi::{CString, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use baton_proto::{
    CHANNEL_FD_ENV, GENERATION_ENV, Hello, ListenerInfo, PROTOCOL_VERSION, QUIC_TAG_ENV,
    WORKER_ID_ENV, quic_tag,
};
use baton_sys::process::SignalNumber;
use baton_sys::spawn::{ChildSetup, Spawn, Started};
use baton_sys::{channel, notify};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::warn;

use super::Master;
use super::capture::{Who, output_pipes};
use super::link::{Link, link_task};
use super::probe::probe_task;
use super::readiness::{self, Condition, Gate, News};
use super::worker_notify::{Notifier, notify_task};
use crate::config::{LivenessCheck, Protocol, WorkerConfig};
use crate::faults::Point;
use crate::listeners::GenerationListener;
use crate::supervisor::{Generation, WorkerId};

/// The number at which a baton-protocol worker finds its channel, and a systemd-style worker its
/// first listener (`SD_LISTEN_FDS_START`).
pub(super) const FIRST_FD: i32 = 3;

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

/// Why a worker could not be started. Each message names what failed; the state machine logs it
/// with the worker and slot.
#[derive(Debug, thiserror::Error)]
pub(super) enum SpawnError {
    #[error("generation {0} has no resources")]
    NoResources(Generation),
    #[error("generation {generation} has no program {program}")]
    NoProgram {
        generation: Generation,
        program: usize,
    },
    #[error("cgroup: {0}")]
    Cgroup(std::io::Error),
    #[error("output pipes: {0}")]
    OutputPipes(std::io::Error),
    #[error("socketpair: {0}")]
    Channel(std::io::Error),
    #[error("/dev/null: {0}")]
    DevNull(std::io::Error),
    #[error(
        "notify socket in {}: {source} (set supervisor.runtime_dir to a writable directory)",
        dir.display()
    )]
    NotifySocket {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("duplicating listeners: {0}")]
    Duplicate(std::io::Error),
    #[error("cannot start {}: {source}", command.display())]
    Start {
        command: PathBuf,
        source: baton_sys::spawn::SpawnError,
    },
    /// A fault a test injected at [`Point::WorkerSpawn`].
    #[error("cannot start {}: {source}", command.display())]
    Fault {
        command: PathBuf,
        source: std::io::Error,
    },
}

/// The worker being started: what both protocols need to know of it, its environment so far,
/// the process being prepared and the cgroup to make it in.
struct Start<'a> {
    config: &'a WorkerConfig,
    worker: WorkerId,
    generation: Generation,
    listeners: Vec<GenerationListener>,
    env: Vec<(OsString, OsString)>,
    process: Spawn,
}

impl Master {
    /// Starts process `slot` of program `program` of `generation` as `worker`, and the tasks
    /// that listen to it. Returns its pid.
    pub(super) fn spawn(
        &mut self,
        worker: WorkerId,
        generation: Generation,
        program: usize,
        slot: usize,
    ) -> Result<u32, SpawnError> {
        let resources = self
            .resources
            .get(&generation)
            .ok_or(SpawnError::NoResources(generation))?;
        let config = resources
            .programs
            .get(program)
            .ok_or(SpawnError::NoProgram {
                generation,
                program,
            })?
            .clone();
        let canary_window = resources.canary_window;
        let listeners: Vec<GenerationListener> = config
            .listeners
            .iter()
            .filter_map(|&i| resources.listeners.get(i).cloned())
            .collect();
        let probe_address = config
            .ready
            .probe()
            .map(|probe| probe.address_for(worker.0, slot, generation.0));
        let liveness_address =
            liveness_probe(&config).map(|probe| probe.address_for(worker.0, slot, generation.0));
        let mut link = Link {
            ready: Gate::new(readiness::conditions(&config)),
            probe_files: super::probe::socket_files(
                probe_address
                    .iter()
                    .chain(&liveness_address)
                    .map(String::as_str),
            ),
            ..Link::default()
        };
        // Worker ids start again at 1 with each master: a socket left at this worker's own
        // probe address by a killed predecessor's worker would make the new one fail to bind it
        // (and never be ready). Issue 28's matrix found it (`kill_restart_gunicorn`). An address
        // all workers share is someone else's socket (a sidecar's): left alone.
        let own = [config.ready.probe(), liveness_probe(&config)]
            .into_iter()
            .flatten()
            .filter(|p| p.is_per_worker())
            .map(|p| p.address_for(worker.0, slot, generation.0))
            .collect::<Vec<_>>();
        super::probe::remove_socket_files(&super::probe::socket_files(
            own.iter().map(String::as_str),
        ));
        let quic = listeners.iter().any(|l| l.config.options.quic);
        let mut start = Start {
            config: &config,
            worker,
            generation,
            listeners,
            env: worker_env(
                &config,
                worker,
                generation,
                slot,
                probe_address.as_deref(),
                quic,
            ),
            process: process(&config)?,
        };
        let pipes = output_pipes(&config, &mut start.process).map_err(SpawnError::OutputPipes)?;
        let started = match config.protocol {
            Protocol::Baton => {
                let prepared = self.prepare_baton(start)?;
                let started = self.start_process(prepared.process, &config, generation, program)?;
                self.link_baton(prepared.link, started.pid, &mut link);
                started
            }
            Protocol::Systemd => {
                let prepared = self.prepare_systemd(start)?;
                let started = self.start_process(prepared.process, &config, generation, program)?;
                let cgroup = self.cgroup_dir(generation, program);
                self.link_systemd(prepared.link, started.pid, cgroup, &config, &mut link);
                started
            }
        };
        let watching = self.start_readiness(&config, worker, probe_address, canary_window);
        link.tasks.extend(watching);
        let pid = started.pid;
        link.pid = Some(pid);
        link.start_time = started.start_time;
        self.processes.hold_spawned(worker, started.into_process());
        let who = Who {
            program: &config.name,
            worker,
            generation,
            slot,
            pid,
        };
        link.output = self.start_capture(who, pipes);
        self.links.insert(worker, link);
        Ok(pid)
    }

    /// A baton-protocol worker: its channel at [`FIRST_FD`].
    fn prepare_baton(&self, start: Start<'_>) -> Result<Prepared<BatonLink>, SpawnError> {
        let Start {
            config,
            worker,
            generation,
            listeners,
            mut env,
            mut process,
        } = start;
        let (ours, theirs) = channel::pair().map_err(SpawnError::Channel)?;
        env.push((CHANNEL_FD_ENV.into(), FIRST_FD.to_string().into()));
        set_env(&mut process, &env, config)?;
        process.fd(theirs, FIRST_FD);
        Ok(Prepared {
            process,
            link: BatonLink {
                worker,
                generation,
                listeners,
                watchdog: watchdog(config),
                ours,
            },
        })
    }

    /// The task that hands a started baton-protocol worker its listeners (duplicated only now:
    /// fewer descriptors in the master while it starts a process), then relays its packets.
    fn link_baton(&self, prepared: BatonLink, pid: u32, link: &mut Link) {
        let BatonLink {
            worker,
            generation,
            listeners,
            watchdog,
            ours,
        } = prepared;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        link.channel = ours.try_clone().ok();
        match handoff_parts(worker, generation, &listeners, watchdog).and_then(|(hello, fds)| {
            let channel = channel::into_async(ours)?;
            Ok((hello, fds, channel))
        }) {
            Ok((hello, fds, channel)) => {
                let events = self.events_tx.clone();
                let reported = link.handoff.reported.clone();
                let task = tokio::spawn(link_task(
                    worker,
                    channel,
                    hello,
                    fds,
                    commands_rx,
                    events,
                    reported,
                ));
                link.tasks.push(task.abort_handle());
                link.commands = Some(commands);
            }
            // The process runs but cannot get its listeners: it will never be ready, and its
            // verdict says why now (not at its ready deadline).
            Err(e) => {
                warn!(
                    worker = worker.0,
                    pid, "cannot hand listeners to worker {worker}: {e}"
                );
                let cause = format!("handing it its listeners failed: {e}");
                let _ = self
                    .events_tx
                    .send(News::Event(crate::supervisor::Event::CannotBeReady {
                        worker,
                        cause,
                    }));
            }
        }
    }

    /// A systemd-style worker: its listeners from [`FIRST_FD`] on (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID` set to its own pid), and a notify socket of its own.
    fn prepare_systemd(&self, start: Start<'_>) -> Result<Prepared<NotifyLink>, SpawnError> {
        let Start {
            config,
            worker,
            listeners,
            mut env,
            mut process,
            ..
        } = start;
        let socket = self.notify_socket(worker)?;
        let names: Vec<&str> = listeners.iter().map(|l| l.config.name.as_str()).collect();
        env.push(("LISTEN_FDS".into(), listeners.len().to_string().into()));
        env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        env.push(("NOTIFY_SOCKET".into(), socket.path().into()));
        if let Some(window) = watchdog(config) {
            // No WATCHDOG_PID: only LISTEN_PID is the worker's own pid, and
            // sd_watchdog_enabled(3) accepts an unset WATCHDOG_PID.
            env.push((
                "WATCHDOG_USEC".into(),
                window.as_micros().to_string().into(),
            ));
        }
        set_env(&mut process, &env, config)?;
        process
            .env_own_pid("LISTEN_PID")
            .map_err(|source| start_error(config, source))?;
        for (i, listener) in listeners.iter().enumerate() {
            let fd = listener.socket.duplicate().map_err(SpawnError::Duplicate)?;
            process.fd(fd, FIRST_FD + i as i32);
        }
        Ok(Prepared {
            process,
            link: NotifyLink { worker, socket },
        })
    }

    /// The task that reads a started systemd-style worker's notify socket.
    fn link_systemd(
        &self,
        prepared: NotifyLink,
        pid: u32,
        cgroup: Option<std::path::PathBuf>,
        config: &WorkerConfig,
        link: &mut Link,
    ) {
        let NotifyLink { worker, socket } = prepared;
        link.notify = socket
            .duplicate()
            .ok()
            .map(|fd| (fd, socket.path().to_owned(), config.notify_access));
        let events = self.events_tx.clone();
        let notifier = Notifier {
            worker,
            spawned: pid,
            main: pid,
            access: config.notify_access,
            cgroup,
            awaits_ready: readiness::conditions(config).contains(&Condition::Notify),
        };
        let task = tokio::spawn(notify_task(socket, notifier, events));
        link.tasks.push(task.abort_handle());
    }

    /// Starts the prepared process in the cgroup of `program` of `generation` (if workers are
    /// contained); returns its pid once it runs the program. The master reaps it by pid.
    fn start_process(
        &mut self,
        process: Spawn,
        config: &WorkerConfig,
        generation: Generation,
        program: usize,
    ) -> Result<Started, SpawnError> {
        let cgroup = self
            .cgroup_for(generation, program)
            .map_err(SpawnError::Cgroup)?;
        Point::WorkerSpawn
            .check()
            .map_err(|source| SpawnError::Fault {
                command: config.command.clone(),
                source,
            })?;
        process
            .spawn(cgroup)
            .map_err(|source| start_error(config, source))
    }

    /// The tasks that watch readiness conditions the worker does not report itself: a delay, a
    /// probe (which goes on through the generation's canary window).
    fn start_readiness(
        &self,
        config: &WorkerConfig,
        worker: WorkerId,
        probe_address: Option<String>,
        canary_window: Option<Duration>,
    ) -> Vec<AbortHandle> {
        let mut tasks = Vec::new();
        if let Some(delay) = config.ready.delay() {
            let events = self.events_tx.clone();
            let task = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = events.send(News::Ready(worker, Condition::Delay));
            });
            tasks.push(task.abort_handle());
        }
        if let (Some(probe), Some(address)) = (config.ready.probe(), probe_address) {
            let task = tokio::spawn(probe_task(
                worker,
                probe.clone(),
                address,
                canary_window,
                self.events_tx.clone(),
            ));
            tasks.push(task.abort_handle());
        }
        tasks
    }

    /// A notify socket for one systemd-style worker, in `<runtime_dir>/notify/`.
    fn notify_socket(&self, worker: WorkerId) -> Result<notify::NotifySocket, SpawnError> {
        let dir = self.runtime_dir.join("notify");
        let path = dir.join(format!("{}.{worker}.sock", std::process::id()));
        std::fs::create_dir_all(&dir)
            .and_then(|()| notify::NotifySocket::bind(&path))
            .map_err(|source| SpawnError::NotifySocket { dir, source })
    }
}

/// The master's environment minus what describes its relation to systemd, as each name and its
/// `name=value` entry: read once (the master never changes its own environment), shared by
/// every worker's process.
fn master_env() -> &'static [(String, CString)] {
    static ENV: OnceLock<Vec<(String, CString)>> = OnceLock::new();
    ENV.get_or_init(|| {
        std::env::vars_os()
            .filter(|(k, _)| !MASTER_ONLY_ENV.iter().any(|m| k == m))
            .filter_map(|(k, v)| {
                let mut entry = k.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(v.as_bytes());
                // The environment never holds a NUL byte.
                Some((k.to_string_lossy().into_owned(), CString::new(entry).ok()?))
            })
            .collect()
    })
}

/// Gives the worker the master's environment, but for what its configuration sets.
fn inherit_env(process: &mut Spawn, config: &WorkerConfig) {
    for (name, entry) in master_env() {
        if !config.env.contains_key(name) {
            process.env_entry(entry);
        }
    }
}

/// A duplicate of `/dev/null` for a worker's stdin (opened once).
fn dev_null() -> std::io::Result<OwnedFd> {
    static NULL: OnceLock<std::fs::File> = OnceLock::new();
    let null = match NULL.get() {
        Some(null) => null,
        None => {
            let opened = std::fs::File::open("/dev/null")?;
            NULL.get_or_init(|| opened)
        }
    };
    Ok(null.try_clone()?.into())
}

/// The worker's own environment, beside what it inherits ([`inherit_env`]): the configured
/// variables, and baton's.
fn worker_env(
    config: &WorkerConfig,
    worker: WorkerId,
    generation: Generation,
    slot: usize,
    probe_address: Option<&str>,
    quic: bool,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = Vec::with_capacity(config.env.len() + 6);
    env.extend(config.env.iter().map(|(k, v)| (k.into(), v.into())));
    env.push((GENERATION_ENV.into(), generation.to_string().into()));
    env.push((WORKER_ID_ENV.into(), worker.to_string().into()));
    env.push(("BATON_SLOT".into(), slot.to_string().into()));
    env.push(("BATON_PROGRAM".into(), config.name.clone().into()));
    if let Some(address) = probe_address {
        env.push(("BATON_PROBE_ADDRESS".into(), address.into()));
    }
    if quic {
        let tag = format!("{:04x}", quic_tag(generation.0));
        env.push((QUIC_TAG_ENV.into(), tag.into()));
    }
    if let Some(LivenessCheck::Probe(probe)) = config.liveness.as_ref().map(|l| &l.check) {
        let address = probe.address_for(worker.0, slot, generation.0);
        env.push(("BATON_LIVENESS_ADDRESS".into(), address.into()));
    }
    env
}

/// A process prepared for one protocol, and what its link needs once it runs.
struct Prepared<L> {
    process: Spawn,
    link: L,
}

/// What the link of a baton-protocol worker is made of.
struct BatonLink {
    worker: WorkerId,
    generation: Generation,
    listeners: Vec<GenerationListener>,
    watchdog: Option<Duration>,
    ours: OwnedFd,
}

/// What the link of a systemd-style worker is made of.
struct NotifyLink {
    worker: WorkerId,
    socket: notify::NotifySocket,
}

fn start_error(config: &WorkerConfig, source: baton_sys::spawn::SpawnError) -> SpawnError {
    SpawnError::Start {
        command: config.command.clone(),
        source,
    }
}

/// The process of a worker: its program and arguments, directory, user and group, umask and
/// limits, in a process group of its own, stdin from `/dev/null`.
fn process(config: &WorkerConfig) -> Result<Spawn, SpawnError> {
    let prepare = || {
        let mut process = Spawn::new(&config.command)?;
        for arg in &config.args {
            process.arg(arg)?;
        }
        if let Some(cwd) = &config.cwd {
            process.cwd(cwd)?;
        }
        // If the master dies, its workers learn it at once (and drain): PR_SET_PDEATHSIG with
        // the drain signal, set after the user change, which would clear it.
        process.new_process_group().setup(ChildSetup {
            uid: config.uid,
            gid: config.gid,
            umask: config.umask,
            parent_death_signal: Some(config.drain_signal.unwrap_or(SignalNumber::SIGTERM)),
            max_open_files: config.rlimits.nofile,
            max_core_size: config.rlimits.core,
        });
        Ok(process)
    };
    let mut process = prepare().map_err(|source| start_error(config, source))?;
    inherit_env(&mut process, config);
    process.fd(dev_null().map_err(SpawnError::DevNull)?, 0);
    Ok(process)
}

fn set_env(
    process: &mut Spawn,
    env: &[(OsString, OsString)],
    config: &WorkerConfig,
) -> Result<(), SpawnError> {
    for (key, value) in env {
        process
            .env(key, value)
            .map_err(|source| start_error(config, source))?;
    }
    Ok(())
}

/// The program's liveness watchdog window, if it has one.
fn watchdog(config: &WorkerConfig) -> Option<Duration> {
    match config.liveness.as_ref()?.check {
        LivenessCheck::Watchdog(window) => Some(window),
        LivenessCheck::Probe(_) => None,
    }
}

/// The manifest and duplicated descriptors of a baton-protocol handoff.
fn handoff_parts(
    worker: WorkerId,
    generation: Generation,
    listeners: &[GenerationListener],
    watchdog: Option<Duration>,
) -> std::io::Result<(Hello, Vec<OwnedFd>)> {
    let hello = Hello {
        watchdog_ms: watchdog.map(|w| w.as_millis() as u64),
        version: PROTOCOL_VERSION,
        generation: generation.0,
        worker_id: worker.0,
        listeners: listeners
            .iter()
            .map(|l| ListenerInfo {
                name: l.config.name.clone(),
                address: l.config.address.clone(),
                quic_tag: l.config.options.quic.then(|| quic_tag(generation.0)),
            })
            .collect(),
    };
    let fds = listeners
        .iter()
        .map(|l| l.socket.duplicate())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((hello, fds))
}

/// The liveness probe of a program, if its liveness check is one.
fn liveness_probe(config: &WorkerConfig) -> Option<&crate::config::Probe> {
    match config.liveness.as_ref().map(|l| &l.check) {
        Some(LivenessCheck::Probe(probe)) => Some(probe),
        _ => None,
    }
}
