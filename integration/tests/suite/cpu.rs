//! The master is event-driven: no CPU while idle, and none spent on a worker that sends garbage
//! or half-closes its channel.

use std::time::Duration;

use baton_integration::{Master, TestConfig, binaries, free_port};

/// CPU ticks `master` uses over `window`.
fn cpu_over(master: &Master, window: Duration) -> u64 {
    // Measuring a window, not waiting for a condition.
    master.cpu_during(|| std::thread::sleep(window)).0
}

#[test]
fn an_idle_master_uses_no_cpu() {
    let port = free_port();
    let master = Master::start("idle", &TestConfig::hello(&format!("127.0.0.1:{port}"), 2));
    let used = cpu_over(&master, Duration::from_secs(2));
    eprintln!("idle master: {used} ticks in 2 s");
    assert!(
        used <= 2,
        "an idle master must sleep, used {used} ticks in 2 s"
    );
}

#[test]
fn garbage_and_a_half_closed_channel_do_not_make_the_master_spin() {
    let port = free_port();
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    c.command = binaries().it_worker.clone();
    c.env = vec![("IT_MODE".into(), "garbage".into())];
    let master = Master::start("garbage", &c);
    // The hand-written worker got its listeners and was ready (the protocol doc is enough to
    // write one); then it sent garbage and half-closed its channel.
    master.wait_event("worker_protocol_error", Duration::from_secs(10), |_| true);
    let used = cpu_over(&master, Duration::from_secs(2));
    eprintln!("master with misbehaving workers: {used} ticks in 2 s");
    assert!(
        used <= 2,
        "the master spins on a misbehaving worker: {used} ticks in 2 s"
    );
    // And it still does its job: a reload to a good worker succeeds, the bad ones are drained.
    master.write_config(&TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    master.wait_event("generation_exited", Duration::from_secs(30), |v| {
        v["generation"] == 1
    });
}
