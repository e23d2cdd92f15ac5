//! Workers' output (issue 15, item 1): each line logged once, whole, with where it came from;
//! long lines cut, bytes escaped; `baton logs` with filters and `--follow`; the stderr of a
//! worker that failed a reload in its verdict; `output: inherit`; a flooding worker that costs
//! no reload, no request and no memory.

use baton_integration::event;
use baton_integration::loopback;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port, patience, procfs};
use serde_json::Value;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `processes` it-workers (ready at once) with `env`, on one listener.
fn it_workers(processes: usize, env: &[(&str, String)]) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), processes);
    config.it_worker(WorkerMode::ReadyAfter(0));
    config
        .env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    config
}

/// The lines `from` gives, as they come (a thread reads them).
fn lines_of(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

#[test]
fn every_line_is_whole_attributed_escaped_and_cut_at_the_limit() {
    let mut long = vec![b'L'; 20_000];
    long.push(b'\n');
    let config = it_workers(
        2,
        &[
            ("IT_STDERR_HEX", hex(b"oops \x1b[31mred\xff end\n")),
            ("IT_STDOUT_HEX", hex(&long)),
            ("IT_PIECES", "1".into()),
            ("IT_PIECES_MS", "400".into()),
        ],
    );
    let master = Master::start("output-lines", &config);
    let pids: BTreeSet<u64> = master.children().iter().map(|&p| u64::from(p)).collect();
    eventually(Duration::from_secs(10), "both workers' pieces", || {
        let whole = master
            .output_lines()
            .iter()
            .filter(|v| message(v) == "piece-a piece-b")
            .count();
        (whole == 2).then_some(())
    });
    let lines = master.output_lines();
    // The master logged its own lines while the pieces were apart; no line holds half of one.
    assert!(
        !lines.iter().any(|v| {
            let m = message(v);
            m.contains("piece-") && m != "piece-a piece-b"
        }),
        "{lines:#?}"
    );
    assert!(master.raw_lines().is_empty(), "{:?}", master.raw_lines());
    let red: Vec<&Value> = lines
        .iter()
        .filter(|v| v["stream"] == "stderr" && message(v).starts_with("oops"))
        .collect();
    assert_eq!(red.len(), 2, "{lines:#?}");
    let mut workers = BTreeSet::new();
    for v in &red {
        assert_eq!(message(v), "oops \\u{1b}[31mred\\xff end", "escaped: {v}");
        assert_eq!(v["program"], "worker");
        assert_eq!(v["generation"], 1);
        assert!(pids.contains(&v["pid"].as_u64().unwrap()), "{v} {pids:?}");
        workers.insert((v["worker"].as_u64().unwrap(), v["slot"].as_u64().unwrap()));
    }
    let slots: BTreeSet<u64> = workers.iter().map(|(_, s)| *s).collect();
    assert_eq!(slots, BTreeSet::from([0, 1]), "{workers:?}");
    let long_lines: Vec<&Value> = lines
        .iter()
        .filter(|v| message(v).starts_with("LLLL"))
        .collect();
    assert_eq!(long_lines.len(), 2);
    for v in long_lines {
        assert_eq!(v["stream"], "stdout");
        let m = message(v);
        assert!(m.ends_with(" [3616 bytes cut]"), "{}", &m[m.len() - 40..]);
        assert_eq!(m.len(), 16 * 1024 + " [3616 bytes cut]".len());
    }
    let (_, metrics, _) = master.ctl(&["metrics"]);
    assert!(
        metrics.contains("baton_output_cut_lines_total 2"),
        "{metrics}"
    );

    // `baton logs`: the kept lines, filtered; text with the origin, or JSON.
    let (worker, slot) = *workers.iter().next().unwrap();
    let (code, text, err) = master.ctl(&["logs", "--worker", &worker.to_string()]);
    assert_eq!(code, 0, "{err}");
    let shown: Vec<&str> = text.lines().collect();
    assert_eq!(shown.len(), 3, "{text}");
    // The kept copy of a long line is shorter than the logged one.
    let kept_long = shown
        .iter()
        .find(|l| l.contains("stdout: LLLL"))
        .expect(&text);
    assert!(
        kept_long.ends_with("LLLL [15377 more bytes in the log]"),
        "{kept_long}"
    );
    let prefix = format!("] g1 w{worker} s{slot} ");
    assert!(
        shown
            .iter()
            .all(|l| l.contains("worker[") && l.contains(&prefix)),
        "{text}"
    );
    assert!(
        text.contains("stderr: oops \\u{1b}[31mred\\xff end"),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "nothing raw reaches a terminal");
    let (code, json, _) = master.ctl(&["logs", "--json", "--program", "worker"]);
    assert_eq!(code, 0);
    let all: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(all.len(), 6, "{json}");
    assert!(
        all.windows(2)
            .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64())
    );
    // A program the master does not run is named with those it runs (issue 28).
    let (code, none, err) = master.ctl(&["logs", "--program", "nope"]);
    assert_eq!((code, none.as_str()), (64, ""), "{err}");
}

