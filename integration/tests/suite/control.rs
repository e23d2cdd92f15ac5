//! The control plane against a real master with real workers: status, drain-status, reload
//! verdicts, history, stop, authorization, and a control socket that shrugs off bad clients.

use baton_integration::event;
use baton_integration::loopback;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, ctl, eventually, free_port, http};
use nix::sys::signal::Signal;
use serde_json::Value;

/// `baton ARGS -c FILE`: exit code, stdout, stderr.
fn baton_with_file(file: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(&binaries().baton)
        .args(args)
        .arg("-c")
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn slow(port: u16, ms: u32) -> TestConfig {
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.it_worker(WorkerMode::ReadyAfter(ms.into()));
    c
}

#[test]
fn status_answers_during_a_reload_and_json_matches_the_table() {
    let port = free_port();
    let master = Master::start("ctl-status", &slow(port, 1500));
    master.signal(Signal::SIGUSR2);
    master.wait_event(event::RELOAD_STARTED, Duration::from_secs(5), |_| true);
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s = json(&out);
    assert_eq!(s["master"]["state"], "reloading", "{s}");
    assert_eq!(s["master"]["reload"]["generation"], 2);
    assert_eq!(s["master"]["pid"], master.pid());
    let states: Vec<(u64, String)> = s["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["generation"].as_u64().unwrap(),
                g["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(states, [(2, "starting".into()), (1, "serving".into())]);
    // The human table shows the same master, generations, workers and states.
    let (code, table, _) = master.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains(&format!("master pid {}", master.pid())),
        "{table}"
    );
    assert!(
        table.contains("state: reloading (reload 1 -> generation 2"),
        "{table}"
    );
    for g in s["generations"].as_array().unwrap() {
        assert!(
            table.contains(&format!(
                "generation {}  {}",
                g["generation"],
                g["state"].as_str().unwrap()
            )),
            "{table}"
        );
        for w in g["workers"].as_array().unwrap() {
            let row = table
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some(&w["pid"].to_string()))
                .unwrap_or_else(|| panic!("no row for pid {} in\n{table}", w["pid"]));
            assert!(row.contains(w["state"].as_str().unwrap()), "{row}");
            assert!(row.contains(w["program"].as_str().unwrap()), "{row}");
        }
    }
    assert_eq!(master.verdict_of(1)["event"], "reload_succeeded");
}

#[test]
fn drain_status_shows_a_lingering_connection_and_its_shrinking_time_left() {
    let (port, mut c) = TestConfig::hello_on_a_free_port(1);
    c.holding("30s");
    let master = Master::start("ctl-drain", &c);
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    held.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(held.read(&mut buf).unwrap() > 0);
    let (code, out, err) = master.ctl(&["reload", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["ok"], true);
    let draining = |master: &Master| {
        let (code, out, err) = master.ctl(&["drain-status", "--json"]);
        assert_eq!(code, 0, "{err}");
        json(&out)
    };
    // The SDK reports the open connection (at most every 200 ms): wait for it to show.
    let first = eventually(
        Duration::from_secs(5),
        "the draining worker's connection count",
        || {
            let d = draining(&master);
            (d[0]["workers"][0]["connections"] == 1).then_some(d)
        },
    );
    assert_eq!(first[0]["generation"], 1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deadline = first[0]["deadline_unix_ms"].as_u64().unwrap();
    assert!(
        deadline > now_ms && deadline <= now_ms + 30_000,
        "deadline {deadline} vs now {now_ms}"
    );
    assert_eq!(first[0]["workers"][0]["connections_source"], "reported");
    let second = eventually(Duration::from_secs(5), "time to pass", || {
        let d = draining(&master);
        (d[0]["time_left_ms"].as_u64() < first[0]["time_left_ms"].as_u64()).then_some(d)
    });
    assert!(second[0]["time_left_ms"].as_u64().unwrap() <= 30_000);
    let (_, human, _) = master.ctl(&["drain-status"]);
    assert!(human.contains("generation 1  draining"), "{human}");
    assert!(human.contains("1 connection open (reported)"), "{human}");
    assert!(human.contains(", 1 worker left:"), "{human}");
    assert!(
        human.contains("(worker 1, program worker): 1 connection open"),
        "{human}"
    );
    // `--wait` returns once the client lets go.
    let waiting = master.ctl_spawn(&["drain-status", "--wait", "--timeout", "20"]);
    drop(held);
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no generation is draining"));
}

#[test]
fn reload_exits_zero_on_success_and_non_zero_with_the_reason_on_each_failure() {
    let (_, good) = TestConfig::hello_on_a_free_port(1);
    let master = Master::start("ctl-reload", &good);
    let (code, out, _) = master.ctl(&["reload"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("succeeded") && out.contains("generation 2 is serving"),
        "{out}"
    );

    let failing = |mode: WorkerMode, ready: &'static str| good.it_worker_yaml(mode, ready);
    let cases = [
        (good.yaml() + "oops: 1\n", "baton.yaml:"),
        (
            failing(WorkerMode::Exit(4), "10s"),
            "exited with status 4 before it was ready",
        ),
        (
            failing(WorkerMode::NeverReady, "1s"),
            "was not ready after 1000 ms",
        ),
    ];
    for (yaml, expected) in cases {
        master.write_config(&yaml);
        let (code, _, err) = master.ctl(&["reload"]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("failed") && err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
    master.write_config(&good.yaml());
    assert_eq!(master.ctl(&["reload"]).0, 0);
}

#[test]
fn requests_that_coalesce_share_one_verdict_and_signals_are_in_the_history() {
    let port = free_port();
    let master = Master::start("ctl-coalesce", &slow(port, 800));
    let first = master.ctl_spawn(&["reload", "--json"]);
    master.wait_event(event::RELOAD_STARTED, Duration::from_secs(5), |_| true);
    let second = master.ctl_spawn(&["reload", "--json"]);
    let third = master.ctl_spawn(&["reload", "--json"]);
    let verdict = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&String::from_utf8_lossy(&out.stdout))
    };
    let (a, b, c) = (verdict(first), verdict(second), verdict(third));
    assert_eq!(a["reload"], 1);
    assert_eq!(
        b["reload"], 2,
        "queued requests are covered by the follow-up: {b}"
    );
    assert_eq!(b["reload"], c["reload"]);
    assert_eq!(b["generation"], c["generation"]);
    assert_ne!(b["request"], c["request"]);

    // --no-wait answers at once with the id; the verdict can be fetched later.
    let (code, out, err) = master.ctl(&["reload", "--no-wait", "--json"]);
    assert_eq!(code, 0, "{err}");
    let request = json(&out)["request"].as_u64().unwrap().to_string();
    let (code, out, err) = master.ctl(&["reload", "--request", &request, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["reload"], 3);

    // A signal-triggered reload gets the same record, and its verdict can be asked for later.
    master.signal(Signal::SIGUSR2);
    let (_, requested) = master.wait_event(event::RELOAD_REQUESTED, Duration::from_secs(5), |v| {
        v["trigger"]
            .as_str()
            .is_some_and(|t| t.starts_with("SIGUSR2"))
    });
    let request = requested["request"].as_u64().unwrap().to_string();
    let (code, out, err) = master.ctl(&["reload", "--request", &request, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["reload"], 4);
    let (code, out, _) = master.ctl(&["history", "--json"]);
    assert_eq!(code, 0);
    let history = json(&out);
    let records = history.as_array().unwrap();
    assert_eq!(records.len(), 4);
    let first_request = |i: usize| records[i]["requests"][0].as_str().unwrap();
    assert!(first_request(3).contains("SIGUSR2 from pid"), "{history}");
    assert!(
        first_request(0).contains("baton reload from uid 0"),
        "{history}"
    );
    let (_, table, _) = master.ctl(&["history"]);
    assert!(
        table.contains("RELOAD") && table.contains("SIGUSR2"),
        "{table}"
    );
}

#[test]
fn stop_drains_and_the_master_exits_zero() {
    let (_, mut master) = Master::hello("ctl-stop", 2);
    let (code, out, _) = master.ctl(&["stop"]);
    assert_eq!(code, 0);
    assert!(out.contains("stopping"), "{out}");
    assert_eq!(master.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let (code, _, err) = master.ctl(&["status"]);
    assert_eq!(code, 69);
    let fast_port = free_port();
    let mut c = TestConfig::hello(&format!("127.0.0.1:{fast_port}"), 1);
    c.holding("20s");
    let mut fast = Master::start("ctl-stop-fast", &c);
    let _held = TcpStream::connect(("127.0.0.1", fast_port)).unwrap();
    assert_eq!(fast.ctl(&["stop", "--fast"]).0, 0);
    assert_eq!(fast.wait_exit(Duration::from_secs(5)).code(), Some(0));
    assert!(
        !fast.events(event::WORKER_KILLED).is_empty(),
        "--fast kills instead of draining"
    );
    assert!(
        err.contains("no master at") && err.contains("is baton running?"),
        "{err}"
    );
}

/// A master whose control socket any local user can reach (mode 0666), with `read_group`.
fn open_master(name: &str, read_group: Option<&str>) -> Master {
    let port = free_port();
    let mut yaml = TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml();
    yaml = yaml.replace(
        "    socket: \"{dir}/baton.sock\"\n",
        "    socket: \"{dir}/baton.sock\"\n    mode: \"0666\"\n",
    );
    if let Some(group) = read_group {
        yaml += &format!("    read_group: {group}\n");
    }
    let master = Master::spawn(name, &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // Let other users reach the socket inside the (0700) temp dir.
    std::fs::set_permissions(master.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    master
}

#[test]
fn an_unprivileged_user_may_not_change_the_master_and_reads_only_with_the_read_group() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs clients as nobody: it needs root"
    );
    const NOBODY: u32 = 65534;
    let master = open_master("ctl-auth", None);
    for args in [vec!["reload"], vec!["stop"], vec!["status"]] {
        let (code, _, err) = ctl(&master.socket(), &args, Some(NOBODY));
        assert_eq!(code, 77, "{args:?}: {err}");
        assert!(
            err.contains("uid 65534") && err.contains("may not"),
            "{err}"
        );
    }
    // Each denial is logged (a line may trail the client's answer).
    let denied = eventually(
        Duration::from_secs(10),
        "three control_denied lines",
        || {
            let denied = master.events(event::CONTROL_DENIED);
            (denied.len() >= 3).then_some(denied)
        },
    );
    assert_eq!(denied.len(), 3, "each denial is logged once");
    for line in &denied {
        let message = line["message"].as_str().unwrap();
        assert!(
            message.starts_with("control request ") && !message.contains('{'),
            "the request in words, not as Rust debug text: {message}"
        );
    }
    assert!(
        denied[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("control request reload (waiting for the verdict) from uid 65534"),
        "{denied:?}"
    );
    assert!(master.events(event::RELOAD_REQUESTED).is_empty());
    assert!(master.events(event::STOPPING).is_empty());

    let readable = open_master("ctl-read", Some("nogroup"));
    let (code, out, err) = ctl(&readable.socket(), &["status", "--json"], Some(NOBODY));
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["master"]["pid"], readable.pid());
    let (code, _, err) = ctl(&readable.socket(), &["history"], Some(NOBODY));
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&readable.socket(), &["reload"], Some(NOBODY));
    assert_eq!(code, 77, "{err}");
    // With the default mode 0600 the socket itself keeps others out.
    let closed = Master::start(
        "ctl-closed",
        &TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1),
    );
    std::fs::set_permissions(closed.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, _, err) = ctl(&closed.socket(), &["status"], Some(NOBODY));
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn bad_clients_get_an_error_or_a_timeout_and_the_master_stays_healthy() {
    let port = free_port();
    let mut yaml = TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml();
    yaml = yaml.replace(
        "    socket: \"{dir}/baton.sock\"\n",
        "    socket: \"{dir}/baton.sock\"\n    timeout: 1s\n",
    );
    let master = Master::spawn("ctl-bad", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let baseline = master.fd_count();
    let exchange = |bytes: &[u8], half_close: bool| -> Vec<u8> {
        let mut s = UnixStream::connect(master.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        if half_close {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    };
    let error_of = |answer: &[u8]| -> Value {
        let body = baton_proto::control::decode_frame::<Value>(answer)
            .unwrap_or_else(|e| panic!("{e}: {answer:?}"));
        assert_eq!(body["type"], "error", "{body}");
        body
    };
    let frame = |json: &str| {
        let mut f = (json.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f
    };
    let garbage = error_of(&exchange(b"hello, is this the master?\n", true));
    assert!(
        garbage["message"].as_str().unwrap().contains("larger than"),
        "{garbage}"
    );
    let truncated = error_of(&exchange(&[0, 0, 0, 100, b'{', b'"'], true));
    assert!(
        truncated["message"].as_str().unwrap().contains("truncated"),
        "{truncated}"
    );
    let oversized = error_of(&exchange(&(10u32 << 20).to_be_bytes(), false));
    assert!(
        oversized["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{oversized}"
    );
    let version = error_of(&exchange(
        &frame(r#"{"version":9,"body":{"type":"status"}}"#),
        false,
    ));
    assert_eq!(version["kind"], "version", "{version}");
    let unknown = error_of(&exchange(
        &frame(r#"{"version":1,"body":{"type":"rm_rf"}}"#),
        false,
    ));
    assert_eq!(unknown["kind"], "bad_request", "{unknown}");
    // A client that connects and never speaks is closed after the control timeout.
    let mut silent = UnixStream::connect(master.socket()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (code, _, err) = master.ctl(&["status"]);
    assert_eq!(
        code, 0,
        "served while a silent client holds a connection: {err}"
    );
    let mut nothing = Vec::new();
    assert_eq!(
        silent.read_to_end(&mut nothing).unwrap(),
        0,
        "closed without an answer"
    );
    // Healthy: serves, answers, and holds no descriptor of the bad clients.
    let (code, _, err) = master.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    let report = baton_integration::load::requests(loopback(port), 10);
    assert_eq!(report.ok, 10);
    eventually(
        Duration::from_secs(5),
        "the master's fd count back to its baseline",
        || (master.fd_count() == baseline).then_some(()),
    );
    assert!(master.events(event::CONTROL_BAD_REQUEST).len() >= 6);
}

#[test]
fn a_master_speaking_another_protocol_version_is_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let fake = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().unwrap();
        let mut header = [0u8; 4];
        s.read_exact(&mut header).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut body).unwrap();
        let answer = br#"{"version":2,"body":{"type":"status_v2"}}"#;
        s.write_all(&(answer.len() as u32).to_be_bytes()).unwrap();
        s.write_all(answer).unwrap();
    });
    let (code, _, err) = ctl(&path, &["status"], None);
    server.join().unwrap();
    assert_eq!(code, 76, "{err}");
    assert!(
        err.contains("unsupported control protocol version 2"),
        "{err}"
    );
}

#[test]
fn metrics_count_reloads_restarts_and_states_in_the_prometheus_format() {
    let (_, good) = TestConfig::hello_on_a_free_port(2);
    let master = Master::start("ctl-metrics", &good);
    assert_eq!(master.ctl(&["reload"]).0, 0);
    master.write_config(&(good.yaml() + "nonsense: 1\n"));
    assert_eq!(master.ctl(&["reload"]).0, 1);
    master.write_config(&good.yaml());
    // A crash, replaced.
    let victim = master.children()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    master.wait_event(event::WORKER_CRASHED, Duration::from_secs(5), |_| true);
    // Ready, not merely started: 2 workers of generation 1, 2 of generation 2, the replacement.
    eventually(
        Duration::from_secs(10),
        "the replacement to be ready",
        || (master.events(event::WORKER_READY).len() == 5).then_some(()),
    );
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
        v["generation"] == 1
    });
    let (code, text, err) = master.ctl(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "baton_reloads_total{verdict=\"ok\"} 1",
        "baton_reloads_total{verdict=\"failed\"} 1",
        "baton_reload_duration_seconds_count 2",
        "baton_reload_duration_seconds_bucket{le=\"+Inf\"} 2",
        "baton_drain_duration_seconds_count 1",
        "baton_worker_restarts_total 1",
        "baton_generations{state=\"serving\"} 1",
        "baton_generations{state=\"draining\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "{expected:?} missing from\n{text}"
        );
    }
    // The exposition format: comments, or `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        assert!(
            name.starts_with("baton_") && name.chars().all(|c| c.is_ascii_graphic()),
            "{line}"
        );
    }
    let ready_workers = text
        .lines()
        .find(|l| l.starts_with("baton_workers{state=\"ready\"}"))
        .unwrap();
    assert!(ready_workers.ends_with(" 2"), "{ready_workers}");
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn the_metrics_endpoint_serves_over_http_follows_reloads_and_a_busy_port_fails_the_reload() {
    let port = free_port();
    let (first, second) = (free_port(), free_port());
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    config
        .supervisor_extra
        .push(format!("metrics_listen: 127.0.0.1:{first}"));
    let master = Master::start("ctl-metrics-http", &config);
    master.wait_event(event::METRICS_ENDPOINT, Duration::from_secs(5), |v| {
        v["address"] == format!("127.0.0.1:{first}")
    });

    let (status, head, body) = http(first, "GET", "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        body.contains("baton_reloads_total{verdict=\"ok\"} 0\n"),
        "{body}"
    );
    // The same families as `baton metrics`.
    let families = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("# TYPE"))
            .map(String::from)
            .collect()
    };
    let (code, cli, err) = master.ctl(&["metrics"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(families(&body), families(&cli));
    assert_eq!(http(first, "HEAD", "/metrics").2, "", "HEAD: no body");
    assert_eq!(http(first, "GET", "/").0, 404);
    let (status, head, _) = http(first, "POST", "/metrics");
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );

    // Clients that never send a request do not keep others out, and are closed in time.
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", first)).unwrap())
        .collect();
    assert_eq!(http(first, "GET", "/metrics").0, 200);
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut rest = Vec::new();
        // Closed by the server (maybe with a 408 first), not by our timeout.
        let read = s.read_to_end(&mut rest);
        assert!(
            read.is_ok(),
            "a silent client is closed by the master: {read:?}"
        );
    }

    // A reload counts, and moves the endpoint with the configuration.
    assert_eq!(master.reload()["event"], "reload_succeeded");
    assert!(
        http(first, "GET", "/metrics")
            .2
            .contains("baton_reloads_total{verdict=\"ok\"} 1\n")
    );
    let mut moved = config.clone();
    moved.supervisor_extra = vec![format!("metrics_listen: 127.0.0.1:{second}")];
    master.write_config(&moved.yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    assert!(refused(first), "the old endpoint is closed");
    assert!(
        http(second, "GET", "/metrics")
            .2
            .contains("baton_reloads_total{verdict=\"ok\"} 2\n")
    );

    // A port that cannot be bound fails the reload, by name; the endpoint and generation stay.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let mut blocked = config.clone();
    blocked.supervisor_extra = vec![format!("metrics_listen: 127.0.0.1:{busy_port}")];
    master.write_config(&blocked.yaml());
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_failed", "{verdict}");
    let reason = verdict["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "supervisor.metrics_listen: metrics endpoint 127.0.0.1:{busy_port}"
        )),
        "{verdict}"
    );
    let (_, _, text) = http(second, "GET", "/metrics");
    assert!(
        text.contains("baton_reloads_total{verdict=\"failed\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("baton_generations{state=\"serving\"} 1\n"),
        "{text}"
    );

    // Without the setting, the endpoint closes.
    master.write_config(&TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    assert!(refused(second), "no endpoint without metrics_listen");
    master.wait_event(
        event::METRICS_ENDPOINT_CLOSED,
        Duration::from_secs(5),
        |v| v["address"] == format!("127.0.0.1:{second}"),
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_cli_quietly() {
    let (_, master) = Master::hello("ctl-pipe", 1);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // `baton status --json | head -0`: the pipe's reader is gone before baton writes.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["history"],
        &["metrics"],
    ] {
        let out = std::process::Command::new(&binaries().baton)
            .args(args)
            .arg("-s")
            .arg(master.socket())
            .stdout(writer.try_clone().unwrap())
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
}

#[test]
fn a_worker_s_status_text_never_reaches_the_terminal_raw() {
    let port = free_port();
    let evil = "\u{1b}]0;owned\u{7}\u{1b}[2J\rcleared";
    let mut config = slow(port, 0);
    let hex: String = evil.bytes().map(|b| format!("{b:02x}")).collect();
    config.env.push(("IT_STATUS_HEX".into(), hex));
    let master = Master::start("ctl-inject", &config);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // The status line arrives after readiness: wait until the master has it.
    let json_status = eventually(Duration::from_secs(10), "the worker's status line", || {
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let s = json(&out);
        let text = s["generations"][0]["workers"][0]["status"]
            .as_str()?
            .to_string();
        Some(text)
    });
    assert_eq!(json_status, evil, "JSON keeps the exact text");
    let (code, table, err) = master.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    for raw in ['\u{1b}', '\u{7}', '\r'] {
        assert!(
            !table.contains(raw),
            "{raw:?} reached the terminal: {table:?}"
        );
    }
    assert!(
        table.contains(r"\u{1b}]0;owned\u{7}\u{1b}[2J\rcleared"),
        "{table}"
    );
}

#[test]
fn usage_errors_unknown_requests_truncated_frames_and_paths_are_told_plainly() {
    // Usage errors exit 64, as docs/cli.md says; help is an answer.
    let baton = |args: &[&str]| {
        let out = std::process::Command::new(&binaries().baton)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), err)
    };
    assert_eq!(baton(&["--bogus"]).0, Some(64));
    assert_eq!(
        baton(&["status", "-c", "a.yaml", "-s", "b.sock"]).0,
        Some(64)
    );
    assert_eq!(baton(&["--help"]).0, Some(0));

    // A socket path given relative to the configuration is shown as the place it names.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let conf = dir.path().join("conf/baton.yaml");
    let yaml = TestConfig::hello("127.0.0.1:1", 1)
        .yaml()
        .replace("\"{dir}/baton.sock\"", "../run/b.sock")
        .replace("{dir}", dir.path().to_str().unwrap());
    std::fs::write(&conf, yaml).unwrap();
    let (code, err) = baton(&["status", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, Some(69), "{err}");
    let real = std::fs::canonicalize(dir.path())
        .unwrap()
        .join("run/b.sock");
    assert!(
        err.contains(&format!("no master at {}:", real.display())),
        "{err}"
    );

    let (_, master) = Master::hello("ctl-words", 1);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // A request id never handed out: a bad argument (64), not "no master" (69).
    let (code, _, err) = master.ctl(&["reload", "--request", "999"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("no reload request #999 is known"), "{err}");
    // A frame cut short says how much arrived.
    let mut stream = UnixStream::connect(master.socket()).unwrap();
    stream.write_all(&100u32.to_be_bytes()).unwrap();
    stream.write_all(b"{").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains("frame truncated: 1 of 100 bytes"),
        "{answer}"
    );
}

#[test]
fn a_broken_file_does_not_hide_the_running_master_from_reads_and_stop() {
    let (_, master) = Master::hello("ctl-broken", 1);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // The operator is editing the file: it no longer validates.
    let file = master.dir.path().join("baton.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text + "colour: blue\n").unwrap();
    let with_file = |args: &[&str]| baton_with_file(&file, args);
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["history"],
        &["drain-status"],
        &["metrics"],
    ] {
        let (code, out, err) = with_file(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(!out.is_empty(), "{args:?}");
        assert!(err.contains("unknown field `colour`"), "{args:?}: {err}");
    }
    // A reload of a broken file is refused before it reaches the master, with the reason.
    let (code, _, err) = with_file(&["reload"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");
    assert!(master.events(event::RELOAD_REQUESTED).is_empty());
    // And stop still stops.
    let (code, _, err) = with_file(&["stop"]);
    assert_eq!(code, Some(0), "{err}");
    master.wait_event(event::EXITING, Duration::from_secs(30), |_| true);
}

#[test]
fn settings_read_only_at_start_are_named_by_the_reload_and_check_and_the_master_stays_reachable() {
    let (_, config) = TestConfig::hello_on_a_free_port(1);
    let master = Master::start("ctl-start-only", &config);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let dir = master.dir.path().to_path_buf();
    let file = dir.join("baton.yaml");
    // The operator moves the control socket and raises the client limit in the file.
    master.write_config(
        &config
            .yaml()
            .replace("{dir}/baton.sock", "{dir}/moved.sock")
            .replace("  control:\n", "  control:\n    max_clients: 3\n"),
    );
    let (code, out, err) = master.ctl(&["reload"]);
    assert_eq!(code, 0, "{err}");
    let moved = dir.join("moved.sock");
    let socket_change = format!(
        "supervisor.control.socket: {} in the file, {} in the running master (takes effect at the next start)",
        moved.display(),
        master.socket().display()
    );
    assert!(out.contains(&format!("warning: {socket_change}")), "{out}");
    assert!(
        out.contains("supervisor.control.max_clients: 3 in the file, 16 in the running master"),
        "{out}"
    );
    // Commands given the file still reach this master, through a link at the new path.
    let with_file = |args: &[&str]| baton_with_file(&file, args);
    let (code, out, err) = with_file(&["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(json(&out)["master"]["pid"], master.pid());
    // `check` says what a reload would not apply.
    let (code, _, err) = with_file(&["check"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&format!("warning: {socket_change}")), "{err}");
    // The link goes away with the master.
    let (code, _, err) = with_file(&["stop"]);
    assert_eq!(code, Some(0), "{err}");
    master.wait_event(event::EXITING, Duration::from_secs(30), |_| true);
    eventually(Duration::from_secs(10), "the link removed", || {
        (!moved.exists() && std::fs::symlink_metadata(&moved).is_err()).then_some(())
    });
}

/// The kubelet's probes where the metrics endpoint listens (docs/operations.md): `/healthz` is
/// ready only while a generation serves and no stop has begun; `/livez` answers while the
/// master's event loop turns, and not when it is stopped.
#[test]
fn healthz_is_ready_only_while_a_generation_serves_and_livez_only_while_the_loop_turns() {
    let port = free_port();
    let endpoint = free_port();
    let it = binaries().it_worker.display().to_string();
    let yaml = format!(
        r#"listeners:
  - name: http
    address: "127.0.0.1:{port}"
supervisor:
  metrics_listen: "127.0.0.1:{endpoint}"
  runtime_dir: "{{dir}}/run"
  control:
    socket: "{{dir}}/baton.sock"
workers:
  - name: slow
    command: {it}
    env: {{IT_MODE: "ready-after:1500"}}
    processes: 1
  - name: stubborn
    command: {it}
    env: {{IT_MODE: stubborn}}
    processes: 1
    drain_timeout: 3s
"#
    );
    let mut master = Master::spawn("ctl-health", &yaml);
    master.wait_event(event::METRICS_ENDPOINT, Duration::from_secs(10), |_| true);
    // Before the first generation serves.
    let (status, _, body) = http(endpoint, "GET", "/healthz");
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: no generation serves\n")
    );
    assert_eq!(http(endpoint, "GET", "/livez").0, 200);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let (status, head, body) = http(endpoint, "GET", "/healthz");
    assert_eq!(
        (status, body.as_str()),
        (200, "ready: generation 1 serves\n"),
        "{head}"
    );

    // A stopped event loop answers nothing: the probe's client gives up.
    master.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut probe = TcpStream::connect(("127.0.0.1", endpoint)).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    probe
        .write_all(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut got = [0u8; 64];
    let read = probe.read(&mut got);
    master.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(
        read.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "no answer from a stopped master: {read:?}"
    );
    assert_eq!(http(endpoint, "GET", "/livez").0, 200, "alive again");

    // A stop has begun (the stubborn worker keeps it draining for 3 s): not ready any more.
    master.signal(nix::sys::signal::Signal::SIGTERM);
    master.wait_event(event::STOPPING, Duration::from_secs(10), |_| true);
    let (status, _, body) = http(endpoint, "GET", "/healthz");
    assert_eq!((status, body.as_str()), (503, "not ready: stopping\n"));
    assert!(master.wait_exit(Duration::from_secs(20)).success());
}

/// Issue 28: `status -c FILE` with FILE no longer YAML at all (a half-written edit) exited 64
/// with the parse error; it reaches the master at the socket the file still names, as it does
/// for a file that parses but does not validate. `reload` still refuses the file.
#[test]
fn status_reaches_the_master_through_a_file_that_is_not_yaml_any_more() {
    let master = Master::start(
        "broken-yaml",
        &TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1),
    );
    let config = master.dir().join("baton.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let broken = text.replacen("listeners:\n", "listeners:\n  - name: \"half-written\n", 1);
    std::fs::write(&config, &broken).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&binaries().baton)
            .args(args)
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for command in ["status", "history", "drain-status", "metrics"] {
        let (code, out, err) = run(&[command]);
        assert_eq!(code, 0, "{command}: {out}{err}");
        assert!(err.contains("anyway"), "{command} warns: {err}");
    }
    let (code, out, err) = run(&["reload"]);
    assert_eq!(code, 64, "reload refuses the file: {out}{err}");
}

/// The control socket's task dying (a panic: here a fault at `control.accept`) does not lock
/// the operator out: the master serves the socket again from its own copy, and says so
/// (`control_restarted`, with the panic's message). CI twice saw a `baton reload` reset after a
/// test injected EINTR into the master's loop: the socket had no task any more.
#[test]
fn a_panic_of_the_control_socket_s_task_does_not_lock_the_operator_out() {
    let master = Master::spawn_with_env(
        "control-panic",
        &TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 1).yaml(),
        &[("FAILPOINTS", "control.accept=1*return(panic)")],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    // The first client finds the task panicking under it.
    let (code, _, _) = master.ctl(&["status"]);
    assert_ne!(code, 0, "the first client's connection went with the task");
    let (_, restarted) =
        master.wait_event(event::CONTROL_RESTARTED, Duration::from_secs(10), |_| true);
    assert!(
        restarted["message"]
            .as_str()
            .unwrap()
            .contains("it panicked: fault injected at control.accept"),
        "{restarted}"
    );
    for _ in 0..3 {
        let (code, out, err) = master.ctl(&["status"]);
        assert_eq!(code, 0, "{out}{err}");
    }
    let (code, out, err) = master.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
}
