//! Memory during a reload: 8 workers that each hold 200 MiB, reloaded all at once and rolling
//! (batches of 1 and 2). The sum of the workers' resident memory is sampled every few
//! milliseconds from /proc from the signal until the old generation is gone: its peak against
//! the steady state, and the time to the verdict and to the old generation's end.

use baton_integration::event;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton_integration::worker_mode::WorkerMode;
use baton_integration::{Master, TestConfig, binaries, free_port, procfs};

const WORKERS: usize = 8;
const HOLD_MIB: u64 = 200;

struct Run {
    steady_kib: u64,
    peak_kib: u64,
    most_processes: usize,
    verdict_ms: u64,
    settled: Duration,
}

/// The workers' total RSS (KiB) and their number, now.
fn workers_rss(master: u32) -> (u64, usize) {
    let pids = procfs::children_now(master);
    let rss: Vec<u64> = pids
        .iter()
        .filter(|&&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "it-worker")
        })
        .map(|&p| procfs::rss_kib(p))
        .collect();
    (rss.iter().sum(), rss.iter().filter(|&&k| k > 0).count())
}

fn run(strategy: &str) -> Run {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), WORKERS);
    config.command = binaries().it_worker.clone();
    config.env = vec![
        WorkerMode::ReadyAfter(0).env(),
        ("IT_HOLD_MIB".into(), HOLD_MIB.to_string()),
    ];
    config.ready_timeout = "60s";
    config.worker_extra.push(format!("reload: {strategy}"));
    let master = Master::start("bench-memory", &config);
    let pid = master.pid();
    let steady_kib = workers_rss(pid).0;
    let (stop, peak, most) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let sampler = {
        let (stop, peak, most) = (stop.clone(), peak.clone(), most.clone());
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                let (rss, n) = workers_rss(pid);
                peak.fetch_max(rss, Ordering::Relaxed);
                most.fetch_max(n as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2)); // the sampling period
            }
        })
    };
    let start = Instant::now();
    let verdict = master.reload();
    assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(120), |v| {
        v["generation"] == 1
    });
    let settled = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    Run {
        steady_kib,
        peak_kib: peak.load(Ordering::Relaxed),
        most_processes: most.load(Ordering::Relaxed) as usize,
        verdict_ms: verdict["took_ms"].as_u64().unwrap_or(0),
        settled,
    }
}

pub(crate) fn report() {
    eprintln!("memory during a reload: {WORKERS} workers of {HOLD_MIB} MiB ...");
    println!(
        "## Memory during a reload: {WORKERS} workers that each hold {HOLD_MIB} MiB\n\n\
         The workers' resident memory summed from /proc every 2 ms, from the signal until the old \
         generation is gone; one reload each, in one run.\n"
    );
    println!(
        "| strategy | steady | peak | peak / steady | most workers alive | signal to verdict | signal to old generation gone |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, strategy) in [
        ("all at once", "{strategy: all-at-once}"),
        ("rolling, batch 1", "{strategy: rolling, batch: 1}"),
        ("rolling, batch 2", "{strategy: rolling, batch: 2}"),
    ] {
        let r = run(strategy);
        let gib = |kib: u64| kib as f64 / 1024.0 / 1024.0;
        println!(
            "| {name} | {:.2} GiB | {:.2} GiB | {:.2} | {} | {} ms | {} ms |",
            gib(r.steady_kib),
            gib(r.peak_kib),
            r.peak_kib as f64 / r.steady_kib.max(1) as f64,
            r.most_processes,
            r.verdict_ms,
            r.settled.as_millis()
        );
    }
    println!();
}
