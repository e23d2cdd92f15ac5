//! The state machine taken apart into its records and put together again: what a self-upgrade
//! carries across the exec. `crate::upgrade` converts these records to the upgrade state's own
//! types and back (`upgrade/v3.rs`); the supervisor knows nothing of that format.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use super::records::{Gen, Run, StopMode, Worker};
use super::{Counters, Generation, ReloadRecord, RequestId, Supervisor, Trigger, WorkerId};

/// Everything the state machine keeps between events. What it keeps only during one (the
/// actions being gathered, the kills to stamp) is not here: an upgrade happens between events.
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    pub(crate) generations: BTreeMap<Generation, Gen>,
    pub(crate) workers: BTreeMap<WorkerId, Worker>,
    pub(crate) pids: BTreeMap<u32, WorkerId>,
    pub(crate) run: Run,
    pub(crate) pending: Vec<(RequestId, Trigger)>,
    pub(crate) stop: Option<StopMode>,
    pub(crate) exit_code: i32,
    pub(crate) exited: bool,
    pub(crate) next_generation: u64,
    pub(crate) next_worker: u64,
    pub(crate) next_request: u64,
    pub(crate) next_reload: u64,
    pub(crate) history: VecDeque<ReloadRecord>,
    pub(crate) counters: Counters,
    pub(crate) stop_delayed_until: Option<Instant>,
    pub(crate) started: Option<Instant>,
}

impl Supervisor {
    /// A copy of the state machine's records. Every field is named, so a field added to the
    /// supervisor does not compile until it is either carried here or said not to be.
    pub(crate) fn parts(&self) -> Parts {
        let Supervisor {
            generations,
            workers,
            pids,
            run,
            pending,
            stop,
            exit_code,
            exited,
            next_generation,
            next_worker,
            next_request,
            next_reload,
            history,
            counters,
            actions: _,
            stop_delayed_until,
            kills: _,
            started,
        } = self;
        Parts {
            generations: generations.clone(),
            workers: workers.clone(),
            pids: pids.clone(),
            run: run.clone(),
            pending: pending.clone(),
            stop: *stop,
            exit_code: *exit_code,
            exited: *exited,
            next_generation: *next_generation,
            next_worker: *next_worker,
            next_request: *next_request,
            next_reload: *next_reload,
            history: history.clone(),
            counters: counters.clone(),
            stop_delayed_until: *stop_delayed_until,
            started: *started,
        }
    }

    /// The state machine these records make, if they make a consistent one: every invariant of
    /// [`Supervisor::check_invariants`] is checked (in every build), and the first one broken is
    /// the refusal.
    pub(crate) fn from_parts(parts: Parts) -> Result<Supervisor, String> {
        let Parts {
            generations,
            workers,
            pids,
            run,
            pending,
            stop,
            exit_code,
            exited,
            next_generation,
            next_worker,
            next_request,
            next_reload,
            history,
            counters,
            stop_delayed_until,
            started,
        } = parts;
        let supervisor = Supervisor {
            generations,
            workers,
            pids,
            run,
            pending,
            stop,
            exit_code,
            exited,
            next_generation,
            next_worker,
            next_request,
            next_reload,
            history,
            counters,
            actions: Vec::new(),
            stop_delayed_until,
            kills: BTreeMap::new(),
            started,
        };
        supervisor.check_invariants()?;
        Ok(supervisor)
    }
}
