//! `ws-bench`: WebSocket clients across reloads, baton with connection handoff beside baton
//! without it, nginx proxying WebSockets (`nginx -s reload`) and HAProxy -W (SIGUSR2).
//!
//! ```text
//! cargo run --release -p baton-integration --bin ws-bench [-- --clients 10000 --seconds 60]
//! ```
//!
//! Each client (tokio-tungstenite's client, `wsclient.rs`) sends a numbered message every
//! 100 ms (`--period-ms`) and checks its echo; the server reloads every second. Prints a Markdown table:
//! disconnects, messages lost or out of order, echo p99 steady and during reloads, the old
//! processes still alive at the end; and, for baton, the master's CPU time and memory. Needs
//! `nginx` and `haproxy` for their rows (skipped when missing); kills every `nginx` and
//! `haproxy` process between runs. Loopback only, bounded in time.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::exit)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_integration::wsclient::{WsLoad, WsReport, quantile};
use baton_integration::{Master, TestConfig, binaries, free_port, procfs};
use futures_util::{SinkExt, StreamExt};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Baton,
    BatonNoHandoff,
    BatonPaced,
    Nginx,
    Haproxy,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Baton => "baton, connection handoff (ws-worker)",
            Peer::BatonNoHandoff => "baton, no handoff (ws-worker --no-handoff: 1012 at the drain)",
            Peer::BatonPaced => "baton, no handoff, closes paced over 5 s (--close-window-ms 5000)",
            Peer::Nginx => {
                "nginx proxying WebSockets (nginx -s reload, worker_shutdown_timeout 10s)"
            }
            Peer::Haproxy => "HAProxy -W (SIGUSR2, hard-stop-after 10s)",
        }
    }
}

struct Args {
    clients: usize,
    seconds: u64,
    only: Vec<String>,
    /// baton's `handoff_rate` (None: its default).
    handoff_rate: Option<u32>,
    /// Each client's time between two messages.
    period: Duration,
}

fn args() -> Args {
    let mut a = Args {
        clients: 10_000,
        seconds: 60,
        only: Vec::new(),
        handoff_rate: None,
        period: Duration::from_millis(100),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--clients", Some(v)) if v.parse::<usize>().is_ok() => a.clients = v.parse().unwrap(),
            ("--seconds", Some(v)) if v.parse::<u64>().is_ok() => a.seconds = v.parse().unwrap(),
            ("--only", Some(v)) => a.only = v.split(',').map(str::to_string).collect(),
            ("--handoff-rate", Some(v)) if v.parse::<u32>().is_ok() => {
                a.handoff_rate = v.parse().ok();
            }
            ("--period-ms", Some(v)) if v.parse::<u64>().is_ok_and(|v| v > 0) => {
                a.period = Duration::from_millis(v.parse().unwrap());
            }
            _ => {
                eprintln!(
                    "usage: ws-bench [--clients N] [--seconds S] [--only baton,no-handoff,paced,nginx,haproxy] [--handoff-rate N] [--period-ms MS]"
                );
                std::process::exit(64);
            }
        }
    }
    a
}

