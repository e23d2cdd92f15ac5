//! Faults injected at each step of a reload and of a self-upgrade (issue 20, part 1;
//! `crates/baton-core/src/faults.rs` names the points, `docs/reliability.md` has the table).
//!
//! For each point, three faults, each under load (fresh connections and keep-alive clients):
//! the step fails; the step takes 2.5 s, past the ready and drain deadlines (the master's one
//! thread waits there, as behind a slow system call); the master is SIGKILLed right there.
//! After each, the test checks:
//!
//! - requests: none failed, except those a killed process held (a worker killed at its drain
//!   deadline because its drain request was lost; everything after a master kill, measured);
//! - the verdict: exactly one for the request, failed or not as the fault implies, naming the
//!   point; or the client sees the master die;
//! - leaks: the master's descriptors back to their baseline, its workers back to their count,
//!   no zombie;
//! - the next reload succeeds (after a master kill: a new master, which ends what the killed
//!   one left behind, serves and reloads).
//!
//! `fdstore.update` is passed only under a service manager: `systemd.rs` injects its error under
//! the booted systemd.

use baton_integration::event;
use baton_integration::loopback;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use baton_integration::load::Mixed;
use baton_integration::procfs::zombies;
use baton_integration::{Master, eventually, free_port};
use serde_json::Value;

/// Web workers (hello-worker, baton protocol) and one stubborn worker (ignores its drain
/// request: only its drain deadline's SIGKILL ends it, so every reload passes `drain.kill`).
const WEB: usize = 2;
const WORKERS: usize = WEB + 1;
const CLIENTS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Error,
    Delay,
    Kill,
}

impl Fault {
    fn action(self) -> &'static str {
        match self {
            Fault::Error => "return(error)",
            Fault::Delay => "sleep(2500)",
            Fault::Kill => "return(kill)",
        }
    }
}

/// How often the master passes `point` while it starts (one listener, three workers): the fault
/// is armed for the pass after those, the reload's (or the upgrade's) first.
fn passes_at_start(point: &str) -> usize {
    match point {
        "listener.bind" => 1,
        "worker.spawn" | "handoff.send" | "worker.ready" => WORKERS,
        _ => 0,
    }
}

fn config(port: u16, extra: Option<u16>) -> String {
    baton_integration::web_and_stubborn_yaml(port, extra, WEB, ("2s", "2s"), "")
}

