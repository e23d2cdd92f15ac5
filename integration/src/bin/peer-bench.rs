//! `peer-bench`: reload under load, baton side by side with the servers its users would
//! otherwise pick, measured in one run on this machine.
//!
//! ```text
//! cargo run --release -p baton-integration --bin peer-bench [-- --seconds 20 --clients 8 --svg docs/peers.svg]
//! ```
//!
//! Needs `nginx` and `haproxy` (Debian: `apt-get install nginx-light haproxy`; nothing is
//! started by the package without systemd). Loopback only; every run is bounded in time. It
//! kills every `nginx` and `haproxy` process between runs: do not run it on a machine that
//! serves with them.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::exit)]

use baton_integration::event;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_integration::load::{Bounds, Load, Mode, Report};
use baton_integration::{Master, TestConfig, free_port, procfs, recipes};
use nix::sys::signal::Signal;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Baton,
    /// HAProxy as baton's worker (examples/haproxy, docs/recipes.md).
    BatonHaproxy,
    /// nginx as baton's worker (examples/nginx).
    BatonNginx,
    Nginx,
    HaproxyMasterWorker,
    HaproxySf,
    NaiveRestart,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Baton => "baton + hello-worker (SIGUSR2)",
            Peer::BatonHaproxy => "HAProxy under baton (SIGUSR2 to baton)",
            Peer::BatonNginx => "nginx under baton (SIGUSR2 to baton)",
            Peer::Nginx => "nginx (nginx -s reload)",
            Peer::HaproxyMasterWorker => "HAProxy -W, expose-fd listeners (SIGUSR2)",
            Peer::HaproxySf => "HAProxy -sf (new process, SO_REUSEPORT)",
            Peer::NaiveRestart => "naive stop/start (nginx -s stop; nginx)",
        }
    }
}

