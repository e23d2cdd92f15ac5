//! The state machine driven by random sequences of events (issue 29): reload and stop requests,
//! configurations read or refused (one or two programs, all at once or rolling, with or without
//! a canary window), processes started or not, ready, unhealthy, exiting, and time passing. A
//! small outside world answers the machine's actions as the master would. After every event
//! the machine's own invariants are checked (`check_invariants`, run by `handle` in this debug
//! build), and, across events:
//! - no reload request gets two verdicts, and none a verdict it was not made for;
//! - no action starts, tells or drains a worker after its exit;
//! - the machine crosses the upgrade's format (`upgrade/v3.rs`) and back unchanged, whatever
//!   phase its reload is in;
//! - a generation whose reload failed never serves, and a reload that fails (or rolls back)
//!   leaves a generation serving;
//! - once stopped (the end of every sequence), the machine exits, and then every reload request
//!   made has had exactly one verdict.
//!
//! A counterexample it finds becomes a named test in `tests.rs`.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{Just, ProptestConfig, any, prop_oneof, proptest};
use proptest::strategy::Strategy as _;

use super::*;

/// One step of a sequence. `pick` chooses among what is outstanding (modulo its number).
#[derive(Debug, Clone)]
enum Op {
    Reload,
    Stop {
        graceful: bool,
    },
    /// The configuration of an outstanding Prepare, read (with this shape) or refused.
    Prepare {
        pick: usize,
        read: Option<Shape>,
    },
    /// An outstanding Spawn: the process runs, or could not be started.
    Spawn {
        pick: usize,
        runs: bool,
    },
    Ready {
        pick: usize,
    },
    Unhealthy {
        pick: usize,
    },
    Exit {
        pick: usize,
        code: i32,
    },
    /// Time passes; the machine's deadlines are judged.
    Advance {
        ms: u64,
    },
}

/// The shape of a configuration read.
#[derive(Debug, Clone)]
struct Shape {
    programs: usize,
    processes: usize,
    rolling: bool,
    canary: bool,
    max_draining: usize,
    replace: bool,
}

