//! The state machine as plain data: events in, actions out. No processes, no clock.

use super::*;
use baton_proto::{MasterMessage, WorkerMessage};
use std::time::Duration;

mod properties;
mod rollout;
use baton_sys::process::{ExitKind, SignalNumber};

fn program(processes: usize) -> ProgramSpec {
    ProgramSpec {
        processes,
        ready_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(30),
        drain_signal: Some(SignalNumber::SIGTERM),
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_secs(10),
        failed_stop_timeout: Duration::from_secs(5),
        replace: None,
        name: "worker".into(),
        strategy: Strategy::AllAtOnce,
    }
}

fn spec(processes: usize) -> GenerationSpec {
    GenerationSpec {
        programs: vec![program(processes)],
        max_draining: 8,
        forward_usr1: false,
        canary_window: None,
        upgrade_signal: None,
        upgrade_timeout: Duration::from_secs(10),
        stop_delay: Duration::ZERO,
        watch_config: false,
    }
}

fn usr2() -> Intent {
    Intent::Reload(Trigger::Signal {
        name: "SIGUSR2",
        sender_pid: Some(42),
    })
}

fn pid_of(w: WorkerId) -> u32 {
    10_000 + w.0 as u32
}

struct Harness {
    s: Supervisor,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Harness {
            s: Supervisor::new(),
            now: Instant::now(),
        }
    }

    fn ev(&mut self, event: Event) -> Vec<Action> {
        self.s.handle(self.now, event)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Answers Prepare with `spec` and every Spawn with a pid; returns the spawned workers.
    fn prepare(&mut self, actions: &[Action], spec: GenerationSpec) -> Vec<WorkerId> {
        let g = prepared(actions);
        let spawns = self.ev(Event::Prepared {
            generation: g,
            result: Ok(spec),
        });
        self.spawn_all(&spawns)
    }

    fn spawn_all(&mut self, actions: &[Action]) -> Vec<WorkerId> {
        let workers = spawned(actions);
        for &w in &workers {
            let more = self.ev(Event::Spawned {
                worker: w,
                result: Ok(pid_of(w)),
            });
            assert!(more.is_empty(), "{more:?}");
        }
        workers
    }

    fn ready(&mut self, workers: &[WorkerId]) -> Vec<Action> {
        let mut all = Vec::new();
        for &w in workers {
            all.extend(self.ev(Event::Message {
                worker: w,
                message: WorkerMessage::Ready,
            }));
        }
        all
    }

    fn exit(&mut self, w: WorkerId, code: i32) -> Vec<Action> {
        self.ev(Event::Exited {
            pid: pid_of(w),
            status: ExitKind::Exited(code),
        })
    }

    /// Starts generation 1 with `n` ready workers.
    fn serving(&mut self, n: usize) -> Vec<WorkerId> {
        let start = self.s.start(self.now);
        let workers = self.prepare(&start, spec(n));
        let done = self.ready(&workers);
        assert!(done.is_empty(), "{done:?}");
        assert_eq!(
            self.s.generations(),
            vec![(Generation(1), Phase::Serving, n)]
        );
        workers
    }

    /// A complete successful reload; returns the new workers and the actions of the promotion.
    fn reload(&mut self, n: usize) -> (Vec<WorkerId>, Vec<Action>) {
        let prepare = self.ev(Event::Intent(usr2()));
        let workers = self.prepare(&prepare, spec(n));
        let promoted = self.ready(&workers);
        (workers, promoted)
    }
}

/// What `pattern` picks out of `actions`, in order.
macro_rules! picked {
    ($actions:expr, $pattern:pat => $out:expr) => {
        $actions
            .iter()
            .filter_map(|a| match a {
                $pattern => Some($out),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
}

fn spawned(actions: &[Action]) -> Vec<WorkerId> {
    picked!(actions, Action::Spawn { worker, .. } => *worker)
}

fn killed(actions: &[Action]) -> Vec<u32> {
    picked!(actions, Action::Kill { pid, .. } => *pid)
}

fn drained(actions: &[Action]) -> Vec<WorkerId> {
    picked!(actions, Action::Drain { worker, .. } => *worker)
}

/// The generation the first `Prepare` of `actions` asks for.
fn prepared(actions: &[Action]) -> Generation {
    picked!(actions, Action::Prepare { generation } => *generation)
        .first()
        .copied()
        .expect("a Prepare action")
}

#[test]
fn startup_serves_once_every_worker_is_ready() {
    let mut h = Harness::new();
    let start = h.s.start(h.now);
    assert_eq!(
        start,
        vec![Action::Prepare {
            generation: Generation(1)
        }]
    );
    let workers = h.prepare(&start, spec(2));
    assert_eq!(workers.len(), 2);
    assert!(h.ready(&workers[..1]).is_empty());
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Starting, 2)]);
    assert!(h.ready(&workers[1..]).is_empty());
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 2)]);
    assert_eq!(h.s.next_deadline(), None, "nothing to wait for: no timer");
}

