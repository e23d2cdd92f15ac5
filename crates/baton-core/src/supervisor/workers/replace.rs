//! Replacing a ready worker that failed its liveness check ([`Event::Unhealthy`]): its slot
//! gets a new worker at once (the old one serves nothing), and the old one gets its drain request
//! and signal, then SIGKILL at `kill_after`. Guarded: only a ready worker of the serving
//! generation, and at most `max_replacing` of the generation's workers at once, so that a
//! machine that stalled, or a backend every worker depends on, does not take every worker down
//! together. A generation on probation that fails is rolled back instead.
//!
//! [`Event::Unhealthy`]: super::Event::Unhealthy

use std::time::Instant;

use tracing::{debug, info, warn};

use crate::supervisor::Supervisor;
use crate::supervisor::model::{Generation, WorkerId};
use crate::supervisor::records::{GenState, Replaced, Retirement, Worker, WorkerState};

impl Supervisor {
    pub(in crate::supervisor) fn on_unhealthy(
        &mut self,
        now: Instant,
        id: WorkerId,
        reason: String,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (g, slot, pid) = (w.generation, w.slot, w.pid.unwrap_or(0));
        if w.state != WorkerState::Ready || w.replaced.is_some() || self.stop.is_some() {
            debug!(
                worker = id.0,
                "worker {id} is not ready any more: {reason} (ignored)"
            );
            return;
        }
        if self.on_probation(g) {
            let reason = format!("worker {id} of generation {g} (pid {pid}): {reason}");
            self.roll_back(now, reason, Some(id));
            return;
        }
        if self.rolling_forward(g) {
            let reason = format!("worker {id} of generation {g} (pid {pid}): {reason}");
            self.rollout_failed(now, reason, Some(id));
            return;
        }
        if !matches!(
            self.generations.get(&g).map(|e| &e.state),
            Some(GenState::Serving)
        ) {
            return;
        }
        let Some(spec) = self.program(id).and_then(|p| p.replace) else {
            return;
        };
        let total = self.generations.get(&g).map_or(0, |e| e.slots.len());
        let replacing = self.replacing(g);
        let most = (total * spec.max_replacing_percent as usize / 100).max(1);
        if replacing >= most {
            warn!(event = baton_proto::event::WORKER_UNHEALTHY, worker = id.0, generation = g.0, pid,
                reason = %reason, replaced = false,
                "worker {id} of generation {g} (pid {pid}) failed its liveness check: {reason}; \
                 not replaced now: {replacing} of its {total} workers are being replaced already \
                 (max_replacing {}%)", spec.max_replacing_percent);
            return;
        }
        let kill_ms = spec.kill_after.as_millis();
        warn!(event = baton_proto::event::WORKER_UNHEALTHY, worker = id.0, generation = g.0, pid,
            reason = %reason, replaced = true,
            "worker {id} of generation {g} (pid {pid}) failed its liveness check: {reason}; \
             replacing it (asked to drain, killed in {kill_ms} ms if it has not exited)");
        self.counters.replaced_unhealthy += 1;
        if let Some(w) = self.workers.get_mut(&id) {
            w.replaced = Some(Replaced {
                reason: Retirement::Unhealthy(reason),
                kill_at: now + spec.kill_after,
            });
        }
        self.drain_worker_within(id, spec.kill_after);
        if let Some(s) = self.slot_mut(g, slot) {
            s.worker = None;
        }
        self.spawn(now, g, slot);
        if let Some(new) = self.workers.get_mut(&WorkerId(self.next_worker)) {
            new.replacement = true;
        }
    }

    /// A replaced worker exited: nothing to restart (its slot has a new worker). Returns
    /// whether `w` was one.
    pub(in crate::supervisor) fn replaced_exited(
        &mut self,
        now: Instant,
        id: WorkerId,
        w: &Worker,
        status: &str,
    ) -> bool {
        let Some(replaced) = &w.replaced else {
            return false;
        };
        let (g, pid) = (w.generation, w.pid.unwrap_or(0));
        info!(event = baton_proto::event::WORKER_EXITED, worker = id.0, generation = g.0, pid, status = %status,
            "worker {id} of generation {g} (pid {pid}) {status}; it had been replaced: {}",
            replaced.reason);
        self.finish_if_empty(now, g);
        true
    }

