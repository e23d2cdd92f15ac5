//! `baton upgrade`: the master replaces its own program in place. `execve` keeps the pid (so
//! systemd's `MainPID` and the workers' parent stay the same), and every descriptor that must
//! survive (listeners, worker channels, notify sockets, the control socket, the asking client's
//! connection, the state itself) is inherited by number.
//!
//! 1. **Preflight** (nothing changes yet): the state is written to a sealed memory file and the
//!    new binary runs as `baton upgrade-check` on it. It must decode the state and answer with
//!    its version. A missing, non-executable, crashing or incompatible binary fails here, and
//!    the old master goes on as if nothing happened.
//! 2. **Quiet point**: signal delivery is held (signals stay pending, across the exec too),
//!    intents and worker news already read are taken in, and the state is written again.
//! 3. **Exec**: only descriptors named in the state lose close-on-exec. If `execve` itself
//!    fails, they get it back and the old master goes on.
//! 4. **Resume** (the new program, [`Master::resume`]): adopts every descriptor, restarts the
//!    tasks that read workers, re-sends drain requests, re-arms deadlines (absolute monotonic
//!    times), answers the client, and refreshes the service manager's fd store.
//!
//! An upgrade waits for no reload: while one runs (or a generation is starting, on probation,
//! or the master stops) it is refused with the reason, and can be retried a moment later.
//!
//! `supervisor.upgrade_signal` (SIGURG or SIGWINCH) starts the same upgrade, to the program the
//! master was started from; with no client to answer, its verdict goes to the log and to
//! `baton status`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use baton_proto::control::{self as proto, WorkerState};
use baton_sys::process::{self, SignalNumber};
use baton_sys::upgrade as sys;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::service_manager::Notification;
use super::spawn::FIRST_FD;
use super::{Input, Master};
use crate::faults::Point;
use crate::supervisor::{Event, Generation, Intent, Phase, Trigger, WorkerId};
use crate::upgrade::{
    CHECK_OK, ControlState, GenerationState, LinkState, NotifyLink, OutputState, STATE_FD_ENV,
    STATE_FORMAT, State, StateError, StreamState,
};
use crate::version;

/// Lets the master hold signal delivery across its exec. The binary's signal adapter implements
/// it: signals are blocked in every thread but the adapter's own.
pub trait SignalGate {
    /// Stops delivery: afterwards every signal already received has been sent on the input
    /// channel, and new ones stay pending in the kernel (also across `execve`).
    fn hold(&mut self);
    /// Delivers signals again (the upgrade failed; pending ones arrive now).
    fn release(&mut self);
}

/// `baton upgrade` as the master keeps it.
#[derive(Debug)]
pub(super) struct Upgrades {
    /// The upgrade under way, if any (its preflight runs).
    pub(super) pending: Option<Pending>,
    /// Where preflights report.
    pub(super) tx: mpsc::UnboundedSender<Preflight>,
    pub(super) rx: mpsc::UnboundedReceiver<Preflight>,
    /// The upgrades this master's line has made (carried across each), for `baton status`.
    pub(super) done: Vec<proto::UpgradeInfo>,
    /// The next upgrade's number.
    pub(super) next: u64,
}

impl Upgrades {
    pub(super) fn new(done: Vec<proto::UpgradeInfo>) -> Upgrades {
        let (tx, rx) = mpsc::unbounded_channel();
        Upgrades {
            pending: None,
            tx,
            rx,
            done,
            next: 1,
        }
    }
}

/// An upgrade under way (its preflight runs).
#[derive(Debug)]
pub(super) struct Pending {
    id: u64,
    binary: PathBuf,
    reply: oneshot::Sender<proto::Response>,
    client: Option<OwnedFd>,
    started: Instant,
    pub(super) deadline: Instant,
    /// The `upgrade-check` process, held by a pidfd (the loop reaps it like any child).
    preflight: Option<baton_sys::pidfd::Process>,
}

