//! Connection handoff, the worker's side (`docs/protocol.md`, "Connection handoff"): a draining
//! worker offers its connections at safe points to workers of the serving generation, which
//! take them over, so a reload disconnects nobody.
//!
//! [`Worker::handoff`] says what this worker does (before `ready`). A **taker** reads
//! [`Handoff::adopted`]: each item is a connection committed to it, to serve from the state it
//! came with. A **giver**'s connections each take a [`Ticket`] when they open and wait for its
//! turn while they serve ([`Ticket::turn`]: one at a time at the links' pace, once the worker
//! drains); at its turn, a connection stopped at a safe point goes to [`Handoff::offer_at`]
//! (or, without a ticket, to [`Handoff::offer`]): `Ok` means the taker serves it now (the
//! giver's copy is closed); `Err(Kept)` gives it back, to drain as before. The SDK runs the exchange on the links the
//! master made (offer, prepared, commit or abort) and keeps the rule that one process serves a
//! connection at every moment, whoever dies when.
//!
//! Workers speaking systemd's protocol have no channel, hence no links: every offer is kept.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use baton_proto::handoff::{ConnectionKind, HandoffCounts, MAX_STATE_BYTES, WebSocketState};
use baton_proto::{HandoffLink, HandoffRole, WorkerMessage};
use baton_sys::channel;
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::{Control, Shared, Worker};
use giver::GiverLink;

/// How long a giver waits for a taker to prepare a connection before it keeps it.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections a taker has prepared or adopted and its application has not taken yet
/// ([`Handoff::adopted`]), over all its links: past it, the taker answers the next offer only
/// once the application takes one. A taker that rebuilds connections slower than givers offer
/// them so slows them down, instead of leaving thousands adopted and unserved.
const ADOPTED_WAITING: usize = 1024;

/// A connection handed to this worker and committed: it serves it from now on. Until this is
/// dropped the worker is not idle ([`Worker::idle`]): count the connection (`Worker::track`)
/// before letting go of it.
#[derive(Debug)]
pub struct Adopted {
    /// The connected socket.
    pub socket: OwnedFd,
    pub kind: ConnectionKind,
    /// What the giver sent with it (see [`ConnectionKind`]).
    pub state: Vec<u8>,
    /// The worker that served it before.
    pub from_worker: u64,
    _held: Busy,
}

/// Handoff work in progress that keeps a worker from being idle: a taker's link open (a giver
/// may still hand it connections), or a connection adopted and not yet counted by the app.
#[derive(Debug)]
struct Busy(Arc<Shared>);

