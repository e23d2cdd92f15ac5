//! The new program's side of `baton upgrade`: it finds the state its predecessor left
//! ([`Inherited`]), adopts every descriptor the state names ([`Master::resume`]), and when it runs,
//! restarts the tasks that read workers, re-sends drain requests, answers the client that asked,
//! and refreshes the service manager's fd store ([`Master::on_resumed`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_proto::control as proto;
use baton_sys::upgrade as sys;
use baton_sys::{channel, notify};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::generations::Resources;
use super::link::{Link, link_loop};
use super::processes::Origin as ProcessOrigin;
use super::service_manager::{Notification, Told};
use super::worker_notify::{Notifier, notify_task};
use super::{Master, Options};
use crate::config::{self, NotifyAccess};
use crate::control;
use crate::intent::Intent;
use crate::listeners::{GenerationListener, ListenerTable};
use crate::metrics_http;
use crate::output::{Capture, Origin, capture_task};
use crate::supervisor::{Action, Event, RequestId, Supervisor, WorkerId};
use crate::upgrade::{STATE_FD_ENV, State, StateError};
use crate::version;
use baton_sys::pidfd::Process;
use proto::OutputStream;

/// The state a predecessor left for this program, read from the descriptor that
/// [`STATE_FD_ENV`] names: what `baton upgrade-check` checks and [`Master::resume`] takes over.
#[derive(Debug)]
pub struct Inherited {
    state: State<()>,
    supervisor: Supervisor,
}

impl Inherited {
    /// Takes the state from descriptor `value` (the value of [`STATE_FD_ENV`]), once.
    pub fn take(value: &str) -> Result<Inherited, ResumeError> {
        let number: i32 = value.parse().map_err(|_| ResumeError::StateFd {
            value: value.to_string(),
        })?;
        let fd = channel::adopt_inherited(number)
            .map_err(|source| ResumeError::StateAdopt { number, source })?;
        let bytes = sys::read_all(fd.as_fd()).map_err(ResumeError::StateRead)?;
        let (state, supervisor) = crate::upgrade::decode(&bytes)?;
        Ok(Inherited { state, supervisor })
    }

    /// The answer of `baton upgrade-check` when this program can take the state over: the line
    /// the old master's preflight reads (`baton-upgrade-check ok format=N version=V`).
    pub fn check_answer(&self) -> String {
        format!(
            "{} format={} version={}",
            crate::upgrade::CHECK_OK,
            self.state.format,
            version()
        )
    }
}

/// Why this program cannot take over from its predecessor. Each names the descriptor or object.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("{STATE_FD_ENV}={value}: not a descriptor")]
    StateFd { value: String },
    #[error("state descriptor {number}: {source}")]
    StateAdopt { number: i32, source: std::io::Error },
    #[error("reading the state: {0}")]
    StateRead(std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    /// A descriptor the state names is not usable.
    #[error("{what} (fd {number}): {source}")]
    Adopt {
        what: String,
        number: i32,
        source: std::io::Error,
    },
    #[error("listener {0} has no socket")]
    NoSocket(String),
    #[error("notify socket of worker {worker}: {source}")]
    NotifySocket {
        worker: WorkerId,
        source: std::io::Error,
    },
    /// A test's fault (`upgrade.resume`).
    #[error("{0}")]
    Injected(std::io::Error),
    /// The event loop could not be built.
    #[error("cannot build the event loop: {0}")]
    Runtime(String),
    /// A worker's descriptor could not become a live object of the event loop.
    #[error("{part} of worker {worker}: {source}")]
    WorkerPart {
        worker: WorkerId,
        part: String,
        source: std::io::Error,
    },
}

/// What a master that took over from its predecessor still does when it starts running.
#[derive(Debug)]
pub(super) struct Resumed {
    client: Option<OwnedFd>,
    from_version: String,
    binary: PathBuf,
    began: Option<Instant>,
    intents: Vec<Intent>,
    workers: WorkerFds,
}