/// Why the master cannot upgrade now: it waits for no reload, start or stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Blocker {
    #[error("another upgrade is under way")]
    AnotherUpgrade,
    #[error("the master is stopping")]
    Stopping,
    #[error("rolling reload {reload} failed and is rolling back to generation {to}")]
    RollingBack { reload: u64, to: Generation },
    #[error("rolling reload {reload} is replacing generation {from} with generation {to}")]
    Rolling {
        reload: u64,
        from: Generation,
        to: Generation,
    },
    #[error("reload {reload} (generation {generation}) is running")]
    Reloading { reload: u64, generation: Generation },
    #[error("reload requests are queued")]
    Queued,
    #[error("generation {0} is on probation")]
    OnProbation(Generation),
    #[error("generation {0} is {1}")]
    Generation(Generation, Phase),
    #[error("worker {0} is {1}")]
    Worker(WorkerId, WorkerState),
}

/// Why an upgrade failed (the old master goes on). The message goes to the verdict.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpgradeError {
    #[error("cannot upgrade now: {0}")]
    NotNow(Blocker),
    #[error("the control socket is not open")]
    NoControlSocket,
    #[error("writing the state: {0}")]
    WriteState(std::io::Error),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("preparing the check: {0}")]
    PrepareCheck(std::io::Error),
    #[error("cannot run {}: {source}", binary.display())]
    Run {
        binary: PathBuf,
        source: std::io::Error,
    },
    /// The new program ran but gave no answer; `said`: the last line of its stderr.
    #[error(
        "{} did not accept the state{}",
        binary.display(),
        said.as_ref().map_or_else(
            || " (no answer to upgrade-check: not a baton, or one too old)".to_string(),
            |s| format!(": {s}")
        )
    )]
    Refused {
        binary: PathBuf,
        said: Option<String>,
    },
    #[error(
        "the new binary did not answer upgrade-check within {} ms (supervisor.upgrade_timeout)",
        .0.as_millis()
    )]
    Timeout(Duration),
    #[error("keeping a descriptor across the exec: {0}")]
    Keep(std::io::Error),
    #[error("exec {}: {source}", binary.display())]
    Exec {
        binary: PathBuf,
        source: std::io::Error,
    },
}

/// What the preflight said: the new program's version, or why it cannot take over.
#[derive(Debug)]
pub(super) struct Preflight {
    id: u64,
    result: Result<String, UpgradeError>,
}

impl Master {
    /// Why an upgrade cannot start now, if it cannot.
    fn upgrade_blocker(&self) -> Option<Blocker> {
        let snap = self.supervisor.snapshot(Instant::now());
        if snap.stopping {
            return Some(Blocker::Stopping);
        }
        if let Some(r) = &snap.rollout {
            return Some(match r.back {
                Some(_) => Blocker::RollingBack {
                    reload: r.reload.0,
                    to: r.to,
                },
                None => Blocker::Rolling {
                    reload: r.reload.0,
                    from: r.from,
                    to: r.to,
                },
            });
        }
        if let Some((reload, generation, ..)) = snap.reload {
            return Some(Blocker::Reloading {
                reload: reload.0,
                generation,
            });
        }
        if !snap.queued.is_empty() {
            return Some(Blocker::Queued);
        }
        if let Some((_, generation, _)) = snap.probation {
            return Some(Blocker::OnProbation(generation));
        }
        for g in &snap.generations {
            if !matches!(g.phase, Phase::Serving | Phase::Draining) {
                return Some(Blocker::Generation(g.generation, g.phase));
            }
            for w in &g.workers {
                if matches!(w.state, WorkerState::Spawning | WorkerState::Starting) {
                    return Some(Blocker::Worker(w.id, w.state));
                }
            }
        }
        None
    }

