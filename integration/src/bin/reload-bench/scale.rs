//! `baton status` and `baton drain-status` with many connections held open to 4 workers of a
//! draining generation: their latency as an operator sees it (the `baton` command, start to
//! exit) and the master's CPU time per call. Workers that report their connections (the baton
//! protocol) cost the master nothing per connection; systemd-style ones are counted from the
//! kernel (`sock_diag`, then each worker's descriptors in `/proc`), which is the case to watch.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use baton_integration::{Master, TestConfig, eventually, free_port, procfs};

/// Calls of each command measured.
const CALLS: usize = 20;

/// The soft (and, where allowed, hard) limit on descriptors: the held connections need one each.
fn raise_fd_limit(to: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = to.max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        // Not root: as far as the hard limit goes.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Connections one helper process holds (under a 20 000 descriptor limit).
const PER_HELPER: usize = 12_500;

/// `--hold-connections PORT N SOURCE`: `N` connections to `PORT` from 127.0.0.SOURCE, held
/// until stdin closes; prints `held` once they are all made.
pub(crate) fn hold(args: &[String]) {
    let number = |i: usize| {
        args.get(i)
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let (port, n, source) = (number(0) as u16, number(1), number(2) as u8);
    raise_fd_limit(n as u64 + 64);
    let target = SocketAddr::from(([127, 0, 0, 1], port));
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, source));
    let held: Vec<socket2::Socket> = (0..n)
        .map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
            socket.connect(&target.into()).unwrap();
            socket
        })
        .collect();
    let mut held = held;
    println!("held");
    // `close N` closes N of them; the end of stdin, all.
    for line in std::io::stdin().lines().map_while(Result::ok) {
        let n = line
            .strip_prefix("close ")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        held.truncate(held.len().saturating_sub(n));
        println!("closed");
    }
}

/// `n` connections to `port`, held by helper processes (each from its own source address:
/// one address has about 28k ephemeral ports); they close when the helpers are dropped.
fn connect_many(port: u16, n: usize) -> Vec<std::process::Child> {
    use std::io::BufRead;
    let exe = own_path();
    let helpers: Vec<std::process::Child> = (0..n.div_ceil(PER_HELPER))
        .map(|i| {
            let count = PER_HELPER.min(n - i * PER_HELPER);
            std::process::Command::new(exe)
                .args(["--hold-connections", &port.to_string(), &count.to_string()])
                .arg((1 + i).to_string())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    helpers
        .into_iter()
        .map(|mut helper| {
            let mut line = String::new();
            // (Not kept: the helper writes a line only when asked, so none is read ahead.)
            let out = helper.stdout.as_mut().unwrap();
            std::io::BufReader::new(out).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "held", "a helper failed to connect");
            helper
        })
        .collect()
}

/// Latencies (sorted) of `CALLS` runs of `baton <command> -s <socket>`, and the master's CPU
/// per call.
fn measure(master: &Master, command: &str) -> (Vec<Duration>, Duration) {
    let cpu = procfs::cpu_ns(master.pid());
    let mut took: Vec<Duration> = (0..CALLS)
        .map(|_| {
            let started = Instant::now();
            let (code, _, err) = master.ctl(&[command]);
            assert!(code == 0 || code == 1, "{command}: {err}");
            started.elapsed()
        })
        .collect();
    took.sort();
    let per_call = Duration::from_nanos((procfs::cpu_ns(master.pid()) - cpu) / CALLS as u64);
    (took, per_call)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Steps of the drain: each closes 1 % of the connections from their clients' side.
const DRAIN_STEPS: usize = 20;

/// The drain, step by step: each step closes 1 % of the connections (the clients close, the
/// workers see it and close their ends), then `baton status` runs until its count is within
/// 1 % of the connections still open (at most 10 s). What it shows: the longest a step took
/// from the clients' close to a count within 1 % (workers that report their count do so at
/// most every 200 ms), the largest error of the first call of a step, and the master's CPU
/// per call.
fn drain_steps(
    master: &Master,
    held: &mut [std::process::Child],
    n: usize,
    total: &dyn Fn(&Master) -> u64,
) -> String {
    use std::io::{BufRead, Write};
    let step = n / 100;
    let cpu = procfs::cpu_ns(master.pid());
    let (mut calls, mut longest, mut worst_first) = (0u64, Duration::ZERO, 0f64);
    for i in 0..DRAIN_STEPS {
        let helper = &mut held[i % held.len()];
        writeln!(helper.stdin.as_mut().unwrap(), "close {step}").unwrap();
        let mut line = String::new();
        let out = helper.stdout.as_mut().unwrap();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "closed");
        let open = (n - (i + 1) * step) as f64;
        let started = Instant::now();
        let mut this_step = 0;
        loop {
            let counted = total(master) as f64;
            calls += 1;
            this_step += 1;
            let error = (counted - open).abs() / open;
            if this_step == 1 {
                worst_first = worst_first.max(error);
            }
            if error <= 0.01 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "step {i}: status counts {counted} of {open} connections open"
            );
        }
        longest = longest.max(started.elapsed());
    }
    let per_call = Duration::from_nanos((procfs::cpu_ns(master.pid()) - cpu) / calls);
    format!(
        "within 1 % after {} ms at most; first call off by {:.2} % at most; {} ms CPU per call",
        ms(longest),
        worst_first * 100.0,
        ms(per_call)
    )
}

