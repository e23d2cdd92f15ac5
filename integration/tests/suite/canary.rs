//! Canary window: a new generation serves on probation while the old one stands by, paused and
//! ready; a crash during the probation rolls back.

use baton_integration::event;
use baton_integration::loopback;
use std::time::Duration;

use baton_integration::load::{Load, Mode};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, free_port};

fn with_canary(port: u16, window: &str) -> TestConfig {
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    c.supervisor_extra = vec![format!("canary_window: {window}")];
    c
}

#[test]
fn a_generation_that_crashes_during_its_probation_is_rolled_back_without_losing_a_request() {
    let port = free_port();
    let good = with_canary(port, "3s");
    let master = Master::start("canary-rollback", &good);
    let load = Load::until_finished(loopback(port), Mode::Fresh, 4);
    // Ready at once, then dies 1 s later (it never accepts: it cannot take requests with it).
    let mut bad = good.clone();
    bad.it_worker(WorkerMode::CrashAfter(1000));
    master.write_config(&bad.yaml());
    let (code, _, err) = master.ctl(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rolled back to generation 1"), "{err}");
    assert!(err.contains("exited with status 1"), "{err}");
    let (_, status, _) = master.ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let serving: Vec<u64> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "serving")
        .map(|g| g["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(
        serving,
        vec![1],
        "the old generation serves again: {status}"
    );
    let report = load.finish();
    report.assert_lossless_with("rollback under load", 0);
    report.assert_served_by(&[1]);
    assert!(
        master.events(event::WORKER_KILLED).is_empty(),
        "generation 1 was never drained"
    );
}

#[test]
fn a_generation_that_survives_its_probation_succeeds_and_then_the_old_one_drains() {
    let port = free_port();
    let master = Master::start("canary-ok", &with_canary(port, "1500ms"));
    let load = Load::until_finished(loopback(port), Mode::KeepAlive, 4);
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 0, "{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        verdict["duration_ms"].as_u64().unwrap() >= 1500,
        "the verdict waits for the probation: {verdict}"
    );
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
        v["generation"] == 1
    });
    let report = load.finish();
    eprintln!("probation passed under load: {}", report.summary());
    report.assert_lossless("");
    assert!(report.generations.contains_key(&2));
}

#[test]
fn a_generation_whose_probe_fails_during_its_probation_is_rolled_back() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let port = free_port();
    let good = with_canary(port, "5s");
    let master = Master::start("canary-probe", &good);
    // The new generation's health endpoint, played by the test: healthy until told otherwise.
    let health = master.dir.path().join("health.sock");
    let listener = std::os::unix::net::UnixListener::bind(&health).unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let answer: &[u8] = if flag.load(Ordering::SeqCst) {
                b"HTTP/1.0 200 OK\r\n\r\nok\n"
            } else {
                b"HTTP/1.0 503 Service Unavailable\r\n\r\nsick\n"
            };
            let _ = stream.write_all(answer);
        }
    });
    let load = Load::until_finished(loopback(port), Mode::Fresh, 4);
    let mut probed = good.clone();
    probed.it_worker(WorkerMode::ReadyAfter(0));
    probed.worker_extra = vec![format!(
        "ready: {{http: \"{}\", path: /healthz, timeout: 500ms, interval: 100ms}}",
        health.display()
    )];
    master.write_config(&probed.yaml());
    let reload = master.ctl_spawn(&["reload"]);
    master.wait_event(event::CANARY, Duration::from_secs(10), |_| true);
    healthy.store(false, Ordering::SeqCst);
    let out = reload.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rolled back to generation 1"), "{err}");
    assert!(
        err.contains("failed its readiness probe: HTTP status 503"),
        "{err}"
    );
    let report = load.finish();
    report.assert_lossless_with("probe rollback under load", 0);
    report.assert_served_by(&[1]);
}
