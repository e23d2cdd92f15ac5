//! Human-readable output of the control protocol's answers. `--json` prints the protocol types
//! instead; this module is only a view of them.

use std::fmt::Write;

use baton_proto::control::{
    ConnectionsSource, GenerationState, GenerationStatus, ListenerStatus, ReloadRecord,
    ReloadVerdict, RolloutStatus, RolloutStep, StatusSnapshot, WorkerState, WorkerStatus,
};

/// Text from a worker, a client or a file, made safe for a terminal: control characters
/// (escape sequences, carriage returns, bells) are shown escaped (`\u{1b}`), never sent raw.
/// Human output only: `--json` keeps the exact text, escaped by JSON itself.
pub(crate) fn safe(text: &str) -> String {
    baton_proto::text::printable(text).into_owned()
}

/// `1 worker`, `2 workers`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub(crate) fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A UTC time to the millisecond, RFC 3339: `2026-11-27T15:20:01.123Z`.
pub(crate) fn clock(unix_ms: u64) -> String {
    let (secs, ms) = (unix_ms / 1000, unix_ms % 1000);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// `12.3 MiB`.
fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ago(unix_ms: u64) -> String {
    format!("{} ago", duration(now_unix_ms().saturating_sub(unix_ms)))
}

fn connections(w: &WorkerStatus) -> String {
    match (w.connections, w.connections_source) {
        (Some(n), Some(source)) => format!("{n} ({source})"),
        (Some(n), None) => n.to_string(),
        _ => "-".into(),
    }
}

fn generation_heading(g: &GenerationStatus) -> String {
    let mut line = format!("generation {}  {}", g.generation, g.state);
    if let Some(ms) = g.draining_ms {
        let _ = write!(line, " for {}", duration(ms));
    }
    if let Some(ms) = g.time_left_ms {
        let _ = write!(line, ", killed in {} if still running", duration(ms));
    }
    if let Some(at) = g.deadline_unix_ms {
        let secs = at / 1000;
        let _ = write!(
            line,
            " (deadline {:02}:{:02}:{:02} UTC)",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        );
    }
    if let Some(m) = g.memory {
        let _ = write!(
            line,
            "  memory {} RSS, {} PSS ({})",
            mib(m.rss_kib),
            mib(m.pss_kib),
            if m.processes == 1 {
                "1 process".to_string()
            } else {
                format!("{} processes", m.processes)
            }
        );
    }
    if let Some(h) = g.handoff {
        let _ = write!(line, "  {}", handed_off(h));
    }
    for c in &g.degraded {
        let _ = write!(
            line,
            "\n  DEGRADED: program {} is crash-looping: {} crashes in a row, last {}",
            safe(&c.program),
            c.crashes,
            c.last_exit.as_deref().map_or_else(|| "-".into(), safe)
        );
        if let Some(ms) = c.restart_in_ms {
            let _ = write!(line, "; next restart in {}", duration(ms));
        }
    }
    line
}

/// What givers handed off: `handed off 480 of 500 connections (20 kept)`.
fn handed_off(h: baton_proto::handoff::HandoffCounts) -> String {
    format!(
        "handed off {} of {} ({} kept)",
        h.adopted,
        plural(h.offered as usize, "connection"),
        h.kept
    )
}

/// `baton status`.
pub(crate) fn status(s: &StatusSnapshot) -> String {
    let m = &s.master;
    let mut out = format!(
        "baton {}  master pid {}  up {}  config {}\n",
        m.version,
        m.pid,
        duration(m.uptime_ms),
        safe(&m.config)
    );
    if let Some(last) = m.upgrades.last() {
        let _ = writeln!(
            out,
            "upgraded in place {} time(s), last from {} to {}",
            m.upgrades.len(),
            last.from_version,
            last.to_version
        );
    }
    match &m.reload {
        Some(r) => {
            let covers: Vec<String> = r.covers.iter().map(|c| format!("#{c}")).collect();
            let _ = writeln!(
                out,
                "state: reloading (reload {} -> generation {}, for {}, requests {})",
                r.reload,
                r.generation,
                duration(r.running_ms),
                covers.join(", ")
            );
        }
        None => match m.stop_delay_left_ms {
            Some(ms) => {
                let _ = writeln!(
                    out,
                    "state: {} (still serving for {}: supervisor.stop_delay, then draining)",
                    m.state,
                    duration(ms)
                );
            }
            None => {
                let _ = writeln!(out, "state: {}", m.state);
            }
        },
    }
    if let Some(r) = &m.rollout {
        out.push_str(&rollout(r));
    }
    if !m.queued_requests.is_empty() {
        let queued: Vec<String> = m.queued_requests.iter().map(|c| format!("#{c}")).collect();
        let _ = writeln!(out, "queued reload requests: {}", queued.join(", "));
    }
    for g in &s.generations {
        let _ = writeln!(out, "\n{}", generation_heading(g));
        let mut rows = vec![
            [
                "WORKER",
                "PROGRAM",
                "SLOT",
                "PID",
                "STATE",
                "STARTED",
                "READY AFTER",
                "RESTARTS",
                "LAST EXIT",
                "CONNS",
                "RSS",
                "STATUS",
            ]
            .map(String::from),
        ];
        for w in &g.workers {
            rows.push([
                w.worker.to_string(),
                safe(&w.program),
                w.slot.to_string(),
                w.pid.map_or("-".into(), |p| p.to_string()),
                match w.restart_in_ms {
                    Some(ms) => format!("{} (restart in {})", w.state, duration(ms)),
                    None => w.state.to_string(),
                },
                if w.pid.is_some() {
                    ago(w.started_unix_ms)
                } else {
                    "-".into()
                },
                w.ready_after_ms.map_or("-".into(), duration),
                w.restarts.to_string(),
                w.last_exit.as_deref().map_or_else(|| "-".into(), safe),
                connections(w),
                w.memory.map_or_else(|| "-".into(), |m| mib(m.rss_kib)),
                w.status.as_deref().map_or_else(|| "-".into(), safe),
            ]);
        }
        out += &table(&rows, "  ");
        for w in g.workers.iter().filter(|w| w.refused.is_some()) {
            let refused = w.refused.as_deref().map_or_else(String::new, safe);
            out += &format!("  worker {}: refused {refused}\n", w.worker);
        }
    }
    if s.generations.is_empty() {
        out += "\nno generation\n";
    }
    if !s.listeners.is_empty() {
        out += "\nlisteners\n";
        out += &listeners(&s.listeners);
    }
    out
}

/// The listeners' table: address, state, who holds each, its accept queue now.
/// A rolling reload's progress: "rolling: generation 4 replaces generation 3" and, per program,
/// "web: 5 of 8 replaced, batch 6 of 8 (1 worker) starting for 120 ms".
fn rollout(r: &RolloutStatus) -> String {
    let mut out = match &r.rolling_back {
        None => format!(
            "rolling reload {}: generation {} replaces generation {}, a batch at a time\n",
            r.reload, r.to_generation, r.from_generation
        ),
        Some(why) => format!(
            "rolling reload {} failed ({}); rolling back: generation {} gets its workers back from generation {}\n",
            r.reload,
            safe(why),
            r.to_generation,
            r.from_generation
        ),
    };
    let word = if r.rolling_back.is_some() {
        "restored"
    } else {
        "replaced"
    };
    for p in &r.programs {
        let step = match p.step {
            RolloutStep::Starting => "starting",
            RolloutStep::Probation => "on probation",
            RolloutStep::Retiring => "old workers draining",
            RolloutStep::Waiting => "waiting for older workers to exit",
            RolloutStep::Done | RolloutStep::Unknown => "done",
        };
        let _ = writeln!(
            out,
            "  {}: {} of {} {word}, batch {} of {} ({}) {step} for {}",
            safe(&p.program),
            p.replaced,
            p.processes,
            p.batch,
            p.batches,
            plural(p.batch_size as usize, "worker"),
            duration(p.step_ms)
        );
    }
    out
}

fn listeners(all: &[ListenerStatus]) -> String {
    let mut rows = vec![
        [
            "LISTENER",
            "KIND",
            "ADDRESS",
            "STATE",
            "GENERATIONS",
            "QUEUE",
            "BACKLOG",
        ]
        .map(String::from),
    ];
    for l in all {
        let state = match l.closed_unix_ms {
            Some(at) => format!("{} {}", l.state, ago(at)),
            None => l.state.to_string(),
        };
        let held: Vec<String> = l.generations.iter().map(|g| g.to_string()).collect();
        rows.push([
            safe(&l.name),
            l.kind.to_string(),
            safe(&l.address),
            state,
            if held.is_empty() {
                "-".into()
            } else {
                held.join(", ")
            },
            l.queue
                .map_or_else(|| "-".into(), |q| format!("{} of {}", q.length, q.max)),
            l.backlog.to_string(),
        ]);
    }
    table(&rows, "  ")
}

/// `baton drain-status`: only the draining generations, and what keeps each alive.
pub(crate) fn drain_status(s: &StatusSnapshot) -> String {
    let draining: Vec<&GenerationStatus> = s
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Draining)
        .collect();
    if draining.is_empty() {
        return "no generation is draining\n".into();
    }
    let mut out = String::new();
    for g in draining {
        let _ = writeln!(
            out,
            "{}, {} left:",
            generation_heading(g),
            plural(g.workers.len(), "worker")
        );
        for w in &g.workers {
            let source = w.connections_source.map_or("?", ConnectionsSource::as_str);
            let why = match (w.connections, w.state) {
                (_, WorkerState::Killed) => "killed, waiting to be reaped".to_string(),
                // A worker that reports its connections exits when the last one closes; one
                // counted by the kernel may as well ignore the drain signal: only say what is known.
                (Some(0), _) if w.connections_source == Some(ConnectionsSource::Reported) => {
                    "no connection open: finishing".to_string()
                }
                (Some(0), _) => format!("no connection open ({source}), still running"),
                (Some(1), _) => format!("1 connection open ({source})"),
                (Some(n), _) => format!("{n} connections open ({source})"),
                (None, _) => "running (connections unknown)".to_string(),
            };
            let status = w
                .status
                .as_ref()
                .map_or(String::new(), |s| format!("; status: {}", safe(s)));
            let _ = writeln!(
                out,
                "  pid {} (worker {}, program {}): {why}{status}",
                w.pid.map_or_else(|| "-".to_string(), |p| p.to_string()),
                w.worker,
                safe(&w.program)
            );
        }
    }
    out
}

