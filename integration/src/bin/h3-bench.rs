//! `h3-bench`: HTTP/3 connections across reloads, baton against a peer (docs/quic.md).
//!
//! ```text
//! cargo run --release -p baton-integration --bin h3-bench [-- --seconds 15]
//! ```
//!
//! The same clients (8, connections of 3 s with a request every 50 ms, back to back, quinn and
//! h3) and the same cadence (a reload every 500 ms, each waiting for the one before) against:
//! the HTTP/3 example under baton with `quic: true` (steered), the same on one shared UDP socket,
//! and Caddy (Debian's `caddy`, HTTP/3 on by default) reloaded with `caddy reload`. Prints a
//! Markdown table. Loopback only; bounded in time.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::exit)]

use baton_integration::event;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_integration::h3client::{self, Connection, h3_worker_yaml};
use baton_integration::recipes::program;
use baton_integration::{Master, binaries, eventually, free_port};

struct Row {
    name: String,
    reloads: usize,
    connections: Vec<Connection>,
}

/// Runs the clients against `port` while `reload` is called every 500 ms for `seconds`.
fn measure(name: &str, port: u16, seconds: u64, mut reload: impl FnMut() -> bool) -> Row {
    let addr = baton_integration::loopback(port);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            h3client::run(
                addr,
                8,
                Duration::from_secs(3),
                (Duration::from_millis(50), Duration::from_secs(3)),
                stop,
            )
        })
    };
    let start = Instant::now();
    let mut reloads = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        if reload() {
            reloads += 1;
        }
        std::thread::sleep(Duration::from_millis(500)); // the reload cadence under test
    }
    stop.store(true, Ordering::Relaxed);
    let connections = clients.join().unwrap();
    Row {
        name: name.into(),
        reloads,
        connections,
    }
}

fn baton(quic: bool, seconds: u64) -> Row {
    let port = free_port();
    let master = Master::spawn(
        "h3-bench",
        &h3_worker_yaml(port, quic, &binaries().h3_worker, "{}"),
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let name = if quic {
        "baton, `quic: true` (steered)"
    } else {
        "baton, one shared UDP socket"
    };
    measure(name, port, seconds, || {
        master.reload()["event"] == "reload_succeeded"
    })
}

/// Caddy serving HTTP/3 on `port` (its answer names a generation the bench bumps at each
/// reload), administered on `admin`.
fn caddyfile(port: u16, admin: u16, generation: u64) -> String {
    format!(
        "{{
\tadmin localhost:{admin}
\tskip_install_trust
\tservers {{
\t\tprotocols h1 h2 h3
\t}}
}}
https://localhost:{port} {{
\ttls internal
\theader x-baton-generation {generation}
\trespond \"hello from caddy, generation {generation}\" 200
}}
"
    )
}

struct Caddy(Child);

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn caddy(seconds: u64) -> Option<Row> {
    let caddy = program("caddy", "Debian's caddy");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Caddyfile");
    let (port, admin) = (free_port(), free_port());
    std::fs::write(&file, caddyfile(port, admin, 1)).unwrap();
    let _running = Caddy(
        Command::new(&caddy)
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
    );
    eventually(Duration::from_secs(30), "caddy serving", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let mut generation = 1;
    Some(measure("Caddy 2.6, `caddy reload`", port, seconds, || {
        generation += 1;
        std::fs::write(&file, caddyfile(port, admin, generation)).unwrap();
        Command::new(&caddy)
            .args(["reload", "--adapter", "caddyfile", "--address"])
            .arg(format!("localhost:{admin}"))
            .arg("--config")
            .arg(&file)
            .env("HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }))
}

fn main() {
    let mut seconds = 15;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.as_slice() {
        [] => {}
        [flag, value] if flag == "--seconds" && value.parse::<u64>().is_ok() => {
            seconds = value.parse().unwrap();
        }
        _ => {
            eprintln!("usage: h3-bench [--seconds S]");
            std::process::exit(64);
        }
    }
    let mut rows = Vec::new();
    eprintln!("baton, steered ...");
    rows.push(baton(true, seconds));
    eprintln!("baton, one shared socket ...");
    rows.push(baton(false, seconds));
    eprintln!("caddy ...");
    match caddy(seconds) {
        Some(row) => rows.push(row),
        None => eprintln!("caddy did not start: apt-get install caddy"),
    }
    println!(
        "## HTTP/3 connections across reloads: 8 clients, connections of 3 s with a request every 50 ms, a reload every 500 ms for {seconds} s\n"
    );
    println!(
        "| server | reloads | connections | broken (a request failed) | requests | failed | answered by more than one generation | generations that answered |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let broken = r
            .connections
            .iter()
            .filter(|c| c.broke.is_some() || c.failed() > 0)
            .count();
        let requests: usize = r.connections.iter().map(|c| c.answers.len()).sum();
        let failed: usize = r.connections.iter().map(Connection::failed).sum();
        let mixed = r
            .connections
            .iter()
            .filter(|c| {
                let mut gens: Vec<u64> = c.answers.iter().flatten().copied().collect();
                gens.dedup();
                gens.len() > 1
            })
            .count();
        let generations: std::collections::BTreeSet<u64> = r
            .connections
            .iter()
            .flat_map(|c| c.answers.iter().flatten().copied())
            .collect();
        println!(
            "| {} | {} | {} | {broken} | {requests} | {failed} | {mixed} | {} |",
            r.name,
            r.reloads,
            r.connections.len(),
            generations.len()
        );
    }
}
