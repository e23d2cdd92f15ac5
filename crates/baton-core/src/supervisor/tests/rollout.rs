//! Rolling reloads as plain data: a small world plays the master (every spawn gets a pid, every
//! worker reports ready or fails as told, every drained worker exits when the world lets it) and
//! counts the processes alive after each step.

use std::collections::{BTreeSet, VecDeque};

use super::*;

fn rolling(processes: usize, batch: usize) -> GenerationSpec {
    let mut s = spec(processes);
    s.programs[0].strategy = Strategy::Rolling { batch };
    s
}

/// The master's side of the exchange, with the processes alive counted.
struct World {
    h: Harness,
    alive: BTreeSet<WorkerId>,
    peak: usize,
    /// Spawned workers that exit with status 1 instead of reporting ready.
    doomed: BTreeSet<WorkerId>,
    /// Drained workers exit at once unless held (keep-alive clients holding them).
    hold: bool,
    held: Vec<WorkerId>,
    drained: Vec<WorkerId>,
    spawned: Vec<WorkerId>,
    verdicts: Vec<Verdict>,
}

impl World {
    fn new(n: usize) -> Self {
        let mut h = Harness::new();
        let old = h.serving(n);
        World {
            h,
            alive: old.into_iter().collect(),
            peak: n,
            doomed: BTreeSet::new(),
            hold: false,
            held: Vec::new(),
            drained: Vec::new(),
            spawned: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    fn run(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { worker, .. } => {
                    self.spawned.push(worker);
                    self.alive.insert(worker);
                    self.peak = self.peak.max(self.alive.len());
                    queue.extend(self.h.ev(Event::Spawned {
                        worker,
                        result: Ok(pid_of(worker)),
                    }));
                    if self.doomed.contains(&worker) {
                        self.alive.remove(&worker);
                        queue.extend(self.h.exit(worker, 1));
                    } else {
                        queue.extend(self.h.ready(&[worker]));
                    }
                }
                Action::Drain { worker, .. } => {
                    self.drained.push(worker);
                    if self.hold {
                        self.held.push(worker);
                    } else if self.alive.remove(&worker) {
                        queue.extend(self.h.exit(worker, 0));
                    }
                }
                Action::Kill { pid, .. } => {
                    if let Some(&w) = self.alive.iter().find(|w| pid_of(**w) == pid) {
                        self.alive.remove(&w);
                        queue.extend(self.h.ev(Event::Exited {
                            pid,
                            status: ExitKind::Signaled(SignalNumber::SIGKILL),
                        }));
                    }
                }
                Action::Verdict(v) => self.verdicts.push(v),
                _ => {}
            }
        }
    }

    /// The held drained workers exit.
    fn release(&mut self) {
        for w in std::mem::take(&mut self.held) {
            if self.alive.remove(&w) {
                let more = self.h.exit(w, 0);
                self.run(more);
            }
        }
    }

    fn reload(&mut self, spec: GenerationSpec) {
        let prepare = self.h.ev(Event::Intent(usr2()));
        let g = prepared(&prepare);
        let started = self.h.ev(Event::Prepared {
            generation: g,
            result: Ok(spec),
        });
        self.run(started);
    }

    fn generations(&self) -> Vec<(Generation, Phase, usize)> {
        self.h.s.generations()
    }
}

#[test]
fn a_rolling_reload_of_8_by_1_never_has_more_than_9_alive_and_replaces_each_worker_once() {
    let mut w = World::new(8);
    let old: BTreeSet<WorkerId> = w.alive.clone();
    w.reload(rolling(8, 1));
    assert_eq!(w.peak, 9, "at most processes + batch alive");
    assert_eq!(w.spawned.len(), 8, "each worker replaced once");
    let drained: BTreeSet<WorkerId> = w.drained.iter().copied().collect();
    assert_eq!(drained, old, "every old worker drained, once each");
    assert_eq!(w.drained.len(), 8);
    assert_eq!(w.generations(), vec![(Generation(2), Phase::Serving, 8)]);
    assert_eq!(w.verdicts.len(), 1);
    assert_eq!(w.verdicts[0].result, Ok(()));
}

