//! A stall of the master is not a failure of the workers (issue 28, part 3). The master is
//! stopped (`SIGSTOP`) for a sweep of lengths around each window it judges, then continued:
//! what the workers sent meanwhile (heartbeats, `READY=1`) sits in their sockets, and must be
//! taken in before any deadline is judged (`crates/baton-core/src/master/stall.rs`).

use baton_integration::event;
use std::time::{Duration, Instant};

use baton_integration::procfs::{self, children};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, eventually, free_port};
use nix::sys::signal::Signal;

/// Stops the master for `length`, then continues it. The stall is the stimulus, so it is a
/// plain sleep: the test waits for conditions with deadlines everywhere else.
fn stall(master: &Master, length: Duration) {
    master.signal(Signal::SIGSTOP);
    eventually(Duration::from_secs(5), "the master stopped", || {
        procfs::stopped(master.pid()).then_some(())
    });
    std::thread::sleep(length);
    master.signal(Signal::SIGCONT);
}

/// Seven workers with a 1 s heartbeat window, the master stopped for 0.5 to 3 s (around the
/// window and the old 500 ms lateness rule, which let stalls of 0.8 to 1.2 s through): no
/// worker is judged silent, none is replaced.
#[test]
fn a_stall_of_the_master_around_the_heartbeat_window_replaces_no_worker() {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 7);
    config
        .worker_extra
        .push("liveness: {watchdog: 1s, kill_after: 1s}".into());
    let master = Master::start("stall-liveness", &config);
    let workers = master.children();
    assert_eq!(workers.len(), 7);
    for ms in [500, 800, 900, 1000, 1100, 1200, 1500, 3000] {
        stall(&master, Duration::from_millis(ms));
        // Two windows after the stall: a worker judged silent would be reported by then.
        let after = Instant::now();
        eventually(
            Duration::from_secs(10),
            "two windows after the stall",
            || (after.elapsed() >= Duration::from_secs(2)).then_some(()),
        );
        assert!(
            master.events(event::WORKER_UNHEALTHY).is_empty(),
            "after a {ms} ms stall: {:?}",
            master.events(event::WORKER_UNHEALTHY)
        );
        assert_eq!(master.children(), workers, "after a {ms} ms stall");
    }
}

/// A reload whose workers (systemd protocol, `READY=1` 500 ms after they start) became ready
/// while the master was stopped for 1 to 11 s, around and far past their 2 s `ready_timeout`:
/// every reload succeeds.
#[test]
fn a_stall_of_the_master_during_a_reload_fails_no_reload_whose_workers_became_ready() {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 2);
    config.it_worker(WorkerMode::ReadyAfter(500));
    config.ready_timeout = "2s";
    config.drain_timeout = "5s";
    config.worker_extra = vec!["protocol: systemd".into(), "ready: notify".into()];
    let master = Master::start("stall-reload", &config);
    for ms in [1000, 1900, 2100, 3000, 11000] {
        let before = master.children();
        let reload = master.ctl_spawn(&["reload", "--json"]);
        // The new workers run: the master is stopped before they report ready.
        let started = Instant::now();
        eventually(Duration::from_secs(10), "the new workers started", || {
            let now = children(master.pid());
            (now.iter().filter(|p| !before.contains(p)).count() >= 2).then_some(())
        });
        stall(&master, Duration::from_millis(ms));
        let out = reload.wait_with_output().unwrap();
        let verdict = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "after a {ms} ms stall begun {} ms into the reload: {verdict}{}",
            started.elapsed().as_millis(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(master.events(event::RELOAD_FAILED).is_empty());
}
