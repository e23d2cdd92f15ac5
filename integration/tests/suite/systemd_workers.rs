//! Unmodified servers as workers: the systemd socket-activation handoff (LISTEN_FDS at fd 3,
//! LISTEN_PID = the worker's own pid), readiness by sd_notify or by probe, and a master that
//! stays calm whatever a worker sends it.

use baton_integration::assert_reload_failed_saying;
use baton_integration::event;
use baton_integration::loopback;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use baton_integration::load::{Load, Mode, requests};
use baton_integration::worker_mode::WorkerMode;
use baton_integration::{
    Master, TestConfig, binaries, eventually, free_port, start_socket_activated,
};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// An example config with its port, runtime dir and relative paths made fit for a test.
fn example(file: &str, port_in_file: u16, port: u16) -> String {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{file}")).unwrap();
    let from = format!("127.0.0.1:{port_in_file}");
    assert!(text.contains(&from), "{file} listens on {from}");
    assert!(
        text.contains("../target/baton-run"),
        "{file} keeps runtime files in ../target/baton-run"
    );
    text.replace(&from, &format!("127.0.0.1:{port}"))
        .replace("../target/baton-run", "{dir}/run")
        .replace(
            "command: python-worker/",
            &format!("command: {EXAMPLES}/python-worker/"),
        )
        .replace(
            "command: node-worker/",
            &format!("command: {EXAMPLES}/node-worker/"),
        )
}

fn require(program: &str) {
    let found = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is needed for this test (.ci/run installs it)"
    );
}

fn zero_loss_with(name: &str, yaml: String, port: u16) {
    let master = Master::spawn(name, &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let run = (Duration::from_secs(8), Duration::from_millis(100));
    let (report, sent) = master.reload_under_load(loopback(port), Mode::Fresh, 8, run.0, run.1);
    report.assert_lossless_with(&format!("{name} ({sent} SIGUSR2)"), 200);
    assert!(report.generations.len() > 3, "{name}: {}", report.summary());
    let reloads = master.assert_every_request_accounted_for(sent);
    eprintln!("{name}: {sent} requests carried out by {reloads} reloads");
    // Every old generation drained and exited by itself: none was killed, at its deadline or
    // by `max_draining`. (The Python example's SIGTERM handler once ran only when the kernel
    // delivered the signal to its main thread; other workers served on until the cap killed
    // them, with whatever request they held: 0 to 4 killed a run, and a failed request now
    // and then.)
    let killed = master.events(event::WORKER_KILLED);
    assert!(killed.is_empty(), "{name}: workers killed: {killed:?}");
}

#[test]
fn the_python_example_reloads_under_load_without_losing_a_request() {
    require("python3");
    let port = free_port();
    zero_loss_with("python", example("python.yaml", 8081, port), port);
}

#[test]
fn the_node_example_reloads_under_load_without_losing_a_request() {
    require("node");
    let port = free_port();
    zero_loss_with("node", example("node.yaml", 8082, port), port);
}

#[test]
fn baton_and_systemd_style_programs_serve_side_by_side() {
    require("python3");
    require("node");
    let port = free_port();
    let yaml = format!(
        "listeners:\n  - {{name: http, address: \"127.0.0.1:{port}\"}}\nworkers:\n  - name: rust\n    command: {}\n  - name: python\n    command: {EXAMPLES}/python-worker/server.py\n    protocol: systemd\n  - name: node\n    command: {EXAMPLES}/node-worker/server.js\n    protocol: systemd\n    ready: {{http: \"{{dir}}/probe-{{worker}}.sock\", path: /ready}}\nsupervisor:\n  runtime_dir: \"{{dir}}/run\"\n  control: {{socket: \"{{dir}}/baton.sock\"}}\n",
        binaries().hello_worker.display()
    );
    let master = Master::spawn("mixed", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let addr = loopback(port);
    let seen = eventually(
        Duration::from_secs(20),
        "answers from all three kinds",
        || {
            let mut kinds = BTreeSet::new();
            for _ in 0..60 {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut r = String::new();
                s.read_to_string(&mut r).unwrap();
                assert!(
                    r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"),
                    "{r}"
                );
                let body = r.rsplit("\r\n\r\n").next().unwrap_or_default();
                kinds.insert(body.split(" pid").next().unwrap_or_default().to_string());
            }
            (kinds.len() == 3).then_some(kinds)
        },
    );
    eprintln!("answered by: {seen:?}");
    let run = (Duration::from_secs(3), Duration::from_millis(200));
    let (report, sent) = master.reload_under_load(addr, Mode::Fresh, 4, run.0, run.1);
    report.assert_lossless_with("mixed", 1);
    master.assert_every_request_accounted_for(sent);
}

#[test]
fn workers_refuse_descriptors_meant_for_another_pid_and_baton_sets_listen_pid_right() {
    require("python3");
    require("node");
    let python = PathBuf::from(format!("{EXAMPLES}/python-worker/server.py"));
    let node = PathBuf::from(format!("{EXAMPLES}/node-worker/server.js"));
    for program in [&binaries().hello_worker, &python, &node] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let child = start_socket_activated(program, &listener, Some(1));
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{}: must refuse LISTEN_PID=1",
            program.display()
        );
        assert!(
            stderr.contains("LISTEN_PID"),
            "{}: {stderr}",
            program.display()
        );
    }
    // Under baton, the very same programs start and serve: baton set LISTEN_PID to each one's
    // own pid (the Python and Node examples are tested the same way above; here the SDK).
    let (port, mut c) = TestConfig::hello_on_a_free_port(2);
    c.worker_extra = vec!["protocol: systemd".into()];
    let master = Master::start("listen-pid", &c);
    let report = requests(loopback(port), 20);
    assert_eq!(report.ok, 20, "{}", report.summary());
    drop(master);
}

