//! The processes the master may signal, each held by a pidfd taken when it was proven baton's
//! own: a worker's process from its clone (`CLONE_PIDFD`), a main process a worker announced
//! (`MAINPID=`) once [`vouch`](super::main_pid::vouch) proved it the worker's. A signal for a
//! pid not held here is refused: a number alone never names a process to the master, so a pid
//! reused by an innocent process, or one a worker lied about, is out of its reach.
//!
//! A process's end is seen two ways: a child of the master is reaped by the loop (`waitpid`,
//! which removes it here); an announced main process that another process reaps (a launcher
//! that forks the server and waits for it) is seen through its pidfd, which becomes readable
//! when it ends, whoever reaps it.
//!
//! A process group is signalled only while its leader is held here, that is while the leader is
//! this master's unreaped child: until it is reaped its pid, and so the group's id, cannot be
//! given to another process.

use baton_sys::pidfd::Process;
use baton_sys::process::{self, ExitKind, SignalNumber};
use std::collections::{HashMap, VecDeque};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Master;
use super::main_pid::Refusal;
use super::readiness::News;
use crate::supervisor::{Event, WorkerId};

/// How the master came to hold a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// It made the process: its child, the leader of the worker's process group.
    Spawned,
    /// The worker announced it as its main process (`MAINPID=`) and it was proven the worker's.
    Announced,
}

#[derive(Debug)]
struct Held {
    process: Process,
    worker: WorkerId,
    origin: Origin,
    /// Tells a watch's report from a later process of the same number.
    serial: u64,
    watch: Option<tokio::task::AbortHandle>,
}

/// The table of held processes, by pid.
#[derive(Debug, Default)]
pub(super) struct Processes {
    held: HashMap<u32, Held>,
    serial: u64,
}

impl Processes {
    /// A process the master just made for `worker`.
    pub(super) fn hold_spawned(&mut self, worker: WorkerId, process: Process) {
        self.insert(worker, process, Origin::Spawned, None);
    }

    /// A main process `worker` announced, proven its own: its end is watched through its pidfd
    /// (reported as [`News::MainGone`]), since its parent, not the master, may reap it.
    pub(super) fn hold_announced(
        &mut self,
        worker: WorkerId,
        process: Process,
        events: &mpsc::UnboundedSender<News>,
    ) {
        let pid = process.pid();
        if self.held.get(&pid).is_some_and(|h| h.worker == worker) {
            return; // already held (the worker itself, or announced twice)
        }
        self.serial += 1;
        let serial = self.serial;
        let watch = match process.ended() {
            Ok(ended) => {
                let events = events.clone();
                let task = tokio::spawn(async move {
                    ended.await;
                    let _ = events.send(News::MainGone { pid, serial });
                });
                Some(task.abort_handle())
            }
            Err(err) => {
                warn!(
                    worker = worker.0,
                    pid, "cannot watch main process {pid} of worker {worker}: {err}"
                );
                None
            }
        };
        self.held.insert(
            pid,
            Held {
                process,
                worker,
                origin: Origin::Announced,
                serial,
                watch,
            },
        );
    }

    fn insert(
        &mut self,
        worker: WorkerId,
        process: Process,
        origin: Origin,
        watch: Option<tokio::task::AbortHandle>,
    ) {
        self.serial += 1;
        let held = Held {
            serial: self.serial,
            process,
            worker,
            origin,
            watch,
        };
        if let Some(old) = self.held.insert(held.process.pid(), held) {
            stop_watch(old);
        }
    }

    /// The worker a held process belongs to.
    pub(super) fn owner(&self, pid: u32) -> Option<WorkerId> {
        self.held.get(&pid).map(|h| h.worker)
    }

    /// Whether `pid` is a process the master made and has not reaped: the leader of a process
    /// group whose id cannot be reused meanwhile.
    pub(super) fn leads_group(&self, pid: u32) -> bool {
        self.held
            .get(&pid)
            .is_some_and(|h| h.origin == Origin::Spawned)
    }

    /// Sends `signal` to the held process `pid`; refused (and said) for any other number.
    pub(super) fn signal(&self, pid: u32, signal: SignalNumber) {
        match self.held.get(&pid) {
            Some(held) => {
                if let Err(err) = held.process.signal(signal) {
                    debug!(pid, "cannot send {} to pid {pid}: {err}", signal.as_str());
                }
            }
            None => refuse(pid, signal),
        }
    }

    /// SIGKILLs the group `pgid` if its leader is held (so the id is still its group's).
    pub(super) fn kill_group(&self, pgid: u32) {
        if self.leads_group(pgid) {
            let _ = process::signal_group(pgid, SignalNumber::SIGKILL);
        } else {
            debug!(
                pgid,
                "process group {pgid}: its leader is reaped, so its number may name another group; not signalled"
            );
        }
    }

