//! State formats 1 and 2, read (never written): the state machine as masters before format 3
//! carried it, and its conversion into format 3 ([`super::v3`]).
//!
//! Only what differs from format 3 is here; the rest is format 3's types. The differences:
//! - the reload running was three records (`reload`, `canary`, `rollout`, the last with `back`,
//!   a rolling reload's failure, set when it rolled back); format 3 has one, its phase;
//! - why a worker left its slot was text (`replaced.reason`); format 3 has its kind;
//! - fields added during format 1 were absent from states written before them, and default
//!   (format 3 has every field, always).
//!
//! Format 1 differs from format 2 only in the reload and drain durations (lists where format 2
//! has fixed-bucket histograms): [`crate::histogram::Histogram`] reads both.
//!
//! This file is frozen: it says what those masters wrote. A later format gets a file of its own
//! and this one converts into it through format 3.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::v3;
use crate::intent::Trigger;
use crate::supervisor::{
    Counters, Generation, GenerationSpec, ReloadId, ReloadRecord, RequestId, WorkerId,
};

/// The state machine in format 1 or 2.
#[derive(Debug, Deserialize)]
pub struct Machine {
    generations: BTreeMap<Generation, Gen>,
    workers: BTreeMap<WorkerId, Worker>,
    pids: BTreeMap<u32, WorkerId>,
    reload: Option<v3::ReloadRun>,
    canary: Option<v3::Canary>,
    #[serde(default)]
    rollout: Option<Rollout>,
    pending: Vec<(RequestId, Trigger)>,
    stop: Option<v3::StopMode>,
    exit_code: i32,
    exited: bool,
    next_generation: u64,
    next_worker: u64,
    next_request: u64,
    next_reload: u64,
    history: VecDeque<ReloadRecord>,
    counters: Counters,
    #[serde(default, with = "crate::codec::mono_opt")]
    stop_delayed_until: Option<Instant>,
    #[serde(with = "crate::codec::mono_opt")]
    started: Option<Instant>,
}

#[derive(Debug, Deserialize)]
struct Gen {
    spec: Option<GenerationSpec>,
    state: v3::GenState,
    slots: Vec<Slot>,
    #[serde(default, with = "crate::codec::mono_opt")]
    failed_at: Option<Instant>,
}

#[derive(Debug, Deserialize)]
struct Slot {
    program: usize,
    index: usize,
    worker: Option<WorkerId>,
    crashes: u32,
    restarts: u32,
    last_exit: Option<String>,
    #[serde(with = "crate::codec::mono_opt")]
    restart_at: Option<Instant>,
    #[serde(default)]
    last_worker: Option<WorkerId>,
    #[serde(default, with = "crate::codec::mono_opt")]
    stable_at: Option<Instant>,
}

#[derive(Debug, Deserialize)]
struct Worker {
    generation: Generation,
    slot: usize,
    program: usize,
    pid: Option<u32>,
    pgid: Option<u32>,
    state: v3::WorkerState,
    #[serde(with = "crate::codec::mono")]
    spawned: Instant,
    ready_after: Option<Duration>,
    connections: Option<u64>,
    status: Option<String>,
    #[serde(default)]
    not_ready: Option<String>,
    #[serde(default)]
    replaced: Option<Replaced>,
    #[serde(default)]
    successor: Option<(WorkerId, String)>,
    #[serde(default)]
    replacement: bool,
}

#[derive(Debug, Deserialize)]
struct Replaced {
    reason: String,
    #[serde(with = "crate::codec::mono")]
    kill_at: Instant,
}

#[derive(Debug, Deserialize)]
struct Rollout {
    reload: ReloadId,
    old: Generation,
    new: Generation,
    lanes: Vec<v3::Lane>,
    canary: Option<Duration>,
    /// Rolling back: why the reload failed.
    back: Option<String>,
}

impl TryFrom<Machine> for v3::Machine {
    type Error = String;