/// The workers' descriptors a resumed master adopted, still plain descriptors: they become live
/// objects of the event loop in [`WorkerFds::adopt`], the one step a rehearsal
/// ([`Master::rehearse`]) and the real resume share.
#[derive(Debug)]
struct WorkerFds {
    channels: Vec<(WorkerId, OwnedFd)>,
    /// Each notify socket, still a plain descriptor with its path: a [`notify::NotifySocket`]
    /// (which removes its path when dropped) only once the loop runs.
    notify: Vec<(WorkerId, (OwnedFd, PathBuf), u32, NotifyAccess)>,
    /// Each worker's output pipes, with who it is and the line each stream had begun.
    output: Vec<(WorkerId, Arc<Origin>, Vec<AdoptedStream>)>,
    /// The processes held by pidfd, held again once the loop runs (an announced one's end is
    /// watched by a task).
    processes: Vec<(WorkerId, ProcessOrigin, Process)>,
}

/// A worker's output stream adopted across the exec: its pipe, and the line it had begun.
type AdoptedStream = (OutputStream, std::fs::File, Vec<u8>);

/// The workers' descriptors as live objects, registered with the runtime; nothing read yet.
struct LiveWorkers {
    channels: Vec<(WorkerId, tokio::net::UnixDatagram)>,
    notify: Vec<(WorkerId, notify::NotifySocket, u32, NotifyAccess)>,
    output: Vec<(WorkerId, Vec<Arc<Capture>>)>,
    processes: Vec<(WorkerId, ProcessOrigin, Process)>,
}

impl WorkerFds {
    /// Makes every descriptor a live object (within the runtime). What fails is left out and
    /// named in the errors: that part of that worker is lost, the rest goes on.
    fn adopt(self, hub: &crate::output::Hub) -> (LiveWorkers, Vec<ResumeError>) {
        let mut errors = Vec::new();
        let mut failed = |worker: WorkerId, part: String, source: std::io::Error| {
            errors.push(ResumeError::WorkerPart {
                worker,
                part,
                source,
            })
        };
        let mut live = LiveWorkers {
            channels: Vec::new(),
            notify: Vec::new(),
            output: Vec::new(),
            processes: Vec::new(),
        };
        for (worker, fd) in self.channels {
            match channel::into_async(fd) {
                Ok(channel) => live.channels.push((worker, channel)),
                Err(err) => failed(worker, "channel".into(), err),
            }
        }
        for (worker, (fd, path), main, access) in self.notify {
            match notify::NotifySocket::adopt(fd, path) {
                Ok(socket) => live.notify.push((worker, socket, main, access)),
                Err(err) => failed(worker, "notify socket".into(), err),
            }
        }
        for (worker, origin, streams) in self.output {
            let mut captures = Vec::new();
            for (stream, pipe, partial) in streams {
                match Capture::resume(pipe, origin.clone(), stream, hub.clone(), &partial) {
                    Ok(capture) => captures.push(capture),
                    Err(err) => failed(worker, stream.as_str().to_string(), err),
                }
            }
            live.output.push((worker, captures));
        }
        for (worker, origin, process) in self.processes {
            // An announced process's end is watched: its pidfd must register with the runtime.
            let watchable = match origin {
                ProcessOrigin::Announced => process.ended().map(drop),
                ProcessOrigin::Spawned => Ok(()),
            };
            match watchable {
                Ok(()) => live.processes.push((worker, origin, process)),
                Err(err) => failed(worker, format!("pidfd of pid {}", process.pid()), err),
            }
        }
        (live, errors)
    }
}