#[test]
fn a_reload_drains_the_old_generation_only_after_the_new_one_is_ready() {
    let mut h = Harness::new();
    let old = h.serving(2);
    let prepare = h.ev(Event::Intent(usr2()));
    assert_eq!(
        prepare,
        vec![Action::Prepare {
            generation: Generation(2)
        }]
    );
    let new = h.prepare(&prepare, spec(2));
    // One new worker ready: the old generation is not touched yet.
    assert!(h.ready(&new[..1]).is_empty());
    let promoted = h.ready(&new[1..]);
    assert_eq!(
        drained(&promoted),
        old,
        "every old worker gets the drain message"
    );
    let signals: Vec<_> = promoted
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Drain {
                    signal: Some(SignalNumber::SIGTERM),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(signals.len(), 2, "and the drain signal");
    assert_eq!(
        h.s.generations(),
        vec![
            (Generation(1), Phase::Draining, 2),
            (Generation(2), Phase::Serving, 2)
        ]
    );
    // The old generation is gone when its last worker exits: its listeners are released.
    // Whatever the exited worker left in its process group goes with it.
    assert_eq!(
        h.exit(old[0], 0),
        vec![
            Action::KillGroup {
                pgid: pid_of(old[0])
            },
            Action::Forget { worker: old[0] }
        ]
    );
    assert_eq!(
        h.exit(old[1], 0),
        vec![
            Action::KillGroup {
                pgid: pid_of(old[1])
            },
            Action::Forget { worker: old[1] },
            Action::Release {
                generation: Generation(1)
            }
        ]
    );
    assert_eq!(h.s.generations(), vec![(Generation(2), Phase::Serving, 2)]);
    let record = h.s.history().last().unwrap().clone();
    assert_eq!(record.verdict, Ok(()));
    assert_eq!(record.covers, vec![RequestId(1)]);
}

#[test]
fn requests_during_a_reload_coalesce_into_one_follow_up_and_all_are_accounted_for() {
    let mut h = Harness::new();
    h.serving(1);
    let first = h.ev(Event::Intent(usr2()));
    // Three more requests while reload 1 runs: no second Prepare now.
    for _ in 0..3 {
        assert!(h.ev(Event::Intent(usr2())).is_empty());
    }
    let new = h.prepare(&first, spec(1));
    let promoted = h.ready(&new);
    // Reload 1 succeeded and reload 2 (covering 2, 3, 4) started at once.
    assert!(
        promoted.contains(&Action::Prepare {
            generation: Generation(3)
        }),
        "{promoted:?}"
    );
    let newer = h.prepare(&promoted, spec(1));
    h.ready(&newer);
    let history: Vec<_> = h.s.history().cloned().collect();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].covers, vec![RequestId(1)]);
    assert_eq!(
        history[1].covers,
        vec![RequestId(2), RequestId(3), RequestId(4)]
    );
    assert!(history.iter().all(|r| r.verdict.is_ok()));
}

#[test]
fn a_worker_that_exits_before_ready_fails_the_reload_and_leaves_the_old_generation_alone() {
    let mut h = Harness::new();
    let old = h.serving(2);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, spec(2));
    let actions = h.exit(new[0], 3);
    // The other new worker is asked to drain (it may have accepted connections before it was
    // ready), not killed; nothing is sent to the old workers.
    assert!(killed(&actions).is_empty(), "{actions:?}");
    assert_eq!(drained(&actions), vec![new[1]]);
    assert!(actions.contains(&Action::Drain {
        worker: new[1],
        pid: pid_of(new[1]),
        deadline_ms: 5000,
        signal: Some(SignalNumber::SIGTERM)
    }));
    assert!(!actions.iter().any(|a| matches!(a, Action::Drain { pid, .. } | Action::Signal { pid, .. } if *pid == pid_of(old[0]) || *pid == pid_of(old[1]))));
    let verdict = h.s.history().last().unwrap().verdict.clone().unwrap_err();
    assert!(
        verdict.contains("exited with status 3 before it was ready"),
        "{verdict}"
    );
    assert_eq!(
        h.exit(new[1], 137).last(),
        Some(&Action::Release {
            generation: Generation(2)
        })
    );
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 2)]);
    // The old generation is still the one that serves and a later reload works.
    let (_, promoted) = h.reload(2);
    assert_eq!(drained(&promoted), old);
}