/// One row per (protocol, connections): status and drain-status, p50 and max, CPU per call.
fn run(protocol: &str, n: usize) -> String {
    let port = free_port();
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 4);
    config.args = vec!["--idle-grace-ms".into(), "600000".into()];
    config.drain_timeout = "600s";
    config.ready_timeout = "60s";
    if protocol == "systemd" {
        config.worker_extra.push("protocol: systemd".into());
    }
    let master = Master::start(&format!("bench-scale-{protocol}-{n}"), &config);
    let mut held = connect_many(port, n);
    // Every connection accepted, then the generation retired with all of them open.
    let total = |master: &Master| -> u64 {
        let (_, out, _) = master.ctl(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        status["generations"]
            .as_array()
            .map(|gens| {
                gens.iter()
                    .flat_map(|g| g["workers"].as_array().cloned().unwrap_or_default())
                    .filter_map(|w| w["connections"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    eventually(
        Duration::from_secs(120),
        "every connection accepted",
        || (total(&master) >= n as u64).then_some(()),
    );
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let (status, status_cpu) = measure(&master, "status");
    let (drain, drain_cpu) = measure(&master, "drain-status");
    let during = drain_steps(&master, &mut held, n, &total);
    for mut helper in held {
        drop(helper.stdin.take());
        let _ = helper.wait();
    }
    let p50 = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    format!(
        "| {protocol} ({}) | {n} | {} / {} ms | {} ms | {} / {} ms | {} ms | {during} |",
        if protocol == "systemd" {
            "counted from the kernel"
        } else {
            "reported by the workers"
        },
        ms(p50(&status)),
        ms(max(&status)),
        ms(status_cpu),
        ms(p50(&drain)),
        ms(max(&drain)),
        ms(drain_cpu),
    )
}

/// This program's path, taken before the first build of the binaries under test (which may
/// link this one again: its old file is then "deleted", and `current_exe` says so).
fn own_path() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::current_exe().unwrap())
}

pub(crate) fn report() {
    own_path();
    println!(
        "## `baton status` with many connections held open to a draining generation (4 workers)\n"
    );
    println!(
        "| workers' connections | connections | `baton status` p50 / max | master CPU per status | `baton drain-status` p50 / max | master CPU per drain-status | during the drain ({DRAIN_STEPS} steps) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for protocol in ["baton", "systemd"] {
        for n in [10_000, 50_000] {
            eprintln!("status with {n} connections ({protocol}) ...");
            println!("{}", run(protocol, n));
        }
    }
    println!();
}
