//! Liveness after ready (issue 15, item 3): a ready worker that stops proving it is alive is
//! replaced (watchdog: the SDK's heartbeats; probes: HTTP or TCP), while a master that was not
//! running judges nobody.

use baton_integration::event;
use baton_integration::executable;
use baton_integration::loopback;
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode};
use baton_integration::{Master, TestConfig, eventually, free_port, patience, procfs};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).unwrap();
}

fn watchdog_config(port: u16) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config
        .worker_extra
        .push("liveness: {watchdog: 1s, kill_after: 1s}".into());
    config
}

/// SIGSTOP one ready worker: its heartbeats stop, it is replaced within the window + 1 s, and
/// clients (which the stopped worker no longer takes from the shared queue) lose nothing.
#[test]
fn a_stopped_worker_is_replaced_within_its_window_and_no_request_fails() {
    let port = free_port();
    let master = Master::start("liveness-stop", &watchdog_config(port));
    let pids = master.children();
    assert_eq!(pids.len(), 2);
    let stopped = pids[0];
    let before = Instant::now();
    signal(stopped, Signal::SIGSTOP);
    // Every thread stopped before the load starts: a thread still running could accept a
    // connection the stopped worker then holds, reset when it is killed (a race of the test's).
    eventually(Duration::from_secs(5), "the worker stopped", || {
        procfs::stopped(stopped).then_some(())
    });
    let bounds = Bounds {
        clients: 4,
        duration: Duration::from_secs(60),
        max_requests_per_client: 1_000_000,
    };
    let load = Load::start(loopback(port), Mode::Fresh, bounds);
    let (_, unhealthy) = master.wait_event(event::WORKER_UNHEALTHY, Duration::from_secs(10), |v| {
        v["pid"] == stopped
    });
    assert_eq!(unhealthy["replaced"], true, "{unhealthy}");
    let reason = unhealthy["reason"].as_str().unwrap();
    assert!(reason.contains("no heartbeat for 1000 ms"), "{unhealthy}");
    let (ready_at, ready) = master.wait_event(event::WORKER_READY, Duration::from_secs(10), |v| {
        v["generation"] == 1 && !pids.contains(&(v["pid"].as_u64().unwrap_or(0) as u32))
    });
    let took = ready_at.saturating_duration_since(before);
    eprintln!("SIGSTOP to a new ready worker: {} ms", took.as_millis());
    assert!(
        took <= patience(Duration::from_secs(2)),
        "replaced within the window (1 s) + 1 s: {took:?} ({ready})"
    );
    // The stopped one is killed at kill_after; the load goes on a moment with the new worker.
    eventually(Duration::from_secs(10), "the stopped worker killed", || {
        (!procfs::alive(stopped)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500)); // load after the replacement, bounded
    let report = load.finish();
    report.assert_lossless("");
    assert!(report.ok > 50, "{}", report.ok);
    let (_, metrics, _) = master.ctl(&["metrics"]);
    assert!(
        metrics.contains("baton_worker_replacements_total{cause=\"liveness\"} 1"),
        "{metrics}"
    );
    let (code, _, _) = master.ctl(&["status"]);
    assert_eq!(code, 0, "one replacement is not a crash loop");
}

/// The master stopped for 10 s judges nobody when it runs again: the heartbeats it did not
/// read were not the workers' fault.
#[test]
fn a_master_stopped_for_ten_seconds_kills_no_worker() {
    let master = Master::start("liveness-master-stop", &watchdog_config(free_port()));
    let pids = master.children();
    signal(master.pid(), Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(10)); // the stall under test
    signal(master.pid(), Signal::SIGCONT);
    // The master answers again; then three whole windows pass with heartbeats judged.
    let (code, _, err) = master.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(3)); // three watchdog windows of observation
    assert!(
        master.events(event::WORKER_UNHEALTHY).is_empty(),
        "{:?}",
        master.events(event::WORKER_UNHEALTHY)
    );
    assert_eq!(master.children(), pids, "the same workers");
    // And the watchdog still works: a worker stopped now is replaced.
    signal(pids[1], Signal::SIGSTOP);
    master.wait_event(event::WORKER_UNHEALTHY, Duration::from_secs(10), |v| {
        v["pid"] == pids[1]
    });
}

/// An HTTP liveness probe per worker (`{worker}` in its address, given to the worker as
/// `BATON_LIVENESS_ADDRESS`): a worker whose health endpoint answers 503 three times in a row is
/// replaced, the others are left alone.
#[test]
fn a_worker_failing_its_http_probe_threshold_times_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let script = executable(dir.path(), "health.py", HEALTH_PY);
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 2);
    config.command = script.clone();
    config.worker_extra = vec![
        "protocol: systemd".into(),
        format!(
            "liveness: {{http: \"{}/health-{{worker}}.sock\", path: /health, interval: 200ms, timeout: 500ms, threshold: 3}}",
            dir.path().display()
        ),
    ];
    let master = Master::start("liveness-http", &config);
    let pids = master.children();
    // Healthy for a while: nobody is judged.
    std::thread::sleep(Duration::from_secs(1)); // five probe rounds of observation
    assert!(master.events(event::WORKER_UNHEALTHY).is_empty());
    std::fs::write(dir.path().join(format!("sick-{}", pids[0])), "").unwrap();
    let (_, v) = master.wait_event(event::WORKER_UNHEALTHY, Duration::from_secs(10), |v| {
        v["pid"] == pids[0]
    });
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("failed 3 times in a row, last: HTTP status 503"),
        "{v}"
    );
    master.wait_event(event::WORKER_READY, Duration::from_secs(10), |v| {
        !pids.contains(&(v["pid"].as_u64().unwrap_or(0) as u32))
    });
    // The sick one gets SIGTERM (Python dies of it), or SIGKILL at kill_after.
    eventually(Duration::from_secs(10), "the sick worker gone", || {
        (!procfs::alive(pids[0])).then_some(())
    });
    assert!(procfs::alive(pids[1]), "the healthy one stays");
    assert_eq!(master.events(event::WORKER_UNHEALTHY).len(), 1);
}

/// `baton upgrade` keeps judging: a worker stopped after the upgrade is replaced all the same.
#[test]
fn liveness_goes_on_after_an_upgrade() {
    let master = Master::start("liveness-upgrade", &watchdog_config(free_port()));
    let pids = master.children();
    let next = baton_integration::next_baton();
    let (code, out, err) = master.ctl(&["upgrade", "--binary", next.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    master.wait_event(event::UPGRADED, Duration::from_secs(20), |_| true);
    signal(pids[0], Signal::SIGSTOP);
    master.wait_event(event::WORKER_UNHEALTHY, Duration::from_secs(10), |v| {
        v["pid"] == pids[0]
    });
    assert!(procfs::alive(pids[1]) && master.events(event::WORKER_UNHEALTHY).len() == 1);
}

const HEALTH_PY: &str = r#"#!/usr/bin/env python3
import os, socket
sick = os.path.join(os.path.dirname(os.environ["BATON_LIVENESS_ADDRESS"]), "sick-%d" % os.getpid())
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(os.environ["BATON_LIVENESS_ADDRESS"])
server.listen(16)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
while True:
    conn, _ = server.accept()
    conn.recv(1024)
    status = b"503 Sick" if os.path.exists(sick) else b"200 OK"
    conn.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    conn.close()
"#;
