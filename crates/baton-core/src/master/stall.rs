//! A stall of the master is not a failure of the workers. A master that was not running (a
//! machine that froze, a VM paused, a `SIGSTOP`, a slow fork under memory pressure) wakes with
//! its deadlines past and the workers' messages of that time unread in their sockets: `READY=1`
//! in a notify socket, a heartbeat, a ready packet on a channel. Judging the deadlines first
//! would fail a reload whose workers became ready, or replace workers that were alive.
//!
//! So no deadline is judged before what is pending is taken in: [`settle`] lets the tasks that
//! read the workers run (the runtime polls its driver first, so sockets that became readable
//! during the stall are seen), and the loop then reads their news before the state machine
//! gets its tick. The liveness watchdog does the same before it reports a silent worker.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use super::{Input, Master};
use crate::supervisor::Event;

/// Rounds of yielding: a worker's message crosses at most three tasks (the socket's reader, the
/// loop, a liveness task) and each round runs every task that became ready.
const ROUNDS: usize = 4;

/// Lets every other task of the runtime run, after a poll of its driver, [`ROUNDS`] times.
pub(super) async fn settle() {
    for _ in 0..ROUNDS {
        tokio::task::yield_now().await;
    }
}

impl Master {
    /// A deadline is due: first the workers' news and the inputs that wait, then the tick.
    /// Returns whether the inputs are still open.
    pub(super) async fn judge_deadline(
        &mut self,
        inputs: &mut mpsc::UnboundedReceiver<Input>,
        mut inputs_open: bool,
        queue: &mut VecDeque<Event>,
    ) -> bool {
        settle().await;
        while let Ok(news) = self.events_rx.try_recv() {
            self.on_news(news, queue);
        }
        while inputs_open && let Ok(input) = inputs.try_recv() {
            inputs_open = self.on_input(Some(input), queue);
        }
        queue.push_back(Event::Tick);
        inputs_open
    }
}
