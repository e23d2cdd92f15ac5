//! Crash loops as a state: a slot of a serving generation whose workers crashed [`CRASH_LOOP`]
//! times in a row makes its program *crash-looping* and its generation *degraded* (it still
//! serves with the workers it has). It recovers by itself: a restarted worker that stays ready for
//! the program's `restart_backoff_max` starts the count over. The only timer is that deadline,
//! and only while a slot has crashes to forget.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::supervisor::Supervisor;
use crate::supervisor::model::Generation;
use crate::supervisor::records::WorkerState;

/// Crashes in a row of one slot that make its program crash-looping.
pub const CRASH_LOOP: u32 = 3;

/// A crash-looping program of a generation, as `baton status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashLoop {
    /// Index of the program in the generation's configuration.
    pub program: usize,
    /// The most crashes in a row of one of its slots.
    pub crashes: u32,
    /// How that slot's last worker ended.
    pub last_exit: Option<String>,
    /// The soonest restart of one of its slots waiting out a backoff.
    pub restart_in: Option<Duration>,
}

impl Supervisor {
    /// Slot `slot` of serving generation `g` crashed for the `crashes`-th time in a row.
    pub(in crate::supervisor) fn note_crash(
        &mut self,
        g: Generation,
        slot: usize,
        crashes: u32,
        reason: &str,
    ) {
        if crashes != CRASH_LOOP {
            return;
        }
        let program = self.slot_program_index(g, slot);
        warn!(
            event = baton_proto::event::GENERATION_DEGRADED,
            generation = g.0,
            program,
            slot,
            crashes,
            "generation {g} is degraded: program #{program}, slot {slot}, crashed {crashes} times in a row (last: {reason})"
        );
    }

    /// A worker of slot `slot` of `g` is ready: if the slot crashed before, its count starts
    /// over once this worker has stayed up for the program's `restart_backoff_max`.
    pub(in crate::supervisor) fn watch_stability(
        &mut self,
        now: Instant,
        g: Generation,
        slot: usize,
    ) {
        let Some(program) = self.slot_program(g, slot).cloned() else {
            return;
        };
        if let Some(s) = self.slot_mut(g, slot).filter(|s| s.crashes > 0) {
            s.stable_at = Some(now + program.restart_backoff_max);
        }
    }

    /// Slots whose worker stayed up long enough forget their crashes; a crash-looping program
    /// whose slots all did has recovered.
    pub(in crate::supervisor) fn settle_stable(&mut self, now: Instant) {
        let mut recovered = Vec::new();
        for (&g, entry) in &mut self.generations {
            for (i, s) in entry.slots.iter_mut().enumerate() {
                if s.stable_at.is_none_or(|t| t > now) {
                    continue;
                }
                s.stable_at = None;
                let up = s
                    .worker
                    .and_then(|w| self.workers.get(&w))
                    .is_some_and(|w| w.state == WorkerState::Ready);
                if up {
                    if s.crashes >= CRASH_LOOP {
                        recovered.push((g, i, s.program, s.crashes));
                    }
                    s.crashes = 0;
                }
            }
        }
        for (g, slot, program, crashes) in recovered {
            let still = self
                .crash_loops(g, now)
                .iter()
                .any(|c| c.program == program);
            info!(
                event = baton_proto::event::GENERATION_RECOVERED,
                generation = g.0,
                program,
                slot,
                "generation {g}: program #{program}, slot {slot}, stayed up after {crashes} crashes in a row{}",
                if still {
                    ""
                } else {
                    ": the program has recovered"
                }
            );
        }
    }

    /// The crash-looping programs of `g`.
    pub fn crash_loops(&self, g: Generation, now: Instant) -> Vec<CrashLoop> {
        let Some(entry) = self.generations.get(&g) else {
            return Vec::new();
        };
        let mut loops: Vec<CrashLoop> = Vec::new();
        for s in entry.slots.iter().filter(|s| s.crashes >= CRASH_LOOP) {
            let restart_in = s
                .restart_at
                .filter(|_| s.worker.is_none())
                .map(|t| t.saturating_duration_since(now));
            match loops.iter_mut().find(|c| c.program == s.program) {
                Some(c) => {
                    if s.crashes > c.crashes {
                        c.crashes = s.crashes;
                        c.last_exit = s.last_exit.clone();
                    }
                    c.restart_in = match (c.restart_in, restart_in) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                None => loops.push(CrashLoop {
                    program: s.program,
                    crashes: s.crashes,
                    last_exit: s.last_exit.clone(),
                    restart_in,
                }),
            }
        }
        loops
    }

    fn slot_program_index(&self, g: Generation, slot: usize) -> usize {
        self.generations
            .get(&g)
            .and_then(|entry| entry.slots.get(slot))
            .map_or(0, |s| s.program)
    }
}
