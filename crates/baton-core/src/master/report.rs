//! The master's views of itself: the `baton status` snapshot, the Prometheus text of
//! `baton metrics` and the metrics endpoint, `baton history`, and the one-line status that
//! `systemctl status` shows. Read-only: nothing here changes the master.

use std::time::{Duration, Instant};

use baton_proto::control as proto;

use super::Master;
use crate::supervisor::{Phase, Snapshot};

impl Master {
    pub(super) fn unix_ms_ago(&self, ago: Duration) -> u64 {
        let now = self.started.1 + self.started.0.elapsed();
        now.checked_sub(ago)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub(super) fn status(&self) -> proto::StatusSnapshot {
        let now = Instant::now();
        let snap = self.supervisor.snapshot(now);
        // Connections of workers that do not report them, counted from the kernel.
        let ports: std::collections::HashSet<u16> = self
            .resources
            .values()
            .flat_map(|r| &r.listeners)
            .filter_map(|l| match &l.config.address {
                baton_proto::ListenerAddress::Tcp { .. } => {
                    l.socket.local().rsplit(':').next()?.parse().ok()
                }
                baton_proto::ListenerAddress::Unix { .. } => None,
            })
            .collect();
        let unreported: Vec<u32> = snap
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter(|w| w.connections.is_none())
            .filter_map(|w| w.pid)
            .collect();
        let counted = crate::procnet::established_connections(&unreported, &ports);
        let generations = snap
            .generations
            .iter()
            .rev()
            .map(|g| proto::GenerationStatus {
                generation: g.generation.0,
                state: phase_name(g.phase).into(),
                draining_ms: g.draining_for.map(|d| d.as_millis() as u64),
                time_left_ms: g.time_left.map(|d| d.as_millis() as u64),
                deadline_unix_ms: g
                    .time_left
                    .map(|d| self.unix_ms_ago(Duration::ZERO) + d.as_millis() as u64),
                workers: g
                    .workers
                    .iter()
                    .map(|w| {
                        let kernel = w.pid.and_then(|p| counted.get(&p).copied());
                        proto::WorkerStatus {
                            worker: w.id.0,
                            program: self
                                .resources
                                .get(&g.generation)
                                .and_then(|r| r.programs.get(w.program))
                                .map_or_else(|| w.program.to_string(), |p| p.name.clone()),
                            slot: w.slot,
                            pid: w.pid,
                            state: w.state.into(),
                            started_unix_ms: self.unix_ms_ago(w.age),
                            ready_after_ms: w.ready_after.map(|d| d.as_millis() as u64),
                            restarts: w.restarts,
                            last_exit: w.last_exit.clone(),
                            connections: w.connections.or(kernel),
                            connections_source: match (w.connections, kernel) {
                                (Some(_), _) => Some("reported".into()),
                                (None, Some(_)) => Some("kernel".into()),
                                _ => None,
                            },
                            status: w.status.clone(),
                        }
                    })
                    .collect(),
            })
            .collect();
        proto::StatusSnapshot {
            master: proto::MasterStatus {
                pid: std::process::id(),
                version: crate::upgrade::version().into(),
                uptime_ms: snap.uptime.as_millis() as u64,
                config: self.config_path.display().to_string(),
                state: if snap.stopping {
                    "stopping"
                } else if snap.reload.is_some() {
                    "reloading"
                } else if snap.probation.is_some() {
                    "probation"
                } else {
                    "idle"
                }
                .into(),
                reload: snap
                    .reload
                    .map(|(id, g, covers, running)| proto::RunningReload {
                        reload: id.0,
                        generation: g.0,
                        covers: covers.iter().map(|r| r.0).collect(),
                        running_ms: running.as_millis() as u64,
                    }),
                queued_requests: snap.queued.iter().map(|r| r.0).collect(),
                upgrades: self.upgrades.clone(),
            },
            generations,
        }
    }

    /// The Prometheus text exposition of the master's counters and gauges.
    pub(super) fn metrics(&self) -> String {
        let c = self.supervisor.counters();
        let snap = self.supervisor.snapshot(Instant::now());
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for (labels, value) in samples {
                out += &format!("{name}{labels} {value}\n");
            }
        };
        metric(
            "baton_reloads_total",
            "counter",
            "Reloads that ended, by verdict.",
            vec![
                ("{verdict=\"ok\"}".into(), c.reloads_ok.to_string()),
                (
                    "{verdict=\"failed\"}".into(),
                    (c.reloads_failed - c.reloads_rolled_back).to_string(),
                ),
                (
                    "{verdict=\"rolled_back\"}".into(),
                    c.reloads_rolled_back.to_string(),
                ),
            ],
        );
        metric(
            "baton_reload_duration_seconds",
            "histogram",
            "From reload request to verdict.",
            histogram(
                &c.reload_durations,
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ],
            ),
        );
        metric(
            "baton_drain_duration_seconds",
            "histogram",
            "How long retired generations took to drain.",
            histogram(
                &c.drain_durations,
                &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
        );
        metric(
            "baton_worker_restarts_total",
            "counter",
            "Crashed workers replaced.",
            vec![(String::new(), c.restarts.to_string())],
        );
        metric(
            "baton_workers_killed_total",
            "counter",
            "Workers of draining generations killed, by reason.",
            vec![
                (
                    "{reason=\"deadline\"}".into(),
                    c.killed_at_deadline.to_string(),
                ),
                ("{reason=\"cap\"}".into(), c.killed_by_cap.to_string()),
            ],
        );
        let phases = [
            "preparing",
            "starting",
            "serving",
            "standby",
            "draining",
            "failed",
        ];
        metric(
            "baton_generations",
            "gauge",
            "Generations by state.",
            phases
                .iter()
                .map(|p| {
                    let n = snap
                        .generations
                        .iter()
                        .filter(|g| phase_name(g.phase) == *p)
                        .count();
                    (format!("{{state=\"{p}\"}}"), n.to_string())
                })
                .collect(),
        );
        let states = ["spawning", "starting", "ready", "draining", "killed"];
        metric(
            "baton_workers",
            "gauge",
            "Worker processes by state.",
            states
                .iter()
                .map(|s| {
                    let n = snap
                        .generations
                        .iter()
                        .flat_map(|g| &g.workers)
                        .filter(|w| w.state == *s)
                        .count();
                    (format!("{{state=\"{s}\"}}"), n.to_string())
                })
                .collect(),
        );
        metric(
            "baton_build_info",
            "gauge",
            "The running master's version (it changes with `baton upgrade`).",
            vec![(
                format!("{{version=\"{}\"}}", crate::upgrade::version()),
                "1".into(),
            )],
        );
        metric(
            "baton_uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            vec![(String::new(), format!("{:.3}", snap.uptime.as_secs_f64()))],
        );
        out
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
            })
            .collect()
    }
}

