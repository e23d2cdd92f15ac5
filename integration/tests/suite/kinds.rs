//! Every listener kind end to end, what a worker inherits, and reload requests during a slow
//! reload.

use baton_integration::event;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use baton_integration::load::requests;
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, eventually, free_port};
use nix::sys::signal::Signal;

#[test]
fn tcp4_tcp6_and_unix_listeners_are_all_served() {
    let (p4, p6) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let yaml = format!(
        "listeners:\n  - name: v4\n    address: 127.0.0.1:{p4}\n  - name: v6\n    address: \"[::1]:{p6}\"\n    backlog: 64\n  - name: local\n    path: {}\n    mode: \"0600\"\nworker:\n  command: {}\n  processes: 2\nsupervisor:\n  control: {{socket: \"{{dir}}/baton.sock\"}}\n",
        sock.display(),
        binaries().hello_worker.display()
    );
    let master = Master::spawn("kinds", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let addresses: Vec<String> = master
        .events(event::LISTENING)
        .iter()
        .map(|v| v["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        addresses,
        [
            format!("127.0.0.1:{p4}"),
            format!("[::1]:{p6}"),
            sock.display().to_string()
        ]
    );

    assert_eq!(
        requests(format!("127.0.0.1:{p4}").parse().unwrap(), 20).ok,
        20
    );
    assert_eq!(requests(format!("[::1]:{p6}").parse().unwrap(), 20).ok, 20);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for _ in 0..20 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    // `baton status` lists each with its kind and its accept queue, read from the kernel (the
    // Unix one through sock_diag).
    let (code, out, err) = master.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listeners = status["listeners"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = listeners
        .iter()
        .map(|l| (l["name"].as_str().unwrap(), l["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("v4", "tcp"), ("v6", "tcp"), ("local", "unix")]);
    for l in listeners {
        assert_eq!(l["state"], "open", "{l}");
        assert_eq!(l["queue"]["length"], 0, "{l}");
    }
    assert_eq!(listeners[1]["queue"]["max"], 64, "the configured backlog");
    assert_eq!(listeners[1]["backlog"], 64);
    // Across a reload, the Unix socket file stays (same socket), and it is removed at exit.
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap()),
        inode
    );
    let mut master = master;
    master.signal(Signal::SIGTERM);
    assert_eq!(master.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(
        !sock.exists(),
        "the master removes its socket file when it closes it"
    );
}

#[test]
fn a_worker_inherits_stdio_and_its_channel_and_nothing_else() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("fds.txt");
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.it_worker(WorkerMode::ReportFds(report.clone()));
    let master = Master::spawn_with_env(
        "fds",
        &c.yaml(),
        &[("NOTIFY_SOCKET", "/run/systemd/notify")],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(
        text.contains("env NOTIFY_SOCKET=\n"),
        "the master's NOTIFY_SOCKET leaked: {text}"
    );
    assert!(text.contains("env BATON_CHANNEL_FD=3\n"), "{text}");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("env "))
        .map(|l| format!("{l}\n"))
        .collect();
    let fds: BTreeSet<u32> = text
        .lines()
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    // 0-2, the channel at 3, and the descriptor read_dir itself opened to list the directory.
    let channel = text
        .lines()
        .find(|l| l.starts_with("3 "))
        .expect("fd 3 is the channel");
    assert!(channel.contains("socket:["), "{channel}");
    let extra: Vec<&str> = text
        .lines()
        .filter(|l| !["0 ", "1 ", "2 ", "3 "].iter().any(|p| l.starts_with(p)))
        .filter(|l| !l.ends_with("/fd"))
        .collect();
    assert!(
        extra.is_empty(),
        "leaked into the worker: {extra:?} (all: {fds:?})"
    );
    drop(master);
}

#[test]
fn signals_during_a_slow_reload_coalesce_into_one_follow_up_and_are_all_accounted_for() {
    let (_, mut c) = TestConfig::hello_on_a_free_port(1);
    c.it_worker(WorkerMode::ReadyAfter(600));
    let master = Master::start("coalesce", &c);
    let sent = 10;
    let start = Instant::now();
    for i in 1..=sent {
        master.signal(Signal::SIGUSR2);
        // Spaced so the kernel delivers each one (it merges identical pending signals).
        eventually(Duration::from_secs(5), "the request to be logged", || {
            (master.events(event::RELOAD_REQUESTED).len() == i).then_some(())
        });
    }
    let last = master.verdict_of(sent as u64);
    assert_eq!(last["event"], "reload_succeeded");
    let started = master.events(event::RELOAD_STARTED);
    let covers: Vec<String> = started
        .iter()
        .map(|v| v["covers"].as_str().unwrap().to_string())
        .collect();
    eprintln!(
        "{sent} requests in {:?} -> reloads covering {covers:?}",
        start.elapsed()
    );
    assert!(
        started.len() < sent,
        "requests during a reload must coalesce: {covers:?}"
    );
    let all: Vec<String> = covers
        .iter()
        .flat_map(|c| c.split(", ").map(String::from))
        .collect();
    let expected: Vec<String> = (1..=sent).map(|i| format!("#{i}")).collect();
    assert_eq!(all, expected, "each request covered exactly once, in order");
    assert_eq!(
        master.events(event::RELOAD_SUCCEEDED).len(),
        started.len(),
        "every reload has a verdict"
    );
    assert!(master.events(event::RELOAD_QUEUED).len() >= sent - started.len());
}