#[test]
fn the_text_log_prefixes_each_workers_line_with_its_origin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.yaml");
    let yaml = it_workers(1, &[("IT_STDERR_HEX", hex(b"hello-text\n"))])
        .yaml()
        .replace("{dir}", dir.path().to_str().unwrap());
    std::fs::write(&config, yaml).unwrap();
    let mut child = baton_integration::baton_run(&config, "text", &[]);
    let rx = lines_of(child.stderr.take().unwrap());
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    let line = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the worker's line in the text log");
        if line.contains("hello-text") {
            break line;
        }
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    // `2026-11-27T15:24:16.384494Z  INFO worker[1342] g1 w1 s0 stderr: hello-text`
    let (time, rest) = line.split_once("  INFO ").expect(&line);
    assert!(time.ends_with('Z') && time.len() == 27, "{line}");
    let (program, rest) = rest.split_once('[').expect(&line);
    assert_eq!(program, "worker");
    let (pid, rest) = rest.split_once("] ").expect(&line);
    assert!(pid.parse::<u32>().is_ok(), "{line}");
    assert_eq!(rest, "g1 w1 s0 stderr: hello-text");
}

#[test]
fn output_inherit_shares_the_masters_stderr_as_before() {
    let mut config = it_workers(1, &[("IT_STDERR_HEX", hex(b"raw-line\n"))]);
    config.worker_extra.push("output: inherit".into());
    let master = Master::start("output-inherit", &config);
    eventually(Duration::from_secs(10), "the raw line", || {
        master
            .raw_lines()
            .iter()
            .any(|l| l == "raw-line")
            .then_some(())
    });
    assert!(master.output_lines().is_empty());
    let (code, text, _) = master.ctl(&["logs"]);
    assert_eq!((code, text.as_str()), (0, ""));
}

#[test]
fn a_worker_that_fails_a_reload_has_its_last_stderr_lines_in_the_verdict() {
    let config = it_workers(1, &[]);
    let master = Master::start("output-verdict", &config);
    let mut broken = it_workers(1, &[]);
    broken.listeners = config.listeners.clone();
    broken.env = vec![
        WorkerMode::Exit(3).env(),
        (
            "IT_STDERR_HEX".into(),
            hex(b"starting\nfatal: cannot open /var/lib/app.db: permission denied\n"),
        ),
    ];
    master.write_config(&broken.yaml());
    let (code, out, text) = master.ctl(&["reload"]);
    assert_eq!(code, 1, "{out}{text}");
    assert!(
        text.contains("its last lines on stderr:\n  | starting\n  | fatal: cannot open /var/lib/app.db: permission denied\n"),
        "{text}\n{:#?}",
        master.output_lines()
    );
    let (code, json, _) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 1);
    let verdict: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        verdict["output"][1], "fatal: cannot open /var/lib/app.db: permission denied",
        "{verdict}"
    );
}