fn shape() -> impl proptest::strategy::Strategy<Value = Shape> {
    (
        1..=2usize,
        1..=3usize,
        any::<bool>(),
        any::<bool>(),
        1..=3usize,
        any::<bool>(),
    )
        .prop_map(
            |(programs, processes, rolling, canary, max_draining, replace)| Shape {
                programs,
                processes,
                rolling,
                canary,
                max_draining,
                replace,
            },
        )
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Reload),
        1 => any::<bool>().prop_map(|graceful| Op::Stop { graceful }),
        4 => (any::<usize>(), proptest::option::weighted(0.8, shape()))
            .prop_map(|(pick, read)| Op::Prepare { pick, read }),
        5 => (any::<usize>(), proptest::bool::weighted(0.9))
            .prop_map(|(pick, runs)| Op::Spawn { pick, runs }),
        5 => any::<usize>().prop_map(|pick| Op::Ready { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Unhealthy { pick }),
        2 => (any::<usize>(), 0..3i32).prop_map(|(pick, code)| Op::Exit { pick, code }),
        2 => (1..20_000u64).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn spec_of(shape: &Shape) -> GenerationSpec {
    let programs = (0..shape.programs)
        .map(|i| ProgramSpec {
            name: format!("p{i}"),
            strategy: if shape.rolling {
                Strategy::Rolling { batch: 1 }
            } else {
                Strategy::AllAtOnce
            },
            replace: shape.replace.then_some(ReplaceSpec {
                max_replacing_percent: 50,
                kill_after: Duration::from_secs(2),
            }),
            ..program(shape.processes)
        })
        .collect();
    GenerationSpec {
        programs,
        max_draining: shape.max_draining,
        canary_window: shape.canary.then_some(Duration::from_secs(3)),
        ..spec(1)
    }
}

/// The master as the machine sees it: what it was asked and has not answered yet, the
/// processes that run, and what it has seen of the machine's verdicts.
struct World {
    s: Supervisor,
    now: Instant,
    prepares: Vec<Generation>,
    spawns: Vec<WorkerId>,
    running: BTreeMap<WorkerId, u32>,
    /// SIGKILLed processes, by pid: they exit at the next turn.
    killed: BTreeSet<u32>,
    exited_workers: BTreeSet<WorkerId>,
    next_pid: u32,
    verdicts: BTreeMap<RequestId, usize>,
    failed: BTreeSet<Generation>,
    exit: Option<i32>,
    /// A stop was asked for.
    stopping: bool,
    /// A reload failed in the event being handled (its verdict came).
    reload_failed: bool,
}

impl World {
    fn new() -> World {
        let mut w = World {
            s: Supervisor::new(),
            now: Instant::now(),
            prepares: Vec::new(),
            spawns: Vec::new(),
            running: BTreeMap::new(),
            killed: BTreeSet::new(),
            exited_workers: BTreeSet::new(),
            next_pid: 100,
            verdicts: BTreeMap::new(),
            failed: BTreeSet::new(),
            exit: None,
            stopping: false,
            reload_failed: false,
        };
        let actions = w.s.start(w.now);
        w.take(actions);
        w
    }

    fn feed(&mut self, event: Event) {
        assert!(self.exit.is_none(), "an event after the exit: {event:?}");
        let actions = self.s.handle(self.now, event);
        self.take(actions);
        let generations = self.s.generations();
        for (g, phase, _) in &generations {
            assert!(
                !(self.failed.contains(g) && *phase == Phase::Serving),
                "generation {g} serves after its reload failed"
            );
        }
        self.crosses_the_upgrade_format_unchanged();
        // A reload that failed (or rolled back) leaves a generation serving: the old one.
        if std::mem::take(&mut self.reload_failed) && !self.stopping {
            assert!(
                generations
                    .iter()
                    .any(|(_, phase, _)| matches!(phase, Phase::Serving | Phase::Rolling)),
                "a reload failed and nothing serves: {generations:?}"
            );
        }
    }

    /// The records taken apart into the upgrade's format and put together again make the same
    /// machine (what the format holds, compared whole), one that keeps every invariant.
    fn crosses_the_upgrade_format_unchanged(&self) {
        // Compared as Debug text: an `Instant` is written as a monotonic time read against the
        // clock at each write, so two writes of one differ by the nanoseconds between them.
        let format = crate::upgrade::machine(&self.s);
        let before = format!("{format:?}");
        let again = Supervisor::from_parts(format.into())
            .unwrap_or_else(|broken| panic!("the format's copy is refused: {broken}"));
        let after = format!("{:?}", crate::upgrade::machine(&again));
        assert_eq!(before, after, "the machine changed crossing the format");
    }

    /// The master's side of each action.
    fn take(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Prepare { generation } => self.prepares.push(generation),
                Action::Spawn { worker, .. } => {
                    assert!(
                        !self.exited_workers.contains(&worker),
                        "worker {worker} started again after its exit"
                    );
                    self.spawns.push(worker);
                }
                Action::Send { worker, .. } | Action::Drain { worker, .. } => assert!(
                    !self.exited_workers.contains(&worker),
                    "{action:?} after the worker's exit"
                ),
                Action::Kill { pid, .. } => {
                    self.killed.insert(pid);
                }
                Action::Verdict(verdict) => {
                    let last = self.s.last_request().map_or(0, |r| r.0);
                    for request in &verdict.requests {
                        assert!(request.0 >= 1 && request.0 <= last, "{verdict:?}");
                        let seen = self.verdicts.entry(*request).or_default();
                        *seen += 1;
                        assert_eq!(*seen, 1, "request {request} has two verdicts");
                    }
                    if let (Err(_), Some(g)) = (&verdict.result, verdict.generation) {
                        self.failed.insert(g);
                    }
                    if verdict.result.is_err() && verdict.reload.is_some_and(|r| r.0 > 0) {
                        self.reload_failed = true;
                    }
                }
                Action::Exit { code } => self.exit = Some(code),
                Action::Signal { .. }
                | Action::KillGroup { .. }
                | Action::Forget { .. }
                | Action::Release { .. } => {}
            }
        }
    }

    fn pick<T: Copy>(items: impl Iterator<Item = T>, pick: usize) -> Option<T> {
        let items: Vec<T> = items.collect();
        (!items.is_empty()).then(|| items[pick % items.len()])
    }

    fn exit_worker(&mut self, worker: WorkerId, code: i32) {
        if let Some(pid) = self.running.remove(&worker) {
            self.killed.remove(&pid);
            self.exited_workers.insert(worker);
            let status = if code < 0 {
                ExitKind::Signaled(SignalNumber::SIGKILL)
            } else {
                ExitKind::Exited(code)
            };
            self.feed(Event::Exited { pid, status });
        }
    }

    /// The processes SIGKILLed since the last turn exit.
    fn reap_killed(&mut self) {
        let killed: Vec<WorkerId> = self
            .running
            .iter()
            .filter(|(_, pid)| self.killed.contains(pid))
            .map(|(w, _)| *w)
            .collect();
        for worker in killed {
            if self.exit.is_none() {
                self.exit_worker(worker, -1);
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Reload => self.feed(Event::Intent(usr2())),
            Op::Stop { graceful } => {
                self.stopping = true;
                self.feed(Event::Intent(Intent::Stop {
                    graceful: *graceful,
                    trigger: Trigger::Other("the property test".into()),
                }));
            }
            Op::Prepare { pick, read } => {
                if let Some(g) = Self::pick(self.prepares.iter().copied(), *pick) {
                    self.prepares.retain(|p| *p != g);
                    let result = match read {
                        Some(shape) => Ok(spec_of(shape)),
                        None => Err("the configuration does not parse".into()),
                    };
                    self.feed(Event::Prepared {
                        generation: g,
                        result,
                    });
                }
            }
            Op::Spawn { pick, runs } => {
                if let Some(worker) = Self::pick(self.spawns.iter().copied(), *pick) {
                    self.spawns.retain(|w| *w != worker);
                    let result = if *runs {
                        self.next_pid += 1;
                        self.running.insert(worker, self.next_pid);
                        Ok(self.next_pid)
                    } else {
                        Err("no such file".into())
                    };
                    self.feed(Event::Spawned { worker, result });
                }
            }
            Op::Ready { pick } => {
                if let Some(worker) = Self::pick(self.running.keys().copied(), *pick) {
                    self.feed(Event::Message {
                        worker,
                        message: WorkerMessage::Ready,
                    });
                }
            }
            Op::Unhealthy { pick } => {
                if let Some(worker) = Self::pick(self.running.keys().copied(), *pick) {
                    self.feed(Event::Unhealthy {
                        worker,
                        reason: "missed its heartbeat".into(),
                    });
                }
            }
            Op::Exit { pick, code } => {
                if let Some(worker) = Self::pick(self.running.keys().copied(), *pick) {
                    self.exit_worker(worker, *code);
                }
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(*ms);
                self.feed(Event::Tick);
            }
        }
        if self.exit.is_none() {
            self.reap_killed();
        }
    }

    /// A fast stop, then the outside answers everything and every process exits, turn by
    /// turn, until the machine exits: it must, within a bounded number of turns.
    fn stop_to_the_end(&mut self) {
        if self.exit.is_none() {
            self.step(&Op::Stop { graceful: false });
        }
        for _ in 0..50 {
            if self.exit.is_some() {
                return;
            }
            while !self.prepares.is_empty() && self.exit.is_none() {
                self.step(&Op::Prepare {
                    pick: 0,
                    read: None,
                });
            }
            while !self.spawns.is_empty() && self.exit.is_none() {
                self.step(&Op::Spawn {
                    pick: 0,
                    runs: false,
                });
            }
            while let Some(&worker) = self.running.keys().next() {
                if self.exit.is_some() {
                    return;
                }
                self.exit_worker(worker, 0);
            }
            if self.exit.is_none() {
                self.step(&Op::Advance { ms: 60_000 });
            }
        }
        panic!(
            "the machine did not exit after a stop: {:?}",
            self.s.generations()
        );
    }
}