    /// Slots of `g` being replaced: their replaced worker still runs, or the worker started in
    /// its place is not ready yet. A replacement counts until it serves, so workers that exit
    /// at once when asked to drain do not let a burst through.
    pub(in crate::supervisor) fn replacing(&self, g: Generation) -> usize {
        let slots: std::collections::BTreeSet<usize> = self
            .workers
            .values()
            .filter(|w| w.generation == g)
            .filter(|w| w.replaced.is_some() || (w.replacement && w.state != WorkerState::Ready))
            .map(|w| w.slot)
            .collect();
        slots.len()
    }
}

impl Supervisor {
    /// A ready worker used too much memory for too long: a new worker starts in its slot; the
    /// old one serves on until the new one is ready, then drains. One at a time per program.
    pub(in crate::supervisor) fn on_recycle(&mut self, now: Instant, id: WorkerId, reason: String) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (g, slot, program, pid) = (w.generation, w.slot, w.program, w.pid.unwrap_or(0));
        let serving = matches!(
            self.generations.get(&g).map(|e| &e.state),
            Some(GenState::Serving)
        );
        if !serving
            || self.stop.is_some()
            || w.state != WorkerState::Ready
            || w.replaced.is_some()
            || w.successor.is_some()
        {
            return;
        }
        if let Some((other, _)) = self
            .workers
            .iter()
            .find(|(_, o)| o.generation == g && o.program == program && o.successor.is_some())
        {
            debug!(
                worker = id.0,
                "worker {id}: {reason}; waits: worker {other} of its program is being recycled"
            );
            return;
        }
        self.counters.replaced_memory += 1;
        if let Some(s) = self.slot_mut(g, slot) {
            s.worker = None;
        }
        self.spawn(now, g, slot);
        let new = WorkerId(self.next_worker);
        warn!(event = baton_proto::event::WORKER_RECYCLED, worker = id.0, generation = g.0, pid, reason = %reason,
            successor = new.0,
            "worker {id} of generation {g} (pid {pid}): {reason}; recycling it: worker {new} \
             starts in its place, and it drains once worker {new} is ready");
        if let Some(w) = self.workers.get_mut(&id) {
            w.successor = Some((new, reason));
        }
    }

    /// Worker `id` is ready: the worker it succeeds (if it was started to recycle one) drains.
    pub(in crate::supervisor) fn successor_ready(&mut self, now: Instant, id: WorkerId) {
        let Some((&old, _)) = self
            .workers
            .iter()
            .find(|(_, w)| w.successor.as_ref().is_some_and(|(s, _)| *s == id))
        else {
            return;
        };
        let Some(timeout) = self.program(old).map(|p| p.drain_timeout) else {
            return;
        };
        let Some(w) = self.workers.get_mut(&old) else {
            return;
        };
        let reason = w.successor.take().map(|(_, r)| r).unwrap_or_default();
        info!(
            worker = old.0,
            generation = w.generation.0,
            "worker {id} is ready: worker {old}, recycled ({reason}), drains"
        );
        w.replaced = Some(Replaced {
            reason: Retirement::Recycled(reason),
            kill_at: now + timeout,
        });
        self.drain_worker_within(old, timeout);
    }

    /// A worker started to recycle another did not make it (it exited, or could not start, or
    /// was not ready in time): the old one keeps its slot and serves on. Returns whether
    /// `worker` was such a successor.
    pub(in crate::supervisor) fn recycle_failed(
        &mut self,
        g: Generation,
        slot: usize,
        worker: WorkerId,
        reason: &str,
    ) -> bool {
        let Some((&old, _)) = self
            .workers
            .iter()
            .find(|(_, w)| w.successor.as_ref().is_some_and(|(s, _)| *s == worker))
        else {
            return false;
        };
        if let Some(w) = self.workers.get_mut(&old) {
            w.successor = None;
        }
        if let Some(s) = self.slot_mut(g, slot) {
            s.worker = Some(old);
        }
        warn!(
            event = baton_proto::event::WORKER_RECYCLE_FAILED,
            worker = old.0,
            generation = g.0,
            "recycling worker {old} failed: {reason}; worker {old} serves on"
        );
        true
    }
}
