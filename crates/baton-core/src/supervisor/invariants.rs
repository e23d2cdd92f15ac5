//! What holds between any two events, as code: [`Supervisor::check_invariants`], which the
//! supervisor runs after every event in debug builds (the whole test suite, the property test
//! of `tests/properties.rs` above all), and which a release build skips.
//!
//! These are about one moment. What holds across events (every reload request gets exactly one
//! verdict, no action names a worker after its exit, a failed generation never serves, a
//! rollback leaves the old generation serving) is checked by the property test, which sees
//! every event and every action.

use std::collections::BTreeSet;

use super::records::{GenState, Run, WorkerState};
use super::{Action, Generation, Supervisor};

impl Supervisor {
    /// In a debug build, panics naming the invariant the last event broke.
    pub(super) fn assert_invariants(&self) {
        if cfg!(debug_assertions)
            && let Err(broken) = self.check_invariants()
        {
            panic!("the state machine broke an invariant: {broken}");
        }
    }

    /// The first invariant broken, named with what breaks it; `Ok` when all hold.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.workers_and_slots_agree()?;
        self.one_generation_serves()?;
        self.the_run_agrees_with_its_generations()?;
        self.the_drain_cap_holds()?;
        self.requests_are_held_once()?;
        self.actions_name_living_workers()
    }

    /// Every worker belongs to a generation that exists, in one of its slots (a slot may name
    /// another: a replaced or recycled worker's successor); every slot's worker exists and sits
    /// in that slot; every pid known is a worker's.
    fn workers_and_slots_agree(&self) -> Result<(), String> {
        for (id, w) in &self.workers {
            let Some(g) = self.generations.get(&w.generation) else {
                return Err(format!(
                    "worker {id} belongs to generation {}, which does not exist",
                    w.generation
                ));
            };
            if w.slot >= g.slots.len() {
                return Err(format!(
                    "worker {id} sits in slot {} of generation {}, which has {} slots",
                    w.slot,
                    w.generation,
                    g.slots.len()
                ));
            }
        }
        for (g, generation) in &self.generations {
            for (i, slot) in generation.slots.iter().enumerate() {
                let Some(id) = slot.worker else { continue };
                match self.workers.get(&id) {
                    None => {
                        return Err(format!(
                            "slot {i} of generation {g} names worker {id}, which does not exist"
                        ));
                    }
                    Some(w) if w.generation != *g || w.slot != i => {
                        return Err(format!(
                            "slot {i} of generation {g} names worker {id}, of slot {} of generation {}",
                            w.slot, w.generation
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        for (pid, id) in &self.pids {
            if !self.workers.contains_key(id) {
                return Err(format!(
                    "pid {pid} is known as worker {id}, which does not exist"
                ));
            }
        }
        Ok(())
    }

    /// At most one generation serves, and at most one replaces it a batch at a time.
    fn one_generation_serves(&self) -> Result<(), String> {
        let count = |f: fn(&GenState) -> bool| -> Vec<String> {
            self.generations
                .iter()
                .filter(|(_, g)| f(&g.state))
                .map(|(id, _)| id.to_string())
                .collect()
        };
        let serving = count(|s| matches!(s, GenState::Serving));
        if serving.len() > 1 {
            return Err(format!("generations {} all serve", serving.join(", ")));
        }
        let rolling = count(|s| matches!(s, GenState::Rolling));
        if rolling.len() > 1 {
            return Err(format!("generations {} all roll", rolling.join(", ")));
        }
        Ok(())
    }

    /// The reload's phase and its generations' states say the same thing: starting, its
    /// generation is being prepared or started; on probation, it serves and the old ones stand
    /// by; rolling (either way), the new one rolls and the old one serves.
    fn the_run_agrees_with_its_generations(&self) -> Result<(), String> {
        let state = |g: &Generation| self.generations.get(g).map(|e| &e.state);
        let expect = |g: &Generation, what: &str, ok: fn(&GenState) -> bool| match state(g) {
            Some(s) if ok(s) => Ok(()),
            found => Err(format!(
                "the reload is {:?}, but generation {g} is {found:?}, not {what}",
                self.run.phase()
            )),
        };
        match &self.run {
            Run::Idle => Ok(()),
            Run::Starting(reload) => expect(&reload.generation, "preparing or starting", |s| {
                matches!(s, GenState::Preparing | GenState::Starting)
            }),
            Run::OnProbation(canary) => {
                expect(&canary.new, "serving", |s| matches!(s, GenState::Serving))?;
                for old in &canary.old {
                    expect(old, "standing by", |s| matches!(s, GenState::Standby))?;
                }
                Ok(())
            }
            Run::RollingForward { rollout, .. } | Run::RollingBack { rollout, .. } => {
                expect(&rollout.new, "rolling", |s| matches!(s, GenState::Rolling))?;
                expect(&rollout.old, "serving", |s| matches!(s, GenState::Serving))
            }
        }
    }

    /// At most `max_draining` generations beside the serving one (draining, failed, or being
    /// started) have a worker that was not killed: the oldest ones past the cap are killed, and
    /// a generation waits to start until they are gone.
    fn the_drain_cap_holds(&self) -> Result<(), String> {
        let Some(max) = self.serving_spec().map(|s| s.max_draining) else {
            return Ok(());
        };
        let besides: Vec<String> = self
            .generations
            .iter()
            .filter(|(_, g)| !matches!(g.state, GenState::Serving | GenState::Standby))
            .filter(|(id, g)| {
                matches!(
                    g.state,
                    GenState::Preparing | GenState::Starting | GenState::Rolling
                ) || self
                    .workers
                    .values()
                    .any(|w| w.generation == **id && w.state != WorkerState::Killed)
            })
            .map(|(id, _)| id.to_string())
            .collect();
        if besides.len() > max {
            return Err(format!(
                "{} generations beside the serving one keep workers ({}), max_draining {max}",
                besides.len(),
                besides.join(", ")
            ));
        }
        Ok(())
    }

    /// A reload request waiting for its verdict is held in one place only: queued, or covered
    /// by the reload (or canary) running.
    fn requests_are_held_once(&self) -> Result<(), String> {
        let mut held = BTreeSet::new();
        let running = self.run.reload().into_iter().flat_map(|r| &r.covers);
        for request in self.pending.iter().map(|(r, _)| r).chain(running) {
            if !held.insert(*request) {
                return Err(format!("reload request {request} is held twice"));
            }
            if request.0 > self.next_request {
                return Err(format!(
                    "reload request {request} is held, but only {} were made",
                    self.next_request
                ));
            }
        }
        Ok(())
    }

    /// The actions of the event just handled name only workers that exist (a worker's exit
    /// removes it: nothing is sent to it, asked of it or started for it after).
    fn actions_name_living_workers(&self) -> Result<(), String> {
        for action in &self.actions {
            let worker = match action {
                Action::Spawn { worker, .. }
                | Action::Send { worker, .. }
                | Action::Drain { worker, .. } => worker,
                _ => continue,
            };
            if !self.workers.contains_key(worker) {
                return Err(format!(
                    "{action:?} names worker {worker}, which does not exist"
                ));
            }
        }
        Ok(())
    }
}
