//! A giver's connections in line for their turns ([`Handoff::ticket`]). When the worker drains,
//! one task hands out the turns, one connection at a time at the links' pace: each connection's
//! task is woken once, at its turn. Without tickets every connection's task wakes when the drain
//! is requested, again when the links are settled, and again at its turn: on a worker holding
//! thousands, the first two are thousands of tasks run at once, and the connections still
//! serving wait behind them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::{Handoff, Turn};
use crate::{DrainWatch, Shared};

/// The connections waiting for their turn, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Line {
    waiting: Mutex<BTreeMap<u64, oneshot::Sender<Option<Turn>>>>,
    next: AtomicU64,
    joined: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place in line for its turn to be offered ([`Handoff::ticket`]). Dropped, it
/// leaves the line.
#[derive(Debug)]
pub struct Ticket {
    place: u64,
    turn: oneshot::Receiver<Option<Turn>>,
    shared: Arc<Shared>,
}

impl Ticket {
    /// Resolves at this connection's turn, once the worker drains and knows its takers: `Some`,
    /// offer it ([`Handoff::offer_at`]) at its next safe point; `None`, there is no taker (it
    /// drains as before). Cancel-safe: wait for it in a `select!` while the connection serves.
    pub async fn turn(&mut self) -> Option<Turn> {
        (&mut self.turn).await.ok().flatten()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.shared.handoff.line.waiting).remove(&self.place);
    }
}

impl Handoff {
    /// A place in line for this connection's turn to be offered when the worker drains: take
    /// one when the connection opens (or is adopted), and wait for [`Ticket::turn`] while it
    /// serves. The turns come one at a time at the links' pace, in the order the tickets were
    /// taken, and only to a worker that offers ([`crate::Worker::handoff`]).
    pub fn ticket(&self) -> Ticket {
        let line = &self.shared.handoff.line;
        let place = line.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&line.waiting).insert(place, tx);
        line.joined.notify_one();
        Ticket {
            place,
            turn: rx,
            shared: self.shared.clone(),
        }
    }
}

/// Hands out the turns once the worker drains: to each ticket in line, oldest first, the next
/// turn (the next link whose pace allows one, and a place among its offers in flight), or
/// `None` to every one once there is no taker. Runs for the worker's life (tickets taken after
/// the drain, by connections adopted late, get theirs too).
pub(crate) async fn hand_out(handoff: Handoff) {
    let mut drain = DrainWatch(handoff.shared.drain.subscribe());
    drain.requested().await;
    handoff.settled().await;
    let line = &handoff.shared.handoff.line;
    loop {
        let joined = line.joined.notified();
        let next = {
            let mut waiting = lock(&line.waiting);
            let first = waiting.keys().next().copied();
            first.and_then(|place| waiting.remove(&place))
        };
        let Some(ticket) = next else {
            joined.await;
            continue;
        };
        // A connection gone since it took its ticket takes no turn.
        if ticket.is_closed() {
            continue;
        }
        let _ = ticket.send(next_turn(&handoff).await);
    }
}

/// The next turn, as soon as one of the links has one due (`None`: no link).
async fn next_turn(handoff: &Handoff) -> Option<Turn> {
    loop {
        match handoff.shared.handoff.due_giver() {
            Ok(Some(link)) => {
                let place = link.in_flight.clone().acquire_owned().await.ok()?;
                return Some(Turn(link, place));
            }
            Ok(None) => return None,
            Err(at) => tokio::time::sleep_until(at.into()).await,
        }
    }
}