#[test]
fn a_worker_that_is_never_ready_fails_the_reload_at_its_deadline() {
    let mut h = Harness::new();
    h.serving(1);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, spec(2));
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(5)));
    h.advance(Duration::from_millis(4999));
    assert!(h.ev(Event::Tick).is_empty());
    h.advance(Duration::from_millis(1));
    // Both are late at once; the first fails the generation, both are asked to finish.
    let failed = h.ev(Event::Tick);
    assert_eq!(drained(&failed), new, "asked to finish, not killed");
    assert!(killed(&failed).is_empty(), "{failed:?}");
    let verdict = h.s.history().last().unwrap().verdict.clone().unwrap_err();
    assert!(verdict.contains("was not ready after 5000 ms"), "{verdict}");
    // A worker of the failed generation that does not exit is killed at failed_stop_timeout.
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(5)));
    h.advance(Duration::from_millis(4999));
    assert!(killed(&h.ev(Event::Tick)).is_empty());
    h.exit(new[1], 0);
    h.advance(Duration::from_millis(1));
    assert_eq!(killed(&h.ev(Event::Tick)), vec![pid_of(new[0])]);
    assert_eq!(
        h.exit(new[0], 137).last(),
        Some(&Action::Release {
            generation: Generation(2)
        })
    );
}

#[test]
fn an_unreadable_config_fails_the_reload_without_spawning() {
    let mut h = Harness::new();
    h.serving(1);
    h.ev(Event::Intent(usr2()));
    let actions = h.ev(Event::Prepared {
        generation: Generation(2),
        result: Err("baton.yaml:3:1: unknown field `bogus`".into()),
    });
    assert_eq!(
        actions,
        vec![
            Action::Verdict(Verdict {
                requests: vec![RequestId(1)],
                reload: Some(ReloadId(1)),
                generation: Some(Generation(2)),
                result: Err("baton.yaml:3:1: unknown field `bogus`".into()),
                duration: Duration::ZERO,
                culprit: None,
            }),
            Action::Release {
                generation: Generation(2)
            },
        ]
    );
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 1)]);
    assert!(
        h.s.history()
            .last()
            .unwrap()
            .verdict
            .as_ref()
            .unwrap_err()
            .contains("bogus")
    );
}

#[test]
fn a_worker_still_spawning_when_its_generation_fails_is_killed_once_it_has_a_pid() {
    let mut h = Harness::new();
    h.serving(2);
    let prepare = h.ev(Event::Intent(usr2()));
    let g = match prepare[..] {
        [Action::Prepare { generation }] => generation,
        _ => panic!("{prepare:?}"),
    };
    let spawns = h.ev(Event::Prepared {
        generation: g,
        result: Ok(spec(2)),
    });
    let new = spawned(&spawns);
    // The first spawn fails: the generation fails while the second is still being spawned.
    h.ev(Event::Spawned {
        worker: new[0],
        result: Err("fault injected".into()),
    });
    assert_eq!(
        h.s.history()
            .last()
            .unwrap()
            .verdict
            .as_ref()
            .err()
            .map(String::as_str),
        Some("worker 3 of generation 2 could not be started: fault injected")
    );
    let late = h.ev(Event::Spawned {
        worker: new[1],
        result: Ok(pid_of(new[1])),
    });
    assert_eq!(killed(&late), vec![pid_of(new[1])], "{late:?}");
}

#[test]
fn a_draining_generation_is_killed_at_its_deadline_and_not_before() {
    let mut h = Harness::new();
    let old = h.serving(1);
    h.reload(1);
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(30)));
    h.advance(Duration::from_secs(29));
    assert!(h.ev(Event::Tick).is_empty());
    h.advance(Duration::from_secs(1));
    assert_eq!(killed(&h.ev(Event::Tick)), vec![pid_of(old[0])]);
    // Not reaped a second later (the kill failed, or it sleeps in the kernel): killed again,
    // once a second, until it is gone.
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(1)));
    h.advance(Duration::from_millis(999));
    assert!(h.ev(Event::Tick).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(killed(&h.ev(Event::Tick)), vec![pid_of(old[0])]);
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(1)));
    let gone = h.ev(Event::Exited {
        pid: pid_of(old[0]),
        status: ExitKind::Signaled(SignalNumber::SIGKILL),
    });
    assert!(gone.contains(&Action::Release {
        generation: Generation(1)
    }));
    assert_eq!(
        h.s.next_deadline(),
        None,
        "reaped: nothing left to wait for"
    );
}

