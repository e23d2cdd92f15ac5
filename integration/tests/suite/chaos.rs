//! Storms and chaos under load: many reloads at once, workers killed at random.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_integration::load::{Load, Mode};
use baton_integration::procfs::zombies;
use baton_integration::{Master, TestConfig, eventually, free_port};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Samples the master's live children until stopped; returns the most seen.
fn sampler(master: &Arc<Master>) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (m, s) = (master.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let mut most = 0;
        while !s.load(Ordering::SeqCst) {
            most = most.max(m.children().len());
            std::thread::sleep(Duration::from_millis(2));
        }
        most
    });
    (stop, handle)
}

#[test]
fn a_storm_of_500_sigusr2_in_a_second_loses_nothing_and_settles() {
    const CAP: usize = 3;
    const PROCESSES: usize = 2;
    let port = free_port();
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), PROCESSES);
    c.max_draining = CAP;
    let master = Arc::new(Master::start("storm", &c));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let load = Load::until_finished(addr, Mode::Fresh, 8);
    let (stop, most) = sampler(&master);
    let rss_before = baton_integration::procfs::rss_kib(master.pid());
    let start = Instant::now();
    for _ in 0..500 {
        master.signal(Signal::SIGUSR2);
        std::thread::sleep(Duration::from_micros(1500));
    }
    let storm = start.elapsed();
    // Everything settles: every logged request has its verdict, one generation serves.
    eventually(Duration::from_secs(30), "the storm to settle", || {
        let requested = master.events("reload_requested").len();
        let verdicts =
            master.events("reload_succeeded").len() + master.events("reload_failed").len();
        let started = master.events("reload_started").len();
        (requested > 0 && verdicts == started && master.children().len() == PROCESSES).then_some(())
    });
    let report = load.finish();
    stop.store(true, Ordering::SeqCst);
    let most = most.join().unwrap();
    let reloads = master.assert_logged_requests_accounted_for();
    let rss_after = baton_integration::procfs::rss_kib(master.pid());
    eprintln!("master RSS: {rss_before} KiB before the storm, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory must stay bounded: {rss_before} -> {rss_after} KiB"
    );
    eprintln!(
        "500 SIGUSR2 in {storm:?}: {} logged requests, {reloads} reloads; most live workers {most}; {}",
        master.events("reload_requested").len(),
        report.summary()
    );
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(
        most <= (CAP + 1) * PROCESSES,
        "{most} live workers: more than cap + 1 generations"
    );
    assert!(
        reloads < master.events("reload_requested").len(),
        "a storm must coalesce"
    );
    assert!(zombies(master.pid()).is_empty());
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
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let load = Load::until_finished(addr, Mode::Fresh, CLIENTS);
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
    let r = baton_integration::load::requests(addr, 20);
    assert_eq!(r.ok, 20, "{}", r.summary());
}