/// Waits (bounded) for a control client and returns its exit code, stdout and stderr.
fn outcome(client: std::process::Child) -> (i32, String, String) {
    let out = client.wait_with_output().expect("the control client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fired(master: &Master, point: &str) -> Vec<Value> {
    master
        .events_where(event::FAULT_INJECTED, |v| v["point"] == point)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Runs one fault at one point and checks the invariants; returns what the load saw.
fn inject(point: &'static str, fault: Fault) {
    let label = format!("{point} {fault:?}");
    let port = free_port();
    let extra = (point == "listener.bind").then(free_port);
    let upgrade = point.starts_with("upgrade.");
    let spec = format!(
        "{point}={}1*{}",
        match passes_at_start(point) {
            0 => String::new(),
            n => format!("{n}*off->"),
        },
        fault.action()
    );
    let name = format!("fault-{}", point.replace('.', "-"));
    let mut master = Master::spawn_with_env(&name, &config(port, None), &[("FAILPOINTS", &spec)]);
    master.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    assert!(
        fired(&master, point).is_empty(),
        "{label}: fired while the master started (passes_at_start is wrong): {:?}",
        fired(&master, point)
    );
    let workers_at_start = master.children().len();
    assert_eq!(workers_at_start, WORKERS, "{label}");
    let baseline_fds = master.fd_count();
    let addr = loopback(port);
    let loads = Mixed::start(addr, CLIENTS);
    if let Some(extra) = extra {
        master.write_config(&config(port, Some(extra)));
    }
    let started = Instant::now();
    let client = master.ctl_spawn(&[if upgrade { "upgrade" } else { "reload" }]);
    let (code, out, err) = outcome(client);
    let answered = started.elapsed();
    eprintln!("{label}: client exit {code} after {answered:?}: {out}{err}");

    if fault == Fault::Kill {
        let status = master.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.signal(),
            Some(9),
            "{label}: the master killed itself"
        );
        if point == "drain.kill" {
            // The drain deadline comes after the verdict: the client had its answer.
            assert_eq!(code, 0, "{label}: {out}{err}");
        } else {
            assert_ne!(code, 0, "{label}: the client sees the master die");
            assert!(
                err.contains("closed") && err.contains("no verdict came"),
                "{label}: the client says why: {err}"
            );
        }
        // Without a service manager holding the listeners, the workers end with their master
        // (its guard sends the drain signal, then SIGKILL at the drain deadline): the port is
        // closed until a new master binds it. What that costs is measured in
        // `a_master_killed_without_a_service_manager_costs_what_its_workers_held_and_the_restart`.
        let (fresh, kept) = loads.finish();
        eprintln!(
            "{label}: fresh {} / kept-alive {} (failures here are the killed master's)",
            fresh.summary(),
            kept.summary()
        );
        let successor = master.successor(&format!("{name}-2"));
        successor.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
        eventually(
            Duration::from_secs(20),
            "the killed master's workers gone",
            || (successor.children().len() == WORKERS).then_some(()),
        );
        let (code, out, err) = successor.ctl(&["reload"]);
        assert_eq!(code, 0, "{label}: the next reload: {out}{err}");
        let r = baton_integration::load::requests(addr, 20);
        assert_eq!(r.ok, 20, "{label}: {}", r.summary());
        return;
    }

    eventually(Duration::from_secs(10), "the fault injected", || {
        (!fired(&master, point).is_empty()).then_some(())
    });
    let expected_failure = fault == Fault::Error
        && matches!(
            point,
            "config.read"
                | "listener.bind"
                | "worker.spawn"
                | "handoff.send"
                | "worker.ready"
                | "upgrade.state_write"
                | "upgrade.exec"
        );
    if point == "verdict.delivery" && fault == Fault::Error {
        // As if the client's connection broke: it is told, and the verdict is kept.
        assert_ne!(code, 0, "{label}");
        assert!(err.contains("verdict"), "{label}: {err}");
        let (_, history, _) = master.ctl(&["history", "--json"]);
        let history: Value = serde_json::from_str(&history).expect("history as JSON");
        let record = history
            .as_array()
            .and_then(|h| {
                h.iter().find(|r| {
                    r["requests"][0]
                        .as_str()
                        .is_some_and(|q| q.starts_with("#1 "))
                })
            })
            .unwrap_or_else(|| panic!("{label}: request #1 in the history: {history}"));
        assert_eq!(record["ok"], true, "{label}: {record}");
    } else if expected_failure {
        assert_eq!(code, 1, "{label}: a failed verdict: {out}{err}");
        assert!(
            err.contains(&format!("fault injected at {point}")),
            "{label}: the verdict names the point: {err}"
        );
    } else if fault == Fault::Error {
        assert_eq!(code, 0, "{label}: {out}{err}");
    } else {
        // Delayed past a deadline: either verdict, but one, and a failure names its deadline.
        assert!(
            code == 0 || (code == 1 && (err.contains("not ready after") || err.contains("within"))),
            "{label}: {out}{err}"
        );
    }
    if !upgrade {
        // Request #1, the client's: one verdict.
        let covers = |v: &Value| v["covers"] == "#1";
        let verdicts = || {
            master.events_where(event::RELOAD_SUCCEEDED, covers).len()
                + master.events_where(event::RELOAD_FAILED, covers).len()
        };
        eventually(Duration::from_secs(10), "the verdict logged", || {
            (verdicts() > 0).then_some(())
        });
        assert_eq!(verdicts(), 1, "{label}: one verdict for the request");
    }

    // The listener the configuration adds is one descriptor more, once a reload bound it.
    let fds = baseline_fds + usize::from(extra.is_some());
    // The next reload succeeds (after an upgrade, the new program's first spawns make what
    // the first ones made in the old: the baseline compares like with like after it).
    let (code, out, err) = master.ctl(&["reload"]);
    assert_eq!(code, 0, "{label}: the next reload: {out}{err}");
    // Settled: every worker of the serving generation, nothing else, no leak.
    let deadline = Instant::now() + baton_integration::patience(Duration::from_secs(30));
    loop {
        let seen = (
            master.children().len(),
            zombies(master.pid()).len(),
            master.fd_count(),
        );
        if seen == (WORKERS, 0, fds) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{label}: not back to {WORKERS} workers, 0 zombies, {fds} descriptors: {seen:?}; {:?}",
            baton_integration::procfs::fds(master.pid())
        );
        std::thread::sleep(Duration::from_millis(50)); // polling a condition, with a deadline
    }
    let (fresh, kept) = loads.finish();
    eprintln!(
        "{label}: fresh {} / kept-alive {}",
        fresh.summary(),
        kept.summary()
    );
    assert!(fresh.ok > 0 && kept.ok > 0, "{label}: the load ran");
    if point == "drain.request" {
        // Not asked to drain (an error), or asked only when the master's loop resumes, past
        // the drain deadline (a delay), the old web workers serve on until their deadline's
        // SIGKILL: a request each client had in flight on one of them then is lost, no more.
        assert!(
            fresh.failed() + kept.failed() <= (2 * CLIENTS) as u64,
            "{label}: {} / {}",
            fresh.summary(),
            kept.summary()
        );
    } else {
        fresh.assert_lossless(&label);
        kept.assert_lossless(&label);
    }
    let r = baton_integration::load::requests(addr, 20);
    assert_eq!(r.ok, 20, "{label}: {}", r.summary());
}