    /// The loop reaped `pid` (its child): it is held no more.
    pub(super) fn reaped(&mut self, pid: u32) {
        if let Some(held) = self.held.remove(&pid) {
            stop_watch(held);
        }
    }

    /// A watched main process ended ([`News::MainGone`]). `Some(how)`: it was still held (so
    /// the loop has not reaped it): the state machine is told it exited. A report about a process
    /// that is gone already, or about an earlier process of the number, is `None`.
    pub(super) fn gone(&mut self, pid: u32, serial: u64) -> Option<ExitKind> {
        if self.held.get(&pid).is_none_or(|h| h.serial != serial) {
            return None;
        }
        let held = self.held.remove(&pid)?;
        // If it is the master's child after all (an orphan the master inherited as subreaper),
        // reap it here, with its status.
        let how = match held.process.try_reap() {
            Ok(Some(how)) => how,
            _ => ExitKind::Unseen,
        };
        stop_watch(held);
        Some(how)
    }

    /// `worker` is gone: the main processes it announced are held no more (the process the
    /// master made stays held until it is reaped: it pins its group's id).
    pub(super) fn forget(&mut self, worker: WorkerId) {
        let gone: Vec<u32> = self
            .held
            .iter()
            .filter(|(_, h)| h.worker == worker && h.origin == Origin::Announced)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in gone {
            if let Some(held) = self.held.remove(&pid) {
                stop_watch(held);
            }
        }
    }

    /// Every held process (for a self-upgrade: their pidfds cross the exec).
    pub(super) fn iter(&self) -> impl Iterator<Item = (WorkerId, Origin, &Process)> + '_ {
        self.held.values().map(|h| (h.worker, h.origin, &h.process))
    }

    /// Holds again a process a predecessor held (its pidfd crossed the exec).
    pub(super) fn adopt(
        &mut self,
        worker: WorkerId,
        process: Process,
        origin: Origin,
        events: &mpsc::UnboundedSender<News>,
    ) {
        match origin {
            Origin::Spawned => self.hold_spawned(worker, process),
            Origin::Announced => self.hold_announced(worker, process, events),
        }
    }
}

fn stop_watch(held: Held) {
    if let Some(watch) = held.watch {
        watch.abort();
    }
}

/// A refusal here is a bug, not an attack (no input names a pid to this table), logged each
/// time.
fn refuse(pid: u32, signal: SignalNumber) {
    warn!(
        event = baton_proto::event::SIGNAL_REFUSED,
        pid,
        "not sending {} to pid {pid}: the master holds no pidfd for it (not a process it made or proved its worker's)",
        signal.as_str()
    );
}

impl Master {
    /// A worker's announced main process, proven its own: held, and the state machine told,
    /// unless another worker holds it.
    pub(super) fn announced(
        &mut self,
        worker: WorkerId,
        process: Process,
        queue: &mut VecDeque<Event>,
    ) {
        let pid = process.pid();
        match self.processes.owner(pid) {
            Some(owner) if owner != worker => {
                let refusal = Refusal::Taken {
                    pid,
                    owner: owner.0,
                };
                warn!(
                    event = baton_proto::event::MAIN_PID_REFUSED,
                    worker = worker.0,
                    "worker {worker} announced a main process baton refuses: {refusal}"
                );
                self.refused_main_pid(worker, refusal);
            }
            _ => {
                self.processes
                    .hold_announced(worker, process, &self.events_tx);
                queue.push_back(Event::MainPid { worker, pid });
            }
        }
    }

    /// A watched main process ended: the state machine is told, if it was still held.
    pub(super) fn main_gone(&mut self, pid: u32, serial: u64, queue: &mut VecDeque<Event>) {
        if let Some(status) = self.processes.gone(pid, serial) {
            queue.push_back(Event::Exited { pid, status });
        }
    }
    /// Reaps every exited child. Each is seen first as a zombie: if it is a worker's process
    /// and the leader of its group, whatever is left in the group is killed then, while the
    /// zombie still pins the group's id (the state machine's later `KillGroup` then finds it
    /// gone); it is reaped after.
    pub(super) fn reap(&mut self, queue: &mut VecDeque<Event>) {
        loop {
            match process::peek_exit() {
                Ok(Some((pid, status))) => {
                    if self.supervisor.is_main_pid(pid) && self.processes.leads_group(pid) {
                        let _ = process::signal_group(pid, SignalNumber::SIGKILL);
                    }
                    if let Err(err) = process::reap(pid) {
                        warn!("waitpid({pid}) failed: {err}");
                    }
                    self.processes.reaped(pid);
                    queue.push_back(Event::Exited { pid, status });
                }
                Ok(None) => break,
                Err(err) => {
                    warn!("waitid failed: {err}");
                    break;
                }
            }
        }
    }
}
