//! Readiness as configured: every condition a program names counts, and none it does not.

use baton_integration::event;
use baton_integration::executable;
use std::time::Duration;

use baton_integration::{Master, TestConfig, free_port};

/// `ready: {http: ...}` on a baton-protocol worker is not decoration: its channel says ready at
/// once, but the reload waits for the probe too, and fails when nothing answers it.
#[test]
fn a_probe_configured_for_a_baton_worker_is_honoured() {
    let (port, mut config) = TestConfig::hello_on_a_free_port(1);
    config.ready_timeout = "2s";
    let master = Master::start("ready-probe", &config);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // Nothing listens at the probe's address.
    let nobody = free_port();
    config.worker_extra = vec![format!(
        "ready: {{http: \"127.0.0.1:{nobody}\", path: /healthz, timeout: 200ms, interval: 100ms}}"
    )];
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_failed", "{verdict}");
    let reason = verdict["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not ready after"), "{verdict}");
    // The cause, not only the symptom: what the probe got.
    let cause = format!("its readiness probe at 127.0.0.1:{nobody} failed: connect:");
    assert!(reason.contains(&cause), "{verdict}");
    let (code, out, _) = master.ctl(&["history", "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains(&cause), "{out}");
    let (_, table, _) = master.ctl(&["history"]);
    assert!(table.contains(&cause), "{table}");
    assert!(
        !master
            .events_where(event::WORKER_NOT_READY, |v| v["level"] == "INFO")
            .is_empty(),
        "an info line names the cause"
    );
    // The probe at the worker's own listener answers: the reload succeeds.
    config.worker_extra = vec![format!(
        "ready: {{http: \"127.0.0.1:{port}\", path: /, timeout: 500ms, interval: 100ms}}"
    )];
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
}

/// A systemd-style worker that sends READY=1 before it can serve (gunicorn does): with
/// `ready: {all: [notify, {http: ...}]}` it counts as ready only once the probe answers too.
#[test]
fn all_conditions_wait_for_the_probe_after_an_early_ready() {
    let dir = tempfile::tempdir().unwrap();
    let script = executable(dir.path(), "early-ready.py", EARLY_READY_PY);
    let (_, mut config) = TestConfig::hello_on_a_free_port(1);
    config.command = script;
    config.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    let master = Master::start("ready-all", &config);
    let (_, first) = master.wait_event(event::WORKER_READY, Duration::from_secs(30), |_| true);
    let early = first["ready_ms"].as_u64().unwrap();
    assert!(early < 1_400, "READY=1 alone counts at once: {first}");
    let probe = dir.path().join("probe-{worker}.sock");
    config.worker_extra = vec![
        "protocol: systemd".into(),
        format!(
            "ready: {{all: [notify, {{http: \"{}\", path: /, timeout: 200ms, interval: 100ms}}]}}",
            probe.display()
        ),
    ];
    master.write_config(&config.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let (_, second) = master.wait_event(event::WORKER_READY, Duration::from_secs(1), |v| {
        v["generation"] == 2
    });
    let waited = second["ready_ms"].as_u64().unwrap();
    assert!(waited >= 1_400, "the probe counts too: {second}");
}

/// Issue 28, part 6: a systemd-protocol worker that never sends `READY=1` gets a verdict that
/// says so, quotes what it did send (or says it sent nothing) and hints at the usual cause.
#[test]
fn a_worker_that_never_sends_ready_is_told_what_it_sent_instead() {
    let dir = tempfile::tempdir().unwrap();
    let script = executable(
        dir.path(),
        "loading.py",
        "#!/usr/bin/env python3\nimport os, socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.sendto(b\"STATUS=loading the model\\x1b[31m\", os.environ[\"NOTIFY_SOCKET\"])\ntime.sleep(600)\n",
    );
    let (_, mut config) = TestConfig::hello_on_a_free_port(1);
    let master = Master::start("ready-never", &config);
    config.ready_timeout = "1s";
    config.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    for (command, says) in [
        (
            "/bin/sleep".to_string(),
            "it sent nothing on its notify socket (NOTIFY_SOCKET)",
        ),
        (
            script.display().to_string(),
            "it never sent READY=1 on its notify socket; the last it sent: \"STATUS=loading the model\\u{1b}[31m\"",
        ),
    ] {
        config.command = command.into();
        config.args = vec!["600".into()];
        master.write_config(&config.yaml());
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_failed", "{verdict}");
        let reason = verdict["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("was not ready after 1000 ms"), "{reason}");
        assert!(reason.contains(says), "{reason}");
        if says.starts_with("it sent nothing") {
            assert!(
                reason.contains("`ready: {http: ...}`"),
                "the hint: {reason}"
            );
        }
    }
}

/// Issue 28, part 6: a cause that is final fails the reload at once, with the cause, not at the
/// ready deadline: here the listeners could not be handed to the new worker (a fault at
/// `handoff.send`), with a 30 s `ready_timeout`.
#[test]
fn a_worker_that_cannot_get_its_listeners_fails_the_reload_at_once() {
    let (_, mut config) = TestConfig::hello_on_a_free_port(1);
    config.ready_timeout = "30s";
    // The first worker's handoff passes; the reload's fails.
    let master = Master::spawn_with_env(
        "ready-handoff",
        &config.yaml(),
        &[("FAILPOINTS", "handoff.send=1*off->1*return(error)")],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["ok"], false, "{verdict}");
    let reason = verdict["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(
            "cannot become ready: handing it its listeners failed: fault injected at handoff.send"
        ),
        "{reason}"
    );
    let took = verdict["duration_ms"].as_u64().unwrap();
    assert!(
        took < 10_000,
        "at once, not at the 30 s deadline: {took} ms"
    );
}

const EARLY_READY_PY: &str = r#"#!/usr/bin/env python3
import os, socket, time
path = os.environ["NOTIFY_SOCKET"]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(path)
    s.sendall(b"READY=1")
time.sleep(1.5)
probe = os.environ.get("BATON_PROBE_ADDRESS")
if not probe:
    time.sleep(3600)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(probe)
server.listen(16)
while True:
    conn, _ = server.accept()
    conn.recv(1024)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    conn.close()
"#;
