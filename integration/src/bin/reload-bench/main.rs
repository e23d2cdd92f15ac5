//! `reload-bench`: reload latency and requests lost under reload, measured on this machine.
//!
//! ```text
//! cargo run --release -p baton-integration --bin reload-bench [-- --reloads 100 --seconds 10]
//! ```
//!
//! Prints a Markdown report (see `docs/benchmarks.md`) and exits 1 if baton lost a request in a
//! scenario where it must lose none. Loopback only; every phase is bounded in count and time.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::exit)] // a report on stdout; 64 on bad usage

use baton_integration::event;
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode, Report};
use baton_integration::storm::storm;
use baton_integration::{Master, TestConfig, binaries, free_port, procfs, start_socket_activated};
use nix::sys::signal::Signal;

mod cost;
mod memory;
mod output;
mod scale;
mod udp;

struct Args {
    reloads: usize,
    seconds: u64,
    clients: usize,
    /// `--only output,cost,scale,idle,memory,udp`: those sections alone, in that order.
    only: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        reloads: 1000,
        seconds: 10,
        clients: 8,
        only: Vec::new(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse().ok());
        match (pair[0].as_str(), value) {
            ("--reloads", Some(v)) => a.reloads = v,
            ("--seconds", Some(v)) => a.seconds = v as u64,
            ("--clients", Some(v)) => a.clients = v,
            ("--only", _)
                if pair.get(1).is_some_and(|s| {
                    s.split(',').all(|part| {
                        ["output", "cost", "scale", "idle", "memory", "udp"].contains(&part)
                    })
                }) =>
            {
                a.only = pair[1].split(',').map(str::to_string).collect();
            }
            _ => {
                eprintln!(
                    "usage: reload-bench [--reloads N] [--seconds S] [--clients C] [--only output,cost,scale,idle,memory,udp]"
                );
                std::process::exit(64);
            }
        }
    }
    a
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Reload latency: SIGUSR2 → new generation serving, and → old generation gone, one reload at a
/// time, under a light fresh-connection load.
fn latency(reloads: usize) -> (Vec<Duration>, Vec<Duration>, Report) {
    let port = free_port();
    let master = Master::start(
        "bench-latency",
        &TestConfig::hello(&format!("127.0.0.1:{port}"), 2),
    );
    let addr = baton_integration::loopback(port);
    let bounds = Bounds {
        clients: 2,
        duration: Duration::from_secs(600),
        max_requests_per_client: u64::MAX,
    };
    let load = Load::start(addr, Mode::Fresh, bounds);
    let (mut serving, mut gone) = (Vec::new(), Vec::new());
    for i in 1..=reloads as u64 {
        let sent = Instant::now();
        master.signal(Signal::SIGUSR2);
        let verdict = master.verdict_of(i);
        assert_eq!(verdict["event"], "reload_succeeded", "{verdict}");
        let (at, _) = master.wait_event(event::RELOAD_SUCCEEDED, Duration::from_secs(30), |v| {
            v["reload"] == i
        });
        serving.push(at.duration_since(sent));
        let old = i; // generation i retires when generation i + 1 serves
        let (at, _) = master.wait_event(event::GENERATION_EXITED, Duration::from_secs(60), |v| {
            v["generation"] == old
        });
        gone.push(at.duration_since(sent));
    }
    serving.sort();
    gone.sort();
    (serving, gone, load.finish())
}

