//! `baton metrics` and the metrics endpoint: the master's counters, gauges and histograms in
//! Prometheus' text format. Read-only, like the other views in `report.rs`.

use std::collections::HashMap;
use std::time::Instant;

use baton_proto::control as proto;

use super::Master;
use crate::histogram::{Buckets, Histogram};
use crate::supervisor::{Generation, Phase};

impl Master {
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
        let output = self.output.totals();
        metric(
            "baton_output_lines_total",
            "counter",
            "Lines of workers' output logged (output: capture).",
            vec![(String::new(), output.lines.to_string())],
        );
        metric(
            "baton_output_bytes_total",
            "counter",
            "Bytes of workers' output read from their pipes.",
            vec![(String::new(), output.bytes.to_string())],
        );
        metric(
            "baton_output_cut_lines_total",
            "counter",
            "Workers' lines longer than the limit, cut with a marker.",
            vec![(String::new(), output.cut.to_string())],
        );
        metric(
            "baton_reload_duration_seconds",
            "histogram",
            "From reload request to verdict.",
            histogram(&c.reload_durations),
        );
        metric(
            "baton_drain_duration_seconds",
            "histogram",
            "How long retired generations took to drain.",
            histogram(&c.drain_durations),
        );
        metric(
            "baton_worker_restarts_total",
            "counter",
            "Crashed workers replaced.",
            vec![(String::new(), c.restarts.to_string())],
        );
        metric(
            "baton_worker_replacements_total",
            "counter",
            "Ready workers replaced, by cause (liveness: failed its liveness check; memory: recycle:).",
            vec![
                (
                    "{cause=\"liveness\"}".into(),
                    c.replaced_unhealthy.to_string(),
                ),
                ("{cause=\"memory\"}".into(), c.replaced_memory.to_string()),
            ],
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
        let handed = self.handed_off();
        metric(
            "baton_connections_handed_off_total",
            "counter",
            "Connections draining workers offered to the serving generation (connection handoff), by what became of them (as the workers report).",
            vec![
                ("{outcome=\"offered\"}".into(), handed.offered.to_string()),
                ("{outcome=\"adopted\"}".into(), handed.adopted.to_string()),
                ("{outcome=\"kept\"}".into(), handed.kept.to_string()),
            ],
        );
        metric(
            "baton_generations",
            "gauge",
            "Generations by state.",
            proto::GenerationState::ALL
                .iter()
                .map(|p| {
                    let n = snap
                        .generations
                        .iter()
                        .filter(|g| proto::GenerationState::from(g.phase) == *p)
                        .count();
                    (format!("{{state=\"{p}\"}}"), n.to_string())
                })
                .collect(),
        );
        metric(
            "baton_workers",
            "gauge",
            "Workers by state (backoff: a crashed worker's slot waiting to restart, no process).",
            proto::WorkerState::ALL
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
        // RSS from `statm` (cheap: no page-table walk) on the event loop; PSS is in `baton
        // status`, read off the loop.
        let memory: HashMap<u32, u64> = snap
            .generations
            .iter()
            .flat_map(|g| &g.workers)
            .filter_map(|w| w.pid)
            .filter_map(|pid| Some((pid, crate::procmem::rss_of_tree(pid)?)))
            .collect();
        let program_name = |g: Generation, program: usize| {
            self.resources
                .get(&g)
                .and_then(|r| r.programs.get(program))
                .map_or_else(|| program.to_string(), |p| p.name.clone())
        };
        let mut per_worker = Vec::new();
        let mut per_generation = Vec::new();
        for g in &snap.generations {
            let mut total = 0;
            for w in &g.workers {
                let Some(&rss) = w.pid.and_then(|p| memory.get(&p)) else {
                    continue;
                };
                total += rss;
                let labels = format!(
                    "program=\"{}\",slot=\"{}\",generation=\"{}\"",
                    program_name(g.generation, w.program),
                    w.slot,
                    g.generation
                );
                per_worker.push((
                    format!("{{{labels},kind=\"rss\"}}"),
                    (rss * 1024).to_string(),
                ));
            }
            per_generation.push((
                format!("{{generation=\"{}\",kind=\"rss\"}}", g.generation),
                (total * 1024).to_string(),
            ));
        }
        metric(
            "baton_worker_memory_bytes",
            "gauge",
            "Resident memory (RSS) of each worker's process and its descendants (PSS: baton status).",
            per_worker,
        );
        metric(
            "baton_generation_memory_bytes",
            "gauge",
            "Memory of each generation's workers, summed.",
            per_generation,
        );
        let degraded: Vec<(Generation, &crate::supervisor::CrashLoop)> = snap
            .generations
            .iter()
            .filter(|g| g.phase == Phase::Serving)
            .flat_map(|g| g.crash_loops.iter().map(move |c| (g.generation, c)))
            .collect();
        metric(
            "baton_degraded",
            "gauge",
            "1 while a serving generation has a crash-looping program (3 crashes in a row of one slot).",
            vec![(String::new(), u8::from(!degraded.is_empty()).to_string())],
        );
        metric(
            "baton_crash_loop_crashes",
            "gauge",
            "Crashes in a row of each crash-looping program of a serving generation.",
            degraded
                .iter()
                .map(|(g, c)| {
                    let name = self
                        .resources
                        .get(g)
                        .and_then(|r| r.programs.get(c.program))
                        .map_or_else(|| c.program.to_string(), |p| p.name.clone());
                    (format!("{{program=\"{name}\"}}"), c.crashes.to_string())
                })
                .collect(),
        );
        metric(
            "baton_build_info",
            "gauge",
            "The running master's version (it changes with `baton upgrade`).",
            vec![(format!("{{version=\"{}\"}}", crate::version()), "1".into())],
        );
        metric(
            "baton_uptime_seconds",
            "gauge",
            "Seconds since the master started.",
            vec![(String::new(), format!("{:.3}", snap.uptime.as_secs_f64()))],
        );
        for (name, kind, help, samples) in self.queue_metrics() {
            metric(name, kind, help, samples);
        }
        out
    }
}

/// Prometheus histogram samples (cumulative buckets, sum, count), in seconds.
fn histogram<B: Buckets>(h: &Histogram<B>) -> Vec<(String, String)> {
    let mut samples: Vec<(String, String)> = h
        .cumulative()
        .into_iter()
        .map(|(bound, n)| {
            let le = bound.map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            (format!("_bucket{{le=\"{le}\"}}"), n.to_string())
        })
        .collect();
    samples.push(("_sum".into(), format!("{:.6}", h.sum().as_secs_f64())));
    samples.push(("_count".into(), h.count().to_string()));
    samples
}
