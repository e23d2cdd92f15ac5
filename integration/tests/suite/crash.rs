//! Serving workers that die are replaced in their generation, with backoff for crash loops.

use baton_integration::event;
use baton_integration::loopback;
use std::time::Duration;

use baton_integration::load::requests;
use baton_integration::procfs::zombies;
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn a_killed_worker_is_replaced_in_the_same_generation() {
    let (port, master) = Master::hello("crash", 2);
    let victim = master.events(event::WORKER_READY)[0]["pid"]
        .as_u64()
        .unwrap() as u32;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let (_, crashed) = master.wait_event(event::WORKER_CRASHED, Duration::from_secs(5), |_| true);
    assert!(
        crashed["message"]
            .as_str()
            .unwrap()
            .contains("killed by SIGKILL"),
        "{crashed}"
    );
    // The two first workers, then the replacement.
    let replaced = eventually(Duration::from_secs(10), "a replacement worker", || {
        master.events(event::WORKER_READY).get(2).cloned()
    });
    assert_ne!(replaced["pid"].as_u64(), Some(victim as u64));
    assert_eq!(
        replaced["generation"], 1,
        "replaced within generation 1, no reload"
    );
    eventually(Duration::from_secs(5), "two workers again", || {
        (master.children().len() == 2).then_some(())
    });
    assert!(
        zombies(master.pid()).is_empty(),
        "the dead worker was reaped"
    );
    assert!(master.events(event::RELOAD_STARTED).is_empty());
    let report = requests(loopback(port), 20);
    assert_eq!(report.ok, 20, "{}", report.summary());
}

#[test]
fn a_crash_looping_worker_is_restarted_with_doubling_backoff() {
    let (_, mut c) = TestConfig::hello_on_a_free_port(1);
    c.it_worker(WorkerMode::CrashAfter(30));
    let mut master = Master::start("crashloop", &c);
    eventually(Duration::from_secs(20), "five crashes", || {
        (master.events(event::WORKER_CRASHED).len() >= 5).then_some(())
    });
    let delays: Vec<u64> = master
        .events(event::WORKER_CRASHED)
        .iter()
        .take(5)
        .map(|v| v["restart_in_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(
        delays,
        [100, 200, 400, 800, 1600],
        "exponential backoff from restart_backoff"
    );
    assert!(
        master.is_running(),
        "a crash loop never takes the master down"
    );
    assert!(zombies(master.pid()).is_empty());
}