/// Requests under load while SIGUSR2 arrives every 100 ms.
fn under_reloads(mode: Mode, args: &Args, worker_args: &[&str]) -> (Report, u64) {
    let port = free_port();
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config.args = worker_args.iter().map(|s| s.to_string()).collect();
    let master = Master::start("bench-load", &config);
    let addr = baton_integration::loopback(port);
    let run = Duration::from_secs(args.seconds);
    let bounds = Bounds {
        clients: args.clients,
        duration: run + Duration::from_secs(10),
        max_requests_per_client: u64::MAX,
    };
    let load = Load::start(addr, mode, bounds);
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < run {
        master.signal(Signal::SIGUSR2);
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    master.verdict_of(sent);
    (load.finish(), sent)
}

/// Throughput of one worker process, alone (socket-activated) and under baton: the master must
/// not be in the data path.
fn throughput(mode: Mode, args: &Args) -> (Report, Report) {
    let run = Duration::from_secs(args.seconds);
    let bounds = Bounds {
        clients: args.clients,
        duration: run,
        max_requests_per_client: u64::MAX,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut alone = start_socket_activated(&binaries().hello_worker, &listener, None);
    drop(listener);
    let standalone = Load::start(addr, mode, bounds).join();
    let _ = alone.kill();
    let _ = alone.wait();
    let port = free_port();
    let master = Master::start(
        "bench-throughput",
        &TestConfig::hello(&format!("127.0.0.1:{port}"), 1),
    );
    let supervised = Load::start(baton_integration::loopback(port), mode, bounds).join();
    drop(master);
    (standalone, supervised)
}

/// Time to start a master with 1000 listeners and hand them to a worker, and to reload it.
fn thousand_listeners() -> (Duration, u64) {
    let held: Vec<std::net::TcpListener> = (0..1000)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut c = TestConfig::hello("127.0.0.1:1", 1);
    c.listeners = held
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("l{i}"), l.local_addr().unwrap().to_string()))
        .collect();
    drop(held);
    c.ready_timeout = "60s";
    let started = Instant::now();
    let master = Master::spawn("bench-1000", &c.yaml());
    master.wait_event(event::SERVING, Duration::from_secs(60), |_| true);
    let start = started.elapsed();
    let reload = master.reload();
    (start, reload["took_ms"].as_u64().unwrap_or(0))
}

fn row(name: &str, (r, reloads): &(Report, u64)) -> String {
    let total = r.ok + r.failed();
    format!(
        "| {name} | {reloads} | {} | {} | {:?} | {:.4}% | {} | {} | {} |",
        r.ok,
        r.failed(),
        r.failures,
        100.0 * r.failed() as f64 / total.max(1) as f64,
        ms(r.quantile(0.5)),
        ms(r.quantile(0.99)),
        ms(r.latencies.last().copied().unwrap_or_default()),
    )
}

/// The master's CPU time (µs) over 10 s idle with 2 workers and `supervisor` settings `extra`,
/// and its RSS (KiB).
fn idle_cpu(extra: &[&str]) -> (u64, u64) {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{}", free_port()), 2);
    config.supervisor_extra = extra.iter().map(|e| e.to_string()).collect();
    let master = Master::start("bench-idle", &config);
    let before = procfs::cpu_ns(master.pid());
    std::thread::sleep(Duration::from_secs(10));
    let idle_us = (procfs::cpu_ns(master.pid()) - before) / 1000;
    (idle_us, procfs::rss_kib(master.pid()))
}

/// `--only idle`: the master's idle CPU without and with `queue_watch`.
fn idle_report() {
    println!("## The master idle (2 workers, 10 s)\n");
    println!("| setting | CPU time |");
    println!("|---|---|");
    for (name, extra) in [
        ("default (no queue_watch)", &[][..]),
        ("`supervisor.queue_watch: 1s`", &["queue_watch: 1s"][..]),
    ] {
        eprintln!("idle: {name} ...");
        println!("| {name} | {} µs |", idle_cpu(extra).0);
    }
    println!();
}

