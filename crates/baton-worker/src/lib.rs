//! Worker-side SDK of baton for Rust/tokio servers.
//!
//! A worker started by baton calls [`Worker::from_env`], which takes the channel announced in
//! `BATON_CHANNEL_FD`, receives the manifest and the listening sockets (`SCM_RIGHTS`), and checks
//! that what arrived is what the manifest announced. The worker then takes its listeners by name,
//! starts accepting, calls [`Worker::ready`], and waits for [`DrainWatch::requested`]. While it
//! serves, [`Worker::track`] counts open connections; the count is reported to the master, which
//! shows it while the worker's generation drains.
//!
//! A drain is requested by the master's `drain` packet, by the drain signal (SIGTERM by default),
//! or by the channel closing (the master is gone): all three mean "stop accepting, finish, exit".
//!
//! The same program also runs under systemd socket activation (or baton's `protocol: systemd`):
//! without `BATON_CHANNEL_FD`, [`Worker::from_env`] takes the listeners from `LISTEN_FDS`
//! (refusing them unless `LISTEN_PID` is this process), names them from `LISTEN_FDNAMES`, and
//! reports readiness with `READY=1` on `NOTIFY_SOCKET`; SIGTERM requests the drain.
//!
//! This crate must not decide how a worker serves or when it exits; it only speaks the protocol
//! (`docs/protocol.md`). It has no unsafe code: descriptors are adopted through `baton-sys`.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_proto::{CHANNEL_FD_ENV, ListenerInfo, WorkerMessage};
use baton_sys::channel::SocketKind;
use tokio::net::UnixDatagram;
use tokio::sync::{Notify, watch};

mod channel;
mod drain;
mod error;
mod faults;
pub mod handoff;
mod listener;
#[cfg(feature = "log")]
pub mod log;
#[cfg(feature = "quinn")]
pub mod quic;
mod systemd;
#[cfg(test)]
mod tests;

pub use drain::{AcceptGate, ConnectionGuard, DrainReason, DrainWatch, Pacer};
pub use error::WorkerError;
pub use handoff::Handoff;
pub use listener::{Listener, Stream};

/// How the worker talks to its supervisor.
#[derive(Debug)]
pub(crate) enum Control {
    /// baton's channel.
    Channel(UnixDatagram),
    /// systemd's conventions: `NOTIFY_SOCKET` (if set) for readiness and status.
    Systemd,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) control: Control,
    /// Whether the worker should accept (false while its generation stands by).
    pub(crate) accepting: watch::Sender<bool>,
    pub(crate) connections: AtomicU64,
    /// The connection count changed (one waiter: the task that reports it to the master).
    pub(crate) counted: Notify,
    /// The connection count, or the handoff work in progress, went to zero ([`Worker::idle`]).
    /// Only then: a worker closing thousands of connections wakes its idle waiters once.
    pub(crate) emptied: Notify,
    pub(crate) drain: watch::Sender<Option<DrainReason>>,
    pub(crate) handoff: handoff::State,
}

/// A worker process under baton.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    generation: u64,
    worker_id: u64,
    listeners: Vec<(ListenerInfo, Option<Listener>)>,
}

impl Worker {
    /// Receives the listeners from the master. Must be called once, inside a tokio runtime.
    pub async fn from_env() -> Result<Worker, WorkerError> {
        let Ok(value) = std::env::var(CHANNEL_FD_ENV) else {
            return Self::from_systemd_env();
        };
        let fd: i32 = value
            .parse()
            .map_err(|_| WorkerError::BadChannelFd(value.clone()))?;
        let owned = baton_sys::channel::adopt_inherited(fd)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        match baton_sys::channel::socket_kind(owned.as_fd()) {
            Ok(SocketKind {
                sock_type: baton_sys::channel::SockType::SeqPacket,
                ..
            }) => {}
            _ => return Err(WorkerError::NotSeqPacket(fd)),
        }
        let channel = baton_sys::channel::into_async(owned)
            .map_err(|source| WorkerError::Channel { fd, source })?;
        Self::handshake(channel).await
    }

    /// This worker's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This worker's id (unique for the master's lifetime).
    pub fn id(&self) -> u64 {
        self.worker_id
    }

    /// The manifest: every listener's name and address, in configuration order.
    pub fn manifest(&self) -> impl Iterator<Item = &ListenerInfo> {
        self.listeners.iter().map(|(info, _)| info)
    }

    /// Takes the listener called `name`.
    pub fn take(&mut self, name: &str) -> Result<Listener, WorkerError> {
        let (_, slot) = self
            .listeners
            .iter_mut()
            .find(|(info, _)| info.name == name)
            .ok_or_else(|| WorkerError::UnknownListener(name.into()))?;
        slot.take()
            .ok_or_else(|| WorkerError::AlreadyTaken(name.into()))
    }

    /// The tag this worker's QUIC connection IDs must start with (big-endian, the first
    /// [`baton_proto::QUIC_TAG_LEN`] bytes), if it has a QUIC listener (docs/quic.md).
    pub fn quic_tag(&self) -> Option<u16> {
        self.listeners.iter().find_map(|(info, _)| info.quic_tag)
    }

    /// Takes every listener not taken yet, with its name.
    pub fn take_all(&mut self) -> Vec<(String, Listener)> {
        self.listeners
            .iter_mut()
            .filter_map(|(info, slot)| slot.take().map(|l| (info.name.clone(), l)))
            .collect()
    }

    /// Tells the master this worker serves. Call it once accepting has started.
    pub async fn ready(&self) -> io::Result<()> {
        self.send(&WorkerMessage::Ready).await
    }

    /// Tells the master this worker has stopped accepting and is finishing its connections.
    pub async fn draining(&self) -> io::Result<()> {
        self.send(&WorkerMessage::Draining).await
    }

    /// Sends a free-form status line (shown by `baton status`).
    pub async fn status(&self, text: impl Into<String>) -> io::Result<()> {
        self.send(&WorkerMessage::Status {
            connections: None,
            text: Some(text.into()),
        })
        .await
    }

    /// The gate an accept loop should respect (see [`AcceptGate`]).
    pub fn accept_gate(&self) -> AcceptGate {
        AcceptGate(self.shared.accepting.subscribe())
    }

    /// A watch that resolves when a drain is requested.
    pub fn drain_watch(&self) -> DrainWatch {
        DrainWatch(self.shared.drain.subscribe())
    }

    /// Counts a connection until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.shared.connections.fetch_add(1, Ordering::AcqRel);
        self.shared.counted.notify_one();
        ConnectionGuard(self.shared.clone())
    }

    /// Open connections counted by [`Worker::track`].
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Waits until no tracked connection is open, and no connection handoff is under way
    /// towards this worker (a taker's link open, an adopted connection not yet tracked).
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.emptied.notified();
            let handing = self.shared.handoff.busy.load(Ordering::Acquire);
            if self.connections() == 0 && handing == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn send(&self, message: &WorkerMessage) -> io::Result<()> {
        use sd_notify::NotifyState;
        match &self.shared.control {
            Control::Channel(channel) => channel
                .send(&baton_proto::encode(message))
                .await
                .map(|_| ()),
            Control::Systemd => match message {
                WorkerMessage::Ready => sd_notify::notify(&[NotifyState::Ready]),
                WorkerMessage::Draining => sd_notify::notify(&[NotifyState::Stopping]),
                WorkerMessage::Status {
                    text: Some(text), ..
                } => sd_notify::notify(&[NotifyState::Status(text)]),
                _ => Ok(()),
            },
        }
    }
}