#[test]
fn the_sdk_serves_under_plain_socket_activation_without_baton() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut child = start_socket_activated(&binaries().hello_worker, &listener, None);
    drop(listener);
    let report = requests(addr, 20);
    assert_eq!(report.ok, 20, "{}", report.summary());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
}

#[test]
fn a_systemd_style_worker_holds_stdio_its_listeners_and_nothing_of_the_master() {
    let (a, b) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("fds.txt");
    let mut c = TestConfig::hello(&format!("127.0.0.1:{a}"), 1);
    c.listeners
        .push(("second".into(), format!("127.0.0.1:{b}")));
    c.it_worker(WorkerMode::ReportFds(report.clone()));
    c.worker_extra = vec!["protocol: systemd".into()];
    // The master runs as if under systemd: its own NOTIFY_SOCKET and LISTEN_* must not leak.
    let master = Master::spawn_with_env(
        "systemd-fds",
        &c.yaml(),
        &[
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("LISTEN_FDS", "7"),
            ("WATCHDOG_USEC", "1000"),
        ],
    );
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let text = std::fs::read_to_string(&report).unwrap();
    let env = |var: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("env {var}=")))
            .unwrap_or_else(|| panic!("{var} not reported: {text}"))
            .to_string()
    };
    assert!(
        env("NOTIFY_SOCKET").starts_with(&master.dir.path().display().to_string()),
        "{text}"
    );
    assert_eq!(
        env("LISTEN_FDS"),
        "2",
        "its own listeners, not the master's: {text}"
    );
    assert_eq!(env("WATCHDOG_USEC"), "", "{text}");
    assert_eq!(env("BATON_CHANNEL_FD"), "", "{text}");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("env "))
        .map(|l| format!("{l}\n"))
        .collect();
    let listening: BTreeSet<u64> = [a, b]
        .iter()
        .flat_map(|&p| baton_integration::procfs::listening_inodes(p))
        .collect();
    let mut fds = BTreeSet::new();
    for line in text.lines() {
        let (fd, target) = line.split_once(' ').unwrap();
        let fd: u32 = fd.parse().unwrap();
        if target.ends_with("/fd") {
            continue; // the directory read_dir opened to list them
        }
        if fd >= 3 {
            let inode: u64 = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("fd {fd} is not a socket: {target}"));
            assert!(
                listening.contains(&inode),
                "fd {fd} ({target}) is not one of the listeners"
            );
        }
        fds.insert(fd);
    }
    assert_eq!(
        fds,
        BTreeSet::from([0, 1, 2, 3, 4]),
        "stdio and the two listeners only: {text}"
    );
    drop(master);
}

