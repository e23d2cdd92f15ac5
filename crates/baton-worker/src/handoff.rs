//! Connection handoff, the worker's side (`docs/protocol.md`, "Connection handoff"): a draining
//! worker offers its connections at safe points to workers of the serving generation, which
//! take them over, so a reload disconnects nobody.
//!
//! [`Worker::handoff`] says what this worker does (before `ready`). A **taker** reads
//! [`Handoff::adopted`]: each item is a connection committed to it, to serve from the state it
//! came with. A **giver**, once its drain is requested, hands each connection it can take apart
//! to [`Handoff::offer`]: `Ok` means the taker serves it now (the giver's copy is closed);
//! `Err(Kept)` gives it back, to drain as before. The SDK runs the exchange on the links the
//! master made (offer, prepared, commit or abort) and keeps the rule that one process serves a
//! connection at every moment, whoever dies when.
//!
//! Workers speaking systemd's protocol have no channel, hence no links: every offer is kept.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::handoff::LinkMessage;
pub use baton_proto::handoff::{ConnectionKind, HandoffCounts, MAX_STATE_BYTES, WebSocketState};
use baton_proto::{HandoffLink, HandoffRole, MAX_MESSAGE_SIZE, WorkerMessage};
use baton_sys::channel;
use tokio::net::UnixDatagram;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, warn};

use crate::faults::{self, Point};
use crate::{Control, Shared, Worker};

/// How long a giver waits for a taker to prepare a connection before it keeps it.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections a taker holds prepared (not committed) on one link at most: past it, it refuses.
/// A giver paced at `max_per_second` has about that many times the round trip in flight.
const MAX_PREPARED: usize = 4096;

/// Connections a taker has prepared or adopted and its application has not taken yet
/// ([`Handoff::adopted`]), over all its links: past it, the taker answers the next offer only
/// once the application takes one. A taker that rebuilds connections slower than givers offer
/// them so slows them down, instead of leaving thousands adopted and unserved.
const ADOPTED_WAITING: usize = 1024;

/// Offers a giver has waiting for an answer on one link at most: the next connection waits
/// for its turn ([`Handoff::turn`]) while it serves, not stopped in a taker's queue.
const IN_FLIGHT: usize = 256;

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

/// How an offer ended, as the giver's link task saw it.
enum Reply {
    /// The taker prepared it and the commit went: the taker serves it.
    Committed,
    Refused(String),
    /// The taker prepared it, and its end closed before the commit could go.
    TakerGone,
}

/// A giver's end of one link.
struct GiverLink {
    socket: UnixDatagram,
    peer: u64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    gone: std::sync::atomic::AtomicBool,
    /// When the next offer may go (`max_per_second`: evenly spaced, not in bursts).
    pace: Mutex<Instant>,
    max_per_second: u32,
    /// Places for offers in flight ([`IN_FLIGHT`]).
    in_flight: Arc<tokio::sync::Semaphore>,
}

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
}

impl std::fmt::Debug for GiverLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GiverLink")
            .field("peer", &self.peer)
            .finish()
    }
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
        Ok(Handoff {
            shared: self.shared.clone(),
        })
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
        if link.gone.load(Ordering::Acquire) {
            return keep(socket, KeptBecause::TakerGone);
        }
        let id = handoff.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        link.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let offer = baton_proto::encode(&LinkMessage::Offer { id, kind, state });
        if let Err(err) = channel::send_with_fds(&link.socket, &offer, &[socket.as_fd()]).await {
            link.forget(id);
            return keep(socket, KeptBecause::Send(err));
        }
        handoff.count(|c| c.offered += 1);
        if faults::check(Point::GiverOffered) {
            faults::exit_at(Point::GiverOffered);
        }
        let wait = deadline.map_or(OFFER_TIMEOUT, |d| {
            d.saturating_duration_since(Instant::now())
                .min(OFFER_TIMEOUT)
        });
        let mut rx = rx;
        let reply = match tokio::time::timeout(wait, &mut rx).await {
            Ok(reply) => reply,
            // Not answered in time, unless the link's task took the offer out of the waiting
            // ones just now (it answered: its word stands).
            Err(_) if link.forget(id) => {
                // In order on the link: the taker reads this before anything else of ours.
                let abort = baton_proto::encode(&LinkMessage::Abort { id });
                let _ = link.socket.send(&abort).await;
                handoff.count(|c| c.kept += 1);
                return keep(socket, KeptBecause::TimedOut);
            }
            Err(_) => rx.await,
        };
        let outcome = match reply {
            // The commit went (the link's task sent it): the taker serves it. This copy, not
            // read since the offer, closes now.
            Ok(Reply::Committed) => {
                drop(socket);
                return Ok(());
            }
            Ok(Reply::Refused(reason)) => KeptBecause::Refused(reason),
            // The link ended (the taker went) before it prepared, or before the commit could
            // go: its copy is closed, the connection stays here.
            Ok(Reply::TakerGone) | Err(_) => KeptBecause::TakerGone,
        };
        handoff.count(|c| c.kept += 1);
        keep(socket, outcome)
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
        givers
            .iter()
            .filter(|l| !l.gone.load(Ordering::Acquire))
            .count()
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
        let open: Vec<&Arc<GiverLink>> = givers
            .iter()
            .filter(|l| !l.gone.load(Ordering::Acquire))
            .collect();
        if open.is_empty() {
            return None;
        }
        let turn = self.next_link.fetch_add(1, Ordering::Relaxed);
        Some(open[turn % open.len()].clone())
    }
}

