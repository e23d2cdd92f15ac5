//! Zero loss under reload: fresh connections and keep-alive clients while the master gets
//! SIGUSR2 every 100 ms, and every reload request accounted for.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode, Report};
use baton_integration::{Master, TestConfig, free_port};
use nix::sys::signal::Signal;

const CLIENTS: usize = 8;
const RUN: Duration = Duration::from_secs(10);
const RELOAD_EVERY: Duration = Duration::from_millis(100);

/// Runs `mode` load for RUN while sending SIGUSR2 every RELOAD_EVERY; returns the load report
/// and the number of signals sent.
fn load_with_reloads(name: &str, mode: Mode) -> (Master, Report, u64) {
    let port = free_port();
    let master = Master::start(name, &TestConfig::hello(&format!("127.0.0.1:{port}"), 2));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let bounds = Bounds {
        clients: CLIENTS,
        duration: RUN + Duration::from_secs(5),
        max_requests_per_client: 200_000,
    };
    let load = Load::start(addr, mode, bounds);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < RUN {
        master.signal(Signal::SIGUSR2);
        sent += 1;
        std::thread::sleep(RELOAD_EVERY);
    }
    // Let the last reload conclude before the load stops, so it runs across all of them.
    master.verdict_of(sent);
    let report = load.finish();
    (master, report, sent)
}

/// Every request is logged once and covered by exactly one reload (or rejected), and every
/// reload that started has a verdict.
fn assert_every_request_accounted_for(master: &Master, sent: u64) {
    let requested: Vec<u64> = master
        .events("reload_requested")
        .iter()
        .map(|v| v["request"].as_u64().unwrap())
        .collect();
    assert_eq!(
        requested,
        (1..=sent).collect::<Vec<_>>(),
        "one log line per signal, in order"
    );
    let mut covered = BTreeSet::new();
    let mut started = Vec::new();
    for v in master.events("reload_started") {
        started.push(v["reload"].as_u64().unwrap());
        for r in v["covers"].as_str().unwrap().split(", ") {
            let r: u64 = r.trim_start_matches('#').parse().unwrap();
            assert!(covered.insert(r), "request #{r} covered twice");
        }
    }
    for v in master.events("reload_rejected") {
        assert!(covered.insert(v["request"].as_u64().unwrap()));
    }
    assert_eq!(
        covered,
        (1..=sent).collect::<BTreeSet<_>>(),
        "every request covered once"
    );
    let concluded: BTreeSet<u64> = master
        .events("reload_succeeded")
        .iter()
        .chain(master.events("reload_failed").iter())
        .map(|v| v["reload"].as_u64().unwrap())
        .collect();
    assert_eq!(
        concluded,
        started.iter().copied().collect(),
        "every reload has a verdict"
    );
    assert!(
        master.events("reload_failed").is_empty(),
        "{:?}",
        master.events("reload_failed")
    );
    eprintln!(
        "{sent} SIGUSR2 sent: {} reloads carried them all out",
        started.len()
    );
}

#[test]
fn fresh_connections_lose_nothing_across_reloads_every_100ms() {
    let (master, report, sent) = load_with_reloads("fresh", Mode::Fresh);
    eprintln!("fresh connections: {}", report.summary());
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(
        report.ok > 1000,
        "the load must be real: {}",
        report.summary()
    );
    assert!(
        report.generations.len() > 5,
        "requests must span many generations: {}",
        report.summary()
    );
    assert_every_request_accounted_for(&master, sent);
}

#[test]
fn keep_alive_clients_lose_nothing_across_reloads_every_100ms() {
    let (master, report, sent) = load_with_reloads("keepalive", Mode::KeepAlive);
    eprintln!("keep-alive: {}", report.summary());
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(
        report.ok > 1000,
        "the load must be real: {}",
        report.summary()
    );
    // Drains really closed kept-alive connections (politely), and clients moved on.
    assert!(report.close_notices > 0, "{}", report.summary());
    assert!(report.generations.len() > 5, "{}", report.summary());
    assert_every_request_accounted_for(&master, sent);
}
