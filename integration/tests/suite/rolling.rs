//! Rolling reloads (`reload: {strategy: rolling, batch: B}`, docs/lifecycle.md): under load, a
//! batch at a time, never more than `processes + batch` worker processes alive, every worker
//! replaced once; a failure mid-rollout rolls back to the old configuration losing nothing;
//! held connections make each batch wait for its drain, up to the deadline.

use baton_integration::event;
use baton_integration::loopback;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, eventually, free_port};
use serde_json::Value;

fn rolling(port: u16, processes: usize, batch: &str) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), processes);
    config.max_draining = 16;
    config
        .worker_extra
        .push(format!("reload: {{strategy: rolling, batch: {batch}}}"));
    config
}

/// A rolling configuration on a free port whose workers never finish their drain.
fn stubborn_rolling(processes: usize, batch: &str, drain_timeout: &'static str) -> TestConfig {
    let mut config = rolling(free_port(), processes, batch);
    config.drain_timeout = drain_timeout;
    config.it_worker(WorkerMode::Stubborn);
    config
}

/// Counts the master's worker processes every few milliseconds until dropped: the most seen.
struct Census {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Census {
    fn start(master_pid: u32) -> Census {
        let (stop, peak, samples) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, p, n) = (stop.clone(), peak.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 10 minutes of samples.
            let until = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && Instant::now() < until {
                let alive = baton_integration::procfs::children_now(master_pid)
                    .into_iter()
                    .filter(|&pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .is_ok_and(|c| c.trim() == "hello-worker")
                    })
                    .count();
                p.fetch_max(alive, Ordering::Relaxed);
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2)); // the sampling period
            }
        });
        Census {
            stop,
            peak,
            samples,
            thread: Some(thread),
        }
    }

    /// The most processes seen, and how many samples.
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.peak.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

/// Reloads `count` times, one after the other, each waiting for its verdict: the verdicts.
fn reload_times(master: &Master, count: usize) -> Vec<Value> {
    (0..count).map(|_| master.reload()).collect()
}

#[test]
fn a_rolling_reload_of_8_workers_loses_nothing_and_never_runs_more_than_8_plus_its_batch() {
    for batch in [1usize, 3] {
        let port = free_port();
        let master = Master::start(
            &format!("rolling-{batch}"),
            &rolling(port, 8, &batch.to_string()),
        );
        let addr = loopback(port);
        let census = Census::start(master.pid());
        let mut reloads = 0;
        for mode in [Mode::Fresh, Mode::KeepAlive] {
            let bounds = Bounds {
                clients: 8,
                duration: Duration::from_secs(120),
                max_requests_per_client: 1_000_000,
            };
            let load = Load::start(addr, mode, bounds);
            let verdicts = reload_times(&master, 2);
            let report = load.finish();
            for v in &verdicts {
                assert_eq!(v["event"], "reload_succeeded", "{v}");
            }
            reloads += verdicts.len();
            eprintln!("batch {batch}, {mode:?}: {}", report.summary());
            report.assert_lossless(format!("{mode:?}"));
            assert!(report.ok > 200, "real load: {}", report.summary());
        }
        let (peak, samples) = census.finish();
        eprintln!("batch {batch}: at most {peak} workers alive in {samples} samples");
        assert!(samples > 50, "the census sampled: {samples}");
        assert!(peak <= 8 + batch, "at most 8 + {batch} alive, saw {peak}");
        assert!(
            peak > 8,
            "the census saw a batch beside the old workers: {peak}"
        );

        // Every worker replaced exactly once per reload: 8 new workers ready per generation,
        // each old worker drained once and gone without being killed.
        for g in 2..=(1 + reloads as u64) {
            let ready = master.events_where(event::WORKER_READY, |v| v["generation"] == g);
            assert_eq!(ready.len(), 8, "generation {g}: 8 workers ready, once each");
            let batches = master.events_where(event::ROLLOUT_BATCH, |v| v["generation"] == g);
            assert_eq!(batches.len(), 8usize.div_ceil(batch), "generation {g}");
        }
        assert!(master.events(event::WORKER_KILLED).is_empty());
        assert!(master.events(event::WORKER_CRASHED).is_empty());
        let retired: usize = master
            .events(event::ROLLOUT_RETIRING)
            .iter()
            .map(|v| v["workers"].as_u64().unwrap() as usize)
            .sum();
        // The last batch of each reload replaces its old workers with the generation's drain.
        let tail = 8 - 8usize.div_ceil(batch).saturating_sub(1) * batch;
        assert_eq!(retired, reloads * (8 - tail), "retired batch by batch");
        let pids: Vec<u64> = master
            .events(event::WORKER_EXITED)
            .iter()
            .filter_map(|v| v["pid"].as_u64())
            .collect();
        let unique: BTreeSet<u64> = pids.iter().copied().collect();
        assert_eq!(pids.len(), unique.len(), "each old worker exits once");
        // The last reload's old generation drains its last batch's old workers: wait for it.
        master.wait_event(event::GENERATION_EXITED, Duration::from_secs(30), |v| {
            v["generation"] == reloads as u64
        });
        let exited = master.events(event::WORKER_EXITED).len();
        assert_eq!(exited, 8 * reloads, "every old worker exited");
    }
}

