//! A giver's end of a handoff link. An offer is the link's from the moment it is queued, socket
//! and all, until it is decided: committed (the taker serves it; the socket closes here) or kept
//! (the socket goes back to the offering task, to serve on). The link's own task sends the
//! offers, reads the answers, commits, and keeps what is not answered in time, so every offer is
//! decided in one place, whoever dies when.
//!
//! A taker that says it takes batches (`takes_batches`) gets the offers queued within [`GATHER`]
//! of each other in one packet (`offers`, up to [`MAX_BATCH`]), answered in one (`answers`) and
//! committed in one (`commits`): three packets for a batch instead of three per connection, and
//! as few wake-ups of either side. Other takers get one `offer` at a time.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::MAX_MESSAGE_SIZE;
use baton_proto::handoff::{ConnectionKind, LinkMessage, MAX_BATCH, Offered};
use baton_sys::channel;
use tokio::net::UnixDatagram;
use tokio::sync::{Notify, Semaphore, oneshot};
use tracing::debug;

use super::KeptBecause;
use crate::Shared;
use crate::faults::{self, Point};

/// How long the first offer queued on a link waits for others to join it in one packet (for a
/// taker that takes batches). A connection is stopped meanwhile: this is part of its pause.
pub(super) const GATHER: Duration = Duration::from_millis(5);

/// Offers a giver has waiting for an answer on one link at most: the next connection waits
/// for its turn ([`super::Handoff::turn`]) while it serves, not stopped in a taker's queue.
pub(super) const IN_FLIGHT: usize = 256;

/// How far behind its pace a link may be and still catch up ([`GiverLink::take_slot_if_due`]).
const CATCH_UP: Duration = Duration::from_millis(10);

/// Bytes of an `offers` packet at most, below the packet limit with room for the JSON around
/// the states.
const BATCH_BYTES: usize = MAX_MESSAGE_SIZE - 4096;

/// How an offer ended.
pub(super) enum Decided {
    /// The commit went: the taker serves it (the giver's copy is closed).
    Committed,
    /// The giver serves on.
    Kept(OwnedFd, KeptBecause),
}

/// An offer, the link's until decided. Dropped undecided (the link's task ended), it is kept:
/// its socket goes back to the offering task.
pub(super) struct Offer {
    id: u64,
    kind: ConnectionKind,
    state: Vec<u8>,
    /// Kept if not answered by then (with an `abort` if it was sent).
    answer_by: Instant,
    /// Some until decided.
    socket: Option<OwnedFd>,
    decided: Option<oneshot::Sender<Decided>>,
}

impl Offer {
    pub(super) fn new(
        id: u64,
        kind: ConnectionKind,
        state: Vec<u8>,
        answer_by: Instant,
        socket: OwnedFd,
    ) -> (Offer, oneshot::Receiver<Decided>) {
        let (tx, rx) = oneshot::channel();
        let offer = Offer {
            id,
            kind,
            state,
            answer_by,
            socket: Some(socket),
            decided: Some(tx),
        };
        (offer, rx)
    }

    fn keep(mut self, why: KeptBecause) {
        self.decide_kept(why);
    }

    fn decide_kept(&mut self, why: KeptBecause) {
        if let (Some(socket), Some(to)) = (self.socket.take(), self.decided.take()) {
            // An offering task that is gone no longer serves it: the socket closes.
            let _ = to.send(Decided::Kept(socket, why));
        }
    }

