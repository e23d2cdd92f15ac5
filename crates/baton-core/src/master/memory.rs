//! `recycle:`: the master reads the memory of ready workers of the serving generation every
//! `check_every` (a timer only while a serving program asks for it) and reports a worker whose
//! process tree stayed above `max_rss` for `above_for` ([`Event::Recycle`]); the state machine
//! starts its successor and drains it once the successor is ready.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use baton_proto::control::WorkerState;

use super::Master;
use crate::supervisor::{Event, Phase, WorkerId};

/// The memory checks: when the next is due, and since when each worker has been above its
/// budget.
#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    next: Option<Instant>,
    above_since: HashMap<WorkerId, (Instant, u64)>,
}

impl Master {
    /// When the next memory check is due: `None` while no serving program has `recycle:`.
    pub(super) fn next_memory_check(&mut self) -> Option<Instant> {
        let every = self.recycle_interval()?;
        Some(
            *self
                .memory
                .next
                .get_or_insert_with(|| Instant::now() + every),
        )
    }

    fn recycle_interval(&self) -> Option<Duration> {
        let snap = self.supervisor.generations();
        snap.iter()
            .filter(|(_, phase, _)| *phase == Phase::Serving)
            .filter_map(|(g, _, _)| self.resources.get(g))
            .flat_map(|r| r.programs.iter().filter_map(|p| p.recycle))
            .map(|r| r.check_every)
            .min()
    }

    /// Reads the memory of every ready worker of a serving generation whose program has
    /// `recycle:`; one above its budget for long enough goes to the state machine.
    pub(super) fn check_memory(&mut self, queue: &mut VecDeque<Event>) {
        let now = Instant::now();
        self.memory.next = self.recycle_interval().map(|every| now + every);
        let snap = self.supervisor.snapshot(now);
        let mut seen = Vec::new();
        for g in snap
            .generations
            .iter()
            .filter(|g| g.phase == Phase::Serving)
        {
            let Some(resources) = self.resources.get(&g.generation) else {
                continue;
            };
            for w in g.workers.iter().filter(|w| w.state == WorkerState::Ready) {
                let (Some(pid), Some(recycle)) = (
                    w.pid,
                    resources.programs.get(w.program).and_then(|p| p.recycle),
                ) else {
                    continue;
                };
                let Some(rss) = crate::procmem::rss_of_tree(pid) else {
                    continue;
                };
                if rss <= recycle.max_rss_kib {
                    continue;
                }
                seen.push(w.id);
                let (since, _) = *self
                    .memory
                    .above_since
                    .entry(w.id)
                    .and_modify(|(_, last)| *last = rss)
                    .or_insert((now, rss));
                if now.duration_since(since) >= recycle.above_for {
                    let reason = format!(
                        "its memory (RSS of its processes) was {:.1} MiB, above max_rss {:.1} MiB, for {} s",
                        rss as f64 / 1024.0,
                        recycle.max_rss_kib as f64 / 1024.0,
                        now.duration_since(since).as_secs()
                    );
                    queue.push_back(Event::Recycle {
                        worker: w.id,
                        reason,
                    });
                }
            }
        }
        // A worker back under its budget, or gone, starts over.
        self.memory.above_since.retain(|id, _| seen.contains(id));
    }
}