#[test]
fn a_failure_at_batch_3_of_8_rolls_back_to_8_workers_of_the_old_configuration_losing_nothing() {
    let port = free_port();
    let mut config = rolling(port, 8, "1");
    config.args = vec!["--tag".into(), "old".into()];
    let master = Master::start("rolling-fail", &config);
    let addr = loopback(port);
    let census = Census::start(master.pid());
    let bounds = Bounds {
        clients: 8,
        duration: Duration::from_secs(120),
        max_requests_per_client: 1_000_000,
    };
    let load = Load::start(addr, Mode::KeepAlive, bounds);
    let fresh = Load::start(addr, Mode::Fresh, bounds);

    // The new configuration's third worker (slot 2, batch 3) exits at once.
    let hello = config.command.display().to_string();
    let mut broken = config.clone();
    broken.command = "/bin/sh".into();
    broken.args = vec![
        "-c".into(),
        format!("[ \"$BATON_SLOT\" = 2 ] && exit 3; exec {hello} --tag new"),
    ];
    master.write_config(&broken.yaml());
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 1, "the reload fails: {out} {err}");
    let verdict: Value = serde_json::from_str(&out).unwrap();
    let why = verdict["reason"].as_str().unwrap_or_default().to_string();
    eprintln!("verdict: {verdict}");
    assert!(
        why.contains("failed at batch 3 of 8 of worker") && why.contains("exited with status 3"),
        "the verdict names the batch and the cause: {verdict}"
    );
    assert!(why.contains("rolling back to generation 1"), "{verdict}");
    master.wait_event(event::ROLLOUT_ROLLED_BACK, Duration::from_secs(60), |_| {
        true
    });
    // Back to 8 workers of generation 1, started from the configuration that was serving.
    let (_, status, _) = master.ctl(&["status", "--json"]);
    let status: Value = serde_json::from_str(&status).unwrap();
    let serving: Vec<&Value> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "{status}");
    assert_eq!(serving[0]["generation"], 1, "{status}");
    let ready = serving[0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .count();
    assert_eq!(ready, 8, "{status}");
    let report = load.finish();
    let fresh = fresh.finish();
    let (peak, _) = census.finish();
    eprintln!("keep-alive: {}", report.summary());
    eprintln!("fresh: {}", fresh.summary());
    report.assert_lossless("");
    fresh.assert_lossless("");
    assert!(
        peak <= 9,
        "at most 8 + 1 alive on the way there and back, saw {peak}"
    );
    // Generation 1's restarted workers run the old configuration.
    for _ in 0..16 {
        let body = answer(port);
        assert!(body.contains("generation 1, tag old"), "{body}");
    }
    // A reload once the configuration is fixed rolls as usual.
    master.write_config(&config.yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
}

#[test]
fn old_workers_that_do_not_finish_make_each_batch_wait_for_their_drain_up_to_the_deadline() {
    // Workers that never finish their drain, as a worker does while a kept-alive client holds
    // a connection it will not close (which connections reach which worker is the kernel's
    // choice, so a test of held connections could not say which workers would hold one).
    let config = stubborn_rolling(4, "2", "1s");
    let master = Master::start("rolling-held", &config);
    let reload = master.ctl_spawn(&["reload"]);
    // While batch 1's old workers drain, `baton status` shows the rollout, an upgrade is
    // refused with the reason, and another reload request waits its turn.
    let status = eventually(Duration::from_secs(10), "the rollout in status", || {
        let (_, text, _) = master.ctl(&["status"]);
        text.contains("old workers draining").then_some(text)
    });
    eprintln!("{status}");
    assert!(
        status.contains("rolling reload 1: generation 2 replaces generation 1, a batch at a time"),
        "{status}"
    );
    assert!(
        status.contains("worker: 2 of 4 replaced, batch 1 of 2 (2 workers) old workers draining"),
        "{status}"
    );
    assert!(status.contains("generation 2  rolling"), "{status}");
    let (code, _, err) = master.ctl(&["upgrade"]);
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("rolling reload 1 is replacing generation 1 with generation 2"),
        "{err}"
    );
    let (code, queued, err) = master.ctl(&["reload", "--no-wait"]);
    assert_eq!(code, 0, "{queued} {err}");
    let out = reload.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("generation 2 is serving"), "{text}");
    let (retired_at, _) =
        master.wait_event(event::ROLLOUT_RETIRING, Duration::from_secs(5), |_| true);
    let batches = master.events_where(event::ROLLOUT_BATCH, |v| v["generation"] == 2);
    assert_eq!(batches.len(), 2);
    let next = batches[1].0;
    let waited = next.duration_since(retired_at);
    eprintln!("batch 2 started {waited:?} after batch 1's old workers were told to drain");
    assert!(
        waited >= Duration::from_millis(900),
        "batch 2 waited for the drain of batch 1's old workers: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "and no longer than the deadline: {waited:?}"
    );
    let killed = master.events(event::WORKER_KILLED);
    assert!(
        killed
            .iter()
            .filter(|k| k["message"]
                .as_str()
                .is_some_and(|m| m.contains("retired by reload 1, batch 1")))
            .count()
            == 2,
        "batch 1's old workers killed at their deadline: {killed:?}"
    );
    // The queued request ran next, as its own rolling reload.
    let next = master.verdict_of(2);
    assert_eq!(next["event"], "reload_succeeded", "{next}");
    assert_eq!(next["generation"], 3, "{next}");
    eventually(Duration::from_secs(10), "generation 1 gone", || {
        master
            .events_where(event::GENERATION_EXITED, |v| v["generation"] == 1)
            .first()
            .map(|_| ())
    });
}

/// One request on a new connection that closes after the answer: the whole answer.
fn answer(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn a_stop_during_a_rollout_drains_both_generations_within_their_deadlines() {
    // Old workers that never finish: the rollout is still retiring when the stop comes.
    let config = stubborn_rolling(4, "1", "2s");
    let mut master = Master::start("rolling-stop", &config);
    let reload = master.ctl_spawn(&["reload"]);
    master.wait_event(event::ROLLOUT_RETIRING, Duration::from_secs(10), |_| true);
    let asked = Instant::now();
    master.signal(nix::sys::signal::Signal::SIGTERM);
    let status = master.wait_exit(Duration::from_secs(30));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    eprintln!("stopped {took:?} after SIGTERM, in the middle of a rollout");
    assert!(
        took < Duration::from_secs(10),
        "within the deadlines: {took:?}"
    );
    let out = reload.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("stop requested during the rolling reload"),
        "the rollout's verdict: {text}"
    );
}