#[test]
fn a_worker_that_never_notifies_fails_the_reload_and_the_old_generation_keeps_serving() {
    let (port, good) = TestConfig::hello_on_a_free_port(2);
    let master = Master::start("never-notify", &good);
    let load = Load::until_finished(loopback(port), Mode::Fresh, 4);
    let mut silent = good.clone();
    silent.it_worker(WorkerMode::NeverReady);
    silent.ready_timeout = "1500ms";
    silent.worker_extra = vec!["protocol: systemd".into()];
    master.write_config(&silent.yaml());
    let verdict = master.reload();
    assert_reload_failed_saying(&verdict, "was not ready after 1500 ms");
    let report = load.finish();
    report.assert_lossless_with("never-notify", 0);
    report.assert_served_by(&[1]);
}

#[test]
fn garbage_oversized_and_flooding_notifications_do_not_disturb_the_master() {
    let (port, mut c) = TestConfig::hello_on_a_free_port(2);
    c.command = binaries().it_worker.clone();
    c.env = vec![
        WorkerMode::NotifyAbuse.env(),
        ("IT_ABUSE_MS".into(), "3000".into()),
    ];
    c.worker_extra = vec!["protocol: systemd".into()];
    let master = Master::start("notify-abuse", &c);
    // Both workers are now flooding for 3 s; measure the master over 2 s of it.
    master.wait_event(event::WORKER_PROTOCOL_ERROR, Duration::from_secs(5), |_| {
        true
    });
    let (ticks, ()) = master.cpu_during(|| std::thread::sleep(Duration::from_secs(2)));
    eprintln!("master CPU while two workers flood their notify sockets: {ticks} ticks in 2 s");
    assert!(
        ticks <= 10,
        "the master must not spend itself on a flood: {ticks} ticks in 2 s"
    );
    // And it still works: a reload to a well-behaved worker succeeds.
    master.write_config(&TestConfig::hello(&format!("127.0.0.1:{port}"), 1).yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    let report = requests(loopback(port), 10);
    assert_eq!(report.ok, 10, "{}", report.summary());
}

#[test]
fn a_probe_against_a_backend_that_answers_garbage_and_half_closes_fails_cleanly() {
    let (port, master) = Master::hello("probe", 1);
    // The fake backend: answers every connection with bytes that are not HTTP, then half-closes
    // and keeps the connection open (the HAProxy health-check spin case).
    let backend_path = master.dir.path().join("fake-backend.sock");
    let backend = UnixListener::bind(&backend_path).unwrap();
    backend.set_nonblocking(true).unwrap();
    let (stop, attempts) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let server = {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match backend.accept() {
                    Ok((mut s, _)) => {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        let _ = s.write_all(b"\x00\x01garbage, no status line, no headers");
                        let _ = s.shutdown(std::net::Shutdown::Write);
                        held.push(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let mut probing = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    probing.it_worker(WorkerMode::NeverReady);
    probing.ready_timeout = "2s";
    probing.worker_extra = vec![
        "protocol: systemd".into(),
        format!(
            "ready: {{http: \"{}\", path: /healthz, timeout: 500ms, interval: 100ms}}",
            backend_path.display()
        ),
    ];
    master.write_config(&probing.yaml());
    let (ticks, verdict) = master.cpu_during(|| master.reload());
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap();
    let attempts = attempts.load(Ordering::SeqCst);
    eprintln!(
        "probe: {attempts} attempts in 2 s, master used {ticks} ticks; verdict: {}",
        verdict["reason"]
    );
    assert_reload_failed_saying(&verdict, "was not ready after 2000 ms");
    assert!(attempts >= 3, "the probe retries: {attempts}");
    assert!(
        attempts <= 25,
        "one attempt per interval, no spin: {attempts}"
    );
    // A spin for the 2 s would be about 200 ticks; the work itself (a worker started, twenty
    // probes, the log) is a few, and 11 were seen once with the whole suite running beside it.
    assert!(
        ticks <= 40,
        "the master must not spin on a garbage answer: {ticks} ticks"
    );
    let report = requests(loopback(port), 10);
    assert_eq!(
        report.ok,
        10,
        "the old generation still serves: {}",
        report.summary()
    );
}

#[test]
fn a_server_that_forks_is_followed_to_its_announced_main_pid() {
    require("python3");
    let port = free_port();
    // A daemon-style server: the started process forks, the child announces itself with
    // MAINPID= and READY=1, and the parent exits. The child exits 0 on SIGTERM.
    let script = r#"
import os, signal, socket, sys, time
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect(os.environ["NOTIFY_SOCKET"]); s.send(msg.encode())
if os.fork() == 0:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    notify(f"MAINPID={os.getpid()}\nREADY=1")
    while True: time.sleep(1)
else:
    time.sleep(0.3)
"#;
    let mut c = TestConfig::hello(&format!("127.0.0.1:{port}"), 1);
    c.command = "/usr/bin/env".into();
    c.args = vec!["python3".into(), "-c".into(), script.into()];
    // As with systemd's NotifyAccess=, the forked child may only notify with `all`; under the
    // default `main` its notifications are refused and the worker never becomes ready.
    c.worker_extra = vec!["protocol: systemd".into(), "notify_access: all".into()];
    let master = Master::start("mainpid", &c);
    let (_, announced) =
        master.wait_event(event::WORKER_MAIN_PID, Duration::from_secs(5), |_| true);
    let daemon = announced["pid"].as_u64().unwrap() as u32;
    // The launcher's exit is not a crash: no restart happens.
    eventually(
        Duration::from_secs(5),
        "the daemon to be reparented to the master",
        || master.children().contains(&daemon).then_some(()),
    );
    assert!(master.events(event::WORKER_CRASHED).is_empty());
    // A reload drains it: SIGTERM goes to the announced pid, which exits and is reaped.
    let mut next = c.clone();
    next.command = binaries().hello_worker.clone();
    next.args = Vec::new();
    next.worker_extra = Vec::new();
    master.write_config(&next.yaml());
    assert_eq!(master.reload()["event"], "reload_succeeded");
    master.wait_event(event::GENERATION_EXITED, Duration::from_secs(10), |v| {
        v["generation"] == 1 && v["killed"] == false
    });
    assert!(!baton_integration::procfs::alive(daemon));
    assert!(baton_integration::procfs::zombies(master.pid()).is_empty());
}

/// Issue 28: the Python example stopped draining when its `STOPPING=1` failed (the exception
/// ended its main thread, and the serving threads went on until the drain deadline killed
/// them). Its notify socket removed under it, a drain still ends it at once.
#[test]
fn the_python_example_drains_when_its_notification_fails() {
    require("python3");
    let port = free_port();
    let yaml =
        example("python.yaml", 8081, port).replace("drain_timeout: 30s", "drain_timeout: 20s");
    assert!(yaml.contains("drain_timeout: 20s"));
    let master = Master::spawn("python-notify-gone", &yaml);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let old = master.children();
    assert_eq!(old.len(), 2);
    let notify_dir = master.dir().join("run").join("notify");
    for entry in std::fs::read_dir(&notify_dir).unwrap().flatten() {
        std::fs::remove_file(entry.path()).unwrap();
    }
    let started = std::time::Instant::now();
    assert_eq!(master.reload()["event"], "reload_succeeded");
    eventually(
        Duration::from_secs(10),
        "the old workers drained and gone",
        || {
            old.iter()
                .all(|&p| !baton_integration::procfs::alive(p))
                .then_some(())
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "drained, not killed at the 20 s deadline"
    );
    assert!(
        master.events(event::WORKER_KILLED).is_empty(),
        "{:?}",
        master.events(event::WORKER_KILLED)
    );
}