#[test]
fn a_rolling_reload_of_8_by_3_goes_3_3_2_and_never_above_11() {
    let mut w = World::new(8);
    w.hold = true;
    w.reload(rolling(8, 3));
    // Batch 1 is ready: 3 old workers drain, and nothing more starts until they are gone.
    assert_eq!(w.spawned.len(), 3);
    assert_eq!(w.held.len(), 3);
    assert_eq!(w.alive.len(), 11);
    assert_eq!(w.generations()[1].1, Phase::Rolling);
    let snap = w.h.s.snapshot(w.h.now);
    assert!(
        snap.reload.is_some(),
        "the reload runs until the last batch"
    );
    w.release();
    assert_eq!(
        w.spawned.len(),
        6,
        "batch 2 once batch 1's old workers are gone"
    );
    w.release();
    assert_eq!(w.spawned.len(), 8, "batch 3: the last 2");
    assert_eq!(
        w.verdicts.len(),
        1,
        "the verdict once the last batch is ready"
    );
    assert_eq!(w.verdicts[0].result, Ok(()));
    assert!(w.peak <= 11, "peak {}", w.peak);
    // The old generation drains the 2 it has left.
    assert_eq!(
        w.generations(),
        vec![
            (Generation(1), Phase::Draining, 2),
            (Generation(2), Phase::Serving, 8)
        ]
    );
    w.release();
    assert_eq!(w.generations(), vec![(Generation(2), Phase::Serving, 8)]);
}

#[test]
fn a_failure_at_batch_3_of_8_fails_the_reload_naming_it_and_rolls_back_to_8_old_workers() {
    let mut w = World::new(8);
    // Workers 9 and 10 (batches 1 and 2) come up; worker 11, batch 3, exits.
    w.doomed.insert(WorkerId(11));
    w.reload(rolling(8, 1));
    assert_eq!(w.verdicts.len(), 1);
    let why = w.verdicts[0].result.clone().unwrap_err();
    assert!(why.contains("batch 3 of 8"), "{why}");
    assert!(why.contains("rolling back to generation 1"), "{why}");
    assert_eq!(w.verdicts[0].culprit, Some(WorkerId(11)));
    // Back to 8 workers of generation 1: the 2 retired slots got workers again, and
    // generation 2's 2 workers drained, never more than 9 alive.
    assert_eq!(w.generations(), vec![(Generation(1), Phase::Serving, 8)]);
    assert!(w.peak <= 9, "peak {}", w.peak);
    assert_eq!(w.h.s.counters().reloads_rolled_back, 1);
    assert!(!w.h.s.reloading());
    // The next reload runs as usual.
    w.doomed.clear();
    w.reload(rolling(8, 4));
    assert_eq!(w.verdicts.len(), 2);
    assert_eq!(w.verdicts[1].result, Ok(()));
    assert_eq!(w.generations(), vec![(Generation(3), Phase::Serving, 8)]);
}

#[test]
fn a_worker_not_ready_in_time_mid_rollout_rolls_back() {
    let mut h = Harness::new();
    h.serving(4);
    let prepare = h.ev(Event::Intent(usr2()));
    let first = h.prepare(&prepare, rolling(4, 2));
    assert_eq!(first.len(), 2, "one batch");
    h.advance(Duration::from_secs(6));
    let actions = h.ev(Event::Tick);
    let verdict = actions
        .iter()
        .find_map(|a| match a {
            Action::Verdict(v) => Some(v.clone()),
            _ => None,
        })
        .expect("a verdict");
    let why = verdict.result.unwrap_err();
    assert!(
        why.contains("batch 1 of 2") && why.contains("not ready after 5000 ms"),
        "{why}"
    );
    assert_eq!(
        drained(&actions).len(),
        2,
        "the batch is stopped: {actions:?}"
    );
}