impl Busy {
    fn new(shared: &Arc<Shared>) -> Busy {
        shared.handoff.busy.fetch_add(1, Ordering::AcqRel);
        Busy(shared.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.handoff.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
}

/// A connection no taker took: still the caller's, to serve or drain as before.
#[derive(Debug)]
pub struct Kept {
    pub socket: OwnedFd,
    pub why: KeptBecause,
}

/// Why an offer was not taken.
#[derive(Debug, thiserror::Error)]
pub enum KeptBecause {
    #[error("no worker of the serving generation takes connections")]
    NoTaker,
    #[error("the state is {0} bytes, more than {MAX_STATE_BYTES}")]
    StateTooLarge(usize),
    #[error("the taker refused it: {0}")]
    Refused(String),
    #[error("the taker did not prepare it in time")]
    TimedOut,
    #[error("the handoff deadline passed")]
    DeadlinePassed,
    #[error("the taker went away")]
    TakerGone,
    #[error("sending the offer failed: {0}")]
    Send(#[source] io::Error),
}

/// An offer's turn on a link ([`Handoff::turn`]): the link, and its place among the offers in
/// flight there.
#[derive(Debug)]
pub struct Turn(Arc<GiverLink>, tokio::sync::OwnedSemaphorePermit);

/// This worker's handoff state, in [`Shared`].
#[derive(Debug)]
pub(crate) struct State {
    adopted_tx: mpsc::Sender<Adopted>,
    adopted_rx: tokio::sync::Mutex<mpsc::Receiver<Adopted>>,
    givers: Mutex<Vec<Arc<GiverLink>>>,
    next_link: AtomicUsize,
    next_id: AtomicU64,
    deadline: Mutex<Option<Instant>>,
    counts: Mutex<HandoffCounts>,
    counted: Notify,
    /// See [`Busy`].
    pub(crate) busy: AtomicU64,
    /// The master's drain packet came (its links come before it), or the master is gone: the
    /// links this worker will get as a giver are all here.
    settled: tokio::sync::watch::Sender<bool>,
    /// The connections in line for their turns ([`Handoff::ticket`]).
    line: tickets::Line,
}

impl Default for State {
    fn default() -> Self {
        let (adopted_tx, adopted_rx) = mpsc::channel(ADOPTED_WAITING);
        State {
            adopted_tx,
            adopted_rx: tokio::sync::Mutex::new(adopted_rx),
            givers: Mutex::new(Vec::new()),
            next_link: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            deadline: Mutex::new(None),
            counts: Mutex::new(HandoffCounts::default()),
            counted: Notify::new(),
            busy: AtomicU64::new(0),
            settled: tokio::sync::watch::channel(false).0,
            line: Default::default(),
        }
    }
}

/// This worker's part in connection handoff (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Handoff {
    shared: Arc<Shared>,
}

impl Worker {
    /// Takes part in connection handoff: this worker offers its connections when it drains
    /// (`offers`), and/or takes those of a draining generation (`adopts`). Call it before
    /// [`Worker::ready`]: the master introduces givers to takers that said so.
    pub async fn handoff(&self, offers: bool, adopts: bool) -> io::Result<Handoff> {
        if matches!(self.shared.control, Control::Channel(_)) {
            self.send(&WorkerMessage::Handoff { offers, adopts })
                .await?;
            if offers {
                tokio::spawn(report(self.shared.clone()));
            }
        }
        let handoff = Handoff {
            shared: self.shared.clone(),
        };
        if offers {
            tokio::spawn(tickets::hand_out(handoff.clone()));
        }
        Ok(handoff)
    }
}

impl Handoff {
    /// The next connection handed to this worker, committed: serve it. Waits for one.
    pub async fn adopted(&self) -> Option<Adopted> {
        self.shared.handoff.adopted_rx.lock().await.recv().await
    }

    /// Offers a connection, stopped at a safe point (nothing of it read past `state`, nothing
    /// being written), to a taker. `Ok`: the taker serves it (this copy is closed). `Err`: it
    /// is still this worker's, with why. Offers are spread over the links in turn, at most
    /// the link's rate per second each: this waits for the turn, the connection stopped
    /// meanwhile; [`Handoff::turn`] waits for it while the connection still serves.
    pub async fn offer(
        &self,
        socket: OwnedFd,
        kind: ConnectionKind,
        state: Vec<u8>,
    ) -> Result<(), Kept> {
        match self.turn().await {
            Some(turn) => self.offer_at(turn, socket, kind, state).await,
            None => Err(Kept {
                socket,
                why: KeptBecause::NoTaker,
            }),
        }
    }

    /// Waits for the next offer's turn on a link (spread over the links, at most each one's
    /// rate per second): a connection waits for it while it still serves, then stops at its
    /// next safe point and goes with [`Handoff::offer_at`]. `None`: no taker.
    pub async fn turn(&self) -> Option<Turn> {
        let link = self.shared.handoff.next_giver()?;
        link.wait_for_pace().await;
        let place = link.in_flight.clone().acquire_owned().await.ok()?;
        Some(Turn(link, place))
    }

    /// [`Handoff::offer`] at a turn already waited for.
    pub async fn offer_at(
        &self,
        turn: Turn,
        socket: OwnedFd,
        kind: ConnectionKind,
        state: Vec<u8>,
    ) -> Result<(), Kept> {
        let keep = |socket, why| Err(Kept { socket, why });
        if state.len() > MAX_STATE_BYTES {
            return keep(socket, KeptBecause::StateTooLarge(state.len()));
        }
        let handoff = &self.shared.handoff;
        let deadline = *handoff.deadline.lock().unwrap_or_else(|e| e.into_inner());
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return keep(socket, KeptBecause::DeadlinePassed);
        }
        // Its place among the offers in flight is held until the offer is decided.
        let Turn(link, _place) = turn;
        if link.is_gone() {
            return keep(socket, KeptBecause::TakerGone);
        }
        let id = handoff.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let wait = deadline.map_or(OFFER_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
                .min(OFFER_TIMEOUT)
        });
        // The link's task decides it from now on (`giver.rs`), and always answers: an offer it
        // drops undecided comes back kept.
        let (offer, decided) = giver::Offer::new(id, kind, state, Instant::now() + wait, socket);
        link.queue(offer);
        match decided.await {
            Ok(giver::Decided::Committed) => Ok(()),
            Ok(giver::Decided::Kept(socket, why)) => keep(socket, why),
            Err(_) => {
                // Cannot be: an `Offer` answers when it drops. Its socket went with it.
                warn!("offer {id} was dropped undecided: its connection is closed");
                Ok(())
            }
        }
    }