#[test]
fn draining_generations_beyond_the_cap_are_killed_oldest_first() {
    let mut h = Harness::new();
    let g1 = h.serving(1);
    let mut capped = spec(1);
    capped.max_draining = 2;
    // Returns what the reload's start did, and what its promotion did.
    let reload = |h: &mut Harness| {
        let prepare = h.ev(Event::Intent(usr2()));
        let new = h.prepare(&prepare, capped.clone());
        (prepare, h.ready(&new))
    };
    let (start, done) = reload(&mut h); // gen 1 draining
    assert!(killed(&start).is_empty() && killed(&done).is_empty());
    let (start, done) = reload(&mut h); // gen 1 draining, gen 3 starting, then gens 1, 2 draining
    assert!(killed(&start).is_empty() && killed(&done).is_empty());
    // Gens 1 and 2 draining plus gen 4 starting would be 3 besides the serving one: the cap (2)
    // makes room before the new generation starts, oldest first ...
    let start = h.ev(Event::Intent(usr2()));
    assert_eq!(killed(&start), vec![pid_of(g1[0])]);
    let waiting = h.ev(Event::Prepared {
        generation: Generation(4),
        result: Ok(capped.clone()),
    });
    // ... and the new generation starts only once the killed one is gone, so at most cap + 1
    // generations are ever alive.
    assert!(spawned(&waiting).is_empty(), "{waiting:?}");
    let gone = h.exit(g1[0], 137);
    assert!(gone.contains(&Action::Release {
        generation: Generation(1)
    }));
    let new = h.spawn_all(&gone);
    assert_eq!(new.len(), 1);
    assert!(killed(&h.ready(&new)).is_empty());
    let phases: Vec<Phase> = h.s.generations().iter().map(|g| g.1).collect();
    assert_eq!(phases, [Phase::Draining, Phase::Draining, Phase::Serving]);
}

#[test]
fn a_crashed_serving_worker_is_replaced_with_doubling_backoff() {
    let mut h = Harness::new();
    let mut current = h.serving(1)[0];
    let mut delays = Vec::new();
    for _ in 0..4 {
        h.exit(current, 1);
        let at = h.s.next_deadline().unwrap();
        delays.push(at - h.now);
        h.now = at;
        let respawn = h.ev(Event::Tick);
        current = h.spawn_all(&respawn)[0];
        h.ready(&[current]);
    }
    let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, [100, 200, 400, 800]);
    // A worker that ran longer than the maximum backoff starts the sequence again.
    h.advance(Duration::from_secs(11));
    h.exit(current, 1);
    assert_eq!(
        h.s.next_deadline().unwrap() - h.now,
        Duration::from_millis(100)
    );
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 0)]);
}

#[test]
fn three_crashes_in_a_row_degrade_the_generation_until_a_worker_stays_up() {
    let mut h = Harness::new();
    let mut current = h.serving(1)[0];
    let g = Generation(1);
    for crash in 1..=CRASH_LOOP {
        assert!(
            h.s.crash_loops(g, h.now).is_empty(),
            "not yet at crash {crash}"
        );
        h.exit(current, 1);
        // While it waits out its backoff, the slot keeps a row: the worker that crashed.
        let snap = h.s.snapshot(h.now);
        let row = &snap.generations[0].workers[0];
        assert_eq!(
            (row.id, row.state, row.pid),
            (current, baton_proto::control::WorkerState::Backoff, None)
        );
        assert!(row.restart_in.is_some());
        if crash < CRASH_LOOP {
            h.now = h.s.next_deadline().unwrap();
            let respawn = h.ev(Event::Tick);
            current = h.spawn_all(&respawn)[0];
            h.ready(&[current]);
        }
    }
    let loops = h.s.crash_loops(g, h.now);
    assert_eq!(loops.len(), 1, "{loops:?}");
    assert_eq!(loops[0].crashes, CRASH_LOOP);
    assert_eq!(loops[0].last_exit.as_deref(), Some("exited with status 1"));
    assert_eq!(loops[0].restart_in, Some(Duration::from_millis(400)));
    // Restarted and ready: still degraded until it has stayed up for restart_backoff_max.
    h.now = h.s.next_deadline().unwrap();
    let respawn = h.ev(Event::Tick);
    current = h.spawn_all(&respawn)[0];
    h.ready(&[current]);
    assert_eq!(h.s.crash_loops(g, h.now)[0].restart_in, None);
    let stable =
        h.s.next_deadline()
            .expect("a deadline to forget the crashes");
    assert_eq!(stable - h.now, Duration::from_secs(10));
    h.now = stable;
    h.ev(Event::Tick);
    assert!(h.s.crash_loops(g, h.now).is_empty(), "recovered");
    assert_eq!(h.s.next_deadline(), None, "no timer left once recovered");
    // The count started over: the next crash waits the first backoff.
    h.exit(current, 1);
    assert_eq!(
        h.s.next_deadline().unwrap() - h.now,
        Duration::from_millis(100)
    );
}

