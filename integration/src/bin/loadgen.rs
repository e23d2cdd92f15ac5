//! `loadgen`: the harness's load generator as a program, for load that must run inside another
//! network namespace (`nsenter -n loadgen ...`). Prints one JSON report on stdout.
//!
//! ```text
//! loadgen ADDR fresh|keepalive CLIENTS SECONDS [PATH [REQUESTS_PER_CLIENT]]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::exit)]

use std::time::Duration;

use baton_integration::load::{Bounds, Load, Mode, request_path};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: loadgen ADDR fresh|keepalive CLIENTS SECONDS [PATH [REQUESTS_PER_CLIENT]]"
        );
        std::process::exit(64)
    };
    if args.len() < 4 {
        usage();
    }
    let addr = args[0].parse().unwrap_or_else(|_| usage());
    let mode = match args[1].as_str() {
        "fresh" => Mode::Fresh,
        "keepalive" => Mode::KeepAlive,
        _ => usage(),
    };
    let clients: usize = args[2].parse().unwrap_or_else(|_| usage());
    let seconds: u64 = args[3].parse().unwrap_or_else(|_| usage());
    if let Some(path) = args.get(4) {
        request_path(path);
    }
    let max: u64 = args
        .get(5)
        .map_or(u64::MAX, |n| n.parse().unwrap_or_else(|_| usage()));
    let bounds = Bounds {
        clients,
        duration: Duration::from_secs(seconds),
        max_requests_per_client: max,
    };
    let report = Load::start(addr, mode, bounds).join();
    println!(
        "{}",
        serde_json::json!({
            "ok": report.ok,
            "failed": report.failed(),
            "failures": report.failures,
            "generations": report.generations.keys().collect::<Vec<_>>(),
            "summary": report.summary(),
        })
    );
}