    /// Waits until this worker knows its takers: the master's drain packet came (the links
    /// come before it; a drain signal alone may arrive first), the master is gone, or a drain
    /// signal came 2 s ago with no packet behind it (a `kill` the master did not send: no
    /// links will come). A worker without a channel (systemd's protocol) never gets links: it
    /// returns at once.
    pub async fn settled(&self) {
        if !matches!(self.shared.control, Control::Channel(_)) {
            return;
        }
        let mut settled = self.shared.handoff.settled.subscribe();
        let _ = settled.wait_for(|s| *s).await;
    }

    /// Whether [`Handoff::settled`] would return at once.
    pub fn is_settled(&self) -> bool {
        !matches!(self.shared.control, Control::Channel(_)) || *self.shared.handoff.settled.borrow()
    }

    /// How many takers this worker can offer to now (links the master made, still open).
    pub fn takers(&self) -> usize {
        let givers = self
            .shared
            .handoff
            .givers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        givers.iter().filter(|l| !l.is_gone()).count()
    }

    /// Sends this worker's counts to the master now (a giver about to exit: the reports are
    /// otherwise sent at most every 200 ms, and the last one could be lost with the process).
    pub async fn report_now(&self) {
        if let Control::Channel(channel) = &self.shared.control {
            let packet = baton_proto::encode(&WorkerMessage::HandoffReport(self.counts()));
            let _ = channel.send(&packet).await;
        }
    }

