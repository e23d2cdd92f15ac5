//! Storms and chaos under load: many reloads at once, workers killed at random.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_integration::load::{Load, Mode};
use baton_integration::loopback;
use baton_integration::procfs::zombies;
use baton_integration::storm::storm;
use baton_integration::{Master, TestConfig, eventually, free_port};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn a_storm_of_500_sigusr2_in_a_second_loses_nothing_and_settles() {
    const CAP: usize = 3;
    const PROCESSES: usize = 2;
    let s = storm(CAP, PROCESSES, 500, 8);
    eprintln!(
        "{} SIGUSR2 in {:?}: {} logged requests, {} reloads, settled in {:?}; most live workers {}; master RSS {} -> {} KiB; {}",
        s.signals,
        s.sending,
        s.requested,
        s.reloads,
        s.settled,
        s.most_workers,
        s.rss_before_kib,
        s.rss_after_kib,
        s.report.summary()
    );
    assert!(
        s.rss_after_kib < s.rss_before_kib + 16 * 1024,
        "memory must stay bounded: {} -> {} KiB",
        s.rss_before_kib,
        s.rss_after_kib
    );
    s.report.assert_lossless("");
    assert!(
        s.most_workers <= (CAP + 1) * PROCESSES,
        "{} live workers: more than cap + 1 generations",
        s.most_workers
    );
    assert!(s.reloads < s.requested, "a storm must coalesce");
    assert_eq!(s.zombies, 0);
}

#[test]
fn chaos_reloads_every_200ms_and_random_kills_lose_only_requests_on_killed_workers() {
    const CLIENTS: usize = 8;
    let port = free_port();
    let master = Arc::new(Master::start(
        "chaos",
        &TestConfig::hello(&format!("127.0.0.1:{port}"), 3),
    ));
    let baseline_fds = master.fd_count();
    let load = Load::until_finished(loopback(port), Mode::Fresh, CLIENTS);
    let kills = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tick = 0u64;
    while start.elapsed() < Duration::from_secs(30) {
        master.signal(Signal::SIGUSR2);
        if tick % 2 == 1 {
            // A pseudo-random live worker, SIGKILLed.
            let workers = master.children();
            if !workers.is_empty() {
                let victim = workers[(tick as usize * 7919) % workers.len()];
                if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
                    kills.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(200)); // the cadence under test
    }
    let report = load.finish();
    let kills = kills.load(Ordering::SeqCst);
    eprintln!(
        "chaos: {} reload requests, {kills} kills: {}",
        tick,
        report.summary()
    );
    // Each killed worker can take down at most the requests it was serving: one per client.
    assert!(
        report.failed() <= (kills * CLIENTS) as u64,
        "{} failed for {kills} kills: {}",
        report.failed(),
        report.summary()
    );
    assert!(report.ok > 1000, "{}", report.summary());
    // The serving generation is restored, nothing is left unreaped, no descriptor leaked.
    eventually(
        Duration::from_secs(30),
        "three workers serving again",
        || (master.children().len() == 3 && zombies(master.pid()).is_empty()).then_some(()),
    );
    eventually(
        Duration::from_secs(30),
        "the master's fd count back to its baseline",
        || (master.fd_count() == baseline_fds).then_some(()),
    );
    let r = baton_integration::load::requests(loopback(port), 20);
    assert_eq!(r.ok, 20, "{}", r.summary());
}
