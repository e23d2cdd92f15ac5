//! Crash loops are a state (issue 15, item 4): a program whose workers keep crashing makes its
//! generation degraded, in `baton status` (and its exit status), the metrics and systemd's
//! `STATUS=`; a slot waiting out its backoff keeps its row; it recovers by itself once the
//! workers stay up.

use baton_integration::event;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port};
use serde_json::Value;

/// A worker that crashes 100 ms after it is ready, its first `crashes` starts.
fn crash_looping(crashes: usize, file: &std::path::Path) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1);
    config.command = binaries().it_worker.clone();
    config.env = vec![
        WorkerMode::CrashAfter(100).env(),
        ("IT_CRASHES".into(), crashes.to_string()),
        ("IT_CRASHES_FILE".into(), file.display().to_string()),
    ];
    config.worker_extra = vec![
        "restart_backoff: 100ms".into(),
        "restart_backoff_max: 2s".into(),
    ];
    config
}

fn status(master: &Master) -> (i32, Value) {
    let (code, out, err) = master.ctl(&["status", "--json"]);
    let value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    (code, value)
}

#[test]
fn a_crash_loop_degrades_the_generation_everywhere_and_it_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let starts = dir.path().join("starts");
    // What the master tells systemd, on a notify socket of the test's own.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let told = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = told.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = notify.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let config = crash_looping(5, &starts);
    let master = Master::spawn_with_env(
        "degraded",
        &config.yaml(),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);

    // Degraded once a slot crashed 3 times in a row; its row stays while it waits.
    let (code, degraded) = eventually(Duration::from_secs(20), "degraded", || {
        let (code, s) = status(&master);
        (!s["generations"][0]["degraded"].as_array()?.is_empty()).then_some((code, s))
    });
    assert_eq!(code, 1, "status exits 1 while degraded: {degraded}");
    let d = &degraded["generations"][0]["degraded"][0];
    assert_eq!(d["program"], "worker", "{d}");
    assert!(d["crashes"].as_u64().unwrap() >= 3, "{d}");
    assert_eq!(d["last_exit"], "exited with status 1", "{d}");
    let backoff = eventually(Duration::from_secs(20), "a slot in backoff", || {
        let (_, s) = status(&master);
        let w = s["generations"][0]["workers"][0].clone();
        (w["state"] == "backoff").then_some(w)
    });
    assert!(backoff["pid"].is_null(), "{backoff}");
    assert!(backoff["restart_in_ms"].as_u64().is_some(), "{backoff}");
    assert!(
        backoff["worker"].as_u64().unwrap() > 0,
        "the worker that crashed: {backoff}"
    );
    master.wait_event(event::GENERATION_DEGRADED, Duration::from_secs(5), |_| true);
    eventually(Duration::from_secs(10), "STATUS= says degraded", || {
        told.lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("STATUS=") && m.contains("DEGRADED: worker crash-looping"))
            .then_some(())
    });

    // The 6th start stays up: after restart_backoff_max (2 s) the generation has recovered.
    master.wait_event(event::GENERATION_RECOVERED, Duration::from_secs(30), |_| {
        true
    });
    let (code, healthy) = status(&master);
    assert_eq!(code, 0, "{healthy}");
    assert!(
        healthy["generations"][0].get("degraded").is_none(),
        "{healthy}"
    );
    let (_, metrics, _) = master.ctl(&["metrics"]);
    assert!(metrics.contains("\nbaton_degraded 0\n"), "{metrics}");
    eventually(Duration::from_secs(10), "STATUS= without DEGRADED", || {
        told.lock()
            .unwrap()
            .last()
            .is_some_and(|m| m.contains("STATUS=gen 1 serving 1 worker") && !m.contains("DEGRADED"))
            .then_some(())
    });
    let degraded_at = master.events(event::GENERATION_DEGRADED).len();
    assert_eq!(degraded_at, 1, "one transition each way");
}

#[test]
fn while_degraded_the_metrics_and_the_table_say_so_and_status_exits_2_when_nothing_serves() {
    let dir = tempfile::tempdir().unwrap();
    let config = crash_looping(1000, &dir.path().join("starts"));
    let master = Master::start("degraded-metrics", &config);
    eventually(Duration::from_secs(20), "baton_degraded 1", || {
        let (_, metrics, _) = master.ctl(&["metrics"]);
        (metrics.contains("\nbaton_degraded 1\n")
            && metrics.contains("baton_crash_loop_crashes{program=\"worker\"}"))
        .then_some(())
    });
    let (code, table, _) = master.ctl(&["status"]);
    assert_eq!(code, 1, "{table}");
    assert!(
        table.contains("DEGRADED: program worker is crash-looping: ")
            && table.contains(" crashes in a row, last exited with status 1"),
        "{table}"
    );
    // A master whose first generation is not serving yet: 2.
    let mut never = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1);
    never.it_worker(WorkerMode::NeverReady);
    never.ready_timeout = "60s";
    let starting = Master::spawn("degraded-starting", &never.yaml());
    let code = eventually(
        Duration::from_secs(20),
        "status of a starting master",
        || {
            let (code, out, _) = starting.ctl(&["status", "--json"]);
            out.contains("\"starting\"").then_some(code)
        },
    );
    assert_eq!(code, 2);
}
