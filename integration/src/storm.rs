//! A storm of reload signals under load: used by the test suite (which asserts on it) and by
//! `reload-bench` (which prints it).

use crate::event;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::load::{Load, Mode, Report};
use crate::{Master, TestConfig, eventually, free_port, procfs};

/// What a storm did.
#[derive(Debug)]
pub struct Storm {
    /// SIGUSR2 sent, and how long sending them took.
    pub signals: usize,
    pub sending: Duration,
    /// Reload requests the master logged (signals that arrive together merge into one).
    pub requested: usize,
    /// Reloads the master ran for them (a request that arrives while one is pending joins it).
    pub reloads: usize,
    /// From the first signal until every request had its verdict and one generation serves.
    pub settled: Duration,
    /// The most worker processes seen alive at once.
    pub most_workers: usize,
    pub report: Report,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub zombies: usize,
}

/// `signals` SIGUSR2, 1.5 ms apart, to a master with `processes` workers and `max_draining =
/// cap`, under fresh-connection load from `clients` clients. Panics if a logged reload request
/// is not accounted for by a verdict.
pub fn storm(cap: usize, processes: usize, signals: usize, clients: usize) -> Storm {
    let port = free_port();
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), processes);
    c.max_draining = cap;
    let master = Arc::new(Master::start("storm", &c));
    let addr = crate::loopback(port);
    let load = Load::until_finished(addr, Mode::Fresh, clients);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (master, stop) = (master.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::SeqCst) {
                most = most.max(master.children().len());
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    let rss_before_kib = procfs::rss_kib(master.pid());
    let start = Instant::now();
    for _ in 0..signals {
        master.signal(Signal::SIGUSR2);
        std::thread::sleep(Duration::from_micros(1500));
    }
    let sending = start.elapsed();
    eventually(Duration::from_secs(30), "the storm to settle", || {
        let requested = master.events(event::RELOAD_REQUESTED).len();
        let verdicts = master.events(event::RELOAD_SUCCEEDED).len()
            + master.events(event::RELOAD_FAILED).len();
        let started = master.events(event::RELOAD_STARTED).len();
        (requested > 0 && verdicts == started && master.children().len() == processes).then_some(())
    });
    let settled = start.elapsed();
    let report = load.finish();
    stop.store(true, Ordering::SeqCst);
    let most_workers = sampler.join().unwrap();
    let reloads = master.assert_logged_requests_accounted_for();
    Storm {
        signals,
        sending,
        requested: master.events(event::RELOAD_REQUESTED).len(),
        reloads,
        settled,
        most_workers,
        report,
        rss_before_kib,
        rss_after_kib: procfs::rss_kib(master.pid()),
        zombies: procfs::zombies(master.pid()).len(),
    }
}