#[test]
fn an_unhealthy_worker_is_replaced_at_once_and_killed_later_but_never_half_the_generation() {
    let mut h = Harness::new();
    let start = h.s.start(h.now);
    let mut with_liveness = spec(2);
    with_liveness.programs[0].replace = Some(ReplaceSpec {
        max_replacing_percent: 50,
        kill_after: Duration::from_secs(2),
    });
    let workers = h.prepare(&start, with_liveness);
    h.ready(&workers);
    let unhealthy = |worker| Event::Unhealthy {
        worker,
        reason: "no heartbeat for 1000 ms".into(),
    };
    let actions = h.ev(unhealthy(workers[0]));
    // Its slot's next worker starts now; it is asked to drain (packet and signal).
    let new = h.spawn_all(&actions);
    assert_eq!(new.len(), 1);
    assert_eq!(drained(&actions), vec![workers[0]]);
    // 50% of 2 workers: the second one failing now is not replaced too.
    let second = h.ev(unhealthy(workers[1]));
    assert!(
        spawned(&second).is_empty() && drained(&second).is_empty(),
        "{second:?}"
    );
    // The replaced one is killed at kill_after, not before.
    // (The new worker's ready deadline, 5 s, comes later.)
    assert_eq!(h.s.next_deadline().unwrap() - h.now, Duration::from_secs(2));
    h.advance(Duration::from_secs(2));
    let kill = h.ev(Event::Tick);
    assert!(
        kill.iter()
            .any(|a| matches!(a, Action::Kill { pid, .. } if *pid == pid_of(workers[0]))),
        "{kill:?}"
    );
    // Its exit restarts nothing: the slot has its new worker.
    let exit = h.exit(workers[0], 137);
    assert!(spawned(&exit).is_empty(), "{exit:?}");
    // Gone, but its replacement is not ready yet: the slot is still being replaced.
    let early = h.ev(unhealthy(workers[1]));
    assert!(
        spawned(&early).is_empty() && drained(&early).is_empty(),
        "a replaced worker that exited at once lets no burst through: {early:?}"
    );
    h.ready(&new);
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 2)]);
    assert_eq!(h.s.counters().replaced_unhealthy, 1);
    // Now the second one may be replaced.
    let again = h.ev(unhealthy(workers[1]));
    assert_eq!(spawned(&again).len(), 1);
    // A worker that is not ready (starting) is not judged.
    let starting = spawned(&again)[0];
    h.spawn_all(&again);
    assert!(h.ev(unhealthy(starting)).is_empty());
}

#[test]
fn a_recycled_worker_drains_only_once_its_successor_is_ready_one_at_a_time() {
    let mut h = Harness::new();
    let workers = h.serving(2);
    let recycle = |worker| Event::Recycle {
        worker,
        reason: "its memory was 600.0 MiB, above max_rss 512.0 MiB, for 30 s".into(),
    };
    let actions = h.ev(recycle(workers[0]));
    let successor = h.spawn_all(&actions);
    assert_eq!(successor.len(), 1);
    assert!(
        drained(&actions).is_empty(),
        "the old one serves on meanwhile"
    );
    // One at a time per program.
    assert!(h.ev(recycle(workers[1])).is_empty());
    // The successor is ready: now the old one drains.
    let ready = h.ready(&successor);
    assert_eq!(drained(&ready), vec![workers[0]]);
    let exit = h.exit(workers[0], 0);
    assert!(
        spawned(&exit).is_empty(),
        "its slot has its successor: {exit:?}"
    );
    assert_eq!(h.s.counters().replaced_memory, 1);
    // A successor that dies before it is ready leaves the old worker in its slot, serving.
    let again = h.ev(recycle(workers[1]));
    let doomed = h.spawn_all(&again);
    let died = h.exit(doomed[0], 1);
    assert!(
        spawned(&died).is_empty() && drained(&died).is_empty(),
        "{died:?}"
    );
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 2)]);
    let snap = h.s.snapshot(h.now);
    let ids: Vec<WorkerId> = snap.generations[0].workers.iter().map(|w| w.id).collect();
    assert_eq!(ids, vec![successor[0], workers[1]]);
    // And it can be recycled again later.
    assert_eq!(spawned(&h.ev(recycle(workers[1]))).len(), 1);
}

