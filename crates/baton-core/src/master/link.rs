//! The master's side of one worker: the baton channel (a `SOCK_SEQPACKET` pair), the handoff of
//! its listeners over `SCM_RIGHTS`, then commands out and packets in until either side closes.
//! [`Link`] holds what the event loop keeps of a worker: its command queue, the tasks serving
//! it, and the duplicates a self-upgrade carries across the exec.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use baton_proto::{Hello, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE, MasterMessage, WorkerMessage};
use baton_sys::channel;
use baton_sys::process::SignalNumber;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::readiness::{Condition, Gate, News};
use crate::config::NotifyAccess;
use crate::faults::Point;
use crate::supervisor::{Event, WorkerId};

/// Invalid packets a worker may send before the master stops listening to it.
const MAX_INVALID_PACKETS: u32 = 100;

/// A packet for a worker's channel, with the one descriptor it carries, if any (a handoff
/// link's end).
#[derive(Debug)]
pub(super) struct Command {
    pub(super) message: MasterMessage,
    pub(super) fd: Option<OwnedFd>,
}

impl From<MasterMessage> for Command {
    fn from(message: MasterMessage) -> Self {
        Command { message, fd: None }
    }
}

/// The master's side of one worker: its channel's command queue and the tasks serving it.
#[derive(Debug, Default)]
pub(super) struct Link {
    pub(super) commands: Option<mpsc::UnboundedSender<Command>>,
    pub(super) tasks: Vec<tokio::task::AbortHandle>,
    /// Duplicates kept for a self-upgrade: the baton channel, or the notify socket with its
    /// path and access rule.
    pub(super) channel: Option<OwnedFd>,
    pub(super) notify: Option<(OwnedFd, PathBuf, NotifyAccess)>,
    /// The readiness conditions it has yet to meet.
    pub(super) ready: Gate,
    /// Its liveness check runs (it became ready), and its watchdog's heartbeats go here
    /// (`liveness: {watchdog: ...}`).
    pub(super) liveness: bool,
    pub(super) heartbeats: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    /// The process started for it, its start time if known without `/proc` (for the
    /// registry), and its captured output streams (`output: capture`).
    pub(super) pid: Option<u32>,
    pub(super) start_time: Option<u64>,
    /// Its probes' Unix socket files, removed once it is gone.
    pub(super) probe_files: Vec<PathBuf>,
    pub(super) output: Vec<std::sync::Arc<crate::output::Capture>>,
    /// The last main process it announced that was refused, and how many were.
    pub(super) refused: Option<(super::main_pid::Refusal, u64)>,
    /// What it does with connection handoff, and what it reported handing off.
    pub(super) handoff: super::connection_handoff::Part,
}

impl super::Master {
    /// Asks `worker` to drain: its drain packet (baton protocol, with the time it has left) and
    /// its drain signal. If that fails, it serves on until its drain deadline kills it.
    pub(super) fn drain(
        &mut self,
        worker: WorkerId,
        pid: u32,
        deadline_ms: u64,
        signal: Option<SignalNumber>,
    ) {
        if let Err(err) = Point::DrainRequest.check() {
            warn!(
                worker = worker.0,
                pid,
                "cannot ask worker {worker} (pid {pid}) to drain: {err}; its drain deadline kills it"
            );
            return;
        }
        // Its handoff links first: the drain is where it starts offering.
        self.introduce(worker, deadline_ms);
        if let Some(commands) = self.links.get(&worker).and_then(|l| l.commands.as_ref()) {
            let _ = commands.send(MasterMessage::Drain { deadline_ms }.into());
        }
        if let Some(signal) = signal {
            self.processes.signal(pid, signal);
        }
    }
}

impl super::Master {
    /// `worker` announced a main process that was refused: shown in its status.
    pub(super) fn refused_main_pid(&mut self, worker: WorkerId, refusal: super::main_pid::Refusal) {
        if let Some(link) = self.links.get_mut(&worker) {
            let times = link.refused.as_ref().map_or(0, |(_, n)| *n) + 1;
            link.refused = Some((refusal, times));
        }
    }