/// One line for `drain-status --wait`.
pub(crate) fn drain_progress(s: &StatusSnapshot) -> String {
    let parts: Vec<String> = s
        .generations
        .iter()
        .filter(|g| g.state == GenerationState::Draining)
        .map(|g| {
            let conns: u64 = g.workers.iter().filter_map(|w| w.connections).sum();
            format!(
                "gen {}: {}, {} conns, {} left{}",
                g.generation,
                plural(g.workers.len(), "worker"),
                conns,
                g.time_left_ms.map_or("-".into(), duration),
                g.handoff
                    .map_or_else(String::new, |h| format!(", {}", handed_off(h)))
            )
        })
        .collect();
    format!("draining: {}", parts.join("; "))
}

/// The verdict of `baton reload`.
pub(crate) fn verdict(v: &ReloadVerdict) -> String {
    let took = v
        .duration_ms
        .map_or(String::new(), |ms| format!(" in {}", duration(ms)));
    let warnings: String = v
        .warnings
        .iter()
        .map(|w| format!("warning: {}\n", safe(w)))
        .collect();
    match (v.ok, v.reload, v.generation) {
        (true, Some(r), Some(g)) => format!(
            "reload {r} (request #{}) succeeded{took}: generation {g} is serving\n{}{warnings}",
            v.request,
            v.receipt.as_ref().map_or_else(String::new, |k| format!(
                "kernel: {}\n",
                safe(&k.to_string())
            ))
        ),
        _ => {
            let output: String = v
                .output
                .iter()
                .map(|line| format!("  | {}\n", safe(line)))
                .collect();
            let output = if output.is_empty() {
                output
            } else {
                format!("its last lines on stderr:\n{output}")
            };
            format!(
                "reload{} (request #{}) failed{took}: {}\n{output}",
                v.reload.map_or(String::new(), |r| format!(" {r}")),
                v.request,
                safe(v.reason.as_deref().unwrap_or("unknown reason"))
            )
        }
    }
}