#[test]
fn graceful_stop_drains_everything_then_exits_zero() {
    let mut h = Harness::new();
    let old = h.serving(1);
    let (new, _) = h.reload(1);
    let stop = h.ev(Event::Intent(Intent::Stop {
        graceful: true,
        trigger: Trigger::Other("test".into()),
    }));
    assert_eq!(drained(&stop), new);
    let refused = h.ev(Event::Intent(usr2()));
    assert!(
        matches!(&refused[..], [Action::Verdict(Verdict { reload: None, result: Err(why), .. })] if why.contains("stopping")),
        "reloads are refused while stopping, with a verdict: {refused:?}"
    );
    assert!(!h.exit(old[0], 0).contains(&Action::Exit { code: 0 }));
    assert_eq!(h.exit(new[0], 0).last(), Some(&Action::Exit { code: 0 }));
}

#[test]
fn stop_during_a_reload_drains_the_new_generation_and_the_old() {
    let mut h = Harness::new();
    let old = h.serving(1);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, spec(1));
    let stop = h.ev(Event::Intent(Intent::Stop {
        graceful: true,
        trigger: Trigger::Other("t".into()),
    }));
    // Both finish what they have: the old one drains, the one that was starting too.
    assert!(killed(&stop).is_empty(), "{stop:?}");
    let mut both = drained(&stop);
    both.sort();
    assert_eq!(both, [old.clone(), new.clone()].concat());
    h.exit(new[0], 0);
    assert_eq!(h.exit(old[0], 0).last(), Some(&Action::Exit { code: 0 }));
}

#[test]
fn fast_stop_kills_every_worker() {
    let mut h = Harness::new();
    let workers = h.serving(3);
    let stop = h.ev(Event::Intent(Intent::Stop {
        graceful: false,
        trigger: Trigger::Other("t".into()),
    }));
    assert_eq!(
        killed(&stop),
        workers.iter().map(|w| pid_of(*w)).collect::<Vec<_>>()
    );
    h.exit(workers[0], 137);
    h.exit(workers[1], 137);
    assert_eq!(
        h.exit(workers[2], 137).last(),
        Some(&Action::Exit { code: 0 })
    );
}

#[test]
fn a_failed_first_generation_ends_the_master_with_status_one() {
    let mut h = Harness::new();
    let start = h.s.start(h.now);
    let workers = h.prepare(&start, spec(2));
    let actions = h.exit(workers[0], 1);
    assert_eq!(drained(&actions), vec![workers[1]]);
    assert_eq!(
        h.exit(workers[1], 0).last(),
        Some(&Action::Exit { code: 1 })
    );
}

#[test]
fn usr1_is_never_fatal_and_forwarded_only_when_configured() {
    let mut h = Harness::new();
    h.serving(1);
    let trigger = Trigger::Signal {
        name: "SIGUSR1",
        sender_pid: None,
    };
    assert!(
        h.ev(Event::Intent(Intent::ReopenLogs(trigger.clone())))
            .is_empty()
    );
    let prepare = h.ev(Event::Intent(usr2()));
    let mut forwarding = spec(1);
    forwarding.forward_usr1 = true;
    let new = h.prepare(&prepare, forwarding);
    h.ready(&new);
    let actions = h.ev(Event::Intent(Intent::ReopenLogs(trigger)));
    assert!(actions.contains(&Action::Signal {
        pid: pid_of(new[0]),
        signal: SignalNumber::SIGUSR1
    }));
    assert_eq!(h.s.generations().last().unwrap().1, Phase::Serving);
}

#[test]
fn unknown_pids_and_garbage_events_change_nothing() {
    let mut h = Harness::new();
    h.serving(1);
    assert!(
        h.ev(Event::Exited {
            pid: 1,
            status: ExitKind::Exited(0)
        })
        .is_empty()
    );
    assert!(
        h.ev(Event::Message {
            worker: WorkerId(999),
            message: WorkerMessage::Ready
        })
        .is_empty()
    );
    assert!(
        h.ev(Event::Spawned {
            worker: WorkerId(999),
            result: Ok(5)
        })
        .is_empty()
    );
    assert!(h.ev(Event::Tick).is_empty());
    assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Serving, 1)]);
}