#[test]
fn logs_follow_streams_new_lines_once_each() {
    let config = it_workers(1, &[("IT_CHATTER_MS", "50".into())]);
    let master = Master::start("output-follow", &config);
    let mut follower = master.ctl_spawn(&["logs", "--follow", "--json"]);
    let rx = lines_of(follower.stdout.take().unwrap());
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    let mut seen = Vec::new();
    while seen.len() < 30 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("followed lines");
        let v: Value = serde_json::from_str(&line).unwrap();
        seen.push((
            v["seq"].as_u64().unwrap(),
            v["text"].as_str().unwrap().to_string(),
        ));
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "in order, once each: {seen:?}"
    );
    let numbers: Vec<u64> = seen
        .iter()
        .filter_map(|(_, t)| t.strip_prefix("chatter ")?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "no line lost or repeated between the kept part and the followed part: {numbers:?}"
    );
}

/// 50 MB from one worker as fast as it can write, while the master reloads every 200 ms under
/// load: no request fails, every reload concludes promptly, every line is forwarded, and the
/// master's memory stays put.
#[test]
fn a_flooding_worker_delays_no_reload_loses_no_request_and_costs_no_memory() {
    const FLOOD: u64 = 50_000_000;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let once = dir.path().join("flooded");
    let yaml = format!(
        "listeners:\n  - name: http\n    address: \"127.0.0.1:{port}\"\nworkers:\n  - name: web\n    command: {hello}\n    processes: 2\n    ready_timeout: 20s\n    drain_timeout: 20s\n  - name: flood\n    command: {it}\n    listeners: []\n    processes: 1\n    ready_timeout: 20s\n    drain_timeout: 120s\n    env: {{IT_MODE: \"ready-after:0\", IT_FLOOD_BYTES: \"{FLOOD}\", IT_FLOOD_ONCE: \"{once}\"}}\nsupervisor:\n  max_draining: 64\n  control:\n    socket: {{dir}}/baton.sock\n",
        hello = binaries().hello_worker.display(),
        it = binaries().it_worker.display(),
        once = once.display(),
    );
    let master = Master::spawn("output-flood", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let rss_start = procfs::rss_kib(master.pid());
    let bounds = Bounds {
        clients: 4,
        duration: Duration::from_secs(120),
        max_requests_per_client: 1_000_000,
    };
    let load = Load::start(loopback(port), Mode::Fresh, bounds);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut rss_peak = rss_start;
    let flood_done = |m: &Master| {
        m.events(event::OUTPUT)
            .iter()
            .any(|v| message(v).starts_with("flood done"))
    };
    // Reloads every 200 ms until the flood is over (at least 3 s of them), 90 s at most.
    while !(flood_done(&master) && start.elapsed() > Duration::from_secs(3)) {
        assert!(
            start.elapsed() < patience(Duration::from_secs(90)),
            "the flood did not end: {} lines forwarded",
            master.output_seen()
        );
        master.signal(nix::sys::signal::Signal::SIGUSR2);
        sent += 1;
        eventually(
            Duration::from_secs(10),
            "the master to take the signal",
            || (master.events(event::RELOAD_REQUESTED).len() as u64 >= sent).then_some(()),
        );
        rss_peak = rss_peak.max(procfs::rss_kib(master.pid()));
        std::thread::sleep(Duration::from_millis(200)); // the reload cadence under test
    }
    master.verdict_of(sent);
    let report = load.finish();
    let reloads = master.assert_logged_requests_accounted_for();
    let took: Vec<u64> = master
        .events(event::RELOAD_SUCCEEDED)
        .iter()
        .filter_map(|v| v["took_ms"].as_u64())
        .collect();
    let slowest = took.iter().max().copied().unwrap_or(0);
    let done = master
        .events(event::OUTPUT)
        .into_iter()
        .find(|v| message(v).starts_with("flood done"))
        .unwrap();
    // `flood done: N lines, B bytes`
    let lines: u64 = message(&done)
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap();
    eprintln!(
        "flood of {FLOOD} bytes ({lines} lines) in {:.1} s: {} reloads (slowest {slowest} ms), {} requests ({} failed), master RSS {rss_start} -> peak {rss_peak} KiB",
        start.elapsed().as_secs_f64(),
        reloads,
        report.ok,
        report.failed()
    );
    report.assert_lossless("");
    assert!(report.ok > 100, "the load ran: {}", report.ok);
    assert!(reloads >= 10, "reloads ran through the flood: {reloads}");
    assert!(
        slowest < 2_000,
        "every reload concludes promptly despite the flood: {took:?}"
    );
    assert!(
        master.output_seen() > lines,
        "every flood line was forwarded: {} of {lines}",
        master.output_seen()
    );
    assert!(
        rss_peak < rss_start + 16 * 1024,
        "the master's memory stays bounded: {rss_start} -> {rss_peak} KiB"
    );
}

/// `baton upgrade` carries each worker's pipes to the new program, with the line it was in the
/// middle of: the worker keeps writing (no SIGPIPE, no block), its lines keep their origin, and
/// a line begun before the exec and ended after it is logged whole.
#[test]
fn an_upgrade_carries_the_pipes_and_the_unfinished_line() {
    let config = it_workers(
        1,
        &[
            ("IT_CHATTER_MS", "50".into()),
            ("IT_PIECES", "1".into()),
            ("IT_PIECES_MS", "3000".into()),
        ],
    );
    // Built before the worker starts, so that its unfinished line straddles the upgrade.
    let next = baton_integration::next_baton();
    let master = Master::start("output-upgrade", &config);
    let pid = master.children()[0];
    // The first piece is in the master's hands (chatter lines around it came through).
    eventually(Duration::from_secs(10), "chatter", || {
        (master.output_lines().len() >= 3).then_some(())
    });
    let (code, out, err) = master.ctl(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (upgraded, _) = master.wait_event(event::UPGRADED, Duration::from_secs(20), |_| true);
    eventually(
        Duration::from_secs(10),
        "the whole line after the upgrade",
        || {
            master
                .output_lines()
                .iter()
                .any(|v| message(v) == "piece-a piece-b")
                .then_some(())
        },
    );
    let after: Vec<(Instant, Value)> = master.events_where(event::OUTPUT, |v| {
        message(v).starts_with("chatter") && v["pid"] == pid
    });
    let later = after.iter().filter(|(at, _)| *at > upgraded).count();
    assert!(
        later >= 3,
        "the worker's lines go on after the upgrade: {later}"
    );
    for (_, v) in &after {
        assert_eq!(
            (v["program"].as_str(), v["generation"].as_u64()),
            (Some("worker"), Some(1))
        );
    }
    assert!(
        !master
            .output_lines()
            .iter()
            .any(|v| message(v).contains("piece-") && message(v) != "piece-a piece-b"),
        "the unfinished line was not split or lost"
    );
    assert_eq!(master.children(), vec![pid], "the worker lives on");
}

/// Issue 28: `logs --program nope` printed nothing and exited 0. It names the programs the
/// master runs and exits 64, following or not; a program it runs is shown as before.
#[test]
fn logs_of_a_program_the_master_does_not_run_name_the_ones_it_does() {
    let master = Master::start(
        "logs-program",
        &TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1),
    );
    for args in [
        &["logs", "--program", "nope"][..],
        &["logs", "--program", "nope", "--follow"][..],
    ] {
        let (code, out, err) = master.ctl(args);
        assert_eq!(code, 64, "{args:?}: {out}{err}");
        assert!(
            err.contains("no program `nope`: the master runs worker"),
            "{args:?}: {err}"
        );
    }
    let (code, out, err) = master.ctl(&["logs", "--program", "worker"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("hello-worker pid"), "{out}");
}