/// The one-line summary for `systemctl status`: "gen 7 serving 4 workers; gen 6 draining 2
/// workers, 3 conns, 12 s left".
pub(super) fn status_line(snap: &Snapshot) -> String {
    let mut parts: Vec<String> = snap
        .generations
        .iter()
        .rev()
        .map(|g| {
            let n = g.workers.len();
            match g.phase {
                Phase::Draining => {
                    let conns: u64 = g.workers.iter().filter_map(|w| w.connections).sum();
                    let left = g.time_left.map_or(0, |d| d.as_secs());
                    format!(
                        "gen {} draining {n} workers, {conns} conns, {left} s left",
                        g.generation
                    )
                }
                phase => format!("gen {} {} {n} workers", g.generation, phase_name(phase)),
            }
        })
        .collect();
    if snap.stopping {
        parts.insert(0, "stopping".into());
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
    }
    parts.join("; ")
}

/// Prometheus histogram samples (cumulative buckets, sum, count) of `values` in seconds.
fn histogram(values: &[Duration], bounds: &[f64]) -> Vec<(String, String)> {
    let secs: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    let mut samples: Vec<(String, String)> = bounds
        .iter()
        .map(|b| {
            (
                format!("_bucket{{le=\"{b}\"}}"),
                secs.iter().filter(|v| **v <= *b).count().to_string(),
            )
        })
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), secs.len().to_string()));
    samples.push(("_sum".into(), format!("{:.6}", secs.iter().sum::<f64>())));
    samples.push(("_count".into(), secs.len().to_string()));
    samples
}

pub(super) fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Preparing => "preparing",
        Phase::Starting => "starting",
        Phase::Serving => "serving",
        Phase::Standby => "standby",
        Phase::Draining => "draining",
        Phase::Failed => "failed",
    }
}
