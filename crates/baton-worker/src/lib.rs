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
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use baton_proto::{
    CHANNEL_FD_ENV, Hello, ListenerAddress, ListenerInfo, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE,
    MasterMessage, PROTOCOL_VERSION, WorkerMessage,
};
use baton_sys::activation;
use baton_sys::channel::{self, SocketKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixDatagram, UnixListener, UnixStream};
use tokio::sync::{Notify, watch};

/// Shortest time between two connection-count reports: the master is not in the data path, so a
/// busy worker must not send it a packet per connection.
const REPORT_INTERVAL: Duration = Duration::from_millis(200);

/// Setting up the worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{CHANNEL_FD_ENV} is not set: this process was not started by baton")]
    NotUnderBaton,
    #[error("{CHANNEL_FD_ENV}={0:?} is not a descriptor number")]
    BadChannelFd(String),
    #[error("channel descriptor {fd} is unusable")]
    Channel {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("channel descriptor {0} is not a SOCK_SEQPACKET socket")]
    NotSeqPacket(i32),
    #[error("reading the handoff from the master")]
    Receive(#[source] io::Error),
    #[error("the master closed the channel during the handoff")]
    Closed,
    #[error("handoff protocol error: {0}")]
    Protocol(String),
    #[error("master speaks protocol version {0}; this worker speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("manifest lists {expected} listeners but {received} descriptors arrived")]
    CountMismatch { expected: usize, received: usize },
    #[error("descriptors were truncated in transit (MSG_CTRUNC): expected {expected}")]
    Truncated { expected: usize },
    #[error("listener `{name}`: the descriptor is not a listening stream socket")]
    NotAListener { name: String },
    #[error("no listener named `{0}` in the manifest")]
    UnknownListener(String),
    #[error("listener `{0}` was already taken")]
    AlreadyTaken(String),
    #[error("listener `{name}`: {source}")]
    Adopt {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "LISTEN_PID={listen_pid} is not this process (pid {pid}): the descriptors are not ours"
    )]
    ListenPid { listen_pid: String, pid: u32 },
    #[error(
        "listener `{name}`: the manifest says {address}, but the descriptor is bound to {actual}"
    )]
    WrongSocket {
        name: String,
        address: String,
        actual: String,
    },
    #[error("invalid {var}={value:?}")]
    BadEnv { var: &'static str, value: String },
}

/// A listening socket handed over by the master.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// An accepted connection of either kind.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

macro_rules! delegate {
    ($self:ident, $method:ident($($arg:ident),*)) => {
        match $self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).$method($($arg),*),
            Stream::Unix(s) => Pin::new(s).$method($($arg),*),
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, poll_shutdown(cx))
    }
}

/// Why a drain was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The master retired this worker's generation; it kills the worker after `deadline`.
    Master { deadline: Duration },
    /// The drain signal arrived (SIGTERM by default).
    Signal,
    /// The channel closed: the master is gone.
    MasterGone,
}

impl std::fmt::Display for DrainReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrainReason::Master { deadline } => {
                write!(
                    f,
                    "the master asked (killed in {} ms)",
                    deadline.as_millis()
                )
            }
            DrainReason::Signal => write!(f, "the drain signal arrived"),
            DrainReason::MasterGone => write!(f, "the master is gone"),
        }
    }
}

/// Resolves when a drain is requested. Cheap to clone: give one to every connection task.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<Option<DrainReason>>);

impl DrainWatch {
    /// Waits until a drain is requested and says why.
    pub async fn requested(&mut self) -> DrainReason {
        loop {
            if let Some(reason) = *self.0.borrow_and_update() {
                return reason;
            }
            if self.0.changed().await.is_err() {
                // The sender lives as long as the worker; if it is gone, so is the master.
                return DrainReason::MasterGone;
            }
        }
    }
    /// Whether a drain was requested already.
    pub fn is_requested(&self) -> bool {
        self.0.borrow().is_some()
    }
}

/// How the worker talks to its supervisor.
#[derive(Debug)]
enum Control {
    /// baton's channel.
    Channel(UnixDatagram),
    /// systemd's conventions: `NOTIFY_SOCKET` (if set) for readiness and status.
    Systemd,
}