    /// A signal that may be `supervisor.upgrade_signal`: if it is, an upgrade to the program
    /// this master was started from. `held`: it arrived during another upgrade's quiet point.
    pub(super) fn on_upgrade_signal(
        &mut self,
        signal: baton_sys::process::SignalNumber,
        trigger: Trigger,
        held: bool,
    ) {
        if self.supervisor.upgrade_signal() != Some(signal) {
            let why = match self.supervisor.upgrade_signal() {
                Some(s) => format!("supervisor.upgrade_signal is {}", s.as_str()),
                None => "supervisor.upgrade_signal is not set".to_string(),
            };
            // A terminal's resize sends SIGWINCH from the kernel: not worth a line.
            if matches!(
                trigger,
                Trigger::Signal {
                    sender_pid: None,
                    ..
                }
            ) {
                debug!("{trigger} ignored: {why}");
            } else {
                info!(
                    event = baton_proto::event::UPGRADE_SIGNAL_IGNORED,
                    signal = signal.as_str(),
                    "{trigger} ignored: {why} (`baton upgrade` upgrades the master)"
                );
            }
            return;
        }
        let (reply, _) = oneshot::channel();
        self.begin_upgrade(None, reply, None, &trigger, held);
    }

    /// `baton upgrade` (or the upgrade signal): checks, then runs the preflight.
    /// `another_under_way`: asked during another upgrade's quiet point (refused).
    pub(super) fn begin_upgrade(
        &mut self,
        binary: Option<String>,
        reply: oneshot::Sender<proto::Response>,
        client: Option<OwnedFd>,
        by: &dyn std::fmt::Display,
        another_under_way: bool,
    ) {
        let binary = binary.map_or_else(|| self.binary.clone(), PathBuf::from);
        info!(event = baton_proto::event::UPGRADE_REQUESTED, binary = %binary.display(),
            "master upgrade to {} requested by {by}", binary.display());
        let blocker = if self.upgrades.pending.is_some() || another_under_way {
            Some(Blocker::AnotherUpgrade)
        } else {
            self.upgrade_blocker()
        };
        if let Some(why) = blocker {
            warn!(
                event = baton_proto::event::UPGRADE_REFUSED,
                "master upgrade refused: {why}; retry when it is over"
            );
            let _ = reply.send(proto::Response::Error {
                kind: proto::ErrorKind::Unavailable,
                message: format!("cannot upgrade now: {why}"),
            });
            return;
        }
        let started = Instant::now();
        let id = self.upgrades.next;
        self.upgrades.next += 1;
        let preflight = self
            .state(Vec::new(), None, None)
            .and_then(|(state, keep)| {
                let bytes = crate::upgrade::encode(&state)?;
                let memfd =
                    sys::sealed_memfd("baton-state", &bytes).map_err(UpgradeError::WriteState)?;
                self.preflight(id, &binary, memfd, &keep)
            });
        let pending = Pending {
            id,
            binary,
            reply,
            client,
            started,
            deadline: started + self.supervisor.upgrade_timeout(),
            preflight: None,
        };
        match preflight {
            Ok(process) => {
                self.upgrades.pending = Some(Pending {
                    preflight: process,
                    ..pending
                })
            }
            Err(reason) => self.fail_upgrade(pending, reason),
        }
    }