impl Master {
    /// A master that takes over from its predecessor (the same process, before the exec): every
    /// descriptor the state names is adopted here; tasks start in [`Master::run`].
    pub fn resume(inherited: Inherited, options: Options) -> Result<Master, ResumeError> {
        crate::faults::Point::Resume
            .check()
            .map_err(ResumeError::Injected)?;
        let Inherited { state, supervisor } = inherited;
        let adopt = |number: i32, what: &str| {
            channel::adopt_inherited(number).map_err(|source| ResumeError::Adopt {
                what: what.to_string(),
                number,
                source,
            })
        };
        let mut table = ListenerTable::default();
        let mut socket_fds = Vec::new();
        for s in state.sockets {
            let fd = adopt(s.fd, &format!("listener socket {}", s.local))?;
            socket_fds.push((s, fd));
        }
        let sockets = table.restore(socket_fds);
        let mut resources = HashMap::new();
        for g in state.generations {
            let listeners = g
                .listeners
                .into_iter()
                .map(|(config, index)| {
                    let socket = sockets
                        .get(index)
                        .cloned()
                        .ok_or_else(|| ResumeError::NoSocket(config.name.clone()))?;
                    Ok(GenerationListener { config, socket })
                })
                .collect::<Result<Vec<_>, ResumeError>>()?;
            resources.insert(
                g.generation,
                Resources {
                    listeners,
                    programs: g.programs.into_iter().map(Arc::new).collect(),
                    canary_window: g.canary_window,
                    warnings: Vec::new(),
                },
            );
        }
        let control_fd = adopt(state.control.fd, "control socket")?;
        let listener = std::os::unix::net::UnixListener::from(control_fd);
        let client = match state.control.client {
            Some(raw) => adopt(raw, "the upgrading client").ok(),
            None => None,
        };
        let (mut links, mut channels, mut notifies) = (HashMap::new(), Vec::new(), Vec::new());
        let mut output = Vec::new();
        for l in state.links {
            let mut link = Link::default();
            if let Some(raw) = l.channel {
                let fd = adopt(raw, &format!("channel of worker {}", l.worker))?;
                link.channel = fd.try_clone().ok();
                channels.push((l.worker, fd));
            }
            if let Some(n) = l.notify {
                let fd = adopt(n.fd, &format!("notify socket of worker {}", l.worker))?;
                let fail = |source| ResumeError::NotifySocket {
                    worker: l.worker,
                    source,
                };
                let dup = fd.try_clone().map_err(fail)?;
                link.notify = Some((dup, n.path.clone(), n.access));
                notifies.push((l.worker, (fd, n.path), n.pid, n.access));
            }
            if let Some(o) = l.output {
                link.pid = Some(o.pid);
                let origin = Arc::new(Origin {
                    program: o.program.into(),
                    generation: o.generation,
                    worker: l.worker.0,
                    slot: o.slot,
                    pid: o.pid,
                });
                let mut streams = Vec::new();
                for s in o.streams {
                    let what = format!("{} pipe of worker {}", s.stream.as_str(), l.worker);
                    let fd = adopt(s.fd, &what)?;
                    streams.push((s.stream, std::fs::File::from(fd), s.partial));
                }
                output.push((l.worker, origin, streams));
            }
            if let Some(handoff) = l.handoff {
                link.handoff = super::connection_handoff::Part::resumed(handoff);
            }
            links.insert(l.worker, link);
        }
        let mut processes = Vec::new();
        for p in state.processes {
            let fd = adopt(
                p.fd,
                &format!("pidfd of pid {} of worker {}", p.pid, p.worker),
            )?;
            let origin = match p.announced {
                true => ProcessOrigin::Announced,
                false => ProcessOrigin::Spawned,
            };
            processes.push((p.worker, origin, Process::from_pidfd(p.pid, fd)));
        }
        if processes.is_empty() {
            // A state from a master that kept no pidfds: its workers' processes are this
            // process's unreaped children (their numbers cannot have been reused), or main
            // processes it accepted.
            let spawned = links.iter().filter_map(|(w, l)| Some((*w, l.pid?)));
            let mains = supervisor.processes().map(|(pid, w, ..)| (w, pid));
            for (worker, pid) in spawned.chain(mains).collect::<BTreeSet<_>>() {
                let origin = match baton_sys::process::parent_of(pid) {
                    Ok(parent) if parent == std::process::id() => ProcessOrigin::Spawned,
                    _ => ProcessOrigin::Announced,
                };
                if let Ok(Some(process)) = Process::open(pid) {
                    processes.push((worker, origin, process));
                }
            }
        }
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let control_config = state.control.config;
        let state_runtime_dir = state.runtime_dir.clone();
        let state_cgroups = state.cgroups;
        let metrics_pending = state.metrics_listen.and_then(|address| {
            metrics_http::bind(address)
                .map_err(|e| {
                    warn!(event = baton_proto::event::METRICS_UNAVAILABLE, address = %address, error = %e,
                        "{e}: no metrics endpoint until the next reload that sets it");
                })
                .ok()
        });
        let start_settings =
            config::start_only_settings(&control_config, &state_runtime_dir, &options.files);
        Ok(Master {
            config_path: state.config_path,
            runtime_dir: state.runtime_dir,
            initial: None,
            table,
            resources,
            links,
            processes: super::processes::Processes::default(),
            supervisor,
            events_tx,
            events_rx,
            control: Some((
                listener,
                control_config.clone(),
                control::SocketFile(control_config.socket.clone()),
            )),
            verdicts: super::requests::Verdicts {
                waiting: HashMap::new(),
                kept: state
                    .verdicts
                    .into_iter()
                    .map(|v| (RequestId(v.request), v))
                    .collect(),
            },
            started: (
                state.started,
                std::time::UNIX_EPOCH + Duration::from_millis(state.started_unix_ms),
            ),
            options,
            told: Told {
                ready: state.told_ready,
                ..Told::default()
            },
            argv: state.argv.into_iter().map(OsString::from).collect(),
            binary: state.binary.clone(),
            control_fd: None,
            start_settings,
            control_aliases: Vec::new(),
            registry: super::guard::Registration::new(crate::orphans::RegistryWriter::new(
                crate::orphans::Registry::beside(&control_config.socket),
            )),
            upgrades: super::upgrade::Upgrades::new(state.upgrades),
            handoffs: Default::default(),
            endpoint: super::generations::MetricsEndpoint::new(metrics_pending),
            output: crate::output::Hub::default(),
            memory: super::memory::MemoryWatch::default(),
            queues: super::queues::QueueWatch::default(),
            census: Default::default(),
            // The same container the old program used (the workers are in it).
            containment: super::containment::open(state_cgroups, &control_config.socket),
            cgroups: super::containment::OpenCgroups::default(),
            config_watch: None,
            resumed: Some(Resumed {
                client,
                from_version: state.from_version,
                binary: state.binary,
                began: state.upgrade_began,
                intents: state.intents,
                workers: WorkerFds {
                    channels,
                    notify: notifies,
                    output,
                    processes,
                },
            }),
        })
    }