#[derive(Debug)]
struct Shared {
    control: Control,
    /// Whether the worker should accept (false while its generation stands by).
    accepting: watch::Sender<bool>,
    connections: AtomicU64,
    changed: Notify,
    drain: watch::Sender<Option<DrainReason>>,
}

/// Whether to accept now: closed while the worker's generation stands by during a newer
/// generation's probation (`pause`), open again if that generation is rolled back (`resume`).
#[derive(Debug, Clone)]
pub struct AcceptGate(watch::Receiver<bool>);

impl AcceptGate {
    pub fn is_open(&self) -> bool {
        *self.0.borrow()
    }
    /// Waits until the gate opens or closes.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Counts a connection while alive.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
        self.0.changed.notify_one();
    }
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
        let owned =
            channel::adopt_inherited(fd).map_err(|source| WorkerError::Channel { fd, source })?;
        match channel::socket_kind(owned.as_fd()) {
            Ok(SocketKind {
                sock_type: channel::SockType::SeqPacket,
                ..
            }) => {}
            _ => return Err(WorkerError::NotSeqPacket(fd)),
        }
        let channel =
            channel::into_async(owned).map_err(|source| WorkerError::Channel { fd, source })?;
        Self::handshake(channel).await
    }

    /// Takes listeners passed the systemd way (`LISTEN_FDS` at fds 3.., `LISTEN_PID`,
    /// `LISTEN_FDNAMES`). Fails with [`WorkerError::NotUnderBaton`] if `LISTEN_FDS` is unset.
    pub fn from_systemd_env() -> Result<Worker, WorkerError> {
        let passed = activation::listen_fds(&activation::ActivationEnv::from_process())
            .map_err(|err| match err {
                activation::ActivationError::NotOurs { listen_pid, pid } => {
                    WorkerError::ListenPid { listen_pid, pid }
                }
                activation::ActivationError::Invalid { var, value } => {
                    WorkerError::BadEnv { var, value }
                }
            })?
            .ok_or(WorkerError::NotUnderBaton)?;
        let mut listeners = Vec::with_capacity(passed.len());
        for activation::Passed { name, fd, .. } in passed {
            let fd = fd.map_err(|source| WorkerError::Adopt {
                name: name.clone(),
                source,
            })?;
            let address = match channel::local_address(fd.as_fd()) {
                Ok(channel::LocalAddress::Inet(address)) => ListenerAddress::Tcp { address },
                Ok(channel::LocalAddress::Unix(path)) => ListenerAddress::Unix {
                    path: path.unwrap_or_default(),
                },
                Err(source) => return Err(WorkerError::Adopt { name, source }),
            };
            let info = ListenerInfo { name, address };
            let listener = adopt(&info, fd)?;
            listeners.push((info, Some(listener)));
        }
        let generation = std::env::var(baton_proto::GENERATION_ENV)
            .ok()
            .and_then(|g| g.parse().ok());
        let worker_id = std::env::var(baton_proto::WORKER_ID_ENV)
            .ok()
            .and_then(|w| w.parse().ok());
        let (drain, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            control: Control::Systemd,
            accepting: watch::channel(true).0,
            connections: AtomicU64::new(0),
            changed: Notify::new(),
            drain,
        });
        tokio::spawn(watch_drain_signal(shared.clone()));
        tokio::spawn(ignore_usr1());
        Ok(Worker {
            shared,
            generation: generation.unwrap_or(0),
            worker_id: worker_id.unwrap_or(0),
            listeners,
        })
    }

    /// Runs the handoff on an already connected channel (what `from_env` does after adopting it).
    pub async fn handshake(channel: UnixDatagram) -> Result<Worker, WorkerError> {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let hello = match recv(&channel, &mut buf, 0).await? {
            (MasterMessage::Hello(hello), fds) if fds.is_empty() => hello,
            (other, _) => {
                return Err(WorkerError::Protocol(format!(
                    "expected hello, got {other:?}"
                )));
            }
        };
        let Hello {
            version,
            generation,
            worker_id,
            listeners,
        } = hello;
        if version != PROTOCOL_VERSION {
            return Err(WorkerError::Version(version));
        }
        let mut fds: Vec<OwnedFd> = Vec::with_capacity(listeners.len());
        while fds.len() < listeners.len() {
            let (message, chunk) = recv(&channel, &mut buf, MAX_FDS_PER_MESSAGE).await?;
            match message {
                MasterMessage::Fds { first, count }
                    if first == fds.len() && count == chunk.len() =>
                {
                    fds.extend(chunk);
                }
                MasterMessage::Fds { count, .. } => {
                    return Err(WorkerError::CountMismatch {
                        expected: listeners.len(),
                        received: fds.len() + chunk.len().min(count),
                    });
                }
                other => {
                    return Err(WorkerError::Protocol(format!(
                        "expected descriptors, got {other:?}"
                    )));
                }
            }
        }
        let mut adopted = Vec::with_capacity(listeners.len());
        for (info, fd) in listeners.into_iter().zip(fds) {
            let listener = adopt(&info, fd)?;
            adopted.push((info, Some(listener)));
        }
        let (drain, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            control: Control::Channel(channel),
            accepting: watch::channel(true).0,
            connections: AtomicU64::new(0),
            changed: Notify::new(),
            drain,
        });
        tokio::spawn(listen_to_master(shared.clone()));
        tokio::spawn(watch_drain_signal(shared.clone()));
        tokio::spawn(ignore_usr1());
        tokio::spawn(report_connections(shared.clone()));
        Ok(Worker {
            shared,
            generation,
            worker_id,
            listeners: adopted,
        })
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
        self.shared.changed.notify_one();
        ConnectionGuard(self.shared.clone())
    }

    /// Open connections counted by [`Worker::track`].
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Waits until no tracked connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.shared.changed.notified();
            if self.connections() == 0 {
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

async fn recv(
    channel: &UnixDatagram,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(MasterMessage, Vec<OwnedFd>), WorkerError> {
    let got = channel::recv_with_fds(channel, buf, max_fds.max(1))
        .await
        .map_err(WorkerError::Receive)?;
    if got.len == 0 {
        return Err(WorkerError::Closed);
    }
    if got.fds_truncated {
        return Err(WorkerError::Truncated { expected: max_fds });
    }
    if got.truncated {
        return Err(WorkerError::Protocol(
            "packet larger than the protocol's limit".into(),
        ));
    }
    let message =
        baton_proto::decode(&buf[..got.len]).map_err(|e| WorkerError::Protocol(e.to_string()))?;
    Ok((message, got.fds))
}

fn adopt(info: &ListenerInfo, fd: OwnedFd) -> Result<Listener, WorkerError> {
    let not_a_listener = || WorkerError::NotAListener {
        name: info.name.clone(),
    };
    match channel::socket_kind(fd.as_fd()) {
        Ok(kind) if kind.listening && kind.sock_type == channel::SockType::Stream => {}
        _ => return Err(not_a_listener()),
    }
    // The descriptor must be bound where the manifest says: a mixed-up handoff is refused.
    let local = channel::local_address(fd.as_fd()).map_err(|source| WorkerError::Adopt {
        name: info.name.clone(),
        source,
    })?;
    let matches = match (&info.address, &local) {
        (ListenerAddress::Tcp { address }, channel::LocalAddress::Inet(got)) => {
            got.ip() == address.ip() && (address.port() == 0 || got.port() == address.port())
        }
        (ListenerAddress::Unix { path }, channel::LocalAddress::Unix(got)) => {
            got.as_deref() == Some(path.as_path())
        }
        _ => false,
    };
    if !matches {
        return Err(WorkerError::WrongSocket {
            name: info.name.clone(),
            address: info.address.to_string(),
            actual: format!("{local:?}"),
        });
    }
    let adopt_err = |source| WorkerError::Adopt {
        name: info.name.clone(),
        source,
    };
    match info.address {
        ListenerAddress::Tcp { .. } => {
            let std = std::net::TcpListener::from(fd);
            std.set_nonblocking(true).map_err(adopt_err)?;
            TcpListener::from_std(std)
                .map(Listener::Tcp)
                .map_err(adopt_err)
        }
        ListenerAddress::Unix { .. } => {
            let std = std::os::unix::net::UnixListener::from(fd);
            std.set_nonblocking(true).map_err(adopt_err)?;
            UnixListener::from_std(std)
                .map(Listener::Unix)
                .map_err(adopt_err)
        }
    }
}

/// Reads the master's packets: `drain` and end of stream both request a drain.
async fn listen_to_master(shared: Arc<Shared>) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    loop {
        match channel::recv_with_fds(channel, &mut buf, 1).await {
            Ok(got) if got.len == 0 => {
                shared.drain.send_if_modified(|d| {
                    d.get_or_insert(DrainReason::MasterGone) == &DrainReason::MasterGone
                });
                return;
            }
            Ok(got) => match baton_proto::decode(&buf[..got.len]) {
                Ok(MasterMessage::Drain { deadline_ms }) => {
                    let reason = DrainReason::Master {
                        deadline: Duration::from_millis(deadline_ms),
                    };
                    shared
                        .drain
                        .send_if_modified(|d| d.replace(reason).is_none());
                }
                Ok(MasterMessage::Pause) => {
                    shared.accepting.send_replace(false);
                }
                Ok(MasterMessage::Resume) => {
                    shared.accepting.send_replace(true);
                }
                // Other packets (unknown types from a newer master) are ignored.
                _ => {}
            },
            Err(_) => {
                shared.drain.send_if_modified(|d| {
                    d.get_or_insert(DrainReason::MasterGone) == &DrainReason::MasterGone
                });
                return;
            }
        }
    }
}

/// SIGUSR1 (logrotate's habit, and `systemctl kill -s USR1` reaches every process of a unit)
/// must not kill a worker: it is noted and otherwise ignored.
async fn ignore_usr1() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
        return;
    };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: nothing to reopen (the worker logs to stderr)");
    }
}