/// A running peer: how to reload it, its master's pid, how to stop it.
struct Running {
    peer: Peer,
    dir: PathBuf,
    port: u16,
    master: Option<Master>,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        eprintln!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::listening_inodes(port).is_empty() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_peers() {
    for name in ["nginx", "haproxy"] {
        let _ = Command::new("pkill").args(["-KILL", "-x", name]).output();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && Command::new("pgrep")
            .args(["-x", "nginx|haproxy"])
            .output()
            .is_ok_and(|o| o.status.success())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nginx` with this run's configuration, prefix and error log, plus `args`.
fn nginx(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(args);
    cmd
}

fn nginx_conf(dir: &Path, port: u16, tag: u64) -> PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_timeout 75s;\n  keepalive_requests 100000;\n  client_body_temp_path {d};\n  server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hello from nginx, tag {tag}\\n\"; }} }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    conf
}

fn haproxy_conf(dir: &Path, port: u16, master_worker: bool, tag: u64) -> PathBuf {
    let conf = dir.join("haproxy.cfg");
    let global = if master_worker {
        format!(
            "  master-worker\n  stats socket {}/admin.sock mode 600 level admin expose-fd listeners\n",
            dir.display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &conf,
        format!(
            "global\n{global}  nbthread 2\n  maxconn 8192\ndefaults\n  mode http\n  timeout client 30s\n  timeout connect 5s\n  timeout server 30s\n  timeout http-keep-alive 75s\nfrontend fe\n  bind 127.0.0.1:{port}\n  http-request return status 200 content-type text/plain string \"hello from haproxy, tag {tag}\"\n"
        ),
    )
    .unwrap();
    conf
}

fn baton_config(port: u16, tag: u64) -> TestConfig {
    let mut config = TestConfig::hello(&format!("127.0.0.1:{port}"), 2);
    config.args = vec!["--tag".into(), tag.to_string()];
    config
}

fn start(peer: Peer, port: u16) -> Running {
    let dir = baton_integration::kept_dir("peer-bench-");
    let master = match peer {
        Peer::Baton => Some(Master::start("peer-baton", &baton_config(port, 1))),
        Peer::BatonHaproxy => {
            let cfg = recipes::haproxy_cfg(&dir, 1);
            let master = Master::spawn("peer-baton-haproxy", &recipes::haproxy_yaml(&cfg, port));
            master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
            Some(master)
        }
        Peer::BatonNginx => {
            let yaml = recipes::nginx_yaml(&dir, port);
            recipes::nginx_tag(&dir, 1);
            let master = Master::spawn("peer-baton-nginx", &yaml);
            master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
            Some(master)
        }
        Peer::Nginx | Peer::NaiveRestart => {
            nginx_conf(&dir, port, 1);
            run(&mut nginx(&dir, &[]));
            None
        }
        Peer::HaproxyMasterWorker => {
            let conf = haproxy_conf(&dir, port, true, 1);
            run(Command::new("haproxy")
                .args(["-W", "-D", "-f"])
                .arg(&conf)
                .arg("-p")
                .arg(dir.join("haproxy.pid")));
            None
        }
        Peer::HaproxySf => {
            let conf = haproxy_conf(&dir, port, false, 1);
            run(Command::new("haproxy")
                .args(["-D", "-f"])
                .arg(&conf)
                .arg("-p")
                .arg(dir.join("haproxy.pid")));
            None
        }
    };
    wait_listening(port);
    Running {
        peer,
        dir,
        port,
        master,
    }
}

impl Running {
    /// Writes the configuration whose responses end in `tag T`.
    fn configure(&self, tag: u64) {
        match self.peer {
            Peer::Baton => {
                let master = self.master.as_ref().unwrap();
                master.write_config(&baton_config(self.port, tag).yaml());
            }
            // The server's own configuration: the next generation reads it when it starts.
            Peer::BatonHaproxy => {
                recipes::haproxy_cfg(&self.dir, tag);
            }
            Peer::BatonNginx => recipes::nginx_tag(&self.dir, tag),
            Peer::Nginx | Peer::NaiveRestart => {
                nginx_conf(&self.dir, self.port, tag);
            }
            Peer::HaproxyMasterWorker | Peer::HaproxySf => {
                haproxy_conf(
                    &self.dir,
                    self.port,
                    self.peer == Peer::HaproxyMasterWorker,
                    tag,
                );
            }
        }
    }

    fn reload(&self) {
        let dir = &self.dir;
        match self.peer {
            Peer::Baton | Peer::BatonHaproxy | Peer::BatonNginx => {
                self.master.as_ref().unwrap().signal(Signal::SIGUSR2)
            }
            Peer::Nginx => run(&mut nginx(dir, &["-s", "reload"])),
            Peer::HaproxyMasterWorker => {
                if let Some(pid) = pid_file(&dir.join("haproxy.pid")) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        Signal::SIGUSR2,
                    );
                }
            }
            Peer::HaproxySf => {
                let old = pid_file(&dir.join("haproxy.pid"))
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                run(Command::new("haproxy")
                    .args(["-D", "-f"])
                    .arg(dir.join("haproxy.cfg"))
                    .arg("-p")
                    .arg(dir.join("haproxy.pid"))
                    .args(["-sf", &old]));
            }
            Peer::NaiveRestart => {
                let pid = pid_file(&dir.join("nginx.pid"));
                run(&mut nginx(dir, &["-s", "stop"]));
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid.is_some_and(procfs::alive) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                run(&mut nginx(dir, &[]));
            }
        }
    }

    /// Resident memory of the master process, in KiB.
    fn master_rss(&self) -> u64 {
        let pid = match self.peer {
            Peer::Baton | Peer::BatonHaproxy | Peer::BatonNginx => {
                self.master.as_ref().map(|m| m.pid())
            }
            Peer::Nginx | Peer::NaiveRestart => pid_file(&self.dir.join("nginx.pid")),
            Peer::HaproxyMasterWorker | Peer::HaproxySf => pid_file(&self.dir.join("haproxy.pid")),
        };
        pid.map_or(0, procfs::rss_kib)
    }

    /// Processes of the peer alive now.
    fn processes(&self) -> usize {
        match self.peer {
            Peer::Baton => self.master.as_ref().map_or(0, |m| 1 + m.children().len()),
            // baton, and every HAProxy or nginx process (nginx's own workers included).
            Peer::BatonHaproxy | Peer::BatonNginx => {
                let servers = Command::new("pgrep")
                    .args(["-c", "-x", "nginx|haproxy"])
                    .output()
                    .unwrap();
                1 + String::from_utf8_lossy(&servers.stdout)
                    .trim()
                    .parse::<usize>()
                    .unwrap_or(0)
            }
            _ => {
                let out = Command::new("pgrep")
                    .args(["-c", "-x", "nginx|haproxy"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            }
        }
    }
}

/// Watches which configuration serves: a fresh connection every millisecond, noting when each
/// `tag N` is first seen. Its requests are not part of the load's counts.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, u64)>>,
}

impl Probe {
    fn start(addr: SocketAddr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut first_seen = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while !flag.load(Ordering::Relaxed) {
                if let Some(tag) = served_tag(addr)
                    && seen.insert(tag)
                {
                    first_seen.push((Instant::now(), tag));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            first_seen
        });
        Probe { stop, thread }
    }

    fn finish(self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The `tag N` of one response on a fresh connection, if one came within a second.
fn served_tag(addr: SocketAddr) -> Option<u64> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let after = &text[text.rfind("tag ")? + 4..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// One reload: when its command was issued (from the start of the run) and, if its
/// configuration was ever seen serving, how long that took.
#[derive(Clone, Copy)]
struct Reload {
    at: Duration,
    latency: Option<Duration>,
}

struct Row {
    peer: Peer,
    mode: Mode,
    every: Duration,
    reloads: Vec<Reload>,
    report: Report,
    processes_after: usize,
    rss_kib: u64,
}

impl Row {
    /// Sorted latencies of the reloads whose configuration served.
    fn reload_latencies(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> = self.reloads.iter().filter_map(|r| r.latency).collect();
        v.sort();
        v
    }

    /// Reloads whose configuration was never seen serving (skipped, or overtaken by the next).
    fn never_served(&self) -> usize {
        self.reloads.iter().filter(|r| r.latency.is_none()).count()
    }
}

fn scenario(peer: Peer, mode: Mode, every: Duration, seconds: u64, clients: usize) -> Row {
    kill_peers();
    let port = free_port();
    let running = start(peer, port);
    let addr = baton_integration::loopback(port);
    let bounds = Bounds {
        clients,
        duration: Duration::from_secs(seconds + 30),
        max_requests_per_client: u64::MAX,
    };
    let load = Load::start(addr, mode, bounds);
    let probe = Probe::start(addr);
    let begin = Instant::now();
    let mut sent = Vec::new();
    let mut tag = 1;
    while begin.elapsed() < Duration::from_secs(seconds) {
        tag += 1;
        running.configure(tag);
        sent.push((Instant::now(), tag));
        running.reload();
        std::thread::sleep(every);
    }
    // The last reload gets a second to show before the probe stops.
    std::thread::sleep(Duration::from_secs(1));
    let first_seen = probe.finish();
    let report = load.finish();
    let reloads = sent
        .iter()
        .map(|&(at, tag)| Reload {
            at: at - begin,
            latency: first_seen
                .iter()
                .find(|&&(_, t)| t == tag)
                .map(|&(seen, _)| seen.saturating_duration_since(at)),
        })
        .collect();
    // What is still alive after the last reload (old generations lingering).
    let processes_after = running.processes();
    let rss_kib = running.master_rss();
    drop(running);
    kill_peers();
    Row {
        peer,
        mode,
        every,
        reloads,
        report,
        processes_after,
        rss_kib,
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Reload latency over time, one panel per peer, for the scenarios at the fastest cadence with
/// fresh connections: a dot per reload at the time it was issued, its height the time until
/// its configuration served (log scale); a red cross on top for a reload never served.
fn timeline_svg(rows: &[Row], seconds: u64) -> String {
    let fastest = rows.iter().map(|r| r.every).min().unwrap_or_default();
    let panels: Vec<&Row> = rows
        .iter()
        .filter(|r| r.every == fastest && r.mode == Mode::Fresh)
        .collect();
    let (left, width, panel_h) = (160.0, 800.0, 90.0);
    let height = 50.0 + panel_h * panels.len() as f64 + 30.0;
    let (lo, hi) = (0.5f64.ln(), 2000f64.ln());
    let y_of = |top: f64, ms: f64| top + 70.0 - (ms.max(0.5).ln() - lo) / (hi - lo) * 70.0;
    let x_of = |at: Duration| left + at.as_secs_f64() / seconds.max(1) as f64 * width;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1000\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\">Reload latency over time: command to new configuration serving, ms (log scale), a reload every {} ms, fresh connections</text>\n",
        fastest.as_millis()
    );
    for (i, r) in panels.iter().enumerate() {
        let top = 40.0 + panel_h * i as f64;
        out += &format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text>\n<rect x=\"{left}\" y=\"{top:.1}\" width=\"{width}\" height=\"70\" fill=\"none\" stroke=\"#bbb\"/>\n",
            top + 40.0,
            short(r.peer)
        );
        for ms in [1.0, 10.0, 100.0, 1000.0] {
            let y = y_of(top, ms);
            out += &format!(
                "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\">{ms}</text>\n",
                left + width,
                left - 4.0,
                y + 3.0
            );
        }
        let colour = if r.peer == Peer::Baton {
            "#2a7"
        } else {
            "#c44"
        };
        for reload in &r.reloads {
            let x = x_of(reload.at);
            match reload.latency {
                Some(l) => {
                    out += &format!(
                        "<circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{colour}\"/>\n",
                        y_of(top, l.as_secs_f64() * 1000.0)
                    );
                }
                None => {
                    out += &format!(
                        "<text x=\"{x:.1}\" y=\"{:.1}\" fill=\"#c00\" text-anchor=\"middle\">\u{d7}</text>\n",
                        top + 8.0
                    );
                }
            }
        }
    }
    out += &format!(
        "<text x=\"{left}\" y=\"{:.1}\">0 s</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\"><tspan fill=\"#c00\">\u{d7}</tspan> a reload whose configuration never served (skipped, or overtaken by the next)</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{seconds} s</text>\n</svg>\n",
        height - 12.0,
        left + width / 2.0,
        height - 12.0,
        left + width,
        height - 12.0
    );
    out
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// A bar chart of failed requests per million, on a log scale (so that 0.01% stays visible next
/// to 30%).
fn svg(rows: &[Row]) -> String {
    let height = 24 * rows.len() + 70;
    let ppm =
        |r: &Row| 1e6 * r.report.failed() as f64 / (r.report.ok + r.report.failed()).max(1) as f64;
    let max = rows.iter().map(ppm).fold(1.0, f64::max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1000\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\">Failed requests under reload, per million (log scale; one run, loopback, 2 CPUs)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 44 + i * 24;
        let value = ppm(r);
        let width = if value > 0.0 {
            ((1.0 + value).ln() / (1.0 + max).ln() * 330.0).max(2.0)
        } else {
            0.0
        };
        let colour = if r.peer == Peer::Baton {
            "#2a7"
        } else {
            "#c44"
        };
        out += &format!(
            "<text x=\"10\" y=\"{}\">{} \u{2014} {} \u{2014} every {} ms</text>\n<rect x=\"330\" y=\"{}\" width=\"{width:.1}\" height=\"16\" fill=\"{colour}\"/>\n<text x=\"{:.1}\" y=\"{}\">{} of {} ({:.4}%)</text>\n",
            y + 13,
            short(r.peer),
            mode_name(r.mode),
            r.every.as_millis(),
            y,
            336.0 + width,
            y + 13,
            r.report.failed(),
            r.report.ok + r.report.failed(),
            failure_rate(&r.report),
        );
    }
    out + "</svg>\n"
}

fn short(peer: Peer) -> &'static str {
    match peer {
        Peer::Baton => "baton",
        Peer::BatonHaproxy => "HAProxy/baton",
        Peer::BatonNginx => "nginx/baton",
        Peer::Nginx => "nginx",
        Peer::HaproxyMasterWorker => "HAProxy -W",
        Peer::HaproxySf => "HAProxy -sf",
        Peer::NaiveRestart => "stop/start",
    }
}

/// The name `--peers` takes.
fn key(peer: Peer) -> &'static str {
    match peer {
        Peer::Baton => "baton",
        Peer::BatonHaproxy => "baton-haproxy",
        Peer::BatonNginx => "baton-nginx",
        Peer::Nginx => "nginx",
        Peer::HaproxyMasterWorker => "haproxy-w",
        Peer::HaproxySf => "haproxy-sf",
        Peer::NaiveRestart => "naive",
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Fresh => "fresh",
        Mode::KeepAlive => "keep-alive",
    }
}

fn failure_rate(r: &Report) -> f64 {
    100.0 * r.failed() as f64 / (r.ok + r.failed()).max(1) as f64
}

fn main() {
    let mut seconds = 20u64;
    let mut clients = 8usize;
    let mut svg_path: Option<PathBuf> = None;
    let mut only: Option<Vec<String>> = None;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        match (pair[0].as_str(), pair.get(1)) {
            ("--seconds", Some(v)) => seconds = v.parse().unwrap_or(seconds),
            ("--clients", Some(v)) => clients = v.parse().unwrap_or(clients),
            ("--svg", Some(v)) => svg_path = Some(PathBuf::from(v)),
            ("--peers", Some(v)) => only = Some(v.split(',').map(str::to_string).collect()),
            _ => {
                eprintln!(
                    "usage: peer-bench [--seconds S] [--clients C] [--svg FILE] [--peers baton,baton-haproxy,baton-nginx,nginx,haproxy-w,haproxy-sf,naive]"
                );
                std::process::exit(64);
            }
        }
    }
    for tool in ["nginx", "haproxy"] {
        if Command::new(tool).arg("-v").output().is_err() {
            eprintln!("{tool} is missing: apt-get install nginx-light haproxy");
            std::process::exit(69);
        }
    }
    let peers: Vec<Peer> = [
        Peer::Baton,
        Peer::BatonHaproxy,
        Peer::HaproxyMasterWorker,
        Peer::HaproxySf,
        Peer::BatonNginx,
        Peer::Nginx,
        Peer::NaiveRestart,
    ]
    .into_iter()
    .filter(|p| only.as_ref().is_none_or(|o| o.iter().any(|n| n == key(*p))))
    .collect();
    let mut rows = Vec::new();
    for every in [Duration::from_millis(100), Duration::from_secs(1)] {
        for mode in [Mode::Fresh, Mode::KeepAlive] {
            for &peer in &peers {
                eprintln!(
                    "{} — {} — every {} ms ...",
                    peer.name(),
                    mode_name(mode),
                    every.as_millis()
                );
                rows.push(scenario(peer, mode, every, seconds, clients));
            }
        }
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# Reload under load: baton and its peers\n");
    println!(
        "{clients} clients, {seconds} s per run, no retries, loopback, {cpus} CPUs, one run.\n"
    );
    println!(
        "| server | load | reload every | reloads | ok | failed | failures by kind | failure rate | p50 ms | p99 ms | max ms | reload p50/p99/max ms | reloads never served | processes after | master RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let reload = r.reload_latencies();
        println!(
            "| {} | {} | {} ms | {} | {} | {} | {:?} | {:.4}% | {} | {} | {} | {}/{}/{} | {} | {} | {:.1} |",
            r.peer.name(),
            mode_name(r.mode),
            r.every.as_millis(),
            r.reloads.len(),
            r.report.ok,
            r.report.failed(),
            r.report.failures,
            failure_rate(&r.report),
            ms(r.report.quantile(0.5)),
            ms(r.report.quantile(0.99)),
            ms(r.report.latencies.last().copied().unwrap_or_default()),
            ms(quantile(&reload, 0.5)),
            ms(quantile(&reload, 0.99)),
            ms(reload.last().copied().unwrap_or_default()),
            r.never_served(),
            r.processes_after,
            r.rss_kib as f64 / 1024.0,
        );
    }
    if let Some(path) = svg_path {
        std::fs::write(&path, svg(&rows)).unwrap();
        let timeline = path.with_file_name(format!(
            "{}-reloads.svg",
            path.file_stem().unwrap_or_default().to_string_lossy()
        ));
        std::fs::write(&timeline, timeline_svg(&rows, seconds)).unwrap();
        eprintln!("charts: {} {}", path.display(), timeline.display());
    }
    let lost: u64 = rows
        .iter()
        // HAProxy under baton loses nothing either (docs/recipes.md); nginx's own graceful stop
        // closes idle kept-alive connections, under baton as under its own reload.
        .filter(|r| r.peer == Peer::Baton || r.peer == Peer::BatonHaproxy)
        .map(|r| r.report.failed())
        .sum();
    if lost > 0 {
        eprintln!("FAILED: baton lost {lost} requests");
        std::process::exit(1);
    }
}