#[test]
fn a_stop_before_the_first_generation_serves_exits_zero() {
    let mut h = Harness::new();
    let start = h.s.start(h.now);
    let workers = h.prepare(&start, spec(1));
    let stop = h.ev(Event::Intent(Intent::Stop {
        graceful: true,
        trigger: Trigger::Other("t".into()),
    }));
    assert_eq!(drained(&stop), workers);
    assert_eq!(
        h.exit(workers[0], 0).last(),
        Some(&Action::Exit { code: 0 })
    );
}

#[test]
fn a_serving_worker_that_stops_on_its_own_is_replaced_when_it_exits() {
    let mut h = Harness::new();
    let w = h.serving(1)[0];
    assert!(
        h.ev(Event::Message {
            worker: w,
            message: WorkerMessage::Draining
        })
        .is_empty()
    );
    h.exit(w, 0);
    assert_eq!(
        h.s.next_deadline(),
        Some(h.now + Duration::from_millis(100)),
        "restart scheduled"
    );
}

#[test]
fn several_programs_make_one_generation_ready_only_when_all_are() {
    let mut h = Harness::new();
    let start = h.s.start(h.now);
    let mut two = spec(1);
    let mut slow = program(2);
    slow.ready_timeout = Duration::from_secs(60);
    two.programs.push(slow);
    let spawns = h.ev(Event::Prepared {
        generation: Generation(1),
        result: Ok(two),
    });
    let programs: Vec<(usize, usize)> = spawns
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { program, slot, .. } => Some((*program, *slot)),
            _ => None,
        })
        .collect();
    assert_eq!(programs, [(0, 0), (1, 0), (1, 1)]);
    assert_eq!(
        start,
        vec![Action::Prepare {
            generation: Generation(1)
        }]
    );
    let workers = h.spawn_all(&spawns);
    assert!(h.ready(&workers[..2]).is_empty());
    assert_eq!(h.s.generations()[0].1, Phase::Starting);
    // The first program's worker has the 5 s deadline, the second's 60 s: at 5 s only the late
    // one of the first program fails the start.
    h.advance(Duration::from_secs(5));
    assert!(
        h.ev(Event::Tick).is_empty(),
        "the ready ones have no deadline left"
    );
    assert!(h.ready(&workers[2..]).is_empty());
    assert_eq!(h.s.generations()[0].1, Phase::Serving);
}

fn on_probation(ms: u64) -> GenerationSpec {
    let mut s = spec(1);
    s.canary_window = Some(Duration::from_millis(ms));
    s
}

fn sent(actions: &[Action], message: &MasterMessage) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { worker, message: m } if m == message => Some(*worker),
            _ => None,
        })
        .collect()
}

#[test]
fn a_canary_that_survives_its_window_succeeds_and_only_then_the_old_generation_drains() {
    let mut h = Harness::new();
    let old = h.serving(1);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, on_probation(3000));
    let promoted = h.ready(&new);
    assert_eq!(
        sent(&promoted, &MasterMessage::Pause),
        old,
        "the old generation pauses"
    );
    assert!(drained(&promoted).is_empty(), "and is not drained yet");
    assert!(
        h.s.history().next().is_none(),
        "no verdict during the probation"
    );
    assert_eq!(h.s.generations()[0].1, Phase::Standby);
    // A request during the probation waits for it.
    assert!(h.ev(Event::Intent(usr2())).is_empty());
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(3)));
    h.advance(Duration::from_secs(3));
    let done = h.ev(Event::Tick);
    assert_eq!(drained(&done), old);
    assert!(
        done.contains(&Action::Prepare {
            generation: Generation(3)
        }),
        "the queued request follows"
    );
    let verdict = h.s.history().next().unwrap().clone();
    assert_eq!(verdict.verdict, Ok(()));
    assert_eq!(verdict.duration, Duration::from_secs(3));
}

#[test]
fn a_canary_that_crashes_in_its_window_is_rolled_back_and_the_old_generation_resumes() {
    let mut h = Harness::new();
    let old = h.serving(1);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, on_probation(3000));
    h.ready(&new);
    h.advance(Duration::from_secs(1));
    let crash = h.exit(new[0], 1);
    assert_eq!(
        sent(&crash, &MasterMessage::Resume),
        old,
        "the old generation accepts again"
    );
    assert!(drained(&crash).is_empty());
    assert_eq!(h.s.generations()[0], (Generation(1), Phase::Serving, 1));
    let verdict = h.s.history().next().unwrap().verdict.clone().unwrap_err();
    assert!(verdict.contains("rolled back to generation 1"), "{verdict}");
    assert!(verdict.contains("exited with status 1"), "{verdict}");
    // No restart of the failed canary, and nothing is due any more.
    assert_eq!(h.s.next_deadline(), None);
}