fn every_fault(point: &'static str) {
    for fault in [Fault::Error, Fault::Delay, Fault::Kill] {
        inject(point, fault);
    }
}

#[test]
fn config_read() {
    every_fault("config.read");
}

#[test]
fn listener_bind() {
    every_fault("listener.bind");
}

#[test]
fn worker_spawn() {
    every_fault("worker.spawn");
}

#[test]
fn handoff_send() {
    every_fault("handoff.send");
}

#[test]
fn worker_ready() {
    every_fault("worker.ready");
}

#[test]
fn promotion() {
    every_fault("promotion");
}

#[test]
fn drain_request() {
    every_fault("drain.request");
}

#[test]
fn drain_kill() {
    every_fault("drain.kill");
}

#[test]
fn verdict_delivery() {
    every_fault("verdict.delivery");
}

#[test]
fn upgrade_state_write() {
    every_fault("upgrade.state_write");
}

#[test]
fn upgrade_exec() {
    every_fault("upgrade.exec");
}

/// What a master kill costs where no service manager holds the listeners (plain `baton run`,
/// a shell loop or a container restarting it): the workers end with their master (its guard, or
/// the drain signal of their parent's death) and the port stays closed until the next master
/// binds it. Measured here with the next master started as soon as the first is reaped; under
/// systemd with the fd store clients wait instead (`systemd.rs`).
#[test]
fn a_master_killed_without_a_service_manager_costs_what_its_workers_held_and_the_restart() {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut master = Master::start(
        "kill-cost",
        &baton_integration::TestConfig::hello(&address, WEB),
    );
    let addr: SocketAddr = address.parse().unwrap();
    let load = Mixed::start(addr, CLIENTS);
    std::thread::sleep(Duration::from_secs(1)); // the load runs for a second: a duration, not a wait
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(master.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    master.wait_exit(Duration::from_secs(10));
    let reaped = killed.elapsed();
    let successor = master.successor("kill-cost-2");
    successor.wait_event(event::SERVING, Duration::from_secs(30), |_| true);
    let back = killed.elapsed();
    let (fresh, kept) = load.finish();
    eprintln!(
        "master killed: reaped after {reaped:?}, the next master served after {back:?}; fresh {} / kept-alive {}",
        fresh.summary(),
        kept.summary()
    );
    // Requests fail only by a connection refused, reset, or closed by a worker that drained
    // (its parent's death asks it to) while no master serves: none hangs and none is answered
    // wrongly.
    for report in [&fresh, &kept] {
        assert!(
            report
                .failures
                .keys()
                .all(|k| k == "refused" || k == "reset" || k == "closed"),
            "{}",
            report.summary()
        );
    }
    assert!(back < Duration::from_secs(10), "{back:?}");
    let r = baton_integration::load::requests(addr, 20);
    assert_eq!(r.ok, 20, "{}", r.summary());
}