fn main() {
    // A helper the scale section starts: holds connections (one process may not hold 50k).
    if let Some(("--hold-connections", rest)) = std::env::args()
        .collect::<Vec<_>>()
        .get(1..)
        .and_then(|a| Some((a.first()?.as_str(), a.get(1..)?.to_vec())))
    {
        scale::hold(&rest);
        return;
    }
    let args = args();
    if !args.only.is_empty() {
        for section in &args.only {
            match section.as_str() {
                "output" => output::report(),
                "scale" => scale::report(),
                "idle" => idle_report(),
                "memory" => memory::report(),
                "udp" => udp::report(args.seconds),
                _ => cost::report(),
            }
        }
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("# baton reload benchmark\n");
    println!(
        "Machine: {cpus} CPUs, Linux {}. Loopback only. Example worker: hello-worker, 2 processes.\n",
        kernel.trim()
    );

    eprintln!("measuring reload latency over {} reloads ...", args.reloads);
    let (serving, gone, light) = latency(args.reloads);
    println!(
        "## Reload latency ({} reloads, one at a time, 2 clients of fresh-connection load)\n",
        args.reloads
    );
    println!("| from SIGUSR2 to | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (what, v) in [
        ("new generation serving", &serving),
        ("old generation gone", &gone),
    ] {
        println!(
            "| {what} | {} | {} | {} |",
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
    println!(
        "\nRequests during those reloads: {} ok, {} failed.\n",
        light.ok,
        light.failed()
    );
    // Requests baton lost in the scenarios that must lose none: the exit status says.
    let mut lost = light.failed();

    eprintln!("throughput: a worker alone vs the same worker under baton ...");
    println!(
        "## The master is not in the data path (1 worker process, {} clients, {} s each)\n",
        args.clients, args.seconds
    );
    println!(
        "| load | worker alone req/s | under baton req/s | ratio | alone p50/p99 ms | baton p50/p99 ms |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, mode) in [
        ("keep-alive", Mode::KeepAlive),
        ("fresh connection per request", Mode::Fresh),
    ] {
        let (alone, baton) = throughput(mode, &args);
        let rate = |r: &Report| r.ok as f64 / args.seconds as f64;
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} | {}/{} | {}/{} |",
            rate(&alone),
            rate(&baton),
            rate(&baton) / rate(&alone).max(1.0),
            ms(alone.quantile(0.5)),
            ms(alone.quantile(0.99)),
            ms(baton.quantile(0.5)),
            ms(baton.quantile(0.99))
        );
    }
    println!();

    eprintln!("master footprint ...");
    {
        let (idle_us, rss) = idle_cpu(&[]);
        let (watched_us, _) = idle_cpu(&["queue_watch: 1s"]);
        let (start, reload_ms) = thousand_listeners();
        println!("## The master itself\n");
        println!("| measure | value |");
        println!("|---|---|");
        println!("| CPU time over 10 s idle (2 workers) | {idle_us} µs |");
        println!(
            "| the same with `supervisor.queue_watch: 1s` (accept queues and drop counters read every second) | {watched_us} µs |"
        );
        println!(
            "| resident memory (VmRSS), 2 workers | {:.1} MiB |",
            rss as f64 / 1024.0
        );
        println!(
            "| start with 1000 listeners, all handed to a worker (4 SCM_RIGHTS chunks) | {} ms |",
            ms(start)
        );
        println!(
            "| reload with 1000 listeners (signal to new generation serving) | {reload_ms} ms |"
        );
        println!();
    }

    output::report();
    cost::report();
    scale::report();
    memory::report();
    udp::report(args.seconds);

    eprintln!("a storm of 500 SIGUSR2 ...");
    let s = storm(3, 2, 500, args.clients);
    println!(
        "## A storm: {} SIGUSR2 in {:.2} s ({} clients of fresh-connection load, 2 workers, `max_draining: 3`)\n",
        s.signals,
        s.sending.as_secs_f64(),
        args.clients
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| reload requests logged (signals that arrive together merge) | {} |",
        s.requested
    );
    println!(
        "| reloads run (a request that arrives while one is pending joins it; every request gets its verdict) | {} |",
        s.reloads
    );
    println!(
        "| from the first signal to settled (every verdict given, one generation serving) | {:.2} s |",
        s.settled.as_secs_f64()
    );
    println!(
        "| most worker processes alive at once (cap + 1 generations = 8) | {} |",
        s.most_workers
    );
    println!(
        "| requests ok / failed | {} / {} |",
        s.report.ok,
        s.report.failed()
    );
    println!(
        "| master RSS before / after | {:.1} / {:.1} MiB |",
        s.rss_before_kib as f64 / 1024.0,
        s.rss_after_kib as f64 / 1024.0
    );
    println!("| zombies left | {} |\n", s.zombies);
    lost += s.report.failed();

    eprintln!("fresh connections under reloads every 100 ms ...");
    let fresh = under_reloads(Mode::Fresh, &args, &[]);
    eprintln!("keep-alive under reloads every 100 ms ...");
    let keep = under_reloads(Mode::KeepAlive, &args, &[]);
    eprintln!("keep-alive, idle connections closed at once on drain (nginx-style) ...");
    let naive = under_reloads(Mode::KeepAlive, &args, &["--idle-grace-ms", "0"]);
    println!(
        "## Requests under SIGUSR2 every 100 ms ({} clients, {} s, no retries)\n",
        args.clients, args.seconds
    );
    println!(
        "| scenario | reloads | ok | failed | failures by kind | failure rate | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!("{}", row("fresh connection per request", &fresh));
    println!("{}", row("keep-alive clients", &keep));
    println!(
        "{}",
        row(
            "keep-alive, worker closes idle connections at once (`--idle-grace-ms 0`)",
            &naive
        )
    );
    lost += fresh.0.failed() + keep.0.failed();
    if lost > 0 {
        eprintln!("FAILED: baton lost {lost} requests");
        std::process::exit(1);
    }
}
