//! The master's views of itself: the `baton status` snapshot, `baton history`, and the
//! one-line status that `systemctl status` shows (the Prometheus text is in `metrics.rs`).
//! Read-only: nothing here changes the master.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_proto::control as proto;

use super::Master;
use crate::procmem::{Memory, MemoryCensus};
use crate::procnet::ConnectionCensus;
use crate::supervisor::{Generation, Phase, ReloadRecord, RolloutSnapshot, Snapshot};
use baton_sys::sockdiag::Ports;

impl Master {
    pub(super) fn unix_ms_ago(&self, ago: Duration) -> u64 {
        unix_ms(self.started.1 + self.started.0.elapsed(), ago)
    }

    /// What `baton status` shows, as of now.
    /// What `baton status` answers, as a job to run off the event loop: the state is taken now;
    /// the kernel's figures (connections of workers that do not report theirs, memory from
    /// `smaps_rollup`, which walks each process's page tables) are read by the job, on a
    /// blocking thread, so that a status of many big workers never holds up the master.
    pub(super) fn status_job(
        &self,
        brief: bool,
    ) -> impl FnOnce() -> proto::StatusSnapshot + Send + 'static {
        let snap = self.supervisor.snapshot(Instant::now());
        // Connections of workers that do not report them, counted from the kernel.
        let mut ports = Ports::default();
        for l in self.resources.values().flat_map(|r| &r.listeners) {
            if let baton_proto::ListenerAddress::Tcp { .. } = &l.config.address
                && let Ok(local) = l.socket.local().parse::<std::net::SocketAddr>()
            {
                match local {
                    std::net::SocketAddr::V4(a) => ports.v4.insert(a.port()),
                    std::net::SocketAddr::V6(a) => ports.v6.insert(a.port()),
                };
            }
        }
        let unreported: Vec<u32> = snap
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter(|w| w.connections.is_none())
            .filter_map(|w| w.pid)
            .collect();
        let mut context = StatusContext {
            pid: std::process::id(),
            version: crate::version(),
            config: self.config_path.display().to_string(),
            now: self.started.1 + self.started.0.elapsed(),
            upgrades: self.upgrades.done.clone(),
            programs: self
                .resources
                .iter()
                .map(|(g, r)| (*g, r.programs.iter().map(|p| p.name.clone()).collect()))
                .collect(),
            counted: HashMap::new(),
            memory: HashMap::new(),
            start_settings: self.start_settings.clone(),
            listeners: self.listener_statuses(!brief),
            refused: self
                .links
                .iter()
                .filter_map(|(id, l)| {
                    let (why, times) = l.refused.as_ref()?;
                    Some((*id, format!("MAINPID: {why} ({times} refused)")))
                })
                .collect(),
            handoff: self.handed_off_by_generation(),
        };
        let census = self.census.clone();
        move || {
            let workers: Vec<u32> = snap
                .generations
                .iter()
                .flat_map(|g| &g.workers)
                .filter_map(|w| w.pid)
                .collect();
            // A poisoned lock (a status job that panicked) only loses what was kept.
            let mut census = census.lock().unwrap_or_else(|p| p.into_inner());
            context.counted = census.connections.count(&unreported, &ports);
            context.memory = census.memory.of_trees(&workers);
            drop(census);
            status_view(&snap, &context)
        }
    }

    pub(super) fn history(&self) -> Vec<proto::ReloadRecord> {
        let now = Instant::now();
        self.supervisor
            .history()
            .map(|r| proto::ReloadRecord {
                reload: r.id.0,
                generation: r.generation.0,
                requests: r
                    .covers
                    .iter()
                    .zip(&r.triggers)
                    .map(|(id, t)| format!("{id} {t}"))
                    .collect(),
                started_unix_ms: self.unix_ms_ago(now.saturating_duration_since(r.started)),
                duration_ms: r.duration.as_millis() as u64,
                ok: r.verdict.is_ok(),
                reason: r.verdict.clone().err(),
                receipt: self.receipt_of(r.id.0),
                handoff: self.handed_to(r.generation.0),
            })
            .collect()
    }
}