impl GiverLink {
    /// Takes offer `id` out of those waiting for an answer; whether it was there.
    fn forget(&self, id: u64) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .is_some()
    }

    /// Waits for this offer's turn: offers on a link go evenly spaced at `max_per_second`
    /// (0: no limit), so a drain of thousands does not send them all in one burst.
    async fn wait_for_pace(&self) {
        if self.max_per_second == 0 {
            return;
        }
        let gap = Duration::from_secs(1) / self.max_per_second;
        let at = {
            let mut next = self.pace.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + gap;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// The runtime that serves this process's handoff links, on a thread of its own (`None`: the
/// thread could not be started). A handoff is four packets between two workers, each of which
/// waits for its task's turn: on a worker busy with thousands of connections, behind all the
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
            let giver = Arc::new(GiverLink {
                socket,
                peer: link.peer,
                pending: Mutex::new(HashMap::new()),
                gone: std::sync::atomic::AtomicBool::new(false),
                pace: Mutex::new(Instant::now()),
                max_per_second: link.max_per_second,
                in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            });
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
            runtime.spawn(read_replies(giver, shared.clone()));
        }
        HandoffRole::Taker => {
            // Not idle while the link is open: a giver may still hand over a connection.
            let open = Busy::new(shared);
            runtime.spawn(take(socket, link.peer, shared.clone(), open));
        }
    }
}

/// A giver's link: the taker's answers, until the link ends (then every offer waiting is
/// answered by its end: kept). A `prepared` is committed here at once, not by the offer's
/// task (which is woken after, and closes its copy, not read since the offer).
async fn read_replies(link: Arc<GiverLink>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    loop {
        let got = match channel::recv_with_fds(&link.socket, &mut buf, 1).await {
            Ok(got) if got.len > 0 => got,
            _ => break,
        };
        let (id, answer) = match baton_proto::decode::<LinkMessage>(&buf[..got.len]) {
            Ok(LinkMessage::Prepared { id }) => (id, None),
            Ok(LinkMessage::Refused { id, reason }) => (id, Some(Reply::Refused(reason))),
            _ => continue,
        };
        // Not waiting (it timed out and was aborted, or the id is not ours): nothing to do.
        let Some(waiting) = link
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        else {
            continue;
        };
        let reply = match answer {
            Some(refused) => refused,
            None => {
                if faults::check(Point::GiverCommit) {
                    faults::exit_at(Point::GiverCommit);
                }
                // Sent, the commit makes it the taker's: it serves it on `commit`, and on the
                // link's end once it prepared it. Not sent, the taker's end is closed (it went
                // before the commit): the connection stays with the giver.
                let commit = baton_proto::encode(&LinkMessage::Commit { id });
                if link.socket.send(&commit).await.is_ok() {
                    shared.handoff.count(|c| c.adopted += 1);
                    Reply::Committed
                } else {
                    Reply::TakerGone
                }
            }
        };
        let _ = waiting.send(reply);
    }
    link.gone.store(true, Ordering::Release);
    link.pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    debug!("handoff link to worker {} ended", link.peer);
}

