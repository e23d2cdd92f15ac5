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
    println!("held");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line); // until the bench closes it
    drop(held);
}

/// `n` connections to `port`, held by helper processes (each from its own source address:
/// one address has about 28k ephemeral ports); they close when the helpers are dropped.
fn connect_many(port: u16, n: usize) -> Vec<std::process::Child> {
    use std::io::BufRead;
    let exe = std::env::current_exe().unwrap();
    let helpers: Vec<std::process::Child> = (0..n.div_ceil(PER_HELPER))
        .map(|i| {
            let count = PER_HELPER.min(n - i * PER_HELPER);
            std::process::Command::new(&exe)
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
            let out = helper.stdout.take().unwrap();
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
    let held = connect_many(port, n);
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
    for mut helper in held {
        drop(helper.stdin.take());
        let _ = helper.wait();
    }
    let p50 = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    format!(
        "| {protocol} ({}) | {n} | {} / {} ms | {} ms | {} / {} ms | {} ms |",
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

pub(crate) fn report() {
    println!(
        "## `baton status` with many connections held open to a draining generation (4 workers)\n"
    );
    println!(
        "| workers' connections | connections | `baton status` p50 / max | master CPU per status | `baton drain-status` p50 / max | master CPU per drain-status |"
    );
    println!("|---|---|---|---|---|---|");
    for protocol in ["baton", "systemd"] {
        for n in [10_000, 50_000] {
            eprintln!("status with {n} connections ({protocol}) ...");
            println!("{}", run(protocol, n));
        }
    }
    println!();
}