    /// This worker's counts as a giver so far.
    pub fn counts(&self) -> HandoffCounts {
        *self
            .shared
            .handoff
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// The giver's links are all here (see [`Handoff::settled`]).
    pub(crate) fn settle(&self) {
        self.settled.send_replace(true);
    }

    fn count(&self, f: impl FnOnce(&mut HandoffCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
        self.counted.notify_one();
    }

    /// The next open giver link, in turn.
    fn next_giver(&self) -> Option<Arc<GiverLink>> {
        let givers = self.givers.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<&Arc<GiverLink>> = givers.iter().filter(|l| !l.is_gone()).collect();
        if open.is_empty() {
            return None;
        }
        let turn = self.next_link.fetch_add(1, Ordering::Relaxed);
        Some(open[turn % open.len()].clone())
    }

    /// An open giver link whose next offer is due now (`Ok(Some)`, its slot taken), no link at
    /// all (`Ok(None)`), or when the first of them will be due (`Err`): for one task handing
    /// out turns as they come due, rather than each connection sleeping until its own.
    fn due_giver(&self) -> Result<Option<Arc<GiverLink>>, Instant> {
        let givers = self.givers.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<&Arc<GiverLink>> = givers.iter().filter(|l| !l.is_gone()).collect();
        if open.is_empty() {
            return Ok(None);
        }
        let start = self.next_link.fetch_add(1, Ordering::Relaxed);
        let mut earliest: Option<Instant> = None;
        for i in 0..open.len() {
            let link = open[(start + i) % open.len()];
            match link.take_slot_if_due() {
                None => return Ok(Some(link.clone())),
                Some(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
            }
        }
        Err(earliest.unwrap_or_else(Instant::now))
    }
}

/// The runtime that serves this process's handoff links, on a thread of its own (`None`: the
/// thread could not be started). A handoff is three packets between two workers (offer,
/// prepared, commit: for one connection or a batch), each of which would wait for its task's
/// turn: on a worker busy with thousands of connections, behind all the
/// others that are ready, several times over. On this thread the exchange waits for nothing:
/// only the connection's own rebuilding, in the taker, runs with the rest.
fn link_runtime() -> Option<&'static tokio::runtime::Handle> {
    static LINKS: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    LINKS
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .inspect_err(|err| warn!("no runtime for handoff links: {err}"))
                .ok()?;
            let handle = runtime.handle().clone();
            std::thread::Builder::new()
                .name("baton-handoff".into())
                .spawn(move || runtime.block_on(std::future::pending::<()>()))
                .inspect_err(|err| warn!("no thread for handoff links: {err}"))
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// A link's end arrived from the master: a giver keeps it for its offers, a taker serves it.
/// Its packets are read on the links' own thread ([`link_runtime`]), or, without it, with the
/// worker's tasks.
pub(crate) fn on_link(shared: &Arc<Shared>, link: HandoffLink, fd: OwnedFd) {
    let runtime = link_runtime()
        .cloned()
        .unwrap_or_else(tokio::runtime::Handle::current);
    let registered = {
        let _on = runtime.enter();
        channel::into_async(fd)
    };
    let socket = match registered {
        Ok(socket) => socket,
        Err(err) => {
            warn!("handoff link {} unusable: {err}", link.link);
            return;
        }
    };
    match link.role {
        HandoffRole::Giver => {
            let giver = Arc::new(GiverLink::new(link.peer, link.max_per_second));
            let state = &shared.handoff;
            let deadline = Instant::now() + Duration::from_millis(link.deadline_ms);
            let mut d = state.deadline.lock().unwrap_or_else(|e| e.into_inner());
            *d = Some(d.map_or(deadline, |d| d.min(deadline)));
            drop(d);
            state
                .givers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(giver.clone());
            runtime.spawn(giver::serve(giver, socket, shared.clone()));
        }
        HandoffRole::Taker => {
            // Not idle while the link is open: a giver may still hand over a connection.
            let open = Busy::new(shared);
            runtime.spawn(taker::serve(socket, link.peer, shared.clone(), open));
        }
    }
}

/// Reports a giver's counts when they change, at most every [`crate::channel::REPORT_INTERVAL`].
async fn report(shared: Arc<Shared>) {
    let Control::Channel(channel) = &shared.control else {
        return;
    };
    let mut last = HandoffCounts::default();
    loop {
        let notified = shared.handoff.counted.notified();
        let now = *shared
            .handoff
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if now != last {
            let packet = baton_proto::encode(&WorkerMessage::HandoffReport(now));
            if channel.send(&packet).await.is_err() {
                return;
            }
            last = now;
            tokio::time::sleep(crate::channel::REPORT_INTERVAL).await;
            continue;
        }
        notified.await;
    }
}

mod frames;
mod giver;
#[cfg(feature = "hyper")]
pub mod http1;
mod taker;
#[cfg(test)]
mod tests;
mod tickets;
#[cfg(feature = "tungstenite")]
pub mod websocket;

pub use frames::{FrameBounded, MAX_FRAME, frame_len};
pub use tickets::Ticket;

/// A stream that yields `prefix` before what it reads from `inner`: an adopted connection with
/// the bytes its giver had read and not consumed (the start of the next request or frame).
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            at: 0,
            inner,
        }
    }

    /// The stream, and the part of the prefix not read yet.
    pub fn into_parts(self) -> (Vec<u8>, S) {
        (self.prefix[self.at..].to_vec(), self.inner)
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
