//! The master is event-driven: no CPU while idle, and none spent on a worker that sends garbage
//! or half-closes its channel. Measured from /proc/<master>/task/*/schedstat (nanoseconds).

use baton_integration::event;
use std::time::Duration;

use baton_integration::procfs::cpu_ns;
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig};

/// CPU nanoseconds `master` uses over `window`.
fn cpu_over(master: &Master, window: Duration) -> u64 {
    let before = cpu_ns(master.pid());
    std::thread::sleep(window); // measuring a window, not waiting for a condition
    cpu_ns(master.pid()) - before
}

const WINDOW: Duration = Duration::from_secs(10);
const BOUND_NS: u64 = 10_000_000; // 10 ms over 10 s

#[test]
fn an_idle_master_uses_no_cpu() {
    let (_, master) = Master::hello("idle", 2);
    let used = cpu_over(&master, WINDOW);
    eprintln!("idle master: {} µs of CPU in 10 s", used / 1000);
    assert!(
        used < BOUND_NS,
        "an idle master must sleep: {} µs in 10 s",
        used / 1000
    );
}

#[test]
fn garbage_and_a_half_closed_channel_do_not_make_the_master_spin() {
    let (port, mut c) = TestConfig::hello_on_a_free_port(2);
    c.it_worker(WorkerMode::Garbage);
    let master = Master::start("garbage", &c);
    // The hand-written worker got its listeners and was ready (the protocol doc is enough to
    // write one); then it sent garbage and half-closed its channel.
    master.wait_event(
        event::WORKER_PROTOCOL_ERROR,
        Duration::from_secs(10),
        |_| true,
    );
    let used = cpu_over(&master, WINDOW);
    eprintln!(
        "master with misbehaving workers: {} µs of CPU in 10 s",
        used / 1000
    );
    assert!(
        used < BOUND_NS,
        "the master spins on a misbehaving worker: {} µs in 10 s",
        used / 1000
    );
    // And it still does its job: a reload to a good worker succeeds, the bad ones are drained.
    master.write_config(&TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(30), |v| {
        v["generation"] == 1
    });
}