    /// Runs `<binary> upgrade-check` on the state; its answer arrives as a [`Preflight`].
    /// The check inherits every descriptor the state names, at the numbers it names (`keep`),
    /// as the exec would pass them: it rehearses the whole resume on them
    /// ([`Master::rehearse`]), so a program that could not take over is refused here, while
    /// the old master still runs, and not after the exec.
    fn preflight(
        &self,
        id: u64,
        binary: &Path,
        memfd: OwnedFd,
        keep: &[BorrowedFd<'_>],
    ) -> Result<Option<baton_sys::pidfd::Process>, UpgradeError> {
        let mut placements = vec![(memfd, FIRST_FD)];
        for fd in keep {
            let copy = fd
                .try_clone_to_owned()
                .map_err(UpgradeError::PrepareCheck)?;
            placements.push((copy, fd.as_raw_fd()));
        }
        // The state's own number: the first one free above every descriptor the state names.
        let state_fd = placements.iter().map(|(_, n)| *n).max().unwrap_or(FIRST_FD) + 1;
        placements[0].1 = state_fd;
        let mut cmd = Command::new(binary);
        cmd.arg("upgrade-check")
            .env(STATE_FD_ENV, state_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        process::place_fds(&mut cmd, placements).map_err(UpgradeError::PrepareCheck)?;
        process::unblock_signals_in_child(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| UpgradeError::Run {
            binary: binary.to_owned(),
            source,
        })?;
        // Opened on the loop's thread, which alone reaps: the child cannot be reaped before.
        let process = baton_sys::pidfd::Process::open(child.id()).ok().flatten();
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        let tx = self.upgrades.tx.clone();
        let binary = binary.to_owned();
        // The child is reaped by the event loop like any other; this thread only reads its
        // answer, to the end of its output (a hung check is killed at the deadline).
        std::thread::spawn(move || {
            let (mut out, mut err) = (String::new(), String::new());
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_string(&mut out);
            }
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_string(&mut err);
            }
            let answer = out
                .lines()
                .find_map(|l| l.strip_prefix(CHECK_OK))
                .and_then(|rest| {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix("version="))
                })
                .map(str::to_string);
            let result = answer.ok_or_else(|| {
                let said = err.trim().lines().last().unwrap_or("").trim().to_string();
                UpgradeError::Refused {
                    binary,
                    said: (!said.is_empty()).then_some(said),
                }
            });
            let _ = tx.send(Preflight { id, result });
        });
        drop(child);
        Ok(process)
    }

    /// The preflight took too long: it is killed and the upgrade fails.
    pub(super) fn preflight_expired(&mut self) {
        if let Some(pending) = self.upgrades.pending.take() {
            if let Some(preflight) = &pending.preflight {
                let _ = preflight.signal(SignalNumber::SIGKILL);
            }
            let allowed = pending.deadline.saturating_duration_since(pending.started);
            self.fail_upgrade(pending, UpgradeError::Timeout(allowed));
        }
    }

    fn fail_upgrade(&mut self, pending: Pending, reason: UpgradeError) {
        warn!(event = baton_proto::event::UPGRADE_FAILED, binary = %pending.binary.display(), reason = %reason,
            "master upgrade to {} failed: {reason}; this master ({}) goes on",
            pending.binary.display(), version());
        let verdict = proto::UpgradeVerdict {
            ok: false,
            pid: std::process::id(),
            from_version: version().into(),
            version: version().into(),
            binary: pending.binary.display().to_string(),
            reason: Some(reason.to_string()),
            duration_ms: pending.started.elapsed().as_millis() as u64,
        };
        let _ = pending.reply.send(proto::Response::Upgraded(verdict));
    }

    /// The preflight answered: on success, the quiet point and the exec.
    pub(super) fn on_preflight(
        &mut self,
        preflight: Preflight,
        inputs: &mut mpsc::UnboundedReceiver<Input>,
        queue: &mut VecDeque<Event>,
    ) -> Option<i32> {
        let pending = self.upgrades.pending.take_if(|p| p.id == preflight.id)?;
        let to_version = match preflight.result {
            Ok(v) => v,
            Err(reason) => {
                self.fail_upgrade(pending, reason);
                return None;
            }
        };
        if let Some(gate) = self.options.signals.as_mut() {
            gate.hold();
        }
        // Everything already received is taken in: intents travel in the state, worker news
        // is handled now.
        let mut intents = Vec::new();
        while let Ok(input) = inputs.try_recv() {
            match input {
                Input::Intent(intent) => intents.push(intent),
                Input::ChildExited => self.reap(queue),
                Input::UpgradeSignal { signal, trigger } => {
                    self.on_upgrade_signal(signal, trigger, true);
                }
            }
        }
        while let Ok(news) = self.events_rx.try_recv() {
            self.on_news(news, queue);
        }
        while let Some(event) = queue.pop_front() {
            if let Some(code) = self.feed(event, queue) {
                return Some(code);
            }
        }
        let result = match self.upgrade_blocker() {
            Some(why) => Err(UpgradeError::NotNow(why)),
            None => self.exec(&pending, intents.clone(), &to_version),
        };
        // Still here: the exec did not happen.
        if let Some(gate) = self.options.signals.as_mut() {
            gate.release();
        }
        queue.extend(intents.into_iter().map(Event::Intent));
        if let Err(reason) = result {
            self.fail_upgrade(pending, reason);
        }
        None
    }

    /// Writes the state and execs. Returns only if the exec did not happen.
    fn exec(
        &mut self,
        pending: &Pending,
        intents: Vec<Intent>,
        to_version: &str,
    ) -> Result<(), UpgradeError> {
        self.notify(Notification::Status(format!(
            "upgrading the master to {to_version}"
        )));
        let client = pending.client.as_ref().map(|fd| fd.as_raw_fd());
        let (mut state, mut keep) = self.state(intents, client, Some(pending.started))?;
        state.upgrades.push(proto::UpgradeInfo {
            from_version: version().into(),
            to_version: to_version.to_string(),
            at_unix_ms: self.unix_ms_ago(Duration::ZERO),
        });
        let bytes = crate::upgrade::encode(&state)?;
        Point::StateWrite
            .check()
            .map_err(UpgradeError::WriteState)?;
        let memfd = sys::sealed_memfd("baton-state", &bytes).map_err(UpgradeError::WriteState)?;
        if let Some(fd) = &pending.client {
            keep.push(fd.as_fd());
        }
        keep.push(memfd.as_fd());
        let restore = |fds: &[BorrowedFd<'_>]| {
            for fd in fds {
                let _ = sys::set_inheritable(*fd, false);
            }
        };
        for fd in &keep {
            if let Err(err) = sys::set_inheritable(*fd, true) {
                restore(&keep);
                return Err(UpgradeError::Keep(err));
            }
        }
        if let Err(source) = Point::Exec.check() {
            restore(&keep);
            return Err(UpgradeError::Exec {
                binary: pending.binary.clone(),
                source,
            });
        }
        // The environment as it was, minus what described the start (the sockets systemd
        // passed are now in the state; a test's fault points were this program's), plus where
        // the state is.
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                ![
                    "LISTEN_FDS",
                    "LISTEN_PID",
                    "LISTEN_FDNAMES",
                    STATE_FD_ENV,
                    "FAILPOINTS",
                ]
                .iter()
                .any(|m| k == m)
            })
            .collect();
        env.push((STATE_FD_ENV.into(), sys::number(&memfd).to_string().into()));
        if let Some(faults) = std::env::var_os(crate::faults::AFTER_UPGRADE_ENV) {
            env.push(("FAILPOINTS".into(), faults));
        }
        info!(event = baton_proto::event::UPGRADE_EXEC, binary = %pending.binary.display(), to_version = %to_version,
            "master upgrade: exec {} ({to_version}) in place, pid {}",
            pending.binary.display(), std::process::id());
        let err = sys::exec_in_place(&pending.binary, &self.argv, &env);
        restore(&keep);
        Err(UpgradeError::Exec {
            binary: pending.binary.clone(),
            source: err,
        })
    }

    /// The state as of now, and the descriptors it names (to keep across the exec).
    fn state(
        &self,
        intents: Vec<Intent>,
        client: Option<i32>,
        began: Option<Instant>,
    ) -> Result<(State, Vec<BorrowedFd<'_>>), UpgradeError> {
        let mut keep: Vec<BorrowedFd<'_>> = Vec::new();
        let (control_fd, control_config) = self
            .control_fd
            .as_ref()
            .ok_or(UpgradeError::NoControlSocket)?;
        keep.push(control_fd.as_fd());
        let mut sockets: Vec<&Rc<crate::listeners::BoundSocket>> = Vec::new();
        let mut generations = Vec::new();
        let mut order: Vec<&Generation> = self.resources.keys().collect();
        order.sort();
        for generation in order {
            let r = &self.resources[generation];
            let listeners = r
                .listeners
                .iter()
                .map(|l| {
                    let index = match sockets.iter().position(|s| Rc::ptr_eq(s, &l.socket)) {
                        Some(i) => i,
                        None => {
                            sockets.push(&l.socket);
                            sockets.len() - 1
                        }
                    };
                    (l.config.clone(), index)
                })
                .collect();
            generations.push(GenerationState {
                generation: *generation,
                listeners,
                programs: r.programs.iter().map(|p| (**p).clone()).collect(),
                canary_window: r.canary_window,
            });
        }
        let sockets = sockets
            .into_iter()
            .map(|s| {
                keep.push(s.fd());
                s.state(sys::number(s.fd()))
            })
            .collect();
        let pids: HashMap<WorkerId, u32> = self
            .supervisor
            .snapshot(Instant::now())
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter_map(|w| Some((w.id, w.pid?)))
            .collect();
        let mut links = Vec::new();
        for (&worker, link) in &self.links {
            let channel = link.channel.as_ref().map(|fd| {
                keep.push(fd.as_fd());
                sys::number(fd)
            });
            let notify = link.notify.as_ref().map(|(fd, path, access)| {
                keep.push(fd.as_fd());
                NotifyLink {
                    fd: sys::number(fd),
                    path: path.clone(),
                    pid: pids.get(&worker).copied().unwrap_or(0),
                    access: *access,
                }
            });
            let output = link.output.first().map(|first| {
                let origin = first.origin();
                OutputState {
                    program: origin.program.to_string(),
                    generation: origin.generation,
                    slot: origin.slot,
                    pid: origin.pid,
                    streams: link
                        .output
                        .iter()
                        .map(|capture| {
                            keep.push(capture.pipe());
                            StreamState {
                                stream: capture.stream(),
                                fd: sys::number(capture.pipe()),
                                partial: capture.partial(),
                            }
                        })
                        .collect(),
                }
            });
            links.push(LinkState {
                worker,
                channel,
                notify,
                output,
                handoff: link.handoff.state(),
            });
        }
        let processes = self
            .processes
            .iter()
            .map(|(worker, origin, process)| {
                keep.push(process.as_fd());
                crate::upgrade::ProcessState {
                    worker,
                    pid: process.pid(),
                    fd: sys::number(process),
                    announced: origin == super::processes::Origin::Announced,
                }
            })
            .collect();
        let state = State {
            format: STATE_FORMAT,
            from_version: version().into(),
            upgrades: self.upgrades.done.clone(),
            config_path: self.config_path.clone(),
            runtime_dir: self.runtime_dir.clone(),
            cgroups: match self.containment {
                Err(crate::cgroups::Unavailable::Off) => crate::config::Cgroups::Off,
                _ => crate::config::Cgroups::Auto,
            },
            argv: self
                .argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            binary: self.binary.clone(),
            started: self.started.0,
            started_unix_ms: self
                .started
                .1
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            upgrade_began: began,
            supervisor: crate::upgrade::machine(&self.supervisor),
            control: ControlState {
                config: control_config.clone(),
                fd: sys::number(control_fd),
                client,
            },
            sockets,
            generations,
            links,
            verdicts: self.verdicts.kept.values().cloned().collect(),
            intents,
            told_ready: self.told.ready,
            metrics_listen: self.endpoint.serving.as_ref().map(|m| m.0),
            processes,
        };
        Ok((state, keep))
    }
}
