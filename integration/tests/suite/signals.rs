//! The master's signals: which ones it handles, and that no stray one kills it.

use baton_integration::event;
use baton_integration::loopback;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use baton_integration::load::requests;
use baton_integration::procfs::{alive, socket_inodes};
use baton_integration::{Master, TestConfig, eventually, free_port};
use nix::sys::signal::Signal;

/// The master's signal masks from /proc: (ignored, caught).
fn masks(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    (field("SigIgn:"), field("SigCgt:"))
}

fn bit(signal: Signal) -> u64 {
    1 << (signal as i32 - 1)
}

#[test]
fn usr1_hup_and_pipe_do_not_kill_the_master() {
    let (port, mut master) = Master::hello("signals", 1);
    let (ignored, caught) = masks(master.pid());
    assert_ne!(ignored & bit(Signal::SIGPIPE), 0, "SIGPIPE must be ignored");
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGCHLD,
    ] {
        assert_ne!(caught & bit(s), 0, "{s} must be handled");
    }
    master.signal(Signal::SIGPIPE);
    master.signal(Signal::SIGUSR1);
    master.wait_event(event::REOPEN_LOGS, Duration::from_secs(5), |_| true);
    // SIGHUP reloads (a round trip: the master is alive and well after all three).
    master.signal(Signal::SIGHUP);
    let (_, requested) =
        master.wait_event(event::RELOAD_REQUESTED, Duration::from_secs(5), |_| true);
    assert!(requested["trigger"].as_str().unwrap().starts_with("SIGHUP"));
    let verdict = master.verdict_of(requested["request"].as_u64().unwrap());
    assert_eq!(verdict["event"], "reload_succeeded");
    assert!(master.is_running());
    let report = requests(loopback(port), 10);
    assert_eq!(report.ok, 10, "{}", report.summary());
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    for (name, signal) in [("term", Signal::SIGTERM), ("int", Signal::SIGINT)] {
        let port = free_port();
        let mut master = Master::start(name, &TestConfig::hello(&format!("127.0.0.1:{port}"), 2));
        let workers = master.children();
        let sockets = |pid| socket_inodes(pid).len();
        let before: Vec<usize> = workers.iter().map(|&p| sockets(p)).collect();
        // A request that is still in flight when the stop arrives.
        let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
        slow.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        slow.write_all(b"GET /?delay_ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        eventually(
            Duration::from_secs(5),
            "a worker to accept the slow request",
            || {
                workers
                    .iter()
                    .zip(&before)
                    .any(|(&p, &n)| sockets(p) > n)
                    .then_some(())
            },
        );
        master.signal(signal);
        master.wait_event(event::STOPPING, Duration::from_secs(5), |_| true);
        let mut response = String::new();
        slow.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{name}: in-flight request lost: {response:?}"
        );
        assert!(
            response.to_ascii_lowercase().contains("connection: close"),
            "{response}"
        );
        let status = master.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{name}");
        assert!(
            workers.iter().all(|&pid| !alive(pid)),
            "{name}: workers must be gone"
        );
    }
}

#[test]
fn sigquit_stops_fast() {
    let (port, mut c) = TestConfig::hello_on_a_free_port(2);
    c.holding("20s");
    let mut master = Master::start("quit", &c);
    let workers = master.children();
    let _held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    master.signal(Signal::SIGQUIT);
    let status = master.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(workers.iter().all(|&pid| !alive(pid)));
    assert!(!master.events(event::WORKER_KILLED).is_empty());
}