/// Sequences per run (each up to 80 steps, then a stop to the end): about 2 s in a debug build
/// here. `PROPTEST_CASES` sets another number.
const CASES: u32 = 2000;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(CASES),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_events_keep_every_invariant_and_every_request_gets_one_verdict(
        ops in proptest::collection::vec(op(), 0..80)
    ) {
        let mut world = World::new();
        for op in &ops {
            if world.exit.is_some() {
                break;
            }
            world.step(op);
        }
        world.stop_to_the_end();
        let made = world.s.last_request().map_or(0, |r| r.0);
        for request in 1..=made {
            let seen = world.verdicts.get(&RequestId(request)).copied().unwrap_or(0);
            assert_eq!(seen, 1, "request {request}: {seen} verdicts");
        }
    }
}

/// Found by the property test: a reload requested while the first generation starts, whose
/// start then fails, had no verdict (the master exited with it queued).
#[test]
fn a_request_queued_behind_a_failed_start_gets_its_verdict() {
    let mut world = World::new();
    world.step(&Op::Reload);
    world.step(&Op::Prepare {
        pick: 0,
        read: None,
    });
    assert_eq!(world.exit, Some(1), "the start failed: the master exits");
    assert_eq!(world.verdicts.get(&RequestId(1)), Some(&1));
}

/// Found by the property test: a worker retired by a rolling reload that rolls back kept its
/// slot's name after its exit (its generation's slot named a worker that no longer existed).
#[test]
fn a_worker_retired_by_a_rollback_leaves_its_slot_when_it_exits() {
    let shape = |programs, rolling| Shape {
        programs,
        processes: 1,
        rolling,
        canary: false,
        max_draining: 1,
        replace: false,
    };
    let mut world = World::new();
    for op in [
        Op::Prepare {
            pick: 0,
            read: Some(shape(1, false)),
        },
        Op::Spawn {
            pick: 0,
            runs: true,
        },
        Op::Ready { pick: 0 },
        Op::Exit { pick: 0, code: 0 },
        Op::Reload,
        // Two programs, rolling: the first's new worker starts, the second's cannot: the
        // reload rolls back and retires the first's.
        Op::Prepare {
            pick: 0,
            read: Some(shape(2, true)),
        },
        Op::Spawn {
            pick: 0,
            runs: true,
        },
        Op::Spawn {
            pick: 0,
            runs: false,
        },
    ] {
        world.step(&op);
    }
    let retired = WorkerId(2);
    assert!(world.running.contains_key(&retired));
    world.exit_worker(retired, 0);
    let named: Vec<WorkerId> = world
        .s
        .generations
        .values()
        .flat_map(|g| g.slots.iter().filter_map(|s| s.worker))
        .collect();
    assert!(!named.contains(&retired), "{named:?}");
}
