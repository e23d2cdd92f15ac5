//! Rolling reloads (`reload: {strategy: rolling, batch: B}`): the new generation replaces the
//! serving one `B` workers at a time, so that a program of `N` processes never has more than
//! `N + B` alive (draining ones included), where an all-at-once reload has `2N` for a moment.
//!
//! Per program (a [`Lane`]): `B` new workers start; once each is ready (and, for the first
//! batch, once `canary_window` has passed), `B` old workers drain; once those have exited (or
//! been killed at their drain deadline), the next batch starts. When every new worker is ready
//! the reload succeeds: the new generation serves and the old one drains what is left of it.
//!
//! A failure before that (a new worker exits, is not ready in time, or fails a probe) fails the
//! reload at once, naming the batch, and rolls back the same way in the other direction: the new
//! workers that were not ready are stopped, then the old generation's emptied slots get workers
//! of the configuration that was serving, `B` at a time, each batch retiring `B` new workers
//! once it is ready. Nothing stops accepting before something else accepts in its place.
//!
//! The controller is level-triggered: [`Supervisor::advance_rollout`] runs after every event
//! and moves each lane as far as the state allows.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Outcome;
use crate::supervisor::Supervisor;
use crate::supervisor::model::{Generation, WorkerId};
use crate::supervisor::records::{
    Direction, GenState, Lane, Replaced, Retirement, Rollout, Run, Step, WorkerState,
};

/// Which way a lane moves workers: from the generation being replaced to the one being filled.
#[derive(Clone, Copy)]
struct Way {
    from: Generation,
    from_program: Option<usize>,
    to: Generation,
    to_program: Option<usize>,
}