/// The drain signal (SIGTERM, baton's default) requests a drain instead of killing the process.
async fn watch_drain_signal(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    if term.recv().await.is_some() {
        shared
            .drain
            .send_if_modified(|d| d.get_or_insert(DrainReason::Signal) == &DrainReason::Signal);
    }
}

/// Reports the connection count when it changes, at most every [`REPORT_INTERVAL`].
async fn report_connections(shared: Arc<Shared>) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let mut last = None;
    loop {
        let notified = shared.changed.notified();
        let now = shared.connections.load(Ordering::Acquire);
        if last != Some(now) {
            let message = WorkerMessage::Status {
                connections: Some(now),
                text: None,
            };
            if channel.send(&baton_proto::encode(&message)).await.is_err() {
                return;
            }
            last = Some(now);
            tokio::time::sleep(REPORT_INTERVAL).await;
            continue;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::{Hello, ListenerAddress, ListenerInfo, MasterMessage, PROTOCOL_VERSION};
    use std::os::fd::BorrowedFd;

    fn pair() -> (UnixDatagram, UnixDatagram) {
        let (a, b) = channel::pair().unwrap();
        (
            channel::into_async(a).unwrap(),
            channel::into_async(b).unwrap(),
        )
    }

    fn tcp_info(name: &str, l: &std::net::TcpListener) -> ListenerInfo {
        ListenerInfo {
            name: name.into(),
            address: ListenerAddress::Tcp {
                address: l.local_addr().unwrap(),
            },
        }
    }

    async fn send(master: &UnixDatagram, message: &MasterMessage, fds: &[BorrowedFd<'_>]) {
        channel::send_with_fds(master, &baton_proto::encode(message), fds)
            .await
            .unwrap();
    }

    async fn hello(master: &UnixDatagram, listeners: Vec<ListenerInfo>) {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            generation: 4,
            worker_id: 9,
            listeners,
        };
        send(master, &MasterMessage::Hello(hello), &[]).await;
    }

    async fn next_status(master: &UnixDatagram) -> WorkerMessage {
        let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
        let n = master.recv(&mut buf).await.unwrap();
        baton_proto::decode(&buf[..n]).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn listeners_arrive_by_name_and_accept_connections() {
        let (master, worker_end) = pair();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        hello(&master, vec![tcp_info("a", &a), tcp_info("b", &b)]).await;
        send(
            &master,
            &MasterMessage::Fds { first: 0, count: 2 },
            &[a.as_fd(), b.as_fd()],
        )
        .await;
        let mut worker = Worker::handshake(worker_end).await.unwrap();
        assert_eq!((worker.generation(), worker.id()), (4, 9));
        let names: Vec<_> = worker.manifest().map(|l| l.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        let lb = worker.take("b").unwrap();
        assert!(matches!(
            worker.take("b"),
            Err(WorkerError::AlreadyTaken(_))
        ));
        assert!(matches!(
            worker.take("zz"),
            Err(WorkerError::UnknownListener(_))
        ));
        let client = tokio::net::TcpStream::connect(b.local_addr().unwrap());
        let (accepted, _) = tokio::join!(lb.accept(), client);
        assert!(matches!(accepted.unwrap(), Stream::Tcp(_)));
        assert_eq!(worker.take_all().len(), 1, "only `a` was left");
        worker.ready().await.unwrap();
        assert_eq!(
            next_status(&master).await,
            WorkerMessage::Status {
                connections: Some(0),
                text: None
            }
        );
        assert_eq!(next_status(&master).await, WorkerMessage::Ready);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_manifest_that_does_not_match_the_descriptors_is_refused() {
        let (master, worker_end) = pair();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        hello(&master, vec![tcp_info("a", &a), tcp_info("b", &a)]).await;
        send(
            &master,
            &MasterMessage::Fds { first: 0, count: 2 },
            &[a.as_fd()],
        )
        .await;
        let err = Worker::handshake(worker_end).await.unwrap_err();
        assert!(
            matches!(
                err,
                WorkerError::CountMismatch {
                    expected: 2,
                    received: 1
                }
            ),
            "{err}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_descriptor_bound_elsewhere_than_the_manifest_says_is_refused() {
        let (master, worker_end) = pair();
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        hello(&master, vec![tcp_info("a", &a)]).await;
        send(
            &master,
            &MasterMessage::Fds { first: 0, count: 1 },
            &[b.as_fd()],
        )
        .await;
        let err = Worker::handshake(worker_end).await.unwrap_err();
        assert!(
            matches!(&err, WorkerError::WrongSocket { name, .. } if name == "a"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_descriptor_that_is_not_a_listening_socket_is_refused() {
        let (master, worker_end) = pair();
        let bound_only = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let info = ListenerInfo {
            name: "web".into(),
            address: ListenerAddress::Tcp {
                address: bound_only.local_addr().unwrap(),
            },
        };
        hello(&master, vec![info]).await;
        send(
            &master,
            &MasterMessage::Fds { first: 0, count: 1 },
            &[bound_only.as_fd()],
        )
        .await;
        let err = Worker::handshake(worker_end).await.unwrap_err();
        assert!(
            matches!(&err, WorkerError::NotAListener { name } if name == "web"),
            "{err}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_drain_packet_and_the_master_going_away_both_request_a_drain() {
        let (master, worker_end) = pair();
        hello(&master, vec![]).await;
        let worker = Worker::handshake(worker_end).await.unwrap();
        let mut watch = worker.drain_watch();
        assert!(!watch.is_requested());
        send(&master, &MasterMessage::Unknown, &[]).await; // ignored
        send(&master, &MasterMessage::Drain { deadline_ms: 1500 }, &[]).await;
        assert_eq!(
            watch.requested().await,
            DrainReason::Master {
                deadline: Duration::from_millis(1500)
            }
        );

        let (master, worker_end) = pair();
        hello(&master, vec![]).await;
        let worker = Worker::handshake(worker_end).await.unwrap();
        drop(master);
        assert_eq!(
            worker.drain_watch().requested().await,
            DrainReason::MasterGone
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tracked_connections_are_counted_and_reported() {
        let (master, worker_end) = pair();
        hello(&master, vec![]).await;
        let worker = Worker::handshake(worker_end).await.unwrap();
        assert_eq!(
            next_status(&master).await,
            WorkerMessage::Status {
                connections: Some(0),
                text: None
            }
        );
        let guard = worker.track();
        assert_eq!(worker.connections(), 1);
        assert_eq!(
            next_status(&master).await,
            WorkerMessage::Status {
                connections: Some(1),
                text: None
            }
        );
        let idle = worker.idle();
        drop(guard);
        idle.await;
        assert_eq!(
            next_status(&master).await,
            WorkerMessage::Status {
                connections: Some(0),
                text: None
            }
        );
    }
}
