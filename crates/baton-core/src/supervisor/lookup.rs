//! Lookups the transitions share and the loop asks: deadlines (the next one, a draining
//! worker's), the processes there are, whether anything drains, a generation's workers, the
//! serving settings and workers, a worker's or a slot's program, the drain requests to send
//! again after an upgrade. Read-only: nothing here changes the state.

use std::time::{Duration, Instant};

use super::Supervisor;
use super::model::{Action, Generation, GenerationSpec, ProgramSpec, RequestId, WorkerId};
use super::records::{GenState, Run, Slot, Worker, WorkerState};

impl Supervisor {
    /// Where worker `id` runs: its generation, the index of its program, its slot within the
    /// program (what `BATON_SLOT` says).
    pub fn placement(&self, id: WorkerId) -> Option<(Generation, usize, usize)> {
        let w = self.workers.get(&id)?;
        let slot = self.generations.get(&w.generation)?.slots.get(w.slot)?;
        Some((w.generation, w.program, slot.index))
    }

    /// The worker processes there are: pid, worker, generation, index of the program. Cheap
    /// (no snapshot): the loop asks after every wake-up.
    pub fn processes(&self) -> impl Iterator<Item = (u32, WorkerId, Generation, usize)> + '_ {
        self.workers
            .iter()
            .filter_map(|(&id, w)| Some((w.pid?, id, w.generation, w.program)))
    }

    /// The ready workers of the serving generation (none replaced or retired), with the
    /// connections each last reported: those a draining worker may hand its connections to.
    pub fn serving_workers(&self) -> Vec<(WorkerId, Option<u64>)> {
        let serving = self
            .generations
            .iter()
            .rev()
            .find(|(_, entry)| matches!(entry.state, GenState::Serving))
            .map(|(g, _)| *g);
        self.workers
            .iter()
            .filter(|(_, w)| Some(w.generation) == serving)
            .filter(|(_, w)| w.state == WorkerState::Ready && w.replaced.is_none())
            .map(|(&id, w)| (id, w.connections))
            .collect()
    }

    /// Whether `pid` is a worker's main process (the one whose exit ends the worker).
    pub fn is_main_pid(&self, pid: u32) -> bool {
        self.pids
            .get(&pid)
            .and_then(|id| self.workers.get(id))
            .is_some_and(|w| w.pid == Some(pid))
    }

    /// A reload runs (a generation being prepared or started for it), the first generation's
    /// start aside.
    pub fn reloading(&self) -> bool {
        match &self.run {
            Run::Idle => false,
            Run::Starting(reload) => !reload.initial,
            // On probation, the generation serves already.
            Run::OnProbation(_) => false,
            Run::RollingForward { .. } | Run::RollingBack { .. } => true,
        }
    }

    /// Whether `g` is the generation serving on probation.
    pub(super) fn on_probation(&self, g: Generation) -> bool {
        self.run.canary().is_some_and(|c| c.new == g)
    }

    /// Some generation is draining (the loop then refreshes the status line once a second).
    pub fn draining(&self) -> bool {
        self.generations
            .values()
            .any(|g| matches!(g.state, GenState::Draining { .. }))
    }

    /// The earliest time at which [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(|w| match w.state {
            WorkerState::Starting { deadline } => Some(deadline),
            WorkerState::Killed => None,
            _ => self.drain_deadline(w),
        });
        let restarts = self.generations.values().flat_map(|g| {
            g.slots
                .iter()
                .flat_map(|s| s.restart_at.into_iter().chain(s.stable_at))
        });
        workers
            .chain(restarts)
            .chain(self.run.canary().map(|c| c.until))
            .chain(self.rollout_deadline())
            .chain(self.next_kill_again())
            .chain(self.stop_delayed_until)
            .min()
    }

    /// The drain message of every draining worker, again, with the time it has left. A master
    /// that upgraded itself sends them once more, in case one was still queued for its channel
    /// when the old program was replaced (a worker takes a second drain request as a no-op).
    pub fn drain_messages(&self, now: Instant) -> Vec<Action> {
        self.workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Draining)
            .filter_map(|(&worker, w)| {
                let left = self
                    .drain_deadline(w)
                    .map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
                Some(Action::Drain {
                    worker,
                    pid: w.pid?,
                    deadline_ms: left.as_millis() as u64,
                    signal: None,
                })
            })
            .collect()
    }

    /// When a draining worker is killed: its generation's drain start plus its program's timeout.
    pub(super) fn drain_deadline(&self, w: &Worker) -> Option<Instant> {
        if let Some(replaced) = &w.replaced {
            return Some(replaced.kill_at);
        }
        let entry = self.generations.get(&w.generation)?;
        let program = entry.spec.as_ref()?.programs.get(w.program)?;
        match entry.state {
            GenState::Draining { since, .. } => Some(since + program.drain_timeout),
            GenState::Failed if w.state == WorkerState::Draining => {
                Some(entry.failed_at? + program.failed_stop_timeout)
            }
            _ => None,
        }
    }

    pub(super) fn worker_ids(&self, g: Generation) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| w.generation == g)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn live_workers(&self, g: Generation) -> usize {
        self.workers.values().filter(|w| w.generation == g).count()
    }

    /// The settings of the newest serving generation: the master-wide ones apply from there.
    pub(super) fn serving_spec(&self) -> Option<&GenerationSpec> {
        self.generations
            .values()
            .rev()
            .find(|entry| matches!(entry.state, GenState::Serving))
            .and_then(|entry| entry.spec.as_ref())
    }

    /// The program settings of a worker.
    pub(super) fn program(&self, id: WorkerId) -> Option<&ProgramSpec> {
        let w = self.workers.get(&id)?;
        self.generations
            .get(&w.generation)?
            .spec
            .as_ref()?
            .programs
            .get(w.program)
    }

    pub(super) fn slot_program(&self, g: Generation, slot: usize) -> Option<&ProgramSpec> {
        let entry = self.generations.get(&g)?;
        let program = entry.slots.get(slot)?.program;
        entry.spec.as_ref()?.programs.get(program)
    }

    pub(super) fn slot_mut(&mut self, g: Generation, slot: usize) -> Option<&mut Slot> {
        self.generations
            .get_mut(&g)
            .and_then(|entry| entry.slots.get_mut(slot))
    }
}

/// `#1, #2`.
pub(super) fn join(ids: &[RequestId]) -> String {
    ids.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
