//! Zero loss under reload: fresh connections and keep-alive clients while the master gets
//! SIGUSR2 every 100 ms, and every reload request accounted for.

use baton_integration::event;
use baton_integration::loopback;
use std::time::Duration;

use baton_integration::load::{Mode, Report};
use baton_integration::{Master, TestConfig, free_port};

const CLIENTS: usize = 8;
const RUN: Duration = Duration::from_secs(10);
const RELOAD_EVERY: Duration = Duration::from_millis(100);

fn load_with_reloads(name: &str, mode: Mode) -> (Master, Report, u64) {
    let port = free_port();
    let master = Master::start(name, &TestConfig::hello(&format!("127.0.0.1:{port}"), 2));
    let addr = loopback(port);
    let (report, sent) = master.reload_under_load(addr, mode, CLIENTS, RUN, RELOAD_EVERY);
    (master, report, sent)
}

#[test]
fn fresh_connections_lose_nothing_across_reloads_every_100ms() {
    let (master, report, sent) = load_with_reloads("fresh", Mode::Fresh);
    report.assert_lossless_with("fresh connections", 1000);
    assert!(
        report.generations.len() > 5,
        "requests must span many generations: {}",
        report.summary()
    );
    let reloads = master.assert_every_request_accounted_for(sent);
    eprintln!("{sent} SIGUSR2 sent: {reloads} reloads carried them all out");
    assert_every_generation_drained_by_itself(&master);
}

#[test]
fn keep_alive_clients_lose_nothing_across_reloads_every_100ms() {
    let (master, report, sent) = load_with_reloads("keepalive", Mode::KeepAlive);
    report.assert_lossless_with("keep-alive", 1000);
    // Drains really closed kept-alive connections (politely), and clients moved on.
    assert!(report.close_notices > 0, "{}", report.summary());
    assert!(report.generations.len() > 5, "{}", report.summary());
    let reloads = master.assert_every_request_accounted_for(sent);
    eprintln!("{sent} SIGUSR2 sent: {reloads} reloads carried them all out");
    assert_every_generation_drained_by_itself(&master);
}

/// No worker was killed (at its drain deadline or by `max_draining`): every old generation
/// finished and exited by itself. A worker that missed its drain request would serve on, and
/// its kill would lose what it held only now and then; this sees it every time.
fn assert_every_generation_drained_by_itself(master: &Master) {
    let killed = master.events(event::WORKER_KILLED);
    assert!(killed.is_empty(), "workers killed: {killed:?}");
}