/// A taker's link: offers prepared, then committed or aborted; when the link ends, every
/// connection prepared and not aborted is served (the giver served none of them since).
async fn take(link: UnixDatagram, from: u64, shared: Arc<Shared>, open: Busy) {
    let adopted = shared.handoff.adopted_tx.clone();
    // Each prepared connection holds its place in the application's queue (`ADOPTED_WAITING`).
    type Place = mpsc::OwnedPermit<Adopted>;
    let mut prepared: HashMap<u64, (OwnedFd, ConnectionKind, Vec<u8>, Place)> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let answer = |message: LinkMessage| baton_proto::encode(&message);
    let deliver = |(socket, kind, state, place): (OwnedFd, ConnectionKind, Vec<u8>, Place)| {
        place.send(Adopted {
            socket,
            kind,
            state,
            from_worker: from,
            _held: Busy::new(&shared),
        });
    };
    // The giver is gone (its end closed): no answer is sent, what it sent is still read.
    let mut giver_gone = false;
    let ended_cleanly = loop {
        let got = match channel::recv_with_fds(&link, &mut buf, 1).await {
            Ok(got) if got.len == 0 => break true,
            Ok(got) => got,
            // A giver that dies with answers of ours unread resets the link, and the kernel
            // reports that before the packets it had sent: read on (the offers in flight, with
            // their descriptors, are still to come), then its end.
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset && !giver_gone => {
                giver_gone = true;
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => break true,
            Err(err) => {
                warn!("handoff link from worker {from}: {err}");
                break false;
            }
        };
        let mut fds = got.fds;
        match baton_proto::decode::<LinkMessage>(&buf[..got.len]) {
            Ok(LinkMessage::Offer { id, kind, state }) => {
                let refusal = if faults::check(Point::TakerOffer) {
                    Some("refused by a fault point".to_string())
                } else if got.truncated || got.fds_truncated || fds.len() != 1 {
                    Some("an offer carries exactly one descriptor".to_string())
                } else if kind == ConnectionKind::Unknown {
                    Some("a kind of connection this worker does not know".into())
                } else if state.len() > MAX_STATE_BYTES {
                    Some(format!("state larger than {MAX_STATE_BYTES} bytes"))
                } else if prepared.contains_key(&id) {
                    Some(format!("offer {id} is prepared already"))
                } else if prepared.len() >= MAX_PREPARED {
                    Some("too many connections in flight".into())
                } else if adopted.is_closed() {
                    Some("this worker no longer adopts".into())
                } else if !is_connected_stream(&fds[0]) {
                    Some("the descriptor is not a connected stream socket".into())
                } else {
                    None
                };
                // A place in the application's queue, waited for when it is full: the answer
                // waits with it, and so does the giver's next offer.
                let place = match refusal {
                    Some(reason) => Err(reason),
                    None => adopted
                        .clone()
                        .reserve_owned()
                        .await
                        .map_err(|_| "this worker no longer adopts".to_string()),
                };
                let reply = match place {
                    Err(reason) => {
                        fds.clear();
                        LinkMessage::Refused { id, reason }
                    }
                    Ok(place) => {
                        prepared.insert(id, (fds.remove(0), kind, state, place));
                        LinkMessage::Prepared { id }
                    }
                };
                let prepares = matches!(reply, LinkMessage::Prepared { .. });
                if !giver_gone && link.send(&answer(reply)).await.is_err() {
                    giver_gone = true;
                }
                if prepares && faults::check(Point::TakerPrepared) {
                    faults::exit_at(Point::TakerPrepared);
                }
            }
            Ok(LinkMessage::Commit { id }) => {
                if let Some(connection) = prepared.remove(&id) {
                    deliver(connection);
                }
            }
            Ok(LinkMessage::Abort { id }) => {
                prepared.remove(&id);
            }
            // Anything else (a descriptor on another packet is closed as it drops).
            _ => {}
        }
    };
    if ended_cleanly {
        prepared.into_values().for_each(deliver);
    } else if !prepared.is_empty() {
        // The link broke without its end: whether the giver kept them is unknown. Closing our
        // copies leaves them to the giver, which reads this link's end and serves them on.
        warn!(
            "handoff link from worker {from} broke: {} prepared connections left to it",
            prepared.len()
        );
    }
    drop(open);
}

/// Whether `fd` is a connected stream socket (TCP or Unix).
fn is_connected_stream(fd: &OwnedFd) -> bool {
    baton_sys::channel::socket_kind(fd.as_fd())
        .is_ok_and(|k| k.sock_type == baton_sys::channel::SockType::Stream && !k.listening)
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
#[cfg(feature = "hyper")]
pub mod http1;
#[cfg(test)]
mod tests;
#[cfg(feature = "tungstenite")]
pub mod websocket;

pub use frames::{FrameBounded, MAX_FRAME, frame_len};

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
