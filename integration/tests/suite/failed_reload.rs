//! Failed reloads: the new generation is drained and then killed, the old one keeps serving,
//! nothing is lost.

use baton_integration::event;
use baton_integration::executable;
use baton_integration::loopback;
use std::time::Duration;

use baton_integration::load::{Load, Mode};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, eventually};

#[test]
fn failed_reloads_leave_the_old_generation_serving_without_losing_a_request() {
    let (port, good) = TestConfig::hello_on_a_free_port(2);
    let master = Master::start("failed", &good);
    let load = Load::until_finished(loopback(port), Mode::Fresh, 4);

    let it =
        |mode: WorkerMode, ready_timeout: &'static str| good.it_worker_yaml(mode, ready_timeout);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut with_busy_port = good.clone();
    with_busy_port
        .listeners
        .push(("busy".into(), busy.local_addr().unwrap().to_string()));
    let mut missing_binary = good.clone();
    missing_binary.command = "/nonexistent/worker".into();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "worker exits at start",
            it(WorkerMode::Exit(3), "20s"),
            "exited with status 3 before it was ready",
        ),
        (
            "worker never ready",
            it(WorkerMode::NeverReady, "1s"),
            "was not ready after 1000 ms",
        ),
        ("invalid config", good.yaml() + "bogus: 1\n", "baton.yaml:"),
        (
            "missing worker binary",
            missing_binary.yaml(),
            "/nonexistent/worker does not exist",
        ),
        (
            "port in use",
            with_busy_port.yaml(),
            "address already in use",
        ),
    ];
    for (what, yaml, expected) in cases {
        master.write_config(&yaml);
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_failed", "{what}: {verdict}");
        let reason = verdict["reason"].as_str().unwrap();
        assert!(
            reason.contains(expected),
            "{what}: {reason:?} should contain {expected:?}"
        );
        assert!(
            verdict["message"]
                .as_str()
                .unwrap()
                .contains("generation 1 keeps serving")
        );
        // The failed generation's processes are gone; generation 1's two workers remain.
        eventually(
            Duration::from_secs(10),
            "only generation 1's workers",
            || (master.children().len() == 2).then_some(()),
        );
    }
    master.write_config(&good.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    let report = load.finish();
    eprintln!("under failed reloads: {}", report.summary());
    report.assert_lossless("");
    assert!(report.ok > 100, "{}", report.summary());
    assert!(report.generations.contains_key(&1));
}

/// A systemd-style worker may accept connections before it reports ready (systemd allows it).
/// When its generation fails, what it accepted is finished, not reset: it gets the drain request
/// and signal, and SIGKILL only at `failed_stop_timeout`.
#[test]
fn a_failed_generation_that_served_before_ready_finishes_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let script = executable(dir.path(), "serves-before-ready.py", SERVES_BEFORE_READY_PY);

    let (port, good) = TestConfig::hello_on_a_free_port(2);
    let master = Master::start("failed-served", &good);
    let addr = loopback(port);
    let fresh = Load::until_finished(addr, Mode::Fresh, 3);
    let kept = Load::until_finished(addr, Mode::KeepAlive, 2);
    let mut early = good.clone();
    early.command = script;
    early.ready_timeout = "800ms";
    early.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    master.write_config(&early.yaml());
    for i in 0..20 {
        let verdict = master.reload();
        assert_eq!(verdict["event"], "reload_failed", "reload {i}: {verdict}");
        assert!(
            verdict["reason"]
                .as_str()
                .unwrap()
                .contains("was not ready after 800 ms"),
            "{verdict}"
        );
    }
    let (fresh, kept) = (fresh.finish(), kept.finish());
    eprintln!("fresh: {}", fresh.summary());
    eprintln!("keep-alive: {}", kept.summary());
    fresh.assert_lossless("");
    kept.assert_lossless("");
    // The failing generations did serve (or the test proves nothing): generation 1's answers
    // carry its number, the script's carry none.
    let by_gen_one = fresh.generations.get(&1).copied().unwrap_or(0);
    assert!(
        fresh.ok > by_gen_one,
        "no request reached a failing generation: {}",
        fresh.summary()
    );
    // None of them was killed: each finished when asked.
    assert!(
        master.events(event::WORKER_KILLED).is_empty(),
        "{:?}",
        master.events(event::WORKER_KILLED)
    );
}

const SERVES_BEFORE_READY_PY: &str = r#"#!/usr/bin/env python3
import http.server, select, signal, socket, time

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        # A slow answer: requests are in flight whenever the generation fails.
        time.sleep(0.1)
        body = b"served before ready\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
    log_message = lambda self, *args: None

# Threads the server joins when it closes: what was accepted is finished.
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    def get_request(self):
        # The listener is non-blocking (another process may take a connection first); the
        # connection it gives must not be.
        conn, address = self.socket.accept()
        conn.setblocking(True)
        return conn, address

draining = False
def drain(*_):
    global draining
    draining = True
signal.signal(signal.SIGTERM, drain)
listener = socket.socket(fileno=3)
listener.setblocking(False)
server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = listener
# Never READY=1, but serving. On the drain signal: stop accepting, finish what was accepted.
while not draining:
    if select.select([listener], [], [], 0.05)[0]:
        server._handle_request_noblock()
server.server_close()
"#;