/// The echo server the proxies stand in front of, in a process of its own (`ws-bench
/// --backend`): behind a proxy, 10 000 clients are 10 000 more sockets, and this process's
/// descriptor limit (20 000 here) cannot hold both sides. Killed when dropped.
struct Backend {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Backend {
    fn start() -> Backend {
        let mut child = Command::new(std::env::current_exe().expect("this program's path"))
            .arg("--backend")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the echo backend");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("its stdout")),
            &mut line,
        )
        .expect("the backend's address");
        let addr = line.trim().parse().expect("an address");
        Backend { addr, child }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ws-bench --backend`: a tokio-tungstenite echo server on a free loopback port, which it
/// prints, until killed. It takes any number of connections (it never stops accepting).
fn serve_backend() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    println!("{}", listener.local_addr().unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    eprintln!("backend: accept: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                // The clients ask for the subprotocol `chat`: it is agreed.
                #[allow(clippy::result_large_err)] // tungstenite's callback type
                let agree = |_: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             mut response: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", "chat".parse().unwrap());
                    Ok(response)
                };
                let config = Some(baton_integration::wsclient::config());
                let Ok(mut ws) =
                    tokio_tungstenite::accept_hdr_async_with_config(stream, agree, config).await
                else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if let tokio_tungstenite::tungstenite::Message::Text(t) = message {
                        let echo = format!("echo: {t}");
                        if ws.send(echo.into()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
}

fn kill_peers() {
    for name in ["nginx", "haproxy"] {
        let _ = Command::new("pkill").args(["-KILL", "-x", name]).output();
    }
}

fn count(name: &str) -> usize {
    Command::new("pgrep")
        .args(["-c", "-x", name])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::listening_inodes(port).is_empty() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nginx_conf(dir: &Path, port: u16, backend: SocketAddr) {
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 2;\nworker_rlimit_nofile 20000;\nworker_shutdown_timeout 10s;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 19000; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  server {{ listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://{backend}; proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"; proxy_read_timeout 1h; }} }}\n}}\n"
        ),
    )
    .unwrap();
}

/// `maxconn 9900`: HAProxy asks for about two descriptors a connection and cannot raise its
/// limit past this machine's hard one (20 000), so it holds at most 9 900 clients here.
fn haproxy_conf(dir: &Path, port: u16, backend: SocketAddr) {
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  master-worker\n  hard-stop-after 10s\n  nbthread 2\n  maxconn 9900\ndefaults\n  mode http\n  timeout client 30s\n  timeout connect 5s\n  timeout server 30s\n  timeout tunnel 1h\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server s1 {backend}\n"
        ),
    )
    .unwrap();
}

/// A server under test, and how to reload it.
struct Running {
    peer: Peer,
    dir: std::path::PathBuf,
    master: Option<Master>,
}

impl Running {
    fn start(peer: Peer, port: u16, backend: SocketAddr, args: &Args) -> Running {
        let dir = baton_integration::kept_dir("ws-bench-");
        let master = match peer {
            Peer::Baton | Peer::BatonNoHandoff | Peer::BatonPaced => {
                let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
                config.command = binaries().ws_worker.clone();
                config.drain_timeout = "10s";
                if let Some(rate) = args.handoff_rate {
                    config.worker_extra.push(format!("handoff_rate: {rate}"));
                }
                match peer {
                    Peer::BatonNoHandoff => config.args = vec!["--no-handoff".into()],
                    Peer::BatonPaced => {
                        config.args = ["--no-handoff", "--close-window-ms", "5000"]
                            .map(String::from)
                            .to_vec();
                    }
                    _ => {}
                }
                Some(Master::start("ws-bench", &config))
            }
            Peer::Nginx => {
                nginx_conf(&dir, port, backend);
                let _ = Command::new("nginx")
                    .arg("-c")
                    .arg(dir.join("nginx.conf"))
                    .arg("-p")
                    .arg(&dir)
                    .arg("-e")
                    .arg(dir.join("error.log"))
                    .output();
                None
            }
            Peer::Haproxy => {
                haproxy_conf(&dir, port, backend);
                let _ = Command::new("haproxy")
                    .args(["-W", "-D", "-f"])
                    .arg(dir.join("haproxy.cfg"))
                    .arg("-p")
                    .arg(dir.join("haproxy.pid"))
                    .output();
                None
            }
        };
        wait_listening(port);
        Running { peer, dir, master }
    }

    fn reload(&self) {
        match self.peer {
            Peer::Baton | Peer::BatonNoHandoff | Peer::BatonPaced => {
                let _ = self.master.as_ref().unwrap().reload();
            }
            Peer::Nginx => {
                let out = Command::new("nginx")
                    .arg("-c")
                    .arg(self.dir.join("nginx.conf"))
                    .arg("-p")
                    .arg(&self.dir)
                    .arg("-e")
                    .arg(self.dir.join("error.log"))
                    .args(["-s", "reload"])
                    .output();
                if !out.as_ref().is_ok_and(|o| o.status.success()) {
                    eprintln!("nginx -s reload failed: {out:?}");
                }
            }
            Peer::Haproxy => {
                if let Some(pid) = std::fs::read_to_string(self.dir.join("haproxy.pid"))
                    .ok()
                    .and_then(|p| p.lines().next()?.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGUSR2,
                    );
                }
            }
        }
    }

    /// Processes of the server alive now (the master's workers, or nginx's or HAProxy's).
    fn processes(&self) -> usize {
        match self.peer {
            // Its workers: the master's children but its guard.
            Peer::Baton | Peer::BatonNoHandoff | Peer::BatonPaced => {
                self.master.as_ref().map_or(0, |m| {
                    procfs::children(m.pid())
                        .into_iter()
                        .filter(|pid| {
                            !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                                .is_ok_and(|c| c.contains("guard"))
                        })
                        .count()
                })
            }
            Peer::Nginx => count("nginx"),
            Peer::Haproxy => count("haproxy"),
        }
    }
}

/// The master's CPU time (user + system) and resident memory.
fn master_usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the command's closing parenthesis: state is field 0, utime 11, stime 12.
    let cpu = Duration::from_millis((ticks(11) + ticks(12)) * 10);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss)
}

/// The clients' windows of echo times ([`WsLoad::mark`]).
const STEADY: usize = 1;
const RELOADING: usize = 2;
const AFTER: usize = 3;
/// The part of each second of reloads after its first [`BURST`] (window [`RELOADING`] holds
/// the first part): where the reloading echo times are slow.
const RELOADING_LATER: usize = 4;
/// The first part of each second of reloads: the new generation starts, the old one hands over.
const BURST: Duration = Duration::from_millis(300);

struct Row {
    peer: Peer,
    report: WsReport,
    reloads: u64,
    alive_after: usize,
    master: Option<(Duration, u64, u64)>,
}

fn measure(peer: Peer, args: &Args, backend: SocketAddr) -> Row {
    kill_peers();
    let port = free_port();
    let server = Running::start(peer, port, backend, args);
    let addr = baton_integration::loopback(port);
    let load = WsLoad::start(
        addr,
        args.clients,
        args.period,
        // Opening 10 000 clients takes minutes through a proxy: the run must outlast that and
        // the reloads (the stop ends it).
        Duration::from_secs(args.seconds + 3600),
    );
    // Until every client is in, or none has come in for 10 s.
    let (mut last, mut since) = (0, Instant::now());
    while load.connected() < args.clients && since.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        if load.connected() > last {
            (last, since) = (load.connected(), Instant::now());
        }
    }
    eprintln!("{}: {} clients connected", peer.name(), load.connected());
    // Steady: the same clients, no reload, a tenth of the run (at least 10 s); the echo times
    // of the opening (window 0) count in neither.
    load.mark(STEADY);
    let steady_cpu = MachineCpu::now();
    std::thread::sleep(Duration::from_secs((args.seconds / 10).max(10)));
    let steady_cpu = steady_cpu.busy_cores();
    // Reloading: one a second.
    load.mark(RELOADING);
    let reloading_cpu = MachineCpu::now();
    let before = server.master.as_ref().map(|m| master_usage(m.pid()));
    let start = Instant::now();
    let mut reloads = 0;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let at = Instant::now();
        load.mark(RELOADING);
        server.reload();
        reloads += 1;
        std::thread::sleep(BURST.saturating_sub(at.elapsed()));
        load.mark(RELOADING_LATER);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(at.elapsed()));
    }
    load.mark(AFTER);
    let reloading_cpu = reloading_cpu.busy_cores();
    // Counted while the clients still hold their connections (old processes that keep them
    // are still there).
    let alive_after = server.processes();
    let report = load.stop_and_report();
    eprintln!("{}: {}", peer.name(), report.summary());
    for (marks, what, cpu) in [
        (&[STEADY][..], "steady", Some(steady_cpu)),
        (
            &[RELOADING, RELOADING_LATER],
            "reloading",
            Some(reloading_cpu),
        ),
        (&[RELOADING], "reloading, first 300 ms of each second", None),
        (
            &[RELOADING_LATER],
            "reloading, the rest of each second",
            None,
        ),
    ] {
        let times = echo_times(&report, marks);
        eprintln!(
            "{}: {what}: echo p50 {:?}, p99 {:?}, p99.9 {:?}, {} echoes{}",
            peer.name(),
            quantile(&times, 0.5),
            quantile(&times, 0.99),
            quantile(&times, 0.999),
            times.len(),
            cpu.map_or(String::new(), |c| format!(", machine busy {c:.2} cores"))
        );
    }
    let master = server.master.as_ref().map(|m| {
        let (cpu0, _) = before.unwrap_or_default();
        let (cpu, rss) = master_usage(m.pid());
        let handed = m
            .ctl(&["metrics"])
            .1
            .lines()
            .find_map(|l| {
                l.strip_prefix("baton_connections_handed_off_total{outcome=\"adopted\"}")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0);
        (cpu.saturating_sub(cpu0), rss, handed)
    });
    drop(server);
    kill_peers();
    Row {
        peer,
        report,
        reloads,
        alive_after,
        master,
    }
}

/// The machine's CPU time since a moment (`/proc/stat`): how busy it was in a window.
struct MachineCpu {
    at: Instant,
    busy: u64,
}

impl MachineCpu {
    fn now() -> MachineCpu {
        MachineCpu {
            at: Instant::now(),
            busy: machine_busy_ticks(),
        }
    }

    /// Cores busy on average since [`MachineCpu::now`] (ticks of 10 ms: `USER_HZ` is 100).
    fn busy_cores(&self) -> f64 {
        let ticks = machine_busy_ticks().saturating_sub(self.busy);
        ticks as f64 / 100.0 / self.at.elapsed().as_secs_f64()
    }
}

/// Every CPU's time not idle nor waiting, in ticks (the first line of `/proc/stat`).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    fields.iter().take(8).sum::<u64>().saturating_sub(idle)
}

/// The echo times of windows `marks`, sorted.
fn echo_times(report: &WsReport, marks: &[usize]) -> Vec<Duration> {
    let mut all: Vec<Duration> = marks
        .iter()
        .filter_map(|&m| report.windows.get(m))
        .flatten()
        .copied()
        .collect();
    all.sort_unstable();
    all
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--backend") {
        serve_backend();
        return;
    }
    let args = args();
    let backend = Backend::start();
    let mut peers = vec![Peer::Baton, Peer::BatonNoHandoff, Peer::BatonPaced];
    for (peer, program) in [(Peer::Nginx, "nginx"), (Peer::Haproxy, "haproxy")] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            peers.push(peer);
        } else {
            eprintln!("{program} is not installed: its row is skipped");
        }
    }
    let keys = |p: Peer| match p {
        Peer::Baton => "baton",
        Peer::BatonNoHandoff => "no-handoff",
        Peer::BatonPaced => "paced",
        Peer::Nginx => "nginx",
        Peer::Haproxy => "haproxy",
    };
    peers.retain(|p| args.only.is_empty() || args.only.iter().any(|o| o == keys(*p)));
    println!(
        "## WebSockets across reloads\n\n{} clients, a numbered message every 100 ms each, echo checked; a reload every second for {} s.\n",
        args.clients, args.seconds
    );
    println!(
        "| server | reloads | clients through the reloads | sent | echoed | lost or out of order | disconnects | most disconnects in 1 s | echo p99 steady (ms) | echo p99 reloading (ms) | processes alive at the end |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    let mut baton_row = None;
    for peer in peers {
        let row = measure(peer, &args, backend.addr);
        let r = &row.report;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} {:?} | {} | {} | {} | {} |",
            row.peer.name(),
            row.reloads,
            // Connected, and neither expired nor ended before the last reload.
            r.connected as u64 - r.expired - r.disconnects(),
            r.sent,
            r.echoed,
            r.wrong + (r.sent - r.echoed - r.disconnects().min(r.sent - r.echoed)),
            r.disconnects(),
            r.ended,
            r.peak_ends(Duration::from_secs(1)),
            ms(r.quantile_in(STEADY, 0.99)),
            ms(quantile(
                &echo_times(r, &[RELOADING, RELOADING_LATER]),
                0.99
            )),
            row.alive_after
        );
        if row.peer == Peer::Baton {
            failed |= r.disconnects() > 0
                || r.wrong > 0
                || r.echoed != r.sent
                || r.expired > 0
                || r.connected < args.clients;
            baton_row = row.master;
        }
    }
    if let Some((cpu, rss, handed)) = baton_row {
        println!(
            "\nbaton's master during the reloading run: {} ms of CPU, {} KiB resident at the end, {handed} connections handed over (the connections go from worker to worker: none passes through the master).",
            cpu.as_millis(),
            rss
        );
    }
    drop(backend);
    if failed {
        eprintln!("baton with handoff lost or disconnected something");
        std::process::exit(1);
    }
}