#[test]
fn requests_during_a_rollout_wait_for_it_and_a_stop_drains_both_generations() {
    let mut w = World::new(4);
    w.hold = true;
    w.reload(rolling(4, 1));
    let queued = w.h.ev(Event::Intent(usr2()));
    assert!(queued.is_empty(), "queued behind the rollout: {queued:?}");
    assert_eq!(w.h.s.snapshot(w.h.now).queued, vec![RequestId(2)]);
    let stop = w.h.ev(Event::Intent(Intent::Stop {
        graceful: true,
        trigger: Trigger::Signal {
            name: "SIGTERM",
            sender_pid: None,
        },
    }));
    w.run(stop);
    let results: Vec<_> = w.verdicts.iter().map(|v| v.result.clone()).collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert_eq!(
        w.generations().iter().map(|g| g.1).collect::<Vec<_>>(),
        vec![Phase::Draining, Phase::Draining]
    );
    w.hold = false;
    w.release();
    assert!(w.alive.is_empty());
}

#[test]
fn a_rolling_canary_holds_the_second_batch_and_a_crash_in_its_window_rolls_back() {
    let mut w = World::new(4);
    let mut spec = rolling(4, 1);
    spec.canary_window = Some(Duration::from_secs(10));
    w.reload(spec.clone());
    assert_eq!(w.spawned.len(), 1, "batch 1 only, on probation");
    assert!(w.drained.is_empty(), "beside every old worker");
    assert_eq!(
        w.h.s.next_deadline(),
        Some(w.h.now + Duration::from_secs(10)),
        "a timer for the probation's end"
    );
    w.h.advance(Duration::from_secs(10));
    let tick = w.h.ev(Event::Tick);
    w.run(tick);
    assert_eq!(w.spawned.len(), 4, "the window passed: the rest roll");
    assert_eq!(w.verdicts[0].result, Ok(()));

    // Again, and the canary crashes in its window: rolled back, nothing old was retired.
    let mut w = World::new(4);
    w.reload(spec);
    let canary = w.spawned[0];
    w.alive.remove(&canary);
    let exit = w.h.exit(canary, 1);
    w.run(exit);
    let why = w.verdicts[0].result.clone().unwrap_err();
    assert!(why.contains("batch 1 of 4"), "{why}");
    assert_eq!(w.generations(), vec![(Generation(1), Phase::Serving, 4)]);
    assert!(w.drained.is_empty());
}

#[test]
fn a_rollout_waits_for_room_while_an_older_generation_still_drains_its_tail() {
    let mut w = World::new(4);
    w.hold = true;
    // Batches of 2: the first reload's last batch leaves 2 old workers draining (held).
    w.reload(rolling(4, 2));
    w.release();
    assert_eq!(w.verdicts.len(), 1);
    assert_eq!(
        w.held.len(),
        2,
        "generation 1's last 2 drain with the generation"
    );
    assert_eq!(w.alive.len(), 6);
    // The next rolling reload may not add its first batch yet: 6 + 2 > 4 + 2.
    w.reload(rolling(4, 2));
    assert_eq!(w.spawned.len(), 4, "no new worker while the tail drains");
    let snap = w.h.s.snapshot(w.h.now);
    let lane = &snap.rollout.as_ref().expect("a rollout").programs[0];
    assert_eq!(lane.step, baton_proto::control::RolloutStep::Waiting);
    w.hold = false;
    w.release();
    assert_eq!(w.spawned.len(), 8, "the tail exited: generation 3 rolls");
    assert!(w.peak <= 6, "peak {}", w.peak);
    assert_eq!(w.verdicts.len(), 2);
    assert_eq!(w.verdicts[1].result, Ok(()));
}
