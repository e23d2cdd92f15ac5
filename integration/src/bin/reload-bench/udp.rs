//! Datagrams across reloads: a UDP echo worker (`it-worker`, `udp-echo`) on one `kind: udp`
//! listener, 8 clients sending a numbered datagram every millisecond each while the master
//! reloads every 100 ms: datagrams lost and answered twice, per million.

use baton_integration::event;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_integration::datagrams::udp_clients;
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, free_port};
use nix::sys::signal::Signal;

pub(crate) fn report(seconds: u64) {
    eprintln!("UDP echo under reloads every 100 ms ...");
    let port = free_port();
    let mut config = TestConfig::hello("127.0.0.1:1", 2);
    config.it_worker(WorkerMode::UdpEcho);
    config.max_draining = 16;
    let yaml = config.yaml();
    let worker = yaml.find("worker:").unwrap();
    let yaml = format!(
        "listeners:\n  - name: dns\n    address: \"127.0.0.1:{port}\"\n    kind: udp\n{}",
        &yaml[worker..]
    );
    let master = Master::spawn("bench-udp", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        std::thread::spawn(move || udp_clients(port, 8, Duration::from_millis(1), stop))
    };
    let start = Instant::now();
    let mut signals = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        master.signal(Signal::SIGUSR2);
        signals += 1;
        std::thread::sleep(Duration::from_millis(100)); // the reload cadence under test
    }
    let reloads = master.events(event::RELOAD_STARTED).len();
    stop.store(true, Ordering::Relaxed);
    let seen = clients.join().unwrap();
    let per_million = |n: u64| n as f64 * 1e6 / seen.sent.max(1) as f64;
    println!(
        "## Datagrams across reloads: UDP echo, 8 clients at 1000 datagrams/s each, SIGUSR2 every 100 ms for {seconds} s\n"
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| datagrams sent | {} |", seen.sent);
    println!("| reloads run ({signals} SIGUSR2) | {reloads} |");
    println!(
        "| lost (never answered) | {} ({:.1} per million) |",
        seen.lost(),
        per_million(seen.lost())
    );
    println!(
        "| answered twice | {} ({:.1} per million) |\n",
        seen.duplicated(),
        per_million(seen.duplicated())
    );
}