    /// The worker is gone: its channel's tasks end, its probe files go, its output is done.
    pub(super) fn forget(&mut self, worker: WorkerId) {
        self.last_reports(worker);
        if let Some(link) = self.links.remove(&worker) {
            self.handoff_done(worker, &link.handoff);
            for task in link.tasks {
                task.abort();
            }
            super::probe::remove_socket_files(&link.probe_files);
        }
        self.output.gone(worker.0);
    }
}

/// One worker's channel: hands over the listeners, then forwards the worker's packets as events
/// and the master's commands as packets, until either side closes.
pub(super) async fn link_task(
    worker: WorkerId,
    channel: UnixDatagram,
    hello: Hello,
    fds: Vec<OwnedFd>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<News>,
    reported: super::connection_handoff::Reported,
) {
    if let Err(err) = hand_listeners(&channel, hello, &fds).await {
        warn!(
            worker = worker.0,
            "handing listeners to worker {worker} failed: {err}"
        );
        let cause = format!("handing it its listeners failed: {err}");
        // A worker that is gone (its end of the channel closed) is judged by its exit, whose
        // status is the better cause; any other failure is final now.
        let gone = matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionRefused
        );
        let event = match gone {
            true => Event::NotReadyBecause { worker, cause },
            false => Event::CannotBeReady { worker, cause },
        };
        let _ = events.send(News::Event(event));
        return;
    }
    drop(fds);
    link_loop(worker, channel, commands, events, reported).await;
}

/// A worker's channel after its handoff: commands out, messages in, until either side closes.
pub(super) async fn link_loop(
    worker: WorkerId,
    channel: UnixDatagram,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<News>,
    reported: super::connection_handoff::Reported,
) {
    let mut invalid = 0u32;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command { message, fd }) => {
                    let packet = baton_proto::encode(&message);
                    let fds: Vec<_> = fd.iter().map(|fd| fd.as_fd()).collect();
                    if let Err(err) = channel::send_with_fds(&channel, &packet, &fds).await {
                        debug!(worker = worker.0, "cannot send to worker {worker}: {err}");
                    }
                }
                None => return,
            },
            // Into the thread's one buffer: a buffer per worker, held while it waits, would cost
            // the master MAX_MESSAGE_SIZE per worker.
            received = channel::recv_packet(&channel, MAX_MESSAGE_SIZE, 1) => {
                let packet = match received {
                    // End of stream: the worker closed its end (or exited). Stop reading, or a
                    // closed socket would wake this loop forever.
                    Ok((_, r)) if r.len == 0 => {
                        debug!(worker = worker.0, "worker {worker} closed its channel");
                        return;
                    }
                    Ok((_, r)) if r.truncated || !r.fds.is_empty() || r.fds_truncated => Err(
                        "oversized packet or unexpected descriptors".to_string(),
                    ),
                    Ok((packet, _)) => baton_proto::decode::<WorkerMessage>(&packet)
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
                        let news = match message {
                            WorkerMessage::Ready => News::Ready(worker, Condition::Channel),
                            WorkerMessage::Heartbeat => News::Heartbeat(worker),
                            WorkerMessage::Handoff { offers, adopts } => {
                                News::HandoffAbility { worker, offers, adopts }
                            }
                            WorkerMessage::HandoffReport(counts) => {
                                reported.note(counts);
                                continue;
                            }
                            message => News::Event(Event::Message { worker, message }),
                        };
                        if events.send(news).is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        invalid += 1;
                        if invalid == 1 {
                            warn!(event = baton_proto::event::WORKER_PROTOCOL_ERROR, worker = worker.0,
                                "worker {worker} sent an invalid packet: {err}");
                            let cause = format!("it sent an invalid packet: {err}");
                            let _ = events.send(News::Event(Event::NotReadyBecause { worker, cause }));
                        }
                        if invalid >= MAX_INVALID_PACKETS {
                            warn!(event = baton_proto::event::WORKER_PROTOCOL_ERROR, worker = worker.0,
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
async fn hand_listeners(
    channel: &UnixDatagram,
    hello: Hello,
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    Point::HandoffSend.check()?;
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