#[test]
fn a_probe_failing_during_the_probation_rolls_back_and_outside_it_changes_nothing() {
    let mut h = Harness::new();
    let old = h.serving(1);
    let prepare = h.ev(Event::Intent(usr2()));
    let new = h.prepare(&prepare, on_probation(3000));
    h.ready(&new);
    let failed = h.ev(Event::ProbeFailed {
        worker: new[0],
        reason: "HTTP status 503".into(),
    });
    assert_eq!(sent(&failed, &MasterMessage::Resume), old);
    assert_eq!(
        drained(&failed),
        new,
        "the canary finishes what it accepted"
    );
    assert!(killed(&failed).is_empty());
    let verdict = h.s.history().next().unwrap().verdict.clone().unwrap_err();
    assert!(
        verdict.contains("failed its readiness probe: HTTP status 503"),
        "{verdict}"
    );
    // A late report about a generation that is not on probation is ignored.
    assert!(
        h.ev(Event::ProbeFailed {
            worker: old[0],
            reason: "late".into()
        })
        .is_empty()
    );
}

#[test]
fn a_supervisor_that_crosses_an_upgrade_decides_the_same_and_resends_the_drains() {
    let mut h = Harness::new();
    let old = h.serving(2);
    h.reload(2);
    h.advance(Duration::from_secs(10));
    let value = serde_json::to_value(crate::upgrade::machine(&h.s)).unwrap();
    let machine: crate::upgrade::v3::Machine = serde_json::from_value(value).unwrap();
    let mut resumed = Supervisor::from_parts(machine.into()).unwrap();
    assert_eq!(resumed.generations(), h.s.generations());
    assert_eq!(resumed.history().count(), h.s.history().count());
    let (a, b) = (
        resumed.next_deadline().unwrap(),
        h.s.next_deadline().unwrap(),
    );
    let skew = if a > b { a - b } else { b - a };
    assert!(
        skew < Duration::from_millis(1),
        "deadline moved by {skew:?}"
    );
    // The drains go out again, with the time left.
    let drains = resumed.drain_messages(h.now);
    assert_eq!(drains.len(), 2, "{drains:?}");
    for action in &drains {
        match action {
            Action::Drain {
                worker,
                deadline_ms,
                signal: None,
                ..
            } => {
                assert!(old.contains(worker));
                assert!((19_000..=20_000).contains(deadline_ms), "{deadline_ms}");
            }
            other => panic!("{other:?}"),
        }
    }
    // At the deadline both kill the same workers.
    let at = b + Duration::from_millis(1);
    let kills = killed(&resumed.handle(at, Event::Tick));
    assert_eq!(kills, killed(&h.s.handle(at, Event::Tick)));
    assert_eq!(kills.len(), 2);
}

#[test]
fn a_graceful_stop_with_a_stop_delay_serves_on_until_it_ends_or_a_second_stop_cuts_it() {
    let stop = || {
        Event::Intent(Intent::Stop {
            graceful: true,
            trigger: Trigger::Other("SIGTERM".into()),
        })
    };
    for again in [false, true] {
        let mut h = Harness::new();
        let start = h.s.start(h.now);
        let delayed = GenerationSpec {
            stop_delay: Duration::from_secs(2),
            ..spec(2)
        };
        let workers = h.prepare(&start, delayed);
        h.ready(&workers);
        let first = h.ev(stop());
        assert!(drained(&first).is_empty(), "still serving: {first:?}");
        assert!(h.s.snapshot(h.now).stopping);
        assert_eq!(
            h.s.snapshot(h.now).stop_delay_left,
            Some(Duration::from_secs(2))
        );
        assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(2)));
        if again {
            // A second SIGTERM: the operator will not wait.
            h.advance(Duration::from_millis(500));
            assert_eq!(drained(&h.ev(stop())), workers);
        } else {
            h.advance(Duration::from_millis(1999));
            assert!(drained(&h.ev(Event::Tick)).is_empty());
            h.advance(Duration::from_millis(1));
            assert_eq!(drained(&h.ev(Event::Tick)), workers);
        }
        assert_eq!(h.s.snapshot(h.now).stop_delay_left, None);
        assert_eq!(h.s.generations(), vec![(Generation(1), Phase::Draining, 2)]);
    }
}