/// `baton logs`: one worker's line, with where it came from.
pub(crate) fn output_line(line: &baton_proto::control::OutputLine) -> String {
    format!(
        "{} {}[{}] g{} w{} s{} {}: {}\n",
        clock(line.unix_ms),
        safe(&line.program),
        line.pid,
        line.generation,
        line.worker,
        line.slot,
        line.stream.as_str(),
        safe(&line.text)
    )
}

/// `baton history`.
pub(crate) fn history(reloads: &[ReloadRecord]) -> String {
    if reloads.is_empty() {
        return "no reload yet\n".into();
    }
    let mut rows = vec![
        [
            "RELOAD", "GEN", "STARTED", "DURATION", "VERDICT", "KERNEL", "HANDOFF", "REQUESTS",
        ]
        .map(String::from),
    ];
    for r in reloads {
        rows.push([
            r.reload.to_string(),
            r.generation.to_string(),
            ago(r.started_unix_ms),
            duration(r.duration_ms),
            if r.ok {
                "ok".into()
            } else {
                format!("failed: {}", safe(r.reason.as_deref().unwrap_or("?")))
            },
            r.receipt.as_ref().map_or_else(
                || "-".into(),
                |k| {
                    let peak = k.queues.iter().map(|q| q.peak).max().unwrap_or(0);
                    format!("{} dropped, peak {peak}", k.listen_drops)
                },
            ),
            r.handoff.map_or_else(
                || "-".into(),
                |h| format!("{}/{} ({} kept)", h.adopted, h.offered, h.kept),
            ),
            safe(&r.requests.join("; ")),
        ]);
    }
    table(&rows, "")
}