/// `ago` before `now`, in Unix milliseconds.
fn unix_ms(now: SystemTime, ago: Duration) -> u64 {
    now.checked_sub(ago)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a status snapshot needs besides the state machine's [`Snapshot`].
#[derive(Debug)]
struct StatusContext {
    pid: u32,
    version: &'static str,
    config: String,
    /// The wall-clock time of the snapshot.
    now: SystemTime,
    upgrades: Vec<proto::UpgradeInfo>,
    /// Program names by generation, in configuration order.
    programs: HashMap<Generation, Vec<String>>,
    /// Connections counted from the kernel, by pid, for workers that do not report them.
    counted: HashMap<u32, u64>,
    /// Memory of each worker's process tree, by pid.
    memory: HashMap<u32, Memory>,
    start_settings: std::collections::BTreeMap<String, String>,
    /// The listeners, their queues read when the status was asked.
    listeners: Vec<proto::ListenerStatus>,
    /// What was refused from each worker.
    refused: HashMap<crate::supervisor::WorkerId, String>,
    /// What each generation's givers handed off so far.
    handoff: HashMap<u64, baton_proto::handoff::HandoffCounts>,
}

/// What `baton status` read from the kernel, kept for its next call: the connections of
/// workers that do not report theirs, and the workers' memory. Each is read again where it
/// moved by more than 1 % ([`ConnectionCensus`], [`MemoryCensus`]), so that a status at tens of
/// thousands of connections costs the master a `stat` and a `statm` per worker.
#[derive(Debug, Default)]
pub(super) struct StatusCensus {
    connections: ConnectionCensus,
    memory: MemoryCensus,
}

fn status_of(m: Memory) -> proto::MemoryStatus {
    proto::MemoryStatus {
        rss_kib: m.rss_kib,
        pss_kib: m.pss_kib,
        processes: m.processes,
    }
}

/// The `baton status` snapshot (what `--json` prints) of a state machine's [`Snapshot`].
fn status_view(snap: &Snapshot, context: &StatusContext) -> proto::StatusSnapshot {
    let generations = snap
        .generations
        .iter()
        .rev()
        .map(|g| {
            let name = |program: usize| {
                context
                    .programs
                    .get(&g.generation)
                    .and_then(|names| names.get(program))
                    .map_or_else(|| program.to_string(), Clone::clone)
            };
            proto::GenerationStatus {
                generation: g.generation.0,
                state: g.phase.into(),
                draining_ms: g.draining_for.map(|d| d.as_millis() as u64),
                time_left_ms: g.time_left.map(|d| d.as_millis() as u64),
                deadline_unix_ms: g
                    .time_left
                    .map(|d| unix_ms(context.now, Duration::ZERO) + d.as_millis() as u64),
                workers: g
                    .workers
                    .iter()
                    .map(|w| {
                        let kernel = w.pid.and_then(|p| context.counted.get(&p).copied());
                        proto::WorkerStatus {
                            worker: w.id.0,
                            program: name(w.program),
                            slot: w.slot,
                            pid: w.pid,
                            state: w.state,
                            started_unix_ms: unix_ms(context.now, w.age),
                            ready_after_ms: w.ready_after.map(|d| d.as_millis() as u64),
                            restarts: w.restarts,
                            last_exit: w.last_exit.clone(),
                            connections: w.connections.or(kernel),
                            connections_source: match (w.connections, kernel) {
                                (Some(_), _) => Some(proto::ConnectionsSource::Reported),
                                (None, Some(_)) => Some(proto::ConnectionsSource::Kernel),
                                _ => None,
                            },
                            status: w.status.clone(),
                            restart_in_ms: w.restart_in.map(|d| d.as_millis() as u64),
                            memory: w
                                .pid
                                .and_then(|p| context.memory.get(&p))
                                .map(|&m| status_of(m)),
                            refused: context.refused.get(&w.id).cloned(),
                        }
                    })
                    .collect(),
                memory: g
                    .workers
                    .iter()
                    .filter_map(|w| context.memory.get(&w.pid?))
                    .copied()
                    .reduce(|a, b| a + b)
                    .map(status_of),
                handoff: context.handoff.get(&g.generation.0).copied(),
                degraded: g
                    .crash_loops
                    .iter()
                    .map(|c| proto::CrashLoopStatus {
                        program: name(c.program),
                        crashes: c.crashes,
                        last_exit: c.last_exit.clone(),
                        restart_in_ms: c.restart_in.map(|d| d.as_millis() as u64),
                    })
                    .collect(),
            }
        })
        .collect();
    proto::StatusSnapshot {
        listeners: context.listeners.clone(),
        master: proto::MasterStatus {
            pid: context.pid,
            version: context.version.into(),
            uptime_ms: snap.uptime.as_millis() as u64,
            config: context.config.clone(),
            state: if snap.stopping {
                proto::MasterState::Stopping
            } else if snap.reload.is_some() || snap.rollout.is_some() {
                proto::MasterState::Reloading
            } else if snap.probation.is_some() {
                proto::MasterState::Probation
            } else {
                proto::MasterState::Idle
            },
            reload: snap
                .reload
                .as_ref()
                .map(|(id, g, covers, running)| proto::RunningReload {
                    reload: id.0,
                    generation: g.0,
                    covers: covers.iter().map(|r| r.0).collect(),
                    running_ms: running.as_millis() as u64,
                }),
            queued_requests: snap.queued.iter().map(|r| r.0).collect(),
            stop_delay_left_ms: snap.stop_delay_left.map(|d| d.as_millis() as u64),
            rollout: snap.rollout.as_ref().map(|r| rollout_view(r, context)),
            upgrades: context.upgrades.clone(),
            start_settings: context.start_settings.clone(),
        },
        generations,
    }
}

fn rollout_view(r: &RolloutSnapshot, context: &StatusContext) -> proto::RolloutStatus {
    proto::RolloutStatus {
        reload: r.reload.0,
        from_generation: r.from.0,
        to_generation: r.to.0,
        rolling_back: r.back.clone(),
        programs: r
            .programs
            .iter()
            .map(|p| proto::RolloutProgram {
                program: context
                    .programs
                    .get(&r.to)
                    .and_then(|names| names.get(p.program))
                    .map_or_else(|| p.program.to_string(), Clone::clone),
                replaced: p.replaced as u64,
                processes: p.processes as u64,
                batch_size: p.batch_size as u64,
                batch: p.batch as u64,
                batches: p.batches as u64,
                step: p.step,
                step_ms: p.in_step.as_millis() as u64,
            })
            .collect(),
    }
}

/// The one-line summary for `systemctl status`: "gen 7 serving 4 workers; gen 6 draining 2
/// workers, 3 conns, 12 s left".
/// `programs`: the names of each generation's programs, in configuration order.
pub(super) fn status_line(
    snap: &Snapshot,
    last: Option<&ReloadRecord>,
    programs: &HashMap<Generation, Vec<String>>,
) -> String {
    let mut parts: Vec<String> = snap
        .generations
        .iter()
        .rev()
        .map(|g| {
            let n = g.workers.len();
            let workers = if n == 1 { "worker" } else { "workers" };
            match g.phase {
                Phase::Draining => {
                    let conns: u64 = g.workers.iter().filter_map(|w| w.connections).sum();
                    let left = g.time_left.map_or(0, |d| d.as_secs());
                    format!(
                        "gen {} draining {n} {workers}, {conns} conns, {left} s left",
                        g.generation
                    )
                }
                phase => {
                    let mut line = format!("gen {} {phase} {n} {workers}", g.generation);
                    // A waiting slot's row is not a process.
                    let waiting = g
                        .workers
                        .iter()
                        .filter(|w| w.state == proto::WorkerState::Backoff)
                        .count();
                    if waiting > 0 {
                        line =
                            format!("gen {} {phase} {}/{n} {workers}", g.generation, n - waiting);
                    }
                    for c in &g.crash_loops {
                        let name = programs
                            .get(&g.generation)
                            .and_then(|names| names.get(c.program))
                            .map_or_else(|| c.program.to_string(), Clone::clone);
                        let last = c.last_exit.as_deref().unwrap_or("?");
                        line.push_str(&format!(
                            ", DEGRADED: {name} crash-looping ({} crashes in a row, last {last})",
                            c.crashes
                        ));
                    }
                    line
                }
            }
        })
        .collect();
    if let Some(left) = snap.stop_delay_left {
        parts.insert(
            0,
            format!(
                "stopping: still serving for {} s (stop_delay), then draining",
                left.as_secs_f64().ceil() as u64
            ),
        );
    } else if snap.stopping {
        parts.insert(0, "stopping".into());
    } else if let Some(r) = &snap.rollout {
        let done: usize = r.programs.iter().map(|p| p.replaced).sum();
        let all: usize = r.programs.iter().map(|p| p.processes).sum();
        let what = if r.back.is_some() {
            format!(
                "reload {} failed, rolling back: {done} of {all} restored",
                r.reload
            )
        } else {
            format!("reload {} rolling: {done} of {all} replaced", r.reload)
        };
        parts.insert(0, what);
    } else if let Some((id, g, _, _)) = &snap.reload {
        parts.insert(0, format!("reload {id} starting gen {g}"));
    } else if let Some((id, g, left)) = &snap.probation {
        parts.insert(
            0,
            format!(
                "reload {id}: gen {g} on probation, {} s left",
                left.as_secs()
            ),
        );
    } else if let Some(ReloadRecord {
        id,
        verdict: Err(reason),
        ..
    }) = last
    {
        // Until the next reload, the last failure and its cause stay in `systemctl status`.
        parts.push(format!("reload {id} failed: {reason}"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::{GenerationSnapshot, ReloadId, RequestId, WorkerId, WorkerSnapshot};

    /// What `baton status --json` printed for these states before states became enums (the
    /// fixture was written by that code), plus `start_settings` (added since): the same bytes.
    const STATUS_JSON: &str = include_str!("../../tests/fixtures/status.json");

    fn worker(
        id: u64,
        state: proto::WorkerState,
        pid: Option<u32>,
        connections: Option<u64>,
    ) -> WorkerSnapshot {
        WorkerSnapshot {
            id: WorkerId(id),
            program: (id % 2) as usize,
            slot: id as usize % 3,
            pid,
            state,
            age: Duration::from_millis(1500 + id),
            ready_after: pid.map(|_| Duration::from_millis(40 + id)),
            restarts: (id % 3) as u32,
            last_exit: (id == 4).then(|| "exited with status 1".to_string()),
            connections,
            status: (id == 3).then(|| "serving 2 sites".to_string()),
            restart_in: None,
        }
    }

    fn generation(g: u64, phase: Phase, workers: Vec<WorkerSnapshot>) -> GenerationSnapshot {
        let draining = phase == Phase::Draining;
        GenerationSnapshot {
            generation: Generation(g),
            phase,
            draining_for: draining.then(|| Duration::from_millis(2500)),
            time_left: draining.then(|| Duration::from_millis(27_500)),
            workers,
            crash_loops: Vec::new(),
        }
    }

    /// One snapshot in each master state, with every generation phase and worker state.
    fn snapshots() -> Vec<Snapshot> {
        let generations = vec![
            generation(
                1,
                Phase::Failed,
                vec![worker(1, proto::WorkerState::Killed, Some(101), None)],
            ),
            generation(
                2,
                Phase::Draining,
                vec![
                    worker(2, proto::WorkerState::Draining, Some(102), Some(7)),
                    worker(3, proto::WorkerState::Draining, Some(103), None),
                ],
            ),
            generation(
                3,
                Phase::Standby,
                vec![worker(4, proto::WorkerState::Ready, Some(104), Some(0))],
            ),
            generation(
                4,
                Phase::Serving,
                vec![worker(5, proto::WorkerState::Ready, Some(105), None)],
            ),
            generation(
                5,
                Phase::Starting,
                vec![
                    worker(6, proto::WorkerState::Starting, Some(106), None),
                    worker(7, proto::WorkerState::Spawning, None, None),
                ],
            ),
            generation(6, Phase::Preparing, vec![]),
        ];
        let base = Snapshot {
            uptime: Duration::from_millis(86_400_123),
            generations,
            ..Snapshot::default()
        };
        vec![
            base.clone(),
            Snapshot {
                reload: Some((
                    ReloadId(5),
                    Generation(5),
                    vec![RequestId(8), RequestId(9)],
                    Duration::from_millis(310),
                )),
                queued: vec![RequestId(10)],
                ..base.clone()
            },
            Snapshot {
                probation: Some((ReloadId(4), Generation(4), Duration::from_secs(3))),
                ..base.clone()
            },
            Snapshot {
                stopping: true,
                ..base
            },
        ]
    }

    fn context() -> StatusContext {
        StatusContext {
            listeners: Vec::new(),
            refused: HashMap::new(),
            handoff: HashMap::new(),
            pid: 4242,
            version: "0.1.0",
            config: "/etc/baton/baton.yaml".into(),
            now: UNIX_EPOCH + Duration::from_millis(1_795_000_000_000),
            upgrades: vec![proto::UpgradeInfo {
                from_version: "0.0.9".into(),
                to_version: "0.1.0".into(),
                at_unix_ms: 1_794_999_000_000,
            }],
            programs: (1..=6)
                .map(|g| (Generation(g), vec!["web".to_string(), "api".to_string()]))
                .collect(),
            counted: [(103, 2), (105, 11)].into_iter().collect(),
            memory: HashMap::new(),
            start_settings: [("supervisor.control.socket", "/run/baton/baton.sock")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_systemd_status_line_keeps_the_last_failure_and_its_cause() {
        let serving = Snapshot {
            generations: vec![generation(
                4,
                Phase::Serving,
                vec![worker(5, proto::WorkerState::Ready, Some(105), None)],
            )],
            ..Snapshot::default()
        };
        let failed = ReloadRecord {
            id: ReloadId(7),
            covers: vec![RequestId(9)],
            triggers: vec![],
            generation: Generation(5),
            started: std::time::Instant::now(),
            duration: Duration::from_secs(2),
            verdict: Err("worker 9 was not ready after 2000 ms: its readiness probe failed".into()),
        };
        assert_eq!(
            status_line(&serving, Some(&failed), &HashMap::new()),
            "gen 4 serving 1 worker; reload 7 failed: worker 9 was not ready after 2000 ms: its readiness probe failed"
        );
        let ok = ReloadRecord {
            verdict: Ok(()),
            ..failed
        };
        assert_eq!(
            status_line(&serving, Some(&ok), &HashMap::new()),
            "gen 4 serving 1 worker"
        );
        // A stop's delay (`supervisor.stop_delay`): still serving, and for how long.
        let lame_duck = Snapshot {
            stopping: true,
            stop_delay_left: Some(Duration::from_millis(2500)),
            ..serving.clone()
        };
        assert_eq!(
            status_line(&lame_duck, Some(&ok), &HashMap::new()),
            "stopping: still serving for 3 s (stop_delay), then draining; gen 4 serving 1 worker"
        );
        let mut degraded = serving.clone();
        degraded.generations[0]
            .workers
            .push(worker(6, proto::WorkerState::Backoff, None, None));
        degraded.generations[0]
            .crash_loops
            .push(crate::supervisor::CrashLoop {
                program: 1,
                crashes: 4,
                last_exit: Some("exited with status 1".into()),
                restart_in: Some(Duration::from_millis(800)),
            });
        let names = HashMap::from([(Generation(4), vec!["web".into(), "api".into()])]);
        assert_eq!(
            status_line(&degraded, Some(&ok), &names),
            "gen 4 serving 1/2 workers, DEGRADED: api crash-looping (4 crashes in a row, last exited with status 1)"
        );
    }

    #[test]
    fn status_json_is_byte_identical_to_the_fixture() {
        let context = context();
        let json: Vec<String> = snapshots()
            .iter()
            .map(|snap| serde_json::to_string_pretty(&status_view(snap, &context)).unwrap())
            .collect();
        assert_eq!(json.join("\n") + "\n", STATUS_JSON);
    }
}