    /// The three records of the reload running become its phase; any other combination than
    /// the ones a master of format 2 could be in is refused.
    fn try_from(m: Machine) -> Result<Self, String> {
        let run = match (m.reload, m.canary, m.rollout) {
            (None, None, None) => v3::Run::Idle,
            (Some(reload), None, None) => v3::Run::Starting(reload),
            (None, Some(canary), None) => v3::Run::OnProbation(canary),
            (Some(reload), None, Some(r)) if r.back.is_none() => v3::Run::RollingForward {
                reload,
                rollout: r.into(),
            },
            (None, None, Some(mut r)) if r.back.is_some() => {
                let failure = r.back.take().unwrap_or_default();
                v3::Run::RollingBack {
                    rollout: r.into(),
                    failure,
                }
            }
            (reload, canary, rollout) => {
                return Err(format!(
                    "the reload running is inconsistent: reload {:?}, probation of {:?}, rolling reload {:?}",
                    reload.map(|r| r.id.0),
                    canary.map(|c| c.new.0),
                    rollout.map(|r| (r.reload.0, r.back.is_some())),
                ));
            }
        };
        Ok(v3::Machine {
            generations: m
                .generations
                .into_iter()
                .map(|(n, g)| (n, g.into()))
                .collect(),
            workers: m.workers.into_iter().map(|(n, w)| (n, w.into())).collect(),
            pids: m.pids,
            run,
            pending: m.pending,
            stop: m.stop,
            exit_code: m.exit_code,
            exited: m.exited,
            next_generation: m.next_generation,
            next_worker: m.next_worker,
            next_request: m.next_request,
            next_reload: m.next_reload,
            history: m.history,
            counters: m.counters,
            stop_delayed_until: m.stop_delayed_until,
            started: m.started,
        })
    }
}

impl From<Gen> for v3::Gen {
    fn from(g: Gen) -> Self {
        v3::Gen {
            spec: g.spec,
            state: g.state,
            slots: g.slots.into_iter().map(Into::into).collect(),
            failed_at: g.failed_at,
        }
    }
}

impl From<Slot> for v3::Slot {
    fn from(s: Slot) -> Self {
        v3::Slot {
            program: s.program,
            index: s.index,
            worker: s.worker,
            crashes: s.crashes,
            restarts: s.restarts,
            last_exit: s.last_exit,
            restart_at: s.restart_at,
            last_worker: s.last_worker,
            stable_at: s.stable_at,
        }
    }
}

impl From<Worker> for v3::Worker {
    fn from(w: Worker) -> Self {
        v3::Worker {
            generation: w.generation,
            slot: w.slot,
            program: w.program,
            pid: w.pid,
            pgid: w.pgid,
            state: w.state,
            spawned: w.spawned,
            ready_after: w.ready_after,
            connections: w.connections,
            status: w.status,
            not_ready: w.not_ready,
            replaced: w.replaced.map(Into::into),
            successor: w.successor,
            replacement: w.replacement,
        }
    }
}

impl From<Replaced> for v3::Replaced {
    /// Format 2 wrote why as text, in one of four forms (see `Retirement`'s `Display`).
    fn from(r: Replaced) -> Self {
        let rolled = || {
            let (reload, batch) = r
                .reason
                .strip_prefix("retired by reload ")?
                .split_once(", batch ")?;
            Some(v3::Retirement::Rolled {
                reload: ReloadId(reload.parse().ok()?),
                batch: batch.parse().ok()?,
            })
        };
        let reason = if let Some(rolled) = rolled() {
            rolled
        } else if let Some(reason) = r.reason.strip_prefix("recycled: ") {
            v3::Retirement::Recycled(reason.to_string())
        } else if let Some(verdict) = r.reason.strip_prefix("stopped: ") {
            v3::Retirement::RolledBack(verdict.to_string())
        } else {
            v3::Retirement::Unhealthy(r.reason.clone())
        };
        v3::Replaced {
            reason,
            kill_at: r.kill_at,
        }
    }
}

impl From<Rollout> for v3::Rollout {
    fn from(r: Rollout) -> Self {
        v3::Rollout {
            reload: r.reload,
            old: r.old,
            new: r.new,
            lanes: r.lanes,
            canary: r.canary,
        }
    }
}