fn table<const N: usize>(rows: &[[String; N]], indent: &str) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        out += indent;
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                out += cell;
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            }
        }
        // In place: copying the whole table for each row made 10 000 rows take seconds.
        out.truncate(out.trim_end().len());
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(12), "12 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(125_000), "2m05s");
        assert_eq!(duration(7_500_000), "2h05m");
    }

    #[test]
    fn clock_is_rfc3339_utc() {
        assert_eq!(clock(0), "1970-01-01T00:00:00.000Z");
        // date -u -d @1795792801 +%FT%T: 2026-11-27T15:20:01
        assert_eq!(clock(1_795_792_801_123), "2026-11-27T15:20:01.123Z");
        assert_eq!(clock(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn worker(
        id: u64,
        connections: Option<u64>,
        source: Option<ConnectionsSource>,
    ) -> WorkerStatus {
        WorkerStatus {
            worker: id,
            program: "web".into(),
            slot: 0,
            pid: Some(100 + id as u32),
            state: WorkerState::Draining,
            started_unix_ms: 0,
            ready_after_ms: None,
            restarts: 0,
            last_exit: None,
            connections,
            connections_source: source,
            status: None,
            refused: None,
            restart_in_ms: None,
            memory: None,
        }
    }

    fn draining(workers: Vec<WorkerStatus>) -> StatusSnapshot {
        StatusSnapshot {
            master: baton_proto::control::MasterStatus {
                pid: 1,
                version: "0".into(),
                uptime_ms: 0,
                config: "c".into(),
                state: baton_proto::control::MasterState::Idle,
                reload: None,
                rollout: None,
                queued_requests: vec![],
                stop_delay_left_ms: None,
                upgrades: vec![],
                start_settings: Default::default(),
            },
            listeners: vec![],
            generations: vec![GenerationStatus {
                generation: 4,
                state: GenerationState::Draining,
                draining_ms: Some(10),
                time_left_ms: Some(1000),
                deadline_unix_ms: None,
                workers,
                degraded: vec![],
                memory: None,
                handoff: None,
            }],
        }
    }

    #[test]
    fn a_degraded_generation_and_a_slot_in_backoff_are_shown() {
        let mut s = draining(vec![worker(7, None, None)]);
        let g = &mut s.generations[0];
        g.state = GenerationState::Serving;
        g.workers[0].state = WorkerState::Backoff;
        g.workers[0].pid = None;
        g.workers[0].restart_in_ms = Some(1600);
        g.workers[0].last_exit = Some("exited with status 1".into());
        g.degraded.push(baton_proto::control::CrashLoopStatus {
            program: "web".into(),
            crashes: 5,
            last_exit: Some("exited with status 1".into()),
            restart_in_ms: Some(1600),
        });
        let text = status(&s);
        assert!(
            text.contains("DEGRADED: program web is crash-looping: 5 crashes in a row, last exited with status 1; next restart in 1.6 s"),
            "{text}"
        );
        assert!(text.contains("backoff (restart in 1.6 s)"), "{text}");
    }

    #[test]
    fn drain_status_says_only_what_it_knows_and_counts_in_words() {
        let one = drain_status(&draining(vec![worker(
            7,
            Some(0),
            Some(ConnectionsSource::Reported),
        )]));
        assert!(one.contains(", 1 worker left:"), "{one}");
        assert!(
            one.contains("pid 107 (worker 7, program web): no connection open: finishing"),
            "{one}"
        );
        // The kernel's count of 0 says nothing of whether the worker is finishing (it may
        // ignore the drain signal).
        let two = drain_status(&draining(vec![
            worker(7, Some(0), Some(ConnectionsSource::Kernel)),
            worker(8, None, None),
        ]));
        assert!(two.contains(", 2 workers left:"), "{two}");
        assert!(
            two.contains("(worker 7, program web): no connection open (kernel), still running"),
            "{two}"
        );
        assert!(!two.contains("finishing"), "{two}");
        assert!(two.contains("running (connections unknown)"), "{two}");
        assert!(drain_progress(&draining(vec![worker(7, None, None)])).contains("1 worker,"));
    }
}