impl Supervisor {
    /// Starts the reload's prepared generation `g` as a rolling reload, if its configuration
    /// rolls a program and a generation serves. Returns whether it did.
    pub(in crate::supervisor) fn begin_rollout(&mut self, now: Instant, g: Generation) -> bool {
        let Some(reload) = self.run.starting().filter(|r| !r.initial) else {
            return false;
        };
        let id = reload.id;
        let Some(spec) = self.generations.get(&g).and_then(|e| e.spec.clone()) else {
            return false;
        };
        if spec.programs.iter().all(|p| p.strategy.batch().is_none()) {
            return false;
        }
        let Some((old, old_spec)) = self
            .generations
            .iter()
            .rev()
            .filter(|(n, e)| **n != g && matches!(e.state, GenState::Serving))
            .find_map(|(n, e)| Some((*n, e.spec.clone()?)))
        else {
            return false;
        };
        let lanes: Vec<Lane> = spec
            .programs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let batch = p.strategy.batch().unwrap_or(p.processes).max(1);
                // Paired by name; a state from a master that did not keep names (before
                // rolling reloads) pairs by position.
                let old_program = old_spec
                    .programs
                    .iter()
                    .position(|o| o.name == p.name)
                    .or_else(|| old_spec.programs.get(i)?.name.is_empty().then_some(i));
                Lane {
                    new_program: i,
                    old_program,
                    batch,
                    batch_no: 0,
                    batches: p.processes.div_ceil(batch),
                    step: Step::Done,
                    since: now,
                }
            })
            .collect();
        let plan: Vec<String> = lanes
            .iter()
            .map(|l| {
                let p = &spec.programs[l.new_program];
                format!("{}: {} in batches of {}", p.name, p.processes, l.batch)
            })
            .collect();
        info!(
            event = baton_proto::event::ROLLOUT_STARTED,
            reload = id.0,
            generation = g.0,
            old = old.0,
            "reload {id} rolls: generation {g} replaces generation {old} a batch at a time ({})",
            plan.join("; ")
        );
        if let Some(entry) = self.generations.get_mut(&g) {
            entry.state = GenState::Rolling;
        }
        let Run::Starting(reload) = std::mem::take(&mut self.run) else {
            return false;
        };
        let rollout = Rollout {
            reload: id,
            old,
            new: g,
            lanes,
            canary: spec.canary_window,
        };
        self.run = Run::RollingForward { reload, rollout };
        for lane in 0..self.run.rollout().map_or(0, |(r, _)| r.lanes.len()) {
            self.next_batch(now, lane);
        }
        true
    }

    /// Moves every lane as far as it can go; ends the rollout when all are done.
    pub(in crate::supervisor) fn advance_rollout(&mut self, now: Instant) {
        let Some(lanes) = self.run.rollout().map(|(r, _)| r.lanes.len()) else {
            return;
        };
        for lane in 0..lanes {
            // A lane may take several steps at once (a retirement with nothing to retire).
            for _ in 0..4 {
                if !self.advance_lane(now, lane) {
                    break;
                }
            }
        }
        let done = self
            .run
            .rollout()
            .is_some_and(|(r, _)| r.lanes.iter().all(|l| l.step == Step::Done));
        if done {
            self.finish_rollout(now);
        }
    }

    /// One step of lane `i`, if its condition holds. Returns whether it moved.
    fn advance_lane(&mut self, now: Instant, i: usize) -> bool {
        let Some((step, way, first)) = self.run.rollout().and_then(|(r, direction)| {
            let lane = r.lanes.get(i)?;
            Some((
                lane.step.clone(),
                Self::way(r, direction, lane),
                lane.batch_no == 1,
            ))
        }) else {
            return false;
        };
        match step {
            Step::Done => false,
            Step::Starting(slots) => {
                let ready = slots.iter().all(|&slot| {
                    self.generations
                        .get(&way.to)
                        .and_then(|e| e.slots.get(slot))
                        .and_then(|s| s.worker)
                        .and_then(|w| self.workers.get(&w))
                        .is_some_and(|w| w.state == WorkerState::Ready)
                });
                if !ready {
                    return false;
                }
                let canary = self
                    .run
                    .rollout()
                    .filter(|(_, direction)| *direction == Direction::Forward && first)
                    .and_then(|(r, _)| r.canary);
                match canary {
                    Some(window) => {
                        info!(
                            event = baton_proto::event::ROLLOUT_CANARY,
                            generation = way.to.0,
                            window_ms = window.as_millis() as u64,
                            "the first batch of generation {} serves on probation for {} ms beside every worker of generation {}",
                            way.to,
                            window.as_millis(),
                            way.from
                        );
                        self.set_step(i, now, Step::Canary(now + window));
                    }
                    None => self.retire(now, i, way),
                }
                true
            }
            Step::Canary(until) => {
                if now < until {
                    return false;
                }
                self.retire(now, i, way);
                true
            }
            Step::Retiring(workers) => {
                if workers.iter().any(|w| self.workers.contains_key(w)) {
                    return false;
                }
                self.next_batch(now, i);
                true
            }
            Step::Waiting => self.next_batch(now, i),
        }
    }

    /// The most processes lane `i`'s program may have alive: the larger of its old and new
    /// process counts, plus its batch.
    fn cap(&self, r: &Rollout, lane: &Lane) -> usize {
        let processes = |g: Generation, p: Option<usize>| {
            p.and_then(|p| self.generations.get(&g)?.spec.as_ref()?.programs.get(p))
                .map_or(0, |p| p.processes)
        };
        processes(r.old, lane.old_program).max(processes(r.new, Some(lane.new_program)))
            + lane.batch
    }

    /// Workers of lane `i`'s program alive now, in every generation (draining ones included):
    /// the program is known by its name.
    fn alive(&self, r: &Rollout, lane: &Lane) -> usize {
        let name = |g: Generation, p: usize| {
            self.generations
                .get(&g)
                .and_then(|e| e.spec.as_ref()?.programs.get(p))
                .map(|p| p.name.as_str())
        };
        let ours = name(r.new, lane.new_program);
        let old = lane.old_program.map(|p| (r.old, p));
        self.workers
            .values()
            .filter(|w| {
                name(w.generation, w.program) == ours
                    || (w.generation == r.new && w.program == lane.new_program)
                    || Some((w.generation, w.program)) == old
            })
            .count()
    }

    fn way(r: &Rollout, direction: Direction, lane: &Lane) -> Way {
        match direction {
            Direction::Forward => Way {
                from: r.old,
                from_program: lane.old_program,
                to: r.new,
                to_program: Some(lane.new_program),
            },
            Direction::Back => Way {
                from: r.new,
                from_program: Some(lane.new_program),
                to: r.old,
                to_program: lane.old_program,
            },
        }
    }

    fn set_step(&mut self, i: usize, now: Instant, step: Step) {
        if let Some(lane) = self.run.rollout_mut().and_then(|r| r.lanes.get_mut(i)) {
            lane.step = step;
            lane.since = now;
        }
    }

    /// Starts lane `i`'s next batch in the generation being filled, or ends the lane when none
    /// of its slots is empty; or waits (returns false) while there is no room for it.
    fn next_batch(&mut self, now: Instant, i: usize) -> bool {
        let Some((way, batch, room)) = self.run.rollout().and_then(|(r, direction)| {
            let lane = r.lanes.get(i)?;
            let room = self.cap(r, lane).saturating_sub(self.alive(r, lane));
            Some((Self::way(r, direction, lane), lane.batch, room))
        }) else {
            return false;
        };
        let slots: Vec<usize> = match (way.to_program, self.generations.get(&way.to)) {
            (Some(program), Some(entry)) => entry
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.program == program && s.worker.is_none())
                .map(|(n, _)| n)
                .take(batch)
                .collect(),
            _ => Vec::new(),
        };
        if slots.is_empty() {
            self.set_step(i, now, Step::Done);
            return true;
        }
        if room < slots.len() {
            let waiting = self
                .run
                .rollout()
                .and_then(|(r, _)| r.lanes.get(i))
                .is_some_and(|l| l.step == Step::Waiting);
            if !waiting {
                info!(
                    generation = way.to.0,
                    "the next batch of generation {} waits: older workers of its program still drain",
                    way.to
                );
                self.set_step(i, now, Step::Waiting);
            }
            return false;
        }
        let Some((id, direction)) = self.run.rollout().map(|(r, d)| (r.reload, d)) else {
            return false;
        };
        let Some(lane) = self.run.rollout_mut().and_then(|r| r.lanes.get_mut(i)) else {
            return false;
        };
        lane.batch_no += 1;
        let (no, of) = (lane.batch_no, lane.batches);
        let to = way.to;
        if direction == Direction::Back {
            info!(
                event = baton_proto::event::ROLLOUT_BATCH,
                reload = id.0,
                generation = to.0,
                batch = no,
                "reload {id}, rolling back: starting {} workers of generation {to} again",
                slots.len()
            );
        } else {
            info!(
                event = baton_proto::event::ROLLOUT_BATCH,
                reload = id.0,
                generation = to.0,
                batch = no,
                batches = of,
                "reload {id}: batch {no} of {of}: starting {} workers of generation {to}",
                slots.len()
            );
        }
        for &slot in &slots {
            self.spawn(now, to, slot);
        }
        self.set_step(i, now, Step::Starting(slots));
        true
    }

    /// The batch of lane `i` is ready: as many workers of the generation being replaced drain
    /// (all that are left once the lane is full).
    fn retire(&mut self, now: Instant, i: usize, way: Way) {
        let full = match (way.to_program, self.generations.get(&way.to)) {
            (Some(program), Some(entry)) => entry
                .slots
                .iter()
                .all(|s| s.program != program || s.worker.is_some()),
            _ => true,
        };
        if full {
            self.set_step(i, now, Step::Done);
            return;
        }
        let Some((id, batch, no)) = self.run.rollout().and_then(|(r, _)| {
            let lane = r.lanes.get(i)?;
            Some((r.reload, lane.batch, lane.batch_no))
        }) else {
            return;
        };
        let mut old: Vec<(bool, usize, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.generation == way.from
                    && Some(w.program) == way.from_program
                    && w.replaced.is_none()
                    && w.state != WorkerState::Killed
            })
            .map(|(&id, w)| (w.state == WorkerState::Ready, w.slot, id))
            .collect();
        // Workers that serve nothing (not ready) go first, then by slot.
        old.sort();
        let retiring: Vec<WorkerId> = old.into_iter().take(batch).map(|(_, _, w)| w).collect();
        for &w in &retiring {
            let reason = Retirement::Rolled {
                reload: id,
                batch: no,
            };
            self.retire_worker(now, w, reason);
        }
        if !retiring.is_empty() {
            info!(
                event = baton_proto::event::ROLLOUT_RETIRING,
                reload = id.0,
                generation = way.from.0,
                workers = retiring.len(),
                "reload {id}: batch {no} is ready: {} workers of generation {} drain",
                retiring.len(),
                way.from
            );
        }
        self.set_step(i, now, Step::Retiring(retiring));
    }

    /// Worker `w` drains within its program's drain timeout, its slot emptied (nothing restarts
    /// it), and is killed at that deadline if it has not exited.
    fn retire_worker(&mut self, now: Instant, w: WorkerId, reason: Retirement) {
        let Some(timeout) = self.program(w).map(|p| p.drain_timeout) else {
            return;
        };
        let Some(worker) = self.workers.get_mut(&w) else {
            return;
        };
        worker.replaced = Some(Replaced {
            reason,
            kill_at: now + timeout,
        });
        let (g, slot) = (worker.generation, worker.slot);
        if let Some(s) = self.slot_mut(g, slot) {
            if s.worker == Some(w) {
                s.worker = None;
            }
            s.restart_at = None;
        }
        self.drain_worker_within(w, timeout);
    }

    /// Every lane is done: forward, the reload succeeded (the old generation drains what is left
    /// of it); back, the old generation serves whole again (the new one drains what is left).
    fn finish_rollout(&mut self, now: Instant) {
        match self.run.take_if(|run| run.rollout().is_some()) {
            Run::RollingForward { reload, rollout: r } => {
                if let Some(entry) = self.generations.get_mut(&r.new) {
                    entry.state = GenState::Serving;
                }
                let took = now.saturating_duration_since(reload.started);
                let list = crate::supervisor::join(&reload.covers);
                info!(event = baton_proto::event::RELOAD_SUCCEEDED, reload = reload.id.0, generation = r.new.0,
                    covers = %list, took_ms = took.as_millis() as u64,
                    "reload {} succeeded: generation {} is serving, every batch ready (requests {list})",
                    reload.id, r.new);
                self.record(&reload, now, Outcome::Succeeded, None);
                self.begin_drain(now, r.old);
            }
            Run::RollingBack {
                rollout: r,
                failure: reason,
            } => {
                info!(
                    event = baton_proto::event::ROLLOUT_ROLLED_BACK,
                    reload = r.reload.0,
                    generation = r.old.0,
                    "reload {}: rolled back: generation {} serves whole again ({reason})",
                    r.reload,
                    r.old
                );
                if let Some(entry) = self.generations.get_mut(&r.new) {
                    entry.state = GenState::Serving;
                }
                self.begin_drain(now, r.new);
            }
            _ => return,
        }
        self.enforce_drain_cap();
        self.next_pending(now);
    }

    /// A worker of the rolling generation failed (`worker`, in `slot`): the reload fails now,
    /// naming the batch, and rolls back. While rolling back already, a new worker that fails
    /// only leaves its slot empty.
    pub(in crate::supervisor) fn rollout_failed(
        &mut self,
        now: Instant,
        reason: String,
        worker: Option<WorkerId>,
    ) {
        let Some((r, direction)) = self.run.rollout() else {
            return;
        };
        if direction == Direction::Back {
            let g = r.new;
            self.finish_if_empty(now, g);
            return;
        }
        let (old, new) = (r.old, r.new);
        let program = worker.and_then(|w| self.workers.get(&w)).map(|w| w.program);
        let lane = r
            .lanes
            .iter()
            .find(|l| Some(l.new_program) == program)
            .or(r.lanes.first());
        let name = lane
            .and_then(|l| {
                self.generations
                    .get(&new)?
                    .spec
                    .as_ref()?
                    .programs
                    .get(l.new_program)
            })
            .map_or_else(String::new, |p| p.name.clone());
        let at = lane.map_or_else(String::new, |l| {
            format!("batch {} of {} of {name}", l.batch_no, l.batches)
        });
        let verdict = format!("failed at {at}: {reason}; rolling back to generation {old}");
        let Run::RollingForward { reload, rollout } = self
            .run
            .take_if(|run| matches!(run, Run::RollingForward { .. }))
        else {
            return;
        };
        self.run = Run::RollingBack {
            rollout,
            failure: verdict.clone(),
        };
        let list = crate::supervisor::join(&reload.covers);
        error!(event = baton_proto::event::RELOAD_FAILED, reload = reload.id.0, generation = new.0, covers = %list,
            reason = %verdict, rolled_back = true,
            "reload {} {verdict} (requests {list})", reload.id);
        self.record(&reload, now, Outcome::RolledBack(verdict.clone()), worker);
        // The new workers that serve nothing yet stop now; each lane then waits for them to be
        // gone before it starts old workers again, so the bound holds on the way back too.
        let failing: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == new && w.replaced.is_none())
            .filter(|(_, w)| !matches!(w.state, WorkerState::Ready | WorkerState::Killed))
            .map(|(&id, _)| id)
            .collect();
        let stop_within = |s: &Self, id: WorkerId| {
            s.program(id)
                .map_or(crate::DEFAULT_FAILED_STOP_TIMEOUT, |p| {
                    p.failed_stop_timeout
                })
        };
        let mut by_program: Vec<(usize, WorkerId)> = Vec::new();
        for id in failing {
            let within = stop_within(self, id);
            let program = self.workers.get(&id).map_or(0, |w| w.program);
            if self.workers.get(&id).is_some_and(|w| w.pid.is_none()) {
                self.kill(id);
            } else {
                let why = Retirement::RolledBack(verdict.clone());
                self.retire_worker_within(now, id, within, why);
            }
            by_program.push((program, id));
        }
        if let Some(g) = self.generations.get_mut(&new) {
            for slot in &mut g.slots {
                slot.restart_at = None;
            }
        }
        let Some(r) = self.run.rollout_mut() else {
            return;
        };
        for lane in &mut r.lanes {
            lane.batch_no = 0;
            lane.since = now;
            lane.step = Step::Retiring(
                by_program
                    .iter()
                    .filter(|(p, _)| *p == lane.new_program)
                    .map(|(_, id)| *id)
                    .collect(),
            );
        }
        warn!(
            generation = old.0,
            "rolling back: generation {old} gets its workers back, a batch at a time"
        );
    }

    fn retire_worker_within(
        &mut self,
        now: Instant,
        w: WorkerId,
        within: Duration,
        why: Retirement,
    ) {
        if let Some(worker) = self.workers.get_mut(&w) {
            worker.replaced = Some(Replaced {
                reason: why,
                kill_at: now + within,
            });
        }
        self.drain_worker_within(w, within);
    }

    /// A stop during a rolling reload ends it without a verdict of success: both generations
    /// serve until the stop drains (or kills) them.
    pub(in crate::supervisor) fn end_rollout_for_stop(&mut self, now: Instant, why: &str) {
        let r = match self.run.take_if(|run| run.rollout().is_some()) {
            Run::RollingForward { reload, rollout } => {
                self.record(
                    &reload,
                    now,
                    Outcome::Failed(format!("stop requested during the rolling reload ({why})")),
                    None,
                );
                rollout
            }
            Run::RollingBack { rollout, .. } => rollout,
            _ => return,
        };
        if let Some(entry) = self.generations.get_mut(&r.new) {
            entry.state = GenState::Serving;
        }
    }

    /// Whether `g` is the generation a rolling reload is bringing in (not rolling back).
    pub(in crate::supervisor) fn rolling_forward(&self, g: Generation) -> bool {
        matches!(&self.run, Run::RollingForward { rollout, .. } if rollout.new == g)
    }

    /// The first probation deadline of a lane, for the tick.
    pub(in crate::supervisor) fn rollout_deadline(&self) -> Option<Instant> {
        self.run.rollout().and_then(|(r, _)| {
            r.lanes
                .iter()
                .filter_map(|l| match l.step {
                    Step::Canary(until) => Some(until),
                    _ => None,
                })
                .min()
        })
    }
}
