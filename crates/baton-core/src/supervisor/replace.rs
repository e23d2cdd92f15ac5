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

use super::Supervisor;
use super::model::{Generation, WorkerId};
use super::records::{GenState, Replaced, Worker, WorkerState};

impl Supervisor {
    pub(super) fn on_unhealthy(&mut self, now: Instant, id: WorkerId, reason: String) {
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
        if self.canary.as_ref().is_some_and(|c| c.new == g) {
            let reason = format!("worker {id} of generation {g} (pid {pid}): {reason}");
            self.roll_back(now, reason, Some(id));
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
            warn!(event = "worker_unhealthy", worker = id.0, generation = g.0, pid,
                reason = %reason, replaced = false,
                "worker {id} of generation {g} (pid {pid}) failed its liveness check: {reason}; \
                 not replaced now: {replacing} of its {total} workers are being replaced already \
                 (max_replacing {}%)", spec.max_replacing_percent);
            return;
        }
        let kill_ms = spec.kill_after.as_millis();
        warn!(event = "worker_unhealthy", worker = id.0, generation = g.0, pid,
            reason = %reason, replaced = true,
            "worker {id} of generation {g} (pid {pid}) failed its liveness check: {reason}; \
             replacing it (asked to drain, killed in {kill_ms} ms if it has not exited)");
        self.counters.replaced_unhealthy += 1;
        if let Some(w) = self.workers.get_mut(&id) {
            w.replaced = Some(Replaced {
                reason,
                kill_at: now + spec.kill_after,
            });
        }
        self.drain_worker_within(id, spec.kill_after);
        if let Some(s) = self.slot_mut(g, slot) {
            s.worker = None;
        }
        self.spawn(now, g, slot);
    }

    /// A replaced worker exited: nothing to restart (its slot has a new worker). Returns
    /// whether `w` was one.
    pub(super) fn replaced_exited(
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
        info!(event = "worker_exited", worker = id.0, generation = g.0, pid, status = %status,
            "worker {id} of generation {g} (pid {pid}) {status}; it had been replaced: {}",
            replaced.reason);
        self.finish_if_empty(now, g);
        true
    }

    /// Workers of `g` being replaced.
    pub(super) fn replacing(&self, g: Generation) -> usize {
        self.workers
            .values()
            .filter(|w| w.generation == g && w.replaced.is_some())
            .count()
    }
}