    fn commit(mut self) {
        drop(self.socket.take());
        if let Some(to) = self.decided.take() {
            let _ = to.send(Decided::Committed);
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.socket.as_ref().map(|s| s.as_fd())
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        self.decide_kept(KeptBecause::TakerGone);
    }
}

/// A giver's end of one link.
pub(super) struct GiverLink {
    pub(super) peer: u64,
    gone: AtomicBool,
    /// When the next offer may go (`max_per_second`: evenly spaced, not in bursts).
    pace: Mutex<Instant>,
    max_per_second: u32,
    /// Places for offers in flight ([`IN_FLIGHT`]).
    pub(super) in_flight: Arc<Semaphore>,
    /// Offers queued for the link's task.
    outbox: Mutex<Vec<Offer>>,
    queued: Notify,
}

impl std::fmt::Debug for GiverLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GiverLink")
            .field("peer", &self.peer)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl GiverLink {
    pub(super) fn new(peer: u64, max_per_second: u32) -> GiverLink {
        GiverLink {
            peer,
            gone: AtomicBool::new(false),
            pace: Mutex::new(Instant::now()),
            max_per_second,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            outbox: Mutex::new(Vec::new()),
            queued: Notify::new(),
        }
    }

    /// The link ended (the taker went): no offer goes on it.
    pub(super) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Hands an offer to the link's task, which decides it; on a link that ended, it is kept
    /// at once.
    pub(super) fn queue(&self, offer: Offer) {
        let mut outbox = lock(&self.outbox);
        if self.is_gone() {
            drop(outbox);
            offer.keep(KeptBecause::TakerGone);
            return;
        }
        outbox.push(offer);
        if outbox.len() == 1 {
            self.queued.notify_one();
        }
    }

    /// Takes the link's next slot if it is due (`None`), or says when it will be. Slots missed
    /// by less than [`CATCH_UP`] are taken one after the other (a caller woken by a timer of 1 ms
    /// grain finds several due); past that, the pace starts again from now, not with a burst.
    pub(super) fn take_slot_if_due(&self) -> Option<Instant> {
        if self.max_per_second == 0 {
            return None;
        }
        let gap = Duration::from_secs(1) / self.max_per_second;
        let mut next = lock(&self.pace);
        let now = Instant::now();
        if *next + CATCH_UP < now {
            *next = now;
        }
        if *next <= now {
            *next += gap;
            None
        } else {
            Some(*next)
        }
    }

    /// Waits for this offer's turn: offers on a link go evenly spaced at `max_per_second`
    /// (0: no limit), so a drain of thousands does not send them all in one burst.
    pub(super) async fn wait_for_pace(&self) {
        if self.max_per_second == 0 {
            return;
        }
        let gap = Duration::from_secs(1) / self.max_per_second;
        let at = {
            let mut next = lock(&self.pace);
            let at = (*next).max(Instant::now());
            *next = at + gap;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

/// The task of a giver's link: sends what is queued, reads the taker's answers, commits what
/// it prepared, keeps what it refused or did not answer in time, until the link ends (then
/// every offer still undecided is kept: the taker went before the commit could reach it).
pub(super) async fn serve(link: Arc<GiverLink>, socket: UnixDatagram, shared: Arc<Shared>) {
    let mut giving = Giving {
        socket,
        shared,
        offered: HashMap::new(),
        answer_by: VecDeque::new(),
        most: 1,
    };
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    loop {
        let next_deadline = giving.next_deadline();
        tokio::select! {
            got = channel::recv_with_fds(&giving.socket, &mut buf, 1) => match got {
                Ok(got) if got.len > 0 => giving.on_packet(&buf[..got.len]).await,
                _ => break,
            },
            () = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now).into()),
                if next_deadline.is_some() => giving.abort_late().await,
            () = link.queued.notified() => {
                // What the taker sent first (its `takes_batches`, its answers) counts before
                // the next offers go.
                if !giving.read_waiting(&mut buf).await {
                    break;
                }
                if giving.most > 1 {
                    tokio::time::sleep(GATHER).await;
                }
                let queued = std::mem::take(&mut *lock(&link.outbox));
                giving.offer(queued).await;
            }
        }
    }
    link.gone.store(true, Ordering::Release);
    // Queued and never sent: the giver's, as they were (not counted: never offered).
    let never_sent = std::mem::take(&mut *lock(&link.outbox));
    drop(never_sent);
    for (_, offer) in giving.offered.drain() {
        kept(&giving.shared, offer, KeptBecause::TakerGone);
    }
    debug!("handoff link to worker {} ended", link.peer);
}

/// What a giver's link task holds.
struct Giving {
    socket: UnixDatagram,
    shared: Arc<Shared>,
    /// The offers sent and not answered.
    offered: HashMap<u64, Offer>,
    /// The same, by when they must be answered (the order they were queued in).
    answer_by: VecDeque<(Instant, u64)>,
    /// How many connections the taker takes in one packet (1: single `offer`s).
    most: usize,
}

impl Giving {
    /// When the first offer still unanswered must be answered.
    fn next_deadline(&mut self) -> Option<Instant> {
        while self
            .answer_by
            .front()
            .is_some_and(|(_, id)| !self.offered.contains_key(id))
        {
            self.answer_by.pop_front();
        }
        self.answer_by.front().map(|&(at, _)| at)
    }

    /// One packet from the taker.
    async fn on_packet(&mut self, packet: &[u8]) {
        match baton_proto::decode::<LinkMessage>(packet) {
            Ok(LinkMessage::TakesBatches { most }) => self.most = most.clamp(1, MAX_BATCH),
            Ok(LinkMessage::Prepared { id }) => {
                let ready: Vec<Offer> = self.offered.remove(&id).into_iter().collect();
                commit(&self.socket, &self.shared, ready, false).await;
            }
            Ok(LinkMessage::Refused { id, reason }) => {
                if let Some(offer) = self.offered.remove(&id) {
                    kept(&self.shared, offer, KeptBecause::Refused(reason));
                }
            }
            Ok(LinkMessage::Answers { prepared, refused }) => {
                for refusal in refused {
                    if let Some(offer) = self.offered.remove(&refusal.id) {
                        kept(&self.shared, offer, KeptBecause::Refused(refusal.reason));
                    }
                }
                let ready = prepared
                    .iter()
                    .filter_map(|id| self.offered.remove(id))
                    .collect();
                commit(&self.socket, &self.shared, ready, true).await;
            }
            // Not for a giver, or not known: nothing to do.
            _ => {}
        }
    }

    /// Reads the packets the taker sent that are waiting now, without waiting for more.
    /// `false`: the link ended.
    async fn read_waiting(&mut self, buf: &mut [u8]) -> bool {
        loop {
            match channel::try_recv(self.socket.as_fd(), buf) {
                Ok(got) if got.len > 0 => self.on_packet(&buf[..got.len]).await,
                Ok(_) => return false,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Aborts and keeps the offers not answered in time.
    async fn abort_late(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.answer_by.front()
            && at <= now
        {
            self.answer_by.pop_front();
            if let Some(offer) = self.offered.remove(&id) {
                // In order on the link: the taker reads this before anything else of ours.
                let abort = baton_proto::encode(&LinkMessage::Abort { id });
                let _ = self.socket.send(&abort).await;
                kept(&self.shared, offer, KeptBecause::TimedOut);
            }
        }
    }

    /// Sends the offers queued, in packets, and waits for their answers.
    async fn offer(&mut self, queued: Vec<Offer>) {
        let as_batch = self.most > 1;
        for batch in batches(queued, self.most) {
            for offer in send(&self.socket, &self.shared, batch, as_batch).await {
                self.answer_by.push_back((offer.answer_by, offer.id));
                self.offered.insert(offer.id, offer);
            }
        }
    }
}

/// The offers queued, in packets: up to `most` connections and [`BATCH_BYTES`] of states each
/// (an offer whose state is past its answer time is kept, unsent).
fn batches(queued: Vec<Offer>, most: usize) -> Vec<Vec<Offer>> {
    let now = Instant::now();
    let mut all: Vec<Vec<Offer>> = Vec::new();
    let mut bytes = 0;
    for offer in queued {
        if offer.answer_by <= now {
            offer.keep(KeptBecause::TimedOut);
            continue;
        }
        // base64 makes 4 bytes of 3, and each entry has its id and kind around it.
        let size = offer.state.len().div_ceil(3) * 4 + 64;
        match all.last_mut() {
            Some(batch) if batch.len() < most && bytes + size <= BATCH_BYTES => {
                bytes += size;
                batch.push(offer);
            }
            _ => {
                bytes = size;
                all.push(vec![offer]);
            }
        }
    }
    all
}

/// Sends one packet of offers (`offers`, or one `offer` for a taker that takes no batches); the
/// offers sent, waiting for their answer. Not sent in time or at all, they are kept.
async fn send(
    socket: &UnixDatagram,
    shared: &Shared,
    mut batch: Vec<Offer>,
    as_batch: bool,
) -> Vec<Offer> {
    let packet = if as_batch {
        let offers = batch
            .iter_mut()
            .map(|o| Offered {
                id: o.id,
                kind: o.kind,
                state: std::mem::take(&mut o.state),
            })
            .collect();
        baton_proto::encode(&LinkMessage::Offers { offers })
    } else {
        let Some(o) = batch.first_mut() else {
            return batch;
        };
        baton_proto::encode(&LinkMessage::Offer {
            id: o.id,
            kind: o.kind,
            state: std::mem::take(&mut o.state),
        })
    };
    let fds: Vec<BorrowedFd<'_>> = batch.iter().filter_map(Offer::fd).collect();
    let by = batch
        .iter()
        .map(|o| o.answer_by)
        .min()
        .unwrap_or_else(Instant::now);
    let sent =
        tokio::time::timeout_at(by.into(), channel::send_with_fds(socket, &packet, &fds)).await;
    drop(fds);
    match sent {
        Ok(Ok(())) => {
            shared.handoff.count(|c| c.offered += batch.len() as u64);
            // Once per connection, as if each had gone alone.
            for _ in &batch {
                if faults::check(Point::GiverOffered) {
                    faults::exit_at(Point::GiverOffered);
                }
            }
            batch
        }
        Ok(Err(err)) => {
            for offer in batch {
                offer.keep(KeptBecause::Send(io::Error::new(
                    err.kind(),
                    err.to_string(),
                )));
            }
            Vec::new()
        }
        Err(_) => {
            batch
                .into_iter()
                .for_each(|o| o.keep(KeptBecause::TimedOut));
            Vec::new()
        }
    }
}

/// Commits the offers the taker prepared (`commits`, or `commit` for one answered alone).
/// Sent, the commit makes them the taker's: it serves them on `commit`, and on the link's end
/// once it prepared them. Not sent, the taker's end is closed (it went before the commit):
/// they stay with the giver.
async fn commit(socket: &UnixDatagram, shared: &Shared, ready: Vec<Offer>, as_batch: bool) {
    if ready.is_empty() {
        return;
    }
    // Once per connection (a `sleep` action slows each one, as if each went alone).
    for _ in &ready {
        if faults::check(Point::GiverCommit) {
            faults::exit_at(Point::GiverCommit);
        }
    }
    let packet = match ready.as_slice() {
        [one] if !as_batch => baton_proto::encode(&LinkMessage::Commit { id: one.id }),
        _ => baton_proto::encode(&LinkMessage::Commits {
            ids: ready.iter().map(|o| o.id).collect(),
        }),
    };
    if socket.send(&packet).await.is_ok() {
        shared.handoff.count(|c| c.adopted += ready.len() as u64);
        ready.into_iter().for_each(Offer::commit);
    } else {
        for offer in ready {
            kept(shared, offer, KeptBecause::TakerGone);
        }
    }
}

/// An offer sent and not taken: the giver serves on.
fn kept(shared: &Shared, offer: Offer, why: KeptBecause) {
    shared.handoff.count(|c| c.kept += 1);
    offer.keep(why);
}