    /// `baton upgrade-check`'s proof, run by the new program before the old one execs it: the
    /// whole resume on the running master's own descriptors (the preflight inherits every one
    /// the state names): each is adopted and made a live object of this program's runtime, as
    /// after the exec, and nothing is read from any. Must be called within a runtime.
    ///
    /// What the rehearsal made is forgotten, never dropped: dropping it would remove files the
    /// running master still uses (its control socket, the workers' notify sockets). The process
    /// exits right after.
    pub fn rehearse(mut inherited: Inherited) -> Result<(), ResumeError> {
        // The metrics port is the running master's until the exec; binding it is not a proof
        // (and a failure there is not fatal after the exec either).
        inherited.state.metrics_listen = None;
        let mut master = Master::resume(inherited, Options::default())?;
        let resumed = master.resumed.take();
        let result = match resumed {
            Some(resumed) => {
                let (live, errors) = resumed.workers.adopt(&master.output);
                std::mem::forget(live);
                errors.into_iter().next().map_or(Ok(()), Err)
            }
            None => Ok(()),
        };
        std::mem::forget(master);
        result
    }

    /// First steps of a resumed master: tasks for every worker, drain requests again, the
    /// verdict to the client, the fd store refreshed. Returns the actions to apply.
    pub(super) fn on_resumed(&mut self, queue: &mut VecDeque<Event>) -> Vec<Action> {
        let Some(resumed) = self.resumed.take() else {
            return Vec::new();
        };
        let (live, errors) = resumed.workers.adopt(&self.output);
        for err in errors {
            warn!(
                event = baton_proto::event::UPGRADE_RESUME_DEGRADED,
                "{err}: lost across the upgrade"
            );
        }
        for (worker, channel) in live.channels {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let reported = self
                .links
                .get(&worker)
                .map(|l| l.handoff.reported.clone())
                .unwrap_or_default();
            let task = tokio::spawn(link_loop(
                worker,
                channel,
                commands_rx,
                self.events_tx.clone(),
                reported,
            ));
            if let Some(link) = self.links.get_mut(&worker) {
                link.commands = Some(commands);
                link.tasks.push(task.abort_handle());
            }
        }
        for (worker, origin, process) in live.processes {
            self.processes
                .adopt(worker, process, origin, &self.events_tx);
        }
        for (worker, socket, main, access) in live.notify {
            let spawned = self
                .processes
                .iter()
                .find(|(w, origin, _)| *w == worker && *origin == ProcessOrigin::Spawned)
                .map_or(main, |(.., p)| p.pid());
            let cgroup = self
                .supervisor
                .placement(worker)
                .and_then(|(generation, program, _)| self.cgroup_dir(generation, program));
            let notifier = Notifier {
                worker,
                spawned,
                main,
                access,
                cgroup,
                // A worker still starting across the upgrade loses only the hint.
                awaits_ready: false,
            };
            let task = tokio::spawn(notify_task(socket, notifier, self.events_tx.clone()));
            if let Some(link) = self.links.get_mut(&worker) {
                link.tasks.push(task.abort_handle());
            }
        }
        for (worker, captures) in live.output {
            for capture in &captures {
                tokio::spawn(capture_task(capture.clone()));
            }
            if let Some(link) = self.links.get_mut(&worker) {
                link.output = captures;
            }
        }
        // Ready workers are judged alive again (`liveness:`), as they were before the exec.
        let ready: Vec<WorkerId> = self
            .supervisor
            .snapshot(Instant::now())
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter(|w| w.state == proto::WorkerState::Ready)
            .map(|w| w.id)
            .collect();
        for worker in ready {
            self.start_liveness(worker);
        }
        // Children that exited during the exec wait as zombies: reap them now.
        self.reap(queue);
        queue.extend(resumed.intents.into_iter().map(Event::Intent));
        let took = resumed.began.map(|b| b.elapsed()).unwrap_or_default();
        let to = version().to_string();
        info!(event = baton_proto::event::UPGRADED, from_version = %resumed.from_version, to_version = %to,
            pid = std::process::id(), took_ms = took.as_millis() as u64,
            "master upgraded in place: {} -> {to}, pid {} (took {} ms); {} generations, {} workers kept",
            resumed.from_version, std::process::id(), took.as_millis(),
            self.resources.len(), self.links.len());
        if let Some(fd) = resumed.client {
            let verdict = proto::UpgradeVerdict {
                ok: true,
                pid: std::process::id(),
                from_version: resumed.from_version,
                version: to,
                // The program now running (the default for the next upgrade stays `binary`).
                binary: self
                    .options
                    .binary
                    .clone()
                    .unwrap_or(resumed.binary)
                    .display()
                    .to_string(),
                reason: None,
                duration_ms: took.as_millis() as u64,
            };
            let frame = proto::encode_frame(proto::Response::Upgraded(verdict));
            let mut stream = std::os::unix::net::UnixStream::from(fd);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = std::io::Write::write_all(&mut stream, &frame);
        }
        // The service manager's fd store gets every socket again (it ignores duplicates), and
        // learns the (possibly new) program is ready.
        let listeners: Vec<GenerationListener> = self
            .resources
            .values()
            .flat_map(|r| r.listeners.iter().cloned())
            .collect();
        self.store_fds(&listeners);
        if self.told.ready {
            self.notify(Notification::Ready);
        }
        self.told.status.clear();
        self.supervisor.drain_messages(Instant::now())
    }
}
